"""What lab.ablate and lab.search share: a study folder of train.py trials run on Ray Tune.

A study lives in studies/<name>/: train.py's logs (runs/), checkpoints (checkpoints/), each trial's
output (logs/<run>.log), Ray Tune's own records (ray/) and the settings it was first run with
(study.json), which later runs of the same name must keep. A lock stops two drivers running one
study. Every train.py run resumes from its newest checkpoint when started again, so a stopped study
loses at most CHECKPOINT_EVERY episodes a run.

Locally, Ray starts in the driver with as many concurrent trials as the CPUs allow. On a cluster
(--address), every node must see this repository and the studies/ folder at the same absolute paths
(a shared filesystem) with the same Python environment. Needs `pip install -r requirements-study.txt`.
"""
from __future__ import annotations

import argparse
import fcntl
import json
import logging
import os
import shlex
import socket
import sys
import time
from pathlib import Path
from typing import IO, Callable

from lab.launch import Started, last_line, start, train_command
from plumbing import CHECKPOINTS_DIR, checkpoint_files, config_from_args, fail, run_state
from sac_model import CheckpointError, ConfigError, SACConfig, checkpoint_config, flag, read_checkpoint
from train import changed_flags, flags_given, parse_args as parse_train_args

try:
    import ray
    from ray import tune
except ImportError:
    print("error: the study tools need Ray Tune: pip install -r requirements-study.txt", file=sys.stderr)
    sys.exit(2)

STUDIES_DIR = Path("studies")
# Seeds never cross between choosing hyperparameters and judging them: a search tunes on its own seeds,
# the confirmation (and any ablation) runs on others, so the result is not fitted to the seeds it is judged on.
SEARCH_SEEDS = (100, 101)
CONFIRMATION_SEEDS = tuple(range(5))
assert not set(SEARCH_SEEDS) & set(CONFIRMATION_SEEDS)
# train.py flags a study sets itself for every trial; --train-args may not set them.
OWN_FLAGS = {"seed", "total_steps", "threads", "eval_every", "eval_episodes", "target_return", "run_name"}
# Episodes between checkpoints of a trial (train.py's default is 50): a stopped trial redoes at most
# this many. Each checkpoint is written at an episode's end, so the resume is exact. --train-args may change it.
CHECKPOINT_EVERY = 10
# Seconds to wait for a TCP answer at a host:port --address before calling the cluster unreachable.
ADDRESS_TIMEOUT_S = 10


# --------------------------------------------------------------------------------------------
# Flags and settings
# --------------------------------------------------------------------------------------------

def add_study_flags(parser: argparse.ArgumentParser, defaults: dict) -> None:
    """The flags every study script has; `defaults` holds the settings a study fixes on its first run."""
    parser.add_argument("--name", default="default", help="study name: the folder studies/<name>/ (default: default)")
    parser.add_argument("--budget", type=int, default=None,
                        help=f"env steps per trial (default: {defaults['budget']}, or the study's own)")
    parser.add_argument("--eval-every", type=int, default=None,
                        help=f"evaluate every this many episodes (default: {defaults['eval_every']})")
    parser.add_argument("--eval-episodes", type=int, default=None,
                        help=f"episodes per evaluation (default: {defaults['eval_episodes']})")
    parser.add_argument("--train-args", default=None,
                        help='further train.py flags for every trial, e.g. "--env Pendulum-v1 --hidden-size 64" '
                             "(a single flag needs the = form: --train-args=--no-layer-norm)")
    parser.add_argument("--address", default=None, help="address of a running Ray cluster (default: local Ray)")
    parser.add_argument("--max-concurrent", type=int, default=None,
                        help="most trials at once (default: local CPUs / CPUs per trial, or all a cluster fits)")
    parser.add_argument("--cpus-per-trial", type=int, default=1,
                        help="CPUs (and torch threads) per train.py run (default: 1)")
    parser.add_argument("--aggregate-only", action="store_true",
                        help="train nothing: the results of the finished runs")


