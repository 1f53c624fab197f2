"""lab.head_to_head: train.py's solved check run on SB3 models, rl-zoo3's hyperparameters read from
the installed package, resumption and the page. No training beyond a few dozen one-step episodes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
import yaml

pytest.importorskip("sb3_contrib", reason="the head-to-head benchmark: pip install -r requirements-bench.txt")
pytest.importorskip("rl_zoo3", reason="the head-to-head benchmark: pip install -r requirements-bench.txt")
from rl_zoo3.exp_manager import ExperimentManager  # noqa: E402
from stable_baselines3 import SAC  # noqa: E402

import lab.head_to_head as head_to_head  # noqa: E402
from lab.head_to_head import (  # noqa: E402
    ENV_ID, LinearSchedule, SB3Actor, Study, ZooError, check_config, confirmation_rows, finished_message,
    main, make_check_callback, model_kwargs, page, paired_minutes, parse_caps, parse_python_kwargs, parse_schedule,
    read_zoo_entry, row_cells, side_by_side, summary, train_peer, zoo_hyperparams, zoo_hyperparams_file,
)
from sac_model import (  # noqa: E402
    EVAL_SEED_OFFSET, TARGET_SEED_OFFSET, SACConfig, SACError, evaluate_policy, make_env, target_return,
)

REPO = Path(__file__).resolve().parent.parent
TINY_ID = "TimeToSolvedTiny-v0"
SEED = 7


class OneStepEnv(gym.Env):
    """Episodes of one step whose return is set by the reset seed: `eval_return` on evaluation seeds; on check
    seeds `check_mean` + or - `check_std` by the seed's parity (so 100 consecutive seeds have exactly that
    mean and population std); 0 in training. Records every reset seed."""

    metadata = {"render_modes": ["rgb_array"]}  # gymnasium warns when a mode it is asked for is not listed
    observation_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
    action_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)

    def __init__(self, eval_return: float = 0.0, check_mean: float = 0.0, check_std: float = 0.0,
                 render_mode: str | None = None) -> None:
        self.eval_return, self.check_mean, self.check_std = eval_return, check_mean, check_std
        self.seeds: list[int | None] = []

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.seeds.append(seed)
        return np.zeros(2, np.float32), {}

    def step(self, action):
        seed = self.seeds[-1]
        if seed is not None and seed >= SEED + TARGET_SEED_OFFSET:
            reward = self.check_mean + (1 if seed % 2 == 0 else -1) * self.check_std
        elif seed is not None and seed >= SEED + EVAL_SEED_OFFSET:
            reward = self.eval_return
        else:
            reward = 0.0
        return np.zeros(2, np.float32), reward, True, False, {}


gym.register(TINY_ID, entry_point=OneStepEnv, reward_threshold=200.0, max_episode_steps=5)
TARGET = target_return(SACConfig(env=TINY_ID))  # the default run's target on this env: its threshold


def train_tiny(cap: int, **returns: float):
    """SAC on the one-step env under the check (no gradient step: the returns do not depend on the policy)."""
    model = SAC("MlpPolicy", gym.make(TINY_ID), learning_starts=10**6, buffer_size=1000, seed=SEED,
                policy_kwargs=dict(net_arch=[8]), device="cpu")
    eval_env = gym.make(TINY_ID, **returns)
    callback = make_check_callback(eval_env, check_config(SEED, TINY_ID), cap)
    model.learn(total_timesteps=1000, callback=callback)
    if not callback.solved:
        callback.close_unsolved()
    return model, callback, eval_env.unwrapped.seeds


def test_the_check_runs_only_when_the_evaluation_reaches_the_target():
    model, callback, seeds = train_tiny(35, eval_return=199.9, check_mean=150.0)
    assert model.num_timesteps == 35 and callback.episodes == 35
    assert [e[0] for e in callback.evaluations] == [10, 20, 30, 35]  # every 10 episodes, and the final agent
    assert callback.checks == [[35, 150.0, 0.0]] and not callback.solved  # only train.py's check for the record
    assert set(seeds[:10]) == set(range(SEED + EVAL_SEED_OFFSET, SEED + EVAL_SEED_OFFSET + 10))


def test_a_check_passes_by_the_lower_bound_and_stops_training():
    # (TARGET + 7) - 2 x 30 / sqrt(100) = TARGET + 1: solved at the first evaluation, after episode 10.
    model, callback, _ = train_tiny(300, eval_return=TARGET, check_mean=TARGET + 7, check_std=30.0)
    assert callback.solved and model.num_timesteps == 10 and callback.episodes == 10
    assert callback.checks == [[10, TARGET + 7, 30.0]]


def test_a_failed_check_trains_on_and_each_check_plays_fresh_seeds():
    # (TARGET + 5) - 2 x 30 / 10 = TARGET - 1, although the mean is above the target.
    model, callback, seeds = train_tiny(30, eval_return=TARGET, check_mean=TARGET + 5, check_std=30.0)
    assert not callback.solved and model.num_timesteps == 30
    assert [c[0] for c in callback.checks] == [10, 20, 30]  # the last one at the cap: none for the record
    first = SEED + TARGET_SEED_OFFSET
    assert callback.check_seeds == [first, first + 100, first + 200]
    check_seeds = [s for s in seeds if s >= first]
    assert sorted(check_seeds) == list(range(first, first + 300))  # 300 episodes, no seed played twice
    assert [s for s in seeds if s < first] == list(range(SEED + EVAL_SEED_OFFSET, SEED + EVAL_SEED_OFFSET + 10)) * 3


class FixedActionModel:
    """An SB3-like model whose predict returns one action, remembering whether it was asked deterministically."""

    def __init__(self, action) -> None:
        self.action, self.deterministic = np.asarray(action, np.float32), []

    def predict(self, obs, deterministic=False):
        self.deterministic.append(deterministic)
        return self.action, None


def test_an_sb3_model_is_evaluated_on_lunar_lander_by_the_repositorys_loop():
    env = make_env(ENV_ID)
    model = FixedActionModel([0.0, 0.0])  # engines off: the lander falls
    returns = evaluate_policy(SB3Actor(model), env, 2, 1000)
    expected = []
    for seed in (1000, 1001):
        env.reset(seed=seed)
        total, done = 0.0, False
        while not done:
            _, reward, terminated, truncated, _ = env.step(np.zeros(2, np.float32))
            total, done = total + float(reward), terminated or truncated
        expected.append(total)
    env.close()
    assert returns == expected and all(r < 0 for r in returns) and set(model.deterministic) == {True}


def test_the_zoo_files_are_read_as_the_installed_rl_zoo3_writes_them():
    for algo in ("sac", "tqc", "crossq"):
        raw = yaml.safe_load(zoo_hyperparams_file(algo).read_text())
        key, kwargs, budget = zoo_hyperparams(algo)
        assert key in raw and key.startswith("LunarLanderContinuous-v")
        assert budget == int(float(raw[key]["n_timesteps"])) and "n_timesteps" not in kwargs
        assert kwargs.keys() == raw[key].keys() - {"n_timesteps"}
    _, sac, sac_budget = zoo_hyperparams("sac")
    _, tqc, tqc_budget = zoo_hyperparams("tqc")
    for kwargs in (sac, tqc):
        assert kwargs["policy_kwargs"] == {"net_arch": [400, 300]}
        assert kwargs["learning_rate"] == LinearSchedule(7.3e-4)
        assert kwargs["learning_rate"](0.5) == pytest.approx(3.65e-4)  # halfway through the zoo's 500k steps
        assert (kwargs["tau"], kwargs["learning_starts"], kwargs["batch_size"]) == (0.01, 10000, 256)
        assert kwargs["gamma"] == 0.99
        assert (kwargs["train_freq"], kwargs["gradient_steps"], kwargs["ent_coef"]) == (1, 1, "auto")
        assert kwargs["buffer_size"] == 1_000_000
    assert sac_budget == tqc_budget == 500_000
    _, crossq, crossq_budget = zoo_hyperparams("crossq")
    assert crossq == {"policy": "MlpPolicy", "buffer_size": 1_000_000, "learning_starts": 10000}
    assert crossq_budget == 200_000


def test_the_conversion_matches_rl_zoo3s_own():
    for algo in ("sac", "tqc", "crossq"):
        _, entry = read_zoo_entry(zoo_hyperparams_file(algo))
        ours, _ = model_kwargs(entry)
        theirs = ExperimentManager._preprocess_schedules(dict(entry))
        if isinstance(entry.get("policy_kwargs"), str):
            theirs["policy_kwargs"] = eval(entry["policy_kwargs"], {"nn": torch.nn})  # what the zoo does
        for key, value in theirs.items():
            if key == "n_timesteps":
                continue
            if callable(value):
                assert [ours[key](p) for p in (1.0, 0.3, 0.0)] == [value(p) for p in (1.0, 0.3, 0.0)], key
            else:
                assert ours[key] == value, key


def test_the_schedule_and_kwargs_parsers():
    schedule = parse_schedule("lin_7.3e-4")
    assert schedule(1.0) == 7.3e-4 and schedule(0.0) == 0.0 and schedule(0.25) == pytest.approx(1.825e-4)
    assert parse_schedule(3e-4) == 3e-4 and parse_schedule(1) == 1
    for bad in ("exp_1e-3", "lin_x", "7e-4", True, None):
        with pytest.raises(ZooError):
            parse_schedule(bad)
    assert parse_python_kwargs("dict(net_arch=dict(pi=[256, 256], qf=[1024, 1024]), activation_fn=nn.ReLU, "
                               "log_std_init=-3, use_sde=True)") == {
        "net_arch": {"pi": [256, 256], "qf": [1024, 1024]}, "activation_fn": torch.nn.ReLU, "log_std_init": -3,
        "use_sde": True}
    assert parse_python_kwargs("{'n_critics': 2, 'net_arch': (64, 64)}") == {"n_critics": 2, "net_arch": (64, 64)}
    for bad in ("__import__('os').system('true')", "[400, 300]", "dict(a=os.getcwd())", "dict(", "nn.functional"):
        with pytest.raises(ZooError):
            parse_python_kwargs(bad)


def test_an_older_version_of_the_env_is_read_when_the_zoo_has_no_v3_entry(tmp_path: Path):
    path = tmp_path / "sac.yml"
    path.write_text("LunarLanderContinuous-v1:\n  tau: 0.1\nLunarLanderContinuous-v2:\n  n_timesteps: !!float 5e5\n"
                    "  learning_rate: lin_1e-3\nLunarLander-v3:\n  tau: 0.5\n")
    key, entry = read_zoo_entry(path)
    assert key == "LunarLanderContinuous-v2"
    assert model_kwargs(entry) == ({"learning_rate": LinearSchedule(1e-3)}, 500000)
    with pytest.raises(ZooError):
        read_zoo_entry(path, "BipedalWalker-v3")
    with pytest.raises(ZooError):
        model_kwargs({"n_timesteps": 10, "normalize": True})


def test_caps_per_algorithm():
    assert parse_caps(None, 500_000) == dict.fromkeys(head_to_head.ALGOS, 500_000)  # the env preset's budget
    assert parse_caps("2000", 500_000) == {"ours": 2000, "sac": 2000, "tqc": 2000, "crossq": 2000, "sbx_tqc": 2000,
                                  "sbx_crossq": 2000}
    caps = parse_caps("300000,crossq=200000", 500_000)
    assert caps["crossq"] == 200000 and caps["ours"] == caps["sac"] == 300000
    for bad in ("", "0", "ppo=10", "sac=x"):
        with pytest.raises(SACError):
            parse_caps(bad, 500_000)


TINY_SAC = {"learning_starts": 10**6, "buffer_size": 1000, "policy_kwargs": {"net_arch": [8]}}  # no update


@pytest.fixture
def lunar_zoo_entries(monkeypatch: pytest.MonkeyPatch) -> None:
    """A peer trained on the one-step env reads the zoo's LunarLander entry (the zoo has none for it)."""
    lunar = head_to_head.zoo_hyperparams
    monkeypatch.setattr(head_to_head, "zoo_hyperparams", lambda algo, env_id=ENV_ID: lunar(algo, ENV_ID))


