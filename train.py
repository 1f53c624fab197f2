"""Train a SAC agent: `python train.py` (LunarLanderContinuous-v3), `python train.py --resume RUN`.

TensorBoard logs go to runs/<run-name>/, checkpoints to checkpoints/<run-name>/. The first Ctrl-C (or SIGTERM)
finishes the current episode and writes a checkpoint that resumes exactly; a second stops at once.
`--resume` continues the same run.
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

import gymnasium as gym
import numpy as np
import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from plumbing import (
    CHECKPOINTS_DIR, FINAL_CHECKPOINT, RUNS_DIR, OneLineErrorParser, ThreadChooser, TrainingState, add_config_flags,
    capture_rng_state, code_version, config_from_args, fail, find_checkpoint, keep_freed_memory_mapped, lock_run,
    newest_intact_checkpoint, periodic_checkpoint_name, precision_line, prune_checkpoints, refuse_existing_run,
    remove_run_files, restore_rng_state,
)
from sac_model import (
    PRESETS, PRIORITIES, NStepCollector, ReplayBuffer, SACAgent, SACConfig, SACError, Tag, TrainingDivergedError,
    WriteError, check_checkpoint_fits_env, check_lower_bound, check_seed, checkpoint_config, env_preset,
    env_threshold, evaluate_policy, evaluation_seed, flag, flat_dim, is_solved, make_buffer, make_env, read_checkpoint,
    preset_values, resolve_device, seed_everything, step_budget, target_return,
)
# After SIGTERM the run finishes its episode only if that takes at most this long, then stops at once: a
# container or job scheduler sends SIGKILL after a grace period (Docker's default: 10 s).
SIGTERM_GRACE_SECONDS = 5.0
# Written to a file or a pipe, progress is a plain line this often (a terminal redraws one line in place).
PLAIN_PROGRESS_SECONDS = 30.0
# What the compile costs: benchmarks/resume_compile.py measures it (docs/performance.md#compiling).
COMPILE_TIMES = ("about 30 s the first time on a machine, 20 s for a new --threads or a new env's network shapes, "
                 "4 s once inductor's cache holds it")


class StopNow(KeyboardInterrupt):
    """Raised by a second stop signal (or SIGTERM's grace period running out) wherever the run is."""


class StopSignal:
    """SIGINT and SIGTERM: the first asks the run to stop at the end of the current episode, where its checkpoint
    resumes exactly; a second one, or SIGTERM_GRACE_SECONDS after SIGTERM, stops it at once.

    The handler only records the signal (or raises StopNow): writing to a stream from a signal handler can
    interrupt a write to the same stream. The loop says what will happen.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self.announced = False
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGALRM):
            signal.signal(signum, self._handle)

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame: object) -> None:
        if self.signum is not None or signum == signal.SIGALRM:
            self.disarm()
            raise StopNow()
        self.signum = signum
        if signum == signal.SIGTERM:
            signal.setitimer(signal.ITIMER_REAL, SIGTERM_GRACE_SECONDS)

    def announce(self, steps_left: int) -> None:
        """Say once what the first signal does: the episode is finished, then a checkpoint is written."""
        self.announced = True
        within = (f"if it ends within {SIGTERM_GRACE_SECONDS:g} s" if self.signum == signal.SIGTERM
                  else f"at most {steps_left:,} more env steps")
        tqdm.write(f"{signal.Signals(self.signum).name}: finishing the current episode ({within}) to save a "
                   "checkpoint that resumes exactly; send it again to stop at once", file=sys.stderr)

    def disarm(self) -> None:
        """Ignore further signals (while the last checkpoint is written) and cancel SIGTERM's grace timer."""
        signal.setitimer(signal.ITIMER_REAL, 0)
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGALRM):
            signal.signal(signum, signal.SIG_IGN)


