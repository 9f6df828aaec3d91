"""What resuming a dataset costs now that it checks every file's sha256 against the manifest.

Writes N items of SD-like files (a smooth JPEG image and a palette PNG label map at SIZE px) into
a VOC folder once, then times ``open_dataset`` on it (what ``jaxmask generate`` does when it
resumes: read the manifest, hash every file) and ``jaxmask verify``'s ``verify``. Numbers are
for a warm page cache (the files were just written); a cold disk adds its read time.

    python bench/resume_check.py --items 10000 --size 512 --folder /tmp/resume-bench
"""

import argparse
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from ports.store import open_dataset, verify
from tests.ports.store._items import one_class_record  # the store tests' record

ID2LABEL = {0: "background", 1: "cat"}


def item(index: int, size: int):
    """A smooth image (JPEG sizes like a generated one, not like noise) and a disc label."""
    rng = np.random.default_rng(index)
    yy, xx = np.mgrid[0:size, 0:size] / size
    phase = rng.random(3) * 6.28
    image = (127 + 120 * np.sin(6 * xx[..., None] + 4 * yy[..., None] + phase)).astype(np.uint8)
    cy, cx, r = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.1, 0.3)
    label = (((yy - cy) ** 2 + (xx - cx) ** 2) < r**2).astype(np.uint8)
    record = one_class_record(
        label,
        ID2LABEL,
        method={"name": "seediff-code", "params": {}},
        model={"id": "bench", "fingerprint": "sha256:0"},
        steps=50,
        versions={},
    )
    return image, label, record


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=10_000)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--folder", type=Path, default=Path("/tmp/resume-bench"))
    args = parser.parse_args()
    config = {"format": "voc", "total": args.items, "size": args.size}
    dataset = open_dataset(args.folder, config)
    todo = dataset.todo(args.items)
    if todo:
        start = time.perf_counter()
        with dataset.writer(ID2LABEL) as writer:
            for index in todo:
                image, label, record = item(index, args.size)
                writer.write(index, image, label, record)
        dataset.merge()
        print(f"wrote {len(todo)} items in {time.perf_counter() - start:.1f} s")
    total = sum(p.stat().st_size for p in args.folder.rglob("*") if p.is_file())
    start = time.perf_counter()
    resumed = open_dataset(args.folder, config)
    opened = time.perf_counter() - start
    start = time.perf_counter()
    found = verify(args.folder)
    verified = time.perf_counter() - start
    assert len(resumed.done) == args.items and not found.problems
    print(
        f"{args.items} items of {args.size} px, {total / 2**20:.0f} MiB: resume check "
        f"{opened:.2f} s ({opened / args.items * 1e6:.0f} us/item), verify {verified:.2f} s"
    )


if __name__ == "__main__":
    main()
