"""RT Structure Set output: one ROI per label present, closed planar contours per slice in patient coordinates.

Contours come from scikit-image's marching squares (``find_contours`` at level 0.5 on each label's mask
of a slice), so they run through the midpoints between inside and outside pixel centres: filling a
contour back (pixel centres inside the polygon) gives the mask again, holes included: holes are
written as further contours of the same slice, which readers combine even-odd. rt-utils was considered
and not used: it traces contours with OpenCV's findContours through the centres of boundary pixels, so
a structure filled back loses up to half a pixel along its border, and it would add OpenCV to the
dependencies. Points on straight runs are dropped (exactly collinear points add nothing).

A contour point (i, j) of slice k is placed at ``IPP_k + i * dc * IOP[:3] + j * dr * IOP[3:]`` (LPS mm;
dc, dr: spacing between columns and between rows), with the slice's own ImagePositionPatient, and each
contour references its slice's SOP instance. The label map is in the (i, j, k) order of
:mod:`pocketseg.runtime.dicom_output`.

This module imports pydicom and scikit-image (extra ``dicom``) at its top; ``predict`` imports it only
when an RT Structure Set is asked for.
"""

from __future__ import annotations

import datetime as dt
import io
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.tag import Tag
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, RTStructureSetStorage, generate_uid
from scipy import ndimage
from skimage.measure import find_contours

from pocketseg import labels as L
from pocketseg.dicom import source_datasets
from pocketseg.errors import InputError
from pocketseg.runtime.dicom_output import RTSTRUCT_SERIES_NUMBER, Algorithm, present_labels

log = logging.getLogger(__name__)

#: Attributes copied from the source images (Patient, General Study, Patient Study modules).
_COPIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientAge", "StudyInstanceUID",
           "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber", "StudyDescription")
#: The Patient and General Study attributes DICOM requires (type 2): present, empty where the source has none.
_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
          "ReferringPhysicianName", "StudyID", "AccessionNumber")


def _drop_collinear(points: np.ndarray) -> np.ndarray:
    """A closed polygon without its points that lie on the straight line between their neighbours."""
    before, after = np.roll(points, 1, axis=0), np.roll(points, -1, axis=0)
    cross = (points[:, 0] - before[:, 0]) * (after[:, 1] - before[:, 1]) - \
            (points[:, 1] - before[:, 1]) * (after[:, 0] - before[:, 0])
    keep = np.abs(cross) > 1e-9
    return points[keep] if keep.sum() >= 3 else points


def slice_contours(mask_ij: np.ndarray) -> list[np.ndarray]:
    """Closed contours (each an (n, 2) array of fractional (i, j) pixel indices) of one slice's mask."""
    padded = np.pad(mask_ij.astype(np.uint8), 1)  # closes contours that touch the image border
    out = []
    for contour in find_contours(padded, 0.5):
        contour = contour[:-1] - 1.0  # find_contours repeats the first point; undo the padding
        if len(contour) >= 3:
            out.append(_drop_collinear(contour))
    return out


_CONTOUR_DATA = 0x30060050


def _raw_ds(tag: int, values: np.ndarray) -> RawDataElement:
    """A DS element already encoded (Explicit VR Little Endian): pydicom would otherwise validate each of the
    about a million contour coordinates of a large structure set one by one, ~40 s of a 512x512x300 case."""
    text = "\\".join(f"{v:.3f}" for v in values.tolist()).encode("ascii")
    if len(text) % 2:
        text += b" "  # DICOM values have even length; DS is padded with a space
    return RawDataElement(Tag(tag), "DS", len(text), text, 0, False, True)


def _roi_contours(labels_ijk: np.ndarray, label_id: int, box: tuple[slice, slice, slice], sources: Sequence[Dataset],
                  row_dir: np.ndarray, col_dir: np.ndarray, spacing: tuple[float, float]) -> list[Dataset]:
    between_rows, between_columns = spacing
    items = []
    box_i, box_j, box_k = box
    # Only the label's bounding box (one voxel margin) is searched, so marching squares runs on small arrays.
    i0, j0 = max(box_i.start - 1, 0), max(box_j.start - 1, 0)
    i1, j1 = min(box_i.stop + 1, labels_ijk.shape[0]), min(box_j.stop + 1, labels_ijk.shape[1])
    for k in range(box_k.start, box_k.stop):
        plane = labels_ijk[i0:i1, j0:j1, k] == label_id
        if not plane.any():
            continue
        origin = np.asarray([float(v) for v in sources[k].ImagePositionPatient])
        for contour in slice_contours(plane):
            ij = contour + (i0, j0)
            xyz = origin + np.outer(ij[:, 0] * between_columns, row_dir) + np.outer(ij[:, 1] * between_rows, col_dir)
            image = Dataset()
            image.ReferencedSOPClassUID = sources[k].SOPClassUID
            image.ReferencedSOPInstanceUID = sources[k].SOPInstanceUID
            item = Dataset()
            # Marked as already in the output's encoding, so the writer copies the raw ContourData as it is.
            item.set_original_encoding(False, True, item._character_set)
            item.ContourImageSequence = DicomSequence([image])
            item.ContourGeometricType = "CLOSED_PLANAR"
            item.NumberOfContourPoints = len(xyz)
            item[_CONTOUR_DATA] = _raw_ds(_CONTOUR_DATA, xyz.ravel())
            items.append(item)
    return items


