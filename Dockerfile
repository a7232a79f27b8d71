# syntax=docker/dockerfile:1
# ReconQ's image, in two variants built from this one file (every role of a variant uses the same image):
#   cpu (default): the MRD gateway, the HTTP API and CPU workers (`reconq gateway|api|worker`)
#       docker build -t reconq:0.1.0 .
#   gpu: the same plus the [gpu] extra (cupy, cufinufft, NVML) and the CUDA 12 libraries, for GPU workers
#       docker build --build-arg VARIANT=gpu -t reconq-gpu:0.1.0 .
#
# - Base image pinned by version (Python 3.12.8, Debian 12 "bookworm"). Pin it by digest as well on the
#   build host, where a registry is reachable, so a re-pushed tag cannot change what is built:
#     docker buildx imagetools inspect python:3.12.8-slim-bookworm --format '{{json .Manifest.Digest}}'
#   then build with --build-arg PYTHON_IMAGE=python:3.12.8-slim-bookworm@sha256:<that digest>
#   (every stage uses the same base). The locks are for Python 3.12: keep the base at 3.12.
# - The GPU variant is this base plus NVIDIA's CUDA wheels from PyPI (requirements-gpu.lock, hashed), not
#   an nvidia/cuda base: one base image and one Python for both variants, the CUDA libraries pinned and
#   hash-checked like every other package, and only those cupy and cufinufft load (an nvidia/cuda runtime
#   image also carries NPP and nvJPEG, and Ubuntu's Python instead of the one the locks were made for).
#   The driver's libraries (libcuda, NVML) come from the host: the NVIDIA Container Toolkit mounts them
#   into the container given a GPU (compose's device reservation, docker run --gpus).
# - Layers, from the least to the most often changed: the base and the user; the CPU packages
#   (requirements.lock; the same layer in both variants); the GPU packages (the rest of
#   requirements-gpu.lock, about 3 GB: rebuilt, pushed and pulled only when that lock changes); ReconQ
#   itself, installed from its wheel with --no-deps (nothing unpinned), a layer of a few MB. A source
#   change rebuilds and ships that last layer only. Wheels only, every file checked against its hash;
#   --no-deps: each lock is the whole set (setuptools included, the build backend of the wheel stage).
# - It runs as the user reconq (uid/gid 10001), who owns nothing in the image but /data (mount the data root
#   there, owned by 10001 on the host); the code and its virtual environment belong to root, read-only to it.
#   compose.yaml runs it with a read-only root file system and a tmpfs on /tmp (the caches below live there).
# - A container can check its numerical stack with `python -m reconq.workers.selftest [--gpu]` (exit 1 and
#   one FAILED line when broken); compose's GPU workers run it before the worker starts.
ARG PYTHON_IMAGE=python:3.12.8-slim-bookworm
ARG VARIANT=cpu

FROM ${PYTHON_IMAGE} AS base
RUN groupadd --system --gid 10001 reconq \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin reconq \
    && install -d -o 10001 -g 10001 -m 0700 /data \
    && python -m venv /opt/venv
# HOME and the JIT caches (numba via sigpy, matplotlib's config, cupy's kernels) on /tmp: the root file
# system is read-only in compose. PIP_*: only the build uses pip.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    NUMBA_CACHE_DIR=/tmp/numba \
    MPLCONFIGDIR=/tmp/matplotlib \
    CUPY_CACHE_DIR=/tmp/cupy \
    RECONQ_DATA_DIR=/data \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The CPU packages: only requirements.lock invalidates this layer. (pip compiles the bytecode as it
# installs: the runtime, on a read-only file system, writes none.)
FROM base AS deps-cpu
RUN --mount=type=bind,source=requirements.lock,target=/tmp/requirements.lock \
    pip install --require-hashes --no-deps --only-binary=:all: -r /tmp/requirements.lock

# The GPU packages on top: what requirements.lock installed is already satisfied (same versions, same
# hashes), so this layer holds cupy, cufinufft, nvidia-ml-py and the CUDA wheels only.
FROM deps-cpu AS deps-gpu
RUN --mount=type=bind,source=requirements-gpu.lock,target=/tmp/requirements-gpu.lock \
    pip install --require-hashes --no-deps --only-binary=:all: -r /tmp/requirements-gpu.lock
# GPUs and driver capabilities for the NVIDIA Container Toolkit (compute: libcuda; utility: NVML,
# nvidia-smi); compose's device_ids narrow "all" to each service's GPU. cufinufft's library links
# libcudart.so.12 and libcufft.so.11 without a path and its wheel does not carry them: the loader finds
# them in the nvidia wheels' folders (cupy finds the same files itself).
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    LD_LIBRARY_PATH=/opt/venv/lib/python3.12/site-packages/nvidia/cuda_runtime/lib:/opt/venv/lib/python3.12/site-packages/nvidia/cufft/lib:/opt/venv/lib/python3.12/site-packages/nvidia/nvjitlink/lib:/opt/venv/lib/python3.12/site-packages/nvidia/cuda_nvrtc/lib

# ReconQ's wheel, built with the locked setuptools (no build isolation, so nothing is fetched unpinned).
# The same pure-Python wheel for both variants.
FROM deps-cpu AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY reconq reconq
COPY core core
COPY api api
COPY gateway gateway
COPY workers workers
COPY recon recon
COPY scheduler scheduler
COPY parametermaps parametermaps
RUN pip wheel --no-deps --no-build-isolation --wheel-dir /wheels .

# The image: the variant's packages, then ReconQ from its wheel (mounted, not copied: no wheel left in a
# layer). setuptools is needed by no runtime code: uninstalled.
FROM deps-${VARIANT} AS image
RUN --mount=type=bind,from=wheel,source=/wheels,target=/tmp/wheels \
    pip install --no-deps --no-index /tmp/wheels/reconq-*.whl \
    && pip uninstall --yes setuptools
WORKDIR /data
USER 10001:10001
EXPOSE 9002 9080
ENTRYPOINT ["reconq"]
CMD ["--help"]
