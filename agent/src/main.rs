//! The agent daemon's entry point.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use nodekeeper_agent::config::{self, AgentConfig};
use nodekeeper_agent::converge::liveness::Liveness;
use nodekeeper_agent::detect::facts::{self, FactRoots};
use nodekeeper_agent::link::{self, LinkConfig};
use nodekeeper_agent::metrics::Metrics;
use nodekeeper_agent::report::outbox::Outbox;
use nodekeeper_agent::runtime::{Agent, AgentParts};
use nodekeeper_agent::store::AgentStore;
use nodekeeper_agent::{converge, status};
use nodekeeper_proto::daemon;
use nodekeeper_proto::v1::Event;

#[derive(Parser)]
#[command(name = "nodekeeper-agent", version, about = "nodekeeper node agent")]
struct Args {
    /// Configuration file.
    #[arg(long, default_value = config::DEFAULT_PATH)]
    config: PathBuf,
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(clap::Subcommand)]
enum Cmd {
    /// Run many hollow agents in one process against a hub (scale tests).
    Hollow(nodekeeper_agent::hollow::HollowArgs),
    /// Run log-monitor rules over a log file and show what would be raised.
    TestRules(nodekeeper_agent::detect::test_rules::TestRulesArgs),
    /// Drive or show a systemd unit the way the agent does (over D-Bus, or
    /// systemctl without a bus): start, stop and restart wait for the job and
    /// say its result; status prints the unit's state as JSON.
    Unit {
        #[arg(value_enum)]
        action: UnitAction,
        /// The unit, e.g. kubelet.service.
        unit: String,
    },
    /// The shim that runs a check's program (used by the agent itself):
    /// prints one JSON result.
    #[command(hide = true)]
    RunCheck {
        #[arg(long)]
        timeout_ms: u64,
        #[arg(long, default_value_t = nodekeeper_agent::detect::checks::run::MAX_CAPTURE)]
        max_output: usize,
        #[arg(last = true)]
        argv: Vec<String>,
    },
}

/// What `nodekeeper-agent unit` does.
#[derive(Clone, Copy, clap::ValueEnum)]
enum UnitAction {
    Start,
    Stop,
    Restart,
    Status,
}

fn main() {
    daemon::exit_on_error(main_inner().map_err(|e| format!("{e:#}")), "nodekeeper-agent");
}

fn main_inner() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.cmd.is_none() {
        // The daemon keeps one malloc arena: its threads rarely allocate at
        // the same time, and every extra arena keeps its own touched pages
        // (about 0.8 MiB of resident memory idle). Set before any thread
        // exists; an operator's MALLOC_ARENA_MAX is left to glibc. (Hollow
        // agents, thousands in one busy process, keep glibc's default.)
        if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
            // SAFETY: mallopt has no memory-safety preconditions; called
            // before the process starts any thread.
            unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) };
        }
    }
    if let Some(Cmd::RunCheck {
        timeout_ms,
        max_output,
        argv,
    }) = &args.cmd
    {
        let r = nodekeeper_agent::detect::checks::run::shim(Duration::from_millis(*timeout_ms), *max_output, argv);
        println!("{}", serde_json::to_string(&r)?);
        return Ok(());
    }
    if let Some(Cmd::TestRules(t)) = args.cmd {
        return nodekeeper_agent::detect::test_rules::run(t);
    }
    if let Some(Cmd::Unit { action, unit }) = &args.cmd {
        daemon::init_logging("warn", false);
        let units = converge::component::systemd::select();
        let done = match action {
            UnitAction::Start => units.start(unit),
            UnitAction::Stop => units.stop(unit),
            UnitAction::Restart => units.restart(unit),
            UnitAction::Status => {
                let s = units.status(unit).map_err(anyhow::Error::msg)?;
                let mut v = serde_json::to_value(&s)?;
                v["via"] = serde_json::Value::String(units.name().into());
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(());
            }
        };
        done.map_err(anyhow::Error::msg)?;
        println!("{unit}: done (via {})", units.name());
        return Ok(());
    }
    if let Some(Cmd::Hollow(h)) = args.cmd {
        daemon::init_logging("warn", false);
        daemon::raise_fd_limit();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(h.workers.max(1))
            .enable_all()
            .build()
            .context("starting the async runtime")?;
        return rt.block_on(nodekeeper_agent::hollow::run(h));
    }
    let explicit = std::env::args().any(|a| a == "--config" || a.starts_with("--config="));
    let cfg = AgentConfig::load(&args.config, explicit)?;
    let log = daemon::init_logging(&cfg.log_level, cfg.log_format == "json");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let span = tracing::info_span!("agent", node = %cfg.node_name());
    rt.block_on(tracing::Instrument::instrument(run(cfg, log), span))
}

