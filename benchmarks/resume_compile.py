"""What compiling the gradient step costs a new run and a resumed one: python benchmarks/resume_compile.py.

Each row is a whole `train.py` process that ends after one update round (50 gradient steps), timed from
start to exit, minus the same process run eagerly (`--no-compile`): what the compile adds; beside it, what the
run's own "gradient step compiled in N s" line said. Every repeat starts with an empty inductor cache
(`TORCHINDUCTOR_CACHE_DIR` a new folder), so the rows are:
1. a new run with the cache empty (the first run on a machine),
2. a resume of that run, the cache now filled by it (what a user waits for after Ctrl-C),
3. a second new run with the cache filled,
4. a new run at another --threads (--other-threads), the cache filled at --threads only,
5. a new run of another env (Pendulum-v1: other network shapes), the cache filled by LunarLander's only.
Run it on an otherwise idle machine: the compile is CPU-bound, and a loaded machine stretches it.
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
WARMUP_STEPS = 1_000  # random actions; the first update round comes at this step
UPDATE_EVERY = 50
COMPILED_IN = re.compile(r"gradient step compiled in (\d+) s")


def train_py_seconds(workdir: Path, args: list[str], cache: str) -> tuple[float, float]:
    """Wall-clock seconds of one `train.py` process in `workdir` with inductor's cache at `cache`, and the
    seconds its "compiled in" line gave (NaN for an eager run)."""
    command = [sys.executable, str(REPO_ROOT / "train.py"), *args]
    start = time.perf_counter()
    result = subprocess.run(command, cwd=workdir, capture_output=True, text=True,
                            env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache})
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"train.py exited with {result.returncode}: {result.stderr.strip()[-2000:]}")
    said = COMPILED_IN.search(result.stdout)
    return elapsed, float(said.group(1)) if said else float("nan")


def new_run_flags(name: str, threads: int, steps: int, env: str = "LunarLanderContinuous-v3") -> list[str]:
    """A run whose first update round ends it; an end-of-episode checkpoint every episode to resume from."""
    return ["--env", env, "--total-steps", str(steps), "--start-steps", str(WARMUP_STEPS), "--update-after", str(WARMUP_STEPS),
            "--update-every", str(UPDATE_EVERY), "--eval-every", "0", "--target-return", "none",
            "--checkpoint-every", "1", "--threads", str(threads), "--seed", "0", "--run-name", name]


def one_repeat(threads: int, other_threads: int, compile_flag: str) -> dict[str, tuple[float, float]]:
    """Seconds (and the compile line's seconds) of the five processes, in this order, with one fresh cache."""
    first_round = WARMUP_STEPS + UPDATE_EVERY
    with tempfile.TemporaryDirectory(prefix="resume_compile_") as folder, \
            tempfile.TemporaryDirectory(prefix="inductor_cache_") as cache:
        workdir = Path(folder)
        rows = {"new run, empty cache": [*new_run_flags("a", threads, first_round)],
                "resumed run, cache filled": ["--resume", "a", "--total-steps", str(first_round + UPDATE_EVERY)],
                "new run, cache filled": new_run_flags("b", threads, first_round),
                f"new run at --threads {other_threads}, cache filled at {threads}":
                    new_run_flags("c", other_threads, first_round),
                "new run of Pendulum-v1 (other shapes), cache filled by LunarLander's":
                    new_run_flags("d", threads, first_round, env="Pendulum-v1")}
        return {name: train_py_seconds(workdir, [*flags, compile_flag], cache) for name, flags in rows.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="train.py's --threads")
    parser.add_argument("--other-threads", type=int, default=2, help="the --threads of row 4")
    parser.add_argument("--repeats", type=int, default=3, help="repeats; the table shows medians")
    args = parser.parse_args()
    compiled: dict[str, list[tuple[float, float]]] = {}
    eager: dict[str, list[tuple[float, float]]] = {}
    for repeat in range(args.repeats):
        print(f"repeat {repeat + 1}/{args.repeats}", file=sys.stderr, flush=True)
        for name, seconds in one_repeat(args.threads, args.other_threads, "--compile").items():
            compiled.setdefault(name, []).append(seconds)
        for name, seconds in one_repeat(args.threads, args.other_threads, "--no-compile").items():
            eager.setdefault(name, []).append(seconds)
    print(f"Whole train.py processes ending after one update round, {args.threads} thread(s), median of "
          f"{args.repeats} repeats:\n")
    print("| process | compiled s | eager s | the compile adds s | the run's line said s |\n"
          "| --- | --- | --- | --- | --- |")
    for name in compiled:
        c, e = (statistics.median(seconds for seconds, _ in runs) for runs in (compiled[name], eager[name]))
        said = statistics.median(line for _, line in compiled[name])
        print(f"| {name} | {c:.1f} | {e:.1f} | {c - e:+.1f} | {said:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
