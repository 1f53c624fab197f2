"""What train.py, visualize.py, lab/ and benchmarks/ share that is not the algorithm: a run's files and the
command line.

A run's files: its folders (runs/<run>/ for TensorBoard, checkpoints/<run>/ for checkpoints), the names of its
checkpoints (final.pt, step_<env step>.pt) and how to find them, a checkpoint's training section, the lock that
keeps one process on a run, pruning, and the git commit a checkpoint records. The command line: flags built
from SACConfig, one-line errors, and the process settings a run starts with. The algorithm, and the checkpoint
format SACAgent saves and loads, are in sac_model.py.
"""
from __future__ import annotations

import argparse
import ctypes
import dataclasses
import fcntl
import functools
import os
import random
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import gymnasium as gym
import numpy as np
import torch

from sac_model import (
    CheckpointError, SACConfig, SACError, WriteError, flag, native_bf16_cpu, read_checkpoint,
)

RUNS_DIR = Path("runs")
CHECKPOINTS_DIR = Path("checkpoints")
LOCK_FILE = ".lock"  # in checkpoints/<run>/: held by the process that trains the run
FINAL_CHECKPOINT = "final.pt"  # the agent a run ended with, solved or at its budget
# step_<env step>.pt: written every --checkpoint-every episodes and when a run is stopped; the newest are kept.
PERIODIC_CHECKPOINT = re.compile(r"step_(\d+)\.pt")


# --------------------------------------------------------------------------------------------
# A run's checkpoints
# --------------------------------------------------------------------------------------------

def periodic_checkpoint_name(step: int) -> str:
    """The file name of the periodic checkpoint written at env step `step`."""
    return f"step_{step:09d}.pt"


def final_checkpoint(folder: Path) -> Path:
    """Where a run's final agent is (or will be) in its checkpoint folder."""
    return folder / FINAL_CHECKPOINT


def periodic_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """A run folder's periodic checkpoints as (env step, path), in step order."""
    found = ((PERIODIC_CHECKPOINT.fullmatch(path.name), path) for path in folder.glob("step_*.pt"))
    return sorted((int(match.group(1)), path) for match, path in found if match)


def run_state(folder: Path) -> str:
    """'finished' (it holds final.pt), 'resumable' (a periodic checkpoint) or 'new' (neither)."""
    if final_checkpoint(folder).is_file():
        return "finished"
    return "resumable" if periodic_checkpoints(folder) else "new"


def checkpoint_files(folder: Path) -> list[Path]:
    """The finished checkpoints in a folder, oldest first (temporary files never end in .pt)."""
    return sorted(folder.glob("*.pt"), key=lambda p: (p.stat().st_mtime_ns, p.name))


def find_checkpoint(target: str | Path | None) -> Path:
    """Resolve a checkpoint file, a checkpoint folder or a run name to one file (the newest); None: newest of all."""
    if target is None:
        candidates = checkpoint_files(CHECKPOINTS_DIR) + [
            p for run in sorted(CHECKPOINTS_DIR.glob("*/")) for p in checkpoint_files(run)]
        if not candidates:
            raise CheckpointError(f"no checkpoint found under {CHECKPOINTS_DIR}/: train one with python train.py")
        return max(candidates, key=lambda p: p.stat().st_mtime_ns)
    path = Path(target)
    if path.is_file():
        return path
    folder = path if path.is_dir() else CHECKPOINTS_DIR / path
    if folder.is_dir():
        files = checkpoint_files(folder)
        if files:
            return files[-1]
        raise CheckpointError(f"{folder}: holds no checkpoint (*.pt)")
    raise CheckpointError(f"{target}: no such checkpoint file, folder or run name")


def newest_intact_checkpoint(folder: Path) -> Path | None:
    """The newest checkpoint in a folder that loads and validates, or None: where a resume would start from."""
    for path in reversed(checkpoint_files(folder)):
        try:
            read_checkpoint(path)
        except CheckpointError:
            continue
        return path
    return None


