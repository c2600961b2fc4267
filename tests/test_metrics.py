"""FLARE 2023 DSC and NSD (pocketseg.evaluation.metrics).

* Surfel areas: hand-derived marching-cubes areas of single codes at an
  anisotropic spacing, complement symmetry, and the total surface of a box.
* Rules: both empty -> 1/1, one empty -> 0/0, identical -> 1/1, NSD 0 below DSC 0.2
  (and not at exactly 0.2), tolerance per class.
* NSD geometry: a one-voxel shift of a box against the analytic value, shifts
  within the tolerance, coarse vs fine axis; exact distances against a
  brute-force KD-tree, and NSD against a dense point sampling of two spheres.
* Aorta/IVC/esophagus are scored on the ground truth's slices only, along the
  axis given as ``z_axis`` (here the first voxel axis); other organs are not.

Array tests run on NumPy here and on CuPy where a GPU is lent (``backend`` fixture).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.ndimage
from numpy.lib.stride_tricks import sliding_window_view
from scipy.spatial import cKDTree

from pocketseg.evaluation.metrics import (
    COLUMNS,
    SLICE_RESTRICTED_IDS,
    TOLERANCE_MM,
    dice,
    normalized_surface_dice,
    score_case,
    surface_distances,
    surfel_area_table,
)
from pocketseg.runtime.arrays import ArrayModule

SPACING = (0.7, 1.1, 2.3)  # all different, so any axis mix-up shows


def box(shape, lo, hi) -> np.ndarray:
    m = np.zeros(shape, dtype=bool)
    m[tuple(slice(a, b) for a, b in zip(lo, hi))] = True
    return m


def corner_area(s0, s1, s2) -> float:
    """Marching-cubes triangle cutting off one corner of a cell of size s0 x s1 x s2."""
    return math.sqrt((s1 * s2) ** 2 + (s0 * s2) ** 2 + (s0 * s1) ** 2) / 8


def box_surface_area(n, s) -> float:
    """Marching-cubes surface of a voxel box of n0 x n1 x n2 voxels: flat faces, chamfered edges, corner triangles."""
    (n0, n1, n2), (s0, s1, s2) = n, s
    faces = 2 * ((n1 - 1) * (n2 - 1) * s1 * s2 + (n0 - 1) * (n2 - 1) * s0 * s2 + (n0 - 1) * (n1 - 1) * s0 * s1)
    edges = 4 * 0.5 * ((n2 - 1) * s2 * math.hypot(s0, s1) + (n1 - 1) * s1 * math.hypot(s0, s2)
                       + (n0 - 1) * s0 * math.hypot(s1, s2))
    return faces + edges + 8 * corner_area(s0, s1, s2)


def shifted_box_nsd(n, s) -> float:
    """NSD of a voxel box against itself shifted by one voxel along axis 0, tolerance below every spacing.

    Surfels on the side faces coincide (distance 0); the trailing face of each box
    (with its rim and corners) and the interior of its leading face are one voxel
    away from the other surface, so they fall outside the tolerance.
    """
    (_, n1, n2), (s0, s1, s2) = n, s
    interior = (n1 - 1) * (n2 - 1) * s1 * s2
    trailing = interior + 2 * 0.5 * ((n2 - 1) * s2 * math.hypot(s0, s1) + (n1 - 1) * s1 * math.hypot(s0, s2)) \
        + 4 * corner_area(s0, s1, s2)
    return 1 - (trailing + interior) / box_surface_area(n, s)


# --------------------------------------------------------------------------- surfel areas


def test_surfel_areas_of_single_codes():
    s0, s1, s2 = SPACING
    table = surfel_area_table(SPACING)
    assert table[0] == table[255] == 0
    # Corner (a, b, c) of the 2x2x2 neighbourhood sets bit 7 - (4a + 2b + c).
    assert table[0b00000001] == pytest.approx(corner_area(s0, s1, s2))  # one corner cut off
    assert table[0b00000011] == pytest.approx(s2 * 0.5 * math.hypot(s0, s1))  # an edge along axis 2: a chamfer
    assert table[0b00001111] == pytest.approx(s1 * s2)  # the four corners with a = 1: a flat face across axis 0
    # Three corners of one face: a flat triangle across the cell plus a planar quad (classic marching-cubes case 5).
    assert table[0b00000111] == pytest.approx(0.5 * s1 * s2 + 3 * corner_area(s0, s1, s2))
    # Two diagonal corners of one face (the ambiguous face): cut off separately, two corner triangles.
    assert table[0b00001001] == pytest.approx(2 * corner_area(s0, s1, s2))
    codes = np.arange(256)
    np.testing.assert_allclose(table, table[255 - codes], rtol=0, atol=1e-12)  # inside and outside bound one surface
    assert np.all(table[1:255] > 0)


def test_total_surfel_area_of_a_box():
    n = (6, 5, 4)
    sd = surface_distances(box((10, 9, 8), (2, 2, 2), (8, 7, 6)), box((10, 9, 8), (2, 2, 2), (8, 7, 6)), SPACING)
    assert float(sd.areas_a.sum()) == pytest.approx(box_surface_area(n, SPACING))
    assert np.all(sd.distances_a_to_b == 0)


# --------------------------------------------------------------------------- FLARE rules


def test_empty_and_identical_masks(backend):
    xp = backend.xp
    empty = xp.zeros((6, 7, 8), dtype=bool)
    cube = xp.asarray(box((6, 7, 8), (1, 2, 2), (4, 5, 6)))
    assert dice(empty, empty, am=backend.am) == 1.0
    assert normalized_surface_dice(empty, empty, SPACING, 2.0, am=backend.am) == 1.0
    for a, b in ((empty, cube), (cube, empty)):
        assert dice(a, b, am=backend.am) == 0.0
        assert normalized_surface_dice(a, b, SPACING, 2.0, am=backend.am) == 0.0
    assert dice(cube, cube, am=backend.am) == 1.0
    assert normalized_surface_dice(cube, cube, SPACING, 0.1, am=backend.am) == 1.0


def test_dice_value():
    a = box((10, 4, 4), (0, 0, 0), (6, 4, 4))
    b = box((10, 4, 4), (3, 0, 0), (9, 4, 4))
    assert dice(a, b) == pytest.approx(2 * 3 / 12)


def test_score_case_empty_rules(backend):
    xp = backend.xp
    gt = np.zeros((8, 8, 8), np.uint8)
    pred = gt.copy()
    gt[1:4, 1:4, 1:4] = 1  # liver in both
    pred[1:4, 1:4, 1:4] = 1
    gt[5:7, 5:7, 5:7] = 3  # spleen only in the ground truth
    pred[5:7, 1:3, 5:7] = 9  # gallbladder only in the prediction
    scores = score_case(xp.asarray(pred), xp.asarray(gt), (1.0, 1.0, 1.0), am=backend.am)
    assert list(scores) == list(COLUMNS)
    assert scores["Liver_DSC"] == scores["Liver_NSD"] == 1.0
    assert scores["Spleen_DSC"] == scores["Spleen_NSD"] == 0.0
    assert scores["Gallbladder_DSC"] == scores["Gallbladder_NSD"] == 0.0
    for name in ("Right_kidney", "Aorta", "Inferior_vena_cava", "Esophagus", "Tumor"):  # absent from both
        assert scores[f"{name}_DSC"] == scores[f"{name}_NSD"] == 1.0


class _BoundedFindObjectsNdi:
    """scipy.ndimage whose find_objects refuses labels above max_label, as cupyx's kernel (CuPy >= 14) must
    never see them: it writes the box of label l at row l - 1 of a max_label-row buffer, unbounded."""

    def __init__(self):
        self.calls = 0

    def __getattr__(self, name):
        return getattr(scipy.ndimage, name)

    def find_objects(self, input, max_label=0):
        self.calls += 1
        assert max_label >= 1 and int(input.max()) <= max_label, f"label {int(input.max())} > max_label {max_label}"
        return scipy.ndimage.find_objects(input, max_label=max_label)


def test_find_objects_never_sees_labels_above_the_scored_ones():
    gt = np.zeros((10, 10, 10), np.uint8)
    gt[1:5, 1:5, 1:5] = 1
    gt[6:9, 6:9, 6:9] = 255  # an "ignore" label, above every scored class
    pred = gt.copy()
    pred[0, 0, 0] = 200
    ndi = _BoundedFindObjectsNdi()
    am = ArrayModule("numpy", "cpu", np, ndi, lambda m: (m, 0), "none")
    scores = score_case(pred, gt, (1.0, 1.0, 1.0), am=am)
    assert ndi.calls == 2  # the one-pass path is still taken, for both maps
    assert scores == score_case(pred, gt, (1.0, 1.0, 1.0))
    assert scores["Liver_DSC"] == 1.0 and scores["Spleen_DSC"] == 1.0  # absent from both


def test_nsd_is_zero_below_dsc_02():
    gt = np.zeros((24, 12, 12), np.uint8)
    gt[2:12, 1:11, 1:11] = 1  # a 10-voxel liver cube
    for shift, expected_dsc in ((9, 0.1), (8, 0.2)):
        pred = np.roll(gt, shift, axis=0)
        scores = score_case(pred, gt, (1.0, 1.0, 1.0))
        assert scores["Liver_DSC"] == pytest.approx(expected_dsc)
        surface_only = normalized_surface_dice(pred == 1, gt == 1, (1.0, 1.0, 1.0), TOLERANCE_MM[1])
        assert surface_only > 0.3  # the surfaces are close: only the DSC rule can make NSD 0
        if expected_dsc < 0.2:
            assert scores["Liver_NSD"] == 0.0
        else:  # DSC == 0.2 is not below 0.2
            assert scores["Liver_NSD"] == pytest.approx(surface_only)


def test_tolerance_per_class():
    gt = np.zeros((16, 10, 10), np.uint8)
    gt[3:9, 1:4, 1:4] = 12  # duodenum: 7 mm
    gt[3:9, 5:8, 5:8] = 7  # right adrenal gland: 2 mm
    pred = np.roll(gt, 1, axis=0)
    spacing = (4.0, 3.0, 3.0)
    scores = score_case(pred, gt, spacing)  # a 4 mm shift: within 7 mm, beyond 2 mm
    assert scores["Duodenum_NSD"] == 1.0
    assert scores["Right_adrenal_gland_NSD"] == pytest.approx(shifted_box_nsd((6, 3, 3), spacing), abs=1e-12)
    assert scores["Right_adrenal_gland_NSD"] < 0.9
    assert TOLERANCE_MM == {1: 5, 2: 3, 3: 3, 4: 5, 5: 2, 6: 2, 7: 2, 8: 2, 9: 2, 10: 3, 11: 5, 12: 7, 13: 3, 14: 2}


# --------------------------------------------------------------------------- NSD geometry


def test_one_voxel_shift_analytic(backend):
    shape, lo, hi = (12, 10, 9), (2, 2, 2), (8, 7, 6)
    a = box(shape, lo, hi)
    b = np.roll(a, 1, axis=0)
    tol = 0.9 * min(SPACING)
    got = normalized_surface_dice(backend.xp.asarray(a), backend.xp.asarray(b), SPACING, tol,
                                  am=backend.am)
    expected = shifted_box_nsd(tuple(h - l for h, l in zip(hi, lo)), SPACING)
    assert 0.3 < expected < 0.9
    assert got == pytest.approx(expected, abs=1e-12)


def test_shift_within_tolerance_gives_one():
    a = box((12, 10, 9), (2, 2, 2), (8, 7, 6))
    for axis in range(3):
        b = np.roll(a, 1, axis=axis)
        assert normalized_surface_dice(a, b, SPACING, SPACING[axis] * 1.01) == 1.0
        assert normalized_surface_dice(a, b, SPACING, SPACING[axis] * 0.99) < 1.0


def test_anisotropic_spacing_coarse_vs_fine_axis():
    spacing = (1.0, 1.0, 3.0)
    a = box((12, 12, 12), (3, 3, 3), (9, 9, 9))
    fine = normalized_surface_dice(a, np.roll(a, 1, axis=0), spacing, 2.0)  # 1 mm shift
    coarse = normalized_surface_dice(a, np.roll(a, 1, axis=2), spacing, 2.0)  # 3 mm shift
    assert fine == 1.0
    assert coarse < 0.95
    # Below every spacing, the analytic value is that of a shift along axis 0 with the axes permuted.
    coarse = normalized_surface_dice(a, np.roll(a, 1, axis=2), spacing, 0.9)
    assert coarse == pytest.approx(shifted_box_nsd((6, 6, 6), (3.0, 1.0, 1.0)), abs=1e-12)


def _ball(shape, spacing, center_mm, radius_mm) -> np.ndarray:
    grids = np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing)], indexing="ij")
    return sum((g - c) ** 2 for g, c in zip(grids, center_mm)) <= radius_mm ** 2


def _surfel_cells(mask: np.ndarray) -> np.ndarray:
    """Brute force: cells (between 2x2x2 voxel centres, on a zero-padded grid) whose 8 voxels are mixed."""
    count = sliding_window_view(np.pad(mask, 1).astype(np.int8), (2, 2, 2)).sum(axis=(-3, -2, -1))
    return (count > 0) & (count < 8)


def _fibonacci_sphere(n: int) -> np.ndarray:
    """n nearly equal-area unit vectors."""
    i = np.arange(n) + 0.5
    polar, azimuth = np.arccos(1 - 2 * i / n), np.pi * (1 + 5 ** 0.5) * i
    return np.stack([np.cos(azimuth) * np.sin(polar), np.sin(azimuth) * np.sin(polar), np.cos(polar)], axis=1)


@pytest.mark.parametrize("spacing", [(0.5, 0.5, 2.0), (0.4, 0.5, 1.2)])
def test_sphere_against_brute_force(spacing):
    """Distances equal a KD-tree brute force; NSD agrees with dense point sampling of the true spheres.

    Reference NSD: 200k equal-area points on each continuous sphere; each point
    takes the distance of the surfel cell it falls in (KD-tree from that cell's
    centre to the other mask's surfel cells) and counts with the sphere area it
    represents. Counting surfels without their areas misses it by > 0.05.
    """
    sp = np.asarray(spacing)
    shape = tuple(int(40 / s) for s in spacing)
    c1, r1, c2, r2, tol = np.array([20.0, 20.0, 20.0]), 10.0, np.array([20.0, 20.0, 23.0]), 10.0, 1.5
    a, b = _ball(shape, spacing, c1, r1), _ball(shape, spacing, c2, r2)

    cells_a, cells_b = _surfel_cells(a), _surfel_cells(b)
    centres_a, centres_b = (np.argwhere(cells_a) - 0.5) * sp, (np.argwhere(cells_b) - 0.5) * sp
    dist_a = np.full(cells_a.shape, np.nan)
    dist_b = np.full(cells_b.shape, np.nan)
    dist_a[cells_a] = cKDTree(centres_b).query(centres_a)[0]
    dist_b[cells_b] = cKDTree(centres_a).query(centres_b)[0]
    sd = surface_distances(a, b, spacing)
    np.testing.assert_allclose(np.sort(sd.distances_a_to_b), np.sort(dist_a[cells_a]), rtol=0, atol=1e-9)
    np.testing.assert_allclose(np.sort(sd.distances_b_to_a), np.sort(dist_b[cells_b]), rtol=0, atol=1e-9)

    within, total = 0.0, 0.0
    for centre, radius, dist in ((c1, r1, dist_a), (c2, r2, dist_b)):
        cells = np.floor((centre + radius * _fibonacci_sphere(200_000)) / sp).astype(int) + 1
        d = dist[tuple(cells.T)]
        assert np.mean(np.isnan(d)) < 1e-3  # samples fall in surfel cells, bar a few on cell boundaries
        d = d[~np.isnan(d)]
        within += radius ** 2 * np.mean(d <= tol)
        total += radius ** 2
    reference = within / total

    got = normalized_surface_dice(a, b, spacing, tol)
    assert got == pytest.approx(reference, abs=0.025)
    unweighted = (np.count_nonzero(sd.distances_a_to_b <= tol) + np.count_nonzero(sd.distances_b_to_a <= tol)) / (
        sd.distances_a_to_b.size + sd.distances_b_to_a.size)
    assert abs(unweighted - reference) > 0.05
    assert abs(normalized_surface_dice(a, b, spacing[::-1], tol) - reference) > 0.05  # spacing axes matter


def test_crop_margin_and_image_border_do_not_change_distances():
    a = box((9, 8, 7), (0, 0, 0), (5, 4, 7))  # touches the image border on four faces
    b = box((9, 8, 7), (1, 0, 0), (6, 4, 6))
    ref = surface_distances(a, b, SPACING)
    for margin in (0.0, 3.0, 10.0):
        sd = surface_distances(a, b, SPACING, margin_mm=margin)
        for x, y in zip(sd, ref):
            np.testing.assert_allclose(np.sort(x), np.sort(y))
    # the faces on the image border are surfaces too
    assert float(ref.areas_a.sum()) == pytest.approx(box_surface_area((5, 4, 7), SPACING))


# --------------------------------------------------------------------------- slice restriction


@pytest.mark.parametrize("label_id", SLICE_RESTRICTED_IDS)
def test_tubes_scored_on_ground_truth_slices_only(backend, label_id):
    """Superior axis = voxel axis 0: a prediction running past the GT's slices costs nothing for the tubes."""
    xp = backend.xp
    gt = np.zeros((20, 9, 8), np.uint8)
    gt[5:10, 3:6, 3:6] = label_id
    gt[12:15, 3:6, 3:6] = label_id  # a gap of two unlabelled slices
    gt[5:15, 0:2, 0:2] = 1  # liver, a control with the same extension
    pred = gt.copy()
    pred[0:5, 3:6, 3:6] = label_id  # overshoot below and above the GT's range
    pred[15:20, 3:6, 3:6] = label_id
    pred[0:20, 0:2, 0:2] = 1
    spacing = (2.0, 0.8, 0.8)
    scores = score_case(xp.asarray(pred), xp.asarray(gt), spacing, z_axis=0, am=backend.am)
    col = {5: "Aorta", 6: "Inferior_vena_cava", 10: "Esophagus"}[label_id]
    assert scores[f"{col}_DSC"] == 1.0
    assert scores[f"{col}_NSD"] == 1.0
    assert scores["Liver_DSC"] == pytest.approx(2 * 40 / (40 + 80))
    assert scores["Liver_NSD"] < 1.0
    # The restriction runs along z_axis: restricting along axis 2 would leave the overshoot in.
    wrong_axis = score_case(pred, gt, spacing, z_axis=2)
    assert wrong_axis[f"{col}_DSC"] < 1.0
    # As FLARE's script: the range is gt[z_min:z_max], so the top GT slice (14) is not scored...
    top = pred.copy()
    top[14, 3:6, 3:6] = 0
    assert score_case(top, gt, spacing, z_axis=0)[f"{col}_DSC"] == 1.0
    # ...while gap slices inside the range are, and so is any error inside the GT slices.
    gap = pred.copy()
    gap[10:12, 3:6, 3:6] = label_id
    assert score_case(gap, gt, spacing, z_axis=0)[f"{col}_DSC"] < 1.0
    pred[7, 3:6, 3:6] = 0
    assert score_case(pred, gt, spacing, z_axis=0)[f"{col}_DSC"] < 1.0


def test_restricted_class_with_empty_ground_truth_uses_the_empty_rules():
    gt = np.zeros((8, 8, 8), np.uint8)
    pred = gt.copy()
    pred[2:5, 2:5, 2:5] = 5  # aorta predicted, none in the ground truth
    scores = score_case(pred, gt, (1.0, 1.0, 1.0))
    assert scores["Aorta_DSC"] == scores["Aorta_NSD"] == 0.0


def test_bad_arrays_are_rejected():
    with pytest.raises(ValueError, match="shape"):
        score_case(np.zeros((4, 4, 4), np.uint8), np.zeros((4, 4, 5), np.uint8), (1, 1, 1))
    with pytest.raises(ValueError, match="integer"):
        score_case(np.zeros((4, 4, 4), np.float32), np.zeros((4, 4, 4), np.uint8), (1, 1, 1))
    with pytest.raises(ValueError, match="z_axis"):
        score_case(np.zeros((4, 4, 4), np.uint8), np.zeros((4, 4, 4), np.uint8), (1, 1, 1), z_axis=3)
