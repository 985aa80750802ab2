# Sourced by check_image.sh: a stand-in for the Dockerfile's CUDA PyTorch base image, made without a registry.
#
# The real base (the Dockerfile's BASE_IMAGE default) is pulled from Docker Hub, which this machine cannot
# reach. The stand-in keeps what the Dockerfile relies on: a Debian system Python with pip, `python` on PATH,
# torch already installed (the CPU build of torch 2.13.0, from this machine's pip), and the environment that
# RunPod's base images set (pip cache and HF_HOME under /workspace, system packages writable by pip).
# It is made with debootstrap from Debian's package registry, finished by a `docker build`, and kept as a
# `docker save` tarball in BASE_CACHE, so later runs load it in seconds instead of making it again.

BASE_TAG=${BASE_TAG:-localhost/worker-transformers-base:torch2.13.0-cpu}
BASE_CACHE=${BASE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/worker-transformers/docker-base}
BASE_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

base_image() {  # base_image WORK PYTHON: tag BASE_TAG in the running engine, from the cache or made anew
  local work=$1 python=$2
  local wheels="$work/base-context"
  rm -rf "$wheels" && mkdir -p "$wheels"
  # pip's own configuration here says where the torch wheel lies (a local folder, or the registry).
  "$python" -m pip download --quiet --no-deps --dest "$wheels" torch==2.13.0 2>"$work/pip-download.log" \
    || { cat "$work/pip-download.log" >&2; return 1; }
  local wheel key cached
  wheel=$(basename "$(ls "$wheels"/torch-*.whl)")
  key=$(cat "$BASE_DIR/base_image.sh" "$BASE_DIR/base.Dockerfile" <(echo "$wheel") | sha256sum | cut -c1-16)
  cached="$BASE_CACHE/base-$key.tar"
  if [ -s "$cached" ]; then
    "$DOCKER" load --quiet --input "$cached" >/dev/null
    echo "base image $BASE_TAG loaded from $cached"
    return 0
  fi

  local rootfs="$work/rootfs"
  rm -rf "$rootfs"
  debootstrap --variant=minbase --include=ca-certificates,python3,python3-pip,python-is-python3 \
    bookworm "$rootfs" >"$work/debootstrap.log" 2>&1 || { tail -n 20 "$work/debootstrap.log" >&2; return 1; }
  # This machine reaches the package registries through a proxy with its own certificate authorities;
  # without them pip inside a build fails with CERTIFICATE_VERIFY_FAILED.
  cp /usr/local/share/ca-certificates/*.crt "$rootfs/usr/local/share/ca-certificates/" 2>/dev/null || true
  chroot "$rootfs" update-ca-certificates >/dev/null
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  tar -C "$rootfs" --numeric-owner -c . | "$DOCKER" import - localhost/worker-transformers-debian:bookworm >/dev/null
  rm -rf "$rootfs"

  cp "$BASE_DIR/base.Dockerfile" "$wheels/Dockerfile"
  "$DOCKER" build --quiet --network=host --build-arg TORCH_WHEEL="$wheel" -t "$BASE_TAG" "$wheels" >/dev/null
  mkdir -p "$BASE_CACHE"
  "$DOCKER" save --output "$cached.$$.partial" "$BASE_TAG" && mv "$cached.$$.partial" "$cached"  # whole or absent
  echo "base image $BASE_TAG made with debootstrap and cached at $cached"
}
