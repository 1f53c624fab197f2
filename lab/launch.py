"""The one way a study starts or resumes train.py: the command of a run, and its process, logged to a file.

lab.runner (ablations and searches), lab.confirm and lab.head_to_head start their runs here, so that the same
study command, run again after a stop, goes on from each run's newest checkpoint.
"""
from __future__ import annotations

import ctypes
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from plumbing import CHECKPOINTS_DIR, REPO, RUNS_DIR, checkpoint_files

TRAIN_SCRIPT = REPO / "train.py"
PR_SET_PDEATHSIG = 1  # Linux prctl option: the signal a process gets when the one that started it ends


def train_command(workdir: Path, run: str, flags: list[str], restart: bool = False) -> list[str]:
    """train.py with a new run's `flags` (its --run-name among them), to be run in `workdir`.

    A run with checkpoints in workdir/checkpoints/<run> is resumed from its newest: train.py takes the flags
    again, as long as those a resume may not change are the checkpoint's. With `restart` it is started over
    instead (--overwrite). A run without one starts new, once the TensorBoard folder of an attempt killed
    before its first checkpoint is removed: train.py refuses a new run whose files exist.
    """
    command = [sys.executable, str(TRAIN_SCRIPT), *flags]
    if checkpoint_files(workdir / CHECKPOINTS_DIR / run):
        return [*command, "--overwrite"] if restart else [*command, "--resume", run]
    shutil.rmtree(workdir / RUNS_DIR / run, ignore_errors=True)
    return command


@dataclass
class Started:
    """A started process, and where its output goes."""

    process: subprocess.Popen
    log_path: Path
    log_start: int  # byte offset of this process's output in the log

    def wait(self) -> tuple[int, str]:
        """Wait for the end: the exit code and the last line written (a failed run's error message)."""
        return self.process.wait(), last_line(self.log_path, self.log_start)


def start(command: list[str], cwd: Path, log_path: Path, die_with_parent: bool = False) -> Started:
    """Start `command` in `cwd`, its output appended to `log_path` after a line with the time and the command.

    `die_with_parent` (Linux): the process gets SIGTERM when this one ends, killed or not. A stopped Ray trial
    ends with its worker killed: its train.py then writes a checkpoint and exits instead of running on orphaned.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    prctl = ctypes.CDLL(None).prctl if die_with_parent and sys.platform == "linux" else None
    with open(log_path, "a") as log:
        separator = "\n" if log.tell() else ""  # a killed attempt's progress bar ends without one
        log.write(f"{separator}=== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(command)}\n")
        log.flush()
        log_start = log.tell()
        process = subprocess.Popen(command, cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                                   preexec_fn=prctl and (lambda: prctl(PR_SET_PDEATHSIG, signal.SIGTERM)))
    return Started(process, log_path, log_start)


def last_line(path: Path, start: int = 0) -> str:
    """The last non-empty line of a file after byte `start`."""
    with open(path, "rb") as handle:
        handle.seek(start)
        lines = [line.strip() for line in handle.read().decode(errors="replace").splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"
