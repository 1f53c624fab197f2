"""End-to-end tests of train.py and visualize.py as a user runs them: real env, real files, real signals."""
from __future__ import annotations

import contextlib
import dataclasses
import os
import pickle
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import deque
from pathlib import Path
from typing import Iterator

import imageio.v2 as imageio
import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import sac_model
import train
from plumbing import TrainingState, code_version, config_from_args
from sac_model import PRESETS, SACAgent, SACConfig, read_checkpoint
from train import parse_args

REPO = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
# Pendulum-v1: 200-step episodes (always truncated), action bounds [-2, 2]; small networks keep it fast.
SMALL = ["--env", "Pendulum-v1", "--hidden-size", "32", "--batch-size", "32", "--buffer-size", "5000",
         "--start-steps", "200", "--update-after", "200", "--threads", "1", "--device", "cpu", "--no-compile"]
TARGET_CHECK_TAGS = {"eval/target_check_mean", "eval/target_check_std", "eval/target_check_lower_bound",
                     "eval/target_check_passed"}  # logged only by a run with a --target-return


def documented_tags() -> set[str]:
    """The TensorBoard tags docs/training.md's table documents."""
    return set(re.findall(r"`((?:charts|losses|eval)/\w+)`", (REPO / "docs" / "training.md").read_text()))


def script_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{TESTS}", "PYTHONUNBUFFERED": "1"}


def run_script(script: str, cwd: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / script), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=script_env())


def start_train(cwd: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(REPO / "train.py"), *args], cwd=cwd, env=script_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(predicate, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.1)


def file_contents(*folders: Path) -> dict[Path, bytes]:
    """Every file under the folders, with its bytes: a run's state, to show it was left untouched."""
    return {path: path.read_bytes() for folder in folders for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A folder on its own 8 MB tmpfs: a real filesystem that fills up. Mounting needs root; skipped without."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(disk)], capture_output=True)
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mount.stderr.decode().strip()}")
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


def fill_disk(folder: Path, free_bytes: int) -> Path:
    """Fill the filesystem of `folder` until `free_bytes` are left; delete the returned file to free the space."""
    filler = folder / "filler"
    filler.write_bytes(bytes(shutil.disk_usage(folder).free - free_bytes))
    return filler


def scalar_tags(run_dir: Path) -> EventAccumulator:
    accumulator = EventAccumulator(str(run_dir))
    accumulator.Reload()
    return accumulator


def assert_one_line_error(result: subprocess.CompletedProcess, fragment: str, code: int = 2) -> None:
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
    message = [line for line in result.stderr.strip().splitlines() if "step/s" not in line]  # minus the progress bar
    assert len(message) == 1, result.stderr
    assert fragment in result.stderr


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """One short Pendulum training shared by the tests that need a real run and checkpoint."""
    cwd = tmp_path_factory.mktemp("run")
    result = run_script("train.py", cwd, *SMALL, "--episodes", "6", "--checkpoint-every", "2", "--buffer", "prioritized",
                        "--keep-checkpoints", "2", "--eval-every", "3", "--eval-episodes", "1", "--run-name", "small")
    assert result.returncode == 0, result.stderr
    assert "checkpoints/small/final.pt" in result.stdout
    return cwd


def test_train_writes_tensorboard_tags_and_checkpoints(trained_run: Path) -> None:
    events = scalar_tags(trained_run / "runs" / "small")
    # Every tag the run writes (the gradient step's metrics are logged under their own names) is documented,
    # and the docs name no tag a run does not write: adding a metric fails here until the docs' table has it.
    assert set(events.Tags()["scalars"]) == documented_tags() - TARGET_CHECK_TAGS
    returns = events.Scalars("charts/episode_return")
    assert [e.step for e in returns] == [200 * i for i in range(1, 7)]
    assert [e.step for e in events.Scalars("eval/return_mean")] == [600, 1200]
    # Periodic checkpoints pruned to the newest two; final.pt always kept.
    names = sorted(p.name for p in (trained_run / "checkpoints" / "small").glob("*.pt"))
    assert names == ["final.pt", "step_000000800.pt", "step_000001200.pt"]
    agent = SACAgent.load(trained_run / "checkpoints" / "small" / "final.pt")
    assert agent.env_id == "Pendulum-v1" and agent.config.hidden_size == 32
    assert agent.trained_at_commit == code_version() and code_version() is not None  # the code that trained it
    training = read_checkpoint(trained_run / "checkpoints" / "small" / "final.pt")["training"]
    assert training["global_step"] == 1200 and training["episode"] == 6
    assert training["buffer"]["size"] == 1200  # n-step returns store every step, the last two at the episode's end
    # 3-step targets, except for the starts 1 or 2 steps before a time-limit cut (2 of every 200 per episode).
    horizons = training["buffer"]["horizons"].tolist()
    assert horizons.count(3.0) == 6 * 198 and horizons.count(2.0) == horizons.count(1.0) == 6
    batch_horizons = [e.value for e in events.Scalars("charts/n_step_horizon")]
    assert batch_horizons and all(2.9 < h <= 3.0 for h in batch_horizons)
    # Pendulum has no terminal state: every episode ends at its time limit.
    assert [e.value for e in events.Scalars("charts/episode_time_limit")] == [1.0] * 6


