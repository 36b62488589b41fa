//! The agent's identity towards the hub (kubelet TLS bootstrap): on first
//! start the agent checks the hub's CA against `hub.caCertHash` before it
//! sends anything, creates its key, sends a certificate request with its
//! bootstrap token, and keeps the node certificate (`node.crt`, `node.key`
//! 0600) and the hub CA (`ca.crt`) in its state directory. Later starts use
//! the certificate; it is renewed over the authenticated link at a fraction
//! of its lifetime (two thirds by default). Hollow agents keep theirs in
//! memory.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use nodekeeper_proto::tls::{self, CertFacts, Trust};
use nodekeeper_proto::v1::agent_link_client::AgentLinkClient;
use nodekeeper_proto::v1::{JoinRequest, RenewRequest};
use rustls::ClientConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tonic::transport::{Channel, Endpoint, Uri};

/// How an agent proves who it is.
#[derive(Debug, Clone)]
pub struct IdentityConfig {
    pub node: String,
    /// Where node.crt, node.key and ca.crt live; `None`: memory only.
    pub dir: Option<PathBuf>,
    pub bootstrap_token: Option<String>,
    pub ca_cert_hash: Option<String>,
    pub ca_file: Option<PathBuf>,
    /// Fraction of a certificate's lifetime after which it is renewed.
    pub renew_fraction: f64,
}

#[derive(Default)]
struct Held {
    key_pem: Option<String>,
    cert: Option<(String, CertFacts)>,
    ca: Option<Vec<CertificateDer<'static>>>,
    /// Built once per identity, so TLS sessions are resumed across reconnects.
    config: Option<Arc<ClientConfig>>,
}

/// Credentials and the TLS connector of one agent.
pub struct Credentials {
    cfg: IdentityConfig,
    server_name: ServerName<'static>,
    held: Mutex<Held>,
}

/// Why joining failed: `Refused` needs an operator, the rest is transient.
#[derive(Debug)]
pub enum JoinError {
    Refused(String),
    Unreachable(String),
}

/// Writes a file atomically with its mode, owned by the agent (the
/// converge engine's write: temp, fsync, rename, fsync of the directory).
fn write_file(path: &Path, text: &str, secret: bool) -> std::io::Result<()> {
    let owner = crate::converge::component::files::Owner {
        uid: nix::unistd::getuid().as_raw(),
        gid: nix::unistd::getgid().as_raw(),
    };
    crate::converge::component::files::write_atomic(path, text.as_bytes(), if secret { 0o600 } else { 0o644 }, owner)
}

