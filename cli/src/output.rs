//! Rendering resources: tables (kubectl-like), wide tables, JSON, YAML, and
//! `describe` text, from the contract's types.

use std::collections::BTreeMap;
use std::time::SystemTime;

use nodekeeper_proto::api::AgentStatus;
use nodekeeper_proto::v1::{
    AgentProfile, Artifact, Component, DetectorSet, Event, LabelSelector, Node, NodeComponent, NodeSet, ObjectMeta,
};

use crate::table::Table;

/// Output formats (`-o`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Wide,
    Json,
    Yaml,
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

fn meta(m: &Option<ObjectMeta>) -> ObjectMeta {
    m.clone().unwrap_or_default()
}

/// Ready / NotReady / Unknown of a node.
pub fn node_ready(n: &Node) -> &'static str {
    let ready = n
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.r#type == "Ready"));
    match ready.map(|c| c.status.as_str()) {
        Some("True") => "Ready",
        Some("False") => "NotReady",
        _ => "Unknown",
    }
}

fn labels(m: &BTreeMap<String, String>) -> String {
    m.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",")
}

fn selector(sel: &Option<LabelSelector>) -> String {
    let Some(sel) = sel else { return "<all>".into() };
    let mut parts: Vec<String> = sel.match_labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    for e in &sel.match_expressions {
        let vals = e.values.join(",");
        parts.push(match e.operator.as_str() {
            "Exists" => e.key.clone(),
            "DoesNotExist" => format!("!{}", e.key),
            "In" => format!("{} in ({vals})", e.key),
            _ => format!("{} notin ({vals})", e.key),
        });
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

/// The node table, printed page by page as a paged list arrives.
pub struct NodeTable {
    table: Table,
    wide: bool,
}

impl NodeTable {
    pub fn new(wide: bool) -> NodeTable {
        let mut header = vec!["NAME", "STATUS", "REVISION", "AGENT", "LAST SEEN", "AGE"];
        if wide {
            header.extend(["KERNEL", "OS", "ARCH", "CPUS", "MEMORY", "ADDRESSES", "LABELS"]);
        }
        NodeTable {
            table: Table::new(&header),
            wide,
        }
    }

    /// Prints one page of nodes.
    pub fn page(&mut self, items: &[Node]) {
        let rows: Vec<Vec<String>> = items.iter().map(|n| node_row(n, self.wide)).collect();
        self.table.page(&rows);
    }
}

fn node_row(n: &Node, wide: bool) -> Vec<String> {
    let m = meta(&n.metadata);
    let st = n.status.clone().unwrap_or_default();
    let f = st.facts.clone().unwrap_or_default();
    let rev = if st.applied_revision == st.desired_revision {
        st.applied_revision.to_string()
    } else {
        format!("{}/{}", st.applied_revision, st.desired_revision)
    };
    let mut row = vec![
        m.name.clone(),
        node_ready(n).to_string(),
        rev,
        f.agent_version.clone(),
        age(&st.last_seen),
        age(&m.creation_timestamp),
    ];
    if wide {
        row.extend([
            f.kernel,
            f.os,
            f.arch,
            f.cpus.to_string(),
            bytes_human(f.memory_bytes),
            f.addresses.join(","),
            labels(&m.labels),
        ]);
    }
    row
}

/// Prints NodeSets.
pub fn node_sets(items: &[NodeSet]) {
    let rows: Vec<Vec<String>> = items
        .iter()
        .map(|r| {
            let m = meta(&r.metadata);
            let st = r.status.unwrap_or_default();
            vec![
                m.name,
                selector(&r.spec.as_ref().and_then(|s| s.selector.clone())),
                st.nodes.to_string(),
                st.ready.to_string(),
                age(&m.creation_timestamp),
            ]
        })
        .collect();
    Table::new(&["NAME", "SELECTOR", "NODES", "READY", "AGE"]).print(&rows);
}

/// Prints DetectorSets.
pub fn detector_sets(items: &[DetectorSet]) {
    let rows: Vec<Vec<String>> = items
        .iter()
        .map(|r| {
            let m = meta(&r.metadata);
            let spec = r.spec.clone().unwrap_or_default();
            let rules: usize = spec.log_monitors.iter().map(|m| m.rules.len()).sum();
            let mut checks = Vec::new();
            if spec.resources.is_some() {
                checks.push("resources");
            }
            if spec.hardware.is_some() {
                checks.push("hardware");
            }
            vec![
                m.name,
                selector(&spec.node_selector),
                spec.log_monitors.len().to_string(),
                rules.to_string(),
                spec.custom_plugin_monitors.len().to_string(),
                spec.probes.len().to_string(),
                if checks.is_empty() {
                    "-".into()
                } else {
                    checks.join(",")
                },
                r.status.unwrap_or_default().selected_nodes.to_string(),
                age(&m.creation_timestamp),
            ]
        })
        .collect();
    Table::new(&[
        "NAME", "SELECTOR", "MONITORS", "RULES", "PLUGINS", "PROBES", "CHECKS", "NODES", "AGE",
    ])
    .print(&rows);
}

/// Prints Components.
pub fn components(items: &[Component]) {
    let rows: Vec<Vec<String>> = items
        .iter()
        .map(|r| {
            let m = meta(&r.metadata);
            let spec = r.spec.clone().unwrap_or_default();
            let st = r.status.clone().unwrap_or_default();
            let rollout = st.rollout.clone().unwrap_or_default();
            vec![
                m.name,
                spec.version,
                artifact_kind(&spec.artifact).to_string(),
                st.selected_nodes.to_string(),
                st.updated_nodes.to_string(),
                st.failed_nodes.to_string(),
                format!("{}%", st.consistency_percent),
                if rollout.phase.is_empty() {
                    "-".into()
                } else {
                    rollout.phase
                },
                rollout.update_revision.to_string(),
                age(&m.creation_timestamp),
            ]
        })
        .collect();
    Table::new(&[
        "NAME",
        "VERSION",
        "ARTIFACT",
        "NODES",
        "UPDATED",
        "FAILED",
        "CONSISTENCY",
        "ROLLOUT",
        "REVISION",
        "AGE",
    ])
    .print(&rows);
}

/// Prints the permits held.
pub fn permits(items: &[nodekeeper_proto::v1::Permit]) {
    let rows: Vec<Vec<String>> = items
        .iter()
        .map(|p| {
            vec![
                p.node.clone(),
                p.action.clone(),
                p.id.clone(),
                age(&p.granted_time),
                p.expire_time.clone(),
                p.reason.clone(),
            ]
        })
        .collect();
    Table::new(&["NODE", "ACTION", "PERMIT", "AGE", "EXPIRES", "REASON"]).print(&rows);
}

/// Prints DisruptionBudgets.
pub fn disruption_budgets(items: &[nodekeeper_proto::v1::DisruptionBudget]) {
    let rows: Vec<Vec<String>> = items
        .iter()
        .map(|r| {
            let m = meta(&r.metadata);
            let spec = r.spec.clone().unwrap_or_default();
            let st = r.status.unwrap_or_default();
            vec![
                m.name,
                spec.max_unavailable,
                if spec.max_per_hour == 0 {
                    "-".into()
                } else {
                    spec.max_per_hour.to_string()
                },
                st.selected_nodes.to_string(),
                st.unavailable_nodes.to_string(),
                st.allowed_unavailable.to_string(),
                st.granted_last_hour.to_string(),
                age(&m.creation_timestamp),
            ]
        })
        .collect();
    Table::new(&[
        "NAME",
        "MAX UNAVAILABLE",
        "MAX PER HOUR",
        "NODES",
        "UNAVAILABLE",
        "ALLOWED",
        "GRANTED 1H",
        "AGE",
    ])
    .print(&rows);
}

/// Prints AgentProfiles.
pub fn agent_profiles(items: &[AgentProfile], wide: bool) {
    let mut header = vec!["NAME", "SELECTOR", "LOG LEVEL", "HEARTBEAT", "NODES", "IN SYNC", "AGE"];
    if wide {
        header.extend(["GENERATION", "LABELS"]);
    }
    let rows: Vec<Vec<String>> = items
        .iter()
        .map(|r| {
            let m = meta(&r.metadata);
            let spec = r.spec.clone().unwrap_or_default();
            let st = r.status.unwrap_or_default();
            let mut row = vec![
                m.name.clone(),
                selector(&spec.node_selector),
                spec.log_level.clone().unwrap_or_default(),
                spec.heartbeat_seconds.map(|h| format!("{h}s")).unwrap_or_default(),
                st.selected_nodes.to_string(),
                st.in_sync_nodes.to_string(),
                age(&m.creation_timestamp),
            ];
            if wide {
                row.extend([m.generation.to_string(), labels(&spec.labels)]);
            }
            row
        })
        .collect();
    Table::new(&header).print(&rows);
}

fn artifact_kind(a: &Option<Artifact>) -> &'static str {
    match a {
        Some(a) if a.deb.is_some() => "deb",
        Some(a) if a.rpm.is_some() => "rpm",
        Some(a) if a.archive.is_some() => "archive",
        Some(a) if a.file.is_some() => "file",
        _ => "files",
    }
}

fn counts(m: &BTreeMap<String, u64>) -> String {
    if m.is_empty() {
        return "<none>".into();
    }
    m.iter().map(|(k, n)| format!("{k}={n}")).collect::<Vec<_>>().join(" ")
}

/// A table of node components (from the hub's node status or the agent's
/// `/v1/components`).
pub fn node_components(items: &[NodeComponent], indented: bool) {
    component_rows("COMPONENT", items.iter().map(|c| (c.name.clone(), c)), indented);
}

/// Rows of component states; `first` heads the name column (the component,
/// or the node in `describe component`).
fn component_rows<'a>(first: &str, items: impl Iterator<Item = (String, &'a NodeComponent)>, indented: bool) {
    let rows: Vec<Vec<String>> = items
        .map(|(name, c)| {
            vec![
                name,
                c.declared_version.clone(),
                c.observed_version.clone(),
                c.phase.clone(),
                age(&c.last_change_time),
                c.last_error.clone(),
            ]
        })
        .collect();
    let t = Table::new(&[first, "DECLARED", "OBSERVED", "PHASE", "CHANGED", "LAST ERROR"]);
    if indented { t.indented() } else { t }.print(&rows);
}

