#!/bin/sh
# Prints the git revision the image reports (written to /app/REVISION at build):
#   1. GIT_REVISION, when the build got it (CI and the release workflow pass the commit);
#   2. else the commit checked out in the build context's .git (the RunPod Hub builds a clone of a release):
#      HEAD as a commit, or the ref it names, loose or in packed-refs;
#   3. else "unknown", which the worker reports as it is.
# DIR holds HEAD, packed-refs and the refs, either under DIR/refs/ (a .git folder) or directly in DIR (the
# Dockerfile's COPY of .git/refs drops the refs/ level).
#   sh scripts/image_revision.sh DIR [GIT_REVISION]
set -eu
dir=$1
given=${2:-}
if [ -n "$given" ]; then
  echo "$given"
  exit 0
fi
head=$(cat "$dir/HEAD" 2>/dev/null || true)
case "$head" in
  "ref: refs/"*)
    ref=${head#ref: }
    rev=$(cat "$dir/$ref" 2>/dev/null || cat "$dir/${ref#refs/}" 2>/dev/null \
      || awk -v ref="$ref" '$2 == ref { print $1 }' "$dir/packed-refs" 2>/dev/null || true)
    ;;
  *) rev=$head ;;
esac
if printf '%s\n' "$rev" | grep -Eqx '[0-9a-f]{40}|[0-9a-f]{64}'; then
  echo "$rev"
else
  echo unknown
fi
