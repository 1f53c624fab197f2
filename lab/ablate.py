"""Ablation study of SAC's claimed improvements on Ray Tune: configurations x seeds of train.py.

    python -m lab.ablate                                   # 5 configurations x 5 seeds x 200k env steps
    python -m lab.ablate --name quick --budget 50000 --seeds 3 --configs full,with_per
    python -m lab.ablate --address auto                    # on a running Ray cluster
    python -m lab.ablate --name quick --aggregate-only     # table and plot of the finished runs so far
    python -m lab.ablate --name quick --aggregate-only --final-episodes 100   # and the final agents over 100 episodes
    python -m lab.ablate --name confirm --configs full --budget 100000 --target-return auto   # a confirmation

Run from the repository's root. The study folder, its resumption and Ray are lab.runner's (shared with
lab.search); the statistics and tables lab.tables'. The results:
results.md (IQM and 95% bootstrap CI table) and curves.png, plus, when the trials stop at a
--target-return, the confirmation table of their 100-episode target checks, and with
--final-episodes N the table of every final agent evaluated over N episodes. Re-running the same
--name skips finished trials and resumes unfinished ones from their newest checkpoint; --budget,
the evaluation flags, --target-return and --train-args are fixed by a study's first run, --seeds
and --configs may grow.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shlex
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from plumbing import CHECKPOINTS_DIR, FINAL_CHECKPOINT, OneLineErrorParser, fail, final_checkpoint, run_state
from sac_model import SACConfig, SACError, Tag, env_threshold, evaluate_final_agent
from lab.configs import CONFIGS, VARIANTS
from lab.provenance import provenance
from lab.tables import (
    CONFIRMATION_NOTES, FINAL_CHECK_NOTES, TABLE_NOTES, aggregate, confirmation_table,
    final_check_table, load_study, markdown_table, parse_run_name, plot_curves, run_name,
)
from lab.runner import (
    CONFIRMATION_SEEDS, SEARCH_SEEDS, STUDIES_DIR, add_study_flags, check_study_args, check_train_args,
    common_train_flags, init_ray, lock_study, refuse_foreign_trials, start_train, study_settings, tune,
    tune_run_config, unfinished_runs,
)

# The settings that make a study's numbers comparable: fixed when the study is first run. The trials
# train their whole budget unless --target-return says otherwise (a confirmation).
DEFAULT_SETTINGS = {"kind": "ablation", "budget": 200_000, "eval_every": 10, "eval_episodes": 10,
                    "target_return": "none", "train_args": []}
FINAL_CHECKS_FILE = "final_checks.json"  # in the study folder: the final agents' evaluations, kept across re-runs


# --------------------------------------------------------------------------------------------
# Flags and settings
# --------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog="python -m lab.ablate",
                                description="Ablation study of SAC on Ray Tune: configurations x seeds of train.py.")
    add_study_flags(parser, DEFAULT_SETTINGS)
    parser.add_argument("--seeds", type=int, default=len(CONFIRMATION_SEEDS),
                        help=f"N seeds per configuration: --first-seed .. --first-seed + N - 1, all below "
                             f"{min(SEARCH_SEEDS)}: the search's seeds are never used here (default: "
                             f"{len(CONFIRMATION_SEEDS)})")
    parser.add_argument("--first-seed", type=int, default=0,
                        help="the first seed (default: 0); e.g. 5 for seeds that an earlier confirmation on 0-4 "
                             "has not seen")
    parser.add_argument("--configs", default=",".join(CONFIGS),
                        help=f"comma-separated subset of {', '.join(CONFIGS)} (default: all), or of the "
                             f"variants {', '.join(VARIANTS)}")
    parser.add_argument("--target-return", default=None,
                        help="train.py's --target-return for every trial: a trial that reaches it stops, and the "
                             "results add the confirmation table (default: none, every trial trains its budget)")
    parser.add_argument("--step-points", default=None,
                        help="comma-separated env steps of the table (default: 1/4, 1/2, 3/4 and all of the budget)")
    parser.add_argument("--threshold", type=float, default=None,
                        help="return whose first reaching is timed (default: the study's env's registered solved "
                             "threshold, 200 on LunarLander)")
    parser.add_argument("--final-episodes", type=int, default=0,
                        help="also evaluate every finished run's final agent over N deterministic episodes on "
                             "train.py's target-check seeds and add their table; kept in final_checks.json, so a "
                             "re-run evaluates only new runs (default: 0, none)")
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse and check the flags; any problem is one line on stderr and exit code 2."""
    args = parser.parse_args(argv)
    check_study_args(args, parser, positive=("seeds",))
    if args.first_seed < 0:
        parser.error(f"--first-seed must be >= 0, got {args.first_seed}")
    if args.final_episodes < 0:
        parser.error(f"--final-episodes must be >= 0, got {args.final_episodes}")
    if args.first_seed + args.seeds > min(SEARCH_SEEDS):
        parser.error(f"seeds {args.first_seed} .. {args.first_seed + args.seeds - 1} would reuse the search's seeds "
                     f"{SEARCH_SEEDS}: all must lie below {min(SEARCH_SEEDS)}")
    args.configs = [name.strip() for name in args.configs.split(",") if name.strip()]
    unknown = [name for name in args.configs if name not in CONFIGS | VARIANTS]
    if unknown or not args.configs:
        parser.error(f"--configs: unknown configuration {unknown[0] if unknown else '(none)'!r}; "
                     f"choose from {', '.join(CONFIGS | VARIANTS)}")
    try:
        args.step_points = None if args.step_points is None else [int(p) for p in args.step_points.split(",")]
    except ValueError as error:
        parser.error(f"--step-points: {error}")
    if args.step_points is not None and min(args.step_points) <= 0:
        parser.error("--step-points must be positive env steps")
    return args


