"""`pocketseg predict` and `pocketseg.segment`: files, folders, DICOM, statistics, previews and bad input."""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import pocketseg
import pocketseg.atomic
from pocketseg.cli import main
from pocketseg.nifti import read_nifti, write_nifti
from pocketseg.runtime.predict import case_name, case_statistics, plan_cases
from pocketseg.synth.phantom import make_phantom

pytest.importorskip("onnxruntime", reason="onnxruntime (extra 'runtime') is not installed")


def _write_case(path: Path, seed: int, slices: int = 16, orientation: str = "RAS") -> Path:
    ph = make_phantom(seed, small=True, slices=slices, orientation=orientation)
    write_nifti(ph.image, path, affine=ph.affine)
    return path


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cases")
    _write_case(folder / "A_0000.nii.gz", 0)
    _write_case(folder / "B_0000.nii.gz", 1, orientation="LPS")
    return folder


def _run(*args) -> int:
    return main(["-q", "predict", *map(str, args)])


def test_single_file_with_statistics_and_preview(tiny_package, cases, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "A_seg.nii.gz"
    assert _run("-i", cases / "A_0000.nii.gz", "-o", out, "-m", tiny_package, "--statistics", "--preview") == 0
    ref = read_nifti(cases / "A_0000.nii.gz")
    seg = nib.load(out)
    assert seg.shape == ref.shape and seg.get_data_dtype() == np.uint8
    np.testing.assert_allclose(seg.affine, ref.affine)
    stats = json.loads((tmp_path / "A_seg.statistics.json").read_text())  # named after the output
    labels = np.asarray(seg.dataobj)
    voxel_ml = float(np.prod(ref.spacing_mm)) / 1000
    present = {int(v) for v in np.unique(labels)} - {0}
    assert present, "the tiny package segmented nothing: the statistics would check nothing"
    for name, entry in stats["classes"].items():
        mask = labels == entry["id"]
        assert entry["voxels"] == int(mask.sum()), name
        assert entry["volume_ml"] == pytest.approx(entry["voxels"] * voxel_ml, abs=1e-3)
        if entry["id"] in present:  # every class the map holds has its mean HU, the others None
            assert entry["mean_hu"] == pytest.approx(float(ref.data[mask].mean()), abs=0.01), name
        else:
            assert entry["mean_hu"] is None, name
    assert {e["id"] for e in stats["classes"].values() if e["voxels"]} == present
    png = (tmp_path / "A_seg.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000  # a rendered figure, not an empty image


def test_side_files_are_named_after_the_output_not_the_input(tiny_package, tmp_path):
    """Two patients whose scans are both called ct.nii.gz: each keeps its own statistics and preview."""
    pytest.importorskip("matplotlib")
    outs = tmp_path / "outs"
    for k, patient in enumerate(("patient1", "patient2")):
        (tmp_path / f"s{k}").mkdir()
        scan = _write_case(tmp_path / f"s{k}" / "ct.nii.gz", seed=k)
        assert _run("-i", scan, "-o", outs / f"{patient}.nii.gz", "-m", tiny_package, "--statistics",
                    "--preview") == 0
    assert sorted(p.name for p in outs.iterdir()) == [
        "patient1.nii.gz", "patient1.png", "patient1.statistics.json",
        "patient2.nii.gz", "patient2.png", "patient2.statistics.json"]
    for patient in ("patient1", "patient2"):
        stats = json.loads((outs / f"{patient}.statistics.json").read_text())
        labels = np.asarray(nib.load(outs / f"{patient}.nii.gz").dataobj)
        assert {e["id"]: e["voxels"] for e in stats["classes"].values()} == {
            e["id"]: int((labels == e["id"]).sum()) for e in stats["classes"].values()}


def test_existing_output_is_never_overwritten_silently(tiny_package, cases, tmp_path):
    out = tmp_path / "seg.nii.gz"
    out.write_bytes(b"precious")
    assert _run("-i", cases / "A_0000.nii.gz", "-o", out, "-m", tiny_package) == 2
    assert out.read_bytes() == b"precious"
    assert _run("-i", cases / "A_0000.nii.gz", "-o", out, "-m", tiny_package, "--overwrite") == 0
    assert nib.load(out).shape == read_nifti(cases / "A_0000.nii.gz").shape


def test_folder_mode_continues_past_a_bad_case_and_resumes(tiny_package, cases, tmp_path, capsys):
    src = tmp_path / "in"
    shutil.copytree(cases, src)
    (src / "C_0000.nii.gz").write_text("not an image")
    out = tmp_path / "out"
    assert _run("-i", src, "-o", out, "-m", tiny_package) == 2
    err = capsys.readouterr().err
    assert "1 case(s) failed (2 written)" in err and "C_0000.nii.gz" in err
    assert sorted(p.name for p in out.iterdir()) == ["A.nii.gz", "B.nii.gz"]  # no partial file for C
    stamp = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    (src / "C_0000.nii.gz").unlink()
    _write_case(src / "C_0000.nii.gz", 2)
    assert _run("-i", src, "-o", out, "-m", tiny_package, "--continue") == 0
    assert sorted(p.name for p in out.iterdir()) == ["A.nii.gz", "B.nii.gz", "C.nii.gz"]
    assert all(out.joinpath(n).stat().st_mtime_ns == t for n, t in stamp.items())  # finished cases untouched
    assert _run("-i", src, "-o", out, "-m", tiny_package) == 2  # without --continue or --overwrite: refused


def test_folder_output_equals_single_file_output(tiny_package, cases, tmp_path):
    out = tmp_path / "out"
    assert _run("-i", cases, "-o", out, "-m", tiny_package) == 0
    single = tmp_path / "B.nii.gz"
    assert _run("-i", cases / "B_0000.nii.gz", "-o", single, "-m", tiny_package) == 0
    np.testing.assert_array_equal(np.asarray(nib.load(out / "B.nii.gz").dataobj), np.asarray(nib.load(single).dataobj))


@pytest.mark.parametrize("make,problem", [
    (lambda p: p.write_text("hello"), "not gzip-compressed"),
    (lambda p: nib.save(nib.Nifti1Image(np.zeros((8, 8), np.int16), np.eye(4)), p), "2D"),
    (lambda p: nib.save(nib.Nifti1Image(np.zeros((8, 8, 4, 2), np.int16), np.eye(4)), p), "4D"),
    (lambda p: nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.int16), np.eye(4)), p), "constant"),
    (lambda p: p.write_bytes(Path(p).with_name("ok.nii.gz").read_bytes()[:300]), "truncated|corrupt|unexpected end"),
])
def test_bad_input_gives_one_line_and_no_output(tiny_package, tmp_path, capsys, make, problem):
    _write_case(tmp_path / "ok.nii.gz", 3)
    bad = tmp_path / "bad.nii.gz"
    make(bad)
    out = tmp_path / "seg.nii.gz"
    assert _run("-i", bad, "-o", out, "-m", tiny_package) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pocketseg: error: ") and str(bad) in err[0]
    import re

    assert re.search(problem, err[0], re.IGNORECASE), err[0]
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith("seg")] == []


