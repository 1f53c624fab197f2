"""lab.confirm end to end on Pendulum: real train.py runs side by side, a page of rows, resumption, the stop rule."""
from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("matplotlib", reason="the lab tools plot with matplotlib: pip install -r requirements-study.txt")
from lab.confirm import lost, minutes_to_solved  # noqa: E402
from lab.launch import start, train_command  # noqa: E402
from lab.provenance import cpu_name, provenance  # noqa: E402
from lab.records import commit, parse_seeds  # noqa: E402
from sac_model import SACError, read_checkpoint  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
TINY = ("--env Pendulum-v1 --hidden-size 32 --batch-size 32 --buffer-size 2000 --start-steps 100 --update-after 100 "
        "--no-compile --eval-every 1 --eval-episodes 1 --target-episodes 2 --total-steps 400")
ENV = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}


def confirm_command(cwd: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "lab.confirm", "--docs-dir", str(cwd / "docs"), "--unseen-episodes", "3", *args]


def confirm(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(confirm_command(cwd, *args), cwd=cwd, capture_output=True, text=True, timeout=300, env=ENV)


def test_parse_seeds_accepts_ranges_and_lists_and_refuses_the_rest():
    assert parse_seeds("40-43") == [40, 41, 42, 43] and parse_seeds("5,7-8") == [5, 7, 8]
    for bad in ("", "a-b", "4,4", "3-"):
        with pytest.raises(SACError):
            parse_seeds(bad)


def write(path: Path, text: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_a_page_is_committed_in_the_checkout_that_holds_it_and_nothing_else_staged_goes_with_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=tmp_path, capture_output=True, text=True, check=True).stdout

    git("init", "-q")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "start")
    (tmp_path / "docs").mkdir()
    page, other = tmp_path / "docs" / "study.md", tmp_path / "other.py"
    page.write_text("| 1 | 200 |\n")
    other.write_text("staged, not the study's\n")
    git("add", "other.py")
    for variable in ("GIT_AUTHOR_NAME", "GIT_AUTHOR_EMAIL", "GIT_COMMITTER_NAME", "GIT_COMMITTER_EMAIL"):
        monkeypatch.setenv(variable, "t")
    commit([page], "study: seed 1 finished")  # from this repository's own checkout, as a worktree's study does
    assert git("log", "-1", "--format=%s") == "study: seed 1 finished\n"
    assert git("show", "--name-only", "--format=", "HEAD").split() == ["docs/study.md"]
    assert "other.py" in git("diff", "--cached", "--name-only")


def test_a_run_without_checkpoints_starts_new_once_a_killed_attempts_events_are_gone(tmp_path: Path):
    flags = ["--seed", "3", "--run-name", "r"]
    stale = write(tmp_path / "runs" / "r" / "events.out.tfevents.1")  # killed before its first checkpoint
    other = write(tmp_path / "runs" / "other" / "events.out.tfevents.1")
    write(tmp_path / "checkpoints" / "r" / ".lock")  # a lock is not a checkpoint
    assert train_command(tmp_path, "r", flags) == [sys.executable, str(REPO / "train.py"), *flags]
    assert not stale.parent.exists() and other.exists()


def test_a_run_with_a_checkpoint_is_resumed_with_its_flags_or_restarted(tmp_path: Path):
    flags = ["--seed", "3", "--run-name", "r"]
    events = write(tmp_path / "runs" / "r" / "events.out.tfevents.1")
    write(tmp_path / "checkpoints" / "r" / "step_000000200.pt")
    train = [sys.executable, str(REPO / "train.py"), *flags]
    assert train_command(tmp_path, "r", flags) == [*train, "--resume", "r"]
    assert train_command(tmp_path, "r", flags, restart=True) == [*train, "--overwrite"]
    assert events.exists()  # the resumed run's own events: train.py drops those after the checkpoint


def test_a_started_process_appends_to_its_log_after_a_line_naming_it(tmp_path: Path):
    log = tmp_path / "logs" / "r.log"
    failing = [sys.executable, "-c", "import os; print('first'); print(os.getcwd()); raise SystemExit(3)"]
    assert start(failing, tmp_path, log).wait() == (3, str(tmp_path))  # its exit code and last line, run in cwd
    quiet = [sys.executable, "-c", "pass"]
    assert start(quiet, tmp_path, log).wait() == (0, "(no output)")  # the earlier output is not its own
    lines = [line for line in log.read_text().splitlines() if line]
    assert [line.startswith("=== ") for line in lines] == [True, False, False, True]
    assert lines[0].endswith(" " + shlex.join(failing)) and lines[3].endswith(" " + shlex.join(quiet))
    assert lines[1:3] == ["first", str(tmp_path)]


