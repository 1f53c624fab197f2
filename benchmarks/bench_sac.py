"""Benchmark this repository's SAC against Stable-Baselines3 on CPU; prints Markdown tables.

    python benchmarks/bench_sac.py [--threads 2] [--repeats 5] [--quick] [--skip-sb3] [--skip-e2e] [--output FILE]

Three measurements, each a median over repeats (time.perf_counter):
1. ms per gradient update at batch 256, hidden 256, with the replay buffer filled with 1e4, 1e5 and
   1e6 random LunarLander-shaped transitions; ours and SB3 are timed back to back in every repeat.
2. The prioritized replay buffer alone: sample(256) + update_priorities(256), and bytes per transition.
3. End-to-end env steps per second of `train.py` and of SB3's `SAC.learn` after the random warm-up.

Stable-Baselines3 is imported only where it is used, so `--skip-sb3` runs without it installed.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from sac_model import (  # noqa: E402  (the repository root has to be on the path first)
    PrioritizedReplayBuffer, ReplayBuffer, SACAgent, SACConfig, keep_freed_memory_mapped,
)

ENV_ID = "LunarLanderContinuous-v3"
OBS_DIM, ACTION_DIM = 8, 2
BATCH_SIZE = 256
HIDDEN_SIZE = 256
PER_ALPHA = 0.6
PER_BETA = 0.4  # the annealing's starting value; beta changes the arithmetic, not the cost
UPDATE_EVERY = 50  # train.py's default cadence: 50 gradient steps every 50 env steps (UTD 1)
FILLS = (10_000, 100_000, 1_000_000)
SEED = 0


@dataclass(frozen=True)
class Settings:
    """Work done per repeat; the defaults keep the whole run under ~15 minutes on 2 cores."""

    warmup_updates: int  # untimed updates before the first timed block, per configuration
    timed_updates: int  # updates in one timed block
    per_iterations: int  # sample + update_priorities pairs in one timed block
    e2e_total_steps: int  # env steps of one end-to-end run (a multiple of UPDATE_EVERY)
    e2e_start_steps: int  # random warm-up steps, also where updates begin (a multiple of UPDATE_EVERY)


FULL = Settings(warmup_updates=20, timed_updates=100, per_iterations=2_000, e2e_total_steps=7_000,
                e2e_start_steps=2_000)
QUICK = Settings(warmup_updates=2, timed_updates=5, per_iterations=50, e2e_total_steps=600, e2e_start_steps=300)


@dataclass(frozen=True)
class Variant:
    """One configuration of our agent and buffer in the update benchmark."""

    label: str
    buffer: str  # "prioritized" or "uniform", as train.py's --buffer
    layer_norm: bool


VARIANTS = (
    Variant("PER + LayerNorm (default)", "prioritized", True),
    Variant("uniform + LayerNorm", "uniform", True),
    Variant("PER, no LayerNorm", "prioritized", False),
    Variant("uniform, no LayerNorm (apples to apples)", "uniform", False),
)


@dataclass(frozen=True)
class Transitions:
    """Random transitions shaped like LunarLanderContinuous (obs 8, action 2), as contiguous float32 arrays."""

    obs: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    next_obs: np.ndarray
    terminated: np.ndarray  # bool

    @classmethod
    def random(cls, n: int, rng: np.random.Generator) -> "Transitions":
        """n transitions of standard-normal observations and rewards, uniform actions, 1% terminal."""
        return cls(obs=rng.standard_normal((n, OBS_DIM), dtype=np.float32),
                   actions=rng.uniform(-1.0, 1.0, (n, ACTION_DIM)).astype(np.float32),
                   rewards=rng.standard_normal(n, dtype=np.float32),
                   next_obs=rng.standard_normal((n, OBS_DIM), dtype=np.float32),
                   terminated=rng.random(n) < 0.01)


# --------------------------------------------------------------------------------------------
# Report formatting
# --------------------------------------------------------------------------------------------

def log(message: str) -> None:
    """Progress on stderr, so stdout holds only the Markdown report."""
    print(message, file=sys.stderr, flush=True)


def publish(sections: list[str], section: str) -> None:
    """Print a finished section at once (a long run shows its results as they come) and keep it for --output."""
    sections.append(section)
    print(section + "\n", flush=True)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A GitHub-flavoured Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def median_ratio(numerators: list[float], denominators: list[float]) -> float:
    """Median of the repeat-by-repeat ratios (robust to a slow patch hitting both sides of a pair)."""
    return statistics.median(n / d for n, d in zip(numerators, denominators))


def package_version(name: str) -> str:
    """The installed version of a distribution, without importing it."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def cpu_model() -> str:
    """The 'model name' line of /proc/cpuinfo (the platform's processor string elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def header(args: argparse.Namespace) -> str:
    """Machine, library versions and run settings."""
    return "\n".join([
        "# SAC benchmark: this repository vs Stable-Baselines3 (CPU)",
        "",
        f"- CPU: {cpu_model()} ({os.cpu_count()} logical CPUs)",
        f"- python {platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}, "
        f"gymnasium {gym.__version__}, stable-baselines3 {package_version('stable-baselines3')}",
        f"- torch threads: {torch.get_num_threads()} (this process, and `--threads {args.threads}` for train.py)",
        f"- repeats: {args.repeats}{' (--quick: smoke-test settings, not for reporting)' if args.quick else ''}; "
        f"all figures are medians over repeats",
        f"- date: {time.strftime('%Y-%m-%d %H:%M:%S')}",
    ])


# --------------------------------------------------------------------------------------------
# Our agent and buffers
# --------------------------------------------------------------------------------------------

def make_agent(layer_norm: bool) -> SACAgent:
    """Our agent with the repository defaults (batch 256, hidden 256, grad clip 1.0)."""
    config = SACConfig(env=ENV_ID, hidden_size=HIDDEN_SIZE, batch_size=BATCH_SIZE, layer_norm=layer_norm)
    return SACAgent(OBS_DIM, -np.ones(ACTION_DIM), np.ones(ACTION_DIM), config, "cpu", ENV_ID)


def filled_buffer(kind: str, data: Transitions, n: int, rng: np.random.Generator) -> ReplayBuffer:
    """A full buffer of capacity n holding the first n transitions, loaded in one vectorized step.

    Goes through `load_state_dict`, which writes the columns as whole tensors and the random
    priorities into the sum tree with one `tree.update(np.arange(n), ...)`, instead of a million
    `add()` calls.
    """
    if kind == "prioritized":
        buffer: ReplayBuffer = PrioritizedReplayBuffer(n, OBS_DIM, ACTION_DIM, alpha=PER_ALPHA, seed=SEED)
    else:
        buffer = ReplayBuffer(n, OBS_DIM, ACTION_DIM, seed=SEED)
    state: dict[str, Any] = {
        "capacity": n, "pos": 0, "size": n, "rng": buffer.rng.bit_generator.state,
        "obs": torch.from_numpy(data.obs[:n]), "actions": torch.from_numpy(data.actions[:n]),
        "rewards": torch.from_numpy(data.rewards[:n]), "next_obs": torch.from_numpy(data.next_obs[:n]),
        "terminated": torch.from_numpy(data.terminated[:n]),
    }
    if kind == "prioritized":
        priorities = rng.uniform(0.01, 2.0, n)
        state["max_priority"] = float(priorities.max())
        state["leaves"] = torch.from_numpy((priorities ** PER_ALPHA).astype(np.float32))
    buffer.load_state_dict(state)
    return buffer


def time_our_updates(agent: SACAgent, buffer: ReplayBuffer, n_updates: int) -> float:
    """Seconds per iteration of train.py's inner update loop: sample, update, write priorities back."""
    start = time.perf_counter()
    for _ in range(n_updates):
        batch = buffer.sample(BATCH_SIZE, PER_BETA)
        metrics = agent.update(batch)
        buffer.update_priorities(batch.indices, metrics["priorities"])
    return (time.perf_counter() - start) / n_updates


