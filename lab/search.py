"""Hyperparameter search for SAC on Ray Tune: Optuna proposes, ASHA stops the laggards early.

    python -m lab.search --name lunar_100k                  # 40 trials x 100k env steps x 2 seeds, local Ray
    python -m lab.search --name lunar_100k                  # again: resumes the search where it stopped
    python -m lab.search --name lunar_100k --aggregate-only # the results table of the trials so far
    python -m lab.search --name lunar_100k --address auto   # on a running Ray cluster

Run from the repository's root.

A trial is one set of hyperparameters, trained by train.py on each search seed (SEARCH_SEEDS, never
the confirmation's) at once. Its objective is the mean deterministic evaluation return over the run
(the area under the evaluation curve, `lab.tables.area_under_curve`), averaged over the seeds: it rewards
learning early as well as ending high. While the runs train, the trial reads their TensorBoard logs
and reports each new evaluation to Tune, so ASHA can stop a trial whose objective so far trails the
others at the same step. Optuna's TPE sampler proposes each new trial from the results so far; the
first trial is the current defaults, as a baseline. The components (PER, LayerNorm, clipping, StepLR)
stay on; their settings are searched.

Everything lands in studies/<name>/ (see lab.runner): trials/<trial>.json holds each trial's
hyperparameters, results.md the trials sorted by objective and the best as a train.py command line.
Re-running the same --name restores the Tune experiment (Optuna's and ASHA's state included) and
resumes interrupted trials from their runs' newest checkpoints; --budget, --trials, the evaluation
flags and --train-args are fixed by the first run.
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from plumbing import OneLineErrorParser
from sac_model import SACConfig, flag
from lab.provenance import provenance
from lab.tables import (
    Curve, CurveReader, SearchTrial, area_under_curve, format_param, load_search, load_study, run_name, search_table,
    trial_progress,
)
from lab.runner import (
    OWN_FLAGS, SEARCH_SEEDS, STUDIES_DIR, add_study_flags, check_study_args, check_train_args, common_train_flags,
    init_ray, lock_study, start_train, study_settings, tune, tune_run_config,
)

try:
    import optuna
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch
except ImportError:
    print("error: python -m lab.search needs Optuna: pip install -r requirements-study.txt", file=sys.stderr)
    sys.exit(2)

# The hyperparameters searched, by SACConfig field; the defaults (the first trial) must lie inside.
SEARCH_SPACE = {
    "lr_actor": tune.loguniform(1e-4, 3e-3),
    "lr_critic": tune.loguniform(1e-4, 3e-3),
    "lr_alpha": tune.loguniform(1e-4, 3e-3),
    "tau": tune.loguniform(1e-3, 5e-2),
    "batch_size": tune.choice([64, 128, 256, 512]),
    "hidden_size": tune.choice([128, 256, 384]),
    "grad_clip": tune.loguniform(0.3, 10.0),
    "per_alpha": tune.uniform(0.2, 0.9),
    "per_beta_start": tune.uniform(0.2, 0.9),
    "lr_step_episodes": tune.choice([25, 50, 100, 200, 400]),
    "lr_gamma": tune.uniform(0.7, 1.0),
    "update_every": tune.choice([1, 10, 50, 100]),
    "start_steps": tune.choice([1_000, 2_500, 5_000, 10_000, 20_000]),
}
# Fixed by a search's first run. Trials train their whole budget (no --target-return): the objective
# needs the whole curve.
DEFAULT_SETTINGS = {"kind": "search", "budget": 100_000, "trials": 40, "eval_every": 10, "eval_episodes": 10,
                    "target_return": "none", "train_args": []}
# ASHA: every trial runs a quarter of the budget; at each rung (1/4, 1/2 of the budget) a trial goes on
# only if its objective so far is in the better half of those recorded at that rung.
GRACE_FRACTION, REDUCTION_FACTOR = 4, 2
SAMPLER_SEED = 0  # Optuna's: the same results give the same proposals
# Hyperparameter importance: PED-ANOVA (Optuna's, no fitted model, meant for few trials) compares the
# values of the best quarter of the trials with the whole space; below MIN_TRIALS_FOR_IMPORTANCE it says nothing.
IMPORTANCE_QUANTILE, MIN_TRIALS_FOR_IMPORTANCE = 0.25, 8


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog="python -m lab.search",
                                description="Hyperparameter search for SAC on Ray Tune (Optuna + ASHA).")
    add_study_flags(parser, DEFAULT_SETTINGS)
    parser.add_argument("--trials", type=int, default=None,
                        help=f"trials in all, the budget of the search (default: {DEFAULT_SETTINGS['trials']})")
    parser.add_argument("--poll-seconds", type=float, default=10.0,
                        help="how often a trial reads its runs' evaluations and reports them (default: 10)")
    return parser


def trial_flags(settings: dict, params: dict, name: str, seed: int, threads: int) -> list[str]:
    """The train.py flags of one seed of a trial: the study's, then the trial's hyperparameters."""
    hyperparameters = [item for key, value in params.items() for item in (flag(key), str(value))]
    return [*common_train_flags(settings, seed, threads), *hyperparameters, "--run-name", run_name(name, seed)]


def search_trial(params: dict, study_dir: str, settings: dict, threads: int, poll_seconds: float) -> None:
    """Ray Tune trainable: train one hyperparameter set on every search seed at once, reporting as it goes.

    Each report carries the env step every seed has reached, the objective so far and the latest
    evaluation return; the last one adds train.py's exit code. A trial started again (a resumed
    search) resumes its runs from their checkpoints and reports from the start, which ASHA takes
    as it took it the first time.
    """
    folder, name = Path(study_dir), tune.get_context().get_trial_id()
    (folder / "trials").mkdir(parents=True, exist_ok=True)
    (folder / "trials" / f"{name}.json").write_text(json.dumps(params, indent=2) + "\n")
    processes = [start_train(folder, run_name(name, seed), trial_flags(settings, params, name, seed, threads))
                 for seed in SEARCH_SEEDS]
    readers = [CurveReader(folder / "runs" / run_name(name, seed)) for seed in SEARCH_SEEDS]

    def progress() -> tuple[int, float, float]:
        return trial_progress([Curve(seed, *reader.read()) for seed, reader in zip(SEARCH_SEEDS, readers)],
                              settings["budget"])

    # The budget's own step is reported only once the runs have exited: ASHA stops a trial that reaches
    # max_t, and stopping it while train.py still writes its final checkpoint would leave none.
    reported = 0
    while any(train.process.poll() is None for train in processes):
        time.sleep(poll_seconds)
        step, objective, latest = progress()
        if reported < step < settings["budget"] and not math.isnan(objective):
            tune.report({"step": step, "objective": objective, "eval_return": latest})
            reported = step
    outcomes = [train.wait() for train in processes]
    step, objective, latest = progress()
    failed = [line for code, line in outcomes if code != 0]
    tune.report({"step": step, "objective": objective, "eval_return": latest,
                 "exit_code": max(code for code, _ in outcomes), "last_line": failed[0] if failed else ""})


def trial_label(trial) -> str:
    return trial.trial_id


def make_tuner(args: argparse.Namespace, settings: dict, study_dir: Path) -> tune.Tuner:
    """A new Tune experiment for the search, or the study's own restored where it stopped."""
    trainable = tune.with_resources(
        tune.with_parameters(search_trial, study_dir=str(study_dir), settings=settings, threads=args.cpus_per_trial,
                             poll_seconds=args.poll_seconds),
        {"cpu": len(SEARCH_SEEDS) * args.cpus_per_trial})
    experiment = study_dir / "ray" / "tune"
    if tune.Tuner.can_restore(experiment):
        print(f"resuming the search in {experiment}", flush=True)
        return tune.Tuner.restore(str(experiment), trainable, resume_unfinished=True, resume_errored=True)
    defaults = SACConfig()
    searcher = OptunaSearch(points_to_evaluate=[{key: getattr(defaults, key) for key in SEARCH_SPACE}],
                            seed=SAMPLER_SEED)
    scheduler = ASHAScheduler(time_attr="step", max_t=settings["budget"],
                              grace_period=settings["budget"] // GRACE_FRACTION, reduction_factor=REDUCTION_FACTOR)
    return tune.Tuner(
        trainable, param_space=SEARCH_SPACE,
        tune_config=tune.TuneConfig(metric="objective", mode="max", search_alg=searcher, scheduler=scheduler,
                                    num_samples=settings["trials"], max_concurrent_trials=args.max_concurrent),
        run_config=tune_run_config(study_dir, trial_label),
    )


def best_command(params: dict) -> str:
    """The train.py command line of a trial's hyperparameters (floats to 3 significant digits)."""
    return shlex.join(["python", "train.py",
                       *(item for key, value in params.items()
                         for item in (flag(key), format_param(value)))])


def first_rung_objectives(study_dir: Path, settings: dict) -> dict[str, float]:
    """Each trial's objective over the first ASHA rung (the steps every trial trains, stopped or not), by trial.

    Left out: trials not evaluated up to the rung yet, and those with no evaluation inside it (NaN).
    """
    rung, budget = settings["budget"] // GRACE_FRACTION, settings["budget"]
    objectives = {name: float(np.mean([area_under_curve(run, budget, until=rung) for run in runs]))
                  for name, runs in load_study(study_dir, finished_only=False).items()
                  if len(runs) == len(SEARCH_SEEDS) and all(run.steps.size and run.steps[-1] >= rung for run in runs)}
    return {name: value for name, value in objectives.items() if not math.isnan(value)}


def importance_section(trials: list[SearchTrial], objectives: dict[str, float], rung: int) -> str:
    """Which hyperparameters set the better trials apart at the first rung, by Optuna's PED-ANOVA."""
    distributions = OptunaSearch.convert_search_space(SEARCH_SPACE)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize")
    for trial in trials:
        if trial.name in objectives:
            study.add_trial(optuna.trial.create_trial(
                params={key: trial.params[key] for key in distributions}, distributions=distributions,
                value=objectives[trial.name]))
    heading = (f"What mattered: importance of each hyperparameter for the objective over the first {rung:,} env "
               f"steps (the part every trial trains), {len(study.trials)} trials, by Optuna's PED-ANOVA (how "
               f"far the values of the best {IMPORTANCE_QUANTILE:.0%} of the trials lie from the whole range; "
               "the importances sum to 1). Few trials make it a rough ranking, not a measurement.")
    if len(study.trials) < MIN_TRIALS_FOR_IMPORTANCE:
        return f"{heading}\n\nNot computed: fewer than {MIN_TRIALS_FOR_IMPORTANCE} trials reached {rung:,} steps."
    evaluator = optuna.importance.PedAnovaImportanceEvaluator(target_quantile=IMPORTANCE_QUANTILE)
    importances = optuna.importance.get_param_importances(study, evaluator=evaluator)
    rows = [f"| {name} | {value:.2f} |" for name, value in importances.items()]
    return "\n".join([heading, "", "| hyperparameter | importance |", "| --- | --- |", *rows])


def write_results(name: str, settings: dict, study_dir: Path) -> str:
    """results.md: the commit and machine, the trials sorted by objective with their hyperparameters, and the
    best one's command line."""
    trials = load_search(study_dir, settings["budget"], SEARCH_SEEDS)
    complete = [trial for trial in trials if trial.complete]
    best = (f"Best complete trial: `{complete[0].name}`, objective {complete[0].objective:.1f}:\n\n"
            f"    {best_command(complete[0].params)}" if complete else "No trial has trained the whole budget yet.")
    train_args = shlex.join(settings["train_args"]) or "(none)"
    text = "\n".join([
        f"# Search `{name}`", "", provenance(), "",
        f"{len(trials)} of {settings['trials']} trials; each: train.py on seeds {', '.join(map(str, SEARCH_SEEDS))} "
        f"for {settings['budget']:,} env steps, a deterministic evaluation over {settings['eval_episodes']} episodes "
        f"every {settings['eval_every']} training episodes. Extra train.py flags: `{train_args}`.", "",
        "Objective: the mean evaluation return over the run (the curve averaged at 20 equally spaced steps), "
        "averaged over the seeds. Complete trials (the whole budget on every seed) come first; a stopped one "
        "(by ASHA, or by an interrupted search) shows its objective over the steps it reached.", "",
        search_table(trials), "", best, "",
        importance_section(trials, first_rung_objectives(study_dir, settings), settings["budget"] // GRACE_FRACTION),
        ""])
    (study_dir / "results.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    check_study_args(args, parser, positive=("trials", "poll_seconds"))
    study_dir = (STUDIES_DIR / args.name).resolve()
    settings = study_settings(args, study_dir, parser, DEFAULT_SETTINGS)
    if not args.aggregate_only:
        defaults = {key: getattr(SACConfig(), key) for key in SEARCH_SPACE}
        check_train_args(settings["train_args"], [trial_flags(settings, defaults, "check", 0, 1)], parser,
                         own=OWN_FLAGS | set(SEARCH_SPACE))
        lock = lock_study(study_dir, parser)
        (study_dir / "study.json").write_text(json.dumps(settings, indent=2) + "\n")
        init_ray(args, len(SEARCH_SEEDS) * args.cpus_per_trial)
        make_tuner(args, settings, study_dir).fit()
        lock.close()
    print(write_results(args.name, settings, study_dir))
    print(f"wrote {study_dir / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
