"""Train a SAC agent: `python train.py` (LunarLanderContinuous-v3), `python train.py --resume RUN`.

TensorBoard logs go to runs/<run-name>/, checkpoints to checkpoints/<run-name>/. Ctrl-C (or SIGTERM)
finishes the current step, writes a checkpoint and exits; `--resume` continues the same run.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import signal
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import numpy as np
import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from sac_model import (
    CHECKPOINTS_DIR, EVAL_SEED_OFFSET, PRESETS, RUNS_DIR, TARGET_SEED_OFFSET, OneLineErrorParser, SACAgent, SACConfig,
    SACError, TrainingDivergedError, WriteError, add_config_flags, capture_rng_state, check_checkpoint_fits_env,
    config_from_args, evaluate_policy, fail, find_checkpoint, flat_dim, keep_freed_memory_mapped, lock_run,
    NStepCollector, check_lower_bound, make_buffer, make_env, newest_intact_checkpoint, per_beta, precision_line,
    prune_checkpoints, read_checkpoint, refuse_existing_run, remove_run_files, resolve_device, restore_rng_state,
    seed_everything, step_budget, target_return,
)

# Flags that may differ from the checkpoint's config when resuming: how long and how the run is
# watched, never what it learns.
RESUME_OVERRIDABLE = {"episodes", "total_steps", "eval_every", "eval_episodes", "target_return", "target_episodes",
                      "target_std_errors", "checkpoint_every", "keep_checkpoints", "save_buffer", "device", "threads",
                      "compile", "cuda_graphs"}
METRIC_TAGS = {
    "critic1_loss": "losses/critic1", "critic2_loss": "losses/critic2", "actor_loss": "losses/actor",
    "alpha_loss": "losses/alpha", "alpha": "charts/alpha", "mean_q": "charts/mean_q",
    "entropy": "charts/entropy", "horizon": "charts/n_step_horizon",
}


@dataclass
class Progress:
    """Counters saved in every checkpoint; with the RNG states and the buffer they make a resume exact."""

    global_step: int = 0
    episode: int = 0
    updates: int = 0
    eval_history: list = field(default_factory=list)  # [env step, mean return, std] per evaluation
    target_checks: list = field(default_factory=list)  # [env step, mean return, std] per --target-episodes evaluation


class StopSignal:
    """Turns SIGINT and SIGTERM into a flag the loop checks after every env step."""

    def __init__(self) -> None:
        self.signum: int | None = None
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        self.signum = signum


def build_parser(preset: str | None = None) -> argparse.ArgumentParser:
    """train.py's flags, whose defaults are SACConfig's or, with a preset's name, the preset's."""
    parser = OneLineErrorParser(description="Train Soft Actor-Critic on a gymnasium continuous-control task.")
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="start from a named set of defaults; flags given still win. 'original': the "
                             "configuration the repository started from (docs/defaults.md), without --target-return")
    add_config_flags(parser, SACConfig(**PRESETS[preset]) if preset else None)
    parser.add_argument("--resume", metavar="PATH", default=None,
                        help="continue a run: a checkpoint file, a checkpoint folder or a run name (newest checkpoint)")
    parser.add_argument("--overwrite", action="store_true",
                        help="start the run over: delete the checkpoints and TensorBoard logs of an earlier run of "
                             "the same --run-name first")
    return parser


def flags_given(argv: list[str]) -> set[str]:
    """Names of the config fields set explicitly on the command line."""
    unset = object()
    probe = build_parser()
    probe.set_defaults(**{f.name: unset for f in dataclasses.fields(SACConfig)})
    given = {name for name, value in vars(probe.parse_args(argv)).items() if value is not unset}
    return given - {"resume", "overwrite", "preset"}


def changed_flags(config: SACConfig, args: argparse.Namespace, given: set[str]) -> set[str]:
    """The config fields given on the command line whose value differs from `config`'s."""
    return {name for name in given if getattr(args, name) != getattr(config, name)}


def parse_args(argv: list[str]) -> argparse.Namespace:
    """train.py's flags; a --preset replaces the defaults the flags not given fall back on."""
    preset = build_parser().parse_known_args(argv)[0].preset
    return build_parser(preset).parse_args(argv)