def time_per_sampling(buffer: PrioritizedReplayBuffer, priorities: list[torch.Tensor], iterations: int) -> float:
    """Seconds per sample(256) + update_priorities(256) pair, cycling through precomputed priorities."""
    start = time.perf_counter()
    for i in range(iterations):
        batch = buffer.sample(BATCH_SIZE, PER_BETA)
        buffer.update_priorities(batch.indices, priorities[i % len(priorities)])
    return (time.perf_counter() - start) / iterations


# --------------------------------------------------------------------------------------------
# Stable-Baselines3
# --------------------------------------------------------------------------------------------

def make_sb3_sac(buffer_size: int, learning_starts: int, train_freq: int, gradient_steps: int) -> Any:
    """SB3's SAC with the same network widths, batch size, learning rates, gamma and tau as ours."""
    from stable_baselines3 import SAC

    return SAC("MlpPolicy", gym.make(ENV_ID), policy_kwargs=dict(net_arch=[HIDDEN_SIZE, HIDDEN_SIZE]),
               batch_size=BATCH_SIZE, buffer_size=buffer_size, learning_starts=learning_starts,
               train_freq=train_freq, gradient_steps=gradient_steps, device="cpu", seed=SEED)


def filled_sb3_model(data: Transitions, n: int) -> Any:
    """SB3 SAC whose replay buffer (capacity n) is full of the first n transitions, ready for `train()`."""
    from stable_baselines3.common.logger import configure

    model = make_sb3_sac(buffer_size=n, learning_starts=0, train_freq=1, gradient_steps=1)
    replay = model.replay_buffer
    replay.observations[:, 0] = data.obs[:n]
    replay.next_observations[:, 0] = data.next_obs[:n]
    replay.actions[:, 0] = data.actions[:n]
    replay.rewards[:, 0] = data.rewards[:n]
    replay.dones[:, 0] = data.terminated[:n]
    replay.pos, replay.full = 0, True
    model.set_logger(configure(None, []))  # train() records its losses; learn() would have set this up
    return model


