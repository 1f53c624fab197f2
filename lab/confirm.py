"""Confirm a design on fresh seeds: `python train.py --seed N` for each seed, a few at a time.

    python -m lab.confirm --name confirm_40 --seeds 40-49 --commit

Each seed is the run a user would start, plus `--threads 1` so that runs side by side share the cores
fairly. As each run finishes, its final agent also plays episodes it never saw (seeds 1000-1099 by
default) and its row enters docs/studies/<name>.md (the curves in docs/studies/<name>.png, the results in
docs/studies/<name>.json); `--commit` commits them at once, so a session that ends loses only the runs in
flight. The same command resumes, on another machine too: the seeds in docs/studies/<name>.json are done; an
interrupted one continues from its newest checkpoint where that still exists, else starts over. The page is
headed by the commit and the machine it was last written at.
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from lab import launch, outcomes
from lab.configs import CONFIGS, VARIANTS
from lab.docs_index import require_indexed
from lab.provenance import cpu_name, cpus_named, provenance
from lab.records import commit, parse_seeds, record_threshold, solved_at, threshold_label, wall_minutes
from lab.tables import load_study, plot_curves, run_name
from plumbing import (
    CHECKPOINTS_DIR, REPO, OneLineErrorParser, TrainingState, checkpoint_files, fail, final_checkpoint,
)
from sac_model import (
    SACError, checkpoint_config, env_threshold, load_agent_and_env, read_checkpoint, target_return,
)

DEFAULTS_LABEL = "defaults"  # run folders are <label>__seed<N>, the name the study tables parse


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog="python -m lab.confirm", description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", required=True, help="study name: studies/<name>/ and docs/studies/<name>.md")
    parser.add_argument("--seeds", required=True, help="seeds never used before, e.g. 40-49")
    parser.add_argument("--concurrent", type=int, default=2, help="runs at a time, one torch thread each")
    parser.add_argument("--config", choices=[*CONFIGS, *VARIANTS], default=None,
                        help="an ablation's configuration (lab.ablate's): its train.py flags and its run label")
    parser.add_argument("--train-args", default="", help="extra train.py flags (a pilot; a confirmation has none)")
    parser.add_argument("--unseen-seed", type=int, default=1000, help="first episode seed of the unseen episodes")
    parser.add_argument("--unseen-episodes", type=int, default=100, help="unseen episodes per final agent")
    parser.add_argument("--stop-after-unsolved", type=int, default=0,
                        help="start no new seed once this many have ended unsolved (a rule already lost); 0: never")
    parser.add_argument("--baseline", default=None,
                        help="a finished study of this kind on the same seeds (its docs/studies/<name>.json), e.g. "
                             "today's default: each seed's row is compared with its row there")
    parser.add_argument("--stop-after-losses", type=int, default=0,
                        help="with --baseline: start no new seed once this many seeds were solved later than in the "
                             "baseline, or not at all (a pilot's sequential rule: drop a design at its second loss); "
                             "0: never")
    parser.add_argument("--lose-on", choices=tuple(SOONER), default="env-steps",
                        help="with --baseline: what 'later' means, env steps to the passing check or the run's wall "
                             "time to it (a design with a cheaper or dearer step: the trade is paid in minutes)")
    parser.add_argument("--docs-dir", type=Path, default=REPO / "docs" / "studies",
                        help="where <name>.md, .png and .json (the results, for resuming anywhere) go")
    parser.add_argument("--commit", action="store_true", help="git-commit <name>.md, .png and .json after each row")
    parser.add_argument("--report-only", action="store_true", help="rewrite the page from finished runs; run nothing")
    return parser


class Study:
    """The study folder (runs, checkpoints, logs), and the results file (per run: time segments and results),
    kept beside the docs page and committed with it: on a new machine, where studies/ is gone, the same
    command knows which seeds are done."""

    def __init__(self, name: str, args: argparse.Namespace) -> None:
        self.name, self.args = name, args
        self.label = args.config or DEFAULTS_LABEL
        self.train_args = [*(CONFIGS | VARIANTS).get(args.config, []), *shlex.split(args.train_args)]
        self.folder = Path("studies") / name
        self.folder.mkdir(parents=True, exist_ok=True)
        self.results_path = args.docs_dir / f"{name}.json"
        self.results = json.loads(self.results_path.read_text()) if self.results_path.is_file() else {}
        self.baseline = baseline_records(args.docs_dir, args.baseline) if args.baseline else {}

    def save(self) -> None:
        self.results_path.parent.mkdir(parents=True, exist_ok=True)
        self.results_path.write_text(json.dumps(self.results, indent=1))

    def checkpoints(self, run: str) -> Path:
        return self.folder / CHECKPOINTS_DIR / run

    def run_name(self, seed: int) -> str:
        return run_name(self.label, seed)

    def finished(self, seed: int) -> bool:
        run = self.run_name(seed)
        return run in self.results and "unseen" in self.results[run]

    def complete_records(self) -> None:
        """Give finished records written before lab.confirm kept a run's env and evaluation curve both, read from
        their final checkpoints where these are still here (the pages and tables that compare envs need them)."""
        completed = False
        for run, record in self.results.items():
            final = final_checkpoint(self.checkpoints(run))
            if "unseen" in record and not {"env", "evaluations"} <= record.keys() and final.is_file():
                checkpoint = read_checkpoint(final)
                record.update(env=checkpoint_config(checkpoint).env,
                              evaluations=TrainingState.of(checkpoint, final).eval_history)
                completed = True
        if completed:
            self.save()

    def record(self, seed: int) -> dict:
        return self.results[self.run_name(seed)]

    def command(self, seed: int) -> list[str]:
        """train.py for this seed: a new run, or the resumption of an interrupted one."""
        run = self.run_name(seed)
        flags = ["--seed", str(seed), "--threads", "1", "--run-name", run, *self.train_args]
        return launch.train_command(self.folder, run, flags)

    def start(self, seed: int) -> subprocess.Popen:
        """Start a seed's run, logging to studies/<name>/<run>.log; an interrupted segment ends at its checkpoint."""
        run = self.run_name(seed)
        record = self.results.setdefault(run, {"seed": seed, "segments": []})
        newest = max(checkpoint_files(self.checkpoints(run)), key=lambda p: p.stat().st_mtime, default=None)
        if newest is None:
            record["segments"] = []  # a fresh start: time spent on a run whose files are gone counts for nothing
        elif record["segments"] and record["segments"][-1][1] is None:
            # The session that ran it ended: what it cost is the time up to the checkpoint this run resumes from.
            record["segments"][-1][1] = newest.stat().st_mtime
        record["segments"].append([time.time(), None])
        self.save()
        command = self.command(seed)
        print(f"{time.strftime('%H:%M:%S')} start {run}: {shlex.join(command[1:])}", flush=True)
        return launch.start(command, self.folder, self.folder / f"{run}.log").process

    def finish(self, seed: int, returncode: int) -> None:
        """Record a finished run: wall time, steps, its last check, and its final agent on unseen episodes."""
        run = self.run_name(seed)
        record = self.results[run]
        record["segments"][-1][1] = time.time()
        final = final_checkpoint(self.checkpoints(run))
        if returncode != 0 or not final.is_file():
            self.save()
            raise SACError(f"{run} exited with code {returncode}; see {self.folder / (run + '.log')}")
        checkpoint = read_checkpoint(final)
        training, config = TrainingState.of(checkpoint, final), checkpoint_config(checkpoint)
        record.update(env=config.env, evaluations=training.eval_history, steps=training.global_step,
                      updates=training.updates, cap=config.total_steps,
                      checks=training.target_checks, target=target_return(config),
                      threshold=env_threshold(config.env),
                      std_errors=config.target_std_errors, target_episodes=config.target_episodes, cpu=cpu_name())
        agent, env = load_agent_and_env(final)
        try:
            record["unseen"], kinds = outcomes.play_episodes(agent, env, self.args.unseen_episodes,
                                                             self.args.unseen_seed, outcomes.classifiable(agent.env_id))
        finally:
            env.close()
        if kinds is not None:
            record["unseen_crashes"] = sum(kind in outcomes.CRASHES for kind in kinds)
        self.save()
        print(f"{time.strftime('%H:%M:%S')} done {run}: {' | '.join(row_cells(record))}", flush=True)


