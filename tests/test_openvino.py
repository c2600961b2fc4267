"""The OpenVINO backend (CPU): labels against ONNX Runtime, the pinned precision, the compiled-model cache, what
``auto`` picks and why, and the bf16 rules (native bf16 only, verified agreement for ``auto``).

Most tests use the tiny package of conftest (``tiny_package``): He-initialised, untrained nets, whose near-tied
logits make agreement the harder case. The whole pipeline with trained nets runs on the imported nnU-Net fixture
(``fixtures/nnunet_tiny``).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import pytest

from pocketseg.benchmarks.nnunet_parity import PRESETS, phantom_cases
from pocketseg.engine_build.export import parity_patch
from pocketseg.engine_build.nnunet_import import import_nnunet
from pocketseg.imageio import load_volume
from pocketseg.runtime.cascade import CascadePredictor
from pocketseg.errors import InputError
from pocketseg.manifest import load_package
from pocketseg.runtime import engines
from pocketseg.runtime.arrays import cuda_available

pytest.importorskip("openvino", reason="openvino (extra 'openvino') is not installed")
pytest.importorskip("onnxruntime", reason="onnxruntime (extra 'runtime') is not installed")

no_gpu = pytest.mark.skipif(cuda_available()[0], reason="this test describes a machine without a usable GPU")
NATIVE = (True, "test: the CPU computes bf16 natively")
NOT_NATIVE = (False, "test: no BF16 in the CPU's capabilities")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """OpenVINO's cache folder for one test (never the user's own)."""
    folder = tmp_path / "ov-cache"
    monkeypatch.setenv(engines.OPENVINO_CACHE_ENV, str(folder))
    return folder


def _patches(stage) -> np.ndarray:
    """Two realistic inputs (normalised synthetic CT at the stage's spacing, as the export checks use), batched."""
    return np.stack([parity_patch(stage.intensity, stage.spacing_mm_zyx, stage.patch_zyx, seed=s)
                     for s in (0, 1)])[:, None].astype(np.float32)


def _selection(backend: str, precision: str) -> engines.Selection:
    return engines.Selection(backend, "cpu", precision, "test")


def _with_bf16(manifest, agreement: float | None):
    stages = {n: dataclasses.replace(s, bf16_agreement=agreement) for n, s in manifest.stages.items()}
    return dataclasses.replace(manifest, stages=stages)


def test_openvino_fp32_labels_agree_with_onnxruntime(tiny_package, cache):
    manifest = load_package(tiny_package)
    for stage in manifest.stages.values():
        x = _patches(stage)
        ov = engines.open_engine(tiny_package, stage, _selection("openvino", "fp32"), threads=2)
        ort = engines.open_engine(tiny_package, stage, _selection("onnxruntime", "fp32"), threads=2)
        got, ref = ov(x), ort(x)
        assert isinstance(ov, engines.OpenVinoEngine) and got.shape == ref.shape == (2, stage.num_classes,
                                                                                    *stage.patch_zyx)
        assert got.dtype == np.float32
        assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.9999
        assert np.abs(got - ref).max() <= 1e-3 * max(1.0, float(np.abs(ref).max()))


def test_precision_is_pinned_and_read_back(tiny_package, cache):
    manifest = load_package(tiny_package)
    path = tiny_package / manifest.detail.files["onnx-fp32"]
    compiled = engines.compile_openvino(path, "fp32")
    assert compiled.get_property("INFERENCE_PRECISION_HINT").to_string() == "f32"
    engine = engines.open_engine(tiny_package, manifest.detail, _selection("openvino", "fp32"), threads=1)
    assert engine.compiled.get_property("INFERENCE_PRECISION_HINT").to_string() == "f32"
    assert engine.compiled.get_property("INFERENCE_NUM_THREADS") == 1
    assert str(engine.compiled.get_property("PERFORMANCE_HINT")).endswith("LATENCY")
    if engines.cpu_bf16_support()[0]:
        bf16 = engines.compile_openvino(path, "bf16")
        assert bf16.get_property("INFERENCE_PRECISION_HINT").to_string() == "bf16"
    with pytest.raises(InputError, match="fp32 or bf16"):
        engines.compile_openvino(path, "fp16")


def test_compiled_models_are_cached_outside_the_package_and_reused(tiny_package, cache):
    manifest = load_package(tiny_package)
    stage = manifest.detail
    x = _patches(stage)[:1]
    first = engines.open_engine(tiny_package, stage, _selection("openvino", "fp32"))
    assert first.cache_dir == cache and any(cache.iterdir())
    assert first.compiled.get_property("LOADED_FROM_CACHE") is False
    files = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
    second = engines.open_engine(tiny_package, stage, _selection("openvino", "fp32"))
    assert second.compiled.get_property("LOADED_FROM_CACHE") is True
    assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir()} == files
    assert np.array_equal(first(x), second(x))
    if engines.cpu_bf16_support()[0]:
        # The cached model runs at the precision asked now, not at the one it was first compiled with.
        bf16 = engines.open_engine(tiny_package, stage, _selection("openvino", "bf16"))
        again = engines.open_engine(tiny_package, stage, _selection("openvino", "fp32"))
        assert bf16.compiled.get_property("INFERENCE_PRECISION_HINT").to_string() == "bf16"
        assert np.array_equal(again(x), first(x))
    load_package(tiny_package)  # nothing was written into the package


