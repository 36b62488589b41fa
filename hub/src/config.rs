//! The hub's configuration file (`/etc/nodekeeper/hub.yaml`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use nodekeeper_proto::config::ConfigError;
use serde::Deserialize;

/// Default path of the configuration file.
pub const DEFAULT_PATH: &str = "/etc/nodekeeper/hub.yaml";

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct HubConfig {
    pub listen: Listen,
    pub state_dir: PathBuf,
    pub store: StoreConfig,
    pub limits: LimitsConfig,
    /// How long a node may miss heartbeats before its Ready turns Unknown
    /// (never less than three of its heartbeat intervals).
    pub node_monitor_grace_period_seconds: u64,
    /// Revisions kept per resource (Components' history for undo).
    pub revision_history_limit: usize,
    /// error, warn, info, debug, trace (RUST_LOG overrides).
    pub log_level: String,
    /// text or json.
    pub log_format: String,
    /// Plaintext listeners and no authentication at all: for labs and
    /// throwaway tests only (warned about at every start).
    pub insecure: bool,
    pub tls: TlsConfig,
    /// Label keys only tokens and operators may set (besides
    /// `nodekeeper.io/*`, always protected): an agent's claim is ignored.
    pub protected_label_keys: Vec<String>,
    pub audit: AuditConfig,
}

/// The hub's PKI (`tls`). Without files, the hub creates its CA and serving
/// certificate in `stateDir` on first start.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct TlsConfig {
    pub ca_file: Option<PathBuf>,
    /// The CA's key; without it (with `caFile`) the hub cannot sign node
    /// certificates, so joining and renewal are refused.
    pub ca_key_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// Names and addresses the created serving certificate is valid for, in
    /// addition to localhost, 127.0.0.1, ::1 and the host name.
    pub server_names: Vec<String>,
    /// Lifetime of node certificates (agents renew at two thirds of it).
    #[serde(with = "humantime_serde_compat")]
    pub node_certificate_ttl: std::time::Duration,
    /// TLS sessions the hub remembers for resumption (0: none).
    pub session_cache: usize,
}

impl Default for TlsConfig {
    fn default() -> Self {
        TlsConfig {
            ca_file: None,
            ca_key_file: None,
            cert_file: None,
            key_file: None,
            server_names: Vec::new(),
            node_certificate_ttl: std::time::Duration::from_secs(365 * 24 * 3600),
            session_cache: 20_000,
        }
    }
}

/// The audit log (`audit`).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct AuditConfig {
    /// How long entries are kept.
    #[serde(with = "humantime_serde_compat")]
    pub retention: std::time::Duration,
    /// Most entries kept (the oldest go first).
    pub max_entries: usize,
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            retention: std::time::Duration::from_secs(90 * 24 * 3600),
            max_entries: 100_000,
        }
    }
}

/// Durations written as humantime strings (`24h`, `90d`).
mod humantime_serde_compat {
    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<std::time::Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map_err(|e| serde::de::Error::custom(format!("{s:?}: {e} (e.g. 24h, 90d)")))
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Listen {
    pub grpc: SocketAddr,
    pub http: SocketAddr,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct StoreConfig {
    /// Only `sqlite` is available today.
    pub driver: String,
    /// SQLite file; default `<stateDir>/hub.db`.
    pub path: Option<PathBuf>,
    /// Operations that may wait for the store writer before report ingest
    /// waits (and so acks, and agents' streams).
    pub max_queued_writes: usize,
}

impl Default for HubConfig {
    fn default() -> Self {
        HubConfig {
            listen: Listen::default(),
            state_dir: PathBuf::from("/var/lib/nodekeeper-hub"),
            store: StoreConfig::default(),
            limits: LimitsConfig::default(),
            node_monitor_grace_period_seconds: 40,
            revision_history_limit: crate::fleet::DEFAULT_REVISION_HISTORY_LIMIT,
            log_level: "info".into(),
            log_format: "text".into(),
            insecure: false,
            tls: TlsConfig::default(),
            protected_label_keys: Vec::new(),
            audit: AuditConfig::default(),
        }
    }
}

/// Admission control of agent connections (`limits`).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Agent connections served; 0: what the open-files limit allows after
    /// a reserve for the API, the store and health checks.
    pub max_connections: usize,
    /// Connections from one source address; 0: no limit (agents behind NAT
    /// share one).
    pub max_connections_per_source: usize,
    /// Open agent sessions; 0: no limit beyond maxConnections.
    pub max_sessions: usize,
    /// The retry hint sent with a refusal (agents add jitter up to as much).
    pub retry_after_seconds: u64,
    /// An agent connection silent this long (no data or keepalive answer)
    /// is dropped, freeing its descriptor and memory (TCP keepalive and
    /// TCP_USER_TIMEOUT; see `daemon::detect_dead_peer`).
    pub dead_peer_seconds: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_connections: 0,
            max_connections_per_source: 0,
            max_sessions: 0,
            retry_after_seconds: 10,
            dead_peer_seconds: nodekeeper_proto::daemon::DEAD_PEER_DEFAULT.as_secs(),
        }
    }
}

