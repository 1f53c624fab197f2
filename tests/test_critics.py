"""The critic seam (--critic): each kind's targets, losses and policy value, checked by hand and against
sb3-contrib's implementation on the same weights and batch; and checkpoints written before the seam existed.
"""
from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sac_model
from sac_model import (
    CRITICS, ConfigError, SACAgent, SACConfig, Tag, TruncatedQuantileCritic, evaluate_policy, make_env,
)
from tests.test_sac_model import critic_targets, pendulum_agent, random_batch, small_config

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
        ours = critic_targets(agent, batch, noise)
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


@pytest.mark.parametrize("kind", sorted(CRITICS))
def test_each_critic_kind_steps_with_bf16_products_close_to_fp32(kind: str) -> None:
    batch = random_batch(3, 1, 16, seed=3)
    losses = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(5)
        agent = pendulum_agent(critic=kind, precision=precision)
        torch.manual_seed(6)
        losses[precision] = agent.update(batch)[Tag.critic_loss(0)]
    assert torch.isfinite(losses["bf16"]) and losses["bf16"] != losses["fp32"]  # rounded, so not the same numbers
    torch.testing.assert_close(losses["bf16"], losses["fp32"], rtol=0.05, atol=0.05)


def test_a_checkpoint_names_its_critic_kind_and_loads_as_that_kind(tmp_path: Path) -> None:
    agent = pendulum_agent(critic="tqc", quantiles=7, drop_quantiles=3)
    loaded = SACAgent.load(agent.save(tmp_path / "tqc.pt"))
    assert sac_model.read_checkpoint(tmp_path / "tqc.pt")["metadata"]["config"]["critic"] == "tqc"
    assert isinstance(loaded.critic_kind, TruncatedQuantileCritic) and loaded.critic_kind.kept == 2 * 4
    obs, action = torch.randn(4, 3), torch.rand(4, 1)
    torch.testing.assert_close(loaded.critic(obs, action), agent.critic(obs, action))


@pytest.mark.parametrize("overrides, message", [
    (dict(critic="quantum"), "--critic must be one of twin, tqc, crossq, got 'quantum'"),
    (dict(quantiles=5, drop_quantiles=5), "--drop-quantiles must be in [0, --quantiles), got 5 of 5"),
    (dict(num_critics=0), "--num-critics must be positive, got 0"),
])
def test_invalid_critic_flags_are_refused(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=f"^{message.replace('[', '.').replace('(', '.').replace(')', '.')}$"):
        small_config(**overrides).validate()


def test_a_checkpoint_from_before_critic_kinds_loads_plays_and_resumes_to_the_same_agent(tmp_path: Path) -> None:
    agent = SACAgent.load(OLD_CHECKPOINT)
    assert type(agent.critic_kind) is sac_model.Critic and agent.config.num_critics == 2
    assert (agent.config.policy_delay, agent.adam_betas) == (1, (0.9, 0.999))  # the design it was trained with
    assert set(sac_model.FIELDS_ADDED_LATER) == {f.name for f in dataclasses.fields(SACConfig)} - set(
        sac_model.read_checkpoint(OLD_CHECKPOINT)["metadata"]["config"]) - {"quantiles", "drop_quantiles"}
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


def sb3_batch_renorm(norm: "sac_model.EnsembleBatchRenorm", critic: int):
    """sb3-contrib's BatchRenorm holding critic `critic`'s slice of this ensemble layer's parameters and statistics."""
    from sb3_contrib.common.torch_layers import BatchRenorm1d

    features = norm.scale.shape[-1]
    reference = BatchRenorm1d(features, eps=norm.eps, momentum=norm.momentum, warmup_steps=norm.warmup_steps)
    with torch.no_grad():
        reference.scale.copy_(norm.scale[critic, 0])
        reference.bias.copy_(norm.bias[critic, 0])
        reference.ra_mean.copy_(norm.running_mean[critic, 0])
        reference.ra_var.copy_(norm.running_var[critic, 0])
        reference.steps.fill_(int(norm.steps))
    return reference


