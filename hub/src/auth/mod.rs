//! Who may do what. Nodes are known by certificates the hub's CA signed
//! after they joined with a bootstrap token (kubelet TLS bootstrap); a node
//! speaks only for itself (NodeRestriction); operators present bearer tokens
//! with a role; every mutation and refusal goes to the audit log. Tokens and
//! node identities are small records in the store, held in memory.

pub mod audit;
pub mod pki;
pub mod tokens;

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use nodekeeper_proto::time::{now_rfc3339, parse_rfc3339, rfc3339};
use nodekeeper_proto::tls::CertFacts;
use serde::{Deserialize, Serialize};

use crate::config::HubConfig;
use crate::store::{Store, Write};
use audit::{AuditEntry, Log, Query, Record};
use pki::Pki;
use tokens::{Role, Token, TokenError, TokenType};

const RECORD_TOKEN: &str = "token";
const RECORD_IDENTITY: &str = "identity";

/// Who is asking, once authenticated.
#[derive(Debug, Clone)]
pub struct Principal {
    /// The audit log's actor.
    pub name: String,
    pub role: Role,
}

/// A node's identity: the key it joined with and the certificates the hub
/// issued for it (the current one and, after a renewal, the previous one).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Identity {
    pub node: String,
    pub key_sha256: String,
    pub serials: Vec<String>,
    /// Expiry of the newest certificate (RFC 3339).
    pub not_after: String,
    #[serde(default)]
    pub revoked: bool,
    pub joined: String,
    /// The join token's id.
    pub token: String,
    /// The join token's labels (trusted).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// Why a join, renewal or session is refused (each maps to a gRPC code).
#[derive(Debug, Clone, thiserror::Error)]
pub enum Refusal {
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Unavailable(String),
}

impl From<TokenError> for Refusal {
    fn from(e: TokenError) -> Refusal {
        Refusal::Unauthenticated(e.to_string())
    }
}

/// A token request (`POST /v1/tokens`).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TokenRequest {
    #[serde(rename = "type")]
    pub kind: TokenType,
    /// humantime (`24h`); join tokens default to 24h, API tokens to never.
    #[serde(default)]
    pub ttl: Option<String>,
    #[serde(default)]
    pub uses: u64,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub role: Option<String>,
    #[serde(default)]
    pub name: String,
}

struct State {
    tokens: BTreeMap<String, Token>,
    identities: HashMap<String, Identity>,
    log: Log,
    /// When a failed TLS handshake was last audited, by source, listener and
    /// what went wrong (a scanner must not flood the log).
    handshake_audited: HashMap<(IpAddr, String, String), Instant>,
}

/// The hub's authentication and audit state.
pub struct Auth {
    /// `None` with `insecure: true`.
    pub pki: Option<Pki>,
    state: Mutex<State>,
    store: Store,
    protected: Vec<String>,
    retention: Duration,
    max_entries: usize,
}

/// Labels only tokens and operators may set.
pub const PROTECTED_PREFIX: &str = "nodekeeper.io/";