@pytest.mark.skipif(sys.platform != "linux", reason="prctl(PR_SET_PDEATHSIG) is Linux's")
def test_a_process_started_to_die_with_its_parent_gets_sigterm_when_the_parent_ends(tmp_path: Path):
    parent = ("import sys; from pathlib import Path; from lab.launch import start; "
              "child = start([sys.executable, '-c', 'import time; time.sleep(60)'], Path('.'), Path('child.log'), "
              "die_with_parent={}); print(child.process.pid)")
    for dies in (True, False):
        pid = int(subprocess.run([sys.executable, "-c", parent.format(dies)], cwd=tmp_path, capture_output=True,
                                 text=True, env=ENV, timeout=60, check=True).stdout)
        deadline = time.monotonic() + 10
        while dies and alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        survived = alive(pid)
        if survived:
            os.kill(pid, signal.SIGKILL)
        assert survived != dies


def alive(pid: int) -> bool:
    """Whether a process runs (a zombie, ended but not yet reaped, does not)."""
    status = Path(f"/proc/{pid}/status")
    try:
        return "\nState:\tZ" not in status.read_text()
    except FileNotFoundError:
        return False


def test_confirmation_rows_appear_per_finished_seed_and_a_rerun_starts_nothing(tmp_path: Path):
    # Every Pendulum return is above -10,000: each run is solved at its first check (after episode 1, step 200).
    result = confirm(tmp_path, "--name", "pilot", "--seeds", "3-4", "--train-args",
                     f"{TINY} --target-return -10000")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("start defaults__seed") == 2 and result.stdout.count("done defaults__seed") == 2
    page = (tmp_path / "docs" / "pilot.md").read_text()
    assert page.splitlines()[2] == provenance()  # under the title: this checkout's commit and this machine
    rows = [line for line in page.splitlines() if line.startswith("| 3 |") or line.startswith("| 4 |")]
    assert len(rows) == 2 and all(row.split(" | ")[1] == "200" for row in rows)  # solved at env step 200
    # Pendulum registers no solved threshold: no unseen episode is counted against one (LunarLander's 200 was).
    assert "| std | >= threshold | < 0 |" in page and all(row.split(" | ")[8] == "-" for row in rows)
    assert "Solved: 2 of 2; median env steps to solved 200" in page
    assert "--unseen-episodes 3`" in page  # the command as it ran, its non-default flags included
    assert (tmp_path / "docs" / "pilot.png").stat().st_size > 1000
    results = json.loads((tmp_path / "docs" / "pilot.json").read_text())
    assert [len(results[f"defaults__seed{s}"]["unseen"]) for s in (3, 4)] == [3, 3]
    seed3 = results["defaults__seed3"]
    assert seed3["env"] == "Pendulum-v1" and [e[0] for e in seed3["evaluations"]] == [200]  # the curve, per eval
    assert seed3["cpu"] == cpu_name()  # where its wall time was measured
    # A record written before lab.confirm kept env and curve gets both from its final checkpoint, still here.
    (tmp_path / "docs" / "pilot.json").write_text(json.dumps(
        {**results, "defaults__seed3": {k: v for k, v in seed3.items() if k not in ("env", "evaluations")}}))
    report = confirm(tmp_path, "--name", "pilot", "--seeds", "3-4", "--report-only")
    assert report.returncode == 0, report.stderr
    assert json.loads((tmp_path / "docs" / "pilot.json").read_text())["defaults__seed3"] == seed3
    assert "more than one CPU" not in (tmp_path / "docs" / "pilot.md").read_text()
    # A seed that ran on another machine: the page says which CPU each run used.
    results = json.loads((tmp_path / "docs" / "pilot.json").read_text())
    results["defaults__seed4"]["cpu"] = "Another CPU"
    (tmp_path / "docs" / "pilot.json").write_text(json.dumps(results))
    assert confirm(tmp_path, "--name", "pilot", "--seeds", "3-4", "--report-only").returncode == 0
    assert f"seed 3 on {cpu_name()}; seed 4 on Another CPU." in (tmp_path / "docs" / "pilot.md").read_text()

    # lab.diagnose on one of these runs: Pendulum's one 200-step episode ended at its time limit, not in a crash.
    run_dir = tmp_path / "studies" / "pilot" / "runs" / "defaults__seed3"
    diagnosis = subprocess.run([sys.executable, "-m", "lab.diagnose", str(run_dir), "--window", "1000",
                                "--crash-below", "-5000", "--png", str(tmp_path / "d.png")], cwd=tmp_path,
                               capture_output=True, text=True, env=ENV)
    assert diagnosis.returncode == 0, diagnosis.stderr
    row = next(line for line in diagnosis.stdout.splitlines() if line.startswith("| 0-1k |")).split(" | ")
    assert row[1:4] == ["1", row[2], "1"] and row[4] == "100%" and row[5] == "0"
    assert (tmp_path / "d.png").stat().st_size > 1000

    # Another machine: studies/ is gone, docs/ (committed) is not. Nothing is rerun; the page keeps its rows.
    shutil.rmtree(tmp_path / "studies")
    again = confirm(tmp_path, "--name", "pilot", "--seeds", "3-4", "--train-args", f"{TINY} --target-return -10000")
    assert again.returncode == 0 and "start" not in again.stdout
    assert "Solved: 2 of 2; median env steps to solved 200" in (tmp_path / "docs" / "pilot.md").read_text()


