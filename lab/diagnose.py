"""How a run spent its env steps window by window, or how a saved LunarLander agent lands and crashes.

    python -m lab.diagnose studies/diagnosis/runs/seed24 studies/diagnosis/runs/seed20 --png docs/failure.png
    python -m lab.diagnose --agent pretrained/LunarLanderContinuous-v3.pt --episodes 100 --seed 1000

Run folders: for each (TensorBoard events written by train.py) and each window of env steps, the
episodes that ended in it, their mean return, how many the time limit ended (on LunarLander: a
lander hovering for 1000 steps) and the share of the window's steps those took, how many crashed
(return below --crash-below), and the temperature, policy entropy, mean Q and evaluation return
logged there ("-" where none was). Prints a Markdown table.

--agent: the agent plays deterministic episodes and each is classified by how it ended, with its
approach at the first ground contact and its fuel; see lab/outcomes.py.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from lab import outcomes
from lab.tables import CurveReader
from plumbing import OneLineErrorParser, fail
from sac_model import SACError, Tag

COLUMNS = ("window", "episodes", "mean return", "time-limit episodes", "their share of steps", "crashes", "alpha",
           "entropy", "mean Q", "evaluation")


def scalars(run_dir: Path, tag: str) -> tuple[np.ndarray, np.ndarray]:
    return CurveReader(run_dir, tag).read()


def episodes(run_dir: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """End step, return and length of every episode whose return and length are both logged (a run still
    writing may have logged one and not yet the other)."""
    steps, returns = scalars(run_dir, Tag.EPISODE_RETURN)
    length_steps, lengths = scalars(run_dir, Tag.EPISODE_LENGTH)
    both = np.isin(steps, length_steps)
    return steps[both], returns[both], lengths[np.isin(length_steps, steps)]


def mean_between(steps: np.ndarray, values: np.ndarray, start: int, end: int) -> float:
    """Mean of the values logged at steps in (start, end]; NaN if none were."""
    inside = (steps > start) & (steps <= end)
    return float(values[inside].mean()) if inside.any() else float("nan")


def cell(value: float, spec: str) -> str:
    """A table cell: the value formatted, or "-" where nothing was logged (NaN)."""
    return "-" if np.isnan(value) else format(value, spec)


def window_rows(run_dir: Path, window: int, crash_below: float, time_limit: int) -> list[list[str]]:
    """One row per window of `window` env steps with at least one finished episode."""
    steps, returns, lengths = episodes(run_dir)
    cut_steps, cut = scalars(run_dir, Tag.EPISODE_TIME_LIMIT)
    logged = {tag: scalars(run_dir, tag) for tag in (Tag.ALPHA, Tag.ENTROPY, Tag.MEAN_Q, Tag.EVAL_MEAN)}
    if cut.size:
        cut = np.isin(steps, cut_steps[cut > 0]).astype(float)
    else:  # a run logged before the time-limit tag existed: the episode length tells
        cut = (lengths >= time_limit).astype(float)
    rows = []
    for start in range(0, int(steps.max(initial=0)) + 1, window):
        inside = (steps > start) & (steps <= start + window)
        if not inside.any():
            continue
        mean_of = {tag: mean_between(s, values, start, start + window) for tag, (s, values) in logged.items()}
        steps_cut = lengths[inside & (cut > 0)].sum()
        rows.append([f"{start // 1000}-{(start + window) // 1000}k", str(int(inside.sum())),
                     f"{returns[inside].mean():.1f}", str(int(cut[inside].sum())),
                     f"{steps_cut / lengths[inside].sum():.0%}", str(int((returns[inside] < crash_below).sum())),
                     cell(mean_of[Tag.ALPHA], ".3f"), cell(mean_of[Tag.ENTROPY], ".2f"),
                     cell(mean_of[Tag.MEAN_Q], ".1f"), cell(mean_of[Tag.EVAL_MEAN], ".1f")])
    return rows


def markdown(run_dir: Path, rows: list[list[str]]) -> str:
    lines = [f"`{run_dir}`", "", "| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def plot(run_dirs: list[Path], path: Path, smooth: int) -> Path:
    """Per run: episode return and episode length over env steps (moving averages over `smooth` episodes)."""
    figure = Figure(figsize=(10, 6), dpi=100)
    top, bottom = figure.subplots(2, 1, sharex=True)
    kernel = np.ones(smooth) / smooth
    for run_dir in run_dirs:
        steps, returns, lengths = episodes(run_dir)
        if steps.size < smooth:
            continue
        line, = top.plot(steps[smooth - 1:], np.convolve(returns, kernel, "valid"), label=run_dir.name)
        bottom.plot(steps[smooth - 1:], np.convolve(lengths, kernel, "valid"), color=line.get_color())
    top.axhline(200, color="gray", linestyle="--", linewidth=0.8)
    top.set(ylabel=f"episode return ({smooth}-episode mean)", title="training episodes: return and length")
    bottom.set(xlabel="env steps", ylabel=f"episode length ({smooth}-episode mean)")
    for axes in (top, bottom):
        axes.grid(alpha=0.3)
    top.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path


def diagnose_agent(args: argparse.Namespace) -> None:
    """The --agent mode: play, print the per-outcome table and the verdict, write the episodes if asked."""
    if args.episodes <= 0:
        fail("--episodes must be positive")
    try:
        reports = outcomes.diagnose_agent(args.agent, args.episodes, args.seed)
    except SACError as error:
        fail(str(error))
    print(f"`{args.agent}`: {args.episodes} deterministic episodes, seeds {args.seed}-{args.seed + args.episodes - 1}",
          end="\n\n")
    print(outcomes.outcome_table(reports), end="\n\n")
    print("\n".join(outcomes.verdict(reports)))
    if args.output:
        try:
            print(f"wrote {outcomes.write_episodes(reports, args.output)}")
        except OSError as error:
            fail(f"cannot write {args.output}: {error.strerror or error}")


def main(argv: list[str] | None = None) -> int:
    parser = OneLineErrorParser(prog="python -m lab.diagnose", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="*", type=Path, metavar="RUN",
                        help="TensorBoard run folders (runs/<name>) to read.")
    parser.add_argument("--window", type=int, default=10_000,
                        help="Env steps per row of a run's table (default: %(default)s).")
    parser.add_argument("--crash-below", type=float, default=-100.0,
                        help="A training episode whose return is below this counts as a crash (default: %(default)s).")
    parser.add_argument("--time-limit", type=int, default=1000,
                        help="For runs logged without charts/episode_time_limit, episodes this long count as cut by "
                             "the time limit (default: %(default)s).")
    parser.add_argument("--png", type=Path, default=None, metavar="PATH",
                        help="Also plot the runs' returns and lengths into this PNG file (default: no plot).")
    parser.add_argument("--smooth", type=int, default=20,
                        help="Episodes per moving average in the plot (default: %(default)s).")
    agent = parser.add_argument_group("a saved agent (instead of run folders)")
    agent.add_argument("--agent", type=Path, default=None, metavar="CHECKPOINT",
                       help="Play this LunarLanderContinuous checkpoint and classify how each episode ends.")
    agent.add_argument("--episodes", type=int, default=100, help="Episodes to play (default: %(default)s).")
    agent.add_argument("--seed", type=int, default=1000,
                       help="Episode i is reset with this seed plus i; the README's and lab.confirm's unseen episodes "
                            "are 1000-1099 (default: %(default)s).")
    agent.add_argument("--output", type=Path, default=None, metavar="PATH",
                       help="Also write every episode's record here: JSON if the name ends in .json, else CSV "
                            "(default: none written).")
    args = parser.parse_args(argv)
    if args.agent is not None:
        if args.runs:
            fail("give either run folders or --agent, not both")
        diagnose_agent(args)
        return 0
    if not args.runs:
        fail("give run folders to read, or --agent CHECKPOINT")
    missing = [str(run) for run in args.runs if not run.is_dir()]
    if missing:
        fail(f"no run folder {missing[0]}")
    if args.window <= 0 or args.smooth <= 0:
        fail("--window and --smooth must be positive")
    for run_dir in args.runs:
        print(markdown(run_dir, window_rows(run_dir, args.window, args.crash_below, args.time_limit)), end="\n\n")
    if args.png:
        print(f"wrote {plot(args.runs, args.png, args.smooth)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
