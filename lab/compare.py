"""Compare lab.confirm studies seed by seed: an ablation of the default run, each configuration against the defaults.

    python -m lab.compare --name ablation_default_run --seeds 40-44 --baseline default_run_40 \\
        with_per=ablation_with_per with_lr_schedule=ablation_with_lr_schedule no_n_step=ablation_no_n_step

Reads the results each study committed (docs/studies/<study>.json) and writes docs/studies/<name>.md, headed
by the commit and machine it was written at: per configuration
the env steps to solved on each seed, how many seeds it solved, its median steps to solved, the median of
its steps over the baseline's seed by seed, the final agents on unseen episodes, and on how many seeds it
beat the baseline. A run beats another on the same seed when it ended solved in fewer env steps (solved
beats unsolved; two unsolved runs compare their last checks). The verdict, per configuration: with at
least 4 of the n seeds won and the lower median steps to solved, the winner's choice paid; otherwise no
difference shown. Only seeds that every study has finished count.
"""
from __future__ import annotations

import argparse
import json
import sys
from math import comb
from pathlib import Path

import numpy as np

from lab.provenance import provenance
from lab.records import parse_seeds, solved_at, wall_minutes
from plumbing import REPO, OneLineErrorParser, fail
from sac_model import SACError


def load_records(docs: Path, study: str) -> dict[int, dict]:
    """The finished runs of a lab.confirm study, by seed."""
    path = docs / f"{study}.json"
    if not path.is_file():
        raise SACError(f"{path}: no such results file (run python -m lab.confirm --name {study} first)")
    return {record["seed"]: record for record in json.loads(path.read_text()).values() if "unseen" in record}


def steps_to_solved(record: dict) -> float:
    step = solved_at(record)
    return float("inf") if step is None else float(step)


def beats(record: dict, other: dict) -> bool:
    """Whether `record` did better than `other` (same seed): solved sooner, or unsolved with a higher last check."""
    mine, theirs = steps_to_solved(record), steps_to_solved(other)
    if np.isinf(mine) and np.isinf(theirs):
        return record["checks"][-1][1] > other["checks"][-1][1] if record["checks"] and other["checks"] else False
    return mine < theirs


def sign_test(wins: int, n: int) -> float:
    """One-sided sign-test p-value of `wins` or more wins out of n pairs, if neither side were better."""
    return sum(comb(n, k) for k in range(wins, n + 1)) / 2 ** n


def verdict(name: str, wins: int, losses: int, n: int, median: float, baseline_median: float) -> str:
    """The pre-registered rule: 4 of 5 seeds (scaled to n) and the lower median decide; else no difference shown."""
    needed = int(np.ceil(0.8 * n))
    if wins >= needed and median < baseline_median:
        return f"{name} paid ({wins} of {n}, sign test p = {sign_test(wins, n):.3f})"
    if losses >= needed and baseline_median < median:
        return f"the defaults' choice paid ({losses} of {n}, sign test p = {sign_test(losses, n):.3f})"
    return f"no difference shown by {n} seeds"


def steps_cell(record: dict) -> str:
    step = solved_at(record)
    unseen = np.mean(record["unseen"])
    return f"{step:,} ({unseen:.0f})" if step else f"unsolved at {record['steps']:,} ({unseen:.0f})"


def median_ratio_text(runs: dict[int, dict], base: dict[int, dict], seeds: list[int]) -> str:
    """The median over seeds of env steps to solved divided by the defaults' on the same seed (unsolved: infinite)."""
    ratios = [steps_to_solved(runs[s]) / steps_to_solved(base[s]) for s in seeds]
    median = float(np.median(ratios))
    return "-" if np.isnan(median) else "not reached" if np.isinf(median) else f"{median:.2f}"


def median_text(values: list[float]) -> str:
    median = float(np.median(values))
    return "not reached" if np.isinf(median) else f"{median:,.0f}"