def resumed_config(checkpoint: dict, args: argparse.Namespace, given: set[str]) -> SACConfig:
    """The checkpoint's config, with the run-length and bookkeeping flags the user gave on top."""
    config = SACConfig(**checkpoint["metadata"]["config"])
    changed = changed_flags(config, args, given)
    forbidden = sorted(changed - RESUME_OVERRIDABLE)
    if forbidden:
        raise SACError(f"--{forbidden[0].replace('_', '-')} cannot change when resuming; "
                       f"only {', '.join(sorted('--' + n.replace('_', '-') for n in RESUME_OVERRIDABLE))} can")
    return dataclasses.replace(config, **{name: getattr(args, name) for name in changed})


def update_round(agent: SACAgent, buffer, writer: SummaryWriter, config: SACConfig, progress: Progress) -> None:
    """The gradient steps owed to the last `update_every` env steps, then log the last one's metrics."""
    step = progress.global_step
    beta = per_beta(config, step) if config.buffer == "prioritized" else None
    gradient_steps = config.update_every * config.updates_per_step
    try:
        for batch in buffer.batches(gradient_steps, config.batch_size, beta or 1.0):
            metrics = agent.update(batch)
            buffer.update_priorities(batch.indices, metrics["priorities"])
    except TrainingDivergedError as error:
        raise TrainingDivergedError(f"{error} at env step {step}") from None
    progress.updates += gradient_steps
    log_update_metrics(writer, metrics, agent, beta, step)


def log_update_metrics(writer: SummaryWriter, metrics: dict[str, torch.Tensor], agent: SACAgent,
                       beta: float | None, step: int) -> None:
    """Write the last update's metrics; one host sync per update round. Stops on a non-finite value."""
    values = dict(zip(METRIC_TAGS, torch.stack([metrics[name] for name in METRIC_TAGS]).tolist()))
    for name, value in values.items():
        if not np.isfinite(value):
            raise TrainingDivergedError(f"non-finite {name} ({value}) at env step {step}")
        writer.add_scalar(METRIC_TAGS[name], value, step)
    for name, lr in agent.learning_rates().items():
        writer.add_scalar(f"charts/lr_{name}", lr, step)
    if beta is not None:
        writer.add_scalar("charts/per_beta", beta, step)


def save_checkpoint(agent: SACAgent, buffer, progress: Progress, env, config: SACConfig, name: str,
                    episode_finished: bool, writer: SummaryWriter) -> Path:
    """Write checkpoints/<run>/<name>.pt with everything `--resume` needs; refuses a diverged agent.

    The TensorBoard events are flushed first: a checkpoint never claims steps whose events failed to be written.
    """
    if not agent.parameters_finite():
        raise TrainingDivergedError(f"non-finite network parameters at env step {progress.global_step}; "
                                    "the last good checkpoint is left untouched")
    writer.flush()
    training = {
        **dataclasses.asdict(progress),
        "run_name": config.run_name,
        "episode_finished": episode_finished,
        "rng": capture_rng_state(env),
        "buffer": buffer.state_dict() if config.save_buffer else None,
    }
    return agent.save(CHECKPOINTS_DIR / config.run_name / f"{name}.pt", training)


def run_config(args: argparse.Namespace, given: set[str]) -> tuple[SACConfig, dict | None, Path | None]:
    """The validated config of a new run, or of the resumed one with its checkpoint."""
    checkpoint, checkpoint_path = None, None
    if args.resume and args.preset:
        raise SACError("--preset cannot be combined with --resume: a resumed run keeps its checkpoint's config")
    if args.resume:
        checkpoint_path = find_checkpoint(args.resume)
        checkpoint = read_checkpoint(checkpoint_path)
        if not checkpoint.get("training"):
            raise SACError(f"{checkpoint_path}: holds an agent but no training state to resume")
        config = resumed_config(checkpoint, args, given)
    else:
        config = config_from_args(args)
        if config.run_name is None:
            config.run_name = f"{config.env}__seed{config.seed}__{time.strftime('%Y%m%d-%H%M%S')}"
    config.validate()
    return config, checkpoint, checkpoint_path


def claim_run(run_name: str, new_run: bool, overwrite: bool) -> IO:
    """Lock the run for this process; a new run is refused if the name is taken, unless --overwrite deletes it.

    The name is checked before anything is written. Two processes started on one new name at once pass it
    together, and then the lock refuses the second.
    """
    if new_run and not overwrite:
        refuse_existing_run(run_name)
    lock = lock_run(run_name)
    if new_run and overwrite:
        removed = remove_run_files(run_name)
        print(f"--overwrite: deleted {removed} files of the earlier run {run_name!r} "
              f"({CHECKPOINTS_DIR / run_name}/, {RUNS_DIR / run_name}/)")
    return lock