def test_text_file_and_missing_or_tampered_package(tiny_package, cases, tmp_path, capsys):
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    assert _run("-i", text, "-o", tmp_path / "x.nii.gz", "-m", tiny_package) == 2
    assert "unsupported input" in capsys.readouterr().err
    assert _run("-i", cases / "A_0000.nii.gz", "-o", tmp_path / "x.nii.gz", "-m", tmp_path / "nope") == 2
    assert "not a pocketseg model package" in capsys.readouterr().err
    tampered = tmp_path / "pkg"
    shutil.copytree(tiny_package, tampered)
    with open(tampered / "detail.onnx", "ab") as handle:
        handle.write(b"\0")
    assert _run("-i", cases / "A_0000.nii.gz", "-o", tmp_path / "x.nii.gz", "-m", tampered) == 2
    assert "detail.onnx does not match its SHA-256" in capsys.readouterr().err
    assert not (tmp_path / "x.nii.gz").exists()


def test_dicom_series_input(tiny_package, ct_examples, tmp_path):
    series = ct_examples / "dicom_series"
    if not series.is_dir():
        pytest.skip(f"no DICOM series folder at {series}")
    out = tmp_path / "dicom_seg.nii.gz"
    try:  # with the dicom extra complete, the SEG is checked too
        import highdicom  # noqa: F401
        dicom_out = True
    except ImportError:
        dicom_out = False
    types = ["--output-type", "nifti"] + (["--output-type", "dicom-seg"] if dicom_out else [])
    assert _run("-i", series, "-o", out, "-m", tiny_package, *types) == 0
    from pocketseg.imageio import load_volume

    vol = load_volume(series)
    seg = nib.load(out)
    assert seg.shape == vol.shape
    np.testing.assert_allclose(seg.affine, vol.affine, atol=1e-4)
    if dicom_out:  # the SEG of the anonymised real series, read back, equals the NIfTI labels voxel for voxel
        from dicom_phantom import seg_to_labels, source_slices

        labels = np.asarray(seg.dataobj).astype(np.uint8)
        assert labels.any()
        names = {lab.name: lab.id for lab in pocketseg.labels.LABELS}
        uids = source_slices(vol.meta["files"])[0]
        assert np.array_equal(seg_to_labels(tmp_path / "dicom_seg.seg.dcm", uids, names, labels.shape), labels)


