"""Which code and which machine produced a result: the line that heads every page the study tools write.

Standard library only, so that anything (a page writer, a checkpoint's metadata) can ask without importing
torch or Ray.
"""
from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Pages and results files are written while a study runs (lab.confirm writes its results file before its
# page): changes there say nothing about the code that ran, so they do not make the tree count as changed.
NOT_CODE = ("docs",)


def _git(repo: Path, *args: str) -> str | None:
    try:
        result = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):  # no git on this machine, or it hung
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def git_commit(repo: Path = REPO) -> str | None:
    """The short sha of the commit checked out at `repo`; None outside a git checkout or without git."""
    return _git(repo, "rev-parse", "--short", "HEAD") or None


def uncommitted_changes(repo: Path = REPO) -> bool:
    """Whether a tracked file outside docs/ differs from the commit: the code that ran is not that commit's."""
    status = _git(repo, "status", "--porcelain", "--untracked-files=no", "--", ".",
                  *(f":(exclude){folder}" for folder in NOT_CODE))
    return bool(status)


def cpu_name() -> str:
    """The CPU model as /proc/cpuinfo names it, else whatever the platform says."""
    cpuinfo = Path("/proc/cpuinfo")
    for line in cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "an unknown CPU"


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
