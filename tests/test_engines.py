"""Backend selection and the engines behind one interface (CPU here; GPU variants need a lent GPU)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from pocketseg.errors import InputError
from pocketseg.manifest import load_package
from pocketseg.runtime import engines
from pocketseg.runtime.arrays import DeviceUnavailableError, cuda_available

pytest.importorskip("onnxruntime", reason="onnxruntime (extra 'runtime') is not installed")
no_gpu = pytest.mark.skipif(cuda_available()[0], reason="this test describes a machine without a usable GPU")


@no_gpu
def test_auto_picks_onnxruntime_on_the_cpu(tiny_package):
    sel = engines.resolve(manifest=load_package(tiny_package))
    assert (sel.backend, sel.device, sel.precision) == ("onnxruntime", "cpu", "fp32")
    assert "CPU" in sel.reason


@no_gpu
def test_unavailable_choices_say_why():
    with pytest.raises(DeviceUnavailableError, match="cuda"):
        engines.resolve(device="cuda")
    with pytest.raises(engines.EngineUnavailableError, match="tensorrt"):
        engines.resolve(backend="tensorrt", device="cpu", precision="fp32")
    with pytest.raises(InputError, match="fp16 needs a CUDA device"):
        engines.resolve(device="cpu", precision="fp16")
    with pytest.raises(InputError, match="backend must be one of"):
        engines.resolve(backend="openvino")


def test_probe_reports_every_backend():
    status = engines.probe_backends(import_torch=False)
    assert set(status) == set(engines.BACKENDS)
    assert status["onnxruntime"].installed and "cpu" in status["onnxruntime"].devices


def test_onnxruntime_and_torch_engines_agree(tiny_package):
    pytest.importorskip("torch")
    manifest = load_package(tiny_package)
    batch = np.random.default_rng(0).normal(size=(2, 1) + manifest.detail.patch_zyx).astype(np.float32)
    outs = {}
    for backend in ("onnxruntime", "torch"):
        sel = engines.resolve(backend=backend, device="cpu", manifest=manifest)
        engine = engines.open_engine(tiny_package, manifest.detail, sel)
        outs[backend] = np.asarray(engine(batch))
        assert outs[backend].shape == (2, 15) + manifest.detail.patch_zyx
    np.testing.assert_allclose(outs["onnxruntime"], outs["torch"], atol=1e-3)


def test_onnxruntime_runtime_imports_no_torch(tiny_package):
    code = (
        "import sys, numpy as np\n"
        "from pocketseg.runtime.cascade import CascadePredictor\n"
        "from pocketseg.synth.phantom import make_phantom\n"
        "from pocketseg.volume import Volume\n"
        f"p = CascadePredictor({str(tiny_package)!r}, device='cpu', backend='onnxruntime')\n"
        "ph = make_phantom(0, small=True, slices=8)\n"
        "p.predict(Volume(ph.image, ph.affine))\n"
        "print('torch' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def test_auto_device_falls_back_to_the_cpu_when_no_backend_runs_on_the_gpu(monkeypatch):
    # A usable GPU, but no GPU-capable backend installed (plain onnxruntime, no TensorRT, no CUDA torch).
    monkeypatch.setattr(engines, "cuda_available", lambda: (True, ""))
    real = engines._available_on
    monkeypatch.setattr(engines, "_available_on",
                        lambda name, device, manifest: (False, "not here", {}) if device == "cuda" else real(name, device, manifest))
    sel = engines.resolve()
    assert (sel.device, sel.precision) == ("cpu", "fp32") and "no backend can run on the GPU" in sel.reason
    with pytest.raises(engines.EngineUnavailableError):
        engines.resolve(device="cuda")  # an explicit device is never rewritten
