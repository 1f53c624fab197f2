"""Head to head: this repository's default run against Stable-Baselines3's SAC and sb3-contrib's TQC and CrossQ
at rl-zoo3's tuned hyperparameters for the env. On LunarLanderContinuous, the default, it measures wall time to
a landed lander; on an env whose preset trains a fixed budget (the MuJoCo envs), wall time to the budget and the
final agent's return.

    python -m lab.head_to_head --algos ours,sac,tqc,crossq --seeds 60-62 --threads 1 --parallel 2 --commit
    python -m lab.head_to_head --env Hopper-v5 --algos sac --seeds 0 --ours-from docs/studies/hopper_300k.json

Every run is its own process with the same torch thread count, `--parallel` at a time, on the same seeds. Ours
is `python train.py --seed N --threads 1` exactly as a user starts it; each peer is this module's worker
(`--worker ALGO`) training the zoo's model with `learn`. All of them are judged by train.py's solved check,
unchanged, with the env's preset (`check_config`): after every 10th episode a 10-episode deterministic
evaluation (seeds from `evaluation_seed`); when its mean reaches the default run's target (260 on LunarLander,
its solved threshold 200 plus 60), 100 deterministic episodes no earlier check played (seeds from `check_seed`)
decide: solved when their mean minus 2 standard errors reaches the target (`is_solved`). A run stops when solved
or at `--cap` env steps (default: the preset's budget). Each finished run's final agent then plays
`--unseen-episodes` episodes from seed 1000.

Rows go to `--output` (a Markdown page) and its JSON sidecar as each run finishes; the same command run again
skips the (algorithm, seed) pairs the sidecar holds. An interrupted peer resumes from its last resume point (saved
at the first episode end after every SAVE_EVERY_S seconds of training: model, optimizers and replay buffer), its
wall time summed over its processes; an interrupted run of ours starts over. `--ours-from` takes our rows from
the default run's confirmation on the same CPU and env (`lab.confirm`'s results file) instead of training ours
again.
"""
from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import sys
import threading
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from lab import launch, outcomes
from lab.provenance import cpu_name, cpus_named
from lab.records import commit, parse_seeds, solved_at, threshold_label, wall_minutes
from plumbing import CHECKPOINTS_DIR, REPO, OneLineErrorParser, TrainingState, code_version, fail, final_checkpoint
from sac_model import (
    SACConfig, SACError, check_lower_bound, check_seed, checkpoint_config, env_threshold, evaluate_policy,
    evaluation_seed, is_solved, load_agent_and_env, make_env, preset_values, read_checkpoint, target_return,
)

ENV_ID = "LunarLanderContinuous-v3"
OURS = "ours"
PEERS = {"sac": ("stable_baselines3", "SAC"), "tqc": ("sb3_contrib", "TQC"), "crossq": ("sb3_contrib", "CrossQ"),
         # SBX, the JAX version of SB3 (pip install -r requirements-sbx.txt), at the same zoo settings.
         "sbx_tqc": ("sbx", "TQC"), "sbx_crossq": ("sbx", "CrossQ")}
ZOO_FILES = {"sbx_tqc": "tqc", "sbx_crossq": "crossq"}  # a peer's zoo hyperparameter file, where not its own name
ALGOS = (OURS, *PEERS)
DEFAULT_ALGOS = (OURS, "sac", "tqc", "crossq")  # SBX is an extra install
UNSEEN_SEED, UNSEEN_EPISODES = 1000, 100
RUN_PREFIX = "h2h"  # ours: runs/h2h_ours__seedN and checkpoints/h2h_ours__seedN under the repository root
# A peer's resume point after every this many seconds: a run killed with its session redoes at most about this much
# work, whatever its cost per env step (CrossQ's is 4x SAC's). A save takes about a second.
SAVE_EVERY_S = 600.0


class ZooError(SACError):
    """A zoo hyperparameter file or value this benchmark cannot reproduce faithfully."""


# --------------------------------------------------------------------------------------------
# rl-zoo3's hyperparameters, read from the files the installed rl_zoo3 package ships
# --------------------------------------------------------------------------------------------

class LinearSchedule:
    """The zoo's `lin_<x>`: x times SB3's progress_remaining, from x at the start of `learn` to 0 at its end
    (rl_zoo3's SimpleLinearSchedule)."""

    def __init__(self, initial_value: float) -> None:
        self.initial_value = float(initial_value)

    def __call__(self, progress_remaining: float) -> float:
        return progress_remaining * self.initial_value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LinearSchedule) and other.initial_value == self.initial_value

    def __repr__(self) -> str:
        return f"lin_{self.initial_value:g}"


# The zoo converts these keys from "lin_<x>" strings (rl_zoo3.exp_manager's _preprocess_schedules).
SCHEDULE_KEYS = ("learning_rate", "clip_range", "clip_range_vf", "delta_std")
# The zoo evaluates these strings as Python; only policy_kwargs is read here, by a parser that runs no code.
PYTHON_KEYS = ("policy_kwargs",)
# Keys the zoo turns into wrappers, callbacks or env settings: reproducing them is not written, so refuse them.
UNSUPPORTED_KEYS = ("normalize", "frame_stack", "env_wrapper", "vec_env_wrapper", "callback", "env_kwargs",
                    "monitor_kwargs", "replay_buffer_class", "replay_buffer_kwargs")