class Killed(Exception):
    """A session's end, in the middle of a peer's run."""


def test_an_interrupted_peer_resumes_from_its_last_resume_point(tmp_path: Path, monkeypatch, lunar_zoo_entries):
    save = head_to_head.save_resume_point

    def save_then_die_at_step_20(model, *args) -> None:
        save(model, *args)
        if model.num_timesteps >= 20:
            raise Killed

    monkeypatch.setattr(head_to_head, "save_resume_point", save_then_die_at_step_20)
    with pytest.raises(Killed):  # started a minute ago: its wall time so far is over a minute
        train_peer("sac", SEED, 1, 40, tmp_path, time.time() - 60, TINY_ID, TINY_SAC, save_every_s=0)
    monkeypatch.setattr(head_to_head, "save_resume_point", save)
    state = json.loads((tmp_path / "resume" / "state.json").read_text())
    assert (state["steps"], state["episodes"], state["segments"]) == (20, 20, 1) and 1 < state["minutes"] < 2
    assert [e[0] for e in state["evaluations"]] == [10, 20] and not (tmp_path / "record.json").exists()

    record = train_peer("sac", SEED, 1, 40, tmp_path, time.time(), TINY_ID, TINY_SAC, save_every_s=0)
    assert (record["steps"], record["episodes"], record["segments"]) == (40, 40, 2)
    assert state["minutes"] <= record["minutes"] < state["minutes"] + 1  # the earlier process's minute counts
    assert [e[0] for e in record["evaluations"]] == [10, 20, 30, 40] and not record["solved"]
    assert not (tmp_path / "resume").exists()
    model = SAC.load(tmp_path / "model.zip", device="cpu")
    assert model.num_timesteps == 40 and model._total_timesteps == 500_000  # the zoo's clock of its schedules
    assert train_peer("sac", SEED, 1, 40, tmp_path, time.time(), TINY_ID, TINY_SAC) == record  # done: no training


