"""Voxel-grid geometry from a 4x4 affine (pocketseg.geometry) and the Volume properties built on it.

Covers ``spacing_from_affine`` (axis-aligned, flipped, permuted, rotated),
``orientation_codes`` (RAS, LPS, LAS, permuted axes, nearest axis for oblique),
``is_oblique`` (flips and permutations are not oblique; the tolerance is in
degrees) and the ``voxel_to_world`` / ``world_to_voxel`` round trip, checked
against nibabel's ``apply_affine`` and for any leading shape.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from nibabel.affines import apply_affine

from pocketseg import geometry
from pocketseg.volume import Volume


def rot_z(deg: float) -> np.ndarray:
    t = np.radians(deg)
    return np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])


def rot_x(deg: float) -> np.ndarray:
    t = np.radians(deg)
    return np.array([[1, 0, 0], [0, np.cos(t), -np.sin(t)], [0, np.sin(t), np.cos(t)]])


def affine_from(matrix, origin=(12.5, -40.0, 310.0)) -> np.ndarray:
    aff = np.eye(4)
    aff[:3, :3] = matrix
    aff[:3, 3] = origin
    return aff


ZOOMS = np.array([0.7, 0.85, 2.5])
CASES = {
    # name: (3x3 matrix, orientation codes, oblique?)
    "RAS": (np.diag(ZOOMS), "RAS", False),
    "LPS": (np.diag(ZOOMS * [-1, -1, 1]), "LPS", False),
    "LAS": (np.diag(ZOOMS * [-1, 1, 1]), "LAS", False),
    "LPI": (np.diag(ZOOMS * [-1, -1, -1]), "LPI", False),
    "permuted-SRA": (np.array([[0, ZOOMS[1], 0], [0, 0, ZOOMS[2]], [ZOOMS[0], 0, 0]]), "SRA", False),
    "permuted-PIL": (np.array([[0, 0, -ZOOMS[2]], [-ZOOMS[0], 0, 0], [0, -ZOOMS[1], 0]]), "PIL", False),
    "oblique-20deg-z": (rot_z(20) @ np.diag(ZOOMS), "RAS", True),
    "oblique-30deg-x-lps": (rot_x(30) @ np.diag(ZOOMS * [-1, -1, 1]), "LPS", True),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_spacing_from_affine(name):
    matrix, _, _ = CASES[name]
    spacing = geometry.spacing_from_affine(affine_from(matrix))
    assert isinstance(spacing, tuple) and all(isinstance(s, float) for s in spacing)
    expected = np.sqrt((matrix**2).sum(axis=0))  # column lengths, in i, j, k order
    assert spacing == pytest.approx(tuple(expected), rel=1e-12)
    # and it agrees with nibabel's voxel sizes
    assert spacing == pytest.approx(tuple(nib.affines.voxel_sizes(affine_from(matrix))), rel=1e-12)


def test_spacing_is_per_voxel_axis_not_per_world_axis():
    # i runs along world z, k along world x: spacing stays in i, j, k order
    matrix = np.array([[0, 0, 3.0], [0, 2.0, 0], [1.0, 0, 0]])
    assert geometry.spacing_from_affine(affine_from(matrix)) == (1.0, 2.0, 3.0)


@pytest.mark.parametrize("name", sorted(CASES))
def test_orientation_codes(name):
    matrix, codes, _ = CASES[name]
    assert geometry.orientation_codes(affine_from(matrix)) == codes


@pytest.mark.parametrize("name", sorted(CASES))
def test_is_oblique(name):
    matrix, _, oblique = CASES[name]
    assert geometry.is_oblique(affine_from(matrix)) is oblique


def test_is_oblique_tolerance_in_degrees():
    slightly = affine_from(rot_z(0.3) @ np.diag(ZOOMS))
    assert geometry.is_oblique(slightly) is False  # within the default 0.5 degrees
    assert geometry.is_oblique(slightly, tol_deg=0.2) is True
    assert geometry.is_oblique(affine_from(rot_z(0.7) @ np.diag(ZOOMS))) is True


def test_is_oblique_ignores_translation_and_scale():
    assert geometry.is_oblique(affine_from(np.diag([100.0, 0.01, 5.0]), origin=(1e4, -1e4, 3))) is False


@pytest.mark.parametrize("name", sorted(CASES))
def test_voxel_world_round_trip(name):
    affine = affine_from(CASES[name][0])
    rng = np.random.default_rng(7)
    ijk = rng.uniform(-5, 300, size=(4, 6, 3))  # any leading shape
    xyz = geometry.voxel_to_world(affine, ijk)
    assert xyz.shape == ijk.shape
    np.testing.assert_allclose(xyz, apply_affine(affine, ijk), rtol=0, atol=1e-9)
    back = geometry.world_to_voxel(affine, xyz)
    assert back.shape == ijk.shape
    np.testing.assert_allclose(back, ijk, rtol=0, atol=1e-9)


def test_voxel_to_world_known_points():
    affine = affine_from(np.diag([-0.5, -0.5, 2.0]), origin=(100.0, 50.0, -20.0))  # LPS-stored
    np.testing.assert_allclose(geometry.voxel_to_world(affine, [0, 0, 0]), [100.0, 50.0, -20.0])
    np.testing.assert_allclose(geometry.voxel_to_world(affine, [10, 4, 3]), [95.0, 48.0, -14.0])
    np.testing.assert_allclose(geometry.world_to_voxel(affine, [95.0, 48.0, -14.0]), [10, 4, 3], atol=1e-12)
    assert geometry.voxel_to_world(affine, [1, 2, 3]).shape == (3,)


def test_volume_properties_use_the_geometry():
    affine = affine_from(CASES["permuted-PIL"][0])
    vol = Volume(data=np.zeros((4, 5, 6), np.int16), affine=affine)
    assert vol.shape == (4, 5, 6)
    assert all(isinstance(n, int) for n in vol.shape)
    assert vol.spacing_mm == pytest.approx(tuple(ZOOMS))
    assert vol.orientation == "PIL"


def test_canonical_grid_matches_nibabel_for_all_48_orientations():
    import itertools

    import nibabel as nib

    from pocketseg.geometry import canonical_grid

    rng = np.random.default_rng(0)
    data = rng.integers(0, 100, (3, 4, 5))
    for perm in itertools.permutations(range(3)):
        for flips in itertools.product([1, -1], repeat=3):
            affine = np.eye(4)
            affine[:3, :3] = 0
            for i, (p, f) in enumerate(zip(perm, flips)):
                affine[p, i] = f * (i + 1.5)  # distinct spacings 1.5, 2.5, 3.5 mm along i, j, k
            grid = canonical_grid(affine, data.shape)
            ref = nib.orientations.apply_orientation(data, nib.orientations.io_orientation(affine)).transpose(2, 1, 0)
            zyx = grid.to_zyx(data)
            np.testing.assert_array_equal(zyx, ref)
            assert zyx.shape == grid.shape_zyx
            np.testing.assert_array_equal(grid.from_zyx(zyx), data)
            # spacing follows the axes: world z spacing is the one of the voxel axis mapped to z
            assert grid.spacing_zyx(affine)[0] == pytest.approx(perm.index(2) + 1.5)
