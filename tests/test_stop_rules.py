"""lab.stop_rules: each rule played through synthetic checkpoints with a stub evaluation (check seeds, passes,
conditions, polish, the cap), the cache's reuse and resumption, and one real replay of a tiny Pendulum run."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lab import stop_rules
from lab.outcomes import CRASHED_BODY, CRASHED_OUT, LANDED_ON_PAD
from lab.stop_rules import (
    Cache, Checkpoint, Evaluation, Job, Run, budget, crashes, default_rules, first, landings, polish, read_run,
    real_crashes, replay, simulate,
)
from sac_model import TARGET_SEED_OFFSET, evaluate_policy, load_agent_and_env

REPO = Path(__file__).resolve().parent.parent
SEED = 7


def run_of(evals: dict[int, float | None], env_id: str = "LunarLanderContinuous-v3", seed: int = SEED) -> Run:
    """A run whose periodic checkpoints sit at the given env steps, each with its evaluation's mean."""
    checkpoints = tuple(Checkpoint(Path(f"/nowhere/run/step_{step:09d}.pt"), step, mean)
                        for step, mean in sorted(evals.items()))
    return Run("run", Path("/nowhere/run"), seed, env_id, 10, checkpoints)


def episodes(good: int, score: float = 260.0, bad: float = -80.0, outcome: str = CRASHED_BODY,
             total: int = 100) -> Evaluation:
    """`good` episodes scoring `score` and landing on the pad, the rest scoring `bad` with `outcome`."""
    return Evaluation(tuple([score] * good + [bad] * (total - good)),
                      tuple([LANDED_ON_PAD] * good + [outcome] * (total - good)))


class Stub:
    """An evaluation function answering per checkpoint step, recording every call."""

    def __init__(self, by_step: dict[int, Evaluation]) -> None:
        self.by_step, self.calls = by_step, []

    def __call__(self, checkpoint: Checkpoint, first_seed: int, count: int) -> Evaluation:
        self.calls.append((checkpoint.step, first_seed, count))
        return self.by_step[checkpoint.step]


PASSING = episodes(100)  # every episode 260: lower bound 260
FAILING = episodes(60)  # mean 124: lower bound far below 200


def test_first_checks_only_where_the_evaluation_reaches_the_target_and_stops_at_the_first_pass():
    run = run_of({1000: 150.0, 2000: 210.0, 3000: 199.9, 4000: 230.0, 5000: 250.0, 6000: 260.0})
    stub = Stub({2000: FAILING, 4000: PASSING, 5000: PASSING, 6000: PASSING})
    stop = simulate(first(200), run, stub)
    # train.py's k-th check plays seed + TARGET_SEED_OFFSET + k * target_episodes onwards, k = checks made so far.
    assert stub.calls == [(2000, SEED + TARGET_SEED_OFFSET, 100), (4000, SEED + TARGET_SEED_OFFSET + 100, 100)]
    assert stop.agent.step == 4000 and stop.ended_by == "passed"
    assert [c.passed for c in stop.checks] == [False, True] and stop.passed.step == 4000
    # With 10-episode checks the seeds advance by 10, as train.py's with --target-episodes 10.
    stub = Stub({2000: FAILING, 4000: FAILING, 5000: PASSING})
    simulate(first(200), run, stub, check_episodes=10)
    assert [seed for _, seed, _ in stub.calls] == [SEED + TARGET_SEED_OFFSET + 10 * k for k in range(3)]


def test_a_higher_target_triggers_later_and_a_checkpoint_without_an_evaluation_is_never_checked():
    run = run_of({1000: 210.0, 2000: None, 3000: 245.0, 4000: 251.0})
    stub = Stub({4000: PASSING})
    assert simulate(first(250), run, stub).agent.step == 4000
    assert stub.calls == [(4000, SEED + TARGET_SEED_OFFSET, 100)]  # its first check: k = 0


