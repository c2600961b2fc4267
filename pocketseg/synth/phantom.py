"""A FLARE-like abdominal CT phantom: anatomy, labels and CT numbers for one case.

Anatomy is laid out in patient millimetres, RAS+ (x to the patient's right,
y anterior, z superior), with z = 0 near the renal hila (L1/L2). Organ
positions are given for a standard trunk and stretched to each case's body
habitus; sizes, shapes and positions vary per case. The result is returned on
a canonical RAS grid and then flipped to the case's stored orientation.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

from pocketseg import labels as L
from pocketseg.synth.canvas import Canvas
from pocketseg.synth.shapes import Ellipsoid, Tube, Wobble, jitter, rotation
from pocketseg.synth.tissues import PHASES, SOFT, Tissue, hu_table

log = logging.getLogger(__name__)
T = Tissue

#: Orientations a case may be stored in (all axis-aligned: flips of the RAS grid).
ORIENTATIONS = ("RAS", "LPS", "LAS", "LPI", "RPS")
#: Adult organ volume ranges (mL) the phantom aims at; checked by the tests.
VOLUME_RANGES_ML = {
    "liver": (1000, 2200), "spleen": (100, 400), "right_kidney": (100, 250), "left_kidney": (100, 250),
    "pancreas": (40, 120), "gallbladder": (10, 60), "right_adrenal_gland": (2, 8), "left_adrenal_gland": (2, 8),
}
#: Organs that may host tumors, with the tumor diameter range (mm) each can hold.
TUMOR_HOSTS = {"liver": (5.0, 80.0), "right_kidney": (8.0, 50.0), "left_kidney": (8.0, 50.0),
               "pancreas": (8.0, 30.0), "stomach": (8.0, 40.0)}


@dataclass(frozen=True)
class GridSpec:
    """The output voxel grid: matrix, spacings and slice count of one case."""

    matrix: int
    slices: int
    inplane_mm: float
    slice_mm: float


@dataclass(frozen=True, eq=False)
class Phantom:
    """One synthetic case in its stored orientation (voxel order i, j, k)."""

    image: np.ndarray  # int16 HU
    labels: np.ndarray  # uint8 FLARE 2023 ids
    tissue: np.ndarray  # uint8 Tissue classes (not written to disk; for tests and previews)
    affine: np.ndarray  # voxel -> world RAS mm
    meta: dict[str, Any] = field(default_factory=dict)


def choose_grid(rng: np.random.Generator, *, slices: int | None, small: bool, matrix: int | None,
                body_width_mm: float) -> GridSpec:
    """Pick matrix, spacings and slice count: the in-plane field of view always holds the body."""
    if small:
        n = matrix or 128
        inplane = float(rng.uniform(1.0, 1.15) * (body_width_mm + 40) / n)
    else:
        n = matrix or 512
        lo = max(0.6, (body_width_mm + 40) / n)
        inplane = float(rng.uniform(lo, max(lo, 1.0)))
    if slices is None:
        slices = int(rng.integers(60, 121)) if small else int(rng.integers(50, 601))
    if slices < 1:
        raise ValueError(f"slices must be >= 1, got {slices}")
    # Scans cover about 34-48 cm (lung bases to below the kidneys); the slice spacing follows from the count (0.8-5 mm, as in FLARE).
    extent = float(rng.uniform(340, 480))
    slice_mm = float(np.clip(extent / slices, 0.8, 5.0))
    return GridSpec(matrix=int(n), slices=int(slices), inplane_mm=round(inplane, 4), slice_mm=round(slice_mm, 4))


class _Case:
    """Draws one patient's anatomy and paints it on a canvas."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng
        u = rng.uniform
        self.a = u(145, 180)  # body half-width, mm
        self.b = u(100, 128)  # body half-depth (anterior), mm
        self.fat = u(8, 35)  # subcutaneous fat thickness, mm
        self.muscle = u(8, 13)
        self.zs = u(0.93, 1.07)  # cranio-caudal scale of the trunk
        self.y_post = -0.92 * self.b
        self.spine_y = self.y_post + 0.4 * self.fat + 62
        self.cavity_front = self.b - self.fat - self.muscle - 2
        self.cavity_half = self.a - 0.8 * self.fat - self.muscle - 4
        self.dome_r = 165 * self.zs + rng.normal(0, 6)
        self.dome_l = self.dome_r - u(5, 20)
        self.phase = PHASES[int(rng.integers(0, 2))]
        self.vertebra_phase = u(0, 36)

    # Standard trunk: spine centre at y=-38, anterior cavity wall at y=+85, cavity half-width 125.
    def at(self, x: float, y: float, z: float, sd: float = 0.0) -> tuple[float, float, float]:
        """Map a standard-trunk position to this patient, with optional Gaussian jitter (mm)."""
        j = self.rng.normal(0, sd, 3) if sd else np.zeros(3)
        span = (self.cavity_front - self.spine_y) / 123.0
        return (x * self.cavity_half / 125.0 + j[0], self.spine_y + (y + 38.0) * span + j[1], z * self.zs + j[2])

    def path(self, pts: list[tuple[float, float, float]], sd: float) -> np.ndarray:
        return jitter(self.rng, [self.at(*p) for p in pts], sd)

    def semi(self, semi: tuple[float, float, float], volume_factor: tuple[float, float]) -> tuple[float, float, float]:
        f = self.rng.uniform(*volume_factor) ** (1 / 3)
        return tuple(float(s * f * self.rng.uniform(0.93, 1.07)) for s in semi)  # type: ignore[return-value]

    def dome(self, X: np.ndarray, Y: np.ndarray) -> np.ndarray:
        """Height (mm) of the diaphragm over each (x, y): two domes, lower posteriorly (costophrenic recess)."""
        right = self.dome_r - 45 * (((X - 65) / 85) ** 2 + ((Y - 5) / 95) ** 2)
        left = self.dome_l - 45 * (((X + 65) / 85) ** 2 + ((Y - 5) / 95) ** 2)
        posterior = np.clip((self.spine_y + 10 - Y) / 60, 0, 1) ** 2 * 40
        return np.maximum(right, left) - posterior

    # ------------------------------------------------------------------ body
    def paint_body(self, cv: Canvas) -> None:
        """Body wall, thorax, spine, ribs and table, slice by slice.

        The cross-section changes with z only through the body half-width, so the
        wall layers are computed once per distinct width (0.5 mm steps) and reused.
        """
        X2 = cv.x[:, None]
        Y2 = cv.y[None, :]
        theta = np.arctan2(Y2, X2)  # anterior = +pi/2
        dome2 = self.dome(X2, Y2)
        fat_t = self.fat * (0.55 + 0.45 * np.sin(theta) ** 2 * (Y2 > 0) + 0.25 * (Y2 <= 0))
        wall_t = np.where(Y2 < self.spine_y, self.muscle * 0.8, self.muscle)
        psi = np.abs(np.arctan2(X2, -(Y2 - self.spine_y)))  # 0 posterior midline, pi anterior
        rib_margin = (-30 + 150 * (psi / np.pi) ** 1.6) * self.zs
        rib_phase = 150 * psi / np.pi  # ribs drop ~15 cm from the spine to the costal cartilage
        canal_y = self.spine_y - 28
        wob = Wobble.random(self.rng, 0.04, (150, 300), n=3)
        yn = np.where(Y2 >= 0, Y2 / self.b, Y2 / -self.y_post)
        x_pow, y_pow = np.abs(X2) ** 2.2, np.abs(yn) ** 2.2
        rho = np.sqrt(X2**2 + Y2**2)
        yt = self.y_post - 12
        table = (Y2 < yt) & (Y2 > yt - 5) & (np.abs(X2) < 200)
        anterior_gap = (np.abs(X2) < 25) & (Y2 > 0)
        para = (((np.abs(X2) - 32) / 27) ** 2 + ((Y2 - (canal_y - 8)) / 22) ** 2) <= 1
        templates: dict[int, tuple] = {}

        def template(key: int):
            if key not in templates:
                rn = (x_pow * np.float32((key / 2) ** -2.2) + y_pow) ** np.float32(1 / 2.2)
                depth = rho * (1 - rn) / np.maximum(rn, 1e-3)
                inside = rn <= 1
                tis = np.zeros(rn.shape, dtype=np.uint8)
                tis[inside] = T.FAT_VISCERAL
                tis[inside & (depth < fat_t + wall_t + 2)] = T.MUSCLE
                tis[inside & para & (depth > fat_t)] = T.MUSCLE
                tis[inside & (depth < fat_t + 2)] = T.FAT_SUBCUT
                tis[inside & (depth < 2)] = T.SKIN
                tis[table & ~inside] = T.TABLE
                cavity = inside & (depth >= fat_t + wall_t + 2)
                band = np.flatnonzero((inside & (depth > fat_t + 3) & (depth < fat_t + 12)).ravel())
                templates[key] = (tis, cavity, band)
            return templates[key]

        spine = self.spine_stamps(cv, canal_y)
        hx, hy, _ = self.at(-15, 40, 0)
        hz = self.dome_r + 40
        for k, z in enumerate(cv.z):
            zf = float(z)
            a = self.a * (1 + float(wob(np.float32(0), np.float32(0), z)))
            if zf < -150:  # pelvis widens towards the hips
                a *= 1 + 0.12 * min(1.0, (-150 - zf) / 80)
            base, cavity, band = template(int(round(a * 2)))
            tis = base.copy()
            if zf > dome2.min():
                thorax = cavity & (z > dome2)
                tis[thorax] = T.LUNG
                tis[thorax & (np.abs(X2 + 5) < 28) & (Y2 > self.spine_y - 5) & (Y2 < self.cavity_front - 5)] = T.MEDIASTINUM
                tis[thorax & (((X2 - hx) / 70) ** 2 + ((Y2 - hy) / 55) ** 2 + ((zf - hz) / 62) ** 2 <= 1)] = T.HEART
            if zf < 40 * self.zs:  # psoas muscles, growing caudally
                r = 6 + 16 * min(1.0, max(0.0, (40 * self.zs - zf) / 170))
                tis[cavity & ((((np.abs(X2) - 36 - r * 0.6) / r) ** 2 + ((Y2 - self.spine_y - 6) / (r * 0.9)) ** 2) <= 1)] = T.MUSCLE
            # Ribs: oblique bands in the wall, descending anteriorly, above the costal margin.
            flat_margin, flat_phase, flat_gap = rib_margin.ravel(), rib_phase.ravel(), anterior_gap.ravel()
            u = (zf + flat_phase.take(band)) / 32.0
            on = (zf > flat_margin.take(band)) & ((u - np.floor(u)) < 0.3) & ~(flat_gap.take(band) & (zf < 150 * self.zs))
            tis.ravel()[band[on]] = T.RIB
            region, stamp = spine[bool(((zf + self.vertebra_phase) / (36.0 * self.zs)) % 1.0 < 0.24)]
            np.copyto(tis[region], stamp, where=stamp != 255)
            cv.tissue[:, :, k] = tis

    def spine_stamps(self, cv: Canvas, canal_y: float):
        """Axial stamps (255 = leave as is) of a vertebra at a disc level and at a bone level."""
        sx = slice(int(np.searchsorted(cv.x, -50)), int(np.searchsorted(cv.x, 50, side="right")))
        sy = slice(int(np.searchsorted(cv.y, canal_y - 45)), int(np.searchsorted(cv.y, self.spine_y + 20, side="right")))
        X2, Y2 = cv.x[sx, None], cv.y[None, sy]
        rx, ry = 22.0, 17.0
        body = ((X2 / rx) ** 2 + ((Y2 - self.spine_y) / ry) ** 2) <= 1
        inner = ((X2 / (rx - 3)) ** 2 + ((Y2 - self.spine_y) / (ry - 3)) ** 2) <= 1
        canal_r = np.sqrt(X2**2 + (Y2 - canal_y) ** 2)
        stamps = {}
        for disc in (True, False):
            st = np.full(body.shape, 255, dtype=np.uint8)
            if disc:
                st[body] = T.DISC
            else:
                st[body] = T.BONE_CORTEX
                st[inner] = T.BONE_CANCELLOUS
                st[(canal_r > 9) & (canal_r < 14) & (Y2 < self.spine_y - ry + 4)] = T.BONE_CORTEX
                spinous = (np.abs(X2) < 4) & (Y2 < canal_y - 9) & (Y2 > canal_y - 40)
                transverse = (np.abs(Y2 - canal_y - 3 + 0.15 * np.abs(X2)) < 4) & (np.abs(X2) < 38) & (np.abs(X2) > 9)
                st[spinous | transverse] = T.BONE_CORTEX
            st[canal_r <= 9] = T.CSF
            stamps[disc] = ((sx, sy), st)
        return stamps

    # ------------------------------------------------------------------ bowel
    def paint_bowel(self, cv: Canvas) -> None:
        rng = self.rng
        colon = Tube(self.path([(88, 5, -150), (90, 0, -60), (85, 10, -5), (60, 60, 0), (0, 75, -25), (-60, 55, 20),
                                (-88, 10, 45), (-92, 0, -40), (-85, 5, -140), (-40, 20, -200), (0, 10, -215)], 6),
                     radii=rng.uniform(17, 26, 11))
        found = cv.tube_distance(colon)
        if found is not None:
            region, sd = found
            inside = sd <= 0
            gas = inside & (cv.y[None, region[1], None] > self.at(0, 40 + rng.uniform(-10, 25), 0)[1])
            # Stool: gas bubbles in a mottled pattern (a random field of ~1 cm features, thresholded).
            bubbles = Wobble.random(rng, 1.0, (6, 16), n=7)
            mottled = inside & (bubbles(cv.x[region[0], None, None], cv.y[None, region[1], None], cv.z[None, None, region[2]]) > 0.35)
            cv.paint_mask(region, inside & (sd > -3), T.BOWEL_WALL, replace=[T.FAT_VISCERAL])
            cv.paint_mask(region, inside & (sd <= -3), T.FECES, replace=[T.FAT_VISCERAL])
            cv.paint_mask(region, (mottled | gas) & (sd <= -3), T.BOWEL_GAS, replace=[T.FECES])
        # Small bowel: a persistent random walk through the mid and lower abdomen.
        lo = np.array(self.at(-80, -5, -210))
        hi = np.array(self.at(75, 70, -25))
        p = np.array(self.at(-30, 30, -30))
        heading = np.array([0.0, 0.0, -1.0])
        pts = [p.copy()]
        for _ in range(44):
            heading = heading + rng.normal(0, 0.8, 3)
            heading /= np.linalg.norm(heading)
            p = np.clip(p + heading * 28, lo, hi)
            pts.append(p.copy())
        loops = Tube(np.array(pts), radii=rng.uniform(10, 14, len(pts)))
        found = cv.tube_distance(loops)
        if found is not None:
            region, sd = found
            inside = sd <= 0
            cv.paint_mask(region, inside & (sd > -2.5), T.BOWEL_WALL, replace=[T.FAT_VISCERAL])
            cv.paint_mask(region, inside & (sd <= -2.5), T.BOWEL_FLUID, replace=[T.FAT_VISCERAL])
            gas = inside & (sd <= -2.5) & (np.cos(cv.x[region[0], None, None] * 0.05 + cv.z[None, None, region[2]] * 0.03)
                                           * np.cos(cv.y[None, region[1], None] * 0.04) > 0.8)
            cv.paint_mask(region, gas, T.BOWEL_GAS, replace=[T.BOWEL_FLUID])
        # Pelvis (long scans only): iliac wings, bladder, femoral heads.
        for side in (1, -1):
            wing = Ellipsoid(self.at(side * 95, -25, -190), (12, 45, 55), rotation(about="z", deg=side * 35),
                             Wobble.random(rng, 0.1))
            cv.paint(wing, T.BONE_CORTEX)
            cv.paint(Ellipsoid(wing.center, (7, 40, 50), wing.rot), T.BONE_CANCELLOUS, replace=[T.BONE_CORTEX])
            head = Ellipsoid(self.at(side * 92, 0, -300), (24, 24, 24))
            cv.paint(head, T.BONE_CORTEX)
            cv.paint(Ellipsoid(head.center, (20, 20, 20)), T.BONE_CANCELLOUS, replace=[T.BONE_CORTEX])
        cv.paint(Ellipsoid(self.at(0, 55, -270), self.semi((45, 35, 35), (0.5, 1.5)), wobble=Wobble.random(rng, 0.08)),
                 T.BLADDER, replace=SOFT)

    # ------------------------------------------------------------------ organs
    def paint_organs(self, cv: Canvas) -> dict[str, Any]:
        rng = self.rng
        soft = list(SOFT)
        lab = L.BY_NAME

        # Liver: a large right lobe and a thinner left lobe crossing the midline anteriorly.
        liver_factor = (0.75, 1.3)
        right = Ellipsoid(self.at(70, 8, 85, 5), self.semi((62, 80, 70), liver_factor), rotation(rng, 8),
                          Wobble.random(rng, 0.16))
        left = Ellipsoid(self.at(-12, 42, 100, 5), self.semi((55, 36, 30), liver_factor),
                         rotation(rng, 10, about="y", deg=-12), Wobble.random(rng, 0.18))
        for lobe in (right, left):
            cv.paint(lobe, T.LIVER, lab["liver"].id, replace=soft)

        spleen = Ellipsoid(self.at(-92, -28, 88, 6), self.semi((23, 52, 46), (0.6, 1.6)),
                           rotation(rng, 8, about="z", deg=35), Wobble.random(rng, 0.14))
        hilum = Ellipsoid((spleen.center[0] + 26, spleen.center[1] + 22, spleen.center[2]), (18, 22, 30))
        cv.paint(lambda X, Y, Z: spleen(X, Y, Z) & ~hilum(X, Y, Z), T.SPLEEN, lab["spleen"].id,
                 bounds=spleen.bounds(), replace=soft)

        for name, x, z, sign in (("right_kidney", 68, -12, 1), ("left_kidney", -66, 4, -1)):
            semi = self.semi((26, 24, 54), (0.92, 1.42))
            c = self.at(x, -44, z, 5)
            rot = rotation(rng, 5, about="z", deg=-sign * 30) @ rotation(about="y", deg=sign * 12)
            kidney = Ellipsoid(c, semi, rot, Wobble.random(rng, 0.07))
            notch = Ellipsoid((c[0] - sign * semi[0] * 1.05, c[1] + semi[1] * 0.35, c[2]), (14, 14, 20))
            done = cv.paint(lambda X, Y, Z, k=kidney, n=notch: k(X, Y, Z) & ~n(X, Y, Z), T.KIDNEY_CORTEX,
                            lab[name].id, bounds=kidney.bounds(), replace=soft + [T.LIVER, T.MUSCLE])
            if done:
                medulla = Ellipsoid(c, tuple(s * 0.68 for s in semi), rot)
                cv.paint(medulla, T.KIDNEY_MEDULLA, lab[name].id, replace=[T.KIDNEY_CORTEX])

        # Stomach: a J-shaped tube from the fundus under the left dome to the pylorus.
        stomach = Tube(self.path([(-62, -12, 122), (-70, 14, 98), (-55, 40, 62), (-20, 55, 40), (5, 52, 36), (18, 46, 36)], 5),
                       radii=np.array([34, 36, 30, 23, 15, 11]) * rng.uniform(0.85, 1.15))
        found = cv.tube_distance(stomach)
        if found is not None:
            region, sd = found
            inside = sd <= 0
            sid = lab["stomach"].id
            cv.paint_mask(region, inside & (sd > -4), T.STOMACH_WALL, sid, replace=soft)
            cv.paint_mask(region, inside & (sd <= -4), T.STOMACH_CONTENT, sid, replace=soft)
            level = self.at(0, 28 + rng.uniform(0, 25), 0)[1]  # supine: gas rises anteriorly
            cv.paint_mask(region, inside & (sd <= -4) & (cv.y[None, region[1], None] > level), T.STOMACH_GAS, sid,
                          replace=[T.STOMACH_CONTENT])

        gb = Ellipsoid(self.at(45, 50, 25, 5), self.semi((14, 15, 32), (0.45, 1.6)), rotation(rng, 10, about="x", deg=35),
                       Wobble.random(rng, 0.08))
        cv.paint(gb, T.GALLBLADDER, lab["gallbladder"].id, replace=soft + [T.LIVER])

        pancreas = Tube(self.path([(28, 8, -25), (35, 14, -8), (12, 28, 5), (-20, 26, 18), (-50, 12, 32), (-72, -6, 45)], 3),
                        radii=np.array([13, 17, 12.5, 12, 11, 9.5]) * rng.uniform(0.88, 1.12), flatten=(1.0, 0.85, 1.0))
        found = cv.tube_distance(pancreas)
        if found is not None:
            region, sd = found
            cv.paint_mask(region, sd <= 0, T.PANCREAS, lab["pancreas"].id, replace=soft)

        # Duodenum: a C-loop whose descending part hugs the pancreatic head (placed from the head, not
        # from the trunk frame, so the two stay in contact for any body habitus).
        duo_r = rng.uniform(10, 13)
        duo_pts = self.path([(18, 46, 36), (38, 36, 38), (55, 16, 28), (56, 8, 0), (55, 10, -30), (46, 14, -50),
                             (20, 22, -56), (-5, 24, -52), (-25, 24, -40), (-32, 26, -22)], 3)
        shift = pancreas.points[1][0] + pancreas.radii[1] + duo_r - 4 - duo_pts[3][0]
        duo_pts[:, 0] += shift * np.array([0, 0.5, 1, 1, 1, 0.5, 0, 0, 0, 0])
        duodenum = Tube(duo_pts, radii=np.full(10, duo_r))
        found = cv.tube_distance(duodenum)
        if found is not None:
            region, sd = found
            did = lab["duodenum"].id
            cv.paint_mask(region, (sd <= 0) & (sd > -3), T.DUODENUM_WALL, did, replace=soft)
            cv.paint_mask(region, sd <= -3, T.DUODENUM_CONTENT, did, replace=soft)

        # Adrenal glands: thin inverted-Y plates above and medial to the upper renal poles.
        for name, x, y, z, sign in (("right_adrenal_gland", 36, -28, 56, 1), ("left_adrenal_gland", -38, -22, 56, -1)):
            c = self.at(x, y, z, 3)
            f = self.semi((1, 1, 1), (0.75, 1.7))
            limbs = [Ellipsoid(c, (3.2 * f[0], 11 * f[1], 16 * f[2]), rotation(rng, 6, about="z", deg=sign * 25 + d),
                               Wobble.random(rng, 0.1)) for d in (-25, 25)]
            cv.paint(lambda X, Y, Z, l=limbs: l[0](X, Y, Z) | l[1](X, Y, Z),
                     T.ADRENAL, lab[name].id, bounds=_union_bounds(limbs), replace=soft + [T.LIVER])

        # Unlabelled veins: portal, splenic and superior mesenteric, and the iliac arteries.
        for pts, r in (([(8, 14, 0), (22, 22, 30), (38, 20, 52)], 7), ([(8, 14, 0), (-35, 6, 20), (-75, -12, 55)], 5),
                       ([(8, 14, 0), (10, 22, -60), (12, 30, -120)], 5.5),
                       ([(-12, -5, -92), (30, -2, -160), (70, 5, -250)], 6), ([(-12, -5, -92), (-50, -2, -160), (-75, 5, -250)], 6)):
            found = cv.tube_distance(Tube(self.path(pts, 2), radii=np.full(len(pts), r)))
            if found is not None:
                region, sd = found
                cv.paint_mask(region, sd <= 0, T.VESSEL, replace=[T.FAT_VISCERAL, T.BOWEL_WALL, T.BOWEL_FLUID])
                cv.paint_mask(region, sd <= 0, T.LIVER_VESSEL, lab["liver"].id, replace=[T.LIVER])
        # Hepatic veins converging on the intrahepatic IVC.
        for end in ((90, 10, 110), (40, 40, 130), (-20, 45, 115)):
            found = cv.tube_distance(Tube(self.path([(28, -14, 150), end], 4), radii=np.array([6.0, 3.0])))
            if found is not None:
                region, sd = found
                cv.paint_mask(region, sd <= 0, T.LIVER_VESSEL, lab["liver"].id, replace=[T.LIVER])

        ivc = Tube(self.path([(24, -6, -100), (24, -6, 0), (26, -8, 60), (28, -16, 120), (22, -12, 172)], 2),
                   radii=np.full(5, rng.uniform(9, 12)), flatten=(1.25, 0.8, 1.0))
        found = cv.tube_distance(ivc)
        if found is not None:
            region, sd = found
            cv.paint_mask(region, sd <= 0, T.IVC, lab["inferior_vena_cava"].id, replace=soft + [T.LIVER, T.LIVER_VESSEL, T.MUSCLE])

        top = float(cv.z[-1]) + 40
        aorta = Tube(self.path([(-34, -24, top / self.zs), (-32, -22, 180), (-20, -12, 115), (-14, -6, 40), (-12, -5, -40),
                                (-11, -5, -92)], 2), radii=np.array([13, 13, 12.5, 12, 11, 10]) * rng.uniform(0.85, 1.15))
        found = cv.tube_distance(aorta)
        if found is not None:
            region, sd = found
            cv.paint_mask(region, sd <= 0, T.AORTA, lab["aorta"].id,
                          replace=soft + [T.MEDIASTINUM, T.LUNG, T.MUSCLE, T.HEART])

        eso = Tube(self.path([(-2, -8, top / self.zs), (-4, -6, 210), (-14, 4, 165), (-32, 8, 138), (-48, 2, 124)], 2),
                   radii=np.array([7.5, 7.5, 8, 8.5, 9]) * rng.uniform(0.9, 1.2), flatten=(1.0, 0.75, 1.0))
        found = cv.tube_distance(eso)
        if found is not None:
            region, sd = found
            cv.paint_mask(region, sd <= 0, T.ESOPHAGUS, lab["esophagus"].id,
                          replace=soft + [T.MEDIASTINUM, T.LUNG, T.HEART, T.MUSCLE])
        return self.paint_tumors(cv)

    def paint_tumors(self, cv: Canvas) -> list[dict[str, Any]]:
        rng = self.rng
        n = int(rng.choice([0, 0, 1, 1, 2, 3]))
        tumors: list[dict[str, Any]] = []
        hosts = list(TUMOR_HOSTS)
        weights = np.array([0.45, 0.15, 0.15, 0.15, 0.10])
        for t in range(n):
            host = hosts[int(rng.choice(len(hosts), p=weights))]
            host_id = L.BY_NAME[host].id
            idx = np.flatnonzero(cv.labels.ravel(order="F") == host_id)
            if idx.size < 50:
                continue
            lo, hi = TUMOR_HOSTS[host]
            diameter = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
            i, j, k = np.unravel_index(idx[int(rng.integers(idx.size))], cv.shape, order="F")
            centre = (float(cv.x[i]), float(cv.y[j]), float(cv.z[k]))
            r = diameter / 2
            blob = Ellipsoid(centre, (r * rng.uniform(0.85, 1.15), r * rng.uniform(0.85, 1.15), r * rng.uniform(0.85, 1.15)),
                             rotation(rng, 40), Wobble.random(rng, 0.12, (15, 40)))
            done = cv.paint(blob, T.TUMOR_0 + len(tumors), L.TUMOR, inside_label=host_id)
            if done is None or not done[1].any():
                continue
            tumors.append({"host": host, "diameter_mm": round(diameter, 1), "centre_mm": [round(c, 1) for c in centre],
                           "density": "hypo" if rng.random() < 0.7 else "hyper"})
        return tumors


