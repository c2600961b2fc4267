"""Realism of the synthetic phantom: organ volumes, anatomy in world coordinates, CT numbers, geometry."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage as ndi

from pocketseg import labels as L
from pocketseg.geometry import orientation_codes, spacing_from_affine, voxel_to_world
from pocketseg.synth.phantom import ORIENTATIONS, TUMOR_HOSTS, VOLUME_RANGES_ML, choose_grid, make_phantom
from pocketseg.synth.tissues import BONE, Tissue

# Medium resolution (about 1.8 mm in-plane) keeps volumes accurate and the tests fast.
SEEDS = (11, 12, 13, 14)


@pytest.fixture(scope="module")
def cases():
    return {seed: make_phantom(seed, matrix=256, slices=110) for seed in SEEDS}


def world_centroid(ph, label_id: int) -> np.ndarray:
    idx = np.argwhere(ph.labels == label_id)
    assert idx.size, f"label {L.BY_ID[label_id].name} missing"
    return voxel_to_world(ph.affine, idx.mean(axis=0))


def centroids(ph) -> dict[str, np.ndarray]:
    return {lab.name: world_centroid(ph, lab.id) for lab in L.LABELS[1:14]}


def voxel_ml(ph) -> float:
    return float(np.prod(spacing_from_affine(ph.affine))) / 1000.0


@pytest.mark.parametrize("seed", SEEDS)
def test_all_organs_present_with_adult_volumes(cases, seed):
    ph = cases[seed]
    for lab in L.LABELS[1:14]:
        assert (ph.labels == lab.id).any(), lab.name
    for name, (lo, hi) in VOLUME_RANGES_ML.items():
        # A tumor replaces organ voxels; the organ's volume includes the tumors it hosts.
        voxels = np.count_nonzero(ph.labels == L.BY_NAME[name].id)
        for t, tumor in enumerate(ph.meta["tumors"]):
            if tumor["host"] == name:
                voxels += np.count_nonzero(ph.tissue == Tissue.TUMOR_0 + t)
        ml = voxels * voxel_ml(ph)
        assert lo <= ml <= hi, f"seed {seed}: {name} {ml:.1f} mL outside {lo}-{hi}"


@pytest.mark.parametrize("seed", SEEDS)
def test_relative_positions_in_world_coordinates(cases, seed):
    c = centroids(cases[seed])
    x, y, z = 0, 1, 2  # RAS: +x patient right, +y anterior, +z superior
    # Liver right upper, spleen left upper posterior.
    assert c["liver"][x] > c["aorta"][x] > c["spleen"][x]
    assert c["spleen"][y] < c["stomach"][y] and c["spleen"][z] > c["left_kidney"][z]
    # Kidneys posterior and either side of the aorta; adrenals above and medial to them.
    assert c["right_kidney"][x] > c["aorta"][x] > c["left_kidney"][x]
    for side in ("right", "left"):
        kidney, adrenal = c[f"{side}_kidney"], c[f"{side}_adrenal_gland"]
        assert kidney[y] < c["aorta"][y] and kidney[y] < c["pancreas"][y] and kidney[y] < c["liver"][y]
        assert adrenal[z] > kidney[z]
        assert abs(adrenal[x] - c["aorta"][x]) < abs(kidney[x] - c["aorta"][x])
    # IVC to the right of the aorta; pancreas anterior to both vessels.
    assert c["inferior_vena_cava"][x] > c["aorta"][x]
    assert c["pancreas"][y] > c["aorta"][y] and c["pancreas"][y] > c["inferior_vena_cava"][y]
    # Stomach left upper; gallbladder under the liver, anterior, on the right.
    assert c["stomach"][x] < c["aorta"][x] and c["stomach"][z] > c["pancreas"][z]
    assert c["gallbladder"][z] < c["liver"][z] and c["gallbladder"][x] > c["aorta"][x] and c["gallbladder"][y] > c["liver"][y]
    # Esophagus above the stomach.
    assert c["esophagus"][z] > c["stomach"][z]


def _touches(ph, a: str, b: str, voxels: int = 2) -> bool:
    ma = ph.labels == L.BY_NAME[a].id
    return bool((ndi.binary_dilation(ma, iterations=voxels) & (ph.labels == L.BY_NAME[b].id)).any())


@pytest.mark.parametrize("seed", SEEDS)
def test_adjacency(cases, seed):
    ph = cases[seed]
    assert _touches(ph, "gallbladder", "liver")
    assert _touches(ph, "duodenum", "pancreas")
    assert _touches(ph, "esophagus", "stomach")
    # The duodenal C-loop lies lateral (to the right of) the pancreatic head and reaches below it.
    duo = np.argwhere(ph.labels == L.BY_NAME["duodenum"].id)
    pan = np.argwhere(ph.labels == L.BY_NAME["pancreas"].id)
    duo_w, pan_w = voxel_to_world(ph.affine, duo), voxel_to_world(ph.affine, pan)
    assert duo_w[:, 0].max() > pan_w[:, 0].max()
    assert duo_w[:, 2].min() < pan_w[:, 2].min()
    # The esophagus enters from above: its top is above the stomach's top.
    eso_w = voxel_to_world(ph.affine, np.argwhere(ph.labels == L.BY_NAME["esophagus"].id))
    sto_w = voxel_to_world(ph.affine, np.argwhere(ph.labels == L.BY_NAME["stomach"].id))
    assert eso_w[:, 2].max() > sto_w[:, 2].max()


@pytest.mark.parametrize("seed", SEEDS)
def test_body_structures(cases, seed):
    ph = cases[seed]
    tis = ph.tissue
    for t in (Tissue.SKIN, Tissue.FAT_SUBCUT, Tissue.MUSCLE, Tissue.FAT_VISCERAL, Tissue.BONE_CORTEX, Tissue.RIB,
              Tissue.LUNG, Tissue.BOWEL_GAS, Tissue.BOWEL_WALL):
        assert (tis == t).any(), t.name
    # Lung bases at the top: lung lies above the liver.
    lung_z = voxel_to_world(ph.affine, np.argwhere(tis == Tissue.LUNG))[:, 2].mean()
    assert lung_z > world_centroid(ph, L.BY_NAME["liver"].id)[2]
    # The spine is posterior to the aorta, which lies left of the spine's midline.
    spine = voxel_to_world(ph.affine, np.argwhere(tis == Tissue.BONE_CANCELLOUS)).mean(axis=0)
    aorta = world_centroid(ph, L.BY_NAME["aorta"].id)
    assert aorta[1] > spine[1] and aorta[0] < spine[0]


def _interior_median(ph, mask: np.ndarray) -> float:
    core = ndi.binary_erosion(mask, iterations=2)
    assert core.sum() > 20
    return float(np.median(ph.image[core]))


@pytest.mark.parametrize("phase", ["non-contrast", "portal-venous"])
def test_hounsfield_units_by_phase(phase):
    ph = make_phantom(21, matrix=256, slices=110, phase=phase)
    assert ph.meta["phase"] == phase
    liver = _interior_median(ph, ph.tissue == Tissue.LIVER)
    aorta = _interior_median(ph, ph.tissue == Tissue.AORTA)
    if phase == "non-contrast":
        assert 42 <= liver <= 68 and 30 <= aorta <= 55
    else:
        assert 87 <= liver <= 133 and 145 <= aorta <= 255
    assert _interior_median(ph, ph.tissue == Tissue.AIR) <= -990
    assert -125 <= _interior_median(ph, ph.tissue == Tissue.FAT_SUBCUT) <= -80
    assert _interior_median(ph, ph.tissue == Tissue.LUNG) < -750
    bone = np.isin(ph.tissue, BONE)
    assert ph.image[bone].mean() > 300
    # CT-like noise: present but moderate inside a homogeneous organ.
    core = ndi.binary_erosion(ph.tissue == Tissue.LIVER, iterations=3)
    assert 4 <= ph.image[core].std() <= 30
    # Partial-volume blur: boundary voxels take intermediate values between fat and liver.
    edge = ndi.binary_dilation(ph.tissue == Tissue.LIVER) & (ph.tissue == Tissue.FAT_VISCERAL)
    assert -100 < np.median(ph.image[edge]) < liver


def test_tumors_lie_in_host_organs_and_differ_in_density():
    found = 0
    for seed in range(30, 42):
        ph = make_phantom(seed, small=True, slices=70)
        tumors = ph.meta["tumors"]
        assert len(tumors) <= 3
        for tumor in tumors:
            lo, hi = TUMOR_HOSTS[tumor["host"]]
            assert lo <= tumor["diameter_mm"] <= hi and 5 <= tumor["diameter_mm"] <= 80
        mask = ph.labels == L.TUMOR
        if not tumors:
            assert not mask.any()
            continue
        found += 1
        shell = ndi.binary_dilation(mask) & ~mask
        hosts = [L.BY_NAME[h].id for h in TUMOR_HOSTS]
        assert np.isin(ph.labels[shell], hosts).mean() > 0.5
    assert found >= 3


def test_deterministic_for_a_seed_and_orientation_changes_only_storage():
    a = make_phantom(5, small=True, slices=40, orientation="RAS")
    b = make_phantom(5, small=True, slices=40, orientation="RAS")
    assert np.array_equal(a.image, b.image) and np.array_equal(a.labels, b.labels)
    assert not np.array_equal(a.image, make_phantom(6, small=True, slices=40, orientation="RAS").image)
    for codes in ORIENTATIONS:
        c = make_phantom(5, small=True, slices=40, orientation=codes)
        assert orientation_codes(c.affine) == codes
        # The same anatomy at the same world position, whatever the voxel order.
        np.testing.assert_allclose(world_centroid(c, 1), world_centroid(a, 1), atol=1e-6)
        ornt = nib.orientations.ornt_transform(nib.orientations.io_orientation(c.affine),
                                               nib.orientations.io_orientation(a.affine))
        assert np.array_equal(nib.orientations.apply_orientation(c.labels, ornt), a.labels)


def test_exact_slice_count_and_geometry_ranges():
    for n in (55, 100, 554):
        spec = choose_grid(np.random.default_rng(n), slices=n, small=False, matrix=None, body_width_mm=380)
        assert spec.slices == n and spec.matrix == 512
        assert 0.6 <= spec.inplane_mm <= 1.0 and 0.8 <= spec.slice_mm <= 5.0
    for seed in range(50):
        spec = choose_grid(np.random.default_rng(seed), slices=None, small=False, matrix=None, body_width_mm=380)
        assert 50 <= spec.slices <= 600 and 0.8 <= spec.slice_mm <= 5.0 and 0.6 <= spec.inplane_mm <= 1.0
    ph = make_phantom(2, small=True, slices=37)
    assert ph.image.shape[2] == 37 and ph.image.dtype == np.int16 and ph.labels.dtype == np.uint8
    assert ph.image.shape == ph.labels.shape == ph.tissue.shape


def test_full_size_case_dimensions():
    ph = make_phantom(3, slices=55)
    assert ph.image.shape == (512, 512, 55)
    sx, sy, sz = spacing_from_affine(ph.affine)
    assert 0.6 <= sx == sy <= 1.0 and 0.8 <= sz <= 5.0
    # The body fits in the field of view: no body voxel on the in-plane border.
    body = ph.tissue != Tissue.AIR
    body &= ph.tissue != Tissue.TABLE
    assert not body[0].any() and not body[-1].any() and not body[:, 0].any() and not body[:, -1].any()