def test_segment_api(tiny_package, cases):
    path = cases / "A_0000.nii.gz"
    from_path = pocketseg.segment(path, model=tiny_package, device="cpu")
    assert isinstance(from_path, nib.Nifti1Image) and from_path.get_data_dtype() == np.uint8
    from_image = pocketseg.segment(nib.load(path), model=tiny_package, device="cpu")
    np.testing.assert_array_equal(np.asarray(from_path.dataobj), np.asarray(from_image.dataobj))
    np.testing.assert_allclose(from_path.affine, nib.load(path).affine)
    with pytest.raises(pocketseg.errors.InputError, match="takes a path"):
        pocketseg.segment(np.zeros((4, 4, 4)), model=tiny_package)


def test_case_names_and_plans(tmp_path):
    assert case_name(Path("x/CASE_0000.nii.gz")) == "CASE"
    assert case_name(Path("x/CASE.nii")) == "CASE"
    single = _write_case(tmp_path / "S_0000.nii.gz", 4)
    jobs, folder = plan_cases(single, tmp_path / "outdir")
    assert not folder and jobs[0].output == tmp_path / "outdir" / "S.nii.gz"
    (tmp_path / "twice").mkdir()
    _write_case(tmp_path / "twice" / "T_0000.nii.gz", 5)
    _write_case(tmp_path / "twice" / "T.nii.gz", 5)
    with pytest.raises(pocketseg.errors.InputError, match="same case name"):
        plan_cases(tmp_path / "twice", tmp_path / "o")


def test_case_statistics_by_hand():
    labels = np.zeros((4, 4, 4), np.uint8)
    labels[0, 0, :2] = 1
    labels[3, 3, 3] = 14
    image = np.full((4, 4, 4), -1000, np.int16)
    image[0, 0, 0], image[0, 0, 1] = 50, 70
    image[3, 3, 3] = 20
    stats = case_statistics(labels, image, (2.0, 1.0, 0.5))
    assert stats["liver"] == {"id": 1, "voxels": 2, "volume_ml": 0.002, "mean_hu": 60.0}
    assert stats["tumor"]["mean_hu"] == 20.0 and stats["spleen"]["voxels"] == 0 and stats["spleen"]["mean_hu"] is None


def test_output_may_not_replace_the_input(tiny_package, cases, tmp_path, capsys):
    src = tmp_path / "in"
    shutil.copytree(cases, src)
    before = (src / "A_0000.nii.gz").read_bytes()
    assert _run("-i", src / "A_0000.nii.gz", "-o", src / "A_0000.nii.gz", "-m", tiny_package, "--overwrite") == 2
    assert "input image itself" in capsys.readouterr().err
    (src / "B.nii.gz").symlink_to(src / "B_0000.nii.gz")  # CASE.nii.gz in the input folder: the output name of B
    assert _run("-i", src, "-o", src, "-m", tiny_package, "--overwrite") == 2
    assert "would replace an input image" in capsys.readouterr().err
    assert (src / "A_0000.nii.gz").read_bytes() == before


def test_single_file_into_a_new_folder(tiny_package, cases, tmp_path):
    out = tmp_path / "new" / "deeper"
    assert _run("-i", cases / "A_0000.nii.gz", "-o", out, "-m", tiny_package) == 0
    seg, ref = read_nifti(out / "A.nii.gz"), read_nifti(cases / "A_0000.nii.gz")
    assert seg.shape == ref.shape and seg.data.dtype == np.uint8 and np.allclose(seg.affine, ref.affine)


def test_resume_finishes_an_interrupted_case(tiny_package, cases, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "A.statistics.json").write_text("{}")  # written before the label map, which never came
    assert _run("-i", cases, "-o", out, "-m", tiny_package, "--statistics", "--continue") == 0
    stats = json.loads((out / "A.statistics.json").read_text())
    assert stats["case"] == "A"
    for case in ("A", "B"):
        seg, ref = read_nifti(out / f"{case}.nii.gz"), read_nifti(cases / f"{case}_0000.nii.gz")
        assert seg.shape == ref.shape and np.allclose(seg.affine, ref.affine)
    labels = np.asarray(read_nifti(out / "A.nii.gz").data)
    assert {e["id"] for e in stats["classes"].values() if e["voxels"]} == {int(v) for v in np.unique(labels)} - {0}