def baseline_records(docs_dir: Path, name: str) -> dict[int, dict]:
    """The finished records of study `name`, by seed."""
    path = docs_dir / f"{name}.json"
    if not path.is_file():
        raise SACError(f"--baseline {name}: no results file {path}")
    records = json.loads(path.read_text()).values()
    return {record["seed"]: record for record in records if "unseen" in record}


def steps_to_solved(record: dict) -> float:
    """Env steps to the passing check; infinite for a run that never passed one."""
    step = solved_at(record)
    return float("inf") if step is None else float(step)


def minutes_to_solved(record: dict) -> float:
    """The run's wall time to its passing check; infinite for a run that never passed one."""
    return wall_minutes(record) if solved_at(record) is not None else float("inf")


# How soon a seed passed its check, by --lose-on: its unit's label and how a value is shown.
SOONER = {"env-steps": (steps_to_solved, "env steps", "{:,.0f}"),
          "minutes": (minutes_to_solved, "wall time in minutes", "{:.1f}")}


def lost(record: dict, baseline: dict[int, dict], lose_on: str = "env-steps") -> bool:
    """Solved later than the baseline on the same seed (in --lose-on's unit), or not at all where the baseline was;
    a seed the baseline never ran is no loss."""
    other = baseline.get(record["seed"])
    sooner = SOONER[lose_on][0]
    return other is not None and sooner(record) > sooner(other)


