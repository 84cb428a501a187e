# syntax=docker/dockerfile:1
# The multitalk-worker image: the RunPod serverless worker (default command) and the local HTTP API.
#
#   docker build -t multitalk-worker .
#   docker build --build-arg GIT_REVISION="$(git rev-parse HEAD)" -t multitalk-worker:"$(git rev-parse --short HEAD)" .
#
# It builds with no build argument (the RunPod Hub passes none). The revision it reports: GIT_REVISION when
# given (CI and the release workflow pass the commit), else the commit checked out in the build context's .git,
# else "unknown" (scripts/image_revision.sh).
#
# Two stages. `build` (thrown away) installs exactly requirements.lock (the runtime set) and requirements-cuda.lock
# (the CUDA 13.0 wheels that torch 2.13.0 needs on Linux), with --no-deps, then `pip check`; requirements-gpu.lock
# (FlashAttention-3 and its metadata's einops and ninja, torchao for the fp8 tier; by hash), `pip check` again;
# checks the CUDA line of the installed torch; then the project, as a wheel built and installed there. The final
# stage takes only the virtual environment and the files the worker reads (handler.py, requirements.lock,
# examples/): no source tree, build folder or egg-info, no pip configuration. Any failed step fails the build;
# the last step runs the startup checks that need no weights or GPU. CI runs the same install from
# requirements.lock alone (scripts/check_image.sh).
#
# Where the package index is reached only through a local pip configuration or a TLS-intercepting proxy,
# scripts/build_image.sh passes them to the `build` stage as BUILD_PIP_CONFIG (a pip.conf),
# BUILD_PIP_CONSTRAINTS and BUILD_CA_CERTS (PEM text, added to the base's CA bundle); they stay in that stage.
# Without them (the RunPod Hub) pip uses its defaults.
#
# Base: Python 3.11 slim (Debian bookworm), the interpreter the locks were resolved for. No CUDA base image:
# torch's wheels bring the CUDA runtime, cuBLAS, cuDNN and NCCL, so the host needs only an NVIDIA driver that
# runs CUDA 13.0 (Linux driver 580 or newer). Pinned by tag, not by digest: no image registry could be reached
# where this file was written, so no digest was verified; pin one when you can.
FROM python:3.11.14-slim-bookworm AS build

# The CUDA line of the torch build pinned in requirements-cuda.lock; .runpod/hub.json allowedCudaVersions and
# tests/test_hub.py follow it.
ARG TORCH_CUDA=13.0
ARG BUILD_PIP_CONFIG=""
ARG BUILD_PIP_CONSTRAINTS=""
ARG BUILD_CA_CERTS=""

SHELL ["/bin/bash", "-euo", "pipefail", "-c"]
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_CONFIG_FILE=/etc/build-pip/pip.conf

RUN mkdir /etc/build-pip \
    && if [ -n "${BUILD_PIP_CONFIG}" ]; then printf '%s\n' "${BUILD_PIP_CONFIG}" > /etc/build-pip/pip.conf; fi \
    && if [ -n "${BUILD_PIP_CONSTRAINTS}" ]; then \
        printf '%s\n' "${BUILD_PIP_CONSTRAINTS}" > /etc/build-pip/constraints.txt; fi \
    && if [ -n "${BUILD_CA_CERTS}" ]; then \
        { cat /etc/ssl/certs/ca-certificates.crt; printf '%s\n' "${BUILD_CA_CERTS}"; } > /etc/build-pip/ca.pem; fi

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /build

# GPU-only wheels are pinned by hash in requirements-gpu.lock, never installed here by name. Then: the installed
# torch is the build the image declares.
COPY scripts/install_locked.sh scripts/
COPY requirements.lock requirements-cuda.lock requirements-gpu.lock ./
RUN bash scripts/install_locked.sh python requirements.lock requirements-cuda.lock \
    && pip install --no-cache-dir --no-deps --require-hashes -r requirements-gpu.lock \
    && pip check \
    && python -c 'import sys, torch; sys.exit(0 if torch.version.cuda == sys.argv[1] else \
    f"torch {torch.__version__} is built for CUDA {torch.version.cuda}, the image declares {sys.argv[1]}")' \
    "${TORCH_CUDA}"

COPY pyproject.toml README.md ./
COPY src ./src
RUN pip wheel --no-cache-dir --no-deps --no-build-isolation --wheel-dir /build/wheel . \
    && pip install --no-cache-dir --no-deps /build/wheel/multitalk_worker-*.whl


FROM python:3.11.14-slim-bookworm

ARG GIT_REVISION=""

SHELL ["/bin/bash", "-euo", "pipefail", "-c"]

# NVIDIA_*: the container toolkit mounts the host driver only when asked (the CUDA base images set these).
# HF_HUB_OFFLINE: every model file is read from the volume; nothing is fetched from a hub at run time.
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    HF_HUB_OFFLINE=1 \
    HF_HUB_DISABLE_TELEMETRY=1

# gcc and the C library headers: Triton compiles a small launcher with the system C compiler the first time a
# compiled kernel runs (MULTITALK_ENGINE=fast); the slim image has Python's headers but no compiler. Debian
# package versions change with security updates, so they are not pinned (hadolint DL3008 waived here).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /app
COPY handler.py requirements.lock ./
COPY examples ./examples

# The revision the worker reports in every result and in `health`. The .git patterns match nothing when the
# context has no git folder; the script then writes GIT_REVISION or "unknown".
COPY scripts/image_revision.sh .gi[t]/HEA[D] .gi[t]/packed-ref[s] .gi[t]/ref[s] /tmp/revision/
RUN sh /tmp/revision/image_revision.sh /tmp/revision "${GIT_REVISION}" > /app/REVISION \
    && rm -rf /tmp/revision \
    && echo "revision: $(cat /app/REVISION)"

ENV MULTITALK_REVISION_FILE=/app/REVISION \
    MULTITALK_LOCK_FILE=/app/requirements.lock \
    MULTITALK_WEIGHTS=/runpod-volume/multitalk \
    MULTITALK_VOLUME_ROOT=/runpod-volume

# The copied environment is consistent (`pip check`); every module imports, core versions are the locked ones,
# PyAV writes and reads back an H.264/AAC mp4.
RUN pip check && python -m multitalk_worker.startup --build > /dev/null

CMD ["python", "-m", "multitalk_worker.worker"]