def test_folder_mode_refuses_a_second_channel_instead_of_segmenting_it_as_a_case(tiny_package, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    _write_case(folder / "a_0000.nii.gz", 0)
    _write_case(folder / "a_0001.nii.gz", 1)
    out = tmp_path / "out"
    assert _run("-i", folder, "-o", out, "-m", tiny_package) == 2
    err = capsys.readouterr().err
    assert "a_0001.nii.gz" in err and "channel 1 of case a" in err
    assert not out.exists() or not any(out.iterdir())
    # A lone file that merely ends in four digits (no CASE_0000 beside it) is still a case of its own.
    (folder / "a_0000.nii.gz").unlink()
    jobs, _ = plan_cases(folder, out)
    assert [j.case for j in jobs] == ["a_0001"]


def test_a_scan_without_abdomen_is_warned_about_once(tiny_package, cases, tmp_path, monkeypatch, caplog):
    from pocketseg.runtime import cascade

    monkeypatch.setattr(cascade, "bounding_box", lambda mask, am: None)  # the ROI net finds nothing
    out = tmp_path / "A.nii.gz"
    with caplog.at_level("WARNING"):
        assert main(["predict", "-i", str(cases / "A_0000.nii.gz"), "-o", str(out), "-m", str(tiny_package),
                     "--statistics"]) == 0
    said = [r for r in caplog.records if "found no abdomen" in r.getMessage()]
    assert len(said) == 1
    assert any("found no abdomen" in w for w in json.loads((tmp_path / "A.statistics.json").read_text())["warnings"])


# --------------------------------------------------------------------------------------- DICOM outputs and trees

def _dicom_phantom(folder: Path, **kwargs):
    pytest.importorskip("highdicom", reason="highdicom (extra 'dicom') is not installed")
    from dicom_phantom import write_phantom_series

    return write_phantom_series(folder, **{"columns": 64, "rows": 56, "slices": 20, **kwargs})


@pytest.mark.parametrize("geometry", ["reversed", "oblique"])
def test_dicom_outputs_agree_with_the_nifti_output(tiny_package, tmp_path, geometry):
    from dicom_phantom import dcmqi_labels, oblique_orientation, rasterise_rtstruct, seg_to_labels, source_slices

    kwargs = {"reversed": dict(reverse=True), "oblique": dict(orientation=oblique_orientation())}[geometry]
    ph = _dicom_phantom(tmp_path / "series", **kwargs)
    out = tmp_path / "out"
    assert _run("-i", ph.folder, "-o", out, "-m", tiny_package, "--no-intensity-check", "--output-type", "nifti",
                "--output-type", "dicom-seg", "--output-type", "dicom-rtstruct") == 0
    nifti = nib.load(out / "series.nii.gz")
    labels = np.asarray(nifti.dataobj).astype(np.uint8)
    assert labels.any(), "the test model segmented nothing; the comparison would be empty"
    from pocketseg.dicom import read_dicom_series

    volume = read_dicom_series(ph.folder)
    np.testing.assert_allclose(nifti.affine, volume.affine, atol=1e-4)
    files = volume.meta["files"]
    uids, positions, orientation, spacing = source_slices(files)
    names = {lab.name: lab.id for lab in pocketseg.labels.LABELS}
    assert np.array_equal(seg_to_labels(out / "series.seg.dcm", uids, names, labels.shape), labels)
    assert np.array_equal(dcmqi_labels(out / "series.seg.dcm", tmp_path / "dcmqi", names, volume.affine,
                                       labels.shape), labels)
    back = rasterise_rtstruct(out / "series.rtstruct.dcm", uids, positions, orientation, spacing, labels.shape)
    displays = {lab.display: lab.id for lab in pocketseg.labels.LABELS}
    assert {displays[n] for n in back} == {int(v) for v in np.unique(labels) if v}
    for name, mask in back.items():  # contours on the right slices (random-weight labels are too ragged for Dice)
        assert np.array_equal(mask.any(axis=(0, 1)), (labels == displays[name]).any(axis=(0, 1))), name


def test_nifti_input_with_a_dicom_reference(tiny_package, tmp_path, capsys):
    ph = _dicom_phantom(tmp_path / "series", reverse=True)
    from pocketseg.dicom import read_dicom_series

    volume = read_dicom_series(ph.folder)
    # As dcm2niix would store it: another voxel order (rows flipped).
    flipped = tmp_path / "ct.nii.gz"
    affine = volume.affine.copy()
    affine[:3, 3] += affine[:3, 1] * (volume.shape[1] - 1)
    affine[:3, 1] *= -1
    nib.save(nib.Nifti1Image(volume.data[:, ::-1, :].copy(), affine), flipped)
    out = tmp_path / "out"
    # Without the reference, DICOM outputs are refused before anything is written.
    assert _run("-i", flipped, "-o", out, "-m", tiny_package, "--output-type", "dicom-seg") == 2
    assert "--dicom-reference" in capsys.readouterr().err and not out.exists()
    assert _run("-i", flipped, "-o", out, "-m", tiny_package, "--no-intensity-check", "--output-type", "nifti",
                "--output-type", "dicom-seg", "--dicom-reference", ph.folder) == 0
    labels = np.asarray(nib.load(out / "ct.nii.gz").dataobj).astype(np.uint8)
    from dicom_phantom import seg_to_labels, source_slices

    uids = source_slices(volume.meta["files"])[0]
    names = {lab.name: lab.id for lab in pocketseg.labels.LABELS}
    back = seg_to_labels(out / "ct.seg.dcm", uids, names, volume.shape)
    assert np.array_equal(back[:, ::-1, :], labels)  # the SEG is on the series grid, the NIfTI on its own
    # A reference whose grid differs is refused, naming both grids; nothing is written.
    other = _dicom_phantom(tmp_path / "other", pixel_spacing=(0.7, 0.7))
    assert _run("-i", flipped, "-o", tmp_path / "out2", "-m", tiny_package, "--no-intensity-check",
                "--output-type", "dicom-rtstruct", "--dicom-reference", other.folder) == 2
    err = capsys.readouterr().err
    assert "does not match the DICOM reference" in err and str(flipped) in err
    assert not (tmp_path / "out2" / "ct.rtstruct.dcm").exists()


def test_study_tree_with_three_patients(tiny_package, tmp_path, caplog):
    import logging

    tree = tmp_path / "export"
    _dicom_phantom(tree / "P001" / "study1" / "CT_3", patient_id="P001", series_number=3)
    _dicom_phantom(tree / "P002" / "20240202" / "series" / "2", patient_id="P002", study_date="20240202",
                   series_number=2)
    _dicom_phantom(tree / "P003" / "st" / "ct", patient_id="P/003 x", study_date="20230101", series_number=5)
    _dicom_phantom(tree / "P003" / "st" / "scout", patient_id="P/003 x", study_date="20230101", series_number=1,
                   slices=3, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))
    _dicom_phantom(tree / "P003" / "st" / "mr", patient_id="P/003 x", study_date="20230101", series_number=7,
                   slices=4, modality="MR")
    (tree / "P003" / "README.txt").write_text("not DICOM")
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO, logger="pocketseg"):
        assert _run("-i", tree, "-o", out, "-m", tiny_package, "--no-intensity-check") == 0
    assert sorted(p.name for p in out.iterdir()) == ["P001_20240131_s3.nii.gz", "P002_20240202_s2.nii.gz",
                                                     "P_003_x_20230101_s5.nii.gz"]
    assert "localizer" in caplog.text and "modality MR, not CT" in caplog.text
    assert "summary: 3 case(s) written" in caplog.text
    # `pocketseg info` lists the same series.
    from pocketseg.imageio import volume_info

    info = volume_info(tree)
    assert sorted((s["case"], s["skipped"] is None) for s in info["series"]) == [
        ("P001_20240131_s3", True), ("P002_20240202_s2", True), ("P_003_x_20230101_s1", False),
        ("P_003_x_20230101_s5", True), ("P_003_x_20230101_s7", False)]


