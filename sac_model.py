"""Soft Actor-Critic for continuous control: config, replay buffers, networks, the agent and its checkpoints.

The algorithm, and nothing else: a test or an experiment calls it directly. `train.py` and `visualize.py` are
thin scripts around it; what they share that is not the algorithm (run folders, locks, the command line) is
in `plumbing.py`. The algorithm follows Haarnoja et al. (2018), "Soft Actor-Critic Algorithms and
Applications": twin critics with target copies, a tanh-squashed Gaussian policy and a learned
temperature; other critic kinds (TQC's quantiles, CrossQ's batch-renormalised critics without targets) plug
into the same step.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import math
import os
import platform
import random
import re
import warnings
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

CHECKPOINT_FORMAT = "sac-checkpoint"
CHECKPOINT_VERSION = 1
LOG_STD_MIN, LOG_STD_MAX = -20.0, 2.0
PRIORITY_EPS = 1e-6
# The key of the gradient step's per-sample output (prioritized replay's new priorities); every other key of
# the step's metrics is the TensorBoard tag it is logged under.
PRIORITIES = "priorities"
DEFAULT_TIME_LIMIT = 1000
MATMUL_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}  # --precision
# Training resets from --seed once; evaluations and target checks use seeds of their own, disjoint from it
# and from each other (as long as --eval-episodes stays below 1M): `evaluation_seed`, `check_seed`.
EVAL_SEED_OFFSET = 1_000_000
TARGET_SEED_OFFSET = 2_000_000


class Tag:
    """The TensorBoard tags of a run, named once: the gradient step and train.py write them, lab/ and
    benchmarks/ read them back."""

    EPISODE_RETURN = "charts/episode_return"
    EPISODE_LENGTH = "charts/episode_length"
    EPISODE_TIME_LIMIT = "charts/episode_time_limit"  # 1 for an episode the time limit ended
    STEPS_PER_SECOND = "charts/steps_per_second"
    THREADS = "charts/threads"  # the CPU threads of the latest update round
    EVAL_MEAN = "eval/return_mean"
    EVAL_STD = "eval/return_std"
    CHECK_MEAN = "eval/target_check_mean"
    CHECK_STD = "eval/target_check_std"
    CHECK_LOWER_BOUND = "eval/target_check_lower_bound"
    CHECK_PASSED = "eval/target_check_passed"
    ACTOR_LOSS = "losses/actor"
    ALPHA_LOSS = "losses/alpha"
    ALPHA = "charts/alpha"
    MEAN_Q = "charts/mean_q"
    ENTROPY = "charts/entropy"
    N_STEP_HORIZON = "charts/n_step_horizon"
    PER_BETA = "charts/per_beta"

    @staticmethod
    def critic_loss(index: int) -> str:
        """The loss of critic `index` (0 first): losses/critic1, losses/critic2, ..."""
        return f"losses/critic{index + 1}"

    @staticmethod
    def learning_rate(optimizer: str) -> str:
        return f"charts/lr_{optimizer}"


class SACError(Exception):
    """A problem the scripts report as one line and a non-zero exit, without a traceback."""


class ConfigError(SACError):
    """Invalid flags, values or environment."""


class CheckpointError(SACError):
    """A file that is missing, unreadable, foreign or does not fit the environment."""


class TrainingDivergedError(SACError):
    """A loss, Q value, TD error or parameter became NaN or infinite."""


class WriteError(SACError):
    """A file could not be written: no space left, a quota or file size limit, an I/O error."""


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------

def _option(default: Any, help: str, resumable: bool = False, **argparse_kwargs: Any) -> Any:
    """A config field whose help text (and argparse extras) become its command-line flag.

    `resumable`: the flag may differ from the checkpoint's when a run is resumed, because it changes how long
    and how the run is watched or computed, never what it learns.
    """
    return field(default=default, metadata={"help": help, "resumable": resumable, **argparse_kwargs})


@dataclass
class SACConfig:
    """Every default of the repository, in one place; each field is a flag of train.py."""

    env: str = _option("LunarLanderContinuous-v3", "gymnasium environment id (Box observations and actions)")
    seed: int = _option(0, "seeds python, numpy, torch, the env and its action space")
    # The run's one budget is env steps; a run that reaches --target-return stops before it. 300k: seeds that
    # stalled by hovering were solved at 114k and 140k (docs/failure_analysis.md); the cap should rarely end a run.
    total_steps: int | None = _option(300_000, "most env steps a run takes (it stops earlier once solved); PER's "
                                               "beta reaches 1 there", resumable=True)
    episodes: int | None = _option(None, "optional cap on training episodes as well (default: none; whichever "
                                         "of the two caps comes first ends the run)", resumable=True)
    max_steps: int | None = _option(None, "time limit of one episode in env steps (default: the env's own, 1000 for "
                                          "LunarLander); a cut is bootstrapped, never treated as terminal")
    hidden_size: int = _option(256, "width of the two hidden layers of the actor and of each critic")
    layer_norm: bool = _option(True, "LayerNorm after each hidden Linear layer")
    obs_norm: bool = _option(False, "standardise the observations the actor and the critics see by the running mean "
                                    "and variance of every observation the run's training episodes met (SimBa's "
                                    "running-statistics normalisation), clipped at +/- 10 as SB3's VecNormalize does")
    # The twin critic stays the default: CrossQ's critics (PRESETS["crossq"]) reached the 260 check in a third of the
    # env steps, but on fresh seeds some of their agents crashed more often than the default run allows
    # (docs/critics.md).
    critic: str = _option("twin", "critic kind: twin (the min of the critics' Q values, SAC's clipped double Q), "
                                  "tqc (truncated quantile critics: the pooled quantiles without the largest) or "
                                  "crossq (batch-renormalised critics without target networks)",
                          choices=lambda: tuple(CRITICS))
    num_critics: int = _option(2, "critics in the ensemble")
    quantiles: int = _option(25, "quantiles each critic predicts (--critic tqc)")
    drop_quantiles: int = _option(2, "largest target quantiles dropped per critic (--critic tqc)")
    policy_delay: int = _option(1, "critic steps per policy and temperature step (CrossQ's paper: 3)")
    adam_beta1: float = _option(0.9, "Adam's first-moment decay for every optimizer (CrossQ's paper: 0.5)")
    # Why each default has its value, with the value the design started from: docs/defaults.md and
    # docs/default_run.md; PRESETS["original"] keeps the starting values. tau, the learning rates,
    # start_steps, grad_clip and PER's values come from the hyperparameter search,
    # docs/studies/search_lunar_100k.md (trial 94bde25d).
    buffer: str = _option("uniform", "replay buffer", choices=lambda: tuple(REPLAY_BUFFERS))
    buffer_size: int = _option(1_000_000, "replay capacity (transitions)")
    batch_size: int = _option(256, "transitions per gradient step")
    gamma: float = _option(0.99, "discount factor")
    n_step: int = _option(3, "env steps summed into each critic target before bootstrapping (n-step returns); "
                             "1 is one-step SAC")
    tau: float = _option(0.00348, "soft target update factor, applied after every gradient step (critics with "
                                  "target networks: twin, tqc)")
    lr_actor: float = _option(1.38e-4, "Adam learning rate of the policy")
    lr_critic: float = _option(7.09e-4, "Adam learning rate of the critics")
    lr_alpha: float = _option(2.36e-3, "Adam learning rate of the temperature")
    init_alpha: float = _option(0.2, "initial entropy temperature; log alpha is learned")
    start_steps: int = _option(1_000, "env steps of uniform random actions before the policy acts")
    # A fresh random action every step is a random walk that stays near where it started: held for 10 steps,
    # uniform actions take MountainCar's car to the flag in 35 of 50 episodes, redrawn every step in none.
    warmup_action_repeat: int = _option(1, "env steps each uniform random warm-up action is held for (1: a new "
                                           "one every step)")
    update_after: int = _option(1_000, "env steps collected before the first gradient step")
    update_every: int = _option(50, "env steps between update rounds; each round does update-every x "
                                    "updates-per-step gradient steps")
    updates_per_step: int = _option(1, "gradient steps per env step (the update-to-data ratio); more reuse each "
                                       "transition more, at that many times the update cost")
    grad_clip: float = _option(5.49, "max gradient norm for the policy, each critic and the temperature; "
                                     "0 disables")
    lr_step_episodes: int = _option(100, "StepLR period in episodes (stepped per episode once updates began)")
    lr_gamma: float = _option(1.0, "StepLR decay factor; 1 disables the schedule")
    per_alpha: float = _option(0.203, "prioritization exponent: sampling probability ~ priority^alpha")
    per_beta_start: float = _option(0.674, "initial importance-sampling exponent, annealed linearly to 1 over the "
                                          "run's step budget (--total-steps, else episodes x max steps)")
    # Evaluating often with few episodes notices a solved agent early; the 100-episode check then decides.
    eval_every: int = _option(10, "deterministic evaluation every this many episodes; 0 disables", resumable=True)
    eval_episodes: int = _option(10, "episodes per evaluation", resumable=True)
    target_return: str = _option("env", "the return a run stops at: when an evaluation's mean reaches it, a "
                                        "check over --target-episodes fresh episodes decides. 'env' is the env's "
                                        "own stop target (its preset's, where ENV_PRESETS names one: 260 on "
                                        "LunarLander; else its registered reward threshold), 'auto' the "
                                        "registered threshold alone (200 for LunarLander), 'auto+N' that threshold "
                                        "plus N, a number is taken as it is, and 'none' never stops early. An env "
                                        "that registers no threshold (Pendulum) trains its whole budget under "
                                        "'env' and 'auto'", resumable=True)
    target_episodes: int = _option(100, "episodes of the check that decides whether --target-return is reached",
                                   resumable=True)
    # A margin of two standard errors: a crash-prone agent's mean near 200 is not a lander that lands
    # (docs/failure_analysis.md).
    target_std_errors: float = _option(2.0, "the check passes when its mean minus this many standard errors of "
                                            "that mean reaches --target-return (0: the mean alone)", resumable=True)
    checkpoint_every: int = _option(50, "checkpoint every this many episodes (and always the final agent)",
                                    resumable=True)
    keep_checkpoints: int = _option(3, "periodic checkpoints kept per run (older ones are pruned); final.pt is "
                                       "always kept", resumable=True)
    save_buffer: bool = _option(True, "store the replay buffer in checkpoints, for an exact resume", resumable=True)
    compile: bool = _option(True, "run the gradient step through torch.compile as one graph (falls back to eager "
                                  "where no C++ compiler is found); the first compile takes about 30 s, later "
                                  "runs at the same --threads and env reuse inductor's on-disk cache (about 4 s)",
                            resumable=True)
    cuda_graphs: bool = _option(False, "on CUDA, replay the compiled step as one CUDA graph (torch.compile's "
                                       "reduce-overhead mode) instead of launching its hundreds of small kernels "
                                       "one by one; not yet measured by this repository (docs/performance.md)",
                                       resumable=True)
    precision: str = _option("fp32", "dtype of the hidden layers' matrix products. bf16 runs them at about twice "
                                     "the matmul rate on CPUs with AVX512-BF16; activations, outputs, losses and "
                                     "Adam stay fp32. On a CPU without bf16 instructions, bf16 computes the numbers "
                                     "a bf16 CPU would, as fp32 products of bf16-rounded values, and is slower "
                                     "than fp32", choices=tuple(MATMUL_DTYPES))
    device: str = _option("auto", "torch device", choices=("auto", "cpu", "cuda"), resumable=True)
    threads: int = _option(0, "torch CPU threads. 0: all cores, or one while another process takes a core (each "
                              "update round runs on whichever count was faster lately; the counts round "
                              "differently); N: exactly N", resumable=True)
    run_name: str | None = _option(None, "name of runs/<name>/ and checkpoints/<name>/ (default: env, seed and time)")

    def validate(self) -> None:
        """Raise ConfigError naming the first invalid value."""
        positive = ("hidden_size", "num_critics", "quantiles", "policy_delay", "buffer_size", "batch_size", "n_step",
                    "update_every", "updates_per_step", "warmup_action_repeat",
                    "lr_step_episodes", "eval_episodes", "target_episodes", "checkpoint_every", "keep_checkpoints")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{flag(name)} must be positive, got {getattr(self, name)}")
        non_negative = ("start_steps", "update_after", "grad_clip", "per_alpha", "eval_every", "target_std_errors",
                        "threads")
        for name in non_negative:
            if getattr(self, name) < 0:
                raise ConfigError(f"{flag(name)} must be >= 0, got {getattr(self, name)}")
        for name in ("lr_actor", "lr_critic", "lr_alpha", "init_alpha"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{flag(name)} must be positive, got {getattr(self, name)}")
        for name in ("total_steps", "episodes", "max_steps"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ConfigError(f"{flag(name)} must be positive, got {getattr(self, name)}")
        if self.total_steps is None and self.episodes is None:
            raise ConfigError("a run needs a budget: --total-steps or --episodes")
        if self.batch_size > self.buffer_size:
            raise ConfigError(f"--batch-size {self.batch_size} is larger than --buffer-size {self.buffer_size}")
        if not 0 < self.gamma <= 1:
            raise ConfigError(f"--gamma must be in (0, 1], got {self.gamma}")
        if not 0 <= self.adam_beta1 < 1:
            raise ConfigError(f"--adam-beta1 must be in [0, 1), got {self.adam_beta1}")
        if not 0 < self.tau <= 1:
            raise ConfigError(f"--tau must be in (0, 1], got {self.tau}")
        if not 0 < self.lr_gamma <= 1:
            raise ConfigError(f"--lr-gamma must be in (0, 1], got {self.lr_gamma}")
        if not 0 <= self.per_beta_start <= 1:
            raise ConfigError(f"--per-beta-start must be in [0, 1], got {self.per_beta_start}")
        if (self.target_return not in ("none", "env") and not _is_finite_number(self.target_return)
                and not TARGET_ABOVE_THRESHOLD.fullmatch(self.target_return)):
            raise ConfigError(f"--target-return must be a number, env, auto, auto+N (N a number) or none, got "
                              f"{self.target_return!r}")
        if self.critic not in CRITICS:
            raise ConfigError(f"--critic must be one of {', '.join(CRITICS)}, got {self.critic!r}")
        if not 0 <= self.drop_quantiles < self.quantiles:
            raise ConfigError(f"--drop-quantiles must be in [0, --quantiles), got {self.drop_quantiles} of "
                              f"{self.quantiles}")
        if self.buffer not in REPLAY_BUFFERS:
            raise ConfigError(f"--buffer must be one of {', '.join(REPLAY_BUFFERS)}, got {self.buffer!r}")
        if self.cuda_graphs and not self.compile:
            raise ConfigError("--cuda-graphs replays the compiled step: it cannot run with --no-compile")
        if self.precision not in MATMUL_DTYPES:
            raise ConfigError(f"--precision must be one of {', '.join(MATMUL_DTYPES)}, got {self.precision!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"--device must be auto, cpu or cuda, got {self.device!r}")
        if self.run_name is not None and (not self.run_name or Path(self.run_name).name != self.run_name):
            raise ConfigError(f"--run-name must be a plain folder name, got {self.run_name!r}")

    @classmethod
    def resumable_fields(cls) -> frozenset[str]:
        """The fields whose flags may change when a run is resumed (`_option(..., resumable=True)`)."""
        return frozenset(f.name for f in dataclasses.fields(cls) if f.metadata["resumable"])


# Named sets of defaults for train.py's --preset; flags given on the command line still win.
# "original": the configuration this repository started from (docs/defaults.md), pinned value by value
# so that it survives changes of SACConfig's defaults. That design had no stop rule: it trains its whole budget.
# "crossq": CrossQ's critics with its paper's policy delay, Adam beta1 and learning rates, the rest as the
# defaults: a third of the default's env steps to the 260 check, with more crashes (docs/critics.md).
PRESETS: dict[str, dict[str, Any]] = {
    "crossq": dict(critic="crossq", policy_delay=3, adam_beta1=0.5, lr_actor=1e-3, lr_critic=1e-3, lr_alpha=1e-3),
    "original": dict(
        env="LunarLanderContinuous-v3", episodes=1000, max_steps=None, total_steps=None, hidden_size=256,
        layer_norm=True, critic="twin", num_critics=2, policy_delay=1, adam_beta1=0.9, buffer="prioritized",
        buffer_size=1_000_000, batch_size=256, gamma=0.99, n_step=1, tau=0.005, lr_actor=3e-4, lr_critic=3e-4,
        lr_alpha=3e-4, init_alpha=0.2, start_steps=10_000, update_after=1_000,
        update_every=50, updates_per_step=1, grad_clip=1.0, lr_step_episodes=100, lr_gamma=0.95, per_alpha=0.6,
        per_beta_start=0.4, eval_every=20, eval_episodes=5, target_return="none", checkpoint_every=50, precision="fp32",
    ),
}


@dataclass(frozen=True)
class EnvPreset:
    """An env's own defaults, the way rl-zoo3's hyperparameter files work: the config values it sets over
    SACConfig's (its budget among them), where they come from, and the return its runs stop at."""

    values: dict[str, Any]
    source: str
    stop_target: float | None = None  # what --target-return env means here; None: the registered threshold


