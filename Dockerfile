# syntax=docker/dockerfile:1
# ReconQ's image: the MRD gateway, the HTTP API and CPU workers (`reconq gateway|api|worker`).
#
# - Base image pinned by version (Python 3.12.8, Debian 12 "bookworm"). Pin it by digest as well on the
#   build host, where a registry is reachable, so a re-pushed tag cannot change what is built:
#     docker buildx imagetools inspect python:3.12.8-slim-bookworm --format '{{json .Manifest.Digest}}'
#   then build with --build-arg PYTHON_IMAGE=python:3.12.8-slim-bookworm@sha256:<that digest>
#   (both stages use the same base).
# - Dependencies are installed first, from requirements.lock with their hashes, in their own layer: a source
#   change rebuilds only the last layers. ReconQ itself is then installed with --no-deps (nothing unpinned).
# - It runs as the user reconq (uid/gid 10001), who owns nothing in the image but /data (mount the data root
#   there, owned by 10001 on the host); the code and its virtual environment belong to root, read-only to it.
#   compose.yaml runs it with a read-only root file system and a tmpfs on /tmp (the caches below live there).
# - GPU workers need the CUDA libraries and the [gpu] extra (cupy, cufinufft, NVML), which this image does
#   not have: the GPU image variant (a CUDA base and its own hashed lock) is issue 17's work.
ARG PYTHON_IMAGE=python:3.12.8-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
# Layer 1, the dependencies: only requirements.lock invalidates it. Wheels only, every file checked
# against its hash; --no-deps: the lock is the whole set (setuptools included, the build backend).
COPY requirements.lock /tmp/requirements.lock
RUN /opt/venv/bin/pip install --require-hashes --no-deps --only-binary=:all: -r /tmp/requirements.lock
# Layer 2, ReconQ: built with the locked setuptools (no build isolation, so nothing is fetched unpinned).
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
# (pip compiles the bytecode as it installs: the runtime, on a read-only file system, writes none)
RUN /opt/venv/bin/pip install --no-deps --no-build-isolation . \
    && /opt/venv/bin/pip uninstall --yes setuptools

FROM ${PYTHON_IMAGE}
RUN groupadd --system --gid 10001 reconq \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin reconq \
    && install -d -o 10001 -g 10001 -m 0700 /data
COPY --from=build /opt/venv /opt/venv
# HOME and the JIT caches (numba via sigpy, matplotlib's config, cupy's kernels) on /tmp: the root file
# system is read-only in compose.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    NUMBA_CACHE_DIR=/tmp/numba \
    MPLCONFIGDIR=/tmp/matplotlib \
    CUPY_CACHE_DIR=/tmp/cupy \
    RECONQ_DATA_DIR=/data
WORKDIR /data
USER 10001:10001
EXPOSE 9002 9080
ENTRYPOINT ["reconq"]
CMD ["--help"]
