#!/usr/bin/env bash
# Seeds the fuzz corpora from the repository's own inputs (only files not
# there yet): NPD's rule files, kernel-log fixtures as kmsg records, sample
# resource documents, journal lines and filelog configurations.
set -euo pipefail
cd "$(dirname "$0")/.."
c=fuzz/corpus
mkdir -p $c/npd_rules $c/kmsg_record $c/resource_document $c/journal_entry $c/filelog_translator $c/link_message $c/permit_request
for f in tests/fixtures/npd/config/*.json agent/rules/*; do
  [ -f "$f" ] && cp -n "$f" "$c/npd_rules/$(basename "$f")"
done
i=0
for f in tests/fixtures/npd/kernel-log-problems/*; do
  while IFS= read -r line; do
    i=$((i + 1))
    [ -e "$c/kmsg_record/seed-$i" ] || printf '6,%d,%d,-;%s\n' "$i" "$((i * 1000))" "$line" >"$c/kmsg_record/seed-$i"
  done <"$f"
done
cat >"$c/resource_document/seed-profile.yaml" <<'Y'
apiVersion: nodekeeper.io/v1
kind: AgentProfile
metadata: {name: p}
spec: {nodeSelector: {matchLabels: {zone: a}}, logLevel: debug, heartbeatSeconds: 5, labels: {team: x}}
---
apiVersion: nodekeeper.io/v1
kind: NodeSet
metadata: {name: ns}
spec: {selector: {matchExpressions: [{key: zone, operator: In, values: [a, b]}]}}
Y
cat >"$c/resource_document/seed-component.yaml" <<'Y'
apiVersion: nodekeeper.io/v1
kind: Component
metadata: {name: kubelet}
spec:
  version: "1.29.4"
  artifact: {deb: {url: "http://repo/k.deb", sha256: "0000000000000000000000000000000000000000000000000000000000000000"}}
  params: {maxPods: "110"}
  files: [{path: /etc/k.yaml, mode: "0644", template: "pods: {{ params.maxPods }}"}]
  service: {unit: kubelet.service}
  health: {http: "http://127.0.0.1:10248/healthz", timeoutSeconds: 5}
Y
printf 'MESSAGE= containerd: failed \nSYSLOG_IDENTIFIER=kubelet\n_PID=42' >"$c/journal_entry/seed-text"
printf 'UNIT=containerd.service\n_PID=1\nMESSAGE=\000\377=x\nNOFIELD' >"$c/journal_entry/seed-binary"
printf '\000Nov  3 10:11:12 host kernel: [ 1.2] task blocked for more than 120 seconds.' >"$c/filelog_translator/seed-kernel"
printf '\001time="2024-01-02T03:04:05.123Z" level=error msg="container died"' >"$c/filelog_translator/seed-docker"
printf '\002Nov  3 10:11:12 host smartd: Currently unreadable (pending) sectors' >"$c/filelog_translator/seed-disk"
printf '\000Jan _2 15:04:05\000Nov  3 10:11:12' >"$c/filelog_translator/seed-time"
# A Hello and a report batch, protobuf-encoded.
printf '\x0a\x08\x0a\x02n1\x30\x01' >"$c/link_message/seed-hello"
printf '\x1a\x10\x0a\x0e\x08\x01\x22\x0a\x1a\x03Oom\x12\x03Err' >"$c/link_message/seed-report"
# PermitRequests: op (1), action (2), reason (3), permit id (4), ttl (5), node (6).
printf '\x0a\x07acquire\x12\x11component/kubelet\x1a\x06update\x28\x1e' >"$c/permit_request/seed-acquire"
printf '\x0a\x05renew\x22\x04p1-1\x28\x1e' >"$c/permit_request/seed-renew"
printf '\x0a\x07release\x22\x04p1-1' >"$c/permit_request/seed-release"
printf '\x0a\x07acquire\x12\x08remedy/x\x32\x05other' >"$c/permit_request/seed-other"
