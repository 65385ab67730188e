#!/usr/bin/env bash
# Make this machine build and run jlserve's images with podman, for `make image` and
# `make test-container`. The development and CI machines have no Docker engine and reach
# no image registry, only PyPI and Debian's packages, so this
#   1. installs podman, runc, podman-compose and debootstrap from Debian where missing;
#   2. builds, once, a stand-in for the Dockerfiles' base image `python:3.11-slim-bookworm`
#      from Debian bookworm's own packages (its python3 is 3.11), with python and pip in
#      /usr/local/bin as in the real image; later runs find it in podman's storage;
#   3. proves that a container runs.
# Settings come from docker/podman/containers.conf (CONTAINERS_CONF, set by the Makefile).
# Exit status 3: podman cannot work on this machine (the reason is printed).
set -euo pipefail

base_image="${1:?usage: setup.sh BASE_IMAGE_NAME}"

cannot() {
  echo "podman-setup: podman cannot work here: $*" >&2
  exit 3
}

missing=()
for tool in podman runc podman-compose debootstrap; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if ((${#missing[@]})); then
  [[ $(id -u) == 0 ]] || cannot "${missing[*]} missing and not root to install them"
  command -v apt-get >/dev/null 2>&1 || cannot "${missing[*]} missing and no apt-get"
  echo "podman-setup: installing ${missing[*]} from Debian"
  apt-get update -qq || cannot "apt-get update failed"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null \
    || cannot "apt-get install ${missing[*]} failed"
fi
: "${CONTAINERS_CONF:?set CONTAINERS_CONF to docker/podman/containers.conf}"

if ! podman image exists "$base_image"; then
  echo "podman-setup: building the stand-in base image $base_image (debootstrap, once)"
  root="$(mktemp -d /var/tmp/jlserve-rootfs.XXXXXX)"
  trap 'rm -rf "$root"' EXIT
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    bookworm "$root" >"$root.log" 2>&1 || {
    tail -20 "$root.log" >&2
    cannot "debootstrap of Debian bookworm failed"
  }
  rm -f "$root.log"
  # python:3.11-slim has python, pip and installed scripts in /usr/local/bin, and
  # pip may install there: a venv rooted at /usr/local gives the same layout.
  chroot "$root" python3 -m venv /usr/local
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
  tar -C "$root" -c . | podman import \
    --change 'ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3"]' \
    --quiet - "$base_image" >/dev/null
fi

podman run --rm --network host "$base_image" python -c 'import sys; assert sys.version_info[:2] == (3, 11)' \
  || cannot "a container of $base_image does not run"
echo "podman-setup: podman $(podman version --format '{{.Client.Version}}') ready, base image $base_image"