# train.py applies an env's preset unless --preset none says otherwise (a named preset's values go over it);
# flags given still win.
# The defaults themselves were searched and confirmed on LunarLander; elsewhere they are a starting point.
ENV_PRESETS: dict[str, EnvPreset] = {
    "LunarLanderContinuous-v3": EnvPreset(
        {}, "the defaults were searched and confirmed here (docs/defaults.md); the run stops at 260, its threshold "
            "200 plus 60: agents stopped at 200 crashed several times in 100 unseen episodes, at 260 they land "
            "(docs/stop_rule.md)", stop_target=260.0),
    "BipedalWalker-v3": EnvPreset(
        {"total_steps": 500_000}, "budget: rl-zoo3's for SAC and TQC; the stop target is the registered threshold, "
                                  "300 (300 + 60 is above what tuned SAC and TQC reach there)"),
    "Pendulum-v1": EnvPreset({"total_steps": 20_000}, "budget: rl-zoo3's for SAC; Pendulum registers no threshold"),
    "MountainCarContinuous-v0": EnvPreset(
        {"total_steps": 50_000, "start_steps": 10_000, "warmup_action_repeat": 10},
        "budget: rl-zoo3's for SAC; warm-up: uniform actions held for 10 steps reach the flag, the one reward, "
        "where actions redrawn every step never do (docs/envs.md); the stop target is the registered threshold, 90"),
    **{env: EnvPreset({"total_steps": 300_000, "start_steps": 10_000, "target_return": "none"},
                      "budget: 300k env steps, the field's early-learning comparison point (MR.Q's table); no stop: "
                      "a fixed budget, as benchmark tables train; warm-up: rl-zoo3's 10k for SAC on MuJoCo")
       for env in ("Hopper-v5", "HalfCheetah-v5", "Walker2d-v5", "Ant-v5")},
}


def env_preset(env_id: str) -> EnvPreset | None:
    """The env's preset in ENV_PRESETS, or None."""
    return ENV_PRESETS.get(registered_id(env_id))


def preset_values(preset: str, env_id: str) -> dict[str, Any]:
    """The config values a --preset sets: none; the env's own ('env'); or a named design of PRESETS over the
    env's own, so that a design tried on Hopper keeps Hopper's budget, warm-up and stop."""
    if preset == "none":
        return {}
    found = env_preset(env_id)
    env_values = dict(found.values) if found else {}
    return env_values if preset == "env" else env_values | PRESETS[preset]


def _is_finite_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


# 'auto' or 'auto+N' (also 'auto-N'): the env's registered reward threshold, plus N.
TARGET_ABOVE_THRESHOLD = re.compile(r"auto(?:([+-](?:\d+\.?\d*|\.\d+)(?:e[+-]?\d+)?))?")


def registered_id(env_id: str) -> str:
    """The id gymnasium registers an env under: a "module:Env-v0" id is "Env-v0" once the module is imported."""
    return env_id.rpartition(":")[2]


def env_threshold(env_id: str) -> float | None:
    """The reward threshold the env registers as solved (200 for LunarLander), or None."""
    threshold = gym.spec(registered_id(env_id)).reward_threshold
    return None if threshold is None else float(threshold)


def target_return(config: SACConfig) -> float | None:
    """The return a run stops at: the number given; None for 'none'; for 'env' its preset's stop target where it
    names one; else the env's reward threshold ('env', 'auto'), plus N for 'auto+N' (None where the env registers
    no threshold)."""
    if config.target_return == "none":
        return None
    above = TARGET_ABOVE_THRESHOLD.fullmatch(config.target_return)
    if config.target_return != "env" and not above:
        return float(config.target_return)
    preset = env_preset(config.env)
    if config.target_return == "env" and preset is not None and preset.stop_target is not None:
        return preset.stop_target
    threshold = env_threshold(config.env)
    margin = float(above.group(1) or 0.0) if above else 0.0
    return None if threshold is None else threshold + margin


def check_lower_bound(mean: float, std: float, episodes: int, std_errors: float) -> float:
    """A target check's mean minus `std_errors` standard errors of that mean: what must reach the target."""
    return mean - std_errors * std / math.sqrt(episodes)


def is_solved(checks: list[list[float]], target: float | None, episodes: int, std_errors: float) -> bool:
    """The stop rule: the latest target check ([env step, mean, std] over `episodes` episodes) has its mean
    minus `std_errors` standard errors at or above `target`. Never without a target or a check."""
    if target is None or not checks:
        return False
    _, mean, std = checks[-1]
    return check_lower_bound(mean, std, episodes, std_errors) >= target


def evaluation_seed(config: SACConfig) -> int:
    """The episode seed of a run's first evaluation episode: every evaluation plays the same episodes."""
    return config.seed + EVAL_SEED_OFFSET


def check_seed(config: SACConfig, index: int) -> int:
    """The episode seed of the first episode of a run's target check number `index` (0 first), or of the
    check an unsolved run would have made next: each check plays episodes no earlier check played."""
    return config.seed + TARGET_SEED_OFFSET + index * config.target_episodes


def flag(name: str) -> str:
    """The command-line option of a config field: `n_step` -> `--n-step`."""
    return "--" + name.replace("_", "-")



# --------------------------------------------------------------------------------------------
# Environments and seeding
# --------------------------------------------------------------------------------------------

