"""Unit tests of plumbing.py: a run's checkpoint files and folders, a checkpoint's training section, RNG state
and the lines a run prints about its precision."""
from __future__ import annotations

import copy
import os
import random
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

import plumbing
import sac_model
from plumbing import (
    FINAL_CHECKPOINT, ThreadChooser, TrainingState, capture_rng_state, final_checkpoint, find_checkpoint, periodic_checkpoint_name,
    periodic_checkpoints, precision_line, prune_checkpoints, restore_rng_state, run_state,
)
from sac_model import CheckpointError, SACAgent, SACConfig, make_env, read_checkpoint


def pendulum_agent() -> SACAgent:
    config = SACConfig(env="Pendulum-v1", hidden_size=32, batch_size=16, buffer_size=256, max_steps=200)
    return SACAgent(3, np.array([-2.0], dtype=np.float32), np.array([2.0], dtype=np.float32), config)


def test_checkpoint_names_are_read_back_in_step_order_and_say_the_runs_state(tmp_path):
    assert run_state(tmp_path) == "new"
    for step in (1200, 200, 40_000):
        (tmp_path / periodic_checkpoint_name(step)).write_bytes(b"x")
    (tmp_path / ".step_000000300.pt.99.tmp").write_bytes(b"x")  # a write in progress is no checkpoint
    (tmp_path / "step_notes.pt").write_bytes(b"x")
    assert periodic_checkpoint_name(1200) == "step_000001200.pt"
    assert periodic_checkpoints(tmp_path) == [(step, tmp_path / periodic_checkpoint_name(step))
                                              for step in (200, 1200, 40_000)]
    assert run_state(tmp_path) == "resumable"
    final_checkpoint(tmp_path).write_bytes(b"x")
    assert final_checkpoint(tmp_path) == tmp_path / FINAL_CHECKPOINT == tmp_path / "final.pt"
    assert run_state(tmp_path) == "finished"


@pytest.mark.parametrize("native, says", [(True, "native on this CPU"),
                                          (False, "no AVX512-BF16 or AMX, so they are fp32 products of bf16-rounded"),
                                          (None, "support is unknown: if emulated")])
def test_the_precision_line_says_how_bf16_is_computed_here(monkeypatch, native, says):
    monkeypatch.setattr(plumbing, "native_bf16_cpu", lambda: native)
    monkeypatch.setattr(sac_model, "native_bf16_cpu", lambda: native)
    assert says in precision_line("bf16", torch.device("cpu"))
    assert ("--precision fp32" in precision_line("bf16", torch.device("cpu"))) is (native is None)
    assert precision_line("fp32", torch.device("cpu")).startswith("precision: fp32 (the default")
    assert precision_line("bf16", torch.device("cuda")) == "precision: bf16 matrix products on cuda (--precision bf16)"
    assert sac_model.bf16_rounded_in_fp32("bf16", torch.device("cpu")) is (native is False)
    assert not sac_model.bf16_rounded_in_fp32("fp32", torch.device("cpu"))
    assert not sac_model.bf16_rounded_in_fp32("bf16", torch.device("cuda"))


def test_training_state_round_trips_and_says_why_a_resume_would_be_approximate(tmp_path):
    assert TrainingState(buffer={}).resume_gap() is None
    assert TrainingState(episode_finished=False, buffer={}).resume_gap() == "it was written mid-episode"
    assert TrainingState().resume_gap() == "it holds no replay buffer (--no-save-buffer)"
    assert TrainingState(episode_finished=False).resume_gap() == (
        "it was written mid-episode and it holds no replay buffer (--no-save-buffer)")
    state = TrainingState(global_step=1200, episode=6, eval_history=[[600, -1.0, 0.5]], run_name="r", buffer={})
    path = pendulum_agent().save(tmp_path / "a.pt", {**state.to_dict(), "written_by_a_later_version": 1})
    assert TrainingState.of(read_checkpoint(path), path) == state  # keys it does not know are left out
    alone = pendulum_agent().save(tmp_path / "alone.pt")
    with pytest.raises(CheckpointError, match="holds an agent but no training state"):
        TrainingState.of(read_checkpoint(alone), alone)