def time_sb3_updates(model: Any, n_updates: int) -> float:
    """Seconds per gradient step of SB3's own loop (its sampling included)."""
    start = time.perf_counter()
    model.train(gradient_steps=n_updates, batch_size=BATCH_SIZE)
    return (time.perf_counter() - start) / n_updates


def sb3_steps_per_second(settings: Settings) -> float:
    """Env steps per second of `SAC.learn` from the end of the random warm-up to the last update."""
    model = make_sb3_sac(buffer_size=1_000_000, learning_starts=settings.e2e_start_steps,
                         train_freq=UPDATE_EVERY, gradient_steps=UPDATE_EVERY)
    warmup_end: list[float] = []

    def mark_warmup_end(_locals: dict, _globals: dict) -> bool:
        """Called after every env step; notes the time of the last random step."""
        if model.num_timesteps == settings.e2e_start_steps:
            warmup_end.append(time.perf_counter())
        return True

    model.learn(total_timesteps=settings.e2e_total_steps, callback=mark_warmup_end)
    return (settings.e2e_total_steps - settings.e2e_start_steps) / (time.perf_counter() - warmup_end[0])


# --------------------------------------------------------------------------------------------
# The three measurements
# --------------------------------------------------------------------------------------------

def bench_updates(data: Transitions, settings: Settings, repeats: int, with_sb3: bool) -> str:
    """Table 1: ms per gradient update, every variant of ours (each paired with SB3) at every fill."""
    agents = {layer_norm: make_agent(layer_norm) for layer_norm in (True, False)}
    rng = np.random.default_rng(SEED)
    rows = []
    for fill in FILLS:
        log(f"updates: filling buffers with {fill:,} transitions")
        buffers = {kind: filled_buffer(kind, data, fill, rng) for kind in ("prioritized", "uniform")}
        model = filled_sb3_model(data, fill) if with_sb3 else None
        for variant in VARIANTS:
            time_our_updates(agents[variant.layer_norm], buffers[variant.buffer], settings.warmup_updates)
        if model is not None:
            time_sb3_updates(model, settings.warmup_updates)
        ours: dict[Variant, list[float]] = {variant: [] for variant in VARIANTS}
        sb3: dict[Variant, list[float]] = {variant: [] for variant in VARIANTS}
        for repeat in range(repeats):
            log(f"updates: fill {fill:,}, repeat {repeat + 1}/{repeats}")
            for variant in VARIANTS:
                ours[variant].append(time_our_updates(agents[variant.layer_norm], buffers[variant.buffer],
                                                      settings.timed_updates))
                if model is not None:
                    sb3[variant].append(time_sb3_updates(model, settings.timed_updates))
        for variant in VARIANTS:
            row = [f"{fill:,}", variant.label, f"{1e3 * statistics.median(ours[variant]):.2f}"]
            if model is not None:
                row += [f"{1e3 * statistics.median(sb3[variant]):.2f}",
                        f"{median_ratio(sb3[variant], ours[variant]):.2f}"]
            rows.append(row)
    columns = ["stored transitions", "our configuration", "ours ms/update"]
    columns += ["SB3 ms/update", "SB3 / ours"] if with_sb3 else []
    caption = (f"## 1. Gradient update time (batch {BATCH_SIZE}, hidden {HIDDEN_SIZE}x2, buffer capacity = fill)\n\n"
               f"Ours: `buffer.sample` + `agent.update` + `buffer.update_priorities` (gradient clipping at 1.0 on). "
               f"Each figure: median over {repeats} repeats of {settings.timed_updates} updates, after "
               f"{settings.warmup_updates} warm-up updates.")
    if with_sb3:
        caption += (" SB3: `model.train(gradient_steps=K)` / K on `MlpPolicy` with `net_arch=[256, 256]`, its "
                    "sampling included; in every repeat SB3 is timed right after each row of ours, and "
                    "\"SB3 / ours\" is the median of those pairs' ratios (above 1: ours is faster). "
                    "SB3's MlpPolicy has no LayerNorm and no gradient clipping, so rows with LayerNorm do more "
                    "work than SB3; the uniform, no-LayerNorm row is the apples-to-apples comparison.")
    return caption + "\n\n" + markdown_table(columns, rows)


