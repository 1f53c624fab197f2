"""Replay, offline, when each stop rule would have ended a run, and how good the agent it stopped with is.

    python -m lab.stop_rules checkpoints/pilot_s70 checkpoints/pilot_s71 --output docs/stop_rules.md --workers 2

A run folder holds one periodic checkpoint (step_*.pt) per evaluation, written just after it (`--eval-every E
--checkpoint-every E --keep-checkpoints <many>`): its eval_history's last entry is exactly what the run saw at
that evaluation. Each rule is played through those checkpoints in step order as train.py plays its
--target-return: where the evaluation's mean reaches the rule's trigger, the checkpoint plays a 100-episode
check on the seeds train.py's k-th check would use (seed + TARGET_SEED_OFFSET + k * 100, k counting this
rule's checks so far), and the rule stops at the first check its condition passes (a polish rule trains on
for N env steps: the first checkpoint at or beyond the pass + N). A rule that never passes ends at the run's
last checkpoint, final.pt once the run has ended (the cap). The agent each rule stopped with then plays
unseen episodes (1000-1099 by default), as does a checkpoint about every 10k env steps (the trajectory).

Every evaluation (a checkpoint on a set of seeds) is kept in a JSON cache with each episode's return and,
on LunarLanderContinuous, its outcome (lab.outcomes): rules share it, reruns evaluate nothing twice and an
interrupted replay resumes where it stopped.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import multiprocessing
import os
import shlex
import sys
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from lab import outcomes
from lab.provenance import provenance
from plumbing import OneLineErrorParser, TrainingState, fail, final_checkpoint, periodic_checkpoints
from sac_model import (
    EVAL_SEED_OFFSET, TARGET_SEED_OFFSET, SACConfig, SACError, check_lower_bound, check_seed, checkpoint_config,
    evaluation_seed, load_agent_and_env, read_checkpoint,
)

CHECK_EPISODES = SACConfig().target_episodes  # the check every rule here makes, as train.py's default
CHECK_STD_ERRORS = SACConfig().target_std_errors  # lower bound = mean - 2 std / sqrt(episodes), as train.py's
LANDING_RETURN = 200.0  # an episode at or above this counts as a landing (LunarLander's solved threshold)
TRAJECTORY_EVERY = 10_000  # env steps between the trajectory's checkpoints
CACHE_VERSION = 1


class Pending(Exception):
    """An evaluation the cache does not hold yet; the replay asks for it and simulates again."""

    def __init__(self, job: "Job") -> None:
        super().__init__(job.key)
        self.job = job


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """A periodic checkpoint and the 10-episode evaluation the run made at its step (None: none was made there,
    e.g. a checkpoint written on a stop signal mid-episode)."""

    path: Path
    step: int
    eval_mean: float | None


@dataclasses.dataclass(frozen=True)
class Run:
    """A run folder's periodic checkpoints in step order, and what its seeds were."""

    name: str
    folder: Path
    seed: int
    env_id: str
    eval_episodes: int
    checkpoints: tuple[Checkpoint, ...]
    ended: bool = False  # final.pt is at or past the last periodic checkpoint (else training, or stopped early)

    @property
    def classifiable(self) -> bool:
        """Whether lab.outcomes can name how its episodes end (LunarLanderContinuous only)."""
        return outcomes.classifiable(self.env_id)


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """A checkpoint's deterministic episodes on consecutive seeds: returns, and outcomes where classifiable."""

    returns: tuple[float, ...]
    outcomes: tuple[str, ...] | None

    @property
    def mean(self) -> float:
        return float(np.mean(self.returns))

    @property
    def std(self) -> float:
        return float(np.std(self.returns))  # population std, as train.py's checks

    @property
    def lower_bound(self) -> float:
        return check_lower_bound(self.mean, self.std, len(self.returns), CHECK_STD_ERRORS)

    @property
    def below_zero(self) -> int:
        return sum(r < 0 for r in self.returns)

    @property
    def landings(self) -> int:
        return sum(r >= LANDING_RETURN for r in self.returns)

    @property
    def real_crashes(self) -> int | None:
        return None if self.outcomes is None else sum(o in outcomes.CRASHES for o in self.outcomes)


