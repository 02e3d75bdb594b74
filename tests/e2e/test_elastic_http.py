"""An elastic pool through the real server: `--workers 1..2 --worker-idle 1` starts one worker, grows
to two for a burst of concurrent calls (every one 200, none 503), says so in `/v1/workers` (`size`,
`min`, `max`) and `/metrics` (`procbridge_pool_size`, `procbridge_pool_scaled_total{direction}`), and
shrinks back to one after a second without work, without counting a restart."""

from __future__ import annotations

import threading
from pathlib import Path

from tests.conftest import Reply, http, metric, post_json, serving, wait_for

NAP = 300  # ms each call of the burst takes in its worker (an idle sleep: no CPU taken from the test)


def workers(url: str) -> dict:
    reply = http("GET", url + "/v1/workers")
    assert reply.status == 200
    return reply.json()


def test_the_pool_grows_for_a_burst_and_shrinks_back_when_idle(tmp_path: Path) -> None:
    with serving(tmp_path, "--workers", "1..2", "--worker-idle", "1", "--tasks", "tests.support.fault_tasks") as srv:
        listing = workers(srv.url)
        assert (listing["size"], listing["min"], listing["max"]) == (1, 1, 2) and len(listing["workers"]) == 1
        (first,) = [w["pid"] for w in listing["workers"]]
        # A burst of 6 calls of 0.3 s: 1 runs, 5 wait (under --max-pending, 4 × MAX = 8): a second worker starts.
        replies: list[Reply] = []
        threads = [threading.Thread(target=lambda: replies.append(post_json(f"{srv.url}/v1/tasks/nap", {"ms": NAP})))
                   for _ in range(6)]
        for thread in threads:
            thread.start()
        grown = wait_for(lambda: (w := workers(srv.url))["size"] == 2 and len(w["workers"]) == 2 and w, 20, 0.02,
                         "the pool to grow to 2")
        assert (grown["min"], grown["max"]) == (1, 2) and first in {w["pid"] for w in grown["workers"]}
        for thread in threads:
            thread.join(30)
        assert sorted(r.status for r in replies) == [200] * 6, [r.body for r in replies if r.status != 200]
        assert len({r.json()["result"]["pid"] for r in replies}) == 2, "both workers took calls"
        assert metric(srv, "procbridge_pool_scaled_total", 'direction="up"') == 1
        assert (metric(srv, "procbridge_pool_min_size"), metric(srv, "procbridge_pool_max_size")) == (1, 2)
        # A second without work: back to MIN, one worker stopped cleanly (no restart).
        wait_for(lambda: workers(srv.url)["size"] == 1 and len(workers(srv.url)["workers"]) == 1, 20, 0.05,
                 "the pool to shrink to 1")
        assert metric(srv, "procbridge_pool_scaled_total", 'direction="down"') == 1
        assert metric(srv, "procbridge_pool_size") == 1
        text = http("GET", srv.url + "/metrics").body.decode()
        assert "procbridge_worker_restarts_total{" in text and not [
            line for line in text.splitlines() if line.startswith("procbridge_worker_restarts_total{")
            and not line.endswith(" 0.0")]
        assert post_json(f"{srv.url}/v1/tasks/nap", {"ms": 1}).status == 200
        assert http("GET", srv.url + "/readyz").status == 200