def parse_schedule(value: Any) -> Any:
    """A zoo schedule value: "lin_7.3e-4" -> LinearSchedule(7.3e-4); a number stays a number (the zoo wraps it
    in a constant schedule: the same values)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        kind, _, number = value.partition("_")
        if kind == "lin":
            try:
                return LinearSchedule(float(number))
            except ValueError:
                pass
    raise ZooError(f"schedule {value!r}: only 'lin_<number>' and numbers are understood")


def parse_python_kwargs(text: str) -> dict:
    """A zoo string such as "dict(net_arch=[400, 300], activation_fn=nn.ReLU)" as the dict it denotes, without
    running code: dict(...) calls, literals, lists, tuples, and torch.nn classes named nn.X or th.nn.X."""
    def value(node: ast.AST) -> Any:
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, (ast.List, ast.Tuple)):
            items = [value(item) for item in node.elts]
            return items if isinstance(node, ast.List) else tuple(items)
        if isinstance(node, ast.Dict) and all(key is not None for key in node.keys):
            return {value(key): value(item) for key, item in zip(node.keys, node.values)}
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub) and isinstance(node.operand, ast.Constant):
            return -node.operand.value
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict"
                and not node.args and all(k.arg is not None for k in node.keywords)):
            return {k.arg: value(k.value) for k in node.keywords}
        dotted = ast.unparse(node) if isinstance(node, ast.Attribute) else ""
        match = re.fullmatch(r"(?:th\.|torch\.)?nn\.(\w+)", dotted)
        if match and isinstance(getattr(torch.nn, match.group(1), None), type):
            return getattr(torch.nn, match.group(1))
        raise ZooError(f"{text!r}: cannot read {ast.unparse(node)!r} (only dict(...), literals and nn.X)")

    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError:
        raise ZooError(f"{text!r}: not a Python expression") from None
    result = value(tree.body)
    if not isinstance(result, dict):
        raise ZooError(f"{text!r}: expected a dict")
    return result


def zoo_hyperparams_file(algo: str) -> Path:
    """rl_zoo3/hyperparams/<algo>.yml of the installed rl_zoo3, found without importing the package."""
    spec = importlib.util.find_spec("rl_zoo3")
    if spec is None or not spec.submodule_search_locations:
        raise ZooError("rl_zoo3 is not installed: pip install -r requirements-bench.txt")
    return Path(next(iter(spec.submodule_search_locations))) / "hyperparams" / f"{algo}.yml"


def read_zoo_entry(path: Path, env_id: str = ENV_ID) -> tuple[str, dict]:
    """The zoo's entry for `env_id` in a hyperparameter file, and the key it was found under: the id itself,
    else the same env at another version (newest first; the zoo long knew LunarLander as -v2)."""
    import yaml  # here: the pages (lab.env_results reads them) need no zoo install

    entries = yaml.safe_load(path.read_text())
    if env_id in entries:
        return env_id, dict(entries[env_id])
    name = env_id.rpartition("-v")[0]
    versions = sorted((int(m.group(1)), key) for key in entries
                      if (m := re.fullmatch(re.escape(name) + r"-v(\d+)", str(key))))
    if not versions:
        raise ZooError(f"{path}: no entry for {env_id} (nor another version of it)")
    key = versions[-1][1]
    return key, dict(entries[key])


def model_kwargs(entry: dict) -> tuple[dict, int]:
    """A zoo entry as (keyword arguments of the model's constructor, the zoo's n_timesteps), converted as
    rl_zoo3's ExperimentManager converts them; keys it would turn into wrappers or callbacks are refused."""
    entry = dict(entry)
    refused = [key for key in UNSUPPORTED_KEYS if key in entry]
    if refused or entry.get("n_envs", 1) != 1:
        raise ZooError(f"zoo settings this benchmark does not reproduce: {refused or 'n_envs'}")
    entry.pop("n_envs", None)
    budget = int(float(entry.pop("n_timesteps")))
    for key in SCHEDULE_KEYS:
        if key in entry:
            entry[key] = parse_schedule(entry[key])
    for key in PYTHON_KEYS:
        if isinstance(entry.get(key), str):
            entry[key] = parse_python_kwargs(entry[key])
    if isinstance(entry.get("train_freq"), list):
        entry["train_freq"] = tuple(entry["train_freq"])
    return entry, budget


def zoo_hyperparams(algo: str, env_id: str = ENV_ID) -> tuple[str, dict, int]:
    """(the key read, the model's keyword arguments, the zoo's budget) for `algo` on the env."""
    key, entry = read_zoo_entry(zoo_hyperparams_file(ZOO_FILES.get(algo, algo)), env_id)
    kwargs, budget = model_kwargs(entry)
    return key, kwargs, budget


# --------------------------------------------------------------------------------------------
# Our solved check, for an SB3 model
# --------------------------------------------------------------------------------------------

class SB3Actor:
    """An SB3 model behind the one method sac_model.evaluate_policy calls, so that its episodes are played by
    the repository's own evaluation loop."""

    def __init__(self, model) -> None:
        self.model = model

    def select_action(self, obs: np.ndarray, evaluate: bool = False) -> np.ndarray:
        return self.model.predict(obs, deterministic=evaluate)[0]


def check_config(seed: int, env_id: str = ENV_ID) -> SACConfig:
    """What `python train.py --env ENV --seed N` runs with (the defaults and the env's preset): where the check's
    cadence, episodes, target and bound, and the run's budget, are defined."""
    return SACConfig(env=env_id, seed=seed, **preset_values("env", env_id))