def _union_bounds(solids) -> tuple[np.ndarray, np.ndarray]:
    los, his = zip(*(s.bounds() for s in solids))
    return np.min(los, axis=0), np.max(his, axis=0)


def _kernel(sigma: float) -> np.ndarray:
    delta = np.zeros(9)
    delta[4] = 1
    return ndi.gaussian_filter1d(delta, sigma, truncate=2.5)


def render(cv: Canvas, hu: np.ndarray, rng: np.random.Generator, noise_sd: float, blur_mm: float) -> np.ndarray:
    """CT numbers from tissue classes: partial-volume blur and correlated quantum noise, as int16 HU.

    Works slice by slice (cache-friendly): in-plane blur by the reconstruction
    kernel (~``blur_mm``), then a short blur across slices for the slice profile.
    White noise is added before the blur and pre-scaled so the final noise SD is ``noise_sd``.
    """
    sx, sy, _ = cv.spacing_mm
    sig_xy = (max(blur_mm / sx, 0.35), max(blur_mm / sy, 0.35))
    kz = _kernel(0.45)[3:6].astype(np.float32)
    kz /= kz.sum()
    gain = float(np.sqrt((_kernel(sig_xy[0]) ** 2).sum() * (_kernel(sig_xy[1]) ** 2).sum() * (kz**2).sum()))
    amp = np.float32(noise_sd / gain)
    nx, ny, nz = cv.shape
    planes = np.empty((nx, ny, nz), dtype=np.float32, order="F")
    for k in range(nz):
        plane = hu[cv.tissue[:, :, k]]
        plane += rng.standard_normal(plane.shape, dtype=np.float32) * amp
        ndi.gaussian_filter(plane, sig_xy, output=planes[:, :, k], truncate=2.5)
    out = np.empty((nx, ny, nz), dtype=np.int16, order="F")
    acc = np.empty((nx, ny), dtype=np.float32, order="F")
    for k in range(nz):
        below, above = planes[:, :, max(k - 1, 0)], planes[:, :, min(k + 1, nz - 1)]
        np.multiply(planes[:, :, k], kz[1], out=acc)
        acc += (below + above) * kz[0]
        np.clip(acc, -1024, 3071, out=acc)
        np.rint(acc, out=acc)
        out[:, :, k] = acc
    return out