def _touch_with_mtime(path: Path, mtime: float) -> Path:
    path.write_bytes(b"x")
    os.utime(path, ns=(int(mtime * 1e9), int(mtime * 1e9)))
    return path


def test_prune_checkpoints_keeps_newest_periodic_and_final(tmp_path):
    # mtime order = step order, which differs from lexicographic order (step_1000 < step_200 as text).
    names = ["step_200.pt", "step_400.pt", "step_600.pt", "step_800.pt", "step_1000.pt", "step_1200.pt"]
    for k, name in enumerate(names):
        _touch_with_mtime(tmp_path / name, 1_000_000 + 10 * k)
    _touch_with_mtime(tmp_path / "final.pt", 1_000_000 - 50)  # oldest of all, still kept
    _touch_with_mtime(tmp_path / "notes.txt", 1_000_000 - 60)
    _touch_with_mtime(tmp_path / ".step_1400.pt.4194999.tmp", 1_000_100)  # left by a killed writer: removed
    own = _touch_with_mtime(tmp_path / f".final.pt.{os.getpid()}.tmp", 1_000_100)  # this process's: kept
    prune_checkpoints(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["step_1000.pt", "step_1200.pt", "final.pt",
                                                                 "notes.txt", own.name])
    own.unlink()
    prune_checkpoints(tmp_path, keep=5)  # fewer than keep: nothing more is deleted
    assert len(list(tmp_path.iterdir())) == 4


def test_find_checkpoint_resolves_file_folder_run_name_and_refuses_missing(tmp_path, monkeypatch):
    run = tmp_path / "run1"
    run.mkdir()
    newest = _touch_with_mtime(run / "step_100.pt", 2_000_000)
    _touch_with_mtime(run / "step_900.pt", 1_999_000)
    _touch_with_mtime(run / "final.pt", 1_998_000)
    _touch_with_mtime(run / ".final.pt.123.tmp", 2_100_000)  # a temporary file never counts
    assert find_checkpoint(run / "final.pt") == run / "final.pt"
    assert find_checkpoint(str(run / "step_900.pt")) == run / "step_900.pt"
    assert find_checkpoint(run) == newest
    monkeypatch.setattr(plumbing, "CHECKPOINTS_DIR", tmp_path)
    assert find_checkpoint("run1") == newest
    assert find_checkpoint(None) == newest
    with pytest.raises(CheckpointError) as info:
        find_checkpoint(tmp_path / "nope")
    assert "nope" in str(info.value)
    with pytest.raises(CheckpointError):
        find_checkpoint("no_such_run")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError):
        find_checkpoint(tmp_path / "empty")


def _draw(env: gym.Env) -> list:
    return [random.random(), random.randint(0, 10 ** 9), np.random.random(4), np.random.normal(size=3),
            torch.rand(4), torch.randn(3), env.reset()[0], env.action_space.sample(), env.reset()[0]]


def _assert_same_draws(a: list, b: list) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        if isinstance(x, torch.Tensor):
            assert torch.equal(x, y)
        else:
            np.testing.assert_array_equal(x, y)


def test_rng_state_capture_restore_replays_every_generator(tmp_path):
    env = make_env("Pendulum-v1")
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    env.reset(seed=4)
    env.action_space.seed(5)
    _draw(env)  # move every generator away from its seed
    np.random.normal()  # leaves a cached gaussian in numpy's legacy state

    state = capture_rng_state(env)
    first = _draw(env)
    second = _draw(env)
    with pytest.raises(AssertionError):
        _assert_same_draws(first, second)  # the draws do move on

    restore_rng_state(state, env)
    _assert_same_draws(_draw(env), first)

    # The state is plain data: it survives weights_only serialisation and still restores exactly.
    torch.save(state, tmp_path / "rng.pt")
    loaded = torch.load(tmp_path / "rng.pt", weights_only=True)
    _draw(env)
    restore_rng_state(loaded, env)
    _assert_same_draws(_draw(env), first)
    env.close()


