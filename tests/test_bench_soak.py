"""The soak benchmark's figures (bench/soak.py): rows/s and peak RSS per third of the shard phase,
from manifest entries and memory samples, as the bench computes them after a run."""

from __future__ import annotations

import pytest

from bench.soak import thirds


def entry(start: float, seconds: float, rows: int) -> dict:
    return {"started_at": start, "seconds": seconds, "kept": rows - rows // 4, "rejected": rows // 4}


def test_rows_spread_over_each_shards_span_and_memory_peaks_per_third() -> None:
    # two workers from t=100 to t=130: one shard of 300 rows over all of it, three of 100 rows in turn
    entries = [entry(100, 30, 300), entry(100, 10, 100), entry(110, 10, 100), entry(120, 10, 100)]
    # (time, MB, the tree's CPU seconds so far): outside the shard phase (start-up, key pass) no peak counts
    timeline = [(95.0, 9000.0, 5.0), (100.0, 500.0, 10.0), (109.0, 700.0, 20.0), (110.0, 680.0, 30.0),
                (115.0, 650.0, 35.0), (120.0, 640.0, 50.0), (129.0, 720.0, 60.0), (130.0, 600.0, 90.0),
                (140.0, 9000.0, 99.0)]
    got = thirds(entries, timeline)
    assert got["shard_phase_s"] == 30
    assert (got["rows_per_s_start"], got["rows_per_s_middle"], got["rows_per_s_end"]) == (20, 20, 20)
    assert got["rows_per_s_tenths"] == [20] * 10
    assert (got["rss_mb_start"], got["rss_mb_middle"], got["rss_mb_end"]) == (700, 680, 720)
    assert got["rss_flat"] == pytest.approx(720 / 680, abs=1e-3)
    # 200 rows a third for 20, 20 and 40 CPU seconds: the last third did twice the work per row
    assert (got["rows_per_cpu_s_start"], got["rows_per_cpu_s_middle"], got["rows_per_cpu_s_end"]) == (10, 10, 5)


def test_a_stall_shows_in_its_window_only() -> None:
    entries = [entry(0, 10, 100), entry(10, 20, 100), entry(30, 10, 100)]  # the middle shard twice as slow
    got = thirds(entries, [(0.0, 1.0, 0.0), (20.0, 1.0, 20.0), (40.0, 1.0, 40.0)])
    assert got["rows_per_s_middle"] < got["rows_per_s_start"] == got["rows_per_s_end"]
    assert got["rows_per_s_start"] == pytest.approx((100 + 100 * 3.33 / 20) / 13.33, rel=1e-2)
    assert got["rss_flat"] == 1