# ------------------------------------------------------------------------------------ full disk: all or nothing


def _disk_full_for(monkeypatch, name: str) -> None:
    """Make writing ``name`` fail as a full disk does: the fsync of its temporary file raises ENOSPC."""
    real_fsync = os.fsync

    def fsync(fd):
        if os.readlink(f"/proc/self/fd/{fd}").rsplit("/", 1)[-1].startswith(f".{name}."):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(pocketseg.atomic.os, "fsync", fsync)


@pytest.mark.parametrize("full", ["patient1.nii.gz", "patient1.statistics.json"])
def test_a_full_disk_leaves_no_file_of_the_case_and_one_line(tiny_package, cases, tmp_path, monkeypatch, capsys,
                                                              full):
    out = tmp_path / "outs"
    out.mkdir()
    _disk_full_for(monkeypatch, full)
    assert _run("-i", cases / "A_0000.nii.gz", "-o", out / "patient1.nii.gz", "-m", tiny_package,
                "--statistics") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"pocketseg: error: {out / full}: cannot be written: No space left on device"]
    assert list(out.iterdir()) == []  # no label map, no statistics without it, no temporary file
    monkeypatch.undo()  # space freed: the same command now simply works
    assert _run("-i", cases / "A_0000.nii.gz", "-o", out / "patient1.nii.gz", "-m", tiny_package,
                "--statistics") == 0
    assert sorted(p.name for p in out.iterdir()) == ["patient1.nii.gz", "patient1.statistics.json"]