def run_files(run_name: str) -> list[Path]:
    """What a run has written: its checkpoints and TensorBoard files (not its lock or temporary files)."""
    events = [p for p in (RUNS_DIR / run_name).rglob("*") if p.is_file()]
    return checkpoint_files(CHECKPOINTS_DIR / run_name) + events


def refuse_existing_run(run_name: str) -> None:
    """Raise SACError if a run of this name has written files: a new run must never overwrite or mix with it."""
    if run_files(run_name):
        raise SACError(f"run {run_name!r} already exists ({CHECKPOINTS_DIR / run_name}/, {RUNS_DIR / run_name}/): "
                       f"continue it with --resume {run_name}, or choose another --run-name "
                       "(--overwrite deletes it and starts over)")


def remove_run_files(run_name: str) -> int:
    """Delete a run's checkpoints, temporary files and TensorBoard folder (not its lock); returns the count."""
    removed = run_files(run_name)
    folder = CHECKPOINTS_DIR / run_name
    for path in checkpoint_files(folder) + list(folder.glob(".*.tmp")):
        path.unlink()
    if (RUNS_DIR / run_name).exists():
        shutil.rmtree(RUNS_DIR / run_name)
    return len(removed)


def lock_run(run_name: str) -> IO:
    """Hold an exclusive advisory lock on the run for as long as this process lives, or raise SACError.

    The lock file in checkpoints/<run>/ holds the holder's pid. flock is released by the OS when the
    process ends in any way (kill -9 included), so no stale lock is ever left behind.
    """
    path = CHECKPOINTS_DIR / run_name / LOCK_FILE
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path, "a+")  # never truncate before holding the lock: the holder's pid is in it
    except OSError as error:
        raise WriteError(f"cannot write {path}: {error.strerror}") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise SACError(f"run {run_name!r} is being trained by process {holder} ({path}): "
                       "wait for it to end or stop it first") from None
    handle.truncate(0)
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def prune_checkpoints(folder: Path, keep: int) -> None:
    """Delete all but the newest `keep` periodic checkpoints (step_*.pt); final.pt is never pruned.

    Also removes temporary files left by a process killed while writing (never this process's own).
    """
    periodic = [p for p in checkpoint_files(folder) if PERIODIC_CHECKPOINT.fullmatch(p.name)]
    stale = [p for p in folder.glob(".*.tmp") if not p.name.endswith(f".{os.getpid()}.tmp")]
    for old in periodic[:-keep] + stale:
        old.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------
# A checkpoint's training section and provenance
# --------------------------------------------------------------------------------------------

