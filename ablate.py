"""Ablation study of SAC's claimed improvements on Ray Tune: configurations x seeds of train.py.

    python ablate.py                                       # 5 configurations x 5 seeds x 200k env steps
    python ablate.py --name quick --budget 50000 --seeds 3 --configs full,no_per
    python ablate.py --address auto                        # on a running Ray cluster
    python ablate.py --name quick --aggregate-only         # table and plot of the finished runs so far

Everything lives in studies/<name>/: train.py's logs (runs/), checkpoints (checkpoints/), each
trial's output (logs/<run>.log), Ray Tune's own records (ray/), the settings (study.json), and the
results: results.md (IQM and 95% bootstrap CI table) and curves.png. Re-running the same --name
skips finished trials and resumes unfinished ones from their newest checkpoint; --budget, the
evaluation flags and --train-args are fixed by a study's first run, --seeds and --configs may grow.

Locally, Ray starts in this process with as many concurrent trials as the CPUs allow. On a cluster
(--address), every node must see this repository and the studies/ folder at the same absolute
paths (a shared filesystem) with the same Python environment. Needs
`pip install -r requirements-study.txt`.
"""
from __future__ import annotations

import argparse
import ctypes
import fcntl
import json
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

from sac_model import (
    CheckpointError, ConfigError, OneLineErrorParser, SACConfig, checkpoint_files, config_from_args, read_checkpoint,
)
from study import TABLE_NOTES, aggregate, load_study, markdown_table, plot_curves, run_name
from train import RESUME_OVERRIDABLE, changed_flags, flags_given
from train import build_parser as train_parser

try:
    import ray
    from ray import tune
except ImportError:
    print("error: ablate.py needs Ray Tune: pip install -r requirements-study.txt", file=sys.stderr)
    sys.exit(2)

TRAIN_SCRIPT = Path(__file__).resolve().parent / "train.py"
STUDIES_DIR = Path("studies")
# Each claimed improvement, switched off on its own; "full" is the method as the repository ships it.
CONFIGS = {
    "full": [],
    "no_per": ["--buffer", "uniform"],
    "no_layer_norm": ["--no-layer-norm"],
    "no_grad_clip": ["--grad-clip", "0"],
    "no_lr_schedule": ["--lr-gamma", "1"],
}
# The settings that make a study's numbers comparable: fixed when the study is first run.
DEFAULT_SETTINGS = {"budget": 200_000, "eval_every": 10, "eval_episodes": 10, "train_args": []}
# train.py flags ablate.py sets itself for every trial; --train-args may not set them.
OWN_FLAGS = {"seed", "total_steps", "threads", "eval_every", "eval_episodes", "run_name"}
# Episodes between checkpoints of a trial (train.py's default is 50): a stopped trial redoes at most
# this many. Each checkpoint is written at an episode's end, so the resume is exact. --train-args may change it.
CHECKPOINT_EVERY = 10
PR_SET_PDEATHSIG = 1


