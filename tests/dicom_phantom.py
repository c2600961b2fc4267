"""DICOM test helpers: phantom series (written by :mod:`pocketseg.synth.dicom_series`) and independent
readers of our outputs (highdicom's SEG reader, a polygon filler for RT Structure Sets, dcmqi, dciodvfy).

Label maps are in the (i, j, k) order of :func:`pocketseg.dicom.read_dicom_series` (i = column,
j = row, k ascending along the slice normal).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from pocketseg.synth.dicom_series import DicomPhantom, oblique_orientation, phantom_labels, write_phantom_series

__all__ = ["DicomPhantom", "copy_real_series", "oblique_orientation", "phantom_labels", "study_of",
           "write_phantom_series"]


def copy_real_series(ct_examples: Path, dest: Path, *, complete_uids: bool) -> Path:
    """The anonymised real series of ``ct_examples`` copied to ``dest``; with ``complete_uids`` the UIDs the
    anonymiser blanked are put back (SOP from the file meta, new study, series and frame of reference)."""
    import pydicom

    shutil.copytree(ct_examples / "dicom_series", dest)
    if complete_uids:
        study, uid, frame = (pydicom.uid.generate_uid() for _ in range(3))
        for path in dest.iterdir():
            ds = pydicom.dcmread(path)
            ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, uid, frame
            ds.save_as(path, enforce_file_format=True)
    return dest


def study_of(series: Path) -> str:
    """The Study Instance UID of a series folder's first file."""
    import pydicom

    return pydicom.dcmread(next(iter(sorted(series.iterdir()))), stop_before_pixels=True).StudyInstanceUID


# ------------------------------------------------------------------------------ independent readers of outputs


def source_slices(files) -> tuple[list[str], np.ndarray, np.ndarray, tuple[float, float]]:
    """SOP Instance UIDs (file meta), positions, orientation and pixel spacing of the slice files, as given."""
    import pydicom

    uids, positions = [], []
    first = None
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        first = first or ds
        uids.append(str(ds.file_meta.MediaStorageSOPInstanceUID))
        positions.append([float(v) for v in ds.ImagePositionPatient])
    orientation = np.array([float(v) for v in first.ImageOrientationPatient])
    spacing = tuple(float(v) for v in first.PixelSpacing)
    return uids, np.array(positions), orientation, spacing


def seg_to_labels(path, slice_uids: list[str], name_to_id: dict[str, int], shape_ijk) -> np.ndarray:
    """A SEG read back with highdicom, frames placed by their referenced source instance: (i, j, k) label ids."""
    import highdicom as hd

    seg = hd.seg.segread(path)
    number_to_id = {int(s.SegmentNumber): name_to_id[str(s.TrackingID)] for s in seg.SegmentSequence}
    out = np.zeros(shape_ijk, dtype=np.uint8)
    index = {uid: k for k, uid in enumerate(slice_uids)}
    for frame, item in zip(seg.pixel_array if seg.pixel_array.ndim == 3 else seg.pixel_array[None],
                           seg.PerFrameFunctionalGroupsSequence):
        source = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        number = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        k = index[source]
        plane = out[:, :, k]
        plane[frame.T > 0] = number_to_id[number]
    return out


def frame_positions(path) -> list[tuple[str, np.ndarray]]:
    """(referenced source SOP Instance UID, ImagePositionPatient) of every SEG frame."""
    import pydicom

    seg = pydicom.dcmread(path)
    return [(str(item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID),
             np.array([float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]))
            for item in seg.PerFrameFunctionalGroupsSequence]


