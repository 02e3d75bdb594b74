"""procbridge's load-testing and benchmarking tools (client side; not part of the service).

- `bench.loadtest`: the load generator behind `procbridge loadtest` and `scripts/loadtest.py`;
  `bench.scenario` says what it sends, `bench.loadtest_cli` is its command line.
- `bench.plots`: its PNG plots (matplotlib, imported only when plots are asked for).
- `bench.run`: `./scripts/bench`, the comparison of procbridge with the baselines in `bench.apps`.

These tools need the dev lock (`hdrhistogram`, `matplotlib`, `gunicorn`, `py-spy`):
`pip install -r requirements-dev.lock`, or run `./scripts/bench`, which installs it.
"""
