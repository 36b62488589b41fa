//! Admission control for agent connections: the hub stays reachable at its
//! limits. Connections are accepted by one loop that backs off on accept
//! errors (at the open-files limit `accept` fails at once, and retrying
//! without a pause spins a core), counts every open connection, keeps
//! descriptors in reserve for the operator API, the store and health checks,
//! and marks connections over a limit so their session is refused with
//! `Unavailable` and a retry hint that agents honour. Past the refusal
//! margin a connection is closed at once.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::Stream;
use tokio::net::{TcpListener, TcpStream};
use tonic::transport::server::Connected;

use crate::metrics::Metrics;

/// The limits, resolved at start.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Agent connections served normally.
    pub max_connections: usize,
    /// Connections over `max_connections` still served long enough to be
    /// refused with a retry hint; beyond them, connections are closed at once.
    pub refuse_margin: usize,
    /// Connections from one source address (0: no limit).
    pub max_per_source: usize,
    /// Open sessions (0: no limit beyond `max_connections`).
    pub max_sessions: usize,
    /// The hint sent with a refusal.
    pub retry_after: Duration,
    /// How long a silent agent connection is kept (`limits.deadPeerSeconds`).
    pub dead_peer: Duration,
}

impl Limits {
    /// Limits from the configuration and the process's open-files limit:
    /// `max_connections` 0 means "what the open-files limit allows after
    /// the reserve".
    pub fn resolve(
        max_connections: usize,
        max_per_source: usize,
        max_sessions: usize,
        retry_after: Duration,
    ) -> Limits {
        let nofile = open_files_limit();
        let (auto, margin) = split_fd_budget(nofile);
        let max_connections = if max_connections == 0 {
            auto
        } else {
            max_connections.min(auto)
        };
        Limits {
            max_connections,
            refuse_margin: margin,
            max_per_source,
            max_sessions,
            retry_after,
            dead_peer: nodekeeper_proto::daemon::DEAD_PEER_DEFAULT,
        }
    }
}

/// The process's soft open-files limit (after the daemon raised it).
pub fn open_files_limit() -> usize {
    nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map(|(soft, _)| soft as usize)
        .unwrap_or(1024)
}

/// Splits an open-files limit into (agent connections, refusal margin); the
/// rest is the reserve for everything else the hub opens (listeners, the
/// store and its WAL, operator API connections, health checks). A tenth of
/// the limit, at least 64 and at most 2,048, is kept back; half of that may
/// carry refusals.
pub fn split_fd_budget(nofile: usize) -> (usize, usize) {
    let reserve = (nofile / 10).clamp(64, 2048);
    let margin = reserve / 2;
    (nofile.saturating_sub(reserve).max(1), margin)
}

/// Why a connection is over a limit (the refusal names it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Over {
    Connections,
    Source,
}

/// What the session handler learns about its connection.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub remote: Option<SocketAddr>,
    pub over: Option<Over>,
    /// The client certificate, after a TLS handshake that presented one.
    pub peer: Option<Arc<nodekeeper_proto::tls::CertFacts>>,
}

/// Shared counters of the admission controller.
pub struct Admission {
    limits: Limits,
    open: AtomicUsize,
    per_source: Mutex<HashMap<IpAddr, usize>>,
    /// Set while the hub is at a limit, so it is logged once per episode.
    at_limit: AtomicBool,
    metrics: Metrics,
}

