"""Benchmark this repository's SAC against Stable-Baselines3 on CPU; prints Markdown tables.

    python benchmarks/bench_sac.py [--threads 2] [--repeats 5] [--quick] [--skip-sb3] [--tables 1-6] [--output FILE]

Six measurements, each a median over repeats (time.perf_counter):
1. ms per gradient update at batch 256, hidden 256, with the replay buffer filled with 1e4, 1e5 and
   1e6 random LunarLander-shaped transitions; ours and SB3 are timed back to back in every repeat.
2. The prioritized replay buffer alone: sample(256) + update_priorities(256), and bytes per transition.
3. End-to-end env steps per second of `train.py` and of SB3's `SAC.learn` after the random warm-up.
4. Seconds of a whole short training process, `train.py` against SB3 in a fresh process.
5. Start-up: a short `train.py` process eager, compiled with an empty inductor cache, and with it filled.
6. Microseconds to choose one action at batch 1, ours and SB3's `predict`.

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
from typing import Any, Callable

import gymnasium as gym
import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from lab.provenance import cpu_name  # noqa: E402  (the repository root has to be on the path first)
from plumbing import keep_freed_memory_mapped  # noqa: E402
from sac_model import PrioritizedReplayBuffer, ReplayBuffer, SACAgent, SACConfig  # noqa: E402

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
    whole_total_steps: int  # env steps of one whole-process run (table 4)
    whole_start_steps: int  # its random warm-up, where updates begin; also the start-up runs' length (table 5)


FULL = Settings(warmup_updates=20, timed_updates=100, per_iterations=2_000, e2e_total_steps=7_000,
                e2e_start_steps=2_000, whole_total_steps=6_000, whole_start_steps=1_000)
QUICK = Settings(warmup_updates=2, timed_updates=5, per_iterations=50, e2e_total_steps=600, e2e_start_steps=300,
                 whole_total_steps=400, whole_start_steps=300)


@dataclass(frozen=True)
class Variant:
    """One configuration of our agent and buffer in the update benchmark."""

    label: str
    buffer: str  # "prioritized" or "uniform", as train.py's --buffer
    layer_norm: bool
    compile: bool = True  # train.py's --compile / --no-compile
    precision: str = "fp32"  # train.py's --precision


VARIANTS = (
    Variant("uniform + LayerNorm, compiled (train.py's default)", "uniform", True),
    Variant("uniform + LayerNorm, compiled, bf16", "uniform", True, precision="bf16"),
    Variant("uniform + LayerNorm, eager (--no-compile)", "uniform", True, compile=False),
    Variant("PER + LayerNorm, compiled (--buffer prioritized)", "prioritized", True),
    Variant("uniform, no LayerNorm, compiled (apples to apples)", "uniform", False),
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


def header(args: argparse.Namespace) -> str:
    """Machine, library versions and run settings."""
    return "\n".join([
        "# SAC benchmark: this repository vs Stable-Baselines3 (CPU)",
        "",
        f"- CPU: {cpu_name()} ({os.cpu_count()} logical CPUs)",
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

def make_agent(variant: Variant) -> SACAgent:
    """Our agent with the repository defaults (batch 256, hidden 256, grad clip 1.0) and the variant's settings."""
    torch.manual_seed(SEED)
    config = SACConfig(env=ENV_ID, hidden_size=HIDDEN_SIZE, batch_size=BATCH_SIZE, layer_norm=variant.layer_norm,
                       precision=variant.precision)
    agent = SACAgent(OBS_DIM, -np.ones(ACTION_DIM), np.ones(ACTION_DIM), config, "cpu", ENV_ID)
    if variant.compile:
        log(f"{variant.label}: {agent.compile_update()}")
    return agent


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
        batch = next(buffer.batches(1, BATCH_SIZE))
        metrics = agent.update(batch)
        buffer.after_update(batch, metrics)
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
    agents = {variant: make_agent(variant) for variant in VARIANTS}
    rng = np.random.default_rng(SEED)
    rows = []
    for fill in FILLS:
        log(f"updates: filling buffers with {fill:,} transitions")
        buffers = {kind: filled_buffer(kind, data, fill, rng) for kind in ("prioritized", "uniform")}
        model = filled_sb3_model(data, fill) if with_sb3 else None
        for variant in VARIANTS:
            time_our_updates(agents[variant], buffers[variant.buffer], settings.warmup_updates)
        if model is not None:
            time_sb3_updates(model, settings.warmup_updates)
        ours: dict[Variant, list[float]] = {variant: [] for variant in VARIANTS}
        sb3: dict[Variant, list[float]] = {variant: [] for variant in VARIANTS}
        for repeat in range(repeats):
            log(f"updates: fill {fill:,}, repeat {repeat + 1}/{repeats}")
            for variant in VARIANTS:
                ours[variant].append(time_our_updates(agents[variant], buffers[variant.buffer],
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
               f"Ours: `buffer.batches` + `agent.update` + `buffer.after_update` (gradient clipping at 1.0 on); "
               f"compiled rows run the step through `torch.compile` (compiled before timing). "
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


def train_py_seconds(args: list[str], threads: int, env: dict[str, str] | None = None) -> float:
    """Wall-clock seconds of one whole `train.py` process (imports, compile, env steps, updates, final checkpoint).

    Runs in a fresh temporary folder, evaluation, the solved check and periodic checkpoints off: SB3 does
    none of them either.
    """
    command = [sys.executable, str(REPO_ROOT / "train.py"), *args, "--eval-every", "0", "--target-return", "none",
               "--checkpoint-every", "100000", "--no-save-buffer", "--threads", str(threads), "--seed", str(SEED),
               "--run-name", "bench"]
    with tempfile.TemporaryDirectory(prefix="bench_sac_") as workdir:
        start = time.perf_counter()
        result = subprocess.run(command, cwd=workdir, capture_output=True, text=True, env={**os.environ, **(env or {})})
        elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"train.py exited with {result.returncode}: {result.stderr.strip()[-2000:]}")
    return elapsed


def run_flags(total_steps: int, start_steps: int) -> list[str]:
    """train.py flags for a run of `total_steps` whose updates (50 every 50 steps) begin after `start_steps`."""
    return ["--total-steps", str(total_steps), "--start-steps", str(start_steps), "--update-after", str(start_steps),
            "--update-every", str(UPDATE_EVERY)]


def our_steps_per_second(settings: Settings, threads: int) -> float:
    """Env steps per second of train.py after the random warm-up.

    The process is timed twice: once to `e2e_total_steps`, once stopping where updates begin.
    The difference removes start-up (the compile included), the warm-up steps, the first update round
    and the final checkpoint, leaving the same (total - start) steps and updates that the SB3 figure covers.
    """
    full = train_py_seconds(run_flags(settings.e2e_total_steps, settings.e2e_start_steps), threads)
    warmup_only = train_py_seconds(run_flags(settings.e2e_start_steps, settings.e2e_start_steps), threads)
    return (settings.e2e_total_steps - settings.e2e_start_steps) / (full - warmup_only)


def alternate(name: str, repeats: int, ours: Callable[[], float],
              sb3: Callable[[], float] | None) -> tuple[list[float], list[float]]:
    """Each repeat measures ours, then SB3 (when given): a slow patch of the machine hits both of a pair."""
    our_values: list[float] = []
    sb3_values: list[float] = []
    for repeat in range(repeats):
        log(f"{name}: repeat {repeat + 1}/{repeats}")
        our_values.append(ours())
        if sb3 is not None:
            sb3_values.append(sb3())
    return our_values, sb3_values


def ours_against_sb3(columns: list[str], ours: list[float], sb3: list[float], ratio: float | None) -> str:
    """A one-row table of our median, SB3's and their ratio (`columns` name the three); ours alone without SB3."""
    row = [f"{statistics.median(ours):.1f}"]
    if ratio is not None:
        row += [f"{statistics.median(sb3):.1f}", f"{ratio:.2f}"]
    return markdown_table(columns[:len(row)], [row])


def bench_end_to_end(settings: Settings, repeats: int, threads: int, with_sb3: bool) -> str:
    """Table 3: env steps per second of whole training runs, ours then SB3 in each repeat."""
    ours, sb3 = alternate("end to end", repeats, lambda: our_steps_per_second(settings, threads),
                          (lambda: sb3_steps_per_second(settings)) if with_sb3 else None)
    timed = settings.e2e_total_steps - settings.e2e_start_steps
    caption = (f"## 3. End to end on {ENV_ID}\n\n"
               f"Env steps per second over the {timed:,} steps after {settings.e2e_start_steps:,} random warm-up "
               f"steps ({settings.e2e_total_steps:,} in all; {UPDATE_EVERY} updates every {UPDATE_EVERY} steps, "
               f"batch {BATCH_SIZE}, {threads} torch threads; median over {repeats} repeats). Ours: `train.py` as a "
               f"subprocess with evaluation off, timed to {settings.e2e_total_steps:,} and to "
               f"{settings.e2e_start_steps:,} steps, the difference taken (start-up and warm-up removed). SB3: "
               f"`learn(total_timesteps={settings.e2e_total_steps})` in this process, timed from its last random "
               f"step by a callback; both use uniform replay, SB3 without LayerNorm. \"ours / SB3\" is the median of "
               f"the per-repeat ratios (above 1: ours is faster).")
    return caption + "\n\n" + ours_against_sb3(["ours steps/s (train.py's defaults)", "SB3 steps/s", "ours / SB3"],
                                              ours, sb3, median_ratio(ours, sb3) if with_sb3 else None)


def bench_whole_process(settings: Settings, repeats: int, threads: int, with_sb3: bool) -> str:
    """Table 4: seconds of a whole short training process, ours and SB3's, as a user waits for them."""
    flags = run_flags(settings.whole_total_steps, settings.whole_start_steps)
    train_py_seconds(run_flags(settings.whole_start_steps, settings.whole_start_steps), threads)  # fills the compile cache
    ours, sb3 = alternate("whole process", repeats, lambda: train_py_seconds(flags, threads),
                          (lambda: sb3_process_seconds(settings, threads)) if with_sb3 else None)
    caption = (f"## 4. A whole short run, as a user waits for it\n\n"
               f"Seconds from process start to exit: `train.py {' '.join(flags)}` (compile cache warm, evaluation "
               f"off) against a python process running SB3's `learn(total_timesteps={settings.whole_total_steps})` "
               f"with `learning_starts={settings.whole_start_steps}`, {UPDATE_EVERY} gradient steps every "
               f"{UPDATE_EVERY} env steps, the same network widths and batch, {threads} torch threads; alternated, "
               f"median over {repeats} repeats. \"SB3 / ours\" is the median of the per-repeat ratios (above 1: "
               f"ours finishes first).")
    return caption + "\n\n" + ours_against_sb3(["ours s", "SB3 s", "SB3 / ours"], ours, sb3,
                                              median_ratio(sb3, ours) if with_sb3 else None)


def sb3_process_seconds(settings: Settings, threads: int) -> float:
    """Wall-clock seconds of a fresh python process that trains SB3's SAC like `bench_whole_process` trains ours."""
    program = (f"import torch, gymnasium as gym\n"
               f"from stable_baselines3 import SAC\n"
               f"torch.set_num_threads({threads})\n"
               f"SAC('MlpPolicy', gym.make('{ENV_ID}'), policy_kwargs=dict(net_arch=[{HIDDEN_SIZE}, {HIDDEN_SIZE}]), "
               f"batch_size={BATCH_SIZE}, learning_starts={settings.whole_start_steps}, train_freq={UPDATE_EVERY}, "
               f"gradient_steps={UPDATE_EVERY}, device='cpu', seed={SEED}).learn({settings.whole_total_steps})\n")
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", program], check=True, capture_output=True)
    return time.perf_counter() - start


def bench_start_up(settings: Settings, repeats: int, threads: int) -> str:
    """Table 5: what compiling the step costs a process, with inductor's on-disk cache empty and filled."""
    flags = run_flags(settings.whole_start_steps, settings.whole_start_steps)  # ends after its first update round
    times: dict[str, list[float]] = {"eager (--no-compile)": [], "compiled, cold cache": [], "compiled, warm cache": []}
    for repeat in range(repeats):
        log(f"start-up: repeat {repeat + 1}/{repeats}")
        times["eager (--no-compile)"].append(train_py_seconds([*flags, "--no-compile"], threads))
        with tempfile.TemporaryDirectory(prefix="inductor_cache_") as cache:
            env = {"TORCHINDUCTOR_CACHE_DIR": cache}
            times["compiled, cold cache"].append(train_py_seconds(flags, threads, env))
            times["compiled, warm cache"].append(train_py_seconds(flags, threads, env))
    eager = statistics.median(times["eager (--no-compile)"])
    rows = [[name, f"{statistics.median(values):.1f}", f"{statistics.median(values) - eager:+.1f}"]
            for name, values in times.items()]
    caption = (f"## 5. Start-up: the one-time compile\n\n"
               f"Seconds of a whole `train.py {' '.join(flags)}` process, which ends after its first update round "
               f"({UPDATE_EVERY} gradient steps): eager, compiled with an empty inductor cache "
               f"(`TORCHINDUCTOR_CACHE_DIR` a new folder), and compiled again with that cache filled; median over "
               f"{repeats} repeats, {threads} torch threads.")
    return caption + "\n\n" + markdown_table(["gradient step", "process s", "vs eager"], rows)


def bench_acting(repeats: int, with_sb3: bool) -> str:
    """Table 6: microseconds to choose one action at batch 1 (once per env step)."""
    agent = make_agent(VARIANTS[2])  # acting never runs the compiled step
    obs = np.random.default_rng(SEED).standard_normal(OBS_DIM).astype(np.float32)
    calls = {"ours `select_action` (sampled)": lambda: agent.select_action(obs),
             "ours `select_action(evaluate=True)`": lambda: agent.select_action(obs, evaluate=True)}
    if with_sb3:
        model = make_sb3_sac(buffer_size=1_000, learning_starts=0, train_freq=1, gradient_steps=1)
        calls["SB3 `predict` (sampled)"] = lambda: model.predict(obs, deterministic=False)
        calls["SB3 `predict(deterministic=True)`"] = lambda: model.predict(obs, deterministic=True)
    rows = [[name, f"{1e6 * median_seconds_per_call(call, repeats):.0f}"] for name, call in calls.items()]
    caption = (f"## 6. Acting at batch 1\n\nMicroseconds per call on one LunarLander-shaped observation, "
               f"median over {repeats} repeats of 2,000 calls.")
    return caption + "\n\n" + markdown_table(["call", "us per call"], rows)


def median_seconds_per_call(call: Any, repeats: int, calls: int = 2_000) -> float:
    """Median over repeats of the mean seconds per call, after 200 untimed calls."""
    for _ in range(200):
        call()
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            call()
        timings.append((time.perf_counter() - start) / calls)
    return statistics.median(timings)


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------

def parse_tables(text: str, parser: argparse.ArgumentParser) -> set[int]:
    """'4', '1,2' or '3-5' -> the table numbers, each from 1 to 6."""
    tables: set[int] = set()
    for part in text.split(","):
        first, _, last = part.partition("-")
        if not first.strip().isdigit() or (last and not last.strip().isdigit()):
            parser.error(f"--tables: expected numbers like 4, 1,2 or 3-5, got {text!r}")
        tables.update(range(int(first), int(last or first) + 1))
    if not tables <= set(range(1, 7)):
        parser.error(f"--tables: the tables are 1 to 6, got {text!r}")
    return tables


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; --repeats defaults to 5, or 2 with --quick."""
    parser = argparse.ArgumentParser(description="Benchmark this SAC against Stable-Baselines3 on CPU.")
    parser.add_argument("--threads", type=int, default=2, help="torch threads, here and in train.py (default: 2)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="repeats per measurement (default: 5; 2 with --quick)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny settings for a smoke test; its numbers are not meaningful")
    parser.add_argument("--skip-sb3", action="store_true", help="measure only this repository")
    parser.add_argument("--tables", default="1-6",
                        help="which tables to measure, e.g. 4 or 1,2 or 3-5 (default: 1-6, all); 3-5 train "
                             "processes, and table 5's cold compiles take minutes")
    parser.add_argument("--output", type=Path, default=None, help="also write the Markdown report to this file")
    args = parser.parse_args(argv)
    if args.repeats is None:
        args.repeats = 2 if args.quick else 5
    if args.threads < 1 or args.repeats < 1:
        parser.error("--threads and --repeats must be positive")
    args.tables = parse_tables(args.tables, parser)
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
    tables = {
        1: lambda: bench_updates(data, settings, args.repeats, with_sb3),
        2: lambda: bench_per(data, settings, args.repeats),
        3: lambda: bench_end_to_end(settings, args.repeats, args.threads, with_sb3),
        4: lambda: bench_whole_process(settings, args.repeats, args.threads, with_sb3),
        5: lambda: bench_start_up(settings, args.repeats, args.threads),
        6: lambda: bench_acting(args.repeats, with_sb3),
    }
    for number in sorted(args.tables):
        publish(sections, tables[number]())
    if args.output is not None:
        args.output.write_text("\n\n".join(sections) + "\n")
        log(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
