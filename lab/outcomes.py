"""How a saved LunarLander agent's episodes end, and how they got there.

    python -m lab.diagnose --agent pretrained/LunarLanderContinuous-v3.pt --episodes 100 --seed 1000

The agent plays deterministically (tanh of the mean), episode i reset with seed `seed + i` as in
`sac_model.evaluate_policy`. Every number comes from what the env returned at each step: the
observation, the reward, terminated and truncated. Per episode it records the outcome (landed on
the pad, landed off it, crashed, timed out), the approach at the first ground contact (speeds,
tilt, spin, position), the engines' use and the fuel penalty the env charged, the return and the
length. It prints a table per outcome and a verdict on where the returns below 200 come from.

The observation, as `LunarLander.step` in gymnasium/envs/box2d/lunar_lander.py builds it (world
units: the viewport is 20 wide and 13.3 high, 50 steps a second):
x = (pos.x - 10) / 10 (0 is the pad's middle, +-1 the viewport's edges), y = height above the
pad's level / 6.67, vx = vel.x * 10 / 50, vy = vel.y * 6.67 / 50 (vx 1 is
5 world units a second, vy 1 is 7.5), angle in radians, angular velocity = 0.4 * rad/s, and the two
legs' ground contacts (1 or 0). The reward of a step is the change of a shaping term (distance,
speed, tilt, +10 a leg down) minus the fuel spent; a terminating step's reward is replaced by -100
(the body touched the ground, or |x| >= 1) or +100 (the lander came to rest: Box2D put it to sleep).
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np

X, Y, VX, VY, ANGLE, ANGULAR_VELOCITY, LEFT_LEG, RIGHT_LEG = range(8)

# The env's own accounting (lunar_lander.py), not choices of ours.
PAD_HALF_WIDTH = 0.2  # the flags stand at helipad_x1, x2 = 8 and 12 world units; x = (pos.x - 10) / 10
OUT_OF_BOUNDS_X = 1.0  # step() ends the episode with -100 once |x| >= 1 (the viewport's edge)
CRASH_REWARD = -100.0  # a terminating step's reward when the body touched the ground or |x| >= 1
REST_REWARD = 100.0  # a terminating step's reward when the lander is asleep (at rest)
MAIN_ENGINE_COST = 0.30  # reward -= m_power * 0.30 each step the main engine fires (m_power 0.5-1)
SIDE_ENGINE_COST = 0.03  # reward -= s_power * 0.03 each step a side engine fires (s_power 0.5-1)
TIME_LIMIT = 1000  # LunarLander's registered max_episode_steps: truncated there

# Our thresholds for naming a crash's cause from the approach (the last observation before the
# first ground contact). Both were measured in the env: the lander held level over the pad until its
# leg joints settled, then dropped with the engines off (tests/test_diagnose.py repeats it).
# Vertical: it came to rest from approaches down to vy = -0.280 and crashed from -0.293 on.
VY_LIMIT = 0.29
# Tilt: at vy = -0.15 it came to rest leaning 0.231 rad and crashed from 0.240 on (either side): a
# leg's tip touches first and the lander pivots onto its body's lower corner. The rigid geometry
# alone would allow atan(16 / 37) = 0.41 rad; the legs' joints give, so it is less.
TILT_LIMIT = 0.235
# No horizontal limit: on the pad, level and at vy = -0.15, slides at vx up to 1.2 came to rest.
# A lander cut by the time limit with no leg down is "hovering" if it moved less than this (x and y
# in observation units, net over the last HOVER_WINDOW steps: half the pad's half-width in 2 s),
# else "drifting".
HOVER_DISTANCE = 0.1
# A leg's tip is LEG_AWAY = 20 px = 0.67 world units = 0.067 in x from the middle: with the middle
# farther out than PAD_HALF_WIDTH - LEG_SPAN, a leg stands beyond a flag, where the ground slopes.
LEG_SPAN = 0.067
HOVER_WINDOW = 100

LANDED_ON_PAD = "landed on the pad"
LANDED_OFF_PAD = "landed off the pad"
CRASHED_BODY = "crashed: body hit the ground"
CRASHED_OUT = "crashed: flew out of bounds"
TIMED_OUT_LEGS = "timed out: on its legs"
TIMED_OUT_HOVER = "timed out: hovering"
TIMED_OUT_DRIFT = "timed out: drifting"
OUTCOMES = (LANDED_ON_PAD, LANDED_OFF_PAD, CRASHED_BODY, CRASHED_OUT, TIMED_OUT_LEGS, TIMED_OUT_HOVER,
            TIMED_OUT_DRIFT)

CAUSE_TILTED = "tilted"
CAUSE_FAST = "too fast vertically"
CAUSE_BOTH = "tilted and too fast vertically"
CAUSE_WITHIN = "within both limits"


@dataclasses.dataclass
class Trajectory:
    """What the env returned over one episode: observations[0] from reset, observations[t + 1],
    rewards[t] after actions[t]; how it ended."""

    observations: np.ndarray  # (length + 1, 8)
    actions: np.ndarray  # (length, 2)
    rewards: np.ndarray  # (length,)
    terminated: bool
    truncated: bool

    @property
    def length(self) -> int:
        return len(self.actions)


@dataclasses.dataclass
class Touchdown:
    """The first ground contact: the step on which a leg's contact first reads 1 or the episode
    crashed, whichever came first, and the approach: the observation just before that step (the
    contact step's own velocities are already changed by the collision)."""

    step: int  # 1-based: the contact was seen after this many steps
    by: str  # "legs" or "body" (the crash step came before any leg touched)
    x: float
    vx: float
    vy: float
    angle: float
    angular_velocity: float


@dataclasses.dataclass
class Fuel:
    """The engines' use as LunarLander.step accounts it, and the fuel penalty the rewards carried."""

    main_steps: int  # steps the main engine fired (action[0] > 0)
    main_power: float  # sum of m_power = (clip(action[0], 0, 1) + 1) / 2 over those steps
    side_steps: int  # steps a side engine fired (|action[1]| > 0.5)
    side_power: float  # sum of s_power = clip(|action[1]|, 0.5, 1) over those steps
    penalty: float  # 0.30 m_power + 0.03 s_power summed over the steps whose reward was not replaced by +-100
    penalty_after_contact: float  # the part of `penalty` from the first ground contact on


@dataclasses.dataclass
class EpisodeReport:
    """One row of the per-episode output."""

    episode: int
    seed: int
    outcome: str
    crash_cause: str  # for a crash with the body on the ground: CAUSE_*; empty otherwise
    episode_return: float
    length: int
    touchdown_step: int | None
    touchdown_by: str
    touchdown_x: float
    touchdown_vx: float
    touchdown_vy: float
    touchdown_angle: float
    touchdown_angular_velocity: float
    end_x: float
    end_y: float
    end_angle: float
    main_steps: int
    main_power: float
    side_steps: int
    side_power: float
    fuel_penalty: float
    fuel_penalty_after_contact: float
    airborne_steps_after_contact: int  # steps after the first contact with neither leg down (bounces, take-offs)


def engine_powers(actions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """m_power and s_power of each action, as LunarLander.step computes them (0 when an engine is off)."""
    clipped = np.clip(np.asarray(actions, dtype=np.float64).reshape(-1, 2), -1.0, 1.0)
    main = np.where(clipped[:, 0] > 0.0, (np.clip(clipped[:, 0], 0.0, 1.0) + 1.0) * 0.5, 0.0)
    side = np.where(np.abs(clipped[:, 1]) > 0.5, np.clip(np.abs(clipped[:, 1]), 0.5, 1.0), 0.0)
    return main, side


def _crashed(trajectory: Trajectory) -> bool:
    return trajectory.terminated and float(trajectory.rewards[-1]) == CRASH_REWARD


def touchdown(trajectory: Trajectory) -> Touchdown | None:
    """The first ground contact, or None if neither leg nor body ever touched (a hover, a flight out of bounds)."""
    legs = trajectory.observations[1:, LEFT_LEG] + trajectory.observations[1:, RIGHT_LEG]
    touched = np.flatnonzero(legs > 0)
    step = int(touched[0]) + 1 if touched.size else None
    out_of_bounds = abs(float(trajectory.observations[-1, X])) >= OUT_OF_BOUNDS_X
    by = "legs"
    if step is None and _crashed(trajectory) and not out_of_bounds:
        step, by = trajectory.length, "body"
    if step is None:
        return None
    before = trajectory.observations[step - 1]
    return Touchdown(step, by, float(before[X]), float(before[VX]), float(before[VY]), float(before[ANGLE]),
                     float(before[ANGULAR_VELOCITY]))


def classify(trajectory: Trajectory) -> str:
    """The episode's outcome (one of OUTCOMES), from how it ended, its last reward and last observation."""
    last = trajectory.observations[-1]
    if trajectory.terminated:
        final_reward = float(trajectory.rewards[-1])
        if final_reward == CRASH_REWARD:
            return CRASHED_OUT if abs(float(last[X])) >= OUT_OF_BOUNDS_X else CRASHED_BODY
        if final_reward == REST_REWARD:
            return LANDED_ON_PAD if abs(float(last[X])) <= PAD_HALF_WIDTH else LANDED_OFF_PAD
        raise ValueError(f"an episode terminated with reward {final_reward}: not LunarLander's -100 or +100")
    if not trajectory.truncated:
        raise ValueError("the episode neither terminated nor was truncated")
    if last[LEFT_LEG] > 0 or last[RIGHT_LEG] > 0:
        return TIMED_OUT_LEGS
    start = trajectory.observations[max(0, len(trajectory.observations) - 1 - HOVER_WINDOW)]
    moved = math.hypot(float(last[X] - start[X]), float(last[Y] - start[Y]))
    return TIMED_OUT_HOVER if moved < HOVER_DISTANCE else TIMED_OUT_DRIFT


def crash_cause(contact: Touchdown) -> str:
    """Why a lander whose body hit the ground crashed, judged on its approach to the first contact."""
    tilted = abs(contact.angle) > TILT_LIMIT
    fast = contact.vy < -VY_LIMIT
    return CAUSE_BOTH if tilted and fast else CAUSE_TILTED if tilted else CAUSE_FAST if fast else CAUSE_WITHIN


def fuel(trajectory: Trajectory, contact: Touchdown | None) -> Fuel:
    """The engines' use over the episode and the fuel penalty its rewards carried.

    A terminating step's reward is replaced by -100 or +100, so the fuel burnt on that step is not charged.
    """
    main, side = engine_powers(trajectory.actions)
    charged = MAIN_ENGINE_COST * main + SIDE_ENGINE_COST * side
    if trajectory.terminated:
        charged[-1] = 0.0
    after = float(charged[contact.step:].sum()) if contact is not None else 0.0
    return Fuel(int((main > 0).sum()), float(main.sum()), int((side > 0).sum()), float(side.sum()),
                float(charged.sum()), after)


def airborne_after(trajectory: Trajectory, contact: Touchdown | None) -> int:
    """Steps after the first ground contact on which neither leg touched (0 without a contact)."""
    if contact is None:
        return 0
    after = trajectory.observations[contact.step + 1:]
    return int(((after[:, LEFT_LEG] == 0) & (after[:, RIGHT_LEG] == 0)).sum())


def report(episode: int, seed: int, trajectory: Trajectory) -> EpisodeReport:
    """Everything recorded of one episode."""
    outcome = classify(trajectory)
    contact = touchdown(trajectory)
    spent = fuel(trajectory, contact)
    cause = crash_cause(contact) if outcome == CRASHED_BODY and contact is not None else ""
    nan = float("nan")
    last = trajectory.observations[-1]
    return EpisodeReport(
        episode=episode, seed=seed, outcome=outcome, crash_cause=cause,
        episode_return=float(np.sum(trajectory.rewards, dtype=np.float64)), length=trajectory.length,
        touchdown_step=contact.step if contact else None, touchdown_by=contact.by if contact else "",
        touchdown_x=contact.x if contact else nan, touchdown_vx=contact.vx if contact else nan,
        touchdown_vy=contact.vy if contact else nan, touchdown_angle=contact.angle if contact else nan,
        touchdown_angular_velocity=contact.angular_velocity if contact else nan,
        end_x=float(last[X]), end_y=float(last[Y]), end_angle=float(last[ANGLE]),
        main_steps=spent.main_steps, main_power=spent.main_power, side_steps=spent.side_steps,
        side_power=spent.side_power, fuel_penalty=spent.penalty, fuel_penalty_after_contact=spent.penalty_after_contact,
        airborne_steps_after_contact=airborne_after(trajectory, contact))


def play(agent, env, seed: int) -> Trajectory:
    """One deterministic episode of `agent` (a SACAgent) in `env`, reset with `seed`."""
    obs, _ = env.reset(seed=seed)
    observations, actions, rewards = [obs], [], []
    terminated = truncated = False
    while not (terminated or truncated):
        action = agent.select_action(obs, evaluate=True)
        obs, reward, terminated, truncated, _ = env.step(action)
        observations.append(obs)
        actions.append(action)
        rewards.append(float(reward))
    return Trajectory(np.asarray(observations, dtype=np.float64), np.asarray(actions, dtype=np.float64),
                      np.asarray(rewards, dtype=np.float64), bool(terminated), bool(truncated))


CRASHES = (CRASHED_BODY, CRASHED_OUT)  # the outcomes a user sees as a crash in the videos


def classifiable(env_id: str) -> bool:
    """Whether these outcomes describe the env's episodes (LunarLanderContinuous only)."""
    return env_id.startswith("LunarLanderContinuous")


def play_episodes(agent, env, episodes: int, first_seed: int,
                  classify_outcomes: bool) -> tuple[list[float], list[str] | None]:
    """Deterministic returns of `episodes` episodes, the i-th reset with `first_seed + i`, and with
    `classify_outcomes` how each ended. Each return is summed step by step as sac_model.evaluate_policy sums
    it, so the numbers are the ones train.py's evaluations would give."""
    returns, kinds = [], []
    for i in range(episodes):
        trajectory = play(agent, env, first_seed + i)
        total = 0.0
        for reward in trajectory.rewards:
            total += float(reward)
        returns.append(total)
        if classify_outcomes:
            kinds.append(classify(trajectory))
    return returns, kinds if classify_outcomes else None


def diagnose_agent(path: str | Path, episodes: int, seed: int) -> list[EpisodeReport]:
    """Play a saved LunarLanderContinuous agent for `episodes` episodes (the i-th reset with `seed + i`)."""
    from sac_model import ConfigError, load_agent_and_env

    agent, env = load_agent_and_env(path)
    try:
        if (not agent.env_id.startswith("LunarLanderContinuous") or env.observation_space.shape != (8,)
                or env.action_space.shape != (2,)):
            raise ConfigError(f"{path} is an agent for {agent.env_id}; the outcomes are LunarLanderContinuous's")
        return [report(i, seed + i, play(agent, env, seed + i)) for i in range(episodes)]
    finally:
        env.close()


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(finite)) if finite else float("nan")


def _cell(value: float, spec: str) -> str:
    return "-" if math.isnan(value) else format(value, spec)


TABLE_COLUMNS = ("outcome", "episodes", "mean return", "mean length", "touched down", "approach vy",
                 "approach abs vx", "approach abs angle", "approach abs angular velocity", "main engine steps",
                 "fuel penalty", "of it after contact")


def outcome_rows(reports: Sequence[EpisodeReport]) -> list[list[str]]:
    """One row per outcome that occurred (in OUTCOMES order), then one for all episodes. Approach columns
    are means over the episodes that touched the ground (observation units; vy signed, the rest absolute)."""
    rows = []
    groups = [(o, [r for r in reports if r.outcome == o]) for o in OUTCOMES] + [("all", list(reports))]
    for name, group in groups:
        if not group:
            continue
        touched = [r for r in group if r.touchdown_step is not None]
        rows.append([name, str(len(group)), f"{_mean([r.episode_return for r in group]):.1f}",
                     f"{_mean([r.length for r in group]):.0f}", str(len(touched)),
                     _cell(_mean([r.touchdown_vy for r in touched]), ".3f"),
                     _cell(_mean([abs(r.touchdown_vx) for r in touched]), ".3f"),
                     _cell(_mean([abs(r.touchdown_angle) for r in touched]), ".3f"),
                     _cell(_mean([abs(r.touchdown_angular_velocity) for r in touched]), ".3f"),
                     f"{_mean([r.main_steps for r in group]):.0f}", f"{_mean([r.fuel_penalty for r in group]):.1f}",
                     f"{_mean([r.fuel_penalty_after_contact for r in group]):.1f}"])
    return rows


def outcome_table(reports: Sequence[EpisodeReport]) -> str:
    """The per-outcome rows as a Markdown table."""
    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + " --- |" * len(TABLE_COLUMNS)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in outcome_rows(reports)])


