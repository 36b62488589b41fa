//! Rendering resources: tables (kubectl-like), wide tables, JSON, YAML, and
//! `describe` text.

use std::time::SystemTime;

use comfy_table::{Table, presets};
use serde_json::Value;

/// Output formats (`-o`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Wide,
    Json,
    Yaml,
}

fn s<'a>(v: &'a Value, path: &[&str]) -> &'a Value {
    path.iter().fold(v, |v, k| v.get(k).unwrap_or(&Value::Null))
}

fn text(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// "5s", "3m", "2h", "4d" since an RFC 3339 time.
pub fn age(rfc3339: &str) -> String {
    let Some(t) = nodekeeper_proto::time::parse_rfc3339(rfc3339) else {
        return "<unknown>".into();
    };
    let secs = SystemTime::now().duration_since(t).map(|d| d.as_secs()).unwrap_or(0);
    match secs {
        0..=119 => format!("{secs}s"),
        120..=7199 => format!("{}m", secs / 60),
        7200..=172_799 => format!("{}h", secs / 3600),
        _ => format!("{}d", secs / 86400),
    }
}

fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(presets::NOTHING);
    t.set_header(header.iter().map(|h| h.to_string()));
    t
}

fn print_table(t: Table) {
    // comfy-table pads with one space on each side; trim for kubectl-like output.
    for line in t.to_string().lines() {
        println!("{}", line.trim_end().strip_prefix(' ').unwrap_or(line.trim_end()));
    }
}

/// Ready / NotReady / Unknown of a node.
pub fn node_ready(n: &Value) -> String {
    s(n, &["status", "conditions"])
        .as_array()
        .and_then(|cs| {
            cs.iter()
                .find(|c| c.get("type").and_then(Value::as_str) == Some("Ready"))
        })
        .map(|c| match c.get("status").and_then(Value::as_str) {
            Some("True") => "Ready".to_string(),
            Some("False") => "NotReady".to_string(),
            _ => "Unknown".to_string(),
        })
        .unwrap_or_else(|| "Unknown".into())
}

fn labels(v: &Value) -> String {
    v.as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| format!("{k}={}", text(v)))
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default()
}

fn selector(v: &Value) -> String {
    let mut parts = Vec::new();
    if let Some(m) = s(v, &["matchLabels"]).as_object() {
        parts.extend(m.iter().map(|(k, v)| format!("{k}={}", text(v))));
    }
    if let Some(es) = s(v, &["matchExpressions"]).as_array() {
        for e in es {
            let vals = s(e, &["values"])
                .as_array()
                .map(|a| a.iter().map(text).collect::<Vec<_>>().join(","))
                .unwrap_or_default();
            let (k, op) = (text(s(e, &["key"])), text(s(e, &["operator"])));
            parts.push(match op.as_str() {
                "Exists" => k,
                "DoesNotExist" => format!("!{k}"),
                "In" => format!("{k} in ({vals})"),
                _ => format!("{k} notin ({vals})"),
            });
        }
    }
    if parts.is_empty() {
        "<all>".into()
    } else {
        parts.join(",")
    }
}

fn bytes_human(b: u64) -> String {
    format!("{:.1}Gi", b as f64 / (1u64 << 30) as f64)
}

