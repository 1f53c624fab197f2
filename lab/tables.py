"""Aggregate a study's runs into robust statistics over seeds: a Markdown table and a learning-curve plot.

The statistics follow Agarwal et al. (2021), "Deep Reinforcement Learning at the Edge of the
Statistical Precipice" (the rliable library): the interquartile mean (IQM) over runs, which ignores
a lucky and an unlucky tail, with a 95% percentile-bootstrap confidence interval over runs.

A study folder (written by `lab.ablate` or `lab.search`) holds `runs/<config>__seed<k>/` (TensorBoard
logs of train.py) and `checkpoints/<config>__seed<k>/`. An ablation aggregates only finished runs
(with `final.pt`): an unfinished run's latest evaluation would otherwise stand in for steps it never
trained. A search also lists the trials its scheduler stopped early, marked as such.

Evaluations happen at episode ends, so their steps differ between seeds. The value of a run at step
s is its latest evaluation at or before s (no interpolation: never a number the run did not
produce, and never one from its future).

This module needs numpy, tensorboard and matplotlib only, not Ray.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from numpy.typing import ArrayLike
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from plumbing import CHECKPOINTS_DIR, final_checkpoint
from sac_model import Tag

AUC_POINTS = 20  # equally spaced env steps at which a search's objective averages the evaluation curve
SEED_SEPARATOR = "__seed"
BOOTSTRAP_RESAMPLES = 10_000
TABLE_NOTES = """\
Each return cell: interquartile mean (IQM) over seeds [95% percentile-bootstrap confidence interval]
of the deterministic evaluation return (`eval/return_mean`), each seed contributing its latest
evaluation at or before that env step ("-": a seed had not been evaluated yet). Steps to threshold:
IQM over seeds of the first evaluation step whose return reached the threshold, a seed that never
reached it counting as infinite ("not reached" when the IQM is infinite). Only finished runs count."""
CONFIRMATION_NOTES = """\
Confirmation table: from each run's target checks, the deterministic evaluations over
`--target-episodes` (100) episodes that train.py runs when a periodic evaluation reaches the target
return, and once more on a final agent that did not reach it. Env steps to reach the threshold: the
first check at or above it, a seed that never got there counting as infinite; the final agent's
return: the last check (a run that passes one stops there). Median and IQM [95% percentile-bootstrap
CI, without interpolation] over seeds."""

FINAL_CHECK_NOTES = """\
Final-agent table: each finished run's final agent (`final.pt`) evaluated deterministically over
the same episodes train.py's 100-episode target check uses (seeds `seed + 2,000,000` onwards, never
seen in training or in the periodic evaluations), so its numbers compare with a confirmation's
final agents. Per seed the mean return; the median and the IQM [95% percentile-bootstrap CI] over
seeds; the seeds whose mean reached the threshold (solved at the end of the budget) and the
episodes below 0 (a crash, or a hover until the time limit) out of all."""


class Curve(NamedTuple):
    """The evaluation returns of one run, in step order."""

    seed: int
    steps: np.ndarray
    returns: np.ndarray


class Estimate(NamedTuple):
    """A statistic over seeds with its confidence interval (all NaN when undefined)."""

    value: float
    low: float
    high: float


@dataclass
class Row:
    """One configuration's line of the results table."""

    config: str
    seeds: int
    returns: dict[int, Estimate]  # step point -> IQM of the evaluation return over seeds
    threshold: float
    steps_to_threshold: float  # IQM over seeds; a seed that never reaches the threshold counts as inf
    reached: int  # seeds that reached the threshold


# --------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------

def interquartile_mean(values: ArrayLike, axis: int = -1) -> np.ndarray | float:
    """Mean of the middle half of the values along `axis`.

    Exactly rliable's IQM, `scipy.stats.trim_mean(values, 0.25)`: floor(n / 4) values are cut
    from each end, so 8 values keep the middle 4, 5 values the middle 3 and 2 or 3 values all.
    """
    ordered = np.sort(np.asarray(values, dtype=np.float64), axis=axis)
    n = ordered.shape[axis]
    if n == 0:
        raise ValueError("interquartile_mean of an empty sample")
    cut = n // 4
    return np.take(ordered, np.arange(cut, n - cut), axis=axis).mean(axis=axis)


