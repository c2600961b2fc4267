"""DICOM SEG output, checked against independent readers: highdicom's reader, dcmqi and dicom3tools' dciodvfy.

Phantom series (axial, stored in reverse slice order, oblique) are written as DICOM by the test
(tests/dicom_phantom.py); the real series of ``../shared/data/ct_examples/dicom_series`` is used when
present, with its reference segmentation mapped onto FLARE ids.
"""

from __future__ import annotations

import logging

import nibabel as nib
import numpy as np
import pytest

from dicom_phantom import (copy_real_series, dciodvfy, dcmqi_labels, frame_positions, oblique_orientation,
                           seg_to_labels, source_slices, study_of, write_phantom_series)
from pocketseg import labels as L
from pocketseg.atomic import atomic_write_bytes
from pocketseg.errors import InputError

pydicom = pytest.importorskip("pydicom", reason="pydicom (extra 'dicom') is not installed")
hd = pytest.importorskip("highdicom", reason="highdicom (extra 'dicom') is not installed")

from pocketseg.dicom import read_dicom_series, read_series_grid  # noqa: E402
from pocketseg.runtime.dicom_output import Algorithm, to_series_grid  # noqa: E402
from pocketseg.runtime.dicom_seg import build_dicom_seg, dicom_seg_bytes  # noqa: E402

ALGORITHM = Algorithm(model_name="tiny-model", model_digest="0123456789abcdef" * 4)
NAME_TO_ID = {lab.name: lab.id for lab in L.LABELS}

GEOMETRIES = {"axial": dict(), "reversed": dict(reverse=True), "oblique": dict(orientation=oblique_orientation())}


@pytest.fixture(scope="module", params=sorted(GEOMETRIES))
def phantom(request, tmp_path_factory):
    return write_phantom_series(tmp_path_factory.mktemp(request.param) / "series", **GEOMETRIES[request.param])


def _check_seg(path, files, labels_ijk, affine, tmp_path):
    uids, positions, _, _ = source_slices(files)
    # (a) highdicom reads it back into our label map, frame by frame through the source references.
    back = seg_to_labels(path, uids, NAME_TO_ID, labels_ijk.shape)
    assert np.array_equal(back, labels_ijk)
    # (c) every frame sits at the position of the slice it references: no flip, no off-by-one.
    index = {uid: k for k, uid in enumerate(uids)}
    frames = frame_positions(path)
    assert frames
    for uid, position in frames:
        assert np.allclose(position, positions[index[uid]], atol=1e-3)
    # Only slices where a label is present have frames (compact binary SEG).
    n_expected = sum(int(np.any(labels_ijk[:, :, k] == v)) for k in range(labels_ijk.shape[2])
                     for v in np.unique(labels_ijk) if v)
    assert len(frames) == n_expected
    # (d) dcmqi, an independent reader (DCMTK's dcmseg), gives the same volume on the same grid.
    assert np.array_equal(dcmqi_labels(path, tmp_path / "dcmqi", NAME_TO_ID, affine, labels_ijk.shape), labels_ijk)
    # (e) dicom3tools' IOD validator finds no error.
    errors, warnings = dciodvfy(path)
    assert not errors, "\n".join(errors + warnings)


def test_phantom_seg_reads_back_exactly_through_highdicom_and_dcmqi(phantom, tmp_path):
    volume = read_dicom_series(phantom.folder)
    assert np.array_equal(volume.data > -80, phantom.labels_ijk > 0)  # the phantom is read on its own grid
    files = volume.meta["files"]
    out = atomic_write_bytes(tmp_path / "case.seg.dcm", dicom_seg_bytes(phantom.labels_ijk, files, algorithm=ALGORITHM))
    _check_seg(out, files, phantom.labels_ijk, volume.affine, tmp_path)