/// Prints nodes.
pub fn nodes(items: &[Value], wide: bool) {
    let mut header = vec!["NAME", "STATUS", "REVISION", "AGENT", "LAST SEEN", "AGE"];
    if wide {
        header.extend(["KERNEL", "OS", "ARCH", "CPUS", "MEMORY", "ADDRESSES", "LABELS"]);
    }
    let mut t = table(&header);
    for n in items {
        let st = s(n, &["status"]);
        let applied = st.get("appliedRevision").and_then(Value::as_u64).unwrap_or(0);
        let desired = st.get("desiredRevision").and_then(Value::as_u64).unwrap_or(0);
        let rev = if applied == desired {
            format!("{applied}")
        } else {
            format!("{applied}/{desired}")
        };
        let mut row = vec![
            text(s(n, &["metadata", "name"])),
            node_ready(n),
            rev,
            text(s(st, &["facts", "agentVersion"])),
            age(&text(s(st, &["lastSeen"]))),
            age(&text(s(n, &["metadata", "creationTimestamp"]))),
        ];
        if wide {
            let f = s(st, &["facts"]);
            row.extend([
                text(s(f, &["kernel"])),
                text(s(f, &["os"])),
                text(s(f, &["arch"])),
                text(s(f, &["cpus"])),
                bytes_human(s(f, &["memoryBytes"]).as_u64().unwrap_or(0)),
                s(f, &["addresses"])
                    .as_array()
                    .map(|a| a.iter().map(text).collect::<Vec<_>>().join(","))
                    .unwrap_or_default(),
                labels(s(n, &["metadata", "labels"])),
            ]);
        }
        t.add_row(row);
    }
    print_table(t);
}

/// Prints resources of an operator kind.
pub fn resources(kind: nodekeeper_proto::Kind, items: &[Value], wide: bool) {
    use nodekeeper_proto::Kind;
    match kind {
        Kind::NodeSet => {
            let mut t = table(&["NAME", "SELECTOR", "NODES", "READY", "AGE"]);
            for r in items {
                t.add_row(vec![
                    text(s(r, &["metadata", "name"])),
                    selector(s(r, &["spec", "selector"])),
                    text(s(r, &["status", "nodes"])),
                    text(s(r, &["status", "ready"])),
                    age(&text(s(r, &["metadata", "creationTimestamp"]))),
                ]);
            }
            print_table(t);
        }
        Kind::DetectorSet => {
            let mut t = table(&["NAME", "SELECTOR", "MONITORS", "RULES", "NODES", "AGE"]);
            for r in items {
                let spec = s(r, &["spec"]);
                let monitors = s(spec, &["logMonitors"]).as_array().cloned().unwrap_or_default();
                let rules: usize = monitors
                    .iter()
                    .map(|m| s(m, &["rules"]).as_array().map_or(0, Vec::len))
                    .sum();
                t.add_row(vec![
                    text(s(r, &["metadata", "name"])),
                    selector(s(spec, &["nodeSelector"])),
                    monitors.len().to_string(),
                    rules.to_string(),
                    text(s(r, &["status", "selectedNodes"])),
                    age(&text(s(r, &["metadata", "creationTimestamp"]))),
                ]);
            }
            print_table(t);
        }
        Kind::Component => {
            let mut t = table(&[
                "NAME",
                "VERSION",
                "ARTIFACT",
                "NODES",
                "UPDATED",
                "FAILED",
                "CONSISTENCY",
                "AGE",
            ]);
            for r in items {
                let st = s(r, &["status"]);
                t.add_row(vec![
                    text(s(r, &["metadata", "name"])),
                    text(s(r, &["spec", "version"])),
                    artifact_kind(s(r, &["spec", "artifact"])),
                    text(s(st, &["selectedNodes"])),
                    text(s(st, &["updatedNodes"])),
                    text(s(st, &["failedNodes"])),
                    format!("{}%", s(st, &["consistencyPercent"]).as_f64().unwrap_or(0.0)),
                    age(&text(s(r, &["metadata", "creationTimestamp"]))),
                ]);
            }
            print_table(t);
        }
        Kind::AgentProfile => {
            let mut header = vec!["NAME", "SELECTOR", "LOG LEVEL", "HEARTBEAT", "NODES", "IN SYNC", "AGE"];
            if wide {
                header.extend(["GENERATION", "LABELS"]);
            }
            let mut t = table(&header);
            for r in items {
                let spec = s(r, &["spec"]);
                let mut row = vec![
                    text(s(r, &["metadata", "name"])),
                    selector(s(spec, &["nodeSelector"])),
                    text(s(spec, &["logLevel"])),
                    s(spec, &["heartbeatSeconds"])
                        .as_u64()
                        .map(|h| format!("{h}s"))
                        .unwrap_or_default(),
                    text(s(r, &["status", "selectedNodes"])),
                    text(s(r, &["status", "inSyncNodes"])),
                    age(&text(s(r, &["metadata", "creationTimestamp"]))),
                ];
                if wide {
                    row.extend([text(s(r, &["metadata", "generation"])), labels(s(spec, &["labels"]))]);
                }
                t.add_row(row);
            }
            print_table(t);
        }
    }
}

