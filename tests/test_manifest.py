"""Model package manifest: round trip, checksum verification, refusal of tampered packages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pocketseg.errors import InputError
from pocketseg.manifest import (FORMAT_VERSION, MANIFEST_NAME, EngineRecord, Intensity, Manifest, Network, Stage,
                                content_digest, load_package, read_manifest)


def _stage(name: str, classes: int) -> Stage:
    return Stage(name=name, preset=f"{name}-tiny", network=Network(8, ((3, 3, 3),) * 3, ((1, 1, 1), (1, 2, 2), (2, 2, 2))),
                 num_classes=classes, spacing_mm_zyx=(5.0, 4.0, 4.0), patch_zyx=(16, 32, 32),
                 intensity=Intensity(50.0, 60.0, -100.0, 300.0),
                 files={"onnx-fp32": f"{name}.onnx", "torch": f"{name}.safetensors"},
                 engines=(EngineRecord(f"{name}_fp16_sm87_trt10.3.engine", "fp16", "10.3.0", "8.7", "Orin", 1),)
                 if name == "roi" else ())


@pytest.fixture
def package(tmp_path):
    manifest = Manifest(stages={"roi": _stage("roi", 2), "detail": _stage("detail", 15)})
    for name in manifest.files():
        (tmp_path / name).write_bytes(name.encode() * 10)
    manifest = manifest.with_checksums(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text(manifest.to_json())
    return tmp_path, manifest


def test_round_trip_is_exact(package):
    folder, manifest = package
    loaded = load_package(folder)
    assert loaded == manifest
    assert loaded.roi.patch_zyx == (16, 32, 32) and loaded.detail.num_classes == 15
    assert loaded.roi.engines[0].compute_capability == "8.7"
    assert loaded.labels["tumor"] == 14 and loaded.axis_order == "zyx" and loaded.format_version == FORMAT_VERSION
    assert set(loaded.checksums) == set(manifest.files())


def test_tampered_missing_and_unlisted_files_are_refused(package):
    folder, manifest = package
    (folder / "detail.onnx").write_bytes(b"evil")
    with pytest.raises(InputError, match="detail.onnx does not match its SHA-256"):
        load_package(folder)
    (folder / "detail.onnx").unlink()
    with pytest.raises(InputError, match="detail.onnx is missing"):
        load_package(folder)
    data = json.loads((folder / MANIFEST_NAME).read_text())
    data.pop("content_sha256")  # as a manifest written before the digest: the file checks still hold
    data["checksums"].pop("roi.onnx")
    (folder / MANIFEST_NAME).write_text(json.dumps(data))
    with pytest.raises(InputError, match="roi.onnx has no checksum"):
        load_package(folder)


@pytest.mark.parametrize("edit", [
    lambda d: d["stages"]["detail"]["intensity"].update(mean=500.0),  # changed 0.24 % of voxels, exit 0
    lambda d: d.update(roi_margin_mm=25.0),
    lambda d: d["labels"].update(liver=2, right_kidney=1),
    lambda d: d["checksums"].update({"detail.onnx": d["checksums"]["roi.onnx"]}),
])
def test_an_edited_manifest_is_refused_even_with_valid_values(package, edit):
    folder, manifest = package
    data = json.loads((folder / MANIFEST_NAME).read_text())
    assert data["content_sha256"] and load_package(folder) == manifest
    edit(data)
    (folder / MANIFEST_NAME).write_text(json.dumps(data, indent=4))
    with pytest.raises(InputError, match="does not match its content_sha256"):
        load_package(folder)


def test_the_content_digest_ignores_formatting_only(package):
    folder, manifest = package
    data = json.loads((folder / MANIFEST_NAME).read_text())
    (folder / MANIFEST_NAME).write_text(json.dumps(dict(reversed(list(data.items()))), indent=None))
    assert load_package(folder) == manifest


def test_bad_manifests(tmp_path, package):
    with pytest.raises(InputError, match="not a pocketseg model package"):
        read_manifest(tmp_path / "nowhere")
    folder, _ = package
    data = json.loads((folder / MANIFEST_NAME).read_text())
    data.pop("content_sha256")  # the values are checked also where no digest guards them
    (folder / MANIFEST_NAME).write_text(json.dumps({**data, "format_version": FORMAT_VERSION + 1}))
    with pytest.raises(InputError, match="newer"):
        read_manifest(folder)
    del data["stages"]["roi"]["patch_zyx"]
    (folder / MANIFEST_NAME).write_text(json.dumps(data))
    with pytest.raises(InputError, match="malformed"):
        read_manifest(folder)
    (folder / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        read_manifest(folder)


def test_bf16_agreement_round_trips_and_older_manifests_load_without_it(tmp_path, package):
    from dataclasses import replace

    folder, manifest = package
    assert manifest.detail.bf16_agreement is None and not manifest.detail.bf16_verified
    measured = replace(manifest, stages={"roi": replace(manifest.roi, bf16_agreement=0.9995),
                                         "detail": replace(manifest.detail, bf16_agreement=0.998)})
    (folder / MANIFEST_NAME).write_text(measured.to_json())
    loaded = load_package(folder)
    assert loaded == measured and loaded.roi.bf16_verified and not loaded.detail.bf16_verified
    # A manifest written before the field existed (no key at all, no content digest) loads unchanged.
    data = json.loads(manifest.to_json())
    for stage in data["stages"].values():
        del stage["bf16_agreement"]
    data.pop("content_sha256")
    (folder / MANIFEST_NAME).write_text(json.dumps(data))
    assert load_package(folder) == manifest
    for bad, match in ((1.5, "bf16_agreement must be a fraction"), ("0.999", "malformed"), (True, "malformed")):
        data["stages"]["detail"]["bf16_agreement"] = bad
        (folder / MANIFEST_NAME).write_text(json.dumps(data))
        with pytest.raises(InputError, match=match):
            read_manifest(folder)


# ------------------------------------------------------------------------------------------------ format 1

FORMAT1 = Path(__file__).parent / "fixtures" / "format1"


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_format_1_packages_predict_exactly_as_before(backend):
    """A package written by pocketseg's format-1 code (fixtures/format1/make_fixture.py) and its labels then."""
    if backend == "torch":
        pytest.importorskip("safetensors", reason="the torch backend reads safetensors weights")
    import numpy as np

    from pocketseg.imageio import load_volume
    from pocketseg.manifest import load_package
    from pocketseg.runtime.cascade import CascadePredictor

    manifest = load_package(FORMAT1 / "package")
    assert manifest.format_version == 1 and manifest.roi is not None and manifest.inference.overlap == 0.0
    assert not manifest.inference.mirroring and manifest.inference.back_resampling == "labels"
    before = np.load(FORMAT1 / "labels.npz")[backend]
    now = CascadePredictor(FORMAT1 / "package", device="cpu", backend=backend).predict(
        load_volume(FORMAT1 / "case_0000.nii.gz")).labels
    assert now.shape == before.shape and len(np.unique(before)) > 5
    assert np.array_equal(now, before)