async fn run(cfg: AgentConfig, log: daemon::LogLevel) -> anyhow::Result<()> {
    let facts = facts::collect(&FactRoots::default());
    // Loading checks every rule (regexes compiled, conditions declared), so an
    // unusable rule file stops the start here.
    let local = local_rules(&cfg)?;
    let local_checks = nodekeeper_agent::detect::checks::local(&cfg.detectors, &cfg.path)?;
    // Standalone components are checked before anything starts, like rules.
    let local_components = if cfg.converge.components.is_empty() {
        None
    } else {
        Some(converge::component::local::load(&cfg.converge.components, &cfg.labels).map_err(anyhow::Error::msg)?)
    };
    std::fs::create_dir_all(&cfg.state_dir).with_context(|| {
        format!(
            "creating stateDir {}; set stateDir to a writable directory",
            cfg.state_dir.display()
        )
    })?;
    let store = Arc::new(AgentStore::open(&cfg.state_dir.join("agent.db"))?);
    let outbox = Outbox::open(store.clone(), cfg.outbox.max_reports)?;
    let converge_store = store.clone();
    let name = cfg.node_name();
    let agent = Arc::new(Agent::new(AgentParts {
        name: name.clone(),
        labels: cfg.labels.clone(),
        facts,
        hub: cfg.hub.as_ref().map(|h| h.address.clone()),
        outbox,
        store: Some(store),
        log: Some(log),
        metrics: Metrics::new(),
    }));
    agent
        .permits
        .configure(cfg.defender.offline, cfg.defender.permit_ttl_seconds);
    if let Err(e) = converge::settings::restore(&agent) {
        tracing::error!(error = %e, "cannot apply the cached desired state; running with defaults until the hub sends one");
    }

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let listener = status::bind(&cfg.socket, &cfg.socket_group)?;
    let socket_task = {
        let mut stop = stop_rx.clone();
        let app = status::router(agent.clone());
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stop.wait_for(|s| *s).await;
                })
                .await
        })
    };
    if let Some(addr) = cfg.metrics.listen {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding metrics.listen {addr}"))?;
        let app = status::metrics_router(agent.clone());
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            axum::serve(l, app)
                .with_graceful_shutdown(async move {
                    let _ = stop.wait_for(|s| *s).await;
                })
                .await
        });
    }
    let link_task = match &cfg.hub {
        Some(hub) => {
            let lc = LinkConfig {
                dead_peer: Duration::from_secs(hub.dead_peer_seconds),
                ..LinkConfig::default()
            };
            let ep = link::endpoint(&hub.address, &lc).map_err(anyhow::Error::msg)?;
            let target = if hub.insecure {
                tracing::warn!(hub = %hub.address, "hub.insecure: plaintext link without identity; for labs only");
                link::Target::Plain(ep)
            } else {
                let creds = link::identity::Credentials::new(
                    link::identity::IdentityConfig {
                        node: name.clone(),
                        dir: Some(cfg.state_dir.clone()),
                        bootstrap_token: hub.token(&cfg.path)?,
                        ca_cert_hash: hub.ca_cert_hash.clone(),
                        ca_file: hub.ca_file.clone(),
                        renew_fraction: hub.renew_fraction,
                    },
                    &hub.address,
                )
                .map_err(anyhow::Error::msg)?;
                link::Target::Tls {
                    endpoint: ep,
                    creds: Arc::new(creds),
                }
            };
            tracing::info!(hub = %hub.address, "starting hub link");
            Some(tokio::spawn(link::run(agent.clone(), target, lc, stop_rx.clone())))
        }
        None => {
            tracing::info!("no hub configured: standalone mode");
            None
        }
    };
    let engine_stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let detectors =
        nodekeeper_agent::detect::manager::spawn(agent.clone(), local).context("starting the log monitors")?;
    let checks = nodekeeper_agent::detect::checks::spawn(agent.clone(), local_checks, stop_rx.clone());
    let liveness = Arc::new(Liveness::default());
    nodekeeper_agent::exec::set_deadlines(cfg.deadlines);
    // Chosen once (D-Bus, or systemctl without a bus) and logged.
    tokio::task::spawn_blocking(converge::component::systemd::select)
        .await
        .context("choosing how to talk to systemd")?;
    // The engine thread is not joined at shutdown: every step it takes is
    // recorded first, so a change cut short resumes at the next start.
    let _converge = converge::component::spawn(
        agent.clone(),
        converge_store,
        cfg.converge.clone(),
        &cfg.state_dir,
        local_components,
        engine_stop.clone(),
        liveness.clone(),
    )
    .context("starting the converge engine")?;
    tokio::spawn(watch_converge(agent.clone(), liveness.clone()));
    let boot_id = std::fs::read_to_string(&cfg.remedy.boot_id_file)
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| agent.facts.boot_id.clone());
    let remedies = nodekeeper_agent::remedy::Engine::new(
        agent.clone(),
        nodekeeper_agent::remedy::Config {
            local_rules: cfg.remedy.rules.clone(),
            actions: nodekeeper_agent::remedy::Actions::Real(nodekeeper_agent::remedy::action::Env {
                reboot_command: cfg.remedy.reboot_command.clone(),
                ..Default::default()
            }),
            boot_id,
        },
        agent.remedies.clone(),
    );
    tokio::spawn(remedies.run(stop_rx.clone()));
    agent
        .record_event(Event {
            severity: "Info".into(),
            reason: "AgentStarted".into(),
            message: format!("nodekeeper-agent {} started", nodekeeper_proto::VERSION),
            source: "agent".into(),
            ..Default::default()
        })
        .context("recording the start event")?;
    tracing::info!(socket = %cfg.socket.display(), version = nodekeeper_proto::VERSION, "agent ready");
    {
        let liveness = liveness.clone();
        daemon::notify_ready_while(move || liveness.stuck().is_none());
    }

    daemon::shutdown_signal().await;
    daemon::notify_stopping();
    let _ = stop_tx.send(true);
    if let Some(t) = link_task
        && tokio::time::timeout(Duration::from_secs(5), t).await.is_err()
    {
        tracing::warn!("hub link did not stop within 5 s");
    }
    engine_stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = tokio::task::spawn_blocking(move || detectors.stop_and_join()).await;
    let _ = tokio::time::timeout(Duration::from_secs(5), checks).await;
    let _ = tokio::time::timeout(Duration::from_secs(5), socket_task).await;
    let _ = std::fs::remove_file(&cfg.socket);
    tracing::info!("agent stopped");
    Ok(())
}

