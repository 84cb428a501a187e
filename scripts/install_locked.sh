#!/usr/bin/env bash
# Installs exactly the given lock files into the environment of PYTHON, nothing resolved beyond them
# (--no-deps), then `pip check`: a dependency missing from the locks fails here, not at the first job.
# The Dockerfile runs it with requirements.lock and requirements-cuda.lock; CI (.ci/run) with
# requirements.lock alone in a fresh virtual environment, so the image's runtime set is tested on every run.
#   bash scripts/install_locked.sh PYTHON LOCK_FILE...
set -euo pipefail
python=$1
shift
requirements=()
for lock in "$@"; do
  requirements+=(-r "$lock")
done
"$python" -m pip install --no-cache-dir --no-deps "${requirements[@]}"
"$python" -m pip check