def check_study_args(args: argparse.Namespace, parser: argparse.ArgumentParser, positive: tuple[str, ...]) -> None:
    """Check the shared flags and split --train-args; any problem is one line on stderr and exit code 2."""
    if not args.name or Path(args.name).name != args.name:
        parser.error(f"--name must be a plain folder name, got {args.name!r}")
    for name in ("budget", "eval_every", "eval_episodes", "max_concurrent", "cpus_per_trial", *positive):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            parser.error(f"{flag(name)} must be positive, got {getattr(args, name)}")
    try:
        args.train_args = None if args.train_args is None else shlex.split(args.train_args)
    except ValueError as error:
        parser.error(f"--train-args: {error}")
    problem = None if args.aggregate_only or args.address is None else unreachable(args.address)
    if problem:
        parser.error(f"--address {args.address}: {problem}")


def unreachable(address: str) -> str | None:
    """Why no Ray cluster can answer at a host:port address, or None (also for "auto" and ray:// addresses).

    Ray retries an address where nothing listens for many minutes before it gives up with a
    traceback; one TCP connect tells at once, before the study folder is written.
    """
    host, colon, port = address.rpartition(":")
    if not colon or "://" in address or not port.isdigit():
        return None
    try:
        socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=ADDRESS_TIMEOUT_S).close()
    except (OSError, OverflowError) as error:
        reason = getattr(error, "strerror", None) or str(error)
        return f"no Ray cluster answers there ({reason})"
    return None


def study_settings(args: argparse.Namespace, study_dir: Path, parser: argparse.ArgumentParser,
                   defaults: dict) -> dict:
    """The study's settings: those it was first run with (study.json), else the flags or `defaults`.

    A flag that contradicts a study's settings is refused: its trials would not be comparable.
    `defaults["kind"]` (ablation or search) must match too: one folder holds one kind of study.
    """
    saved_file = study_dir / "study.json"
    saved = json.loads(saved_file.read_text()) if saved_file.is_file() else {}
    if args.aggregate_only and not saved:
        parser.error(f"no study at {study_dir}/ (no study.json): run it first")
    if saved and saved.get("kind", "ablation") != defaults["kind"]:  # a study.json without a kind is an ablation's
        parser.error(f"study {args.name!r} is of kind {saved.get('kind', 'ablation')!r}, not {defaults['kind']!r}: "
                     "choose a new --name")
    settings = {"kind": defaults["kind"]}
    for key, default in defaults.items():
        given = getattr(args, key, None)
        if saved and given is not None and given != saved.get(key, default):
            parser.error(f"study {args.name!r} was run with {flag(key)} {saved.get(key, default)!r}, not {given!r}: "
                         "leave it out or choose a new --name")
        settings[key] = saved.get(key, default) if given is None else given
    return settings


def check_train_args(train_args: list[str], trial_flags: list[list[str]], parser: argparse.ArgumentParser,
                     own: set[str] = OWN_FLAGS) -> None:
    """Refuse train.py flags the study sets itself (`own`) or that train.py would reject in any of
    `trial_flags`, before any trial starts."""
    own = sorted(flags_given(train_args) & own)  # exits 2 on an unknown train.py flag
    if parse_train_args(train_args).resume is not None:
        own.append("resume")
    if own:
        parser.error(f"--train-args may not set {flag(own[0])}: the study sets it for every trial")
    for flags in trial_flags:
        try:
            config_from_args(parse_train_args(flags)).validate()
        except ConfigError as error:
            parser.error(f"--train-args: {error}")


def common_train_flags(settings: dict, seed: int, threads: int) -> list[str]:
    """The train.py flags every trial of a study gets, before its own configuration's."""
    return ["--total-steps", str(settings["budget"]), "--seed", str(seed), "--threads", str(threads),
            "--eval-every", str(settings["eval_every"]), "--eval-episodes", str(settings["eval_episodes"]),
            "--target-return", settings["target_return"], "--checkpoint-every", str(CHECKPOINT_EVERY),
            *settings["train_args"]]