@pytest.mark.parametrize("steps", [0, 200])  # in the warm-up (batch statistics alone) and after it (renormalised)
def test_batch_renorm_agrees_with_sb3_contrib_in_training_and_evaluation(steps: int) -> None:
    pytest.importorskip("sb3_contrib", reason="the reference BatchRenorm: pip install -r requirements-bench.txt")
    g = torch.Generator().manual_seed(steps)
    norm = sac_model.EnsembleBatchRenorm(2, 6, warmup_steps=100)
    with torch.no_grad():
        for tensor, shift in ((norm.scale, 1.0), (norm.bias, 0.0), (norm.running_mean, 0.0), (norm.running_var, 1.5)):
            tensor.copy_(shift + 0.5 * torch.rand(tensor.shape, generator=g))
        norm.steps.fill_(steps)
    x = (3.0 * torch.randn(2, 32, 6, generator=g) + 1.0).requires_grad_(True)
    references = [sb3_batch_renorm(norm, critic) for critic in range(2)]

    statistics: list = []
    ours = norm(x, statistics)
    norm.update_statistics(*statistics[0])
    for critic, reference in enumerate(references):
        reference.train()
        theirs = reference(x[critic])
        torch.testing.assert_close(ours[critic], theirs, rtol=1e-5, atol=1e-5)
        coefficients = torch.randn(32, 6, generator=g)
        (ours_grad,) = torch.autograd.grad((ours[critic] * coefficients).sum(), x, retain_graph=True)
        (their_grad,) = torch.autograd.grad((theirs * coefficients).sum(), x)
        torch.testing.assert_close(ours_grad, their_grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(norm.running_mean[critic, 0], reference.ra_mean)
        torch.testing.assert_close(norm.running_var[critic, 0], reference.ra_var)
        reference.eval()
        torch.testing.assert_close(norm(x)[critic], reference(x[critic]), rtol=1e-5, atol=1e-5)
    assert int(norm.steps) == steps + 1


def test_crossq_critics_are_sb3_contribs_layout_on_the_same_weights() -> None:
    pytest.importorskip("sb3_contrib", reason="the reference CrossQ: pip install -r requirements-bench.txt")
    torch.manual_seed(2)
    ensemble = sac_model.BatchRenormQEnsemble(3, 1, hidden_size=8, num_critics=2)
    with torch.no_grad():
        for norm in ensemble.norms:  # running statistics of their own, so that evaluation differs from training
            norm.running_mean.uniform_(-1, 1)
            norm.running_var.uniform_(0.5, 2)
    obs, action = torch.randn(20, 3), torch.rand(20, 1) * 2 - 1

    def reference(critic: int, training: bool) -> torch.Tensor:
        layers = []
        for layer in range(3):
            linear = torch.nn.Linear(*ensemble.weights[layer].shape[1:])
            with torch.no_grad():
                linear.weight.copy_(ensemble.weights[layer][critic].T)
                linear.bias.copy_(ensemble.biases[layer][critic, 0])
            layers += [sb3_batch_renorm(ensemble.norms[layer], critic), linear, torch.nn.ReLU()]
        network = torch.nn.Sequential(*layers[:-1])  # BatchRenorm, Linear, ReLU twice, then BatchRenorm, Linear
        return network.train(training)(torch.cat([obs, action], 1))

    for critic in range(2):
        torch.testing.assert_close(ensemble(obs, action, [])[critic], reference(critic, training=True))
        torch.testing.assert_close(ensemble(obs, action)[critic], reference(critic, training=False))
    assert not torch.allclose(ensemble(obs, action, []), ensemble(obs, action))


def test_crossq_has_no_target_network_and_learns_from_one_joint_pass(tmp_path: Path) -> None:
    torch.manual_seed(3)
    agent = pendulum_agent(critic="crossq", policy_delay=3)
    assert agent.critic_target is None and "critic_target" not in agent.state_dict()
    batch = random_batch(3, 1, 16, seed=6)
    noise = torch.randn(2, 16, 1)
    with torch.no_grad():
        next_action, next_log_prob = sac_model.squashed_gaussian(*agent.actor(batch.next_obs), noise[0])
        # By hand: the targets come from the same pass as Q(s, a), over the 32 rows of (s, a) and (s', a').
        both = agent.critic(torch.cat([batch.obs, batch.next_obs]), torch.cat([batch.actions, next_action]), [])
        discount = 0.99 ** batch.horizons * (1 - batch.terminated)
        targets = batch.rewards + discount * (both[:, 16:, 0].min(0).values - agent.alpha * next_log_prob)
        expected_loss = (both[:, :16, 0] - targets).pow(2).mean(1)
    actor_before = [p.detach().clone() for p in agent.actor.parameters()]
    running_mean = agent.critic.norms[0].running_mean.clone()
    metrics = agent.gradient_step(batch.obs, batch.actions, batch.rewards, batch.next_obs, batch.terminated,
                                  batch.horizons, batch.weights, noise, agent._learning_rates, update_policy=False)
    torch.testing.assert_close(torch.stack([metrics[Tag.critic_loss(i)] for i in range(2)]), expected_loss)
    assert Tag.ACTOR_LOSS not in metrics
    assert all(torch.equal(b, p) for b, p in zip(actor_before, agent.actor.parameters()))  # the policy waits
    assert not torch.equal(running_mean, agent.critic.norms[0].running_mean) and int(agent.critic.norms[0].steps) == 1


def test_the_policy_steps_every_policy_delay_critic_steps_also_after_a_resume(tmp_path: Path) -> None:
    torch.manual_seed(4)
    agent = pendulum_agent(critic="crossq", policy_delay=3)
    batch = random_batch(3, 1, 16, seed=7)

    def policy_moved() -> bool:
        before = [p.detach().clone() for p in agent.actor.parameters()]
        agent.update(batch)
        return any(not torch.equal(b, p) for b, p in zip(before, agent.actor.parameters()))

    assert [policy_moved() for _ in range(3)] == [False, False, True]
    latest_policy_step = agent._policy_metrics
    critic_step = agent.update(batch)  # reports the latest policy step's losses beside its own
    assert all(critic_step[tag] is latest_policy_step[tag] for tag in (Tag.ACTOR_LOSS, Tag.ALPHA_LOSS, Tag.ENTROPY))
    assert critic_step[Tag.critic_loss(0)] is not latest_policy_step[Tag.critic_loss(0)]
    agent = SACAgent.load(agent.save(tmp_path / "crossq.pt"))
    assert agent.critic_updates == 4 and int(agent.critic.norms[1].steps) == 4
    assert [policy_moved() for _ in range(3)] == [False, True, False]