def open_event_log(config: SACConfig, resumed_step: int | None) -> SummaryWriter:
    """The run's TensorBoard writer, its first events on disk.

    On resume, events logged after the checkpoint by the interrupted process are dropped: no seam, no duplicates.
    """
    writer = SummaryWriter(RUNS_DIR / config.run_name, purge_step=None if resumed_step is None else resumed_step + 1)
    if resumed_step is None:
        writer.add_text("config", "\n".join(f"{k}: {v}  " for k, v in dataclasses.asdict(config).items()))
    writer.flush()
    return writer


def write_failure(error: OSError | WriteError, run_name: str) -> WriteError:
    """One line for a failed write: the file, the OS's reason, the newest intact checkpoint and how to go on.

    A bare OSError comes from TensorBoard's writer thread, which re-raises its failure at a later add_scalar
    or flush, without a file name.
    """
    if isinstance(error, OSError):
        error = WriteError(f"cannot write TensorBoard events to {error.filename or RUNS_DIR / run_name}: "
                           f"{error.strerror or error}")
    newest = newest_intact_checkpoint(CHECKPOINTS_DIR / run_name)
    if newest is None:
        return WriteError(f"{error}; no checkpoint of run {run_name!r} yet: free space and start it again "
                          "with --overwrite")
    return WriteError(f"{error}; newest intact checkpoint: {newest}; free space, then continue with: "
                      f"python train.py --resume {run_name}")


def quiet_event_writer_thread() -> None:
    """Keep TensorBoard's writer thread from printing a traceback when a write fails.

    tensorboard stores the thread's exception and re-raises it in the main thread at the next add_scalar or
    flush, where train() reports it in one line; the thread's own report would be a second, noisy one.
    """
    default_hook = threading.excepthook

    def hook(args: threading.ExceptHookArgs) -> None:
        if not (isinstance(args.exc_value, OSError) and type(args.thread).__module__.startswith("tensorboard.")):
            default_hook(args)

    threading.excepthook = hook


def restore_training_state(checkpoint: dict, path: Path, agent: SACAgent, buffer, env) -> Progress:
    """Load the agent, replay buffer, counters and RNG states of a checkpoint into a fresh run."""
    check_checkpoint_fits_env(checkpoint, env, path)
    agent.load_state_dict(checkpoint["agent"])
    training = checkpoint["training"]
    if training["buffer"] is not None:
        buffer.load_state_dict(training["buffer"])
    env.reset(seed=agent.config.seed)  # creates the env's generators, then they are overwritten
    restore_rng_state(training["rng"], env)
    progress = Progress(**{f.name: training[f.name] for f in dataclasses.fields(Progress) if f.name in training})
    exact = training["buffer"] is not None and training["episode_finished"]
    print(f"resuming {agent.config.run_name} from {path} at env step {progress.global_step}, episode "
          f"{progress.episode}" + ("" if exact else " (approximately: mid-episode or without replay buffer)"))
    return progress