def ablation_settings(args: argparse.Namespace, study_dir: Path, parser: argparse.ArgumentParser) -> dict:
    """The study's fixed settings (see lab.runner.study_settings), checked against the table's step points."""
    settings = study_settings(args, study_dir, parser, DEFAULT_SETTINGS)
    if max(args.step_points or [0]) > settings["budget"]:
        parser.error(f"--step-points go beyond the budget of {settings['budget']} env steps")
    return settings


# --------------------------------------------------------------------------------------------
# Trials
# --------------------------------------------------------------------------------------------

def train_flags(settings: dict, config: str, seed: int, threads: int) -> list[str]:
    """The train.py flags of a fresh trial (a resume adds --resume to the same flags).

    The configuration's flags come after --train-args, so they win over them.
    """
    return [*common_train_flags(settings, seed, threads), *(CONFIGS | VARIANTS)[config], "--run-name",
            run_name(config, seed)]


def run_trial(params: dict, study_dir: str, flags: dict[str, list[str]]) -> None:
    """Ray Tune trainable: run one train.py trial to the end and report its exit code and last line."""
    exit_code, line = start_train(Path(study_dir), params["run"], flags[params["run"]]).wait()
    tune.report({"exit_code": exit_code, "last_line": line})


def run_trials(args: argparse.Namespace, study_dir: Path, flags: dict[str, list[str]]) -> dict[str, str]:
    """Run the trials (train.py flags by run name) on Ray Tune; returns why each unfinished one did not finish."""
    init_ray(args, args.cpus_per_trial)
    trainable = tune.with_parameters(run_trial, study_dir=str(study_dir), flags=flags)
    tuner = tune.Tuner(
        tune.with_resources(trainable, {"cpu": args.cpus_per_trial}),
        param_space={"run": tune.grid_search(list(flags))},
        tune_config=tune.TuneConfig(max_concurrent_trials=args.max_concurrent),
        run_config=tune_run_config(study_dir, label=lambda trial: trial.config["run"]),
    )
    results = {result.config["run"]: result for result in tuner.fit() if result.config}  # None: never started
    return {run: unfinished_reason(results.get(run)) for run in flags
            if run_state(study_dir / CHECKPOINTS_DIR / run) != "finished"}