def test_the_stop_rule_starts_no_seed_after_the_last_unsolved_one_it_allows(tmp_path: Path):
    # No Pendulum return reaches 0: every run ends unsolved at its 400-step cap.
    result = confirm(tmp_path, "--name", "lost", "--seeds", "1-3", "--concurrent", "1", "--stop-after-unsolved", "1",
                     "--train-args", f"{TINY} --target-return 0")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("start defaults__seed") == 1 and "stopped: 1 seeds ended unsolved" in result.stdout
    page = (tmp_path / "docs" / "lost.md").read_text()
    assert "| 1 | not solved (400) |" in page and "Solved: 0 of 1" in page


def baseline_record(seed: int, solved_at: int) -> dict:
    """A finished lab.confirm record solved at its one check, at env step `solved_at`."""
    return {"seed": seed, "segments": [[0.0, 60.0]], "checks": [[solved_at, 0.0, 1.0]], "target": -10000.0,
            "target_episodes": 2, "std_errors": 2.0, "steps": solved_at, "updates": 0, "unseen": [0.0]}


def test_a_pilot_stops_at_its_second_loss_against_the_baseline_on_the_same_seeds(tmp_path: Path):
    # The baseline solved seed 1 at step 100 and seed 2 at 100 (both earlier than this pilot's 200); seed 3 was
    # never reached.
    (tmp_path / "docs").mkdir()
    baseline = {f"defaults__seed{seed}": baseline_record(seed, 100) for seed in (1, 2, 3)}
    (tmp_path / "docs" / "today.json").write_text(json.dumps(baseline))
    result = confirm(tmp_path, "--name", "pilot_tqc", "--seeds", "1-3", "--concurrent", "1", "--config", "tqc",
                     "--baseline", "today", "--stop-after-losses", "2",
                     "--train-args", f"{TINY} --target-return -10000")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("start tqc__seed") == 2 and "stopped: 2 seeds lost against today" in result.stdout
    final = tmp_path / "studies" / "pilot_tqc" / "checkpoints" / "tqc__seed1" / "final.pt"
    assert read_checkpoint(final)["metadata"]["config"]["critic"] == "tqc"
    page = (tmp_path / "docs" / "pilot_tqc.md").read_text()
    assert "| 1 | 200 | 100 | 2.00 | yes |" in page and "Lost on 2 of 2 seeds." in page
    assert "--baseline today --stop-after-losses 2" in page

    # A seed solved as early as the baseline is no loss.
    (tmp_path / "docs" / "today.json").write_text(json.dumps({"defaults__seed4": baseline_record(4, 200)}))
    tie = confirm(tmp_path, "--name", "tie", "--seeds", "4", "--baseline", "today", "--stop-after-losses", "1",
                  "--train-args", f"{TINY} --target-return -10000")
    assert tie.returncode == 0, tie.stderr
    assert "| 4 | 200 | 200 | 1.00 | no |" in (tmp_path / "docs" / "tie.md").read_text()
    refused = confirm(tmp_path, "--name", "x", "--seeds", "4", "--stop-after-losses", "1")
    assert refused.returncode == 2 and "name one" in refused.stderr and "Traceback" not in refused.stderr


def test_a_cheaper_design_can_win_on_wall_time_where_it_loses_on_env_steps():
    cheap = baseline_record(1, 400) | {"segments": [[0.0, 300.0]]}  # twice the env steps in half the minutes
    today = {1: baseline_record(1, 200) | {"segments": [[0.0, 600.0]]}}
    assert lost(cheap, today) and lost(cheap, today, "env-steps") and not lost(cheap, today, "minutes")
    unsolved = cheap | {"target": 10000.0}
    assert lost(unsolved, today, "minutes") and minutes_to_solved(unsolved) == float("inf")
    assert not lost(cheap, {2: today[1]}, "minutes")  # a seed the baseline never ran is no loss


