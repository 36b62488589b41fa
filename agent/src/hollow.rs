//! Hollow agents: many agents in one process for scale tests (kubemark's
//! hollow nodes). Each has its own identity and facts and runs the real link
//! code — the same stream, outbox logic and reconnect backoff — over its own
//! connection; only the detectors are fake (a condition that flips at a given
//! rate) and the outbox lives in memory.
//!
//! Remedies run the real executor ([`crate::remedy::Engine`]: the job
//! machine, permits, reports) with simulated steps that heal the condition
//! after `--remedy-seconds`.
//!
//! An optional control listener lets a benchmark trigger report bursts and
//! faults and read per-agent figures: `POST /burst?perAgent=K`,
//! `POST /raise?condition=T&count=N&spreadSeconds=S&salt=K&skip=M&correlated=B`
//! (N nodes, chosen by seed and salt after skipping M, raise T at random
//! moments within S seconds; a correlated fault is one no simulated remedy
//! step heals, as a bad push or an outage), `POST /clear?condition=T` (the
//! fault is gone everywhere), `GET /stats`, `GET /latency?sinceMs=T&revision=R`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::{Query, State};
use axum::routing::{get, post};
use nodekeeper_proto::component::phase;
use nodekeeper_proto::time::now_rfc3339;
use nodekeeper_proto::v1::{
    AgentSettings, Condition, ConditionChange, DesiredComponent, DesiredState, NodeComponent, NodeFacts, report,
};
use serde_json::json;
use tokio::sync::watch;

use crate::link::{self, LinkConfig};
use crate::metrics::Metrics;
use crate::report::outbox::Outbox;
use crate::runtime::{Agent, AgentParts, default_settings};

/// Options of `nodekeeper-agent hollow`.
#[derive(Debug, Clone, clap::Args)]
pub struct HollowArgs {
    /// Number of hollow agents.
    #[arg(long)]
    pub count: usize,
    /// Hub gRPC address (`https://host:port`; `http://` with `--insecure`).
    #[arg(long)]
    pub hub: String,
    /// Join token every hollow agent joins with (as real agents do).
    #[arg(long, env = "NODEKEEPER_JOIN_TOKEN")]
    pub token: Option<String>,
    /// The hub CA's pin (`sha256:<hex>`).
    #[arg(long)]
    pub ca_cert_hash: Option<String>,
    /// A plaintext hub without identities.
    #[arg(long)]
    pub insecure: bool,
    /// Heartbeat interval until the hub's desired state sets one (as for real agents).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub heartbeat: Duration,
    /// Condition changes per second per agent from the fake detector (0: none).
    #[arg(long, default_value_t = 0.0)]
    pub report_rate: f64,
    /// Seed for identities (machine and boot ids); the same seed gives the same fleet.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Node name prefix; names are `<prefix>-<index>`.
    #[arg(long, default_value = "hollow")]
    pub prefix: String,
    /// Outbox capacity per agent.
    #[arg(long, default_value_t = 10_000)]
    pub outbox: usize,
    /// Runtime worker threads.
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// Control listener for benchmarks (burst, stats, latency).
    #[arg(long)]
    pub control: Option<SocketAddr>,
    /// How long a simulated component change takes once its permit is
    /// granted (0: component changes are not simulated).
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub component_seconds: Duration,
    /// Share of nodes (deterministic by seed, node and version) whose health
    /// gate fails on a new version, which then roll back. A node's first
    /// version, and a version it ran before, always succeed.
    #[arg(long, default_value_t = 0.0)]
    pub component_failure_percent: f64,
    /// Node i gets the label `zone=z<i mod N>`.
    #[arg(long, default_value_t = 3)]
    pub zones: usize,
    /// The TTL hollow agents ask for their permits (renewed at a third).
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub permit_ttl: Duration,
    /// How long a simulated remedy step takes before it heals the job's
    /// condition; 0 (the default): no remedy executor, so benchmarks that do
    /// not heal pay nothing for it. Reboot steps are not simulated.
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    pub remedy_seconds: Duration,
}