@dataclass
class TrainingState:
    """A checkpoint's "training" section: the counters, histories, RNG states and replay buffer that make a
    resume exact, and what the study tools read of a run. Written and read only through this class."""

    global_step: int = 0
    episode: int = 0
    updates: int = 0
    eval_history: list = field(default_factory=list)  # [env step, mean return, std] per evaluation
    target_checks: list = field(default_factory=list)  # [env step, mean return, std] per --target-episodes check
    run_name: str | None = None
    # True when written at an episode's end, after its bookkeeping: only then is a resume exact.
    episode_finished: bool = True
    rng: dict | None = None  # capture_rng_state()
    buffer: dict | None = None  # the replay buffer's state_dict(), unless --no-save-buffer

    def to_dict(self) -> dict:
        """Plain data for the checkpoint (the buffer's tensors are not copied)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def of(cls, checkpoint: dict, path: str | Path) -> "TrainingState":
        """The training section of a checkpoint from `read_checkpoint`; CheckpointError if it holds none."""
        training = checkpoint.get("training")
        if not isinstance(training, dict) or not training:
            raise CheckpointError(f"{path}: holds an agent but no training state (an agent saved on its own)")
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{name: value for name, value in training.items() if name in known})

    def resume_gap(self) -> str | None:
        """Why resuming from this state would not replay the uninterrupted run exactly; None when it would."""
        gaps = [gap for gap, applies in (("it was written mid-episode", not self.episode_finished),
                                         ("it holds no replay buffer (--no-save-buffer)", self.buffer is None))
                if applies]
        return " and ".join(gaps) or None


REPO = Path(__file__).resolve().parent
# Pages and results files are written while a study runs: changes there say nothing about the code that ran.
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
    return bool(_git(repo, "status", "--porcelain", "--untracked-files=no", "--", ".",
                     *(f":(exclude){folder}" for folder in NOT_CODE)))


@functools.lru_cache(maxsize=None)
def code_version() -> str | None:
    """This code's commit, with a note when it differs from it, as the process started; None outside git.

    Checkpoints carry it, so that an agent says which code made it. Taken once: files edited while a run
    trains are not the code it runs.
    """
    commit = git_commit()
    return None if commit is None else commit + (" with uncommitted changes" if uncommitted_changes() else "")



def capture_rng_state(env: gym.Env) -> dict:
    """Every random generator a training run draws from, as plain data (for an exact resume)."""
    legacy = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [legacy[0], legacy[1].tolist(), *legacy[2:]],
        "torch": torch.get_rng_state(),
        "env": env.unwrapped.np_random.bit_generator.state,
        "action_space": env.action_space.np_random.bit_generator.state,
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict, env: gym.Env) -> None:
    """Undo `capture_rng_state`: the next draw of every generator is the one it would have been."""
    random.setstate(_as_tuples(state["python"]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    env.unwrapped.np_random.bit_generator.state = state["env"]
    env.action_space.np_random.bit_generator.state = state["action_space"]
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuples(value: Any) -> Any:
    """Python's RNG state must be nested tuples; serialisation may hand back lists."""
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value

# --------------------------------------------------------------------------------------------
# The command line and the process
# --------------------------------------------------------------------------------------------

class OneLineErrorParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def add_config_flags(parser: argparse.ArgumentParser, defaults: SACConfig | None = None) -> None:
    """Add one flag per config field, with its help text; defaults from `defaults` (else the dataclass's)."""
    defaults = SACConfig() if defaults is None else defaults
    for f in dataclasses.fields(defaults):
        default = getattr(defaults, f.name)
        option = flag(f.name)
        # A callable is resolved now: `choices` may name what is defined after SACConfig (the replay buffers).
        extras = {k: v() if callable(v) else v for k, v in f.metadata.items() if k not in ("help", "resumable")}
        if f.type in (bool, "bool"):
            parser.add_argument(option, action=argparse.BooleanOptionalAction, default=default,
                                help=f"{f.metadata['help']} (default: {'on' if default else 'off'})")
            continue
        kind = {"int": int, "float": float, "str": str, "int | None": int, "str | None": str}[str(f.type)]
        # A None default is explained by the help text itself ("default: ...").
        shown = "" if default is None else f" (default: {default})"
        parser.add_argument(option, type=kind, default=default, help=f"{f.metadata['help']}{shown}", **extras)


def config_from_args(args: argparse.Namespace) -> SACConfig:
    """The config whose fields are the parsed flags of the same names."""
    return SACConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(SACConfig)})



# The thread chooser's clock, in update rounds: the other thread count is tried this many rounds after a switch,
# then at twice the distance after each try that finds it no faster, up to THREAD_PROBE_MOST. On an idle 2-core
# CPU a round on 1 thread costs 1.7x one on 2, so the tries cost well under 1% of a long run's updates.
THREAD_PROBE_EVERY = 30
THREAD_PROBE_MOST = 480
# A count takes over when the other's rounds were this much slower: two counts about as fast stay put. The chosen
# count gives way only after THREAD_SLOW_ROUNDS such rounds in a row: a neighbour stays, a hiccup does not.
THREAD_SWITCH_MARGIN = 1.25
THREAD_SLOW_ROUNDS = 2


