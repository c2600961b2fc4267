"""RT Structure Set output: contours filled back agree with the label map, sit on the source slices, validate.

Phantom series (axial, reversed slice order, oblique) are written as DICOM by the test; the real series
of ``../shared/data/ct_examples/dicom_series`` is used with its reference segmentation when present.
"""

from __future__ import annotations

import logging

import nibabel as nib
import numpy as np
import pytest

from dicom_phantom import (copy_real_series, dciodvfy, dice, oblique_orientation, rasterise_rtstruct, source_slices,
                           study_of, write_phantom_series)
from pocketseg import labels as L
from pocketseg.atomic import atomic_write_bytes

pydicom = pytest.importorskip("pydicom", reason="pydicom (extra 'dicom') is not installed")
pytest.importorskip("skimage", reason="scikit-image (extra 'dicom') is not installed")

from pocketseg.dicom import read_dicom_series, read_series_grid  # noqa: E402
from pocketseg.runtime.dicom_output import Algorithm, to_series_grid  # noqa: E402
from pocketseg.runtime.rtstruct import build_rtstruct, rtstruct_bytes, slice_contours  # noqa: E402

ALGORITHM = Algorithm(model_name="tiny-model", model_digest="0123456789abcdef" * 4)
DISPLAY_TO_ID = {lab.display: lab.id for lab in L.LABELS}
GEOMETRIES = {"axial": dict(), "reversed": dict(reverse=True), "oblique": dict(orientation=oblique_orientation())}
#: Organs of realistic size have at least this many voxels (Dice >= 0.98 is asked of them).
REALISTIC_VOXELS = 2000


def _check(path, files, labels_ijk):
    uids, positions, orientation, spacing = source_slices(files)
    back = rasterise_rtstruct(path, uids, positions, orientation, spacing, labels_ijk.shape)
    present = {int(v) for v in np.unique(labels_ijk) if v}
    assert {DISPLAY_TO_ID[name] for name in back} == present
    scores = {}
    for name, mask in back.items():
        truth = labels_ijk == DISPLAY_TO_ID[name]
        scores[name] = dice(mask, truth)
        # Every slice with the label has a contour and none without (no off-by-one slice, no flip along k).
        assert np.array_equal(mask.any(axis=(0, 1)), truth.any(axis=(0, 1))), name
        if truth.sum() >= REALISTIC_VOXELS:
            assert scores[name] >= 0.98, (name, scores[name])
    errors, warnings = dciodvfy(path)
    assert not errors, "\n".join(errors + warnings)
    return scores


@pytest.mark.parametrize("geometry", sorted(GEOMETRIES))
def test_phantom_contours_fill_back_to_the_label_map(tmp_path, geometry):
    ph = write_phantom_series(tmp_path / "series", columns=96, rows=88, slices=20, **GEOMETRIES[geometry])
    files = read_dicom_series(ph.folder).meta["files"]
    out = atomic_write_bytes(tmp_path / "case.rtstruct.dcm", rtstruct_bytes(ph.labels_ijk, files, algorithm=ALGORITHM))
    scores = _check(out, files, ph.labels_ijk)
    assert min(scores[n] for n in ("Liver", "Spleen", "Right kidney")) >= 0.98


def test_contours_keep_holes_and_touch_the_border():
    mask = np.zeros((12, 10), dtype=bool)
    mask[0:8, 0:8] = True  # touches the image border
    mask[3:5, 3:5] = False  # a hole
    contours = slice_contours(mask)
    assert len(contours) == 2
    from skimage.draw import polygon

    filled = np.zeros(mask.shape, dtype=bool)
    for c in contours:
        rr, cc = polygon(c[:, 0], c[:, 1], mask.shape)
        part = np.zeros(mask.shape, dtype=bool)
        part[rr, cc] = True
        filled ^= part
    assert np.array_equal(filled, mask)


def test_structure_set_references_the_series(tmp_path):
    ph = write_phantom_series(tmp_path / "series", slices=8)
    files = read_dicom_series(ph.folder).meta["files"]
    ds = build_rtstruct(ph.labels_ijk, files, algorithm=ALGORITHM)
    source = pydicom.dcmread(files[0], stop_before_pixels=True)
    assert ds.Modality == "RTSTRUCT" and ds.StudyInstanceUID == source.StudyInstanceUID
    assert ds.SeriesInstanceUID != source.SeriesInstanceUID
    frame = ds.ReferencedFrameOfReferenceSequence[0]
    assert frame.FrameOfReferenceUID == source.FrameOfReferenceUID
    series = frame.RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
    assert series.SeriesInstanceUID == source.SeriesInstanceUID
    assert len(series.ContourImageSequence) == len(files)
    assert [r.ROIName for r in ds.StructureSetROISequence] == ["Liver", "Right kidney", "Spleen", "Aorta", "Tumor"]
    assert ALGORITHM.model_digest[:16] in ds.StructureSetDescription


@pytest.mark.parametrize("uids", ["anonymised", "complete"])
def test_real_series_rtstruct(ct_examples, tmp_path, caplog, uids):
    series = copy_real_series(ct_examples, tmp_path / "series", complete_uids=uids == "complete")
    grid = read_series_grid(series)
    image = nib.load(ct_examples / "example_seg_dicom.nii.gz")
    flare = L.totalsegmentator_to_flare(image.dataobj)
    labels = to_series_grid(flare, image.affine, grid, None)
    with caplog.at_level(logging.WARNING):
        out = atomic_write_bytes(tmp_path / "real.rtstruct.dcm", rtstruct_bytes(labels, grid.files, algorithm=ALGORITHM))
    assert ("generated from its SOP Instance UIDs" in caplog.text) == (uids == "anonymised")
    scores = _check(out, grid.files, labels)
    assert scores["Liver"] >= 0.98
    if uids == "complete":
        assert pydicom.dcmread(out).StudyInstanceUID == study_of(series)
