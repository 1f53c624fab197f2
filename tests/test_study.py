"""Tests of the study tools (lab/): the statistics against hand-computed values, the aggregation of
TensorBoard logs, and tiny studies run end to end through `python -m lab.ablate` and `python -m lab.search`
on a local Ray."""
from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from torch.utils.tensorboard import SummaryWriter

from sac_model import TARGET_SEED_OFFSET, SACConfig, SACError, evaluate_policy, load_agent_and_env

pytest.importorskip("matplotlib", reason="the lab tools plot with matplotlib: pip install -r requirements-study.txt")
from lab.tables import (  # noqa: E402
    Curve, aggregate, area_under_curve, bootstrap_ci, confirmation_table, final_check_table, interquartile_mean,
    load_eval_curve, load_search, load_study, markdown_table, plot_curves, search_table, steps_to_threshold,
    trial_progress,
)

REPO = Path(__file__).resolve().parent.parent
EVAL_STEPS = [100, 250, 400]
# config -> seed -> evaluation returns at EVAL_STEPS, chosen so every statistic below is easy to hand-compute.
SYNTHETIC = {
    "full": {0: [10, 150, 210], 1: [20, 220, 230], 2: [0, 100, 190]},
    "no_per": {0: [200, 210, 220], 1: [50, 205, 220], 2: [50, 60, 201], 3: [0, 10, 20]},
}


def test_interquartile_mean_cuts_a_quarter_from_each_end_like_rliable() -> None:
    assert interquartile_mean(np.arange(1, 9)) == 4.5  # keeps 3, 4, 5, 6
    assert interquartile_mean([1, 2, 3, 4, 100]) == 3.0  # n=5: floor(5/4)=1 cut from each end, keeps 2, 3, 4
    assert interquartile_mean([60, 1, 2, 3, 4, 5]) == 3.5  # unsorted input; keeps 2, 3, 4, 5
    assert interquartile_mean([-1000, 1, 2, 3, 4, 5, 6, 1000]) == 3.5  # outliers never count
    assert interquartile_mean([1, 2, 9]) == 4.0  # n < 4 cuts nothing: the plain mean
    assert interquartile_mean([1, 2, math.inf]) == math.inf
    np.testing.assert_array_equal(interquartile_mean([[1, 2, 3, 4], [8, 7, 6, 5]], axis=-1), [2.5, 6.5])
    with pytest.raises(ValueError):
        interquartile_mean([])


def test_bootstrap_ci_of_the_mean_is_the_binomial_quantiles() -> None:
    # Resampling [0]*9 + [10]: the mean is K, the number of 10s drawn, K ~ Binomial(10, 0.1).
    # P(K = 0) = 0.9^10 = 0.349 > 2.5%, so the lower bound is 0; P(K <= 2) = 0.930 and
    # P(K <= 3) = 0.987 bracket 97.5%, so the upper bound is 3.
    assert bootstrap_ci([0] * 9 + [10], np.mean, n_resamples=20_000, seed=1) == (0.0, 3.0)
    # [0, 1]: the resampled mean is 0, 0.5 or 1 with probabilities 1/4, 1/2, 1/4.
    assert bootstrap_ci([0, 1], np.mean, seed=2) == (0.0, 1.0)


