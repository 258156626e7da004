#!/usr/bin/env bash
# Build the Debian base image hopscope's images start from, without pulling anything:
# debootstrap a minimal bookworm from the mirror apt already uses, then `podman import` it.
#
#   compose/podman/base-image.sh [TAG]      (default hopscope/debian-base:bookworm)
set -euo pipefail
TAG=${1:-hopscope/debian-base:bookworm}
if podman image exists "$TAG"; then
  echo "$TAG already present" >&2
  exit 0
fi
# The mirror apt uses: URIs of enabled deb822 sources, else one-line `deb` entries.
mirror=$( (grep -h '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{print $2}';
           grep -h '^deb ' /etc/apt/sources.list 2>/dev/null | awk '{print $2}') \
  | grep -E '/debian/?$' | head -1 || true)
mirror=${mirror:-http://deb.debian.org/debian}
root=$(mktemp -d /var/tmp/hopscope-rootfs.XXXXXX)
trap 'rm -rf "$root"' EXIT
echo "debootstrap bookworm from $mirror (a few minutes)…" >&2
debootstrap --variant=minbase \
  --include=python3,python3-venv,iproute2,ca-certificates,curl,procps \
  bookworm "$root" "$mirror" >/var/tmp/hopscope-debootstrap.log 2>&1 \
  || { tail -20 /var/tmp/hopscope-debootstrap.log >&2; exit 1; }
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
tar -C "$root" -c . | podman import \
  --change 'CMD ["/bin/bash"]' --change 'ENV LANG=C.UTF-8' - "$TAG" >/dev/null
echo "built $TAG" >&2
