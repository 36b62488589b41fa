//! Lab parts for packaging tests: packages built with `scripts/package.sh`,
//! and a real systemd booted in a container with `systemd-nspawn`
//! (see docs/architecture.md, "The lab").

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use crate::{TempDir, wait_for};

/// The repository root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Runs a command and returns its output; panics with stderr when it fails.
pub fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Text of a command's stdout.
pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Builds the four packages (debug binaries, for speed) into `dir`,
/// versioned `version`; returns their paths.
pub fn build_packages(dir: &Path, version: &str) -> Vec<PathBuf> {
    build_packages_env(dir, version, &[])
}

/// [`build_packages`] with extra environment for `scripts/package.sh`.
pub fn build_packages_env(dir: &Path, version: &str, env: &[(&str, &Path)]) -> Vec<PathBuf> {
    let mut cmd = Command::new(repo().join("scripts/package.sh"));
    cmd.env("PROFILE", "debug")
        .env("NK_DIST", dir)
        .env("NK_VERSION", version);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = run(&mut cmd);
    let log = String::from_utf8_lossy(&out.stderr);
    if let Some((_, t)) = env.iter().find(|(k, _)| *k == "CARGO_TARGET_DIR") {
        let want = format!("packaging binaries from {}/debug", t.display());
        assert!(
            log.contains(&want),
            "package.sh ignored CARGO_TARGET_DIR; wanted {want:?} in:\n{log}"
        );
    }
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("dist dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.to_string_lossy().contains(version))
        .collect();
    out.sort();
    out
}

/// A container booted with a real systemd as PID 1.
pub struct Machine {
    pub root: PathBuf,
    name: String,
    nspawn: Child,
    pid1: u32,
    _dir: TempDir,
}

impl Machine {
    /// Boots a Debian bookworm container (cached rootfs) with `binds`
    /// (host path, container path) mounted read-only and a private network.
    pub fn boot(tag: &str, binds: &[(&Path, &str)]) -> Machine {
        Machine::boot_with(tag, binds, true)
    }

    /// Like [`Machine::boot`]; with `private_network: false` the container
    /// shares the host's network, so it reaches a hub and file server on the
    /// host's loopback.
    pub fn boot_with(tag: &str, binds: &[(&Path, &str)], private_network: bool) -> Machine {
        let dir = TempDir::new(tag);
        let root = dir.path().join("root");
        run(Command::new(repo().join("scripts/lab/systemd-rootfs.sh")).arg(&root));
        let name = format!("nk-{tag}-{}", std::process::id());
        let log = std::fs::File::create(dir.path().join("nspawn.log")).expect("log");
        let mut cmd = Command::new("setsid");
        cmd.arg("systemd-nspawn").arg("-D").arg(&root).args([
            "-M",
            &name,
            "--boot",
            "--register=no",
            "--keep-unit",
            "--console=pipe",
        ]);
        if private_network {
            cmd.arg("--private-network");
        }
        for (host, inside) in binds {
            cmd.arg(format!("--bind-ro={}:{inside}", host.display()));
        }
        let nspawn = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("systemd-nspawn (apt-get install systemd-container)");
        let parent = nspawn.id();
        let pid1 = wait_for("the container's systemd", Duration::from_secs(60), || {
            let out = Command::new("pgrep")
                .args(["-P", &parent.to_string(), "-x", "systemd"])
                .output()
                .ok()?;
            stdout(&out).trim().parse::<u32>().ok()
        });
        let m = Machine {
            root,
            name,
            nspawn,
            pid1,
            _dir: dir,
        };
        wait_for("systemd running", Duration::from_secs(60), || {
            let s = stdout(&m.exec_unchecked(&["systemctl", "is-system-running"]));
            matches!(s.trim(), "running" | "degraded").then_some(())
        });
        m
    }

    /// The container's PID 1 (its system bus is under /proc/PID/root).
    pub fn pid1(&self) -> u32 {
        self.pid1
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new("nsenter");
        c.args(["-t", &self.pid1.to_string(), "-a", "--"]).args(args);
        c
    }

    /// Runs a command inside; panics when it fails.
    pub fn exec(&self, args: &[&str]) -> Output {
        run(&mut self.command(args))
    }

    /// Runs a command inside, whatever its exit status.
    pub fn exec_unchecked(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("nsenter")
    }

    /// Runs a shell snippet inside; panics when it fails.
    pub fn sh(&self, script: &str) -> String {
        stdout(&self.exec(&["sh", "-c", script]))
    }

    /// A unit property (`systemctl show -p`).
    pub fn prop(&self, unit: &str, prop: &str) -> String {
        let out = self.exec(&["systemctl", "show", "-p", prop, "--value", unit]);
        stdout(&out).trim().to_string()
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        let _ = self.command(&["systemctl", "poweroff"]).output();
        for _ in 0..100 {
            if let Ok(Some(_)) = self.nspawn.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.nspawn.kill();
        let _ = self.nspawn.wait();
        // Leftover empty cgroups of the container (LAB.md), deepest first.
        for base in ["/sys/fs/cgroup/systemd", "/sys/fs/cgroup/unified"] {
            let out = Command::new("find")
                .args([base, "-depth", "-type", "d", "-path", &format!("*{}*", self.name)])
                .output();
            if let Ok(out) = out {
                for d in stdout(&out).lines() {
                    let _ = std::fs::remove_dir(d);
                }
            }
        }
    }
}

/// The address every node namespace reaches the hub namespace at.
pub const HUB_ADDR: &str = "10.199.0.1";

/// Several hosts on one machine (LAB.md): a network namespace for the hub
/// (which the test thread enters, so the hub, nkctl and the harness's
/// requests live there) and one per node, each linked to the hub's by a
/// veth pair, with [`HUB_ADDR`] routed to the hub from every node. Every
/// address is inside the namespaces; the host's network is untouched.
pub struct Hosts {
    pub hub: String,
    pub nodes: Vec<String>,
}

fn ip(args: &[&str]) {
    run(Command::new("ip").args(args));
}

impl Hosts {
    pub fn create(tag: &str, n: usize) -> Hosts {
        let id = std::process::id();
        let hub = format!("nk-{tag}-{id}-hub");
        ip(&["netns", "add", &hub]);
        let h = Hosts {
            hub: hub.clone(),
            nodes: Vec::new(),
        };
        ip(&["-n", &hub, "link", "set", "lo", "up"]);
        ip(&["-n", &hub, "addr", "add", &format!("{HUB_ADDR}/32"), "dev", "lo"]);
        let mut h = h;
        for k in 1..=n {
            let node = format!("nk-{tag}-{id}-n{k}");
            ip(&["netns", "add", &node]);
            h.nodes.push(node.clone());
            let veth = format!("h{k}");
            ip(&["-n", &node, "link", "set", "lo", "up"]);
            ip(&[
                "-n", &hub, "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &node,
            ]);
            ip(&["-n", &hub, "addr", "add", &format!("10.200.{k}.1/24"), "dev", &veth]);
            ip(&["-n", &hub, "link", "set", &veth, "up"]);
            ip(&["-n", &node, "addr", "add", &format!("10.200.{k}.2/24"), "dev", "eth0"]);
            ip(&["-n", &node, "link", "set", "eth0", "up"]);
            ip(&[
                "-n",
                &node,
                "route",
                "add",
                &format!("{HUB_ADDR}/32"),
                "via",
                &format!("10.200.{k}.1"),
            ]);
        }
        h
    }

    /// Cuts (`false`) or mends (`true`) node `k`'s (0-based) cable: its veth
    /// on the hub's side goes down or up. Nothing is told to either end's
    /// sockets, as when a switch port dies or a host loses power.
    pub fn cable(&self, k: usize, up: bool) {
        let veth = format!("h{}", k + 1);
        ip(&["-n", &self.hub, "link", "set", &veth, if up { "up" } else { "down" }]);
    }

    /// Moves the calling thread (and what it starts from now on) into the
    /// hub's network namespace.
    pub fn enter_hub(&self) {
        let f = std::fs::File::open(format!("/run/netns/{}", self.hub)).expect("hub netns");
        nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns into the hub namespace");
    }

    /// The command prefix that runs a program on node `k` (0-based): its
    /// network namespace, and a private mount namespace in which each
    /// `(dir, path)` overlays `path` with a private upper layer in `dir`
    /// (its own dpkg database, its own install directory).
    pub fn wrap(&self, k: usize, overlays: &[(&Path, &str)]) -> Vec<String> {
        let mut script = String::new();
        for (i, (dir, path)) in overlays.iter().enumerate() {
            let (up, work) = (dir.join(format!("up{i}")), dir.join(format!("work{i}")));
            std::fs::create_dir_all(&up).expect("upper dir");
            std::fs::create_dir_all(&work).expect("work dir");
            script.push_str(&format!(
                "mount -t overlay overlay -o lowerdir={path},upperdir={},workdir={} {path} && ",
                up.display(),
                work.display()
            ));
        }
        script.push_str(&format!("exec ip netns exec {} \"$0\" \"$@\"", self.nodes[k]));
        vec![
            "unshare".into(),
            "--mount".into(),
            "--propagation".into(),
            "private".into(),
            "sh".into(),
            "-c".into(),
            script,
        ]
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for n in self.nodes.iter().chain(std::iter::once(&self.hub)) {
            let _ = Command::new("ip").args(["netns", "del", n]).output();
        }
    }
}

/// A real containerd, killed (and reaped) when dropped, also when a test
/// fails half-way.
pub struct Containerd(Option<Child>);

impl Containerd {
    /// Stops it now (as a crash would: SIGKILL).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A real containerd with its root, state and sockets in `dir`
/// (`dir/containerd.sock`), started and answering.
pub fn containerd(dir: &Path) -> Containerd {
    let cfg = String::from_utf8_lossy(&run(Command::new("containerd").args(["config", "default"])).stdout)
        .replace(
            "root = \"/var/lib/containerd\"",
            &format!("root = \"{}/root\"", dir.display()),
        )
        .replace(
            "state = \"/run/containerd\"",
            &format!("state = \"{}/state\"", dir.display()),
        )
        .replace(
            "address = \"/run/containerd/containerd.sock\"",
            &format!("address = \"{}/containerd.sock\"", dir.display()),
        )
        .replace(
            "address = \"/run/containerd/debug.sock\"",
            &format!("address = \"{}/debug.sock\"", dir.display()),
        );
    std::fs::write(dir.join("config.toml"), cfg).expect("containerd config");
    let log = std::fs::File::create(dir.join("containerd.log")).expect("log");
    let c = Command::new("containerd")
        .arg("--config")
        .arg(dir.join("config.toml"))
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("containerd (apt-get install containerd)");
    let c = Containerd(Some(c));
    wait_for("containerd's socket", Duration::from_secs(60), || {
        dir.join("containerd.sock").exists().then_some(())
    });
    c
}

/// An OCI image archive for `ctr image import`, built here (no registry
/// can be reached): one layer holding `hello.txt` with `content`, named
/// `name` (`registry/repo:tag`). Different contents give different images.
pub fn oci_image(dir: &Path, name: &str, content: &str) -> PathBuf {
    use sha2::{Digest, Sha256};
    let tag = name.rsplit_once(':').map_or("latest", |(_, t)| t);
    let root = dir.join(format!("oci-{}", name.replace(['/', ':'], "_")));
    let blobs = root.join("layout/blobs/sha256");
    std::fs::create_dir_all(&blobs).expect("blobs");
    std::fs::create_dir_all(root.join("layer")).expect("layer");
    let blob = |bytes: &[u8]| -> (String, usize) {
        let h = format!("{:x}", Sha256::digest(bytes));
        std::fs::write(blobs.join(&h), bytes).expect("blob");
        (format!("sha256:{h}"), bytes.len())
    };
    std::fs::write(root.join("layer/hello.txt"), content).expect("file");
    run(Command::new("tar")
        .arg("-C")
        .arg(root.join("layer"))
        .arg("-cf")
        .arg(root.join("layer.tar"))
        .arg("hello.txt"));
    let (layer, layer_size) = blob(&std::fs::read(root.join("layer.tar")).expect("layer.tar"));
    let config = serde_json::json!({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": [layer]}, "config": {}});
    let (config, config_size) = blob(config.to_string().as_bytes());
    let manifest = serde_json::json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config, "size": config_size},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer, "size": layer_size}]});
    let (manifest, manifest_size) = blob(manifest.to_string().as_bytes());
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": manifest, "size": manifest_size,
        "annotations": {"io.containerd.image.name": name, "org.opencontainers.image.ref.name": tag}}]});
    std::fs::write(root.join("layout/index.json"), index.to_string()).expect("index");
    std::fs::write(root.join("layout/oci-layout"), r#"{"imageLayoutVersion": "1.0.0"}"#).expect("oci-layout");
    let out = root.join("image.tar");
    run(Command::new("tar")
        .arg("-C")
        .arg(root.join("layout"))
        .arg("-cf")
        .arg(&out)
        .args(["oci-layout", "index.json", "blobs"]));
    out
}