@dataclasses.dataclass(frozen=True)
class Rule:
    """When a run stops. With a trigger: at each evaluation whose mean reaches `trigger`, a check; it passes when
    its lower bound reaches `trigger` and every condition given holds; the run stops at the first pass, or
    `after_pass` env steps later. With `budget` instead: no checks, the first checkpoint at or beyond it."""

    label: str
    trigger: float | None = None
    max_below_zero: int | None = None  # check episodes with return < 0
    min_landings: int | None = None  # check episodes with return >= LANDING_RETURN
    max_real_crashes: int | None = None  # check episodes lab.outcomes calls a crash (body or out of bounds)
    after_pass: int = 0
    budget: int | None = None

    @property
    def needs_outcomes(self) -> bool:
        return self.max_real_crashes is not None

    def passes(self, check: Evaluation) -> bool:
        return (check.lower_bound >= self.trigger
                and (self.max_below_zero is None or check.below_zero <= self.max_below_zero)
                and (self.min_landings is None or check.landings >= self.min_landings)
                and (self.max_real_crashes is None or check.real_crashes <= self.max_real_crashes))


def first(target: float) -> Rule:
    """train.py's --target-return: trigger and pass at `target`."""
    return Rule(f"first({target:g})", target)


def crashes(target: float, most: int) -> Rule:
    return Rule(f"crashes({target:g}, {most})", target, max_below_zero=most)


def landings(target: float, least: int) -> Rule:
    return Rule(f"landings({target:g}, {least})", target, min_landings=least)


def real_crashes(target: float, most: int) -> Rule:
    return Rule(f"real_crashes({target:g}, {most})", target, max_real_crashes=most)


def polish(steps: int, target: float = 200.0) -> Rule:
    return Rule(f"polish({steps // 1000}k)" if steps % 1000 == 0 else f"polish({steps})", target, after_pass=steps)


def budget(steps: int) -> Rule:
    return Rule(f"budget({steps // 1000}k)" if steps % 1000 == 0 else f"budget({steps})", budget=steps)


def default_rules(target: float = 200.0) -> list[Rule]:
    """The rules compared; `target` stands for 200 (the same offsets above it), so a test can use another scale."""
    t = target
    return [first(t), first(t + 20), first(t + 30), first(t + 40), first(t + 50), first(t + 60), first(t + 70),
            crashes(t, 0), crashes(t, 1), crashes(t, 2), crashes(t + 20, 2),
            landings(t, 90), landings(t, 95),
            real_crashes(t, 1), real_crashes(t, 2), real_crashes(t + 20, 2),
            polish(20_000, t), polish(40_000, t), polish(60_000, t),
            budget(100_000), budget(150_000)]


@dataclasses.dataclass(frozen=True)
class Check:
    step: int
    first_seed: int
    evaluation: Evaluation
    passed: bool


@dataclasses.dataclass(frozen=True)
class Stop:
    """Where a rule ended a run: the agent it stopped with, how (passed, polished, budget, cap) and its checks.
    `agent` is None where the rule cannot be simulated (real crashes on an env lab.outcomes cannot classify)."""

    rule: Rule
    run: str
    agent: Checkpoint | None
    ended_by: str
    checks: tuple[Check, ...]

    @property
    def passed(self) -> Check | None:
        return self.checks[-1] if self.checks and self.checks[-1].passed else None


Evaluate = Callable[[Checkpoint, int, int], Evaluation]  # (checkpoint, first seed, episodes) -> its episodes


def at_or_after(checkpoints: Sequence[Checkpoint], step: int) -> Checkpoint | None:
    return next((c for c in checkpoints if c.step >= step), None)