def verdict(reports: Sequence[EpisodeReport], bar: float = 200.0) -> list[str]:
    """Where the returns below `bar` come from, one line per outcome among them."""
    low = [r for r in reports if r.episode_return < bar]
    if not low:
        return [f"No episode of {len(reports)} returned below {bar:g}."]
    crashed = [r for r in reports if r.outcome in (CRASHED_BODY, CRASHED_OUT)]
    lines = [f"{len(low)} of {len(reports)} episodes returned below {bar:g} (mean "
             f"{_mean([r.episode_return for r in low]):.1f}); {sum(r.episode_return < 0 for r in reports)} below 0. "
             f"{len(crashed)} crashed (the env's -100), {sum(r.episode_return < 0 for r in crashed)} of them below 0: "
             f"a crash after a good approach keeps its shaping."]
    good_landings = [r for r in reports if r.outcome == LANDED_ON_PAD and r.episode_return >= bar]
    compare = (f" (on-pad landings >= {bar:g}: {_mean([r.length for r in good_landings]):.0f} steps, "
               f"{_mean([r.fuel_penalty for r in good_landings]):.1f})" if good_landings else "")
    for outcome in OUTCOMES:
        group = [r for r in low if r.outcome == outcome]
        if not group:
            continue
        head = f"- {len(group)} {outcome} (mean return {_mean([r.episode_return for r in group]):.1f})"
        if outcome == CRASHED_BODY:
            causes = {c: [r for r in group if r.crash_cause == c] for c in (CAUSE_TILTED, CAUSE_FAST, CAUSE_BOTH,
                                                                            CAUSE_WITHIN)}
            parts = []
            if causes[CAUSE_TILTED]:
                parts.append(f"{len(causes[CAUSE_TILTED])} touched down tilted more than {TILT_LIMIT} rad")
            if causes[CAUSE_FAST]:
                parts.append(f"{len(causes[CAUSE_FAST])} came down faster than vy = -{VY_LIMIT}")
            if causes[CAUSE_BOTH]:
                parts.append(f"{len(causes[CAUSE_BOTH])} both tilted and too fast")
            within = causes[CAUSE_WITHIN]
            left = [r for r in within if abs(r.end_x - r.touchdown_x) > LEG_SPAN]
            edge = [r for r in within if r not in left and abs(r.touchdown_x) > PAD_HALF_WIDTH - LEG_SPAN]
            rest = [r for r in within if r not in edge and r not in left]
            if edge:
                parts.append(f"{len(edge)} within both limits but touching down with a leg beyond a flag (|x| = "
                             f"{_mean([abs(r.touchdown_x) for r in edge]):.2f}), crashing "
                             f"{_mean([r.length - r.touchdown_step for r in edge]):.0f} steps later leaning "
                             f"{_mean([abs(r.end_angle) for r in edge]):.2f} rad")
            if left:
                hopped = sum(r.airborne_steps_after_contact > 0 for r in left)
                parts.append(f"{len(left)} within both limits at |x| = "
                             f"{_mean([abs(r.touchdown_x) for r in left]):.2f}, then moved more than a leg's span "
                             f"({hopped} of them leaving the ground again) and crashed at |x| = "
                             f"{_mean([abs(r.end_x) for r in left]):.2f}, "
                             f"{_mean([r.length - r.touchdown_step for r in left]):.0f} steps after touching down")
            if rest:
                parts.append(f"{len(rest)} within both limits on the pad, crashing there "
                             f"{_mean([r.length - r.touchdown_step for r in rest]):.0f} steps later leaning "
                             f"{_mean([abs(r.end_angle) for r in rest]):.2f} rad")
            lines.append(f"{head}: " + "; ".join(parts) + ".")
        elif outcome == CRASHED_OUT:
            lines.append(f"{head}: left the viewport (|x| >= 1) after {_mean([r.length for r in group]):.0f} steps.")
        elif outcome == LANDED_OFF_PAD:
            on = [r for r in group if abs(r.touchdown_x) <= PAD_HALF_WIDTH]
            lines.append(f"{head}: at rest at |x| = {_mean([abs(r.end_x) for r in group]):.2f} (the flags: "
                         f"{PAD_HALF_WIDTH}); {len(on)} of them touched down on the pad and slid or hopped off it "
                         f"({sum(r.airborne_steps_after_contact > 0 for r in on)} leaving the ground again); "
                         f"{_mean([r.length for r in group]):.0f} steps and a fuel penalty of "
                         f"{_mean([r.fuel_penalty for r in group]):.1f}{compare}.")
        elif outcome == LANDED_ON_PAD:
            lines.append(f"{head}: fuel penalty {_mean([r.fuel_penalty for r in group]):.1f} and "
                         f"{_mean([r.length for r in group]):.0f} steps{compare}; at rest at |x| = "
                         f"{_mean([abs(r.end_x) for r in group]):.2f}.")
        else:
            lines.append(f"{head}: fuel penalty {_mean([r.fuel_penalty for r in group]):.1f}, "
                         f"{_mean([r.fuel_penalty_after_contact for r in group]):.1f} of it after a first contact; "
                         f"ended at |x| = {_mean([abs(r.end_x) for r in group]):.2f}, y = "
                         f"{_mean([r.end_y for r in group]):.2f}.")
    return lines


def write_episodes(reports: Sequence[EpisodeReport], path: Path) -> Path:
    """Every episode's record: JSON (a list of objects, NaN as null) if `path` ends in .json, else CSV."""
    rows = [dataclasses.asdict(r) for r in reports]
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".json":
        clean = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()} for row in rows]
        path.write_text(json.dumps(clean, indent=1) + "\n")
    else:
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=[f.name for f in dataclasses.fields(EpisodeReport)])
            writer.writeheader()
            writer.writerows(rows)
    return path
