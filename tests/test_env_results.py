"""lab.env_results: the table across envs from lab.head_to_head's pages, and the README block it keeps."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("matplotlib", reason="the lab tools plot with matplotlib: pip install -r requirements-study.txt")
from lab import env_results  # noqa: E402
from lab.env_results import (  # noqa: E402
    README_END, README_START, budget, measured_table, published_table, tables, update_readme, write_page,
)
from sac_model import SACError  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def run(algo: str, seed: int, minutes: float, unseen: list[float]) -> dict:
    return {"algo": algo, "seed": seed, "minutes": minutes, "unseen": unseen,
            "evaluations": [[5000, 100.0 * seed, 1.0], [10000, 200.0 * seed, 1.0]]}


@pytest.fixture
def pages(tmp_path: Path) -> Path:
    """A Hopper page with three seeds of ours and two of the peer (seeds 0 and 2), and no page for the rest."""
    rows = [run("ours", 0, 50.0, [2000.0, 3000.0]), run("ours", 1, 60.0, [1000.0, 1000.0]),
            run("ours", 2, 70.0, [3000.0, 3000.0]), run("sac", 0, 150.0, [1500.0, 1500.0]),
            run("sac", 2, 100.0, [500.0, 700.0])]
    (tmp_path / "head_to_head_Hopper-v5.json").write_text(
        json.dumps({"rows": {f"{r['algo']}/{r['seed']}": r for r in rows}}))
    return tmp_path


def test_each_env_gets_the_median_of_its_seeds_and_the_wall_time_ratio_on_shared_seeds(pages: Path):
    table = measured_table(pages)
    hopper = next(line for line in table if line.startswith("| Hopper-v5 |"))
    # ours 2500, 1000, 3000: median 2500; the peer 1500 and 600; wall time medians 60 and 125 min;
    # on the shared seeds 0 and 2 the peer's median 125 over ours' 60.
    assert hopper == ("| Hopper-v5 | 300k env steps | 0, 1, 2 | 2500.0 (1000.0 to 3000.0) | 60.0 | 0, 2 | "
                      "1050.0 (600.0 to 1500.0) | 125.0 | 2.08 (2 seeds) |")
    assert next(line for line in table if line.startswith("| Ant-v5 |")) == (
        "| Ant-v5 | 300k env steps | - | not run yet |  | - |  |  |  |")
    published = next(line for line in published_table(pages) if line.startswith("| Hopper-v5 |"))
    # 2500 / 2469, MR.Q's mean; its seeds range from 1499.7 to 3670.2
    assert published.startswith(
        "| Hopper-v5 | 2500.0 (1000.0 to 3000.0) | 2469 (1500 to 3670) | 1.01 | 2326 +/- 1130 @1M |")


def test_mrq_s_seeds_give_its_published_means():
    """The ten seeds per env, copied from MR.Q's results file, reproduce the means the field quotes for it."""
    means = {env.env: round(env.mrq_300k) for env in env_results.ENVS if env.mrq_300k is not None}
    assert means == {"Hopper-v5": 2469, "HalfCheetah-v5": 10835, "Walker2d-v5": 4509, "Ant-v5": 4674}
    assert all(len(env.mrq_300k_seeds) in (0, 10) for env in env_results.ENVS)


def test_a_ratio_on_one_shared_seed_says_seed_in_the_singular(tmp_path: Path):
    rows = [run("ours", 0, 50.0, [4000.0]), run("sac", 0, 150.0, [3000.0])]
    (tmp_path / "head_to_head_Walker2d-v5.json").write_text(
        json.dumps({"rows": {f"{r['algo']}/{r['seed']}": r for r in rows}}))
    walker = next(line for line in measured_table(tmp_path) if line.startswith("| Walker2d-v5 |"))
    assert walker.endswith("| 3.00 (1 seed) |")


def test_runs_on_different_cpus_give_no_wall_time_ratio(tmp_path: Path):
    rows = [{**run("ours", 0, 50.0, [300.0]), "cpu": "AMD EPYC"},
            {**run("sac", 0, 150.0, [280.0]), "cpu": "Intel Xeon", "cap": 200_000}]
    (tmp_path / "head_to_head_BipedalWalker-v3.json").write_text(
        json.dumps({"rows": {f"{r['algo']}/{r['seed']}": r for r in rows}}))
    bipedal = next(line for line in measured_table(tmp_path) if line.startswith("| BipedalWalker-v3 |"))
    # and a run capped below the env's budget (500k here) says where it stopped
    assert bipedal.endswith("| 0 (cap 200k) | 280.0 (280.0 to 280.0) | 150.0 | not on one CPU |")


def test_a_runs_budget_is_its_envs_preset():
    assert budget("LunarLanderContinuous-v3") == "until 260 (at most 300k)"
    assert budget("BipedalWalker-v3") == "until 300 (at most 500k)"
    assert budget("Walker2d-v5") == "300k env steps"


def test_the_page_and_the_readme_block_say_the_same(pages: Path, tmp_path: Path):
    page = tmp_path / "env_results.md"
    written = write_page(page, pages)
    assert written[1].stat().st_size > 10_000  # the curves: six panels
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\nbefore\n\n{README_START}\nstale\n{README_END}\n\nafter\n")
    update_readme(readme, pages)
    text = readme.read_text()
    block = "\n".join(tables(pages))
    assert block in text and block in page.read_text() and "stale" not in text
    assert text.startswith("# title\n\nbefore\n\n") and text.endswith(f"{README_END}\n\nafter\n")
    readme.write_text("# no markers\n")
    with pytest.raises(SACError, match="no .* markers"):
        update_readme(readme, pages)


def test_the_readme_holds_the_committed_pages_tables():
    """The README's block is the one the committed page was written with: both come from one command."""
    readme, page = (REPO / "README.md").read_text(), env_results.PAGE.read_text()
    block = readme[readme.index(README_START) + len(README_START):readme.index(README_END)].strip()
    assert block and block in page
