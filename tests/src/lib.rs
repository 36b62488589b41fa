//! Harness for end-to-end tests: starts the real `nodekeeper-hub`,
//! `nodekeeper-agent` and `nkctl` binaries with private state in a temp
//! directory, and talks to them over real HTTP, gRPC and Unix sockets.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

pub mod artifacts;
pub mod lab;

/// Path of a workspace binary (built by `cargo build --workspace` or
/// `scripts/test.sh`).
pub fn bin(name: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let profile = std::env::var("NK_TEST_PROFILE").unwrap_or_else(|_| "debug".into());
    let p = target.join(profile).join(name);
    assert!(
        p.exists(),
        "{} is missing: run `cargo build --workspace --bins` (scripts/test.sh does)",
        p.display()
    );
    p
}

/// A private temp directory, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!("nk-e2e-{tag}-{}-{}", std::process::id(), unique()));
        std::fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::env::var_os("NK_KEEP_TEMP").is_none() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// A free loopback port (bound and released; good enough for tests).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Polls `f` until it returns `Some`, or panics with `what` after `timeout`.
/// A bound on waiting, not a timing assertion.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A minimal HTTP/1.1 exchange; returns (status, body).
fn http_exchange(mut s: impl Read + Write, method: &str, path: &str, body: &str) -> std::io::Result<(u16, String)> {
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    Ok(parse_http(&raw))
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// HTTPS with a bearer token: the hub's operator API. `ca` is the hub's
/// ca.crt; `token` goes in `Authorization` when given.
pub fn https(
    addr: &str,
    ca: &Path,
    token: Option<&str>,
    method: &str,
    path: &str,
    body: &str,
) -> std::io::Result<(u16, String)> {
    let roots = nodekeeper_proto::tls::read_certs(ca).map_err(std::io::Error::other)?;
    let (config, _) =
        nodekeeper_proto::tls::client_config(nodekeeper_proto::tls::Trust::Roots(roots), None, &[b"http/1.1"])
            .map_err(std::io::Error::other)?;
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").map_err(std::io::Error::other)?;
    let conn = rustls::ClientConnection::new(Arc::new(config), name).map_err(std::io::Error::other)?;
    let tcp = TcpStream::connect(addr)?;
    tcp.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut stream = rustls::StreamOwned::new(conn, tcp);
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n{auth}Content-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut raw = Vec::new();
    // A peer that closes without close_notify still delivered its answer.
    if let Err(e) = stream.read_to_end(&mut raw)
        && raw.is_empty()
    {
        return Err(e);
    }
    Ok(parse_http(&raw))
}

fn parse_http(raw: &[u8]) -> (u16, String) {
    let text = String::from_utf8_lossy(raw).into_owned();
    let (head, rest) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        dechunk(rest)
    } else {
        rest.to_string()
    };
    (status, body)
}

/// What agents, hollow agents and nkctl need to use a hub the harness
/// started, by the hub's gRPC URL and by its API URL: tests keep passing a
/// URL, and the harness adds the join token, CA pin, admin token and CA.
#[derive(Clone, Debug)]
pub struct HubCreds {
    pub join_token: String,
    pub ca_cert_hash: String,
    pub admin_token: String,
    pub ca: PathBuf,
}

static HUBS: Mutex<Vec<(String, HubCreds)>> = Mutex::new(Vec::new());

/// The credentials of the harness's hub at `url` (gRPC or API URL).
pub fn creds_of(url: &str) -> Option<HubCreds> {
    let hubs = HUBS.lock().unwrap_or_else(|p| p.into_inner());
    hubs.iter().find(|(u, _)| u == url).map(|(_, c)| c.clone())
}

/// HTTP over TCP.
pub fn http(addr: &str, method: &str, path: &str, body: &str) -> std::io::Result<(u16, String)> {
    let s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    http_exchange(s, method, path, body)
}

/// HTTP over a Unix socket.
pub fn http_unix(path: &Path, method: &str, url: &str, body: &str) -> std::io::Result<(u16, String)> {
    let s = UnixStream::connect(path)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    http_exchange(s, method, url, body)
}

/// GET returning JSON, `None` on any failure (for polling).
pub fn get_json(addr: &str, path: &str) -> Option<Value> {
    match http(addr, "GET", path, "") {
        Ok((200, b)) => serde_json::from_str(&b).ok(),
        _ => None,
    }
}

