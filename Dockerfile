# pocketseg inference image for x86_64 workstations and servers with an NVIDIA GPU.
#
#   docker build -t pocketseg:cuda .
#   docker run --rm --gpus all -v "$PWD/model:/model:ro" -v pocketseg-engines:/engines -v "$PWD/data:/data" \
#       pocketseg:cuda predict -i /data/ct.nii.gz -o /data/seg.nii.gz
#
# TensorRT, CuPy and cuCIM come from PyPI (pocketseg[tensorrt,gpu,runtime,sign]); the first predict builds
# TensorRT engines for the GPU it runs on (see deploy/entrypoint.py and docs/deployment.md).
#
# Two stages: the first creates the virtual environment, the second copies only that onto a clean
# base, so the image holds no source tree, no build directories and no venv tooling layer.
# No HEALTHCHECK: the container runs one job (predict, bench, build-engine) and exits; there is no
# long-running service to probe, and a periodic `pocketseg doctor` would only cost GPU memory.

# CUDA 12.8 runtime + cuDNN 9 on Ubuntu 24.04 (Python 3.12). cuDNN is only needed by ONNX Runtime's
# CUDA provider (onnxruntime-gpu); TensorRT 10 and CuPy run without it.
ARG BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

FROM ${BASE_IMAGE} AS build

# Pins of the packages named below; pip resolves the rest of pocketseg's requirements.
ARG PIP_VERSION=25.3
# tensorrt 10.12 is the last `tensorrt` meta-package that installs the CUDA 12 build on Linux
# (10.13.2 and later pull tensorrt-cu13, which cannot run on this CUDA 12 base).
ARG TENSORRT_VERSION=10.12.0.36
ARG CUPY_VERSION=13.6.0
ARG CUCIM_VERSION=25.8.0
ARG NVIDIA_ML_PY_VERSION=12.575.51
ARG ONNXRUNTIME_VERSION=1.23.2
ARG CC3D_VERSION=4.1.1

ENV DEBIAN_FRONTEND=noninteractive
# Ubuntu's archive keeps only the newest build of a package, so apt pins name the Python minor version.
RUN apt-get update \
    && apt-get install -y --no-install-recommends "python3-venv=3.12.*" \
    && rm -rf /var/lib/apt/lists/*

RUN python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check "pip==${PIP_VERSION}"

WORKDIR /src
COPY . .
RUN /opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check \
        "tensorrt==${TENSORRT_VERSION}" \
        "cupy-cuda12x==${CUPY_VERSION}" \
        "cucim-cu12==${CUCIM_VERSION}" \
        "nvidia-ml-py==${NVIDIA_ML_PY_VERSION}" \
        "onnxruntime==${ONNXRUNTIME_VERSION}" \
        "connected-components-3d==${CC3D_VERSION}" \
        "/src[tensorrt,gpu,runtime,sign]" \
    && /opt/venv/bin/python -m pip check


FROM ${BASE_IMAGE}

ENV DEBIAN_FRONTEND=noninteractive
# tini as PID 1 forwards signals (docker stop) to pocketseg and reaps children.
RUN apt-get update \
    && apt-get install -y --no-install-recommends "python3=3.12.*" "tini=0.19.*" \
    && rm -rf /var/lib/apt/lists/*

# A non-root user with uid 1000, the usual first user of a workstation, so that files written to
# bind mounts belong to them (Ubuntu 24.04 images ship an `ubuntu` user with that uid: replaced).
# /engines (engine cache, CuPy kernel cache) is writable by any uid, for `docker run --user`.
RUN if id ubuntu > /dev/null 2>&1; then userdel --remove ubuntu; fi \
    && useradd --no-log-init --create-home --uid 1000 --user-group pocketseg \
    && install -d -m 1777 /engines \
    && install -d -o pocketseg -g pocketseg /model /data

COPY --from=build /opt/venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    POCKETSEG_MODEL=/model \
    POCKETSEG_ENGINE_CACHE=/engines \
    POCKETSEG_ENGINES=auto \
    POCKETSEG_WORKSPACE_GB=4 \
    CUPY_CACHE_DIR=/engines/cupy-kernels

USER 1000:1000
WORKDIR /data
ENTRYPOINT ["tini", "--", "python", "-m", "pocketseg.deploy.entrypoint"]
CMD ["--help"]
