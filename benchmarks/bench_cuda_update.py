"""Time one SAC gradient update on CUDA, with the replay buffer on the device.

    python benchmarks/bench_cuda_update.py [--repeats 5] [--updates 100]

Prints the median ms for sample + update + priority write-back, for prioritized and uniform replay,
each with the step eager, compiled, and compiled and replayed as a CUDA graph (`--cuda-graphs`);
checks with torch's sync debug mode that `SACAgent.update` never waits for the host, and counts the
steps torch.compile declined to graph.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sac_model import ReplayBuffer, SACAgent, SACConfig, make_buffer  # noqa: E402

OBS_DIM, ACTION_DIM, FILL = 8, 2, 5_000


def filled_buffer(config: SACConfig, device: torch.device) -> ReplayBuffer:
    """A buffer of the config's kind holding FILL random LunarLander-shaped transitions."""
    buffer = make_buffer(config, OBS_DIM, ACTION_DIM, device)
    rng = np.random.default_rng(0)
    for _ in range(FILL):
        buffer.add(rng.standard_normal(OBS_DIM), rng.uniform(-1, 1, ACTION_DIM), 0.1,
                   rng.standard_normal(OBS_DIM), False)
    return buffer


def median_update_ms(agent: SACAgent, buffer: ReplayBuffer, repeats: int, updates: int) -> float:
    """Median over repeats of the mean wall-clock ms of sample + update + after_update (the priorities)."""
    def one_update() -> None:
        batch = next(buffer.batches(1, agent.config.batch_size))
        buffer.after_update(batch, agent.update(batch))

    for _ in range(20):
        one_update()
    timings = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(updates):
            one_update()
        torch.cuda.synchronize()
        timings.append((time.perf_counter() - start) / updates * 1e3)
    return float(np.median(timings))


def update_is_sync_free(agent: SACAgent, buffer: ReplayBuffer) -> bool:
    """True when one update runs under sync debug mode 'error' without raising."""
    batch = next(buffer.batches(1, agent.config.batch_size))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        agent.update(batch)
        return True
    except RuntimeError:
        return False
    finally:
        torch.cuda.set_sync_debug_mode(0)


STEPS = {"eager": dict(compile=False), "compiled": dict(compile=True),
         "CUDA graph": dict(compile=True, cuda_graphs=True)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--updates", type=int, default=100)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("error: no CUDA device")
    device = torch.device("cuda")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; batch 256, hidden 256, LayerNorm")
    for kind in ("prioritized", "uniform"):
        for step, overrides in STEPS.items():
            config = dataclasses.replace(SACConfig(), buffer=kind, **overrides)
            agent = SACAgent(OBS_DIM, -np.ones(ACTION_DIM), np.ones(ACTION_DIM), config, device)
            if config.compile:
                agent.compile_update()
            buffer = filled_buffer(config, device)
            skips = torch._dynamo.utils.counters["inductor"]["cudagraph_skips"]
            ms = median_update_ms(agent, buffer, args.repeats, args.updates)
            skips = torch._dynamo.utils.counters["inductor"]["cudagraph_skips"] - skips
            print(f"{kind}, {step}: {ms:.2f} ms per update; sync-free update: {update_is_sync_free(agent, buffer)}; "
                  f"{agent.step_runs}; CUDA graph skips: {skips}")


if __name__ == "__main__":
    main()