fn spawn(cmd: &mut Command, log: &Path) -> Child {
    let out = std::fs::File::create(log).expect("log file");
    let err = out.try_clone().expect("log file");
    cmd.stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .expect("spawn daemon")
}

fn kill(child: &mut Child, signal: nix::sys::signal::Signal) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), signal);
}

/// How long a hub may take to answer /healthz: generous, because a debug
/// hub started while the suite loads every core can be slow, and the wait
/// ends as soon as it answers.
const HUB_START: Duration = Duration::from_secs(90);

/// A running hub.
pub struct Hub {
    pub dir: PathBuf,
    pub grpc: String,
    pub http: String,
    pub config: PathBuf,
    child: Option<Child>,
    starts: u32,
    env: Vec<(String, String)>,
    nofile: Option<u64>,
    /// Set unless the config says `insecure: true`.
    pub creds: Option<HubCreds>,
    /// TLS and tokens (the config does not say `insecure: true`).
    secure: bool,
}

impl Hub {
    /// Starts a hub with its state in `dir/hub`. `extra` is appended to the
    /// config. Unless it says `insecure: true`, the hub serves TLS: the
    /// harness reads the admin token and CA the hub created and makes a join
    /// token, which [`Agent::start`], [`Hollow::start`] and [`nkctl`] use.
    pub fn start(dir: &Path, extra: &str) -> Hub {
        Hub::start_on(dir, extra, "127.0.0.1")
    }

    /// Like [`Hub::start`], listening on `host` (`0.0.0.0` for agents in
    /// other namespaces); the harness still talks to it on 127.0.0.1.
    pub fn start_on(dir: &Path, extra: &str, host: &str) -> Hub {
        let d = dir.join("hub");
        std::fs::create_dir_all(&d).expect("hub dir");
        let (gport, hport) = (free_port(), free_port());
        let (grpc, http) = (format!("127.0.0.1:{gport}"), format!("127.0.0.1:{hport}"));
        let config = d.join("hub.yaml");
        std::fs::write(
            &config,
            format!(
                "listen: {{grpc: \"{host}:{gport}\", http: \"{host}:{hport}\"}}\nstateDir: {}\n{extra}",
                d.join("state").display()
            ),
        )
        .expect("write hub config");
        let mut h = Hub {
            dir: d,
            grpc,
            http,
            config,
            child: None,
            starts: 0,
            env: Vec::new(),
            nofile: None,
            creds: None,
            secure: !extra.contains("insecure: true"),
        };
        h.restart();
        if h.secure {
            let state = h.dir.join("state");
            let admin_token = std::fs::read_to_string(state.join("admin.token"))
                .expect("the hub wrote stateDir/admin.token")
                .trim()
                .to_string();
            let ca = state.join("ca.crt");
            let (code, body) = https(
                &h.http,
                &ca,
                Some(&admin_token),
                "POST",
                "/v1/tokens",
                r#"{"type":"join","ttl":"24h","description":"test harness"}"#,
            )
            .expect("create join token");
            assert_eq!(code, 200, "{body}");
            let v: Value = serde_json::from_str(&body).expect("token json");
            let creds = HubCreds {
                join_token: v["token"].as_str().expect("token").into(),
                ca_cert_hash: v["caCertHash"].as_str().expect("hash").into(),
                admin_token,
                ca,
            };
            let mut hubs = HUBS.lock().unwrap_or_else(|p| p.into_inner());
            hubs.push((h.grpc_url(), creds.clone()));
            hubs.push((h.http_url(), creds.clone()));
            h.creds = Some(creds);
        }
        h
    }

    /// A request to the operator API as admin (TLS and token when secure).
    pub fn request(&self, method: &str, path: &str, body: &str) -> std::io::Result<(u16, String)> {
        self.request_as(self.creds.as_ref().map(|c| c.admin_token.as_str()), method, path, body)
    }

    /// A request with `token` (none: without `Authorization`).
    pub fn request_as(
        &self,
        token: Option<&str>,
        method: &str,
        path: &str,
        body: &str,
    ) -> std::io::Result<(u16, String)> {
        match &self.creds {
            Some(c) => https(&self.http, &c.ca, token, method, path, body),
            None => http(&self.http, method, path, body),
        }
    }

    /// Starts a hub whose open-files limit (soft and hard, as `ulimit -n`
    /// sets them) is `nofile`.
    pub fn start_with_nofile(dir: &Path, extra: &str, nofile: u64) -> Hub {
        let mut h = Hub::start(dir, extra);
        h.kill9();
        h.nofile = Some(nofile);
        h.restart();
        h
    }

