"""lab.diagnose: the run-folder table's cells where nothing was logged."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
from torch.utils.tensorboard import SummaryWriter

pytest.importorskip("matplotlib", reason="the lab tools plot with matplotlib: pip install -r requirements-study.txt")
from lab.diagnose import window_rows  # noqa: E402


def test_a_window_without_an_evaluation_shows_a_dash_not_nan(tmp_path: Path):
    writer = SummaryWriter(str(tmp_path))
    for step, value in ((500, -50.0), (1500, 120.0)):  # one episode in each of two 1000-step windows
        writer.add_scalar("charts/episode_return", value, step)
        writer.add_scalar("charts/episode_length", 500, step)
        writer.add_scalar("charts/episode_time_limit", 0, step)
        writer.add_scalar("charts/alpha", 0.1, step)
    writer.add_scalar("eval/return_mean", 7.0, 1500)  # only the second window was evaluated
    writer.close()
    first, second = window_rows(tmp_path, 1000, -100.0, 1000)
    assert first[0] == "0-1k" and first[6] == "0.100" and first[7:] == ["-", "-", "-"]
    assert second[-1] == "7.0"
    assert not any(math.isnan(float(c)) for row in (first, second) for c in row[1:3])