def make_env(env_id: str, max_steps: int | None = None, render_mode: str | None = None) -> gym.Env:
    """Create a gymnasium env with Box observations and a bounded Box action space, or raise ConfigError.

    `max_steps` None keeps the env's registered time limit (DEFAULT_TIME_LIMIT if it has none).
    """
    try:
        with warnings.catch_warnings():  # a retired id warns, then fails: the failure says it better
            warnings.simplefilter("ignore", DeprecationWarning)
            env = gym.make(env_id, max_episode_steps=max_steps, render_mode=render_mode)
    except gym.error.Error as error:
        extra = " (pip install -r requirements-mujoco.txt)" if "mujoco" in str(error).lower() else ""
        raise ConfigError(f"cannot create environment {env_id!r}: {first_line(error)}{extra}") from None
    except Exception as error:  # an env's own constructor can fail in any way (missing extras, bad kwargs)
        raise ConfigError(f"cannot create environment {env_id!r}: {type(error).__name__}: {first_line(error)}") from None
    if not isinstance(env.observation_space, gym.spaces.Box):
        env.close()
        raise ConfigError(f"{env_id} has a {type(env.observation_space).__name__} observation space; SAC needs a Box")
    if not isinstance(env.action_space, gym.spaces.Box):
        env.close()
        raise ConfigError(f"{env_id} has a {type(env.action_space).__name__} action space; SAC needs a continuous Box")
    if not (np.all(np.isfinite(env.action_space.low)) and np.all(np.isfinite(env.action_space.high))):
        env.close()
        raise ConfigError(f"{env_id} has unbounded actions; SAC rescales tanh outputs to finite bounds")
    if env.spec is None or env.spec.max_episode_steps is None:
        env = gym.wrappers.TimeLimit(env, DEFAULT_TIME_LIMIT)
    return env


def flat_dim(space: gym.spaces.Box) -> int:
    """Number of scalars in one element of a Box space."""
    return int(np.prod(space.shape))


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (the env and its action space are seeded where they are made)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)



def resolve_device(name: str) -> torch.device:
    """'auto' is CUDA when present, else CPU; asking for CUDA without one is a ConfigError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was requested but no CUDA device is available")
    return torch.device(name)


def native_bf16_cpu(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool | None:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX); None where /proc/cpuinfo is absent."""
    if not cpuinfo.is_file():
        return None
    flags = re.search(r"^flags\s*:(.*)$", cpuinfo.read_text(), re.MULTILINE)
    return flags is not None and bool({"avx512_bf16", "amx_bf16"} & set(flags.group(1).split()))


def bf16_rounded_in_fp32(precision: str, device: torch.device) -> bool:
    """Whether bf16 products are computed as fp32 products of bf16-rounded values: on a CPU known to have
    no bf16 instructions, where torch's bf16 matmul is emulated (a 256x256 product: 41 ms against 0.8 ms
    in fp32 on a Zen 3 EPYC)."""
    return precision == "bf16" and device.type == "cpu" and native_bf16_cpu() is False




# --------------------------------------------------------------------------------------------
# Replay buffers
# --------------------------------------------------------------------------------------------

@dataclass
class Batch:
    """A sampled minibatch on the agent's device; `weights` are importance weights (ones if uniform)."""

    obs: torch.Tensor
    actions: torch.Tensor
    rewards: torch.Tensor
    next_obs: torch.Tensor
    terminated: torch.Tensor
    horizons: torch.Tensor  # env steps to the bootstrap state: n for n-step returns, fewer at an episode's end
    weights: torch.Tensor
    indices: np.ndarray


