"""The critic seam (--critic): each kind's targets, losses and policy value, checked by hand and against
sb3-contrib's implementation on the same weights and batch; and checkpoints written before the seam existed.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sac_model
from sac_model import CRITICS, ConfigError, SACAgent, Tag, TruncatedQuantileCritic, evaluate_policy, make_env
from tests.test_sac_model import pendulum_agent, random_batch, small_config

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures"
# Written by train.py at commit e56a6db, before critics had kinds (the command: tests/fixtures/README.md).
OLD_CHECKPOINT = FIXTURES / "pendulum_e56a6db_step400.pt"
OLD_FINAL = FIXTURES / "pendulum_e56a6db_final.pt"

torch.set_num_threads(1)


def tqc_values(next_q: list[list[list[float]]], drop: int) -> TruncatedQuantileCritic:
    quantiles = len(next_q[0][0])
    return TruncatedQuantileCritic(small_config(critic="tqc", num_critics=len(next_q), quantiles=quantiles,
                                                drop_quantiles=drop))


def test_tqc_pools_sorts_and_drops_the_largest_quantiles_per_critic() -> None:
    next_q = torch.tensor([[[1.0, 9.0, 4.0]], [[7.0, 2.0, 8.0]]])  # (critics 2, batch 1, quantiles 3)
    critic = tqc_values(next_q.tolist(), drop=1)
    torch.testing.assert_close(critic.bootstrap_values(next_q), torch.tensor([[1.0, 2.0, 4.0, 7.0]]))


def test_tqc_loss_is_the_quantile_huber_loss_computed_by_hand() -> None:
    # One critic, two quantiles (midpoints 1/4 and 3/4), two target atoms, one sample.
    critic = tqc_values([[[0.0, 0.0]]], drop=0)
    q, targets = torch.tensor([[[0.0, 1.0]]]), torch.tensor([[0.5, 3.0]])
    # Pairs (quantile, atom): delta = atom - quantile; huber 0.5 delta^2 below 1, |delta| - 0.5 above;
    # weight |tau - 1{delta < 0}|.
    pairs = [(0.25, 0.5), (0.25, 3.0), (0.75, -0.5), (0.75, 2.0)]
    expected = sum(abs(tau - (d < 0)) * (0.5 * d * d if abs(d) <= 1 else abs(d) - 0.5) for tau, d in pairs) / 4
    torch.testing.assert_close(critic.losses(q, targets, torch.ones(1)), torch.tensor([expected]))
    assert expected == pytest.approx((0.25 * 0.125 + 0.25 * 2.5 + 0.25 * 0.125 + 0.75 * 1.5) / 4)


def test_tqc_targets_and_loss_agree_with_sb3_contrib_on_the_same_weights_and_batch() -> None:
    pytest.importorskip("sb3_contrib", reason="the reference TQC: pip install -r requirements-bench.txt")
    from sb3_contrib.common.utils import quantile_huber_loss

    torch.manual_seed(0)
    agent = pendulum_agent(critic="tqc", num_critics=3, quantiles=5, drop_quantiles=2, n_step=1, gamma=0.97)
    batch = random_batch(3, 1, 16, seed=4)
    batch.horizons = torch.ones(16)
    noise = torch.randn(16, 1)
    with torch.no_grad():
        ours = agent.critic_targets(batch.next_obs, batch.rewards, batch.terminated, batch.horizons, noise,
                                    agent.alpha)
        # sb3-contrib TQC.train: (batch, critics, quantiles), sorted, the first quantiles_total - drop * critics kept.
        next_action, next_log_prob = sac_model.squashed_gaussian(*agent.actor(batch.next_obs), noise)
        next_quantiles = agent.critic_target(batch.next_obs, next_action).permute(1, 0, 2)
        kept = 3 * 5 - 2 * 3
        next_quantiles = next_quantiles.reshape(16, -1).sort().values[:, :kept]
        theirs = batch.rewards[:, None] + (1 - batch.terminated[:, None]) * 0.97 * (
            next_quantiles - agent.alpha * next_log_prob[:, None])
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)

    q = agent.critic(batch.obs, batch.actions).detach().requires_grad_(True)
    losses = agent.critic_kind.losses(q, ours, torch.ones(16))
    reference = quantile_huber_loss(q.permute(1, 0, 2), ours[:, None, :], sum_over_quantiles=False)
    # sb3-contrib averages over the critics; each critic's own loss here is what an optimizer per critic sees.
    torch.testing.assert_close(losses.mean(), reference, rtol=1e-6, atol=1e-7)
    (ours_grad,) = torch.autograd.grad(losses.mean(), q)
    (their_grad,) = torch.autograd.grad(reference, q)
    torch.testing.assert_close(ours_grad, their_grad, rtol=1e-5, atol=1e-9)

    # The policy's value: sb3-contrib's critic(obs, actions_pi).mean(dim=2).mean(dim=1).
    torch.testing.assert_close(agent.critic_kind.policy_value(q.detach()), q.detach().mean(dim=(0, 2)))


def test_importance_weights_scale_each_samples_share_of_the_tqc_loss() -> None:
    critic = tqc_values([[[0.0] * 4]] * 2, drop=1)
    g = torch.Generator().manual_seed(5)
    q, targets = torch.randn(2, 6, 4, generator=g), torch.randn(6, 6, generator=g)
    weights = torch.tensor([0.0, 1.0, 0.5, 0.0, 2.0, 1.0])
    per_sample = torch.stack([critic.losses(q[:, i:i + 1], targets[i:i + 1], torch.ones(1)) for i in range(6)], 1)
    torch.testing.assert_close(critic.losses(q, targets, weights), (per_sample * weights).mean(1))


@pytest.mark.parametrize("kind", sorted(CRITICS))
def test_each_critic_kind_takes_a_step_and_logs_each_critics_loss(kind: str) -> None:
    torch.manual_seed(1)
    agent = pendulum_agent(critic=kind, num_critics=3, quantiles=4, drop_quantiles=1, buffer="prioritized")
    assert agent.critic(torch.zeros(5, 3), torch.zeros(5, 1)).shape == (3, 5, agent.critic_kind.outputs)
    before = [p.detach().clone() for p in agent.critic.parameters()]
    metrics = agent.update(random_batch(3, 1, 16, seed=2))
    assert {Tag.critic_loss(i) for i in range(3)} <= metrics.keys() and Tag.critic_loss(3) not in metrics
    assert all(torch.isfinite(value).all() for value in metrics.values())
    assert metrics["priorities"].shape == (16,) and (metrics["priorities"] > 0).all()
    assert all(not torch.equal(b, p) for b, p in zip(before, agent.critic.parameters()))


def test_a_checkpoint_names_its_critic_kind_and_loads_as_that_kind(tmp_path: Path) -> None:
    agent = pendulum_agent(critic="tqc", quantiles=7, drop_quantiles=3)
    loaded = SACAgent.load(agent.save(tmp_path / "tqc.pt"))
    assert sac_model.read_checkpoint(tmp_path / "tqc.pt")["metadata"]["config"]["critic"] == "tqc"
    assert isinstance(loaded.critic_kind, TruncatedQuantileCritic) and loaded.critic_kind.kept == 2 * 4
    obs, action = torch.randn(4, 3), torch.rand(4, 1)
    torch.testing.assert_close(loaded.critic(obs, action), agent.critic(obs, action))


@pytest.mark.parametrize("overrides, message", [
    (dict(critic="quantum"), "--critic must be one of twin, tqc, got 'quantum'"),
    (dict(quantiles=5, drop_quantiles=5), "--drop-quantiles must be in [0, --quantiles), got 5 of 5"),
    (dict(num_critics=0), "--num-critics must be positive, got 0"),
])
def test_invalid_critic_flags_are_refused(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=f"^{message.replace('[', '.').replace('(', '.').replace(')', '.')}$"):
        small_config(**overrides).validate()


def test_a_checkpoint_from_before_critic_kinds_loads_plays_and_resumes_to_the_same_agent(tmp_path: Path) -> None:
    agent = SACAgent.load(OLD_CHECKPOINT)
    assert type(agent.critic_kind) is sac_model.Critic and agent.config.num_critics == 2
    env = make_env(agent.env_id)
    try:
        returns = evaluate_policy(agent, env, episodes=2, seed=0)
    finally:
        env.close()
    assert len(returns) == 2 and all(-2000 < r < 0 for r in returns)  # Pendulum's returns lie in [-16.3 x 200, 0]

    run = tmp_path / "checkpoints" / "fixture"
    run.mkdir(parents=True)
    shutil.copy(OLD_CHECKPOINT, run / "step_000000400.pt")
    resumed = subprocess.run([sys.executable, str(REPO / "train.py"), "--resume", str(run / "step_000000400.pt"),
                              "--no-compile", "--threads", "1"], cwd=tmp_path, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming fixture from" in resumed.stdout and ": exactly" in resumed.stdout
    ours, then = (sac_model.read_checkpoint(path)["agent"] for path in (run / "final.pt", OLD_FINAL))
    for part in ("actor", "critic", "critic_target"):
        for name, tensor in then[part].items():
            torch.testing.assert_close(ours[part][name], tensor, rtol=0, atol=1e-6, msg=f"{part}.{name}")
