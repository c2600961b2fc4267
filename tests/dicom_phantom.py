"""Synthetic CT series written as DICOM by the tests: a phantom with organ-like ellipsoids.

``write_phantom_series`` writes one single-frame CT file per slice with complete identifying
attributes (patient, study, series, frame of reference) and returns the folder, the ground-truth
label map in the (i, j, k) order of :func:`pocketseg.dicom.read_dicom_series` (i = column, j = row,
k ascending along the slice normal) and the slice positions in that order.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class Phantom:
    folder: Path
    labels_ijk: np.ndarray  # uint8, (columns, rows, slices) in k order
    positions: np.ndarray  # (slices, 3) LPS ImagePositionPatient in k order
    orientation: tuple[float, ...]
    series_uid: str


def rotation(degrees_about_x: float, degrees_about_z: float) -> np.ndarray:
    a, b = np.radians(degrees_about_x), np.radians(degrees_about_z)
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    rz = np.array([[np.cos(b), -np.sin(b), 0], [np.sin(b), np.cos(b), 0], [0, 0, 1]])
    return rz @ rx


def phantom_labels(columns: int, rows: int, slices: int) -> np.ndarray:
    """Ellipsoids with FLARE ids: liver 1 (with tumor 14 inside), right kidney 2, spleen 3, aorta 5."""
    i, j, k = np.meshgrid(np.arange(columns), np.arange(rows), np.arange(slices), indexing="ij")
    out = np.zeros((columns, rows, slices), dtype=np.uint8)

    def ellipsoid(ci, cj, ck, ri, rj, rk):
        return ((i - ci) / ri) ** 2 + ((j - cj) / rj) ** 2 + ((k - ck) / rk) ** 2 <= 1.0

    out[ellipsoid(columns * 0.32, rows * 0.45, slices * 0.5, columns * 0.22, rows * 0.25, slices * 0.38)] = 1
    out[ellipsoid(columns * 0.30, rows * 0.42, slices * 0.52, columns * 0.06, rows * 0.07, slices * 0.12)] = 14
    out[ellipsoid(columns * 0.70, rows * 0.70, slices * 0.45, columns * 0.10, rows * 0.12, slices * 0.25)] = 2
    out[ellipsoid(columns * 0.75, rows * 0.30, slices * 0.55, columns * 0.12, rows * 0.14, slices * 0.25)] = 3
    # A tube along k: the aorta.
    out[((i - columns * 0.52) / 3.5) ** 2 + ((j - rows * 0.62) / 3.5) ** 2 <= 1.0] = 5
    return out


def write_phantom_series(folder: Path, *, columns: int = 56, rows: int = 48, slices: int = 24,
                         pixel_spacing=(0.9, 0.8), slice_step: float = 2.0, orientation=(1, 0, 0, 0, 1, 0),
                         reverse: bool = False, patient_id: str = "P001", study_date: str = "20240131",
                         series_number: int = 3, study_uid: str | None = None, modality: str = "CT",
                         image_type=("ORIGINAL", "PRIMARY", "AXIAL"), complete_uids: bool = True,
                         labels_ijk: np.ndarray | None = None) -> Phantom:
    """Write the phantom as a CT series. ``reverse``: instance numbers and file names run against the normal
    (the first file is the highest slice). ``complete_uids=False`` blanks the data set's SOP, study, series and
    frame-of-reference UIDs as anonymisers do (the file meta keeps the SOP UIDs)."""
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    labels = phantom_labels(columns, rows, slices) if labels_ijk is None else labels_ijk
    row_dir = np.asarray(orientation[:3], dtype=float)
    col_dir = np.asarray(orientation[3:], dtype=float)
    normal = np.cross(row_dir, col_dir)
    origin = np.array([-25.0, -20.0, 100.0])
    positions = np.array([origin + k * slice_step * normal for k in range(slices)])
    hu = np.where(labels > 0, 60 + 10 * labels.astype(np.int16), -80).astype(np.int16)
    series_uid, study_uid = generate_uid(), study_uid or generate_uid()
    frame_uid = generate_uid()
    order = range(slices - 1, -1, -1) if reverse else range(slices)
    for instance, k in enumerate(order, start=1):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(folder / f"IM{instance:04d}.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.SOPClassUID = CTImageStorage if complete_uids else ""
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID if complete_uids else ""
        ds.StudyInstanceUID = study_uid if complete_uids else ""
        ds.SeriesInstanceUID = series_uid if complete_uids else ""
        ds.FrameOfReferenceUID = frame_uid if complete_uids else ""
        ds.PatientName, ds.PatientID = f"Phantom^{patient_id}", patient_id
        ds.PatientBirthDate, ds.PatientSex = "19700101", "O"
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = study_date, "101500", "1", ""
        ds.ReferringPhysicianName = ""
        ds.SeriesNumber, ds.InstanceNumber = series_number, instance
        ds.Modality, ds.Manufacturer = modality, "phantom"
        ds.ImageType = list(image_type)
        ds.SeriesDescription = "phantom"
        ds.PositionReferenceIndicator = ""
        ds.ImagePositionPatient = [f"{v:.6f}" for v in positions[k]]
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in orientation]
        ds.PixelSpacing = [f"{v:g}" for v in pixel_spacing]
        ds.SliceThickness = f"{slice_step:g}"
        ds.Rows, ds.Columns = rows, columns
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "-1024", "1", "HU"
        ds.KVP = "120"
        ds.PixelData = (hu[:, :, k].T.astype(np.int32) + 1024).astype(np.uint16).tobytes()
        ds.save_as(str(folder / f"IM{instance:04d}.dcm"), enforce_file_format=True)
    del pydicom
    return Phantom(folder, labels, positions, tuple(float(v) for v in orientation), series_uid)


def oblique_orientation() -> tuple[float, ...]:
    r = rotation(20.0, 15.0)
    return tuple(float(v) for v in (*r[:, 0], *r[:, 1]))


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