def test_a_full_disk_in_folder_mode_fails_that_case_only(tiny_package, cases, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    _disk_full_for(monkeypatch, "B.nii.gz")
    assert _run("-i", cases, "-o", out, "-m", tiny_package, "--statistics") == 2
    err = capsys.readouterr().err
    assert "1 case(s) failed (1 written)" in err and f"{out / 'B.nii.gz'}: cannot be written: No space left" in err
    assert "Traceback" not in err
    assert sorted(p.name for p in out.iterdir()) == ["A.nii.gz", "A.statistics.json"]  # B's staged files gone
    monkeypatch.undo()
    assert _run("-i", cases, "-o", out, "-m", tiny_package, "--statistics", "--continue") == 0
    assert sorted(p.name for p in out.iterdir()) == ["A.nii.gz", "A.statistics.json", "B.nii.gz",
                                                     "B.statistics.json"]


def test_a_rerun_after_an_interruption_says_how_to_go_on(tiny_package, cases, tmp_path, capsys):
    out = tmp_path / "patient1.nii.gz"
    (tmp_path / "patient1.statistics.json").write_text("{}")  # left without its label map (an older version)
    assert _run("-i", cases / "A_0000.nii.gz", "-o", out, "-m", tiny_package, "--statistics") == 2
    err = capsys.readouterr().err
    assert "patient1.statistics.json: already exists without the label map patient1.nii.gz" in err
    assert "--continue finishes the case" in err
    assert _run("-i", cases / "A_0000.nii.gz", "-o", out, "-m", tiny_package, "--statistics", "--continue") == 0
    assert json.loads((tmp_path / "patient1.statistics.json").read_text())["case"] == "A"
    assert _run("-i", cases / "A_0000.nii.gz", "-o", out, "-m", tiny_package, "--statistics") == 2
    err = capsys.readouterr().err
    assert "the case is finished: patient1.statistics.json, patient1.nii.gz" in err
    assert "--continue skips finished cases, --overwrite replaces them" in err


# ------------------------------------------------------------------------------------------------ memory limit


def test_a_header_with_huge_voxels_is_refused_before_allocating(tiny_package, tmp_path, capsys):
    ph = make_phantom(0, small=True, slices=16)
    scan = tmp_path / "huge.nii.gz"
    write_nifti(ph.image, scan, affine=np.diag([1000.0, 1000.0, 1000.0, 1.0]))  # 1 m voxels: a 128 m body
    out = tmp_path / "out.nii.gz"
    assert _run("-i", scan, "-o", out, "-m", tiny_package) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"pocketseg: error: {scan}: voxel spacing 1000 x 1000 x 1000 mm")
    assert "GiB, above the limit of" in err[0] and "of this machine's" in err[0] and "--max-memory" in err[0]
    assert not out.exists()


def test_max_memory_sets_the_limit(tiny_package, cases, tmp_path, capsys):
    out = tmp_path / "A.nii.gz"
    assert _run("-i", cases / "A_0000.nii.gz", "-o", out, "-m", tiny_package, "--max-memory", "1MiB") == 2
    err = capsys.readouterr().err
    assert "A_0000.nii.gz: voxel spacing" in err and "above the limit of 1.0 MiB (--max-memory)" in err
    assert not out.exists()
    assert _run("-i", cases / "A_0000.nii.gz", "-o", out, "-m", tiny_package, "--max-memory", "8GiB") == 0
    assert _run("-i", cases / "A_0000.nii.gz", "-o", out, "-m", tiny_package, "--max-memory", "lots") == 2
    assert "--max-memory (max_memory= from Python) must be a size" in capsys.readouterr().err
    with pytest.raises(pocketseg.errors.InputError, match="above the limit"):
        pocketseg.segment(cases / "A_0000.nii.gz", tiny_package, max_memory=2**20)


# ------------------------------------------------------------------------------------ several runs, one folder


def _predict_processes(n: int, src: Path, out: Path, package: Path, *extra: str) -> list[subprocess.CompletedProcess]:
    """``n`` predict processes started together on one output folder; their results."""
    env = dict(os.environ, PYTHONPATH=str(Path(pocketseg.__file__).resolve().parents[1]),
               OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "pocketseg", "predict", "-i", str(src), "-o", str(out), "-m", str(package),
               "--threads", "1", *extra]
    procs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(n)]
    results = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=120)
        results.append(subprocess.CompletedProcess(command, proc.returncode, stdout, stderr))
    return results


@pytest.fixture(scope="module")
def five_cases(tmp_path_factory):
    folder = tmp_path_factory.mktemp("five")
    for k in range(5):
        _write_case(folder / f"c{k}_0000.nii.gz", k, slices=8)
    return folder


@pytest.mark.parametrize("runs,extra", [(2, ()), (3, ("--continue",))])
def test_concurrent_runs_share_a_folder_and_write_every_case_once(tiny_package, five_cases, tmp_path, runs, extra):
    out = tmp_path / "out"
    results = _predict_processes(runs, five_cases, out, tiny_package, *extra)
    for r in results:
        assert r.returncode == 0, r.stderr
        assert "failed" not in r.stderr.replace("0 failed", "")
    computed = [line for r in results for line in r.stdout.splitlines()]  # each run prints what it wrote
    expected = sorted(str(out / f"c{k}.nii.gz") for k in range(5))
    assert sorted(computed) == expected  # every case once: none twice, none missing
    assert sorted(p.name for p in out.iterdir()) == [f"c{k}.nii.gz" for k in range(5)]  # no lock file left
    for r in results:  # the summary of each run accounts for every case
        summary = [line for line in r.stderr.splitlines() if "case(s) written by this run" in line]
        assert len(summary) == 1
        mine = len(r.stdout.splitlines())
        assert f"{mine} case(s) written by this run, {5 - mine} done by another run, 0 failed" in summary[0]


