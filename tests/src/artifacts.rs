//! Artifacts for converge tests, built with the real tools: .deb packages
//! with dpkg-deb, .rpm packages with rpmbuild, .tar.gz archives with tar;
//! and a small HTTP file server (with range requests, a request log and a
//! way to cut a response short) to serve them from.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};

use crate::lab::run;

/// Hex SHA-256 of a file.
pub fn sha256(path: &Path) -> String {
    hex::encode(Sha256::digest(std::fs::read(path).expect("read artifact")))
}

/// A file in a package or archive: (absolute or relative path, content, mode).
pub type Entry<'a> = (&'a str, &'a str, u32);

fn lay_out(root: &Path, files: &[Entry<'_>]) {
    use std::os::unix::fs::PermissionsExt;
    for (path, content, mode) in files {
        let p = root.join(path.trim_start_matches('/'));
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        std::fs::write(&p, content).expect("write");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(*mode)).expect("chmod");
    }
}

/// Builds `<out>/<name>_<version>_all.deb` holding `files` at their
/// absolute paths.
pub fn build_deb(out: &Path, name: &str, version: &str, files: &[Entry<'_>]) -> PathBuf {
    let root = out.join(format!("deb-{name}-{version}"));
    let _ = std::fs::remove_dir_all(&root);
    lay_out(&root, files);
    std::fs::create_dir_all(root.join("DEBIAN")).expect("DEBIAN");
    std::fs::write(
        root.join("DEBIAN/control"),
        format!(
            "Package: {name}\nVersion: {version}\nArchitecture: all\nMaintainer: nodekeeper tests <t@example.invalid>\nDescription: converge test package\n"
        ),
    )
    .expect("control");
    let deb = out.join(format!("{name}_{version}_all.deb"));
    run(Command::new("dpkg-deb")
        .args(["--root-owner-group", "-Zgzip", "--build"])
        .arg(&root)
        .arg(&deb));
    deb
}

/// Builds an rpm (noarch, no scripts) with rpmbuild; returns its path.
pub fn build_rpm(out: &Path, name: &str, version: &str, files: &[Entry<'_>]) -> PathBuf {
    let top = out.join(format!("rpm-{name}-{version}"));
    let _ = std::fs::remove_dir_all(&top);
    let src = top.join("payload");
    lay_out(&src, files);
    let mut install = String::new();
    let mut listed = String::new();
    for (path, _, _) in files {
        install.push_str(&format!(
            "mkdir -p %{{buildroot}}{dir}\ncp -p {src}{path} %{{buildroot}}{path}\n",
            dir = Path::new(path).parent().expect("parent").display(),
            src = src.display()
        ));
        listed.push_str(&format!("{path}\n"));
    }
    let spec = top.join("p.spec");
    std::fs::write(
        &spec,
        format!(
            "Name: {name}\nVersion: {version}\nRelease: 1\nSummary: converge test package\nLicense: none\nBuildArch: noarch\nAutoReqProv: no\n%description\nconverge test package\n%install\n{install}%files\n{listed}"
        ),
    )
    .expect("spec");
    run(Command::new("rpmbuild")
        .arg("--define")
        .arg(format!("_topdir {}", top.display()))
        .args(["--quiet", "-bb"])
        .arg(&spec));
    let dir = top.join("RPMS/noarch");
    let found = std::fs::read_dir(&dir)
        .expect("RPMS/noarch")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "rpm"))
        .expect("an rpm was built");
    let dst = out.join(found.file_name().expect("name"));
    std::fs::rename(&found, &dst).expect("move rpm");
    dst
}

