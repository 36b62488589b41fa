//! Artifact signatures: beyond its SHA-256, an artifact may have to carry a
//! detached signature by one of `converge.trustedKeys` (ed25519), so a hub
//! that was taken over cannot push a binary nobody signed. Two forms are
//! accepted: minisign's (signature file text; public keys as minisign
//! prints them) and plain ed25519 over the file (base64 or hex). The check
//! runs in Verifying, before anything on the node is touched; where
//! artifacts may come from is limited by `converge.allowedArtifactUrls`.

use std::io::Read;
use std::path::Path;

use base64::Engine;

/// A trusted key.
#[derive(Debug, Clone)]
pub enum Key {
    Minisign(Box<minisign_verify::PublicKey>),
    Ed25519([u8; 32]),
}

/// Reads one `converge.trustedKeys` entry.
pub fn parse_key(s: &str) -> Result<Key, String> {
    let s = s.trim();
    // A minisign public key file: a comment line, then the key.
    let line = s
        .lines()
        .rfind(|l| !l.trim().is_empty() && !l.starts_with("untrusted comment:"))
        .unwrap_or(s)
        .trim();
    if let Ok(k) = minisign_verify::PublicKey::from_base64(line) {
        return Ok(Key::Minisign(Box::new(k)));
    }
    let raw = decode(line).ok_or("neither a minisign public key nor a base64/hex ed25519 key")?;
    let raw: [u8; 32] = raw
        .try_into()
        .map_err(|v: Vec<u8>| format!("an ed25519 public key is 32 bytes, this is {}", v.len()))?;
    Ok(Key::Ed25519(raw))
}

fn decode(s: &str) -> Option<Vec<u8>> {
    if s.len().is_multiple_of(2) && s.chars().all(|c| c.is_ascii_hexdigit()) {
        return hex::decode(s).ok();
    }
    base64::engine::general_purpose::STANDARD.decode(s).ok()
}

/// Checks `file` against `signature` with any of `keys`; `Err` says why not.
pub fn verify(file: &Path, signature: &str, keys: &[Key]) -> Result<(), String> {
    if keys.is_empty() {
        return Err("the artifact is signed but the agent has no converge.trustedKeys to check it with".into());
    }
    if signature.contains("untrusted comment:") || signature.contains("trusted comment:") {
        let sig = minisign_verify::Signature::decode(signature)
            .map_err(|e| format!("the artifact's minisign signature does not parse: {e}"))?;
        for k in keys {
            let Key::Minisign(pk) = k else { continue };
            if minisign_file(file, pk, &sig).is_ok() {
                return Ok(());
            }
        }
        return Err("the artifact's minisign signature does not verify with any of converge.trustedKeys".into());
    }
    let sig = decode(signature.trim()).ok_or("the artifact's signature is neither minisign text nor base64/hex")?;
    if sig.len() != 64 {
        return Err(format!("an ed25519 signature is 64 bytes, this is {}", sig.len()));
    }
    let bytes = std::fs::read(file).map_err(|e| format!("{}: {e}", file.display()))?;
    for k in keys {
        let Key::Ed25519(pk) = k else { continue };
        if ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, pk)
            .verify(&bytes, &sig)
            .is_ok()
        {
            return Ok(());
        }
    }
    Err("the artifact's ed25519 signature does not verify with any of converge.trustedKeys".into())
}

fn minisign_file(file: &Path, pk: &minisign_verify::PublicKey, sig: &minisign_verify::Signature) -> Result<(), String> {
    let mut f = std::fs::File::open(file).map_err(|e| format!("{}: {e}", file.display()))?;
    match pk.verify_stream(sig) {
        // Prehashed (minisign's default): streamed, whatever the size.
        Ok(mut v) => {
            let mut buf = vec![0u8; 1 << 16];
            loop {
                let n = f.read(&mut buf).map_err(|e| format!("{}: {e}", file.display()))?;
                if n == 0 {
                    break;
                }
                v.update(&buf[..n]);
            }
            v.finalize().map_err(|e| e.to_string())
        }
        Err(minisign_verify::Error::UnsupportedLegacyMode) => {
            let mut bytes = Vec::new();
            f.read_to_end(&mut bytes)
                .map_err(|e| format!("{}: {e}", file.display()))?;
            pk.verify(&bytes, sig, true).map_err(|e| e.to_string())
        }
        Err(e) => Err(e.to_string()),
    }
}

/// Whether `url` starts with one of the allowed prefixes (none: any).
pub fn url_allowed(url: &str, allowed: &[String]) -> bool {
    allowed.is_empty() || allowed.iter().any(|p| url.starts_with(p.as_str()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::signature::KeyPair;

    #[test]
    fn plain_ed25519_signatures_verify_only_with_a_trusted_key() {
        let dir = tempfile::tempdir().expect("dir");
        let f = dir.path().join("a");
        std::fs::write(&f, b"payload").expect("write");
        let rng = ring::rand::SystemRandom::new();
        let doc = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).expect("key");
        let kp = ring::signature::Ed25519KeyPair::from_pkcs8(doc.as_ref()).expect("key");
        let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
        let key = parse_key(&b64(kp.public_key().as_ref())).expect("key");
        let sig = b64(kp.sign(b"payload").as_ref());
        assert_eq!(verify(&f, &sig, std::slice::from_ref(&key)), Ok(()));
        let bad = b64(kp.sign(b"other").as_ref());
        assert!(verify(&f, &bad, std::slice::from_ref(&key)).is_err());
        assert!(verify(&f, &sig, &[]).is_err());
        assert!(parse_key("not a key").is_err());
        assert!(url_allowed("https://a/x", &[]));
        assert!(url_allowed("https://a/x", &["https://a/".into()]));
        assert!(!url_allowed("https://b/x", &["https://a/".into()]));
    }
}