def test_bootstrap_ci_brackets_the_statistic_shrinks_like_sqrt_n_and_is_reproducible() -> None:
    sample = np.array([3.1, -1.4, 4.1, 1.5, 5.9, 2.6, 5.3, 5.8, -9.7, 9.3, 2.3, 8.4, 6.2, 6.4, 3.3, 8.3])
    low, high = bootstrap_ci(sample, np.mean, seed=0)
    assert low < sample.mean() < high
    # For the mean, the percentile interval approaches mean +- 1.96 std / sqrt(n).
    expected_width = 2 * 1.96 * sample.std() / math.sqrt(sample.size)
    assert high - low == pytest.approx(expected_width, rel=0.1)
    low4, high4 = bootstrap_ci(np.tile(sample, 4), np.mean, seed=0)
    assert (high4 - low4) == pytest.approx((high - low) / 2, rel=0.1)  # 4x the runs: half the width
    iqm_low, iqm_high = bootstrap_ci(sample, interquartile_mean, seed=0)
    assert iqm_low <= interquartile_mean(sample) <= iqm_high
    assert bootstrap_ci(sample, interquartile_mean, seed=0) == (iqm_low, iqm_high)
    assert bootstrap_ci(sample, np.mean, seed=0) == (low, high)
    assert bootstrap_ci(sample, np.mean, seed=1) != (low, high)


def test_bootstrap_ci_of_a_constant_sample_has_zero_width() -> None:
    assert bootstrap_ci([5.0, 5.0, 5.0, 5.0], interquartile_mean) == (5.0, 5.0)
    assert bootstrap_ci([7.0], np.mean) == (7.0, 7.0)


def test_an_ablation_times_its_own_envs_threshold_unless_told_otherwise() -> None:
    from lab.ablate import study_threshold

    def threshold(train_args: list[str], given: float | None = None) -> float:
        return study_threshold(argparse.Namespace(threshold=given), {"train_args": train_args})

    assert threshold([]) == 200.0  # LunarLander, the default env
    assert threshold(["--env", "BipedalWalker-v3", "--hidden-size", "64"]) == 300.0
    assert threshold(["--env=Pendulum-v1"], given=-500.0) == -500.0
    with pytest.raises(SACError, match="^Pendulum-v1 registers no solved threshold: give --threshold R"):
        threshold(["--env=Pendulum-v1"])


def test_steps_to_threshold_is_the_first_evaluation_at_or_above_it() -> None:
    steps = [100, 200, 300, 400]
    assert steps_to_threshold(steps, [50, 210, 150, 250]) == 200  # the first crossing, even if it falls back
    assert steps_to_threshold(steps, [50, 199.9, 150, 199]) is None
    assert steps_to_threshold(steps, [50, 150, 200, 100]) == 300  # exactly the threshold counts
    assert steps_to_threshold(steps, [-100, -50, -10, 0], threshold=-20) == 300
    assert steps_to_threshold([], []) is None


def write_eval_log(run_dir: Path, returns: list[float], steps: list[int] = EVAL_STEPS, purge_step: int | None = None,
                   tag: str = "eval/return_mean") -> None:
    """A TensorBoard log as train.py writes it: the evaluation tag plus another one."""
    writer = SummaryWriter(run_dir, purge_step=purge_step)
    for step, value in zip(steps, returns):
        writer.add_scalar("charts/episode_return", value - 1, step)
        writer.add_scalar(tag, value, step)
    writer.close()


@pytest.fixture
def synthetic_study(tmp_path: Path) -> Path:
    """A study folder of finished runs with known returns, plus runs that must be left out."""
    for config, seeds in SYNTHETIC.items():
        for seed, returns in seeds.items():
            write_eval_log(tmp_path / "runs" / f"{config}__seed{seed}", returns)
            (tmp_path / "checkpoints" / f"{config}__seed{seed}").mkdir(parents=True)
            (tmp_path / "checkpoints" / f"{config}__seed{seed}" / "final.pt").touch()
    write_eval_log(tmp_path / "runs" / "full__seed3", [500, 500, 500])  # unfinished: no final.pt
    write_eval_log(tmp_path / "runs" / "not_a_trial", [500, 500, 500])
    return tmp_path


def test_load_eval_curve_keeps_the_resumed_sessions_values(tmp_path: Path) -> None:
    run = tmp_path / "run"
    write_eval_log(run, [1.0, 2.0, 999.0])  # a session killed after logging step 400 but checkpointed at 300
    write_eval_log(run, [3.0, 4.0], steps=[400, 500], purge_step=301)  # the resume drops events from 301 on
    steps, returns = load_eval_curve(run)
    np.testing.assert_array_equal(steps, [100, 250, 400, 500])
    np.testing.assert_array_equal(returns, [1.0, 2.0, 3.0, 4.0])
    (tmp_path / "empty").mkdir()
    assert load_eval_curve(tmp_path / "empty")[0].size == 0