def test_visualize_writes_playable_mp4s_of_the_newest_checkpoint(trained_run: Path) -> None:
    result = run_script("visualize.py", trained_run, "--episodes", "2")
    assert result.returncode == 0, result.stderr
    assert "checkpoints/small/final.pt" in result.stdout
    assert result.stdout.count("episode ") >= 2 and "mean return" in result.stdout
    videos = sorted((trained_run / "videos").glob("*.mp4"))
    assert len(videos) == 2
    reader = imageio.get_reader(videos[0], "ffmpeg")
    frames = [frame for frame in reader]
    assert len(frames) >= 150  # a 200-step episode, rendered frame by frame
    assert frames[0].ndim == 3 and frames[0].shape[2] == 3 and frames[0].std() > 0
    # A second call adds videos instead of overwriting the first ones.
    assert run_script("visualize.py", trained_run, "--episodes", "1").returncode == 0
    assert set(videos) < set((trained_run / "videos").glob("*.mp4"))


def test_visualize_without_video_reports_deterministic_returns(trained_run: Path) -> None:
    first = run_script("visualize.py", trained_run, "--episodes", "2", "--no-video", "--checkpoint", "small")
    second = run_script("visualize.py", trained_run, "--episodes", "2", "--no-video", "--checkpoint", "small")
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout  # deterministic actions and seeded resets
    assert first.stdout.count("return") == 3


def state_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint's agent state and replay buffer, flattened to dotted names."""
    checkpoint = read_checkpoint(path)
    flat: dict[str, torch.Tensor] = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, torch.Tensor):
            flat[prefix] = value
        elif isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}.{key}", item)
        elif isinstance(value, list):
            for index, item in enumerate(value):
                walk(f"{prefix}.{index}", item)

    walk("agent", checkpoint["agent"])
    walk("buffer", checkpoint["training"]["buffer"])
    return flat


def assert_same_final_state(expected_run: Path, actual_run: Path) -> None:
    """Every parameter, optimizer moment, buffer entry and RNG-free tensor of the two runs' final.pt bit for bit."""
    expected, actual = (state_tensors(folder / "final.pt") for folder in (expected_run, actual_run))
    assert expected.keys() == actual.keys() and len(expected) > 20
    for name, tensor in expected.items():
        assert torch.equal(tensor, actual[name]), name


def test_a_resume_changes_exactly_the_flags_declared_resumable_and_refuses_the_rest() -> None:
    """Each SACConfig field declares whether --resume may change it: the refusal follows the declaration."""
    checkpoint = {"metadata": {"config": dataclasses.asdict(SACConfig(run_name="r"))}}
    changed = {"env": "Pendulum-v1", "buffer": "prioritized", "target_return": "none", "precision": "bf16",
               "device": "cpu", "run_name": "other", "layer_norm": False, "compile": False, "save_buffer": False,
               "cuda_graphs": True, "critic": "tqc", "adam_beta1": 0.7,
               "obs_norm": True}
    for field in dataclasses.fields(SACConfig):
        value = changed.get(field.name, 7 if field.type in ("int", "int | None") else 0.5)
        argv = ["--resume", "r", *([f"--{'no-' if value is False else ''}{field.name.replace('_', '-')}"]
                                   if isinstance(value, bool) else [f"--{field.name.replace('_', '-')}", str(value)])]
        args = parse_args(argv)
        if field.metadata["resumable"]:
            assert getattr(train.resumed_config(checkpoint, args, {field.name}), field.name) == value, field.name
        else:
            with pytest.raises(sac_model.SACError, match=f"--{field.name.replace('_', '-')} cannot change"):
                train.resumed_config(checkpoint, args, {field.name})


def test_resume_is_bitwise_identical_to_an_uninterrupted_run(tmp_path: Path) -> None:
    # Random warm-up actions until step 600 and updates from step 200: both the action space's and
    # torch's generators are drawn from on each side of the split at step 400.
    common = [*SMALL, "--episodes", "10", "--eval-every", "1", "--eval-episodes", "1", "--lr-step-episodes", "1",
              "--start-steps", "600"]
    # The split run has the same --total-steps (PER's beta anneals over it) and stops after 2 episodes.
    whole = run_script("train.py", tmp_path, *common, "--total-steps", "800", "--run-name", "whole")
    half = run_script("train.py", tmp_path, *common, "--total-steps", "800", "--episodes", "2", "--run-name", "split")
    resumed = run_script("train.py", tmp_path, "--resume", "split", "--episodes", "10")
    for result in (whole, half, resumed):
        assert result.returncode == 0, result.stderr
    assert "resuming split" in resumed.stdout
    assert_same_final_state(tmp_path / "checkpoints" / "whole", tmp_path / "checkpoints" / "split")
    # The curves continue in the same TensorBoard run: every episode logged once, no seam.
    steps = [e.step for e in scalar_tags(tmp_path / "runs" / "split").Scalars("charts/episode_return")]
    assert steps == [200, 400, 600, 800]


def newest_mtime(folder: Path) -> int:
    """The newest checkpoint's mtime, skipping one the running run prunes between the listing and the stat."""
    times = []
    for path in folder.glob("*.pt"):
        with contextlib.suppress(FileNotFoundError):
            times.append(path.stat().st_mtime_ns)
    return max(times, default=0)