def train(args: argparse.Namespace, given: set[str]) -> int:
    config, checkpoint, checkpoint_path = run_config(args, given)
    device = resolve_device(config.device)
    if config.threads:
        torch.set_num_threads(config.threads)
    seed_everything(config.seed)

    env = make_env(config.env, config.max_steps)
    config.max_steps = env.spec.max_episode_steps
    eval_env = make_env(config.env, config.max_steps)
    run_lock = claim_run(config.run_name, checkpoint is None, args.overwrite)  # after the env is known to be valid
    obs_dim, action_dim = flat_dim(env.observation_space), flat_dim(env.action_space)
    agent = SACAgent(obs_dim, env.action_space.low, env.action_space.high, config, device, config.env)
    buffer = make_buffer(config, obs_dim, action_dim, device)
    collector = NStepCollector(config.n_step, config.gamma)
    if config.compile:
        agent.compile_update()
    print(f"gradient step: {agent.step_runs}")
    print(precision_line(config.precision, device))
    env.action_space.seed(config.seed)
    progress, first_reset_seed = Progress(), config.seed
    if checkpoint is not None:
        progress, first_reset_seed = restore_training_state(checkpoint, checkpoint_path, agent, buffer, env), None

    try:
        writer = open_event_log(config, progress.global_step if checkpoint else None)
    except OSError as error:
        raise write_failure(error, config.run_name) from None
    budget = step_budget(config)
    bar = tqdm(total=budget, initial=progress.global_step, unit="step", dynamic_ncols=True,
               mininterval=0.5 if sys.stderr.isatty() else 30.0, file=sys.stderr)
    recent_returns: deque[float] = deque(maxlen=10)
    stop = StopSignal()
    session_start, session_start_step = time.perf_counter(), progress.global_step
    episode_finished = True
    compile_pending = agent.step_runs.startswith("compiled")  # torch.compile builds the step at its first call
    try:
        while (progress.global_step < budget and (config.episodes is None or progress.episode < config.episodes)
               and stop.signum is None and not solved(progress, config)):
            obs, _ = env.reset(seed=first_reset_seed)
            first_reset_seed = None
            collector.clear()
            episode_return, episode_length = 0.0, 0
            while True:
                if progress.global_step < config.start_steps:
                    env_action = env.action_space.sample()
                else:
                    env_action = agent.select_action(obs)
                next_obs, reward, terminated, truncated, _ = env.step(env_action)
                for transition in collector.push(obs, agent.normalize_action(env_action), reward, next_obs,
                                                 terminated, truncated):
                    buffer.add(*transition)
                obs = next_obs
                episode_return += float(reward)
                episode_length += 1
                progress.global_step += 1
                bar.update(1)

                step = progress.global_step
                if step >= config.update_after and step % config.update_every == 0:
                    if compile_pending:
                        tqdm.write("compiling the gradient step before the first update: 30-60 s the first time, "
                                   "seconds once inductor's cache holds it")
                        compile_pending = False
                    update_round(agent, buffer, writer, config, progress)
                episode_finished = terminated or truncated
                if episode_finished or step >= budget or stop.signum is not None:
                    break
            if episode_finished:
                progress.episode += 1
                finish_episode(agent, buffer, env, eval_env, writer, config, progress, episode_return,
                               episode_length, bool(truncated and not terminated), recent_returns, bar, session_start,
                               session_start_step)
        bar.close()

        if stop.signum is not None:
            path = save_checkpoint(agent, buffer, progress, env, config, f"step_{progress.global_step:09d}",
                                   episode_finished, writer)
            prune_checkpoints(path.parent, config.keep_checkpoints)
            print(f"{signal.Signals(stop.signum).name} received: stopped at env step {progress.global_step}, "
                  f"saved {path}; continue with: python train.py --resume {config.run_name}", file=sys.stderr)
            return 128 + stop.signum
        if config.eval_every and (not progress.eval_history or progress.eval_history[-1][0] != progress.global_step):
            evaluate_and_log(agent, eval_env, writer, config, progress)  # the final agent is always evaluated
        checked_now = bool(progress.target_checks) and progress.target_checks[-1][0] == progress.global_step
        if target_return(config) is not None and not solved(progress, config) and not checked_now:
            check_target(agent, eval_env, writer, config, progress, "the step budget is spent")  # for the record
        path = save_checkpoint(agent, buffer, progress, env, config, "final", episode_finished, writer)
        print(f"finished {progress.episode} episodes, {progress.global_step} env steps; final agent: {path}")
        return 0
    except (OSError, WriteError) as error:
        raise write_failure(error, config.run_name) from None
    finally:
        bar.close()
        with contextlib.suppress(OSError):  # a failed write was reported above; the first error is the one to tell
            writer.close()
        env.close()
        eval_env.close()
        run_lock.close()


def evaluate_and_log(agent: SACAgent, eval_env, writer: SummaryWriter, config: SACConfig, progress: Progress) -> None:
    """Deterministic evaluation on the same fixed seeds every time, logged and kept in the history."""
    returns = evaluate_policy(agent, eval_env, config.eval_episodes, config.seed + EVAL_SEED_OFFSET)
    step = progress.global_step
    progress.eval_history.append([step, float(np.mean(returns)), float(np.std(returns))])
    writer.add_scalar("eval/return_mean", np.mean(returns), step)
    writer.add_scalar("eval/return_std", np.std(returns), step)


def lower_bound(check: list[float], config: SACConfig) -> float:
    """The lower bound of a target check ([step, mean, std]) under this run's --target-std-errors."""
    _, mean, std = check
    return check_lower_bound(mean, std, config.target_episodes, config.target_std_errors)


