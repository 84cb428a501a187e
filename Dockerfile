# syntax=docker/dockerfile:1
# The multitalk-worker image: the RunPod serverless worker (default command) and the local HTTP API.
#
#   docker build --build-arg GIT_REVISION="$(git rev-parse HEAD)" -t multitalk-worker:"$(git rev-parse --short HEAD)" .
#
# One install path: requirements.lock (exact versions), then the project with --no-deps. Only the torch build
# differs from a CPU checkout: the CUDA wheel of the locked version, from TORCH_INDEX_URL. Any failed step fails
# the build; the last step runs the startup checks that need no weights or GPU.

# CUDA 12.8 runtime + cuDNN on Ubuntu 22.04, pinned by digest (amd64).
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04@sha256:59e0e4376a0f16d10b03d3a14344b80a866a1674cb4948cb318291387ac05010

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ARG GIT_REVISION

SHELL ["/bin/bash", "-euo", "pipefail", "-c"]

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_DISABLE_TELEMETRY=1

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*

RUN python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /app

COPY requirements.lock ./
RUN torch_version="$(sed -n 's/^torch==//p' requirements.lock)" \
    && test -n "$torch_version" \
    && pip install "torch==${torch_version}" --index-url "${TORCH_INDEX_URL}" \
    && pip install -r requirements.lock

COPY pyproject.toml README.md ./
COPY src ./src
COPY examples ./examples
RUN pip install --no-deps .

# The revision the worker reports in every result and in `health`. The build fails without it.
RUN test -n "${GIT_REVISION:-}" || { echo "pass --build-arg GIT_REVISION=\$(git rev-parse HEAD)" >&2; exit 1; } \
    && echo "${GIT_REVISION}" > /app/REVISION

ENV MULTITALK_REVISION_FILE=/app/REVISION \
    MULTITALK_LOCK_FILE=/app/requirements.lock \
    MULTITALK_WEIGHTS=/runpod-volume/multitalk \
    MULTITALK_VOLUME_ROOT=/runpod-volume

# Every module imports, core versions are the locked ones, PyAV writes and reads back an H.264/AAC mp4.
RUN python -m multitalk_worker.startup --build > /dev/null

CMD ["python", "-m", "multitalk_worker.worker"]
