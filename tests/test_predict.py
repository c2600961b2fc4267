"""`pocketseg predict` and `pocketseg.segment`: files, folders, DICOM, statistics, previews and bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import pocketseg
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