/// `nkctl describe component`: the spec in brief, the fleet counts, the
/// kept revisions and every selected node's state (`rows`: node name and
/// its report of this component).
pub fn describe_component(c: &Component, rows: &[(String, NodeComponent)]) {
    let m = meta(&c.metadata);
    let spec = c.spec.clone().unwrap_or_default();
    let st = c.status.clone().unwrap_or_default();
    println!("Name:              {}", m.name);
    println!("Version:           {}", spec.version);
    println!("Generation:        {}", m.generation);
    println!("Selector:          {}", selector(&spec.node_selector));
    let kind = artifact_kind(&spec.artifact);
    let a = spec.artifact.clone().unwrap_or_default();
    let detail: Vec<String> = match kind {
        "deb" | "rpm" => {
            let p = a.deb.or(a.rpm).unwrap_or_default();
            vec![p.url, p.package]
        }
        "archive" => {
            let x = a.archive.unwrap_or_default();
            vec![x.url, x.install_dir]
        }
        "file" => {
            let x = a.file.unwrap_or_default();
            vec![x.url, x.path]
        }
        _ => vec![],
    };
    let detail: Vec<String> = detail.into_iter().filter(|t| !t.is_empty()).collect();
    println!(
        "Artifact:          {}",
        format!("{kind} {}", detail.join(" ")).trim_end()
    );
    let files: Vec<&str> = spec.files.iter().map(|f| f.path.as_str()).collect();
    println!(
        "Files:             {}",
        if files.is_empty() {
            "<none>".into()
        } else {
            files.join(", ")
        }
    );
    let unit = spec.service.as_ref().map(|s| s.unit.as_str()).unwrap_or_default();
    println!("Service:           {}", if unit.is_empty() { "<none>" } else { unit });
    let h = spec.health.clone().unwrap_or_default();
    let health = if !h.http.is_empty() {
        format!("http {}", h.http)
    } else if !h.unit_active.is_empty() {
        format!("unitActive {}", h.unit_active)
    } else if !h.exec.is_empty() {
        format!("exec {}", h.exec.join(" "))
    } else {
        "<none>".into()
    };
    println!("Health:            {health}");
    println!(
        "On health failure: {}",
        if spec.on_health_failure.is_empty() {
            "rollback"
        } else {
            &spec.on_health_failure
        }
    );
    println!(
        "Nodes:             {} selected, {} updated, {} failed ({}% consistent)",
        st.selected_nodes, st.updated_nodes, st.failed_nodes, st.consistency_percent
    );
    println!("  Versions:        {}", counts(&st.versions));
    println!("  Phases:          {}", counts(&st.phases));
    let revs: Vec<String> = st.revisions.iter().map(|r| r.to_string()).collect();
    println!("Revisions:         {}", revs.join(", "));
    if let Some(r) = &st.rollout {
        println!(
            "Rollout:           {} (revision {}, current {}){}",
            r.phase,
            r.update_revision,
            r.current_revision,
            if r.reason.is_empty() {
                String::new()
            } else {
                format!(": {}", r.reason)
            }
        );
        for g in &r.node_sets {
            println!(
                "  {:<16} {:<12} {}/{} updated, {} failed, {} in progress, {} skipped, {} kept",
                g.name, g.phase, g.updated, g.selected, g.failed, g.in_progress, g.skipped, g.partitioned
            );
        }
    }
    println!("Node components:");
    component_rows("NODE", rows.iter().map(|(n, c)| (n.clone(), c)), true);
}