class ThreadChooser:
    """The thread count of each update round when the run chooses it (--threads 0 on a CPU of several cores).

    On all cores while the CPU is the run's own; on one while another process takes a core. Two threads whose
    work meets at every parallel region wait a whole time slice at each for the one that was descheduled, so a
    busy neighbour makes a round several times slower on two threads than on one (benchmarks/shared_cpu.py).
    Each round's time is noted. The chosen count gives way to the other when its rounds are THREAD_SWITCH_MARGIN
    times slower than the other's latest: after THREAD_SLOW_ROUNDS such rounds when a neighbour starts, since the
    chosen count runs every round, and at the next try of the other count when it stops. The first round on a
    count is not noted: it includes compiling the step for it. The counts agree to float32 rounding, not bit for
    bit (tests/test_plumbing.py): a run whose count changes is reproducible to rounding only; --threads N fixes it.
    """

    def __init__(self, cores: int, probe_every: int = THREAD_PROBE_EVERY, probe_most: int = THREAD_PROBE_MOST) -> None:
        self.cores, self.probe_every, self.probe_most = cores, probe_every, probe_most
        self.chosen = cores
        self.latest: dict[int, float] = {}
        self.used: set[int] = set()
        self.rounds = self.since_probe = self.slow_rounds = 0
        self.interval = probe_every

    def other(self, threads: int) -> int:
        return 1 if threads == self.cores else self.cores

    def next_round(self) -> int:
        """The count the next round runs on: the chosen one, or the other one when it is due a try (and from
        the second round on until it has a time, so that a CPU busy from the start is noticed at once)."""
        self.rounds += 1
        self.since_probe += 1
        other = self.other(self.chosen)
        if (self.rounds > 1 and other not in self.latest) or self.since_probe >= self.interval:
            self.since_probe = 0
            return other
        return self.chosen

    def first_on(self, threads: int) -> bool:
        """Whether no round has run on this count yet (the step compiles for it)."""
        return threads not in self.used

    def record(self, threads: int, seconds: float) -> int | None:
        """Note a round's time; the newly chosen count where the other count took over, else None."""
        if self.first_on(threads):
            self.used.add(threads)
            return None
        self.latest[threads] = seconds
        other = self.other(self.chosen)
        if len(self.latest) < 2:
            return None
        slower = self.latest[self.chosen] > THREAD_SWITCH_MARGIN * self.latest[other]
        if threads == self.chosen:
            self.slow_rounds = self.slow_rounds + 1 if slower else 0
        if (threads == other and slower) or self.slow_rounds >= THREAD_SLOW_ROUNDS:
            self.chosen, self.interval, self.since_probe, self.slow_rounds = other, self.probe_every, 0, 0
            return other
        if threads == other:  # a try that found the other count no faster: try it half as often
            self.interval = min(2 * self.interval, self.probe_most)
        return None


def keep_freed_memory_mapped() -> None:
    """Ask glibc to reuse freed memory instead of returning it to the OS after every tensor.

    An update frees and re-allocates hundreds of 256 KB tensors; above glibc's default thresholds
    each one is a fresh mmap that page-faults on first touch. Measured: ~10% faster updates on CPU.
    A no-op where glibc is absent.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 32 * 1024 * 1024)  # glibc's largest allowed value
    libc.mallopt(m_trim_threshold, 1 << 30)


def precision_line(precision: str, device: torch.device) -> str:
    """What the hidden layers' matrix products compute in, and why: a run's first lines say it."""
    if precision == "fp32":
        return "precision: fp32 (the default; --precision bf16 is an option, docs/performance.md)"
    if device.type != "cpu":
        return f"precision: bf16 matrix products on {device.type} (--precision bf16)"
    native = native_bf16_cpu()
    if native:
        return "precision: bf16 matrix products (--precision bf16), native on this CPU (AVX512-BF16 or AMX)"
    if native is False:
        return ("precision: bf16 matrix products (--precision bf16); this CPU has no AVX512-BF16 or AMX, so they "
                "are fp32 products of bf16-rounded values: native bf16's numbers, slower than fp32")
    return ("precision: bf16 matrix products (--precision bf16), but this CPU's bf16 support is unknown: if "
            "emulated, bf16 can run many times slower than fp32 (--precision fp32)")


def fail(message: str, code: int = 2) -> None:
    """Print a one-line error and exit: how the scripts report SACError."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)