def lock_study(study_dir: Path, parser: argparse.ArgumentParser) -> IO:
    """Hold an exclusive lock on the study for this process, so two drivers never run one trial twice."""
    study_dir.mkdir(parents=True, exist_ok=True)
    handle = open(study_dir / ".lock", "w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        parser.error(f"study {study_dir} is being run by another driver")
    return handle


def refuse_foreign_trials(flags: dict[str, list[str]], study_dir: Path, parser: argparse.ArgumentParser) -> None:
    """Exit 2 if a trial folder holds a run this study did not make: it is never skipped, resumed or overwritten.

    A trial's newest checkpoint must have been trained with the trial's own flags (those a resume may
    change aside).
    """
    for run, run_flags in flags.items():
        files = checkpoint_files(study_dir / CHECKPOINTS_DIR / run)
        if not files:
            continue
        try:
            config = checkpoint_config(read_checkpoint(files[-1]))
        except CheckpointError as error:
            parser.error(f"trial folder {files[-1].parent} is not this study's {run}: {error}")
        trial_args = parse_train_args(run_flags)
        foreign = sorted(changed_flags(config, trial_args, flags_given(run_flags)) - SACConfig.resumable_fields())
        if foreign:
            name = foreign[0]
            parser.error(f"trial folder {files[-1].parent} is not this study's {run}: it was trained with "
                         f"{flag(name)} {getattr(config, name)}, the study sets "
                         f"{getattr(trial_args, name)}; move it away or choose another --name")


# --------------------------------------------------------------------------------------------
# train.py runs
# --------------------------------------------------------------------------------------------

def start_train(study_dir: Path, run: str, flags: list[str]) -> Started:
    """Start train.py for one run of a study (lab.launch: resumed from its newest checkpoint if it has one).

    train.py runs with this worker's Python in the study folder, so its runs/ and checkpoints/ land there; its
    output is appended to logs/<run>.log. A stopped trial (Ctrl-C, or ASHA) ends with Ray killing its worker:
    train.py then gets SIGTERM (Linux), writes a checkpoint and exits; the next start resumes it.
    """
    return start(train_command(study_dir, run, flags), study_dir, study_dir / "logs" / f"{run}.log",
                 die_with_parent=True)


def unfinished_runs(study_dir: Path) -> dict[str, str]:
    """The last log line of each run that was started but has no final checkpoint, by run name."""
    return {log.stem: last_line(log) for log in sorted((study_dir / "logs").glob("*.log"))
            if run_state(study_dir / CHECKPOINTS_DIR / log.stem) != "finished"}


# --------------------------------------------------------------------------------------------
# Ray Tune
# --------------------------------------------------------------------------------------------

class TrialProgress(tune.Callback):
    """One console line when a trial starts and when it ends (Ray's own tables are turned off)."""

    def __init__(self, label: Callable[[tune.experiment.Trial], str]) -> None:
        self.label = label

    def on_trial_start(self, iteration: int, trials: list, trial, **info) -> None:
        print(f"{time.strftime('%H:%M:%S')} started  {self.label(trial)}", flush=True)

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        result = trial.last_result
        if "exit_code" not in result:
            outcome = f"stopped  {self.label(trial)} by the scheduler at env step {result.get('step', 0):,}"
        elif result["exit_code"] == 0:
            outcome = f"finished {self.label(trial)}"
        else:
            outcome = f"failed (exit {result['exit_code']}) {self.label(trial)}"
        print(f"{time.strftime('%H:%M:%S')} {outcome} after {result.get('time_total_s', 0):.0f} s", flush=True)

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        print(f"{time.strftime('%H:%M:%S')} error    {self.label(trial)} (Ray could not run it)", flush=True)


def init_ray(args: argparse.Namespace, cpus_per_trial: int) -> None:
    """Connect to the cluster at --address, or start a local Ray with room for the concurrent trials."""
    if args.address:
        try:
            ray.init(address=args.address, log_to_driver=False, logging_level=logging.WARNING)
        except ConnectionError as error:  # e.g. --address auto where no cluster runs
            fail(f"--address {args.address}: {str(error).splitlines()[0]}")
    else:
        concurrent = args.max_concurrent or max(1, available_cpus() // cpus_per_trial)
        ray.init(num_cpus=concurrent * cpus_per_trial, include_dashboard=False, log_to_driver=False,
                 logging_level=logging.WARNING)
    # Tune's classic reporter prints nothing at verbosity 0 (the new one still prints banners):
    # TrialProgress prints one line per trial instead.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")


def tune_run_config(study_dir: Path, label: Callable[[tune.experiment.Trial], str]) -> tune.RunConfig:
    """Where Tune keeps a study's records (studies/<name>/ray/tune), quietly, one line per trial event."""
    return tune.RunConfig(name="tune", storage_path=str(study_dir / "ray"), verbose=0,
                          callbacks=[TrialProgress(label)])


def available_cpus() -> int:
    """CPUs this process may run on (respects taskset and container CPU sets where the OS tells)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