def bench_per(data: Transitions, settings: Settings, repeats: int) -> str:
    """Table 2: prioritized replay alone, per stored-transition count."""
    rng = np.random.default_rng(SEED)
    priorities = [torch.rand(BATCH_SIZE, generator=torch.Generator().manual_seed(i)) + 1e-6 for i in range(64)]
    rows = []
    for fill in FILLS:
        log(f"PER: {fill:,} transitions")
        buffer = filled_buffer("prioritized", data, fill, rng)
        time_per_sampling(buffer, priorities, settings.per_iterations // 10 + 1)
        times = [time_per_sampling(buffer, priorities, settings.per_iterations) for _ in range(repeats)]
        rows.append([f"{fill:,}", f"{1e6 * statistics.median(times):.0f}", f"{buffer.nbytes / buffer.capacity:.1f}"])
    caption = (f"## 2. Prioritized replay (alpha {PER_ALPHA}, capacity = stored transitions)\n\n"
               f"Median over {repeats} repeats of {settings.per_iterations} iterations of "
               f"`sample({BATCH_SIZE})` + `update_priorities` with {BATCH_SIZE} random priorities (a torch tensor). "
               f"Bytes per transition: `buffer.nbytes / capacity` (transition columns plus the sum tree).")
    columns = ["stored transitions", "sample + update_priorities (us)", "bytes per transition"]
    return caption + "\n\n" + markdown_table(columns, rows)


def train_py_seconds(total_steps: int, settings: Settings, threads: int) -> float:
    """Wall-clock seconds of one `train.py` process, run in a fresh temporary folder."""
    command = [sys.executable, str(REPO_ROOT / "train.py"), "--total-steps", str(total_steps),
               "--start-steps", str(settings.e2e_start_steps), "--update-after", str(settings.e2e_start_steps),
               "--update-every", str(UPDATE_EVERY), "--eval-every", "0", "--checkpoint-every", "100000",
               "--no-save-buffer", "--threads", str(threads), "--seed", str(SEED), "--run-name", f"bench_{total_steps}"]
    with tempfile.TemporaryDirectory(prefix="bench_sac_") as workdir:
        start = time.perf_counter()
        result = subprocess.run(command, cwd=workdir, capture_output=True, text=True)
        elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"train.py exited with {result.returncode}: {result.stderr.strip()[-2000:]}")
    return elapsed