def unfinished_reason(result: tune.Result | None) -> str:
    """Why a trial has no final checkpoint: train.py's exit code and last line, Ray's error, or an interruption."""
    if result is None:
        return "not started"
    if result.error is not None:
        return f"Ray error: {str(result.error).strip().splitlines()[-1]}"
    if result.metrics and "exit_code" in result.metrics:
        return f"exit {result.metrics['exit_code']}: {result.metrics['last_line']}"
    return "stopped before it ended"


def all_trial_flags(args: argparse.Namespace, settings: dict) -> dict[str, list[str]]:
    """The train.py flags of every trial, by run name, seed-major.

    Seed-major order: every configuration's seed 0 runs before any seed 1, so a study stopped part
    way still compares all configurations on the same seeds.
    """
    return {run_name(config, seed): train_flags(settings, config, seed, args.cpus_per_trial)
            for seed in range(args.first_seed, args.first_seed + args.seeds) for config in args.configs}


def plan_trials(args: argparse.Namespace, settings: dict, study_dir: Path) -> dict[str, list[str]]:
    """The train.py flags of each trial still to run, by run name; prints which are finished (skipped)."""
    flags = all_trial_flags(args, settings)
    states = {run: run_state(study_dir / CHECKPOINTS_DIR / run) for run in flags}
    for run, state in states.items():
        if state == "finished":
            print(f"skipped  {run}: finished ({final_checkpoint(CHECKPOINTS_DIR / run)})")
    counts = {state: list(states.values()).count(state) for state in ("finished", "resumable", "new")}
    print(f"{len(states)} trials of {settings['budget']:,} env steps: {counts['finished']} finished, "
          f"{counts['resumable']} to resume, {counts['new']} to start", flush=True)
    return {run: run_flags for run, run_flags in flags.items() if states[run] != "finished"}


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------

