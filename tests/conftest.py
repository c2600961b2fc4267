"""Shared fixtures.

``backend``: the array modules of the two devices, NumPy/SciPy and CuPy/cupyx
(``backend.am``, the runtime's :class:`ArrayModule`; the CuPy variant is marked
``gpu`` and skipped, with the reason, where CuPy or a GPU is missing).

``ct_examples``: the folder of small real CT volumes (see its NOTICE.md). It is
not part of the repository: it sits beside the clone at
``../shared/data/ct_examples`` and can be pointed elsewhere with the
environment variable ``POCKETSEG_CT_EXAMPLES``. Tests that use the fixture are
skipped when the folder is absent. Never copy these files into the repository;
copies into pytest's ``tmp_path`` are fine.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import scipy.ndimage

from pocketseg.runtime.arrays import array_module, cpu_module

CT_EXAMPLES_ENV = "POCKETSEG_CT_EXAMPLES"


def ct_examples_dir() -> Path:
    """Where the real CT examples are expected (the folder may not exist)."""
    override = os.environ.get(CT_EXAMPLES_ENV)
    if override:
        return Path(override)
    return Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ct_examples"


@pytest.fixture(scope="session")
def ct_examples() -> Path:
    """The real CT examples folder; skips the test when it is absent."""
    folder = ct_examples_dir()
    if not folder.is_dir():
        pytest.skip(f"real CT examples not found at {folder} (set {CT_EXAMPLES_ENV} to their folder)")
    return folder


def _cupy_backend() -> SimpleNamespace:
    """CuPy + cupyx.scipy.ndimage, or skip with the reason."""
    try:
        import cupy
        import cupyx.scipy.ndimage as cundi
    except Exception as exc:  # ImportError, or a CUDA library that fails to load
        pytest.skip(f"CuPy is not usable here: {exc}")
    try:
        n_gpus = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:
        pytest.skip(f"no CUDA GPU available: {exc}")
    if n_gpus < 1:
        pytest.skip("no CUDA GPU available")
    return SimpleNamespace(xp=cupy, ndi=cundi, to_np=cupy.asnumpy, am=array_module("cuda"))


@pytest.fixture(params=["numpy", pytest.param("cupy", marks=pytest.mark.gpu)])
def backend(request: pytest.FixtureRequest) -> SimpleNamespace:
    """xp/ndi of one device: the same test body runs on NumPy here and on CuPy where a GPU is lent."""
    if request.param == "cupy":
        return _cupy_backend()
    return SimpleNamespace(xp=np, ndi=scipy.ndimage, to_np=np.asarray, am=cpu_module())


# ------------------------------------------------------------------------------------------ tiny model packages

INTENSITY = {"mean": 80.0, "std": 70.0, "percentile_00_5": -110.0, "percentile_99_5": 320.0}


def make_run(folder: Path, stage: str, preset_name: str, seed: int = 0) -> Path:
    """A run folder as `pocketseg train` leaves it (config + checkpoint), with He-initialised weights."""
    from pocketseg.trainer.package import write_untrained_run

    return write_untrained_run(folder, stage, preset_name, intensity=INTENSITY, seed=seed)


@pytest.fixture(scope="session")
def tiny_package(tmp_path_factory) -> Path:
    """A verified model package of the tiny presets (random He-initialised weights), fp32 ONNX + safetensors."""
    pytest.importorskip("torch", reason="torch (extra 'train') is needed to build a test package")
    pytest.importorskip("onnxruntime", reason="onnxruntime (extra 'runtime') is not installed")
    from pocketseg.trainer.package import export_package

    root = tmp_path_factory.mktemp("tiny_package")
    roi = make_run(root / "roi", "roi", "roi-tiny")
    detail = make_run(root / "detail", "detail", "detail-tiny", seed=1)
    return export_package(roi, detail, root / "model", fp16=False, check=False)