@pytest.mark.parametrize("algo", ["sbx_tqc", "sbx_crossq"])
def test_an_sbx_peer_trains_under_the_check_at_its_sb3_twins_zoo_settings_on_one_xla_thread(
        tmp_path: Path, algo: str, monkeypatch: pytest.MonkeyPatch, lunar_zoo_entries):
    pytest.importorskip("sbx", reason="SBX, the JAX version of SB3: pip install -r requirements-sbx.txt")
    monkeypatch.delenv("XLA_FLAGS", raising=False)  # the worker sets it; restored after the test
    _, kwargs, budget = head_to_head.zoo_hyperparams(algo)  # the zoo's entry of its SB3 twin, tqc or crossq
    assert (kwargs, budget) == head_to_head.zoo_hyperparams(algo.removeprefix("sbx_"))[1:]
    tiny = {"learning_starts": 15, "buffer_size": 1000, "policy_kwargs": {"net_arch": [8]}, "batch_size": 8}
    record = train_peer(algo, SEED, 1, 30, tmp_path, time.time(), TINY_ID, tiny, save_every_s=0)
    assert (record["steps"], record["episodes"]) == (30, 30) and record["updates"] > 0
    assert [e[0] for e in record["evaluations"]] == [10, 20, 30]
    model = head_to_head.peer_class(algo).load(tmp_path / "model.zip")
    assert type(model).__module__.startswith("sbx") and model.num_timesteps == 30
    assert os.environ["XLA_FLAGS"] == "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"


