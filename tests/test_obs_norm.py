"""--obs-norm: observations standardised by the running statistics of those the training episodes met; checked by
hand, against Stable-Baselines3's RunningMeanStd and VecNormalize, inside the gradient step, in checkpoints and in
a real run of train.py."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from sac_model import RunningObsNorm, SACAgent, Tag, read_checkpoint
from tests.test_critics import OLD_CHECKPOINT
from tests.test_sac_model import pendulum_agent, random_batch
from tests.test_scripts import SMALL, run_script

torch.set_num_threads(1)


def observations(count: int, seed: int = 0) -> np.ndarray:
    """Pendulum-like observations whose dimensions differ in scale and offset by orders of magnitude."""
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(count, 3)) * [0.01, 1.0, 50.0] + [5.0, 0.0, -100.0]).astype(np.float32)


def observed(obs: np.ndarray) -> RunningObsNorm:
    norm = RunningObsNorm(obs.shape[1])
    for row in obs:
        norm.observe(row)
    return norm


def test_the_statistics_are_the_mean_and_variance_of_every_observation_met() -> None:
    obs = observations(200)
    norm = observed(obs)
    assert int(norm.count) == 200
    np.testing.assert_allclose(norm.mean.numpy(), obs.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(norm.var.numpy(), obs.var(0), rtol=1e-4)
    standardised = norm(torch.from_numpy(obs)).numpy()
    np.testing.assert_allclose(standardised.mean(0), 0.0, atol=1e-3)
    np.testing.assert_allclose(standardised.std(0), 1.0, rtol=1e-3)
    far_out = torch.tensor([[5.0 + 1.0, 0.0, -100.0]])  # 100 standard deviations out in the first dimension
    assert norm(far_out)[0, 0] == RunningObsNorm.CLIP


def test_the_statistics_and_the_standardised_observations_agree_with_sb3s_vecnormalize() -> None:
    running_mean_std = pytest.importorskip(
        "stable_baselines3.common.running_mean_std", reason="the reference: pip install -r requirements-bench.txt")
    obs = observations(100, seed=1)
    reference = running_mean_std.RunningMeanStd(epsilon=1e-12, shape=(3,))  # SB3 starts at count 1e-4 by default
    for row in obs:
        reference.update(row[None].astype(np.float64))
    norm = observed(obs)
    np.testing.assert_allclose(norm.mean.numpy(), reference.mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(norm.var.numpy(), reference.var, rtol=1e-4)
    # VecNormalize.normalize_obs with its defaults: epsilon 1e-8, clip_obs 10
    expected = np.clip((obs - reference.mean) / np.sqrt(reference.var + 1e-8), -10.0, 10.0)
    np.testing.assert_allclose(norm(torch.from_numpy(obs)).numpy(), expected, atol=1e-4)  # float32 statistics


def twins() -> tuple[SACAgent, SACAgent]:
    """An agent with --obs-norm and statistics, and one without it holding the same weights."""
    torch.manual_seed(0)
    normed = pendulum_agent(obs_norm=True)
    for row in observations(50):
        normed.observe(row)
    plain = pendulum_agent()
    state = normed.state_dict()
    state.pop("obs_norm")
    plain.load_state_dict(state)
    return normed, plain


def test_an_agent_with_obs_norm_acts_and_learns_as_one_fed_standardised_observations() -> None:
    normed, plain = twins()
    batch = random_batch(3, 1, 16, seed=4)
    batch.obs, batch.next_obs = batch.obs * 50.0 - 100.0, batch.next_obs * 50.0 - 100.0  # far from standardised
    raw = batch.obs[0].numpy()
    standardised = normed.obs_norm(batch.obs[:1])[0].numpy()
    np.testing.assert_allclose(normed.select_action(raw, evaluate=True), plain.select_action(standardised, True))
    assert not np.allclose(plain.select_action(raw, True), plain.select_action(standardised, True))

    torch.manual_seed(7)
    normed_metrics = normed.update(batch)
    batch.obs, batch.next_obs = normed.obs_norm(batch.obs), normed.obs_norm(batch.next_obs)
    torch.manual_seed(7)
    plain_metrics = plain.update(batch)
    torch.testing.assert_close(normed_metrics[Tag.critic_loss(0)], plain_metrics[Tag.critic_loss(0)])
    for ours, theirs in zip(normed.learned_tensors(), plain.learned_tensors()):
        torch.testing.assert_close(ours, theirs)


def test_the_statistics_travel_in_checkpoints_and_older_checkpoints_load_without_them(tmp_path: Path) -> None:
    normed, _ = twins()
    loaded = SACAgent.load(normed.save(tmp_path / "normed.pt"))
    assert loaded.config.obs_norm and int(loaded.obs_norm.count) == 50
    torch.testing.assert_close(loaded.obs_norm.mean, normed.obs_norm.mean)
    torch.testing.assert_close(loaded.obs_norm.var, normed.obs_norm.var)
    obs = observations(1, seed=3)[0]
    np.testing.assert_array_equal(loaded.select_action(obs, True), normed.select_action(obs, True))
    old = SACAgent.load(OLD_CHECKPOINT)
    assert not old.config.obs_norm and old.obs_norm is None


def test_a_run_counts_every_observation_of_its_training_episodes_and_none_of_its_evaluations(tmp_path: Path) -> None:
    result = run_script("train.py", tmp_path, *SMALL, "--obs-norm", "--total-steps", "400", "--eval-every", "1",
                        "--eval-episodes", "1", "--run-name", "normed")
    assert result.returncode == 0, result.stderr
    checkpoint = read_checkpoint(tmp_path / "checkpoints" / "normed" / "final.pt")
    statistics, buffer = checkpoint["agent"]["obs_norm"], checkpoint["training"]["buffer"]
    # Two 200-step episodes: two resets and 400 steps; the evaluation episodes after each would add 201 each.
    assert int(statistics["count"]) == 402
    # The 400 observations the actions were taken in, and the two episodes' last ones
    acted_in = buffer["obs"][:400]
    np.testing.assert_allclose(statistics["mean"].numpy(), acted_in.mean(0).numpy(), atol=16 * 2 / 402)