def test_seg_references_the_source_and_names_the_algorithm(tmp_path):
    ph = write_phantom_series(tmp_path / "series", slices=12)
    files = read_dicom_series(ph.folder).meta["files"]
    seg = build_dicom_seg(ph.labels_ijk, files, algorithm=ALGORITHM)
    source = pydicom.dcmread(files[0], stop_before_pixels=True)
    assert seg.StudyInstanceUID == source.StudyInstanceUID
    assert seg.FrameOfReferenceUID == source.FrameOfReferenceUID
    assert seg.SeriesInstanceUID not in (source.SeriesInstanceUID, "")
    referenced = seg.ReferencedSeriesSequence[0]
    assert referenced.SeriesInstanceUID == source.SeriesInstanceUID
    assert {str(i.ReferencedSOPInstanceUID) for i in referenced.ReferencedInstanceSequence} == \
        {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
    segments = {str(s.TrackingID): s for s in seg.SegmentSequence}
    assert set(segments) == {"liver", "right_kidney", "spleen", "aorta", "tumor"}
    assert segments["liver"].SegmentedPropertyTypeCodeSequence[0].CodeValue == "10200004"
    kidney = segments["right_kidney"].SegmentedPropertyTypeCodeSequence[0]
    assert kidney.CodeValue == "64033007"
    assert kidney.SegmentedPropertyTypeModifierCodeSequence[0].CodeValue == "24028007"
    assert segments["tumor"].SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"
    algorithm = segments["liver"].SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmName == "pocketseg" and algorithm.AlgorithmVersion == ALGORITHM.version
    assert ALGORITHM.model_digest in str(algorithm.AlgorithmParameters)
    assert "tiny-model" in str(algorithm.AlgorithmParameters)


def test_labels_of_other_models_get_a_generic_code(tmp_path):
    ph = write_phantom_series(tmp_path / "series", slices=12)
    files = read_dicom_series(ph.folder).meta["files"]
    labels = np.where(ph.labels_ijk == 1, 2, np.where(ph.labels_ijk == 3, 1, 0)).astype(np.uint8)
    seg = build_dicom_seg(labels, files, algorithm=ALGORITHM, label_names={"background": 0, "lesion_a": 1,
                                                                           "Vessel": 2})
    by_label = {str(s.SegmentLabel): s for s in seg.SegmentSequence}
    assert set(by_label) == {"lesion a", "Vessel"}
    assert by_label["lesion a"].SegmentedPropertyTypeCodeSequence[0].CodeValue == L.GENERIC_CODING.type.value


def test_anonymised_series_uses_the_file_meta_uids_and_generates_the_rest(tmp_path, caplog):
    ph = write_phantom_series(tmp_path / "series", slices=10, complete_uids=False)
    files = read_dicom_series(ph.folder).meta["files"]
    with caplog.at_level(logging.WARNING):
        seg = build_dicom_seg(ph.labels_ijk, files, algorithm=ALGORITHM)
    assert "generated from its SOP Instance UIDs" in caplog.text
    metas = {str(pydicom.dcmread(f, stop_before_pixels=True).file_meta.MediaStorageSOPInstanceUID) for f in files}
    referenced = {str(i.ReferencedSOPInstanceUID) for i in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced == metas
    assert seg.StudyInstanceUID and seg.FrameOfReferenceUID
    # The generated UIDs are a function of the series: a second output (the RT Structure Set) agrees.
    again = build_dicom_seg(ph.labels_ijk, files, algorithm=ALGORITHM)
    assert again.StudyInstanceUID == seg.StudyInstanceUID
    assert again.ReferencedSeriesSequence[0].SeriesInstanceUID == seg.ReferencedSeriesSequence[0].SeriesInstanceUID


def test_slices_without_any_sop_instance_uid_are_refused(tmp_path):
    ph = write_phantom_series(tmp_path / "series", slices=6, complete_uids=False)
    files = read_dicom_series(ph.folder).meta["files"]
    ds = pydicom.dcmread(files[2])
    del ds.file_meta.MediaStorageSOPInstanceUID
    ds.save_as(files[2], enforce_file_format=False)
    with pytest.raises(InputError, match="has no SOPInstanceUID") as excinfo:
        atomic_write_bytes(tmp_path / "x.seg.dcm", dicom_seg_bytes(ph.labels_ijk, files, algorithm=ALGORITHM))
    assert str(files[2]) in str(excinfo.value)
    assert not (tmp_path / "x.seg.dcm").exists()


def test_an_empty_label_map_or_a_wrong_shape_is_refused(tmp_path):
    ph = write_phantom_series(tmp_path / "series", slices=6)
    files = read_dicom_series(ph.folder).meta["files"]
    with pytest.raises(InputError, match="label map is empty"):
        build_dicom_seg(np.zeros_like(ph.labels_ijk), files, algorithm=ALGORITHM)
    with pytest.raises(InputError, match="does not fit the series"):
        build_dicom_seg(ph.labels_ijk[:, :, :5], files, algorithm=ALGORITHM)


# ---------------------------------------------------------------------------------------------- real series


def _real_labels(ct_examples, grid):
    image = nib.load(ct_examples / "example_seg_dicom.nii.gz")
    flare = L.totalsegmentator_to_flare(image.dataobj)
    return to_series_grid(flare, image.affine, grid, ct_examples / "example_seg_dicom.nii.gz")


@pytest.mark.parametrize("uids", ["anonymised", "complete"])
def test_real_series_seg(ct_examples, tmp_path, uids):
    series = copy_real_series(ct_examples, tmp_path / "series", complete_uids=uids == "complete")
    grid = read_series_grid(series)
    labels = _real_labels(ct_examples, grid)
    assert len(np.unique(labels)) >= 7  # liver, spleen, pancreas, aorta, IVC, adrenal, stomach in 20 slices
    out = atomic_write_bytes(tmp_path / "real.seg.dcm", dicom_seg_bytes(labels, grid.files, algorithm=ALGORITHM))
    _check_seg(out, grid.files, labels, grid.affine, tmp_path)
    if uids == "complete":
        assert pydicom.dcmread(out, stop_before_pixels=True).StudyInstanceUID == study_of(series)
