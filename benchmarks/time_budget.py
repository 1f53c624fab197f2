"""Where one whole `train.py` process spends its time: python benchmarks/time_budget.py [--threads 2]
[--default-run --seed N].

Two measurements, printed as one Markdown table:
1. Python start to imports done: a fresh `python -c "import train"` process, timed from its start to a
   line it prints once the import returned; a second one with `-X importtime` splits that time by package.
2. `train.main([...])` in this process, 6,000 env steps with 50 gradient steps every 50 from step 1,000
   (bench_sac.py's whole-process run, evaluation off), with the phases of the run wrapped by
   time.perf_counter accumulators: setup, random warm-up actions, acting, env steps, storing
   transitions, the progress bar, the first update round (the torch.compile of the step, warm or cold
   as inductor's cache is), replay sampling and the gradient steps of the other rounds, metric logging,
   episode ends, checkpoints, evaluation. "Other" is what no wrapper covers: flag parsing, seeding and
   the loop's own Python.
   With `--default-run`, the run is instead the default run a user starts, `train.py --seed N`, at its real
   length (until its check passes), with its 10-episode evaluations and 100-episode checks timed apart.

A phase's seconds exclude the phases timed inside it (an update round's replay sampling is counted as
sampling, not as the round); evaluation and the first update round keep everything inside them. The
wrappers only time: train.py computes the same numbers as without them. Each adds about a microsecond
per call, a few percent of an env step. The process's exit (interpreter teardown) is not counted.
"""
from __future__ import annotations

import argparse
import functools
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator
from unittest import mock

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import train  # noqa: E402  (the repository root has to be on the path first)
from bench_sac import markdown_table  # noqa: E402
from lab.provenance import cpu_name  # noqa: E402
from plumbing import CHECKPOINTS_DIR, TrainingState, final_checkpoint  # noqa: E402
from sac_model import SACAgent, read_checkpoint  # noqa: E402

START_STEPS = 1_000  # random actions and no updates before this step, as bench_sac.py's whole-process run
UPDATE_EVERY = 50
IMPORT_MARKER = "imports done"
# Packages whose share of the import time gets a row of its own (each counted where it is first imported).
NOTABLE_IMPORTS = ("torch", "torch.utils.tensorboard", "numba", "gymnasium", "numpy", "tqdm")

SETUP = "setup: envs, agent (torch._dynamo's import), compile_update, replay, run lock, event log"
STORING = "storing transitions: normalize_action, n-step collector, replay add"
FIRST_ROUND = "first update round: torch.compile + its gradient steps"
LATER_ROUNDS = "later update rounds: gradient steps"
SAMPLING = "replay sampling (the round's batches)"
EVALUATIONS = "10-episode evaluations (every 10 episodes)"
CHECKS = "100-episode checks (when an evaluation reaches the target)"
RUN_NAME = "time_budget"


@dataclass
class Phase:
    """Accumulated seconds of one phase, and what its per-unit figure divides them by."""

    seconds: float = 0.0
    units: int = 0  # env steps, gradient steps or calls, as `unit` says; 0: no per-unit figure
    unit: str = ""


