//! Archives (.tar.gz) unpacked to a versioned directory under the install
//! directory; `current` is a symlink switched atomically between versions.
//! A manifest of every unpacked file (hash, size, mtime) lets the drift
//! check notice a replaced binary cheaply: it re-hashes only files whose
//! size or mtime changed.

use std::fs::{self, File};
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::files::sha256_file;

/// One unpacked file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub path: String,
    /// Content hash, or `link:<target>` for a symlink.
    pub sha256: String,
    pub size: u64,
    pub mtime_ns: i64,
}

/// The `current` symlink of an install directory.
pub fn current_link(install_dir: &Path) -> PathBuf {
    install_dir.join("current")
}

/// Where versions are unpacked.
pub fn versions_dir(install_dir: &Path) -> PathBuf {
    install_dir.join("versions")
}

/// Unpacks `archive` into `dest`: into a temporary sibling first, then
/// moved into place in one step (an existing `dest`, say one whose files
/// drifted, is exchanged atomically with `renameat2(RENAME_EXCHANGE)`, so a
/// `current` link pointing at it never dangles).
pub fn unpack(archive: &Path, dest: &Path, strip: u32) -> Result<Vec<Entry>, String> {
    let parent = dest
        .parent()
        .ok_or_else(|| format!("{} has no parent directory", dest.display()))?;
    fs::create_dir_all(parent).map_err(|e| format!("creating {}: {e}", parent.display()))?;
    let tmp = parent.join(format!(
        ".{}.nk-unpack",
        dest.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    ));
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir(&tmp).map_err(|e| format!("creating {}: {e}", tmp.display()))?;
    let f = File::open(archive).map_err(|e| format!("{}: {e}", archive.display()))?;
    let mut ar = tar::Archive::new(flate2::read::GzDecoder::new(f));
    ar.set_preserve_permissions(true);
    let entries = ar
        .entries()
        .map_err(|e| format!("{}: not a .tar.gz archive: {e}", archive.display()))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| format!("{}: reading the archive: {e}", archive.display()))?;
        let raw = entry
            .path()
            .map_err(|e| format!("{}: bad entry path: {e}", archive.display()))?
            .into_owned();
        let mut rel = PathBuf::new();
        for (i, c) in raw.components().enumerate() {
            match c {
                Component::Normal(p) if i >= strip as usize => rel.push(p),
                Component::Normal(_) | Component::CurDir => {}
                _ => {
                    return Err(format!(
                        "{}: entry {} leaves the install directory; refusing the archive",
                        archive.display(),
                        raw.display()
                    ));
                }
            }
        }
        if rel.as_os_str().is_empty() {
            continue;
        }
        if entry.header().entry_type().is_hard_link() {
            return Err(format!(
                "{}: entry {} is a hard link; refusing the archive",
                archive.display(),
                raw.display()
            ));
        }
        let target = tmp.join(&rel);
        // Never write through a symlink an earlier entry created.
        let mut at = tmp.clone();
        for c in rel.parent().into_iter().flat_map(Path::components) {
            at.push(c);
            if fs::symlink_metadata(&at).is_ok_and(|m| m.file_type().is_symlink()) {
                return Err(format!(
                    "{}: entry {} goes through a symlink; refusing the archive",
                    archive.display(),
                    raw.display()
                ));
            }
        }
        if let Some(p) = target.parent() {
            fs::create_dir_all(p).map_err(|e| format!("creating {}: {e}", p.display()))?;
        }
        entry
            .unpack(&target)
            .map_err(|e| format!("{}: unpacking {}: {e}", archive.display(), raw.display()))?;
    }
    File::open(&tmp).and_then(|d| d.sync_all()).ok();
    if fs::symlink_metadata(dest).is_ok() {
        use nix::fcntl::{AT_FDCWD, RenameFlags, renameat2};
        renameat2(AT_FDCWD, &tmp, AT_FDCWD, dest, RenameFlags::RENAME_EXCHANGE)
            .map_err(|e| format!("exchanging {} with the fresh copy: {e}", dest.display()))?;
        let _ = fs::remove_dir_all(&tmp);
    } else {
        fs::rename(&tmp, dest).map_err(|e| format!("moving {} into place: {e}", dest.display()))?;
    }
    manifest(dest)
}