def bootstrap_ci(values: ArrayLike, statistic: Callable[..., np.ndarray], confidence: float = 0.95,
                 n_resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0, method: str = "linear") -> tuple[float, float]:
    """Percentile-bootstrap confidence interval of `statistic` over a 1-D sample of runs.

    Draws `n_resamples` samples of the same size with replacement, applies `statistic(x, axis=-1)`
    to all at once (np.mean, np.median and `interquartile_mean` all take `axis`), and returns the
    (1 - confidence) / 2 and (1 + confidence) / 2 quantiles (linear interpolation) of the results.
    The same seed gives the same interval. `method` is np.quantile's: "inverted_cdf" never
    interpolates, which keeps the interval defined when some statistics are infinite.
    """
    sample = np.asarray(values, dtype=np.float64).reshape(-1)
    if sample.size == 0:
        raise ValueError("bootstrap_ci of an empty sample")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    rng = np.random.default_rng(seed)
    resamples = sample[rng.integers(0, sample.size, size=(n_resamples, sample.size))]
    statistics = statistic(resamples, axis=-1)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(statistics, [tail, 1.0 - tail], method=method)
    return float(low), float(high)


def steps_to_threshold(steps: ArrayLike, returns: ArrayLike, threshold: float = 200.0) -> int | None:
    """The first evaluation step whose return is at least `threshold`; None if none is."""
    reached = np.flatnonzero(np.asarray(returns, dtype=np.float64) >= threshold)
    return int(np.asarray(steps)[reached[0]]) if reached.size else None


def estimate(values: ArrayLike, confidence: float = 0.95, method: str = "linear") -> Estimate:
    """IQM of one value per seed with its bootstrap CI; all NaN if any seed has no value (NaN)."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0 or np.isnan(values).any():
        return Estimate(math.nan, math.nan, math.nan)
    return Estimate(float(interquartile_mean(values)),
                    *bootstrap_ci(values, interquartile_mean, confidence, method=method))


def area_under_curve(run: Curve, budget: int, until: int | None = None) -> float:
    """A search's objective for one run: the mean evaluation return over the run.

    The curve (latest evaluation at or before each step) averaged at AUC_POINTS equally spaced steps
    of the budget, those up to `until` (default: all); points before the first evaluation are left
    out, NaN if all are. Equal spacing weighs every stretch of training alike, however often it was
    evaluated (evaluations follow episodes, which are short while the lander crashes).
    """
    grid = budget * np.arange(1, AUC_POINTS + 1) // AUC_POINTS
    values = values_at([run], grid[grid <= (budget if until is None else until)])[0]
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else math.nan


# --------------------------------------------------------------------------------------------
# Reading a study
# --------------------------------------------------------------------------------------------

def run_name(config: str, seed: int) -> str:
    """The run folder name of one trial: `<config>__seed<k>`."""
    return f"{config}{SEED_SEPARATOR}{seed}"


def parse_run_name(name: str) -> tuple[str, int] | None:
    """(config, seed) of a run folder name, or None for a folder that is not a trial."""
    config, separator, seed = name.rpartition(SEED_SEPARATOR)
    return (config, int(seed)) if separator and config and seed.isdigit() else None


class CurveReader:
    """One scalar's steps and values in a TensorBoard run folder, read again as train.py goes on writing.

    All event files of the folder are read (a resumed run adds one per session, and events its
    interrupted predecessor logged after the checkpoint are purged); if a step appears twice, the
    later value wins. Each read parses only the events written since the previous one.
    """

    def __init__(self, run_dir: str | Path, tag: str = Tag.EVAL_MEAN) -> None:
        self.run_dir, self.tag = Path(run_dir), tag
        self.accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})  # 0: keep every event

    def read(self) -> tuple[np.ndarray, np.ndarray]:
        """The steps (ascending) and values logged so far; empty arrays if there are none (or no folder yet)."""
        if not self.run_dir.is_dir():
            return np.zeros(0, dtype=np.int64), np.zeros(0)
        tb_logger = logging.getLogger("tensorboard")
        level = tb_logger.level
        tb_logger.setLevel(logging.ERROR)  # a resumed run's purge of stale events is expected: no warning
        try:
            self.accumulator.Reload()
        finally:
            tb_logger.setLevel(level)
        if self.tag not in self.accumulator.Tags()["scalars"]:
            return np.zeros(0, dtype=np.int64), np.zeros(0)
        by_step = {event.step: event.value for event in self.accumulator.Scalars(self.tag)}
        steps = np.array(sorted(by_step), dtype=np.int64)
        return steps, np.array([by_step[step] for step in steps], dtype=np.float64)


def load_eval_curve(run_dir: str | Path, tag: str = Tag.EVAL_MEAN) -> tuple[np.ndarray, np.ndarray]:
    """Steps and values of `tag` (the evaluation return) in a TensorBoard run folder (empty if it has none)."""
    return CurveReader(run_dir, tag).read()


def load_study(study_dir: str | Path, tag: str = Tag.EVAL_MEAN, finished_only: bool = True) -> dict[str, list[Curve]]:
    """The curves of `tag` of a study's runs (only the finished ones by default), by configuration (sorted) and seed."""
    study_dir = Path(study_dir)
    curves: dict[str, list[Curve]] = {}
    for run_dir in sorted((study_dir / "runs").glob("*/")):
        trial = parse_run_name(run_dir.name)
        finished = final_checkpoint(study_dir / CHECKPOINTS_DIR / run_dir.name).is_file()
        if trial is None or (finished_only and not finished):
            continue
        curves.setdefault(trial[0], []).append(Curve(trial[1], *load_eval_curve(run_dir, tag)))
    return {config: sorted(runs) for config, runs in sorted(curves.items())}


