//! The hub daemon's entry point.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::serve::ListenerExt;
use clap::Parser;
use nodekeeper_hub::auth::Auth;
use nodekeeper_hub::config::{self, HubConfig};
use nodekeeper_hub::fleet::{Fleet, FleetConfig};
use nodekeeper_hub::link::LinkService;
use nodekeeper_hub::link::admission::{self, Admission, Limits};
use nodekeeper_hub::link::tls;
use nodekeeper_hub::metrics::Metrics;
use nodekeeper_hub::store::Store;
use nodekeeper_proto::daemon;
use nodekeeper_proto::v1::agent_link_server::AgentLinkServer;

#[derive(Parser)]
#[command(
    name = "nodekeeper-hub",
    version,
    about = "nodekeeper hub: agent links, operator API, fleet state"
)]
struct Args {
    /// Configuration file.
    #[arg(long, default_value = config::DEFAULT_PATH)]
    config: PathBuf,
}

fn main() {
    daemon::exit_on_error(main_inner().map_err(|e| format!("{e:#}")), "nodekeeper-hub");
}

fn main_inner() -> anyhow::Result<()> {
    let args = Args::parse();
    let explicit = std::env::args().any(|a| a == "--config" || a.starts_with("--config="));
    let cfg = HubConfig::load(&args.config, explicit)?;
    daemon::init_logging(&cfg.log_level, cfg.log_format == "json");
    daemon::raise_fd_limit();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(run(cfg))
}

async fn run(cfg: HubConfig) -> anyhow::Result<()> {
    std::fs::create_dir_all(&cfg.state_dir).with_context(|| {
        format!(
            "creating stateDir {}; set stateDir in the config to a writable directory",
            cfg.state_dir.display()
        )
    })?;
    let metrics = Metrics::new();
    let store_path = cfg.store_path();
    let (store, mut loaded) = Store::open_bounded(&store_path, metrics.clone(), cfg.store.max_queued_writes)?;
    tracing::info!(store = %store_path.display(), nodes = loaded.nodes.len(), resources = loaded.resources.len(), "store loaded");
    let auth = Auth::new(
        &cfg,
        store.clone(),
        loaded.records.clone(),
        std::mem::take(&mut loaded.audit),
    )?;
    let fleet = Fleet::new(
        store,
        loaded,
        metrics,
        FleetConfig {
            grace: Duration::from_secs(cfg.node_monitor_grace_period_seconds),
            revision_history_limit: cfg.revision_history_limit,
            protected_label_keys: cfg.protected_label_keys.clone(),
        },
    )?;

    let grpc_listener = listen(cfg.listen.grpc).with_context(|| format!("binding listen.grpc {}", cfg.listen.grpc))?;
    let http_listener = tokio::net::TcpListener::bind(cfg.listen.http)
        .await
        .with_context(|| format!("binding listen.http {}", cfg.listen.http))?;
    tracing::info!(grpc = %grpc_listener.local_addr()?, http = %http_listener.local_addr()?, version = nodekeeper_proto::VERSION, tls = !auth.insecure(), ca_cert_hash = %auth.ca_pin(), "hub listening");

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let grpc = {
        let mut stop = stop_rx.clone();
        let admission = Admission::new(
            Limits {
                dead_peer: Duration::from_secs(cfg.limits.dead_peer_seconds),
                ..Limits::resolve(
                    cfg.limits.max_connections,
                    cfg.limits.max_connections_per_source,
                    cfg.limits.max_sessions,
                    Duration::from_secs(cfg.limits.retry_after_seconds),
                )
            },
            fleet.metrics.clone(),
        );
        let svc = AgentLinkServer::new(LinkService::new(fleet.clone(), admission.clone(), auth.clone()));
        let incoming = admission::incoming(grpc_listener, admission);
        // No HTTP/2 PINGs: the kernel finds dead peers (`detect_dead_peer`
        // in the accept loop) and heartbeats find hung agents.
        let server = tonic::transport::Server::builder().add_service(svc);
        let stopped = async move {
            let _ = stop.wait_for(|s| *s).await;
        };
        match &auth.pki {
            Some(pki) => {
                let acceptor = tokio_rustls::TlsAcceptor::from(pki.grpc.clone());
                let incoming = tls::agent_incoming(incoming, acceptor, auth.clone());
                tokio::spawn(server.serve_with_incoming_shutdown(incoming, stopped))
            }
            None => tokio::spawn(server.serve_with_incoming_shutdown(incoming, stopped)),
        }
    };
    let http = {
        let mut stop = stop_rx.clone();
        let app = nodekeeper_hub::api::router(fleet.clone(), auth.clone())
            .into_make_service_with_connect_info::<std::net::SocketAddr>();
        let stopped = async move {
            let _ = stop.wait_for(|s| *s).await;
        };
        match &auth.pki {
            Some(pki) => {
                let acceptor = tokio_rustls::TlsAcceptor::from(pki.http.clone());
                let listener = tls::HttpsListener::new(http_listener, acceptor, auth.clone())?.tap_io(|_| {});
                tokio::spawn(async move { axum::serve(listener, app).with_graceful_shutdown(stopped).await })
            }
            None => {
                let listener = http_listener.tap_io(|tcp| {
                    let _ = tcp.set_nodelay(true);
                });
                tokio::spawn(async move { axum::serve(listener, app).with_graceful_shutdown(stopped).await })
            }
        }
    };
    let ticker = {
        let fleet: Arc<Fleet> = fleet.clone();
        let auth = auth.clone();
        tokio::spawn(async move {
            let mut t = tokio::time::interval(Duration::from_secs(1));
            let mut n = 0u64;
            loop {
                t.tick().await;
                fleet.tick();
                fleet.expire_permits();
                fleet.tick_remedies();
                if n.is_multiple_of(60) {
                    auth.prune_audit();
                }
                n += 1;
            }
        })
    };
    // The rollout controller: a pass a second over every Component, and
    // soon after a node reports a change done or failed (gathered for a
    // moment, so a batch finishing together costs one pass).
    let rollouts = {
        let fleet: Arc<Fleet> = fleet.clone();
        tokio::spawn(async move {
            let mut t = tokio::time::interval(Duration::from_secs(1));
            t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = t.tick() => {}
                    _ = fleet.rollout_nudge.notified() => tokio::time::sleep(Duration::from_millis(200)).await,
                }
                fleet.rollout_pass().await;
            }
        })
    };
    daemon::notify_ready();

    tokio::select! {
        _ = daemon::shutdown_signal() => {}
        r = grpc => { r??; anyhow::bail!("gRPC server stopped unexpectedly"); }
    }
    daemon::notify_stopping();
    let _ = stop_tx.send(true);
    ticker.abort();
    rollouts.abort();
    match tokio::time::timeout(Duration::from_secs(5), http).await {
        Ok(Ok(Err(e))) => tracing::warn!(error = %e, "HTTP server error at shutdown"),
        Err(_) => tracing::warn!("HTTP server did not stop within 5 s"),
        _ => {}
    }
    tracing::info!("hub stopped");
    Ok(())
}

/// A listener with a deep accept backlog: after a hub restart thousands of
/// agents reconnect within seconds.
fn listen(addr: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(4096)
}
