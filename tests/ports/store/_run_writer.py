"""A dataset-writing process for the SIGKILL test:
``python -m tests.ports.store._run_writer OUT FORMAT TOTAL [--slow SECONDS] [--merge]``.

``--slow`` makes every fsync sleep first, so most of the run is spent inside writes and a kill
lands mid-item.
"""

import argparse
import os
import time

from ports.store import open_dataset
from tests.ports.store import _items


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("format")
    parser.add_argument("total", type=int)
    parser.add_argument("--slow", type=float, default=0.0)
    parser.add_argument("--merge", action="store_true")
    args = parser.parse_args()
    if args.slow:
        real_fsync = os.fsync

        def slow_fsync(fd):
            time.sleep(args.slow)
            real_fsync(fd)

        os.fsync = slow_fsync
    dataset = open_dataset(args.out, _items.config(args.format, args.total))
    _items.write_items(dataset, dataset.todo(args.total))
    if args.merge:
        dataset.merge()


if __name__ == "__main__":
    main()
