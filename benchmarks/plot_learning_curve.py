"""Plot a run's learning curve from its TensorBoard log: python benchmarks/plot_learning_curve.py runs/NAME.

Draws the training episode returns (faint, with a moving average) and the deterministic evaluation
returns against env steps, and writes a PNG (default: docs/<run name>.png).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402


def read_scalars(run_dir: Path, tag: str) -> tuple[np.ndarray, np.ndarray]:
    """Steps and values of one scalar tag of a TensorBoard run folder."""
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    scalars = events.Scalars(tag)
    return np.array([s.step for s in scalars]), np.array([s.value for s in scalars])


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over up to `window` values (shorter at the start)."""
    cumulative = np.cumsum(np.insert(values, 0, 0.0))
    counts = np.minimum(np.arange(1, len(values) + 1), window)
    return (cumulative[1:] - cumulative[np.arange(1, len(values) + 1) - counts]) / counts


def plot(run_dir: Path, output: Path, title: str) -> None:
    steps, returns = read_scalars(run_dir, "charts/episode_return")
    eval_steps, eval_returns = read_scalars(run_dir, "eval/return_mean")
    figure, axes = plt.subplots(figsize=(8, 4.5), dpi=110)
    axes.plot(steps, returns, color="tab:blue", alpha=0.2, linewidth=0.8, label="training episode return")
    axes.plot(steps, moving_average(returns, 20), color="tab:blue", label="training return, mean of last 20")
    axes.plot(eval_steps, eval_returns, "o-", color="tab:orange", markersize=3, label="deterministic evaluation")
    axes.axhline(200, color="gray", linestyle="--", linewidth=0.8, label="200: solved")
    axes.set(xlabel="env steps", ylabel="episode return", title=title, ylim=(max(-600, returns.min() - 20), None))
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output)
    print(f"wrote {output}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a TensorBoard run folder, e.g. runs/lunar_seed0_300k")
    parser.add_argument("--output", type=Path, default=None, help="PNG path (default: docs/<run name>.png)")
    parser.add_argument("--title", default=None, help="plot title (default: the run name)")
    args = parser.parse_args()
    plot(args.run_dir, args.output or Path("docs") / f"{args.run_dir.name}.png", args.title or args.run_dir.name)


if __name__ == "__main__":
    main()