impl Credentials {
    /// Reads what the state directory holds.
    pub fn new(cfg: IdentityConfig, address: &str) -> Result<Credentials, String> {
        let server_name = tls::server_name_of(address).map_err(|e| format!("hub.address: {e}"))?;
        let mut held = Held::default();
        if let Some(dir) = &cfg.dir {
            let (crt, key, ca) = (dir.join("node.crt"), dir.join("node.key"), dir.join("ca.crt"));
            if key.exists() {
                held.key_pem = Some(std::fs::read_to_string(&key).map_err(|e| format!("{}: {e}", key.display()))?);
            }
            if crt.exists() {
                let pem = std::fs::read_to_string(&crt).map_err(|e| format!("{}: {e}", crt.display()))?;
                let der = tls::certs_from_pem(pem.as_bytes()).map_err(|e| format!("{}: {e}", crt.display()))?;
                let facts = tls::cert_facts(&der[0]).map_err(|e| format!("{}: {e}", crt.display()))?;
                held.cert = Some((pem, facts));
            }
            if ca.exists() {
                held.ca = Some(tls::read_certs(&ca).map_err(|e| e.to_string())?);
            }
        }
        if held.ca.is_none()
            && let Some(f) = &cfg.ca_file
        {
            held.ca = Some(tls::read_certs(f).map_err(|e| format!("hub.caFile: {e}"))?);
        }
        Ok(Credentials {
            cfg,
            server_name,
            held: Mutex::new(held),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Held> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The current certificate's facts, if one is held.
    pub fn certificate(&self) -> Option<CertFacts> {
        self.lock().cert.as_ref().map(|(_, f)| f.clone())
    }

    /// Whether a certificate is held that is valid now.
    pub fn usable(&self) -> bool {
        let now = SystemTime::now();
        self.certificate()
            .is_some_and(|f| f.not_after > now && f.common_name == self.cfg.node)
    }

    /// Forgets the certificate (the hub refused it): the next attempt joins
    /// again with the bootstrap token, keeping the key.
    pub fn invalidate(&self) {
        let mut h = self.lock();
        h.cert = None;
        h.config = None;
    }

    /// When the current certificate should be renewed.
    pub fn renew_at(&self) -> Option<SystemTime> {
        let f = self.certificate()?;
        Some(f.not_before + f.lifetime().mul_f64(self.cfg.renew_fraction))
    }

    fn trust(&self) -> Result<Trust, String> {
        if let Some(ca) = self.lock().ca.clone() {
            return Ok(Trust::Roots(ca));
        }
        match &self.cfg.ca_cert_hash {
            Some(pin) => Ok(Trust::Pin(pin.clone())),
            None => Err(
                "no hub CA to trust: set hub.caCertHash (printed by `nkctl token create join`) or hub.caFile".into(),
            ),
        }
    }

    fn key(&self) -> Result<String, String> {
        let mut h = self.lock();
        if let Some(k) = &h.key_pem {
            return Ok(k.clone());
        }
        let key = rcgen::KeyPair::generate().map_err(|e| format!("creating the node key: {e}"))?;
        let pem = key.serialize_pem();
        if let Some(dir) = &self.cfg.dir {
            let path = dir.join("node.key");
            write_file(&path, &pem, true).map_err(|e| format!("{}: {e}", path.display()))?;
        }
        h.key_pem = Some(pem.clone());
        Ok(pem)
    }

    fn csr(&self) -> Result<Vec<u8>, String> {
        let key = rcgen::KeyPair::from_pem(&self.key()?).map_err(|e| format!("node.key: {e}"))?;
        let mut p = rcgen::CertificateParams::default();
        let mut dn = rcgen::DistinguishedName::new();
        dn.push(rcgen::DnType::CommonName, self.cfg.node.clone());
        p.distinguished_name = dn;
        let csr = p
            .serialize_request(&key)
            .map_err(|e| format!("certificate request: {e}"))?;
        Ok(csr.der().to_vec())
    }

    /// The client configuration: trusting the hub CA, presenting the node
    /// certificate when one is held.
    fn config(&self, with_identity: bool) -> Result<(Arc<ClientConfig>, Option<tls::PinnedCa>), String> {
        if with_identity && let Some(c) = self.lock().config.clone() {
            return Ok((c, None));
        }
        let identity = if with_identity {
            let h = self.lock();
            let (pem, _) = h.cert.clone().ok_or("no node certificate")?;
            let key = h.key_pem.clone().ok_or("no node key")?;
            drop(h);
            let chain = tls::certs_from_pem(pem.as_bytes())?;
            let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).map_err(|e| format!("node.key: {e}"))?;
            Some((chain, key))
        } else {
            None
        };
        let (config, pinned) = tls::client_config(self.trust()?, identity, &[b"h2"]).map_err(|e| e.to_string())?;
        let config = Arc::new(config);
        if with_identity {
            self.lock().config = Some(config.clone());
        }
        Ok((config, pinned))
    }

    /// A channel to the hub over TLS, presenting the node certificate
    /// (`with_identity`) or none (to join).
    pub async fn channel(
        &self,
        endpoint: &Endpoint,
        with_identity: bool,
        dead_peer: std::time::Duration,
    ) -> Result<(Channel, Option<tls::PinnedCa>), String> {
        let (config, pinned) = self.config(with_identity)?;
        let name = self.server_name.clone();
        let connector = tower::service_fn(move |uri: Uri| {
            let (config, name) = (config.clone(), name.clone());
            async move {
                let tcp = super::tcp(&uri, dead_peer).await?;
                let tls = tokio_rustls::TlsConnector::from(config).connect(name, tcp).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
            }
        });
        let channel = endpoint
            .connect_with_connector(connector)
            .await
            .map_err(|e| format!("connect: {}", error_chain(&e)))?;
        Ok((channel, pinned))
    }

    /// Joins with the bootstrap token (the hub's CA is checked against the
    /// pin during the handshake, before the token is sent).
    pub async fn join(&self, endpoint: &Endpoint, dead_peer: std::time::Duration) -> Result<(), JoinError> {
        let token = self.cfg.bootstrap_token.clone().ok_or_else(|| {
            JoinError::Refused(
                "no valid node certificate and no bootstrap token: set hub.bootstrapToken (or hub.bootstrapTokenFile) from `nkctl token create join`".into(),
            )
        })?;
        let csr = self.csr().map_err(JoinError::Refused)?;
        let (channel, pinned) = self.channel(endpoint, false, dead_peer).await.map_err(|e| {
            if e.contains("caCertHash") || e.contains("certificate") {
                JoinError::Refused(e)
            } else {
                JoinError::Unreachable(e)
            }
        })?;
        let resp = AgentLinkClient::new(channel)
            .join(JoinRequest { token, csr })
            .await
            .map_err(|s| match s.code() {
                tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled => {
                    JoinError::Unreachable(format!("join: {}", s.message()))
                }
                _ => JoinError::Refused(format!("the hub refused to join this node: {}", s.message())),
            })?
            .into_inner();
        // The CA the answer names must be the one the handshake trusted.
        let ca = tls::certs_from_pem(resp.ca_pem.as_bytes()).map_err(JoinError::Refused)?;
        if let Some(p) = pinned.and_then(|p| p.get())
            && !ca.contains(&p)
        {
            return Err(JoinError::Refused(
                "the hub answered with a CA other than the pinned one".into(),
            ));
        }
        self.store(&resp.certificate_pem, Some(&resp.ca_pem))
            .map_err(JoinError::Refused)?;
        tracing::info!(node = %self.cfg.node, "joined the hub; node certificate stored");
        Ok(())
    }

    /// Renews the certificate over an authenticated channel.
    pub async fn renew(&self, channel: Channel) -> Result<(), String> {
        let csr = self.csr()?;
        let resp = AgentLinkClient::new(channel)
            .renew(RenewRequest { csr })
            .await
            .map_err(|s| format!("renewal refused: {}", s.message()))?
            .into_inner();
        self.store(&resp.certificate_pem, None)?;
        tracing::info!(node = %self.cfg.node, renew_at = ?self.renew_at(), "node certificate renewed");
        Ok(())
    }

    fn store(&self, cert_pem: &str, ca_pem: Option<&str>) -> Result<(), String> {
        let der = tls::certs_from_pem(cert_pem.as_bytes())?;
        let facts = tls::cert_facts(&der[0]).map_err(|e| e.to_string())?;
        if facts.common_name != self.cfg.node {
            return Err(format!(
                "the hub issued a certificate for {:?}, not {:?}",
                facts.common_name, self.cfg.node
            ));
        }
        if let Some(dir) = &self.cfg.dir {
            if let Some(ca) = ca_pem {
                let p = dir.join("ca.crt");
                write_file(&p, ca, false).map_err(|e| format!("{}: {e}", p.display()))?;
            }
            let p = dir.join("node.crt");
            write_file(&p, cert_pem, false).map_err(|e| format!("{}: {e}", p.display()))?;
        }
        let mut h = self.lock();
        if let Some(ca) = ca_pem {
            h.ca = Some(tls::certs_from_pem(ca.as_bytes())?);
        }
        h.cert = Some((cert_pem.to_string(), facts));
        h.config = None;
        Ok(())
    }
}

/// Renews the certificate whenever it is due, over `channel`, until the
/// task is dropped; failures are retried after a tenth of the time left
/// (at least 5 s, at most a minute).
pub async fn renewer(creds: Arc<Credentials>, channel: Channel) {
    loop {
        let Some(at) = creds.renew_at() else { return };
        if let Ok(wait) = at.duration_since(SystemTime::now()) {
            tokio::time::sleep(wait).await;
        }
        if let Err(e) = creds.renew(channel.clone()).await {
            let left = creds
                .certificate()
                .and_then(|f| f.not_after.duration_since(SystemTime::now()).ok())
                .unwrap_or_default();
            let pause = (left / 10).clamp(Duration::from_secs(5), Duration::from_secs(60));
            tracing::warn!(error = %e, retry_in = ?pause, "certificate renewal failed");
            tokio::time::sleep(pause).await;
        }
    }
}

/// A transport error with its causes (rustls' reason is several levels down).
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
