//! Runtime helpers both daemons share: logging with a level that can change
//! at run time, systemd readiness and watchdog, termination signals, and the
//! link's dead-peer detection.

use std::time::Duration;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::reload;
use tracing_subscriber::util::SubscriberInitExt;

/// Changes the log level of a running daemon.
#[derive(Clone)]
pub struct LogLevel {
    handle: reload::Handle<EnvFilter, tracing_subscriber::Registry>,
    overridden: bool,
}

impl LogLevel {
    /// Sets the level (`info`, `debug`, ...). Ignored while `RUST_LOG` is set,
    /// so an operator debugging by hand keeps control.
    pub fn set(&self, level: &str) -> Result<(), String> {
        if self.overridden {
            return Ok(());
        }
        let filter = EnvFilter::try_new(directives(level)).map_err(|e| format!("log level {level:?}: {e}"))?;
        self.handle.reload(filter).map_err(|e| e.to_string())
    }
}

/// Filter directives for a level: the daemon's own spans at `level`, the
/// HTTP/2 and gRPC plumbing no noisier than `info` (its debug output is
/// per-frame and drowns everything else).
fn directives(level: &str) -> String {
    format!("{level},h2=info,hyper=info,hyper_util=info,tower=info,tonic=info")
}

/// Installs the global subscriber: text or JSON lines on stderr (journald
/// picks them up under systemd). `RUST_LOG` overrides `level`.
pub fn init_logging(level: &str, json: bool) -> LogLevel {
    let env = std::env::var("RUST_LOG").ok().filter(|s| !s.is_empty());
    let overridden = env.is_some();
    let filter = env
        .as_deref()
        .and_then(|s| EnvFilter::try_new(s).ok())
        .unwrap_or_else(|| EnvFilter::try_new(directives(level)).unwrap_or_else(|_| EnvFilter::new("info")));
    let (filter, handle) = reload::Layer::new(filter);
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false);
    let registry = tracing_subscriber::registry().with(filter);
    if json {
        registry.with(fmt.json().flatten_event(true)).init();
    } else {
        registry.with(fmt).init();
    }
    LogLevel { handle, overridden }
}

/// Tells systemd the daemon is ready (no-op outside systemd), and starts
/// watchdog pings at half the configured interval when `WatchdogSec=` is set.
/// The pings run on the async runtime, so a wedged runtime stops them and
/// systemd restarts the daemon.
pub fn notify_ready() {
    notify_ready_while(|| true);
}

/// [`notify_ready`], pinging the watchdog only while `healthy()` holds: a
/// daemon whose worker thread is stuck stops the pings, so systemd restarts
/// it (the async runtime alone being alive is not enough).
pub fn notify_ready_while(healthy: impl Fn() -> bool + Send + 'static) {
    if let Err(e) = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]) {
        tracing::warn!(error = %e, "sd_notify READY failed");
    }
    let mut usec = 0u64;
    if sd_notify::watchdog_enabled(false, &mut usec) && usec > 0 {
        let period = Duration::from_micros(usec / 2);
        tracing::info!(?period, "systemd watchdog enabled");
        // The async task decides (so a wedged runtime stops the pings); a
        // thread of its own sends them, since a datagram send can block and
        // must not hold a runtime worker.
        let (tx, rx) = std::sync::mpsc::sync_channel::<()>(1);
        let _ = std::thread::Builder::new().name("watchdog".into()).spawn(move || {
            while rx.recv().is_ok() {
                let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]);
            }
        });
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            let mut withheld = false;
            loop {
                tick.tick().await;
                if healthy() {
                    withheld = false;
                    let _ = tx.try_send(());
                } else if !withheld {
                    withheld = true;
                    tracing::error!("withholding watchdog pings: a worker is stuck; systemd will restart this daemon");
                }
            }
        });
    }
}

/// Runs blocking work (an fsync, a computation over the whole fleet) without
/// holding up the async runtime's other tasks: in `block_in_place` on a
/// multi-thread runtime, directly anywhere else (a current-thread runtime
/// in tests, a plain thread).
pub fn off_runtime<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// How long the agent link waits on a silent peer before the connection is
/// dropped, unless configured (`limits.deadPeerSeconds` on the hub,
/// `hub.deadPeerSeconds` on an agent).
pub const DEAD_PEER_DEFAULT: Duration = Duration::from_secs(60);