def values_at(runs: list[Curve], steps: ArrayLike) -> np.ndarray:
    """(seeds, steps) array: each run's latest evaluation at or before each step, NaN before its first."""
    steps = np.asarray(steps)
    table = np.full((len(runs), steps.size), np.nan)
    for row, run in zip(table, runs):
        latest = np.searchsorted(run.steps, steps, side="right") - 1
        row[latest >= 0] = run.returns[latest[latest >= 0]]
    return table


# --------------------------------------------------------------------------------------------
# Table and plot
# --------------------------------------------------------------------------------------------

def aggregate(curves: dict[str, list[Curve]], step_points: list[int], threshold: float = 200.0,
              confidence: float = 0.95) -> list[Row]:
    """One table row per configuration: IQM and CI of the return at each step point, steps to threshold."""
    rows = []
    for config, runs in curves.items():
        at_points = values_at(runs, step_points)
        first = [steps_to_threshold(run.steps, run.returns, threshold) for run in runs]
        rows.append(Row(
            config=config, seeds=len(runs), threshold=threshold,
            returns={point: estimate(at_points[:, i], confidence) for i, point in enumerate(step_points)},
            steps_to_threshold=float(interquartile_mean([math.inf if s is None else s for s in first])),
            reached=sum(s is not None for s in first),
        ))
    return rows


def format_steps(steps: int) -> str:
    """50000 -> '50k'; steps that are not whole thousands stay as they are."""
    return f"{steps // 1000}k" if steps >= 1000 and steps % 1000 == 0 else str(steps)


