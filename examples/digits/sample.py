"""Print a request body with held-out digits (images the model never trained on), for curl.

    python -m examples.digits.sample [INDEX]          # {"pixels": [...64 values...]}
    python -m examples.digits.sample --batch N        # {"images": [[...], ...]}: the first N

The pixels are whole numbers (load_digits' are), which JSON numbers of a `float` parameter accept.
The true digits go to stderr, so `python -m examples.digits.sample 3 | curl ... -d @-` shows the
answer to expect beside the service's.
"""

from __future__ import annotations

import argparse
import json
import sys

from examples.digits.train import held_out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.digits.sample", description=__doc__.split("\n\n")[0])
    parser.add_argument("index", type=int, nargs="?", default=0, help="which held-out digit [0]")
    parser.add_argument("--batch", type=int, metavar="N", help="the first N held-out digits, for classify_digits")
    args = parser.parse_args(argv)
    images, labels = held_out()
    if args.batch is not None:
        if not 1 <= args.batch <= len(images):
            parser.error(f"--batch takes 1 to {len(images)}")
        body: dict[str, object] = {"images": images[: args.batch].astype(int).tolist()}
        truth = labels[: args.batch].tolist()
    else:
        if not 0 <= args.index < len(images):
            parser.error(f"INDEX takes 0 to {len(images) - 1}")
        body = {"pixels": images[args.index].astype(int).tolist()}
        truth = [int(labels[args.index])]
    print(json.dumps(body, separators=(",", ":")))
    print(f"true digit{'s' if len(truth) > 1 else ''}: {' '.join(map(str, truth))}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
