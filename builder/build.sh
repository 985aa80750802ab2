#!/usr/bin/env bash
# Build the worker image in one of its three modes.
#
#   builder/build.sh baked|cached|volume [--model ID] [--revision REV] [--tag TAG] [--from-folder DIR]
#                    [-- DOCKER_BUILD_ARGS...]
#
#   --model ID         the Hugging Face model id (default: the Dockerfile's, HuggingFaceTB/SmolLM2-135M-Instruct)
#   --revision REV     branch, tag or commit to pin (default: main)
#   --tag TAG          the image's name (default: worker-transformers:MODE)
#   --from-folder DIR  baked only: bake this local model folder (recorded as --model) instead of downloading
#   -- ...             passed to `docker build` as they are, e.g. -- --build-arg BASE_IMAGE=... --network=host
#
# When HF_TOKEN is set, a baked build gets it as a BuildKit secret: it reaches the download step only, never an
# image layer, the image's history or the build log. DOCKER names the docker client (default: docker).
set -euo pipefail

usage() { sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//' >&2; exit "${1:-2}"; }
fail() { echo "build.sh: $*" >&2; exit 2; }

[ $# -ge 1 ] || usage
mode=$1; shift
case "$mode" in baked | cached | volume) ;; -h | --help) usage 0 ;; *) fail "unknown mode '$mode'; use baked, cached or volume" ;; esac

root=$(cd "$(dirname "$0")/.." && pwd)
model= revision= tag="worker-transformers:$mode" from_folder=
while [ $# -gt 0 ]; do
  case "$1" in
    --model) model=${2:?--model needs a model id}; shift 2 ;;
    --revision) revision=${2:?--revision needs a value}; shift 2 ;;
    --tag) tag=${2:?--tag needs a name}; shift 2 ;;
    --from-folder) from_folder=${2:?--from-folder needs a folder}; shift 2 ;;
    --) shift; break ;;
    *) fail "unknown option '$1' (docker build options go after --)" ;;
  esac
done

args=(--build-arg "MODEL_SOURCE=$mode" --tag "$tag")
[ -z "$model" ] || args+=(--build-arg "MODEL_NAME=$model")
[ -z "$revision" ] || args+=(--build-arg "MODEL_REVISION=$revision")

if [ -n "$from_folder" ]; then
  [ "$mode" = baked ] || fail "--from-folder bakes a folder into the image: use it with the baked mode"
  [ -n "$model" ] || fail "--from-folder needs --model, the id the worker serves the folder's model as"
  [ -f "$from_folder/config.json" ] || fail "--from-folder $from_folder has no config.json"
  staged="$root/builder/model-files"
  [ -z "$(find "$staged" -mindepth 1 ! -name README.md -print -quit)" ] \
    || fail "$staged already holds files (another build running?); empty it, keeping README.md"
  # The folder travels in the build context; the Dockerfile's baked stage mounts builder/model-files.
  # -L: a Hugging Face cache snapshot is made of symlinks into its blobs.
  trap 'find "$staged" -mindepth 1 ! -name README.md -delete' EXIT
  cp -rL "$from_folder/." "$staged/"
fi

if [ "$mode" = baked ] && [ -n "${HF_TOKEN:-}" ]; then
  args+=(--secret id=HF_TOKEN,env=HF_TOKEN)
fi

echo "building $tag (MODEL_SOURCE=$mode${model:+, MODEL_NAME=$model}${revision:+, MODEL_REVISION=$revision})" >&2
DOCKER_BUILDKIT=1 "${DOCKER:-docker}" build "${args[@]}" "$@" "$root"
