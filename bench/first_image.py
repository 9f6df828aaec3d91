"""Time to the first image of the README's main command, from process start, cold and warm.

Runs ``jaxmask generate --out DIR --per-class 2 --steps 20`` (the README's quick start, on the
bundled model) as a fresh process, and watches the dataset folder: the first image is the first
JPEG that appears in ``JPEGImages/``. The cold run gets an empty compilation cache (so it
compiles the sampler and traces the parameter shapes); the warm runs reuse that cache, as every
later run of a user does. Each run writes a fresh dataset folder. The operating system's file
cache is warm in every run (the script cannot empty it).

    python bench/first_image.py                       # this Python's jaxmask
    python bench/first_image.py --python /work/venv312/bin/python --warm 3
    python bench/first_image.py --args "--cpu-devices 1"   # one CPU device, not one per core

Prints one row per run: seconds to the first image, to the end, and the status lines it drew.
"""

import argparse
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAIN = ["generate", "--per-class", "2", "--steps", "20"]  # README.md's main command
POLL_S = 0.02


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def one_run(python: str, out: Path, cache: Path, extra: list[str]) -> dict:
    """One ``jaxmask generate`` process: seconds to its first JPEG and to its exit."""
    args = [python, "-m", "ports.cli", *MAIN, "--out", str(out), "--compilation-cache", str(cache)]
    args += extra
    env = {**os.environ, "COLUMNS": "100"}
    images = out / "JPEGImages"
    # the output goes to a file, not a pipe nobody reads while polling (a full pipe would stall it)
    with tempfile.TemporaryFile() as log:
        start = time.perf_counter()
        process = subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        first = None
        while process.poll() is None:
            if first is None and images.is_dir() and any(images.glob("*.jpg")):
                first = time.perf_counter() - start
            time.sleep(POLL_S)
        total = time.perf_counter() - start
        log.seek(0)
        output = log.read().decode(errors="replace")
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed ({process.returncode}):\n{output}")
    if first is None:  # written between the last two polls: at most the whole run
        first = total
    return {"first_image_s": first, "total_s": total, "last_line": output.strip().splitlines()[-1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", default=sys.executable, help="the Python that runs jaxmask")
    parser.add_argument("--warm", type=int, default=3, help="warm runs after the cold one")
    parser.add_argument(
        "--args", default="", help="more options for jaxmask generate, e.g. '--cpu-devices 1'"
    )
    args = parser.parse_args()
    extra = shlex.split(args.args)
    version = subprocess.run(
        [
            args.python,
            "-c",
            "import jax, platform; print(platform.python_version(), jax.__version__)",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    print(f"device: {cpu_name()}, {os.cpu_count()} cores; Python {version[0]}, jax {version[1]}")
    print(f"command: jaxmask {' '.join([*MAIN, *extra])} --out DIR (bundled model)")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "xla"
        for i in range(1 + args.warm):
            row = one_run(args.python, Path(tmp) / f"data-{i}", cache, extra)
            row["run"] = "cold cache" if i == 0 else f"warm {i}"
            rows.append(row)
            print(
                f"{row['run']:>10}  first image {row['first_image_s']:6.1f} s  "
                f"all 16 {row['total_s']:6.1f} s  ({row['last_line']})",
                flush=True,
            )
    warm = [r["first_image_s"] for r in rows[1:]]
    if warm:
        print(
            f"first image: cold {rows[0]['first_image_s']:.1f} s (target <= 15), warm median "
            f"{statistics.median(warm):.1f} s (target <= 6)"
        )


if __name__ == "__main__":
    main()