    /// The running hub's process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Environment for the next starts (e.g. `NODEKEEPER_FAILPOINT`); an
    /// empty list clears it.
    pub fn set_env(&mut self, env: &[(&str, &str)]) {
        self.env = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    }

    /// Starts without waiting for /healthz (for a hub expected to die).
    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "hub already running");
        self.starts += 1;
        let log = self.dir.join(format!("hub-{}.log", self.starts));
        let mut cmd = match self.nofile {
            Some(n) => {
                let mut c = Command::new("sh");
                c.args(["-c", &format!("ulimit -n {n} && exec \"$0\" \"$@\"")])
                    .arg(bin("nodekeeper-hub"));
                c
            }
            None => Command::new(bin("nodekeeper-hub")),
        };
        cmd.arg("--config").arg(&self.config);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        self.child = Some(spawn(&mut cmd, &log));
    }

    /// Waits for the running hub to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let c = self.child.as_mut()?;
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            if let Ok(Some(st)) = c.try_wait() {
                self.child = None;
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// The hub's latest log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join(format!("hub-{}.log", self.starts))).unwrap_or_default()
    }

    /// Address of the gRPC listener, for agents.
    pub fn grpc_url(&self) -> String {
        let scheme = if self.secure { "https" } else { "http" };
        format!("{scheme}://{}", self.grpc)
    }

    /// Address of the operator API, for nkctl.
    pub fn http_url(&self) -> String {
        let scheme = if self.secure { "https" } else { "http" };
        format!("{scheme}://{}", self.http)
    }

    /// Starts (again) on the same state and ports; waits for /healthz.
    pub fn restart(&mut self) {
        self.spawn();
        let (addr, secure) = (self.http.clone(), self.secure);
        let ca = self.dir.join("state").join("ca.crt");
        wait_for("hub /healthz", HUB_START, || {
            let r = if secure {
                https(&addr, &ca, None, "GET", "/healthz", "")
            } else {
                http(&addr, "GET", "/healthz", "")
            };
            r.ok().filter(|r| r.0 == 200)
        });
    }

    /// SIGKILL, as a crash.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            kill(&mut c, nix::sys::signal::Signal::SIGKILL);
            let _ = c.wait();
        }
    }

    /// SIGTERM and the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("hub running");
        kill(&mut c, nix::sys::signal::Signal::SIGTERM);
        c.wait().expect("wait hub")
    }

    pub fn get(&self, path: &str) -> Option<Value> {
        match self.request("GET", path, "") {
            Ok((200, b)) => serde_json::from_str(&b).ok(),
            _ => None,
        }
    }

    pub fn summary(&self) -> Value {
        self.get("/v1/fleet/summary").expect("summary")
    }

    pub fn node(&self, name: &str) -> Option<Value> {
        self.get(&format!("/v1/nodes/{name}"))
    }

    /// The gRPC URL agents elsewhere use (`https://<host>:<port>`); the
    /// harness gives them this hub's join token and pin for it.
    pub fn grpc_url_at(&self, host: &str) -> String {
        let port = self.grpc.rsplit(':').next().unwrap_or_default();
        let scheme = if self.secure { "https" } else { "http" };
        let url = format!("{scheme}://{host}:{port}");
        if let Some(c) = &self.creds {
            HUBS.lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((url.clone(), c.clone()));
        }
        url
    }

    /// Runs nkctl against this hub.
    pub fn nkctl(&self, args: &[&str]) -> Output {
        nkctl(&self.http_url(), None, args, None)
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Runs nkctl as the harness's admin (when `hub` is one of its secure
/// hubs); `stdin` is fed when given.
pub fn nkctl(hub: &str, socket: Option<&Path>, args: &[&str], stdin: Option<&str>) -> Output {
    let creds = creds_of(hub);
    let ca = creds.as_ref().map(|c| c.ca.display().to_string()).unwrap_or_default();
    let env: Vec<(&str, &str)> = match &creds {
        Some(c) => vec![
            ("NODEKEEPER_TOKEN", c.admin_token.as_str()),
            ("NODEKEEPER_CA", ca.as_str()),
        ],
        None => Vec::new(),
    };
    let socket = socket.map(|s| s.display().to_string());
    let mut all = vec!["--hub", hub];
    if let Some(s) = &socket {
        all.extend(["--socket", s.as_str()]);
    }
    all.extend_from_slice(args);
    nkctl_as(&env, &all, stdin)
}

/// Runs nkctl with no credentials but what `env` and `args` give: no
/// operator's nkctl config or environment leaks into a test.
pub fn nkctl_as(env: &[(&str, &str)], args: &[&str], stdin: Option<&str>) -> Output {
    let mut cmd = Command::new(bin("nkctl"));
    cmd.env("XDG_CONFIG_HOME", "/nonexistent")
        .env_remove("NKCTL_CONFIG")
        .env_remove("NODEKEEPER_HUB")
        .env_remove("NODEKEEPER_TOKEN")
        .env_remove("NODEKEEPER_CA")
        .envs(env.iter().copied());
    cmd.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd.stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() });
    let mut child = cmd.spawn().expect("spawn nkctl");
    if let Some(text) = stdin {
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(text.as_bytes())
            .expect("write stdin");
    }
    child.wait_with_output().expect("nkctl output")
}