def preset_target(env_id: str) -> float | None:
    """The return a default run on the env stops at; None where its preset trains the whole budget."""
    return target_return(check_config(0, env_id))


def page_name(env_id: str) -> str:
    """The env's page in benchmarks/results and its runs' folder in studies/."""
    return "time_to_solved" if env_id == ENV_ID else f"head_to_head_{env_id}"


def make_check_callback(eval_env, config: SACConfig, cap: int, save: Callable[[], None] | None = None,
                        save_every_s: float = SAVE_EVERY_S):
    """The SB3 callback that runs train.py's check on the model it trains, and stops `learn` when solved or at
    `cap` env steps; `save`, when given, writes a resume point at the first episode end after every `save_every_s`
    seconds."""
    from stable_baselines3.common.callbacks import BaseCallback

    class SolvedCheck(BaseCallback):
        def __init__(self) -> None:
            super().__init__()
            self.eval_env, self.config, self.cap = eval_env, config, cap
            self.episodes = 0
            self.evaluations: list[list[float]] = []  # [env step, mean, std], as train.py's eval_history
            self.checks: list[list[float]] = []  # [env step, mean, std], as train.py's target_checks
            self.check_seeds: list[int] = []
            self.saved_at = time.monotonic()

        def state(self) -> dict:
            """What a resumed run needs to go on judging as this one would have."""
            return {"episodes": self.episodes, "evaluations": self.evaluations, "checks": self.checks,
                    "check_seeds": self.check_seeds}

        def restore(self, state: dict) -> None:
            self.episodes, self.evaluations = state["episodes"], state["evaluations"]
            self.checks, self.check_seeds = state["checks"], state["check_seeds"]

        @property
        def solved(self) -> bool:
            config = self.config
            return is_solved(self.checks, target_return(config), config.target_episodes, config.target_std_errors)

        def _on_step(self) -> bool:
            for done in self.locals["dones"]:
                if done:
                    self.episodes += 1
                    if self.config.eval_every and self.episodes % self.config.eval_every == 0:
                        self.evaluate()
                        target = target_return(self.config)
                        if target is not None and self.evaluations[-1][1] >= target:
                            self.check()
                            if self.solved:
                                return False
                    if save is not None and time.monotonic() - self.saved_at >= save_every_s:
                        save()
                        self.saved_at = time.monotonic()
            return self.num_timesteps < self.cap

        def evaluate(self) -> None:
            returns = evaluate_policy(SB3Actor(self.model), self.eval_env, self.config.eval_episodes,
                                      evaluation_seed(self.config))
            self.evaluations.append([self.num_timesteps, float(np.mean(returns)), float(np.std(returns))])
            print(f"{time.strftime('%H:%M:%S')} env step {self.num_timesteps:,}, episode {self.episodes}: "
                  f"evaluation {np.mean(returns):.1f}", flush=True)

        def check(self) -> None:
            """train.py's check_target: episodes no earlier check played."""
            first_seed = check_seed(self.config, len(self.checks))
            self.check_seeds.append(first_seed)
            returns = evaluate_policy(SB3Actor(self.model), self.eval_env, self.config.target_episodes, first_seed)
            self.checks.append([self.num_timesteps, float(np.mean(returns)), float(np.std(returns))])
            lower = check_lower_bound(float(np.mean(returns)), float(np.std(returns)), self.config.target_episodes,
                                      self.config.target_std_errors)
            print(f"{time.strftime('%H:%M:%S')} env step {self.num_timesteps:,}: {len(returns)}-episode check "
                  f"{np.mean(returns):.1f}, lower bound {lower:.1f}: {'solved' if self.solved else 'not solved'}",
                  flush=True)

        def close_unsolved(self) -> None:
            """What train.py does when its budget is spent: the final agent is evaluated, and checked for the
            record, unless that already happened at this step."""
            if self.config.eval_every and (not self.evaluations or self.evaluations[-1][0] != self.num_timesteps):
                self.evaluate()
            checked_now = bool(self.checks) and self.checks[-1][0] == self.num_timesteps
            if target_return(self.config) is not None and not self.solved and not checked_now:
                self.check()

    return SolvedCheck()


def peer_class(algo: str):
    module, name = PEERS[algo]
    return getattr(importlib.import_module(module), name)


RESUME, RESUME_OLD, RESUME_NEW = "resume", "resume.old", "resume.new"


def save_resume_point(model, callback, out_dir: Path, minutes: float, segments: int) -> None:
    """Model (with its optimizers), replay buffer and the check's state, swapped in whole: a kill at any moment
    leaves one complete resume point."""
    new, current, old = out_dir / RESUME_NEW, out_dir / RESUME, out_dir / RESUME_OLD
    shutil.rmtree(new, ignore_errors=True)
    new.mkdir(parents=True)
    model.save(new / "model.zip")
    model.save_replay_buffer(new / "replay_buffer.pkl")
    state = {"steps": int(model.num_timesteps), "minutes": minutes, "segments": segments, **callback.state()}
    (new / "state.json").write_text(json.dumps(state))
    shutil.rmtree(old, ignore_errors=True)
    if current.exists():
        current.rename(old)
    new.rename(current)
    shutil.rmtree(old, ignore_errors=True)


def last_resume_point(out_dir: Path) -> tuple[Path, dict] | None:
    """The newest complete resume point of an interrupted run, if any."""
    for name in (RESUME, RESUME_OLD):
        if (out_dir / name / "state.json").is_file():
            return out_dir / name, json.loads((out_dir / name / "state.json").read_text())
    return None