impl Default for Listen {
    fn default() -> Self {
        Listen {
            grpc: SocketAddr::from(([0, 0, 0, 0], 7443)),
            http: SocketAddr::from(([127, 0, 0, 1], 7080)),
        }
    }
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            driver: "sqlite".into(),
            path: None,
            max_queued_writes: crate::store::DEFAULT_MAX_QUEUED,
        }
    }
}

impl HubConfig {
    /// Loads and checks the file; `required` when given explicitly.
    pub fn load(path: &Path, required: bool) -> Result<HubConfig, ConfigError> {
        let c: HubConfig = nodekeeper_proto::config::load(path, required)?;
        c.check(path)?;
        Ok(c)
    }

    fn check(&self, path: &Path) -> Result<(), ConfigError> {
        if self.store.driver != "sqlite" {
            return Err(ConfigError::invalid(
                path,
                "store.driver",
                format!("{:?} is not available; only \"sqlite\" is supported", self.store.driver),
            ));
        }
        if !(1..=3600).contains(&self.limits.retry_after_seconds) {
            return Err(ConfigError::invalid(
                path,
                "limits.retryAfterSeconds",
                format!("{} is out of range 1..=3600", self.limits.retry_after_seconds),
            ));
        }
        if !(2..=3600).contains(&self.limits.dead_peer_seconds) {
            return Err(ConfigError::invalid(
                path,
                "limits.deadPeerSeconds",
                format!("{} is out of range 2..=3600", self.limits.dead_peer_seconds),
            ));
        }
        if self.store.max_queued_writes == 0 {
            return Err(ConfigError::invalid(
                path,
                "store.maxQueuedWrites",
                "must be at least 1",
            ));
        }
        nodekeeper_proto::config::check_logging(path, &self.log_level, &self.log_format)?;
        if self.node_monitor_grace_period_seconds == 0 {
            return Err(ConfigError::invalid(
                path,
                "nodeMonitorGracePeriodSeconds",
                "must be at least 1",
            ));
        }
        if !(1..=10_000).contains(&self.revision_history_limit) {
            return Err(ConfigError::invalid(
                path,
                "revisionHistoryLimit",
                format!("{} is out of range 1..=10000", self.revision_history_limit),
            ));
        }
        let t = &self.tls;
        if t.ca_file.is_some() != t.cert_file.is_some() || t.cert_file.is_some() != t.key_file.is_some() {
            return Err(ConfigError::invalid(
                path,
                "tls",
                "caFile, certFile and keyFile are given together (or none, and the hub creates its PKI in stateDir)",
            ));
        }
        if t.ca_key_file.is_some() && t.ca_file.is_none() {
            return Err(ConfigError::invalid(path, "tls.caKeyFile", "needs tls.caFile"));
        }
        if t.node_certificate_ttl < std::time::Duration::from_secs(10) {
            return Err(ConfigError::invalid(
                path,
                "tls.nodeCertificateTtl",
                "must be at least 10s",
            ));
        }
        for (i, k) in self.protected_label_keys.iter().enumerate() {
            if let Err(e) = nodekeeper_proto::validate::label_key(&format!("protectedLabelKeys[{i}]"), k) {
                return Err(ConfigError::invalid(
                    path,
                    &format!("protectedLabelKeys[{i}]"),
                    e.message,
                ));
            }
        }
        if self.audit.max_entries == 0 {
            return Err(ConfigError::invalid(path, "audit.maxEntries", "must be at least 1"));
        }
        if !self.state_dir.is_absolute() {
            return Err(ConfigError::invalid(path, "stateDir", "must be an absolute path"));
        }
        Ok(())
    }

    /// The SQLite file.
    pub fn store_path(&self) -> PathBuf {
        self.store.path.clone().unwrap_or_else(|| self.state_dir.join("hub.db"))
    }
}