def confirmation_record(seed: int, target: float = 260.0) -> dict:
    """A finished row of lab.confirm's results file: two processes of 6 and 4 minutes, solved at 90,000."""
    return {"seed": seed, "segments": [[0.0, 360.0], [1000.0, 1240.0]], "steps": 90_000, "updates": 89_000,
            "cap": 300_000, "checks": [[90_000, 270.0, 20.0]], "target": target, "std_errors": 2.0,
            "target_episodes": 100, "unseen": [265.0, 255.0], "unseen_crashes": 1, "cpu": "AMD EPYC"}


def test_our_rows_come_from_the_default_runs_confirmation(tmp_path: Path):
    results = tmp_path / "default_run.json"
    results.write_text(json.dumps({"defaults__seed1": confirmation_record(1),
                                   "defaults__seed2": {"seed": 2, "segments": [[0.0, None]]}}))  # still running
    rows = confirmation_rows(results)
    assert list(rows) == [1] and rows[1]["minutes"] == pytest.approx(10.0) and rows[1]["solved"]
    assert rows[1]["cpu"] == "AMD EPYC"  # the CPU its confirmation ran on travels with the row
    assert row_cells(rows[1]) == ["ours", "1", "90,000", "89,000", "10.0", "yes", "270.0 +/- 20.0", "260.0", "5.0",
                                  "2", "0", "1"]
    args = type("Args", (), {"output": str(tmp_path / "h2h.md"), "work_dir": str(tmp_path / "w"),
                             "ours_from": str(results), "threads": 1, "env": ENV_ID, "unseen_episodes": 2})()
    assert Study(args, "cmd").pending(["ours", "sac"], [1, 2]) == [("sac", 1), ("ours", 2), ("sac", 2)]
    results.write_text(json.dumps({"defaults__seed1": confirmation_record(1, target=200.0)}))
    with pytest.raises(SACError, match="target of 200"):
        confirmation_rows(results)
    with pytest.raises(SACError, match="does not exist"):
        confirmation_rows(tmp_path / "missing.json")