def make_phantom(seed: int | np.random.SeedSequence = 0, *, slices: int | None = None, small: bool = False,
                 matrix: int | None = None, orientation: str | None = None, phase: str | None = None) -> Phantom:
    """Synthesize one abdominal CT case with FLARE 2023 labels.

    ``seed`` fixes everything (anatomy, grid, noise); ``slices`` forces the slice
    count, ``small`` gives a 128x128 matrix for tests, ``matrix`` any in-plane
    size, ``orientation`` (one of ORIENTATIONS) and ``phase`` (one of PHASES)
    override the random choices.
    """
    ss = seed if isinstance(seed, np.random.SeedSequence) else np.random.SeedSequence(int(seed))
    rng = np.random.default_rng(ss)
    case = _Case(rng)
    if phase is not None:
        if phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
        case.phase = phase
    grid = choose_grid(rng, slices=slices, small=small, matrix=matrix, body_width_mm=2 * case.a * 1.15)
    orient = str(rng.choice(ORIENTATIONS))  # always drawn, so an override leaves the anatomy unchanged
    orient = orientation or orient
    if orient not in ORIENTATIONS:
        raise ValueError(f"orientation must be one of {ORIENTATIONS}, got {orient!r}")

    n = grid.matrix
    cx, cy = rng.normal(0, 6), -8 + rng.normal(0, 6)
    x = (np.arange(n) - (n - 1) / 2) * grid.inplane_mm + cx
    y = (np.arange(n) - (n - 1) / 2) * grid.inplane_mm + cy
    z_top = max(case.dome_r, case.dome_l) + rng.uniform(15, 60)
    z = z_top - (grid.slices - 1 - np.arange(grid.slices)) * grid.slice_mm
    cv = Canvas(x, y, z)

    case.paint_body(cv)
    case.paint_bowel(cv)
    tumors = case.paint_organs(cv)

    hu = hu_table(rng, case.phase)
    for t, tumor in enumerate(tumors):
        host_hu = hu[{"liver": T.LIVER, "stomach": T.STOMACH_WALL, "pancreas": T.PANCREAS}.get(tumor["host"], T.KIDNEY_CORTEX)]
        delta = rng.uniform(25, 60)
        hu[T.TUMOR_0 + t] = host_hu - delta if tumor["density"] == "hypo" else host_hu + delta
    noise_sd = float(rng.uniform(12, 22) if case.phase == "non-contrast" else rng.uniform(9, 16))
    image = render(cv, hu, rng, noise_sd=noise_sd, blur_mm=float(rng.uniform(0.45, 0.75)))

    # Canonical affine: voxel (i, j, k) -> patient mm; a random table offset moves the world origin.
    offset = np.array([rng.uniform(-20, 20), rng.uniform(-200, -120), rng.uniform(-900, -300)])
    canon = np.diag([grid.inplane_mm, grid.inplane_mm, grid.slice_mm, 1.0])
    canon[:3, 3] = np.array([x[0], y[0], z[0]]) + offset
    transform = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"),
                                                nib.orientations.axcodes2ornt(tuple(orient)))
    affine = canon @ nib.orientations.inv_ornt_aff(transform, cv.shape)

    def orient_array(a: np.ndarray) -> np.ndarray:
        return np.asfortranarray(nib.orientations.apply_orientation(a, transform))

    voxel_ml = grid.inplane_mm**2 * grid.slice_mm / 1000.0
    counts = np.bincount(cv.labels.ravel(order="F"), minlength=L.NUM_CLASSES)
    meta = {
        "phase": case.phase,
        "orientation": orient,
        "shape": [n, n, grid.slices],
        "spacing_mm": [grid.inplane_mm, grid.inplane_mm, grid.slice_mm],
        "noise_sd_hu": round(noise_sd, 1),
        "volumes_ml": {lab.name: round(float(counts[lab.id]) * voxel_ml, 2) for lab in L.LABELS[1:]},
        "tumors": tumors,
        "hu": {t.name.lower(): round(float(hu[t]), 1) for t in Tissue if t < T.TUMOR_0},
    }
    return Phantom(image=orient_array(image), labels=orient_array(cv.labels), tissue=orient_array(cv.tissue),
                   affine=affine, meta=meta)