def comparison_page(name: str, seeds_text: str, baseline: str, studies: dict[str, str], docs: Path) -> str:
    """docs/studies/<name>.md: one row per configuration, the baseline's first; verdicts once every seed is
    finished."""
    seeds = parse_seeds(seeds_text)
    records = {label: load_records(docs, study) for label, study in {"defaults": baseline, **studies}.items()}
    common = [s for s in seeds if all(s in runs for runs in records.values())]
    if not common:
        raise SACError(f"no seed of {seeds[0]}-{seeds[-1]} is finished in every study yet")
    base = records["defaults"]
    lines = [f"# Study `{name}`", "", provenance(), "",
             "Command: `python -m lab.compare --name " + name + " --seeds " + seeds_text +
             f" --baseline {baseline} " + " ".join(f"{k}={v}" for k, v in studies.items()) + "`", "",
             f"Seeds finished by every study: {', '.join(map(str, common))} (of {len(seeds)}). Cells: env steps to "
             "solved (the final agent's mean return on unseen episodes 1000-1099).", "",
             "| configuration | study | " + " | ".join(f"seed {s}" for s in common) +
             " | solved | median steps to solved | median steps / the defaults' (same seed) | median wall min | "
             "median unseen | beats the defaults on | verdict |",
             "| --- | --- | " + " | ".join("---" for _ in common) + " | --- | --- | --- | --- | --- | --- | --- |"]
    baseline_median = float(np.median([steps_to_solved(base[s]) for s in common]))
    for label, runs in records.items():
        study = baseline if label == "defaults" else studies[label]
        steps = [steps_to_solved(runs[s]) for s in common]
        cells = [steps_cell(runs[s]) for s in common]
        wins = sum(beats(runs[s], base[s]) for s in common)
        losses = sum(beats(base[s], runs[s]) for s in common)
        if label == "defaults":
            judged = "-"
        elif len(common) < len(seeds):
            judged = f"pending ({len(common)} of {len(seeds)} seeds finished)"
        else:
            judged = verdict(label, wins, losses, len(common), float(np.median(steps)), baseline_median)
        lines.append(f"| {label} | [{study}]({study}.md) | " + " | ".join(cells) +
                     f" | {sum(not np.isinf(x) for x in steps)} of {len(common)} | {median_text(steps)} | "
                     f"{'-' if label == 'defaults' else median_ratio_text(runs, base, common)} | "
                     f"{np.median([wall_minutes(runs[s]) for s in common]):.1f} | "
                     f"{np.median([np.mean(runs[s]['unseen']) for s in common]):.1f} | "
                     f"{'-' if label == 'defaults' else f'{wins} of {len(common)}'} | {judged} |")
    lines += ["", "A run beats the defaults' run of the same seed when it ended solved in fewer env steps (solved "
              "beats unsolved; two unsolved runs compare their last checks). Verdict: at least 4 of 5 seeds won and "
              "the lower median steps to solved; 5 of 5 is a one-sided sign test at p = 0.031, 4 of 5 a direction "
              "(p = 0.19).", ""]
    return "\n".join(lines)


def parse_studies(pairs: list[str]) -> dict[str, str]:
    studies = {}
    for pair in pairs:
        label, equals, study = pair.partition("=")
        if not equals or not label or not study:
            raise SACError(f"expected LABEL=STUDY, e.g. with_per=ablation_with_per, got {pair!r}")
        studies[label] = study
    return studies


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog="python -m lab.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", required=True, help="the comparison's page: docs/studies/<name>.md")
    parser.add_argument("--seeds", required=True, help="the seeds to compare, e.g. 40-44")
    parser.add_argument("--baseline", required=True, help="the defaults' lab.confirm study, e.g. default_run_40")
    parser.add_argument("studies", nargs="+", metavar="LABEL=STUDY", help="each configuration's lab.confirm study")
    parser.add_argument("--docs-dir", type=Path, default=REPO / "docs" / "studies",
                        help="where the studies' results are, and the page goes")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        page = comparison_page(args.name, args.seeds, args.baseline, parse_studies(args.studies), args.docs_dir)
    except SACError as error:
        fail(str(error))
    path = args.docs_dir / f"{args.name}.md"
    path.write_text(page)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
