"""Watch a trained agent: evaluate it and record mp4 videos with gymnasium's RecordVideo.

`python visualize.py` loads the newest checkpoint under checkpoints/, plays 3 deterministic episodes
of the environment it was trained on, prints each return, the mean and standard deviation and how many
episodes reached the env's reward threshold or ended below 0, and writes the videos to videos/.
"""
from __future__ import annotations

import argparse
import errno
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

import gymnasium as gym
import numpy as np
from gymnasium.wrappers import RecordVideo

from plumbing import OneLineErrorParser, fail, find_checkpoint
from sac_model import CheckpointError, SACError, WriteError, evaluate_policy, first_line, load_agent_and_env

# A LunarLander agent that ships with the repository, so there is something to watch before training.
PRETRAINED = Path(__file__).resolve().parent / "pretrained" / "LunarLanderContinuous-v3.pt"


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(description="Evaluate a saved SAC agent and record videos of it.")
    parser.add_argument("--checkpoint", default=None,
                        help="checkpoint file, checkpoint folder or run name (default: newest under checkpoints/)")
    parser.add_argument("--episodes", type=int, default=3, help="episodes to play (default: 3)")
    parser.add_argument("--video-folder", default="videos", help="where mp4 files are written (default: videos)")
    parser.add_argument("--seed", type=int, default=0, help="episode i starts from env seed SEED + i (default: 0)")
    parser.add_argument("--stochastic", action="store_true", help="sample actions instead of tanh(mean)")
    parser.add_argument("--no-video", action="store_true", help="evaluate only, record nothing")
    return parser