class PhaseClock:
    """Exclusive seconds per phase: time spent in a phase timed inside another is charged to the inner one.

    Phases named in `opaque` keep everything that runs inside them (an evaluation's env steps are evaluation).
    """

    def __init__(self, opaque: tuple[str, ...] = ()) -> None:
        self.phases: dict[str, Phase] = defaultdict(Phase)
        self.opaque = set(opaque)
        self._open: list[list[Any]] = []  # [name, start, seconds of the phases inside it] per open phase

    def start(self, name: str) -> bool:
        """Open phase `name`; False (and nothing opened) inside an opaque phase."""
        if self._open and self._open[-1][0] in self.opaque:
            return False
        self._open.append([name, time.perf_counter(), 0.0])
        return True

    def stop(self, units: int = 0, unit: str = "") -> None:
        """Close the innermost phase, crediting it with `units` of `unit` (its per-unit figure's divisor)."""
        name, start, inner = self._open.pop()
        elapsed = time.perf_counter() - start
        if self._open:
            self._open[-1][2] += elapsed
        phase = self.phases[name]
        phase.seconds += elapsed - inner
        if units:
            phase.units += units
            phase.unit = unit

    @contextmanager
    def __call__(self, name: str, units: int = 0, unit: str = "") -> Iterator[None]:
        timed = self.start(name)
        try:
            yield
        finally:
            if timed:
                self.stop(units, unit)

    def wrap(self, name: str, function: Callable, unit: str = "") -> Callable:
        """`function`, timed as phase `name` at every call, each call one `unit` when given.

        start/stop inline: about 1 us a call, half a context manager's cost.
        """
        @functools.wraps(function)
        def timed(*args: Any, **kwargs: Any) -> Any:
            if not self.start(name):
                return function(*args, **kwargs)
            try:
                return function(*args, **kwargs)
            finally:
                self.stop(1 if unit else 0, unit)
        return timed

    def wrap_iterator(self, name: str, function: Callable[..., Iterator], unit: str = "") -> Callable[..., Iterator]:
        """`function`, whose iterator's every step is timed as phase `name`, each item one `unit` when given."""
        @functools.wraps(function)
        def timed(*args: Any, **kwargs: Any) -> Iterator:
            iterator = function(*args, **kwargs)
            while True:
                item, opened = None, self.start(name)
                try:
                    item = next(iterator, None)
                finally:
                    if opened:
                        self.stop(1 if unit and item is not None else 0, unit)
                if item is None:
                    return
                yield item
        return timed


# --------------------------------------------------------------------------------------------
# Imports: a fresh process
# --------------------------------------------------------------------------------------------

def import_seconds() -> float:
    """Seconds from starting `python` to `import train` having returned, in a fresh process."""
    program = f"import train; print({IMPORT_MARKER!r}, flush=True)"
    start = time.perf_counter()
    with subprocess.Popen([sys.executable, "-c", program], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True) as child:
        line = child.stdout.readline()
        elapsed = time.perf_counter() - start
        child.stdout.read()
    if line.strip() != IMPORT_MARKER or child.returncode != 0:
        raise RuntimeError(f"`python -c 'import train'` failed (exit code {child.returncode})")
    return elapsed


def import_breakdown() -> dict[str, float]:
    """Cumulative seconds of each notable package's first import under `python -X importtime -c 'import train'`."""
    result = subprocess.run([sys.executable, "-X", "importtime", "-c", "import train"], cwd=REPO_ROOT,
                            capture_output=True, text=True, check=True)
    seconds = {}
    for line in result.stderr.splitlines():
        fields = re.match(r"import time:\s+\d+\s+\|\s+(\d+)\s+\|\s+(.*)$", line)
        if fields and fields.group(2).strip() in NOTABLE_IMPORTS:
            seconds[fields.group(2).strip()] = int(fields.group(1)) / 1e6
    return seconds


# --------------------------------------------------------------------------------------------
# train.main, timed phase by phase
# --------------------------------------------------------------------------------------------

def train_argv(args: argparse.Namespace) -> list[str]:
    """The run to time, with a fixed run name: the default run of one seed, or bench_sac.py's whole-process run
    (table 4)."""
    if args.default_run:
        return ["--seed", str(args.seed), "--threads", str(args.threads), "--run-name", RUN_NAME]
    return ["--total-steps", str(args.total_steps), "--start-steps", str(START_STEPS), "--update-after",
            str(START_STEPS), "--update-every", str(UPDATE_EVERY), "--target-return", "none", "--eval-every", "0",
            "--threads", str(args.threads), "--run-name", RUN_NAME]


def final_agent(workdir: Path) -> Path:
    return final_checkpoint(workdir / CHECKPOINTS_DIR / RUN_NAME)


