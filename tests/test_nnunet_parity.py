"""An imported genuine nnU-Net v2 model against nnU-Net's own predictor (nnUNetPredictor, its defaults).

The fixture under ``fixtures/nnunet_tiny`` is a results folder made by nnU-Net's own
planning, preprocessing and stock trainer on synthetic phantoms
(``python -m pocketseg.benchmarks.nnunet_parity --make-fixture tests/fixtures/nnunet_tiny``;
optimizer state stripped). Both pipelines segment held-out phantoms stored in RAS
and LPS voxel order and, where ``../shared/data/ct_examples`` exists, the real CT
examples; pocketseg in nnU-Net-exact mode (its default backend on the CPU, torch) must
agree on at least 99.9 % of the foreground (the union of both foregrounds) with Dice
>= 0.999 for every class either predicts. With ONNX Runtime, whose convolutions sum in
another order, voxels whose two best classes are within a float16 step may fall the
other way: the small, barely trained classes of this fixture then reach Dice 0.9987
(one or two voxels), so that backend is held to Dice >= 0.998 here; on the harness's
better-trained model it reaches >= 0.9997 (docs/benchmarks.md). nnU-Net runs once per
reader, in its own process, for all cases.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("nnunetv2", reason="nnU-Net v2 is not installed (make test installs it)")

from pocketseg.benchmarks.bench import label_agreement  # noqa: E402
from pocketseg.benchmarks.nnunet_parity import (  # noqa: E402
    PRESETS,
    phantom_cases,
    predict_nnunet,
    real_cases,
)
from pocketseg.engine_build.nnunet_import import import_nnunet  # noqa: E402
from pocketseg.runtime.cascade import CascadePredictor  # noqa: E402

from pocketseg.imageio import load_volume  # noqa: E402
from pocketseg.manifest import load_package  # noqa: E402
from pocketseg.nifti import read_nifti  # noqa: E402

PRESET = PRESETS["fixture"]
FIXTURE = (Path(__file__).parent / "fixtures" / "nnunet_tiny" / PRESET.dataset_name
           / "nnUNetTrainer__nnUNetPlans__3d_parity")
FOREGROUND = 0.999
DICE = {"auto": 0.999, "onnxruntime": 0.998}


def test_fixture_is_small_and_genuine():
    size = sum(f.stat().st_size for f in FIXTURE.rglob("*") if f.is_file())
    assert size <= 2 * 2**20
    made = json.loads((FIXTURE / "fixture.json").read_text())
    assert made["preset"]["features"] == list(PRESET.features)
    plans = json.loads((FIXTURE / "plans.json").read_text())
    assert plans["configurations"]["3d_parity"]["inherits_from"] == "3d_fullres"


def _cases(root: Path, names=None):
    cases = phantom_cases(root / "cases", slices=40) + real_cases(root / "cases")
    return [c for c in cases if names is None or c.name in names]


def _nnunet(folder: Path, cases, work: Path) -> dict[str, np.ndarray]:
    outs = {c.name: work / f"{c.name}_nnunet.nii.gz" for c in cases}
    predict_nnunet(folder, PRESET.folds, [(c.path, outs[c.name]) for c in cases], log_path=work / "nnunet.log")
    return {name: np.asarray(read_nifti(out).data) for name, out in outs.items()}


def _agreement(package: Path, cases, theirs: dict[str, np.ndarray], backend: str) -> dict[str, dict]:
    predictor = CascadePredictor(package, device="cpu", backend=backend)
    assert predictor.settings.nnunet_numerics and predictor.settings.mirroring
    assert predictor.selection.backend == ("torch" if backend == "auto" else backend)
    names = {v: k for k, v in load_package(package).labels.items()}
    return {case.name: label_agreement(predictor.predict(load_volume(case.path)).labels, theirs[case.name], names)
            for case in cases}


def _check(results: dict[str, dict], min_dice: float) -> None:
    lines = []
    for name, r in results.items():
        dice = {k: v for k, v in r["dice"].items() if v is not None}
        assert len(dice) >= 2, f"{name}: nnU-Net and pocketseg predict almost nothing; the test would be empty"
        worst = min(dice, key=dice.get)
        lines.append(f"{name}: foreground {100 * r['foreground_agreement']:.4f} %, worst Dice {worst} "
                     f"{dice[worst]:.5f}")
        if r["foreground_agreement"] < FOREGROUND or dice[worst] < min_dice:
            pytest.fail("pocketseg differs from nnUNetPredictor:\n" + "\n".join(lines))


@pytest.fixture(scope="module")
def native(tmp_path_factory):
    """The fixture imported as it is (SimpleITK reader: the file's own voxel order) and nnU-Net's labels."""
    work = tmp_path_factory.mktemp("parity-native")
    package = import_nnunet(FIXTURE, work / "package", fp16=False)
    cases = _cases(work)
    return package, cases, _nnunet(FIXTURE, cases, work)


@pytest.mark.parametrize("backend", ["auto", "onnxruntime"])
def test_exact_mode_matches_nnunet_in_the_files_own_voxel_order(native, backend):
    package, cases, theirs = native
    stage = load_package(package).detail
    assert stage.voxel_order == "native" and stage.crop_to_nonzero and stage.normalization.scheme == "ct"
    _check(_agreement(package, cases, theirs, backend), DICE[backend])


def test_exact_mode_matches_nnunet_with_the_reorienting_reader(tmp_path):
    """The same model read by NibabelIOWithReorient (RAS voxel order, as TotalSegmentator's models)."""
    folder = tmp_path / PRESET.dataset_name / FIXTURE.name
    shutil.copytree(FIXTURE, folder)
    plans = json.loads((folder / "plans.json").read_text())
    plans["image_reader_writer"] = "NibabelIOWithReorient"
    (folder / "plans.json").write_text(json.dumps(plans))
    package = import_nnunet(folder, tmp_path / "package", fp16=False, check=False)
    assert load_package(package).detail.voxel_order == "RAS"
    cases = _cases(tmp_path, names={"phantom_LPS", "ct_lps_1p5mm"})
    _check(_agreement(package, cases, _nnunet(folder, cases, tmp_path), "auto"), DICE["auto"])