def write_results(args: argparse.Namespace, settings: dict, study_dir: Path) -> str:
    """Aggregate the finished runs into results.md and curves.png; returns the table(s)."""
    points = sorted(set(args.step_points or [settings["budget"] * k // 4 for k in range(1, 5)]))
    curves = load_study(study_dir)
    order = {config: i for i, config in enumerate(CONFIGS | VARIANTS)}
    curves = {config: curves[config] for config in sorted(curves, key=lambda c: (order.get(c, len(order)), c))}
    threshold = study_threshold(args, settings)
    table, notes = markdown_table(aggregate(curves, points, threshold)), TABLE_NOTES
    if settings["target_return"] != "none":
        table += "\n\n" + confirmation_table(load_study(study_dir, tag=Tag.CHECK_MEAN), threshold)
        notes += "\n\n" + CONFIRMATION_NOTES
    if args.final_episodes:
        returns = final_agent_returns(study_dir, args.final_episodes, args.max_concurrent or os.cpu_count() or 1)
        by_config: dict[str, list[list[float]]] = {config: [] for config in curves}
        for run in sorted(returns, key=lambda run: parse_run_name(run)[1]):  # seed order within a configuration
            by_config.setdefault(parse_run_name(run)[0], []).append(returns[run])
        table += "\n\n" + final_check_table(by_config, threshold)
        notes += "\n\n" + FINAL_CHECK_NOTES
    (study_dir / "results.md").write_text(
        results_markdown(args.name, settings, table, notes, unfinished_runs(study_dir)))
    plot_curves(curves, study_dir / "curves.png", threshold=threshold)
    return table


def study_env(settings: dict) -> str:
    """The env the study's trials train: --env in its --train-args, else the default env."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--env", default=SACConfig().env)
    return parser.parse_known_args(settings["train_args"])[0].env


def study_threshold(args: argparse.Namespace, settings: dict) -> float:
    """The return whose first reaching the tables time: --threshold, else the study's env's registered solved
    threshold. Raises SACError for an env that registers none, before any trial runs."""
    if args.threshold is not None:
        return args.threshold
    env = study_env(settings)
    threshold = env_threshold(env)
    if threshold is None:
        raise SACError(f"{env} registers no solved threshold: give --threshold R, the return whose first reaching "
                       "the tables time")
    return threshold


def final_agent_returns(study_dir: Path, episodes: int, workers: int) -> dict[str, list[float]]:
    """Every finished run's final agent over `episodes` deterministic episodes (sac_model.evaluate_final_agent).

    Kept in final_checks.json with the checkpoint's modification time: a re-run evaluates only the
    runs finished since, or all of them when `episodes` changed.
    """
    path = study_dir / FINAL_CHECKS_FILE
    known = json.loads(path.read_text()) if path.is_file() else {}
    finals = {final.parent.name: final for final in sorted((study_dir / CHECKPOINTS_DIR).glob(f"*/{FINAL_CHECKPOINT}"))
              if parse_run_name(final.parent.name)}
    stamp = {run: final.stat().st_mtime_ns for run, final in finals.items()}
    todo = [run for run in finals
            if known.get(run, {}).get("checkpoint_mtime_ns") != stamp[run] or len(known[run]["returns"]) != episodes]
    if todo:
        print(f"evaluating {len(todo)} final agents over {episodes} episodes each", flush=True)
        # spawn, not fork: the parent may hold Ray's threads; each worker evaluates on one torch thread.
        with ProcessPoolExecutor(min(workers, len(todo)), mp_context=multiprocessing.get_context("spawn"),
                                 initializer=torch.set_num_threads, initargs=(1,)) as pool:
            for run, returns in zip(todo, pool.map(evaluate_final_agent, [finals[run] for run in todo],
                                                   [episodes] * len(todo))):
                known[run] = {"checkpoint_mtime_ns": stamp[run], "returns": returns}
                path.with_suffix(".tmp").write_text(json.dumps(known, indent=1) + "\n")
                path.with_suffix(".tmp").replace(path)  # an interrupted write never leaves half a file
                print(f"final agent {run}: {sum(returns) / len(returns):.1f} over {episodes} episodes", flush=True)
    return {run: known[run]["returns"] for run in finals}


def results_markdown(name: str, settings: dict, table: str, notes: str, unfinished: dict[str, str]) -> str:
    """results.md: the commit and machine, what was run, the table(s), how to read them, the trials left out,
    the plot."""
    train_args = shlex.join(settings["train_args"]) or "(none)"
    lines = [f"# Study `{name}`", "", provenance(), "",
             f"Each trial: {settings['budget']:,} env steps of train.py; every {settings['eval_every']} training "
             f"episodes a deterministic evaluation over {settings['eval_episodes']} episodes; --target-return "
             f"{settings['target_return']}. Extra train.py flags: `{train_args}`.", "", table, "", notes, ""]
    if unfinished:
        lines += ["Unfinished trials, left out of the table (last line of their log):", "",
                  *(f"- `{run}`: {line}" for run, line in unfinished.items()), ""]
    return "\n".join([*lines, "![learning curves](curves.png)", ""])


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse_args(parser, sys.argv[1:] if argv is None else argv)
    study_dir = (STUDIES_DIR / args.name).resolve()
    settings = ablation_settings(args, study_dir, parser)
    try:
        study_threshold(args, settings)
    except SACError as error:
        parser.error(str(error))
    reasons: dict[str, str] = {}
    if not args.aggregate_only:
        check_train_args(settings["train_args"],
                         [train_flags(settings, config, seed=0, threads=1) for config in CONFIGS | VARIANTS], parser)
        lock = lock_study(study_dir, parser)
        refuse_foreign_trials(all_trial_flags(args, settings), study_dir, parser)
        (study_dir / "study.json").write_text(json.dumps(settings, indent=2) + "\n")
        pending = plan_trials(args, settings, study_dir)
        if pending:
            reasons = run_trials(args, study_dir, pending)
        lock.close()
    try:
        print(write_results(args, settings, study_dir))
    except SACError as error:  # a final.pt that is not this repository's agent, under --final-episodes
        fail(str(error))
    print(f"wrote {study_dir / 'results.md'} and {study_dir / 'curves.png'}")
    for run, reason in reasons.items():
        print(f"unfinished {run}: {reason} (log: {study_dir / 'logs' / run}.log)", file=sys.stderr)
    if reasons:
        print(f"{len(reasons)} trials did not finish; the same command retries them and resumes the interrupted",
              file=sys.stderr)
    return 1 if reasons else 0


if __name__ == "__main__":
    sys.exit(main())
