"""A MuJoCo env end to end: train.py a few hundred steps on Hopper-v5 with its preset, then visualize.py plays
the checkpoint back, with a video drawn headless and, where no renderer works, with one line and --no-video."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("mujoco", reason="the MuJoCo envs are an optional extra: pip install -r requirements-mujoco.txt")

REPO = Path(__file__).resolve().parents[1]
TINY = ["--hidden-size", "16", "--batch-size", "32", "--buffer-size", "1000", "--start-steps", "100",
        "--update-after", "100", "--no-compile", "--threads", "1", "--eval-every", "0"]


def run(script: str, cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    variables = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "MUJOCO_GL")} | env
    return subprocess.run([sys.executable, str(REPO / script), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env=variables)


def test_hopper_trains_with_its_preset_and_plays_back_with_and_without_video(tmp_path: Path) -> None:
    trained = run("train.py", tmp_path, "--env", "Hopper-v5", "--total-steps", "300", "--run-name", "hop", *TINY)
    assert trained.returncode == 0, trained.stderr
    assert "preset: Hopper-v5's (--target-return none; --preset none for the bare defaults)" in trained.stdout
    assert "finished" in trained.stdout and (tmp_path / "checkpoints" / "hop" / "final.pt").is_file()

    shown = run("visualize.py", tmp_path, "--checkpoint", "hop", "--episodes", "1")  # no display: EGL
    assert shown.returncode == 0, shown.stderr
    videos = list((tmp_path / "videos").glob("*.mp4"))
    assert len(videos) == 1 and videos[0].stat().st_size > 1000
    assert "Hopper-v5: 1 deterministic episodes" in shown.stdout and "mean return" in shown.stdout

    # GLFW needs a display: one line that names the way out, and nothing written.
    refused = run("visualize.py", tmp_path, "--checkpoint", "hop", "--video-folder", "none", MUJOCO_GL="glfw")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert refused.stderr.startswith("error: cannot draw Hopper-v5's frames with MUJOCO_GL=glfw: ")
    assert refused.stderr.rstrip().endswith("--no-video scores the agent without video")
    assert not list((tmp_path / "none").glob("*.mp4"))
    scored = run("visualize.py", tmp_path, "--checkpoint", "hop", "--episodes", "2", "--no-video", MUJOCO_GL="glfw")
    assert scored.returncode == 0 and "over 2 episodes" in scored.stdout
