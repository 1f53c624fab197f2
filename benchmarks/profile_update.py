"""Where one SAC update spends its time on the CPU: python benchmarks/profile_update.py [--threads 1].

Runs 30 default-size updates (batch 256, hidden 256, LayerNorm, prioritized replay) under
torch.profiler and prints the operators sorted by their own CPU time.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sac_model import PrioritizedReplayBuffer, SACAgent, SACConfig, keep_freed_memory_mapped  # noqa: E402

OBS_DIM, ACTION_DIM, FILL, UPDATES = 8, 2, 5_000, 30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    args = parser.parse_args()
    keep_freed_memory_mapped()
    torch.set_num_threads(args.threads)
    agent = SACAgent(OBS_DIM, -np.ones(ACTION_DIM), np.ones(ACTION_DIM), SACConfig())
    buffer = PrioritizedReplayBuffer(100_000, OBS_DIM, ACTION_DIM)
    rng = np.random.default_rng(0)
    for _ in range(FILL):
        buffer.add(rng.standard_normal(OBS_DIM), rng.uniform(-1, 1, ACTION_DIM), rng.standard_normal(),
                   rng.standard_normal(OBS_DIM), False)

    def one_update() -> None:
        batch = buffer.sample(256, 0.5)
        buffer.update_priorities(batch.indices, agent.update(batch)["priorities"])

    for _ in range(UPDATES):
        one_update()
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        for _ in range(UPDATES):
            one_update()
    print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


if __name__ == "__main__":
    main()