def test_the_pass_needs_the_lower_bound_not_the_mean():
    wide = Evaluation(tuple([480.0] * 50 + [-40.0] * 50), None)  # mean 220, std 260: lower bound 168
    assert wide.mean == pytest.approx(220.0) and wide.lower_bound == pytest.approx(220.0 - 2 * 260.0 / 10)
    run = run_of({1000: 230.0, 2000: 230.0})
    stop = simulate(first(200), run, Stub({1000: wide, 2000: wide}))
    assert stop.ended_by == "cap" and stop.agent.step == 2000 and len(stop.checks) == 2 and stop.passed is None


def test_a_rule_that_never_passes_ends_at_the_last_checkpoint():
    run = run_of({1000: 100.0, 2000: 220.0, 3000: 150.0})
    stop = simulate(first(200), run, Stub({2000: FAILING}))
    assert (stop.agent.step, stop.ended_by, len(stop.checks)) == (3000, "cap", 1)
    never = Stub({})
    assert simulate(first(250), run, never).ended_by == "cap" and never.calls == []


def test_crashes_counts_check_episodes_below_zero():
    one_below = Evaluation(tuple([270.0] * 99 + [-5.0]), None)  # lower bound ~ 262
    run = run_of({1000: 230.0, 2000: 240.0})
    assert simulate(crashes(200, 0), run, Stub({1000: one_below, 2000: one_below})).ended_by == "cap"
    stop = simulate(crashes(200, 1), run, Stub({1000: one_below, 2000: one_below}))
    assert stop.ended_by == "passed" and stop.agent.step == 1000
    # The bound still has to hold: no episode below 0 is not enough on its own.
    low = Evaluation(tuple([150.0] * 100), None)
    assert simulate(crashes(200, 2), run, Stub({1000: low, 2000: low})).ended_by == "cap"
    assert simulate(crashes(220, 2), run, Stub({1000: one_below, 2000: one_below})).agent.step == 1000


def test_landings_counts_check_episodes_at_or_above_200():
    ninety_four = Evaluation(tuple([250.0] * 94 + [199.0] * 6), None)  # lower bound ~ 245
    run = run_of({1000: 230.0, 2000: 240.0})
    assert simulate(landings(200, 95), run, Stub({1000: ninety_four, 2000: ninety_four})).ended_by == "cap"
    assert simulate(landings(200, 90), run, Stub({1000: ninety_four, 2000: ninety_four})).agent.step == 1000
    exactly = Evaluation(tuple([200.0] * 95 + [150.0] * 5), None)  # 200 itself counts, 150 does not
    assert simulate(landings(100, 95), run, Stub({1000: exactly})).agent.step == 1000
    assert simulate(landings(100, 96), run, Stub({1000: exactly, 2000: exactly})).ended_by == "cap"


def test_real_crashes_counts_the_outcomes_not_the_returns():
    # Two crashes that kept a positive return (the shaping of a good approach), one timed-out hover below 0.
    check = Evaluation(tuple([260.0] * 97 + [30.0, 20.0, -50.0]),
                       tuple([LANDED_ON_PAD] * 97 + [CRASHED_BODY, CRASHED_OUT, "timed out: hovering"]))
    assert (check.real_crashes, check.below_zero) == (2, 1)
    run = run_of({1000: 230.0, 2000: 240.0})
    assert simulate(real_crashes(200, 1), run, Stub({1000: check, 2000: check})).ended_by == "cap"
    assert simulate(real_crashes(200, 2), run, Stub({1000: check, 2000: check})).agent.step == 1000
    # Outcomes are LunarLander's: on another env the rule is not simulated at all.
    stub = Stub({})
    stop = simulate(real_crashes(200, 2), run_of({1000: 230.0}, env_id="Pendulum-v1"), stub)
    assert stop.agent is None and stop.ended_by == "n/a" and stub.calls == []


