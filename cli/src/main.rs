//! nkctl: kubectl-like CLI over the hub's operator API and the agent's
//! local socket.

mod client;
mod output;
mod remedy;
mod rollout;
mod settings;
mod table;

use std::io::Read;
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use client::{Client, Target};
use hyper::Method;
use nodekeeper_proto::Kind;
use nodekeeper_proto::api::{AgentStatus, ApplyResult, Envelope, EventRecorded, List, Summary};
use nodekeeper_proto::v1::{Component, Event, Node, NodeComponent};
use output::Format;
use serde_json::Value;

#[derive(Parser)]
#[command(name = "nkctl", version, about = "Operate a nodekeeper fleet")]
struct Cli {
    /// Hub operator API (default https://127.0.0.1:7080, or `hub:` in the nkctl config).
    #[arg(long, global = true, env = "NODEKEEPER_HUB")]
    hub: Option<String>,
    /// Bearer token for the hub (`nkctl token create api`, or the hub's admin.token).
    #[arg(long, global = true, env = "NODEKEEPER_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// The hub's CA certificate (ca.crt in its stateDir).
    #[arg(long, global = true, env = "NODEKEEPER_CA")]
    ca: Option<PathBuf>,
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
    /// Nodes per page when listing them (as kubectl's --chunk-size): rows
    /// print as pages arrive, and memory stays at two pages.
    #[arg(long, global = true, default_value_t = 500, value_parser = clap::value_parser!(u64).range(1..=5000))]
    chunk_size: u64,
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
        /// Audit entries since (RFC 3339, or a duration back from now: 1h).
        #[arg(long)]
        since: Option<String>,
        /// Audit entries until.
        #[arg(long)]
        until: Option<String>,
        /// Audit entries of one actor (a token's name, node:NAME, join-token:ID).
        #[arg(long)]
        actor: Option<String>,
        /// Remedies: keep printing jobs as they change.
        #[arg(short = 'w', long)]
        watch: bool,
        /// Remedies of one node, or of one rule.
        #[arg(long)]
        node: Option<String>,
        #[arg(long)]
        rule: Option<String>,
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
    /// Join tokens and API tokens (admin).
    Token {
        #[command(subcommand)]
        cmd: TokenCmd,
    },
    /// This node, through the agent's local socket.
    Node {
        #[command(subcommand)]
        cmd: NodeCmd,
    },
    /// Component rollouts: status, pause, resume, history, undo.
    Rollout {
        #[command(subcommand)]
        cmd: RolloutCmd,
    },
    /// Stop (on) or allow again (off) every new permit fleet-wide.
    Freeze {
        #[command(subcommand)]
        cmd: FreezeCmd,
    },
    /// Remedy jobs waiting for approval, and the rules' breakers.
    Remedy {
        #[command(subcommand)]
        cmd: RemedyCmd,
    },
}

#[derive(Subcommand)]
enum RemedyCmd {
    /// Let a job of a manual rule go on (to the defender's other checks).
    Approve { job: String },
    /// Refuse a job of a manual rule; it ends Denied.
    Deny { job: String },
    /// A rule's circuit breaker.
    Breaker {
        #[command(subcommand)]
        cmd: BreakerCmd,
    },
}

#[derive(Subcommand)]
enum BreakerCmd {
    /// Close it (the correlated fault is fixed): the rule grants again.
    Reset { rule: String },
}

#[derive(Subcommand)]
enum RolloutCmd {
    /// Where a rollout stands, per NodeSet; `-w` follows it until it
    /// completes (exit 0) or pauses (exit 1).
    Status {
        /// component/NAME
        target: String,
        #[arg(short = 'w', long)]
        watch: bool,
        /// How often `-w` looks.
        #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
        interval: std::time::Duration,
    },
    /// Release no more nodes (changes under way finish).
    Pause { target: String },
    /// Go on; also accepts the failures that paused it.
    Resume { target: String },
    /// The kept revisions.
    History { target: String },
    /// Roll back to the previous revision (or --to-revision N), with the
    /// component's strategy and budgets.
    Undo {
        target: String,
        #[arg(long)]
        to_revision: Option<i64>,
    },
}