def test_cache_defaults_to_the_user_cache_and_never_goes_into_the_package(tiny_package, tmp_path, monkeypatch,
                                                                          caplog):
    monkeypatch.delenv(engines.OPENVINO_CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert engines.openvino_cache_dir() == tmp_path / "xdg" / "pocketseg" / "openvino"
    monkeypatch.setenv(engines.OPENVINO_CACHE_ENV, str(tiny_package / "cache"))
    with caplog.at_level(logging.WARNING, logger="pocketseg.runtime.engines"):
        engine = engines.open_engine(tiny_package, load_package(tiny_package).roi, _selection("openvino", "fp32"))
    assert engine.cache_dir is None and "inside the model package" in caplog.text
    assert not (tiny_package / "cache").exists()
    load_package(tiny_package)


@no_gpu
def test_auto_picks_openvino_with_fp32_and_says_why(tiny_package, monkeypatch):
    manifest = load_package(tiny_package)
    monkeypatch.setattr(engines, "cpu_bf16_support", lambda: NATIVE)
    sel = engines.resolve(manifest=manifest)
    assert (sel.backend, sel.device, sel.precision) == ("openvino", "cpu", "fp32")
    assert "backend openvino (auto)" in sel.reason and "records no bf16 agreement for roi, detail" in sel.reason
    low = engines.resolve(manifest=_with_bf16(manifest, 0.99))
    assert low.precision == "fp32" and "below 99.9 %" in low.reason
    verified = engines.resolve(manifest=_with_bf16(manifest, 0.9995))
    assert verified.precision == "bf16" and "natively and the package's bf16 agreement is" in verified.reason
    assert engines.resolve(manifest=_with_bf16(manifest, 0.9995), precision="fp32").precision == "fp32"
    exact = engines.resolve(manifest=_with_bf16(manifest, 0.9995), backend="openvino", exact=True)
    assert exact.precision == "fp32" and "nnU-Net-exact" in exact.reason
    monkeypatch.setattr(engines, "cpu_bf16_support", lambda: NOT_NATIVE)
    plain = engines.resolve(manifest=_with_bf16(manifest, 0.9995))
    assert plain.precision == "fp32" and NOT_NATIVE[1] in plain.reason


def test_bf16_is_refused_without_native_bf16_in_one_line(tiny_package, monkeypatch, capsys, tmp_path):
    import nibabel as nib

    from pocketseg import cli
    from pocketseg.synth.phantom import make_phantom

    monkeypatch.setattr(engines, "cpu_bf16_support", lambda: NOT_NATIVE)
    with pytest.raises(engines.EngineUnavailableError, match="precision bf16 refused: this CPU has no native bf16"):
        engines.resolve(manifest=load_package(tiny_package), precision="bf16")
    ph = make_phantom(0, matrix=64, slices=16)
    nib.save(nib.Nifti1Image(ph.image, ph.affine), tmp_path / "ct.nii.gz")
    code = cli.main(["predict", "-i", str(tmp_path / "ct.nii.gz"), "-o", str(tmp_path / "seg.nii.gz"),
                     "-m", str(tiny_package), "--precision", "bf16"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "no native bf16" in err[0] and not (tmp_path / "seg.nii.gz").exists()


def test_explicit_bf16_on_an_unverified_package_runs_with_a_warning(tiny_package, monkeypatch, caplog, cache):
    if not engines.cpu_bf16_support()[0]:
        monkeypatch.setattr(engines, "cpu_bf16_support", lambda: NATIVE)  # the selection only; nothing runs
        run = False
    else:
        run = True
    manifest = load_package(tiny_package)
    with caplog.at_level(logging.WARNING, logger="pocketseg.runtime.engines"):
        sel = engines.resolve(manifest=manifest, precision="bf16")
    assert (sel.backend, sel.device, sel.precision) == ("openvino", "cpu", "bf16")
    assert "without a verified agreement" in caplog.text and "not verified" in sel.reason
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pocketseg.runtime.engines"):
        assert engines.resolve(manifest=_with_bf16(manifest, 0.9995), precision="bf16").precision == "bf16"
    assert caplog.text == ""
    if cuda_available()[0]:
        with pytest.raises(InputError, match="bf16 runs on the CPU"):
            engines.resolve(device="cuda", precision="bf16")
    if run:
        engine = engines.open_engine(tiny_package, manifest.detail, sel)
        x = _patches(manifest.detail)[:1]
        assert engine.precision == "bf16" and engine(x).shape == (1, manifest.detail.num_classes,
                                                                  *manifest.detail.patch_zyx)


def test_cascade_runs_on_openvino(tiny_package, cache):
    from pocketseg.runtime.cascade import CascadePredictor

    predictor = CascadePredictor(tiny_package, device="cpu", backend="openvino", precision="fp32", threads=1)
    assert predictor.backend == "openvino" and all(isinstance(e, engines.OpenVinoEngine)
                                                   for e in predictor.engines.values())


def test_openvino_fp32_labels_of_a_trained_model_agree_with_onnxruntime(tmp_path, cache):
    """The whole pipeline with trained nets: the nnU-Net fixture of tests/fixtures/nnunet_tiny (nnU-Net's stock
    trainer on phantoms), imported, on two held-out phantoms; OpenVINO fp32 against ONNX Runtime fp32."""
    pytest.importorskip("torch", reason="importing the nnU-Net fixture reads its checkpoint with torch")
    preset = PRESETS["fixture"]
    fixture = (Path(__file__).parent / "fixtures" / "nnunet_tiny" / preset.dataset_name
               / "nnUNetTrainer__nnUNetPlans__3d_parity")
    package = import_nnunet(fixture, tmp_path / "package", fp16=False, check=False)
    ov = CascadePredictor(package, device="cpu", backend="openvino", precision="fp32")
    ort = CascadePredictor(package, device="cpu", backend="onnxruntime")
    assert ov.selection.backend == "openvino" and ort.selection.backend == "onnxruntime"
    for case in phantom_cases(tmp_path / "cases", slices=40):
        volume = load_volume(case.path)
        got, ref = ov.predict(volume).labels, ort.predict(volume).labels
        assert len(np.unique(ref)) >= 3, f"{case.name}: the trained model segments almost nothing"
        agreement = float((got == ref).mean())
        assert agreement >= 0.9999, f"{case.name}: OpenVINO fp32 agrees with ONNX Runtime on {100 * agreement:.4f} %"


def test_transient_output_is_the_requests_own_buffer_with_the_same_logits(tiny_package, cache):
    stage = load_package(tiny_package).detail
    engine = engines.open_engine(tiny_package, stage, _selection("openvino", "fp32"), threads=1)
    x, y = _patches(stage), _patches(stage)[::-1].copy()
    owned = engine(x)
    first = engine.transient(x)
    np.testing.assert_array_equal(first, owned)
    kept = first.copy()
    second = engine.transient(y)
    assert np.shares_memory(first, second)  # the next call overwrites it: no fresh 31 MB per detail tile
    np.testing.assert_array_equal(second, engine(y))
    np.testing.assert_array_equal(owned, kept)  # what __call__ returned is the caller's
