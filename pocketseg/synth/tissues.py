"""Tissue classes of the phantom and their CT numbers per contrast phase.

Tissues are finer than FLARE labels (a kidney has cortex and medulla, the
stomach wall, contents and gas); the label map is painted alongside. HU values
follow typical adult abdominal CT: non-contrast liver 45-65 HU, portal-venous
liver 90-130 HU, portal-venous aorta 150-250 HU, fat about -100 HU, air -1000 HU.
"""

from __future__ import annotations

from enum import IntEnum

import numpy as np


class Tissue(IntEnum):
    AIR = 0
    SKIN = 1
    FAT_SUBCUT = 2
    MUSCLE = 3
    FAT_VISCERAL = 4
    BONE_CORTEX = 5
    BONE_CANCELLOUS = 6
    RIB = 7
    DISC = 8
    CSF = 9
    LUNG = 10
    HEART = 11
    MEDIASTINUM = 12
    BOWEL_WALL = 13
    BOWEL_FLUID = 14
    BOWEL_GAS = 15
    FECES = 16
    BLADDER = 17
    VESSEL = 18  # unlabelled vessels: iliac arteries, portal/splenic/mesenteric veins
    TABLE = 19
    LIVER = 20
    LIVER_VESSEL = 21
    KIDNEY_CORTEX = 22
    KIDNEY_MEDULLA = 23
    SPLEEN = 24
    PANCREAS = 25
    AORTA = 26
    IVC = 27
    ADRENAL = 28
    GALLBLADDER = 29
    ESOPHAGUS = 30
    STOMACH_WALL = 31
    STOMACH_CONTENT = 32
    STOMACH_GAS = 33
    DUODENUM_WALL = 34
    DUODENUM_CONTENT = 35
    TUMOR_0 = 40  # one class per tumor, each with its own density
    TUMOR_1 = 41
    TUMOR_2 = 42


BONE = (Tissue.BONE_CORTEX, Tissue.BONE_CANCELLOUS, Tissue.RIB)
#: Tissues an organ may displace when it is painted: fat, bowel and unlabelled vessels.
SOFT = (Tissue.FAT_VISCERAL, Tissue.BOWEL_WALL, Tissue.BOWEL_FLUID, Tissue.BOWEL_GAS, Tissue.FECES, Tissue.VESSEL)

PHASES = ("non-contrast", "portal-venous")


def hu_table(rng: np.random.Generator, phase: str) -> np.ndarray:
    """Per-case CT number (HU) of every tissue class, drawn from adult ranges for ``phase``."""
    if phase not in PHASES:
        raise ValueError(f"unknown phase {phase!r}; expected one of {PHASES}")
    pv = phase == "portal-venous"
    u = rng.uniform
    hu = np.full(256, -1000.0, dtype=np.float32)
    T = Tissue
    liver = u(90, 130) if pv else u(45, 65)
    cortex = u(150, 200) if pv else u(28, 40)
    hu[T.AIR] = -1000
    hu[T.SKIN] = u(20, 50)
    hu[T.FAT_SUBCUT] = u(-115, -90)
    hu[T.MUSCLE] = u(50, 70) if pv else u(40, 55)
    hu[T.FAT_VISCERAL] = u(-105, -80)
    hu[T.BONE_CORTEX] = u(800, 1200)
    hu[T.BONE_CANCELLOUS] = u(320, 420)
    hu[T.RIB] = u(450, 700)
    hu[T.DISC] = u(70, 100)
    hu[T.CSF] = u(5, 20)
    hu[T.LUNG] = u(-880, -820)
    hu[T.HEART] = u(130, 180) if pv else u(35, 50)
    hu[T.MEDIASTINUM] = u(-90, -60)
    hu[T.BOWEL_WALL] = u(70, 100) if pv else u(35, 50)
    hu[T.BOWEL_FLUID] = u(5, 30)
    hu[T.BOWEL_GAS] = -1000
    hu[T.FECES] = u(-120, 20)
    hu[T.BLADDER] = u(0, 15)
    hu[T.VESSEL] = u(140, 190) if pv else u(35, 50)
    hu[T.TABLE] = u(150, 300)
    hu[T.LIVER] = liver
    hu[T.LIVER_VESSEL] = liver + u(30, 60) if pv else liver - u(10, 20)
    hu[T.KIDNEY_CORTEX] = cortex
    hu[T.KIDNEY_MEDULLA] = u(90, 130) if pv else cortex - u(2, 6)
    hu[T.SPLEEN] = u(100, 130) if pv else u(40, 55)
    hu[T.PANCREAS] = u(80, 110) if pv else u(35, 50)
    hu[T.AORTA] = u(150, 250) if pv else u(35, 50)
    hu[T.IVC] = u(110, 160) if pv else u(35, 45)
    hu[T.ADRENAL] = u(45, 70) if pv else u(10, 30)
    hu[T.GALLBLADDER] = u(0, 20)
    hu[T.ESOPHAGUS] = u(60, 80) if pv else u(35, 50)
    hu[T.STOMACH_WALL] = u(80, 110) if pv else u(35, 50)
    hu[T.STOMACH_CONTENT] = u(5, 35)
    hu[T.STOMACH_GAS] = -1000
    hu[T.DUODENUM_WALL] = u(80, 110) if pv else u(35, 50)
    hu[T.DUODENUM_CONTENT] = u(5, 30)
    return hu