def test_aggregate_synthetic_study_gives_hand_computed_table(synthetic_study: Path) -> None:
    curves = load_study(synthetic_study)
    assert list(curves) == ["full", "no_per"]
    assert [run.seed for run in curves["full"]] == [0, 1, 2]  # the unfinished seed 3 is left out
    full, no_per = aggregate(curves, [50, 200, 400], threshold=200)

    assert (full.seeds, no_per.seeds) == (3, 4)
    assert math.isnan(full.returns[50].value)  # nobody evaluated yet
    # At step 200 each seed's latest evaluation is the one at step 100.
    assert full.returns[200].value == 10.0  # 3 seeds: the mean of 10, 20, 0
    assert no_per.returns[200].value == 50.0  # middle two of 0, 50, 50, 200
    assert full.returns[400].value == 210.0
    assert no_per.returns[400].value == 210.5  # middle two of 20, 201, 220, 220
    for row in (full, no_per):
        for point in (200, 400):
            assert row.returns[point].low <= row.returns[point].value <= row.returns[point].high
    # Steps to 200: full 400, 250, never -> IQM inf; no_per 100, 250, 400, never -> (250 + 400) / 2.
    assert (full.steps_to_threshold, full.reached) == (math.inf, 2)
    assert (no_per.steps_to_threshold, no_per.reached) == (325.0, 3)

    table = markdown_table([full, no_per]).splitlines()
    assert table[0] == ("| configuration | seeds | return @ 50 | return @ 200 | return @ 400 | steps to 200 "
                        "| reached 200 |")
    assert table[2].startswith("| full | 3 | - | 10.0 [") and table[2].endswith("| not reached | 2/3 |")
    assert table[3].startswith("| no_per | 4 | - | 50.0 [") and table[3].endswith("| 325 | 3/4 |")
    assert " 210.5 [" in table[3]


def test_confirmation_table_times_the_first_passing_check_and_keeps_the_final_agents(tmp_path: Path) -> None:
    # Seed 0 passes its second check, seed 1 its first; seed 2 never passes (its one check is its final agent's).
    checks = {0: ([1000, 3000], [150.0, 210.0]), 1: ([2000], [205.0]), 2: ([5000], [120.0])}
    for seed, (steps, returns) in checks.items():
        write_eval_log(tmp_path / "runs" / f"full__seed{seed}", returns, steps, tag="eval/target_check_mean")
        (tmp_path / "checkpoints" / f"full__seed{seed}").mkdir(parents=True)
        (tmp_path / "checkpoints" / f"full__seed{seed}" / "final.pt").touch()
    table = confirmation_table(load_study(tmp_path, tag="eval/target_check_mean"), threshold=200).splitlines()
    cells = [cell.strip() for cell in table[2].strip("|").split("|")]
    assert cells[:5] == ["full", "3", "2/3", "3,000 / 2,000 / not reached", "3,000"]  # median of 2000, 3000, inf
    assert cells[5].startswith("not reached [2,000, ")  # the IQM of 3 seeds is their mean: infinite
    assert cells[6:8] == ["210.0 / 205.0 / 120.0", "205.0"]
    assert cells[8].startswith("178.3 [")  # (210 + 205 + 120) / 3