/// Watches the converge thread: a stuck step sets the metric and is
/// reported once per episode (the watchdog gate reads the same state).
async fn watch_converge(agent: Arc<Agent>, liveness: Arc<Liveness>) {
    let mut reported = false;
    // Budgets are whole seconds to minutes: looking every 5 s is soon enough,
    // and an idle agent wakes rarely.
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        tick.tick().await;
        match liveness.stuck() {
            Some(s) => {
                agent.metrics.converge_stuck.set(1);
                if !reported {
                    reported = true;
                    let message = format!(
                        "{} has run for {} s, past its budget of {} s; systemd's watchdog will restart the agent, which resumes the step from its record",
                        s.what,
                        s.for_.as_secs(),
                        s.budget.as_secs()
                    );
                    tracing::error!(%message, "converge thread stuck");
                    let _ = agent.record_event(Event {
                        severity: "Error".into(),
                        reason: "ConvergeStuck".into(),
                        message,
                        source: "agent".into(),
                        ..Default::default()
                    });
                }
            }
            None => {
                agent.metrics.converge_stuck.set(0);
                reported = false;
            }
        }
    }
}

/// The local rule files: built-in ones (unless turned off) and the
/// configured ones. A bad file stops the agent before it changes anything,
/// naming the file, the rule and the reason.
fn local_rules(cfg: &AgentConfig) -> anyhow::Result<Vec<(String, nodekeeper_agent::detect::rules::LogMonitor)>> {
    let mut files = Vec::new();
    if cfg.detectors.default_rules {
        for rules in nodekeeper_agent::detect::defaults::load()? {
            files.push((format!("built-in rules ({})", rules.source), rules));
        }
    }
    for (i, f) in cfg.detectors.log_monitors.iter().enumerate() {
        let rules = nodekeeper_agent::detect::rules::load(f).with_context(|| format!("detectors.logMonitors[{i}]"))?;
        files.push((format!("detectors.logMonitors[{i}]: {}", f.display()), rules));
    }
    Ok(files)
}
