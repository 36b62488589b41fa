//! Files on the node, changed only atomically: content goes to a temporary
//! file beside the target, is fsynced, gets its mode and owner, and is
//! renamed over the target (then the directory is fsynced), so a crash leaves
//! either the old or the new file, never a torn one. Contents the engine may
//! need again (a previous version's files, for rollback and drift repair)
//! are kept by hash in a small content store.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// Hex SHA-256 of bytes.
pub fn sha256_bytes(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

/// Hex SHA-256 of a file, streamed.
pub fn sha256_file(path: &Path) -> io::Result<String> {
    let mut f = File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

fn tmp_path(path: &Path) -> PathBuf {
    path.with_file_name(format!(".{}.nk-tmp", file_name(path)))
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Removes temporary files an interrupted write of `path` left beside it
/// (`.<name>.<random>.nk-tmp`; links are removed, never followed).
fn remove_stale_temps(path: &Path) {
    let (Some(dir), name) = (path.parent(), file_name(path)) else {
        return;
    };
    let prefix = format!(".{name}.");
    let Ok(rd) = fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        let n = e.file_name();
        let n = n.to_string_lossy();
        if n.starts_with(&prefix) && n.ends_with(".nk-tmp") {
            let _ = fs::remove_file(e.path());
        }
    }
}

fn fsync_dir(path: &Path) -> io::Result<()> {
    if let Some(dir) = path.parent() {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// Owner of a managed file: numeric ids resolved from `user[:group]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
}

/// Resolves `user` or `user:group` (empty: root). A user without a group
/// gets the user's primary group.
pub fn resolve_owner(spec: &str) -> Result<Owner, String> {
    if spec.is_empty() {
        return Ok(Owner { uid: 0, gid: 0 });
    }
    let (user, group) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let u = nix::unistd::User::from_name(user)
        .map_err(|e| format!("owner {spec:?}: looking up user {user:?}: {e}"))?
        .ok_or_else(|| format!("owner {spec:?}: no user {user:?} on this node"))?;
    let gid = match group {
        Some(g) => {
            nix::unistd::Group::from_name(g)
                .map_err(|e| format!("owner {spec:?}: looking up group {g:?}: {e}"))?
                .ok_or_else(|| format!("owner {spec:?}: no group {g:?} on this node"))?
                .gid
        }
        None => u.gid,
    };
    Ok(Owner {
        uid: u.uid.as_raw(),
        gid: gid.as_raw(),
    })
}

/// Writes `content` to `path` atomically with `mode` and `owner`, creating
/// parent directories.
pub fn write_atomic(path: &Path, content: &[u8], mode: u32, owner: Owner) -> io::Result<()> {
    replace_with(path, mode, owner, |f| f.write_all(content))
}

/// Copies `src` to `dst` atomically (for a verified binary from the cache).
pub fn copy_atomic(src: &Path, dst: &Path, mode: u32, owner: Owner) -> io::Result<()> {
    replace_with(dst, mode, owner, |f| io::copy(&mut File::open(src)?, f).map(drop))
}

/// Fills a private temporary file beside `path` with `fill`, then gives it
/// its owner and mode, fsyncs it and renames it over `path`.
fn replace_with(
    path: &Path,
    mode: u32,
    owner: Owner,
    fill: impl FnOnce(&mut File) -> io::Result<()>,
) -> io::Result<()> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir)?;
    }
    remove_stale_temps(path);
    // Created exclusively (O_EXCL, a random name, mode 0600), so a file or
    // link planted beside the target is never written through.
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new()
        .prefix(&format!(".{}.", file_name(path)))
        .suffix(".nk-tmp")
        .tempfile_in(dir)?;
    // On error the temporary file is deleted when `tmp` drops.
    fill(tmp.as_file_mut())?;
    let f = tmp.as_file();
    nix::unistd::fchown(f, Some(owner.uid.into()), Some(owner.gid.into())).map_err(io::Error::from)?;
    f.set_permissions(fs::Permissions::from_mode(mode))?;
    f.sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    fsync_dir(path)
}

/// Points the symlink `link` at `target` atomically (a new link beside it,
/// renamed over it).
pub fn switch_symlink(link: &Path, target: &Path) -> io::Result<()> {
    if let Some(dir) = link.parent() {
        fs::create_dir_all(dir)?;
    }
    let tmp = tmp_path(link);
    match fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    std::os::unix::fs::symlink(target, &tmp)?;
    fs::rename(&tmp, link)?;
    fsync_dir(link)
}

