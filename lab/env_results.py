"""Results across envs: our default design with each env's preset beside SB3's zoo-tuned SAC, both measured on the
same CPU and seeds (lab.head_to_head's pages, ours taken from the env's lab.confirm study), and the field's
published rows for the same envs.

    python -m lab.env_results

writes benchmarks/results/env_results.md (and .png, the learning curves) and puts its tables in README.md between
the markers there, so that the README says what the page says.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from lab.head_to_head import ENV_ID, OURS, check_config, page_name, paired_minutes, preset_target
from lab.provenance import provenance
from lab.tables import Curve, draw_curves, seeds_count
from plumbing import REPO, OneLineErrorParser, fail
from sac_model import SACError

RESULTS = REPO / "benchmarks" / "results"
PAGE = RESULTS / "env_results.md"
README = REPO / "README.md"
README_START = "<!-- env_results: `python -m lab.env_results` writes what follows, up to the end marker -->"
README_END = "<!-- /env_results -->"
PEER = "sac"  # the peer every env is measured against: SB3's SAC at rl-zoo3's hyperparameters for the env
COLORS = {"ours": "tab:blue", "SB3 SAC (zoo)": "tab:orange"}
UNSEEN_EPISODES = 20  # episodes each final agent plays outside LunarLander (100 there, as its studies always did)


@dataclass(frozen=True)
class EnvResults:
    """An env of the table: the study of our runs, and the rows other projects published for it. Its rows are on
    lab.head_to_head's page for the env (benchmarks/results/<page_name>.json: ours, copied from the study, and the
    peer's)."""

    env: str
    study: str  # the lab.confirm study of our runs, docs/studies/<study>.json
    published: dict[str, str] = field(default_factory=dict)  # column -> the value as published, with its budget
    # MR.Q's 10 seeds at env step 300,000, each its 10-episode deterministic evaluation (its results/gym_results.txt)
    mrq_300k_seeds: tuple[float, ...] = ()

    @property
    def mrq_300k(self) -> float | None:
        """MR.Q's published figure: the mean of its seeds at 300k env steps."""
        return float(np.mean(self.mrq_300k_seeds)) if self.mrq_300k_seeds else None


PUBLISHED_COLUMNS = ("rl-zoo3 SAC", "rl-zoo3 TQC", "CleanRL SAC")
ENVS = (
    EnvResults(ENV_ID, "default_run_50",
               {"rl-zoo3 SAC": "260.4 +/- 65.5 @500k (v2)", "rl-zoo3 TQC": "278.0 +/- 25.5 @500k (v2)"}),
    EnvResults("BipedalWalker-v3", "bipedal_walker",
               {"rl-zoo3 SAC": "297.7 +/- 33.1 @500k", "rl-zoo3 TQC": "329.8 +/- 45.1 @500k"}),
    EnvResults("Hopper-v5", "hopper_300k",
               {"rl-zoo3 SAC": "2326 +/- 1130 @1M", "rl-zoo3 TQC": "3754 +/- 8 @1M",
                "CleanRL SAC": "2310 +/- 343 @1M"},
               mrq_300k_seeds=(3670.2, 2932.3, 1692.3, 1499.7, 1689.8, 2886.6, 1605.1, 3440.6, 1798.2, 3472.9)),
    EnvResults("HalfCheetah-v5", "halfcheetah_300k",
               {"rl-zoo3 SAC": "9535 +/- 100 @1M", "rl-zoo3 TQC": "12090 +/- 127 @1M",
                "CleanRL SAC": "9635 +/- 1424 @1M"},
               mrq_300k_seeds=(11922.0, 11591.3, 10672.9, 9720.2, 11909.4, 10739.7, 7043.7, 12097.4, 11417.6, 11236.8)),
    EnvResults("Walker2d-v5", "walker2d_300k",
               {"rl-zoo3 SAC": "3863 +/- 254 @1M", "rl-zoo3 TQC": "4381 +/- 500 @1M",
                "CleanRL SAC": "3591 +/- 911 @1M"},
               mrq_300k_seeds=(4894.0, 3822.2, 3927.0, 5223.4, 4808.8, 4162.9, 3242.2, 4221.2, 4881.0, 5906.8)),
    EnvResults("Ant-v5", "ant_300k",
               {"rl-zoo3 SAC": "4616 +/- 1354 @1M", "rl-zoo3 TQC": "3339 +/- 1970 @1M"},
               mrq_300k_seeds=(3877.3, 6403.9, 4416.4, 4004.2, 4401.0, 4675.9, 2479.7, 5251.7, 6512.5, 4715.6)),
)
PUBLISHED_SOURCES = (
    "rl-zoo3: DLR-RM/rl-baselines3-zoo benchmark.md (rows unchanged since 2021), one trained agent each, MuJoCo at "
    "v3, its deterministic return over about 150k evaluation steps; the std is over those episodes, not seeds.",
    "CleanRL: vwxyzjn/cleanrl docs/benchmark/sac.md, v4, 3 seeds: each seed's last 100 training episodes (stochastic "
    "policy), mean and population std over the seeds; 161-175 min per 1M-step run on its GPU machine.",
    "MR.Q: facebookresearch/MRQ results/gym_results.txt, v4: the mean over its 10 seeds of each seed's 10-episode "
    "deterministic evaluation at env step 300,000 of its 1M-step runs; the range is its lowest and highest seed.",
)