@dataclass
class Episode:
    """One training episode as it is played."""

    total_return: float = 0.0
    length: int = 0
    terminated: bool = False
    truncated: bool = False

    @property
    def finished(self) -> bool:
        return self.terminated or self.truncated


@dataclass
class Run:
    """Everything one training process works with; the loop's functions share it."""

    config: SACConfig
    agent: SACAgent
    buffer: ReplayBuffer
    collector: NStepCollector
    env: gym.Env
    eval_env: gym.Env
    writer: SummaryWriter
    progress: TrainingState
    display: "ProgressDisplay"
    stop: StopSignal
    next_reset_seed: int | None  # the first reset of a new run is seeded; a resumed env continues its RNG
    at_episode_boundary: bool = True  # the last episode and its bookkeeping are complete: a checkpoint is exact
    recent_returns: deque = field(default_factory=lambda: deque(maxlen=10))
    session_start: float = field(default_factory=time.perf_counter)
    session_start_step: int = 0
    compile_pending: bool = False  # torch.compile builds the step at its first call
    threads: ThreadChooser | None = None  # None: --threads N, or a device or CPU where there is nothing to choose


class ProgressDisplay:
    """The progress line: env steps, elapsed time, steps per second, the latest evaluation against the target
    and the checks so far. No time estimate: the cap it could be made against is rarely reached, and when a
    run will be solved is what nobody knows.

    In a terminal, one line redrawn in place; written to a file or a pipe, a plain line every
    PLAIN_PROGRESS_SECONDS, so that a log reads line by line.
    """

    def __init__(self, config: SACConfig, start_step: int, terminal: bool | None = None) -> None:
        self.config = config
        self.target = target_return(config)
        self.steps, self.first_step, self.facts = start_step, start_step, ""
        self.started = self.last_line = time.monotonic()
        terminal = sys.stderr.isatty() if terminal is None else terminal
        self.bar = tqdm(initial=start_step, unit="step", dynamic_ncols=True, file=sys.stderr, mininterval=0.5,
                        bar_format="{n_fmt} env steps [{elapsed}, {rate_fmt}{postfix}]") if terminal else None

    def step(self) -> None:
        self.steps += 1
        if self.bar is not None:
            self.bar.update(1)
        elif time.monotonic() - self.last_line >= PLAIN_PROGRESS_SECONDS:
            self.write_line()

    def write_line(self) -> None:
        """The progress line as a line of its own."""
        self.last_line = time.monotonic()
        elapsed = self.last_line - self.started
        rate = (self.steps - self.first_step) / max(elapsed, 1e-9)
        print(f"{self.steps:,} env steps [{tqdm.format_interval(elapsed)}, {rate:.1f} step/s"
              f"{', ' + self.facts if self.facts else ''}]", file=sys.stderr, flush=True)

    def show(self, progress: TrainingState, recent_returns: deque) -> None:
        """Refresh the line's facts after an episode."""
        facts = [f"episode {progress.episode}", f"return(10) {np.mean(recent_returns):.1f}"]
        if progress.eval_history:
            latest = f"eval {progress.eval_history[-1][1]:.1f}"
            facts.append(latest + (f" (target {self.target:g})" if self.target is not None else ""))
        if progress.target_checks:
            lower = lower_bound(progress.target_checks[-1], self.config)
            facts.append(f"checks {len(progress.target_checks)} (last lower bound {lower:.1f})")
        self.facts = ", ".join(facts)
        if self.bar is not None:
            self.bar.set_postfix_str(self.facts, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


PRESET_CHOICES = ("env", "none", *sorted(PRESETS))


def build_parser(defaults: SACConfig | None = None) -> argparse.ArgumentParser:
    """train.py's flags, whose defaults are `defaults` (a preset's), else SACConfig's."""
    parser = OneLineErrorParser(description="Train Soft Actor-Critic on a gymnasium continuous-control task.")
    parser.add_argument("--preset", choices=PRESET_CHOICES, default="env",
                        help="the set of defaults a new run starts from; flags given still win. 'env' (the "
                             "default): the env's own preset where ENV_PRESETS has one (its budget, stop target "
                             "and values, said in the run's first lines); 'none': SACConfig's defaults without the "
                             "env's values (a run still stops at the env's stop target unless --target-return "
                             "says otherwise); 'original': the configuration the repository started from "
                             "(docs/defaults.md), which trains its whole budget instead of stopping when solved; "
                             "'crossq': CrossQ's critics with its paper's settings (docs/critics.md). A named "
                             "preset's values go over the env's own")
    add_config_flags(parser, defaults)
    parser.add_argument("--resume", metavar="PATH", default=None,
                        help="continue a run: a checkpoint file, a checkpoint folder or a run name (newest checkpoint)")
    parser.add_argument("--overwrite", action="store_true",
                        help="start the run over: delete the checkpoints and TensorBoard logs of an earlier run of "
                             "the same --run-name first")
    return parser


def flags_given(argv: list[str]) -> set[str]:
    """Names of the config fields set explicitly on the command line, and "preset" if --preset was (its default,
    'env', applies to every new run)."""
    unset = object()
    probe = build_parser()
    probe.set_defaults(**{f.name: unset for f in dataclasses.fields(SACConfig)}, preset=unset)
    given = {name for name, value in vars(probe.parse_args(argv)).items() if value is not unset}
    return given - {"resume", "overwrite"}


def changed_flags(config: SACConfig, args: argparse.Namespace, given: set[str]) -> set[str]:
    """The config fields given on the command line whose value differs from `config`'s."""
    return {name for name in given if getattr(args, name) != getattr(config, name)}


def parse_args(argv: list[str]) -> argparse.Namespace:
    """train.py's flags; the --preset (the env's own unless told otherwise) replaces the defaults the flags not
    given fall back on."""
    first = build_parser().parse_known_args(argv)[0]
    return build_parser(preset_defaults(first.preset, first.env)).parse_args(argv)


def preset_defaults(preset: str, env: str) -> SACConfig:
    """SACConfig's defaults for `env` with the values of `preset` over them."""
    return SACConfig(**({"env": env} | preset_values(preset, env)))


def preset_line(args: argparse.Namespace, given: set[str]) -> str:
    """What the run's preset set, and where its values come from; flags given override a preset's value."""
    preset = env_preset(args.env) if args.preset == "env" else None
    if args.preset == "none" or (args.preset == "env" and preset is None):
        why = "" if args.preset == "none" else f": ENV_PRESETS has none for {args.env}"
        return f"preset: none, SACConfig's defaults (searched on LunarLander){why}"
    if args.preset != "env":
        found = env_preset(args.env)
        under = f", over {args.env}'s preset" if found and found.values else ""
        return f"preset: {args.preset}, the values of PRESETS[{args.preset!r}] in sac_model.py{under}"
    kept = {name: value for name, value in preset.values.items() if name not in given}
    values = ", ".join(f"{flag(name)} {value:,}" if isinstance(value, int) else f"{flag(name)} {value}"
                       for name, value in kept.items())
    stop = f", stop target {preset.stop_target:g}" if preset.stop_target is not None else ""
    return (f"preset: {args.env}'s ({values or 'no value beside the defaults'}{stop}; --preset none for the bare "
            f"defaults): {preset.source}")


def resumed_config(checkpoint: dict, args: argparse.Namespace, given: set[str]) -> SACConfig:
    """The checkpoint's config, with the run-length and bookkeeping flags the user gave on top."""
    config = checkpoint_config(checkpoint)
    changed = changed_flags(config, args, given)
    forbidden = sorted(changed - SACConfig.resumable_fields())
    if forbidden:
        raise SACError(f"{flag(forbidden[0])} cannot change when resuming; "
                       f"only {', '.join(sorted(flag(name) for name in SACConfig.resumable_fields()))} can")
    return dataclasses.replace(config, **{name: getattr(args, name) for name in changed})


# --------------------------------------------------------------------------------------------
# Setting a run up
# --------------------------------------------------------------------------------------------

def run_config(args: argparse.Namespace, given: set[str]) -> tuple[SACConfig, dict | None, Path | None]:
    """The validated config of a new run, or of the resumed one with its checkpoint."""
    checkpoint, checkpoint_path = None, None
    if args.resume and "preset" in given:
        raise SACError("--preset cannot be combined with --resume: a resumed run keeps its checkpoint's config")
    if args.resume:
        checkpoint_path = find_checkpoint(args.resume)
        checkpoint = read_checkpoint(checkpoint_path)
        TrainingState.of(checkpoint, checkpoint_path)  # refuses an agent saved without its training state
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


def restore_training_state(checkpoint: dict, path: Path, agent: SACAgent, buffer: ReplayBuffer,
                           env: gym.Env) -> TrainingState:
    """Load the agent, replay buffer, counters and RNG states of a checkpoint into a fresh run."""
    check_checkpoint_fits_env(checkpoint, env, path)
    agent.load_state_dict(checkpoint["agent"])
    state = TrainingState.of(checkpoint, path)
    if state.buffer is not None:
        buffer.load_state_dict(state.buffer)
    env.reset(seed=agent.config.seed)  # creates the env's generators, then they are overwritten
    restore_rng_state(state.rng, env)
    gap = state.resume_gap()
    print(f"resuming {agent.config.run_name} from {path} at env step {state.global_step:,}, episode {state.episode}: "
          + (f"approximately, because {gap}" if gap else "exactly (an end-of-episode checkpoint with its buffer)"))
    return dataclasses.replace(state, rng=None, buffer=None)  # the loop keeps counters; a save captures the rest


def stop_rule(config: SACConfig, budget: int) -> str:
    """When the run ends, in words; a run that cannot stop early says why and which flag changes that."""
    cap = f"at most {budget:,} env steps"
    if config.episodes is not None:
        cap += f" or {config.episodes:,} episode{'s' if config.episodes != 1 else ''}"
    target = target_return(config)
    if config.target_return == "none":
        return f"trains its whole budget, {cap} (--target-return none)"
    if target is None:
        return (f"trains its whole budget, {cap}: {config.env} registers no solved threshold to stop at "
                "(--target-return R stops it once a check clears R)")
    if not config.eval_every:
        return f"trains its whole budget, {cap}: --eval-every 0 makes no evaluation to stop at"
    threshold, named = env_threshold(config.env), ""
    if threshold is not None and (config.target_return == "env" or config.target_return.startswith("auto")):
        offset = target - threshold
        named = (" (the env's solved threshold)" if offset == 0 else
                 f" (the env's solved threshold, {threshold:g}, {'plus' if offset > 0 else 'minus'} {abs(offset):g})")
    margin = (f"its mean minus {config.target_std_errors:g} standard errors" if config.target_std_errors
              else "its mean")
    return (f"stops at {target:g}{named}: once a {config.eval_episodes}-episode evaluation (every "
            f"{config.eval_every} episodes) reaches {target:g}, {config.target_episodes} fresh episodes decide "
            f"({margin} >= {target:g}); {cap}")


def announce(config: SACConfig, agent: SACAgent, budget: int, resumed: bool, preset: str) -> None:
    """The run's first lines: what it is called, where it writes, what it runs on, which preset a new run took
    (`preset`: its line; empty for a resumed run, which keeps its checkpoint's config) and when it stops."""
    threads = config.threads or torch.get_num_threads()
    chosen = (" (1 while another process takes a core: --threads N fixes the count)" if chooses_threads(config, agent)
              else "")
    preset_text = f"{preset}\n" if preset else ""
    print(f"run: {config.run_name} ({'resumed' if resumed else 'new'})\n"
          f"logs: {RUNS_DIR / config.run_name}/ (watch them with: tensorboard --logdir {RUNS_DIR})\n"
          f"checkpoints: {CHECKPOINTS_DIR / config.run_name}/ (every {config.checkpoint_every} episodes and the "
          f"final agent)\n"
          f"device: {agent.device.type}, {threads} CPU thread{'s' if threads != 1 else ''}{chosen}; gradient step: "
          f"{agent.step_runs}\n"
          f"{precision_line(config.precision, agent.device)}\n"
          f"{preset_text}"
          f"the run {stop_rule(config, budget)}\n"
          "Ctrl-C finishes the current episode and saves a checkpoint that resumes exactly; a second Ctrl-C stops "
          "at once", flush=True)


def chooses_threads(config: SACConfig, agent: SACAgent) -> bool:
    """Whether the run picks each round's thread count itself: --threads 0 (the default), on a CPU of several
    cores."""
    return not config.threads and agent.device.type == "cpu" and torch.get_num_threads() > 1


def start_run(args: argparse.Namespace, given: set[str], stack: contextlib.ExitStack) -> Run:
    """Everything a run needs, new or resumed; what must be closed at the end is entered into `stack`."""
    config, checkpoint, checkpoint_path = run_config(args, given)
    device = resolve_device(config.device)
    if config.threads:
        torch.set_num_threads(config.threads)
    seed_everything(config.seed)
    env = stack.enter_context(contextlib.closing(make_env(config.env, config.max_steps)))
    config.max_steps = env.spec.max_episode_steps
    eval_env = stack.enter_context(contextlib.closing(make_env(config.env, config.max_steps)))
    stack.enter_context(claim_run(config.run_name, checkpoint is None, args.overwrite))  # once the env is valid
    obs_dim, action_dim = flat_dim(env.observation_space), flat_dim(env.action_space)
    agent = SACAgent(obs_dim, env.action_space.low, env.action_space.high, config, device, config.env)
    agent.trained_at_commit = code_version()
    buffer = make_buffer(config, obs_dim, action_dim, device)
    if config.compile:
        agent.compile_update()
    announce(config, agent, step_budget(config), resumed=checkpoint is not None,
             preset="" if checkpoint else preset_line(args, given))
    env.action_space.seed(config.seed)
    progress, first_reset_seed = TrainingState(run_name=config.run_name), config.seed
    if checkpoint is not None:
        progress, first_reset_seed = restore_training_state(checkpoint, checkpoint_path, agent, buffer, env), None
    try:
        writer = open_event_log(config, progress.global_step if checkpoint else None)
    except OSError as error:
        raise write_failure(error, config.run_name) from None
    stack.callback(close_quietly, writer)
    display = ProgressDisplay(config, progress.global_step)
    stack.callback(display.close)
    return Run(config=config, agent=agent, buffer=buffer, collector=NStepCollector(config.n_step, config.gamma),
               env=env, eval_env=eval_env, writer=writer, progress=progress, display=display,
               stop=StopSignal(), next_reset_seed=first_reset_seed,
               session_start_step=progress.global_step, compile_pending=agent.step_runs.startswith("compiled"),
               threads=ThreadChooser(torch.get_num_threads()) if chooses_threads(config, agent) else None)


def close_quietly(writer: SummaryWriter) -> None:
    """Close the event writer; a failed write was reported already, and the first error is the one to tell."""
    with contextlib.suppress(OSError):
        writer.close()


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------

def train_until_done(run: Run) -> None:
    """Episodes until the budget is spent, the run is solved or a stop is asked for."""
    budget, config, progress = step_budget(run.config), run.config, run.progress
    while (progress.global_step < budget and (config.episodes is None or progress.episode < config.episodes)
           and not run.stop.requested and not solved(progress, config)):
        run.at_episode_boundary = False
        episode = play_episode(run, budget)
        if episode.finished:
            progress.episode += 1
            finish_episode(run, episode)
        run.at_episode_boundary = episode.finished


def play_episode(run: Run, budget: int) -> Episode:
    """One training episode, with the gradient steps owed along the way; cut short only by the step budget."""
    config, progress, agent = run.config, run.progress, run.agent
    obs, _ = run.env.reset(seed=run.next_reset_seed)
    agent.observe(obs)
    run.next_reset_seed = None
    run.collector.clear()
    episode = Episode()
    while not episode.finished and progress.global_step < budget:
        if progress.global_step < config.start_steps:
            if episode.length % config.warmup_action_repeat == 0:
                env_action = run.env.action_space.sample()
        else:
            env_action = agent.select_action(obs)
        next_obs, reward, episode.terminated, episode.truncated, _ = run.env.step(env_action)
        agent.observe(next_obs)
        for transition in run.collector.push(obs, agent.normalize_action(env_action), reward, next_obs,
                                             episode.terminated, episode.truncated):
            run.buffer.add(*transition)
        obs = next_obs
        episode.total_return += float(reward)
        episode.length += 1
        progress.global_step += 1
        run.display.step()
        if run.stop.requested and not run.stop.announced:
            run.stop.announce(run.config.max_steps - episode.length)
        if progress.global_step >= config.update_after and progress.global_step % config.update_every == 0:
            update_round(run)
    return episode


def update_round(run: Run) -> None:
    """The gradient steps owed to the last `update_every` env steps, on this round's thread count; then log the
    last one's metrics. A round in which torch.compile builds the step says so, and how long it took."""
    config, progress = run.config, run.progress
    step = progress.global_step
    gradient_steps = config.update_every * config.updates_per_step
    threads = run.threads.next_round() if run.threads else None
    if threads is not None:
        torch.set_num_threads(threads)
    compiling = compile_message(run, threads)
    if compiling:
        tqdm.write(compiling)
    started = time.perf_counter()
    try:
        for batch in run.buffer.batches(gradient_steps, config.batch_size, step):
            metrics = run.agent.update(batch)
            run.buffer.after_update(batch, metrics)
    except TrainingDivergedError as error:
        raise TrainingDivergedError(f"{error} at env step {step}") from None
    seconds = time.perf_counter() - started
    if compiling:
        tqdm.write(f"gradient step compiled in {seconds:.0f} s")
        run.compile_pending = False
    if threads is not None:
        note_round_time(run, threads, seconds)
    progress.updates += gradient_steps
    log_update_metrics(run, metrics, step)


def compile_message(run: Run, threads: int | None) -> str | None:
    """What the coming round compiles, if anything: the step at the first update, or for a second thread count."""
    if run.compile_pending:
        return f"compiling the gradient step before the first update: {COMPILE_TIMES}"
    if threads is not None and run.threads.first_on(threads) and run.agent.step_runs.startswith("compiled"):
        return (f"compiling the gradient step for {threads} thread{'s' if threads != 1 else ''} as well, to train "
                f"on {threads} while that is faster (another process using the CPU): {COMPILE_TIMES}")
    return None


def note_round_time(run: Run, threads: int, seconds: float) -> None:
    """Let the thread chooser see a round's time; say so when the faster count changes."""
    chosen = run.threads.record(threads, seconds)
    if chosen is None:
        return
    other = run.threads.other(chosen)
    why = "another process is using the CPU" if chosen < other else "the CPU is free again"
    tqdm.write(f"env step {run.progress.global_step:,}: update rounds run on {chosen} thread"
               f"{'s' if chosen != 1 else ''} from now on ({why}: the latest round took "
               f"{run.threads.latest[chosen]:.2f} s on {chosen}, {run.threads.latest[other]:.2f} s on {other}); "
               "--threads N fixes the count")


def log_update_metrics(run: Run, metrics: dict[str, torch.Tensor], step: int) -> None:
    """Write the last update's metrics under their own tags; one host sync per update round. Stops on a
    non-finite value."""
    tags = [tag for tag in metrics if tag != PRIORITIES]
    values = dict(zip(tags, torch.stack([metrics[tag] for tag in tags]).tolist()))
    for tag, value in values.items():
        if not np.isfinite(value):
            raise TrainingDivergedError(f"non-finite {tag} ({value}) at env step {step}")
        run.writer.add_scalar(tag, value, step)
    for name, lr in run.agent.learning_rates().items():
        run.writer.add_scalar(Tag.learning_rate(name), lr, step)
    run.writer.add_scalar(Tag.THREADS, torch.get_num_threads(), step)
    for tag, value in run.buffer.scalars(step).items():
        run.writer.add_scalar(tag, value, step)


def finish_episode(run: Run, episode: Episode) -> None:
    """Episode bookkeeping: logs, LR schedule, evaluation (and target check), periodic checkpoint."""
    config, progress, writer = run.config, run.progress, run.writer
    step = progress.global_step
    run.recent_returns.append(episode.total_return)
    steps_per_second = (step - run.session_start_step) / max(time.perf_counter() - run.session_start, 1e-9)
    writer.add_scalar(Tag.EPISODE_RETURN, episode.total_return, step)
    writer.add_scalar(Tag.EPISODE_LENGTH, episode.length, step)
    # On LunarLander, an episode the time limit ended is a lander that hovers instead of landing.
    writer.add_scalar(Tag.EPISODE_TIME_LIMIT, float(episode.truncated and not episode.terminated), step)
    writer.add_scalar(Tag.STEPS_PER_SECOND, steps_per_second, step)
    if step >= config.update_after:
        run.agent.step_schedulers()
    if config.eval_every and progress.episode % config.eval_every == 0:
        evaluate_and_log(run)
        target = target_return(config)
        if target is not None and progress.eval_history[-1][1] >= target:
            check_target(run, f"the {config.eval_episodes}-episode evaluation reached {target:g}")
    run.display.show(progress, run.recent_returns)
    if progress.episode % config.checkpoint_every == 0:
        path = save_checkpoint(run, periodic_checkpoint_name(step), episode_finished=True)
        prune_checkpoints(path.parent, config.keep_checkpoints)


def evaluate_and_log(run: Run) -> None:
    """Deterministic evaluation on the same fixed seeds every time, logged and kept in the history."""
    config, progress = run.config, run.progress
    returns = evaluate_policy(run.agent, run.eval_env, config.eval_episodes, evaluation_seed(config))
    step = progress.global_step
    progress.eval_history.append([step, float(np.mean(returns)), float(np.std(returns))])
    run.writer.add_scalar(Tag.EVAL_MEAN, np.mean(returns), step)
    run.writer.add_scalar(Tag.EVAL_STD, np.std(returns), step)


def lower_bound(check: list[float], config: SACConfig) -> float:
    """The lower bound of a target check ([step, mean, std]) under this run's --target-std-errors."""
    _, mean, std = check
    return check_lower_bound(mean, std, config.target_episodes, config.target_std_errors)


def solved(progress: TrainingState, config: SACConfig) -> bool:
    """Whether the latest target check reached --target-return (never without a target)."""
    return is_solved(progress.target_checks, target_return(config), config.target_episodes, config.target_std_errors)


def check_target(run: Run, what: str) -> None:
    """The evaluation that decides whether the run is solved: --target-episodes deterministic episodes.

    Every check plays episodes no earlier check played: a run checked many times must not stop on the
    one lucky set of start states it happened to be checked on.
    """
    config, progress = run.config, run.progress
    tqdm.write(f"env step {progress.global_step:,}: {what}; checking it over {config.target_episodes} episodes")
    returns = evaluate_policy(run.agent, run.eval_env, config.target_episodes,
                              check_seed(config, len(progress.target_checks)))
    step, mean, std = progress.global_step, float(np.mean(returns)), float(np.std(returns))
    progress.target_checks.append([step, mean, std])
    lower = lower_bound(progress.target_checks[-1], config)
    run.writer.add_scalar(Tag.CHECK_MEAN, mean, step)
    run.writer.add_scalar(Tag.CHECK_STD, std, step)
    run.writer.add_scalar(Tag.CHECK_LOWER_BOUND, lower, step)
    run.writer.add_scalar(Tag.CHECK_PASSED, float(solved(progress, config)), step)
    verdict = "solved" if solved(progress, config) else "not solved"
    bound = f", lower bound {lower:.1f}" if config.target_std_errors else ""
    tqdm.write(f"env step {step:,}: {config.target_episodes}-episode check {mean:.1f} +/- {std:.1f}{bound}, "
               f"{verdict} (target {target_return(config):g})")


def save_checkpoint(run: Run, name: str, episode_finished: bool) -> Path:
    """Write checkpoints/<run>/<name> with everything `--resume` needs; refuses a diverged agent.

    The TensorBoard events are flushed first: a checkpoint never claims steps whose events failed to be written.
    """
    if not run.agent.parameters_finite():
        raise TrainingDivergedError(f"non-finite network parameters at env step {run.progress.global_step}; "
                                    "the last good checkpoint is left untouched")
    run.writer.flush()
    state = dataclasses.replace(run.progress, run_name=run.config.run_name, episode_finished=episode_finished,
                                rng=capture_rng_state(run.env),
                                buffer=run.buffer.state_dict() if run.config.save_buffer else None)
    return run.agent.save(CHECKPOINTS_DIR / run.config.run_name / name, state.to_dict())


# --------------------------------------------------------------------------------------------
# Ending a run
# --------------------------------------------------------------------------------------------

def stop_on_signal(run: Run) -> int:
    """Save the checkpoint a stop signal asked for and say how to go on; the exit code is 128 + the signal."""
    exact = run.at_episode_boundary
    path = save_checkpoint(run, periodic_checkpoint_name(run.progress.global_step), episode_finished=exact)
    prune_checkpoints(path.parent, run.config.keep_checkpoints)
    where = (f"at the end of episode {run.progress.episode}" if exact
             else f"mid-episode (episode {run.progress.episode + 1})")
    resume = "it resumes exactly" if exact and run.config.save_buffer else "it resumes approximately"
    print(f"{signal.Signals(run.stop.signum).name}: stopped {where} at env step {run.progress.global_step:,}; "
          f"saved {path} ({resume}); continue with: python train.py --resume {run.config.run_name}",
          file=sys.stderr)
    return 128 + run.stop.signum


def finish_run(run: Run) -> int:
    """Evaluate the final agent (and check it against the target if its last check is not from now), save it."""
    config, progress = run.config, run.progress
    if config.eval_every and (not progress.eval_history or progress.eval_history[-1][0] != progress.global_step):
        evaluate_and_log(run)  # the final agent is always evaluated
    checked_now = bool(progress.target_checks) and progress.target_checks[-1][0] == progress.global_step
    if target_return(config) is not None and not solved(progress, config) and not checked_now:
        check_target(run, "the step budget is spent")  # for the record
    path = save_checkpoint(run, FINAL_CHECKPOINT, episode_finished=run.at_episode_boundary)
    print(f"finished {progress.episode} episodes, {progress.global_step:,} env steps"
          f"{' (solved)' if solved(progress, config) else ''}; final agent: {path}")
    return 0


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


def train(args: argparse.Namespace, given: set[str]) -> int:
    """Set the run up, train until it is done or stopped, and end it; returns the exit code."""
    with contextlib.ExitStack() as stack:
        run = start_run(args, given, stack)
        try:
            try:
                train_until_done(run)
            except StopNow:
                pass
            finally:
                run.stop.disarm()
            run.display.close()
            return stop_on_signal(run) if run.stop.requested else finish_run(run)
        except (OSError, WriteError) as error:
            raise write_failure(error, run.config.run_name) from None


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
