"""Aggregate a study's runs into robust statistics over seeds: a Markdown table and a learning-curve plot.

The statistics follow Agarwal et al. (2021), "Deep Reinforcement Learning at the Edge of the
Statistical Precipice" (the rliable library): the interquartile mean (IQM) over runs, which ignores
a lucky and an unlucky tail, with a 95% percentile-bootstrap confidence interval over runs.

A study folder (written by `ablate.py`) holds `runs/<config>__seed<k>/` (TensorBoard logs of
train.py) and `checkpoints/<config>__seed<k>/`. Only finished runs (with `final.pt`) are aggregated:
an unfinished run's latest evaluation would otherwise stand in for steps it never trained.

Evaluations happen at episode ends, so their steps differ between seeds. The value of a run at step
s is its latest evaluation at or before s (no interpolation: never a number the run did not
produce, and never one from its future).

This module needs numpy, tensorboard and matplotlib only, not Ray.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
from matplotlib.figure import Figure
from numpy.typing import ArrayLike
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

EVAL_TAG = "eval/return_mean"
SEED_SEPARATOR = "__seed"
BOOTSTRAP_RESAMPLES = 10_000
TABLE_NOTES = """\
Each return cell: interquartile mean (IQM) over seeds [95% percentile-bootstrap confidence interval]
of the deterministic evaluation return (`eval/return_mean`), each seed contributing its latest
evaluation at or before that env step ("-": a seed had not been evaluated yet). Steps to threshold:
IQM over seeds of the first evaluation step whose return reached the threshold, a seed that never
reached it counting as infinite ("not reached" when the IQM is infinite). Only finished runs count."""


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
                 n_resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap confidence interval of `statistic` over a 1-D sample of runs.

    Draws `n_resamples` samples of the same size with replacement, applies `statistic(x, axis=-1)`
    to all at once (np.mean, np.median and `interquartile_mean` all take `axis`), and returns the
    (1 - confidence) / 2 and (1 + confidence) / 2 quantiles (linear interpolation) of the results.
    The same seed gives the same interval.
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
    low, high = np.quantile(statistics, [tail, 1.0 - tail])
    return float(low), float(high)


def steps_to_threshold(steps: ArrayLike, returns: ArrayLike, threshold: float = 200.0) -> int | None:
    """The first evaluation step whose return is at least `threshold`; None if none is."""
    reached = np.flatnonzero(np.asarray(returns, dtype=np.float64) >= threshold)
    return int(np.asarray(steps)[reached[0]]) if reached.size else None


def estimate(values: ArrayLike, confidence: float = 0.95) -> Estimate:
    """IQM of one value per seed with its bootstrap CI; all NaN if any seed has no value (NaN)."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0 or np.isnan(values).any():
        return Estimate(math.nan, math.nan, math.nan)
    return Estimate(float(interquartile_mean(values)), *bootstrap_ci(values, interquartile_mean, confidence))


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


def load_eval_curve(run_dir: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Steps and returns of `eval/return_mean` in a TensorBoard run folder (empty if it has none).

    All event files of the folder are read (a resumed run adds one per session, and events its
    interrupted predecessor logged after the checkpoint are purged); if a step appears twice, the
    later value wins.
    """
    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})  # 0: keep every event
    tb_logger = logging.getLogger("tensorboard")
    level = tb_logger.level
    tb_logger.setLevel(logging.ERROR)  # a resumed run's purge of stale events is expected: no warning
    try:
        accumulator.Reload()
    finally:
        tb_logger.setLevel(level)
    if EVAL_TAG not in accumulator.Tags()["scalars"]:
        return np.zeros(0, dtype=np.int64), np.zeros(0)
    by_step = {event.step: event.value for event in accumulator.Scalars(EVAL_TAG)}
    steps = np.array(sorted(by_step), dtype=np.int64)
    return steps, np.array([by_step[step] for step in steps], dtype=np.float64)


def load_study(study_dir: str | Path) -> dict[str, list[Curve]]:
    """The evaluation curves of a study's finished runs, by configuration (sorted) and seed."""
    study_dir = Path(study_dir)
    curves: dict[str, list[Curve]] = {}
    for run_dir in sorted((study_dir / "runs").glob("*/")):
        trial = parse_run_name(run_dir.name)
        if trial is None or not (study_dir / "checkpoints" / run_dir.name / "final.pt").is_file():
            continue
        curves.setdefault(trial[0], []).append(Curve(trial[1], *load_eval_curve(run_dir)))
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


def format_estimate(value: Estimate) -> str:
    return "-" if math.isnan(value.value) else f"{value.value:.1f} [{value.low:.1f}, {value.high:.1f}]"


def plot_curves(curves: dict[str, list[Curve]], path: str | Path, threshold: float | None = None,
                confidence: float = 0.95) -> Path:
    """PNG of each configuration's IQM evaluation return over seeds vs env steps, with its CI band.

    Drawn as a step function that changes at each evaluation of any seed: between evaluations every
    seed keeps its latest value. A curve starts once every seed has been evaluated.
    """
    figure = Figure(figsize=(8, 4.5), dpi=110)
    axes = figure.subplots()
    for config, runs in curves.items():
        if not runs or any(run.steps.size == 0 for run in runs):
            continue
        steps = np.unique(np.concatenate([run.steps for run in runs]))
        steps = steps[steps >= max(run.steps[0] for run in runs)]
        estimates = np.array([estimate(column, confidence) for column in values_at(runs, steps).T])
        line, = axes.plot(steps, estimates[:, 0], drawstyle="steps-post", label=f"{config} ({len(runs)} seeds)")
        axes.fill_between(steps, estimates[:, 1], estimates[:, 2], step="post", color=line.get_color(), alpha=0.2,
                          linewidth=0)
    if threshold is not None:
        axes.axhline(threshold, color="gray", linestyle="--", linewidth=0.8, label=f"{threshold:g}")
    axes.set(xlabel="env steps", ylabel="evaluation return (IQM over seeds)",
             title=f"deterministic evaluation return: IQM over seeds, {confidence:.0%} bootstrap CI")
    axes.grid(alpha=0.3)
    axes.legend(loc="best", fontsize=8)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path