/// Removes a file if it exists.
pub fn remove_if_exists(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Ok(()) => fsync_dir(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// What a file on the node looks like now: its hash, mode and owner, or
/// nothing when it does not exist.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    pub sha256: String,
    pub mode: u32,
    pub owner: Owner,
}

/// Observes `path` (`None`: absent).
pub fn observe(path: &Path) -> io::Result<Option<Observed>> {
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    if !meta.is_file() {
        return Ok(Some(Observed {
            sha256: "not-a-regular-file".into(),
            mode: meta.mode() & 0o7777,
            owner: Owner {
                uid: meta.uid(),
                gid: meta.gid(),
            },
        }));
    }
    Ok(Some(Observed {
        sha256: sha256_file(path)?,
        mode: meta.mode() & 0o7777,
        owner: Owner {
            uid: meta.uid(),
            gid: meta.gid(),
        },
    }))
}

/// `observe` with memory: a file whose inode, size, mtime and ctime are as
/// when it was last hashed is not hashed again, so the drift check of a
/// large binary costs a `stat` per pass. As git does for "racily clean"
/// files, a hash is trusted only when the file's times are older than the
/// moment it was taken (minus a margin for coarse kernel timestamps);
/// otherwise a write in the same clock tick could go unnoticed.
#[derive(Debug, Default)]
pub struct Observer {
    seen: std::sync::Mutex<std::collections::HashMap<PathBuf, (Stamp, String, i64)>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i64,
    ctime_ns: i64,
}

/// Timestamps closer than this to the hashing time are not trusted.
const RACY_NS: i64 = 2_000_000_000;

fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// A file time in nanoseconds since the epoch, as i64: it fits until 2262
/// and, unlike a 128-bit integer, survives a JSON record.
pub fn time_ns(secs: i64, nsecs: i64) -> i64 {
    secs.saturating_mul(1_000_000_000).saturating_add(nsecs)
}

impl Observer {
    /// Like [`observe`], re-hashing only files that changed.
    pub fn observe(&self, path: &Path) -> io::Result<Option<Observed>> {
        let meta = match fs::symlink_metadata(path) {
            Ok(m) if m.is_file() => m,
            _ => return observe(path),
        };
        let stamp = Stamp {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.len(),
            mtime_ns: time_ns(meta.mtime(), meta.mtime_nsec()),
            ctime_ns: time_ns(meta.ctime(), meta.ctime_nsec()),
        };
        let owner = Owner {
            uid: meta.uid(),
            gid: meta.gid(),
        };
        let mode = meta.mode() & 0o7777;
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((s, sha, hashed_at)) = seen.get(path)
            && *s == stamp
            && stamp.mtime_ns.max(stamp.ctime_ns) < hashed_at - RACY_NS
        {
            return Ok(Some(Observed {
                sha256: sha.clone(),
                mode,
                owner,
            }));
        }
        let hashed_at = now_ns();
        let sha = sha256_file(path)?;
        seen.insert(path.to_path_buf(), (stamp, sha.clone(), hashed_at));
        Ok(Some(Observed {
            sha256: sha,
            mode,
            owner,
        }))
    }
}

/// Contents kept by hash under the state directory, so a previous version's
/// files can be written back without the network.
#[derive(Debug, Clone)]
pub struct ContentStore {
    dir: PathBuf,
}

impl ContentStore {
    pub fn new(dir: PathBuf) -> ContentStore {
        ContentStore { dir }
    }

    /// Stores bytes; returns their hash.
    pub fn put(&self, content: &[u8]) -> io::Result<String> {
        let sha = sha256_bytes(content);
        let path = self.dir.join(&sha);
        if !path.exists() {
            write_atomic(&path, content, 0o600, Owner { uid: 0, gid: 0 }).or_else(|e| {
                // Not root (tests of the engine as a user): keep our own ids.
                if e.raw_os_error() == Some(nix::libc::EPERM) {
                    let me = Owner {
                        uid: nix::unistd::getuid().as_raw(),
                        gid: nix::unistd::getgid().as_raw(),
                    };
                    write_atomic(&path, content, 0o600, me)
                } else {
                    Err(e)
                }
            })?;
        }
        Ok(sha)
    }

    /// Reads stored bytes, checking they still hash to `sha`.
    pub fn get(&self, sha: &str) -> Result<Vec<u8>, String> {
        let path = self.dir.join(sha);
        let b = fs::read(&path).map_err(|e| format!("kept content {}: {e}", path.display()))?;
        if sha256_bytes(&b) != sha {
            return Err(format!(
                "kept content {} is corrupt (hash differs); it cannot be used",
                path.display()
            ));
        }
        Ok(b)
    }

    /// Deletes kept contents not in `keep`.
    pub fn retain(&self, keep: &[&str]) {
        let Ok(rd) = fs::read_dir(&self.dir) else { return };
        for e in rd.flatten() {
            let name = e.file_name();
            if !keep.contains(&name.to_string_lossy().as_ref()) {
                let _ = fs::remove_file(e.path());
            }
        }
    }

    /// Stores the current content of a file on the node, if any.
    pub fn keep_file(&self, path: &Path) -> Result<Option<String>, String> {
        match fs::read(path) {
            Ok(b) => self
                .put(&b)
                .map(Some)
                .map_err(|e| format!("keeping {}: {e}", path.display())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("reading {}: {e}", path.display())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_content_and_mode_and_leaves_no_temp_file() {
        let dir = std::env::temp_dir().join(format!("nk-files-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let p = dir.join("sub/x.conf");
        let me = Owner {
            uid: nix::unistd::getuid().as_raw(),
            gid: nix::unistd::getgid().as_raw(),
        };
        write_atomic(&p, b"one\n", 0o640, me).expect("write");
        write_atomic(&p, b"two\n", 0o600, me).expect("rewrite");
        assert_eq!(fs::read(&p).expect("read"), b"two\n");
        let o = observe(&p).expect("observe").expect("exists");
        assert_eq!(o.mode, 0o600);
        assert_eq!(o.sha256, sha256_bytes(b"two\n"));
        let temps = |d: &Path| {
            fs::read_dir(d)
                .expect("dir")
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().ends_with(".nk-tmp"))
                .count()
        };
        assert_eq!(temps(&dir.join("sub")), 0, "no temporary file left");
        // A link planted where a temporary file could go is never written
        // through, and a leftover of an interrupted write is cleaned up.
        let victim = dir.join("victim");
        fs::write(&victim, b"keep").expect("victim");
        std::os::unix::fs::symlink(&victim, dir.join("sub/.x.conf.nk-tmp")).expect("planted link");
        std::os::unix::fs::symlink(&victim, dir.join("sub/.x.conf.AbCdEf.nk-tmp")).expect("planted link");
        write_atomic(&p, b"two\n", 0o600, me).expect("write past planted links");
        assert_eq!(fs::read(&victim).expect("victim"), b"keep");
        assert_eq!(fs::read(&p).expect("read"), b"two\n");
        assert!(
            dir.join("sub/.x.conf.nk-tmp").symlink_metadata().is_err(),
            "old-style leftover removed"
        );
        assert!(
            dir.join("sub/.x.conf.AbCdEf.nk-tmp").symlink_metadata().is_err(),
            "stale temp removed"
        );
        let link = dir.join("current");
        switch_symlink(&link, Path::new("v1")).expect("link");
        switch_symlink(&link, Path::new("v2")).expect("relink");
        assert_eq!(fs::read_link(&link).expect("readlink"), Path::new("v2"));
        // The observer notices an in-place rewrite of the same size at once.
        let obs = Observer::default();
        assert_eq!(obs.observe(&p).expect("o").expect("e").sha256, sha256_bytes(b"two\n"));
        fs::write(&p, b"six\n").expect("in place");
        assert_eq!(obs.observe(&p).expect("o").expect("e").sha256, sha256_bytes(b"six\n"));
        let cs = ContentStore::new(dir.join("content"));
        let sha = cs.put(b"kept").expect("put");
        assert_eq!(cs.get(&sha).expect("get"), b"kept");
        fs::write(dir.join("content").join(&sha), b"tampered").expect("tamper");
        assert!(cs.get(&sha).unwrap_err().contains("corrupt"));
        let other = cs.put(b"other").expect("put");
        cs.retain(&[other.as_str()]);
        assert!(!dir.join("content").join(&sha).exists());
        assert_eq!(cs.get(&other).expect("kept"), b"other");
        let _ = fs::remove_dir_all(&dir);
    }
}
