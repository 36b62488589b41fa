#!/usr/bin/env bash
# Builds nodekeeper, starts a hub and an agent on this machine with their
# state in a temp dir (the embedded SQLite store), and shows the node Ready.
#   scripts/quickstart.sh          start
#   scripts/quickstart.sh stop     stop both and remove the temp dir
# Ports: NK_GRPC_PORT (default 7443) and NK_HTTP_PORT (default 7080).
set -euo pipefail
cd "$(dirname "$0")/.."
marker=/tmp/nodekeeper-quickstart.dir

stop() {
  if [ -f "$marker" ]; then
    dir=$(cat "$marker")
    for p in agent hub; do
      [ -f "$dir/$p.pid" ] && kill "$(cat "$dir/$p.pid")" 2>/dev/null || true
    done
    sleep 1
    rm -rf "$dir" "$marker"
    echo "stopped; removed $dir"
  else
    echo "nothing to stop"
  fi
}

if [ "${1:-}" = "stop" ]; then stop; exit 0; fi
[ -f "$marker" ] && stop

grpc=${NK_GRPC_PORT:-7443}
http=${NK_HTTP_PORT:-7080}
echo "== building (debug)"
cargo build --workspace --bins --quiet
bin=$(pwd)/target/debug

dir=$(mktemp -d /tmp/nodekeeper-quickstart.XXXXXX)
echo "$dir" > "$marker"
cat > "$dir/hub.yaml" <<YAML
listen: {grpc: "127.0.0.1:$grpc", http: "127.0.0.1:$http"}
stateDir: $dir/hub
YAML
cat > "$dir/agent.yaml" <<YAML
labels: {quickstart: "true"}
hub: {address: "http://127.0.0.1:$grpc"}
stateDir: $dir/agent
socket: $dir/agent.sock
YAML

"$bin/nodekeeper-hub" --config "$dir/hub.yaml" >"$dir/hub.log" 2>&1 &
echo $! > "$dir/hub.pid"
for _ in $(seq 100); do "$bin/nkctl" --hub "http://127.0.0.1:$http" summary >/dev/null 2>&1 && break; sleep 0.1; done
"$bin/nodekeeper-agent" --config "$dir/agent.yaml" >"$dir/agent.log" 2>&1 &
echo $! > "$dir/agent.pid"

export NODEKEEPER_HUB=http://127.0.0.1:$http
for _ in $(seq 100); do
  "$bin/nkctl" get nodes 2>/dev/null | grep -q ' Ready ' && break
  sleep 0.1
done
echo "== nkctl get nodes"
"$bin/nkctl" get nodes
echo
echo "== nkctl node status (the agent's local socket)"
"$bin/nkctl" --socket "$dir/agent.sock" node status
cat <<TXT

hub and agent are running; state and logs are in $dir
try:   export NODEKEEPER_HUB=http://127.0.0.1:$http
       $bin/nkctl get nodes -o wide
       $bin/nkctl describe node $(hostname | tr 'A-Z' 'a-z')
       printf 'apiVersion: nodekeeper.io/v1\nkind: AgentProfile\nmetadata: {name: debug}\nspec: {logLevel: debug}\n' | $bin/nkctl apply -f -
       printf 'apiVersion: nodekeeper.io/v1\nkind: Component\nmetadata: {name: demo}\nspec:\n  version: "1"\n  files: [{path: $dir/demo.conf, template: "node={{ node.name }}\\\\n"}]\n' | $bin/nkctl apply -f -
       $bin/nkctl get components; cat $dir/demo.conf
stop:  scripts/quickstart.sh stop
TXT
