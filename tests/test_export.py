"""Export to a model package: ONNX parity with PyTorch, fp16 agreement, package contents, bad runs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pocketseg.engine_build.export import PARITY_TOL, check_parity, export_onnx, parity_patch
from pocketseg.trainer.package import export_package, load_run
from pocketseg.errors import InputError, OutputError
from pocketseg.manifest import Intensity, load_package
from pocketseg.trainer import checkpoint as ckpt
from pocketseg.runtime.network import PocketUNet
from pocketseg.trainer.presets import get_preset

pytest.importorskip("onnxruntime", reason="onnxruntime (extra 'export') is not installed")
from conftest import INTENSITY, make_run  # noqa: E402  (shared with the runtime tests)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return make_run(root / "roi", "roi", "roi-tiny"), make_run(root / "detail", "detail", "detail-tiny", seed=1)


def test_export_writes_a_verified_package(runs, tmp_path):
    out = export_package(*runs, tmp_path / "pkg", fp16=False)
    manifest = load_package(out)  # checksums verified
    report = json.loads((out / "export_report.json").read_text())
    for stage in ("roi", "detail"):
        assert report[stage]["fp32_max_abs_logit_diff"] <= PARITY_TOL  # tiny nets: logits of order 1
        assert report[stage]["fp32_argmax_agreement"] == 1.0
        files = manifest.stages[stage].files
        assert files == {"torch": f"{stage}.safetensors", "onnx-fp32": f"{stage}.onnx"}
    assert manifest.roi.num_classes == 2 and manifest.detail.num_classes == 15
    assert manifest.detail.intensity.mean == INTENSITY["mean"] and manifest.detail.patch_zyx == (16, 32, 32)
    # safetensors weights reload into the network without pickle and reproduce the checkpoint.
    from safetensors.torch import load_file

    weights = load_file(str(out / "detail.safetensors"))
    reference = ckpt.load_checkpoint(runs[1] / ckpt.LATEST)["model"]
    assert weights.keys() == reference.keys() and all(torch.equal(weights[k], reference[k]) for k in weights)


def test_the_package_records_its_sliding_window(runs, tmp_path):
    """The paper's tile step 1.0 by default; overlapping Gaussian-blended tiles where the exporter asks for them,
    which the runtime then uses unless its caller says otherwise; a bad overlap leaves no package."""
    from pocketseg.runtime.cascade import CascadePredictor

    plain = load_package(export_package(*runs, tmp_path / "plain", fp16=False, check=False))
    assert (plain.inference.overlap, plain.inference.gaussian) == (0.0, False)
    out = export_package(*runs, tmp_path / "overlap", fp16=False, check=False, overlap=0.5, gaussian=True)
    manifest = load_package(out)
    assert (manifest.inference.overlap, manifest.inference.gaussian) == (0.5, True)
    predictor = CascadePredictor(out, device="cpu", backend="onnxruntime")
    assert predictor.overlap == 0.5 and predictor.settings.gaussian
    assert CascadePredictor(out, device="cpu", backend="onnxruntime", overlap=0.0).overlap == 0.0
    with pytest.raises(InputError, match="overlap must be a fraction"):
        export_package(*runs, tmp_path / "bad", fp16=False, check=False, overlap=1.0)
    assert not (tmp_path / "bad").exists()


def test_onnx_has_dynamic_batch_and_matches_torch(runs, tmp_path):
    import onnx
    import onnxruntime as ort

    _, preset, net, _ = load_run(runs[1], "detail")
    path = tmp_path / "detail.onnx"
    export_onnx(net, preset.patch_zyx, path)
    model = onnx.load(str(path))
    assert model.opset_import[0].version >= 17
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch" and [d.dim_value for d in dims[1:]] == [1, 16, 32, 32]
    patch = parity_patch(Intensity(**INTENSITY), preset.spacing_mm_zyx, preset.patch_zyx)
    assert patch.shape == (16, 32, 32) and -3 < patch.mean() < 3 and patch.std() > 0.1  # real CT, normalised
    parity = check_parity(net, path, patch)
    assert parity["max_abs_logit_diff"] <= PARITY_TOL and parity["argmax_agreement"] == 1.0
    batch = np.stack([patch, patch[::-1].copy()])[:, None].astype(np.float32)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(["logits"], {"image": batch})[0]
    with torch.no_grad():
        ref = net(torch.from_numpy(batch)).numpy()
    assert got.shape == (2, 15, 16, 32, 32) and np.abs(got - ref).max() <= PARITY_TOL


def test_fp16_graph_is_in_the_package_and_checked(runs, tmp_path):
    import onnx

    from pocketseg.engine_build.fp16 import fp16_summary

    out = export_package(*runs, tmp_path / "pkg")
    manifest = load_package(out)
    report = json.loads((out / "export_report.json").read_text())
    for stage in ("roi", "detail"):
        assert manifest.stages[stage].files["onnx-fp16"] == f"{stage}_fp16.onnx"
        summary = fp16_summary(onnx.load(str(out / f"{stage}_fp16.onnx")))
        assert set(summary["float32_ops"]) == {"InstanceNormalization"}
        assert summary["inputs"] == {"image": "float16"} and summary["outputs"] == {"logits": "float16"}
        info = report[stage]
        assert info["onnx_fp16_bytes"] < 0.8 * info["onnx_fp32_bytes"]
        # Untrained (He-initialised) nets have near-tied logits; fp16 rounding flips only a few of them.
        assert info["fp16_argmax_agreement"] > 0.99
        assert info["fp16_verified"] == (info["fp16_argmax_agreement"] >= 0.999)


def test_strict_export_refuses_fp16_disagreement(runs, tmp_path, monkeypatch):
    import pocketseg.engine_build.export as E

    monkeypatch.setattr(E, "check_fp16", lambda *a, **k: {"argmax_agreement": 0.98, "max_abs_logit_diff": 0.5})
    with pytest.raises(E.ExportCheckError, match="fp16 ONNX agrees"):
        export_package(*runs, tmp_path / "pkg", strict=True)
    assert not (tmp_path / "pkg").exists()
    assert export_package(*runs, tmp_path / "pkg2").is_dir()  # the default keeps the package, with a warning


def test_bf16_agreement_is_measured_recorded_and_enforced(runs, tmp_path, monkeypatch, caplog):
    import pocketseg.engine_build.export as E

    agreement = {"roi": 0.9995, "detail": 0.9991}
    monkeypatch.setattr(E, "cpu_bf16_support", lambda: (True, "test: native bf16"))
    monkeypatch.setattr(E, "check_bf16", lambda path, patch: {"argmax_agreement": agreement[path.stem],
                                                              "max_abs_logit_diff": 0.01})
    out = export_package(*runs, tmp_path / "pkg", fp16=False, strict=True)
    manifest = load_package(out)
    assert {n: s.bf16_agreement for n, s in manifest.stages.items()} == agreement
    assert all(s.bf16_verified for s in manifest.stages.values())
    report = json.loads((out / "export_report.json").read_text())
    assert report["detail"]["bf16_argmax_agreement"] == 0.9991 and report["detail"]["bf16_verified"] is True

    agreement["detail"] = 0.98
    with pytest.raises(E.ExportCheckError, match="bf16 .OpenVINO. agrees with fp32 on 98.000 %"):
        export_package(*runs, tmp_path / "strict", fp16=False, strict=True)
    assert not (tmp_path / "strict").exists()
    with caplog.at_level("WARNING", logger="pocketseg.engine_build.export"):
        kept = load_package(export_package(*runs, tmp_path / "warned", fp16=False))
    assert kept.detail.bf16_agreement == 0.98 and not kept.detail.bf16_verified and "bf16" in caplog.text

    # Without native bf16 (or without OpenVINO) nothing is measured and the field stays empty.
    monkeypatch.setattr(E, "cpu_bf16_support", lambda: (False, "test: no BF16"))
    plain = load_package(export_package(*runs, tmp_path / "plain", fp16=False))
    assert all(s.bf16_agreement is None for s in plain.stages.values())


@pytest.mark.skipif(__import__("importlib.util").util.find_spec("openvino") is None, reason="openvino is not installed")
def test_check_bf16_measures_with_openvino(runs, tmp_path):
    from pocketseg.engine_build.export import check_bf16
    from pocketseg.runtime.engines import cpu_bf16_support

    if not cpu_bf16_support()[0]:
        pytest.skip("this CPU has no native bf16: " + cpu_bf16_support()[1])
    _, preset, net, _ = load_run(runs[1], "detail")
    export_onnx(net, preset.patch_zyx, tmp_path / "detail.onnx")
    result = check_bf16(tmp_path / "detail.onnx", parity_patch(Intensity(**INTENSITY), preset.spacing_mm_zyx,
                                                              preset.patch_zyx))
    # Untrained nets: near-tied logits, of which bf16's 8-bit mantissa flips a few per cent at most.
    assert 0.9 < result["argmax_agreement"] <= 1.0 and 0 < result["max_abs_logit_diff"] < 1.0


def test_parity_tolerance_scales_with_large_logits():
    from pocketseg.engine_build.export import parity_tolerance

    assert parity_tolerance(0.2) == PARITY_TOL and parity_tolerance(1.0) == PARITY_TOL
    assert parity_tolerance(11.0) == pytest.approx(11 * PARITY_TOL)


def test_bad_runs_and_outputs(runs, tmp_path):
    roi, detail = runs
    with pytest.raises(InputError, match="'detail' run, but the roi net"):
        export_package(detail, detail, tmp_path / "a", fp16=False)
    empty = tmp_path / "norun"
    empty.mkdir()
    with pytest.raises(InputError, match="not a pocketseg training run"):
        export_package(roi, empty, tmp_path / "b", fp16=False)
    nockpt = make_run(tmp_path / "nockpt", "detail", "detail-tiny")
    (nockpt / ckpt.LATEST).unlink()
    with pytest.raises(InputError, match="has no checkpoint"):
        export_package(roi, nockpt, tmp_path / "c", fp16=False)
    wrong = make_run(tmp_path / "wrong", "detail", "detail-tiny")
    state = ckpt.load_checkpoint(wrong / ckpt.LATEST)
    ckpt.save_checkpoint(wrong / ckpt.LATEST, {**state, "preset": "detail-cpu"})
    with pytest.raises(InputError, match="expected detail/detail-tiny"):
        export_package(roi, wrong, tmp_path / "d", fp16=False)
    mismatch = make_run(tmp_path / "mismatch", "detail", "detail-tiny")
    state = ckpt.load_checkpoint(mismatch / ckpt.LATEST)
    big = PocketUNet(get_preset("detail-cpu").unet_config(), deep_supervision=True).state_dict()
    ckpt.save_checkpoint(mismatch / ckpt.LATEST, {**state, "model": big})
    with pytest.raises(InputError, match="do not fit preset"):
        export_package(roi, mismatch, tmp_path / "e", fp16=False)
    broken = make_run(tmp_path / "broken", "detail", "detail-tiny")
    (broken / "config.json").write_text("{}")
    with pytest.raises(InputError, match="not a pocketseg run config"):
        export_package(roi, broken, tmp_path / "f", fp16=False)
    with pytest.raises(InputError, match="opset"):
        export_package(roi, detail, tmp_path / "g", opset=99)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputError):
        export_package(roi, detail, blocker / "pkg", fp16=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "file", "mismatch", "nockpt", "norun", "wrong"]


def test_failed_check_leaves_nothing(runs, tmp_path, monkeypatch):
    import pocketseg.engine_build.export as E

    monkeypatch.setattr(E, "check_parity", lambda *a, **k: {"max_abs_logit_diff": 0.5, "max_abs_logit": 20.0,
                                                            "argmax_agreement": 1.0})
    with pytest.raises(E.ExportCheckError, match="differs from PyTorch"):
        export_package(*runs, tmp_path / "pkg", fp16=False)
    assert list(tmp_path.iterdir()) == []
