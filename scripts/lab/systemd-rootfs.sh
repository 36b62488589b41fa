#!/usr/bin/env bash
# Prints the path of a Debian bookworm root filesystem with systemd, for
# booting a real systemd with systemd-nspawn in tests. Builds it once with
# debootstrap (~1 min) and caches it as a tarball under
# ${NK_LAB_CACHE:-$HOME/.cache/nodekeeper-lab}; later calls unpack the cache.
#   scripts/lab/systemd-rootfs.sh DEST     unpack (or build) into DEST
#   scripts/lab/systemd-rootfs.sh --cache  only make sure the cache exists
set -euo pipefail
dest=${1:?usage: systemd-rootfs.sh DEST|--cache}
cache=${NK_LAB_CACHE:-$HOME/.cache/nodekeeper-lab}
tarball=$cache/bookworm-systemd.tar
mkdir -p "$cache"
need=()
command -v systemd-nspawn >/dev/null || need+=(systemd-container)
command -v debootstrap >/dev/null || need+=(debootstrap)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >&2
fi
if [ ! -f "$tarball" ]; then
  mirror=${NK_DEBIAN_MIRROR:-http://deb.debian.org/debian}
  tmp=$(mktemp -d "$cache/build.XXXXXX")
  echo "debootstrap bookworm from $mirror (cached afterwards)" >&2
  debootstrap --variant=minbase --include=systemd,systemd-sysv,dbus,procps,iproute2,init-system-helpers \
    bookworm "$tmp/root" "$mirror" >&2
  tar -C "$tmp/root" -cf "$tarball.part" .
  mv "$tarball.part" "$tarball"
  rm -rf "$tmp"
fi
[ "$dest" = --cache ] && exit 0
mkdir -p "$dest"
tar -C "$dest" -xf "$tarball"
echo "$dest"