def test_polish_stops_at_the_first_checkpoint_at_or_beyond_the_pass_plus_n():
    run = run_of({10_000: 230.0, 25_000: 100.0, 31_000: 240.0, 40_000: 250.0, 52_000: 250.0})
    stub = Stub({10_000: PASSING})
    stop = simulate(polish(20_000), run, stub)
    assert stop.agent.step == 31_000 and stop.ended_by == "polished" and stop.passed.step == 10_000
    assert len(stub.calls) == 1  # no checks after the pass
    assert simulate(polish(30_000), run, Stub({10_000: PASSING})).agent.step == 40_000  # exactly at the mark
    cut = simulate(polish(60_000), run, Stub({10_000: PASSING}))
    assert cut.agent.step == 52_000 and cut.ended_by == "passed, cap before + N"
    # No pass at all: the cap, like any rule.
    assert simulate(polish(20_000), run, Stub({s: FAILING for s in (10_000, 31_000, 40_000, 52_000)})).ended_by == "cap"


def test_budget_stops_at_the_first_checkpoint_at_or_beyond_it_without_checking():
    run = run_of({60_000: 100.0, 100_500: 250.0, 140_000: 260.0})
    stub = Stub({})
    assert simulate(budget(100_000), run, stub).agent.step == 100_500 and stub.calls == []
    assert simulate(budget(150_000), run, stub).ended_by == "cap"


def test_the_cache_is_reused_by_a_rerun_and_resumes_an_interrupted_replay(tmp_path: Path, monkeypatch):
    run = run_of({1000: 210.0, 2000: 230.0, 12_000: 240.0, 21_000: 250.0})
    by_seed = {SEED + TARGET_SEED_OFFSET: episodes(60), SEED + TARGET_SEED_OFFSET + 100: episodes(100)}
    played: list[str] = []

    def fake_play(job: Job) -> dict:
        played.append(job.key)
        result = by_seed.get(job.first_seed, episodes(job.episodes, total=job.episodes))
        return {"returns": list(result.returns), "outcomes": list(result.outcomes)}

    monkeypatch.setattr(stop_rules, "play_job", fake_play)
    path = tmp_path / "cache.json"
    rules = default_rules()
    first_pass = replay([run], rules, Cache(path), 1000, 5)
    made = len(played)
    keys = set(json.loads(path.read_text())["evaluations"])
    assert made == len(keys) == len(set(played))  # each evaluation made once, whatever number of rules asked
    assert f"run/step_000001000.pt|{SEED + TARGET_SEED_OFFSET}|100" in keys
    assert f"run/step_000002000.pt|{SEED + TARGET_SEED_OFFSET + 100}|100" in keys
    assert first_pass.stops["run", "first(200)"].agent.step == 2000
    assert f"run/step_000002000.pt|1000|5" in keys  # first(200)'s agent on the unseen episodes

    played.clear()
    again = Cache(path)
    second = replay([run], rules, again, 1000, 5)
    assert played == [] and again.made == 0
    assert second.stops == first_pass.stops and second.unseen == first_pass.unseen

    # Interrupted after two evaluations: the next replay makes only the rest.
    path.unlink()
    calls = {"n": 0}

    def interrupted(job: Job) -> dict:
        calls["n"] += 1
        if calls["n"] > 2:
            raise KeyboardInterrupt
        return fake_play(job)

    monkeypatch.setattr(stop_rules, "play_job", interrupted)
    played.clear()
    with pytest.raises(KeyboardInterrupt):
        replay([run], rules, Cache(path), 1000, 5)
    assert len(json.loads(path.read_text())["evaluations"]) == 2
    monkeypatch.setattr(stop_rules, "play_job", fake_play)
    resumed = Cache(path)
    third = replay([run], rules, resumed, 1000, 5)
    assert resumed.made == made - 2 and len(played) == made
    assert third.stops == first_pass.stops


