"""Milliseconds of gradient steps per env step of each configuration, against today's default in the same process.

    python benchmarks/critic_cost.py                                  # full (the default), tqc, crossq; 1 thread
    python benchmarks/critic_cost.py --configs full,tqc --threads 2 --repeats 7 --output benchmarks/results/x.md

Each configuration (lab/configs.py: its train.py flags over the defaults) builds a LunarLander-shaped agent
(8 observations, 2 actions) whose step is compiled, as a default run's is, and draws batches of its own
--batch-size from a uniform buffer of random transitions. After a warm-up that compiles every graph the step
has (a --policy-delay makes two), each repeat times --updates steps of every configuration in turn, so that a
noisy neighbour hits them all alike. Prints one Markdown row per configuration: the median milliseconds per
gradient step over repeats, its spread, the gradient steps each env step pays for (--updates-per-step), their
milliseconds per env step, and that cost's ratio to the first configuration's. The cost of an env step at the
defaults is about one gradient step plus the env and the action; docs/critics.md's budget is a ratio of at
most 1.3.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lab.configs import CONFIGS, VARIANTS  # noqa: E402
from lab.provenance import provenance  # noqa: E402
from plumbing import OneLineErrorParser, add_config_flags, config_from_args  # noqa: E402
from sac_model import ReplayBuffer, SACAgent  # noqa: E402

OBS_DIM, ACTION_DIM = 8, 2  # LunarLanderContinuous


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog="python benchmarks/critic_cost.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default="full,tqc,crossq",
                        help="comma-separated configurations of lab/configs.py; the first is the reference")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per configuration")
    parser.add_argument("--updates", type=int, default=150, help="gradient steps per repeat")
    parser.add_argument("--output", type=Path, default=None, help="also write the table to this file")
    return parser


def agent_for(flags: list[str]) -> SACAgent:
    """A compiled agent with the defaults and these train.py flags."""
    flag_parser = argparse.ArgumentParser()
    add_config_flags(flag_parser)
    config = config_from_args(flag_parser.parse_args(flags))
    agent = SACAgent(OBS_DIM, -np.ones(ACTION_DIM, np.float32), np.ones(ACTION_DIM, np.float32), config)
    agent.compile_update()
    return agent


def random_buffer(size: int = 20_000) -> ReplayBuffer:
    buffer = ReplayBuffer(size, OBS_DIM, ACTION_DIM)
    rng = np.random.default_rng(0)
    for _ in range(size):
        buffer.add(rng.normal(size=OBS_DIM).astype(np.float32), rng.uniform(-1, 1, ACTION_DIM).astype(np.float32),
                   float(rng.normal()), rng.normal(size=OBS_DIM).astype(np.float32), False)
    return buffer


def ms_per_update(agent: SACAgent, buffer: ReplayBuffer, updates: int) -> float:
    start = time.perf_counter()
    for _ in range(updates):
        metrics = agent.update(buffer.sample(agent.config.batch_size))
    next(iter(metrics.values())).item()  # the steps are done
    return (time.perf_counter() - start) * 1000 / updates


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    names = args.configs.split(",")
    known = CONFIGS | VARIANTS
    unknown = [name for name in names if name not in known]
    if unknown:
        parser.error(f"--configs: unknown {', '.join(unknown)} (known: {', '.join(known)})")
    torch.set_num_threads(args.threads)
    buffer = random_buffer()
    agents = {name: agent_for(known[name]) for name in names}
    for agent in agents.values():
        ms_per_update(agent, buffer, 2 * agent.config.policy_delay)  # compile every graph the step has
    times: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(args.repeats):
        for name, agent in agents.items():
            times[name].append(ms_per_update(agent, buffer, args.updates))
    per_env_step = {name: statistics.median(times[name]) * agents[name].config.updates_per_step for name in names}
    lines = [provenance(), "", f"`python benchmarks/critic_cost.py --configs {args.configs} --threads {args.threads} "
             f"--repeats {args.repeats} --updates {args.updates}`: ms per compiled gradient step at each "
             f"configuration's batch size, LunarLander shapes, median (min-max) over repeats; the gradient steps "
             f"per env step and their ms per env step; that cost's ratio to the first configuration's.", "",
             "| configuration | flags | ms per gradient step | range | gradient steps per env step | "
             "ms per env step | ratio |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for name in names:
        lines.append(f"| {name} | {' '.join(known[name]) or '(defaults)'} | {statistics.median(times[name]):.2f} | "
                     f"{min(times[name]):.2f}-{max(times[name]):.2f} | {agents[name].config.updates_per_step} | "
                     f"{per_env_step[name]:.2f} | {per_env_step[name] / per_env_step[names[0]]:.2f} |")
    table = "\n".join(lines) + "\n"
    print(table, end="")
    if args.output:
        args.output.write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