def run_counts(workdir: Path) -> TrainingState:
    """The finished run's counters (env steps, gradient steps, evaluations, checks), from its final checkpoint."""
    return TrainingState.of(read_checkpoint(final_agent(workdir)), final_agent(workdir))


def timed_phases(clock: PhaseClock) -> ExitStack:
    """Patch train.py's collaborators so that every phase of a run is timed by `clock`; undone on exit."""
    real_make_env, real_make_buffer, real_collector = train.make_env, train.make_buffer, train.NStepCollector
    real_update_round = train.update_round
    rounds = 0

    def make_env(*args: Any, **kwargs: Any) -> Any:
        with clock(SETUP):
            env = real_make_env(*args, **kwargs)
        env.step = clock.wrap("env.step and reset", env.step, unit="env step")
        env.reset = clock.wrap("env.step and reset", env.reset)
        env.action_space.sample = clock.wrap("random warm-up actions (action_space.sample)", env.action_space.sample,
                                             unit="env step")
        return env

    def make_buffer(*args: Any, **kwargs: Any) -> Any:
        with clock(SETUP):
            buffer = real_make_buffer(*args, **kwargs)
        buffer.add = clock.wrap(STORING, buffer.add)  # the collector's push counts the env steps
        buffer.batches = clock.wrap_iterator(SAMPLING, buffer.batches, unit="gradient step")
        return buffer

    def make_collector(*args: Any, **kwargs: Any) -> Any:
        collector = real_collector(*args, **kwargs)
        collector.push = clock.wrap(STORING, collector.push, unit="env step")
        return collector

    def update_round(run: Any) -> None:
        nonlocal rounds
        name = FIRST_ROUND if rounds == 0 else LATER_ROUNDS
        rounds += 1
        with clock(name, units=run.config.update_every * run.config.updates_per_step, unit="gradient step"):
            real_update_round(run)

    class TimedTqdm(train.tqdm):
        def update(self, n: float = 1) -> bool | None:
            with clock("progress bar", units=1, unit="env step"):
                return super().update(n)

    stack = ExitStack()
    replacements = {"make_env": make_env, "make_buffer": make_buffer, "NStepCollector": make_collector,
                    "update_round": update_round, "tqdm": TimedTqdm}
    for name, phase in (("claim_run", SETUP), ("open_event_log", SETUP),
                        ("log_update_metrics", "metric logging (one host sync per round)"),
                        ("finish_episode", "episode ends: logs, LR schedule"), ("save_checkpoint", "checkpoints"),
                        ("evaluate_and_log", EVALUATIONS), ("check_target", CHECKS)):
        replacements[name] = clock.wrap(phase, getattr(train, name), unit="" if phase == SETUP else "call")
    for name, replacement in replacements.items():
        stack.enter_context(mock.patch.object(train, name, replacement))
    for name, phase, unit in (("__init__", SETUP, ""), ("compile_update", SETUP, ""),
                              ("select_action", "select_action", "env step"),
                              ("normalize_action", STORING, "")):
        stack.enter_context(mock.patch.object(SACAgent, name, clock.wrap(phase, getattr(SACAgent, name), unit)))
    return stack


def run_train(argv: list[str], workdir: Path) -> tuple[PhaseClock, float]:
    """train.main(argv) run in `workdir` with its phases timed; the clock and the seconds main took."""
    clock = PhaseClock(opaque=(FIRST_ROUND, EVALUATIONS, CHECKS))
    here = Path.cwd()
    os.chdir(workdir)
    try:
        with timed_phases(clock):
            start = time.perf_counter()
            code = train.main(argv)
            seconds = time.perf_counter() - start
    finally:
        os.chdir(here)
    if code != 0:
        raise RuntimeError(f"train.main exited with {code}")
    return clock, seconds


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------

def per_unit(seconds: float, units: int, unit: str) -> str:
    """`seconds` spread over `units`, in the most readable of us and ms."""
    if not units:
        return ""
    each = seconds / units
    return f"{each * 1e6:.1f} us / {unit}" if each < 1e-3 else f"{each * 1e3:.2f} ms / {unit}"


