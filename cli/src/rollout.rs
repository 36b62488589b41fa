//! `nkctl rollout status|pause|resume|history|undo` and `nkctl freeze`.
//!
//! `rollout status -w` is a live view, one progress bar per NodeSet
//! (indicatif on a terminal; a new snapshot per change elsewhere), ending
//! when the rollout completes (exit 0) or pauses or fails (exit 1, with
//! the reason).

use std::time::Duration;

use anyhow::bail;
use hyper::Method;
use nodekeeper_proto::v1::{Component, NodeSetRollout, RolloutStatus};
use serde_json::Value;

use crate::client::{self, Client, Target};
use crate::output::{self, Format, age};
use crate::table::Table;

/// `component/NAME`, `comp/NAME` or `NAME`.
pub fn component_name(target: &str) -> anyhow::Result<String> {
    let name = match target.split_once('/') {
        Some((kind, name)) => {
            if nodekeeper_proto::Kind::parse(kind) != Some(nodekeeper_proto::Kind::Component) {
                bail!("{target}: rollouts are of components (component/NAME)");
            }
            name
        }
        None => target,
    };
    if name.is_empty() {
        bail!("{target}: name the component (component/NAME)");
    }
    Ok(name.to_string())
}

async fn component(client: &mut Client, name: &str) -> anyhow::Result<Component> {
    let path = format!("/v1/components/{name}");
    let v: Value = client.get(&path).await?;
    nodekeeper_proto::resource::typed(v).map_err(|e| anyhow::anyhow!("the answer to {path}: {e}"))
}

fn bar(done: u64, failed: u64, total: u64, width: usize) -> String {
    if total == 0 {
        return format!("[{}]", "-".repeat(width));
    }
    let d = (done as usize * width).div_ceil(total as usize).min(width);
    let f = ((failed as usize * width).div_ceil(total as usize)).min(width - d);
    format!("[{}{}{}]", "#".repeat(d), "x".repeat(f), ".".repeat(width - d - f))
}

fn pending(g: &NodeSetRollout) -> u64 {
    g.selected
        .saturating_sub(g.updated + g.failed + g.partitioned + g.in_progress)
}

/// The rollout as text: a headline and a table with a bar per NodeSet.
pub fn render(name: &str, c: &Component) -> String {
    let st = c.status.clone().unwrap_or_default();
    let r: RolloutStatus = st.rollout.unwrap_or_default();
    let version = c.spec.as_ref().map(|s| s.version.as_str()).unwrap_or_default();
    let mut out = format!(
        "component/{name}: version {version}, revision {} (current {}): {} for {}{}\n",
        r.update_revision,
        r.current_revision,
        if r.phase.is_empty() { "Pending" } else { &r.phase },
        age(&r.phase_time),
        if r.reason.is_empty() {
            String::new()
        } else {
            format!(" — {}", r.reason)
        }
    );
    let rows: Vec<Vec<String>> = r
        .node_sets
        .iter()
        .map(|g| {
            let share = g.updated * 100 / g.selected.max(1);
            vec![
                g.name.clone(),
                g.phase.clone(),
                format!("{} {share:>3}%", bar(g.updated, g.failed, g.selected, 24)),
                format!("{}/{}", g.updated, g.selected),
                g.failed.to_string(),
                pending(g).to_string(),
                g.in_progress.to_string(),
                g.skipped.to_string(),
                g.partitioned.to_string(),
                age(&g.phase_time),
            ]
        })
        .collect();
    let header = [
        "NODESET", "PHASE", "PROGRESS", "UPDATED", "FAILED", "PENDING", "BATCH", "SKIPPED", "KEPT", "IN PHASE",
    ];
    out.push_str(&Table::new(&header).indented().render(&rows));
    if !r.skipped_nodes.is_empty() {
        out.push_str(&format!(
            "  skipped (NotReady when reached): {}\n",
            r.skipped_nodes.join(", ")
        ));
    }
    out
}

fn finished(c: &Component) -> Option<Result<(), String>> {
    let r = c.status.as_ref()?.rollout.as_ref()?;
    match r.phase.as_str() {
        "Complete" => Some(Ok(())),
        "Paused" | "Failed" => Some(Err(format!("rollout {}: {}", r.phase.to_lowercase(), r.reason))),
        _ => None,
    }
}

