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
    timeline = [(95.0, 9000.0), (101.0, 500.0), (109.0, 700.0), (115.0, 650.0), (125.0, 600.0), (129.0, 720.0),
                (140.0, 9000.0)]  # samples outside the shard phase (start-up, key pass) count for none
    got = thirds(entries, timeline)
    assert got["shard_phase_s"] == 30
    assert (got["rows_per_s_start"], got["rows_per_s_middle"], got["rows_per_s_end"]) == (20, 20, 20)
    assert got["rows_per_s_tenths"] == [20] * 10
    assert (got["rss_mb_start"], got["rss_mb_middle"], got["rss_mb_end"]) == (700, 650, 720)
    assert got["rss_flat"] == pytest.approx(720 / 650, abs=1e-3)


def test_a_stall_shows_in_its_window_only() -> None:
    entries = [entry(0, 10, 100), entry(10, 20, 100), entry(30, 10, 100)]  # the middle shard twice as slow
    got = thirds(entries, [(5.0, 1.0), (20.0, 1.0), (35.0, 1.0)])
    assert got["rows_per_s_middle"] < got["rows_per_s_start"] == got["rows_per_s_end"]
    assert got["rows_per_s_start"] == pytest.approx((100 + 100 * 3.33 / 20) / 13.33, rel=1e-2)
    assert got["rss_flat"] == 1