fn artifact_kind(a: &Value) -> String {
    ["deb", "rpm", "archive", "file"]
        .into_iter()
        .find(|k| !s(a, &[k]).is_null())
        .unwrap_or("files")
        .to_string()
}

fn counts(v: &Value) -> String {
    let out: Vec<String> = v
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, n)| format!("{k}={}", text(n)))
        .collect();
    if out.is_empty() { "<none>".into() } else { out.join(" ") }
}

/// A table of node components (from the hub's node status or the agent's
/// `/v1/components`).
pub fn node_components(items: &[Value], indented: bool) {
    component_rows("COMPONENT", items, indented);
}

/// Rows of component states; `first` heads the `name` column (the
/// component, or the node in `describe component`).
fn component_rows(first: &str, items: &[Value], indented: bool) {
    let mut t = table(&[first, "DECLARED", "OBSERVED", "PHASE", "CHANGED", "LAST ERROR"]);
    for c in items {
        t.add_row(vec![
            text(s(c, &["name"])),
            text(s(c, &["declaredVersion"])),
            text(s(c, &["observedVersion"])),
            text(s(c, &["phase"])),
            age(&text(s(c, &["lastChangeTime"]))),
            text(s(c, &["lastError"])),
        ]);
    }
    if indented { indent(t) } else { print_table(t) }
}

/// `nkctl describe component`: the spec in brief, the fleet counts, the
/// kept revisions and every selected node's state.
pub fn describe_component(c: &Value, nodes: &[Value]) {
    let name = text(s(c, &["metadata", "name"]));
    let spec = s(c, &["spec"]);
    let st = s(c, &["status"]);
    println!("Name:              {name}");
    println!("Version:           {}", text(s(spec, &["version"])));
    println!("Generation:        {}", text(s(c, &["metadata", "generation"])));
    println!("Selector:          {}", selector(s(spec, &["nodeSelector"])));
    let a = s(spec, &["artifact"]);
    let kind = artifact_kind(a);
    let detail = if kind == "files" {
        String::new()
    } else {
        let x = s(a, &[&kind]);
        [&["url"][..], &["package"], &["path"], &["installDir"]]
            .iter()
            .map(|k| text(s(x, k)))
            .filter(|t| !t.is_empty())
            .collect::<Vec<_>>()
            .join(" ")
    };
    println!("Artifact:          {}", format!("{kind} {detail}").trim_end());
    let files: Vec<String> = s(spec, &["files"])
        .as_array()
        .into_iter()
        .flatten()
        .map(|f| text(s(f, &["path"])))
        .collect();
    println!(
        "Files:             {}",
        if files.is_empty() {
            "<none>".into()
        } else {
            files.join(", ")
        }
    );
    let unit = text(s(spec, &["service", "unit"]));
    println!("Service:           {}", if unit.is_empty() { "<none>" } else { &unit });
    let h = s(spec, &["health"]);
    let health = if !s(h, &["http"]).is_null() {
        format!("http {}", text(s(h, &["http"])))
    } else if !s(h, &["unitActive"]).is_null() {
        format!("unitActive {}", text(s(h, &["unitActive"])))
    } else if let Some(argv) = s(h, &["exec"]).as_array() {
        format!("exec {}", argv.iter().map(text).collect::<Vec<_>>().join(" "))
    } else {
        "<none>".into()
    };
    println!("Health:            {health}");
    let on_fail = text(s(spec, &["onHealthFailure"]));
    println!(
        "On health failure: {}",
        if on_fail.is_empty() { "rollback".into() } else { on_fail }
    );
    println!(
        "Nodes:             {} selected, {} updated, {} failed ({}% consistent)",
        text(s(st, &["selectedNodes"])),
        text(s(st, &["updatedNodes"])),
        text(s(st, &["failedNodes"])),
        s(st, &["consistencyPercent"]).as_f64().unwrap_or(0.0)
    );
    println!("  Versions:        {}", counts(s(st, &["versions"])));
    println!("  Phases:          {}", counts(s(st, &["phases"])));
    let revs: Vec<String> = s(st, &["revisions"])
        .as_array()
        .into_iter()
        .flatten()
        .map(text)
        .collect();
    println!("Revisions:         {}", revs.join(", "));
    println!("Node components:");
    let mut rows = Vec::new();
    for n in nodes {
        for x in s(n, &["status", "components"]).as_array().into_iter().flatten() {
            if text(s(x, &["name"])) == name {
                let mut x = x.clone();
                if let Some(o) = x.as_object_mut() {
                    o.insert("name".into(), s(n, &["metadata", "name"]).clone());
                }
                rows.push(x);
            }
        }
    }
    component_rows("NODE", &rows, true);
}