/// Prints a value as JSON or YAML.
pub fn structured<T: serde::Serialize>(v: &T, format: Format) -> anyhow::Result<()> {
    match format {
        Format::Yaml => print!("{}", serde_norway::to_string(v)?),
        _ => println!("{}", serde_json::to_string_pretty(v)?),
    }
    Ok(())
}

/// `nkctl describe node`.
pub fn describe_node(n: &Node) {
    let m = meta(&n.metadata);
    let st = n.status.clone().unwrap_or_default();
    let f = st.facts.clone().unwrap_or_default();
    println!("Name:              {}", m.name);
    let mut first = true;
    for (k, v) in &m.labels {
        println!(
            "{}{k}={v}",
            if first {
                "Labels:            "
            } else {
                "                   "
            }
        );
        first = false;
    }
    if first {
        println!("Labels:            <none>");
    }
    println!("Created:           {}", m.creation_timestamp);
    println!("Status:            {}", node_ready(n));
    println!("Connected:         {}", st.connected);
    if let Some(p) = &st.permit {
        println!(
            "Permit:            {} ({}), until {}",
            p.action, p.reason, p.expire_time
        );
    }
    println!("Last seen:         {} ({} ago)", st.last_seen, age(&st.last_seen));
    println!("Facts:");
    for (label, value) in [
        ("Hostname", &f.hostname),
        ("Machine ID", &f.machine_id),
        ("Boot ID", &f.boot_id),
        ("Kernel", &f.kernel),
        ("OS", &f.os),
        ("Arch", &f.arch),
        ("CPUs", &f.cpus.to_string()),
        ("Agent version", &f.agent_version),
    ] {
        println!("  {:<16} {value}", format!("{label}:"));
    }
    println!("  {:<16} {}", "Memory:", bytes_human(f.memory_bytes));
    println!("  {:<16} {}", "Addresses:", f.addresses.join(", "));
    let (applied, desired) = (st.applied_revision, st.desired_revision);
    let sync = if applied == desired { "in sync" } else { "not in sync" };
    println!("Desired state:     revision {desired}, applied {applied} ({sync})");
    let set = st.settings.clone().unwrap_or_default();
    println!(
        "  Settings:        logLevel={} heartbeatSeconds={} profiles=[{}]",
        set.log_level,
        set.heartbeat_seconds,
        set.profiles.join(", ")
    );
    println!(
        "  Detectors:       detectorSets=[{}] logMonitors={} customPluginMonitors={} probes=[{}]{}{}",
        set.detector_sets.join(", "),
        set.log_monitors.len(),
        set.custom_plugin_monitors.len(),
        set.probes
            .iter()
            .map(|p| p.name.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        if set.resources.is_some() { " resources" } else { "" },
        if set.hardware.is_some() { " hardware" } else { "" },
    );
    println!(
        "Reports:           sequence {}, received {}, dropped by agent {}",
        st.report_sequence, st.reports_received, st.reports_dropped
    );
    println!("Components:");
    node_components(&st.components, true);
    println!("Conditions:");
    let rows: Vec<Vec<String>> = st
        .conditions
        .iter()
        .map(|c| {
            // A problem seen again while True: how often, and the latest.
            let message = if c.count > 1 {
                format!(
                    "{} (seen {} times; latest {} ago: {})",
                    c.message,
                    c.count,
                    age(&c.latest_time),
                    c.latest_message
                )
            } else {
                c.message.clone()
            };
            vec![
                c.r#type.clone(),
                c.status.clone(),
                c.reason.clone(),
                c.count.to_string(),
                age(&c.last_transition_time),
                message,
            ]
        })
        .collect();
    Table::new(&["TYPE", "STATUS", "REASON", "COUNT", "LAST TRANSITION", "MESSAGE"])
        .indented()
        .print(&rows);
    println!("Events:");
    events(&st.recent_events, true);
}

/// Prints events (newest last).
pub fn events(items: &[Event], indented: bool) {
    let rows: Vec<Vec<String>> = items
        .iter()
        .map(|e| {
            vec![
                age(&e.time),
                e.count.to_string(),
                e.severity.clone(),
                e.reason.clone(),
                e.source.clone(),
                e.message.clone(),
            ]
        })
        .collect();
    let t = Table::new(&["LAST SEEN", "COUNT", "SEVERITY", "REASON", "SOURCE", "MESSAGE"]);
    if indented { t.indented() } else { t }.print(&rows);
}

/// `nkctl node status`.
pub fn node_status(v: &AgentStatus) {
    println!("Node:              {}", v.node_name);
    println!(
        "Agent:             {} ({} mode), started {}",
        v.version, v.mode, v.started
    );
    if let Some(h) = &v.hub {
        let state = if h.connected { "connected" } else { "disconnected" };
        println!("Hub:               {} ({state})", h.address);
        if let Some(e) = &h.last_error {
            println!("  Last error:      {e}");
        }
    }
    let set = &v.settings;
    println!("Applied revision:  {}", v.applied_revision);
    println!(
        "Settings:          logLevel={} heartbeatSeconds={} labels={}",
        set.log_level,
        set.heartbeat_seconds,
        labels(&set.labels)
    );
    let o = &v.outbox;
    println!(
        "Outbox:            {} pending of {}, last sequence {}, dropped {}",
        o.pending, o.capacity, o.last_sequence, o.dropped
    );
}

fn text(v: &serde_json::Value, key: &str) -> String {
    match &v[key] {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// Prints a token just created (its only showing) and how to use it.
pub fn created_token(v: &serde_json::Value) {
    println!("token:       {}", text(v, "token"));
    if text(v, "type") == "join" {
        println!("caCertHash:  {}", text(v, "caCertHash"));
    }
    let expires = text(v, "expires");
    println!(
        "expires:     {}",
        if expires.is_empty() { "never".into() } else { expires }
    );
    if text(v, "type") == "join" {
        println!();
        println!("In the agent's config (/etc/nodekeeper/agent.yaml):");
        println!("  hub:");
        println!("    address: https://<hub>:7443");
        println!("    bootstrapToken: {}", text(v, "token"));
        println!("    caCertHash: {}", text(v, "caCertHash"));
    } else {
        println!("role:        {}", text(v, "role"));
        println!("Use it with: nkctl --token <token> ... (or NODEKEEPER_TOKEN)");
    }
}

/// Prints tokens (never secrets).
pub fn tokens(items: &[serde_json::Value]) {
    let rows: Vec<Vec<String>> = items
        .iter()
        .map(|t| {
            let uses = match t["maxUses"].as_u64().unwrap_or(0) {
                0 => t["uses"].as_u64().unwrap_or(0).to_string(),
                max => format!("{}/{max}", t["uses"].as_u64().unwrap_or(0)),
            };
            let labels: BTreeMap<String, String> = serde_json::from_value(t["labels"].clone()).unwrap_or_default();
            let expires = text(t, "expires");
            vec![
                text(t, "id"),
                text(t, "type"),
                if text(t, "name").is_empty() {
                    text(t, "description")
                } else {
                    text(t, "name")
                },
                text(t, "role"),
                labels_or_none(&labels),
                uses,
                if expires.is_empty() { "never".into() } else { expires },
            ]
        })
        .collect();
    Table::new(&["ID", "TYPE", "NAME", "ROLE", "LABELS", "USES", "EXPIRES"]).print(&rows);
}

fn labels_or_none(m: &BTreeMap<String, String>) -> String {
    if m.is_empty() { "<none>".into() } else { labels(m) }
}

/// Prints audit entries, oldest first.
pub fn audit(items: &[serde_json::Value]) {
    let rows: Vec<Vec<String>> = items
        .iter()
        .map(|e| {
            vec![
                text(e, "time"),
                text(e, "actor"),
                text(e, "action"),
                text(e, "resource"),
                text(e, "result"),
                text(e, "resourceVersion"),
            ]
        })
        .collect();
    Table::new(&["TIME", "ACTOR", "ACTION", "RESOURCE", "RESULT", "VERSION"]).print(&rows);
}
