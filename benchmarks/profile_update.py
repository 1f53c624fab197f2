"""Where one SAC update spends its time on the CPU: python benchmarks/profile_update.py [--threads 1] [--no-compile].

Runs 30 updates at train.py's defaults (batch 256, hidden 256, LayerNorm, uniform replay) under
torch.profiler and prints the operators sorted by their own CPU time, then a summary: the matrix
products (which torch.compile leaves to the BLAS library), the fused kernels torch.compile wrote
for everything else (the row "## Call CompiledFxGraph ..."), and the rest. With --no-compile the
same step runs eagerly, one aten operator at a time.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from plumbing import keep_freed_memory_mapped  # noqa: E402
from sac_model import SACAgent, SACConfig, make_buffer  # noqa: E402

OBS_DIM, ACTION_DIM, FILL, UPDATES = 8, 2, 5_000, 30
MATMULS = ("aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm")
GFLOP_PER_UPDATE = 0.56  # batch 256, hidden 256: counted in docs/performance.md, "The arithmetic that bounds it"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    parser.add_argument("--no-compile", action="store_true", help="profile the eager step")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"), help="train.py's --precision")
    parser.add_argument("--buffer", default="uniform", choices=("uniform", "prioritized"), help="train.py's --buffer")
    args = parser.parse_args()
    keep_freed_memory_mapped()
    torch.set_num_threads(args.threads)
    config = SACConfig(precision=args.precision, buffer=args.buffer, buffer_size=100_000)
    agent = SACAgent(OBS_DIM, -np.ones(ACTION_DIM), np.ones(ACTION_DIM), config)
    print(f"gradient step: {agent.step_runs if args.no_compile else agent.compile_update()}, "
          f"{args.precision}, {args.buffer} replay, {args.threads} thread(s)")
    buffer = make_buffer(config, OBS_DIM, ACTION_DIM, agent.device)
    rng = np.random.default_rng(0)
    for _ in range(FILL):
        buffer.add(rng.standard_normal(OBS_DIM), rng.uniform(-1, 1, ACTION_DIM), rng.standard_normal(),
                   rng.standard_normal(OBS_DIM), False)

    def one_update() -> None:
        batch = next(buffer.batches(1, 256))
        buffer.after_update(batch, agent.update(batch))

    for _ in range(UPDATES):
        one_update()
    start = time.perf_counter()
    for _ in range(UPDATES):
        one_update()
    ms_per_update = (time.perf_counter() - start) / UPDATES * 1e3
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        for _ in range(UPDATES):
            one_update()
    averages = profiler.key_averages()
    print(averages.table(sort_by="self_cpu_time_total", row_limit=20))
    profiled_ms = sum(event.self_cpu_time_total for event in averages) / UPDATES / 1e3
    matmul_ms = sum(e.self_cpu_time_total for e in averages if e.key in MATMULS) / UPDATES / 1e3
    fused_ms = sum(e.self_cpu_time_total for e in averages if "CompiledFxGraph" in e.key) / UPDATES / 1e3
    print(f"{ms_per_update:.2f} ms per update without the profiler, {profiled_ms:.2f} ms under it: "
          f"matrix products {matmul_ms:.2f} ms ({GFLOP_PER_UPDATE / matmul_ms * 1e3:.0f} GFLOP/s), "
          f"compiled fused kernels {fused_ms:.2f} ms, everything else {profiled_ms - matmul_ms - fused_ms:.2f} ms")


if __name__ == "__main__":
    main()