@pytest.mark.parametrize("edit, problem", [
    (lambda d: d.update(roi_margin_mm=0), "roi_margin_mm must be a positive number"),
    (lambda d: d["labels"].update(liver=20), "do not fit the detail stage's 15 classes"),
    (lambda d: d.update(format_version=0), "format 0 is not one of"),
    (lambda d: d.update(format_version="1"), "format_version must be an integer"),
])
def test_out_of_range_values_are_refused_without_a_digest_too(package, edit, problem):
    folder, _ = package
    data = json.loads((folder / MANIFEST_NAME).read_text())
    data.pop("content_sha256")  # the values themselves are checked, digest or not
    edit(data)
    (folder / MANIFEST_NAME).write_text(json.dumps(data))
    with pytest.raises(InputError, match=problem):
        load_package(folder)


@pytest.mark.parametrize("edit, problem", [
    # Found by the property-based fuzzing (tests/test_fuzz_cases.py); the exception each escaped as before:
    (lambda d: d.update(stages=None), "stages must be a JSON object"),  # AttributeError
    (lambda d: d["stages"]["detail"]["intensity"].update(mean=None), "intensity.mean must be a number"),  # TypeError
    (lambda d: d.update(inference={**d["inference"], "overlap": "0.5"}), "inference.overlap must be a number"),
    (lambda d: d["stages"]["detail"]["files"].update(torch=None), "must be a string"),  # TypeError in load_package
    (lambda d: d["stages"]["roi"]["network"].update(width=float("inf")), "expected an integer"),  # OverflowError
    # and values of another type that were converted silently
    (lambda d: d["stages"]["detail"].update(spacing_mm_zyx=["5", 4, 4]), "spacing_mm_zyx must be a number"),
    (lambda d: d["stages"]["detail"].update(crop_to_nonzero="no"), "crop_to_nonzero must be true or false"),
    (lambda d: d.update(modality=None), "modality must be a string"),
    (lambda d: d["stages"]["detail"]["normalization"].update(use_mask=1), "use_mask must be true or false"),
    (lambda d: d["stages"]["detail"]["files"].update(torch="../elsewhere.safetensors"), "paths inside the package"),
])
def test_values_of_the_wrong_type_are_one_clear_refusal(package, edit, problem):
    folder, _ = package
    data = json.loads((folder / MANIFEST_NAME).read_text())
    edit(data)
    data["content_sha256"] = content_digest(data)  # as a careful editor would: only the values can tell
    (folder / MANIFEST_NAME).write_text(json.dumps(data))
    with pytest.raises(InputError, match=problem) as excinfo:
        load_package(folder)
    assert "\n" not in str(excinfo.value) and str(folder) in str(excinfo.value)


def test_a_manifest_that_is_not_an_object_is_refused(package):
    folder, _ = package
    (folder / MANIFEST_NAME).write_text("[1, 2]")
    with pytest.raises(InputError, match="a JSON object is expected, got list"):
        read_manifest(folder)
