//! nkctl: kubectl-like CLI over the hub's operator API and the agent's
//! local socket.

mod client;
mod output;

use std::io::Read;
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use client::{Target, call, check};
use hyper::Method;
use nodekeeper_proto::Kind;
use output::Format;
use serde_json::{Value, json};

#[derive(Parser)]
#[command(name = "nkctl", version, about = "Operate a nodekeeper fleet")]
struct Cli {
    /// Hub operator API.
    #[arg(long, global = true, env = "NODEKEEPER_HUB", default_value = "http://127.0.0.1:7080")]
    hub: String,
    /// Agent socket, for `nkctl node ...`.
    #[arg(
        long,
        global = true,
        env = "NODEKEEPER_SOCKET",
        default_value = "/run/nodekeeper/agent.sock"
    )]
    socket: PathBuf,
    /// Output format.
    #[arg(short = 'o', long, global = true, value_enum, default_value = "table")]
    output: Format,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// List resources, or show one: nodes, nodesets (ns), agentprofiles (ap), detectorsets (ds),
    /// components (comp).
    Get {
        kind: String,
        name: Option<String>,
        /// Only resources whose labels match (kubectl syntax: k=v,k!=v,k,!k).
        #[arg(short = 'l', long = "selector")]
        selector: Option<String>,
    },
    /// Show one resource in detail.
    Describe { kind: String, name: String },
    /// Apply resources from files (`-` for stdin); several documents per file.
    /// Every document is checked before any is applied.
    Apply {
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<String>,
    },
    /// Delete a resource, or a node (refused while its agent is connected
    /// unless --force, which also closes its session).
    Delete {
        kind: String,
        name: String,
        /// For nodes: delete even while the agent is connected.
        #[arg(long)]
        force: bool,
    },
    /// The fleet summary.
    Summary,
    /// This node, through the agent's local socket.
    Node {
        #[command(subcommand)]
        cmd: NodeCmd,
    },
}

#[derive(Subcommand)]
enum NodeCmd {
    /// The agent's status.
    Status,
    /// Recent events on this node.
    Events,
    /// This node's components: declared and observed version, phase.
    Components,
    /// Record an event on this node (sent to the hub).
    Event {
        #[arg(long)]
        reason: String,
        #[arg(long, default_value = "")]
        message: String,
        #[arg(long, default_value = "Info")]
        severity: String,
    },
}

/// What a kind argument names.
enum What {
    Nodes,
    Kind(Kind),
}