def test_sigkill_at_random_moments_always_leaves_a_resumable_checkpoint(tmp_path: Path) -> None:
    rng = random.Random(1)
    folder = tmp_path / "checkpoints" / "killed"
    args = [*SMALL, "--episodes", "1000", "--checkpoint-every", "1", "--eval-every", "0", "--keep-checkpoints", "2"]
    process = start_train(tmp_path, *args, "--run-name", "killed")
    last_step = 0
    for _ in range(3):
        previous = newest_mtime(folder)
        wait_for(lambda: newest_mtime(folder) > previous)  # the (resumed) run has written a checkpoint
        time.sleep(rng.uniform(0.0, 2.5))
        process.kill()
        process.wait(timeout=30)
        newest = max(folder.glob("*.pt"), key=lambda p: p.stat().st_mtime_ns)
        step = read_checkpoint(newest)["training"]["global_step"]
        assert step > last_step
        last_step = step
        process = start_train(tmp_path, "--resume", "killed")
    process.kill()
    process.wait(timeout=30)
    episodes = read_checkpoint(max(folder.glob("*.pt"), key=lambda p: p.stat().st_mtime_ns))["training"]["episode"]
    final = run_script("train.py", tmp_path, "--resume", "killed", "--episodes", str(episodes + 1))
    assert final.returncode == 0, final.stderr
    assert read_checkpoint(folder / "final.pt")["training"]["episode"] == episodes + 1


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_sigint_and_sigterm_save_a_checkpoint_and_a_readable_tensorboard_log(tmp_path: Path, signum: int,
                                                                            code: int) -> None:
    process = start_train(tmp_path, *SMALL, "--episodes", "1000", "--eval-every", "0", "--run-name", "stopped")
    run_dir = tmp_path / "runs" / "stopped"
    wait_for(lambda: run_dir.exists() and any(e.step >= 400 for e in _episode_events(run_dir)))
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == code, stderr
    assert "python train.py --resume stopped" in stderr and "Traceback" not in stderr
    saved = list((tmp_path / "checkpoints" / "stopped").glob("step_*.pt"))
    assert len(saved) == 1
    assert read_checkpoint(saved[0])["training"]["global_step"] >= 400
    assert len(_episode_events(run_dir)) >= 2


def test_a_run_interrupted_by_sigint_mid_episode_resumes_bitwise_like_the_uninterrupted_run(tmp_path: Path) -> None:
    common = [*SMALL, "--episodes", "8", "--eval-every", "2", "--eval-episodes", "1", "--total-steps", "1600"]
    whole = run_script("train.py", tmp_path, *common, "--run-name", "whole")
    assert whole.returncode == 0, whole.stderr
    process = start_train(tmp_path, *common, "--run-name", "split")
    run_dir = tmp_path / "runs" / "split"
    wait_for(lambda: run_dir.exists() and any(e.step >= 400 for e in _episode_events(run_dir)))
    time.sleep(0.1)  # into the next episode: the signal lands mid-episode
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "SIGINT: finishing the current episode" in stderr and "it resumes exactly" in stderr, stderr
    saved = read_checkpoint(next((tmp_path / "checkpoints" / "split").glob("step_*.pt")))["training"]
    assert saved["episode_finished"] and saved["global_step"] % 200 == 0 and saved["global_step"] < 1600
    resumed = run_script("train.py", tmp_path, "--resume", "split")
    assert resumed.returncode == 0, resumed.stderr
    assert "exactly (an end-of-episode checkpoint with its buffer)" in resumed.stdout
    assert_same_final_state(tmp_path / "checkpoints" / "whole", tmp_path / "checkpoints" / "split")


def test_a_second_sigint_stops_at_once_mid_episode_and_the_resume_says_why_it_is_approximate(tmp_path: Path) -> None:
    # 1000-step episodes take seconds here: stopping "at once" cannot be waiting for the episode's end.
    args = [*SMALL, "--max-steps", "1000", "--episodes", "100", "--eval-every", "0", "--run-name", "twice"]
    process = start_train(tmp_path, *args)
    run_dir = tmp_path / "runs" / "twice"
    wait_for(lambda: run_dir.exists() and any(e.step >= 1000 for e in _episode_events(run_dir)))
    time.sleep(0.5)
    process.send_signal(signal.SIGINT)
    time.sleep(0.3)
    second = time.monotonic()
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    stopped_after = time.monotonic() - second
    assert process.returncode == 130, stderr
    assert "stopped mid-episode" in stderr and "it resumes approximately" in stderr and "Traceback" not in stderr
    assert stopped_after < 3.0, stopped_after  # measured well under 1 s on an idle 2-core machine
    saved = read_checkpoint(next((tmp_path / "checkpoints" / "twice").glob("step_*.pt")))["training"]
    assert not saved["episode_finished"] and saved["global_step"] % 1000 != 0
    resumed = run_script("train.py", tmp_path, "--resume", "twice", "--episodes", str(saved["episode"] + 1))
    assert resumed.returncode == 0, resumed.stderr
    assert "approximately, because it was written mid-episode" in resumed.stdout


def test_sigterm_finishes_the_episode_only_within_its_grace_period(tmp_path: Path) -> None:
    # An episode of 20,000 env steps takes far longer than the grace period: SIGTERM stops mid-episode.
    args = [*SMALL, "--max-steps", "20000", "--episodes", "5", "--eval-every", "0", "--run-name", "term"]
    process = start_train(tmp_path, *args)
    folder = tmp_path / "runs" / "term"
    wait_for(lambda: folder.exists())
    time.sleep(3.0)
    sent = time.monotonic()
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 143, stderr
    assert f"if it ends within {train.SIGTERM_GRACE_SECONDS:g} s" in stderr and "stopped mid-episode" in stderr
    assert train.SIGTERM_GRACE_SECONDS <= time.monotonic() - sent < train.SIGTERM_GRACE_SECONDS + 5
    saved = read_checkpoint(next((tmp_path / "checkpoints" / "term").glob("step_*.pt")))["training"]
    assert not saved["episode_finished"] and saved["episode"] == 0