def row(algo: str, seed: int, minutes: float, solved: bool = True, unseen=(250.0, 150.0, -20.0)) -> dict:
    return {"algo": algo, "seed": seed, "steps": 50_000 + seed, "updates": 49_000, "episodes": 120,
            "minutes": minutes, "solved": solved, "cap": 300_000, "checks": [[50_000, 230.0, 40.0]],
            "unseen": list(unseen), "crashes": seed, "commit": "abc1234", "command": "python train.py"}


def test_the_table_and_summary_give_medians_and_ratios_to_ours():
    rows = [row("ours", 1, 10.0), row("ours", 2, 30.0), row("ours", 3, 50.0, solved=False),
            row("sac", 1, 50.0), row("sac", 2, 30.0, unseen=(300.0, 300.0, 300.0)), row("tqc", 4, 12.0)]
    assert row_cells(rows[2]) == ["ours", "3", "50,003", "49,000", "50.0", "no (cap 300,000)",
                                  "230.0 +/- 40.0", "126.7", "111.5", "1", "1", "3"]
    lines = summary(rows)
    assert lines[2] == "| ours | 1, 2, 3 | 2 | 30.0 | 30.0 | 1.00 | 50,002 | 126.7 | 1 | 1 | 2 |"
    # sac against ours on its own seeds 1 and 2: median 40 over median 20 (ours on all three seeds: 30)
    assert lines[3] == "| sac | 1, 2 | 2 | 40.0 | 20.0 | 2.00 | 50,002 | 213.3 | 2 | 0.5 | 1.5 |"
    assert lines[4] == "| tqc | 4 | 1 | 12.0 | n/a | n/a | 50,004 | 126.7 | 1 | 1 | 4 |"  # no run of ours on seed 4
    assert side_by_side(rows)[2:] == ["| 1 | 10.0 (50k) | 50.0 (50k) |  |", "| 2 | 30.0 (50k) | 30.0 (50k) |  |",
                                      "| 4 |  |  | 12.0 (50k) |"]
    text = page({f"{r['algo']}/{r['seed']}": r for r in reversed(rows)}, ["# head", ""])
    table = [line for line in text.splitlines() if line.startswith("| ours |") or line.startswith("| sac |")]
    assert [line.split(" | ")[1] for line in table[:5]] == ["1", "2", "3", "1", "2"]  # ordered by algorithm, seed


def test_wall_times_compare_only_between_runs_on_the_same_cpu():
    ours = [dict(row("ours", 1, 10.0), cpu="AMD EPYC"), dict(row("ours", 2, 20.0), cpu="AMD EPYC")]
    peers = [dict(row("sac", 1, 40.0), cpu="AMD EPYC"), dict(row("sac", 2, 90.0), cpu="Intel Xeon")]
    assert paired_minutes(peers, ours) == [(40.0, 10.0)]
    lines = summary(ours + peers)
    assert lines[3].startswith("| sac | 1, 2 | 2 | 65.0 | n/a | n/a |")  # seed 2 ran elsewhere: no ratio
    assert summary(ours + peers[:1])[3].startswith("| sac | 1 | 1 | 40.0 | 10.0 | 4.00 |")
    text = page({f"{r['algo']}/{r['seed']}": r for r in ours + peers}, ["# head", ""])
    assert ("The runs used more than one CPU, and wall times compare only between runs on the same one: "
            "ours 1, ours 2, sac 1 on AMD EPYC; sac 2 on Intel Xeon.") in text
    assert "more than one CPU" not in page({f"ours/{r['seed']}": r for r in ours}, ["# head", ""])
    # rows from before rows named their CPU pair only with each other
    assert paired_minutes([row("sac", 1, 40.0)], [row("ours", 1, 10.0)]) == [(40.0, 10.0)]
    assert paired_minutes([row("sac", 1, 40.0)], ours) == []