def page_rows(env: EnvResults, results: Path = RESULTS) -> dict[str, list[dict]]:
    """The env's finished runs on its lab.head_to_head page, by algorithm; none where it has no page yet."""
    path = results / f"{page_name(env.env)}.json"
    rows = json.loads(path.read_text())["rows"].values() if path.is_file() else []
    by_algo: dict[str, list[dict]] = {}
    for row in sorted(rows, key=lambda r: r["seed"]):
        by_algo.setdefault(row["algo"], []).append(row)
    return by_algo


def final_return(row: dict) -> float:
    """A run's final agent: its mean return on the unseen episodes."""
    return float(np.mean(row["unseen"]))


def spread(values: Sequence[float], spec: str = ".0f") -> str:
    """The lowest and the highest of the seeds' values."""
    return f"{min(values):{spec}} to {max(values):{spec}}"


def quality(rows: list[dict]) -> str:
    """The median over seeds of the final agents' unseen return, with the lowest and highest seed."""
    if not rows:
        return "not run yet"
    returns = [final_return(row) for row in rows]
    return f"{np.median(returns):.1f} ({spread(returns, '.1f')})"


def wall_time(rows: list[dict]) -> str:
    return f"{np.median([row['minutes'] for row in rows]):.1f}" if rows else ""


def wall_time_ratio(peer: list[dict], ours: list[dict]) -> str:
    """The peer's median wall time over ours on the seeds both ran on the same CPU."""
    paired = paired_minutes(peer, ours)
    if not paired:
        return "not on one CPU" if peer and ours else ""
    peer_minutes, ours_minutes = zip(*paired)
    return f"{np.median(peer_minutes) / np.median(ours_minutes):.2f} ({seeds_count(len(paired))})"


def budget(env_id: str) -> str:
    """How a run of the env's preset ends: at its budget, or at its stop target (with its budget as the cap)."""
    target = preset_target(env_id)
    steps = f"{check_config(0, env_id).total_steps / 1000:g}k"
    return f"{steps} env steps" if target is None else f"until {target:g} (at most {steps})"


def seeds(rows: list[dict], env_id: str = ENV_ID) -> str:
    """The seeds of the rows, each with its cap where the run was capped below the env's budget."""
    budget_steps = check_config(0, env_id).total_steps

    def shown(row: dict) -> str:
        capped = row.get("cap", budget_steps) < budget_steps
        return f"{row['seed']} (cap {row['cap'] / 1000:g}k)" if capped else str(row["seed"])

    return ", ".join(map(shown, rows)) or "-"


def measured_table(results: Path = RESULTS) -> list[str]:
    """Ours against SB3's zoo-tuned SAC, per env: final agents and wall time per run."""
    lines = ["| env | budget | ours: seeds | ours: unseen return, median (range) | ours: min per run | "
             "SB3 SAC (zoo): seeds | SB3 SAC: unseen return, median (range) | SB3 SAC: min per run | "
             "SB3 SAC / ours, wall time |", "| --- " * 9 + "|"]
    for env in ENVS:
        rows = page_rows(env, results)
        ours, peer = rows.get(OURS, []), rows.get(PEER, [])
        lines.append(f"| {env.env} | {budget(env.env)} | {seeds(ours, env.env)} | {quality(ours)} | "
                     f"{wall_time(ours)} | {seeds(peer, env.env)} | {quality(peer) if ours or peer else ''} | "
                     f"{wall_time(peer)} | {wall_time_ratio(peer, ours)} |")
    return lines


def published_table(results: Path = RESULTS) -> list[str]:
    """Ours beside the rows other projects published, and MR.Q's return at 300k env steps."""
    lines = ["| env | ours: median (range) | MR.Q @300k: mean (range) | ours / MR.Q | "
             + " | ".join(PUBLISHED_COLUMNS) + " |",
             "| --- " * (4 + len(PUBLISHED_COLUMNS)) + "|"]
    for env in ENVS:
        ours = page_rows(env, results).get(OURS, [])
        median = float(np.median([final_return(row) for row in ours])) if ours else None
        mrq = "" if env.mrq_300k is None else f"{env.mrq_300k:.0f} ({spread(env.mrq_300k_seeds)})"
        ratio = f"{median / env.mrq_300k:.2f}" if median is not None and env.mrq_300k else ""
        lines.append(f"| {env.env} | {quality(ours)} | {mrq} | {ratio} | "
                     + " | ".join(env.published.get(column, "") for column in PUBLISHED_COLUMNS) + " |")
    return lines


