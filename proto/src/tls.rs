//! TLS pieces shared by the hub, agents, nkctl and the tests: the CA pin
//! (kubeadm's `sha256:<hex>` of the CA's SubjectPublicKeyInfo), facts read
//! from certificates, PEM files, and client configurations (TLS 1.3 only,
//! rustls with ring). Nothing here is home-made cryptography: verification
//! is rustls/webpki's; the pin only chooses which CA webpki trusts.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ClientConfig, WebPkiServerVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use sha2::Digest;

/// Errors of the TLS helpers; messages name the file and what to do.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {reason}")]
    File { path: String, reason: String },
    #[error("certificate: {0}")]
    Certificate(String),
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// The crypto provider every nodekeeper TLS endpoint uses.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The only protocol version nodekeeper speaks.
pub static VERSIONS: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];

/// `sha256:<hex>` of a certificate's SubjectPublicKeyInfo: the form of
/// `hub.caCertHash` (as kubeadm's `--discovery-token-ca-cert-hash`).
pub fn spki_pin(cert: &[u8]) -> Result<String, TlsError> {
    Ok(format!("sha256:{}", cert_facts(cert)?.spki_sha256))
}

/// What the hub and agents read from a certificate.
#[derive(Debug, Clone, PartialEq)]
pub struct CertFacts {
    /// The subject's CN: a node certificate's node name.
    pub common_name: String,
    /// The serial number, hex.
    pub serial: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// Hex SHA-256 of the SubjectPublicKeyInfo (names the key).
    pub spki_sha256: String,
    pub is_ca: bool,
}

impl CertFacts {
    /// The certificate's whole validity period.
    pub fn lifetime(&self) -> Duration {
        self.not_after.duration_since(self.not_before).unwrap_or_default()
    }
}

/// Parses a DER certificate.
pub fn cert_facts(der: &[u8]) -> Result<CertFacts, TlsError> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|e| TlsError::Certificate(format!("cannot parse: {e}")))?;
    let common_name = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .unwrap_or_default()
        .to_string();
    let at = |t: x509_parser::time::ASN1Time| {
        let secs = t.timestamp();
        if secs >= 0 {
            SystemTime::UNIX_EPOCH + Duration::from_secs(secs as u64)
        } else {
            SystemTime::UNIX_EPOCH
        }
    };
    let validity = cert.validity();
    Ok(CertFacts {
        common_name,
        serial: hex::encode(cert.raw_serial()),
        not_before: at(validity.not_before),
        not_after: at(validity.not_after),
        spki_sha256: hex::encode(sha2::Sha256::digest(cert.public_key().raw)),
        is_ca: cert.is_ca(),
    })
}

fn file_err(path: &Path, reason: impl std::fmt::Display) -> TlsError {
    TlsError::File {
        path: path.display().to_string(),
        reason: reason.to_string(),
    }
}

/// Certificates from a PEM file (at least one).
pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = std::fs::read(path).map_err(|e| file_err(path, e))?;
    let certs = certs_from_pem(&pem).map_err(|e| file_err(path, e))?;
    Ok(certs)
}

/// Certificates from PEM text (at least one).
pub fn certs_from_pem(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("not a PEM certificate: {e}"))?;
    if certs.is_empty() {
        return Err("holds no PEM certificate".into());
    }
    Ok(certs)
}

/// A private key from a PEM file (PKCS#8, SEC1 or PKCS#1).
pub fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = std::fs::read(path).map_err(|e| file_err(path, e))?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| file_err(path, format!("not a PEM private key: {e}")))
}

