//! The hub's PKI: its CA and serving certificate (created in `stateDir` on
//! first start, or read from the files `tls.*` names), the rustls server
//! configurations of the two listeners, and node certificates signed from
//! agents' requests. rcgen issues, rustls verifies; no home-made crypto.

use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use nodekeeper_proto::tls::{self, CertFacts};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::pki_types::{CertificateDer, CertificateSigningRequestDer, PrivateKeyDer};
use rustls::server::{ServerConfig, ServerSessionMemoryCache, WebPkiClientVerifier};

use crate::config::TlsConfig;

/// Errors setting up the PKI; they name the file and what to do.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("creating the hub PKI: {0}")]
    Issue(String),
}

/// A node certificate just signed.
pub struct Issued {
    pub pem: String,
    pub facts: CertFacts,
}

/// The CA, the serving identity and the server configurations.
pub struct Pki {
    pub ca_pem: String,
    /// `sha256:<hex>` of the CA key: what agents pin (`hub.caCertHash`).
    pub ca_pin: String,
    /// Signs node certificates; `None` when the CA's key is not available.
    issuer: Option<Issuer<'static, KeyPair>>,
    /// The agent listener: TLS 1.3, client certificates optional at the
    /// handshake (joining has none) and required by every call but Join.
    pub grpc: Arc<ServerConfig>,
    /// The operator API: TLS 1.3, bearer tokens instead of certificates.
    pub http: Arc<ServerConfig>,
    node_ttl: Duration,
}

const CA_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
const SERVING_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);