def check_writable_folder(folder: Path) -> None:
    """Create the folder if needed and prove a file can be written there, or raise SACError."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as error:
        raise SACError(f"cannot write videos to {folder}: {error.strerror or error}") from None


def mp4_is_complete(path: Path) -> bool:
    """True when the file's top-level MP4 boxes fill it exactly and include the index (moov).

    On a full disk ffmpeg can stop writing a video without any error reaching moviepy, leaving a file no
    player opens: only its structure tells.
    """
    data = path.read_bytes()
    position, kinds = 0, set()
    while position + 8 <= len(data):
        size = int.from_bytes(data[position:position + 4], "big")
        kinds.add(data[position + 4:position + 8])
        if size == 1:  # a 64-bit size follows the type
            size = int.from_bytes(data[position + 8:position + 16], "big")
        if size < 8:
            return False
        position += size
    return position == len(data) and b"moov" in kinds


def video_write_error(videos: list[Path], error: OSError | None) -> WriteError:
    """WriteError naming the newest video and the OS's reason, found in ffmpeg's log that moviepy passes on."""
    reasons = [os.strerror(code) for code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO)]
    found = [reason for reason in reasons if error is not None and reason in str(error)]
    reason = found[0] if found else (error.strerror if error is not None else "ffmpeg left it incomplete")
    newest = max(videos, key=lambda p: p.stat().st_mtime_ns) if videos else "a video"
    return WriteError(f"cannot write {newest}: {reason}; no video of this call was kept")


def record_checked(play: Callable[[], list[float]], folder: Path, prefix: str) -> list[float]:
    """Run `play` while RecordVideo writes its mp4s; if any write fails or leaves a broken file, delete them all.

    Raises WriteError: a failed call keeps no half-written video.
    """
    try:
        returns, error = play(), None
    except OSError as raised:
        returns, error = [], raised
    videos = sorted(folder.glob(prefix + "*.mp4"))
    if error is None and all(mp4_is_complete(video) for video in videos):
        return returns
    failure = video_write_error(videos, error)
    for video in videos:
        video.unlink()
    # RecordVideo whose close failed still holds frames; its __del__ would warn at exit that they were not saved.
    warnings.filterwarnings("ignore", message=".*Unable to save last video")
    raise failure


def check_frames_render(env: gym.Env) -> None:
    """Draw one frame, or raise SACError saying why not and that --no-video scores without frames."""
    try:
        with warnings.catch_warnings():  # GLFW warns before it fails; the failure says it
            warnings.simplefilter("ignore")
            env.reset(seed=0)
            env.render()
    except Exception as error:  # renderers fail in their own ways: MuJoCo's FatalError, pygame's error, ...
        env.close()
        mujoco_gl = f" with MUJOCO_GL={os.environ['MUJOCO_GL']}" if "MUJOCO_GL" in os.environ else ""
        raise SACError(f"cannot draw {env.spec.id if env.spec else env}'s frames{mujoco_gl}: "
                       f"{type(error).__name__}: {first_line(error)}; --no-video scores the agent without video"
                       ) from None


def newest_or_pretrained() -> Path:
    """The newest checkpoint under checkpoints/, else the agent shipped in pretrained/."""
    try:
        return find_checkpoint(None)
    except CheckpointError:
        if not PRETRAINED.is_file():
            raise
        print(f"no checkpoints/ here yet: showing the pretrained agent {PRETRAINED}")
        return PRETRAINED


def visualize(args: argparse.Namespace) -> None:
    if args.episodes <= 0:
        raise SACError(f"--episodes must be positive, got {args.episodes}")
    path = find_checkpoint(args.checkpoint) if args.checkpoint else newest_or_pretrained()
    # Frames are drawn off-screen; without this SDL looks for a display and prints a bogus error when headless,
    # and MuJoCo's default (GLFW) needs a display: EGL draws without one (where there is a GPU driver or Mesa).
    os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
    if not os.environ.get("DISPLAY"):
        os.environ.setdefault("MUJOCO_GL", "egl")
    agent, env = load_agent_and_env(path, render_mode=None if args.no_video else "rgb_array")
    if not args.no_video:
        check_frames_render(env)
        folder = Path(args.video_folder)
        check_writable_folder(folder)
        # A fresh prefix per call: RecordVideo overwrites files of the same name, and old videos stay.
        prefix = f"{path.parent.name}-{path.stem}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        with warnings.catch_warnings():  # it warns about any mp4 in the folder, though ours never collide
            warnings.filterwarnings("ignore", message=".*Overwriting existing videos")
            env = RecordVideo(env, str(folder), episode_trigger=lambda _: True, name_prefix=prefix)
    mode = "stochastic" if args.stochastic else "deterministic"
    made_by = (f"trained at commit {agent.trained_at_commit}" if agent.trained_at_commit
               else "from before checkpoints recorded their commit")
    print(f"{agent.env_id}: {args.episodes} {mode} episodes of {path} ({made_by})")

    def play() -> list[float]:
        try:
            return evaluate_policy(agent, env, args.episodes, args.seed, deterministic=not args.stochastic,
                                   on_episode_end=lambda i, r: print(f"episode {i + 1}: return {r:.1f}"))
        finally:
            env.close()  # RecordVideo writes the last video here

    returns = play() if args.no_video else record_checked(play, folder, prefix)
    print(f"mean return {np.mean(returns):.1f} +/- {np.std(returns):.1f} (std) over {len(returns)} episodes")
    print(outcome_counts(returns, env.spec.reward_threshold if env.spec else None))
    if not args.no_video:
        print(f"videos: {sorted(str(p) for p in Path(args.video_folder).glob(prefix + '*.mp4'))}")


def outcome_counts(returns: list[float], threshold: float | None) -> str:
    """How many episodes reached the env's reward threshold (where it has one) and how many ended below 0,
    which on LunarLander means a crash (-100) or a long hover: the numbers a 'does it land' claim rests on."""
    below = f"{sum(r < 0 for r in returns)} below 0"
    if threshold is None:
        return f"episodes: {below}"
    return f"episodes: {sum(r >= threshold for r in returns)} at or above the reward threshold {threshold:g}, {below}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        visualize(args)
    except WriteError as error:
        fail(str(error), code=4)
    except SACError as error:
        fail(str(error))
    except KeyboardInterrupt:
        fail("interrupted", code=130)
    return 0


if __name__ == "__main__":
    sys.exit(main())