def test_a_stale_lock_of_a_killed_run_is_taken_over(tiny_package, cases, tmp_path, caplog):
    out = tmp_path / "out"
    out.mkdir()
    killed = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    killed.kill()
    killed.wait()
    (out / "A.lock").write_text(json.dumps({"pid": killed.pid, "host": socket.gethostname(),
                                            "started": time.time() - 5}))
    with caplog.at_level("WARNING"):
        assert main(["predict", "-i", str(cases), "-o", str(out), "-m", str(tiny_package)]) == 0
    assert any(f"took over the lock of pid {killed.pid}" in r.getMessage() for r in caplog.records)
    assert sorted(p.name for p in out.iterdir()) == ["A.nii.gz", "B.nii.gz"]


def test_folder_mode_stops_on_ctrl_c_without_partial_files_and_continue_finishes(tiny_package, cases, tmp_path,
                                                                                 monkeypatch):
    import pocketseg.runtime.predict as P

    src, out = tmp_path / "in", tmp_path / "out"
    shutil.copytree(cases, src)
    for seed, case in ((2, "C"), (3, "D"), (4, "E")):
        _write_case(src / f"{case}_0000.nii.gz", seed)

    class CtrlCAfterTheFirstCase(P.tqdm):
        def update(self, n=1):
            super().update(n)
            raise KeyboardInterrupt

    monkeypatch.setattr(P, "tqdm", CtrlCAfterTheFirstCase)
    with pytest.raises(KeyboardInterrupt):
        P.predict(src, out, tiny_package, statistics=True, progress=False)
    monkeypatch.undo()
    names = sorted(p.name for p in out.iterdir())
    assert not [n for n in names if n.startswith(".")]  # no temporary file left
    done = [n[: -len(".nii.gz")] for n in names if n.endswith(".nii.gz")]
    assert 1 <= len(done) < 5  # the run stopped: the cases not yet at the network gave up
    assert all(f"{case}.statistics.json" in names for case in done)
    assert _run("-i", src, "-o", out, "-m", tiny_package, "--statistics", "--continue") == 0
    assert sorted(p.name for p in out.glob("*.nii.gz")) == [f"{c}.nii.gz" for c in "ABCDE"]


# ---------------------------------------------------------------- DICOM outputs among a case's staged files


def test_dicom_outputs_of_a_study_tree_are_staged_with_the_case(tiny_package, tmp_path, monkeypatch, capsys):
    tree = tmp_path / "export"
    _dicom_phantom(tree / "P001" / "study" / "ct", patient_id="P001", series_number=3)
    _dicom_phantom(tree / "P002" / "study" / "ct", patient_id="P002", study_date="20240202", series_number=2)
    out = tmp_path / "out"
    types = ("--output-type", "dicom-seg", "--output-type", "dicom-rtstruct")
    # The SEG of the first case hits a full disk: none of that case's files, the other case whole, no lock left.
    _disk_full_for(monkeypatch, "P001_20240131_s3.seg.dcm")
    assert _run("-i", tree, "-o", out, "-m", tiny_package, "--no-intensity-check", "--statistics", *types) == 2
    err = capsys.readouterr().err
    assert "1 case(s) failed (1 written)" in err
    assert f"{out / 'P001_20240131_s3.seg.dcm'}: cannot be written: No space left" in err
    assert sorted(p.name for p in out.iterdir()) == ["P002_20240202_s2.rtstruct.dcm", "P002_20240202_s2.seg.dcm",
                                                     "P002_20240202_s2.statistics.json"]
    monkeypatch.undo()
    # Without a label map the RT Structure Set (published last) marks a case finished: --continue redoes only P001.
    finished = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert _run("-i", tree, "-o", out, "-m", tiny_package, "--no-intensity-check", "--statistics", *types,
                "--continue") == 0
    written = [Path(line).name for line in capsys.readouterr().out.splitlines()]
    assert written == ["P001_20240131_s3.seg.dcm", "P001_20240131_s3.rtstruct.dcm"]
    assert {name: (out / name).stat().st_mtime_ns for name in finished} == finished
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"{case}{end}" for case in ("P001_20240131_s3", "P002_20240202_s2")
         for end in (".rtstruct.dcm", ".seg.dcm", ".statistics.json")])
    # A rerun without options names the finished case's files and how to go on.
    assert _run("-i", tree, "-o", out, "-m", tiny_package, "--no-intensity-check", "--statistics", *types) == 2
    assert "--continue skips finished cases" in capsys.readouterr().err