def test_final_check_table_gives_each_seeds_mean_the_solved_seeds_and_the_episodes_below_zero() -> None:
    returns = {"full": [[250.0, 150.0], [100.0, -20.0], [300.0, 300.0]], "no_per": [[-50.0, -150.0]]}
    table = final_check_table(returns, threshold=200).splitlines()
    assert table[0] == ("| configuration | seeds | final agent's 2-episode return, by seed | median | IQM [95% CI] "
                        "| seeds >= 200 | episodes < 0 |")
    full = [cell.strip() for cell in table[2].strip("|").split("|")]
    assert full[:4] == ["full", "3", "200.0 / 40.0 / 300.0", "200.0"]
    assert full[4].startswith("180.0 [")  # the IQM of 3 seeds is their mean
    assert full[5:] == ["2/3", "1/6"]  # 200 counts as reached
    assert [cell.strip() for cell in table[3].strip("|").split("|")] == [
        "no_per", "1", "-100.0", "-100.0", "-100.0 [-100.0, -100.0]", "0/1", "2/2"]


def test_area_under_curve_averages_the_curve_at_equally_spaced_steps() -> None:
    run = Curve(0, np.array([10, 50]), np.array([0.0, 100.0]))
    # Budget 100, 20 points: 5 (before any evaluation, left out), 10..45 at 0 (8 points), 50..100 at 100 (11).
    assert area_under_curve(run, budget=100) == pytest.approx(1100 / 19)
    assert area_under_curve(run, budget=100, until=50) == pytest.approx(100 / 9)
    assert math.isnan(area_under_curve(run, budget=100, until=9))
    # Dense early evaluations weigh no more than sparse late ones.
    dense = Curve(0, np.array([10, 11, 12, 13, 50]), np.array([0.0, 0.0, 0.0, 0.0, 100.0]))
    assert area_under_curve(dense, budget=100) == area_under_curve(run, budget=100)


def test_trial_progress_is_where_every_seed_has_got() -> None:
    runs = [Curve(100, np.array([10, 50]), np.array([0.0, 100.0])), Curve(101, np.array([20]), np.array([50.0]))]
    step, objective, latest = trial_progress(runs, budget=100)
    assert step == 20  # seed 101 has only been evaluated at 20
    # Up to 20: seed 100's points 10, 15, 20 are 0; seed 101's point 20 is 50.
    assert (objective, latest) == (pytest.approx(25.0), 25.0)
    assert trial_progress([runs[0], Curve(101, np.zeros(0, dtype=np.int64), np.zeros(0))], budget=100)[0] == 0


def test_search_results_put_complete_trials_first_by_objective(tmp_path: Path) -> None:
    # trial a: complete, flat 50; trial b: complete, flat 80; trial c: stopped early at 100 with 500 (not comparable).
    trials = {"a": ([50, 50], True), "b": ([80, 80], True), "c": ([500], False)}
    for name, (returns, complete) in trials.items():
        (tmp_path / "trials").mkdir(exist_ok=True)
        (tmp_path / "trials" / f"{name}.json").write_text(f'{{"lr_actor": 0.000123456, "batch_size": {len(name)}}}')
        for seed in (100, 101):
            write_eval_log(tmp_path / "runs" / f"{name}__seed{seed}", returns, [100, 200][:len(returns)])
            if complete:
                (tmp_path / "checkpoints" / f"{name}__seed{seed}").mkdir(parents=True)
                (tmp_path / "checkpoints" / f"{name}__seed{seed}" / "final.pt").touch()
    results = load_search(tmp_path, budget=200, seeds=(100, 101))
    assert [(t.name, t.complete, t.steps) for t in results] == [("b", True, 200), ("a", True, 200), ("c", False, 100)]
    assert results[0].objective == pytest.approx(80.0) and results[2].objective == pytest.approx(500.0)
    table = search_table(results).splitlines()
    assert table[0] == "| rank | trial | objective | return at the end | env steps | status | lr_actor | batch_size |"
    assert table[2] == "| 1 | b | 80.0 | 80.0 | 200 | complete | 0.000123 | 1 |"
    assert table[4].startswith("| 3 | c | 500.0 | 500.0 | 100 | stopped |")