/// Builds a .tar.gz whose entries sit under `top/` (so `stripComponents: 1`
/// removes it).
pub fn build_tar_gz(out: &Path, name: &str, top: &str, files: &[Entry<'_>]) -> PathBuf {
    let root = out.join(format!("tree-{name}"));
    let _ = std::fs::remove_dir_all(&root);
    lay_out(&root.join(top), files);
    let tgz = out.join(format!("{name}.tar.gz"));
    run(Command::new("tar")
        .arg("-C")
        .arg(&root)
        .args(["--owner=0", "--group=0", "-czf"])
        .arg(&tgz)
        .arg(top));
    tgz
}

/// One request the file server saw.
#[derive(Debug, Clone)]
pub struct Request {
    pub path: String,
    pub range: Option<String>,
}

#[derive(Default)]
struct Shared {
    log: Vec<Request>,
    /// Path → bytes after which the next response is cut off.
    cut: HashMap<String, usize>,
}

/// A tiny HTTP/1.1 file server over a directory, one thread per connection.
pub struct FileServer {
    pub port: u16,
    shared: Arc<Mutex<Shared>>,
}

impl FileServer {
    pub fn start(dir: &Path) -> FileServer {
        FileServer::start_on(dir, "127.0.0.1")
    }

    /// Like [`FileServer::start`], listening on `host` (`0.0.0.0`).
    pub fn start_on(dir: &Path, host: &str) -> FileServer {
        let listener = TcpListener::bind(format!("{host}:0")).expect("bind file server");
        let port = listener.local_addr().expect("addr").port();
        let shared = Arc::new(Mutex::new(Shared::default()));
        let (dir, sh) = (dir.to_path_buf(), shared.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let (dir, sh) = (dir.clone(), sh.clone());
                std::thread::spawn(move || serve(conn, &dir, &sh));
            }
        });
        FileServer { port, shared }
    }

    /// The URL of a file in the served directory.
    pub fn url(&self, file: &Path) -> String {
        self.url_at("127.0.0.1", file)
    }

    /// The URL of a file as seen at `host`.
    pub fn url_at(&self, host: &str, file: &Path) -> String {
        format!(
            "http://{host}:{}/{}",
            self.port,
            file.file_name().expect("file name").to_string_lossy()
        )
    }

    /// The next response for `file` stops after `bytes` bytes of body.
    pub fn cut_next(&self, file: &Path, bytes: usize) {
        let name = format!("/{}", file.file_name().expect("name").to_string_lossy());
        self.shared.lock().expect("lock").cut.insert(name, bytes);
    }

    /// Requests so far.
    pub fn requests(&self) -> Vec<Request> {
        self.shared.lock().expect("lock").log.clone()
    }
}

fn serve(conn: std::net::TcpStream, dir: &Path, sh: &Mutex<Shared>) {
    let mut reader = BufReader::new(match conn.try_clone() {
        Ok(c) => c,
        Err(_) => return,
    });
    let mut out = conn;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
        let mut range = None;
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':')
                && k.eq_ignore_ascii_case("range")
            {
                range = Some(v.trim().to_string());
            }
        }
        let cut = {
            let mut s = sh.lock().expect("lock");
            s.log.push(Request {
                path: path.clone(),
                range: range.clone(),
            });
            s.cut.remove(&path)
        };
        let Ok(body) = std::fs::read(dir.join(path.trim_start_matches('/'))) else {
            let _ = out.write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n");
            continue;
        };
        let start = range
            .as_deref()
            .and_then(|r| r.strip_prefix("bytes="))
            .and_then(|r| r.trim_end_matches('-').parse::<usize>().ok())
            .filter(|s| *s <= body.len());
        let (status, part) = match start {
            Some(s) => (
                format!(
                    "206 Partial Content\r\ncontent-range: bytes {s}-{}/{}",
                    body.len().saturating_sub(1),
                    body.len()
                ),
                &body[s..],
            ),
            None => ("200 OK".to_string(), &body[..]),
        };
        let head = format!("HTTP/1.1 {status}\r\ncontent-length: {}\r\n\r\n", part.len());
        if out.write_all(head.as_bytes()).is_err() {
            return;
        }
        match cut {
            Some(n) => {
                let _ = out.write_all(&part[..n.min(part.len())]);
                let _ = out.flush();
                let _ = out.shutdown(std::net::Shutdown::Both);
                return;
            }
            None => {
                if out.write_all(part).is_err() {
                    return;
                }
            }
        }
    }
}
