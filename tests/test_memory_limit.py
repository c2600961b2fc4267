"""The memory estimate of a scan's resampled grids and the limit it is held to (pocketseg.runtime.memory_limit)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from pocketseg.errors import InputError
from pocketseg.manifest import Inference
from pocketseg.runtime import memory_limit as M

GB = 10**9


def _manifest(roi_spacing=(4.0, 1.2, 1.2), detail_spacing=(2.5, 0.8, 0.8), members=1):
    """The paper's presets (trainer/presets.py: roi and detail), as far as the estimate reads them."""
    def stage(spacing, patch, classes):
        return SimpleNamespace(spacing_mm_zyx=spacing, patch_zyx=patch, num_classes=classes, members=({},) * members)
    return SimpleNamespace(stages={"roi": stage(roi_spacing, (32, 224, 224), 2),
                                   "detail": stage(detail_spacing, (48, 224, 224), 15)})


@pytest.mark.parametrize("text,size", [("8GiB", 8 * 2**30), ("512 MiB", 512 * 2**20), ("16GB", 16 * GB),
                                       ("8g", 8 * 2**30), ("1.5GiB", int(1.5 * 2**30)), ("4096", 4096),
                                       (2**33, 2**33), (None, None)])
def test_sizes(text, size):
    assert M.parse_size(text) == size


@pytest.mark.parametrize("bad", ["", "8 parsecs", "-1GiB", "0", "GiB", True])
def test_bad_sizes_name_the_flag(bad):
    with pytest.raises(InputError, match="--max-memory"):
        M.parse_size(bad)


def test_normal_scans_pass_the_default_limit_of_a_24_gb_machine(monkeypatch):
    monkeypatch.setattr(M, "machine_memory_bytes", lambda: 24 * GB)
    limit = M.default_limit_bytes()
    assert limit == int(0.75 * 24 * GB)
    for settings, members in ((Inference(), 1),  # pocketseg's own packages: labels back
                              (Inference(overlap=0.5, gaussian=True, mirroring=True, back_resampling="logits",
                                         nnunet_numerics=True), 5)):  # an imported 5-fold nnU-Net model
        for shape, spacing in (((600, 512, 512), (0.8, 0.8, 0.8)), ((120, 512, 512), (4.0, 0.8, 0.8))):
            estimate = M.estimate_memory(shape, spacing, _manifest(members=members), settings)
            M.check_memory(estimate, limit, "ct.nii.gz", spacing, given=False)  # no refusal
            # Not vacuous: at least the full-resolution float32 image and the uint8 label maps.
            assert estimate.total >= 7 * shape[0] * shape[1] * shape[2]
    paper = M.estimate_memory((600, 512, 512), (0.8, 0.8, 0.8), _manifest(), Inference())
    assert paper.grids_zyx["detail"] == (192, 512, 512) and paper.grids_zyx["roi"] == (120, 341, 341)
    assert 1.5 * 2**30 < paper.total < 4 * 2**30  # the measured peak of this scan is about 1.8 GB


def test_a_header_with_100_mm_voxels_is_refused_with_file_spacing_estimate_and_limit(monkeypatch):
    monkeypatch.setattr(M, "machine_memory_bytes", lambda: 24 * GB)
    spacing = (100.0, 100.0, 100.0)
    estimate = M.estimate_memory((64, 64, 64), spacing, _manifest(), Inference())
    assert estimate.grids_zyx["detail"] == (2560, 8000, 8000)
    with pytest.raises(InputError) as excinfo:
        M.check_memory(estimate, M.default_limit_bytes(), "scan.nii.gz", spacing, given=False)
    message = str(excinfo.value)
    assert message.startswith("scan.nii.gz: voxel spacing 100 x 100 x 100 mm")
    assert f"about {estimate.total / 2**30:.1f} GiB" in message
    assert "limit of 16.8 GiB (75% of this machine's 22.4 GiB" in message and "--max-memory" in message


def test_a_given_limit_replaces_the_default():
    estimate = M.estimate_memory((120, 512, 512), (4.0, 0.8, 0.8), _manifest(), Inference())
    with pytest.raises(InputError, match=r"above the limit of 1\.0 GiB \(--max-memory\)"):
        M.check_memory(estimate, M.parse_size("1GiB"), "ct.nii.gz", (4.0, 0.8, 0.8), given=True)
    M.check_memory(estimate, M.parse_size("2GiB"), "ct.nii.gz", (4.0, 0.8, 0.8), given=True)
    M.check_memory(estimate, None, "ct.nii.gz", (4.0, 0.8, 0.8), given=False)  # unknown machine: no limit
