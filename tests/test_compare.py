"""lab.compare on results files written by hand: the cells, the counts and the pre-registered verdicts."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib", reason="the lab tools plot with matplotlib: pip install -r requirements-study.txt")
from lab.compare import main, sign_test  # noqa: E402
from lab.provenance import provenance  # noqa: E402
from lab.records import solved_at, wall_minutes  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def record(seed: int, steps: int, solved: bool, unseen: float = 230.0, last_check: float = 250.0) -> dict:
    # mean - 2 standard errors of 100 episodes with std 50 is mean - 10: 250 passes a target of 200, 150 does not.
    return {"seed": seed, "segments": [[0.0, 600.0]], "steps": steps, "cap": 300_000,
            "checks": [[steps, last_check if solved else 150.0, 50.0]], "target": 200.0, "std_errors": 2.0,
            "target_episodes": 100, "unseen": [unseen] * 4}


def write_study(docs: Path, name: str, label: str, records: list[dict]) -> None:
    docs.mkdir(exist_ok=True)
    (docs / f"{name}.json").write_text(json.dumps({f"{label}__seed{r['seed']}": r for r in records}))


def test_sign_test_matches_the_binomial_tail():
    assert sign_test(5, 5) == pytest.approx(1 / 32) and sign_test(4, 5) == pytest.approx(6 / 32)


def test_a_record_is_solved_at_its_last_check_by_train_pys_rule():
    # The last check's mean minus 2 standard errors of 100 episodes (std 50): 210 - 10 reaches 200, 209 - 10 not.
    assert solved_at(record(1, 50_000, True, last_check=210.0)) == 50_000
    assert solved_at(record(1, 50_000, True, last_check=209.0)) is None
    assert solved_at({**record(1, 50_000, True), "std_errors": 0.0, "checks": [[9, 200.0, 50.0]]}) == 9
    assert solved_at({**record(1, 50_000, True), "target": None}) is None  # no target: never solved
    assert solved_at({**record(1, 50_000, True), "checks": []}) is None
    assert wall_minutes({"segments": [[0.0, 600.0], [1000.0, 1060.0]]}) == 11.0


def test_each_configuration_is_judged_against_the_defaults_seed_by_seed(tmp_path: Path):
    seeds = range(40, 45)
    write_study(tmp_path, "base", "defaults", [record(s, 50_000, True) for s in seeds])
    write_study(tmp_path, "faster", "with_per", [record(s, 40_000, True) for s in seeds])
    write_study(tmp_path, "never", "no_n_step", [record(s, 300_000, False) for s in seeds])
    mixed = [record(40, 40_000, True), record(41, 60_000, True), record(42, 40_000, True),
             record(43, 300_000, False), record(44, 49_000, True)]
    write_study(tmp_path, "mixed", "with_lr_schedule", mixed)
    # Seed 45 is finished by one study only: it is left out of every row.
    write_study(tmp_path, "faster", "with_per", [record(s, 40_000, True) for s in [*seeds, 45]])

    assert main(["--name", "cmp", "--seeds", "40-44", "--baseline", "base", "--docs-dir", str(tmp_path),
                 "with_per=faster", "no_n_step=never", "with_lr_schedule=mixed"]) == 0
    page = (tmp_path / "cmp.md").read_text()
    assert page.splitlines()[2] == provenance()  # under the title: this checkout's commit and this machine
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ") for line in page.splitlines()
            if line.startswith("| ") and "__" not in line and not line.startswith("| ---")}
    assert "Seeds finished by every study: 40, 41, 42, 43, 44 (of 5)" in page
    assert rows["defaults"][2] == "50,000 (230)" and rows["defaults"][7] == "5 of 5"
    assert rows["with_per"][8] == "40,000" and rows["with_per"][-1] == "with_per paid (5 of 5, sign test p = 0.031) |"
    assert rows["no_n_step"][2] == "unsolved at 300,000 (230)" and rows["no_n_step"][8] == "not reached"
    assert rows["no_n_step"][-1] == "the defaults' choice paid (5 of 5, sign test p = 0.031) |"
    assert rows["with_lr_schedule"][-2] == "3 of 5"
    assert rows["with_lr_schedule"][-1] == "no difference shown by 5 seeds |"
    # Seed by seed, steps over the defaults': 0.8 everywhere; 0.8, 1.2, 0.8, never, 0.98; never everywhere.
    assert (rows["defaults"][9], rows["with_per"][9], rows["with_lr_schedule"][9], rows["no_n_step"][9]) == (
        "-", "0.80", "0.98", "not reached")

    # While a seed is unfinished somewhere, there is no verdict: the rule was set for all five.
    assert main(["--name", "cmp", "--seeds", "40-45", "--baseline", "faster", "--docs-dir", str(tmp_path),
                 "no_n_step=never"]) == 0
    page = (tmp_path / "cmp.md").read_text()
    assert "| pending (5 of 6 seeds finished) |" in page and "--seeds 40-45 " in page


def test_a_study_without_results_is_one_line_and_exit_2(tmp_path: Path):
    result = subprocess.run([sys.executable, "-m", "lab.compare", "--name", "x", "--seeds", "1-2", "--baseline",
                             "missing", "--docs-dir", str(tmp_path), "a=b"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2 and "missing.json: no such results file" in result.stderr
    assert "Traceback" not in result.stderr
