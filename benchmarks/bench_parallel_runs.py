"""How fast do N train.py runs go when started together on one machine? (Planning a study's wall time.)

    python benchmarks/bench_parallel_runs.py --device cpu --runs 1,2
    python benchmarks/bench_parallel_runs.py --device cuda --runs 1,8,14 --steps 8000

For each N in --runs, N train.py processes (seeds 0 .. N-1, --threads each) train at once in a
temporary folder, without evaluations or checkpoints. Each run's steady rate is read back from its
own TensorBoard log (`charts/steps_per_second` is the session's average rate, so two of its points
give the rate between them): env steps per second from --warmup-steps (the compile and the random
warm-up behind it) to the end, one gradient update per env step. Prints one Markdown row per N:
the median run's rate, all N together, and the hours a 100k-step run would take at that rate.
"""
from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lab.tables import CurveReader  # noqa: E402
from sac_model import Tag  # noqa: E402


def steady_rate(run_dir: Path, warmup_steps: int) -> float:
    """Env steps per second between the first episode end past `warmup_steps` and the run's last one."""
    steps, average_rates = CurveReader(run_dir, tag=Tag.STEPS_PER_SECOND).read()
    seconds = steps / average_rates  # elapsed since the session started, at each episode end
    first = int(np.searchsorted(steps, warmup_steps))
    if first >= len(steps) - 1:
        raise SystemExit(f"error: {run_dir.name} logged too few episodes past step {warmup_steps}: raise --steps")
    return float((steps[-1] - steps[first]) / (seconds[-1] - seconds[first]))


def run_together(count: int, args: argparse.Namespace, folder: Path) -> tuple[list[float], float]:
    """Start `count` train.py runs at once; their steady rates and the wall seconds until the last ended."""
    flags = ["--device", args.device, "--threads", str(args.threads), "--total-steps", str(args.steps),
             "--start-steps", str(args.start_steps), "--eval-every", "0", "--target-return", "none",
             "--checkpoint-every", "1000000", *shlex.split(args.train_args)]
    names = [f"n{count}_seed{seed}" for seed in range(count)]
    start = time.perf_counter()
    processes = [subprocess.Popen([sys.executable, str(ROOT / "train.py"), *flags, "--seed", str(seed),
                                   "--run-name", name], cwd=folder, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True)
                 for seed, name in enumerate(names)]
    for name, process in zip(names, processes):
        _, error = process.communicate()
        if process.returncode != 0:
            raise SystemExit(f"error: {name} exited {process.returncode}: {error.strip().splitlines()[-1:]}")
    wall = time.perf_counter() - start
    return [steady_rate(folder / "runs" / name, args.warmup_steps) for name in names], wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="train.py --device (default: cpu)")
    parser.add_argument("--runs", default="1,2", help="comma-separated counts of runs started together")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (default: 1)")
    parser.add_argument("--steps", type=int, default=6000, help="env steps per run (default: 6000)")
    parser.add_argument("--start-steps", type=int, default=1000, help="random warm-up steps (default: 1000)")
    parser.add_argument("--warmup-steps", type=int, default=2500,
                        help="rates are measured from this env step on (default: 2500)")
    parser.add_argument("--train-args", default="--update-every 50", help="further train.py flags")
    args = parser.parse_args()
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(f"{device}, torch {torch.__version__}; train.py --device {args.device} --threads {args.threads} "
          f"{args.train_args}; env steps/s from step {args.warmup_steps:,} to {args.steps:,}\n")
    print("| runs at once | env steps/s, median run | min .. max | all runs | h per 100k-step run | wall s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for count in (int(n) for n in args.runs.split(",")):
        with tempfile.TemporaryDirectory() as folder:
            rates, wall = run_together(count, args, Path(folder))
        median = float(np.median(rates))
        print(f"| {count} | {median:.0f} | {min(rates):.0f} .. {max(rates):.0f} | {sum(rates):.0f} | "
              f"{100_000 / median / 3600:.2f} | {wall:.0f} |", flush=True)


if __name__ == "__main__":
    main()