/// Deterministic 128-bit hex id from (seed, index, salt) — splitmix64.
fn hex_id(seed: u64, index: u64, salt: u64) -> String {
    let mut x = seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ salt;
    let mut next = || {
        x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    format!("{:016x}{:016x}", next(), next())
}

fn facts(args: &HollowArgs, i: usize) -> NodeFacts {
    let boot = hex_id(args.seed, i as u64, 2);
    NodeFacts {
        hostname: format!("{}-{i:05}", args.prefix),
        machine_id: hex_id(args.seed, i as u64, 1),
        boot_id: format!(
            "{}-{}-{}-{}-{}",
            &boot[0..8],
            &boot[8..12],
            &boot[12..16],
            &boot[16..20],
            &boot[20..32]
        ),
        kernel: "6.1.0-hollow".into(),
        os: "Hollow Linux 1".into(),
        os_id: "hollow".into(),
        os_version: "1".into(),
        arch: if i % 4 == 3 { "aarch64" } else { "x86_64" }.into(),
        cpus: 64,
        memory_bytes: 256 << 30,
        // Documentation range (RFC 5737): never a traffic target.
        addresses: vec![format!("198.51.{}.{}", (i / 250) % 256, i % 250 + 1)],
        agent_version: nodekeeper_proto::VERSION.into(),
    }
}

fn hollow_agent(args: &HollowArgs, i: usize) -> Agent {
    let mut labels = BTreeMap::new();
    labels.insert("hollow".to_string(), "true".to_string());
    labels.insert("zone".to_string(), format!("z{}", i % args.zones.max(1)));
    let agent = Agent::new(AgentParts {
        name: format!("{}-{i:05}", args.prefix),
        labels,
        facts: facts(args, i),
        hub: Some(args.hub.clone()),
        outbox: Outbox::in_memory(args.outbox),
        store: None,
        log: None,
        metrics: Metrics::default(),
    });
    let settings = AgentSettings {
        heartbeat_seconds: args.heartbeat.as_secs().max(1) as u32,
        ..default_settings()
    };
    *agent.desired.lock().unwrap_or_else(|p| p.into_inner()) = DesiredState {
        revision: 0,
        settings: Some(settings),
    };
    agent
}

/// A fake detector's condition change.
fn flip(agent: &Agent, n: u64, reason: &str) {
    let c = Condition {
        r#type: "HollowProblem".into(),
        status: if n.is_multiple_of(2) { "True" } else { "False" }.into(),
        reason: reason.into(),
        message: format!("fake detector change {n}"),
        last_transition_time: now_rfc3339(),
        last_heartbeat_time: String::new(),
        source: "hollow".into(),
        ..Default::default()
    };
    if let Err(e) = agent.report(report::Body::Condition(ConditionChange {
        condition: Some(c),
        removed: false,
    })) {
        tracing::warn!(node = %agent.name, error = %e, "hollow report failed");
    }
}

async fn fake_detector(agent: Arc<Agent>, rate: f64) {
    let period = Duration::from_secs_f64(1.0 / rate);
    // Random phase, so agents do not report in lockstep.
    tokio::time::sleep(period.mul_f64(rand::random::<f64>())).await;
    let mut tick = tokio::time::interval(period);
    let mut n = 0u64;
    loop {
        tick.tick().await;
        flip(&agent, n, "FakeDetector");
        n += 1;
    }
}

/// Whether node `index` fails version `version` (deterministic).
fn fails(seed: u64, index: u64, version: &str, percent: f64) -> bool {
    if percent <= 0.0 {
        return false;
    }
    let salt = version.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    let h = u64::from_str_radix(&hex_id(seed, index, salt)[..8], 16).unwrap_or(0);
    (h % 10_000) as f64 / 100.0 < percent
}

fn component_report(agent: &Agent, name: &str, d: &DesiredComponent, observed: &str, ph: &str, error: &str) {
    let nc = NodeComponent {
        name: name.into(),
        declared_version: d.spec.as_ref().map(|s| s.version.clone()).unwrap_or_default(),
        observed_version: observed.into(),
        phase: ph.into(),
        last_error: error.into(),
        last_change_time: now_rfc3339(),
        generation: d.generation,
        ..Default::default()
    };
    agent.set_component(nc.clone());
    if let Err(e) = agent.report(report::Body::Component(nc)) {
        tracing::warn!(node = %agent.name, error = %e, "hollow component report failed");
    }
}

/// Component changes as a real agent walks them, without touching
/// anything: Staging, a permit from the defender, Installing for `took`,
/// then Done, or (for a failing version) RollingBack and Failed at the old
/// version. The permit is released at the end.
async fn simulate_components(agent: Arc<Agent>, index: u64, seed: u64, took: Duration, failure_percent: f64) {
    // name → (generation handled, version running)
    let mut state: BTreeMap<String, (i64, String)> = BTreeMap::new();
    let mut good: std::collections::BTreeSet<String> = Default::default();
    tokio::time::sleep(Duration::from_millis(rand::random::<u64>() % 1000)).await;
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let desired = agent.settings().components;
        for d in desired {
            let version = d.spec.as_ref().map(|s| s.version.clone()).unwrap_or_default();
            let (handled, running) = state.get(&d.name).cloned().unwrap_or((0, String::new()));
            if handled == d.generation {
                continue;
            }
            if running == version {
                component_report(&agent, &d.name, &d, &running, phase::DONE, "");
                state.insert(d.name.clone(), (d.generation, running));
                continue;
            }
            component_report(&agent, &d.name, &d, &running, phase::STAGING, "");
            let reason = format!("update component {} to {version} (hollow)", d.name);
            let permit = match agent
                .permits
                .acquire(&format!("component/{}", d.name), &reason, false)
                .await
            {
                Ok(p) => p,
                Err(why) => {
                    let msg = format!("waiting for a permit: {why}");
                    component_report(&agent, &d.name, &d, &running, phase::STAGING, &msg);
                    tokio::time::sleep(Duration::from_millis(2000 + rand::random::<u64>() % 3000)).await;
                    continue;
                }
            };
            component_report(&agent, &d.name, &d, &running, phase::INSTALLING, "");
            tokio::time::sleep(took).await;
            let first = running.is_empty();
            if !first && !good.contains(&version) && fails(seed, index, &version, failure_percent) {
                component_report(&agent, &d.name, &d, &running, phase::ROLLING_BACK, "");
                component_report(
                    &agent,
                    &d.name,
                    &d,
                    &running,
                    phase::FAILED,
                    "simulated health gate failure; rolled back",
                );
                state.insert(d.name.clone(), (d.generation, running));
            } else {
                component_report(&agent, &d.name, &d, &version, phase::DONE, "");
                good.insert(version.clone());
                state.insert(d.name.clone(), (d.generation, version));
            }
            permit.release().await;
        }
    }
}

