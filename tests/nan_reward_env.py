"""A Pendulum whose rewards become NaN after 500 steps: makes training diverge on purpose.

Loaded by tests through gymnasium's "module:EnvId" syntax (`--env nan_reward_env:NanRewardPendulum-v0`).
"""
import gymnasium as gym
from gymnasium.envs.classic_control.pendulum import PendulumEnv

NAN_AFTER_STEPS = 500


class NanRewardPendulum(PendulumEnv):
    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.steps_taken = 0

    def step(self, action):
        obs, reward, terminated, truncated, info = super().step(action)
        self.steps_taken += 1
        return obs, float("nan") if self.steps_taken > NAN_AFTER_STEPS else reward, terminated, truncated, info


gym.register(id="NanRewardPendulum-v0", entry_point=NanRewardPendulum, max_episode_steps=200)
