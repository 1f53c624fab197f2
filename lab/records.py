"""A lab.confirm results file's records, as lab.confirm, lab.compare and lab.head_to_head read them, and the
git commit that keeps a study's pages.

A record (docs/studies/<name>.json, one per run) holds the run's `seed`, its time `segments` ([start, end] per
process, time.time()), its target `checks` ([env step, mean, std] each), its `target`, `target_episodes` and
`std_errors`, and, once finished, its final agent's returns on `unseen` episodes.
"""
from __future__ import annotations

import subprocess
import time
from collections.abc import Iterable
from pathlib import Path

from plumbing import REPO
from sac_model import SACError, is_solved


def parse_seeds(text: str) -> list[int]:
    """'40-49' or '40,41,45' -> the seeds, in order."""
    seeds: list[int] = []
    for part in text.split(","):
        first, dash, last = part.partition("-")
        if not first.strip().isdigit() or (dash and not last.strip().isdigit()):
            raise SACError(f"--seeds: expected a range like 40-49 or a list like 40,41, got {text!r}")
        seeds.extend(range(int(first), int(last or first) + 1))
    if not seeds or len(set(seeds)) != len(seeds):
        raise SACError(f"--seeds: expected distinct seeds, got {text!r}")
    return seeds


def solved_at(record: dict) -> int | None:
    """The env step of the check that ended the run as solved; None for a run that reached its cap."""
    checks = record["checks"]
    solved = is_solved(checks, record["target"], record["target_episodes"], record["std_errors"])
    return checks[-1][0] if solved else None


def record_threshold(record: dict) -> float | None:
    """The registered solved threshold the record's env has (None: none). Records from before lab.confirm kept it
    are LunarLander's: 200."""
    return record.get("threshold", 200.0)


def threshold_label(thresholds: Iterable[float | None]) -> str:
    """The header of a column that counts unseen episodes at the env's registered solved threshold: the threshold
    ('200'), or 'threshold' where there are none, several, or an env without one."""
    found = set(thresholds)
    return f"{found.pop():g}" if len(found) == 1 and None not in found else "threshold"


def wall_minutes(record: dict) -> float:
    """The run's wall time: its processes' segments summed."""
    return sum(end - start for start, end in record["segments"]) / 60


def commit(paths: list[Path], message: str) -> None:
    """Commit these files, and nothing else that is staged, in the checkout that holds them: a study run from a
    worktree of a fixed commit may keep its pages in the main checkout (--docs-dir). A failure (another git
    command holding the index, say) is retried, then reported without stopping the study."""
    folder = paths[0].resolve().parent
    top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=folder, capture_output=True, text=True)
    checkout = Path(top.stdout.strip()) if top.returncode == 0 else REPO
    relative = [str(p.resolve().relative_to(checkout)) for p in paths]
    for attempt in range(5):
        added = subprocess.run(["git", "add", *relative], cwd=checkout, capture_output=True, text=True)
        done = added.returncode == 0 and subprocess.run(
            ["git", "commit", "-q", "-m", message, "--", *relative], cwd=checkout, capture_output=True, text=True
        ).returncode == 0
        if done:
            return
        time.sleep(2 + 3 * attempt)
    print(f"warning: could not commit {', '.join(relative)}; commit them by hand", flush=True)
