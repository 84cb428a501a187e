#!/usr/bin/env bash
# README command 1: create .venv, install everything pinned in requirements-dev.lock (the runtime lock plus the
# dev and test tools) and the project, then run the main job (the RunPod handler, locally) on the built-in tiny
# model. The video lands in out/tiny.mp4.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q -r requirements-dev.lock
.venv/bin/python -m pip check
.venv/bin/python -m pip install -q --no-deps --no-build-isolation -e .
mkdir -p out
MULTITALK_WEIGHTS=tiny MULTITALK_VOLUME_ROOT="$PWD" .venv/bin/python -m multitalk_worker.worker \
  --test_input "$(cat examples/tiny_job.json)"
