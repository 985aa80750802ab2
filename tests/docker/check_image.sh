#!/usr/bin/env bash
# Build the project's Dockerfile in its three modes with a real Docker engine, run each image on the test job,
# and prove that a build secret reaches no part of an image. Root only (it starts its own dockerd).
#
#   tests/docker/check_image.sh [RESULTS_JSON]
#
# Needs Debian's docker.io and debootstrap (apt-get install docker.io debootstrap) and the default model in the
# local Hugging Face cache (`make model`). Docker Hub and the Hugging Face Hub are not needed: the base image is a
# stand-in made here (base_image.sh) and the baked model is the locally provisioned one. Everything runs in a
# fresh folder under TMPDIR with a private engine, which is stopped (by its PID) and removed at the end; the
# stand-in base is kept between runs in ~/.cache/worker-transformers. Build times and image sizes are printed
# and, when RESULTS_JSON is given, written there.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
PYTHON=${PYTHON:-$ROOT/.venv-image/bin/python}  # the image's stack: the stand-in base is made of its Python
RESULTS=${1:-}
MODEL=HuggingFaceTB/SmolLM2-135M-Instruct
TOKEN="hf_madeUpBuildSecret$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')"  # must never reach an image
JOB=$(cat "$ROOT/test_input.json")

# shellcheck source=tests/docker/engine.sh
source "$HERE/engine.sh"
# shellcheck source=tests/docker/base_image.sh
source "$HERE/base_image.sh"

