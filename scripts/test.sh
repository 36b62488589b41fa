#!/usr/bin/env bash
# Runs every test: installs what the tests need, builds the binaries the
# end-to-end tests start, then runs the whole suite with cargo-nextest (or
# cargo test when nextest is not installed).
set -euo pipefail
cd "$(dirname "$0")/.."
# Each stage says when it starts, so a slow CI run shows where its time went.
stage() { echo "== $1 (at ${SECONDS} s)"; }

need_apt=()
command -v systemd-nspawn >/dev/null || need_apt+=(systemd-container)
command -v debootstrap >/dev/null || need_apt+=(debootstrap)
command -v rpm >/dev/null || need_apt+=(rpm)
command -v dpkg-deb >/dev/null || need_apt+=(dpkg)
command -v rpmbuild >/dev/null || need_apt+=(rpm)
command -v dpkg-scanpackages >/dev/null || need_apt+=(dpkg-dev)
command -v systemd-analyze >/dev/null || need_apt+=(systemd)
command -v ip >/dev/null || need_apt+=(iproute2)
[ -x /lib/systemd/systemd-journal-remote ] || need_apt+=(systemd-journal-remote)
command -v containerd >/dev/null || need_apt+=(containerd runc)
command -v stress-ng >/dev/null || need_apt+=(stress-ng)
command -v openssl >/dev/null || need_apt+=(openssl)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "installing: ${need_apt[*]}"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}"
fi
stage "lab"
# The booted-systemd tests need a Debian root filesystem (built once, cached).
scripts/lab/systemd-rootfs.sh --cache
command -v cargo >/dev/null || { echo "cargo is required (rustup.rs)" >&2; exit 1; }

stage "format and lints"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --quiet -- -D warnings

stage build
cargo build --workspace --bins --quiet

stage tests
status=0
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast "$@" || status=$?
else
  cargo test --workspace --no-fail-fast "$@" || status=$?
fi

stage "fuzz (each parser of outside input for a few seconds; long runs: RELIABILITY.md)"
FUZZ_PROFILE=${FUZZ_PROFILE:-smoke} scripts/fuzz.sh "${FUZZ_SECONDS:-3}" || status=$?
stage "done: $([ $status = 0 ] && echo passed || echo FAILED)"
exit $status