def baseline_lines(study: Study, records: list[dict]) -> list[str]:
    """The table of each finished seed against the baseline's row, and the count of losses."""
    compared = [r for r in records if r["seed"] in study.baseline]
    if not compared:
        return []
    sooner, unit, shown = SOONER[study.args.lose_on]
    lines = ["", f"Against `{study.args.baseline}` on the same seeds ({unit} to the passing check):", "",
             "| seed | this study | baseline | ratio | lost |", "| --- | --- | --- | --- | --- |"]
    losses = 0
    for record in compared:
        ours, theirs = sooner(record), sooner(study.baseline[record["seed"]])
        ratio = ours / theirs if np.isfinite(ours) and np.isfinite(theirs) else float("nan")
        cells = [shown.format(x) if np.isfinite(x) else "not solved" for x in (ours, theirs)]
        shown_ratio = "-" if np.isnan(ratio) else f"{ratio:.2f}"
        lost_here = lost(record, study.baseline, study.args.lose_on)
        losses += lost_here
        lines.append(f"| {record['seed']} | {cells[0]} | {cells[1]} | {shown_ratio} | {'yes' if lost_here else 'no'} |")
    lines += ["", f"Lost on {losses} of {len(compared)} seeds."]
    return lines


def row_cells(record: dict) -> list[str]:
    unseen = np.asarray(record["unseen"])
    step = solved_at(record)
    check = record["checks"][-1] if record["checks"] else None
    if record["target"] is None:
        ended = f"no stop ({record['steps']:,})"
    else:
        ended = f"{step:,}" if step else f"not solved ({record['steps']:,})"
    return [str(record["seed"]), ended,
            f"{record['updates']:,}" if "updates" in record else "-", f"{wall_minutes(record):.1f}",
            f"{check[1]:.1f} +/- {check[2]:.1f}" if check else "none", str(len(record["checks"])), f"{unseen.mean():.1f}", f"{unseen.std():.1f}",
            solved_episodes(record), str(int((unseen < 0).sum())), str(record.get("unseen_crashes", "-"))]


def solved_episodes(record: dict) -> str:
    """How many unseen episodes reached the env's registered threshold ('-' for an env without one)."""
    threshold = record_threshold(record)
    return "-" if threshold is None else str(int((np.asarray(record["unseen"]) >= threshold).sum()))


