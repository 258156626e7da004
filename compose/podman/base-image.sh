#!/usr/bin/env bash
# Build the base image the test stack's images start from, without pulling anything:
# debootstrap a minimal bookworm from the mirror apt already uses, then `podman import` it.
#
#   compose/podman/base-image.sh [TAG]      (default hopscope/debian-base:bookworm)
#
# It mirrors what users build on, python:3.11-slim-bookworm: Debian's minimal base plus
# Python with venv, and the few packages that image adds (ca-certificates, netbase,
# tzdata) — nothing else. No iproute2, no curl, no procps: every other program the hopscope
# image runs must come from compose/Dockerfile, or the test build fails as a user's would.
# apt inside the image points at the same mirror, so a Dockerfile's apt-get works offline.
set -euo pipefail
TAG=${1:-hopscope/debian-base:bookworm}
PACKAGES=python3,python3-venv,ca-certificates,netbase,tzdata
LABEL=dev.hopscope.base-packages
# An image built from another package list (an older script) is rebuilt.
if podman image exists "$TAG" \
  && [[ $(podman image inspect --format "{{ index .Labels \"$LABEL\" }}" "$TAG") == "$PACKAGES" ]]; then
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
debootstrap --variant=minbase --include="$PACKAGES" \
  bookworm "$root" "$mirror" >/var/tmp/hopscope-debootstrap.log 2>&1 \
  || { tail -20 /var/tmp/hopscope-debootstrap.log >&2; exit 1; }
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
# What the slim images leave out of a minimal Debian is not what matters here; what they
# add must not be here either (a test that passes because the base had a tool is worthless).
for tool in ip curl ps wget; do
  if chroot "$root" sh -c "command -v $tool" >/dev/null 2>&1; then
    echo "the base unexpectedly contains $tool" >&2
    exit 1
  fi
done
tar -C "$root" -c . | podman import \
  --change 'CMD ["/bin/bash"]' --change 'ENV LANG=C.UTF-8' \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change "LABEL $LABEL=$PACKAGES" - "$TAG" >/dev/null
echo "built $TAG" >&2