def test_a_real_replay_of_a_tiny_pendulum_run(tmp_path: Path):
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    train = subprocess.run(
        [sys.executable, str(REPO / "train.py"), "--env", "Pendulum-v1", "--hidden-size", "32", "--batch-size", "32",
         "--buffer-size", "5000", "--start-steps", "200", "--update-after", "200", "--threads", "1", "--no-compile",
         "--episodes", "6", "--eval-every", "2", "--eval-episodes", "1", "--checkpoint-every", "2",
         "--keep-checkpoints", "100", "--target-return", "none", "--run-name", "r"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert train.returncode == 0, train.stderr
    folder = tmp_path / "checkpoints" / "r"
    # Every Pendulum return is above -10,000 and below 0: first(T) passes at its first check, at the first
    # evaluation (episode 2, env step 400); crashes(T, k) never passes and checks all three evaluations.
    args = [sys.executable, "-m", "lab.stop_rules", str(folder), "--target", "-10000", "--check-episodes", "2",
            "--unseen-episodes", "2", "--cache", str(tmp_path / "cache.json"), "--output", str(tmp_path / "page.md")]
    result = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    page = (tmp_path / "page.md").read_text()
    rows = {line.split(" | ")[0].lstrip("| "): line.strip("| ").split(" | ") for line in page.splitlines()
            if line.startswith("| ") and "(" in line.split(" | ")[0]}  # the summary's rows, one per rule
    assert rows["first(-10000)"][1:3] == ["1 of 1", "400"]
    assert rows["crashes(-10000, 0)"][1:3] == ["0 of 1", "1,200"]
    assert rows["landings(-10000, 90)"][1:3] == ["0 of 1", "1,200"]
    assert rows["real_crashes(-10000, 2)"][1:] == ["n/a"] * 7
    assert rows["polish(20k)"][1:3] == ["1 of 1", "1,200"]
    assert rows["budget(100k)"][1:3] == ["- (no check)", "1,200"]
    assert rows["first(-10000)"][7] == "n/a" and rows["polish(20k)"][7] == "n/a"  # no outcomes off LunarLander
    section = page.split("## first(-10000)\n")[1].split("\n## ")[0]
    run_row = next(line for line in section.splitlines() if line.startswith("| r |")).strip("| ").split(" | ")
    assert run_row[1:4] == ["400", "passed", "1"] and run_row[6] == "2"  # both check episodes below 0
    assert "| r | 1,200 |" in page.split("## Trajectory")[1]
    assert "no two of these sets share a seed" in page and "Ran at commit " in page

    cache = json.loads((tmp_path / "cache.json").read_text())["evaluations"]
    first_seed = TARGET_SEED_OFFSET  # the run's seed is 0
    assert {f"r/step_000000400.pt|{first_seed}|2", f"r/step_000000800.pt|{first_seed + 2}|2",
            f"r/step_000001200.pt|{first_seed + 4}|2", "r/step_000000400.pt|1000|2",
            "r/step_000001200.pt|1000|2"} == set(cache)
    assert all(entry["outcomes"] is None for entry in cache.values())
    # The replayed check is the one train.py would have made: evaluate_policy on the same seeds.
    agent, pendulum = load_agent_and_env(folder / "step_000000800.pt")
    assert cache[f"r/step_000000800.pt|{first_seed + 2}|2"]["returns"] == evaluate_policy(agent, pendulum, 2,
                                                                                         first_seed + 2)
    pendulum.close()

    # final.pt is at the last periodic checkpoint's step: the same agent, so the periodic one stays the cap.
    assert "3 checkpoints to env step 1,200, ended)" in page

    # A run whose budget ended between periodic checkpoints: final.pt is its last checkpoint, evaluated there.
    ended = tmp_path / "ended"
    ended.mkdir()
    for name in ("step_000000400.pt", "step_000000800.pt", "final.pt"):
        shutil.copy(folder / name, ended / name)
    run = read_run(ended)
    assert [(c.path.name, c.step) for c in run.checkpoints] == [
        ("step_000000400.pt", 400), ("step_000000800.pt", 800), ("final.pt", 1200)]
    assert run.ended and run.checkpoints[-1].eval_mean is not None
    assert simulate(budget(100_000), run, Stub({})).agent.path.name == "final.pt"
    whole = read_run(folder)
    assert whole.ended and [c.path.name for c in whole.checkpoints][-1] == "step_000001200.pt"

    again = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert again.returncode == 0, again.stderr
    assert "0 evaluations made this time" in again.stderr and (tmp_path / "page.md").read_text() == page