def test_a_rerun_skips_the_finished_rows(tmp_path: Path, capsys):
    output = tmp_path / "results" / "h2h.md"
    output.parent.mkdir()
    output.with_suffix(".json").write_text(json.dumps({"rows": {"sac/1": row("sac", 1, 5.0)}}))
    assert main(["--algos", "sac", "--seeds", "1", "--output", str(output), "--work-dir", str(tmp_path / "w")]) == 0
    out = capsys.readouterr().out
    assert "1 finished run(s)" in out and "0 to run" in out and "start" not in out
    assert "| sac | 1 | 50,001 |" in output.read_text() and not (tmp_path / "w").exists()
    command = f"Command (the last): `python -m lab.head_to_head --algos sac --seeds 1 --output {output}"
    assert command in output.read_text()
    args = type("Args", (), {"output": str(output), "work_dir": str(tmp_path / "w"), "ours_from": None,
                             "env": ENV_ID})()
    assert Study(args, "cmd").pending(["ours", "sac"], [1, 2]) == [("ours", 1), ("ours", 2), ("sac", 2)]


def test_ctrl_c_ends_the_study_with_one_line_that_says_how_to_resume(tmp_path: Path, monkeypatch, capsys):
    def interrupted(study, pairs):
        raise KeyboardInterrupt

    monkeypatch.setattr(head_to_head, "run", interrupted)
    try:
        main(["--algos", "sac", "--seeds", "1", "--output", str(tmp_path / "h2h.md"), "--work-dir", str(tmp_path)])
    except SystemExit as stop:
        code = stop.code
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C ended the study with a traceback")
    stderr = capsys.readouterr().err
    assert code == 130 and stderr.count("\n") == 1 and "the same command runs the unfinished runs again" in stderr


def test_two_study_processes_keep_each_others_rows(tmp_path: Path):
    args = type("Args", (), {"output": str(tmp_path / "h2h.md"), "work_dir": str(tmp_path / "w"), "ours_from": None,
                             "threads": 1, "parallel": 1, "env": ENV_ID})()
    tqc_study, sac_study = Study(args, "cmd"), Study(args, "cmd")  # both started before either finished a run
    tqc_study.rows["tqc/1"] = row("tqc", 1, 5.0)
    tqc_study.save()
    sac_study.rows["sac/1"] = row("sac", 1, 9.0)
    sac_study.save()
    assert set(json.loads((tmp_path / "h2h.json").read_text())["rows"]) == {"tqc/1", "sac/1"}
    assert "| tqc | 1 |" in (tmp_path / "h2h.md").read_text()


