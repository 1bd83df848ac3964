#!/usr/bin/env bash
# Build a local stand-in for the Dockerfile's base image (python:3.11-slim) with debootstrap, for hosts that
# cannot pull images: Debian bookworm (its python3 is 3.11) with python3, venv and pip, imported into podman
# and tagged as the base image's name. The root file system is cached as a tarball, so a rerun only imports it.
#
#   deploy/base-image.sh [TAG]        TAG defaults to docker.io/library/python:3.11-slim
#
# Environment: BASE_CACHE (folder for the tarball, default /var/cache/classifier-deploy),
# DEBIAN_MIRROR (default: the first deb.debian.org-style URI in apt's sources, else http://deb.debian.org/debian).
set -euo pipefail

TAG=${1:-docker.io/library/python:3.11-slim}
CACHE=${BASE_CACHE:-/var/cache/classifier-deploy}
TARBALL=$CACHE/bookworm-python3.11-rootfs.tar
SUITE=bookworm
PACKAGES=python3,python3-venv,python3-pip,ca-certificates,netbase,tzdata

say() { printf '[base-image] %s\n' "$*" >&2; }
die() { say "ERROR: $*"; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (debootstrap and podman import need it)"

# shellcheck source=deploy/podman-env.sh
. "$(dirname "$0")/podman-env.sh"

if podman image exists "$TAG" && podman run --rm --network none "$TAG" python --version >/dev/null 2>&1; then
  say "$TAG already present ($(podman image inspect --format '{{.Id}}' "$TAG" | cut -c1-12))"
  exit 0
fi

mirror() {
  if [ -n "${DEBIAN_MIRROR:-}" ]; then echo "$DEBIAN_MIRROR"; return; fi
  local uri
  uri=$(grep -h -E '^(URIs:|deb )' /etc/apt/sources.list /etc/apt/sources.list.d/* 2>/dev/null \
        | grep -o -E 'https?://[^ ]+/debian/?' | grep -v -- '-security' | head -1 || true)
  echo "${uri:-http://deb.debian.org/debian}"
}

if [ ! -s "$TARBALL" ]; then
  mkdir -p "$CACHE"
  rm -rf "$CACHE"/rootfs.*  # left by an interrupted run
  root=$(mktemp -d "$CACHE/rootfs.XXXXXX")
  trap 'rm -rf "$root"' EXIT
  url=$(mirror)
  say "debootstrap $SUITE from $url into $root (a few minutes)"
  started=$SECONDS
  debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$root" "$url" >"$CACHE/debootstrap.log" 2>&1 \
    || { tail -30 "$CACHE/debootstrap.log" >&2; die "debootstrap failed (log: $CACHE/debootstrap.log)"; }
  say "debootstrap took $((SECONDS - started)) s"
  # The official image's interpreter lives in /usr/local/bin; the Dockerfile calls `python` from PATH.
  ln -sf /usr/bin/python3.11 "$root/usr/local/bin/python3"
  ln -sf /usr/bin/python3.11 "$root/usr/local/bin/python"
  chroot "$root" python --version >&2 || die "python does not run in the new root file system"
  rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb \
         "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/var/log/*.log
  tar -C "$root" --numeric-owner -cf "$TARBALL.tmp" .
  mv "$TARBALL.tmp" "$TARBALL"
  rm -rf "$root"
  trap - EXIT
fi

say "importing $TARBALL as $TAG"
podman import \
  --change 'ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'CMD ["python3"]' \
  "$TARBALL" "$TAG" >/dev/null || die "podman import failed"
podman run --rm --network none "$TAG" python -c 'import sys, venv; assert sys.version_info[:2] == (3, 11), sys.version' \
  || die "$TAG has no working Python 3.11"
say "$TAG ready ($(podman image inspect --format '{{.Size}}' "$TAG") bytes)"