def build_rtstruct(labels_ijk: np.ndarray, source_files: Sequence[Path], *, algorithm: Algorithm,
                   label_names: Mapping[str, int] | None = None) -> Dataset:
    """The RT Structure Set data set of a label map on the grid of the series ``source_files`` (in k order)."""
    sources = source_datasets(source_files)
    first = sources[0]
    rows, columns = int(first.Rows), int(first.Columns)
    if labels_ijk.shape != (columns, rows, len(sources)):
        raise InputError(Path(source_files[0]).parent,
                         f"label map of shape {labels_ijk.shape} does not fit the series "
                         f"({columns} columns x {rows} rows x {len(sources)} slices)")
    orientation = np.asarray([float(v) for v in first.ImageOrientationPatient])
    row_dir, col_dir = orientation[:3], orientation[3:]
    spacing = tuple(float(v) for v in first.PixelSpacing)
    now = dt.datetime.now()

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = RTStructureSetStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.FileDataset("", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SpecificCharacterSet = first.get("SpecificCharacterSet", "ISO_IR 100")
    ds.SOPClassUID, ds.SOPInstanceUID = RTStructureSetStorage, meta.MediaStorageSOPInstanceUID
    ds.InstanceCreationDate, ds.InstanceCreationTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    for keyword in _COPIED:
        if keyword in first:
            setattr(ds, keyword, first[keyword].value)
    for keyword in _TYPE2:
        if keyword not in ds:
            setattr(ds, keyword, "")
    # Frame of Reference module: the structure set's coordinates are the source series' patient coordinates.
    ds.FrameOfReferenceUID = first.FrameOfReferenceUID
    ds.PositionReferenceIndicator = first.get("PositionReferenceIndicator", "") or ""
    ds.Modality = "RTSTRUCT"
    ds.SeriesInstanceUID, ds.SeriesNumber = generate_uid(), RTSTRUCT_SERIES_NUMBER
    ds.SeriesDescription = f"pocketseg {str(first.get('SeriesDescription', '') or '')}".strip()[:64]
    ds.OperatorsName = ""
    ds.Manufacturer, ds.ManufacturerModelName = "pocketseg", algorithm.model_name[:64]
    ds.SoftwareVersions = algorithm.version
    ds.InstanceNumber = 1
    ds.StructureSetLabel = "pocketseg"
    ds.StructureSetDescription = algorithm.description[:1024]
    ds.StructureSetDate, ds.StructureSetTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")

    images = []
    for source in sources:
        image = Dataset()
        image.ReferencedSOPClassUID, image.ReferencedSOPInstanceUID = source.SOPClassUID, source.SOPInstanceUID
        images.append(image)
    series = Dataset()
    series.SeriesInstanceUID = first.SeriesInstanceUID
    series.ContourImageSequence = DicomSequence(images)
    study = Dataset()
    study.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"  # Detached Study Management (retired), as PS3.3 C.8.8.5 asks
    study.ReferencedSOPInstanceUID = first.StudyInstanceUID
    study.RTReferencedSeriesSequence = DicomSequence([series])
    frame = Dataset()
    frame.FrameOfReferenceUID = first.FrameOfReferenceUID
    frame.RTReferencedStudySequence = DicomSequence([study])
    ds.ReferencedFrameOfReferenceSequence = DicomSequence([frame])

    rois, contours, observations = [], [], []
    labels = np.asarray(labels_ijk)
    boxes = ndimage.find_objects(labels)  # one pass for all labels: boxes[id - 1] is label id's bounding box
    for number, label in enumerate(present_labels(labels, label_names), start=1):
        coding = L.coding(label.name)
        roi = Dataset()
        roi.ROINumber = number
        roi.ReferencedFrameOfReferenceUID = first.FrameOfReferenceUID
        roi.ROIName = label.display[:64]
        roi.ROIDescription = f"label {label.id} ({label.name})"
        roi.ROIGenerationAlgorithm = "AUTOMATIC"
        roi.ROIGenerationDescription = algorithm.description[:64]
        rois.append(roi)
        contour = Dataset()
        contour.ReferencedROINumber = number
        contour.ROIDisplayColor = list(label.color_rgb)
        contour.ContourSequence = DicomSequence(_roi_contours(labels, label.id, boxes[label.id - 1], sources, row_dir,
                                                              col_dir, spacing))
        contours.append(contour)
        observation = Dataset()
        observation.ObservationNumber = number
        observation.ReferencedROINumber = number
        observation.RTROIInterpretedType = "ORGAN" if coding.category == L.ANATOMICAL_STRUCTURE else ""
        observation.ROIInterpreter = ""
        observations.append(observation)
    if not rois:
        raise InputError(Path(source_files[0]).parent, "the label map is empty: no ROI to write as RT Structure Set")
    ds.StructureSetROISequence = DicomSequence(rois)
    ds.ROIContourSequence = DicomSequence(contours)
    ds.RTROIObservationsSequence = DicomSequence(observations)
    return ds


def rtstruct_bytes(labels_ijk: np.ndarray, source_files: Sequence[Path], *, algorithm: Algorithm,
                   label_names: Mapping[str, int] | None = None) -> bytes:
    """The RT Structure Set of ``labels_ijk`` (see :func:`build_rtstruct`) as the bytes of a DICOM file, for a
    caller that stages it with a case's other files (``predict``)."""
    start = time.perf_counter()
    ds = build_rtstruct(labels_ijk, source_files, algorithm=algorithm, label_names=label_names)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    n = sum(len(c.ContourSequence) for c in ds.ROIContourSequence)
    log.info("encoded RT Structure Set (%d ROIs, %d contours) in %.2f s", len(ds.StructureSetROISequence), n,
             time.perf_counter() - start)
    return buffer.getvalue()