/// Prints a value as JSON or YAML.
pub fn structured(v: &Value, format: Format) -> anyhow::Result<()> {
    match format {
        Format::Yaml => print!("{}", serde_norway::to_string(v)?),
        _ => println!("{}", serde_json::to_string_pretty(v)?),
    }
    Ok(())
}

/// `nkctl describe node`.
pub fn describe_node(n: &Value) {
    let st = s(n, &["status"]);
    let f = s(st, &["facts"]);
    println!("Name:              {}", text(s(n, &["metadata", "name"])));
    let ls = s(n, &["metadata", "labels"]).as_object().cloned().unwrap_or_default();
    let mut first = true;
    for (k, v) in &ls {
        println!(
            "{}{k}={}",
            if first {
                "Labels:            "
            } else {
                "                   "
            },
            text(v)
        );
        first = false;
    }
    if first {
        println!("Labels:            <none>");
    }
    println!("Created:           {}", text(s(n, &["metadata", "creationTimestamp"])));
    println!("Status:            {}", node_ready(n));
    println!("Connected:         {}", text(s(st, &["connected"])));
    println!(
        "Last seen:         {} ({} ago)",
        text(s(st, &["lastSeen"])),
        age(&text(s(st, &["lastSeen"])))
    );
    println!("Facts:");
    for (label, key) in [
        ("Hostname", "hostname"),
        ("Machine ID", "machineId"),
        ("Boot ID", "bootId"),
        ("Kernel", "kernel"),
        ("OS", "os"),
        ("Arch", "arch"),
        ("CPUs", "cpus"),
        ("Agent version", "agentVersion"),
    ] {
        println!("  {:<16} {}", format!("{label}:"), text(s(f, &[key])));
    }
    println!(
        "  {:<16} {}",
        "Memory:",
        bytes_human(s(f, &["memoryBytes"]).as_u64().unwrap_or(0))
    );
    let addrs = s(f, &["addresses"])
        .as_array()
        .map(|a| a.iter().map(text).collect::<Vec<_>>().join(", "))
        .unwrap_or_default();
    println!("  {:<16} {}", "Addresses:", addrs);
    let (applied, desired) = (text(s(st, &["appliedRevision"])), text(s(st, &["desiredRevision"])));
    let sync = if applied == desired { "in sync" } else { "not in sync" };
    println!("Desired state:     revision {desired}, applied {applied} ({sync})");
    let set = s(st, &["settings"]);
    let profiles = s(set, &["profiles"])
        .as_array()
        .map(|a| a.iter().map(text).collect::<Vec<_>>().join(", "))
        .unwrap_or_default();
    println!(
        "  Settings:        logLevel={} heartbeatSeconds={} profiles=[{}]",
        text(s(set, &["logLevel"])),
        text(s(set, &["heartbeatSeconds"])),
        profiles
    );
    let sets = s(set, &["detectorSets"])
        .as_array()
        .map(|a| a.iter().map(text).collect::<Vec<_>>().join(", "))
        .unwrap_or_default();
    let monitors = s(set, &["logMonitors"]).as_array().map_or(0, Vec::len);
    println!("  Detectors:       detectorSets=[{sets}] logMonitors={monitors}");
    println!(
        "Reports:           sequence {}, received {}, dropped by agent {}",
        text(s(st, &["reportSequence"])),
        text(s(st, &["reportsReceived"])),
        text(s(st, &["reportsDropped"]))
    );
    println!("Components:");
    node_components(
        s(st, &["components"]).as_array().map(Vec::as_slice).unwrap_or_default(),
        true,
    );
    println!("Conditions:");
    let mut t = table(&["TYPE", "STATUS", "REASON", "LAST TRANSITION", "MESSAGE"]);
    for c in s(st, &["conditions"]).as_array().into_iter().flatten() {
        t.add_row(vec![
            text(s(c, &["type"])),
            text(s(c, &["status"])),
            text(s(c, &["reason"])),
            age(&text(s(c, &["lastTransitionTime"]))),
            text(s(c, &["message"])),
        ]);
    }
    indent(t);
    println!("Events:");
    events(
        s(st, &["recentEvents"])
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default(),
        true,
    );
}

