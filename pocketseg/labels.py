"""FLARE 2023 label set, defined once for the whole package, and label sets of other models.

Label ids follow the FLARE 2023 challenge: 0 is background, 1-13 are the
abdominal organs and 14 is the pan-cancer tumor class. A model package may carry
another label set (an imported nnU-Net model's ``dataset.json`` labels):
:func:`label_set` turns any ``{name: id}`` into :class:`Label` rows, with the FLARE
display name and colour where a name is a FLARE name.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np


@dataclass(frozen=True)
class Label:
    """One class of the FLARE 2023 label map."""

    id: int
    name: str  # snake_case key, as used in dataset.json and CSV columns
    display: str  # human-readable name
    color_rgb: tuple[int, int, int]  # preview/overlay colour


LABELS: tuple[Label, ...] = (
    Label(0, "background", "Background", (0, 0, 0)),
    Label(1, "liver", "Liver", (221, 130, 101)),
    Label(2, "right_kidney", "Right kidney", (185, 102, 83)),
    Label(3, "spleen", "Spleen", (157, 108, 162)),
    Label(4, "pancreas", "Pancreas", (244, 214, 49)),
    Label(5, "aorta", "Aorta", (224, 32, 32)),
    Label(6, "inferior_vena_cava", "Inferior vena cava", (0, 151, 206)),
    Label(7, "right_adrenal_gland", "Right adrenal gland", (255, 140, 0)),
    Label(8, "left_adrenal_gland", "Left adrenal gland", (255, 196, 120)),
    Label(9, "gallbladder", "Gallbladder", (139, 212, 60)),
    Label(10, "esophagus", "Esophagus", (211, 171, 143)),
    Label(11, "stomach", "Stomach", (255, 182, 193)),
    Label(12, "duodenum", "Duodenum", (111, 184, 210)),
    Label(13, "left_kidney", "Left kidney", (230, 110, 160)),
    Label(14, "tumor", "Tumor", (0, 255, 120)),
)

BACKGROUND = 0
TUMOR = 14
NUM_CLASSES = len(LABELS)  # 15, background included
ORGAN_IDS: tuple[int, ...] = tuple(range(1, 14))
FOREGROUND_IDS: tuple[int, ...] = tuple(range(1, 15))

#: NSD tolerance (mm) with which classes that are not FLARE 2023 classes are scored, unless the user gives one
#: (FLARE's own per-class tolerances are in :mod:`pocketseg.evaluation.metrics`).
DEFAULT_TOLERANCE_MM = 2.0

#: TotalSegmentator v2 "total" task ids of the FLARE 2023 organs -> FLARE ids (to score against its segmentations).
TOTALSEGMENTATOR_TO_FLARE = MappingProxyType({5: 1, 2: 2, 1: 3, 7: 4, 52: 5, 63: 6, 8: 7, 9: 8, 4: 9, 15: 10, 6: 11,
                                              19: 12, 3: 13})


def totalsegmentator_to_flare(ts_labels):
    """A uint8 FLARE 2023 label map from a TotalSegmentator v2 "total" label map (other structures become 0)."""
    lut = np.zeros(max(TOTALSEGMENTATOR_TO_FLARE) + 1, dtype=np.uint8)
    for ts_id, flare_id in TOTALSEGMENTATOR_TO_FLARE.items():
        lut[ts_id] = flare_id
    ts = np.asarray(ts_labels).astype(np.int64)
    inside = (ts >= 0) & (ts < lut.size)
    return np.where(inside, lut[np.clip(ts, 0, lut.size - 1)], 0).astype(np.uint8)

BY_ID = MappingProxyType({lab.id: lab for lab in LABELS})
BY_NAME = MappingProxyType({lab.name: lab for lab in LABELS})


@dataclass(frozen=True)
class Code:
    """A coded concept as DICOM writes it: (code value, coding scheme designator, code meaning)."""

    value: str
    scheme: str
    meaning: str


#: DICOM segment property categories (CID 7150) and laterality modifiers (CID 244), SNOMED CT.
ANATOMICAL_STRUCTURE = Code("123037004", "SCT", "Anatomical Structure")
ABNORMAL_STRUCTURE = Code("49755003", "SCT", "Morphologically Abnormal Structure")
RIGHT = Code("24028007", "SCT", "Right")
LEFT = Code("7771000", "SCT", "Left")


@dataclass(frozen=True)
class Coding:
    """How DICOM SEG and RT Structure Set outputs name a label: category, type and its laterality, if any."""

    category: Code
    type: Code
    modifier: Code | None = None


#: SNOMED CT codes of the FLARE 2023 classes (CID 7166/7151 use the unlateralised organ with a laterality
#: modifier for paired organs, as DICOM SEG readers such as 3D Slicer and OHIF expect).
CODINGS: Mapping[str, Coding] = MappingProxyType({
    "liver": Coding(ANATOMICAL_STRUCTURE, Code("10200004", "SCT", "Liver")),
    "right_kidney": Coding(ANATOMICAL_STRUCTURE, Code("64033007", "SCT", "Kidney"), RIGHT),
    "spleen": Coding(ANATOMICAL_STRUCTURE, Code("78961009", "SCT", "Spleen")),
    "pancreas": Coding(ANATOMICAL_STRUCTURE, Code("15776009", "SCT", "Pancreas")),
    "aorta": Coding(ANATOMICAL_STRUCTURE, Code("15825003", "SCT", "Aorta")),
    "inferior_vena_cava": Coding(ANATOMICAL_STRUCTURE, Code("64131007", "SCT", "Inferior vena cava")),
    "right_adrenal_gland": Coding(ANATOMICAL_STRUCTURE, Code("23451007", "SCT", "Adrenal gland"), RIGHT),
    "left_adrenal_gland": Coding(ANATOMICAL_STRUCTURE, Code("23451007", "SCT", "Adrenal gland"), LEFT),
    "gallbladder": Coding(ANATOMICAL_STRUCTURE, Code("28231008", "SCT", "Gallbladder")),
    "esophagus": Coding(ANATOMICAL_STRUCTURE, Code("32849002", "SCT", "Esophagus")),
    "stomach": Coding(ANATOMICAL_STRUCTURE, Code("69695003", "SCT", "Stomach")),
    "duodenum": Coding(ANATOMICAL_STRUCTURE, Code("38848004", "SCT", "Duodenum")),
    "left_kidney": Coding(ANATOMICAL_STRUCTURE, Code("64033007", "SCT", "Kidney"), LEFT),
    "tumor": Coding(ABNORMAL_STRUCTURE, Code("108369006", "SCT", "Neoplasm")),
})
#: Labels of other models (an imported nnU-Net's own names): a generic anatomical structure, named by the label.
GENERIC_CODING = Coding(ANATOMICAL_STRUCTURE, ANATOMICAL_STRUCTURE)


def coding(name: str) -> Coding:
    """The DICOM coding of a label name: its SNOMED CT codes for a FLARE class, else the generic one."""
    return CODINGS.get(name, GENERIC_CODING)


def label_id(name: str) -> int:
    """Id of a label given its snake_case name; raises KeyError naming the valid ones."""
    try:
        return BY_NAME[name].id
    except KeyError:
        raise KeyError(f"unknown label {name!r}; known: {', '.join(BY_NAME)}") from None


def dataset_json_labels() -> dict[str, int]:
    """The ``labels`` entry of an nnU-Net v2 dataset.json (name -> id)."""
    return {lab.name: lab.id for lab in LABELS}


#: Colours of labels without a FLARE colour (tab20-like, distinct on a dark background).
_PALETTE: tuple[tuple[int, int, int], ...] = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75), (227, 119, 194),
    (188, 189, 34), (23, 190, 207), (174, 199, 232), (255, 187, 120), (152, 223, 138), (255, 152, 150),
    (197, 176, 213), (196, 156, 148), (247, 182, 210), (219, 219, 141), (158, 218, 229),
)


def label_set(labels: Mapping[str, int] | None = None) -> tuple[Label, ...]:
    """The :class:`Label` rows of a ``{name: id}`` label set, sorted by id (FLARE 2023's when None).

    A FLARE name keeps its FLARE display name and colour; other names are shown with their
    underscores as spaces, and coloured from a fixed palette by id.
    """
    if labels is None:
        return LABELS
    rows = []
    for name, value in sorted(labels.items(), key=lambda item: item[1]):
        known = BY_NAME.get(name)
        display = known.display if known else name.replace("_", " ")
        color = known.color_rgb if known else ((0, 0, 0) if value == 0 else _PALETTE[(value - 1) % len(_PALETTE)])
        rows.append(Label(int(value), name, display, color))
    return tuple(rows)