/// Lists every file under `dir` with its hash.
pub fn manifest(dir: &Path) -> Result<Vec<Entry>, String> {
    let mut out = Vec::new();
    walk(dir, dir, &mut out)?;
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

fn walk(root: &Path, dir: &Path, out: &mut Vec<Entry>) -> Result<(), String> {
    let rd = fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    for e in rd {
        let e = e.map_err(|e| format!("{}: {e}", dir.display()))?;
        let path = e.path();
        let meta = fs::symlink_metadata(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let rel = path.strip_prefix(root).unwrap_or(&path).to_string_lossy().into_owned();
        if meta.is_dir() {
            walk(root, &path, out)?;
        } else if meta.file_type().is_symlink() {
            let t = fs::read_link(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            out.push(Entry {
                path: rel,
                sha256: format!("link:{}", t.display()),
                size: 0,
                mtime_ns: 0,
            });
        } else {
            out.push(Entry {
                path: rel,
                sha256: sha256_file(&path).map_err(|e| format!("{}: {e}", path.display()))?,
                size: meta.len(),
                mtime_ns: mtime_ns(&meta),
            });
        }
    }
    Ok(())
}

fn mtime_ns(m: &fs::Metadata) -> i64 {
    super::files::time_ns(m.mtime(), m.mtime_nsec())
}

/// What differs between `dir` and its manifest (empty: intact). Files whose
/// size and mtime are unchanged are trusted without hashing.
pub fn check(dir: &Path, manifest: &[Entry]) -> Vec<String> {
    let mut out = Vec::new();
    for e in manifest {
        let p = dir.join(&e.path);
        let Ok(meta) = fs::symlink_metadata(&p) else {
            out.push(format!("{} is missing", p.display()));
            continue;
        };
        if let Some(t) = e.sha256.strip_prefix("link:") {
            if fs::read_link(&p).map(|x| x.to_string_lossy() != t).unwrap_or(true) {
                out.push(format!("{} points elsewhere", p.display()));
            }
            continue;
        }
        if meta.len() == e.size && mtime_ns(&meta) == e.mtime_ns {
            continue;
        }
        if sha256_file(&p).map(|h| h != e.sha256).unwrap_or(true) {
            out.push(format!("{} was changed", p.display()));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tgz(path: &Path, entries: &[(&str, &[u8])]) {
        let f = File::create(path).expect("create");
        let mut b = tar::Builder::new(flate2::write::GzEncoder::new(f, flate2::Compression::fast()));
        for (name, data) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o755);
            h.set_entry_type(tar::EntryType::Regular);
            // Raw names, so an archive can carry '..' like a hostile one would.
            let bytes = name.as_bytes();
            h.as_old_mut().name[..bytes.len()].copy_from_slice(bytes);
            h.set_cksum();
            b.append(&h, *data).expect("append");
        }
        b.into_inner().expect("finish").finish().expect("gz");
    }

    #[test]
    fn unpacks_with_strip_checks_its_manifest_and_refuses_escaping_entries() {
        let dir = std::env::temp_dir().join(format!("nk-archive-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("dir");
        let good = dir.join("good.tar.gz");
        tgz(&good, &[("tool-1/bin/tool", b"v1"), ("tool-1/README", b"hi")]);
        let dest = dir.join("versions/1");
        let m = unpack(&good, &dest, 1).expect("unpack");
        assert_eq!(
            m.iter().map(|e| e.path.as_str()).collect::<Vec<_>>(),
            ["README", "bin/tool"]
        );
        assert!(check(&dest, &m).is_empty());
        fs::write(dest.join("bin/tool"), b"v2").expect("tamper");
        assert_eq!(
            check(&dest, &m),
            [format!("{} was changed", dest.join("bin/tool").display())]
        );
        // Unpacking again over a drifted copy exchanges it whole.
        let again = unpack(&good, &dest, 1).expect("again");
        assert_eq!(
            again.iter().map(|e| &e.sha256).collect::<Vec<_>>(),
            m.iter().map(|e| &e.sha256).collect::<Vec<_>>()
        );
        assert_eq!(fs::read(dest.join("bin/tool")).expect("read"), b"v1");
        let bad = dir.join("bad.tar.gz");
        tgz(&bad, &[("x/../../escape", b"boom")]);
        let e = unpack(&bad, &dir.join("versions/bad"), 0).unwrap_err();
        assert!(e.contains("leaves the install directory"), "{e}");
        assert!(!dir.join("escape").exists() && !dir.join("versions/bad").exists());
        let _ = fs::remove_dir_all(&dir);
    }
}