/// Prints events (newest last).
pub fn events(items: &[Value], indented: bool) {
    let mut t = table(&["LAST SEEN", "COUNT", "SEVERITY", "REASON", "SOURCE", "MESSAGE"]);
    for e in items {
        t.add_row(vec![
            age(&text(s(e, &["time"]))),
            text(s(e, &["count"])),
            text(s(e, &["severity"])),
            text(s(e, &["reason"])),
            text(s(e, &["source"])),
            text(s(e, &["message"])),
        ]);
    }
    if indented { indent(t) } else { print_table(t) }
}

fn indent(t: Table) {
    for line in t.to_string().lines() {
        println!("  {}", line.trim_end().strip_prefix(' ').unwrap_or(line.trim_end()));
    }
}

/// `nkctl node status`.
pub fn node_status(v: &Value) {
    println!("Node:              {}", text(s(v, &["nodeName"])));
    println!(
        "Agent:             {} ({} mode), started {}",
        text(s(v, &["version"])),
        text(s(v, &["mode"])),
        text(s(v, &["started"]))
    );
    if let Some(h) = v.get("hub").filter(|h| !h.is_null()) {
        let state = if s(h, &["connected"]).as_bool() == Some(true) {
            "connected"
        } else {
            "disconnected"
        };
        println!("Hub:               {} ({state})", text(s(h, &["address"])));
        if let Some(e) = s(h, &["lastError"]).as_str() {
            println!("  Last error:      {e}");
        }
    }
    let set = s(v, &["settings"]);
    println!("Applied revision:  {}", text(s(v, &["appliedRevision"])));
    println!(
        "Settings:          logLevel={} heartbeatSeconds={} labels={}",
        text(s(set, &["logLevel"])),
        text(s(set, &["heartbeatSeconds"])),
        labels(s(set, &["labels"]))
    );
    let o = s(v, &["outbox"]);
    println!(
        "Outbox:            {} pending of {}, last sequence {}, dropped {}",
        text(s(o, &["pending"])),
        text(s(o, &["capacity"])),
        text(s(o, &["lastSequence"])),
        text(s(o, &["dropped"]))
    );
}