def page(study: Study, seeds: list[int]) -> str:
    """docs/studies/<name>.md: the commit and machine, the command, the rule's figures and one row per finished
    seed."""
    args = study.args
    records = [study.record(s) for s in seeds if study.finished(s)]
    command = f"python -m lab.confirm --name {study.name} --seeds {args.seeds}" + (
        f" --config {args.config}" if args.config else "") + (
        f" --train-args {shlex.quote(args.train_args)}" if args.train_args else "") + (
        f" --stop-after-unsolved {args.stop_after_unsolved}" if args.stop_after_unsolved else "") + (
        f" --baseline {args.baseline}" if args.baseline else "") + (
        f" --stop-after-losses {args.stop_after_losses}" if args.stop_after_losses else "") + (
        f" --lose-on {args.lose_on}" if args.lose_on != build_parser().get_default("lose_on") else "") + "".join(
        f" --{name.replace('_', '-')} {getattr(args, name)}" for name in ("unseen_episodes", "unseen_seed")
        if getattr(args, name) != build_parser().get_default(name))
    lines = [f"# Study `{study.name}`", "", provenance(), "",
             f"Command: `{command}`: per seed `python train.py --seed N --threads 1"
             f"{''.join(' ' + shlex.quote(a) for a in study.train_args)}`, {args.concurrent} runs at a time "
             f"({len(records)} of {len(seeds)} seeds finished).", "",
             f"| seed | solved at env step | gradient steps | wall time (min) | last 100-episode check | checks | "
             f"unseen episodes {args.unseen_seed}-{args.unseen_seed + args.unseen_episodes - 1}: mean | std | "
             f">= {threshold_label(record_threshold(r) for r in records)} "
             "| < 0 | crashes |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    lines += ["| " + " | ".join(row_cells(record)) + " |" for record in records]
    lines += cpus_named({f"seed {r['seed']}": r.get("cpu") for r in records})
    if records:
        solved = [solved_at(r) for r in records]
        steps = [s if s is not None else np.inf for s in solved]
        minutes = [wall_minutes(r) for r in records]
        unseen = [float(np.mean(r["unseen"])) for r in records]
        median_steps = np.median(steps)
        if all(r["target"] is None for r in records):
            ended = "No stop: every run trained its whole budget"
        else:
            ended = (f"Solved: {sum(s is not None for s in solved)} of {len(records)}; median env steps to solved "
                     f"{'not reached' if np.isinf(median_steps) else f'{median_steps:,.0f}'} (unsolved count as "
                     "never)")
        lines += ["", f"{ended}; wall time median {np.median(minutes):.1f} min, slowest {max(minutes):.1f} min; final "
                  f"agents on unseen episodes: median {np.median(unseen):.1f}, lowest {min(unseen):.1f}."]
    lines += baseline_lines(study, records)
    lines += ["", "Solved: the run stopped at a check (100 deterministic episodes it had not played) whose mean "
              "minus the configured number of standard errors reached the target. Wall time: the train.py process, "
              "compile included (a resumed run adds its second start). Crashes: unseen episodes that ended with the "
              "lander's body on the ground or out of bounds (lab.outcomes; '-' where not recorded or not "
              "LunarLander); a crash after a good approach can still return more than 0.", ""]
    if records:  # the curves are drawn from the finished seeds
        lines += [f"![curves]({study.name}.png)", ""]
    return "\n".join(lines)


def write_report(study: Study, seeds: list[int]) -> list[Path]:
    docs = study.args.docs_dir
    page_path = docs / f"{study.name}.md"
    page_path.write_text(page(study, seeds))
    paths = [study.results_path, page_path]
    curves = load_study(study.folder, finished_only=True)
    if curves:
        targets = [study.record(s)["target"] for s in seeds if study.finished(s)]
        paths.append(plot_curves(curves, docs / f"{study.name}.png", threshold=targets[0] if targets else None))
    return paths


def run(study: Study, seeds: list[int]) -> None:
    """Run the unfinished seeds, `--concurrent` at a time, reporting each as it finishes. Ctrl-C reaches the
    runs too: each stops at the end of its episode with a checkpoint, which the same command resumes from."""
    waiting = [s for s in seeds if not study.finished(s)]
    running: dict[int, subprocess.Popen] = {}
    finished = [study.record(s) for s in seeds if study.finished(s)]
    unsolved = sum(solved_at(record) is None for record in finished)
    losses = sum(lost(record, study.baseline, study.args.lose_on) for record in finished)
    try:
        while waiting or running:
            stop = stop_reason(study.args, unsolved, losses)
            while waiting and len(running) < study.args.concurrent and not stop:
                seed = waiting.pop(0)
                running[seed] = study.start(seed)
            if not running:
                print(f"stopped: {stop}", flush=True)
                return
            time.sleep(5)
            for seed, process in list(running.items()):
                if process.poll() is None:
                    continue
                del running[seed]
                study.finish(seed, process.returncode)
                record = study.record(seed)
                unsolved += solved_at(record) is None
                losses += lost(record, study.baseline, study.args.lose_on)
                paths = write_report(study, seeds)
                if study.args.commit:
                    commit(paths, f"{study.name}: seed {seed} finished ({' | '.join(row_cells(record))})")
    except KeyboardInterrupt:
        for process in running.values():
            wait_for_checkpoint(process)
        raise


def stop_reason(args: argparse.Namespace, unsolved: int, losses: int) -> str | None:
    """Why no new seed may start (a rule already lost), or None."""
    if args.stop_after_unsolved and unsolved >= args.stop_after_unsolved:
        return f"{unsolved} seeds ended unsolved (--stop-after-unsolved {args.stop_after_unsolved})"
    if args.stop_after_losses and losses >= args.stop_after_losses:
        return f"{losses} seeds lost against {args.baseline} (--stop-after-losses {args.stop_after_losses})"
    return None


def wait_for_checkpoint(process: subprocess.Popen) -> None:
    """Wait for an interrupted train.py to write its checkpoint; a second Ctrl-C stops waiting for it."""
    try:
        process.wait()
    except KeyboardInterrupt:
        pass


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        seeds = parse_seeds(args.seeds)
        if args.concurrent <= 0 or args.unseen_episodes <= 0:
            raise SACError("--concurrent and --unseen-episodes must be positive")
        if args.stop_after_losses and not args.baseline:
            raise SACError("--stop-after-losses counts losses against a --baseline: name one")
        if args.commit:
            require_indexed(args.docs_dir / f"{args.name}.md")
        study = Study(args.name, args)
        study.complete_records()
        if not args.report_only:
            if args.commit and not (args.docs_dir / f"{args.name}.md").exists():
                # The docs index links the page from before the first run: from now on it exists, and says so.
                study.save()
                commit(write_report(study, seeds), f"{args.name}: started, no seed finished yet")
            run(study, seeds)
        print(f"wrote {', '.join(str(p) for p in write_report(study, seeds))}")
    except SACError as error:
        fail(str(error))
    except KeyboardInterrupt:
        fail("interrupted; the runs in flight stopped at a checkpoint: the same command resumes them", code=130)
    return 0


if __name__ == "__main__":
    sys.exit(main())
