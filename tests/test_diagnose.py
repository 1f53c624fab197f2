"""lab.diagnose and lab.outcomes: the outcome classifier, the touchdown and fuel measurements on hand-made
trajectories, the crash thresholds measured again in the env, a real run of the shipped agent, and the run-folder
table's cells where nothing was logged."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
from torch.utils.tensorboard import SummaryWriter

from sac_model import SACAgent, SACConfig, load_agent_and_env

pytest.importorskip("matplotlib", reason="the lab tools plot with matplotlib: pip install -r requirements-study.txt")
from lab import outcomes  # noqa: E402
from lab.diagnose import window_rows  # noqa: E402
from lab.outcomes import (  # noqa: E402
    CRASHED_BODY, CRASHED_OUT, LANDED_OFF_PAD, LANDED_ON_PAD, TIMED_OUT_DRIFT, TIMED_OUT_HOVER, TIMED_OUT_LEGS,
    Trajectory, classify, crash_cause, engine_powers, fuel, touchdown,
)

REPO = Path(__file__).resolve().parent.parent
SHIPPED = REPO / "pretrained" / "LunarLanderContinuous-v3.pt"


def trajectory(rows: list[list[float]], rewards: list[float], terminated: bool = False, truncated: bool = False,
               actions: list[list[float]] | None = None) -> Trajectory:
    """A hand-made episode: rows are observations (x, y, vx, vy, angle, angular velocity, left, right), the first
    from reset; one reward (and one action, engines off unless given) per step after it."""
    observations = np.array(rows, dtype=np.float64)
    steps = len(rows) - 1
    assert len(rewards) == steps
    acts = np.array(actions if actions is not None else [[-1.0, 0.0]] * steps, dtype=np.float64)
    return Trajectory(observations, acts, np.array(rewards, dtype=np.float64), terminated, truncated)


def descent(x: float, end: list[list[float]], rewards_at_end: list[float], **kwargs) -> Trajectory:
    """Three steps of a level descent at x, then the rows of `end`."""
    rows = [[x, 1.0, 0.0, -0.3, 0.0, 0.0, 0, 0], [x, 0.6, 0.0, -0.25, 0.0, 0.0, 0, 0],
            [x, 0.3, 0.0, -0.2, 0.0, 0.0, 0, 0], [x, 0.05, 0.0, -0.15, 0.02, 0.01, 0, 0]] + end
    return trajectory(rows, [1.0, 1.0, 1.0] + rewards_at_end, **kwargs)


def test_outcome_classifier_names_how_each_hand_made_episode_ended():
    on_pad = descent(0.05, [[0.05, 0.0, 0.0, -0.1, 0.0, 0.0, 1, 1], [0.05, 0.0, 0.0, 0.0, 0.0, 0.0, 1, 1]],
                     [20.0, 100.0], terminated=True)
    assert classify(on_pad) == LANDED_ON_PAD
    off_pad = descent(-0.45, [[-0.45, 0.0, 0.0, -0.1, 0.0, 0.0, 1, 1], [-0.45, 0.0, 0.0, 0.0, 0.0, 0.0, 1, 1]],
                      [20.0, 100.0], terminated=True)
    assert classify(off_pad) == LANDED_OFF_PAD
    # The flags are the pad's edge: at rest exactly on one still counts as on the pad, just past it does not.
    assert classify(descent(0.2, [[0.2, 0.0, 0.0, 0.0, 0.0, 0.0, 1, 1]], [100.0], terminated=True)) == LANDED_ON_PAD
    assert classify(descent(0.21, [[0.21, 0.0, 0.0, 0.0, 0.0, 0.0, 1, 1]], [100.0], terminated=True)) == LANDED_OFF_PAD
    crash = descent(0.1, [[0.1, -0.02, 0.0, -0.5, 0.5, 0.2, 0, 1]], [-100.0], terminated=True)
    assert classify(crash) == CRASHED_BODY
    out = descent(0.9, [[1.01, 0.5, 0.8, 0.0, 0.1, 0.0, 0, 0]], [-100.0], terminated=True)
    assert classify(out) == CRASHED_OUT

    hover = [[0.1 + 0.001 * (t % 3), 0.3, 0.0, 0.0, 0.0, 0.0, 0, 0] for t in range(200)]
    assert classify(trajectory(hover, [-0.3] * 199, truncated=True)) == TIMED_OUT_HOVER
    drift = [[0.1 + 0.004 * t, 0.3, 0.4, 0.0, 0.0, 0.0, 0, 0] for t in range(200)]
    assert classify(trajectory(drift, [-0.3] * 199, truncated=True)) == TIMED_OUT_DRIFT
    standing = [[0.1, 0.0, 0.0, 0.0, 0.0, 0.0, 1, 1 if t > 5 else 0] for t in range(200)]
    assert classify(trajectory(standing, [0.0] * 199, truncated=True)) == TIMED_OUT_LEGS
    # Both flags set on the same step (the time limit on the step it landed): the landing is what happened.
    assert classify(descent(0.0, [[0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1, 1]], [100.0], terminated=True,
                            truncated=True)) == LANDED_ON_PAD


def test_touchdown_is_the_approach_before_the_first_leg_contact_or_the_crash():
    rows = [[0.0, 0.5, 0.0, -0.4, 0.0, 0.0, 0, 0],
            [0.1, 0.2, 0.06, -0.33, -0.12, 0.05, 0, 0],  # the approach: the last observation in the air
            [0.11, 0.0, 0.02, -0.1, -0.2, 0.3, 0, 1],  # step 2: the right leg touches
            [0.11, 0.0, 0.0, 0.0, -0.1, 0.0, 0, 0],  # a bounce: off the ground again
            [0.11, 0.0, 0.0, 0.0, 0.0, 0.0, 1, 1]]
    landed = trajectory(rows, [1.0, 10.0, -10.0, 100.0], terminated=True)
    contact = touchdown(landed)
    assert (contact.step, contact.by) == (2, "legs")
    assert (contact.x, contact.vx, contact.vy, contact.angle, contact.angular_velocity) == (0.1, 0.06, -0.33, -0.12,
                                                                                            0.05)
    assert crash_cause(contact) == outcomes.CAUSE_FAST
    assert outcomes.airborne_after(landed, contact) == 1

    # No leg ever touched: the crash step is the contact, made by the body, judged on the approach before it.
    body_first = trajectory(rows[:2] + [[0.11, 0.0, 0.02, -0.1, -0.6, 0.3, 0, 0]], [1.0, -100.0], terminated=True)
    contact = touchdown(body_first)
    assert (contact.step, contact.by, contact.angle, contact.vy) == (2, "body", -0.12, -0.33)
    assert crash_cause(contact) == outcomes.CAUSE_FAST
    tilted = trajectory([rows[0], [0.1, 0.2, 0.0, -0.1, 0.5, 0.0, 0, 0], [0.1, 0.0, 0.0, 0.0, 0.6, 0.0, 0, 0]],
                        [1.0, -100.0], terminated=True)
    assert crash_cause(touchdown(tilted)) == outcomes.CAUSE_TILTED
    # Flying out of bounds and hovering never touch the ground.
    assert touchdown(trajectory([rows[0], [1.0, 0.5, 1.0, 0.0, 0.0, 0.0, 0, 0]], [-100.0], terminated=True)) is None
    assert touchdown(trajectory([rows[0], rows[0]], [0.0], truncated=True)) is None


def test_fuel_counts_the_engines_as_the_env_does_and_the_penalty_it_charged():
    # main: off at 0 and below, 0.5-1 power from just above 0; side: off within +-0.5, 0.5-1 power beyond;
    # actions outside [-1, 1] are clipped first.
    actions = [[-0.5, 0.0], [0.0, 0.5], [0.5, -0.6], [1.0, 0.7], [2.0, -3.0]]
    main, side = engine_powers(np.array(actions))
    assert main.tolist() == [0.0, 0.0, 0.75, 1.0, 1.0]
    assert side.tolist() == pytest.approx([0.0, 0.0, 0.6, 0.7, 1.0])
    rows = [[0.0, 0.5, 0.0, -0.2, 0.0, 0.0, 0, 0], [0.0, 0.3, 0.0, -0.2, 0.0, 0.0, 0, 0],
            [0.0, 0.1, 0.0, -0.2, 0.0, 0.0, 0, 0], [0.0, 0.0, 0.0, -0.1, 0.0, 0.0, 1, 1],
            [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1, 1], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1, 1]]
    landed = trajectory(rows, [0.0, 0.0, 20.0, 0.0, 100.0], terminated=True, actions=actions)
    spent = fuel(landed, touchdown(landed))
    assert (spent.main_steps, spent.side_steps) == (3, 3)
    assert spent.main_power == pytest.approx(2.75) and spent.side_power == pytest.approx(2.3)
    # The last step's reward was replaced by +100: its fuel was never charged.
    assert spent.penalty == pytest.approx(0.3 * 0.75 + 0.03 * 0.6 + 0.3 * 1.0 + 0.03 * 0.7)
    # Contact was seen after step 3; step 4 (index 3) is the one after it.
    assert spent.penalty_after_contact == pytest.approx(0.3 * 1.0 + 0.03 * 0.7)
    timed_out = trajectory(rows, [0.0] * 5, truncated=True, actions=actions)
    assert fuel(timed_out, None).penalty == pytest.approx(0.3 * 2.75 + 0.03 * 2.3)


def test_fuel_penalty_is_what_the_env_subtracted_from_its_rewards():
    # Each reward of a step that did not end the episode is the change of the env's shaping minus the fuel:
    # the shaping recomputed from the observations, the fuel from engine_powers, must give it back.
    agent, env = load_agent_and_env(SHIPPED)
    try:
        episode = outcomes.play(agent, env, 1000)
    finally:
        env.close()
    o = episode.observations
    shaping = (-100 * np.hypot(o[:, 0], o[:, 1]) - 100 * np.hypot(o[:, 2], o[:, 3]) - 100 * np.abs(o[:, 4])
               + 10 * o[:, 6] + 10 * o[:, 7])
    main, side = engine_powers(episode.actions)
    expected = np.diff(shaping) - 0.3 * main - 0.03 * side  # reset() ends with a step: the first has a previous
    assert episode.terminated and abs(episode.rewards[-1]) == 100  # the last reward is replaced: not compared
    assert np.abs(episode.rewards[:-1] - expected[:-1]).max() < 2e-3  # observations are float32


def level_drop(vy_world: float, angle: float = 0.0) -> tuple[np.ndarray, float]:
    """Hold the lander level over the pad until its leg joints settle, set it with its leg tips 0.05 world units
    above the pad, leaning `angle` and falling at `vy_world`, and let it drop with the engines off. Returns the
    approach (the last observation before the first contact) and the final reward (+100 rest, -100 crash)."""
    env = gym.make("LunarLanderContinuous-v3")
    env.reset(seed=0)
    lander = env.unwrapped.lander
    legs = env.unwrapped.legs
    engines_off = np.array([-1.0, 0.0])
    for _ in range(80):
        lander.linearVelocity, lander.angularVelocity, lander.angle, lander.position = (0, 0), 0.0, 0.0, (10.0, 11.0)
        env.step(engines_off)
    offsets = [(leg.position[0] - 10.0, leg.position[1] - 11.0) for leg in legs]
    tip_below = 11.0 - min(leg.position[1] for leg in legs) + 8 / 30  # LEG_H / SCALE: half the leg's length
    y = env.unwrapped.helipad_y + tip_below + 0.05
    lander.position, lander.angle = (10.0, y), angle
    for leg, (dx, dy) in zip(legs, offsets):
        leg.position = (10.0 + dx, y + dy)
    for body in [lander, *legs]:
        body.linearVelocity, body.angularVelocity = (0.0, vy_world), 0.0
    previous, approach = None, None
    for _ in range(400):
        obs, reward, terminated, _, _ = env.step(engines_off)
        if approach is None and (obs[6] or obs[7] or terminated):
            approach = previous
        previous = obs
        if terminated:
            env.close()
            return approach, float(reward)
    raise AssertionError("the dropped lander neither rested nor crashed")


def test_crash_limits_are_where_a_level_drop_with_engines_off_turns_into_a_crash():
    results = [level_drop(v) for v in (-1.5, -1.8, -2.0, -2.5)]
    assert {reward for _, reward in results} == {100.0, -100.0}
    for approach, reward in results:
        assert (reward == -100.0) == (approach[3] < -outcomes.VY_LIMIT), (approach[3], reward)
    leaning = [level_drop(-0.5, side * angle) for angle in (0.2, 0.25, 0.3) for side in (1, -1)]
    assert {reward for _, reward in leaning} == {100.0, -100.0}
    for approach, reward in leaning:
        assert (reward == -100.0) == (abs(approach[4]) > outcomes.TILT_LIMIT), (approach[4], reward)


def test_pad_half_width_is_where_the_env_puts_the_flags():
    env = gym.make("LunarLanderContinuous-v3")
    env.reset(seed=0)
    half = 600 / 30 / 2  # VIEWPORT_W / SCALE / 2: x = (pos.x - half) / half
    assert [(f - half) / half for f in (env.unwrapped.helipad_x1, env.unwrapped.helipad_x2)] == pytest.approx(
        [-outcomes.PAD_HALF_WIDTH, outcomes.PAD_HALF_WIDTH])
    env.close()


def test_diagnosing_the_shipped_agent_reports_every_episode_once(tmp_path: Path):
    output = tmp_path / "episodes.json"
    result = subprocess.run([sys.executable, "-m", "lab.diagnose", "--agent", str(SHIPPED), "--episodes", "3",
                             "--seed", "1000", "--output", str(output)], cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| outcome |"))
    rows = [line.split(" | ") for line in lines[header + 2:] if line.startswith("| ")]
    assert rows[-1][0] == "| all" and rows[-1][1] == "3"
    per_outcome = {row[0][2:]: int(row[1]) for row in rows[:-1]}
    assert set(per_outcome) <= set(outcomes.OUTCOMES) and sum(per_outcome.values()) == 3
    episodes = json.loads(output.read_text())
    assert [e["seed"] for e in episodes] == [1000, 1001, 1002]
    assert {o: sum(e["outcome"] == o for e in episodes) for o in per_outcome} == per_outcome
    # The returns are the env's: the same as sac_model.evaluate_policy's on the same seeds.
    from sac_model import evaluate_policy
    agent, env = load_agent_and_env(SHIPPED)
    try:
        assert [e["episode_return"] for e in episodes] == pytest.approx(evaluate_policy(agent, env, 3, 1000))
    finally:
        env.close()
    assert float(rows[-1][2]) == pytest.approx(np.mean([e["episode_return"] for e in episodes]), abs=0.051)
    assert any(line.startswith("No episode of 3") or "episodes returned below 200" in line for line in lines)


def test_an_agent_for_another_env_is_refused_in_one_line(tmp_path: Path):
    path = SACAgent(3, np.array([-2.0], dtype=np.float32), np.array([2.0], dtype=np.float32),
                    SACConfig(env="Pendulum-v1", hidden_size=8), env_id="Pendulum-v1").save(tmp_path / "p.pt")
    result = subprocess.run([sys.executable, "-m", "lab.diagnose", "--agent", str(path), "--episodes", "1"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "Pendulum-v1" in result.stderr


def test_a_window_without_an_evaluation_shows_a_dash_not_nan(tmp_path: Path):
    writer = SummaryWriter(str(tmp_path))
    for step, value in ((500, -50.0), (1500, 120.0)):  # one episode in each of two 1000-step windows
        writer.add_scalar("charts/episode_return", value, step)
        writer.add_scalar("charts/episode_length", 500, step)
        writer.add_scalar("charts/episode_time_limit", 0, step)
        writer.add_scalar("charts/alpha", 0.1, step)
    writer.add_scalar("eval/return_mean", 7.0, 1500)  # only the second window was evaluated
    writer.close()
    first, second = window_rows(tmp_path, 1000, -100.0, 1000)
    assert first[0] == "0-1k" and first[6] == "0.100" and first[7:] == ["-", "-", "-"]
    assert second[-1] == "7.0"
    assert not any(math.isnan(float(c)) for row in (first, second) for c in row[1:3])