def train_peer(algo: str, seed: int, threads: int, cap: int, out_dir: Path, started: float,
               env_id: str = ENV_ID, overrides: dict | None = None, save_every_s: float = SAVE_EVERY_S) -> dict:
    """The worker: train the zoo's model for `algo` (with `overrides`, for tests) until solved or `cap`, resuming
    an interrupted run; save the model and return its record. `started`: when the study started this process
    (time.time()), where its wall time starts."""
    from stable_baselines3.common.env_util import make_vec_env

    if (out_dir / "record.json").is_file():  # finished before its row was written: nothing to train
        return json.loads((out_dir / "record.json").read_text())
    torch.set_num_threads(threads)
    if PEERS[algo][0] == "sbx":  # one XLA CPU thread (the study refuses others), read when jax is first imported
        os.environ["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    key, kwargs, budget = zoo_hyperparams(algo, env_id)
    kwargs.update(overrides or {})
    # The zoo's n_timesteps is the clock of its schedules (lin_ falls to 0 there); the cap stops the run earlier.
    clock = max(budget, cap)
    eval_env = make_env(env_id)
    resume = last_resume_point(out_dir)
    earlier_minutes, segments = (resume[1]["minutes"], resume[1]["segments"] + 1) if resume else (0.0, 1)

    def minutes() -> float:
        return earlier_minutes + (time.time() - started) / 60

    def save() -> None:
        save_resume_point(model, callback, out_dir, minutes(), segments)

    callback = make_check_callback(eval_env, check_config(seed, env_id), cap, save, save_every_s)
    if resume:
        folder, state = resume
        # A fresh episode from a new env seed: the interrupted one's transitions up to the save are in the buffer.
        env = make_vec_env(env_id, n_envs=1, seed=seed + state["steps"])
        model = peer_class(algo).load(folder / "model.zip", env=env, device="cpu")
        model.load_replay_buffer(folder / "replay_buffer.pkl")
        model.set_random_seed(seed + state["steps"])
        callback.restore(state)
        print(f"resuming {algo} seed {seed} at env step {state['steps']:,} ({earlier_minutes:.1f} min before)",
              flush=True)
        # learn() adds the steps taken to total_timesteps: the schedules keep their clock.
        model.learn(total_timesteps=clock - model.num_timesteps, callback=callback, reset_num_timesteps=False)
    else:
        env = make_vec_env(env_id, n_envs=1, seed=seed)  # as the zoo makes it (one env, Monitor-wrapped)
        model = peer_class(algo)(env=env, seed=seed, verbose=0, device="cpu", **kwargs)
        model.learn(total_timesteps=clock, callback=callback)
    if not callback.solved:
        callback.close_unsolved()
    eval_env.close()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save(out_dir / "model.zip")
    record = {"steps": int(model.num_timesteps), "updates": int(model._n_updates), "episodes": callback.episodes,
              "evaluations": callback.evaluations, "checks": callback.checks, "solved": callback.solved,
              "minutes": minutes(), "segments": segments, "zoo_key": key, "zoo_budget": budget,
              "learn_total_timesteps": clock}
    (out_dir / "record.json").write_text(json.dumps(record, indent=1))
    shutil.rmtree(out_dir / RESUME, ignore_errors=True)
    return record


# --------------------------------------------------------------------------------------------
# The study: runs as processes, rows as they finish, a page and its JSON sidecar
# --------------------------------------------------------------------------------------------

def parse_algos(text: str) -> list[str]:
    algos = [a.strip() for a in text.split(",") if a.strip()]
    unknown = [a for a in algos if a not in ALGOS]
    if not algos or unknown or len(set(algos)) != len(algos):
        raise SACError(f"--algos: expected distinct names among {','.join(ALGOS)}, got {text!r}")
    return algos


def parse_caps(text: str | None, default: int) -> dict[str, int]:
    """'300000' (every algorithm) or '300000,crossq=200000' (a default and per-algorithm caps); None: `default`
    for every algorithm."""
    caps = dict.fromkeys(ALGOS, default)
    if text is None:
        return caps
    for part in text.split(","):
        algo, equals, number = part.strip().rpartition("=")
        if not number.isdigit() or int(number) <= 0 or (equals and algo not in ALGOS):
            raise SACError(f"--cap: expected env steps like 300000 or ours=300000,crossq=200000, got {text!r}")
        caps.update({algo: int(number)} if equals else dict.fromkeys(ALGOS, int(number)))
    return caps


def row_key(algo: str, seed: int) -> str:
    return f"{algo}/{seed}"


class Study:
    """The results page, its JSON sidecar (rows, keyed algo/seed) and the scratch folder of the runs."""

    def __init__(self, args: argparse.Namespace, command: str) -> None:
        self.args, self.command = args, command
        self.page_path = Path(args.output)
        self.results_path = self.page_path.with_suffix(".json")
        self.rows: dict[str, dict] = (json.loads(self.results_path.read_text())["rows"]
                                      if self.results_path.is_file() else {})
        self.work = Path(args.work_dir)
        self.commands: dict[tuple[str, int], list[str]] = {}
        if args.ours_from:
            if args.threads != 1:
                raise SACError("--ours-from: a confirmation's runs have one thread each; use --threads 1")
            for seed, record in confirmation_rows(Path(args.ours_from), args.env).items():
                if len(record["unseen"]) != args.unseen_episodes:
                    raise SACError(f"--ours-from: its final agents played {len(record['unseen'])} unseen episodes; "
                                   f"give --unseen-episodes {len(record['unseen'])} so that the peers play the same")
                self.rows.setdefault(row_key(OURS, seed), record)

    def pending(self, algos: list[str], seeds: list[int]) -> list[tuple[str, int]]:
        return [(a, s) for s in seeds for a in algos if row_key(a, s) not in self.rows]

    def save(self) -> list[Path]:
        """Write the page and its sidecar, keeping rows another study process wrote meanwhile (one process per
        algorithm, say, each one run at a time)."""
        self.page_path.parent.mkdir(parents=True, exist_ok=True)
        if self.results_path.is_file():
            self.rows = {**json.loads(self.results_path.read_text())["rows"], **self.rows}
        self.results_path.write_text(json.dumps({"rows": self.rows}, indent=1))
        self.page_path.write_text(page(self.rows, header(self.args, self.command), self.args.env))
        return [self.page_path, self.results_path]

    def run_name(self, algo: str, seed: int) -> str:
        return f"{RUN_PREFIX}_{algo}__seed{seed}"

    def process_command(self, algo: str, seed: int) -> list[str]:
        """Ours: train.py in the repository root, started over if an earlier session left it unfinished (its wall
        time is one process's). A peer: this module's worker, which resumes from its own resume point."""
        cap, run = self.args.caps[algo], self.run_name(algo, seed)
        env = [] if self.args.env == ENV_ID else ["--env", self.args.env]
        if algo == OURS:
            flags = ["--seed", str(seed), "--threads", str(self.args.threads), "--run-name", run, *env]
            if cap != check_config(seed, self.args.env).total_steps:
                flags += ["--total-steps", str(cap)]
            return launch.train_command(REPO, run, [*flags, *shlex.split(self.args.train_args)], restart=True)
        return [sys.executable, "-m", "lab.head_to_head", "--worker", algo, "--seeds", str(seed), *env,
                "--threads", str(self.args.threads), "--cap", str(cap), "--work-dir", str((self.work / run).resolve())]

    def start(self, algo: str, seed: int) -> dict:
        """Start a run; a thread waits for its exit, so that its wall time ends there even while the study is
        busy evaluating another run's final agent."""
        command = self.commands[algo, seed] = self.process_command(algo, seed)
        print(f"{time.strftime('%H:%M:%S')} start {algo} seed {seed}: {shown(command)}", flush=True)
        started = ["--started-at", repr(time.time())] if algo != OURS else []
        log = self.work / f"{self.run_name(algo, seed)}.log"
        run = {"started": time.perf_counter(), "process": launch.start(command + started, REPO, log).process}

        def wait() -> None:
            run["process"].wait()
            run["ended"] = time.perf_counter()

        threading.Thread(target=wait, daemon=True).start()
        return run

    def finish(self, algo: str, seed: int, returncode: int, minutes: float) -> dict:
        """The row of a finished run: its counters, and its final agent on the unseen episodes. `minutes`: the
        process's wall time (a peer's record has its own, summed over the processes of a resumed run)."""
        log = self.work / f"{self.run_name(algo, seed)}.log"
        if returncode != 0:
            raise SACError(f"{algo} seed {seed} exited with code {returncode}; see {log}")
        torch.set_num_threads(self.args.threads)
        if algo == OURS:
            final = final_checkpoint(REPO / CHECKPOINTS_DIR / self.run_name(algo, seed))
            checkpoint = read_checkpoint(final)
            training, config = TrainingState.of(checkpoint, final), checkpoint_config(checkpoint)
            solved = is_solved(training.target_checks, target_return(config), config.target_episodes,
                               config.target_std_errors)
            record = {"steps": training.global_step, "updates": training.updates, "episodes": training.episode,
                      "checks": training.target_checks, "evaluations": training.eval_history, "solved": solved,
                      "minutes": minutes}
            agent, env = load_agent_and_env(final)
        else:
            folder = self.work / self.run_name(algo, seed)
            record = json.loads((folder / "record.json").read_text())
            agent, env = SB3Actor(peer_class(algo).load(folder / "model.zip", device="cpu")), make_env(self.args.env)
        try:
            unseen, kinds = outcomes.play_episodes(agent, env, self.args.unseen_episodes, UNSEEN_SEED,
                                                   outcomes.classifiable(self.args.env))
        finally:
            env.close()
        record.update(algo=algo, seed=seed, env=self.args.env, cap=self.args.caps[algo], unseen=unseen,
                      crashes=None if kinds is None else sum(kind in outcomes.CRASHES for kind in kinds),
                      command=shown(self.commands[algo, seed]), commit=code_version(), cpu=cpu_name())
        self.rows[row_key(algo, seed)] = record
        return record


def confirmation_rows(path: Path, env_id: str = ENV_ID) -> dict[int, dict]:
    """Our default run's finished rows in a `lab.confirm` results file, as rows of this page, keyed by seed. Its
    runs must have trained this env and stopped at today's default target for it: a confirmation of another design
    is not our side."""
    if not path.is_file():
        raise SACError(f"--ours-from: {path} does not exist (a lab.confirm results file, docs/studies/<name>.json)")
    rows, target = {}, preset_target(env_id)
    for record in json.loads(path.read_text()).values():
        if "unseen" not in record:
            continue  # not finished
        if record.get("env", ENV_ID) != env_id:  # records from before lab.confirm named the env trained LunarLander
            raise SACError(f"--ours-from: {path} trained {record.get('env', ENV_ID)}, not {env_id}")
        if record["target"] != target:
            raise SACError(f"--ours-from: {path} ran to a target of {record['target']}; today's default run on "
                           f"{env_id} stops at {target}: run ours instead")
        env = "" if env_id == ENV_ID else f" --env {env_id}"
        rows[record["seed"]] = {
            "algo": OURS, "seed": record["seed"], "env": env_id, "steps": record["steps"],
            "updates": record["updates"], "minutes": wall_minutes(record), "solved": solved_at(record) is not None,
            "cap": record["cap"], "checks": record["checks"], "evaluations": record.get("evaluations"),
            "unseen": record["unseen"], "crashes": record.get("unseen_crashes"),
            "command": f"python train.py --seed {record['seed']} --threads 1{env}", "commit": None,
            "source": str(path), "cpu": record.get("cpu")}
    return rows


def shown(command: list[str]) -> str:
    """A run's command as a user would type it in the repository root."""
    return shlex.join(["python", *command[1:]]).replace(str(REPO) + "/", "")


def run(study: Study, pairs: list[tuple[str, int]]) -> None:
    """Run the pairs `--parallel` at a time; record, write (and commit) each row as its run finishes. A failed
    run is reported at the end, after the others have finished; it gets no row, so the next session reruns it."""
    waiting, running, failed = list(pairs), {}, []
    while waiting or running:
        while waiting and len(running) < study.args.parallel:
            pair = waiting.pop(0)
            running[pair] = study.start(*pair)
        time.sleep(2)
        for pair, process in list(running.items()):
            if "ended" not in process:
                continue
            del running[pair]
            try:
                record = study.finish(*pair, process["process"].returncode,
                                      (process["ended"] - process["started"]) / 60)
            except SACError as error:
                print(f"{time.strftime('%H:%M:%S')} failed: {error}", flush=True)
                failed.append(str(error))
                continue
            paths = study.save()
            print(f"{time.strftime('%H:%M:%S')} done {' | '.join(row_cells(record, study.args.env))}", flush=True)
            if study.args.commit:
                commit(paths, finished_message(record, study.args.env))
    if failed:
        raise SACError(f"{len(failed)} run(s) failed: {'; '.join(failed)}")


# --------------------------------------------------------------------------------------------
# The page
# --------------------------------------------------------------------------------------------

def columns(env_id: str) -> list[str]:
    return ["algorithm", "seed", "env steps", "gradient steps", "wall time (min)", "solved",
            "last 100-episode check", f"unseen from seed {UNSEEN_SEED}: mean", "std",
            f">= {threshold_label([env_threshold(env_id)])}", "< 0", "crashes"]


def count_at_threshold(unseen: np.ndarray, env_id: str) -> float | None:
    threshold = env_threshold(env_id)
    return None if threshold is None else float((unseen >= threshold).sum())


def shown_count(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"


def row_cells(record: dict, env_id: str = ENV_ID) -> list[str]:
    unseen = np.asarray(record["unseen"])
    check = record["checks"][-1] if record["checks"] else None
    if preset_target(env_id) is None:
        solved = f"no stop (budget {record['cap']:,})"
    else:
        solved = "yes" if record["solved"] else f"no (cap {record['cap']:,})"
    return [record["algo"], str(record["seed"]), f"{record['steps']:,}", f"{record['updates']:,}",
            f"{record['minutes']:.1f}", solved,
            f"{check[1]:.1f} +/- {check[2]:.1f}" if check else "none", f"{unseen.mean():.1f}", f"{unseen.std():.1f}",
            shown_count(count_at_threshold(unseen, env_id)), str(int((unseen < 0).sum())),
            shown_count(record["crashes"])]


def finished_message(record: dict, env_id: str) -> str:
    """The commit message of a finished run's row: its page, and its cells as the env's page shows them."""
    return (f"{page_name(env_id)}: {record['algo']} seed {record['seed']} finished "
            f"({' | '.join(row_cells(record, env_id)[2:])})")


def seed_list(seeds: list[int]) -> str:
    return ", ".join(str(seed) for seed in sorted(seeds))


def median_or_none(values: list[float | None]) -> float | None:
    """The median, or None where a row has no value (crashes are counted on LunarLander only)."""
    return None if any(v is None for v in values) else float(np.median(values))


def paired_minutes(peer: list[dict], ours: list[dict]) -> list[tuple[float, float]]:
    """(the peer's wall time, ours) for each peer run whose seed ours ran on the same CPU: wall times compare only
    there. Rows recorded before rows named their CPU have none, and pair only with each other (those all ran on
    the AMD EPYC their pages name)."""
    ours_by_seed = {row["seed"]: row for row in ours}
    return [(row["minutes"], ours_by_seed[row["seed"]]["minutes"]) for row in peer
            if row["seed"] in ours_by_seed and ours_by_seed[row["seed"]].get("cpu") == row.get("cpu")]


def summary(rows: list[dict], env_id: str = ENV_ID) -> list[str]:
    """Per algorithm: solved count, median wall time (an unsolved run counts with its time to the cap), ours'
    median on the same seeds and the ratio of the two, median env steps, and the final agents' quality."""
    algos = [a for a in ALGOS if any(r["algo"] == a for r in rows)]
    by_algo = {a: [r for r in rows if r["algo"] == a] for a in algos}
    lines = ["| algorithm | seeds | solved | median wall time (min) | ours on these seeds (min) | x ours | "
             f"median env steps | unseen mean: median | unseen >= {threshold_label([env_threshold(env_id)])}: "
             "median | "
             "unseen < 0: median | crashes: median |", "| --- " * 11 + "|"]
    for algo, group in by_algo.items():
        minutes = float(np.median([r["minutes"] for r in group]))
        unseen = [np.asarray(r["unseen"]) for r in group]
        paired = paired_minutes(group, by_algo.get(OURS, []))
        if len(paired) == len(group):
            ours_minutes = float(np.median([ours for _, ours in paired]))
            same_seeds = f"{ours_minutes:.1f} | {minutes / ours_minutes:.2f}"
        else:
            same_seeds = "n/a | n/a"  # a ratio to ours only where ours ran every one of these seeds on the same CPU
        solved = "-" if preset_target(env_id) is None else sum(r["solved"] for r in group)
        lines.append(f"| {algo} | {seed_list([r['seed'] for r in group])} | {solved} | "
                     f"{minutes:.1f} | {same_seeds} | {np.median([r['steps'] for r in group]):,.0f} | "
                     f"{np.median([u.mean() for u in unseen]):.1f} | "
                     f"{shown_count(median_or_none([count_at_threshold(u, env_id) for u in unseen]))} | "
                     f"{np.median([(u < 0).sum() for u in unseen]):g} | "
                     f"{shown_count(median_or_none([r['crashes'] for r in group]))} |")
    return lines


def side_by_side(rows: list[dict], env_id: str = ENV_ID) -> list[str]:
    """Wall time (min) and env steps per seed, one column per algorithm, on the seeds a peer ran: the
    comparison seed by seed; an unsolved run is marked where runs stop when solved."""
    unsolved = "" if preset_target(env_id) is None else ", unsolved"
    algos = [a for a in ALGOS if any(r["algo"] == a for r in rows)]
    cell = {(r["algo"], r["seed"]): r for r in rows}
    seeds = sorted({r["seed"] for r in rows if r["algo"] != OURS})
    lines = ["| seed | " + " | ".join(f"{a}: min (env steps)" for a in algos) + " |", "| --- " * (len(algos) + 1) + "|"]
    for seed in seeds:
        cells = []
        for algo in algos:
            record = cell.get((algo, seed))
            cells.append("" if record is None else f"{record['minutes']:.1f} ({record['steps'] / 1000:.0f}k"
                         f"{'' if record['solved'] else unsolved})")
        lines.append(f"| {seed} | " + " | ".join(cells) + " |")
    return lines


def title(env_id: str) -> str:
    if env_id == ENV_ID:
        return "# Time to a landed lander: ours against SB3's zoo-tuned SAC, TQC and CrossQ"
    return f"# {env_id}: ours against SB3's zoo-tuned SAC, TQC and CrossQ at the same budget"


def header(args: argparse.Namespace, command: str) -> list[str]:
    versions = ", ".join(f"{name} {package_version(name)}"
                         for name in ("torch", "stable-baselines3", "sb3-contrib", "rl_zoo3", "gymnasium", "sbx-rl",
                                      "jax", "mujoco"))
    return [title(args.env), "",
            f"CPU: {cpu_name()}, {os.cpu_count()} cores; {args.threads} torch thread(s) a run, {args.parallel} run(s) "
            f"at a time in the study process that wrote this page last; {versions}; "
            f"git commit {code_version() or 'unknown'}.", "",
            f"Command (the last): `{command}`", ""]


def stop_terms(env_id: str) -> str:
    """How this page's runs end, in words: at train.py's check, or at the preset's fixed budget."""
    target = preset_target(env_id)
    if target is None:
        return (f"No stop: every run trains {env_id}'s preset budget, {check_config(0, env_id).total_steps:,} env "
                "steps, as benchmark tables train (the 'solved' column says so); a 10-episode deterministic "
                "evaluation every 10 episodes gives the curves. ")
    return (f"Solved: train.py's check at its default target, unchanged (a 10-episode deterministic evaluation "
            f"every 10 episodes; when it reaches {target:g}, 100 fresh deterministic episodes, passed at mean - 2 standard "
            f"errors >= {target:g}). ")


def page(rows: dict[str, dict], head: list[str], env_id: str = ENV_ID) -> str:
    ordered = sorted(rows.values(), key=lambda r: (ALGOS.index(r["algo"]), r["seed"]))
    header_cells = columns(env_id)
    lines = [*head, "| " + " | ".join(header_cells) + " |", "| --- " * len(header_cells) + "|"]
    lines += ["| " + " | ".join(row_cells(r, env_id)) + " |" for r in ordered]
    if ordered:
        lines += ["", *summary(ordered, env_id)]
    if any(r["algo"] != OURS for r in ordered):
        lines += ["", "Seed by seed:", "", *side_by_side(ordered, env_id)]
    commits = sorted({r["commit"] for r in ordered} - {code_version(), None})
    sources = sorted({r["source"] for r in ordered if r.get("source")})
    crashes = ("crashes: episodes the env ended with the lander's body on the ground or out of bounds (lab.outcomes), "
               "which a return below 0 does not always show" if outcomes.classifiable(env_id)
               else "crashes: '-', the diagnosis is LunarLander's")
    lines += ["", stop_terms(env_id) +
              "Wall time: from the run's process start (imports and, for ours, compiling the step included) to its "
              "exit (ours) or its saved model (peers), summed over the processes of a resumed run; unsolved runs at "
              f"their cap. Unseen: the final agent, deterministic, on episodes no check played; {crashes}. "
              "Peers: rl-zoo3's "
              "hyperparameters for the env, read from the installed package; `learn` is given the zoo's n_timesteps, "
              "the clock of its lin_ schedules (500k for SAC and TQC on LunarLander; the cap where larger), and is "
              "stopped by the check or the cap. "
              "Each row's command and the zoo entry a peer read are in the JSON sidecar."]
    if commits:
        lines += ["", f"Other rows ran at commit(s) {', '.join(commits)}."]
    lines += cpus_named({f"{r['algo']} {r['seed']}": r.get("cpu") for r in ordered})
    if sources:
        lines += ["", f"Our rows come from the default run's confirmation, {', '.join(sources)} (two runs "
                  "at a time, one thread each; its page names the commits), and are not run again here. Their wall "
                  "time is summed over the processes of a resumed run."]
    return "\n".join(lines) + "\n"


def package_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog="python -m lab.head_to_head", description=__doc__.split("\n\n")[0])
    parser.add_argument("--algos", default=",".join(DEFAULT_ALGOS),
                        help=f"among {','.join(ALGOS)} (default: {','.join(DEFAULT_ALGOS)}; the sbx_ peers need "
                             "pip install -r requirements-sbx.txt)")
    parser.add_argument("--seeds", default="60-62", help="a range like 60-62 or a list like 60,61 (default: 60-62)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of every run (default: 1)")
    parser.add_argument("--parallel", type=int, default=2, help="runs at a time, each its own process (default: 2)")
    parser.add_argument("--env", default=ENV_ID,
                        help=f"the env every run trains, with its preset (default: {ENV_ID}); a peer reads the zoo's "
                             "entry for it, or for the same env at another version")
    parser.add_argument("--cap", help="most env steps a run takes: N, or per algorithm like 300000,crossq=200000 "
                                      "(default: the env preset's budget, 300000 on LunarLander)")
    parser.add_argument("--unseen-episodes", type=int, default=UNSEEN_EPISODES,
                        help=f"episodes each final agent plays from seed {UNSEEN_SEED} (default: {UNSEEN_EPISODES})")
    parser.add_argument("--output", help="the Markdown page; its JSON sidecar (.json) holds the raw rows and makes a "
                                         "rerun resume (default: benchmarks/results/time_to_solved.md on LunarLander, "
                                         "else benchmarks/results/head_to_head_<env>.md)")
    parser.add_argument("--train-args", default="",
                        help="extra train.py flags for ours (a smoke test; the study has none)")
    parser.add_argument("--work-dir", help="logs and the peers' saved models (default: studies/time_to_solved on "
                                           "LunarLander, else studies/head_to_head_<env>)")
    parser.add_argument("--ours-from", metavar="JSON",
                        help="take our rows from the default run's confirmation on this CPU (lab.confirm's "
                             "docs/studies/<name>.json) instead of running ours")
    parser.add_argument("--commit", action="store_true", help="git-commit the page and its sidecar after each row")
    parser.add_argument("--worker", choices=list(PEERS), help=argparse.SUPPRESS)  # one peer run, in its own process
    parser.add_argument("--started-at", type=float, help=argparse.SUPPRESS)  # the worker's start, time.time()
    return parser


def time_to_solved(args: argparse.Namespace, argv: list[str]) -> None:
    """Train the study's pending runs (or, as a worker, one peer's run) and write the results page."""
    make_env(args.env).close()  # an env that cannot be made is refused before any run starts
    seeds, algos = parse_seeds(args.seeds), parse_algos(args.algos)
    args.caps = parse_caps(args.cap, check_config(seeds[0], args.env).total_steps)
    if args.threads <= 0 or args.parallel <= 0 or args.unseen_episodes <= 0:
        raise SACError("--threads, --parallel and --unseen-episodes must be positive")
    if args.threads != 1 and any(PEERS.get(algo, ("",))[0] == "sbx" for algo in algos + [args.worker]):
        raise SACError("--threads: the sbx_ peers run on one XLA thread (XLA_FLAGS has no count for its CPU "
                       "threads), so the study runs every algorithm on one: use --threads 1")
    name = page_name(args.env)
    args.output = args.output or str(REPO / "benchmarks" / "results" / f"{name}.md")
    args.work_dir = args.work_dir or str(REPO / "studies" / name)
    if args.worker:
        if len(seeds) != 1:
            raise SACError("--worker trains one seed")
        train_peer(args.worker, seeds[0], args.threads, args.caps[args.worker], Path(args.work_dir),
                   args.started_at or time.time(), args.env)
        return
    study = Study(args, shlex.join(["python", "-m", "lab.head_to_head", *argv]))
    pairs = study.pending(algos, seeds)
    skipped = len(algos) * len(seeds) - len(pairs)
    if skipped:
        print(f"{skipped} finished run(s) in {study.results_path} are kept; {len(pairs)} to run", flush=True)
    run(study, pairs)
    print(f"wrote {', '.join(str(p) for p in study.save())}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        time_to_solved(build_parser().parse_args(argv), argv)
    except SACError as error:
        fail(str(error))
    except KeyboardInterrupt:
        fail("interrupted; the same command runs the unfinished runs again: a peer from its last resume point, "
             "ours from the start", code=130)
    return 0


if __name__ == "__main__":
    sys.exit(main())
