#!/usr/bin/env bash
# Builds nodekeeper, starts a hub and an agent on this machine with their
# state in a temp dir (the embedded SQLite store), and shows the node Ready.
# The real security path: the hub creates its CA and an admin token, a join
# token is made with nkctl, the agent pins the CA and joins with it.
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
"$bin/nodekeeper-hub" --config "$dir/hub.yaml" >"$dir/hub.log" 2>&1 &
echo $! > "$dir/hub.pid"
for _ in $(seq 100); do [ -s "$dir/hub/admin.token" ] && break; sleep 0.1; done
export NODEKEEPER_HUB=https://127.0.0.1:$http
export NODEKEEPER_TOKEN=$(cat "$dir/hub/admin.token")
export NODEKEEPER_CA=$dir/hub/ca.crt
for _ in $(seq 100); do "$bin/nkctl" summary >/dev/null 2>&1 && break; sleep 0.1; done
echo "== nkctl token create join"
join=$("$bin/nkctl" token create join --ttl 1h --uses 1 --description quickstart -o json)
token=$(printf '%s' "$join" | sed -n 's/.*"token": *"\([^"]*\)".*/\1/p')
hash=$(printf '%s' "$join" | sed -n 's/.*"caCertHash": *"\([^"]*\)".*/\1/p')
echo "token $token, CA $hash"
cat > "$dir/agent.yaml" <<YAML
labels: {quickstart: "true"}
hub: {address: "https://127.0.0.1:$grpc", bootstrapToken: "$token", caCertHash: "$hash"}
stateDir: $dir/agent
socket: $dir/agent.sock
YAML
"$bin/nodekeeper-agent" --config "$dir/agent.yaml" >"$dir/agent.log" 2>&1 &
echo $! > "$dir/agent.pid"

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
nkctl's environment (the admin token the hub wrote, and its CA):
       export NODEKEEPER_HUB=https://127.0.0.1:$http
       export NODEKEEPER_TOKEN=\$(cat $dir/hub/admin.token)
       export NODEKEEPER_CA=$dir/hub/ca.crt
try:   $bin/nkctl get nodes -o wide
       $bin/nkctl get audit
       $bin/nkctl describe node $(hostname | tr 'A-Z' 'a-z')
       printf 'apiVersion: nodekeeper.io/v1\nkind: AgentProfile\nmetadata: {name: debug}\nspec: {logLevel: debug}\n' | $bin/nkctl apply -f -
       printf 'apiVersion: nodekeeper.io/v1\nkind: Component\nmetadata: {name: demo}\nspec:\n  version: "1"\n  files: [{path: $dir/demo.conf, template: "node={{ node.name }}\\\\n"}]\n' | $bin/nkctl apply -f -
       $bin/nkctl get components; $bin/nkctl rollout status component/demo; cat $dir/demo.conf
stop:  scripts/quickstart.sh stop
TXT