def rasterise_rtstruct(path, slice_uids, positions, orientation, spacing, shape_ijk) -> dict[str, np.ndarray]:
    """Every ROI of an RT Structure Set filled back onto the series grid (even-odd per plane), by ROI name.

    Each contour must lie in the plane of the slice it references, at that slice's position (mm, 1e-3)."""
    import pydicom
    from skimage.draw import polygon

    ds = pydicom.dcmread(path)
    names = {int(r.ROINumber): str(r.ROIName) for r in ds.StructureSetROISequence}
    row_dir, col_dir = orientation[:3], orientation[3:]
    normal = np.cross(row_dir, col_dir)
    index = {uid: k for k, uid in enumerate(slice_uids)}
    out = {}
    for roi in ds.ROIContourSequence:
        mask = np.zeros(shape_ijk, dtype=bool)
        for contour in roi.ContourSequence:
            k = index[str(contour.ContourImageSequence[0].ReferencedSOPInstanceUID)]
            xyz = np.asarray([float(v) for v in contour.ContourData]).reshape(-1, 3)
            rel = xyz - positions[k]
            off_plane = np.abs(rel @ normal).max()
            assert off_plane < 1e-3, f"contour {off_plane:.4f} mm off the plane of slice {k}"
            i = rel @ row_dir / spacing[1]
            j = rel @ col_dir / spacing[0]
            rr, cc = polygon(i, j, shape_ijk[:2])
            plane = np.zeros(shape_ijk[:2], dtype=bool)
            plane[rr, cc] = True
            mask[:, :, k] ^= plane
        out[names[int(roi.ReferencedROINumber)]] = mask
    return out


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float(np.logical_and(a, b).sum()) / max(float(a.sum() + b.sum()), 1.0)


def dciodvfy(path) -> tuple[list[str], list[str]]:
    """(errors, warnings) of dicom3tools' validator, or skip the test with the install command."""
    import shutil
    import subprocess

    import pytest

    exe = shutil.which("dciodvfy")
    if exe is None:
        pytest.skip("dciodvfy (dicom3tools) is not installed: apt-get install -y dicom3tools")
    done = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=120)
    lines = (done.stdout + done.stderr).splitlines()
    return [x for x in lines if x.startswith("Error")], [x for x in lines if x.startswith("Warning")]


def dcmqi_labels(path, tmp, name_to_id: dict[str, int], affine_ijk: np.ndarray, shape_ijk) -> np.ndarray:
    """A SEG read back by dcmqi's segimage2itkimage, on the (i, j, k) grid ``affine_ijk`` (voxel -> RAS)."""
    import json
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    import nibabel as nib
    import pytest

    exe = Path(sys.executable).with_name("segimage2itkimage")
    exe = exe if exe.is_file() else (shutil.which("segimage2itkimage") and Path(shutil.which("segimage2itkimage")))
    if not exe:
        pytest.skip("dcmqi is not installed (pip install dcmqi; wheels exist for Linux/macOS/Windows x86_64)")
    folder = Path(tmp)
    folder.mkdir(parents=True, exist_ok=True)
    done = subprocess.run([str(exe), "--inputDICOM", str(path), "--outputDirectory", str(folder), "--outputType",
                           "nifti", "--mergeSegments"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    meta = json.loads((folder / "meta.json").read_text())
    label_of = {int(a["labelID"]): name_to_id[a["TrackingIdentifier"]] for group in meta["segmentAttributes"]
                for a in group}
    image = nib.load(folder / "1.nii.gz")
    data = np.asarray(image.dataobj).astype(np.int64)
    # dcmqi's grid must be ours up to axis order/direction: a signed permutation with integer offsets.
    to_ours = np.linalg.inv(affine_ijk) @ image.affine
    assert np.allclose(to_ours[:3, :3], np.round(to_ours[:3, :3]), atol=1e-3), to_ours
    assert np.allclose(to_ours[:3, 3], np.round(to_ours[:3, 3]), atol=1e-2), to_ours
    m = np.round(to_ours).astype(int)
    out = np.zeros(shape_ijk, dtype=np.uint8)
    idx = np.indices(data.shape).reshape(3, -1)
    ours = m[:3, :3] @ idx + m[:3, 3:4]
    inside = np.all((ours >= 0) & (ours < np.array(shape_ijk)[:, None]), axis=0)
    values = data.reshape(-1)
    assert not values[~inside].any(), "dcmqi placed segment voxels outside the series grid"
    lut = np.zeros(max(label_of) + 1, dtype=np.uint8)
    for number, label in label_of.items():
        lut[number] = label
    out[tuple(ours[:, inside])] = lut[values[inside]]
    return out
