"""The throughput model of docs/ray.md (``pocketseg.benchmarks.ray_throughput``); the measurement itself is run by
hand (it takes minutes), its figures are in docs/benchmarks.md."""

from __future__ import annotations

import pytest

pytest.importorskip("torch", reason="the benchmark builds an untrained package (extra 'train')")

from pocketseg.benchmarks.ray_throughput import model_table, throughput_per_hour  # noqa: E402


def test_workers_bound_overlaps_io_with_compute():
    r = throughput_per_hour(8, compute_s=10.0, io_s=4.0, mb_per_case=100.0, fs_mb_s=10_000.0)
    assert r["per_worker_s"] == 10.0 and r["cases_per_hour"] == pytest.approx(8 * 360) and r["limit"] == "workers"
    serial = throughput_per_hour(8, compute_s=10.0, io_s=4.0, mb_per_case=100.0, fs_mb_s=10_000.0, overlap=False)
    assert serial["cases_per_hour"] == pytest.approx(8 * 3600 / 14)
    io_bound = throughput_per_hour(1, compute_s=1.0, io_s=3.0, mb_per_case=100.0, fs_mb_s=10_000.0)
    assert io_bound["cases_per_hour"] == pytest.approx(1200)


def test_the_file_system_caps_many_gpus():
    r = throughput_per_hour(64, compute_s=2.0, io_s=1.5, mb_per_case=100.0, fs_mb_s=2000.0)
    assert r["workers_bound"] == pytest.approx(115_200) and r["cases_per_hour"] == pytest.approx(72_000)
    assert r["limit"] == "file system"
    rows = model_table([2.0, 10.0], [8, 64], io_s=1.5, mb_per_case=100.0, fs_mb_s=2000.0)
    assert [row["cases/hour"] for row in rows] == [14_400, 72_000, 2_880, 23_040]