/// Which hub CA a client trusts.
#[derive(Debug, Clone)]
pub enum Trust {
    /// These CA certificates (`hub.caFile`, nkctl's `--ca`).
    Roots(Vec<CertificateDer<'static>>),
    /// The CA in the hub's chain whose key has this pin (`hub.caCertHash`);
    /// the server must still present a certificate that CA signed for the
    /// name dialled.
    Pin(String),
}

/// A client identity: certificate chain and key.
pub type Identity = (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>);

/// A TLS 1.3 client configuration trusting `trust`, presenting `identity`
/// when given, offering `alpn` (`h2` for gRPC). With a pin, the returned
/// [`PinnedCa`] holds the CA once a handshake matched it (an agent stores it
/// after joining).
pub fn client_config(
    trust: Trust,
    identity: Option<Identity>,
    alpn: &[&[u8]],
) -> Result<(ClientConfig, Option<PinnedCa>), TlsError> {
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(VERSIONS)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let (builder, pinned) = match trust {
        Trust::Roots(certs) => {
            let mut roots = RootCertStore::empty();
            for c in certs {
                roots
                    .add(c)
                    .map_err(|e| TlsError::Config(format!("CA certificate: {e}")))?;
            }
            (builder.with_root_certificates(roots), None)
        }
        Trust::Pin(pin) => {
            let pin = normalize_pin(&pin)?;
            let verifier = Arc::new(PinVerifier {
                pin,
                provider: provider.clone(),
                matched: Arc::new(Mutex::new(None)),
            });
            let pinned = PinnedCa(verifier.matched.clone());
            (
                builder.dangerous().with_custom_certificate_verifier(verifier),
                Some(pinned),
            )
        }
    };
    let mut config = match identity {
        Some((chain, key)) => builder
            .with_client_auth_cert(chain, key)
            .map_err(|e| TlsError::Config(format!("client certificate: {e}")))?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok((config, pinned))
}

/// Checks and lower-cases a `sha256:<64 hex>` pin.
pub fn normalize_pin(pin: &str) -> Result<String, TlsError> {
    let p = pin.trim().to_ascii_lowercase();
    let ok = p
        .strip_prefix("sha256:")
        .is_some_and(|h| h.len() == 64 && h.chars().all(|c| c.is_ascii_hexdigit()));
    if !ok {
        return Err(TlsError::Config(format!(
            "{pin:?} is not a CA pin; expected sha256:<64 hex digits> as `nkctl token create join` prints"
        )));
    }
    Ok(p)
}

/// The CA a pinned handshake matched.
#[derive(Debug, Clone)]
pub struct PinnedCa(Arc<Mutex<Option<CertificateDer<'static>>>>);

impl PinnedCa {
    pub fn get(&self) -> Option<CertificateDer<'static>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Trusts the CA certificate in the presented chain whose key matches the
/// pin, then lets webpki verify the server certificate against it.
#[derive(Debug)]
struct PinVerifier {
    pin: String,
    provider: Arc<CryptoProvider>,
    matched: Arc<Mutex<Option<CertificateDer<'static>>>>,
}

impl ServerCertVerifier for PinVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|c| spki_pin(c).is_ok_and(|p| p == self.pin))
            .ok_or_else(|| {
                rustls::Error::General(format!(
                    "the hub's CA does not match hub.caCertHash {}; this is not the hub the token was made for",
                    self.pin
                ))
            })?;
        let mut roots = RootCertStore::empty();
        roots
            .add(ca.clone().into_owned())
            .map_err(|e| rustls::Error::General(format!("pinned CA: {e}")))?;
        let others: Vec<CertificateDer<'_>> = intermediates.iter().filter(|c| *c != ca).cloned().collect();
        let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
            .build()
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        let verified = webpki.verify_server_cert(end_entity, &others, server_name, ocsp, now)?;
        *self.matched.lock().unwrap_or_else(|p| p.into_inner()) = Some(ca.clone().into_owned());
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2 is not spoken".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// The host of an `https://host:port/...` URL, as a TLS server name.
pub fn server_name_of(url: &str) -> Result<ServerName<'static>, TlsError> {
    let rest = url
        .strip_prefix("https://")
        .ok_or_else(|| TlsError::Config(format!("{url:?} is not an https:// URL")))?;
    let authority = rest.split('/').next().unwrap_or_default();
    let host = if let Some(v6) = authority.strip_prefix('[') {
        v6.split(']').next().unwrap_or_default()
    } else {
        authority.rsplit_once(':').map_or(authority, |(h, _)| h)
    };
    ServerName::try_from(host.to_string()).map_err(|e| TlsError::Config(format!("host of {url:?}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_are_checked_and_hosts_read() {
        assert!(normalize_pin("sha256:ABCDEF").is_err());
        let good = format!("SHA256:{}", "ab".repeat(32));
        assert_eq!(normalize_pin(&good).expect("pin"), good.to_ascii_lowercase());
        assert_eq!(
            server_name_of("https://hub.example:7443").expect("name"),
            ServerName::try_from("hub.example").expect("n")
        );
        assert_eq!(
            server_name_of("https://[::1]:7443/x").expect("name"),
            ServerName::try_from("::1").expect("n")
        );
        assert!(server_name_of("http://hub:1").is_err());
    }
}