type Fleet = Arc<Vec<Arc<Agent>>>;

/// The control listener's state.
#[derive(Clone)]
struct Control {
    fleet: Fleet,
    seed: u64,
    /// Condition types of correlated faults (simulated remedies do not heal them).
    unhealed: crate::remedy::Unhealed,
}

/// A fault condition set by the control listener (source `hollow`).
fn fault(agent: &Agent, condition: &str, raised: bool) {
    let c = Condition {
        r#type: condition.into(),
        status: if raised { "True" } else { "False" }.into(),
        reason: if raised { "Raised" } else { "Cleared" }.into(),
        message: format!("hollow fault {}", if raised { "raised" } else { "cleared" }),
        last_transition_time: now_rfc3339(),
        source: "hollow".into(),
        ..Default::default()
    };
    if let Err(e) = agent.record_findings(vec![c], Vec::new(), None) {
        tracing::warn!(node = %agent.name, error = %e, "hollow fault not recorded");
    }
}

/// The `count` nodes a raise picks: a shuffle by (seed, salt).
fn pick(seed: u64, salt: u64, n: usize, skip: usize, count: usize) -> Vec<usize> {
    let mut order: Vec<(String, usize)> = (0..n)
        .map(|i| (hex_id(seed, i as u64, 0x5eed ^ salt.wrapping_mul(31)), i))
        .collect();
    order.sort();
    order.into_iter().skip(skip).take(count).map(|(_, i)| i).collect()
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct BurstQuery {
    per_agent: u64,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct LatencyQuery {
    since_ms: u64,
    revision: u64,
}

async fn burst(State(c): State<Control>, Query(q): Query<BurstQuery>) -> axum::Json<serde_json::Value> {
    let f = &c.fleet;
    let per_agent = q.per_agent.min(10_000);
    for a in f.iter() {
        for n in 0..per_agent {
            flip(a, n, "Burst");
        }
    }
    axum::Json(json!({ "queued": per_agent * f.len() as u64 }))
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct RaiseQuery {
    condition: String,
    count: usize,
    #[serde(default)]
    spread_seconds: f64,
    #[serde(default)]
    salt: u64,
    #[serde(default)]
    skip: usize,
    #[serde(default)]
    correlated: bool,
}

async fn raise(State(c): State<Control>, Query(q): Query<RaiseQuery>) -> axum::Json<serde_json::Value> {
    let chosen = pick(c.seed, q.salt, c.fleet.len(), q.skip, q.count);
    {
        let mut u = c.unhealed.lock().unwrap_or_else(|p| p.into_inner());
        if q.correlated {
            u.insert(q.condition.clone());
        } else {
            u.remove(&q.condition);
        }
    }
    let spread = Duration::from_secs_f64(q.spread_seconds.clamp(0.0, 3600.0));
    let names: Vec<String> = chosen.iter().map(|i| c.fleet[*i].name.clone()).collect();
    for i in chosen {
        let a = c.fleet[i].clone();
        let cond = q.condition.clone();
        let after = spread.mul_f64(rand::random::<f64>());
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            fault(&a, &cond, true);
        });
    }
    axum::Json(json!({ "raised": names.len(), "nodes": names }))
}

#[derive(serde::Deserialize)]
struct ClearQuery {
    condition: String,
}

async fn clear(State(c): State<Control>, Query(q): Query<ClearQuery>) -> axum::Json<serde_json::Value> {
    c.unhealed
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&q.condition);
    let mut cleared = 0u64;
    for a in c.fleet.iter() {
        if a.conditions()
            .iter()
            .any(|x| x.r#type == q.condition && x.status == "True")
        {
            fault(a, &q.condition, false);
            cleared += 1;
        }
    }
    axum::Json(json!({ "cleared": cleared }))
}

async fn stats(State(c): State<Control>) -> axum::Json<serde_json::Value> {
    let f = &c.fleet;
    let (mut rev_min, mut rev_max) = (u64::MAX, 0u64);
    let (mut connected, mut sessions, mut pending, mut sent, mut last_seq) = (0u64, 0u64, 0u64, 0u64, 0u64);
    let mut jobs: BTreeMap<String, u64> = BTreeMap::new();
    for a in f.iter() {
        for j in a.remedies.list() {
            *jobs.entry(j.phase).or_default() += 1;
        }
        let l = a.link();
        connected += u64::from(l.connected);
        sessions += l.sessions;
        let r = a.applied_revision();
        rev_min = rev_min.min(r);
        rev_max = rev_max.max(r);
        let (p, s) = a.with_outbox(|o| (o.pending() as u64, o.last_sequence()));
        pending += p;
        last_seq += s;
        sent += a.metrics.reports_sent.get();
    }
    axum::Json(json!({
        "agents": f.len(), "connected": connected, "sessions": sessions,
        "appliedRevisionMin": if f.is_empty() { 0 } else { rev_min },
        "appliedRevisionMax": rev_max, "outboxPending": pending,
        "reportsAssigned": last_seq, "reportsSent": sent, "remedyJobs": jobs,
    }))
}

async fn latency(State(c): State<Control>, Query(q): Query<LatencyQuery>) -> axum::Json<serde_json::Value> {
    let f = &c.fleet;
    let since = UNIX_EPOCH + Duration::from_millis(q.since_ms);
    let mut ms: Vec<f64> = f
        .iter()
        .filter(|a| a.applied_revision() >= q.revision)
        .filter_map(|a| a.applied_at())
        .map(|t| t.duration_since(since).map_or(0.0, |d| d.as_secs_f64() * 1000.0))
        .collect();
    ms.sort_by(f64::total_cmp);
    let pct = |p: f64| ms.get(((ms.len() as f64 - 1.0) * p).round() as usize).copied();
    axum::Json(json!({
        "count": ms.len(), "p50Ms": pct(0.5), "p99Ms": pct(0.99), "maxMs": ms.last(),
    }))
}

/// Runs the hollow agents until SIGTERM/SIGINT.
pub async fn run(args: HollowArgs) -> anyhow::Result<()> {
    let lc = LinkConfig::default();
    let endpoint = link::endpoint(&args.hub, &lc).map_err(anyhow::Error::msg)?;
    if !args.insecure && (args.token.is_none() || args.ca_cert_hash.is_none()) {
        anyhow::bail!(
            "hollow agents join like real ones: give --token and --ca-cert-hash (or --insecure for a plaintext hub)"
        );
    }
    let (stop_tx, stop_rx) = watch::channel(false);
    let fleet: Fleet = Arc::new((0..args.count).map(|i| Arc::new(hollow_agent(&args, i))).collect());
    let unhealed = crate::remedy::Unhealed::default();
    for a in fleet.iter() {
        a.permits
            .configure(crate::config::Offline::Deny, args.permit_ttl.as_secs() as u32);
    }
    for (index, a) in fleet.iter().enumerate() {
        let target = if args.insecure {
            link::Target::Plain(endpoint.clone())
        } else {
            // Each hollow agent has its own key and certificate, in memory.
            let creds = link::identity::Credentials::new(
                link::identity::IdentityConfig {
                    node: a.name.clone(),
                    dir: None,
                    bootstrap_token: args.token.clone(),
                    ca_cert_hash: args.ca_cert_hash.clone(),
                    ca_file: None,
                    renew_fraction: 2.0 / 3.0,
                },
                &args.hub,
            )
            .map_err(anyhow::Error::msg)?;
            link::Target::Tls {
                endpoint: endpoint.clone(),
                creds: Arc::new(creds),
            }
        };
        tokio::spawn(link::run(a.clone(), target, lc.clone(), stop_rx.clone()));
        if !args.component_seconds.is_zero() {
            tokio::spawn(simulate_components(
                a.clone(),
                index as u64,
                args.seed,
                args.component_seconds,
                args.component_failure_percent,
            ));
        }
        if args.report_rate > 0.0 {
            tokio::spawn(fake_detector(a.clone(), args.report_rate));
        }
        if !args.remedy_seconds.is_zero() {
            let engine = crate::remedy::Engine::new(
                a.clone(),
                crate::remedy::Config {
                    local_rules: Vec::new(),
                    actions: crate::remedy::Actions::Simulated {
                        took: args.remedy_seconds,
                        unhealed: unhealed.clone(),
                    },
                    boot_id: a.facts.boot_id.clone(),
                },
                a.remedies.clone(),
            );
            tokio::spawn(engine.run(stop_rx.clone()));
        }
    }
    tracing::info!(count = args.count, hub = %args.hub, started = ?SystemTime::now(), "hollow agents started");
    if let Some(addr) = args.control {
        let app = axum::Router::new()
            .route("/burst", post(burst))
            .route("/stats", get(stats))
            .route("/latency", get(latency))
            .route("/raise", post(raise))
            .route("/clear", post(clear))
            .with_state(Control {
                fleet: fleet.clone(),
                seed: args.seed,
                unhealed,
            });
        let l = tokio::net::TcpListener::bind(addr).await?;
        tracing::info!(%addr, "hollow control listening");
        tokio::spawn(async move { axum::serve(l, app).await });
    }
    nodekeeper_proto::daemon::shutdown_signal().await;
    let _ = stop_tx.send(true);
    tokio::time::sleep(Duration::from_millis(500)).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_are_a_deterministic_share_per_version() {
        let n = (0..10_000).filter(|i| fails(1, *i, "2.0", 5.0)).count();
        assert!((400..600).contains(&n), "{n}");
        assert_eq!(
            (0..100).filter(|i| fails(1, *i, "2.0", 5.0)).collect::<Vec<_>>(),
            (0..100).filter(|i| fails(1, *i, "2.0", 5.0)).collect::<Vec<_>>()
        );
        assert_ne!(
            (0..1000).filter(|i| fails(1, *i, "2.0", 5.0)).collect::<Vec<_>>(),
            (0..1000).filter(|i| fails(1, *i, "3.0", 5.0)).collect::<Vec<_>>()
        );
        assert!(!(0..1000).any(|i| fails(1, i, "2.0", 0.0)));
    }

    #[test]
    fn a_raise_picks_distinct_nodes_reproducibly() {
        let a = pick(1, 0, 1000, 0, 300);
        assert_eq!(a.len(), 300);
        assert_eq!(a, pick(1, 0, 1000, 0, 300));
        assert_ne!(a, pick(1, 1, 1000, 0, 300));
        let next = pick(1, 0, 1000, 300, 10);
        assert!(next.iter().all(|i| !a.contains(i)), "skipped ones are not picked again");
        assert_eq!(pick(1, 0, 1000, 0, 310)[300..], next[..]);
        let mut d = a.clone();
        d.sort();
        d.dedup();
        assert_eq!(d.len(), 300);
        assert_eq!(pick(1, 0, 10, 0, 50).len(), 10);
    }

    #[test]
    fn identities_are_distinct_and_reproducible() {
        let a = hex_id(7, 1, 1);
        assert_eq!(a, hex_id(7, 1, 1));
        assert_ne!(a, hex_id(7, 2, 1));
        assert_ne!(a, hex_id(8, 1, 1));
        assert_eq!(a.len(), 32);
    }
}