class ReplayBuffer:
    """Uniform replay over preallocated contiguous tensors (about 4*(2*obs+act+2)+1 bytes a transition).

    Actions are stored normalized to [-1, 1], the policy's own range. `terminated` is stored apart
    from time-limit truncation: only a real end stops bootstrapping. A transition may span several
    env steps (n-step returns, see NStepCollector): its `horizon` says how many.

    Also the interface every buffer provides, which is all the training loop uses: `from_config`, `add`,
    `batches`, `after_update` (what the buffer learns from a gradient step), `scalars` (what it logs),
    `state_dict` and `load_state_dict`. A new kind subclasses it and enters REPLAY_BUFFERS under the name
    `--buffer` gives it.
    """

    def __init__(self, capacity: int, obs_dim: int, action_dim: int, device: str | torch.device = "cpu",
                 seed: int = 0) -> None:
        self.capacity = capacity
        self.device = torch.device(device)
        self.obs = torch.zeros(capacity, obs_dim, device=self.device)
        self.actions = torch.zeros(capacity, action_dim, device=self.device)
        self.rewards = torch.zeros(capacity, device=self.device)
        self.next_obs = torch.zeros(capacity, obs_dim, device=self.device)
        self.terminated = torch.zeros(capacity, dtype=torch.bool, device=self.device)
        self.horizons = torch.ones(capacity, device=self.device)
        self.rng = np.random.default_rng(seed)
        self.pos = 0
        self.size = 0
        # On the CPU, `add` writes through numpy views of the columns' storage: a numpy item assignment costs
        # a tenth of a torch one, and `add` runs at every env step. Other devices take torch assignments.
        self._host_views = ([column.numpy() for column in self._columns().values()] if self.device.type == "cpu"
                            else None)

    @classmethod
    def from_config(cls, config: SACConfig, obs_dim: int, action_dim: int,
                    device: str | torch.device) -> "ReplayBuffer":
        """The buffer a run's config asks for."""
        return cls(config.buffer_size, obs_dim, action_dim, device, seed=config.seed)

    def __len__(self) -> int:
        return self.size

    @property
    def nbytes(self) -> int:
        """Bytes held by the stored data (used by the benchmarks)."""
        return sum(t.numel() * t.element_size() for t in self._columns().values())

    def _columns(self) -> dict[str, torch.Tensor]:
        return {"obs": self.obs, "actions": self.actions, "rewards": self.rewards,
                "next_obs": self.next_obs, "terminated": self.terminated, "horizons": self.horizons}

    def add(self, obs: np.ndarray, action: np.ndarray, reward: float, next_obs: np.ndarray,
            terminated: bool, horizon: int = 1) -> int:
        """Store one transition, overwriting the oldest once full; returns its slot.

        `reward` is the (discounted) sum of the rewards of the `horizon` env steps from `obs` to `next_obs`.
        """
        slot = self.pos
        values = [np.asarray(obs, dtype=np.float32).reshape(-1), np.asarray(action, dtype=np.float32).reshape(-1),
                  float(reward), np.asarray(next_obs, dtype=np.float32).reshape(-1), bool(terminated), float(horizon)]
        if self._host_views is None:  # a torch column takes tensors and Python scalars, not numpy arrays
            values = [torch.from_numpy(v) if isinstance(v, np.ndarray) else v for v in values]
        for column, value in zip(self._host_views or self._columns().values(), values):
            column[slot] = value
        self.pos = (self.pos + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)
        return slot

    def sample(self, batch_size: int) -> Batch:
        """Uniformly sample `batch_size` transitions (with replacement)."""
        indices = self.rng.integers(0, self.size, size=batch_size)
        return self._gather(indices, torch.ones(batch_size, device=self.device))

    def batches(self, count: int, batch_size: int, step: int = 0) -> Iterator[Batch]:
        """The `count` batches of the update round at env step `step`: exactly those `count` calls of `sample`
        would give.

        The round's indices come from one draw. numpy's bounded integers take the generator's stream value
        by value, so one draw of count x batch_size is the count draws one after the other (a test checks
        it, generator state included); one call instead of count saves host time at every gradient step.
        The rows are still gathered batch by batch, into tensors of their own as `sample` makes them.
        """
        weights = torch.ones(batch_size, device=self.device)  # read-only in the step: one serves the round
        for indices in self.rng.integers(0, self.size, size=(count, batch_size)):
            yield self._gather(indices, weights)

    def _gather(self, indices: np.ndarray, weights: torch.Tensor) -> Batch:
        # index_select, not column[idx]: the same rows, without advanced indexing's general path (half the
        # host time of a gather, six gathers per gradient step)
        idx = torch.from_numpy(indices).to(self.device, non_blocking=True)
        return Batch(obs=self.obs.index_select(0, idx), actions=self.actions.index_select(0, idx),
                     rewards=self.rewards.index_select(0, idx), next_obs=self.next_obs.index_select(0, idx),
                     terminated=self.terminated.index_select(0, idx).float(),
                     horizons=self.horizons.index_select(0, idx), weights=weights, indices=indices)

    def after_update(self, batch: Batch, metrics: dict[str, torch.Tensor]) -> None:
        """What the buffer learns from the gradient step on `batch`: nothing, for uniform replay."""

    def scalars(self, step: int) -> dict[str, float]:
        """TensorBoard tags and values of the buffer's own state at env step `step`: none for uniform replay."""
        return {}

    def state_dict(self) -> dict:
        """The stored transitions (only the filled part), write position and sampling RNG."""
        return {"capacity": self.capacity, "pos": self.pos, "size": self.size,
                "rng": self.rng.bit_generator.state,
                **{name: column[: self.size].cpu().clone() for name, column in self._columns().items()}}

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()`; the capacity and shapes must match."""
        if state["capacity"] != self.capacity:
            raise CheckpointError(f"replay capacity {state['capacity']} does not match --buffer-size {self.capacity}")
        state = {"horizons": torch.ones(state["size"]), **state}  # buffers saved before n-step returns: one step
        for name, column in self._columns().items():
            column[: state["size"]] = state[name].to(self.device)
        self.pos, self.size = state["pos"], state["size"]
        self.rng.bit_generator.state = state["rng"]


def _sum_tree_update(leaves: np.ndarray, inner: np.ndarray, indices: np.ndarray, values: np.ndarray) -> None:
    """Write each leaf in turn and recompute the sums on its path to the root (so duplicates: last wins)."""
    n_leaves = len(leaves)
    for k in range(len(indices)):
        leaf = indices[k]
        leaves[leaf] = values[k]
        node = (leaf + n_leaves) >> 1
        child = 2 * node - n_leaves
        inner[node] = np.float64(leaves[child]) + np.float64(leaves[child + 1])
        node >>= 1
        while node >= 1:
            inner[node] = inner[2 * node] + inner[2 * node + 1]
            node >>= 1


def _sum_tree_find(leaves: np.ndarray, inner: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Walk from the root to the leaf whose prefix-sum interval holds each value (see SumTree.find)."""
    n_leaves = len(leaves)
    found = np.empty(len(values), dtype=np.int64)
    for k in range(len(values)):
        value = max(values[k], 0.0)
        node = 1
        while node < n_leaves // 2:  # inner nodes above the leaves' parents
            left = 2 * node
            if value >= inner[left] and inner[left + 1] > 0:
                value -= inner[left]
                node = left + 1
            else:
                node = left
        left = 2 * node - n_leaves
        found[k] = left + 1 if value >= leaves[left] and leaves[left + 1] > 0 else left
    return found


@functools.cache
def _sum_tree_kernels() -> tuple[Callable, Callable]:
    """`_sum_tree_update` and `_sum_tree_find` compiled by numba (cached on disk), built at their first use.

    numba is imported here rather than with the module: only prioritized replay needs it, and its import
    would cost every process about 0.3 s (the default replay is uniform).
    """
    import numba
    return numba.njit(cache=True)(_sum_tree_update), numba.njit(cache=True)(_sum_tree_find)


class SumTree:
    """Binary tree over `capacity` leaves in which every inner node holds the sum of its subtree.

    Leaves (the priorities^alpha) are float32; inner sums are float64 and always recomputed from
    their children, so the total never drifts and a zero subtree is exactly zero. Both operations
    are O(log N) per element, compiled with numba: a batch of 256 costs microseconds, where the
    same walk as vectorized numpy spends ~0.2 ms in per-level array calls at a million leaves.
    """

    def __init__(self, capacity: int) -> None:
        self.n_leaves = 1 << max(1, (capacity - 1).bit_length())
        self.leaves = np.zeros(self.n_leaves, dtype=np.float32)
        self.inner = np.zeros(self.n_leaves, dtype=np.float64)  # node 1 is the root; node i has children 2i, 2i+1

    @property
    def total(self) -> float:
        return float(self.inner[1])

    @property
    def nbytes(self) -> int:
        return self.leaves.nbytes + self.inner.nbytes

    def update(self, indices: np.ndarray, values: np.ndarray) -> None:
        """Set leaves `indices` to `values` and recompute their ancestors (duplicates: last wins)."""
        indices = np.ascontiguousarray(indices, dtype=np.int64)
        values = np.ascontiguousarray(values, dtype=np.float32)
        if indices.shape != values.shape:
            raise ValueError(f"{len(indices)} indices but {len(values)} values")
        if len(indices) and (indices.min() < 0 or indices.max() >= self.n_leaves):
            raise IndexError(f"leaf index out of range [0, {self.n_leaves})")
        update, _ = _sum_tree_kernels()
        update(self.leaves, self.inner, indices, values)

    def find(self, values: np.ndarray) -> np.ndarray:
        """For each value in [0, total), the leaf whose prefix-sum interval contains it.

        A step to the right is only taken into a subtree with a positive sum, so float rounding at
        an interval's edge can never select a zero-priority (empty) leaf.
        """
        _, find = _sum_tree_kernels()
        return find(self.leaves, self.inner, np.ascontiguousarray(values, dtype=np.float64).reshape(-1))


class PrioritizedReplayBuffer(ReplayBuffer):
    """Proportional prioritized replay (Schaul et al., 2016) on a sum tree.

    P(i) = p_i^alpha / sum_k p_k^alpha with p_i = mean |TD error| + 1e-6. New transitions get the
    largest priority seen so far, so each is replayed at least about once. Importance weights
    (N * P(i))^-beta are divided by the batch's largest weight.
    """

    def __init__(self, capacity: int, obs_dim: int, action_dim: int, alpha: float = 0.6,
                 device: str | torch.device = "cpu", seed: int = 0,
                 beta_at: Callable[[int], float] = lambda step: 0.4) -> None:
        super().__init__(capacity, obs_dim, action_dim, device, seed)
        self.alpha = alpha
        self.beta_at = beta_at  # the importance-sampling exponent at an env step
        self.tree = SumTree(capacity)
        self.max_priority = 1.0
        self._new_slots: list[int] = []

    @classmethod
    def from_config(cls, config: SACConfig, obs_dim: int, action_dim: int,
                    device: str | torch.device) -> "PrioritizedReplayBuffer":
        return cls(config.buffer_size, obs_dim, action_dim, config.per_alpha, device, seed=config.seed,
                   beta_at=functools.partial(per_beta, config))

    @property
    def nbytes(self) -> int:
        return super().nbytes + self.tree.nbytes

    def add(self, obs: np.ndarray, action: np.ndarray, reward: float, next_obs: np.ndarray,
            terminated: bool, horizon: int = 1) -> int:
        """Store a transition; its max priority enters the tree in one batch before the next sample."""
        slot = super().add(obs, action, reward, next_obs, terminated, horizon)
        self._new_slots.append(slot)
        return slot

    def _flush_new_slots(self) -> None:
        if self._new_slots:
            slots = np.asarray(self._new_slots)
            self.tree.update(slots, np.full(len(slots), self.max_priority ** self.alpha))
            self._new_slots.clear()

    def sample(self, batch_size: int, beta: float = 0.4) -> Batch:
        """Stratified proportional sampling: one uniform draw in each of `batch_size` equal slices of the total."""
        self._flush_new_slots()
        total = self.tree.total
        targets = (np.arange(batch_size) + self.rng.random(batch_size)) * (total / batch_size)
        indices = self.tree.find(targets)
        probabilities = self.tree.leaves[indices].astype(np.float64) / total
        weights = (self.size * probabilities) ** (-beta)
        weights = torch.from_numpy((weights / weights.max()).astype(np.float32))
        return self._gather(indices, weights.to(self.device, non_blocking=True))

    def batches(self, count: int, batch_size: int, step: int = 0) -> Iterator[Batch]:
        """The `count` batches of the update round at env step `step`, each sampled only when the loop asks for
        it: a batch's probabilities are the priorities the gradient step before it wrote."""
        beta = self.beta_at(step)
        for _ in range(count):
            yield self.sample(batch_size, beta)

    def after_update(self, batch: Batch, metrics: dict[str, torch.Tensor]) -> None:
        """The step's TD errors become the batch's new priorities."""
        self.update_priorities(batch.indices, metrics[PRIORITIES])

    def scalars(self, step: int) -> dict[str, float]:
        return {Tag.PER_BETA: self.beta_at(step)}

    def update_priorities(self, indices: np.ndarray, priorities: torch.Tensor) -> None:
        """Write new priorities (one device-to-host copy for the whole batch)."""
        priorities = priorities.detach().cpu().numpy().astype(np.float64)
        if not np.all(np.isfinite(priorities)):
            raise TrainingDivergedError("non-finite TD error in the priority update")
        self.max_priority = max(self.max_priority, float(priorities.max()))
        self.tree.update(indices, priorities ** self.alpha)

    def state_dict(self) -> dict:
        self._flush_new_slots()
        return {**super().state_dict(), "max_priority": self.max_priority,
                "leaves": torch.from_numpy(self.tree.leaves[: self.size].copy())}

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()`, replacing (not merging with) whatever this buffer held."""
        super().load_state_dict(state)
        self.max_priority = state["max_priority"]
        self._new_slots.clear()
        self.tree = SumTree(self.capacity)
        self.tree.update(np.arange(self.size), state["leaves"].numpy())


class NStepCollector:
    """Turns the env's one-step transitions into n-step ones for the replay buffer.

    Each stored transition starts at s_t and bootstraps from s_{t+m}, with reward
    r_t + gamma r_{t+1} + ... + gamma^(m-1) r_{t+m-1}; m = n inside an episode. At an episode's end
    every pending start is stored with the steps it has left (m < n): after a termination it does not
    bootstrap, after a time-limit cut it bootstraps from the last state, gamma^m-discounted. With
    n = 1 each step is stored as it comes: one-step SAC.
    """

    def __init__(self, n_step: int, gamma: float) -> None:
        self.n_step = n_step
        self.gamma = gamma
        self.pending: deque[tuple[np.ndarray, np.ndarray, float]] = deque()

    def push(self, obs: np.ndarray, action: np.ndarray, reward: float, next_obs: np.ndarray, terminated: bool,
             truncated: bool) -> list[tuple]:
        """The transitions that are complete after this env step, as `ReplayBuffer.add` arguments."""
        self.pending.append((obs, action, float(reward)))
        ready = []
        if terminated or truncated:
            while self.pending:
                ready.append(self._oldest(next_obs, terminated))
        elif len(self.pending) == self.n_step:
            ready.append(self._oldest(next_obs, False))
        return ready

    def _oldest(self, next_obs: np.ndarray, terminated: bool) -> tuple:
        """The oldest pending start as a transition to `next_obs`, removed from the pending ones."""
        discounted = sum(self.gamma ** k * reward for k, (_, _, reward) in enumerate(self.pending))
        horizon = len(self.pending)
        obs, action, _ = self.pending.popleft()
        return obs, action, discounted, next_obs, terminated, horizon

    def clear(self) -> None:
        """Forget the pending steps (a new episode starts without its predecessor's tail)."""
        self.pending.clear()


# --buffer's choices, name by name: the one place a replay buffer is named.
REPLAY_BUFFERS: dict[str, type[ReplayBuffer]] = {"uniform": ReplayBuffer, "prioritized": PrioritizedReplayBuffer}


def make_buffer(config: SACConfig, obs_dim: int, action_dim: int, device: torch.device) -> ReplayBuffer:
    """The replay buffer the config asks for."""
    return REPLAY_BUFFERS[config.buffer].from_config(config, obs_dim, action_dim, device)


def step_budget(config: SACConfig) -> int:
    """The most env steps a run can take: --total-steps, or --episodes x the time limit if that is smaller."""
    caps = [config.total_steps]
    if config.episodes is not None:
        caps.append(config.episodes * (config.max_steps or DEFAULT_TIME_LIMIT))
    return min(cap for cap in caps if cap is not None)


def per_beta(config: SACConfig, step: int) -> float:
    """Importance-sampling exponent: linear from per_beta_start to 1 over the run's budget, --total-steps
    when given, else episodes x max_steps.

    The run's own budget, so that a run capped by --total-steps still ends with the full correction
    (beta 1); over episodes x max_steps, a 50k-step LunarLander run would end at beta 0.43. Not the
    smaller of the two: --episodes may then change on resume (to continue a run up to its
    --total-steps) without changing what the run learns.
    """
    horizon = config.total_steps or config.episodes * (config.max_steps or DEFAULT_TIME_LIMIT)
    progress = min(1.0, step / horizon)
    return config.per_beta_start + progress * (1.0 - config.per_beta_start)


# --------------------------------------------------------------------------------------------
# Networks
# --------------------------------------------------------------------------------------------

def low_precision_product(x: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype,
                          rounded_in_fp32: bool = False) -> torch.Tensor:
    """x @ weight with both operands and the product rounded to `dtype`, returned in fp32 (see HiddenLinear).

    With `rounded_in_fp32` the same roundings are applied to fp32 values and the product is an fp32 matmul:
    the numbers of a native bf16 product (fp32 accumulation), up to the order of the sum, where the CPU has
    no bf16 instructions and torch's own bf16 product is emulated, about 50 times slower than fp32.
    """
    if not rounded_in_fp32:
        return torch.matmul(x.to(dtype), weight.to(dtype)).float()
    return torch.matmul(x.to(dtype).float(), weight.to(dtype).float()).to(dtype).float()


class HiddenLinear(nn.Linear):
    """A hidden layer's nn.Linear whose matrix product may run in bfloat16 (`--precision bf16`).

    Rounding the operands to bf16 doubles the matmul rate on CPUs with AVX512-BF16 (and on GPUs); the
    product comes back in fp32 and the bias is added in fp32, so LayerNorm, activations, losses and
    Adam stay fp32. Output layers always run in fp32: a Q value rounded to bf16 would lose its
    precision (8 bits of mantissa: a Q of 100 would move in steps of 0.5).
    """

    def __init__(self, in_features: int, out_features: int, matmul_dtype: torch.dtype = torch.float32,
                 rounded_in_fp32: bool = False) -> None:
        super().__init__(in_features, out_features)
        self.matmul_dtype = matmul_dtype
        self.rounded_in_fp32 = rounded_in_fp32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.matmul_dtype == torch.float32:
            return super().forward(x)
        return low_precision_product(x, self.weight.T, self.matmul_dtype, self.rounded_in_fp32) + self.bias


def mlp_trunk(in_dim: int, hidden_size: int, layer_norm: bool,
              matmul_dtype: torch.dtype = torch.float32, rounded_in_fp32: bool = False) -> nn.Sequential:
    """Two hidden layers, each Linear -> LayerNorm -> ReLU (LayerNorm left out if disabled)."""
    layers: list[nn.Module] = []
    for width_in in (in_dim, hidden_size):
        layers.append(HiddenLinear(width_in, hidden_size, matmul_dtype, rounded_in_fp32))
        if layer_norm:
            layers.append(nn.LayerNorm(hidden_size))
        layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def tanh_gaussian_log_prob(pre_tanh: torch.Tensor, mean: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
    """log pi(tanh(u)) for u ~ N(mean, std): the Gaussian log-density minus log|d tanh(u)/du|, summed over dims.

    log(1 - tanh(u)^2) is written as 2 * (log 2 - u - softplus(-2u)), which stays finite where tanh saturates.
    """
    gaussian = -0.5 * ((pre_tanh - mean) / log_std.exp()).pow(2) - log_std - 0.5 * math.log(2 * math.pi)
    log_det = 2.0 * (math.log(2.0) - pre_tanh - F.softplus(-2.0 * pre_tanh))
    return (gaussian - log_det).sum(-1)


def squashed_gaussian(mean: torch.Tensor, log_std: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """a = tanh(mean + std * noise) for standard-normal `noise` (the reparameterization), and log pi(a)."""
    pre_tanh = mean + log_std.exp() * noise
    return torch.tanh(pre_tanh), tanh_gaussian_log_prob(pre_tanh, mean, log_std)


class RunningObsNorm(nn.Module):
    """Observations standardised by the running mean and variance of those met so far.

    Observation scales differ by orders of magnitude between envs and within one (joint angles beside
    velocities): standardised inputs let one set of learning rates fit them all. The statistics change only
    through `observe`, called once per env observation of the training episodes, outside the gradient step;
    the step and the policy read them. Evaluation episodes leave them alone, as VecNormalize's eval mode does.
    """

    CLIP = 10.0  # VecNormalize's clip_obs: a rare observation far out cannot blow up the first layer
    EPS = 1e-8

    def __init__(self, obs_dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(obs_dim))
        self.register_buffer("var", torch.ones(obs_dim))
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))

    @torch.no_grad()
    def observe(self, obs: np.ndarray) -> None:
        """Fold one observation into the statistics (Chan et al.'s parallel update, for a batch of one)."""
        x = torch.as_tensor(np.asarray(obs, dtype=np.float32).reshape(-1), device=self.mean.device)
        count = self.count + 1
        delta = x - self.mean
        self.mean.add_(delta / count)
        self.var.copy_((self.var * self.count + delta.pow(2) * self.count / count) / count)
        self.count.copy_(count)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return ((obs - self.mean) / (self.var + self.EPS).sqrt()).clamp(-self.CLIP, self.CLIP)


class GaussianPolicy(nn.Module):
    """pi(a|s): a diagonal Gaussian over pre-squash actions, squashed by tanh into [-1, 1]."""

    def __init__(self, obs_dim: int, action_dim: int, hidden_size: int = 256, layer_norm: bool = True,
                 matmul_dtype: torch.dtype = torch.float32, rounded_in_fp32: bool = False) -> None:
        super().__init__()
        self.trunk = mlp_trunk(obs_dim, hidden_size, layer_norm, matmul_dtype, rounded_in_fp32)
        self.mean = nn.Linear(hidden_size, action_dim)
        self.log_std = nn.Linear(hidden_size, action_dim)

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and clamped log standard deviation of the pre-squash Gaussian."""
        features = self.trunk(obs)
        return self.mean(features), self.log_std(features).clamp(LOG_STD_MIN, LOG_STD_MAX)

    def sample(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A reparameterized action in [-1, 1] and its log-probability (with the tanh correction)."""
        mean, log_std = self(obs)
        return squashed_gaussian(mean, log_std, torch.randn_like(mean))

    def deterministic(self, obs: torch.Tensor) -> torch.Tensor:
        """tanh(mean): the action used for evaluation."""
        return torch.tanh(self(obs)[0])


class QEnsemble(nn.Module):
    """Independent Q-networks evaluated as one ensemble: the same math in a fraction of the ops.

    Each layer's weights are stacked on a leading critic axis, so one batched matmul serves every
    critic. Parameters are never shared: critic i is slice i of every tensor (the tests check it against
    separate critics). Each critic outputs `outputs` values of (s, a): one Q value, or a critic kind's
    quantiles. The output has shape (critics, batch, outputs).
    """

    def __init__(self, obs_dim: int, action_dim: int, hidden_size: int = 256, layer_norm: bool = True,
                 num_critics: int = 2, matmul_dtype: torch.dtype = torch.float32,
                 rounded_in_fp32: bool = False, outputs: int = 1) -> None:
        super().__init__()
        self.num_critics = num_critics
        self.hidden_size = hidden_size
        self.layer_norm = layer_norm
        self.matmul_dtype = matmul_dtype  # of the hidden layers, as in HiddenLinear
        self.rounded_in_fp32 = rounded_in_fp32
        widths = [obs_dim + action_dim, hidden_size, hidden_size, outputs]
        self.weights = nn.ParameterList(
            nn.Parameter(torch.empty(num_critics, n_in, n_out)) for n_in, n_out in zip(widths, widths[1:]))
        self.biases = nn.ParameterList(nn.Parameter(torch.empty(num_critics, 1, n_out)) for n_out in widths[1:])
        if layer_norm:
            self.norm_weights = nn.ParameterList(nn.Parameter(torch.ones(num_critics, 1, hidden_size)) for _ in range(2))
            self.norm_biases = nn.ParameterList(nn.Parameter(torch.zeros(num_critics, 1, hidden_size)) for _ in range(2))
        for weight, bias in zip(self.weights, self.biases):
            bound = 1.0 / math.sqrt(weight.shape[1])  # nn.Linear's default initialisation
            nn.init.uniform_(weight, -bound, bound)
            nn.init.uniform_(bias, -bound, bound)

    def forward(self, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        x = torch.cat([obs, action], dim=-1).expand(self.num_critics, -1, -1)
        for layer in range(2):
            x = self.hidden_linear(layer, x)
            if self.layer_norm:
                x = F.layer_norm(x, (self.hidden_size,))
                x = torch.addcmul(self.norm_biases[layer], x, self.norm_weights[layer])
            x = F.relu(x)
        return torch.baddbmm(self.biases[2], x, self.weights[2])

    def hidden_linear(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """Hidden layer `layer`'s affine map of every critic at once, its product in --precision's dtype."""
        if self.matmul_dtype == torch.float32:
            return torch.baddbmm(self.biases[layer], x, self.weights[layer])
        product = low_precision_product(x, self.weights[layer], self.matmul_dtype, self.rounded_in_fp32)
        return product + self.biases[layer]


class EnsembleBatchRenorm(nn.Module):
    """Batch renormalisation (Ioffe, 2017) of each critic's features, as sb3-contrib's BatchRenorm computes it.

    With `statistics` (a list, training), x is normalised by its batch statistics, corrected towards the running
    ones after `warmup_steps` training passes (r clipped to [1/3, 3], d to [-5, 5]), and the batch's mean and
    variance are appended to the list, for `update_statistics` to fold into the running ones after the step:
    inside a gradient transform nothing captured may be written. Without it, x is normalised by the running
    statistics: how the critics value the policy's actions. Shapes: (critics, batch, features).
    """

    def __init__(self, num_critics: int, features: int, momentum: float = 0.01, eps: float = 1e-3,
                 warmup_steps: int = 100_000) -> None:
        super().__init__()
        self.momentum, self.eps, self.warmup_steps = momentum, eps, warmup_steps
        self.r_max, self.d_max = 3.0, 5.0
        self.scale = nn.Parameter(torch.ones(num_critics, 1, features))
        self.bias = nn.Parameter(torch.zeros(num_critics, 1, features))
        self.register_buffer("running_mean", torch.zeros(num_critics, 1, features))
        self.register_buffer("running_var", torch.ones(num_critics, 1, features))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor, statistics: list | None = None) -> torch.Tensor:
        if statistics is None:
            mean, var = self.running_mean, self.running_var
        else:
            batch_mean, batch_var = x.mean(dim=1, keepdim=True), x.var(dim=1, keepdim=True)
            running_std = (self.running_var + self.eps).sqrt()
            r = ((batch_var + self.eps).sqrt() / running_std).detach().clamp(1 / self.r_max, self.r_max)
            d = ((batch_mean - self.running_mean) / running_std).detach().clamp(-self.d_max, self.d_max)
            renormalised = self.steps > self.warmup_steps
            mean = torch.where(renormalised, batch_mean - d * batch_var.sqrt() / r, batch_mean)
            var = torch.where(renormalised, batch_var / r.pow(2), batch_var)
            statistics.append((batch_mean.detach(), batch_var.detach()))
        return self.scale * (x - mean) / (var + self.eps).sqrt() + self.bias

    @torch.no_grad()
    def update_statistics(self, batch_mean: torch.Tensor, batch_var: torch.Tensor) -> None:
        self.running_mean.lerp_(batch_mean, self.momentum)
        self.running_var.lerp_(batch_var, self.momentum)
        self.steps += 1


class BatchRenormQEnsemble(QEnsemble):
    """The critics of CrossQ: batch renormalisation before each of the three Linear layers (sb3-contrib's
    layout), no LayerNorm. `forward(obs, action, statistics)` normalises by the batch (see EnsembleBatchRenorm)."""

    def __init__(self, obs_dim: int, action_dim: int, hidden_size: int = 256, num_critics: int = 2,
                 matmul_dtype: torch.dtype = torch.float32, rounded_in_fp32: bool = False, outputs: int = 1) -> None:
        super().__init__(obs_dim, action_dim, hidden_size, False, num_critics, matmul_dtype, rounded_in_fp32, outputs)
        self.norms = nn.ModuleList(EnsembleBatchRenorm(num_critics, width)
                                   for width in (obs_dim + action_dim, hidden_size, hidden_size))

    def forward(self, obs: torch.Tensor, action: torch.Tensor, statistics: list | None = None) -> torch.Tensor:
        x = torch.cat([obs, action], dim=-1).expand(self.num_critics, -1, -1)
        for layer in range(2):
            x = F.relu(self.hidden_linear(layer, self.norms[layer](x, statistics)))
        return torch.baddbmm(self.biases[2], self.norms[2](x, statistics), self.weights[2])

    def update_statistics(self, statistics: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Fold one training pass's batch statistics (from `forward`) into the running ones."""
        for norm, (batch_mean, batch_var) in zip(self.norms, statistics):
            norm.update_statistics(batch_mean, batch_var)


# --------------------------------------------------------------------------------------------
# Critic kinds (--critic)
# --------------------------------------------------------------------------------------------

class Critic:
    """What a critic kind decides, given the ensemble's values of shape (critics, batch, outputs): how many
    values each critic outputs, the values a target bootstraps from, each critic's loss, the value the policy
    maximises and the TD error prioritized replay samples by.

    Twin SAC's clipped double Q. A new kind subclasses it and enters CRITICS under its --critic name
    (docs/developing.md#adding-a-critic); the gradient step and its metrics follow without further code.
    """

    uses_target_network = True  # targets bootstrap from a slowly moving copy of the critics (tau)

    def __init__(self, config: SACConfig) -> None:
        pass

    @property
    def outputs(self) -> int:
        """Values per critic and (s, a)."""
        return 1

    def network(self, obs_dim: int, action_dim: int, config: SACConfig, matmul_dtype: torch.dtype,
                rounded_in_fp32: bool) -> QEnsemble:
        return QEnsemble(obs_dim, action_dim, config.hidden_size, config.layer_norm, config.num_critics,
                         matmul_dtype, rounded_in_fp32, self.outputs)

    def bootstrap_values(self, next_q: torch.Tensor) -> torch.Tensor:
        """(batch, targets): what y bootstraps from, before discount and entropy: min_j Q'_j(s', a')."""
        return next_q.min(0).values

    def losses(self, q: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """(critics,): E_w[(Q_j(s, a) - y)^2] for each critic j, importance-weighted over the batch."""
        return (weights * (q - targets).squeeze(-1).pow(2)).mean(dim=1)

    def policy_value(self, q: torch.Tensor) -> torch.Tensor:
        """(batch,): the value of (s, a ~ pi) the actor maximises: min_j Q_j(s, a)."""
        return q.min(0).values.squeeze(-1)

    def td_errors(self, q: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """(batch,): mean over critics of |Q_j(s, a) - y|, the priority of each sample."""
        return (q.mean(-1) - targets.mean(-1)).abs().mean(0)


class TruncatedQuantileCritic(Critic):
    """TQC (Kuznetsov et al., 2020): each critic predicts `--quantiles` quantiles of the return; the target
    pools every critic's quantiles of (s', a'), sorts them and drops the `--drop-quantiles` largest per critic,
    which controls overestimation more finely than a min over two critics. Each critic learns every kept
    target atom by the quantile Huber loss; the policy maximises the mean of all quantiles.
    """

    def __init__(self, config: SACConfig) -> None:
        super().__init__(config)
        self.quantiles = config.quantiles
        self.kept = config.num_critics * (config.quantiles - config.drop_quantiles)
        # The quantile midpoints tau_i = (i + 1/2) / N, on the device of the values they meet.
        self._midpoints = (torch.arange(config.quantiles, dtype=torch.float32) + 0.5) / config.quantiles

    @property
    def outputs(self) -> int:
        return self.quantiles

    def bootstrap_values(self, next_q: torch.Tensor) -> torch.Tensor:
        pooled = next_q.permute(1, 0, 2).reshape(next_q.shape[1], -1)
        return pooled.sort(dim=1).values[:, :self.kept]

    def losses(self, q: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """(critics,): the quantile Huber loss (kappa 1) of each critic's quantiles against every kept target
        atom, averaged over quantiles and atoms, importance-weighted over the batch."""
        delta = targets[None, :, None, :] - q[..., None]  # (critics, batch, quantiles, atoms)
        abs_delta = delta.abs()
        huber = torch.where(abs_delta > 1.0, abs_delta - 0.5, 0.5 * delta.pow(2))
        midpoints = self._midpoints.to(q.device)[:, None]
        per_sample = ((midpoints - (delta < 0).float()).abs() * huber).mean(dim=(2, 3))
        return (weights * per_sample).mean(dim=1)

    def policy_value(self, q: torch.Tensor) -> torch.Tensor:
        return q.mean(dim=(0, 2))


class CrossQCritic(Critic):
    """CrossQ (Bhatt et al., ICLR 2024): batch-renormalised critics and no target network. (s, a) and (s', a')
    pass through the critics together, so that both are normalised by the statistics of their mixture; the
    target bootstraps from the same pass (min over critics, gradient stopped). The policy sees the critics
    with their running statistics. The paper pairs it with --policy-delay 3 and Adam's beta1 0.5
    (--preset crossq). The actor keeps its LayerNorm (--layer-norm); the critics have none.
    """

    uses_target_network = False

    def network(self, obs_dim: int, action_dim: int, config: SACConfig, matmul_dtype: torch.dtype,
                rounded_in_fp32: bool) -> QEnsemble:
        return BatchRenormQEnsemble(obs_dim, action_dim, config.hidden_size, config.num_critics, matmul_dtype,
                                    rounded_in_fp32, self.outputs)


CRITICS: dict[str, type[Critic]] = {"twin": Critic, "tqc": TruncatedQuantileCritic, "crossq": CrossQCritic}


def make_critic(config: SACConfig) -> Critic:
    return CRITICS[config.critic](config)


def clip_grad_norm(grads: list[torch.Tensor], max_norm: float, stacked: bool = False) -> list[torch.Tensor]:
    """The gradients scaled so that their joint L2 norm is at most `max_norm` (torch's clip_grad_norm_ rule).

    With `stacked`, each ensemble member (slice i of every tensor) is clipped on its own, exactly as
    clipping each critic separately. Written without a host sync, so it runs inside a compiled graph.
    """
    if stacked:
        norms = torch.stack([g.pow(2).flatten(1).sum(1) for g in grads]).sum(0).sqrt()
    else:
        norms = torch.stack([g.pow(2).sum() for g in grads]).sum().sqrt()
    scale = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    return [g * (scale.view(-1, *([1] * (g.dim() - 1))) if stacked else scale) for g in grads]


def init_adam_state(optimizer: torch.optim.Adam) -> None:
    """Create Adam's step count and moments now: torch.optim.Adam makes them in its first step(), never called here."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            optimizer.state[p] = {"step": torch.zeros((), device=p.device),
                                  "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                                  "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}


def missing_compiler() -> str | None:
    """Why torch.compile cannot build CPU kernels here (no C++ compiler), or None when it can."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler
        get_cpp_compiler()
    except Exception as error:  # inductor raises its own error types when no compiler is found
        return f"no C++ compiler for torch.compile: {first_line(error)}"
    return None


def adam_(params: list[torch.Tensor], grads: list[torch.Tensor], state: list[dict[str, torch.Tensor]],
          lr: torch.Tensor, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
    """One Adam step (Kingma & Ba, 2015) in place, as torch.optim.Adam computes it, on that optimizer's state.

    Written out so that it joins the update's graph: torch.optim's step is a graph break of its own.
    """
    beta1, beta2 = betas
    steps = [s["step"] for s in state]
    exp_avgs, exp_avg_sqs = [s["exp_avg"] for s in state], [s["exp_avg_sq"] for s in state]
    torch._foreach_add_(steps, 1.0)
    torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1.0 - beta2)
    step = steps[0]  # every tensor of one optimizer has taken the same number of steps
    step_size = lr / (1.0 - beta1 ** step)
    denominators = torch._foreach_add(torch._foreach_div(torch._foreach_sqrt(exp_avg_sqs),
                                                         (1.0 - beta2 ** step).sqrt()), eps)
    torch._foreach_sub_(params, torch._foreach_mul(torch._foreach_div(exp_avgs, denominators), step_size))


# --------------------------------------------------------------------------------------------
# The agent
# --------------------------------------------------------------------------------------------

class SACAgent:
    """Actor, critics (of the --critic kind, with target copies where the kind uses them), learned temperature,
    their optimizers and LR schedules."""

    def __init__(self, obs_dim: int, action_low: np.ndarray, action_high: np.ndarray,
                 config: SACConfig | None = None, device: str | torch.device = "cpu",
                 env_id: str | None = None) -> None:
        self.config = config = config or SACConfig()
        self.device = torch.device(device)
        self.env_id = env_id or config.env
        self.obs_dim = obs_dim
        self.action_low = np.asarray(action_low, dtype=np.float32).reshape(-1)
        self.action_high = np.asarray(action_high, dtype=np.float32).reshape(-1)
        self.action_dim = len(self.action_low)
        self._action_scale = (self.action_high - self.action_low) / 2
        self._action_center = (self.action_high + self.action_low) / 2

        matmul_dtype = MATMUL_DTYPES[config.precision]
        self.products_rounded_in_fp32 = bf16_rounded_in_fp32(config.precision, self.device)
        self.actor = GaussianPolicy(obs_dim, self.action_dim, config.hidden_size, config.layer_norm,
                                    matmul_dtype, self.products_rounded_in_fp32).to(self.device)
        self.critic_kind = make_critic(config)
        self.critic = self.critic_kind.network(obs_dim, self.action_dim, config, matmul_dtype,
                                               self.products_rounded_in_fp32).to(self.device)
        self.critic_target = (copy.deepcopy(self.critic).requires_grad_(False)
                              if self.critic_kind.uses_target_network else None)
        self.obs_norm = RunningObsNorm(obs_dim).to(self.device) if config.obs_norm else None
        self.log_alpha = torch.tensor(math.log(config.init_alpha), device=self.device, requires_grad=True)
        self.target_entropy = -float(self.action_dim)

        # One Adam over the stacked critic parameters is exactly one Adam per critic: Adam is elementwise.
        # The optimizers hold the Adam moments and learning rates (so StepLR and checkpoints work as usual);
        # `gradient_step` applies Adam's rule itself, so that one graph holds the whole step.
        # Read by the step from here, not from the optimizers: the step would otherwise guard on their
        # param_groups, learning rates included, and recompile at each StepLR decay.
        self.adam_betas = (config.adam_beta1, 0.999)
        self.actor_optimizer = torch.optim.Adam(self.actor.parameters(), config.lr_actor, self.adam_betas,
                                                capturable=True)
        self.critic_optimizer = torch.optim.Adam(self.critic.parameters(), config.lr_critic, self.adam_betas,
                                                 capturable=True)
        self.alpha_optimizer = torch.optim.Adam([self.log_alpha], config.lr_alpha, self.adam_betas, capturable=True)
        for optimizer in self.optimizers.values():
            init_adam_state(optimizer)
        self.schedulers = [torch.optim.lr_scheduler.StepLR(opt, config.lr_step_episodes, config.lr_gamma)
                           for opt in self.optimizers.values()]
        self._learning_rates = torch.zeros(len(self.optimizers), device=self.device)
        self._refresh_learning_rates()
        self.step_runs = "eager"
        # The commit of the code that trained it: train.py sets it; a loaded agent saved again (an export without
        # its replay buffer) keeps it.
        self.trained_at_commit: str | None = None
        self._step = self.gradient_step
        self._graph_replay = False
        self.critic_updates = 0  # counts the steps for --policy-delay; a checkpoint's critic Adam step restores it
        self._policy_metrics: dict[str, torch.Tensor] = {}  # the latest policy step's, for critic-only steps

    def compile_update(self) -> str:
        """Run `gradient_step` through torch.compile from now on, where a C++ compiler allows it.

        Returns how the step runs, for the one line the scripts print. The compiled code is cached on
        disk by inductor, so only a process's first compile pays the full price.
        """
        missing = missing_compiler()
        if missing:
            self.step_runs = f"eager ({missing})"
            return self.step_runs
        self._graph_replay = self.config.cuda_graphs and self.device.type == "cuda"
        if self._graph_replay:
            self._mark_step_state_static()
        # Inductor computes a fused kernel's bf16 values in fp32 unless told to round them as eager does.
        options = {"emulate_precision_casts": True} if self.products_rounded_in_fp32 else None
        self._step = torch.compile(self.gradient_step, fullgraph=True,
                                   mode="reduce-overhead" if self._graph_replay else None, options=options)
        graph = (", replayed as a CUDA graph" if self._graph_replay else
                 f"; no CUDA graph: --cuda-graphs needs CUDA, the step runs on {self.device.type}"
                 if self.config.cuda_graphs else "")
        self.step_runs = f"compiled (torch.compile, one graph{graph})"
        return self.step_runs

    def learned_tensors(self) -> list[torch.Tensor]:
        """What the agent learns: the networks (with the statistics they keep), the target critics and the
        temperature."""
        target = [*self.critic_target.parameters()] if self.critic_target is not None else []
        return [*self.actor.parameters(), *self.critic.parameters(), *self.critic.buffers(), *target, self.log_alpha]

    def step_state(self) -> list[torch.Tensor]:
        """The tensors a gradient step reads and writes in place, beside its batch: the learned tensors, every
        Adam moment and step count, and the learning rates."""
        tensors = [*self.learned_tensors(), self._learning_rates]
        for optimizer in self.optimizers.values():
            for state in optimizer.state.values():
                tensors.extend(state.values())
        return tensors

    def _mark_step_state_static(self) -> None:
        """Tell torch.compile that the step's state keeps its memory from call to call.

        A CUDA graph replays fixed addresses. A step that writes in place into inputs not known to be static
        is not graphed at all (torch.compile then launches its kernels one by one, with only a log line).
        """
        for tensor in self.step_state():
            torch._dynamo.mark_static_address(tensor)

    @property
    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"actor": self.actor_optimizer, "critic": self.critic_optimizer, "alpha": self.alpha_optimizer}

    @property
    def alpha(self) -> torch.Tensor:
        return self.log_alpha.detach().exp()

    # ---- acting ----

    def observe(self, obs: np.ndarray) -> None:
        """Count an observation of a training episode in the observation statistics (--obs-norm); else nothing."""
        if self.obs_norm is not None:
            self.obs_norm.observe(obs)

    def normalized(self, obs: torch.Tensor) -> torch.Tensor:
        """What the networks see of observations: standardised under --obs-norm, else the observations."""
        return obs if self.obs_norm is None else self.obs_norm(obs)

    def select_action(self, state: np.ndarray, evaluate: bool = False) -> np.ndarray:
        """An action inside the env's bounds: sampled, or tanh(mean) when `evaluate`.

        Runs once per env step at batch 1, where every op is mostly dispatch: no log-probability is
        computed, and the rescaling to the env's bounds is done in numpy.
        """
        with torch.inference_mode():
            obs = torch.from_numpy(np.asarray(state, dtype=np.float32).reshape(1, -1)).to(self.device)
            mean, log_std = self.actor(self.normalized(obs))
            pre_tanh = mean if evaluate else mean + log_std.exp() * torch.randn_like(mean)
            squashed = torch.tanh(pre_tanh)[0].cpu().numpy()
        return np.clip(squashed * self._action_scale + self._action_center, self.action_low, self.action_high)

    def normalize_action(self, action: np.ndarray) -> np.ndarray:
        """Map an env action back to the policy's [-1, 1] range (how actions are stored for the critics)."""
        return np.clip((np.asarray(action, dtype=np.float32) - self._action_center) / self._action_scale, -1.0, 1.0)

    # ---- learning ----

    def soft_targets(self, next_q: torch.Tensor, next_log_prob: torch.Tensor, rewards: torch.Tensor,
                     terminated: torch.Tensor, horizons: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        """y = r + gamma^m (1 - terminated) (V'(s', a') - alpha log pi(a'|s')), a' ~ pi(s'), shape (batch, targets),
        from the critics' values of (s', a') and log pi(a'|s').

        V' is what the critic kind bootstraps from (the twin's min_j Q'_j, TQC's kept quantiles). m is the
        transition's horizon: 1 for one-step SAC; for n-step returns r is the discounted sum of the m rewards
        between s and s'.
        """
        next_values = self.critic_kind.bootstrap_values(next_q)
        discount = torch.pow(self.config.gamma, horizons)
        soft_values = next_values - (alpha * next_log_prob)[:, None]
        return rewards[:, None] + (discount * (1.0 - terminated))[:, None] * soft_values

    def critic_loss(self, critic_params: dict[str, torch.Tensor], obs: torch.Tensor, actions: torch.Tensor,
                    next_obs: torch.Tensor, next_action: torch.Tensor,
                    targets_from: Callable[[torch.Tensor], torch.Tensor],
                    weights: torch.Tensor) -> tuple[torch.Tensor, tuple]:
        """The sum of the critics' losses (the kind's, importance-weighted); also each critic's loss, the values,
        the targets (`targets_from` the values of (s', a')) and the batch statistics of a batch-normalised pass.

        With a target network the targets come from it. Without one (CrossQ), (s, a) and (s', a') pass through
        the critics together and the targets come from that pass, their gradient stopped.
        """
        statistics: list[tuple[torch.Tensor, torch.Tensor]] = []
        if self.critic_target is None:
            both = torch.func.functional_call(self.critic, critic_params, (torch.cat([obs, next_obs]),
                                                                           torch.cat([actions, next_action])),
                                              {"statistics": statistics})
            q_values, next_q = both.split(obs.shape[0], dim=1)
            targets = targets_from(next_q.detach())
        else:
            q_values = torch.func.functional_call(self.critic, critic_params, (obs, actions))
            targets = targets_from(self.critic_target(next_obs, next_action))
        losses = self.critic_kind.losses(q_values, targets, weights)
        return losses.sum(), (losses, q_values, targets, statistics)

    def actor_loss(self, actor_params: dict[str, torch.Tensor], obs: torch.Tensor, noise: torch.Tensor,
                   alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """E[alpha log pi(a|s) - Q(s, a)], a = tanh(mean + std * noise), Q the kind's policy value; also log pi.

        Differentiated with respect to the actor only: the gradient flows through the critics to the action.
        """
        action, log_prob = squashed_gaussian(*torch.func.functional_call(self.actor, actor_params, (obs,)), noise)
        return (alpha * log_prob - self.critic_kind.policy_value(self.critic(obs, action))).mean(), log_prob

    def alpha_loss(self, log_alpha: torch.Tensor, log_prob: torch.Tensor) -> torch.Tensor:
        """-E[log alpha (log pi + target entropy)]: raises alpha when entropy is below target, lowers it above."""
        return -(log_alpha * (log_prob + self.target_entropy)).mean()

    def update(self, batch: Batch) -> dict[str, torch.Tensor]:
        """One gradient step on a sampled batch (see `gradient_step`), compiled if `compile_update` was called.

        The policy's Gaussian noise is drawn here, outside the step, so compiled and eager steps see the
        same numbers. Step by step, not once per update round: torch fills normals in blocks of 16, so one
        draw of (k, 2, B, A) equals k draws of (2, B, A) only when 2 B A is a multiple of 16. Nothing waits
        for the device: call `.item()` on the metrics only when logging.
        """
        noise = torch.randn(2, *batch.actions.shape, device=self.device)
        self.critic_updates += 1
        update_policy = self.critic_updates % self.config.policy_delay == 0
        inputs = (batch.obs, batch.actions, batch.rewards, batch.next_obs, batch.terminated, batch.horizons,
                  batch.weights, noise, self._learning_rates, update_policy)
        try:
            metrics = self._step(*inputs)
        except torch._dynamo.exc.BackendCompilerFailed as error:
            if self._step == self.gradient_step:
                raise
            self._fall_back_to_eager(error)
            metrics = self._step(*inputs)
        if self._graph_replay:  # a CUDA graph's outputs live in memory that its next replay overwrites
            metrics = {name: value.clone() for name, value in metrics.items()}
        if update_policy:
            self._policy_metrics = metrics
        return self._policy_metrics | metrics  # a critic-only step reports the latest policy step's losses

    def _fall_back_to_eager(self, error: Exception) -> None:
        """Run the step eager from now on, with a warning, after torch.compile failed to build it.

        The backend fails before the compiled graph runs, so no parameter or Adam moment has moved yet and the
        same batch can be stepped eager. Inductor has failed so on CUDA in earlier torch releases (an AssertionError).
        """
        inner = getattr(error, "inner_exception", error)
        reason = f"{type(inner).__name__}: {first_line(inner)}" if str(inner).strip() else type(inner).__name__
        self._step, self._graph_replay = self.gradient_step, False
        self.step_runs = f"eager (torch.compile failed: {reason})"
        warnings.warn(f"gradient step: {self.step_runs}", RuntimeWarning, stacklevel=3)

    @torch.no_grad()
    def gradient_step(self, obs: torch.Tensor, actions: torch.Tensor, rewards: torch.Tensor,
                      next_obs: torch.Tensor, terminated: torch.Tensor, horizons: torch.Tensor,
                      weights: torch.Tensor, noise: torch.Tensor, learning_rates: torch.Tensor,
                      update_policy: bool = True) -> dict[str, torch.Tensor]:
        """Critics, then (with `update_policy`) actor and temperature, each a clipped Adam step; then the soft
        target update, for a kind with target copies.

        A pure function of tensors with no host sync and no graph break, so torch.compile makes one
        graph of it (one per value of `update_policy`). `noise` holds the standard-normal draws for
        a' ~ pi(s') and a ~ pi(s); `learning_rates` those of the actor, critic and temperature optimizers.
        Returns 0-dim metric tensors keyed by the TensorBoard tag train.py logs each under (a new metric here
        is logged without further code), and PRIORITIES (the kind's TD error + 1e-6, one per sample).
        """
        actor_lr, critic_lr, alpha_lr = learning_rates
        obs, next_obs = self.normalized(obs), self.normalized(next_obs)
        alpha = self.log_alpha.exp()
        next_action, next_log_prob = squashed_gaussian(*self.actor(next_obs), noise[0])
        targets_from = functools.partial(self.soft_targets, next_log_prob=next_log_prob, rewards=rewards,
                                         terminated=terminated, horizons=horizons, alpha=alpha)

        critic_params = dict(self.critic.named_parameters())
        grads, (_, (critic_losses, q_values, targets, statistics)) = torch.func.grad_and_value(
            self.critic_loss, has_aux=True)(critic_params, obs, actions, next_obs, next_action, targets_from, weights)
        self._adam_step(self.critic_optimizer, critic_params, grads, critic_lr, stacked=True)
        if statistics:
            self.critic.update_statistics(statistics)
        metrics = {
            **{Tag.critic_loss(i): loss for i, loss in enumerate(critic_losses.unbind())},
            Tag.ALPHA: alpha,
            Tag.MEAN_Q: q_values.mean(),
            Tag.N_STEP_HORIZON: horizons.mean(),
            PRIORITIES: self.critic_kind.td_errors(q_values, targets) + PRIORITY_EPS,
        }

        if update_policy:
            actor_params = dict(self.actor.named_parameters())
            grads, (actor_loss, log_prob) = torch.func.grad_and_value(self.actor_loss, has_aux=True)(
                actor_params, obs, noise[1], alpha)
            self._adam_step(self.actor_optimizer, actor_params, grads, actor_lr)

            alpha_grad, alpha_loss = torch.func.grad_and_value(self.alpha_loss)(self.log_alpha, log_prob)
            self._adam_step(self.alpha_optimizer, {"log_alpha": self.log_alpha}, {"log_alpha": alpha_grad}, alpha_lr)
            metrics |= {Tag.ACTOR_LOSS: actor_loss, Tag.ALPHA_LOSS: alpha_loss, Tag.ENTROPY: -log_prob.mean()}

        if self.critic_target is not None:
            torch._foreach_lerp_(list(self.critic_target.parameters()), list(critic_params.values()), self.config.tau)
        return metrics

    def _adam_step(self, optimizer: torch.optim.Optimizer, params: dict[str, torch.Tensor],
                   grads: dict[str, torch.Tensor], lr: torch.Tensor, stacked: bool = False) -> None:
        """Clip the gradients (per critic when `stacked`) unless --grad-clip is 0, then Adam."""
        tensors, grad_list = list(params.values()), [grads[name] for name in params]
        if self.config.grad_clip > 0:
            grad_list = clip_grad_norm(grad_list, self.config.grad_clip, stacked)
        adam_(tensors, grad_list, [optimizer.state[p] for p in tensors], lr, self.adam_betas)

    def step_schedulers(self) -> None:
        """Advance the learning-rate schedules by one episode."""
        with warnings.catch_warnings():  # torch warns that optimizer.step() never ran: `adam_` does its work
            warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()` before"))
            for scheduler in self.schedulers:
                scheduler.step()
        self._refresh_learning_rates()

    def _refresh_learning_rates(self) -> None:
        """Copy the optimizers' learning rates into the tensor the step reads.

        A tensor, not floats: torch.compile would specialize on each new float and recompile the step
        at every StepLR decay. Refreshed only when the rates change, so `update` copies nothing to the device.
        """
        self._learning_rates.copy_(torch.tensor(list(self.learning_rates().values())))

    def learning_rates(self) -> dict[str, float]:
        return {name: opt.param_groups[0]["lr"] for name, opt in self.optimizers.items()}

    def parameters_finite(self) -> bool:
        """True when no network parameter or the temperature is NaN or infinite."""
        return bool(torch.stack([t.detach().isfinite().all() for t in self.learned_tensors()]).all())

    # ---- saving and loading ----

    def state_dict(self) -> dict:
        """Networks, targets, observation statistics, temperature, optimizers and schedulers as plain state_dicts."""
        return {
            "actor": self.actor.state_dict(),
            "critic": self.critic.state_dict(),
            **({"critic_target": self.critic_target.state_dict()} if self.critic_target is not None else {}),
            **({"obs_norm": self.obs_norm.state_dict()} if self.obs_norm is not None else {}),
            "log_alpha": self.log_alpha.detach().cpu(),
            "optimizers": {name: opt.state_dict() for name, opt in self.optimizers.items()},
            "schedulers": [s.state_dict() for s in self.schedulers],
        }

    def load_state_dict(self, state: dict) -> None:
        self.actor.load_state_dict(state["actor"])
        self.critic.load_state_dict(state["critic"])
        if self.critic_target is not None:
            self.critic_target.load_state_dict(state["critic_target"])
        if self.obs_norm is not None:
            self.obs_norm.load_state_dict(state["obs_norm"])
        with torch.no_grad():
            self.log_alpha.copy_(state["log_alpha"])
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state["optimizers"][name])
        for scheduler, scheduler_state in zip(self.schedulers, state["schedulers"]):
            scheduler.load_state_dict(scheduler_state)
        self._refresh_learning_rates()
        first_critic_tensor = next(iter(self.critic.parameters()))
        self.critic_updates = int(self.critic_optimizer.state[first_critic_tensor]["step"])
        if self._graph_replay:  # the optimizers' load_state_dict made new Adam tensors
            self._mark_step_state_static()

    def metadata(self) -> dict:
        """Plain data that identifies what this agent acts in and how it was configured."""
        return {
            "env_id": self.env_id,
            "obs_dim": self.obs_dim,
            "action_dim": self.action_dim,
            "action_low": self.action_low.tolist(),
            "action_high": self.action_high.tolist(),
            "config": dataclasses.asdict(self.config),
            "git_commit": self.trained_at_commit,
            "versions": {"python": platform.python_version(), "torch": str(torch.__version__),
                         "gymnasium": gym.__version__, "numpy": np.__version__},
        }

    def save(self, path: str | Path, training: dict | None = None) -> Path:
        """Write a checkpoint atomically: metadata, agent state_dicts and optional training state."""
        checkpoint = {"format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION,
                      "metadata": self.metadata(), "agent": self.state_dict(), "training": training}
        return atomic_save(checkpoint, Path(path))

    @classmethod
    def from_checkpoint(cls, checkpoint: dict, device: str | torch.device = "cpu") -> "SACAgent":
        """Rebuild an agent from a checkpoint returned by `read_checkpoint`."""
        meta = checkpoint["metadata"]
        config = checkpoint_config(checkpoint)
        try:
            agent = cls(meta["obs_dim"], np.asarray(meta["action_low"]), np.asarray(meta["action_high"]),
                        config, device, meta["env_id"])
            agent.load_state_dict(checkpoint["agent"])
            agent.trained_at_commit = meta.get("git_commit")
        except (TypeError, KeyError, RuntimeError, ValueError) as error:
            raise CheckpointError(f"checkpoint contents do not fit this code: {first_line(error)}") from None
        return agent

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> "SACAgent":
        """Load a saved agent (weights_only: a checkpoint can never run code)."""
        return cls.from_checkpoint(read_checkpoint(path), device)


def evaluate_policy(agent: SACAgent, env: gym.Env, episodes: int, seed: int, deterministic: bool = True,
                    on_episode_end: Callable[[int, float], None] | None = None) -> list[float]:
    """Undiscounted return of each of `episodes` episodes, the i-th reset with seed `seed + i`.

    Deterministic (tanh of the mean) by default: it draws no random numbers, so evaluating during
    training leaves the training run unchanged.
    """
    returns = []
    for i in range(episodes):
        obs, _ = env.reset(seed=seed + i)
        total, done = 0.0, False
        while not done:
            obs, reward, terminated, truncated, _ = env.step(agent.select_action(obs, evaluate=deterministic))
            total += float(reward)
            done = terminated or truncated
        returns.append(total)
        if on_episode_end is not None:
            on_episode_end(i, total)
    return returns


def load_agent_and_env(path: str | Path, render_mode: str | None = None) -> tuple[SACAgent, gym.Env]:
    """A saved agent and a fresh env of the kind it was trained on; CheckpointError if they do not fit."""
    checkpoint = read_checkpoint(path)
    agent = SACAgent.from_checkpoint(checkpoint)
    env = make_env(agent.env_id, agent.config.max_steps, render_mode=render_mode)
    try:
        check_checkpoint_fits_env(checkpoint, env, path)
    except CheckpointError:
        env.close()
        raise
    return agent, env


def evaluate_final_agent(path: str | Path, episodes: int) -> list[float]:
    """Deterministic returns of a saved agent on its run's target-check seeds.

    The evaluation train.py's --target-return check would have made, for runs that trained without
    one (an ablation's): the same episode seeds, never used in training or its periodic evaluations.
    """
    agent, env = load_agent_and_env(path)
    try:
        return evaluate_policy(agent, env, episodes, check_seed(agent.config, 0))
    finally:
        env.close()


# --------------------------------------------------------------------------------------------
# Checkpoint files: what SACAgent.save writes and SACAgent.load reads
# --------------------------------------------------------------------------------------------

def atomic_save(obj: dict, path: Path) -> Path:
    """torch.save to a temporary name, fsync, then rename: a crash at any instant leaves the old file intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.parent / f".{path.name}.{os.getpid()}.tmp"
    try:
        with open(temporary, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except (OSError, RuntimeError) as error:
        if os_error_reason(error) is None:
            raise
        raise WriteError(f"cannot write {path}: {os_error_reason(error)}") from None
    finally:
        temporary.unlink(missing_ok=True)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    return path


def os_error_reason(error: BaseException) -> str | None:
    """The operating system's reason behind a failed write ('No space left on device'), or None if it was not the OS.

    torch.save reports a failed write as RuntimeError('... unexpected pos ...'); the OSError raised by the
    file underneath is its context.
    """
    while error is not None:
        if isinstance(error, OSError) and error.strerror:
            return error.strerror
        error = error.__context__
    return None


def read_checkpoint(path: str | Path) -> dict:
    """Load and validate a checkpoint file, or raise CheckpointError naming the file and the reason."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        with warnings.catch_warnings():  # torch warns about foreign pickle protocols before refusing them
            warnings.simplefilter("ignore")
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickles with code, garbage and truncated files fail in many ways
        raise CheckpointError(f"{path}: not a loadable checkpoint: {_load_failure_reason(error, path)}; give a .pt file "
                              "that train.py wrote") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a checkpoint of this repository (no '{CHECKPOINT_FORMAT}' marker)")
    if checkpoint.get("format_version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {checkpoint.get('format_version')!r} is not "
                              f"supported (this code reads version {CHECKPOINT_VERSION})")
    for key in ("metadata", "agent"):
        if not isinstance(checkpoint.get(key), dict):
            raise CheckpointError(f"{path}: incomplete checkpoint (no {key!r} section)")
    return checkpoint


# Fields a checkpoint may predate, with the value that gives the design such a checkpoint was trained with
# (not today's default, which may change).
FIELDS_ADDED_LATER = {"critic": "twin", "num_critics": 2, "policy_delay": 1, "adam_beta1": 0.9,
                     "warmup_action_repeat": 1, "obs_norm": False}


def checkpoint_config(checkpoint: dict) -> SACConfig:
    """The config a checkpoint from `read_checkpoint` was trained with: the one place that reads it."""
    try:
        return SACConfig(**(FIELDS_ADDED_LATER | checkpoint["metadata"]["config"]))
    except (TypeError, KeyError) as error:
        raise CheckpointError(f"checkpoint config does not fit this code: {first_line(error)}") from None


def check_checkpoint_fits_env(checkpoint: dict, env: gym.Env, path: str | Path) -> None:
    """Refuse a checkpoint made for other observation or action spaces."""
    meta = checkpoint["metadata"]
    found = (meta.get("obs_dim"), meta.get("action_low"), meta.get("action_high"))
    expected = (flat_dim(env.observation_space), *(np.asarray(bound, dtype=np.float32).reshape(-1).tolist()
                                                   for bound in (env.action_space.low, env.action_space.high)))
    if found != expected:
        raise CheckpointError(f"{path}: made for {meta.get('env_id')} (obs dim {found[0]}, action bounds "
                              f"{found[1]}..{found[2]}), which does not fit {env.spec.id if env.spec else env}")


def _load_failure_reason(error: BaseException, path: Path) -> str:
    """What a torch.load failure means for the user, as a sentence (torch's own messages run to a dozen lines)."""
    text = str(error)
    if "Unsupported global" in text:
        found = re.search(r"GLOBAL (\S+)", text)
        return (f"refused by weights_only loading: it holds a pickled Python object "
                f"({found.group(1) if found else 'a class or function'}), which could run code when loaded")
    with open(path, "rb") as handle:
        zip_archive = handle.read(4) == b"PK\x03\x04"  # how every file torch.save writes begins
    if zip_archive:
        return ("the file is cut short or damaged (torch.save writes a zip archive, and this one is incomplete), "
                "for example a copy that did not finish")
    if "WeightsUnpickler error:" in text:
        return ("refused by weights_only loading: its bytes are a pickle it will not run, or not a torch file at "
                "all, never a checkpoint of this repository")
    return "its bytes are not a torch checkpoint"


def first_line(error: BaseException) -> str:
    """The first line of an error's message (its type where it has none): what a one-line report shows."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
