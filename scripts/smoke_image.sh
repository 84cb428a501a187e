#!/usr/bin/env bash
# Smoke test of a built image (needs a Docker engine; the image workflows run it): the RunPod handler's job
# on the built-in tiny model (CPU), the recorded revision, and the runtime package set (no test or lint tool).
#   bash scripts/smoke_image.sh IMAGE EXPECTED_REVISION
set -euo pipefail
cd "$(dirname "$0")/.."
image=$1
revision=$2
docker run --rm -e MULTITALK_WEIGHTS=tiny -e MULTITALK_VOLUME_ROOT=/app "$image" \
  python -m multitalk_worker.worker --test_input "$(cat examples/tiny_job.json)"
docker run --rm "$image" cat /app/REVISION | grep -qx "$revision"
docker run --rm "$image" python -c '
import importlib.util, sys
found = [m for m in ("pytest", "ruff", "hypothesis", "moto") if importlib.util.find_spec(m)]
sys.exit(f"test or lint tools in the image: {found}" if found else 0)'
echo "packages in the image: $(docker run --rm "$image" pip list --format=freeze | wc -l)"
