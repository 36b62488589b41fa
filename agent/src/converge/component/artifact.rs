//! Artifacts: downloaded once into a cache named by their SHA-256, resumed
//! with HTTP range requests and retried with backoff, and used only after
//! their hash is checked. A file in the cache is named by the hash it was
//! verified to have, and is checked again before every use, so a corrupted
//! or tampered cache entry is never installed.

use std::fs::{self, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::files::sha256_file;

/// The artifact cache (`<stateDir>/artifacts`).
#[derive(Debug, Clone)]
pub struct Cache {
    dir: PathBuf,
    attempts: u32,
    http: ureq::Agent,
}

impl Cache {
    pub fn new(dir: PathBuf, attempts: u32) -> Cache {
        let config = ureq::Agent::config_builder()
            .timeout_connect(Some(Duration::from_secs(10)))
            .timeout_recv_response(Some(Duration::from_secs(30)))
            .timeout_per_read(Some(Duration::from_secs(30)))
            .http_status_as_error(false)
            .build();
        Cache {
            dir,
            attempts: attempts.max(1),
            http: ureq::Agent::new_with_config(config),
        }
    }

    /// Where a verified artifact lives.
    pub fn path(&self, sha256: &str) -> PathBuf {
        self.dir.join(sha256)
    }

    fn partial(&self, sha256: &str) -> PathBuf {
        self.dir.join(format!("{sha256}.partial"))
    }

    /// Checks the cached artifact still has its hash; a bad entry is deleted.
    pub fn verify(&self, sha256: &str) -> Result<PathBuf, String> {
        let p = self.path(sha256);
        let got = sha256_file(&p).map_err(|e| format!("artifact {}: {e}", p.display()))?;
        if got != sha256 {
            let _ = fs::remove_file(&p);
            return Err(format!(
                "cached artifact {} has sha256 {got}, not {sha256}; it was deleted and will be downloaded again",
                p.display()
            ));
        }
        Ok(p)
    }

    /// Downloads `url` unless it is cached, resuming a partial download and
    /// retrying with backoff; the result is moved into the cache only when
    /// its SHA-256 is `sha256`. A mismatch is final (retrying the same URL
    /// would fetch the same wrong bytes) and leaves nothing in the cache.
    pub fn fetch(&self, url: &str, sha256: &str) -> Result<PathBuf, String> {
        // Already downloaded: the Verifying step that follows hashes it (and
        // deletes it if it no longer matches, so the next attempt fetches it).
        if self.path(sha256).is_file() {
            return Ok(self.path(sha256));
        }
        fs::create_dir_all(&self.dir).map_err(|e| format!("creating {}: {e}", self.dir.display()))?;
        let partial = self.partial(sha256);
        let mut last = String::new();
        for attempt in 1..=self.attempts {
            match self.download(url, &partial) {
                Ok(()) => {
                    let got = sha256_file(&partial).map_err(|e| format!("hashing {}: {e}", partial.display()))?;
                    if got != sha256 {
                        let _ = fs::remove_file(&partial);
                        return Err(format!(
                            "sha256 mismatch for {url}: expected {sha256}, got {got}; the download was discarded and nothing was changed"
                        ));
                    }
                    let dst = self.path(sha256);
                    fs::rename(&partial, &dst).map_err(|e| format!("moving download into the cache: {e}"))?;
                    return Ok(dst);
                }
                Err(e) => {
                    tracing::warn!(url, attempt, attempts = self.attempts, error = %e, "download failed");
                    last = e;
                    if attempt < self.attempts {
                        std::thread::sleep(backoff(attempt));
                    }
                }
            }
        }
        Err(format!(
            "downloading {url} failed {} times; last error: {last}",
            self.attempts
        ))
    }

    /// One attempt: continues `partial` from its length when the server
    /// honours the range, else starts over.
    fn download(&self, url: &str, partial: &Path) -> Result<(), String> {
        let have = fs::metadata(partial).map(|m| m.len()).unwrap_or(0);
        let mut req = self.http.get(url);
        if have > 0 {
            req = req.header("Range", format!("bytes={have}-"));
        }
        let resp = req.call().map_err(|e| format!("GET {url}: {e}"))?;
        let status = resp.status().as_u16();
        let append = match status {
            206 if have > 0 => true,
            200 => false,
            // The partial file is already complete (or larger than the artifact).
            416 => {
                let _ = fs::remove_file(partial);
                return Err(format!("GET {url}: range not satisfiable; starting over"));
            }
            s => return Err(format!("GET {url}: HTTP {s}")),
        };
        let mut f = OpenOptions::new()
            .create(true)
            .write(true)
            .append(append)
            .truncate(!append)
            .open(partial)
            .map_err(|e| format!("{}: {e}", partial.display()))?;
        let mut body = resp.into_body().into_reader();
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = match body.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    let _ = f.sync_all();
                    return Err(format!("GET {url}: reading the body: {e}"));
                }
            };
            f.write_all(&buf[..n])
                .map_err(|e| format!("{}: {e}", partial.display()))?;
        }
        f.sync_all().map_err(|e| format!("{}: {e}", partial.display()))
    }

    /// Deletes cached artifacts not in `keep` (and stale partial downloads
    /// not belonging to them).
    pub fn retain(&self, keep: &[&str]) {
        let Ok(rd) = fs::read_dir(&self.dir) else { return };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let sha = name.strip_suffix(".partial").unwrap_or(&name);
            if !keep.contains(&sha) {
                let _ = fs::remove_file(e.path());
            }
        }
    }
}

/// 1 s, 2 s, 4 s ... capped at 30 s.
fn backoff(attempt: u32) -> Duration {
    Duration::from_secs((1u64 << attempt.saturating_sub(1).min(5)).min(30))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tampered_cache_entry_is_refused_and_deleted() {
        let dir = std::env::temp_dir().join(format!("nk-cache-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("dir");
        let cache = Cache::new(dir.clone(), 1);
        let sha = super::super::files::sha256_bytes(b"artifact");
        fs::write(cache.path(&sha), b"artifact").expect("write");
        assert!(cache.verify(&sha).is_ok());
        fs::write(cache.path(&sha), b"artifacT").expect("tamper");
        let e = cache.verify(&sha).unwrap_err();
        assert!(e.contains("deleted"), "{e}");
        assert!(!cache.path(&sha).exists());
        // A server that cannot be reached: every attempt fails, nothing is cached.
        let e = cache.fetch("http://127.0.0.1:9/x", &sha).unwrap_err();
        assert!(e.contains("failed 1 times"), "{e}");
        assert!(!cache.path(&sha).exists());
        let _ = fs::remove_dir_all(&dir);
    }
}