#[derive(Subcommand)]
enum FreezeCmd {
    /// No new permits until `freeze off` (recorded in the audit log).
    On {
        #[arg(long)]
        reason: String,
    },
    Off,
}

#[derive(Subcommand)]
enum TokenCmd {
    /// Create a token; it is shown once.
    Create {
        #[command(subcommand)]
        what: TokenCreate,
    },
    /// List tokens (never their secrets).
    List,
    /// Delete a token by id (the part before the dot).
    Delete { id: String },
}

#[derive(Subcommand)]
enum TokenCreate {
    /// A bootstrap token nodes join with; prints it and the CA hash agents pin.
    Join {
        /// How long it is valid.
        #[arg(long, default_value = "24h")]
        ttl: String,
        /// How many nodes may join with it (0: any number until it expires).
        #[arg(long, default_value_t = 0)]
        uses: u64,
        /// Labels the nodes that join with it receive (trusted, unlike the agent's own).
        #[arg(long, value_delimiter = ',')]
        labels: Vec<String>,
        #[arg(long, default_value = "")]
        description: String,
    },
    /// An operator API token.
    Api {
        /// viewer, operator or admin.
        #[arg(long)]
        role: String,
        /// Who uses it (the audit log's actor).
        #[arg(long)]
        name: String,
        /// How long it is valid (default: until deleted).
        #[arg(long)]
        ttl: Option<String>,
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
    /// Revoke a node's certificates at the hub (admin); it must join again
    /// with a new token.
    Revoke { name: String },
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
    Audit,
    Permits,
    Remedies,
    Incidents,
    Kind(Kind),
}

fn what(s: &str) -> anyhow::Result<What> {
    match s.to_ascii_lowercase().as_str() {
        "node" | "nodes" | "no" => Ok(What::Nodes),
        "audit" => Ok(What::Audit),
        "permits" | "permit" => Ok(What::Permits),
        "remedies" | "remedy" => Ok(What::Remedies),
        "incidents" | "incident" => Ok(What::Incidents),
        other => match Kind::parse(other) {
            Some(k) => Ok(What::Kind(k)),
            None => {
                bail!(
                    "unknown resource type {s:?}; one of nodes, nodesets (ns), agentprofiles (ap), detectorsets (ds), components (comp), disruptionbudgets (db), remedyrules (rr), remedies, incidents, permits, audit"
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

/// The hub target from flags, environment and the config file.
fn hub_target(hub: &Option<String>, token: &Option<String>, ca: &Option<PathBuf>) -> anyhow::Result<Target> {
    let file = settings::load()?;
    let url = hub
        .clone()
        .or(file.hub)
        .unwrap_or_else(|| "https://127.0.0.1:7080".into());
    let token = token.clone().or(file.token);
    let ca = ca.clone().or(file.ca);
    Target::hub(&url, ca.as_deref(), token)
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let out = cli.output;
    if let Cmd::Node { cmd } = cli.cmd {
        return match cmd {
            NodeCmd::Revoke { name } => revoke(hub_target(&cli.hub, &cli.token, &cli.ca)?, &name).await,
            cmd => node(Target::Unix(cli.socket), cmd, out).await,
        };
    }
    let hub = hub_target(&cli.hub, &cli.token, &cli.ca)?;
    match cli.cmd {
        Cmd::Apply { files } => apply(&hub, &files, out).await,
        Cmd::Token { cmd } => token(hub, cmd, out).await,
        Cmd::Rollout { cmd } => match cmd {
            RolloutCmd::Status {
                target,
                watch,
                interval,
            } => rollout::status(hub, &rollout::component_name(&target)?, watch, interval, out).await,
            RolloutCmd::Pause { target } => rollout::verb(hub, &rollout::component_name(&target)?, "pause", None).await,
            RolloutCmd::Resume { target } => {
                rollout::verb(hub, &rollout::component_name(&target)?, "resume", None).await
            }
            RolloutCmd::History { target } => rollout::history(hub, &rollout::component_name(&target)?, out).await,
            RolloutCmd::Undo { target, to_revision } => {
                rollout::verb(hub, &rollout::component_name(&target)?, "undo", to_revision).await
            }
        },
        Cmd::Freeze { cmd } => match cmd {
            FreezeCmd::On { reason } => rollout::freeze(hub, true, &reason).await,
            FreezeCmd::Off => rollout::freeze(hub, false, "").await,
        },
        Cmd::Remedy { cmd } => match cmd {
            RemedyCmd::Approve { job } => remedy::decide(hub, &job, "approve").await,
            RemedyCmd::Deny { job } => remedy::decide(hub, &job, "deny").await,
            RemedyCmd::Breaker {
                cmd: BreakerCmd::Reset { rule },
            } => remedy::reset(hub, &rule).await,
        },
        Cmd::Get {
            kind,
            name,
            watch,
            node,
            rule,
            ..
        } if matches!(what(&kind)?, What::Remedies) => match name {
            Some(id) => remedy::describe(hub, &id, if out == Format::Table { Format::Yaml } else { out }).await,
            None => {
                let mut q = Vec::new();
                if let Some(n) = node {
                    q.push(format!("node={}", percent(&n)));
                }
                if let Some(r) = rule {
                    q.push(format!("rule={}", percent(&r)));
                }
                let query = if q.is_empty() {
                    String::new()
                } else {
                    format!("?{}", q.join("&"))
                };
                remedy::get(hub, &query, watch, std::time::Duration::from_secs(1), out).await
            }
        },
        cmd => hub_command(hub, cmd, out, cli.chunk_size).await,
    }
}

async fn revoke(hub: Target, name: &str) -> anyhow::Result<()> {
    Client::new(hub)
        .call(Method::POST, &format!("/v1/nodes/{name}/revoke"), None)
        .await?;
    println!("node/{name} revoked: its certificates are refused; it must join again with a new token");
    Ok(())
}

async fn token(hub: Target, cmd: TokenCmd, out: Format) -> anyhow::Result<()> {
    let mut client = Client::new(hub);
    match cmd {
        TokenCmd::Create { what } => {
            let body = match what {
                TokenCreate::Join {
                    ttl,
                    uses,
                    labels,
                    description,
                } => {
                    let mut map = serde_json::Map::new();
                    for l in labels.iter().filter(|l| !l.is_empty()) {
                        let (k, v) = l
                            .split_once('=')
                            .ok_or_else(|| anyhow::anyhow!("--labels {l}: expected key=value"))?;
                        map.insert(k.to_string(), Value::String(v.to_string()));
                    }
                    serde_json::json!({"type": "join", "ttl": ttl, "uses": uses, "labels": map, "description": description})
                }
                TokenCreate::Api { role, name, ttl } => {
                    serde_json::json!({"type": "api", "role": role, "name": name, "ttl": ttl})
                }
            };
            let bytes = client.call(Method::POST, "/v1/tokens", Some(body.to_string())).await?;
            let v: Value = client::parse("/v1/tokens", &bytes)?;
            match out {
                Format::Json | Format::Yaml => output::structured(&v, out)?,
                _ => output::created_token(&v),
            }
        }
        TokenCmd::List => {
            let v: List<Value> = client.get("/v1/tokens").await?;
            match out {
                Format::Json | Format::Yaml => output::structured(&v, out)?,
                _ => output::tokens(&v.items),
            }
        }
        TokenCmd::Delete { id } => {
            client.call(Method::DELETE, &format!("/v1/tokens/{id}"), None).await?;
            println!("token/{id} deleted");
        }
    }
    Ok(())
}

/// Streams a paged node list: the next page's request goes out before the
/// current page is printed, and at most two pages are held at a time, all
/// on one thread (one malloc arena).
async fn stream_nodes(
    hub: Target,
    query: String,
    page_size: u64,
    mut each: impl FnMut(Vec<Node>),
) -> anyhow::Result<()> {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<anyhow::Result<Vec<Node>>>(1);
    let fetch = tokio::spawn(async move {
        let mut client = Client::new(hub);
        let mut token = String::new();
        loop {
            let sep = if query.is_empty() { "?" } else { "&" };
            let path = format!("/v1/nodes{query}{sep}limit={page_size}&continue={}", percent(&token));
            match client.get::<List<Node>>(&path).await {
                Ok(page) => {
                    token = page.metadata.continue_token;
                    if tx.send(Ok(page.items)).await.is_err() || token.is_empty() {
                        return;
                    }
                }
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
            }
        }
    });
    while let Some(page) = rx.recv().await {
        each(page?);
    }
    let _ = fetch.await;
    Ok(())
}

/// Parses list items of one kind.
fn items_of<T: serde::de::DeserializeOwned>(path: &str, items: Vec<Value>) -> anyhow::Result<Vec<T>> {
    items
        .into_iter()
        .map(|v| nodekeeper_proto::resource::typed(v).map_err(|e| anyhow::anyhow!("the answer to {path}: {e}")))
        .collect()
}

/// Prints resources of an operator kind as a table.
fn print_resources(k: Kind, path: &str, items: Vec<Value>, wide: bool) -> anyhow::Result<()> {
    match k {
        Kind::NodeSet => output::node_sets(&items_of(path, items)?),
        Kind::AgentProfile => output::agent_profiles(&items_of(path, items)?, wide),
        Kind::DetectorSet => output::detector_sets(&items_of(path, items)?),
        Kind::Component => output::components(&items_of(path, items)?),
        Kind::DisruptionBudget => output::disruption_budgets(&items_of(path, items)?),
        Kind::RemedyRule => remedy::rules(&items_of(path, items)?),
    }
    Ok(())
}

/// The commands that read or change resources at the hub.
async fn hub_command(hub: Target, cmd: Cmd, out: Format, chunk: u64) -> anyhow::Result<()> {
    let mut client = Client::new(hub.clone());
    match cmd {
        Cmd::Get {
            kind,
            name,
            selector,
            since,
            until,
            actor,
            ..
        } => {
            let w = what(&kind)?;
            let query = match &selector {
                Some(s) => {
                    nodekeeper_proto::selector::parse(s).map_err(|e| anyhow::anyhow!("-l {s}: {e}"))?;
                    format!("?labelSelector={}", percent(s))
                }
                None => String::new(),
            };
            match (w, name) {
                (What::Remedies, _) => bail!("remedies are listed before hub_command"),
                (What::Incidents, _) => {
                    let v: List<Event> = client.get("/v1/incidents").await?;
                    match out {
                        Format::Json | Format::Yaml => output::structured(&v, out)?,
                        _ => output::events(&v.items, false),
                    }
                }
                (What::Permits, _) => {
                    let v: List<nodekeeper_proto::v1::Permit> = client.get("/v1/permits").await?;
                    match out {
                        Format::Json | Format::Yaml => output::structured(&v, out)?,
                        _ => output::permits(&v.items),
                    }
                }
                (What::Audit, _) => {
                    get_audit(
                        &mut client,
                        chunk,
                        [("since", since), ("until", until), ("actor", actor)],
                        out,
                    )
                    .await?
                }
                (What::Nodes, Some(n)) => {
                    let node: Node = client.get(&format!("/v1/nodes/{n}")).await?;
                    match out {
                        Format::Json | Format::Yaml => output::structured(&node, out)?,
                        _ => output::NodeTable::new(out == Format::Wide).page(&[node]),
                    }
                }
                (What::Nodes, None) if matches!(out, Format::Json | Format::Yaml) => {
                    let mut all = Vec::new();
                    stream_nodes(hub, query, chunk, |page| all.extend(page)).await?;
                    let list = List {
                        items: all,
                        metadata: Default::default(),
                    };
                    output::structured(&list, out)?;
                }
                (What::Nodes, None) => {
                    let mut table = output::NodeTable::new(out == Format::Wide);
                    let mut any = false;
                    stream_nodes(hub, query, chunk, |page| {
                        if !page.is_empty() {
                            any = true;
                            table.page(&page);
                        }
                    })
                    .await?;
                    if !any {
                        eprintln!("No resources found.");
                    }
                }
                (What::Kind(k), Some(n)) => {
                    let path = format!("/v1/{}/{n}", k.plural());
                    let v: Value = client.get(&path).await?;
                    match out {
                        Format::Json | Format::Yaml => output::structured(&v, out)?,
                        _ => print_resources(k, &path, vec![v], out == Format::Wide)?,
                    }
                }
                (What::Kind(k), None) => {
                    let path = format!("/v1/{}{query}", k.plural());
                    let list: List<Value> = client.get(&path).await?;
                    if matches!(out, Format::Json | Format::Yaml) {
                        return output::structured(&list, out);
                    }
                    if list.items.is_empty() {
                        eprintln!("No resources found.");
                        return Ok(());
                    }
                    print_resources(k, &path, list.items, out == Format::Wide)?;
                }
            }
        }
        Cmd::Describe { kind, name } => match what(&kind)? {
            What::Remedies => remedy::describe(hub, &name, out).await?,
            What::Incidents => bail!("incidents are listed with `nkctl get incidents`"),
            What::Audit => bail!("the audit log is listed with `nkctl get audit`"),
            What::Permits => bail!("permits are listed with `nkctl get permits`"),
            What::Nodes => {
                let node: Node = client.get(&format!("/v1/nodes/{name}")).await?;
                match out {
                    Format::Json => output::structured(&node, out)?,
                    _ => {
                        output::describe_node(&node);
                        let jobs: List<nodekeeper_proto::v1::RemedyJob> =
                            client.get(&format!("/v1/remedies?node={}", percent(&name))).await?;
                        println!("Remedies:");
                        if jobs.items.is_empty() {
                            println!("  <none>");
                        } else {
                            remedy::table(&jobs.items);
                        }
                    }
                }
            }
            What::Kind(Kind::Component) if out != Format::Json => {
                let path = format!("/v1/components/{name}");
                let c: Component = nodekeeper_proto::resource::typed(client.get::<Value>(&path).await?)
                    .map_err(|e| anyhow::anyhow!("the answer to {path}: {e}"))?;
                let mut rows = Vec::new();
                stream_nodes(hub, String::new(), chunk, |page| {
                    for n in page {
                        let node = n.metadata.map(|m| m.name).unwrap_or_default();
                        for x in n.status.map(|s| s.components).unwrap_or_default() {
                            if x.name == name {
                                rows.push((node.clone(), x));
                            }
                        }
                    }
                })
                .await?;
                output::describe_component(&c, &rows);
            }
            What::Kind(k) => {
                let v: Value = client.get(&format!("/v1/{}/{name}", k.plural())).await?;
                let f = if out == Format::Json {
                    Format::Json
                } else {
                    Format::Yaml
                };
                output::structured(&v, f)?;
            }
        },
        Cmd::Delete { kind, name, force } => match what(&kind)? {
            What::Remedies | What::Incidents => bail!("remedy jobs and incidents are records; they are not deleted"),
            What::Audit => bail!("the audit log is append-only; retention (audit.retention) prunes it"),
            What::Permits => bail!("permits are released by their agents, or expire at their TTL"),
            What::Nodes => {
                let q = if force { "?force=true" } else { "" };
                client
                    .call(Method::DELETE, &format!("/v1/nodes/{name}{q}"), None)
                    .await?;
                println!("node/{name} deleted");
            }
            What::Kind(k) => {
                client
                    .call(Method::DELETE, &format!("/v1/{}/{name}", k.plural()), None)
                    .await?;
                println!("{}/{name} deleted", k.name().to_ascii_lowercase());
            }
        },
        Cmd::Rollout { .. } | Cmd::Freeze { .. } | Cmd::Remedy { .. } => {
            bail!("rollout, freeze and remedy are run before hub_command")
        }
        Cmd::Summary => {
            let v: Summary = client.get("/v1/fleet/summary").await?;
            let f = if out == Format::Yaml {
                Format::Yaml
            } else {
                Format::Json
            };
            output::structured(&v, f)?;
        }
        Cmd::Node { .. } | Cmd::Apply { .. } | Cmd::Token { .. } => anyhow::bail!("not a hub resource command"),
    }
    Ok(())
}

/// `nkctl get audit`: every page of the matching entries, oldest first.
async fn get_audit(
    client: &mut Client,
    chunk: u64,
    filters: [(&str, Option<String>); 3],
    out: Format,
) -> anyhow::Result<()> {
    let mut q = vec![format!("limit={chunk}")];
    for (k, v) in filters {
        if let Some(v) = v {
            q.push(format!("{k}={}", percent(&v)));
        }
    }
    let mut entries = Vec::new();
    let mut token = String::new();
    loop {
        let path = format!("/v1/audit?{}&continue={}", q.join("&"), percent(&token));
        let page: List<Value> = client.get(&path).await?;
        entries.extend(page.items);
        token = page.metadata.continue_token;
        if token.is_empty() {
            break;
        }
    }
    match out {
        Format::Json | Format::Yaml => output::structured(
            &List {
                items: entries,
                metadata: Default::default(),
            },
            out,
        ),
        _ => {
            output::audit(&entries);
            Ok(())
        }
    }
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
    let bytes = Client::new(hub.clone())
        .call(Method::POST, "/v1/apply", Some(text))
        .await?;
    let v: List<ApplyResult> = client::parse("/v1/apply", &bytes)?;
    if matches!(out, Format::Json | Format::Yaml) {
        return output::structured(&v, out);
    }
    for item in &v.items {
        let r: Envelope = serde_json::from_value(item.resource.clone()).unwrap_or_default();
        println!(
            "{}/{} {}",
            r.kind.to_ascii_lowercase(),
            r.metadata.name,
            item.action.as_str()
        );
    }
    Ok(())
}

async fn node(sock: Target, cmd: NodeCmd, out: Format) -> anyhow::Result<()> {
    let mut client = Client::new(sock);
    match cmd {
        NodeCmd::Status => {
            let v: AgentStatus = client.get("/v1/status").await?;
            match out {
                Format::Json | Format::Yaml => output::structured(&v, out)?,
                _ => output::node_status(&v),
            }
        }
        NodeCmd::Events => {
            let v: List<Event> = client.get("/v1/events").await?;
            match out {
                Format::Json | Format::Yaml => output::structured(&v, out)?,
                _ => output::events(&v.items, false),
            }
        }
        NodeCmd::Components => {
            let v: List<NodeComponent> = client.get("/v1/components").await?;
            match out {
                Format::Json | Format::Yaml => output::structured(&v, out)?,
                _ => output::node_components(&v.items, false),
            }
        }
        NodeCmd::Revoke { .. } => anyhow::bail!("node revoke goes to the hub"),
        NodeCmd::Event {
            reason,
            message,
            severity,
        } => {
            let body = serde_json::json!({"reason": reason, "message": message, "severity": severity}).to_string();
            let bytes = client.call(Method::POST, "/v1/events", Some(body)).await?;
            let v: EventRecorded = client::parse("/v1/events", &bytes)?;
            match v.sequence {
                Some(seq) => println!("event recorded (report sequence {seq})"),
                None => println!("event recorded (standalone: kept on this node)"),
            }
        }
    }
    Ok(())
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