def run_rounds(chooser: ThreadChooser, rounds: int, seconds: dict[int, float]) -> str:
    """Play `rounds` update rounds whose times depend on the thread count; the counts, as a string."""
    counts = ""
    for _ in range(rounds):
        threads = chooser.next_round()
        chooser.record(threads, seconds[threads])
        counts += str(threads)
    return counts


def test_the_thread_chooser_runs_on_whichever_count_is_faster_and_tries_the_other_less_often_as_it_loses():
    chooser = ThreadChooser(cores=2, probe_every=4, probe_most=16)
    # Idle: round 1 compiles on 2 and rounds 2-3 on 1 (compile, then a timed round); then 2 threads, trying 1
    # again after 4 rounds, then 8, then 16 at most.
    idle = {2: 0.25, 1: 0.45}
    assert run_rounds(chooser, 40, idle) == "211" + "222" + "1" + "2" * 7 + "1" + "2" * 15 + "1" + "2" * 9
    assert chooser.chosen == 2 and chooser.interval == 16
    # One slow round on 2 threads (a hiccup) changes nothing; a busy neighbour makes the rounds on 2 slower than
    # 1.25x the last on 1 twice in a row, so 1 takes over, and 2 is tried again 4 rounds later (it loses, so 8
    # rounds after that).
    assert chooser.record(2, 1.20) is None and chooser.record(2, 0.25) is None and chooser.chosen == 2
    busy = {2: 1.20, 1: 0.50}
    assert run_rounds(chooser, 15, busy) == "22" + "111" + "2" + "1" * 7 + "2" + "1"
    assert chooser.chosen == 1
    # About as fast (within the margin): no switch back; clearly faster: back to all cores at the next try.
    assert chooser.record(2, 0.45) is None and chooser.chosen == 1
    assert chooser.record(2, 0.30) == 2 and chooser.chosen == 2 and chooser.other(2) == 1


@pytest.mark.skipif(torch.get_num_threads() < 2, reason="needs 2 CPU threads")
def test_a_gradient_step_on_one_thread_and_on_two_agrees_to_rounding():
    """What the thread chooser's switches cost a run's numbers: float32 rounding, not a different run."""
    from sac_model import Batch, missing_compiler
    generator = torch.Generator().manual_seed(0)
    batch = Batch(obs=torch.randn(256, 8, generator=generator), actions=torch.rand(256, 2, generator=generator) * 2 - 1,
                  rewards=torch.randn(256, generator=generator), next_obs=torch.randn(256, 8, generator=generator),
                  terminated=torch.zeros(256), horizons=torch.ones(256), weights=torch.ones(256),
                  indices=np.arange(256))
    threads = torch.get_num_threads()
    try:
        for compiled in (False, True) if missing_compiler() is None else (False,):
            agents = [SACAgent(8, -np.ones(2), np.ones(2), SACConfig(compile=compiled)) for _ in range(2)]
            agents[1].load_state_dict(copy.deepcopy(agents[0].state_dict()))
            before = agents[0].learned_tensors()[0].clone()
            for agent, count in zip(agents, (1, 2)):
                if compiled:
                    agent.compile_update()
                torch.set_num_threads(count)
                for step in range(3):
                    torch.manual_seed(step)
                    agent.update(batch)
            for one, two in zip(agents[0].learned_tensors(), agents[1].learned_tensors()):
                torch.testing.assert_close(one, two, rtol=1e-5, atol=1e-6)
            moved = (agents[0].learned_tensors()[0] - before).abs().max()
            assert moved > 1e-4  # the steps moved the weights far more than the threads' rounding
    finally:
        torch.set_num_threads(threads)