def test_the_first_lines_name_the_run_its_folders_the_device_and_the_stop_rule(tmp_path: Path) -> None:
    result = run_script("train.py", tmp_path, *SMALL, "--env", "LunarLanderContinuous-v3", "--episodes", "1",
                        "--max-steps", "50", "--eval-every", "0", "--seed", "7")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    name = lines[0].removeprefix("run: ").removesuffix(" (new)")
    assert name.startswith("LunarLanderContinuous-v3__seed7__") and lines[0].endswith("(new)")
    assert lines[1] == f"logs: runs/{name}/ (watch them with: tensorboard --logdir runs)"
    assert lines[2] == f"checkpoints: checkpoints/{name}/ (every 50 episodes and the final agent)"
    assert lines[3] == "device: cpu, 1 CPU thread; gradient step: eager"
    assert lines[4].startswith("precision: fp32")
    assert lines[5].startswith("preset: LunarLanderContinuous-v3's (no value beside the defaults, stop target 260; "
                               "--preset none for the bare defaults): the defaults were searched and confirmed here")
    assert lines[6] == ("the run trains its whole budget, at most 50 env steps or 1 episode: --eval-every 0 makes no "
                        "evaluation to stop at")
    assert lines[7].startswith("Ctrl-C finishes the current episode")
    assert (tmp_path / "checkpoints" / name / "final.pt").is_file() and (tmp_path / "runs" / name).is_dir()
    default = train.stop_rule(SACConfig(), 300_000)
    assert default == ("stops at 260 (the env's solved threshold, 200, plus 60): once a 10-episode evaluation (every "
                       "10 episodes) reaches 260, 100 fresh episodes decide (its mean minus 2 standard errors >= 260); "
                       "at most 300,000 env steps")
    assert train.stop_rule(SACConfig(target_return="auto"), 300_000).startswith(
        "stops at 200 (the env's solved threshold): once a 10-episode evaluation")
    assert train.stop_rule(SACConfig(target_return="none"), 300_000) == (
        "trains its whole budget, at most 300,000 env steps (--target-return none)")


@pytest.mark.parametrize("env, says", [
    ("Pendulum-v1", "the run trains its whole budget, at most 400 env steps: Pendulum-v1 registers no solved "
                    "threshold to stop at (--target-return R stops it once a check clears R)"),
    ("MountainCarContinuous-v0", "the run stops at 90 (the env's solved threshold): once a 10-episode evaluation"),
])
def test_the_first_lines_say_what_an_env_without_lunarlanders_margin_stops_at(tmp_path: Path, env, says) -> None:
    """No threshold: the whole budget, and the flag that sets a target. A threshold near the env's best return
    (MountainCar: 90 of about 95) is the target itself, not LunarLander's threshold + 60."""
    result = run_script("train.py", tmp_path, *SMALL, "--env", env, "--total-steps", "400", "--eval-every", "10",
                        "--run-name", "first_lines")
    assert result.returncode == 0, result.stderr
    assert [line for line in result.stdout.splitlines() if line.startswith("the run ")][0].startswith(says)


def _episode_events(run_dir: Path) -> list:
    try:
        return scalar_tags(run_dir).Scalars("charts/episode_return")
    except KeyError:
        return []


def test_non_finite_training_stops_with_a_message_and_keeps_the_last_checkpoint(tmp_path: Path) -> None:
    # nan_reward_env.py registers a Pendulum whose rewards turn NaN from its 500th step on.
    result = run_script("train.py", tmp_path, *SMALL, "--env", "nan_reward_env:NanRewardPendulum-v0",
                        "--episodes", "5", "--checkpoint-every", "1", "--eval-every", "0", "--run-name", "nan")
    assert_one_line_error(result, "training diverged: non-finite", code=3)
    assert "at env step" in result.stderr
    saved = sorted((tmp_path / "checkpoints" / "nan").glob("*.pt"))
    assert [p.name for p in saved] == ["step_000000200.pt", "step_000000400.pt"]
    agent = SACAgent.load(saved[-1])
    assert agent.parameters_finite()


@pytest.mark.parametrize("flags, message", [
    (["--batch-size", "0"], "--batch-size must be positive"),
    (["--updates-per-step", "0"], "--updates-per-step must be positive"),
    (["--buffer-size", "100", "--batch-size", "256"], "larger than --buffer-size"),
    (["--gamma", "1.5"], "--gamma must be in"),
    (["--hidden-size", "abc"], "invalid int value"),
    (["--buffer", "ring"], "invalid choice"),
    (["--no-such-flag"], "unrecognized arguments"),
    (["--env", "NoSuchEnv-v0"], "cannot create environment 'NoSuchEnv-v0'"),
    (["--env", "LunarLanderContinuous-v2"], "cannot create environment 'LunarLanderContinuous-v2'"),
    (["--env", "CartPole-v1"], "Discrete action space"),
    (["--resume", "no_such_run"], "no such checkpoint file, folder or run name"),
    (["--resume", "no_such_run", "--preset", "original"], "--preset cannot be combined with --resume"),
    (["--preset", "newest"], "invalid choice"),
])
def test_invalid_train_flags_give_one_line_errors(tmp_path: Path, flags: list[str], message: str) -> None:
    assert_one_line_error(run_script("train.py", tmp_path, *flags), message)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "checkpoints").exists()