def markdown_table(rows: list[Row]) -> str:
    """The rows as a Markdown table: configuration, seeds, the return at each step point, steps to threshold."""
    if not rows:
        return "(no finished runs)"
    points, threshold = list(rows[0].returns), rows[0].threshold
    header = ["configuration", "seeds", *(f"return @ {format_steps(p)}" for p in points),
              f"steps to {threshold:g}", f"reached {threshold:g}"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for row in rows:
        cells = [row.config, str(row.seeds), *(format_estimate(row.returns[p]) for p in points),
                 "not reached" if math.isinf(row.steps_to_threshold) else f"{row.steps_to_threshold:,.0f}",
                 f"{row.reached}/{row.seeds}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_estimate(value: Estimate, fmt: Callable[[float], str] = "{:.1f}".format) -> str:
    return "-" if math.isnan(value.value) else f"{fmt(value.value)} [{fmt(value.low)}, {fmt(value.high)}]"


def format_step_count(steps: float) -> str:
    """Env steps with thousands separators; infinite (a seed that never got there) is 'not reached'."""
    return "not reached" if math.isinf(steps) else f"{steps:,.0f}"


def confirmation_table(checks: dict[str, list[Curve]], threshold: float = 200.0, confidence: float = 0.95) -> str:
    """Markdown table of a confirmation, from each run's target checks (train.py's 100-episode evaluations).

    Per configuration: each seed's env steps until a check first reached `threshold` (a seed that never
    did counts as infinite) and its final agent's check (the last one: a run ends at its passing check
    or checks its final agent); the median and the IQM [bootstrap CI] over seeds of both.
    """
    header = ["configuration", "seeds", f"reached {threshold:g}", "env steps to reach it, by seed", "median",
              f"IQM [{confidence:.0%} CI]", "final agent's 100-episode return, by seed", "median",
              f"IQM [{confidence:.0%} CI]"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for config, runs in checks.items():
        first = [steps_to_threshold(run.steps, run.returns, threshold) for run in runs]
        steps = np.array([math.inf if s is None else s for s in first], dtype=np.float64)
        final = np.array([run.returns[-1] if run.returns.size else math.nan for run in runs])
        cells = [config, str(len(runs)), f"{sum(s is not None for s in first)}/{len(runs)}",
                 " / ".join(format_step_count(s) for s in steps), format_step_count(float(np.median(steps))),
                 format_estimate(estimate(steps, confidence, method="inverted_cdf"), format_step_count),
                 " / ".join(f"{r:.1f}" for r in final), f"{np.median(final):.1f}",
                 format_estimate(estimate(final, confidence))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def final_check_table(returns: dict[str, list[ArrayLike]], threshold: float = 200.0, confidence: float = 0.95) -> str:
    """Markdown table of final agents' evaluations: per configuration, one array of episode returns per seed."""
    episodes = {len(np.asarray(run)) for runs in returns.values() for run in runs}
    count = str(episodes.pop()) if len(episodes) == 1 else "N"
    header = ["configuration", "seeds", f"final agent's {count}-episode return, by seed", "median",
              f"IQM [{confidence:.0%} CI]", f"seeds >= {threshold:g}", "episodes < 0"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for config, runs in returns.items():
        means = np.array([np.mean(run) for run in runs])
        below = sum(int(np.sum(np.asarray(run) < 0)) for run in runs)
        cells = [config, str(len(runs)), " / ".join(f"{m:.1f}" for m in means), f"{np.median(means):.1f}",
                 format_estimate(estimate(means, confidence)), f"{int(np.sum(means >= threshold))}/{len(runs)}",
                 f"{below}/{sum(len(run) for run in runs)}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Search trials
# --------------------------------------------------------------------------------------------

@dataclass
class SearchTrial:
    """One trial of a hyperparameter search: its hyperparameters and how far and how well its seeds got."""

    name: str
    params: dict
    steps: int  # the latest env step every seed has been evaluated at
    objective: float  # mean over seeds of the area under the evaluation curve up to `steps`
    final_return: float  # mean over seeds of the evaluation return at `steps`
    complete: bool  # every seed trained the whole budget; else the scheduler stopped it or it is unfinished


def trial_progress(runs: list[Curve], budget: int) -> tuple[int, float, float]:
    """(env step, objective, mean evaluation return) at the latest step every seed has been evaluated at.

    The objective is the mean over seeds of `area_under_curve` up to that step: what the search
    maximizes, and what its scheduler compares between trials that got as far. (0, NaN, NaN) while
    a seed has no evaluation.
    """
    if not runs or any(run.steps.size == 0 for run in runs):
        return 0, math.nan, math.nan
    step = int(min(run.steps[-1] for run in runs))
    objective = float(np.mean([area_under_curve(run, budget, until=step) for run in runs]))
    return step, objective, float(np.mean(values_at(runs, [step])))


def load_search(study_dir: str | Path, budget: int, seeds: tuple[int, ...]) -> list[SearchTrial]:
    """Every trial of a search folder (trials/<name>.json holds its hyperparameters), best first.

    Trials that trained the whole budget on every seed come first, by objective; then those stopped
    early (their objective covers only the steps they reached, so it does not compare with the others).
    """
    study_dir = Path(study_dir)
    curves = load_study(study_dir, finished_only=False)
    trials = []
    for params_file in sorted((study_dir / "trials").glob("*.json")):
        name, runs = params_file.stem, curves.get(params_file.stem, [])
        step, objective, final_return = trial_progress(runs, budget)
        complete = [run.seed for run in runs] == sorted(seeds) and all(
            final_checkpoint(study_dir / CHECKPOINTS_DIR / run_name(name, seed)).is_file() for seed in seeds)
        trials.append(SearchTrial(name, json.loads(params_file.read_text()), step, objective, final_return, complete))
    return sorted(trials, key=lambda t: (t.complete, -math.inf if math.isnan(t.objective) else t.objective),
                  reverse=True)


def format_param(value: float | int | str) -> str:
    """A hyperparameter as the table and the command line show it: floats to 3 significant digits."""
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def search_table(trials: list[SearchTrial]) -> str:
    """The trials as a Markdown table, best first, with their hyperparameters."""
    if not trials:
        return "(no trials)"
    names = list(trials[0].params)
    header = ["rank", "trial", "objective", "return at the end", "env steps", "status", *names]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for rank, trial in enumerate(trials, 1):
        status = "complete" if trial.complete else "stopped"  # by the scheduler, or the search was interrupted
        cells = [str(rank), trial.name, f"{trial.objective:.1f}", f"{trial.final_return:.1f}", f"{trial.steps:,}",
                 status, *(format_param(trial.params.get(name, "-")) for name in names)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def seeds_count(count: int) -> str:
    """"1 seed", "3 seeds": the count of runs behind a figure, as a legend says it."""
    return f"{count} seed" + ("" if count == 1 else "s")


def plot_curves(curves: dict[str, list[Curve]], path: str | Path, threshold: float | None = None,
                confidence: float = 0.95) -> Path:
    """PNG of each configuration's IQM evaluation return over seeds vs env steps, with its CI band.

    Drawn as a step function that changes at each evaluation of any seed: between evaluations every
    seed keeps its latest value. A curve starts once every seed has been evaluated.
    """
    figure = Figure(figsize=(8, 4.5), dpi=110)
    axes = figure.subplots()
    draw_curves(axes, curves, threshold, confidence)
    axes.set(title=f"deterministic evaluation return: IQM over seeds, {confidence:.0%} bootstrap CI")
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path


def draw_curves(axes: Axes, curves: dict[str, list[Curve]], threshold: float | None = None,
                confidence: float = 0.95, colors: dict[str, str] | None = None) -> None:
    """Each configuration's IQM evaluation return over seeds vs env steps, with its CI band, on `axes` (in its
    colour from `colors`, else the next of matplotlib's cycle)."""
    for config, runs in curves.items():
        if not runs or any(run.steps.size == 0 for run in runs):
            continue
        steps = np.unique(np.concatenate([run.steps for run in runs]))
        steps = steps[steps >= max(run.steps[0] for run in runs)]
        estimates = np.array([estimate(column, confidence) for column in values_at(runs, steps).T])
        line, = axes.plot(steps, estimates[:, 0], drawstyle="steps-post", label=f"{config} ({seeds_count(len(runs))})",
                          color=(colors or {}).get(config))
        axes.fill_between(steps, estimates[:, 1], estimates[:, 2], step="post", color=line.get_color(), alpha=0.2,
                          linewidth=0)
    if threshold is not None:
        axes.axhline(threshold, color="gray", linestyle="--", linewidth=0.8, label=f"{threshold:g}")
    axes.set(xlabel="env steps", ylabel="evaluation return (IQM over seeds)")
    axes.grid(alpha=0.3)
    if axes.get_legend_handles_labels()[0]:
        axes.legend(loc="best", fontsize=8)
