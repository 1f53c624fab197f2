"""What compiling the gradient step costs a new run and a resumed one: python benchmarks/resume_compile.py.

Each row is a whole `train.py` process that ends after one update round (50 gradient steps), timed from
start to exit, minus the same process run eagerly (`--no-compile`): what the compile adds. Every repeat
starts with an empty inductor cache (`TORCHINDUCTOR_CACHE_DIR` a new folder), so the rows are:
1. a new run with the cache empty (the first run on a machine),
2. a resume of that run, the cache now filled by it (what a user waits for after Ctrl-C),
3. a second new run with the cache filled.
Run it on an otherwise idle machine: the compile is CPU-bound, and a loaded machine stretches it.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
WARMUP_STEPS = 1_000  # random actions; the first update round comes at this step
UPDATE_EVERY = 50


def train_py_seconds(workdir: Path, args: list[str], cache: str) -> float:
    """Wall-clock seconds of one `train.py` process in `workdir` with inductor's cache at `cache`."""
    command = [sys.executable, str(REPO_ROOT / "train.py"), *args]
    start = time.perf_counter()
    result = subprocess.run(command, cwd=workdir, capture_output=True, text=True,
                            env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache})
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"train.py exited with {result.returncode}: {result.stderr.strip()[-2000:]}")
    return elapsed


def new_run_flags(name: str, threads: int, steps: int) -> list[str]:
    """A run whose first update round ends it; an end-of-episode checkpoint every episode to resume from."""
    return ["--total-steps", str(steps), "--start-steps", str(WARMUP_STEPS), "--update-after", str(WARMUP_STEPS),
            "--update-every", str(UPDATE_EVERY), "--eval-every", "0", "--target-return", "none",
            "--checkpoint-every", "1", "--threads", str(threads), "--seed", "0", "--run-name", name]


def one_repeat(threads: int, compile_flag: str) -> dict[str, float]:
    """Seconds of the three processes (new run, its resume, another new run) with one fresh cache."""
    first_round = WARMUP_STEPS + UPDATE_EVERY
    with tempfile.TemporaryDirectory(prefix="resume_compile_") as folder, \
            tempfile.TemporaryDirectory(prefix="inductor_cache_") as cache:
        workdir = Path(folder)
        new = train_py_seconds(workdir, [*new_run_flags("a", threads, first_round), compile_flag], cache)
        resumed = train_py_seconds(workdir, ["--resume", "a", "--total-steps", str(first_round + UPDATE_EVERY),
                                             compile_flag], cache)
        again = train_py_seconds(workdir, [*new_run_flags("b", threads, first_round), compile_flag], cache)
    return {"new run, empty cache": new, "resumed run, cache filled": resumed, "new run, cache filled": again}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="train.py's --threads")
    parser.add_argument("--repeats", type=int, default=3, help="repeats; the table shows medians")
    args = parser.parse_args()
    compiled: dict[str, list[float]] = {}
    eager: dict[str, list[float]] = {}
    for repeat in range(args.repeats):
        print(f"repeat {repeat + 1}/{args.repeats}", file=sys.stderr, flush=True)
        for name, seconds in one_repeat(args.threads, "--compile").items():
            compiled.setdefault(name, []).append(seconds)
        for name, seconds in one_repeat(args.threads, "--no-compile").items():
            eager.setdefault(name, []).append(seconds)
    print(f"Whole train.py processes ending after one update round, {args.threads} thread(s), median of "
          f"{args.repeats} repeats:\n")
    print("| process | compiled s | eager s | the compile adds s |\n| --- | --- | --- | --- |")
    for name in compiled:
        c, e = statistics.median(compiled[name]), statistics.median(eager[name])
        print(f"| {name} | {c:.1f} | {e:.1f} | {c - e:+.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