/// An agent's `hub:` section for the harness's hub at `url` (joining with
/// its token), or for any other address as given (`http://` is insecure).
pub fn hub_config(url: &str) -> String {
    match creds_of(url) {
        Some(c) => format!(
            "hub: {{address: \"{url}\", bootstrapToken: \"{}\", caCertHash: \"{}\"}}\n",
            c.join_token, c.ca_cert_hash
        ),
        None if url.starts_with("http://") => format!("hub: {{address: \"{url}\", insecure: true}}\n"),
        None => format!("hub: {{address: \"{url}\"}}\n"),
    }
}

/// A running agent.
pub struct Agent {
    pub name: String,
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub config: PathBuf,
    env: Vec<(String, String)>,
    child: Option<Child>,
    starts: u32,
    /// A command prefix the agent runs under (another host's namespaces).
    wrap: Vec<String>,
}

impl Agent {
    /// Starts an agent named `name` with state in `dir/<name>`; `hub` is the
    /// hub's gRPC URL or `None` for standalone. `extra` is appended to the config.
    pub fn start(dir: &Path, name: &str, hub: Option<&str>, extra: &str) -> Agent {
        Agent::start_env(dir, name, hub, extra, &[])
    }

    /// Like [`Agent::start`], run under `wrap` (see [`lab::Hosts::wrap`]).
    pub fn start_wrapped(dir: &Path, name: &str, hub: Option<&str>, extra: &str, wrap: Vec<String>) -> Agent {
        Agent::start_full(dir, name, hub, extra, &[], wrap)
    }

    /// Like [`Agent::start`], with extra environment variables.
    pub fn start_env(dir: &Path, name: &str, hub: Option<&str>, extra: &str, env: &[(&str, &str)]) -> Agent {
        Agent::start_full(dir, name, hub, extra, env, Vec::new())
    }

    fn start_full(
        dir: &Path,
        name: &str,
        hub: Option<&str>,
        extra: &str,
        env: &[(&str, &str)],
        wrap: Vec<String>,
    ) -> Agent {
        let d = dir.join(name);
        std::fs::create_dir_all(&d).expect("agent dir");
        let socket = d.join("agent.sock");
        let config = d.join("agent.yaml");
        let hub_line = hub.map(hub_config).unwrap_or_default();
        // The built-in rules read the machine's real kernel log and journal;
        // tests that are not about detection keep them off.
        let extra = if extra.contains("detectors:") {
            extra.to_string()
        } else {
            format!("{extra}detectors: {{defaultRules: false}}\n")
        };
        std::fs::write(
            &config,
            format!(
                "nodeName: {name}\nstateDir: {}\nsocket: {}\n{hub_line}{extra}",
                d.join("state").display(),
                socket.display()
            ),
        )
        .expect("write agent config");
        let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let mut a = Agent {
            name: name.into(),
            dir: d,
            socket,
            config,
            env,
            child: None,
            starts: 0,
            wrap,
        };
        a.restart();
        a
    }