def simulate(rule: Rule, run: Run, evaluate: Evaluate, check_episodes: int = CHECK_EPISODES) -> Stop:
    """What `rule` would have done in `run`, evaluation by evaluation, as train.py would have done it."""
    checkpoints = run.checkpoints
    cap = checkpoints[-1]
    if rule.needs_outcomes and not run.classifiable:
        return Stop(rule, run.name, None, "n/a", ())
    if rule.budget is not None:
        reached = at_or_after(checkpoints, rule.budget)
        return Stop(rule, run.name, reached or cap, "budget" if reached else "cap", ())
    checks: list[Check] = []
    for checkpoint in checkpoints:
        if checkpoint.eval_mean is None or checkpoint.eval_mean < rule.trigger:
            continue
        first_seed = check_seed(seeding(run, check_episodes), len(checks))
        evaluation = evaluate(checkpoint, first_seed, check_episodes)
        checks.append(Check(checkpoint.step, first_seed, evaluation, rule.passes(evaluation)))
        if not checks[-1].passed:
            continue
        if not rule.after_pass:
            return Stop(rule, run.name, checkpoint, "passed", tuple(checks))
        polished = at_or_after(checkpoints, checkpoint.step + rule.after_pass)
        return Stop(rule, run.name, polished or cap, "polished" if polished else "passed, cap before + N",
                    tuple(checks))
    return Stop(rule, run.name, cap, "cap", tuple(checks))


def read_run(folder: Path) -> Run:
    """A run folder's periodic checkpoints (step_*.pt) in step order, each with the evaluation made at its step,
    then final.pt where the run has ended past the last of them: the agent a run that spends its whole step
    budget delivers (train.py always evaluates it), so the cap is the fixed budget's own agent."""
    found = periodic_checkpoints(folder)
    if not found:
        raise SACError(f"{folder}: no periodic checkpoints (step_*.pt)")
    checkpoints, config, ended = [], None, False
    final = final_checkpoint(folder)
    for step, path in found + ([(None, final)] if final.is_file() else []):
        checkpoint = read_checkpoint(path)
        training = TrainingState.of(checkpoint, path)
        if step is None:  # final.pt: kept only if it is newer than every periodic checkpoint
            step = training.global_step
            ended = step >= checkpoints[-1].step
            if not ended or step == checkpoints[-1].step:  # a stale final.pt, or the same agent as the last
                continue
        elif training.global_step != step:
            raise SACError(f"{path}: holds env step {training.global_step}, not the {step} of its name")
        history = training.eval_history
        evaluated = bool(history) and history[-1][0] == step
        checkpoints.append(Checkpoint(path, step, float(history[-1][1]) if evaluated else None))
        config = checkpoint_config(checkpoint)
    return Run(folder.name, folder, config.seed, config.env, config.eval_episodes, tuple(checkpoints), ended)


def seeding(run: Run, check_episodes: int) -> SACConfig:
    """The settings train.py derives a run's evaluation and check seeds from (`evaluation_seed`, `check_seed`)."""
    return SACConfig(seed=run.seed, eval_episodes=run.eval_episodes, target_episodes=check_episodes)

@dataclasses.dataclass(frozen=True)
class Job:
    """One evaluation to make: `episodes` episodes of a checkpoint, the i-th reset with `first_seed + i`."""

    run: str
    path: str
    first_seed: int
    episodes: int
    classify: bool

    @property
    def key(self) -> str:
        return f"{self.run}/{Path(self.path).name}|{self.first_seed}|{self.episodes}"


def play_job(job: Job) -> dict:
    """Play a job's episodes (deterministic, as sac_model.evaluate_policy): a check here equals the one
    train.py would have made."""
    agent, env = load_agent_and_env(job.path)
    try:
        returns, kinds = outcomes.play_episodes(agent, env, job.episodes, job.first_seed, job.classify)
    finally:
        env.close()
    return {"returns": returns, "outcomes": kinds}


def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)  # a batch-1 forward gains nothing from more, and the workers share the cores


