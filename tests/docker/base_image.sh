# Sourced by check_image.sh: a stand-in for the Dockerfile's CUDA PyTorch base image, made without a registry.
#
# The real base (the Dockerfile's BASE_IMAGE default) is pulled from Docker Hub, which this machine cannot
# reach. The stand-in carries what the Dockerfile relies on, of the same stack (builder/image_stack.env): its
# Python (this machine's build of that version, copied to /usr/local) with pip, `python` on PATH, the same torch
# and torchvision already installed (PyPI's builds, which are the CUDA ones, with their CUDA libraries: they run on
# the CPU), and the environment RunPod's base images set (pip cache and HF_HOME under /workspace, system packages
# writable by pip).
# The system under it is Debian's (debootstrap; RunPod's is Ubuntu, which Debian's registry does not serve).
# It is made once and kept as a `docker save` tarball in BASE_CACHE, so later runs load it instead.

BASE_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=builder/image_stack.env
source "$BASE_DIR/../../builder/image_stack.env"
# The tag names the whole stack, so a base made for another one (without torchvision, say) is never taken for it.
BASE_STACK=py${IMAGE_PYTHON_VERSION}-torch${IMAGE_TORCH_VERSION}-torchvision${IMAGE_TORCHVISION_VERSION}
BASE_TAG=${BASE_TAG:-localhost/worker-transformers-base:$BASE_STACK}
BASE_CACHE=${BASE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/worker-transformers/docker-base}
# What the copied Python's modules link to, besides the C library (no Tk: tkinter is left out).
BASE_PACKAGES=ca-certificates,libssl3,libffi8,libsqlite3-0,libbz2-1.0,liblzma5,zlib1g,libreadline8,libncursesw6,libuuid1,libexpat1,libnsl2,libtirpc3

base_image() {  # base_image WORK PYTHON: tag BASE_TAG in the running engine, from the cache or made anew
  local work=$1 python=$2
  local prefix version
  # The interpreter behind PYTHON (a venv's base), which must be of the image's version.
  read -r prefix version < <("$python" -c 'import sys; print(sys.base_prefix, "%d.%d.%d" % sys.version_info[:3])')
  [ "${version%.*}" = "$IMAGE_PYTHON_VERSION" ] || {
    echo "the stand-in base needs Python $IMAGE_PYTHON_VERSION (builder/image_stack.env); $python is $version:" \
      "run the check with the image's venv (make docker-check)" >&2
    return 1
  }
  local wheels="$work/base-wheels"
  rm -rf "$wheels" && mkdir -p "$wheels"
  # torch, torchvision and what they need, for that Python: from pip's cache when the image's venv was made here.
  "$python" -m pip download --quiet --dest "$wheels" --only-binary=:all: "torch==$IMAGE_TORCH_VERSION" \
    "torchvision==$IMAGE_TORCHVISION_VERSION" 2>"$work/pip-download.log" \
    || { cat "$work/pip-download.log" >&2; return 1; }
  local key cached
  key=$(cat "$BASE_DIR/base_image.sh" "$BASE_DIR/base.Dockerfile" "$BASE_DIR/../../builder/image_stack.env" \
    <(echo "$version") <(ls "$wheels") | sha256sum | cut -c1-16)
  cached="$BASE_CACHE/base-$key.tar"
  if [ -s "$cached" ]; then
    rm -rf "$wheels"
    "$DOCKER" load --quiet --input "$cached" >/dev/null
    echo "base image $BASE_TAG loaded from $cached"
    return 0
  fi

  local rootfs="$work/rootfs"
  rm -rf "$rootfs"
  debootstrap --variant=minbase --include="$BASE_PACKAGES" bookworm "$rootfs" >"$work/debootstrap.log" 2>&1 \
    || { tail -n 20 "$work/debootstrap.log" >&2; return 1; }
  # This machine reaches the package registries through a proxy with its own certificate authorities;
  # without them pip inside a build fails with CERTIFICATE_VERIFY_FAILED.
  cp /usr/local/share/ca-certificates/*.crt "$rootfs/usr/local/share/ca-certificates/" 2>/dev/null || true
  chroot "$rootfs" update-ca-certificates >/dev/null
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  # The Python, relocated to /usr/local (its libpython is found there through ld.so's cache); its own test suite
  # and anything this machine added to its site-packages stay behind.
  tar -C "$prefix" --exclude="./lib/python$IMAGE_PYTHON_VERSION/test" \
    --exclude="./lib/python$IMAGE_PYTHON_VERSION/site-packages/*.pth" -c . | tar -C "$rootfs/usr/local" -x
  ln -sf "python$IMAGE_PYTHON_VERSION" "$rootfs/usr/local/bin/python"
  ln -sf "python$IMAGE_PYTHON_VERSION" "$rootfs/usr/local/bin/python3"
  chroot "$rootfs" ldconfig
  mv "$wheels" "$rootfs/wheels"
  chroot "$rootfs" python -m pip install --quiet --no-index --no-cache-dir --find-links /wheels \
    "torch==$IMAGE_TORCH_VERSION" "torchvision==$IMAGE_TORCHVISION_VERSION" >"$work/pip-install.log" 2>&1 \
    || { tail -n 20 "$work/pip-install.log" >&2; return 1; }
  rm -rf "$rootfs/wheels"
  chroot "$rootfs" python -c "import torch, torchvision; print(torch.__version__, torchvision.__version__)" >/dev/null
  tar -C "$rootfs" --numeric-owner -c . | "$DOCKER" import - localhost/worker-transformers-rootfs:stand-in >/dev/null
  rm -rf "$rootfs"

  mkdir -p "$work/base-context"
  cp "$BASE_DIR/base.Dockerfile" "$work/base-context/Dockerfile"
  "$DOCKER" build --quiet --network=host -t "$BASE_TAG" "$work/base-context" >/dev/null
  mkdir -p "$BASE_CACHE"
  rm -f "$BASE_CACHE"/base-*.tar  # an older stack's base is never loaded again
  "$DOCKER" save --output "$cached.$$.partial" "$BASE_TAG" && mv "$cached.$$.partial" "$cached"  # whole or absent
  echo "base image $BASE_TAG made with debootstrap and cached at $cached"
}