def test_a_peer_runs_as_this_modules_worker_in_the_repository_root(tmp_path: Path):
    args = type("Args", (), {"output": str(tmp_path / "h2h.md"), "work_dir": str(tmp_path / "w"), "ours_from": None,
                             "threads": 1, "caps": parse_caps("2000", 300_000), "env": ENV_ID})()
    command = Study(args, "cmd").process_command("sac", 3)
    assert command == [sys.executable, "-m", "lab.head_to_head", "--worker", "sac", "--seeds", "3", "--threads", "1",
                       "--cap", "2000", "--work-dir", str((tmp_path / "w" / "h2h_sac__seed3").resolve())]
    # Started as the study starts it, with a second seed: the worker runs, and refuses it in one line.
    refused = subprocess.run([*command, "--seeds", "3,4"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and refused.stderr == "error: --worker trains one seed\n"


def test_the_old_command_says_where_the_head_to_head_went():
    moved = subprocess.run([sys.executable, "benchmarks/time_to_solved.py", "--algos", "sac"], cwd=REPO,
                           capture_output=True, text=True, timeout=60)
    assert moved.returncode == 2 and moved.stdout == ""
    assert moved.stderr == "benchmarks/time_to_solved.py moved: python -m lab.head_to_head --algos sac\n"


def test_a_fixed_budget_env_trains_every_run_to_its_presets_budget(tmp_path: Path):
    config = check_config(3, "Hopper-v5")
    assert (config.total_steps, target_return(config), config.start_steps) == (300_000, None, 10_000)
    key, kwargs, budget = zoo_hyperparams("sac", "Hopper-v5")  # the zoo knows MuJoCo at v4
    assert (key, kwargs, budget) == ("Hopper-v4", {"policy": "MlpPolicy", "learning_starts": 10_000}, 1_000_000)
    args = type("Args", (), {"output": str(tmp_path / "h2h.md"), "work_dir": str(tmp_path / "w"), "ours_from": None,
                             "threads": 1, "caps": parse_caps(None, config.total_steps), "env": "Hopper-v5",
                             "train_args": ""})()
    study = Study(args, "cmd")
    ours = study.process_command("ours", 3)
    assert ours[ours.index("--env") + 1] == "Hopper-v5" and "--total-steps" not in ours  # the preset's budget
    peer = study.process_command("sac", 3)
    assert peer[peer.index("--env") + 1] == "Hopper-v5" and peer[peer.index("--cap") + 1] == "300000"

    record = {**row("sac", 3, 50.0, unseen=(3900.0, 1000.0, -5.0)), "crashes": None, "checks": []}
    assert row_cells(record, "Hopper-v5")[5:] == ["no stop (budget 300,000)", "none", "1631.7", "1655.6", "1", "1",
                                                  "-"]
    text = page({"sac/3": record}, ["# head", ""], "Hopper-v5")
    assert "| algorithm | seed |" in text and "| >= 3800 | < 0 | crashes |" in text
    assert "No stop: every run trains Hopper-v5's preset budget, 300,000 env steps" in text
    assert summary([record], "Hopper-v5")[2].startswith("| sac | 3 | - | 50.0 |")  # no stop: nothing to solve
    assert summary([record], "Hopper-v5")[2].endswith("| 1631.7 | 1 | 1 | - |")
    assert side_by_side([record], "Hopper-v5")[2] == "| 3 | 50.0 (50k) |"
    # The row's commit names its page and counts the env's threshold (Hopper's 3800), not LunarLander's 200.
    assert finished_message(record, "Hopper-v5").startswith("head_to_head_Hopper-v5: sac seed 3 finished (")
    assert finished_message(record, "Hopper-v5").endswith("| 1631.7 | 1655.6 | 1 | 1 | -)")


def test_our_rows_from_another_envs_confirmation_must_match_its_env_and_episodes(tmp_path: Path):
    results = tmp_path / "hopper.json"
    hopper = {**confirmation_record(1, target=None), "env": "Hopper-v5", "unseen": [3000.0, 2000.0, 1000.0],
              "evaluations": [[5000, 100.0, 3.0]]}
    hopper.pop("unseen_crashes")  # lab.confirm counts crashes on LunarLander only
    results.write_text(json.dumps({"defaults__seed1": hopper}))
    rows = confirmation_rows(results, "Hopper-v5")
    assert rows[1]["command"] == "python train.py --seed 1 --threads 1 --env Hopper-v5"
    assert rows[1]["crashes"] is None and rows[1]["evaluations"] == [[5000, 100.0, 3.0]]
    with pytest.raises(SACError, match="trained Hopper-v5, not LunarLanderContinuous-v3"):
        confirmation_rows(results)
    results.write_text(json.dumps({"defaults__seed1": confirmation_record(1)}))  # written before records named it
    with pytest.raises(SACError, match="trained LunarLanderContinuous-v3, not Hopper-v5"):
        confirmation_rows(results, "Hopper-v5")
    results.write_text(json.dumps({"defaults__seed1": hopper}))
    args = type("Args", (), {"output": str(tmp_path / "h2h.md"), "work_dir": str(tmp_path / "w"),
                             "ours_from": str(results), "threads": 1, "env": "Hopper-v5", "unseen_episodes": 20})()
    with pytest.raises(SACError, match="played 3 unseen episodes; give --unseen-episodes 3"):
        Study(args, "cmd")


def test_an_env_that_cannot_be_made_is_refused_in_one_line_before_any_run(tmp_path: Path, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--env", "NoSuchEnv-v0", "--algos", "sac", "--seeds", "1", "--work-dir", str(tmp_path)])
    stderr = capsys.readouterr().err
    assert stop.value.code == 2 and stderr.count("\n") == 1 and "cannot create environment 'NoSuchEnv-v0'" in stderr
    assert not any(tmp_path.iterdir())


def test_the_sbx_peers_run_only_in_a_one_thread_study(tmp_path: Path, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--algos", "sac,sbx_tqc", "--seeds", "1", "--threads", "2", "--work-dir", str(tmp_path)])
    stderr = capsys.readouterr().err
    assert stop.value.code == 2 and stderr.count("\n") == 1 and "sbx_ peers run on one XLA thread" in stderr