def test_foreign_and_malicious_checkpoints_are_refused_without_running_code(tmp_path: Path) -> None:
    folder = tmp_path / "checkpoints" / "evil"
    folder.mkdir(parents=True)
    marker = tmp_path / "pwned"
    with open(folder / "final.pt", "wb") as handle:
        pickle.dump(_CreatesFile(marker), handle)
    (tmp_path / "garbage.pt").write_bytes(os.urandom(4096))
    for script, args in [("train.py", ["--resume", "evil"]), ("visualize.py", ["--checkpoint", "evil"]),
                         ("visualize.py", [])]:
        assert_one_line_error(run_script(script, tmp_path, *args), "refused by weights_only loading")
    assert not marker.exists()
    assert_one_line_error(run_script("visualize.py", tmp_path, "--checkpoint", "garbage.pt"),
                          "garbage.pt: not a loadable checkpoint")


class _CreatesFile:
    """Unpickling this runs Path.touch: what a malicious checkpoint would do."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_resume_refuses_changed_hyperparameters_and_keeps_files(trained_run: Path) -> None:
    folder = trained_run / "checkpoints" / "small"
    before = {p.name: p.read_bytes() for p in folder.glob("*.pt")}
    result = run_script("train.py", trained_run, "--resume", "small", "--batch-size", "64")
    assert_one_line_error(result, "--batch-size cannot change when resuming")
    assert {p.name: p.read_bytes() for p in folder.glob("*.pt")} == before


def test_visualize_bad_inputs_give_one_line_errors(trained_run: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    assert_one_line_error(run_script("visualize.py", trained_run, "--video-folder", str(blocker / "videos")),
                          "cannot write videos to")
    assert_one_line_error(run_script("visualize.py", trained_run, "--episodes", "0"), "--episodes must be positive")
    assert_one_line_error(run_script("visualize.py", trained_run, "--checkpoint", "missing.pt"), "missing.pt")


def test_visualize_without_checkpoints_shows_the_shipped_pretrained_lander(tmp_path: Path) -> None:
    result = run_script("visualize.py", tmp_path, "--episodes", "3", "--no-video")
    assert result.returncode == 0, result.stderr
    assert "pretrained agent" in result.stdout and "LunarLanderContinuous-v3" in result.stdout
    mean_return = float(result.stdout.split("mean return ")[1].split()[0])
    assert mean_return > 100  # it lands: about 250 on these seeds when it was shipped
    returns = [float(line.split("return ")[1]) for line in result.stdout.splitlines() if line.startswith("episode ")]
    landed, crashed = sum(r >= 200 for r in returns), sum(r < 0 for r in returns)
    assert f"episodes: {landed} at or above the reward threshold 200, {crashed} below 0" in result.stdout


def test_a_default_run_tries_one_thread_beside_all_cores_and_logs_each_rounds_count(tmp_path: Path) -> None:
    """--threads 0 (the default): round 1 on all cores, rounds 2-3 on one (its first time), then the faster."""
    flags = [flag for flag in SMALL if flag not in ("--threads", "1")]
    result = run_script("train.py", tmp_path, *flags, "--threads", "0", "--total-steps", "600", "--eval-every", "0",
                        "--run-name", "chosen")
    assert result.returncode == 0, result.stderr
    cores = int(re.search(r"device: cpu, (\d+) CPU thread", result.stdout).group(1))
    if cores == 1:
        pytest.skip("torch sees one core here: there is no thread count to choose")
    assert "CPU threads (1 while another process takes a core: --threads N fixes the count)" in result.stdout
    counts = [int(event.value) for event in scalar_tags(tmp_path / "runs" / "chosen").Scalars("charts/threads")]
    assert len(counts) == 9 and counts[:3] == [cores, 1, 1] and set(counts) == {cores, 1}  # rounds at 200, ..., 600


def test_progress_written_to_a_file_is_a_plain_line_every_interval(monkeypatch, capsys) -> None:
    """A log file gets whole lines (no carriage returns), one per PLAIN_PROGRESS_SECONDS, with the latest facts."""
    monkeypatch.setattr(train, "PLAIN_PROGRESS_SECONDS", 0.0)
    display = train.ProgressDisplay(SACConfig(), start_step=100, terminal=False)
    display.step()
    display.show(TrainingState(episode=3, eval_history=[[101, 12.5, 1.0]]), deque([5.0, 7.0]))
    display.step()
    monkeypatch.setattr(train, "PLAIN_PROGRESS_SECONDS", 3600.0)
    display.step()  # within the interval: no line
    display.close()
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 and "\r" not in "".join(lines)
    assert lines[0].startswith("101 env steps [00:00, ") and lines[0].endswith(" step/s]")
    assert lines[1].startswith("102 env steps [") and lines[1].endswith(
        "step/s, episode 3, return(10) 6.0, eval 12.5 (target 260)]")


def test_sac_learns_pendulum_within_a_small_step_budget(tmp_path: Path) -> None:
    """A random policy scores about -1200 on Pendulum; SAC must reach better than -400 in 5000 steps.

    Runs the default gradient step: compiled where a C++ compiler exists.
    """
    result = run_script("train.py", tmp_path, "--env", "Pendulum-v1", "--hidden-size", "64", "--batch-size", "128",
                        "--start-steps", "1000", "--update-after", "500", "--total-steps", "5000", "--episodes", "25",
                        "--eval-every", "5", "--eval-episodes", "5", "--threads", "1", "--run-name", "learn")
    assert result.returncode == 0, result.stderr
    expected = "eager (no C++ compiler" if sac_model.missing_compiler() else "compiled (torch.compile, one graph)"
    assert f"gradient step: {expected}" in result.stdout
    compiled = re.findall(r"gradient step compiled in (\d+) s", result.stdout)
    assert len(compiled) == (0 if sac_model.missing_compiler() else 1), result.stdout
    assert "precision: fp32 (the default" in result.stdout
    history = read_checkpoint(tmp_path / "checkpoints" / "learn" / "final.pt")["training"]["eval_history"]
    first_mean, last_mean = history[0][1], history[-1][1]
    assert last_mean > -400, history
    assert last_mean > first_mean + 500, history


def test_the_final_agent_is_always_evaluated(tmp_path: Path) -> None:
    result = run_script("train.py", tmp_path, *SMALL, "--total-steps", "300", "--eval-every", "5",
                        "--eval-episodes", "1", "--run-name", "short")
    assert result.returncode == 0, result.stderr
    training = read_checkpoint(tmp_path / "checkpoints" / "short" / "final.pt")["training"]
    assert [entry[0] for entry in training["eval_history"]] == [300]  # stopped mid-episode, before any periodic eval
    assert not training["episode_finished"]
    assert [e.step for e in scalar_tags(tmp_path / "runs" / "short").Scalars("eval/return_mean")] == [300]


def test_updates_per_step_multiplies_the_gradient_steps_of_every_round(tmp_path: Path) -> None:
    result = run_script("train.py", tmp_path, *SMALL, "--total-steps", "300", "--eval-every", "0",
                        "--updates-per-step", "3", "--run-name", "utd3")
    assert result.returncode == 0, result.stderr
    checkpoint = read_checkpoint(tmp_path / "checkpoints" / "utd3" / "final.pt")
    # Rounds at env steps 200, 250 and 300, each 50 x 3 gradient steps; Adam counts the real ones.
    assert checkpoint["training"]["updates"] == 450
    assert {float(state["step"]) for state in checkpoint["agent"]["optimizers"]["critic"]["state"].values()} == {450.0}


def test_warmup_actions_are_held_for_their_repeat_count_within_each_episode(tmp_path: Path) -> None:
    result = run_script("train.py", tmp_path, *SMALL, "--start-steps", "400", "--total-steps", "400",
                        "--warmup-action-repeat", "7", "--eval-every", "0", "--run-name", "held")
    assert result.returncode == 0, result.stderr
    buffer = read_checkpoint(tmp_path / "checkpoints" / "held" / "final.pt")["training"]["buffer"]
    actions = buffer["actions"][:400, 0].reshape(2, 200).numpy()  # Pendulum's two 200-step episodes, in order
    held = actions[:, (np.arange(200) // 7) * 7]  # each step's action is its block's first one
    assert np.array_equal(actions, held)
    assert [len(np.unique(episode)) for episode in actions] == [29, 29]  # a new draw every 7 steps, from each start


def test_a_new_run_never_overwrites_an_earlier_run_of_the_same_name(trained_run: Path, tmp_path: Path) -> None:
    before = file_contents(trained_run / "checkpoints" / "small", trained_run / "runs" / "small")
    result = run_script("train.py", trained_run, *SMALL, "--episodes", "1", "--run-name", "small")
    assert_one_line_error(result, "run 'small' already exists")
    assert "--resume small" in result.stderr and "another --run-name" in result.stderr
    assert file_contents(trained_run / "checkpoints" / "small", trained_run / "runs" / "small") == before
    # TensorBoard files alone (a run killed before its first checkpoint) are a run too.
    (tmp_path / "runs" / "early").mkdir(parents=True)
    (tmp_path / "runs" / "early" / "events.out.tfevents.1").write_bytes(b"curve")
    assert_one_line_error(run_script("train.py", tmp_path, *SMALL, "--episodes", "1", "--run-name", "early"),
                          "run 'early' already exists")
    assert not (tmp_path / "checkpoints").exists()


def test_overwrite_deletes_the_earlier_run_and_says_so(tmp_path: Path) -> None:
    common = [*SMALL, "--total-steps", "200", "--eval-every", "0", "--run-name", "again"]
    assert run_script("train.py", tmp_path, *common).returncode == 0
    result = run_script("train.py", tmp_path, *common, "--hidden-size", "16", "--overwrite")
    assert result.returncode == 0, result.stderr
    assert "--overwrite: deleted 2 files of the earlier run 'again'" in result.stdout  # final.pt, one event file
    assert SACAgent.load(tmp_path / "checkpoints" / "again" / "final.pt").config.hidden_size == 16
    assert len(list((tmp_path / "runs" / "again").iterdir())) == 1


def test_a_run_in_training_is_locked_against_a_second_process_until_it_dies(tmp_path: Path) -> None:
    process = start_train(tmp_path, *SMALL, "--episodes", "1000", "--checkpoint-every", "1", "--eval-every", "0",
                          "--run-name", "busy")
    folder = tmp_path / "checkpoints" / "busy"
    try:
        wait_for(lambda: any(folder.glob("*.pt")))
        for args in (["--resume", "busy", "--episodes", "1"],
                     [*SMALL, "--episodes", "1", "--run-name", "busy", "--overwrite"]):
            assert_one_line_error(run_script("train.py", tmp_path, *args),
                                  f"run 'busy' is being trained by process {process.pid}")
        assert any(folder.glob("*.pt"))
    finally:
        process.kill()  # kill -9: the OS releases the lock, no stale lock file blocks the run
        process.wait(timeout=30)
    resumed = run_script("train.py", tmp_path, "--resume", "busy", "--episodes", "1")
    assert resumed.returncode == 0, resumed.stderr


@pytest.mark.parametrize("free_bytes, resume_flags, failed_write", [
    (40_960, ["--episodes", "4"], "checkpoints/full/step_000000600.pt"),  # no room for the next checkpoint
    (8_192, ["--episodes", "8", "--checkpoint-every", "100"], "TensorBoard events to runs/full"),
], ids=["checkpoint", "events"])
def test_a_full_disk_ends_in_one_line_and_the_run_resumes_once_space_is_freed(
        small_disk: Path, free_bytes: int, resume_flags: list[str], failed_write: str) -> None:
    first = run_script("train.py", small_disk, *SMALL, "--episodes", "2", "--checkpoint-every", "1",
                       "--eval-every", "0", "--run-name", "full")
    assert first.returncode == 0, first.stderr
    filler = fill_disk(small_disk, free_bytes)
    result = run_script("train.py", small_disk, "--resume", "full", *resume_flags)
    assert_one_line_error(result, f"cannot write {failed_write}: No space left on device", code=4)
    assert "newest intact checkpoint: checkpoints/full/final.pt" in result.stderr
    assert "python train.py --resume full" in result.stderr
    folder = small_disk / "checkpoints" / "full"
    assert not list(folder.glob(".*.tmp"))
    assert read_checkpoint(folder / "final.pt")["training"]["global_step"] == 400
    filler.unlink()
    resumed = run_script("train.py", small_disk, "--resume", "full", *resume_flags)
    assert resumed.returncode == 0, resumed.stderr


# With 8 KB free, ffmpeg truncates the first video without an error reaching moviepy; the second one fails
# with an OSError. One episode checks the silent case, two the raised one.
@pytest.mark.parametrize("episodes, reason", [("1", "ffmpeg left it incomplete"), ("2", "No space left on device")],
                         ids=["silently-truncated", "raised"])
def test_a_full_disk_while_recording_videos_ends_in_one_line_and_keeps_no_broken_video(
        trained_run: Path, small_disk: Path, episodes: str, reason: str) -> None:
    (small_disk / "checkpoints" / "small").mkdir(parents=True)
    shutil.copy(trained_run / "checkpoints" / "small" / "final.pt", small_disk / "checkpoints" / "small")
    fill_disk(small_disk, 8_192)
    result = run_script("visualize.py", small_disk, "--episodes", episodes)
    assert_one_line_error(result, f"{reason}; no video of this call was kept", code=4)
    assert "cannot write videos/small-final-" in result.stderr
    assert not list((small_disk / "videos").iterdir())


def test_a_run_that_reaches_its_target_return_stops_early_with_a_final_agent(tmp_path: Path) -> None:
    # Every Pendulum return is above -10,000: the first evaluation (after episode 2) triggers the check, which passes.
    result = run_script("train.py", tmp_path, *SMALL, "--episodes", "20", "--eval-every", "2", "--eval-episodes", "1",
                        "--target-return", "-10000", "--target-episodes", "3", "--run-name", "solved")
    assert result.returncode == 0, result.stderr
    assert "3-episode check" in result.stdout and "solved (target -10000)" in result.stdout
    training = read_checkpoint(tmp_path / "checkpoints" / "solved" / "final.pt")["training"]
    assert training["global_step"] == 400 and training["episode"] == 2
    assert [check[0] for check in training["target_checks"]] == [400]
    events = scalar_tags(tmp_path / "runs" / "solved")
    assert TARGET_CHECK_TAGS <= set(events.Tags()["scalars"]) and TARGET_CHECK_TAGS <= documented_tags()
    checks = events.Scalars("eval/target_check_mean")
    assert [e.step for e in checks] == [400] and checks[0].value == pytest.approx(training["target_checks"][0][1])


def test_a_run_below_its_target_trains_on_and_checks_its_final_agent(tmp_path: Path) -> None:
    # No Pendulum return reaches 0, so no periodic evaluation triggers a check: only the final agent gets one.
    result = run_script("train.py", tmp_path, *SMALL, "--episodes", "3", "--eval-every", "1", "--eval-episodes", "1",
                        "--target-return", "0", "--target-episodes", "2", "--run-name", "unsolved")
    assert result.returncode == 0, result.stderr
    assert "not solved (target 0)" in result.stdout
    training = read_checkpoint(tmp_path / "checkpoints" / "unsolved" / "final.pt")["training"]
    assert training["global_step"] == 600 and [check[0] for check in training["target_checks"]] == [600]
    assert [e.step for e in scalar_tags(tmp_path / "runs" / "unsolved").Scalars("eval/target_check_mean")] == [600]
    # The target may change on resume; without one, the final agent gets no check.
    resumed = run_script("train.py", tmp_path, "--resume", "unsolved", "--episodes", "4", "--target-return", "none")
    assert resumed.returncode == 0, resumed.stderr
    training = read_checkpoint(tmp_path / "checkpoints" / "unsolved" / "final.pt")["training"]
    assert training["episode"] == 4 and [check[0] for check in training["target_checks"]] == [600]


def test_each_target_check_plays_fresh_episodes_and_must_clear_the_target_by_its_lower_bound(tmp_path: Path) -> None:
    """Two checks of one unchanging agent (no update ever runs) differ only if they play different episodes;
    a lower bound 1000 standard errors below the mean fails a target that the mean alone passes."""
    result = run_script("train.py", tmp_path, *SMALL, "--episodes", "4", "--update-after", "100000",
                        "--eval-every", "2", "--eval-episodes", "1", "--target-return", "-10000",
                        "--target-episodes", "3", "--target-std-errors", "1000", "--run-name", "strict")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("not solved (target -10000)") == 2  # at both evaluations, no third at the end
    training = read_checkpoint(tmp_path / "checkpoints" / "strict" / "final.pt")["training"]
    assert training["global_step"] == 800 and [check[0] for check in training["target_checks"]] == [400, 800]
    (_, first_mean, _), (_, second_mean, std) = training["target_checks"]
    assert first_mean > -10000 and second_mean > -10000 and first_mean != second_mean
    events = scalar_tags(tmp_path / "runs" / "strict")
    lower = events.Scalars("eval/target_check_lower_bound")[-1].value
    assert lower == pytest.approx(second_mean - 1000 * std / np.sqrt(3), rel=1e-5)
    assert [e.value for e in events.Scalars("eval/target_check_passed")] == [0.0, 0.0]


# The SPEC's table of the original defaults, written out here rather than read from the code.
SPEC_ORIGINAL = {
    "env": "LunarLanderContinuous-v3", "hidden_size": 256, "layer_norm": True, "buffer_size": 1_000_000,
    "batch_size": 256, "gamma": 0.99, "tau": 0.005, "lr_actor": 3e-4, "lr_critic": 3e-4, "lr_alpha": 3e-4,
    "init_alpha": 0.2, "episodes": 1000, "max_steps": None, "start_steps": 10_000, "update_after": 1000,
    "update_every": 50, "updates_per_step": 1, "grad_clip": 1.0, "lr_step_episodes": 100, "lr_gamma": 0.95,
    "per_alpha": 0.6, "per_beta_start": 0.4, "buffer": "prioritized", "checkpoint_every": 50, "seed": 0,
}


def test_an_envs_preset_sets_its_budget_says_so_and_flags_given_or_preset_none_win() -> None:
    def config(*argv: str) -> SACConfig:
        return config_from_args(parse_args(list(argv)))

    assert config("--env", "BipedalWalker-v3").total_steps == 500_000  # rl-zoo3's budget there
    assert config("--env", "BipedalWalker-v3", "--total-steps", "1000").total_steps == 1000
    assert config("--env", "BipedalWalker-v3", "--preset", "none").total_steps == SACConfig().total_steps
    hopper = config("--env", "Hopper-v5")  # parsing needs no mujoco: presets are looked up by id
    assert (hopper.total_steps, hopper.start_steps, hopper.target_return) == (300_000, 10_000, "none")
    assert config("--env", "Pendulum-v1").total_steps == 20_000
    assert config().total_steps == SACConfig().total_steps and config().target_return == "env"  # LunarLander's: none

    def line(*argv: str) -> str:
        return train.preset_line(parse_args(list(argv)), train.flags_given(list(argv)))

    assert line("--env", "BipedalWalker-v3").startswith(
        "preset: BipedalWalker-v3's (--total-steps 500,000; --preset none for the bare defaults): budget: rl-zoo3's")
    assert line("--env", "BipedalWalker-v3", "--total-steps", "1000").startswith(
        "preset: BipedalWalker-v3's (no value beside the defaults; --preset none")
    assert line("--env", "Hopper-v5").startswith(
        "preset: Hopper-v5's (--total-steps 300,000, --start-steps 10,000, --target-return none; --preset none")
    assert line("--env", "InvertedPendulum-v5") == ("preset: none, SACConfig's defaults (searched on "
                                                         "LunarLander): ENV_PRESETS has none for "
                                                         "InvertedPendulum-v5")
    mountain_car = config("--env", "MountainCarContinuous-v0")
    assert (mountain_car.start_steps, mountain_car.warmup_action_repeat) == (10_000, 10)
    assert line("--env", "BipedalWalker-v3", "--preset", "none") == (
        "preset: none, SACConfig's defaults (searched on LunarLander)")
    assert line("--preset", "crossq") == "preset: crossq, the values of PRESETS['crossq'] in sac_model.py"
    crossq = config("--preset", "crossq")
    assert (crossq.critic, crossq.policy_delay, crossq.lr_critic, crossq.tau) == ("crossq", 3, 1e-3, SACConfig().tau)
    # A named design goes over the env's preset: on Hopper it keeps Hopper's budget, warm-up and no stop.
    hopper_crossq = config("--preset", "crossq", "--env", "Hopper-v5")
    assert (hopper_crossq.critic, hopper_crossq.total_steps, hopper_crossq.start_steps,
            hopper_crossq.target_return) == ("crossq", 300_000, 10_000, "none")
    assert line("--preset", "crossq", "--env", "Hopper-v5").endswith("in sac_model.py, over Hopper-v5's preset")


def test_every_env_preset_is_a_valid_config_with_its_source_and_the_docs_table_names_it() -> None:
    section = (REPO / "docs" / "training.md").read_text().split("## Presets per env")[1].split("\n## ")[0]
    rows = {line.split(" | ")[0].removeprefix("| "): line for line in section.splitlines() if line.startswith("| ")}
    for env, preset in sac_model.ENV_PRESETS.items():
        assert preset.source and set(preset.values) <= {f.name for f in dataclasses.fields(SACConfig)}, env
        SACConfig(env=env, **preset.values).validate()
        row = next(line for names, line in rows.items() if env in names.split(", "))
        assert all(f"{sac_model.flag(name)} {value}" in row for name, value in preset.values.items()), row


def test_preset_original_gives_exactly_the_spec_values_and_given_flags_win() -> None:
    config = config_from_args(parse_args(["--preset", "original"]))
    assert {name: getattr(config, name) for name in SPEC_ORIGINAL} == SPEC_ORIGINAL
    assert config.target_return == "none"  # the original trained its full budget
    assert set(SPEC_ORIGINAL) - {"seed"} <= set(PRESETS["original"])  # pinned, not borrowed from today's defaults
    tweaked = config_from_args(parse_args(["--preset", "original", "--batch-size", "64", "--target-return", "auto"]))
    assert (tweaked.batch_size, tweaked.target_return, tweaked.tau) == (64, "auto", 0.005)