t0=$SECONDS
log() { echo "[check_image $((SECONDS - t0))s] $*"; }
fail() { echo "[check_image] FAILED: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || fail "must run as root (it starts its own dockerd)"
for tool in dockerd debootstrap "$DOCKER"; do
  command -v "$tool" >/dev/null || fail "$tool is missing: apt-get install docker.io debootstrap"
done
SNAPSHOT=$("$PYTHON" - "$ROOT/src" "$MODEL" <<'EOF'
import os, sys
sys.path.insert(0, sys.argv[1])
from worker_transformers.config import hf_hub_cache_dir
from worker_transformers.model import hf_cache
print(hf_cache.snapshot(hf_hub_cache_dir(os.environ), sys.argv[2], None, newest_if_no_ref=False) or "")
EOF
)
[ -n "$SNAPSHOT" ] || fail "$MODEL is not in the local Hugging Face cache: run \`make model\` first"
HF_CACHE=$(cd "$SNAPSHOT/../../.." && pwd)  # .../hub, holding models--ORG--NAME/snapshots/REV

WORK=$(mktemp -d "${TMPDIR:-/tmp}/worker-transformers-docker.XXXXXX")
finish() {
  local rc=$?
  engine_stop
  local left
  left=$(engine_mounts)
  if [ -n "$left" ]; then echo "[check_image] FAILED: mounts left behind: $left" >&2; rc=1; fi
  rm -rf "$WORK"
  exit "$rc"
}
trap finish EXIT
trap 'exit 143' TERM INT  # so that `finish` runs when the check is stopped

# The build context is a copy, so a build never writes into the checkout (build.sh --from-folder stages the
# model inside its context) and the code-change rebuild below can edit a file.
CONTEXT="$WORK/context"
mkdir -p "$CONTEXT"
cp -r "$ROOT/Dockerfile" "$ROOT/.dockerignore" "$ROOT/handler.py" "$ROOT/test_input.json" "$ROOT/src" "$ROOT/builder" "$CONTEXT/"

engine_start "$WORK/engine"
log "dockerd $ENGINE_PID up ($("$DOCKER" version --format '{{.Server.Version}}'))"
base_image "$WORK" "$PYTHON"
log "base image ready"

declare -A BUILD_S SIZE_MB RUN_S
image_mb() { echo $(( $("$DOCKER" image inspect --format '{{.Size}}' "$1") / 1000000 )); }

build() {  # build NAME MODE BUILD.SH-OPTIONS...: the image wt-check:MODE; its build time and size kept as NAME
  local name=$1 mode=$2; shift 2
  local start=$SECONDS
  if ! HF_TOKEN=$TOKEN DOCKER=$DOCKER "$CONTEXT/builder/build.sh" "$mode" --tag "wt-check:$mode" "$@" -- \
      --build-arg BASE_IMAGE="$BASE_TAG" --network=host --progress=plain >"$WORK/build-$name.log" 2>&1; then
    tail -n 30 "$WORK/build-$name.log" >&2
    fail "the $name build failed"
  fi
  BUILD_S[$name]=$((SECONDS - start))
  SIZE_MB[$name]=$(image_mb "wt-check:$mode")
  log "built wt-check:$mode ($name) in ${BUILD_S[$name]} s, ${SIZE_MB[$name]} MB"
}

answer() {  # answer NAME IMAGE DOCKER-RUN-OPTIONS...: run the test job; the answer must name Paris
  local name=$1 image=$2; shift 2
  local start=$SECONDS
  if ! "$DOCKER" run --rm "$@" "$image" python handler.py --test_input "$JOB" >"$WORK/run-$name.log" 2>&1; then
    tail -n 20 "$WORK/run-$name.log" >&2
    fail "$name: the worker failed"
  fi
  RUN_S[$name]=$((SECONDS - start))
  grep -q '^{"text": "[^"]*Paris' "$WORK/run-$name.log" \
    || { tail -n 5 "$WORK/run-$name.log" >&2; fail "$name: the answer does not contain Paris"; }
  # Either line says the image's readahead manifest was read (the second: its pages were cached already).
  grep -qE "read (ahead [0-9.]+ [kMG]B of library pages|nothing ahead for the imports)" "$WORK/run-$name.log" \
    || { tail -n 5 "$WORK/run-$name.log" >&2; fail "$name: no readahead (no manifest in the image?)"; }
  log "$name: Paris, in ${RUN_S[$name]} s ($(grep -o "found: [a-z-]* at [^ ]*" "$WORK/run-$name.log"); $(grep -oE "read (ahead [0-9.]+ [kMG]B|nothing ahead)" "$WORK/run-$name.log"))"
}

# 1. The three modes. The first build installs the requirements; the next two reuse that layer.
build cached cached
build volume volume
build baked baked --model "$MODEL" --from-folder "$SNAPSHOT"

# 2. Each image answers the job, with the model where its mode says.
# The baked run also takes the Hub tests' CHAT_TEMPLATE, a path relative to /app: the template must be in the image
# (without tools it renders what the model's own does, so the answer is the same).
answer baked wt-check:baked --network=none -e CHAT_TEMPLATE=builder/chat_templates/chatml_tools.jinja
answer cached wt-check:cached --network=none -v "$HF_CACHE:/runpod-volume/huggingface-cache/hub:ro"
lower="$WORK/lowercase-cache"  # RunPod has been seen to store repo folders lowercased
mkdir -p "$lower"
cp -al "$HF_CACHE/models--${MODEL//\//--}" "$lower/models--huggingfacetb--smollm2-135m-instruct" 2>/dev/null \
  || cp -a "$HF_CACHE/models--${MODEL//\//--}" "$lower/models--huggingfacetb--smollm2-135m-instruct"
answer cached-lowercase wt-check:cached --network=none -v "$lower:/runpod-volume/huggingface-cache/hub:ro"
volume="$WORK/volume"  # filled the way a user fills one by hand; the worker accepts it by its manifest
"$PYTHON" "$ROOT/builder/fetch_model.py" "$SNAPSHOT" --model-id "$MODEL" --out "$volume/models/$MODEL" >/dev/null 2>&1
answer volume wt-check:volume --network=none -v "$volume:/runpod-volume"

# 3. An empty volume without the Hub: the worker tries to fill it, fails in one line and leaves nothing behind.
empty="$WORK/empty-volume"
mkdir -p "$empty"
if "$DOCKER" run --rm --network=none -v "$empty:/runpod-volume" wt-check:volume \
    python handler.py --test_input "$JOB" >"$WORK/run-empty-volume.log" 2>&1; then
  fail "empty-volume: the worker started without a model"
fi
grep -q "filling the network volume folder /runpod-volume/models/$MODEL" "$WORK/run-empty-volume.log" \
  || { tail -n 5 "$WORK/run-empty-volume.log" >&2; fail "empty-volume: no clear error"; }
[ ! -e "$empty/models/$MODEL" ] || fail "empty-volume: a failed fill left $empty/models/$MODEL"
[ -z "$(ls -A "$empty/models/.partial" 2>/dev/null)" ] || fail "empty-volume: a failed fill left a staging folder"
log "empty volume offline: refused in one line, nothing left behind"

# 4. A code change rebuilds only the code: the weights' layer comes from the cache.
echo "# a code change" >>"$CONTEXT/handler.py"
build baked-after-code-change baked --model "$MODEL" --from-folder "$SNAPSHOT"
fetch_step=$(grep -A2 -E 'model-baked [0-9]+/[0-9]+\] RUN' "$WORK/build-baked-after-code-change.log")
code_step=$(grep -A2 'RUN python -m compileall' "$WORK/build-baked-after-code-change.log")
grep -q CACHED <<<"$fetch_step" || fail "a code change re-ran the model fetch"
grep -q CACHED <<<"$code_step" && fail "a code change did not rebuild the code layer"
log "code change: the weights' layer came from the cache"

# 5. The baked builds had HF_TOKEN as a BuildKit secret: it must be in no log, no metadata and no layer.
# (Outputs go to files first: `cmd | grep -q` can fail with SIGPIPE under pipefail and hide a match.)
grep -lF "$TOKEN" "$WORK"/build-*.log && fail "the token is in a build log"
"$DOCKER" history --no-trunc wt-check:baked >"$WORK/history.txt"
"$DOCKER" image inspect wt-check:baked >"$WORK/inspect.json"
grep -qF "$TOKEN" "$WORK/history.txt" && fail "the token is in docker history"
grep -qF "$TOKEN" "$WORK/inspect.json" && fail "the token is in docker inspect"
# Every byte `docker save` gives (each layer's files, the configs, the manifests), base included, is searched as
# it streams: the image is gigabytes (torch with its CUDA libraries), and nothing needs to be written out.
search='
import sys
needles = [arg.encode() for arg in sys.argv[1:]]
keep = max(map(len, needles)) - 1
counts, tail, total = [0] * len(needles), b"", 0
while chunk := sys.stdin.buffer.read(1 << 24):
    window = tail + chunk
    counts = [count + window.count(needle) for count, needle in zip(counts, needles)]
    tail, total = window[-keep:], total + len(chunk)
print(total, *counts)
'
marker='"model_id": "HuggingFaceTB/SmolLM2-135M-Instruct"'  # what the baked layer holds, to prove the search finds
read -r saved_bytes token_hits marker_hits < <("$DOCKER" save wt-check:baked | "$PYTHON" -c "$search" "$TOKEN" "$marker")
[ "$saved_bytes" -gt 1000000000 ] || fail "docker save gave only $saved_bytes bytes to search"
[ "$token_hits" = 0 ] || fail "the token is in the saved image ($token_hits times)"
[ "$marker_hits" -gt 0 ] || fail "the search of the saved image finds nothing, not even the baked manifest"
log "token: in no build log, no history, no inspect output, none of the $((saved_bytes / 1000000)) MB docker save gives"

# 6. The figures.
BASE_MB=$(image_mb "$BASE_TAG")
echo
echo "mode                      build s   image MB   over base MB   job run s"
for mode in cached volume baked; do
  printf "%-25s %7s %10s %14s %11s\n" "$mode" "${BUILD_S[$mode]}" "${SIZE_MB[$mode]}" \
    "$((SIZE_MB[$mode] - BASE_MB))" "${RUN_S[$mode]}"
done
printf "%-25s %7s\n" "baked after code change" "${BUILD_S[baked-after-code-change]}"
echo "stand-in base $BASE_TAG: $BASE_MB MB; whole check: $((SECONDS - t0)) s"
if [ -n "$RESULTS" ]; then
  "$PYTHON" - "$RESULTS" <<EOF
import json, sys
json.dump({
    "build_s": {"cached": ${BUILD_S[cached]}, "volume": ${BUILD_S[volume]}, "baked": ${BUILD_S[baked]},
                "baked_after_code_change": ${BUILD_S[baked-after-code-change]}},
    "image_mb": {"cached": ${SIZE_MB[cached]}, "volume": ${SIZE_MB[volume]}, "baked": ${SIZE_MB[baked]}, "base": $BASE_MB},
    "job_run_s": {"baked": ${RUN_S[baked]}, "cached": ${RUN_S[cached]}, "cached_lowercase": ${RUN_S[cached-lowercase]},
                  "volume": ${RUN_S[volume]}},
    "check_s": $((SECONDS - t0)),
}, open(sys.argv[1], "w"), indent=1)
EOF
fi
log "all checks passed"