# --------------------------------------------------------------------------------------------
# Flags and settings
# --------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(description="Ablation study of SAC on Ray Tune: configurations x seeds of train.py.")
    parser.add_argument("--name", default="default", help="study name: the folder studies/<name>/ (default: default)")
    parser.add_argument("--budget", type=int, default=None,
                        help=f"env steps per trial (default: {DEFAULT_SETTINGS['budget']}, or the study's own)")
    parser.add_argument("--seeds", type=int, default=5, help="seeds 0 .. N-1 per configuration (default: 5)")
    parser.add_argument("--configs", default=",".join(CONFIGS),
                        help=f"comma-separated subset of {', '.join(CONFIGS)} (default: all)")
    parser.add_argument("--eval-every", type=int, default=None,
                        help=f"evaluate every this many episodes (default: {DEFAULT_SETTINGS['eval_every']})")
    parser.add_argument("--eval-episodes", type=int, default=None,
                        help=f"episodes per evaluation (default: {DEFAULT_SETTINGS['eval_episodes']})")
    parser.add_argument("--train-args", default=None,
                        help='further train.py flags for every trial, e.g. "--env Pendulum-v1 --hidden-size 64" '
                             "(a single flag needs the = form: --train-args=--no-layer-norm)")
    parser.add_argument("--address", default=None, help="address of a running Ray cluster (default: local Ray)")
    parser.add_argument("--max-concurrent", type=int, default=None,
                        help="most trials at once (default: local CPUs / --cpus-per-trial, or all a cluster fits)")
    parser.add_argument("--cpus-per-trial", type=int, default=1, help="CPUs (and torch threads) per trial (default: 1)")
    parser.add_argument("--step-points", default=None,
                        help="comma-separated env steps of the table (default: 1/4, 1/2, 3/4 and all of the budget)")
    parser.add_argument("--threshold", type=float, default=200.0,
                        help="return whose first reaching is timed (default: 200, LunarLander solved)")
    parser.add_argument("--aggregate-only", action="store_true",
                        help="train nothing: table and plot of the finished runs")
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse and check the flags; any problem is one line on stderr and exit code 2."""
    args = parser.parse_args(argv)
    if not args.name or Path(args.name).name != args.name:
        parser.error(f"--name must be a plain folder name, got {args.name!r}")
    for flag in ("budget", "seeds", "eval_every", "eval_episodes", "max_concurrent", "cpus_per_trial"):
        if getattr(args, flag) is not None and getattr(args, flag) <= 0:
            parser.error(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    args.configs = [name.strip() for name in args.configs.split(",") if name.strip()]
    unknown = [name for name in args.configs if name not in CONFIGS]
    if unknown or not args.configs:
        parser.error(f"--configs: unknown configuration {unknown[0] if unknown else '(none)'!r}; "
                     f"choose from {', '.join(CONFIGS)}")
    try:
        args.train_args = None if args.train_args is None else shlex.split(args.train_args)
        args.step_points = None if args.step_points is None else [int(p) for p in args.step_points.split(",")]
    except ValueError as error:
        parser.error(f"--train-args or --step-points: {error}")
    if args.step_points is not None and min(args.step_points) <= 0:
        parser.error("--step-points must be positive env steps")
    return args


def study_settings(args: argparse.Namespace, study_dir: Path, parser: argparse.ArgumentParser) -> dict:
    """The study's settings: those it was first run with (study.json), else the flags or defaults.

    A flag that contradicts a study's settings is refused: its trials would not be comparable.
    """
    saved_file = study_dir / "study.json"
    saved = json.loads(saved_file.read_text()) if saved_file.is_file() else {}
    if args.aggregate_only and not saved:
        parser.error(f"no study at {study_dir}/ (no study.json): run it first")
    settings = {}
    for key, default in DEFAULT_SETTINGS.items():
        given = getattr(args, key)
        if saved and given is not None and given != saved[key]:
            flag = f"--{key.replace('_', '-')}"
            parser.error(f"study {args.name!r} was run with {flag} {saved[key]!r}, not {given!r}: "
                         "leave it out or choose a new --name")
        settings[key] = saved.get(key, default) if given is None else given
    if max(args.step_points or [0]) > settings["budget"]:
        parser.error(f"--step-points go beyond the budget of {settings['budget']} env steps")
    return settings


def check_train_args(settings: dict, parser: argparse.ArgumentParser) -> None:
    """Refuse train.py flags that ablate.py owns or that train.py would reject, before any trial starts."""
    own = sorted(flags_given(settings["train_args"]) & OWN_FLAGS)  # exits 2 on an unknown train.py flag
    if train_parser().parse_args(settings["train_args"]).resume is not None:
        own.append("resume")
    if own:
        parser.error(f"--train-args may not set --{own[0].replace('_', '-')}: ablate.py sets it for every trial")
    for config in CONFIGS:
        try:
            config_from_args(train_parser().parse_args(train_flags(settings, config, seed=0, threads=1))).validate()
        except ConfigError as error:
            parser.error(f"--train-args: {error}")


# --------------------------------------------------------------------------------------------
# Trials
# --------------------------------------------------------------------------------------------

def train_flags(settings: dict, config: str, seed: int, threads: int) -> list[str]:
    """The train.py flags of a fresh trial (a resume adds --resume to the same flags).

    The configuration's flags come after --train-args, so they win over them.
    """
    return ["--total-steps", str(settings["budget"]), "--seed", str(seed), "--threads", str(threads),
            "--eval-every", str(settings["eval_every"]), "--eval-episodes", str(settings["eval_episodes"]),
            "--checkpoint-every", str(CHECKPOINT_EVERY), *settings["train_args"], *CONFIGS[config],
            "--run-name", run_name(config, seed)]


def trial_state(study_dir: Path, run: str) -> str:
    """'finished' (final.pt exists), 'resumable' (a periodic checkpoint exists) or 'new'."""
    folder = study_dir / "checkpoints" / run
    if (folder / "final.pt").is_file():
        return "finished"
    return "resumable" if any(folder.glob("step_*.pt")) else "new"


def run_trial(params: dict, study_dir: str, flags: dict[str, list[str]]) -> None:
    """Ray Tune trainable: run one train.py trial to the end and report its exit code.

    train.py runs with this worker's Python in the study folder, so its runs/ and checkpoints/ land
    there; its output is appended to logs/<run>.log. A trial with a periodic checkpoint resumes from
    it; one without starts over, after removing logs a killed attempt may have left.
    """
    run, folder = params["run"], Path(study_dir)
    command = [sys.executable, str(TRAIN_SCRIPT), *flags[run]]
    if trial_state(folder, run) == "resumable":
        command += ["--resume", str(Path("checkpoints") / run)]
    else:
        shutil.rmtree(folder / "runs" / run, ignore_errors=True)
    log_path = folder / "logs" / f"{run}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    # A stopped trial (Ctrl-C) ends with Ray killing its worker and the worker's children: train.py
    # dies as after a crash and the next run resumes it from its last periodic checkpoint. Should the
    # worker die without that cleanup, train.py gets SIGTERM (Linux) instead of running on orphaned.
    prctl = ctypes.CDLL(None).prctl if sys.platform == "linux" else None
    with open(log_path, "a") as log:
        separator = "\n" if log.tell() else ""  # a killed attempt's progress bar ends without one
        log.write(f"{separator}=== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(command)}\n")
        log.flush()
        start = log.tell()
        exit_code = subprocess.call(command, cwd=folder, stdout=log, stderr=subprocess.STDOUT,
                                    preexec_fn=prctl and (lambda: prctl(PR_SET_PDEATHSIG, signal.SIGTERM)))
    tune.report({"exit_code": exit_code, "last_line": last_line(log_path, start)})


def last_line(path: Path, start: int = 0) -> str:
    """The last non-empty line of a file after byte `start` (a failed train.py's error message)."""
    with open(path, "rb") as handle:
        handle.seek(start)
        lines = [line.strip() for line in handle.read().decode(errors="replace").splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


class TrialProgress(tune.Callback):
    """One console line when a trial starts and when it ends (Ray's own tables are turned off)."""

    def on_trial_start(self, iteration: int, trials: list, trial, **info) -> None:
        print(f"{time.strftime('%H:%M:%S')} started  {trial.config['run']}", flush=True)

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info) -> None:
        outcome = "finished" if result["exit_code"] == 0 else f"failed (exit {result['exit_code']})"
        print(f"{time.strftime('%H:%M:%S')} {outcome} {trial.config['run']} after "
              f"{result['time_total_s']:.0f} s", flush=True)

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        print(f"{time.strftime('%H:%M:%S')} error    {trial.config['run']} (Ray could not run it)", flush=True)


def run_trials(args: argparse.Namespace, study_dir: Path, flags: dict[str, list[str]]) -> dict[str, str]:
    """Run the trials (train.py flags by run name) on Ray Tune; returns why each unfinished one did not finish."""
    if args.address:
        ray.init(address=args.address, log_to_driver=False, logging_level=logging.WARNING)
    else:
        concurrent = args.max_concurrent or max(1, available_cpus() // args.cpus_per_trial)
        ray.init(num_cpus=concurrent * args.cpus_per_trial, include_dashboard=False, log_to_driver=False,
                 logging_level=logging.WARNING)
    # Tune's classic reporter prints nothing at verbosity 0 (the new one still prints banners):
    # TrialProgress prints one line per trial instead.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    trainable = tune.with_parameters(run_trial, study_dir=str(study_dir), flags=flags)
    tuner = tune.Tuner(
        tune.with_resources(trainable, {"cpu": args.cpus_per_trial}),
        param_space={"run": tune.grid_search(list(flags))},
        tune_config=tune.TuneConfig(max_concurrent_trials=args.max_concurrent),
        run_config=tune.RunConfig(name="tune", storage_path=str(study_dir / "ray"), verbose=0,
                                  callbacks=[TrialProgress()]),
    )
    results = {result.config["run"]: result for result in tuner.fit() if result.config}  # None: never started
    return {run: unfinished_reason(results.get(run)) for run in flags if trial_state(study_dir, run) != "finished"}


def unfinished_reason(result: tune.Result | None) -> str:
    """Why a trial has no final checkpoint: train.py's exit code and last line, Ray's error, or an interruption."""
    if result is None:
        return "not started"
    if result.error is not None:
        return f"Ray error: {str(result.error).strip().splitlines()[-1]}"
    if result.metrics and "exit_code" in result.metrics:
        return f"exit {result.metrics['exit_code']}: {result.metrics['last_line']}"
    return "stopped before it ended"


def available_cpus() -> int:
    """CPUs this process may run on (respects taskset and container CPU sets where the OS tells)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------

def write_results(args: argparse.Namespace, settings: dict, study_dir: Path) -> str:
    """Aggregate the finished runs into results.md and curves.png; returns the table."""
    points = sorted(set(args.step_points or [settings["budget"] * k // 4 for k in range(1, 5)]))
    curves = load_study(study_dir)
    order = {config: i for i, config in enumerate(CONFIGS)}
    curves = {config: curves[config] for config in sorted(curves, key=lambda c: (order.get(c, len(order)), c))}
    table = markdown_table(aggregate(curves, points, args.threshold))
    (study_dir / "results.md").write_text(results_markdown(args.name, settings, table, unfinished_trials(study_dir)))
    plot_curves(curves, study_dir / "curves.png", threshold=args.threshold)
    return table


def unfinished_trials(study_dir: Path) -> dict[str, str]:
    """The last log line of each trial that was started but has no final checkpoint, by run name."""
    return {log.stem: last_line(log) for log in sorted((study_dir / "logs").glob("*.log"))
            if trial_state(study_dir, log.stem) != "finished"}


def results_markdown(name: str, settings: dict, table: str, unfinished: dict[str, str]) -> str:
    """results.md: what was run, the table, how to read it, the trials left out, the plot."""
    train_args = shlex.join(settings["train_args"]) or "(none)"
    lines = [f"# Study `{name}`", "",
             f"Each trial: {settings['budget']:,} env steps of train.py; every {settings['eval_every']} training "
             f"episodes a deterministic evaluation over {settings['eval_episodes']} episodes. "
             f"Extra train.py flags: `{train_args}`.", "", table, "", TABLE_NOTES, ""]
    if unfinished:
        lines += ["Unfinished trials, left out of the table (last line of their log):", "",
                  *(f"- `{run}`: {line}" for run, line in unfinished.items()), ""]
    return "\n".join([*lines, "![learning curves](curves.png)", ""])


def lock_study(study_dir: Path, parser: argparse.ArgumentParser) -> IO:
    """Hold an exclusive lock on the study for this process, so two drivers never run one trial twice."""
    study_dir.mkdir(parents=True, exist_ok=True)
    handle = open(study_dir / ".lock", "w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        parser.error(f"study {study_dir} is being run by another ablate.py")
    return handle


def all_trial_flags(args: argparse.Namespace, settings: dict) -> dict[str, list[str]]:
    """The train.py flags of every trial, by run name, seed-major.

    Seed-major order: every configuration's seed 0 runs before any seed 1, so a study stopped part
    way still compares all configurations on the same seeds.
    """
    return {run_name(config, seed): train_flags(settings, config, seed, args.cpus_per_trial)
            for seed in range(args.seeds) for config in args.configs}


def refuse_foreign_trials(flags: dict[str, list[str]], study_dir: Path, parser: argparse.ArgumentParser) -> None:
    """Exit 2 if a trial folder holds a run this study did not make: it is never skipped, resumed or overwritten.

    A trial's newest checkpoint must have been trained with the trial's own flags (those a resume may
    change aside).
    """
    for run, run_flags in flags.items():
        files = checkpoint_files(study_dir / "checkpoints" / run)
        if not files:
            continue
        try:
            config = SACConfig(**read_checkpoint(files[-1])["metadata"]["config"])
        except (CheckpointError, TypeError) as error:
            parser.error(f"trial folder {files[-1].parent} is not this study's {run}: {error}")
        trial_args = train_parser().parse_args(run_flags)
        foreign = sorted(changed_flags(config, trial_args, flags_given(run_flags)) - RESUME_OVERRIDABLE)
        if foreign:
            name = foreign[0]
            parser.error(f"trial folder {files[-1].parent} is not this study's {run}: it was trained with "
                         f"--{name.replace('_', '-')} {getattr(config, name)}, the study sets "
                         f"{getattr(trial_args, name)}; move it away or choose another --name")


def plan_trials(args: argparse.Namespace, settings: dict, study_dir: Path) -> dict[str, list[str]]:
    """The train.py flags of each trial still to run, by run name; prints which are finished (skipped)."""
    flags = all_trial_flags(args, settings)
    states = {run: trial_state(study_dir, run) for run in flags}
    for run, state in states.items():
        if state == "finished":
            print(f"skipped  {run}: finished (checkpoints/{run}/final.pt)")
    counts = {state: list(states.values()).count(state) for state in ("finished", "resumable", "new")}
    print(f"{len(states)} trials of {settings['budget']:,} env steps: {counts['finished']} finished, "
          f"{counts['resumable']} to resume, {counts['new']} to start", flush=True)
    return {run: run_flags for run, run_flags in flags.items() if states[run] != "finished"}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse_args(parser, sys.argv[1:] if argv is None else argv)
    study_dir = (STUDIES_DIR / args.name).resolve()
    settings = study_settings(args, study_dir, parser)
    reasons: dict[str, str] = {}
    if not args.aggregate_only:
        check_train_args(settings, parser)
        lock = lock_study(study_dir, parser)
        refuse_foreign_trials(all_trial_flags(args, settings), study_dir, parser)
        (study_dir / "study.json").write_text(json.dumps(settings, indent=2) + "\n")
        pending = plan_trials(args, settings, study_dir)
        if pending:
            reasons = run_trials(args, study_dir, pending)
        lock.close()
    print(write_results(args, settings, study_dir))
    print(f"wrote {study_dir / 'results.md'} and {study_dir / 'curves.png'}")
    for run, reason in reasons.items():
        print(f"unfinished {run}: {reason} (log: {study_dir / 'logs' / run}.log)", file=sys.stderr)
    if reasons:
        print(f"{len(reasons)} trials did not finish; the same command retries them and resumes the interrupted",
              file=sys.stderr)
    return 1 if reasons else 0


if __name__ == "__main__":
    sys.exit(main())
