"""``pocketseg bench`` (pocketseg.benchmarks.bench) and the report writers (pocketseg.benchmarks.report).

The end-to-end runs use the tiny package and one 128x128x20 synthetic case on one
thread; the cold and warm runs are made once per module and shared by the tests.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path

import fake_cupy
import nibabel as nib
import numpy as np
import pytest

from pocketseg.benchmarks import bench as B
from pocketseg.atomic import check_targets
from pocketseg.benchmarks import report as R
from pocketseg.cli import main
from pocketseg.errors import InputError, MissingDependencyError, OutputError
from pocketseg.nifti import read_nifti
from pocketseg.runtime.engines import probe_backends
from pocketseg.volume import Volume

pytest.importorskip("onnxruntime", reason="onnxruntime (extra 'runtime') is not installed")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SIZE = "128x128x20"


# ------------------------------------------------------------------------------------------------ cases and boxes

def test_parse_sizes():
    assert B.parse_sizes(None) == tuple((512, 512, n) for n in (55, 100, 150, 215, 334, 448, 499, 554))
    assert B.parse_sizes("128x128x20, 512×512×55,128x128x20") == ((128, 128, 20), (512, 512, 55))
    assert B.parse_sizes([(96, 96, 8)]) == ((96, 96, 8),)
    for bad in ("512x256x10", "abc", "0x0x0", "512x512", "", "32x32x5"):
        with pytest.raises(InputError):
            B.parse_sizes(bad)


def test_synthetic_cases_are_written_once_and_reused(tmp_path):
    cases = B.synthetic_cases(tmp_path, "96x96x8", progress=False)
    (case,) = cases
    assert case.name == "bench_96x96x8" and case.size == "96 × 96 × 8"
    assert nib.load(case.image).shape == (96, 96, 8) and nib.load(case.labels).shape == (96, 96, 8)
    stamp = case.image.stat().st_mtime_ns
    assert B.synthetic_cases(tmp_path, "96x96x8", progress=False)[0].image.stat().st_mtime_ns == stamp
    # Another seed is another case: made again.
    B.synthetic_cases(tmp_path, "96x96x8", seed=1, progress=False)
    assert json.loads((tmp_path / "cases.json").read_text())["bench_96x96x8"]["seed"] == 1
    found = B.folder_cases(tmp_path / "imagesTr")  # labels found in the sibling labelsTr
    assert [(c.name, c.labels) for c in found] == [(case.name, case.labels)]


def test_roi_box_from_labels_is_the_canonical_box_plus_the_margin():
    labels = np.zeros((20, 30, 10), dtype=np.uint8)  # (i, j, k) on a RAS grid: canonical (z, y, x) = (k, j, i)
    labels[5:10, 10:15, 2:5] = 3
    ras = Volume(labels, np.diag([1.0, 1.0, 2.0, 1.0]))
    assert B.roi_box_from_labels(ras, 2.0) == ((1, 6), (8, 17), (3, 12))
    assert B.roi_box_from_labels(ras, 100.0) == ((0, 10), (0, 30), (0, 20))  # clipped to the volume
    # Stored flipped along i (LAS): the same anatomy, so the same canonical box.
    las = Volume(labels[::-1].copy(), np.array([[-1.0, 0, 0, 19], [0, 1, 0, 0], [0, 0, 2, 0], [0, 0, 0, 1]]))
    assert B.roi_box_from_labels(las, 2.0) == ((1, 6), (8, 17), (3, 12))
    with pytest.raises(InputError, match="no labels"):
        B.roi_box_from_labels(Volume(np.zeros((4, 4, 4), np.uint8), np.eye(4)), 2.0)


def test_label_agreement():
    a = np.zeros((4, 4, 4), np.uint8)
    b = a.copy()
    a[0, :2] = 1        # 8 voxels of liver
    b[0, :1] = 1        # 4 of them
    a[3, 3, 3] = 2
    agreement = B.label_agreement(a, b)
    assert agreement["voxel_agreement"] == pytest.approx(1 - 5 / 64)
    assert agreement["dice"]["Liver"] == pytest.approx(2 * 4 / 12)
    assert agreement["dice"]["Right kidney"] == 0.0
    assert agreement["dice"]["Spleen"] is None  # in neither map
    assert agreement["mean_dice"] == pytest.approx((2 * 4 / 12 + 0.0) / 2)
    assert B.label_agreement(a, a)["voxel_agreement"] == 1.0


# ------------------------------------------------------------------------------------------------ report writers

def _fake_result(with_comparison: bool = True) -> dict:
    def run(pipeline, mode, time_s, used):
        trace = {"source": "proc", "interval_s": 0.1, "samples": len(used), "baseline_mb": 10.0, "max_mb": max(used),
                 "auc_mb_s": sum(used) * 0.1, "max_above_baseline_mb": max(used) - 10,
                 "auc_above_baseline_mb_s": sum(u - 10 for u in used) * 0.1,
                 "times_s": [0.1 * i for i in range(len(used))], "used_mb": used}
        return {"case": "c1", "pipeline": pipeline, "mode": mode, "status": "ok", "time_s": time_s, "load_s": 0.5,
                "read_s": 0.1, "predict_s": time_s - 0.3, "write_s": 0.1, "stages_s": {"roi": 0.2, "detail": 0.3},
                "memory": trace, "backend": "onnxruntime", "precision": "fp32"}

    result = {"model": "pkg", "model_presets": {"roi": "roi-tiny", "detail": "detail-tiny"}, "device": "cpu",
              "backend": "onnxruntime", "precision": "fp32", "roi_margin_mm": 20.0,
              "machine": {"platform": "Linux", "cpus": 2, "load_average_start": [1.0, 1, 1],
                          "load_average_end": [2.0, 1, 1]},
              "memory": {"source": "proc", "description": "process RSS", "interval_s": 0.1, "baseline": "0"},
              "settings": {"roi_from_labels": True, "warmup": True},
              "cases": [{"case": "c1", "size": "128 × 128 × 20", "shape_ijk": [128, 128, 20],
                         "roi_box_zyx": [[0, 20], [1, 100], [2, 120]]}],
              "runs": [run("pocketseg", "cold", 2.0, [20.0, 60.0, 40.0]), run("nnunet", "cold", 6.0, [30.0, 90.0])],
              "compare": "nnunet" if with_comparison else None}
    if with_comparison:
        result["comparison"] = [{"case": "c1", "size": "128 × 128 × 20", "time_ratio_cold": 3.0,
                                 "memory_ratio_cold": 60 / 90, "voxel_agreement_pct": 99.5, "mean_dice_pct": 97.0,
                                 "dice": {"Liver": 0.97, "Spleen": None}}]
    return result


def test_markdown_and_csv_share_the_columns():
    cols = (R.Column("name", "Name"), R.Column("value", "Value (s)", ".2f", "right"))
    rows = [{"name": "a|b", "value": 1.23456}, {"name": "c", "value": None}]
    md = R.markdown_table(rows, cols).splitlines()
    assert md[0] == "| Name | Value (s) |" and md[1] == "|:--|--:|"
    assert md[2] == "| a\\|b | 1.23 |" and md[3] == "| c | — |"
    parsed = list(csv.reader(io.StringIO(R.csv_text(rows, cols))))
    assert parsed[0] == ["name", "value"] and parsed[1] == ["a|b", "1.23456"] and parsed[2] == ["c", ""]


def test_bench_report_files(tmp_path):
    pytest.importorskip("matplotlib")
    result = _fake_result()
    files = R.write_bench_report(result, tmp_path)
    assert set(files) == {"markdown", "csv", "json", "plot"}
    assert (tmp_path / "memory.png").read_bytes()[:8] == PNG_MAGIC
    rows = list(csv.DictReader(io.StringIO((tmp_path / "bench.csv").read_text())))
    assert list(rows[0]) == [c.key for c in R.RUN_CSV_COLUMNS]
    for key in ("case", "size", "time_s", "max_mb", "auc_mb_s", "max_above_baseline_mb", "auc_above_baseline_mb_s"):
        assert key in rows[0]
    assert [(r["pipeline"], float(r["auc_mb_s"])) for r in rows] == [("pocketseg", pytest.approx(12.0)),
                                                                     ("nnunet", pytest.approx(12.0))]
    assert json.loads((tmp_path / "bench.json").read_text())["runs"][0]["memory"]["used_mb"] == [20.0, 60.0, 40.0]
    md = (tmp_path / "bench.md").read_text()
    header = "| " + " | ".join(c.header for c in R.RUN_COLUMNS) + " |"
    assert header in md and "| c1 | 128 × 128 × 20 | pocketseg | cold | 2.00 | 60 | 12 |" in md
    assert "ROI stage was *skipped*" in md and "nnU-Net" in md and "![memory-time curves](memory.png)" in md
    assert "| Liver | 97.00 |" in md and "| Spleen | — |" in md
    with pytest.raises(OutputError, match="--overwrite"):
        check_targets([tmp_path / "bench.md"], overwrite=False)
    with pytest.raises(OutputError):
        R.write_bench_report(_fake_result(), tmp_path)
    R.write_bench_report(_fake_result(with_comparison=False), tmp_path, overwrite=True)
    assert "Comparison" not in (tmp_path / "bench.md").read_text()


def test_demo_report_links_previews_and_includes_tables(tmp_path):
    pytest.importorskip("matplotlib")
    previews, predictions, evaluation, bench = (tmp_path / n for n in ("previews", "pred", "eval", "bench"))
    for folder in (previews, predictions, evaluation):
        folder.mkdir()
    (previews / "case1.png").write_bytes(PNG_MAGIC)
    (predictions / "case9.png").write_bytes(PNG_MAGIC)
    (evaluation / "table.md").write_text("| Target | DSC (%) |\n|:--|--:|\n| Liver | 1.00 |\n")
    R.write_bench_report(_fake_result(), bench)
    out = R.write_demo_report(tmp_path / "report" / "demo.md", previews=previews, predictions=predictions,
                              evaluation=evaluation, bench=bench)
    text = out.read_text()
    assert "![case1](../previews/case1.png)" in text and "![case9](../pred/case9.png)" in text
    assert "| Liver | 1.00 |" in text and "| c1 | 128 × 128 × 20 | pocketseg | cold |" in text
    assert "![memory-time curves](../bench/memory.png)" in text
    with pytest.raises(OutputError):
        R.write_demo_report(out, previews=previews)
    with pytest.raises(InputError, match="table.md"):
        R.write_demo_report(tmp_path / "x.md", evaluation=previews)


def test_demo_report_names_the_model_with_its_source(tmp_path):
    predictions = tmp_path / "pred"
    predictions.mkdir()
    (predictions / "case9.png").write_bytes(PNG_MAGIC)
    reference = Path(__file__).resolve().parents[1] / "models" / "reference"  # shipped in the repository
    text = R.write_demo_report(tmp_path / "demo.md", predictions=predictions, model=reference).read_text()
    assert "Held-out cases segmented by the model package" in text
    assert "not for real CT" in text and "synthetic phantoms" in text
    with pytest.raises(InputError, match="does not exist"):
        R.write_demo_report(tmp_path / "other.md", predictions=predictions, model=tmp_path / "nothing")


# ------------------------------------------------------------------------------------------------ end to end

@pytest.fixture(scope="module")
def bench_run(tiny_package, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "out"
    result = B.run_bench(tiny_package, out, device="cpu", sizes=SIZE, threads=1, progress=False)
    return out, result


def test_bench_cold_and_warm_on_the_cpu(bench_run):
    out, result = bench_run
    cpu_auto = "openvino" if "cpu" in probe_backends(import_torch=False)["openvino"].devices else "onnxruntime"
    assert result["device"] == "cpu" and result["backend"] == cpu_auto
    assert [(r["pipeline"], r["mode"], r["status"]) for r in result["runs"]] == [("pocketseg", "cold", "ok"),
                                                                                  ("pocketseg", "warm", "ok")]
    cold, warm = result["runs"]
    # Cold: the whole fresh process, so more than the work inside it; its memory is the child's RSS.
    assert cold["time_s"] > cold["in_process_s"] > 0 and cold["load_s"] > 0
    assert cold["memory"]["source"] == "proc" and cold["memory"]["baseline_mb"] == 0.0
    # The sampled curve is the child's own (not its parent's, nor a sum): about the process's own peak (VmHWM).
    # The kernel refreshes its high-water mark lazily (not when memory is handed back with madvise), so a
    # sampled reading may pass it by a few per cent (3.5 % seen).
    assert 30 < cold["memory"]["max_mb"] <= cold["peak_rss_mb"] * 1.1 + 5
    # Warm: the loaded process measures itself; its baseline is the idle loaded process.
    assert warm["time_s"] > 0 and warm["memory"]["baseline_mb"] > 30
    assert warm["memory"]["max_mb"] >= warm["memory"]["baseline_mb"]
    for run in (cold, warm):
        memory = run["memory"]
        assert memory["auc_mb_s"] == pytest.approx(sum(memory["used_mb"]) * 0.1, rel=1e-3)
        labels = read_nifti(run["labels"])
        assert labels.shape == (128, 128, 20) and labels.data.dtype == np.uint8
    assert np.array_equal(read_nifti(cold["labels"]).data, read_nifti(warm["labels"]).data)
    assert json.loads((out / R.BENCH_FILES["json"]).read_text())["runs"] == json.loads(json.dumps(result["runs"]))
    assert (out / R.BENCH_FILES["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = list(csv.DictReader(io.StringIO((out / R.BENCH_FILES["csv"]).read_text())))
    assert [(r["case"], r["mode"]) for r in rows] == [("bench_128x128x20", "cold"), ("bench_128x128x20", "warm")]
    case = read_nifti(out / "cases" / "imagesTr" / "bench_128x128x20_0000.nii.gz")
    assert case.shape == (128, 128, 20) and float(case.data.min()) < -500  # a CT phantom: air in HU
    md = (out / "bench.md").read_text()
    assert "| bench_128x128x20 | 128 × 128 × 20 | pocketseg | cold |" in md and "ROI stage was" not in md


def test_bench_refuses_to_replace_a_report_before_doing_any_work(bench_run, tiny_package):
    out, _ = bench_run
    before = (out / "bench.json").stat().st_mtime_ns
    with pytest.raises(OutputError, match="bench.md.*--overwrite"):
        B.run_bench(tiny_package, out, device="cpu", sizes=SIZE, threads=1, progress=False)
    assert (out / "bench.json").stat().st_mtime_ns == before
    assert main(["-q", "bench", "-m", str(tiny_package), "-o", str(out), "--device", "cpu", "--sizes", SIZE]) == 2


def test_bench_input_errors(tiny_package, tmp_path, monkeypatch):
    with pytest.raises(InputError, match="not both"):
        B.run_bench(tiny_package, tmp_path / "a", sizes=SIZE, cases=tmp_path, progress=False)
    with pytest.raises(InputError, match="nothing to run"):
        B.run_bench(tiny_package, tmp_path / "a", sizes=SIZE, cold=False, warm=False, progress=False)
    with pytest.raises(InputError, match="compare"):
        B.run_bench(tiny_package, tmp_path / "a", sizes=SIZE, compare="totalsegmentator", progress=False)
    # nnU-Net is an optional benchmark dependency: one clear error, before any work.
    monkeypatch.setitem(sys.modules, "nnunetv2", None)
    with pytest.raises(MissingDependencyError, match=r"pip install 'pocketseg\[peers\]'"):
        B.run_bench(tiny_package, tmp_path / "b", sizes=SIZE, compare="nnunet", progress=False)
    assert not (tmp_path / "b").exists()
    # Flags of the timing run are refused with --backends, not ignored.
    assert main(["-q", "bench", "--backends", "--compare", "nnunet", "-m", str(tiny_package), "-o",
                 str(tmp_path / "c")]) == 2


def test_roi_from_labels_through_the_cli(tiny_package, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["-q", "bench", "-m", str(tiny_package), "-o", str(out), "--device", "cpu", "--sizes", SIZE,
                 "--roi-from-labels", "--no-cold", "--no-warmup", "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    assert "| bench_128x128x20 |" in printed and str(out / "bench.md") in printed
    result = json.loads((out / "bench.json").read_text())
    assert result["settings"]["roi_from_labels"] and not result["settings"]["warmup"]
    (run,) = result["runs"]
    assert run["mode"] == "warm" and run["status"] == "ok"
    (z0, z1), (y0, y1), (x0, x1) = box = result["cases"][0]["roi_box_zyx"]
    manifest_margin = result["roi_margin_mm"]
    truth = read_nifti(out / "cases" / "labelsTr" / "bench_128x128x20.nii.gz")
    assert box == [list(b) for b in B.roi_box_from_labels(truth, manifest_margin)]
    assert run["stages_s"]["roi"] < 0.05  # the ROI stage was skipped
    from pocketseg.geometry import canonical_grid

    grid = canonical_grid(truth.affine, truth.shape)
    labels = grid.to_zyx(read_nifti(run["labels"]).data)
    inside = np.zeros(labels.shape, bool)
    inside[z0:z1, y0:y1, x0:x1] = True
    assert not labels[~inside].any()
    assert "ROI stage was *skipped*" in (out / "bench.md").read_text()


@pytest.mark.slow  # two worker processes, one importing torch and nnU-Net (about 10 s on 2 cores)
def test_compare_nnunet_same_box_small(tiny_package, tmp_path):
    pytest.importorskip("nnunetv2", reason="nnU-Net v2 (extra 'peers') is not installed")
    result = B.run_bench(tiny_package, tmp_path / "out", device="cpu", sizes=SIZE, compare="nnunet",
                         roi_from_labels=True, cold=False, warmup=False, threads=1, progress=False)
    assert [(r["pipeline"], r["status"]) for r in result["runs"]] == [("pocketseg", "ok"), ("nnunet", "ok")]
    (row,) = result["comparison"]
    assert row["time_ratio_warm"] > 0 and row["memory_ratio_warm"] > 0 and "time_ratio_cold" not in row
    assert 0.5 < row["voxel_agreement"] <= 1.0 and set(row["dice"]) >= {"Liver", "Tumor"}
    # Both pipelines segmented the same crop: nothing outside the box.
    box = result["cases"][0]["roi_box_zyx"]
    truth = read_nifti(result["cases"][0]["labels"])
    from pocketseg.geometry import canonical_grid

    grid = canonical_grid(truth.affine, truth.shape)
    peer = grid.to_zyx(read_nifti(result["runs"][1]["labels"]).data)
    inside = np.zeros(peer.shape, bool)
    inside[tuple(slice(a, b) for a, b in box)] = True
    assert not peer[~inside].any()
    assert "Comparison with nnU-Net v2" in (Path(result["files"]["markdown"])).read_text()


def test_flags_map_to_function_keywords():
    import inspect

    from pocketseg.benchmarks.backends import benchmark_backends
    from pocketseg.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    flags = {a.dest for a in sub.choices["bench"]._actions} - {"help", "verbose", "quiet"}
    assert flags - {"backends"} == set(inspect.signature(B.run_bench).parameters) - {"progress"}
    timing_only = {"backend", "precision", "compare", "cold", "warm"}
    assert flags - {"backends"} - timing_only == set(inspect.signature(benchmark_backends).parameters) - {"progress"}
    report_flags = {a.dest for a in sub.choices["demo-report"]._actions} - {"help", "verbose", "quiet"}
    assert report_flags == set(inspect.signature(R.write_demo_report).parameters)


def test_release_between_cases_frees_every_engine_cache_not_only_cupys(tiny_package):
    """The warm worker's release: the predictor's hook, which reaches each engine (torch's cache, ONNX Runtime's
    arena) before CuPy's pool, so every backend's row starts its cases from the same idle baseline."""
    pipeline = B._Pipeline({"pipeline": "pocketseg", "device": "cpu", "model": str(tiny_package),
                            "backend": "onnxruntime", "precision": "fp32"})
    freed = []
    for nets in pipeline.impl.networks.values():
        for engine in nets.engines:
            engine.free_cached_memory = lambda engine=engine: freed.append(engine)
    gpu = fake_cupy.fake_gpu_module()  # counts the frees of (a stand-in for) CuPy's pool
    pipeline.impl.am = gpu
    pipeline.release()
    assert len(freed) == sum(len(n.engines) for n in pipeline.impl.networks.values()) >= 2
    assert gpu.xp.pool.freed == 1
