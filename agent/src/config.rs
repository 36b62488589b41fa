//! The agent's configuration file (`/etc/nodekeeper/agent.yaml`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use nodekeeper_proto::config::ConfigError;
use serde::Deserialize;

/// Default path of the configuration file.
pub const DEFAULT_PATH: &str = "/etc/nodekeeper/agent.yaml";

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct AgentConfig {
    /// Default: the hostname.
    pub node_name: Option<String>,
    pub labels: BTreeMap<String, String>,
    /// Absent: standalone mode.
    pub hub: Option<HubLink>,
    pub state_dir: PathBuf,
    pub socket: PathBuf,
    /// Group that may use the socket (mode 0660); skipped if it does not exist.
    pub socket_group: String,
    pub metrics: MetricsConfig,
    pub outbox: OutboxConfig,
    /// Local detectors (the DetectorSet spec schema).
    pub detectors: Detectors,
    /// The converge engine (node components).
    pub converge: ConvergeConfig,
    /// Permits from the hub's defender for disruptive actions.
    pub defender: DefenderConfig,
    /// Self-healing: local RemedyRules and how the actions act.
    pub remedy: RemedyConfig,
    /// Deadlines of the subprocesses the agent starts.
    pub deadlines: crate::exec::Deadlines,
    pub log_level: String,
    /// text or json.
    pub log_format: String,
    /// The file this was read from (for error messages).
    #[serde(skip)]
    pub path: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HubLink {
    /// `https://host:port` of the hub's gRPC listener (`http://` only with
    /// `insecure`).
    pub address: String,
    /// A plaintext, unauthenticated hub (labs only).
    #[serde(default)]
    pub insecure: bool,
    /// The join token (`nkctl token create join`); needed until the node
    /// holds a certificate.
    #[serde(default)]
    pub bootstrap_token: Option<String>,
    /// A file holding the join token instead.
    #[serde(default)]
    pub bootstrap_token_file: Option<PathBuf>,
    /// `sha256:<hex>` of the hub CA's key, checked before anything is sent.
    #[serde(default)]
    pub ca_cert_hash: Option<String>,
    /// The hub CA certificate instead of a pin.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Fraction of the node certificate's lifetime after which it is renewed.
    #[serde(default = "default_renew_fraction")]
    pub renew_fraction: f64,
    /// A hub connection silent this long (no acknowledgement of what was
    /// sent, no keepalive answer) is dropped and dialled again.
    #[serde(default = "default_dead_peer_seconds")]
    pub dead_peer_seconds: u64,
}

fn default_dead_peer_seconds() -> u64 {
    nodekeeper_proto::daemon::DEAD_PEER_DEFAULT.as_secs()
}

fn default_renew_fraction() -> f64 {
    2.0 / 3.0
}

impl HubLink {
    /// The join token, from the config or its file.
    pub fn token(&self, path: &Path) -> Result<Option<String>, ConfigError> {
        let t = match (&self.bootstrap_token, &self.bootstrap_token_file) {
            (Some(t), _) => Some(t.clone()),
            (None, Some(f)) => Some(
                std::fs::read_to_string(f)
                    .map_err(|e| ConfigError::invalid(path, "hub.bootstrapTokenFile", format!("{}: {e}", f.display())))?
                    .trim()
                    .to_string(),
            ),
            (None, None) => None,
        };
        if let Some(t) = &t {
            nodekeeper_proto::token::parse(t).map_err(|e| ConfigError::invalid(path, "hub.bootstrapToken", e))?;
        }
        Ok(t)
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// Optional TCP address for `/metrics` (the socket always serves it).
    pub listen: Option<SocketAddr>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct OutboxConfig {
    /// Reports kept while the hub is unreachable; the oldest are dropped past it.
    pub max_reports: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct Detectors {
    /// Log-monitor rule files (node-problem-detector's format, JSON or YAML).
    pub log_monitors: Vec<PathBuf>,
    /// Also run the rules and checks shipped with the agent (kernel,
    /// containerd, kubelet log rules; kubelet and containerd probes, unit
    /// restarts, resource and hardware checks).
    pub default_rules: bool,
    /// node-problem-detector custom-plugin files (JSON or YAML).
    pub custom_plugin_monitors: Vec<PathBuf>,
    /// Health probes (a probe named like a built-in one replaces it).
    pub probes: Vec<nodekeeper_proto::v1::Probe>,
    /// Resource pressure thresholds (replace the built-in ones).
    pub resources: Option<nodekeeper_proto::v1::ResourceChecks>,
    /// Hardware and system checks (replace the built-in ones).
    pub hardware: Option<nodekeeper_proto::v1::HardwareChecks>,
}

/// What an agent with a hub does when it cannot ask the hub's defender.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Offline {
    /// No disruptive change without a permit (the default).
    #[default]
    Deny,
    /// Go ahead without one (the budgets cannot be checked).
    Allow,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct RemedyConfig {
    /// RemedyRules of this node's own (the hub's rules of the same name win).
    pub rules: Vec<nodekeeper_proto::v1::RemedyRule>,
    /// What a `reboot` step runs.
    pub reboot_command: Vec<String>,
    /// Where the boot id is read (a reboot step is confirmed by a new one).
    pub boot_id_file: PathBuf,
}

impl Default for RemedyConfig {
    fn default() -> Self {
        RemedyConfig {
            rules: Vec::new(),
            reboot_command: vec!["systemctl".into(), "reboot".into()],
            boot_id_file: "/proc/sys/kernel/random/boot_id".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct DefenderConfig {
    /// With the hub unreachable: `deny` (default) or `allow`.
    pub offline: Offline,
    /// The TTL asked for a permit; it is renewed at a third of it.
    pub permit_ttl_seconds: u32,
}

impl Default for DefenderConfig {
    fn default() -> Self {
        DefenderConfig {
            offline: Offline::Deny,
            permit_ttl_seconds: 60,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct ConvergeConfig {
    /// Seconds between reconciles (drift checks); a new desired state starts
    /// one at once.
    pub interval_seconds: u64,
    /// Where component unit files go.
    pub unit_dir: PathBuf,
    /// Root directory for rpm (`rpm --root`); `/` on an rpm host.
    pub rpm_root: PathBuf,
    /// Download attempts per artifact before the change fails.
    pub download_attempts: u32,
    /// Deadline for one artifact's download, all attempts included.
    pub download_timeout_seconds: u64,
    /// Largest artifact downloaded when its spec declares no `size`; a
    /// larger one is cut off while it streams, before it can fill the disk.
    pub max_artifact_bytes: u64,
    /// A step running longer than this is stuck (metric, event, watchdog
    /// pings withheld); 0: each step's budget follows from its deadlines.
    pub stuck_after_seconds: u64,
    /// Standalone mode only: files of Component (and NodeSet) documents the
    /// agent keeps without a hub.
    pub components: Vec<PathBuf>,
    /// ed25519 public keys (minisign's form, or base64/hex) that may sign
    /// artifacts.
    pub trusted_keys: Vec<String>,
    /// Refuse an artifact without a signature by one of `trustedKeys`.
    pub require_signatures: bool,
    /// URL prefixes artifacts may come from (empty: anywhere).
    pub allowed_artifact_urls: Vec<String>,
}

impl Default for ConvergeConfig {
    fn default() -> Self {
        ConvergeConfig {
            interval_seconds: 60,
            unit_dir: PathBuf::from("/etc/systemd/system"),
            rpm_root: PathBuf::from("/"),
            download_attempts: 5,
            download_timeout_seconds: 1800,
            max_artifact_bytes: 4 << 30,
            stuck_after_seconds: 0,
            components: Vec::new(),
            trusted_keys: Vec::new(),
            require_signatures: false,
            allowed_artifact_urls: Vec::new(),
        }
    }
}

impl Default for Detectors {
    fn default() -> Self {
        Detectors {
            log_monitors: Vec::new(),
            custom_plugin_monitors: Vec::new(),
            probes: Vec::new(),
            resources: None,
            hardware: None,
            default_rules: true,
        }
    }
}

impl Default for OutboxConfig {
    fn default() -> Self {
        OutboxConfig { max_reports: 10_000 }
    }
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            node_name: None,
            labels: BTreeMap::new(),
            hub: None,
            state_dir: PathBuf::from("/var/lib/nodekeeper"),
            socket: PathBuf::from("/run/nodekeeper/agent.sock"),
            socket_group: "nodekeeper".into(),
            metrics: MetricsConfig::default(),
            outbox: OutboxConfig::default(),
            detectors: Detectors::default(),
            converge: ConvergeConfig::default(),
            defender: DefenderConfig::default(),
            remedy: RemedyConfig::default(),
            deadlines: crate::exec::Deadlines::default(),
            log_level: "info".into(),
            log_format: "text".into(),
            path: PathBuf::new(),
        }
    }
}

impl AgentConfig {
    /// Loads and checks the file; `required` when given explicitly.
    pub fn load(path: &Path, required: bool) -> Result<AgentConfig, ConfigError> {
        let mut c: AgentConfig = nodekeeper_proto::config::load(path, required)?;
        c.check(path)?;
        c.path = path.to_path_buf();
        Ok(c)
    }

    fn check(&self, path: &Path) -> Result<(), ConfigError> {
        use nodekeeper_proto::validate;
        if let Some(n) = &self.node_name {
            validate::dns_subdomain("nodeName", n).map_err(|e| ConfigError::invalid(path, "nodeName", e.message))?;
        }
        validate::labels("labels", &self.labels).map_err(|e| ConfigError::invalid(path, &e.field, e.message))?;
        for (i, r) in self.remedy.rules.iter().enumerate() {
            let name = r.metadata.as_ref().map(|m| m.name.as_str()).unwrap_or_default();
            validate::dns_subdomain(&format!("remedy.rules[{i}].metadata.name"), name)
                .map_err(|e| ConfigError::invalid(path, &e.field, e.message))?;
            let spec = r.spec.clone().unwrap_or_default();
            nodekeeper_proto::remedy::check(&format!("remedy.rules[{i}].spec"), &spec)
                .map_err(|e| ConfigError::invalid(path, &e.field, e.message))?;
        }
        if self.remedy.reboot_command.is_empty() {
            return Err(ConfigError::invalid(
                path,
                "remedy.rebootCommand",
                "empty: the command a reboot step runs (systemctl reboot)".to_string(),
            ));
        }
        if let Some(h) = &self.hub {
            if !(2..=3600).contains(&h.dead_peer_seconds) {
                return Err(ConfigError::invalid(
                    path,
                    "hub.deadPeerSeconds",
                    format!("{} is out of range 2..=3600", h.dead_peer_seconds),
                ));
            }
            if h.address.starts_with("http://") && !h.insecure {
                return Err(ConfigError::invalid(
                    path,
                    "hub.address",
                    format!(
                        "{:?} is plaintext: the agent refuses an http:// hub (anyone on the path could push code to this node); use https://, or hub.insecure: true for a lab hub",
                        h.address
                    ),
                ));
            }
            if !(h.address.starts_with("http://") || h.address.starts_with("https://")) {
                return Err(ConfigError::invalid(
                    path,
                    "hub.address",
                    format!("{:?} must be a URL like https://hub.example:7443", h.address),
                ));
            }
            if h.address.starts_with("https://") {
                if h.ca_cert_hash.is_none() && h.ca_file.is_none() {
                    return Err(ConfigError::invalid(
                        path,
                        "hub.caCertHash",
                        "an https:// hub needs hub.caCertHash (printed by `nkctl token create join`) or hub.caFile, so the agent knows it talks to its hub",
                    ));
                }
                if let Some(p) = &h.ca_cert_hash {
                    nodekeeper_proto::tls::normalize_pin(p)
                        .map_err(|e| ConfigError::invalid(path, "hub.caCertHash", e.to_string()))?;
                }
                if h.bootstrap_token.is_some() && h.bootstrap_token_file.is_some() {
                    return Err(ConfigError::invalid(
                        path,
                        "hub.bootstrapTokenFile",
                        "give hub.bootstrapToken or hub.bootstrapTokenFile, not both",
                    ));
                }
                if !(h.renew_fraction > 0.05 && h.renew_fraction < 0.95) {
                    return Err(ConfigError::invalid(
                        path,
                        "hub.renewFraction",
                        format!("{} is out of range (0.05, 0.95)", h.renew_fraction),
                    ));
                }
            }
        }
        if !self.state_dir.is_absolute() {
            return Err(ConfigError::invalid(path, "stateDir", "must be an absolute path"));
        }
        if !self.socket.is_absolute() {
            return Err(ConfigError::invalid(path, "socket", "must be an absolute path"));
        }
        if self.outbox.max_reports == 0 {
            return Err(ConfigError::invalid(path, "outbox.maxReports", "must be at least 1"));
        }
        if !(1..=86_400).contains(&self.converge.interval_seconds) {
            return Err(ConfigError::invalid(
                path,
                "converge.intervalSeconds",
                "must be between 1 and 86400",
            ));
        }
        for (key, p) in [
            ("converge.unitDir", &self.converge.unit_dir),
            ("converge.rpmRoot", &self.converge.rpm_root),
        ] {
            if !p.is_absolute() {
                return Err(ConfigError::invalid(path, key, "must be an absolute path"));
            }
        }
        if !self.converge.components.is_empty() && self.hub.is_some() {
            return Err(ConfigError::invalid(
                path,
                "converge.components",
                "local component files are for standalone mode; with a hub, apply the Components there",
            ));
        }
        if !(1..=86_400).contains(&self.converge.download_timeout_seconds) {
            return Err(ConfigError::invalid(
                path,
                "converge.downloadTimeoutSeconds",
                format!("{} is out of range 1..=86400", self.converge.download_timeout_seconds),
            ));
        }
        if let Some(key) = self.deadlines.invalid_key() {
            return Err(ConfigError::invalid(path, key, "must be at least 1"));
        }
        if self.converge.max_artifact_bytes == 0 {
            return Err(ConfigError::invalid(
                path,
                "converge.maxArtifactBytes",
                "must be at least 1",
            ));
        }
        if !(1..=100).contains(&self.converge.download_attempts) {
            return Err(ConfigError::invalid(
                path,
                "converge.downloadAttempts",
                "must be between 1 and 100",
            ));
        }
        for (i, k) in self.converge.trusted_keys.iter().enumerate() {
            crate::converge::component::signature::parse_key(k)
                .map_err(|e| ConfigError::invalid(path, &format!("converge.trustedKeys[{i}]"), e))?;
        }
        if self.converge.require_signatures && self.converge.trusted_keys.is_empty() {
            return Err(ConfigError::invalid(
                path,
                "converge.requireSignatures",
                "needs converge.trustedKeys (the keys artifacts must be signed with)",
            ));
        }
        nodekeeper_proto::config::check_logging(path, &self.log_level, &self.log_format)?;
        Ok(())
    }

    /// The node name: configured, else the hostname (lower-cased).
    pub fn node_name(&self) -> String {
        self.node_name
            .clone()
            .unwrap_or_else(|| crate::detect::facts::hostname().to_ascii_lowercase())
    }
}