def report(args: argparse.Namespace, imports: float, breakdown: dict[str, float], clock: PhaseClock,
           main_seconds: float, counts: TrainingState) -> str:
    """The Markdown page: what was run, then phase | seconds | share | per env step or update."""
    total = imports + main_seconds
    rows = [["python start -> `import train` done (fresh process)", f"{imports:.2f}", f"{imports / total:.1%}", ""]]
    rows += [[f"... of which `import {name}` (`-X importtime`)", f"{seconds:.2f}", f"{seconds / total:.1%}", ""]
             for name, seconds in sorted(breakdown.items(), key=lambda item: -item[1])]
    phases = sorted(clock.phases.items(), key=lambda item: -item[1].seconds)
    rows += [[name, f"{phase.seconds:.2f}", f"{phase.seconds / total:.1%}", per_unit(phase.seconds, phase.units,
                                                                                       phase.unit)]
             for name, phase in phases]
    other = main_seconds - sum(phase.seconds for phase in clock.phases.values())
    rows.append(["other: flags, seeding, the loop's own Python", f"{other:.2f}",
                 f"{other / total:.1%}", per_unit(other, counts.global_step, "env step")])
    rows.append(["**whole process (imports + train.main)**", f"**{total:.2f}**", "100%", ""])
    lines = [
        "# Time budget of one train.py process",
        "",
        f"- CPU: {cpu_name()} ({os.cpu_count()} logical CPUs); python {sys.version.split()[0]}, "
        f"torch {torch.__version__}, numpy {np.__version__}",
        f"- `train.py {' '.join(train_argv(args)[:-2])}`, run in this process with its "
        f"phases timed (inductor's cache as it was: warm after any earlier run on this machine)",
        f"- the run: {counts.global_step:,} env steps, {counts.updates:,} gradient steps, {counts.episode:,} episodes, "
        f"{len(counts.eval_history)} evaluations, {len(counts.target_checks)} checks",
        f"- date: {time.strftime('%Y-%m-%d %H:%M:%S')}; one run (repeat it to see the spread; run it on an otherwise idle machine)",
        "",
        markdown_table(["phase", "seconds", "share", "per env step or update"], rows),
    ]
    first, later, sampling = (clock.phases.get(name) for name in (FIRST_ROUND, LATER_ROUNDS, SAMPLING))
    if first and later:
        per_step = (later.seconds + (sampling.seconds if sampling else 0.0)) / later.units
        lines += ["", f"The compile's share of the first round: about {first.seconds - first.units * per_step:.2f} s "
                      f"(the round less its {first.units} gradient steps at the later rounds' rate, sampling "
                      "included)."]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="train.py's --threads (default: 2)")
    parser.add_argument("--total-steps", type=int, default=6_000,
                        help=f"env steps of the run; updates begin at {START_STEPS:,} (default: 6000)")
    parser.add_argument("--default-run", action="store_true",
                        help="time the default run of --seed at its real length instead (`train.py --seed N`)")
    parser.add_argument("--seed", type=int, default=52, help="the default run's seed (default: 52)")
    parser.add_argument("--save-agent", type=Path, default=None,
                        help="also keep the run's final agent (without its replay buffer) in this file")
    parser.add_argument("--output", type=Path, default=None, help="also write the Markdown report to this file")
    args = parser.parse_args(argv)
    if args.threads < 1 or args.total_steps <= START_STEPS:
        parser.error(f"--threads must be positive and --total-steps above {START_STEPS}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    imports, breakdown = import_seconds(), import_breakdown()
    with tempfile.TemporaryDirectory(prefix="time_budget_") as workdir:
        clock, main_seconds = run_train(train_argv(args), Path(workdir))
        counts = run_counts(Path(workdir))
        if args.save_agent is not None:
            SACAgent.load(final_agent(Path(workdir))).save(args.save_agent)
    page = report(args, imports, breakdown, clock, main_seconds, counts)
    print(page)
    if args.output is not None:
        args.output.write_text(page + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