class Cache:
    """Every evaluation made, in a JSON file rewritten (atomically) after each new one."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: dict[str, dict] = {}
        if path.is_file():
            try:
                data = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError) as error:
                raise SACError(f"{path}: not a readable cache ({error})") from None
            if data.get("version") != CACHE_VERSION:
                raise SACError(f"{path}: cache version {data.get('version')!r}, this code writes {CACHE_VERSION}")
            self.entries = data["evaluations"]
        self.made = 0  # evaluations made by this process

    def lookup(self, run: Run) -> Evaluate:
        """An Evaluate for `run` that answers from the cache, or raises Pending with the job to run."""
        def evaluate(checkpoint: Checkpoint, first_seed: int, episodes: int) -> Evaluation:
            job = Job(run.name, str(checkpoint.path), first_seed, episodes, run.classifiable)
            entry = self.entries.get(job.key)
            if entry is None or len(entry["returns"]) != episodes or (job.classify and entry["outcomes"] is None):
                raise Pending(job)
            return Evaluation(tuple(entry["returns"]), tuple(entry["outcomes"]) if job.classify else None)
        return evaluate

    def put(self, job: Job, result: dict) -> None:
        self.entries[job.key] = result
        self.made += 1
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        temporary.write_text(json.dumps({"version": CACHE_VERSION, "evaluations": self.entries}, indent=0) + "\n")
        os.replace(temporary, self.path)

    def run_jobs(self, jobs: Sequence[Job], workers: int) -> None:
        """Make the jobs' evaluations, `workers` processes at a time, keeping each as it finishes."""
        def done(job: Job, result: dict) -> None:
            self.put(job, result)
            print(f"evaluated {job.key}: mean {np.mean(result['returns']):.1f} "
                  f"({self.made} made, {len(jobs)} asked this round)", file=sys.stderr, flush=True)

        if workers <= 1:
            for job in jobs:
                done(job, play_job(job))
            return
        context = multiprocessing.get_context("spawn")  # forking a process that has run torch can hang its threads
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context, initializer=_one_thread) as pool:
            futures = {pool.submit(play_job, job): job for job in jobs}
            for future in concurrent.futures.as_completed(futures):
                done(futures[future], future.result())


def resolve(simulations: Callable[[], list], cache: Cache, workers: int) -> list:
    """Run `simulations` against the cache, evaluating what it asks for, until it asks for nothing more.

    Each round every simulation runs until its first missing evaluation, so the jobs of one round (one per
    run and rule at most) can run side by side; a rule's next check depends on its last, so it waits a round.
    """
    while True:
        results, pending = simulations()
        if not pending:
            return results
        cache.run_jobs(list(pending.values()), workers)


def trajectory_points(run: Run, every: int = TRAJECTORY_EVERY) -> list[Checkpoint]:
    """The first checkpoint at or beyond every `every` env steps, and the last."""
    last = run.checkpoints[-1]
    points = [at_or_after(run.checkpoints, mark) for mark in range(every, last.step + 1, every)]
    chosen = list(dict.fromkeys(p for p in points + [last] if p is not None))
    return sorted(chosen, key=lambda c: c.step)


@dataclasses.dataclass
class Replay:
    runs: list[Run]
    rules: list[Rule]
    stops: dict[tuple[str, str], Stop]  # (run, rule label)
    unseen: dict[tuple[str, int], Evaluation]  # (run, checkpoint step)
    trajectory: dict[str, list[Checkpoint]]


def replay(runs: Sequence[Run], rules: Sequence[Rule], cache: Cache, unseen_seed: int, unseen_episodes: int,
           check_episodes: int = CHECK_EPISODES, workers: int = 1) -> Replay:
    """Every rule in every run, then the unseen episodes of every stopped agent and trajectory checkpoint."""
    def stops() -> tuple[dict, dict]:
        found, pending = {}, {}
        for run in runs:
            lookup = cache.lookup(run)
            for rule in rules:
                try:
                    found[run.name, rule.label] = simulate(rule, run, lookup, check_episodes)
                except Pending as wait:
                    pending[wait.job.key] = wait.job
        return found, pending

    found = resolve(stops, cache, workers)
    trajectory = {run.name: trajectory_points(run) for run in runs}

    def unseen() -> tuple[dict, dict]:
        evaluations, pending = {}, {}
        for run in runs:
            lookup = cache.lookup(run)
            agents = [s.agent for (name, _), s in found.items() if name == run.name and s.agent is not None]
            for checkpoint in dict.fromkeys(agents + trajectory[run.name]):
                try:
                    evaluations[run.name, checkpoint.step] = lookup(checkpoint, unseen_seed, unseen_episodes)
                except Pending as wait:
                    pending[wait.job.key] = wait.job
        return evaluations, pending

    return Replay(list(runs), list(rules), found, resolve(unseen, cache, workers), trajectory)


