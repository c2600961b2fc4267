"""Packaging: one import namespace, no torch in the core."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_core_and_io_do_not_import_torch():
    code = ("import sys, pocketseg.cli, pocketseg.nifti, pocketseg.volume, pocketseg.synth.dataset, pocketseg.runtime; "
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0


def test_rooms_import_under_the_pocketseg_namespace():
    import importlib

    for folder in ("runtime", "engine_build", "evaluation", "trainer", "deploy", "benchmarks"):
        module = importlib.import_module(f"pocketseg.{folder}")
        assert Path(module.__file__).resolve().parent == ROOT / folder


def test_public_entry_points_are_the_runtime_functions_imported_on_first_use():
    code = ("import sys, pocketseg; light = not {'scipy', 'nibabel', 'pocketseg.runtime'} & set(sys.modules); "
            "from pocketseg.runtime.cascade import CascadePredictor; from pocketseg.runtime.predict import predict, segment; "
            "same = pocketseg.segment is segment and pocketseg.predict is predict "
            "and pocketseg.CascadePredictor is CascadePredictor; "
            "sys.exit(0 if light and same and 'segment' in dir(pocketseg) else 1)")
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0
    import pocketseg

    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        pocketseg.nothing  # noqa: B018


@pytest.mark.slow
def test_wheel_puts_only_pocketseg_at_the_top_of_site_packages(tmp_path):
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
                          str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    wheel = next(tmp_path.glob("pocketseg-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        tops = {name.split("/")[0] for name in zf.namelist()}
        listed = zf.namelist()
        names = set(listed)
    # The rooms' links inside pocketseg/ (for import-linter) must not put a room's files in twice.
    assert len(listed) == len(names)
    assert tops == {"pocketseg", next(t for t in tops if t.endswith(".dist-info"))}
    for module in ("pocketseg/runtime/__init__.py", "pocketseg/trainer/__init__.py", "pocketseg/engine_build/__init__.py",
                   "pocketseg/evaluation/metrics.py", "pocketseg/deploy/entrypoint.py", "pocketseg/benchmarks/__init__.py",
                   "pocketseg/synth/phantom.py", "pocketseg/cli.py", "pocketseg/version.py"):
        assert module in names


@pytest.mark.parametrize("module", ["pocketseg.runtime.resample", "pocketseg.runtime.sliding_window",
                                    "pocketseg.runtime.intensity", "pocketseg.runtime.postprocess",
                                    "pocketseg.runtime.arrays", "pocketseg.runtime.engines",
                                    "pocketseg.runtime.tensorrt_probe", "pocketseg.runtime.cascade",
                                    "pocketseg.runtime.predict", "pocketseg.evaluation.evaluate",
                                    "pocketseg.deploy.doctor", "pocketseg.deploy.entrypoint", "pocketseg.cli"])
def test_runtime_array_code_imports_neither_cupy_nor_torch(module):
    # Array code takes an ArrayModule and engines import their library when opened: importing the runtime (and
    # what the Jetson image runs on top of it, the CLI included) pulls in no device library and nothing of the
    # trainer (the image has no torch).
    code = (f"import sys, {module}; "
            "sys.exit(1 if {'cupy', 'cupyx', 'torch'} & {m.split('.')[0] for m in sys.modules} "
            "or any(m.startswith('pocketseg.trainer') for m in sys.modules) else 0)")
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0