impl Admission {
    pub fn new(limits: Limits, metrics: Metrics) -> Arc<Admission> {
        tracing::info!(
            max_connections = limits.max_connections,
            refuse_margin = limits.refuse_margin,
            max_per_source = limits.max_per_source,
            max_sessions = limits.max_sessions,
            "agent admission limits"
        );
        Arc::new(Admission {
            limits,
            open: AtomicUsize::new(0),
            per_source: Mutex::new(HashMap::new()),
            at_limit: AtomicBool::new(false),
            metrics,
        })
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Open agent connections now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Logs the first time in an episode that the hub is at a limit.
    fn note_limit(&self, what: &str) {
        if !self.at_limit.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                open = self.open(),
                max_connections = self.limits.max_connections,
                "hub at its {what}: refusing new agent sessions with a retry hint; raise LimitNOFILE or limits.* in hub.yaml, or add hubs"
            );
        }
    }

    fn clear_limit(&self) {
        if self.open() < self.limits.max_connections * 9 / 10 && self.at_limit.swap(false, Ordering::Relaxed) {
            tracing::info!(open = self.open(), "hub back under its connection limits");
        }
    }

    /// Counts a new connection; `None` when it must be closed at once.
    fn admit(self: &Arc<Self>, remote: Option<SocketAddr>) -> Option<(ConnInfo, Guard)> {
        let total = self.open.fetch_add(1, Ordering::Relaxed) + 1;
        // Sources are counted only when they are limited.
        let ip = remote.map(|a| a.ip()).filter(|_| self.limits.max_per_source > 0);
        let per = ip.map(|ip| {
            let mut m = self.per_source.lock().unwrap_or_else(|p| p.into_inner());
            let n = m.entry(ip).or_default();
            *n += 1;
            *n
        });
        let guard = Guard {
            admission: self.clone(),
            ip,
        };
        self.metrics.agent_connections.set(total as i64);
        if total > self.limits.max_connections + self.limits.refuse_margin {
            self.note_limit("connection limit");
            self.metrics.connections_shed.inc();
            return None; // the guard's drop uncounts it
        }
        let over = if total > self.limits.max_connections {
            Some(Over::Connections)
        } else if self.limits.max_per_source > 0 && per.is_some_and(|p| p > self.limits.max_per_source) {
            Some(Over::Source)
        } else {
            None
        };
        if over == Some(Over::Connections) {
            self.note_limit("connection limit");
        }
        Some((
            ConnInfo {
                remote,
                over,
                peer: None,
            },
            guard,
        ))
    }

    /// Whether a new session may open: `Err` is the refusal's reason.
    pub fn check_session(&self, info: Option<&ConnInfo>, sessions: usize) -> Result<(), String> {
        let why = match info.and_then(|i| i.over) {
            Some(Over::Connections) => Some(format!(
                "hub is at its connection limit ({} agent connections)",
                self.limits.max_connections
            )),
            Some(Over::Source) => Some(format!(
                "too many connections from {} (limits.maxConnectionsPerSource {})",
                info.and_then(|i| i.remote)
                    .map(|a| a.ip().to_string())
                    .unwrap_or_default(),
                self.limits.max_per_source
            )),
            None if self.limits.max_sessions > 0 && sessions >= self.limits.max_sessions => {
                self.note_limit("session limit");
                Some(format!(
                    "hub is at its session limit (limits.maxSessions {})",
                    self.limits.max_sessions
                ))
            }
            None => None,
        };
        match why {
            Some(w) => {
                self.metrics.sessions_throttled.inc();
                Err(w)
            }
            None => Ok(()),
        }
    }
}

/// Uncounts a connection when it closes.
struct Guard {
    admission: Arc<Admission>,
    ip: Option<IpAddr>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        let a = &self.admission;
        let left = a.open.fetch_sub(1, Ordering::Relaxed).saturating_sub(1);
        a.metrics.agent_connections.set(left as i64);
        if let Some(ip) = self.ip {
            let mut m = a.per_source.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(n) = m.get_mut(&ip) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    m.remove(&ip);
                }
            }
        }
        a.clear_limit();
    }
}

/// An admitted connection: the TCP stream, counted while it lives.
pub struct Conn {
    stream: TcpStream,
    info: ConnInfo,
    _guard: Guard,
}

impl Conn {
    pub fn info(&self) -> &ConnInfo {
        &self.info
    }
}

impl Connected for Conn {
    type ConnectInfo = ConnInfo;
    fn connect_info(&self) -> ConnInfo {
        self.info.clone()
    }
}

delegate_io!(Conn, stream);

/// Errors after which `accept` fails again at once until something changes:
/// the process or the system is out of descriptors or memory.
fn is_resource_error(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc_errno::EMFILE | libc_errno::ENFILE | libc_errno::ENOBUFS | libc_errno::ENOMEM)
    )
}

mod libc_errno {
    pub const EMFILE: i32 = nix::errno::Errno::EMFILE as i32;
    pub const ENFILE: i32 = nix::errno::Errno::ENFILE as i32;
    pub const ENOBUFS: i32 = nix::errno::Errno::ENOBUFS as i32;
    pub const ENOMEM: i32 = nix::errno::Errno::ENOMEM as i32;
}