impl Auth {
    /// Loads tokens, identities and the audit log; creates the PKI unless
    /// insecure, and an admin token (written to `stateDir/admin.token`)
    /// when no admin token exists.
    pub fn new(
        cfg: &HubConfig,
        store: Store,
        records: Vec<(String, String, String)>,
        audit_rows: Vec<(u64, String)>,
    ) -> anyhow::Result<Arc<Auth>> {
        let pki = if cfg.insecure {
            None
        } else {
            Some(Pki::load_or_create(&cfg.tls, &cfg.state_dir)?)
        };
        let mut tokens = BTreeMap::new();
        let mut identities = HashMap::new();
        for (kind, key, body) in records {
            match kind.as_str() {
                RECORD_TOKEN => match serde_json::from_str::<Token>(&body) {
                    Ok(t) => {
                        tokens.insert(key, t);
                    }
                    Err(e) => tracing::error!(token = %key, error = %e, "stored token does not parse; it is ignored"),
                },
                RECORD_IDENTITY => match serde_json::from_str::<Identity>(&body) {
                    Ok(i) => {
                        identities.insert(key, i);
                    }
                    Err(e) => {
                        tracing::error!(node = %key, error = %e, "stored node identity does not parse; the node must join again")
                    }
                },
                _ => {}
            }
        }
        let auth = Arc::new(Auth {
            pki,
            state: Mutex::new(State {
                tokens,
                identities,
                log: Log::load(audit_rows),
                handshake_audited: HashMap::new(),
            }),
            store,
            protected: cfg.protected_label_keys.clone(),
            retention: cfg.audit.retention,
            max_entries: cfg.audit.max_entries,
        });
        if cfg.insecure {
            tracing::warn!(
                "insecure: true — plaintext listeners and NO authentication: anyone who can reach the hub can register nodes and push code to them; for labs and throwaway tests only"
            );
        } else {
            auth.ensure_admin_token(&cfg.state_dir)?;
        }
        Ok(auth)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn insecure(&self) -> bool {
        self.pki.is_none()
    }

    fn ensure_admin_token(&self, state_dir: &Path) -> anyhow::Result<()> {
        let path = state_dir.join("admin.token");
        if self.lock().tokens.values().any(|t| t.role == Some(Role::Admin)) {
            return Ok(());
        }
        let (text, mut t) = tokens::generate(TokenType::Api, None, "hub");
        t.name = "admin".into();
        t.role = Some(Role::Admin);
        t.description = "created at the hub's first start".into();
        self.store
            .commit_blocking(vec![token_write(&t)])
            .map_err(anyhow::Error::msg)?;
        self.lock().tokens.insert(t.id.clone(), t);
        pki::write_file(&path, &format!("{text}\n"), true)?;
        tracing::info!(path = %path.display(), "wrote the admin API token; use it with nkctl --token or NODEKEEPER_TOKEN");
        Ok(())
    }

    /// An operator API request's principal from its Authorization header.
    pub fn authenticate(&self, header: Option<&str>) -> Result<Principal, String> {
        if self.insecure() {
            return Ok(Principal {
                name: "anonymous".into(),
                role: Role::Admin,
            });
        }
        let h = header.ok_or(
            "no Authorization header; send `Authorization: Bearer <token>` (nkctl --token or NODEKEEPER_TOKEN)",
        )?;
        let presented = h
            .strip_prefix("Bearer ")
            .or_else(|| h.strip_prefix("bearer "))
            .ok_or("the Authorization header is not `Bearer <token>`")?;
        let (id, secret) = tokens::split(presented).map_err(|e| e.to_string())?;
        let st = self.lock();
        let t = st
            .tokens
            .get(id)
            .ok_or_else(|| TokenError::Unknown(id.into()).to_string())?;
        t.check(secret, TokenType::Api, SystemTime::now())
            .map_err(|e| e.to_string())?;
        Ok(Principal {
            name: if t.name.is_empty() {
                format!("token:{}", t.id)
            } else {
                t.name.clone()
            },
            role: t.role.unwrap_or(Role::Viewer),
        })
    }

    /// Creates a token; returns its string (shown once) and stored form.
    pub async fn create_token(&self, req: TokenRequest, by: &str) -> Result<(String, Token), String> {
        let ttl = match req.ttl.as_deref().filter(|s| !s.is_empty()) {
            Some(s) => Some(humantime::parse_duration(s).map_err(|e| format!("ttl {s:?}: {e} (e.g. 24h)"))?),
            None if req.kind == TokenType::Join => Some(Duration::from_secs(24 * 3600)),
            None => None,
        };
        let (text, mut t) = tokens::generate(req.kind, ttl, by);
        t.description = req.description;
        match req.kind {
            TokenType::Join => {
                if req.role.is_some() || !req.name.is_empty() {
                    return Err("role and name are for API tokens; a join token has labels and a description".into());
                }
                nodekeeper_proto::validate::labels("labels", &req.labels).map_err(|e| e.to_string())?;
                t.labels = req.labels;
                t.max_uses = req.uses;
            }
            TokenType::Api => {
                if !req.labels.is_empty() || req.uses > 0 {
                    return Err("labels and uses are for join tokens".into());
                }
                let role = req
                    .role
                    .as_deref()
                    .ok_or("an API token needs a role: viewer, operator or admin")?;
                t.role = Some(Role::parse(role)?);
                if req.name.is_empty() {
                    return Err("an API token needs a name (the audit log's actor)".into());
                }
                nodekeeper_proto::validate::dns_subdomain("name", &req.name).map_err(|e| e.to_string())?;
                t.name = req.name;
            }
        }
        self.store.commit(vec![token_write(&t)]).await?;
        self.lock().tokens.insert(t.id.clone(), t.clone());
        Ok((text, t))
    }

    pub fn tokens(&self) -> Vec<serde_json::Value> {
        self.lock().tokens.values().map(Token::view).collect()
    }

    pub async fn delete_token(&self, id: &str) -> Result<Option<Token>, String> {
        if !self.lock().tokens.contains_key(id) {
            return Ok(None);
        }
        self.store
            .commit(vec![Write::DeleteRecord {
                kind: RECORD_TOKEN,
                key: id.into(),
            }])
            .await?;
        Ok(self.lock().tokens.remove(id))
    }

    /// The CA pin agents use to join.
    pub fn ca_pin(&self) -> String {
        self.pki.as_ref().map(|p| p.ca_pin.clone()).unwrap_or_default()
    }

    /// Joins a node: checks the token, signs the request, records the
    /// identity (durably, before answering) and counts the use.
    pub async fn join(&self, presented: &str, csr: &[u8]) -> Result<(Identity, String, String), Refusal> {
        let pki = self
            .pki
            .as_ref()
            .ok_or_else(|| Refusal::Invalid("this hub is insecure; agents connect without joining".into()))?;
        let (id, secret) = tokens::split(presented)?;
        {
            let st = self.lock();
            let t = st.tokens.get(id).ok_or_else(|| TokenError::Unknown(id.into()))?;
            t.check(secret, TokenType::Join, SystemTime::now())?;
        }
        let issued = pki.issue(csr).map_err(Refusal::Invalid)?;
        let name = issued.facts.common_name.clone();
        let (identity, token) = {
            let mut st = self.lock();
            // Checked again under the lock: another join may have used the
            // last use meanwhile.
            let t = st.tokens.get(id).ok_or_else(|| TokenError::Unknown(id.into()))?;
            t.check(secret, TokenType::Join, SystemTime::now())?;
            if let Some(known) = st.identities.get(&name)
                && !known.revoked
                && known.key_sha256 != issued.facts.spki_sha256
            {
                return Err(Refusal::AlreadyExists(format!(
                    "node {name:?} already joined with another key; an operator must delete it (nkctl delete node {name}) or revoke it (nkctl node revoke {name}) before another machine may take the name"
                )));
            }
            let labels = t.labels.clone();
            let t = st.tokens.get_mut(id).ok_or_else(|| TokenError::Unknown(id.into()))?;
            t.uses += 1;
            let token = t.clone();
            let identity = Identity {
                node: name.clone(),
                key_sha256: issued.facts.spki_sha256.clone(),
                serials: vec![issued.facts.serial.clone()],
                not_after: rfc3339(issued.facts.not_after),
                revoked: false,
                joined: now_rfc3339(),
                token: id.into(),
                labels,
            };
            st.identities.insert(name.clone(), identity.clone());
            (identity, token)
        };
        if let Err(e) = self
            .store
            .commit(vec![identity_write(&identity), token_write(&token)])
            .await
        {
            let mut st = self.lock();
            if let Some(t) = st.tokens.get_mut(id) {
                t.uses = t.uses.saturating_sub(1);
            }
            st.identities.remove(&name);
            return Err(Refusal::Unavailable(e));
        }
        Ok((identity, issued.pem, pki.ca_pem.clone()))
    }

    /// A fresh certificate for an authenticated node's same key.
    pub async fn renew(&self, peer: &CertFacts, csr: &[u8]) -> Result<(String, String), Refusal> {
        let pki = self
            .pki
            .as_ref()
            .ok_or_else(|| Refusal::Invalid("this hub is insecure".into()))?;
        self.session_identity(peer)?;
        let issued = pki.issue(csr).map_err(Refusal::Invalid)?;
        if issued.facts.common_name != peer.common_name || issued.facts.spki_sha256 != peer.spki_sha256 {
            return Err(Refusal::PermissionDenied(format!(
                "node {} may renew only its own certificate for its own key",
                peer.common_name
            )));
        }
        let identity = {
            let mut st = self.lock();
            let i = st
                .identities
                .get_mut(&peer.common_name)
                .ok_or_else(|| Refusal::Unauthenticated("identity vanished".into()))?;
            let mut serials = vec![issued.facts.serial.clone(), peer.serial.clone()];
            serials.dedup();
            i.serials = serials;
            i.not_after = rfc3339(issued.facts.not_after);
            i.clone()
        };
        self.store
            .commit(vec![identity_write(&identity)])
            .await
            .map_err(Refusal::Unavailable)?;
        Ok((issued.pem, pki.ca_pem.clone()))
    }

    /// The identity a client certificate proves, if it is still valid.
    pub fn session_identity(&self, peer: &CertFacts) -> Result<Identity, Refusal> {
        let st = self.lock();
        let name = &peer.common_name;
        let i = st.identities.get(name).ok_or_else(|| {
            Refusal::Unauthenticated(format!(
                "node {name:?} has no identity on this hub (deleted); join again with a new token"
            ))
        })?;
        if i.revoked {
            return Err(Refusal::Unauthenticated(format!(
                "node {name:?} was revoked; join again with a new token"
            )));
        }
        if !i.serials.contains(&peer.serial) || i.key_sha256 != peer.spki_sha256 {
            return Err(Refusal::Unauthenticated(format!(
                "this certificate of node {name:?} is no longer valid (replaced or revoked); join again with a new token"
            )));
        }
        Ok(i.clone())
    }

    /// Expiry of a node's newest certificate.
    pub fn not_after(&self, node: &str) -> Option<SystemTime> {
        let st = self.lock();
        let i = st.identities.get(node)?;
        if i.revoked {
            return Some(SystemTime::UNIX_EPOCH);
        }
        parse_rfc3339(&i.not_after)
    }

    /// Revokes a node's certificates; `false` when it has no identity.
    pub async fn revoke(&self, node: &str) -> Result<bool, String> {
        let i = {
            let mut st = self.lock();
            let Some(i) = st.identities.get_mut(node) else {
                return Ok(false);
            };
            i.revoked = true;
            i.serials.clear();
            i.clone()
        };
        self.store.commit(vec![identity_write(&i)]).await?;
        Ok(true)
    }

    /// Forgets a deleted node's identity (another key may join as it).
    pub fn forget(&self, node: &str) {
        if self.lock().identities.remove(node).is_some() {
            self.store.submit(
                vec![Write::DeleteRecord {
                    kind: RECORD_IDENTITY,
                    key: node.into(),
                }],
                None,
            );
        }
    }

    /// Whether an agent may set label `key` itself.
    pub fn protected(&self, key: &str) -> bool {
        key.starts_with(PROTECTED_PREFIX) || self.protected.iter().any(|k| k == key)
    }

    /// The protected keys configured beside `nodekeeper.io/`.
    pub fn protected_keys(&self) -> Vec<String> {
        self.protected.clone()
    }

    /// Appends to the audit log.
    pub fn record(&self, r: Record) -> AuditEntry {
        let (e, body) = self.lock().log.append(r, SystemTime::now());
        self.store.submit(vec![Write::AppendAudit { id: e.id, body }], None);
        e
    }

    /// Audits a failed TLS handshake, at most once per source, listener and
    /// kind of failure per minute: a scanner must not flood the log, and a
    /// plaintext client must not hide an agent that refused the hub's
    /// certificate from the same address a moment later.
    pub fn record_handshake_failure(&self, source: Option<std::net::SocketAddr>, listener: &str, why: &str) {
        let now = Instant::now();
        if let Some(ip) = source.map(|s| s.ip()) {
            let key = (ip, listener.to_string(), why.to_string());
            let mut st = self.lock();
            if st
                .handshake_audited
                .get(&key)
                .is_some_and(|t| now.duration_since(*t) < Duration::from_secs(60))
            {
                return;
            }
            if st.handshake_audited.len() > 10_000 {
                st.handshake_audited.clear();
            }
            st.handshake_audited.insert(key, now);
        }
        self.record(
            Record::new("unauthenticated", "tls.handshake", listener)
                .refused(why)
                .source(source.map(|s| s.to_string()).unwrap_or_default()),
        );
    }

    pub fn audit(&self, q: &Query) -> (Vec<AuditEntry>, bool) {
        self.lock().log.query(q)
    }

    /// Applies retention (called from the hub's ticker).
    pub fn prune_audit(&self) {
        let through = self
            .lock()
            .log
            .prune(SystemTime::now(), self.retention, self.max_entries);
        if let Some(through) = through {
            self.store.submit(vec![Write::PruneAudit { through }], None);
        }
    }
}

fn token_write(t: &Token) -> Write {
    Write::PutRecord {
        kind: RECORD_TOKEN,
        key: t.id.clone(),
        body: serde_json::to_string(t).unwrap_or_default(),
    }
}

fn identity_write(i: &Identity) -> Write {
    Write::PutRecord {
        kind: RECORD_IDENTITY,
        key: i.node.clone(),
        body: serde_json::to_string(i).unwrap_or_default(),
    }
}