# --------------------------------------------------------------------------------------------
# The page
# --------------------------------------------------------------------------------------------

def _crash_cell(value: int | None) -> str:
    return "n/a" if value is None else str(value)


def _median(values: Sequence[float | None], spec: str) -> str:
    if not values:
        return "-"
    if any(v is None for v in values):
        return "n/a"
    return format(float(np.median(values)), spec)


@dataclasses.dataclass(frozen=True)
class RuleOutcome:
    """A rule across runs: its stops (simulated ones only) and the unseen evaluation of each stopped agent."""

    rule: Rule
    stops: list[Stop]
    unseen: list[Evaluation]

    @classmethod
    def of(cls, result: Replay, rule: Rule) -> RuleOutcome:
        stops = [result.stops[run.name, rule.label] for run in result.runs]
        simulated = [s for s in stops if s.agent is not None]
        return cls(rule, simulated, [result.unseen[s.run, s.agent.step] for s in simulated])

    def medians(self) -> dict[str, str]:
        if not self.stops:
            return dict.fromkeys(("passed", "step", "mean", "worst", "landings", "below", "crashes"), "n/a")
        return {"passed": str(sum(s.passed is not None for s in self.stops)),
                "step": _median([s.agent.step for s in self.stops], ",.0f"),
                "mean": _median([u.mean for u in self.unseen], ".1f"),
                "worst": f"{min(u.mean for u in self.unseen):.1f}",
                "landings": _median([u.landings for u in self.unseen], ".1f"),
                "below": _median([u.below_zero for u in self.unseen], ".1f"),
                "crashes": _median([u.real_crashes for u in self.unseen], ".1f")}


RULE_COLUMNS = ("run", "stop step", "ended by", "checks", "passing check: mean", "lower bound", "< 0",
                "unseen: mean", "std", ">= 200", "< 0", "real crashes")


def rule_rows(result: Replay, rule: Rule) -> list[list[str]]:
    """One row per run, then the median over the runs (with the worst run's unseen mean beside the median)."""
    rows = []
    for run in result.runs:
        stop = result.stops[run.name, rule.label]
        if stop.agent is None:
            rows.append([run.name, "n/a", stop.ended_by] + ["n/a"] * (len(RULE_COLUMNS) - 3))
            continue
        unseen, passed = result.unseen[run.name, stop.agent.step], stop.passed
        check = ([f"{passed.evaluation.mean:.1f}", f"{passed.evaluation.lower_bound:.1f}",
                  str(passed.evaluation.below_zero)] if passed else ["-", "-", "-"])
        rows.append([run.name, f"{stop.agent.step:,}", stop.ended_by, str(len(stop.checks)), *check,
                     f"{unseen.mean:.1f}", f"{unseen.std:.1f}", str(unseen.landings), str(unseen.below_zero),
                     _crash_cell(unseen.real_crashes)])
    outcome = RuleOutcome.of(result, rule)
    if outcome.stops:
        m = outcome.medians()
        rows.append([f"median of {len(outcome.stops)}", m["step"], f"{m['passed']} passed", "", "", "", "",
                     f"{m['mean']} (worst {m['worst']})", "", m["landings"], m["below"], m["crashes"]])
    return rows


SUMMARY_COLUMNS = ("rule", "runs that passed", "median stop step", "median unseen mean", "worst run's unseen mean",
                   "median >= 200", "median < 0", "median real crashes")