fn what(s: &str) -> anyhow::Result<What> {
    match s.to_ascii_lowercase().as_str() {
        "node" | "nodes" | "no" => Ok(What::Nodes),
        other => match Kind::parse(other) {
            Some(k) => Ok(What::Kind(k)),
            None if Kind::planned(other) => bail!("{other} are not available in this version yet"),
            None => {
                bail!(
                    "unknown resource type {s:?}; one of nodes, nodesets (ns), agentprofiles (ap), detectorsets (ds), components (comp)"
                )
            }
        },
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    quiet_on_closed_pipe();
    let cli = Cli::parse();
    if let Err(e) = run(cli).await {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let out = cli.output;
    match cli.cmd {
        Cmd::Node { cmd } => node(Target::Unix(cli.socket), cmd, out).await,
        Cmd::Apply { files } => apply(&Target::hub(&cli.hub)?, &files, out).await,
        cmd => hub_command(Target::hub(&cli.hub)?, cmd, out).await,
    }
}

/// The commands that read or change resources at the hub.
async fn hub_command(hub: Target, cmd: Cmd, out: Format) -> anyhow::Result<()> {
    match cmd {
        Cmd::Get { kind, name, selector } => {
            let w = what(&kind)?;
            let query = match &selector {
                Some(s) => {
                    nodekeeper_proto::selector::parse(s).map_err(|e| anyhow::anyhow!("-l {s}: {e}"))?;
                    format!("?labelSelector={}", percent(s))
                }
                None => String::new(),
            };
            let path = match (&w, &name) {
                (What::Nodes, None) => format!("/v1/nodes{query}"),
                (What::Nodes, Some(n)) => format!("/v1/nodes/{n}"),
                (What::Kind(k), None) => format!("/v1/{}{query}", k.plural()),
                (What::Kind(k), Some(n)) => format!("/v1/{}/{n}", k.plural()),
            };
            let v = check(call(&hub, Method::GET, &path, None).await?)?;
            if matches!(out, Format::Json | Format::Yaml) {
                return output::structured(&v, out);
            }
            let items = if name.is_some() {
                vec![v]
            } else {
                v.get("items").and_then(Value::as_array).cloned().unwrap_or_default()
            };
            if items.is_empty() {
                eprintln!("No resources found.");
                return Ok(());
            }
            match w {
                What::Nodes => output::nodes(&items, out == Format::Wide),
                What::Kind(k) => output::resources(k, &items, out == Format::Wide),
            }
        }
        Cmd::Describe { kind, name } => {
            let w = what(&kind)?;
            let path = match &w {
                What::Nodes => format!("/v1/nodes/{name}"),
                What::Kind(k) => format!("/v1/{}/{name}", k.plural()),
            };
            let v = check(call(&hub, Method::GET, &path, None).await?)?;
            match (w, out) {
                (_, Format::Json) => output::structured(&v, Format::Json)?,
                (What::Nodes, _) => output::describe_node(&v),
                (What::Kind(Kind::Component), _) => {
                    let nodes = check(call(&hub, Method::GET, "/v1/nodes", None).await?)?;
                    let nodes = nodes
                        .get("items")
                        .and_then(Value::as_array)
                        .cloned()
                        .unwrap_or_default();
                    output::describe_component(&v, &nodes);
                }
                (What::Kind(_), _) => output::structured(&v, Format::Yaml)?,
            }
        }
        Cmd::Delete { kind, name, force } => match what(&kind)? {
            What::Nodes => {
                let q = if force { "?force=true" } else { "" };
                check(call(&hub, Method::DELETE, &format!("/v1/nodes/{name}{q}"), None).await?)?;
                println!("node/{name} deleted");
            }
            What::Kind(k) => {
                check(call(&hub, Method::DELETE, &format!("/v1/{}/{name}", k.plural()), None).await?)?;
                println!("{}/{name} deleted", k.name().to_ascii_lowercase());
            }
        },
        Cmd::Summary => {
            let v = check(call(&hub, Method::GET, "/v1/fleet/summary", None).await?)?;
            output::structured(
                &v,
                if out == Format::Yaml {
                    Format::Yaml
                } else {
                    Format::Json
                },
            )?;
        }
        Cmd::Node { .. } | Cmd::Apply { .. } => anyhow::bail!("not a hub resource command"),
    }
    Ok(())
}

async fn apply(hub: &Target, files: &[String], out: Format) -> anyhow::Result<()> {
    let mut text = String::new();
    for f in files {
        let body = if f == "-" {
            let mut s = String::new();
            std::io::stdin().read_to_string(&mut s).context("reading stdin")?;
            s
        } else {
            std::fs::read_to_string(f).with_context(|| format!("reading {f}"))?
        };
        // Check locally first so the error names the file.
        nodekeeper_proto::document::parse_resources(&body).map_err(|e| anyhow::anyhow!("{f}: {e}"))?;
        if !text.is_empty() {
            text.push_str("\n---\n");
        }
        text.push_str(&body);
    }
    let v = check(call(hub, Method::POST, "/v1/apply", Some(text)).await?)?;
    if matches!(out, Format::Json | Format::Yaml) {
        return output::structured(&v, out);
    }
    for item in v.get("items").and_then(Value::as_array).into_iter().flatten() {
        let r = &item["resource"];
        println!(
            "{}/{} {}",
            r["kind"].as_str().unwrap_or_default().to_ascii_lowercase(),
            r["metadata"]["name"].as_str().unwrap_or_default(),
            item["action"].as_str().unwrap_or_default()
        );
    }
    Ok(())
}

async fn node(sock: Target, cmd: NodeCmd, out: Format) -> anyhow::Result<()> {
    match cmd {
        NodeCmd::Status => {
            let v = check(call(&sock, Method::GET, "/v1/status", None).await?)?;
            match out {
                Format::Json | Format::Yaml => output::structured(&v, out)?,
                _ => output::node_status(&v),
            }
        }
        NodeCmd::Events => local_list(&sock, "/v1/events", out, output::events).await?,
        NodeCmd::Components => local_list(&sock, "/v1/components", out, output::node_components).await?,
        NodeCmd::Event {
            reason,
            message,
            severity,
        } => {
            let body = json!({"reason": reason, "message": message, "severity": severity}).to_string();
            let v = check(call(&sock, Method::POST, "/v1/events", Some(body)).await?)?;
            match v.get("sequence").and_then(Value::as_u64) {
                Some(seq) => println!("event recorded (report sequence {seq})"),
                None => println!("event recorded (standalone: kept on this node)"),
            }
        }
    }
    Ok(())
}

/// Gets a `{"items": [...]}` list from the agent socket and prints it.
async fn local_list(sock: &Target, path: &str, out: Format, table: fn(&[Value], bool)) -> anyhow::Result<()> {
    let v = check(call(sock, Method::GET, path, None).await?)?;
    match out {
        Format::Json | Format::Yaml => output::structured(&v, out),
        _ => {
            table(
                v.get("items")
                    .and_then(Value::as_array)
                    .map(Vec::as_slice)
                    .unwrap_or_default(),
                false,
            );
            Ok(())
        }
    }
}

/// `nkctl ... | head` ends quietly when the reader goes away, as every Unix
/// tool does: Rust ignores SIGPIPE, so writing to a closed pipe would panic
/// in `println!`; the default action ends the process without a word.
fn quiet_on_closed_pipe() {
    use nix::sys::signal::{SigHandler, Signal, signal};
    // SAFETY: restoring the default disposition installs no handler code.
    let _ = unsafe { signal(Signal::SIGPIPE, SigHandler::SigDfl) };
}

/// Percent-encodes a query value.
fn percent(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}