def test_search_importance_ranks_the_hyperparameter_that_decides_the_first_rung(tmp_path: Path) -> None:
    """12 trials at the defaults but for lr_actor and batch_size; only lr_actor moves the return."""
    pytest.importorskip("optuna", reason="lab.search needs Ray and Optuna: pip install -r requirements-study.txt")
    from lab import search
    rng = np.random.default_rng(0)
    (tmp_path / "trials").mkdir()
    for index in range(12):
        lr_actor = float(10 ** rng.uniform(-4, np.log10(3e-3)))
        params = {key: getattr(SACConfig(), key) for key in search.SEARCH_SPACE}
        params.update(lr_actor=lr_actor, batch_size=int(rng.choice([64, 128, 256, 512])))
        (tmp_path / "trials" / f"t{index}.json").write_text(json.dumps(params))
        for seed in (100, 101):  # the return grows with log(lr_actor); the run stops at the first rung (100 of 400)
            write_eval_log(tmp_path / "runs" / f"t{index}__seed{seed}", [100 * math.log10(lr_actor) + seed] * 2,
                           [50, 100])
    (tmp_path / "trials" / "late.json").write_text(json.dumps(params))  # not at the rung yet: left out
    write_eval_log(tmp_path / "runs" / "late__seed100", [0.0], [50])
    (tmp_path / "trials" / "long.json").write_text(json.dumps(params))  # first evaluated past the rung: left out
    for seed in (100, 101):
        write_eval_log(tmp_path / "runs" / f"long__seed{seed}", [0.0], [150])
    objectives = search.first_rung_objectives(tmp_path, {"budget": 400})
    assert sorted(objectives) == sorted(f"t{index}" for index in range(12))
    trials = load_search(tmp_path, budget=400, seeds=(100, 101))
    section = search.importance_section(trials, objectives, rung=100)
    rows = [line.split(" | ") for line in section.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert "12 trials" in section and len(rows) == len(search.SEARCH_SPACE)
    importance = {name.strip("| "): float(value.strip("| ")) for name, value in rows}
    assert max(importance, key=importance.get) == "lr_actor", section
    assert importance["lr_actor"] > 2 * max(v for k, v in importance.items() if k != "lr_actor"), section
    few = search.importance_section(trials, dict(list(objectives.items())[:7]), rung=100)
    assert "Not computed: fewer than 8 trials reached 100 steps" in few


def test_plot_curves_writes_a_png(synthetic_study: Path, tmp_path: Path) -> None:
    path = plot_curves(load_study(synthetic_study), tmp_path / "plots" / "curves.png", threshold=200)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def skip_without_study_requirements(module: str) -> None:
    """Skip the test without Ray (and Optuna for the search): requirements-study.txt is optional."""
    pytest.importorskip("optuna" if module == "lab.search" else "ray",
                        reason=f"{module} needs Ray and Optuna: pip install -r requirements-study.txt")


def run_study(module: str, cwd: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `python -m lab.ablate` or `python -m lab.search` as a user would, but in `cwd` (where its studies/
    folder goes) with the repository on the path; skips the test without the study's requirements."""
    skip_without_study_requirements(module)
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": path})


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (it was free a moment ago)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize("module, args, fragment", [
    ("lab.ablate", ["--budget", "0"], "--budget must be positive"),
    ("lab.ablate", ["--configs", "full,no_such"], "unknown configuration 'no_such'"),
    ("lab.ablate", ["--train-args", "--seed 3"], "--train-args may not set --seed"),
    ("lab.ablate", ["--train-args", "--batch-size 64 --buffer-size 32"],
     "--batch-size 64 is larger than --buffer-size 32"),
    ("lab.ablate", ["--seeds", "101"], "would reuse the search's seeds"),
    ("lab.ablate", ["--first-seed", "98", "--seeds", "3"], "seeds 98 .. 100 would reuse the search's seeds"),
    ("lab.ablate", ["--first-seed", "-1"], "--first-seed must be >= 0"),
    ("lab.ablate", ["--train-args", "--env Pendulum-v1"],
     "Pendulum-v1 registers no solved threshold: give --threshold R"),
    ("lab.search", ["--trials", "0"], "--trials must be positive"),
    ("lab.search", ["--train-args", "--batch-size 64"], "--train-args may not set --batch-size"),
    ("lab.search", ["--train-args", "--target-return 5"], "--train-args may not set --target-return"),
    ("lab.search", ["--address", "127.0.0.1:{port}"], "no Ray cluster answers there"),
])
def test_study_scripts_refuse_invalid_flags_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture, module: str, args: list[str],
                                                        fragment: str) -> None:
    # In the test's process: starting a Python that imports Ray costs ~5 s a case; the real command line is below.
    skip_without_study_requirements(module)
    study_tool = importlib.import_module(module)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        study_tool.main([arg.format(port=closed_port()) for arg in args])
    stderr = capsys.readouterr().err
    assert exit_info.value.code == 2, stderr
    assert stderr.count("\n") == 1 and fragment in stderr, stderr
    assert not (tmp_path / "studies").exists()


@pytest.mark.parametrize("module, args, fragment", [
    ("lab.ablate", ["--configs", "full,no_such"],
     "python -m lab.ablate: error: --configs: unknown configuration 'no_such'"),
    ("lab.search", ["--train-args", "--batch-size 64"],
     "python -m lab.search: error: --train-args may not set --batch-size"),
    # Ray itself would retry for minutes, then end in a traceback.
    ("lab.ablate", ["--address", "127.0.0.1:{port}"], "python -m lab.ablate: error: --address 127.0.0.1:"),
])
def test_study_commands_exit_2_with_one_line_on_stderr(tmp_path: Path, module: str, args: list[str],
                                                      fragment: str) -> None:
    result = run_study(module, tmp_path, *(arg.format(port=closed_port()) for arg in args), timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and fragment in result.stderr, result.stderr
    assert not (tmp_path / "studies").exists()


def test_ablate_runs_a_variant_only_when_asked() -> None:
    pytest.importorskip("ray", reason="lab.ablate needs Ray: pip install -r requirements-study.txt")
    from lab import ablate
    parser = ablate.build_parser()
    assert "bf16" not in ablate.parse_args(parser, []).configs  # the default study is the ablations
    args = ablate.parse_args(parser, ["--configs", "full,bf16"])
    settings = {**ablate.DEFAULT_SETTINGS, "budget": 1000}
    flags = ablate.all_trial_flags(args, settings)
    assert list(flags) == ["full__seed0", "bf16__seed0", "full__seed1", "bf16__seed1", "full__seed2", "bf16__seed2",
                           "full__seed3", "bf16__seed3", "full__seed4", "bf16__seed4"]
    assert flags["bf16__seed0"][-4:] == ["--precision", "bf16", "--run-name", "bf16__seed0"]
    assert "--precision" not in flags["full__seed0"]


def test_ablate_first_seed_shifts_every_trials_seed() -> None:
    pytest.importorskip("ray", reason="lab.ablate needs Ray: pip install -r requirements-study.txt")
    from lab import ablate
    args = ablate.parse_args(ablate.build_parser(), ["--configs", "full", "--first-seed", "5"])
    fresh = ablate.all_trial_flags(args, {**ablate.DEFAULT_SETTINGS, "budget": 1000})
    assert list(fresh) == ["full__seed5", "full__seed6", "full__seed7", "full__seed8", "full__seed9"]
    assert fresh["full__seed7"][fresh["full__seed7"].index("--seed") + 1] == "7"


def test_search_and_confirmation_seeds_never_meet() -> None:
    pytest.importorskip("ray", reason="lab.runner needs Ray: pip install -r requirements-study.txt")
    from lab.runner import CONFIRMATION_SEEDS, SEARCH_SEEDS
    assert not set(SEARCH_SEEDS) & set(CONFIRMATION_SEEDS)


def test_tiny_study_runs_on_local_ray_then_skips_finished_trials(tmp_path: Path) -> None:
    args = ["--name", "tiny", "--budget", "400", "--seeds", "2", "--configs", "full,with_per", "--max-concurrent", "2",
            "--eval-every", "1", "--eval-episodes", "1", "--step-points", "200,400", "--threshold", "200",
            "--train-args", "--env Pendulum-v1 --hidden-size 16 --batch-size 16 --buffer-size 1000 "
                            "--start-steps 100 --update-after 300 --no-compile"]
    runs = ["full__seed0", "full__seed1", "with_per__seed0", "with_per__seed1"]
    first = run_study("lab.ablate", tmp_path, *args)
    assert first.returncode == 0, first.stdout + first.stderr
    study = tmp_path / "studies" / "tiny"
    for run in runs:
        assert (study / "checkpoints" / run / "final.pt").is_file()
        assert f"finished {run}" in first.stdout
    started = [line.split()[-1] for line in first.stdout.splitlines() if " started " in line]
    # Seed-major: both configurations of seed 0 (started together, two at a time) before any of seed 1.
    assert [set(started[:2]), set(started[2:])] == [{"full__seed0", "with_per__seed0"}, {"full__seed1", "with_per__seed1"}]
    table = (study / "results.md").read_text()
    assert "| configuration | seeds | return @ 200 | return @ 400 | steps to 200 | reached 200 |" in table
    assert "| full | 2 | " in table and "| with_per | 2 | " in table
    assert (study / "curves.png").read_bytes()[:4] == b"\x89PNG"

    second = run_study("lab.ablate", tmp_path, *args)
    assert second.returncode == 0, second.stdout + second.stderr
    for run in runs:
        assert f"skipped  {run}: finished" in second.stdout
    assert "4 finished, 0 to resume, 0 to start" in second.stdout
    assert "started" not in second.stdout  # Ray launched nothing

    # The final agents over 2 episodes: the target check's episodes, kept for the next call.
    checked = run_study("lab.ablate", tmp_path, *args, "--aggregate-only", "--final-episodes", "2")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "evaluating 4 final agents over 2 episodes each" in checked.stdout
    stored = json.loads((study / "final_checks.json").read_text())
    assert sorted(stored) == sorted(runs) and all(len(entry["returns"]) == 2 for entry in stored.values())
    agent, env = load_agent_and_env(study / "checkpoints" / "with_per__seed1" / "final.pt")
    assert stored["with_per__seed1"]["returns"] == evaluate_policy(agent, env, 2, 1 + TARGET_SEED_OFFSET)
    mean = np.mean(stored["with_per__seed1"]["returns"])
    rows = [line for line in (study / "results.md").read_text().splitlines() if line.startswith("| with_per | 2 | ")]
    assert len(rows) == 2 and f" / {mean:.1f} | " in rows[1]  # the final-agent row lists seed 1 after seed 0
    again = run_study("lab.ablate", tmp_path, *args, "--aggregate-only", "--final-episodes", "2")
    assert again.returncode == 0 and "evaluating" not in again.stdout, again.stdout + again.stderr
    assert (study / "results.md").read_text().count("final agent's 2-episode return") == 1


def test_ablate_refuses_a_trial_folder_it_did_not_make(tmp_path: Path) -> None:
    pytest.importorskip("ray", reason="lab.ablate needs Ray: pip install -r requirements-study.txt")
    train_args = "--env Pendulum-v1 --hidden-size 16 --batch-size 16 --buffer-size 1000 --start-steps 100"
    study = tmp_path / "studies" / "clash"
    study.mkdir(parents=True)
    # A run under the trial's name, with the study's flags but another width: not this study's trial.
    foreign = subprocess.run([sys.executable, str(REPO / "train.py"), *train_args.split(), "--hidden-size", "32",
                              "--total-steps", "100", "--threads", "1", "--run-name", "full__seed0"],
                             cwd=study, capture_output=True, text=True, timeout=120)
    assert foreign.returncode == 0, foreign.stderr
    final = study / "checkpoints" / "full__seed0" / "final.pt"
    before = final.read_bytes()
    result = run_study("lab.ablate", tmp_path, "--name", "clash", "--budget", "200", "--seeds", "1",
                       "--configs", "full", "--threshold", "-500", "--train-args", train_args, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert "is not this study's full__seed0: it was trained with --hidden-size 32, the study sets 16" in result.stderr
    assert final.read_bytes() == before and not (study / "results.md").exists()


def test_tiny_search_reports_during_trials_writes_the_table_and_resumes(tmp_path: Path) -> None:
    pytest.importorskip("optuna", reason="lab.search needs Ray and Optuna: pip install -r requirements-study.txt")
    from lab.search import SEARCH_SPACE
    args = ["--name", "tiny", "--budget", "600", "--trials", "3", "--max-concurrent", "1", "--eval-every", "1",
            "--eval-episodes", "1", "--poll-seconds", "0.5",
            "--train-args", "--env Pendulum-v1 --update-after 500 --no-compile"]
    first = run_study("lab.search", tmp_path, *args)
    assert first.returncode == 0, first.stdout + first.stderr
    study = tmp_path / "studies" / "tiny"
    trials = sorted(path.stem for path in (study / "trials").glob("*.json"))
    assert len(trials) == 3
    # Every trial trained on the search seeds only.
    assert {run.name.rpartition("__seed")[2] for run in (study / "runs").iterdir()} == {"100", "101"}
    # One trial is the defaults (the baseline, proposed first) and ran the whole budget: ASHA never stops the first.
    baseline = [name for name in trials if json.loads((study / "trials" / f"{name}.json").read_text()) == {
        key: getattr(SACConfig(), key) for key in SEARCH_SPACE}]
    assert len(baseline) == 1
    assert (study / "checkpoints" / f"{baseline[0]}__seed100" / "final.pt").is_file()
    # Tune got the evaluations as they came (one per 200-step episode), not only at the end.
    reports = [json.loads(line) for line in next((study / "ray" / "tune").glob(f"*{baseline[0]}*/result.json")).open()]
    assert [r["step"] for r in reports][-1] == 600 and len(reports) >= 2
    # The budget's step came with train.py's exit code: reported after the runs ended, so ASHA's stop at
    # max_t cannot kill them before final.pt.
    assert [r.get("exit_code") for r in reports] == [None] * (len(reports) - 1) + [0]
    table = (study / "results.md").read_text()
    assert table.count("| complete |") + table.count("| stopped |") == 3
    assert "Best complete trial" in table and "python train.py --lr-actor " in first.stdout
    assert "Not computed: fewer than 8 trials" in table

    second = run_study("lab.search", tmp_path, *args)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "resuming the search" in second.stdout and " started " not in second.stdout
    assert sorted(path.stem for path in (study / "trials").glob("*.json")) == trials


def test_final_episodes_refuse_a_foreign_final_agent_in_one_line(tmp_path: Path) -> None:
    final = tmp_path / "studies" / "junk" / "checkpoints" / "full__seed0" / "final.pt"
    final.parent.mkdir(parents=True)
    final.write_bytes(b"not a checkpoint")
    settings = {"kind": "ablation", "budget": 1000, "eval_every": 10, "eval_episodes": 10, "target_return": "none",
                "train_args": []}
    (final.parents[2] / "study.json").write_text(json.dumps(settings))
    result = run_study("lab.ablate", tmp_path, "--name", "junk", "--aggregate-only", "--final-episodes", "2",
                       timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.count("\n") == 1 and "final.pt: not a loadable checkpoint" in result.stderr, result.stderr
    assert not (tmp_path / "studies" / "junk" / "final_checks.json").exists()