def test_a_pilot_judged_on_wall_time_shows_minutes_against_the_baseline(tmp_path: Path):
    (tmp_path / "docs").mkdir()
    # The baseline took 100 minutes: a real tiny run is sooner, though it needs twice the env steps.
    slow = baseline_record(1, 200) | {"segments": [[0.0, 6000.0]]}
    (tmp_path / "docs" / "today.json").write_text(json.dumps({"defaults__seed1": slow}))
    result = confirm(tmp_path, "--name", "cheap", "--seeds", "1", "--baseline", "today", "--lose-on", "minutes",
                     "--train-args", f"{TINY} --target-return -10000")
    assert result.returncode == 0, result.stderr
    page = (tmp_path / "docs" / "cheap.md").read_text()
    assert "--baseline today --lose-on minutes" in page and "(wall time in minutes to the passing check)" in page
    row = next(line for line in page.splitlines() if line.startswith("| 1 | ") and line.endswith(" |")
               and "100.0" in line)
    minutes, baseline, ratio, lost_here = row.strip("| ").split(" | ")[1:]
    assert 0 < float(minutes) < 5 and baseline == "100.0" and float(ratio) < 0.05 and lost_here == "no"
    refused = confirm(tmp_path, "--name", "x", "--seeds", "1", "--baseline", "today", "--lose-on", "hours")
    assert refused.returncode == 2 and "--lose-on" in refused.stderr and "Traceback" not in refused.stderr


def test_an_ablation_configuration_runs_with_its_flags_under_its_own_label(tmp_path: Path):
    result = confirm(tmp_path, "--name", "ablation", "--seeds", "5", "--config", "no_n_step", "--train-args",
                     f"{TINY} --target-return -10000")
    assert result.returncode == 0, result.stderr
    assert "start no_n_step__seed5" in result.stdout
    final = tmp_path / "studies" / "ablation" / "checkpoints" / "no_n_step__seed5" / "final.pt"
    assert read_checkpoint(final)["metadata"]["config"]["n_step"] == 1  # the defaults' 3, switched by the config
    page = (tmp_path / "docs" / "ablation.md").read_text()
    assert "--config no_n_step" in page and "--threads 1 --n-step 1 --env Pendulum-v1" in page
    assert "| 5 | 200 |" in page
    refused = confirm(tmp_path, "--name", "ablation", "--seeds", "5", "--config", "no_such_thing")
    assert refused.returncode == 2 and "invalid choice" in refused.stderr and "Traceback" not in refused.stderr


def test_ctrl_c_stops_the_runs_at_a_checkpoint_in_one_line_and_the_same_command_resumes_them(tmp_path: Path):
    # Ctrl-C in a terminal reaches the whole process group: the study and its train.py runs.
    args = ("--name", "stopped", "--seeds", "6", "--train-args",
            f"{TINY} --eval-every 1000 --target-return 0 --total-steps 3000")
    # As from a terminal: a shell that starts pytest in the background hands it Ctrl-C ignored, and Python then
    # never raises KeyboardInterrupt in the study.
    study = subprocess.Popen(confirm_command(tmp_path, *args), cwd=tmp_path, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=ENV, start_new_session=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    log = tmp_path / "studies" / "stopped" / "defaults__seed6.log"
    deadline = time.monotonic() + 120
    while not (log.is_file() and "Ctrl-C" in log.read_text()) and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)  # into the first episodes, well before the 3,000-step budget
    os.killpg(study.pid, signal.SIGINT)
    _, stderr = study.communicate(timeout=120)
    assert study.returncode == 130 and stderr.count("\n") == 1, stderr
    assert "interrupted" in stderr and "the same command resumes them" in stderr
    saved = list((tmp_path / "studies" / "stopped" / "checkpoints" / "defaults__seed6").glob("step_*.pt"))
    assert len(saved) == 1 and 0 < read_checkpoint(saved[0])["training"]["global_step"] < 3000

    again = confirm(tmp_path, *args)
    assert again.returncode == 0, again.stderr
    assert "--resume defaults__seed6" in again.stdout
    record = json.loads((tmp_path / "docs" / "stopped.json").read_text())["defaults__seed6"]
    assert record["steps"] == 3000 and len(record["segments"]) == 2
    assert "| 6 | not solved (3,000) |" in (tmp_path / "docs" / "stopped.md").read_text()


def test_a_run_without_a_stop_is_shown_as_trained_to_its_budget_not_as_unsolved():
    from lab.confirm import row_cells
    record = {"seed": 0, "segments": [[0.0, 600.0]], "steps": 300_000, "updates": 299_050, "checks": [],
              "target": None, "target_episodes": 100, "std_errors": 2.0, "threshold": None, "unseen": [400.0, 500.0]}
    assert row_cells(record)[:6] == ["0", "no stop (300,000)", "299,050", "10.0", "none", "0"]
    assert row_cells(record)[8] == "-"  # no registered threshold to count the unseen episodes against
