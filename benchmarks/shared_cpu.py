"""Env steps per second of a train.py run while other processes use the CPU: idle, beside one and two busy ones.

    python benchmarks/shared_cpu.py --output benchmarks/results/shared_cpu.md
    python benchmarks/shared_cpu.py --threads 2 --loads 1 --variants default,passive --repeats 3

Each measurement is one `train.py` process on Pendulum-v1 at the default network, batch and update cadence
(50 gradient steps every 50 env steps, from env step 1,000), with the flags and environment of a variant,
started beside LOAD busy processes (each a one-line Python busy loop, as a browser tab, TensorBoard or a
second training would be at their worst). Its steady rate is read from its own TensorBoard log: env steps
per second between the first episode end after --warmup-steps (the compile and the random warm-up are
behind it) and its last episode end. A run still going after --max-seconds is stopped with two SIGINTs (it
writes a checkpoint and flushes its log) and measured on what it did. Prints one Markdown row per
(variant, threads, load): the median rate over --repeats and its ratio to `--threads 1` of the same variant
at the same load. Run it on an otherwise idle machine: the busy processes are the only load it means.
"""
from __future__ import annotations

import argparse
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lab.provenance import provenance  # noqa: E402
from sac_model import Tag  # noqa: E402

BUSY_LOOP = [sys.executable, "-c", "while True: pass"]
# What each variant changes, as train.py flags and environment variables. "wait-*": OpenMP's wait policy,
# which decides whether a thread that waits at a barrier spins (ACTIVE) or sleeps (PASSIVE).
VARIANTS: dict[str, tuple[list[str], dict[str, str]]] = {
    "default": ([], {}),
    "eager": (["--no-compile"], {}),
    "passive": ([], {"OMP_WAIT_POLICY": "PASSIVE"}),
    "active": ([], {"OMP_WAIT_POLICY": "ACTIVE"}),
    "spin-1k": ([], {"GOMP_SPINCOUNT": "1000"}),
    "spin-10k": ([], {"GOMP_SPINCOUNT": "10000"}),
    "spin-20k": ([], {"GOMP_SPINCOUNT": "20000"}),
    # The compiled step's fused kernels run on one thread (no OpenMP region of their own); matrix products
    # still use --threads.
    "serial-kernels": ([], {"TORCHINDUCTOR_CPP_MIN_CHUNK_SIZE": str(1 << 30)}),
    "serial-kernels-passive": ([], {"TORCHINDUCTOR_CPP_MIN_CHUNK_SIZE": str(1 << 30), "OMP_WAIT_POLICY": "PASSIVE"}),
}


def steady_rate(run_dir: Path, warmup_steps: int) -> tuple[float, int]:
    """Env steps per second between the first episode end past `warmup_steps` and the last one, and the steps
    that rate covers (0 when fewer than two episodes ended past the warm-up)."""
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    ends = [(e.step, e.wall_time) for e in events.Scalars(Tag.EPISODE_RETURN) if e.step > warmup_steps]
    if len(ends) < 2:
        return 0.0, 0
    (first_step, first_time), (last_step, last_time) = ends[0], ends[-1]
    return (last_step - first_step) / (last_time - first_time), last_step - first_step


def measure(variant: str, threads: int, load: int, args: argparse.Namespace, folder: Path, name: str) -> float:
    """One train.py run beside `load` busy processes; its steady env steps per second."""
    flags, environment = VARIANTS[variant]
    command = [sys.executable, str(REPO / "train.py"), "--env", "Pendulum-v1", "--total-steps", str(args.steps),
               "--start-steps", "1000", "--update-after", "1000", "--eval-every", "0", "--target-return", "none",
               "--checkpoint-every", "1000000", "--no-save-buffer", "--run-name", name,
               *(["--threads", str(threads)] if threads else []), *flags]
    busy = [subprocess.Popen(BUSY_LOOP) for _ in range(load)]
    try:
        run = subprocess.Popen(command, cwd=folder, env={**os.environ, **environment}, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
        try:
            run.wait(timeout=args.max_seconds)
        except subprocess.TimeoutExpired:
            run.send_signal(signal.SIGINT)
            time.sleep(1.0)
            run.send_signal(signal.SIGINT)
        _, error = run.communicate()
    finally:
        for process in busy:
            process.kill()
            process.wait()
    if run.returncode not in (0, 128 + signal.SIGINT):
        raise SystemExit(f"error: {name} exited {run.returncode}: {error.strip().splitlines()[-1:]}")
    rate, covered = steady_rate(folder / "runs" / name, args.warmup_steps)
    print(f"{variant} threads={threads or 'default'} load={load}: {rate:.1f} env steps/s over {covered:,} steps",
          file=sys.stderr, flush=True)
    return rate


def table(rates: dict[tuple[str, int, int], list[float]]) -> list[str]:
    lines = ["| variant | --threads | busy processes beside it | env steps/s (median) | repeats | "
             "vs --threads 1, same variant and load |", "| --- | --- | --- | --- | --- | --- |"]
    for (variant, threads, load), values in rates.items():
        median = statistics.median(values)
        one = rates.get((variant, 1, load))
        ratio = f"{median / statistics.median(one):.2f}" if one and statistics.median(one) > 0 else ""
        lines.append(f"| {variant} | {threads or 'default'} | {load} | {median:.1f} | "
                     f"{', '.join(f'{v:.1f}' for v in values)} | {ratio} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default="default", help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--threads", default="1,2", help="train.py --threads values; 0 is train.py's default")
    parser.add_argument("--loads", default="0,1,2", help="busy processes beside the run")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--steps", type=int, default=6000, help="env steps of each run")
    parser.add_argument("--warmup-steps", type=int, default=2000)
    parser.add_argument("--max-seconds", type=float, default=150.0, help="a slower run is stopped and measured")
    parser.add_argument("--output", type=Path, default=None, help="write the table (Markdown) here as well")
    args = parser.parse_args(argv)
    variants = args.variants.split(",")
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variant {unknown[0]!r}; known: {', '.join(VARIANTS)}")
    combos = [(v, int(t), int(k)) for v in variants for t in args.threads.split(",") for k in args.loads.split(",")]
    rates: dict[tuple[str, int, int], list[float]] = {combo: [] for combo in combos}
    with tempfile.TemporaryDirectory() as folder:
        for repeat in range(args.repeats):  # repeats interleaved, so drift in the machine spreads over every row
            for variant, threads, load in combos:
                name = f"{variant}_t{threads}_l{load}_r{repeat}"
                rates[variant, threads, load].append(measure(variant, threads, load, args, Path(folder), name))
    command = "python benchmarks/shared_cpu.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    text = "\n".join([f"# A run beside busy processes\n\n{provenance()}\n\n`{command}`\n", *table(rates)]) + "\n"
    print(text)
    if args.output:
        args.output.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
