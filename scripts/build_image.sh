#!/usr/bin/env bash
# Builds the image for real and runs what the RunPod Hub runs in it (docs/deploy.md, "Building and testing the
# image here"). Needs root and a machine where a Docker daemon can run; not part of CI (CI has none).
#   1. a Docker daemon: the running one, else Debian's docker.io, installed with apt and started here;
#   2. the base image python:3.11.14-slim-bookworm: pulled, else (no image registry reachable) a stand-in
#      built with debootstrap from Debian bookworm's packages (python3.11, its venv module, ca-certificates)
#      and tagged with the base's name, so the Dockerfile builds unchanged;
#   3. the host's pip configuration (`pip config list`: its index URLs, constraint file and CA bundle) passed
#      to the Dockerfile's throwaway `build` stage as build arguments; local index folders are served on
#      loopback for the build (it runs with the host's network) and find-links folders are left out (a
#      wheel there outranks the index at an equal version: here a CPU build of torch 2.13.0 would replace the
#      image's CUDA build);
#   4. `docker build` (Docker's classic builder: no BuildKit or buildx here), timed;
#   5. in the built image: every case of .runpod/tests.json through `python handler.py --test_input`, with
#      the tests' environment; `pip check`; no build leftovers and no build argument in the image;
#      MULTITALK_FP8=true on this machine (no GPU: the startup checks must refuse with their one line); the
#      image's size.
#   6. docker-compose.yml's service command with its environment (a token set, the tiny model): /health answers.
#   bash scripts/build_image.sh [TAG]            (default multitalk-worker:local)
#   SKIP_BUILD=1 bash scripts/build_image.sh     (step 5 and 6 only, on the image already built)
set -euo pipefail
cd "$(dirname "$0")/.."
tag=${1:-multitalk-worker:local}
base=$(sed -n 's/^FROM \([^ ]*\).*/\1/p' Dockerfile | head -1)
work=/var/tmp/multitalk-image-build
mkdir -p "$work"
servers=()
cleanup() {
  for pid in "${servers[@]}"; do kill "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT

# 1. Docker daemon
if ! docker info > /dev/null 2>&1; then
  if ! command -v dockerd > /dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io > /dev/null
  fi
  setsid dockerd > "$work/dockerd.log" 2>&1 < /dev/null &
  for _ in $(seq 60); do docker info > /dev/null 2>&1 && break; sleep 1; done
  docker info > /dev/null 2>&1 || { echo "dockerd did not start: $work/dockerd.log" >&2; exit 1; }
  echo "dockerd started (its log: $work/dockerd.log)"
fi
echo "docker: client $(docker version -f '{{.Client.Version}}'), daemon $(docker version -f '{{.Server.Version}}')"

# 2. Base image
if docker image inspect "$base" > /dev/null 2>&1; then
  echo "base $base: present"
elif timeout 60 docker pull -q "$base" > /dev/null 2>&1; then
  echo "base $base: pulled"
else
  SECONDS=0
  command -v debootstrap > /dev/null || {
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap > /dev/null
  }
  rootfs="$work/rootfs"
  rm -rf "$rootfs"
  debootstrap --variant=minbase bookworm "$rootfs" http://deb.debian.org/debian > "$work/debootstrap.log" 2>&1
  chroot "$rootfs" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive chroot "$rootfs" apt-get install -y -qq --no-install-recommends \
    python3.11 python3.11-venv python-is-python3 ca-certificates > /dev/null
  chroot "$rootfs" apt-get clean
  rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/tmp/*
  tar -C "$rootfs" -c . | docker import \
    -c 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' -c 'ENV LANG=C.UTF-8' \
    -c 'CMD ["python3"]' - "$base" > /dev/null
  rm -rf "$rootfs"
  echo "base $base: not pullable here; stand-in built from Debian bookworm with debootstrap" \
    "($(docker run --rm "$base" python --version), ${SECONDS} s)"
fi

# 3. The host's pip configuration, for the build stage only
config=$(python3 -m pip config list 2> /dev/null || true)
setting() { # the last value pip reports for KEY (global, user, site or environment)
  printf '%s\n' "$config" | sed -n "s/^[^.]*\.$1='\(.*\)'$/\1/p" | tail -1
}
pip_conf="[global]"
ca_certs=""
constraints=""
cert=$(setting cert)
cert=${cert:-${PIP_CERT:-}}
if [ -n "$cert" ] && [ -f "$cert" ]; then
  # Only the certificates the base image lacks (a build argument holds at most 128 KiB; the bundle is bigger):
  # the build stage appends them to the base's own bundle.
  ca_certs=$(docker run --rm "$base" cat /etc/ssl/certs/ca-certificates.crt | python3 -c '
import re, sys
blocks = lambda text: re.findall(r"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----", text, re.S)
known = {block.replace("\n", "") for block in blocks(sys.stdin.read())}
print("\n".join(block for block in blocks(open(sys.argv[1]).read()) if block.replace("\n", "") not in known))
' "$cert")
  pip_conf+=$'\n'"cert = /etc/build-pip/ca.pem"
fi
constraint=$(setting constraint)
if [ -n "$constraint" ] && [ -f "$constraint" ]; then
  constraints=$(cat "$constraint")
  pip_conf+=$'\n'"constraint = /etc/build-pip/constraints.txt"
fi
timeout_s=$(setting default-timeout)
[ -n "$timeout_s" ] && pip_conf+=$'\n'"default-timeout = $timeout_s"
port=18700
serve_local() { # a file:// index or a folder: served on loopback, its http URL appended to `urls`
  local folder=${1#file://}
  folder=${folder%/simple}
  port=$((port + 1))
  python3 -m http.server --bind 127.0.0.1 "$port" --directory "$folder" > /dev/null 2>&1 &
  servers+=("$!")
  urls+=("http://127.0.0.1:$port/simple")
}
for key in index-url extra-index-url; do
  urls=()
  for url in $(setting "$key"); do
    case "$url" in
      file://* | /*) serve_local "$url" ;;
      *) urls+=("$url") ;;
    esac
  done
  [ ${#urls[@]} -gt 0 ] && pip_conf+=$'\n'"$key = ${urls[*]}"
done
links=$(setting find-links)
[ -n "$links" ] && echo "pip find-links $links: not passed (a wheel there outranks the index at an equal version)"
sleep 1
echo "pip configuration for the build stage:"
printf '%s\n' "$pip_conf" | sed 's/^/  /'
added=$(printf '%s' "$ca_certs" | grep -c 'BEGIN CERTIFICATE' || true)
echo "  CA certificates: ${cert:-none}, $added beyond the base's"

# 4. Build
if [ "${SKIP_BUILD:-}" = 1 ]; then
  build_s="not built here (SKIP_BUILD=1)"
else
SECONDS=0
DOCKER_BUILDKIT=0 docker build --network host -t "$tag" \
  --build-arg GIT_REVISION="$(git rev-parse HEAD 2> /dev/null || true)" \
  --build-arg BUILD_PIP_CONFIG="$pip_conf" \
  --build-arg BUILD_PIP_CONSTRAINTS="$constraints" \
  --build-arg BUILD_CA_CERTS="$ca_certs" \
  . > "$work/build.log" 2>&1 || {
  tail -40 "$work/build.log"
  echo "build failed: $work/build.log" >&2
  exit 1
}
build_s="built in ${SECONDS} s"
cleanup
servers=()
docker image prune -f > /dev/null # the build stage's dangling layers
echo "build: ${build_s} (log: $work/build.log)"
fi

# 5. The built image
failed=0
check() { # NAME COMMAND...: runs it, prints pass/FAIL and the time
  local name=$1 start=$SECONDS
  shift
  if "$@" > "$work/check.log" 2>&1; then
    echo "pass  $name ($((SECONDS - start)) s)"
  else
    echo "FAIL  $name ($((SECONDS - start)) s):"
    tail -15 "$work/check.log" | sed 's/^/      /'
    failed=1
  fi
}
hub_tests() { # WHAT [INDEX]: from .runpod/tests.json: count, name INDEX, input INDEX (a job), env (-e lines)
  python3 -c '
import json, sys
hub = json.load(open(".runpod/tests.json"))
what, index = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 0
if what == "count":
    print(len(hub["tests"]))
elif what == "name":
    print(hub["tests"][index]["name"])
elif what == "input":
    print(json.dumps({"input": hub["tests"][index]["input"]}))
else:
    for item in hub["config"].get("env", []):
        print("-e")
        print(item["key"] + "=" + item["value"])
' "$@"
}
hub_test() { # INDEX: one case of .runpod/tests.json, as the Hub runs it; passes when the job's result has no error
  local index=$1 env_args input
  mapfile -t env_args < <(hub_tests env)
  input=$(hub_tests input "$index")
  docker run --rm "${env_args[@]}" "$tag" python handler.py --test_input "$input" > "$work/hub.log" 2>&1 || {
    cat "$work/hub.log"
    return 1
  }
  cat "$work/hub.log"
  grep -q "completed successfully" "$work/hub.log" && ! grep -q "Job result: {'error'" "$work/hub.log"
}
for index in $(seq 0 $(($(hub_tests count) - 1))); do
  check "tests.json $(hub_tests name "$index")" hub_test "$index"
done
check "pip check" docker run --rm "$tag" pip check
check "no build leftovers (/app holds only handler.py, requirements.lock, REVISION, examples/)" \
  docker run --rm "$tag" bash -c '
    [ "$(ls /app | tr "\n" " ")" = "REVISION examples handler.py requirements.lock " ] || { ls -la /app; exit 1; }
    ! ls -d /opt/venv/lib/python3.11/site-packages/*.egg-info /etc/build-pip 2> /dev/null | grep . '
check "no build argument in the image's history" \
  bash -c "! docker history --no-trunc '$tag' | grep -E 'BEGIN CERTIFICATE|BUILD_CA_CERTS|BUILD_PIP'"
fp8_refuses() { # the startup checks (RunPod's fitness checks) asking for fp8, on a machine without a GPU
  local out rc=0
  out=$(docker run --rm -e MULTITALK_WEIGHTS=tiny -e MULTITALK_FP8=true "$tag" \
    python -m multitalk_worker.startup 2>&1 > /dev/null) || rc=$?
  printf '%s\n' "$out" | grep 'fp8'
  [ "$rc" = 1 ] && [ "$(printf '%s\n' "$out" | grep -c 'FAIL')" = 1 ] && printf '%s\n' "$out" | grep -q 'FAIL fp8'
}
check "MULTITALK_FP8=true refused at start without a Hopper GPU (one line)" fp8_refuses
cat "$work/check.log" | grep 'fp8' | sed 's/^/      /' || true
compose_health() { # the compose service's command and environment, published on loopback as compose does
  local name="multitalk-compose-check-$$" port=18790 code="" token
  token=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')
  docker run -d --rm --name "$name" -p "127.0.0.1:$port:8000" -e MULTITALK_API_TOKEN="$token" \
    -e MULTITALK_WEIGHTS=tiny -e MULTITALK_VOLUME_ROOT=/runpod-volume -e MULTITALK_MAX_RESOLUTION=720p \
    -v "$work/volume:/runpod-volume" "$tag" python -m multitalk_worker.local_api --host 0.0.0.0 --port 8000 > /dev/null
  for _ in $(seq 180); do
    code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/health" || true)
    [ "$code" = 200 ] && break
    sleep 1
  done
  docker logs "$name" 2>&1 | tail -5
  docker stop "$name" > /dev/null
  echo "GET /health: $code"
  [ "$code" = 200 ]
}
mkdir -p "$work/volume"
check "docker-compose.yml's server command (0.0.0.0, token set) answers /health on 127.0.0.1" compose_health
size=$(docker image inspect -f '{{.Size}}' "$tag")
echo "image $tag: $(python3 -c "print(f'{$size / 1e9:.2f} GB')") ($size bytes), ${build_s}"
exit "$failed"
