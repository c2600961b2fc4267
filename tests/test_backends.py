"""The backend x precision table (pocketseg.benchmarks.backends) on the CPU, with the tiny package and one small case."""

from __future__ import annotations

import csv
import io
import json

import pytest

from pocketseg.benchmarks import backends as BK
from pocketseg.benchmarks.report import BACKEND_COLUMNS, BACKEND_FILES
from pocketseg.engine_build.targets import EXPORT_TARGETS
from pocketseg.errors import OutputError
from pocketseg.runtime.engines import BACKENDS, PRECISIONS

pytest.importorskip("onnxruntime", reason="onnxruntime (extra 'runtime') is not installed")

SIZE = "128x128x20"


def test_each_row_loads_a_target_of_the_export_table():
    names = {t.name for t in EXPORT_TARGETS}
    expected = {("torch", "fp32"): "torch", ("torch", "fp16"): "torch", ("onnxruntime", "fp32"): "onnx-fp32",
                ("onnxruntime", "fp16"): "onnx-fp16", ("tensorrt", "fp16"): "onnx-fp16",
                ("tensorrt", "fp32"): "onnx-fp32"}
    for backend in BACKENDS:
        for precision in PRECISIONS:
            target = BK.row_target(backend, precision)
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
    if torch_row["status"] == "ok":  # torch installed: the same nets, the same labels as ONNX Runtime
        assert torch_row["dsc_organ_mean"] == pytest.approx(ort["dsc_organ_mean"], abs=0.02)
    for name in BACKEND_FILES.values():
        assert (out / name).is_file()
    parsed = list(csv.DictReader(io.StringIO((out / "backends.csv").read_text())))
    assert list(parsed[0]) == [c.key for c in BACKEND_COLUMNS] and len(parsed) == 6
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