def curves(rows: list[dict]) -> list[Curve]:
    """The runs' evaluation curves ([env step, mean, std] per evaluation), where their rows kept one."""
    return [Curve(row["seed"], *np.array(row["evaluations"])[:, :2].T)
            for row in rows if row.get("evaluations")]


def plot(path: Path, results: Path = RESULTS) -> Path:
    """One panel per env: ours and SB3's SAC, IQM over seeds of the deterministic evaluation return."""
    rows = -(-len(ENVS) // 3)
    figure = Figure(figsize=(12, 3.5 * rows), dpi=100)
    for axes, env in zip(figure.subplots(rows, 3, squeeze=False).flat, ENVS):
        runs = page_rows(env, results)
        draw_curves(axes, {"ours": curves(runs.get(OURS, [])), "SB3 SAC (zoo)": curves(runs.get(PEER, []))},
                    colors=COLORS)
        # Rows recorded before records kept their evaluations: their study page drew them at the time.
        no_curve_kept = bool(runs.get(OURS)) and not curves(runs[OURS])
        axes.set_title(env.env + (f"\n(ours: no curve kept; see docs/studies/{env.study}.png)" if no_curve_kept
                                  else ""), fontsize=10)
        axes.xaxis.set_major_formatter(FuncFormatter(lambda steps, _: f"{steps / 1000:g}k"))
        if not axes.lines:
            axes.text(0.5, 0.5, "no curve yet", ha="center", va="center", transform=axes.transAxes, color="gray")
            axes.set(xticks=[], yticks=[])
    figure.tight_layout()
    figure.savefig(path)
    return path


def tables(results: Path = RESULTS) -> list[str]:
    """What the page and the README share: both tables and the sources of the published rows."""
    return ["Measured here (two runs at a time, one thread each; the final agent on episodes no run played, 100 on "
            f"LunarLander, {UNSEEN_EPISODES} elsewhere):", "", *measured_table(results), "",
            "Beside the published rows (their budgets after the @; ours at the budget in the first table):", "",
            *published_table(results), "", *[f"- {source}" for source in PUBLISHED_SOURCES]]


def commands(env: EnvResults) -> list[str]:
    """How an env's rows are made: our seeds (lab.confirm), the peer's beside them (lab.head_to_head), this page."""
    flags = "" if env.env == ENV_ID else f" --unseen-episodes {UNSEEN_EPISODES} --train-args '--env {env.env}'"
    peer_flags = "" if env.env == ENV_ID else f" --env {env.env} --unseen-episodes {UNSEEN_EPISODES}"
    return [f"python -m lab.confirm --name {env.study} --seeds 0-2{flags} --commit",
            f"python -m lab.head_to_head{peer_flags} --algos {PEER} --seeds 0 "
            f"--ours-from docs/studies/{env.study}.json --commit"]


def write_page(page: Path = PAGE, results: Path = RESULTS) -> list[Path]:
    figure = plot(page.with_suffix(".png"), results)
    pages = ", ".join(f"[{name}.md]({name}.md)" for name in map(page_name, (env.env for env in ENVS))
                      if (results / f"{name}.md").is_file())
    lines = ["# Results per env: ours at each env's preset, SB3's zoo-tuned SAC, and the published rows", "",
             provenance(), "", "Command: `python -m lab.env_results`", "", *tables(results), "",
             f"Each env's runs, their commands, commits and CPU: {pages or 'no page yet'}.", "",
             "## How the rows are made", "",
             "Our runs are plain `python train.py --env ID --seed N --threads 1` under lab.confirm, two at a time; the "
             "peer's are lab.head_to_head's on the same seeds, which also copies our rows onto the env's page. Each "
             "command resumes where a session stopped and commits every finished row; then this page is rewritten:",
             "", "```bash", *[line for env in ENVS[1:] for line in commands(env)], "python -m lab.env_results", "```",
             "", f"LunarLander's rows are the default run's confirmation ([{ENVS[0].study}](../../docs/studies/"
             f"{ENVS[0].study}.md), seeds 50-59) and the head-to-head on seeds 50-52.", "",
             f"![learning curves]({figure.name})", ""]
    page.write_text("\n".join(lines))
    return [page, figure]


def update_readme(readme: Path = README, results: Path = RESULTS) -> Path:
    """Put the tables between the README's markers."""
    text = readme.read_text()
    start, end = text.find(README_START), text.find(README_END)
    if start < 0 or end < start:
        raise SACError(f"{readme}: no {README_START!r} ... {README_END!r} markers to put the table between")
    block = "\n".join([README_START, "", *tables(results), ""])
    readme.write_text(text[:start] + block + "\n" + text[end:])
    return readme


def main(argv: list[str] | None = None) -> int:
    parser = OneLineErrorParser(prog="python -m lab.env_results", description=__doc__.split("\n\n")[0])
    parser.parse_args(argv)
    try:
        paths = [*write_page(), update_readme()]
    except SACError as error:
        fail(str(error))
    print(f"wrote {', '.join(str(p) for p in paths)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
