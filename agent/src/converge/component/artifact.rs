//! Artifacts: downloaded once into a cache named by their SHA-256, resumed
//! with HTTP range requests and retried with backoff, and used only after
//! their hash is checked. A file in the cache is named by the hash it was
//! verified to have, and is checked again before every use, so a corrupted
//! or tampered cache entry is never installed.

use std::fs::{self, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::files::sha256_file;
use crate::retry::Backoff;

/// How far a download may go.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Attempts before the change fails.
    pub attempts: u32,
    /// Deadline for all attempts together.
    pub deadline: Duration,
    /// Size cap when the artifact declares no size.
    pub max_bytes: u64,
}

/// The artifact cache (`<stateDir>/artifacts`).
#[derive(Debug, Clone)]
pub struct Cache {
    dir: PathBuf,
    limits: Limits,
    http: ureq::Agent,
}

impl Cache {
    pub fn new(dir: PathBuf, limits: Limits) -> Cache {
        let config = ureq::Agent::config_builder()
            .timeout_connect(Some(Duration::from_secs(10)))
            .timeout_recv_response(Some(Duration::from_secs(30)))
            .timeout_per_read(Some(Duration::from_secs(30)))
            .http_status_as_error(false)
            .build();
        Cache {
            dir,
            limits: Limits {
                attempts: limits.attempts.max(1),
                ..limits
            },
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
    /// retrying with the agent's jittered backoff, within the download
    /// deadline and a size cap (`size` when the spec declares it, else the
    /// configured maximum) checked while the body streams; the result is
    /// moved into the cache only when its SHA-256 is `sha256`. A mismatch or
    /// an oversized artifact is final (retrying the same URL would fetch the
    /// same bytes) and leaves nothing in the cache.
    pub fn fetch(&self, url: &str, sha256: &str, size: u64) -> Result<PathBuf, String> {
        // Already downloaded: the Verifying step that follows hashes it (and
        // deletes it if it no longer matches, so the next attempt fetches it).
        if self.path(sha256).is_file() {
            return Ok(self.path(sha256));
        }
        fs::create_dir_all(&self.dir).map_err(|e| format!("creating {}: {e}", self.dir.display()))?;
        let partial = self.partial(sha256);
        let cap = if size > 0 { size } else { self.limits.max_bytes };
        let deadline = Instant::now() + self.limits.deadline;
        let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
        let mut last = String::new();
        for attempt in 1..=self.limits.attempts {
            match self.download(url, &partial, cap, deadline) {
                Ok(()) => {
                    let got = sha256_file(&partial).map_err(|e| format!("hashing {}: {e}", partial.display()))?;
                    if got != sha256 {
                        let _ = fs::remove_file(&partial);
                        return Err(format!(
                            "sha256 mismatch for {url}: expected {sha256}, got {got}; the download was discarded and nothing was changed"
                        ));
                    }
                    if size > 0 {
                        let len = fs::metadata(&partial).map(|m| m.len()).unwrap_or(0);
                        if len != size {
                            let _ = fs::remove_file(&partial);
                            return Err(format!(
                                "{url} has {len} bytes, the spec declares size {size}; the download was discarded and nothing was changed"
                            ));
                        }
                    }
                    let dst = self.path(sha256);
                    fs::rename(&partial, &dst).map_err(|e| format!("moving download into the cache: {e}"))?;
                    return Ok(dst);
                }
                Err(Failed::Final(e)) => {
                    let _ = fs::remove_file(&partial);
                    return Err(e);
                }
                Err(Failed::Retry(e)) => {
                    tracing::warn!(url, attempt, attempts = self.limits.attempts, error = %e, "download failed");
                    last = e;
                    let wait = backoff.next_delay();
                    if Instant::now() + wait >= deadline {
                        return Err(format!(
                            "downloading {url} did not finish within converge.downloadTimeoutSeconds ({} s); last error: {last}",
                            self.limits.deadline.as_secs()
                        ));
                    }
                    if attempt < self.limits.attempts {
                        std::thread::sleep(wait);
                    }
                }
            }
        }
        Err(format!(
            "downloading {url} failed {} times; last error: {last}",
            self.limits.attempts
        ))
    }

    /// One attempt: continues `partial` from its length when the server
    /// honours the range, else starts over. Stops at `cap` bytes and at
    /// `deadline`.
    fn download(&self, url: &str, partial: &Path, cap: u64, deadline: Instant) -> Result<(), Failed> {
        let too_big = |n: u64| {
            Failed::Final(format!(
                "{url} is larger than {cap} bytes (the artifact's size, or converge.maxArtifactBytes); the download was cut off and discarded"
            ))
            .with_len(n)
        };
        let have = fs::metadata(partial).map(|m| m.len()).unwrap_or(0);
        if have > cap {
            return Err(too_big(have));
        }
        let mut req = self.http.get(url);
        if have > 0 {
            req = req.header("Range", format!("bytes={have}-"));
        }
        let resp = req.call().map_err(|e| Failed::Retry(format!("GET {url}: {e}")))?;
        let status = resp.status().as_u16();
        let append = match status {
            206 if have > 0 => true,
            200 => false,
            // The partial file is already complete (or larger than the artifact).
            416 => {
                let _ = fs::remove_file(partial);
                return Err(Failed::Retry(format!(
                    "GET {url}: range not satisfiable; starting over"
                )));
            }
            s => return Err(Failed::Retry(format!("GET {url}: HTTP {s}"))),
        };
        let start = if append { have } else { 0 };
        // A declared length past the cap is refused before the body is read.
        let declared = resp
            .headers()
            .get("content-length")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if let Some(len) = declared
            && start + len > cap
        {
            return Err(too_big(start + len));
        }
        // Never through a symlink someone planted in the cache.
        let mut f = OpenOptions::new()
            .create(true)
            .write(true)
            .append(append)
            .truncate(!append)
            .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
            .mode(0o600)
            .open(partial)
            .map_err(|e| Failed::Retry(format!("{}: {e}", partial.display())))?;
        let mut body = resp.into_body().into_reader();
        let mut buf = vec![0u8; 256 * 1024];
        let mut written = start;
        loop {
            if Instant::now() > deadline {
                let _ = f.sync_all();
                return Err(Failed::Retry(format!("GET {url}: past the download deadline")));
            }
            let n = match body.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    let _ = f.sync_all();
                    return Err(Failed::Retry(format!("GET {url}: reading the body: {e}")));
                }
            };
            written += n as u64;
            if written > cap {
                return Err(too_big(written));
            }
            f.write_all(&buf[..n])
                .map_err(|e| Failed::Retry(format!("{}: {e}", partial.display())))?;
        }
        f.sync_all()
            .map_err(|e| Failed::Retry(format!("{}: {e}", partial.display())))
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

/// How one download attempt failed.
enum Failed {
    /// Worth another attempt (network, server errors).
    Retry(String),
    /// Another attempt would fetch the same bytes (too large).
    Final(String),
}

impl Failed {
    fn with_len(self, n: u64) -> Failed {
        match self {
            Failed::Final(m) => Failed::Final(format!("{m} (at least {n} bytes)")),
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tampered_cache_entry_is_refused_and_deleted() {
        let dir = std::env::temp_dir().join(format!("nk-cache-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("dir");
        let cache = Cache::new(
            dir.clone(),
            Limits {
                attempts: 1,
                deadline: Duration::from_secs(30),
                max_bytes: 1 << 20,
            },
        );
        let sha = super::super::files::sha256_bytes(b"artifact");
        fs::write(cache.path(&sha), b"artifact").expect("write");
        assert!(cache.verify(&sha).is_ok());
        fs::write(cache.path(&sha), b"artifacT").expect("tamper");
        let e = cache.verify(&sha).unwrap_err();
        assert!(e.contains("deleted"), "{e}");
        assert!(!cache.path(&sha).exists());
        // A server that cannot be reached: every attempt fails, nothing is cached.
        let e = cache.fetch("http://127.0.0.1:9/x", &sha, 0).unwrap_err();
        assert!(e.contains("failed 1 times"), "{e}");
        assert!(!cache.path(&sha).exists());
        let _ = fs::remove_dir_all(&dir);
    }
}
