"""FLARE 2023 label set, defined once for the whole package.

Label ids follow the FLARE 2023 challenge: 0 is background, 1-13 are the
abdominal organs and 14 is the pan-cancer tumor class.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType


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

BY_ID = MappingProxyType({lab.id: lab for lab in LABELS})
BY_NAME = MappingProxyType({lab.name: lab for lab in LABELS})


def label_id(name: str) -> int:
    """Id of a label given its snake_case name; raises KeyError naming the valid ones."""
    try:
        return BY_NAME[name].id
    except KeyError:
        raise KeyError(f"unknown label {name!r}; known: {', '.join(BY_NAME)}") from None


def dataset_json_labels() -> dict[str, int]:
    """The ``labels`` entry of an nnU-Net v2 dataset.json (name -> id)."""
    return {lab.name: lab.id for lab in LABELS}
