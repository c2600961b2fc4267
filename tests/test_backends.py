"""The backend x precision table (pocketseg.benchmarks.backends) on the CPU, with the tiny package and one small case."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from pocketseg import labels as L
from pocketseg.benchmarks import backends as BK
from pocketseg.benchmarks.report import BACKEND_COLUMNS, BACKEND_FILES
from pocketseg.engine_build.targets import EXPORT_TARGETS
from pocketseg.errors import OutputError
from pocketseg.nifti import read_nifti
from pocketseg.runtime.engines import BACKENDS, PRECISIONS

pytest.importorskip("onnxruntime", reason="onnxruntime (extra 'runtime') is not installed")

SIZE = "128x128x20"


def test_each_row_loads_a_target_of_the_export_table():
    names = {t.name for t in EXPORT_TARGETS}
    expected = {("torch", "fp32"): "torch", ("torch", "fp16"): "torch", ("onnxruntime", "fp32"): "onnx-fp32",
                ("onnxruntime", "fp16"): "onnx-fp16", ("tensorrt", "fp16"): "onnx-fp16",
                ("tensorrt", "fp32"): "onnx-fp32", ("openvino", "fp32"): "onnx-fp32", ("openvino", "bf16"): "onnx-fp32",
                ("openvino", "fp16"): "onnx-fp16", ("torch", "bf16"): "torch"}
    for backend in BACKENDS:
        for precision in PRECISIONS:
            target = BK.row_target(backend, precision)
            if (backend, precision) not in expected:  # bf16 runs through OpenVINO only: no file of its own
                assert target is None and precision == "bf16"
                continue
            assert target is not None and target.name in names
            assert target.name == expected[(backend, precision)]


@pytest.fixture(scope="module")
def table(tiny_package, tmp_path_factory):
    out = tmp_path_factory.mktemp("backends") / "out"
    return out, BK.benchmark_backends(tiny_package, out, device="cpu", sizes=SIZE, threads=1, progress=False)


def test_backend_table_on_the_cpu(table):
    out, result = table
    rows = {(r["backend"], r["precision"]): r for r in result["rows"]}
    assert list(rows) == [(b, p) for b in BACKENDS for p in PRECISIONS]  # every row, whatever happened
    ort = rows[("onnxruntime", "fp32")]
    assert ort["status"] == "ok" and ort["reason"] == "" and ort["target"] == "onnx-fp32"
    assert ort["model_mb"] > 0 and ort["time_s_per_case"] > 0 and 0.0 <= ort["dsc_organ_mean"] <= 1.0
    assert [c["case"] for c in ort["per_case"]] == ["bench_128x128x20"]
    for precision in PRECISIONS:
        row = rows[("tensorrt", precision)]
        assert row["status"] == "unavailable" and row["reason"]
    for backend in ("onnxruntime", "torch"):
        row = rows[(backend, "fp16")]
        assert row["status"] == "unavailable" and "fp16" in row["reason"]
    torch_row = rows[("torch", "fp32")]
    if torch_row["status"] == "ok":  # torch installed: the same nets (their labels agree, see test_cascade)
        assert torch_row["target"] == "torch" and torch_row["time_s_per_case"] > 0
    assert json.loads((out / BACKEND_FILES["json"]).read_text())["rows"] == json.loads(json.dumps(result["rows"]))
    md = (out / BACKEND_FILES["markdown"]).read_text()
    assert all(f"| {b} | {p} |" in md for b in BACKENDS for p in PRECISIONS)
    parsed = list(csv.DictReader(io.StringIO((out / "backends.csv").read_text())))
    assert list(parsed[0]) == [c.key for c in BACKEND_COLUMNS] and len(parsed) == len(BACKENDS) * len(PRECISIONS)
    assert json.loads((out / "backends.json").read_text())["device"] == "cpu"
    md = (out / "backends.md").read_text()
    assert "| onnxruntime | fp32 | onnx-fp32 | ok |" in md and "| tensorrt | fp16 | onnx-fp16 | unavailable |" in md


def test_a_failing_row_is_a_row_with_its_reason(tiny_package, tmp_path, monkeypatch):
    def broken(package, row, *args, **kwargs):
        raise RuntimeError(f"{row['backend']} exploded")

    monkeypatch.setattr(BK, "_run_row", broken)
    result = BK.benchmark_backends(tiny_package, tmp_path / "out", device="cpu", sizes=SIZE, progress=False)
    row = next(r for r in result["rows"] if (r["backend"], r["precision"]) == ("onnxruntime", "fp32"))
    assert row["status"] == "failed" and row["reason"] == "RuntimeError: onnxruntime exploded"
    with pytest.raises(OutputError, match="backends.md"):
        BK.benchmark_backends(tiny_package, tmp_path / "out", device="cpu", sizes=SIZE, progress=False)


class _KnownLabels:
    """A predictor that returns the case's ground truth (onnxruntime rows) or the ground truth without the liver
    (torch rows), so that the table's DSC must come out exactly as computed by hand."""

    load_time_s = 0.0

    def __init__(self, package, *, backend, **kwargs):
        self.backend = backend

    def predict(self, volume, roi_box_zyx=None):
        image = Path(volume.source)
        labels = np.asarray(read_nifti(image.parent.parent / "labelsTr" / image.name.replace("_0000", "")).data)
        labels = labels.astype(np.uint8).copy()
        if self.backend == "torch":
            labels[labels == 1] = 0
        return SimpleNamespace(labels=labels, timings_s={"total": 0.5})

    def close(self):
        pass


def test_the_table_scores_exactly_what_each_row_predicted(tiny_package, tmp_path, monkeypatch):
    monkeypatch.setattr(BK, "CascadePredictor", _KnownLabels)
    result = BK.benchmark_backends(tiny_package, tmp_path / "out", device="cpu", sizes=SIZE, threads=1,
                                   progress=False)
    rows = {(r["backend"], r["precision"]): r for r in result["rows"]}
    gt = np.asarray(read_nifti(tmp_path / "out" / "cases" / "labelsTr" / "bench_128x128x20.nii.gz").data)
    organs = [i for i in L.ORGAN_IDS if (gt == i).any()]
    assert 1 in organs and len(organs) >= 5, organs  # the phantom holds the liver and several other organs
    assert rows[("onnxruntime", "fp32")]["dsc_organ_mean"] == 1.0  # the ground truth itself
    if rows[("torch", "fp32")]["status"] == "ok":
        # Liver erased: DSC 0 for the liver, 1 for the 12 other organs (present, or absent from both maps).
        assert rows[("torch", "fp32")]["dsc_organ_mean"] == pytest.approx(12 / 13)
        assert rows[("torch", "fp32")]["nsd_organ_mean"] == pytest.approx(12 / 13)