def test_an_interrupted_dicom_case_is_finished_by_continue(tiny_package, tmp_path, capsys):
    ph = _dicom_phantom(tmp_path / "series")
    out = tmp_path / "out"
    (out).mkdir()
    (out / "series.seg.dcm").write_bytes(b"left by an interrupted run")  # without its label map
    args = ("-i", ph.folder, "-o", out, "-m", tiny_package, "--no-intensity-check", "--output-type", "nifti",
            "--output-type", "dicom-seg")
    assert _run(*args) == 2
    err = capsys.readouterr().err
    assert "series.seg.dcm: already exists without the label map series.nii.gz" in err
    assert _run(*args, "--continue") == 0
    import pydicom

    assert pydicom.dcmread(out / "series.seg.dcm").Modality == "SEG"
    assert sorted(p.name for p in out.iterdir()) == ["series.nii.gz", "series.seg.dcm"]


def test_outputs_inside_a_dicom_input_folder_are_refused(tiny_package, tmp_path, capsys):
    # They would join the series: the next read of the folder finds two series, and other tools see the SEG in it.
    pytest.importorskip("pydicom", reason="pydicom (extra 'dicom') is not installed")
    from pocketseg.synth.dicom_series import write_phantom_series

    series = write_phantom_series(tmp_path / "series", columns=16, rows=16, slices=6).folder
    before = sorted(p.name for p in series.iterdir())
    assert _run("-i", series, "-o", series, "-m", tiny_package, "--no-intensity-check") == 2
    assert "is inside the DICOM input folder" in capsys.readouterr().err
    assert sorted(p.name for p in series.iterdir()) == before


def test_series_uid_is_refused_where_it_chooses_nothing(tiny_package, cases, tmp_path, capsys):
    for source, out in ((cases, tmp_path / "out"), (cases / "A_0000.nii.gz", tmp_path / "a.nii.gz")):
        assert _run("-i", source, "-o", out, "-m", tiny_package, "--series-uid", "1.2.3") == 2
        assert "--series-uid chooses a series in one DICOM series folder" in capsys.readouterr().err
        assert not out.exists()


def test_a_run_refused_before_writing_leaves_no_folder_of_its_own(cases, tmp_path, capsys):
    broken = tmp_path / "not-a-package"
    broken.mkdir()
    for out in (tmp_path / "new" / "a.nii.gz", tmp_path / "newfolder"):
        source = cases / "A_0000.nii.gz" if out.suffix == ".gz" else cases
        assert _run("-i", source, "-o", out, "-m", broken) == 2
        assert capsys.readouterr().err
        assert not (tmp_path / "new").exists() and not (tmp_path / "newfolder").exists()


def test_a_lock_file_that_names_no_owner_fails_its_case_instead_of_waiting_forever(tiny_package, cases, tmp_path,
                                                                                    capsys):
    out = tmp_path / "out"
    out.mkdir()
    lock = out / "B.lock"
    lock.write_text("garbage{")
    old = time.time() - 3600
    os.utime(lock, (old, old))
    assert _run("-i", cases, "-o", out, "-m", tiny_package) == 2
    err = capsys.readouterr().err
    assert "B.lock: a lock file that names no owner" in err
    assert (out / "A.nii.gz").is_file() and not (out / "B.nii.gz").exists()
    assert lock.read_text() == "garbage{"  # not ours to remove


def test_continue_says_which_files_of_an_unfinished_case_it_replaces(tiny_package, tmp_path, caplog):
    # A SEG-only run, then NIfTI + SEG with --continue: the case's marker (the label map) is missing, so the
    # case is redone and its SEG replaced; that is said, not done silently.
    pytest.importorskip("highdicom", reason="highdicom (extra 'dicom') is not installed")
    from pocketseg.synth.dicom_series import write_phantom_series

    series = write_phantom_series(tmp_path / "series", columns=24, rows=24, slices=8).folder
    out = tmp_path / "out" / "ct.nii.gz"
    flags = ["-m", tiny_package, "--no-intensity-check"]
    assert _run("-i", series, "-o", out, *flags, "--output-type", "dicom-seg") == 0
    seg = out.with_name("ct.seg.dcm")
    assert seg.is_file() and not out.exists()
    with caplog.at_level("WARNING"):
        assert _run("-i", series, "-o", out, *flags, "--output-type", "nifti", "--output-type", "dicom-seg",
                    "--continue") == 0
    assert any("--continue replaces ct.seg.dcm" in r.getMessage() for r in caplog.records)
    assert out.is_file() and seg.is_file()