def our_steps_per_second(settings: Settings, threads: int) -> float:
    """Env steps per second of train.py after the random warm-up.

    The process is timed twice: once to `e2e_total_steps`, once stopping where updates begin.
    The difference removes start-up, the warm-up steps, the first update round and the final
    checkpoint, leaving the same (total - start) steps and updates that the SB3 figure covers.
    """
    full = train_py_seconds(settings.e2e_total_steps, settings, threads)
    warmup_only = train_py_seconds(settings.e2e_start_steps, settings, threads)
    return (settings.e2e_total_steps - settings.e2e_start_steps) / (full - warmup_only)


def bench_end_to_end(settings: Settings, repeats: int, threads: int, with_sb3: bool) -> str:
    """Table 3: env steps per second of whole training runs, ours then SB3 in each repeat."""
    ours: list[float] = []
    sb3: list[float] = []
    for repeat in range(repeats):
        log(f"end to end: repeat {repeat + 1}/{repeats}")
        ours.append(our_steps_per_second(settings, threads))
        if with_sb3:
            sb3.append(sb3_steps_per_second(settings))
    row = [f"{statistics.median(ours):.1f}"]
    if with_sb3:
        row += [f"{statistics.median(sb3):.1f}", f"{median_ratio(ours, sb3):.2f}"]
    timed = settings.e2e_total_steps - settings.e2e_start_steps
    caption = (f"## 3. End to end on {ENV_ID}\n\n"
               f"Env steps per second over the {timed:,} steps after {settings.e2e_start_steps:,} random warm-up "
               f"steps ({settings.e2e_total_steps:,} in all; {UPDATE_EVERY} updates every {UPDATE_EVERY} steps, "
               f"batch {BATCH_SIZE}, {threads} torch threads; median over {repeats} repeats). Ours: `train.py` as a "
               f"subprocess with evaluation off, timed to {settings.e2e_total_steps:,} and to "
               f"{settings.e2e_start_steps:,} steps, the difference taken (start-up and warm-up removed). SB3: "
               f"`learn(total_timesteps={settings.e2e_total_steps})` in this process, timed from its last random "
               f"step by a callback; SB3 uses uniform replay and no LayerNorm. \"ours / SB3\" is the median of "
               f"the per-repeat ratios (above 1: ours is faster).")
    columns = ["ours steps/s (PER + LayerNorm, defaults)"] + (["SB3 steps/s", "ours / SB3"] if with_sb3 else [])
    return caption + "\n\n" + markdown_table(columns, [row])


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; --repeats defaults to 5, or 2 with --quick."""
    parser = argparse.ArgumentParser(description="Benchmark this SAC against Stable-Baselines3 on CPU.")
    parser.add_argument("--threads", type=int, default=2, help="torch threads, here and in train.py (default: 2)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="repeats per measurement (default: 5; 2 with --quick)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny settings for a smoke test; its numbers are not meaningful")
    parser.add_argument("--skip-sb3", action="store_true", help="measure only this repository")
    parser.add_argument("--skip-e2e", action="store_true", help="skip the end-to-end training runs")
    parser.add_argument("--output", type=Path, default=None, help="also write the Markdown report to this file")
    args = parser.parse_args(argv)
    if args.repeats is None:
        args.repeats = 2 if args.quick else 5
    if args.threads < 1 or args.repeats < 1:
        parser.error("--threads and --repeats must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = QUICK if args.quick else FULL
    torch.set_num_threads(args.threads)
    keep_freed_memory_mapped()  # as train.py does; in this process it applies to SB3 as well
    torch.manual_seed(SEED)
    data = Transitions.random(max(FILLS), np.random.default_rng(SEED))
    with_sb3 = not args.skip_sb3

    sections: list[str] = []
    publish(sections, header(args))
    publish(sections, bench_updates(data, settings, args.repeats, with_sb3))
    publish(sections, bench_per(data, settings, args.repeats))
    if not args.skip_e2e:
        publish(sections, bench_end_to_end(settings, args.repeats, args.threads, with_sb3))
    if args.output is not None:
        args.output.write_text("\n\n".join(sections) + "\n")
        log(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
