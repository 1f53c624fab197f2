"""Plot a run's learning curve from its TensorBoard log: python benchmarks/plot_learning_curve.py runs/NAME.

Draws the training episode returns (faint, with a moving average), the deterministic evaluation
returns, the 100-episode checks' lower bounds and the run's target against env steps, and writes a PNG
(default: docs/<run name>.png).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sac_model import SACConfig, Tag, target_return  # noqa: E402


def read_events(run_dir: Path) -> EventAccumulator:
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return events


def read_scalars(events: EventAccumulator, tag: str) -> tuple[np.ndarray, np.ndarray]:
    """Steps and values of one scalar tag (empty where the run logged none)."""
    scalars = events.Scalars(tag) if tag in events.Tags()["scalars"] else []
    return np.array([s.step for s in scalars]), np.array([s.value for s in scalars])


def run_target(events: EventAccumulator) -> float | None:
    """The return the run stopped at, from the config train.py logs as text; None without one."""
    if "config/text_summary" not in events.Tags()["tensors"]:
        return None
    text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    fields = dict(line.strip().split(": ", 1) for line in text.splitlines() if ": " in line)
    return target_return(SACConfig(env=fields["env"], target_return=fields["target_return"]))


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over up to `window` values (shorter at the start)."""
    cumulative = np.cumsum(np.insert(values, 0, 0.0))
    counts = np.minimum(np.arange(1, len(values) + 1), window)
    return (cumulative[1:] - cumulative[np.arange(1, len(values) + 1) - counts]) / counts


def plot(run_dir: Path, output: Path, title: str) -> None:
    events = read_events(run_dir)
    steps, returns = read_scalars(events, Tag.EPISODE_RETURN)
    eval_steps, eval_returns = read_scalars(events, Tag.EVAL_MEAN)
    check_steps, check_bounds = read_scalars(events, Tag.CHECK_LOWER_BOUND)
    figure, axes = plt.subplots(figsize=(8, 4.5), dpi=110)
    axes.plot(steps, returns, color="tab:blue", alpha=0.2, linewidth=0.8, label="training episode return")
    axes.plot(steps, moving_average(returns, 20), color="tab:blue", label="training return, mean of last 20")
    axes.plot(eval_steps, eval_returns, "o-", color="tab:orange", markersize=3,
              label="deterministic evaluation (10 episodes)")
    if len(check_steps):
        axes.plot(check_steps, check_bounds, "D", color="tab:green", markersize=5,
                  label="100-episode check: its lower bound")
    axes.axhline(200, color="gray", linestyle="--", linewidth=0.8, label="200: solved")
    target = run_target(events)
    if target is not None and target != 200:
        axes.axhline(target, color="tab:green", linestyle=":", linewidth=0.8, label=f"{target:g}: the run's target")
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