/// The accept loop as a stream of admitted connections for tonic. It never
/// yields an error: accept errors are counted, logged once per episode and
/// waited out with a growing pause (10 ms to 1 s).
pub fn incoming(listener: TcpListener, admission: Arc<Admission>) -> impl Stream<Item = Result<Conn, io::Error>> {
    futures::stream::unfold((listener, admission), |(listener, admission)| async move {
        let mut pause = Duration::from_millis(10);
        loop {
            match listener.accept().await {
                Ok((stream, remote)) => {
                    let _ = stream.set_nodelay(true);
                    if let Err(e) = nodekeeper_proto::daemon::detect_dead_peer(&stream, admission.limits.dead_peer) {
                        tracing::debug!(%remote, error = %e, "cannot set TCP keepalive on an agent connection");
                    }
                    match admission.admit(Some(remote)) {
                        Some((info, guard)) => {
                            let conn = Conn {
                                stream,
                                info,
                                _guard: guard,
                            };
                            return Some((Ok(conn), (listener, admission)));
                        }
                        None => drop(stream),
                    }
                }
                Err(e) => {
                    admission.metrics.accept_errors.inc();
                    if is_resource_error(&e) {
                        admission.note_limit("open-files limit");
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(Duration::from_secs(1));
                    } else {
                        // A connection that went away before it was accepted.
                        tracing::debug!(error = %e, "accept error");
                    }
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_keeps_a_reserve_for_everything_but_agents() {
        assert_eq!(split_fd_budget(20_000), (18_000, 1_000));
        assert_eq!(split_fd_budget(262_144), (260_096, 1_024));
        assert_eq!(split_fd_budget(256), (192, 32));
        assert_eq!(split_fd_budget(10), (1, 32));
    }

    fn admission(max: usize, per_source: usize, sessions: usize) -> Arc<Admission> {
        Admission::new(
            Limits {
                max_connections: max,
                refuse_margin: 2,
                max_per_source: per_source,
                max_sessions: sessions,
                retry_after: Duration::from_secs(5),
                dead_peer: Duration::from_secs(60),
            },
            Metrics::new(),
        )
    }

    #[test]
    fn connections_over_the_limit_are_refused_then_shed_and_uncounted_when_closed() {
        let a = admission(2, 0, 0);
        let addr: SocketAddr = "10.0.0.1:5000".parse().expect("addr");
        let c1 = a.admit(Some(addr)).expect("1");
        let c2 = a.admit(Some(addr)).expect("2");
        assert!(c1.0.over.is_none() && c2.0.over.is_none());
        let c3 = a.admit(Some(addr)).expect("3 is served to be refused");
        assert_eq!(c3.0.over, Some(Over::Connections));
        assert!(a.check_session(Some(&c3.0), 0).is_err());
        let c4 = a.admit(Some(addr)).expect("4 within the margin");
        assert!(a.admit(Some(addr)).is_none(), "5 is past the margin: closed at once");
        assert_eq!(a.open(), 4);
        drop((c1, c2, c3, c4));
        assert_eq!(a.open(), 0);
        assert!(a.admit(Some(addr)).expect("room again").0.over.is_none());
    }

    #[test]
    fn per_source_and_session_limits() {
        let a = admission(100, 2, 3);
        let x: SocketAddr = "10.0.0.1:1".parse().expect("addr");
        let y: SocketAddr = "10.0.0.2:1".parse().expect("addr");
        let _x1 = a.admit(Some(x)).expect("x1");
        let _x2 = a.admit(Some(x)).expect("x2");
        let x3 = a.admit(Some(x)).expect("x3");
        assert_eq!(x3.0.over, Some(Over::Source));
        let err = a.check_session(Some(&x3.0), 0).expect_err("refused");
        assert!(err.contains("10.0.0.1"), "{err}");
        let y1 = a.admit(Some(y)).expect("y1");
        assert!(a.check_session(Some(&y1.0), 2).is_ok());
        assert!(
            a.check_session(Some(&y1.0), 3)
                .expect_err("sessions")
                .contains("maxSessions")
        );
    }
}