/// Makes the kernel drop a link connection whose peer went away without
/// closing it (power loss, a cut cable, a partition) within about
/// `dead_after`: TCP keepalive probes a connection idle for half of it (three
/// probes, a sixth apart), and `TCP_USER_TIMEOUT` fails one whose sent data
/// stays unacknowledged that long. Both run in the kernel: HTTP/2 PINGs did
/// the same from user space, woke every connection's task on both sides and
/// were a tenth of all messages a 10,000-node hub handled. A peer whose
/// process hangs while its kernel still acknowledges is noticed by the
/// heartbeats instead (the hub's `nodeMonitorGracePeriodSeconds`).
pub fn detect_dead_peer(socket: &impl std::os::fd::AsFd, dead_after: Duration) -> std::io::Result<()> {
    use nix::sys::socket::{setsockopt, sockopt};
    let secs = |d: Duration| d.as_secs().clamp(1, i32::MAX as u64) as u32;
    let idle = secs(dead_after / 2);
    let interval = secs(dead_after / 6);
    let user_timeout = dead_after.as_millis().clamp(1_000, u32::MAX as u128) as u32;
    setsockopt(socket, sockopt::KeepAlive, &true)?;
    setsockopt(socket, sockopt::TcpKeepIdle, &idle)?;
    setsockopt(socket, sockopt::TcpKeepInterval, &interval)?;
    setsockopt(socket, sockopt::TcpKeepCount, &3)?;
    setsockopt(socket, sockopt::TcpUserTimeout, &user_timeout)?;
    Ok(())
}

/// Tells systemd the daemon is stopping.
pub fn notify_stopping() {
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        tracing::error!("cannot install signal handlers; stop with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
}

/// Runs a daemon's main function and turns an error into one clear line on
/// stderr and exit status 1 (no backtrace: the message says what to do).
pub fn exit_on_error(result: Result<(), impl std::fmt::Display>, program: &str) {
    if let Err(e) = result {
        eprintln!("{program}: {e}");
        std::process::exit(1);
    }
}

/// Raises the open-files soft limit to the hard limit: a hub holds one socket
/// per agent, and a hollow-agent process one per simulated node.
pub fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                tracing::warn!(soft, hard, error = %e, "cannot raise the open-files limit");
            }
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot read the open-files limit"),
    }
}

/// Content type of the Prometheus/OpenMetrics text exposition.
pub const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The classic Prometheus text format (version 0.0.4), which, unlike
/// OpenMetrics, lets a counter keep a name without `_total`.
pub const CLASSIC_METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Rewrites OpenMetrics text as the classic Prometheus text format: no
/// `# EOF` or `# UNIT`, and each counter family named as its samples
/// (`foo_total`), except the families in `keep`, whose samples lose the
/// `_total` suffix instead (node-problem-detector's `problem_counter`).
pub fn openmetrics_to_classic(text: &str, keep: &[&str]) -> String {
    let mut out = String::with_capacity(text.len());
    let mut help: Option<&str> = None;
    let mut kept: Option<&str> = None;
    for line in text.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            help = Some(rest);
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, ""));
            kept = None;
            let family = if kind == "counter" && !keep.contains(&name) {
                format!("{name}_total")
            } else {
                if kind == "counter" {
                    kept = Some(name);
                }
                name.to_string()
            };
            if let Some(h) = help.take() {
                let text = h.split_once(' ').map_or("", |(_, t)| t);
                out.push_str(&format!("# HELP {family} {text}\n"));
            }
            out.push_str(&format!("# TYPE {family} {kind}\n"));
            continue;
        }
        match kept
            .and_then(|k| line.strip_prefix(k))
            .and_then(|r| r.strip_prefix("_total"))
        {
            Some(rest) => {
                out.push_str(kept.unwrap_or_default());
                out.push_str(rest);
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

/// Encodes a metrics registry in the text exposition format.
pub fn encode_metrics(registry: &prometheus_client::registry::Registry) -> String {
    let mut out = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, registry) {
        tracing::warn!(error = %e, "encoding metrics failed");
    }
    out
}
