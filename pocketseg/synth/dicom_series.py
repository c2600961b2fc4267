"""Synthetic CT series written as DICOM: a label map and its intensities as single-frame CT files.

For the DICOM tests and the DICOM output benchmark: geometry (orientation, spacing, slice order) is
chosen freely, so axial, oblique and reversed-order series come out of one writer. The label map is in
the (i, j, k) order of :func:`pocketseg.dicom.read_dicom_series` (i = column, j = row, k ascending along
the slice normal ``IOP[:3] x IOP[3:]``). pydicom (extra ``dicom``) is imported when a series is written.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class DicomPhantom:
    folder: Path
    labels_ijk: np.ndarray  # uint8, (columns, rows, slices) in k order
    positions: np.ndarray  # (slices, 3) LPS ImagePositionPatient in k order
    orientation: tuple[float, ...]
    series_uid: str


def oblique_orientation(degrees_about_x: float = 20.0, degrees_about_z: float = 15.0) -> tuple[float, ...]:
    """ImageOrientationPatient of axial slices rotated about x, then about z."""
    a, b = np.radians(degrees_about_x), np.radians(degrees_about_z)
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    rz = np.array([[np.cos(b), -np.sin(b), 0], [np.sin(b), np.cos(b), 0], [0, 0, 1]])
    r = rz @ rx
    return tuple(float(v) for v in (*r[:, 0], *r[:, 1]))


def phantom_labels(columns: int, rows: int, slices: int) -> np.ndarray:
    """Ellipsoids with FLARE ids: liver 1 (with tumor 14 inside), right kidney 2, spleen 3, aorta 5 (a tube)."""
    i, j, k = np.meshgrid(np.arange(columns), np.arange(rows), np.arange(slices), indexing="ij")
    out = np.zeros((columns, rows, slices), dtype=np.uint8)

    def ellipsoid(ci, cj, ck, ri, rj, rk):
        return ((i - ci) / ri) ** 2 + ((j - cj) / rj) ** 2 + ((k - ck) / rk) ** 2 <= 1.0

    out[ellipsoid(columns * 0.32, rows * 0.45, slices * 0.5, columns * 0.22, rows * 0.25, slices * 0.38)] = 1
    out[ellipsoid(columns * 0.30, rows * 0.42, slices * 0.52, columns * 0.06, rows * 0.07, slices * 0.12)] = 14
    out[ellipsoid(columns * 0.70, rows * 0.70, slices * 0.45, columns * 0.10, rows * 0.12, slices * 0.25)] = 2
    out[ellipsoid(columns * 0.75, rows * 0.30, slices * 0.55, columns * 0.12, rows * 0.14, slices * 0.25)] = 3
    out[((i - columns * 0.52) / 3.5) ** 2 + ((j - rows * 0.62) / 3.5) ** 2 <= 1.0] = 5
    return out


def ct_slice(stored: np.ndarray, *, series_uid: str, instance: int, position=None, orientation=(1, 0, 0, 0, 1, 0),
             pixel_spacing=(1.0, 1.0), slope=1.0, intercept=0.0, thickness=None, modality: str = "CT",
             description: str | None = None) -> Any:
    """One uncompressed Explicit VR Little Endian CT slice (a pydicom ``FileDataset``, new SOP Instance UID).

    ``stored``: (rows, columns) raw values, int16 (signed pixel representation) or uint16. The geometry
    and rescale values are written as given, so callers may pass odd ones on purpose; ``position``,
    ``slope`` (with ``intercept``) and ``thickness`` are left out when None. Add further tags to the
    returned data set, then :func:`save_slice`.
    """
    # optional (dicom extra): pydicom writes the files
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    ds.SeriesInstanceUID = series_uid
    if description is not None:
        ds.SeriesDescription = description
    ds.InstanceNumber = instance
    if position is not None:
        ds.ImagePositionPatient = list(position)
    ds.ImageOrientationPatient = list(orientation)
    ds.PixelSpacing = list(pixel_spacing)
    if thickness is not None:
        ds.SliceThickness = thickness
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    signed = stored.dtype == np.int16
    ds.PixelRepresentation = 1 if signed else 0
    if slope is not None:
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    ds.PixelData = np.ascontiguousarray(stored).astype("<i2" if signed else "<u2").tobytes()
    return ds


def save_slice(ds: Any, path: Path) -> None:
    """Write a data set made by :func:`ct_slice` as a proper DICOM file (pydicom 2.4 and 3.x)."""
    try:
        ds.save_as(str(path), enforce_file_format=True)
    except TypeError:  # pydicom < 3
        ds.is_little_endian, ds.is_implicit_VR = True, False
        ds.save_as(str(path), write_like_original=False)


def write_phantom_series(folder: Path, *, columns: int = 56, rows: int = 48, slices: int = 24,
                         pixel_spacing=(0.9, 0.8), slice_step: float = 2.0, orientation=(1, 0, 0, 0, 1, 0),
                         reverse: bool = False, patient_id: str = "P001", study_date: str = "20240131",
                         series_number: int = 3, study_uid: str | None = None, modality: str = "CT",
                         image_type=("ORIGINAL", "PRIMARY", "AXIAL"), complete_uids: bool = True,
                         labels_ijk: np.ndarray | None = None) -> DicomPhantom:
    """Write a label map (default :func:`phantom_labels`) as a CT series: -80 HU outside, 60 + 10 * id inside.

    ``reverse``: instance numbers and file names run against the normal (the first file is the highest
    slice). ``complete_uids=False`` blanks the data set's SOP, study, series and frame-of-reference UIDs as
    anonymisers do (the file meta keeps the SOP UIDs).
    """
    # optional (dicom extra): pydicom makes the UIDs
    from pydicom.uid import generate_uid

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    labels = phantom_labels(columns, rows, slices) if labels_ijk is None else labels_ijk
    columns, rows, slices = labels.shape
    row_dir = np.asarray(orientation[:3], dtype=float)
    col_dir = np.asarray(orientation[3:], dtype=float)
    normal = np.cross(row_dir, col_dir)
    origin = np.array([-25.0, -20.0, 100.0])
    positions = np.array([origin + k * slice_step * normal for k in range(slices)])
    series_uid, study_uid, frame_uid = generate_uid(), study_uid or generate_uid(), generate_uid()
    order = range(slices - 1, -1, -1) if reverse else range(slices)
    for instance, k in enumerate(order, start=1):
        hu = np.where(labels[:, :, k] > 0, 60 + 10 * labels[:, :, k].astype(np.int32), -80)
        ds = ct_slice((hu.T + 1024).astype(np.uint16), series_uid=series_uid, instance=instance,
                      position=[f"{v:.6f}" for v in positions[k]], orientation=[f"{v:.8f}" for v in orientation],
                      pixel_spacing=[f"{v:g}" for v in pixel_spacing], slope="1", intercept="-1024",
                      thickness=f"{slice_step:g}", modality=modality, description="phantom")
        ds.SpecificCharacterSet = "ISO_IR 100"
        if not complete_uids:
            ds.SOPClassUID = ds.SOPInstanceUID = ds.SeriesInstanceUID = ""
        ds.StudyInstanceUID = study_uid if complete_uids else ""
        ds.FrameOfReferenceUID = frame_uid if complete_uids else ""
        ds.PatientName, ds.PatientID = f"Phantom^{patient_id}", patient_id
        ds.PatientBirthDate, ds.PatientSex = "19700101", "O"
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = study_date, "101500", "1", ""
        ds.ReferringPhysicianName = ""
        ds.SeriesNumber = series_number
        ds.Manufacturer = "phantom"
        ds.ImageType = list(image_type)
        ds.PositionReferenceIndicator = ""
        ds.RescaleType = "HU"
        ds.KVP = "120"
        save_slice(ds, folder / f"IM{instance:04d}.dcm")
    return DicomPhantom(folder, labels, positions, tuple(float(v) for v in orientation), series_uid)