/// `rollout status [-w]`.
pub async fn status(hub: Target, name: &str, watch: bool, every: Duration, out: Format) -> anyhow::Result<()> {
    let mut client = Client::new(hub);
    if !watch {
        let c = component(&mut client, name).await?;
        if matches!(out, Format::Json | Format::Yaml) {
            return output::structured(&c.status.unwrap_or_default().rollout.unwrap_or_default(), out);
        }
        print!("{}", render(name, &c));
        return Ok(());
    }
    let tty = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let multi = indicatif::MultiProgress::new();
    let mut bars: Vec<indicatif::ProgressBar> = Vec::new();
    let mut last = String::new();
    loop {
        let c = component(&mut client, name).await?;
        let r = c.status.clone().unwrap_or_default().rollout.unwrap_or_default();
        if tty {
            let style =
                indicatif::ProgressStyle::with_template("{prefix:>10} {bar:30.green/red} {pos:>6}/{len:<6} {msg}")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
            while bars.len() < r.node_sets.len() + 1 {
                bars.push(multi.add(indicatif::ProgressBar::new(0).with_style(style.clone())));
            }
            if let Some(head) = bars.first() {
                head.set_prefix("rollout");
                head.set_length(r.node_sets.iter().map(|g| g.selected).sum());
                head.set_position(r.node_sets.iter().map(|g| g.updated).sum());
                head.set_message(format!("revision {} {} {}", r.update_revision, r.phase, r.reason));
            }
            for (g, b) in r.node_sets.iter().zip(bars.iter().skip(1)) {
                b.set_prefix(g.name.clone());
                b.set_length(g.selected);
                b.set_position(g.updated);
                b.set_message(format!(
                    "{} failed {} pending {} batch {} ({} in phase)",
                    g.phase,
                    g.failed,
                    pending(g),
                    g.in_progress,
                    age(&g.phase_time)
                ));
            }
        } else {
            let text = render(name, &c);
            // A new snapshot only when something but the clocks changed.
            let key = serde_json::to_string(
                &r.node_sets
                    .iter()
                    .map(|g| (g.updated, g.failed, g.in_progress, &g.phase))
                    .collect::<Vec<_>>(),
            )
            .unwrap_or_default()
                + &r.phase;
            if key != last {
                print!("{text}");
                last = key;
            }
        }
        if let Some(end) = finished(&c) {
            for b in &bars {
                b.finish();
            }
            if tty {
                print!("{}", render(name, &c));
            }
            return end.map_err(anyhow::Error::msg);
        }
        tokio::time::sleep(every).await;
    }
}

/// `rollout pause|resume|undo`.
pub async fn verb(hub: Target, name: &str, verb: &str, to_revision: Option<i64>) -> anyhow::Result<()> {
    let mut client = Client::new(hub);
    let body = serde_json::json!({ "toRevision": to_revision }).to_string();
    let path = format!("/v1/components/{name}/rollout/{verb}");
    let bytes = client.call(Method::POST, &path, Some(body)).await?;
    let v: Value = client::parse(&path, &bytes)?;
    let generation = v["metadata"]["generation"].as_i64().unwrap_or_default();
    match verb {
        "pause" => println!("component/{name} paused"),
        "resume" => println!("component/{name} resumed"),
        _ => println!(
            "component/{name} rolled back{}: a new revision (generation {generation}) rolls out with the component's strategy",
            to_revision.map(|r| format!(" to revision {r}")).unwrap_or_default()
        ),
    }
    Ok(())
}

/// `rollout history`.
pub async fn history(hub: Target, name: &str, out: Format) -> anyhow::Result<()> {
    let mut client = Client::new(hub);
    let path = format!("/v1/components/{name}/revisions");
    let v: Value = client.get(&path).await?;
    if matches!(out, Format::Json | Format::Yaml) {
        return output::structured(&v, out);
    }
    let c = component(&mut client, name).await?;
    let r = c.status.unwrap_or_default().rollout.unwrap_or_default();
    let rows: Vec<Vec<String>> = v["items"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|rev| {
            let g = rev["metadata"]["generation"].as_i64().unwrap_or_default();
            let mark = if g == r.update_revision {
                "update"
            } else if g == r.current_revision {
                "current"
            } else {
                ""
            };
            vec![
                g.to_string(),
                rev["spec"]["version"].as_str().unwrap_or_default().to_string(),
                mark.to_string(),
            ]
        })
        .collect();
    Table::new(&["REVISION", "VERSION", "ROLLOUT"]).print(&rows);
    Ok(())
}

/// `freeze on --reason TEXT` / `freeze off`.
pub async fn freeze(hub: Target, on: bool, reason: &str) -> anyhow::Result<()> {
    let mut client = Client::new(hub);
    let body = serde_json::json!({ "frozen": on, "reason": reason }).to_string();
    client.call(Method::POST, "/v1/freeze", Some(body)).await?;
    if on {
        println!("fleet frozen: no new permits until `nkctl freeze off` ({reason})");
    } else {
        println!("fleet unfrozen: the defender grants permits again");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bars_and_names() {
        assert_eq!(bar(5, 0, 10, 10), "[#####.....]");
        assert_eq!(bar(5, 2, 10, 10), "[#####xx...]");
        assert_eq!(bar(0, 0, 0, 4), "[----]");
        assert_eq!(component_name("component/kubelet").ok().as_deref(), Some("kubelet"));
        assert_eq!(component_name("kubelet").ok().as_deref(), Some("kubelet"));
        assert!(component_name("node/x").is_err());
    }
}