    /// Starts (again) with the same config and state; waits for the socket.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "agent already running");
        self.starts += 1;
        let _ = std::fs::remove_file(&self.socket);
        let log = self.dir.join(format!("agent-{}.log", self.starts));
        let mut cmd = if self.env.iter().any(|(k, _)| k == "WATCHDOG_USEC") {
            // systemd names the watched process in WATCHDOG_PID; a shell that
            // execs the agent knows that pid in advance.
            let mut c = Command::new("sh");
            c.arg("-c")
                .arg("export WATCHDOG_PID=$$; exec \"$0\" \"$@\"")
                .arg(bin("nodekeeper-agent"));
            c
        } else if let Some((first, rest)) = self.wrap.split_first() {
            let mut c = Command::new(first);
            c.args(rest).arg(bin("nodekeeper-agent"));
            c
        } else {
            Command::new(bin("nodekeeper-agent"))
        };
        cmd.arg("--config")
            .arg(&self.config)
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        self.child = Some(spawn(&mut cmd, &log));
        let sock = self.socket.clone();
        wait_for("agent socket", Duration::from_secs(30), || self.status_of(&sock));
    }

    fn status_of(&self, sock: &Path) -> Option<Value> {
        match http_unix(sock, "GET", "/v1/status", "") {
            Ok((200, b)) => serde_json::from_str(&b).ok(),
            _ => None,
        }
    }

    /// `/v1/status` from the socket.
    pub fn status(&self) -> Option<Value> {
        self.status_of(&self.socket)
    }

    /// Records an event through the socket; returns its report sequence.
    pub fn event(&self, reason: &str, message: &str) -> u64 {
        let body = format!("{{\"reason\":\"{reason}\",\"message\":\"{message}\"}}");
        let (code, resp) = http_unix(&self.socket, "POST", "/v1/events", &body).expect("post event");
        assert_eq!(code, 201, "event refused: {resp}");
        let v: Value = serde_json::from_str(&resp).expect("json");
        v["sequence"].as_u64().unwrap_or(0)
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            kill(&mut c, nix::sys::signal::Signal::SIGKILL);
            let _ = c.wait();
        }
    }

    pub fn signal(&mut self, s: nix::sys::signal::Signal) {
        if let Some(c) = self.child.as_mut() {
            kill(c, s);
        }
    }

    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("agent running");
        kill(&mut c, nix::sys::signal::Signal::SIGTERM);
        c.wait().expect("wait agent")
    }

    /// The running agent's process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Names (`comm`) of the agent's child processes.
    pub fn children(&self) -> Vec<String> {
        let Some(pid) = self.pid() else { return Vec::new() };
        let mut out = Vec::new();
        for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
                continue;
            };
            // pid (comm) state ppid ...
            let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
                continue;
            };
            let ppid = stat[close + 1..]
                .split_whitespace()
                .nth(1)
                .and_then(|p| p.parse::<u32>().ok());
            if ppid == Some(pid) {
                out.push(stat[open + 1..close].to_string());
            }
        }
        out
    }

    pub fn set_env(&mut self, env: &[(&str, &str)]) {
        self.env = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    }

    /// Waits for the agent process to exit by itself (a failpoint); `None`
    /// when it is still running after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let c = self.child.as_mut()?;
        let start = std::time::Instant::now();
        while start.elapsed() < timeout {
            if let Ok(Some(st)) = c.try_wait() {
                self.child = None;
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// `/v1/components` from the socket.
    pub fn components(&self) -> Vec<Value> {
        match http_unix(&self.socket, "GET", "/v1/components", "") {
            Ok((200, b)) => serde_json::from_str::<Value>(&b)
                .ok()
                .and_then(|v| v["items"].as_array().cloned())
                .unwrap_or_default(),
            _ => Vec::new(),
        }
    }

    /// One component from `/v1/components`.
    pub fn component(&self, name: &str) -> Option<Value> {
        self.components().into_iter().find(|c| c["name"] == name)
    }

    /// All of the agent's log so far.
    pub fn log(&self) -> String {
        (1..=self.starts)
            .map(|i| std::fs::read_to_string(self.dir.join(format!("agent-{i}.log"))).unwrap_or_default())
            .collect()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.signal(nix::sys::signal::Signal::SIGCONT);
        self.kill9();
    }
}

/// The Ready status of a node document.
pub fn ready(node: &Value) -> String {
    node["status"]["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == "Ready"))
        .and_then(|c| c["status"].as_str())
        .unwrap_or("")
        .to_string()
}

/// Sum of the aggregated counts of a node's events with `reason`.
pub fn event_count(node: &Value, reason: &str) -> u64 {
    node["status"]["recentEvents"]
        .as_array()
        .map(|es| {
            es.iter()
                .filter(|e| e["reason"] == reason)
                .map(|e| e["count"].as_u64().unwrap_or(0))
                .sum()
        })
        .unwrap_or(0)
}

/// Hollow agents: `nodekeeper-agent hollow` with its control listener.
pub struct Hollow {
    pub control: String,
    child: Option<Child>,
}

impl Hollow {
    /// Starts `count` hollow agents against `hub` (gRPC URL).
    pub fn start(dir: &Path, hub: &str, count: usize) -> Hollow {
        Hollow::start_with(dir, hub, count, &[])
    }

    /// [`Hollow::start`] with more `nodekeeper-agent hollow` arguments
    /// (`--zones`, `--component-seconds`, `--prefix`, ...).
    pub fn start_with(dir: &Path, hub: &str, count: usize, extra: &[&str]) -> Hollow {
        let control = format!("127.0.0.1:{}", free_port());
        let log = dir.join(format!("hollow-{}.log", unique()));
        let mut cmd = Command::new(bin("nodekeeper-agent"));
        cmd.args([
            "hollow",
            "--count",
            &count.to_string(),
            "--hub",
            hub,
            "--control",
            &control,
        ]);
        // Each fleet started in a test is new machines: names of their own
        // (a name another key joined with is refused, as for real nodes).
        static FLEETS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let prefix = match FLEETS.fetch_add(1, std::sync::atomic::Ordering::Relaxed) {
            0 => "hollow".to_string(),
            n => format!("hollow{n}"),
        };
        if !extra.contains(&"--prefix") {
            cmd.args(["--prefix", &prefix]);
        }
        cmd.args(extra);
        match creds_of(hub) {
            Some(c) => cmd.args(["--token", &c.join_token, "--ca-cert-hash", &c.ca_cert_hash]),
            None => cmd.arg("--insecure"),
        };
        let child = spawn(&mut cmd, &log);
        let addr = control.clone();
        wait_for("hollow control", Duration::from_secs(30), || get_json(&addr, "/stats"));
        Hollow {
            control,
            child: Some(child),
        }
    }

    pub fn stats(&self) -> Value {
        get_json(&self.control, "/stats").expect("hollow stats")
    }

    /// SIGKILL: every hollow agent of this process dies at once.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            kill(&mut c, nix::sys::signal::Signal::SIGKILL);
            let _ = c.wait();
        }
    }

    /// Every agent queues `per_agent` condition changes.
    pub fn burst(&self, per_agent: u64) {
        let (code, body) = http(&self.control, "POST", &format!("/burst?perAgent={per_agent}"), "").expect("burst");
        assert_eq!(code, 200, "{body}");
    }

    /// `query` (see `nodekeeper-agent hollow`'s control listener) raises a
    /// fault condition on some nodes; their names.
    pub fn raise(&self, query: &str) -> Vec<String> {
        let (code, body) = http(&self.control, "POST", &format!("/raise?{query}"), "").expect("raise");
        assert_eq!(code, 200, "{body}");
        let v: Value = serde_json::from_str(&body).expect("raise answer");
        v["nodes"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|n| n.as_str().map(String::from))
            .collect()
    }

    /// The fault is gone from every node; how many had it.
    pub fn clear(&self, condition: &str) -> u64 {
        let (code, body) = http(&self.control, "POST", &format!("/clear?condition={condition}"), "").expect("clear");
        assert_eq!(code, 200, "{body}");
        serde_json::from_str::<Value>(&body)
            .ok()
            .and_then(|v| v["cleared"].as_u64())
            .unwrap_or(0)
    }
}

impl Drop for Hollow {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            kill(&mut c, nix::sys::signal::Signal::SIGKILL);
            let _ = c.wait();
        }
    }
}

/// Serializes tests that write to the machine's one /dev/kmsg in ways that
/// can disturb each other (the ring-buffer overrun test floods it).
pub struct KmsgLock(#[allow(dead_code)] std::fs::File);

impl KmsgLock {
    pub fn take() -> KmsgLock {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open("/tmp/nodekeeper-kmsg-test.lock")
            .expect("lock file");
        // Blocks until the other holder is done; released when the file closes.
        let fd = std::os::fd::AsRawFd::as_raw_fd(&f);
        #[allow(deprecated)]
        nix::fcntl::flock(fd, nix::fcntl::FlockArg::LockExclusive).expect("flock");
        KmsgLock(f)
    }
}
