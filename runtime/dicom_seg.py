"""DICOM Segmentation (SEG) output with highdicom: one segment per label present in the label map.

Form: a BINARY segmentation whose frames exist only where a segment is present (highdicom's
``omit_empty_frames``), bit-packed (1 bit per pixel), Explicit VR Little Endian. The LABELMAP form (one
8-bit frame per slice, DICOM Supplement 243, 2024) would be more compact for 14 overlapping-free labels,
but dcmqi 1.5, dicom3tools' dciodvfy (Debian 12) and the 3D Slicer/OHIF releases in clinical use do not
all read it yet, so the widely read binary form is written. Compressed transfer syntaxes were left out:
bit packing and omitted empty frames already make a 14-label SEG of a 512x512x300 series a few MB, and
every reader decodes the uncompressed form.

Each segment carries SNOMED CT codes (:data:`pocketseg.labels.CODINGS`; a generic code for labels of
imported models), the algorithm (pocketseg version, model package name and manifest digest), and each
frame references its source slice. The label map is in the (i, j, k) order of
:mod:`pocketseg.runtime.dicom_output`.

This module imports highdicom and pydicom (extra ``dicom``) at its top; ``predict`` imports it only
when a SEG is asked for.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom.sr.coding import Code

from pocketseg import labels as L
from pocketseg.dicom import source_datasets
from pocketseg.errors import InputError
from pocketseg.runtime.dicom_output import SEG_SERIES_NUMBER, Algorithm, present_labels

log = logging.getLogger(__name__)

#: CID 7162 "Artificial Intelligence" algorithm family.
_AI_FAMILY = Code("123109", "DCM", "Artificial Intelligence")  # not in highdicom's code dictionaries of pydicom 2


def _code(code: L.Code) -> Code:
    return Code(code.value, code.scheme, code.meaning)


def _cielab(rgb: tuple[int, int, int]) -> hd.color.CIELabColor:
    """A display colour: sRGB (0-255) -> CIE L*a*b* (D65), as highdicom's CIELabColor takes it."""
    c = np.asarray(rgb, dtype=np.float64) / 255.0
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    xyz = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]]) @ linear
    xyz /= np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    lab = (116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2]))
    return hd.color.CIELabColor(float(np.clip(lab[0], 0, 100)), float(np.clip(lab[1], -128, 127)),
                                float(np.clip(lab[2], -128, 127)))


def segment_descriptions(labels: Sequence[L.Label], algorithm: Algorithm) -> list[hd.seg.SegmentDescription]:
    """One description per label, numbered 1, 2, ... in the given order (SEG segment numbers are contiguous)."""
    identification = hd.AlgorithmIdentificationSequence(
        name="pocketseg", family=_AI_FAMILY, version=algorithm.version,
        parameters={"model": algorithm.model_name, "model_manifest_sha256": algorithm.model_digest})
    out = []
    for number, label in enumerate(labels, start=1):
        coding = L.coding(label.name)
        description = hd.seg.SegmentDescription(
            segment_number=number, segment_label=label.display[:64],
            segmented_property_category=_code(coding.category), segmented_property_type=_code(coding.type),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=identification,
            tracking_id=label.name[:64], tracking_uid=hd.UID(), display_color=_cielab(label.color_rgb))
        description.SegmentDescription = label.display[:64]
        if coding.modifier is not None:
            # highdicom has no argument for the laterality of a paired organ; the attribute is standard (CID 244).
            modifier = hd.sr.CodedConcept(coding.modifier.value, coding.modifier.scheme, coding.modifier.meaning)
            description.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [modifier]
        out.append(description)
    return out


def build_dicom_seg(labels_ijk: np.ndarray, source_files: Sequence[Path], *, algorithm: Algorithm,
                    label_names: Mapping[str, int] | None = None) -> hd.seg.Segmentation:
    """The SEG data set of a label map on the grid of the series ``source_files`` (in k order)."""
    sources = source_datasets(source_files)
    rows, columns = int(sources[0].Rows), int(sources[0].Columns)
    if labels_ijk.shape != (columns, rows, len(sources)):
        raise InputError(Path(source_files[0]).parent,
                         f"label map of shape {labels_ijk.shape} does not fit the series "
                         f"({columns} columns x {rows} rows x {len(sources)} slices)")
    present = present_labels(labels_ijk, label_names)
    if not present:
        # A SEG needs at least one segment; writing none is the honest output of an empty prediction.
        raise InputError(Path(source_files[0]).parent, "the label map is empty: no segment to write as DICOM SEG")
    # Segment numbers 1..n in label order: a (slice, row, column) array of segment numbers.
    lut = np.zeros(256, dtype=np.uint8)
    for number, label in enumerate(present, start=1):
        lut[label.id] = number
    frames = lut[np.asarray(labels_ijk, dtype=np.uint8)].transpose(2, 1, 0)
    first = sources[0]
    return hd.seg.Segmentation(
        source_images=sources, pixel_array=np.ascontiguousarray(frames),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segment_descriptions(present, algorithm),
        series_instance_uid=hd.UID(), series_number=SEG_SERIES_NUMBER, sop_instance_uid=hd.UID(),
        instance_number=1, manufacturer="pocketseg", manufacturer_model_name=algorithm.model_name[:64],
        software_versions=algorithm.version, device_serial_number="0",
        series_description=f"pocketseg {str(first.get('SeriesDescription', '') or '')}".strip()[:64],
        content_label="POCKETSEG", content_description=algorithm.description[:64],
        omit_empty_frames=True)


def dicom_seg_bytes(labels_ijk: np.ndarray, source_files: Sequence[Path], *, algorithm: Algorithm,
                    label_names: Mapping[str, int] | None = None) -> bytes:
    """The SEG of ``labels_ijk`` (see :func:`build_dicom_seg`) as the bytes of a DICOM file, for a caller that
    stages it with a case's other files (``predict``)."""
    start = time.perf_counter()
    seg = build_dicom_seg(labels_ijk, source_files, algorithm=algorithm, label_names=label_names)
    buffer = io.BytesIO()
    seg.save_as(buffer, enforce_file_format=True)
    log.info("encoded DICOM SEG (%d segments, %d frames) in %.2f s", len(seg.SegmentSequence),
             int(seg.NumberOfFrames), time.perf_counter() - start)
    return buffer.getvalue()