def solved(progress: Progress, config: SACConfig) -> bool:
    """Whether the latest target check reached --target-return (never without a target)."""
    target = target_return(config)
    return (target is not None and bool(progress.target_checks)
            and lower_bound(progress.target_checks[-1], config) >= target)


def check_target(agent: SACAgent, eval_env, writer: SummaryWriter, config: SACConfig, progress: Progress,
                 what: str) -> None:
    """The evaluation that decides whether the run is solved: --target-episodes deterministic episodes.

    Every check plays episodes no earlier check played: a run checked many times must not stop on the
    one lucky set of start states it happened to be checked on.
    """
    tqdm.write(f"env step {progress.global_step}: {what}; checking it over {config.target_episodes} episodes")
    first_seed = config.seed + TARGET_SEED_OFFSET + len(progress.target_checks) * config.target_episodes
    returns = evaluate_policy(agent, eval_env, config.target_episodes, first_seed)
    step, mean, std = progress.global_step, float(np.mean(returns)), float(np.std(returns))
    progress.target_checks.append([step, mean, std])
    lower = lower_bound(progress.target_checks[-1], config)
    writer.add_scalar("eval/target_check_mean", mean, step)
    writer.add_scalar("eval/target_check_std", std, step)
    writer.add_scalar("eval/target_check_lower_bound", lower, step)
    writer.add_scalar("eval/target_check_passed", float(solved(progress, config)), step)
    verdict = "solved" if solved(progress, config) else "not solved"
    bound = f", lower bound {lower:.1f}" if config.target_std_errors else ""
    tqdm.write(f"env step {step}: {config.target_episodes}-episode check {mean:.1f} +/- {std:.1f}{bound}, "
               f"{verdict} (target {target_return(config):g})")


def finish_episode(agent: SACAgent, buffer, env, eval_env, writer: SummaryWriter, config: SACConfig,
                   progress: Progress, episode_return: float, episode_length: int, time_limit_cut: bool,
                   recent_returns: deque, bar: tqdm, session_start: float, session_start_step: int) -> None:
    """Episode bookkeeping: logs, LR schedule, evaluation (and target check), periodic checkpoint."""
    step = progress.global_step
    recent_returns.append(episode_return)
    steps_per_second = (step - session_start_step) / max(time.perf_counter() - session_start, 1e-9)
    writer.add_scalar("charts/episode_return", episode_return, step)
    writer.add_scalar("charts/episode_length", episode_length, step)
    # 1 for an episode the time limit ended: on LunarLander, a lander that hovers instead of landing
    writer.add_scalar("charts/episode_time_limit", float(time_limit_cut), step)
    writer.add_scalar("charts/steps_per_second", steps_per_second, step)
    if step >= config.update_after:
        agent.step_schedulers()
    postfix = {"ep": progress.episode, "return(10)": f"{np.mean(recent_returns):.1f}"}
    if config.eval_every and progress.episode % config.eval_every == 0:
        evaluate_and_log(agent, eval_env, writer, config, progress)
        target = target_return(config)
        if target is not None and progress.eval_history[-1][1] >= target:
            check_target(agent, eval_env, writer, config, progress,
                         f"the {config.eval_episodes}-episode evaluation reached {target:g}")
    if progress.eval_history:
        postfix["eval"] = f"{progress.eval_history[-1][1]:.1f}"
    bar.set_postfix(postfix, refresh=False)
    if progress.episode % config.checkpoint_every == 0:
        path = save_checkpoint(agent, buffer, progress, env, config, f"step_{step:09d}", True, writer)
        prune_checkpoints(path.parent, config.keep_checkpoints)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    keep_freed_memory_mapped()
    args = parse_args(argv)
    if args.overwrite and args.resume:
        build_parser().error("--overwrite starts a run over; it cannot be combined with --resume")
    quiet_event_writer_thread()
    try:
        return train(args, flags_given(argv))
    except TrainingDivergedError as error:
        fail(f"training diverged: {error}", code=3)
    except WriteError as error:
        fail(str(error), code=4)
    except SACError as error:
        fail(str(error))
    except KeyboardInterrupt:  # before the signal handlers are installed: nothing to save yet
        fail("interrupted before training started", code=130)
    return 1


if __name__ == "__main__":
    sys.exit(main())