def summary_row(result: Replay, rule: Rule) -> list[str]:
    m = RuleOutcome.of(result, rule).medians()
    passed = m["passed"] if m["passed"] == "n/a" else f"{m['passed']} of {len(result.runs)}"
    if rule.budget is not None:
        passed = "- (no check)"
    return [rule.label, passed, m["step"], m["mean"], m["worst"], m["landings"], m["below"], m["crashes"]]


TRAJECTORY_COLUMNS = ("run", "env step", "the run's evaluation", "unseen: mean", "std", ">= 200", "< 0",
                      "real crashes")


def trajectory_rows(result: Replay) -> list[list[str]]:
    rows = []
    for run in result.runs:
        for checkpoint in result.trajectory[run.name]:
            unseen = result.unseen[run.name, checkpoint.step]
            rows.append([run.name, f"{checkpoint.step:,}",
                         "-" if checkpoint.eval_mean is None else f"{checkpoint.eval_mean:.1f}", f"{unseen.mean:.1f}",
                         f"{unseen.std:.1f}", str(unseen.landings), str(unseen.below_zero),
                         _crash_cell(unseen.real_crashes)])
    return rows


def table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return (["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
            + ["| " + " | ".join(row) + " |" for row in rows])


def seed_note(result: Replay, unseen_seed: int, unseen_episodes: int, check_episodes: int) -> str:
    """Which seeds each kind of episode used, and whether any two kinds share one (checked, not assumed)."""
    unseen = set(range(unseen_seed, unseen_seed + unseen_episodes))
    clashes = []
    for run in result.runs:
        made = max((len(s.checks) for (name, _), s in result.stops.items() if name == run.name), default=0)
        seeds = seeding(run, check_episodes)
        checks = set(range(check_seed(seeds, 0), check_seed(seeds, made)))
        evals = set(range(evaluation_seed(seeds), evaluation_seed(seeds) + run.eval_episodes))
        kinds = {"training's one seeded reset": {run.seed}, "the periodic evaluations": evals,
                 "the checks": checks, "the unseen episodes": unseen}
        names = list(kinds)
        clashes += [f"{run.name}: {a} and {b}" for i, a in enumerate(names) for b in names[i + 1:]
                    if kinds[a] & kinds[b]]
    text = (f"Seeds: training resets its env with the run's seed once and never again (later episodes continue "
            f"the env's own random stream); its periodic evaluations use seed + {EVAL_SEED_OFFSET:,} + i, the "
            f"checks seed + {TARGET_SEED_OFFSET:,} + k x {check_episodes} + i (k: the rule's checks so far), the "
            f"unseen episodes {unseen_seed}-{unseen_seed + unseen_episodes - 1}. ")
    if clashes:
        return text + "**Warning: these share seeds: " + "; ".join(clashes) + ".**"
    return text + ("Checked for every run here: no two of these sets share a seed, so the check and the unseen "
                   "episodes never replay training's or each other's start states.")


def page(result: Replay, command: str, unseen_seed: int, unseen_episodes: int,
         check_episodes: int = CHECK_EPISODES) -> str:
    unseen = f"{unseen_seed}-{unseen_seed + unseen_episodes - 1}"
    lines = ["# Stop rules replayed on saved runs", "", f"Command: `{command}`", "", provenance(), "",
             "Runs: " + ", ".join(f"`{r.folder}` (seed {r.seed}, {len(r.checkpoints)} checkpoints to env step "
                                  f"{r.checkpoints[-1].step:,}, "
                                  + ("ended" if r.ended else "no final.pt yet: the cap is the last periodic "
                                     "checkpoint, the run may still be training") + ")" for r in result.runs)
             + ".", "",
             f"Each rule is played through a run's periodic checkpoints in step order, as train.py would: where "
             f"the evaluation the run made there (its --eval-episodes episodes) reaches the rule's trigger, that "
             f"checkpoint plays a {check_episodes}-episode check (lower bound = mean - {CHECK_STD_ERRORS:g} std / "
             f"sqrt({check_episodes})) and the rule stops at the first check it passes; polish(N) stops at the "
             f"first checkpoint at or beyond that pass + N env steps; budget(N) makes no check and stops at the "
             f"first checkpoint at or beyond N; a rule that never passes ends at the run's last checkpoint (the "
             f"cap: final.pt once the run has ended). The agent it stopped with then plays the unseen episodes "
             f"{unseen}. first(T): trigger and pass at T; "
             f"crashes(T, k): and at most k check episodes below 0; landings(T, f): and at least f at or above "
             f"{LANDING_RETURN:g}; real_crashes(T, k): and at most k that crashed (body on the ground or out of "
             f"bounds, lab.outcomes), n/a on envs other than LunarLanderContinuous.", "",
             seed_note(result, unseen_seed, unseen_episodes, check_episodes), "",
             "## Summary", "", *table(SUMMARY_COLUMNS, [summary_row(result, rule) for rule in result.rules]), ""]
    for rule in result.rules:
        lines += [f"## {rule.label}", "", *table(RULE_COLUMNS, rule_rows(result, rule)), ""]
    lines += [f"## Trajectory: unseen episodes {unseen} about every {TRAJECTORY_EVERY:,} env steps", "",
              *table(TRAJECTORY_COLUMNS, trajectory_rows(result)), ""]
    return "\n".join(lines).rstrip("\n") + "\n"


def build_parser() -> OneLineErrorParser:
    parser = OneLineErrorParser(prog="python -m lab.stop_rules", description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", type=Path, metavar="CHECKPOINT_FOLDER",
                        help="Run folders (checkpoints/<run>) holding one step_*.pt per evaluation.")
    parser.add_argument("--unseen-seed", type=int, default=1000,
                        help="The stopped agents' unseen episode i is reset with this seed plus i (default: "
                             "%(default)s).")
    parser.add_argument("--unseen-episodes", type=int, default=100,
                        help="Unseen episodes per stopped agent and trajectory checkpoint (default: %(default)s).")
    parser.add_argument("--check-episodes", type=int, default=CHECK_EPISODES,
                        help="Episodes per check, as train.py's --target-episodes (default: %(default)s).")
    parser.add_argument("--target", type=float, default=200.0,
                        help="The rules' base target: first(T) for T = target + 0, 20, 30, 40, 50 and so on; "
                             "LunarLander's is 200 (default: %(default)s).")
    parser.add_argument("--cache", type=Path, default=Path("studies/stop_rules/cache.json"), metavar="PATH",
                        help="JSON file of every evaluation made; reused and extended (default: %(default)s).")
    parser.add_argument("--output", type=Path, default=None, metavar="PAGE.md",
                        help="Write the Markdown page here (default: print it).")
    parser.add_argument("--workers", type=int, default=1,
                        help="Processes evaluating side by side, one torch thread each (default: %(default)s).")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    if min(args.unseen_episodes, args.check_episodes, args.workers) <= 0:
        fail("--unseen-episodes, --check-episodes and --workers must be positive")
    missing = [str(f) for f in args.folders if not f.is_dir()]
    if missing:
        fail(f"no run folder {missing[0]}")
    if len({f.name for f in args.folders}) != len(args.folders):
        fail("the run folders' names must differ: the cache keys evaluations by run folder name")
    _one_thread()
    try:
        runs = [read_run(folder) for folder in args.folders]
        cache = Cache(args.cache)
        result = replay(runs, default_rules(args.target), cache, args.unseen_seed, args.unseen_episodes,
                        args.check_episodes, args.workers)
    except SACError as error:
        fail(str(error))
    text = page(result, "python -m lab.stop_rules " + shlex.join(argv), args.unseen_seed, args.unseen_episodes,
                args.check_episodes)
    print(f"{cache.made} evaluations made this time; {args.cache} holds {len(cache.entries)}", file=sys.stderr)
    if args.output is None:
        print(text)
        return 0
    try:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text)
    except OSError as error:
        fail(f"cannot write {args.output}: {error.strerror or error}")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