fn file_err(path: &Path, reason: impl std::fmt::Display) -> PkiError {
    PkiError::File {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

fn issue_err(e: impl std::fmt::Display) -> PkiError {
    PkiError::Issue(e.to_string())
}

/// Writes a file readable by its owner only when `secret`, atomically.
pub(crate) fn write_file(path: &Path, text: &str, secret: bool) -> Result<(), PkiError> {
    let tmp = path.with_extension("tmp");
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true)
        .create(true)
        .truncate(true)
        .mode(if secret { 0o600 } else { 0o644 });
    let mut f = opts.open(&tmp).map_err(|e| file_err(&tmp, e))?;
    std::io::Write::write_all(&mut f, text.as_bytes()).map_err(|e| file_err(&tmp, e))?;
    f.sync_all().map_err(|e| file_err(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| file_err(path, e))
}

fn offset(t: SystemTime) -> time::OffsetDateTime {
    let secs = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_secs() as i64;
    time::OffsetDateTime::from_unix_timestamp(secs).unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

fn serial() -> SerialNumber {
    let mut b: [u8; 16] = rand::random();
    b[0] &= 0x7f; // positive
    SerialNumber::from_slice(&b)
}

fn validity(p: &mut CertificateParams, lifetime: Duration) {
    let now = SystemTime::now();
    // A little slack for clocks a few minutes behind.
    p.not_before = offset(now - Duration::from_secs(300));
    p.not_after = offset(now + lifetime);
    p.serial_number = Some(serial());
}

/// Names of the created serving certificate.
fn server_names(cfg: &TlsConfig) -> Vec<SanType> {
    let mut names: Vec<String> = vec!["localhost".into(), "127.0.0.1".into(), "::1".into()];
    if let Ok(h) = nix::unistd::gethostname()
        && let Some(h) = h.to_str()
    {
        names.push(h.to_string());
    }
    names.extend(cfg.server_names.iter().cloned());
    names.sort();
    names.dedup();
    names
        .into_iter()
        .filter_map(|n| match n.parse::<std::net::IpAddr>() {
            Ok(ip) => Some(SanType::IpAddress(ip)),
            Err(_) => n.clone().try_into().ok().map(SanType::DnsName),
        })
        .collect()
}

impl Pki {
    /// Reads the PKI from the configured files, or from `state_dir`,
    /// creating what is missing there (a CA on first start; a serving
    /// certificate when none exists or a third of its life is left).
    pub fn load_or_create(cfg: &TlsConfig, state_dir: &Path) -> Result<Pki, PkiError> {
        let (ca_der, ca_key, chain, key) = match (&cfg.ca_file, &cfg.cert_file, &cfg.key_file) {
            (Some(ca), Some(cert), Some(key)) => {
                let ca_der = tls::read_certs(ca)?.remove(0);
                let ca_key = match &cfg.ca_key_file {
                    Some(p) => Some(read_key_pair(p)?),
                    None => None,
                };
                let chain = tls::read_certs(cert)?;
                (ca_der, ca_key, chain, tls::read_key(key)?)
            }
            _ => Self::managed(cfg, state_dir)?,
        };
        let ca_pem = pem::encode(&pem::Pem::new("CERTIFICATE", ca_der.to_vec()));
        let ca_pin = tls::spki_pin(&ca_der)?;
        let issuer = match ca_key {
            Some(k) => Some(Issuer::from_ca_cert_der(&ca_der, k).map_err(issue_err)?),
            None => None,
        };
        let mut chain = chain;
        if !chain.iter().any(|c| c == &ca_der) {
            // Agents find the CA they pin in the chain the hub presents.
            chain.push(ca_der.clone());
        }
        let provider = tls::provider();
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(ca_der.clone())
            .map_err(|e| PkiError::Issue(format!("CA: {e}")))?;
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .allow_unauthenticated()
            .build()
            .map_err(|e| PkiError::Issue(format!("client verifier: {e}")))?;
        let mut grpc = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(tls::VERSIONS)
            .map_err(issue_err)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(|e| PkiError::Issue(format!("serving certificate and key do not match: {e}")))?;
        grpc.alpn_protocols = vec![b"h2".to_vec()];
        // Stateful resumption: an agent that reconnects to this hub process
        // skips the certificate exchange and signatures.
        grpc.session_storage = if cfg.session_cache > 0 {
            ServerSessionMemoryCache::new(cfg.session_cache)
        } else {
            Arc::new(rustls::server::NoServerSessionStorage {})
        };
        grpc.send_tls13_tickets = if cfg.session_cache > 0 { 1 } else { 0 };
        let mut http = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(tls::VERSIONS)
            .map_err(issue_err)?
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .map_err(|e| PkiError::Issue(format!("serving certificate and key do not match: {e}")))?;
        http.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Pki {
            ca_pem,
            ca_pin,
            issuer,
            grpc: Arc::new(grpc),
            http: Arc::new(http),
            node_ttl: cfg.node_certificate_ttl,
        })
    }

    /// The PKI kept in `state_dir`.
    #[allow(clippy::type_complexity)]
    fn managed(
        cfg: &TlsConfig,
        dir: &Path,
    ) -> Result<
        (
            CertificateDer<'static>,
            Option<KeyPair>,
            Vec<CertificateDer<'static>>,
            PrivateKeyDer<'static>,
        ),
        PkiError,
    > {
        let (ca_crt, ca_key) = (dir.join("ca.crt"), dir.join("ca.key"));
        let (hub_crt, hub_key) = (dir.join("hub.crt"), dir.join("hub.key"));
        if !ca_crt.exists() {
            let key = KeyPair::generate().map_err(issue_err)?;
            let mut p = CertificateParams::default();
            let mut dn = DistinguishedName::new();
            dn.push(DnType::CommonName, "nodekeeper hub CA");
            p.distinguished_name = dn;
            p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
            p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            validity(&mut p, CA_LIFETIME);
            let cert = p.self_signed(&key).map_err(issue_err)?;
            write_file(&ca_key, &key.serialize_pem(), true)?;
            write_file(&ca_crt, &cert.pem(), false)?;
            let _ = std::fs::remove_file(&hub_crt);
            tracing::info!(ca = %ca_crt.display(), "created the hub CA");
        }
        let ca_der = tls::read_certs(&ca_crt)?.remove(0);
        let ca_key_pair = read_key_pair(&ca_key)?;
        let renew = match tls::read_certs(&hub_crt) {
            Ok(c) => {
                let f = tls::cert_facts(&c[0])?;
                let left = f.not_after.duration_since(SystemTime::now()).unwrap_or_default();
                left < f.lifetime() / 3
            }
            Err(_) => true,
        };
        if renew {
            let issuer = Issuer::from_ca_cert_der(
                &ca_der,
                KeyPair::from_pem(&ca_key_pair.serialize_pem()).map_err(issue_err)?,
            )
            .map_err(issue_err)?;
            let key = KeyPair::generate().map_err(issue_err)?;
            let mut p = CertificateParams::default();
            let mut dn = DistinguishedName::new();
            dn.push(DnType::CommonName, "nodekeeper hub");
            p.distinguished_name = dn;
            p.subject_alt_names = server_names(cfg);
            p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
            p.use_authority_key_identifier_extension = true;
            validity(&mut p, SERVING_LIFETIME);
            let cert = p.signed_by(&key, &issuer).map_err(issue_err)?;
            write_file(&hub_key, &key.serialize_pem(), true)?;
            write_file(&hub_crt, &cert.pem(), false)?;
            tracing::info!(cert = %hub_crt.display(), "issued the hub's serving certificate");
        }
        Ok((
            ca_der,
            Some(ca_key_pair),
            tls::read_certs(&hub_crt)?,
            tls::read_key(&hub_key)?,
        ))
    }

    /// Signs a node certificate for the key and subject CN of `csr` (DER).
    /// Only the key and the name are taken from the request; everything
    /// else (validity, usages) is the hub's.
    pub fn issue(&self, csr: &[u8]) -> Result<Issued, String> {
        let issuer = self.issuer.as_ref().ok_or_else(|| {
            "this hub has no CA key (tls.caKeyFile), so it cannot sign node certificates; give it the CA key or issue node certificates yourself".to_string()
        })?;
        let req = CertificateSigningRequestParams::from_der(&CertificateSigningRequestDer::from(csr))
            .map_err(|e| format!("certificate request: {e}"))?;
        let cn = req
            .params
            .distinguished_name
            .get(&DnType::CommonName)
            .and_then(|v| match v {
                rcgen::DnValue::Utf8String(s) => Some(s.clone()),
                rcgen::DnValue::PrintableString(s) => Some(s.as_str().to_string()),
                _ => None,
            })
            .ok_or("certificate request: the subject has no common name (the node name)")?;
        nodekeeper_proto::validate::dns_subdomain("csr.subject.CN", &cn).map_err(|e| e.message)?;
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, cn);
        p.distinguished_name = dn;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        p.use_authority_key_identifier_extension = true;
        validity(&mut p, self.node_ttl);
        let cert = p
            .signed_by(&req.public_key, issuer)
            .map_err(|e| format!("signing: {e}"))?;
        let facts = tls::cert_facts(cert.der()).map_err(|e| e.to_string())?;
        Ok(Issued { pem: cert.pem(), facts })
    }
}

fn read_key_pair(path: &Path) -> Result<KeyPair, PkiError> {
    let text = std::fs::read_to_string(path).map_err(|e| file_err(path, e))?;
    KeyPair::from_pem(&text).map_err(|e| file_err(path, format!("not a PEM private key rcgen can sign with: {e}")))
}
