"""Which code and which machine produced a result: the line that heads every page the study tools write.

The commit comes from plumbing.py, whose code_version train.py also writes into every checkpoint.
"""
from __future__ import annotations

import os
import platform
from pathlib import Path

from plumbing import REPO, git_commit, uncommitted_changes


def cpu_name() -> str:
    """The CPU model as /proc/cpuinfo names it, else whatever the platform says."""
    cpuinfo = Path("/proc/cpuinfo")
    for line in cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "an unknown CPU"


def cpus_named(cpu_by_run: dict[str, str | None]) -> list[str]:
    """Which CPU each run used, where a page's runs used more than one (its head names only its last writer's):
    wall times compare only between runs on the same CPU."""
    runs_by_cpu: dict[str, list[str]] = {}
    for run, cpu in cpu_by_run.items():
        runs_by_cpu.setdefault(cpu or "a CPU its record does not name", []).append(run)
    if len(runs_by_cpu) < 2:
        return []
    return ["", "The runs used more than one CPU, and wall times compare only between runs on the same one: "
            + "; ".join(f"{', '.join(runs)} on {cpu}" for cpu, runs in runs_by_cpu.items()) + "."]


def machine() -> str:
    """The CPU model and how many logical cores the operating system counts."""
    return f"{cpu_name()}, {os.cpu_count() or 'an unknown number of'} logical cores"


def provenance(repo: Path = REPO) -> str:
    """'Ran at commit `abc1234` (with uncommitted changes) on <CPU>, N logical cores.' for a page's head."""
    commit = git_commit(repo)
    if commit is None:
        where = "an unknown commit (not a git checkout)"
    else:
        where = f"commit `{commit}`" + (" (with uncommitted changes)" if uncommitted_changes(repo) else "")
    return f"Ran at {where} on {machine()}."
