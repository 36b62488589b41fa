//! Node facts: who and what this node is, read from the kernel and /etc.

use std::path::{Path, PathBuf};

use nodekeeper_proto::v1::NodeFacts;

/// Where facts are read from; tests point it at a prepared tree.
#[derive(Debug, Clone)]
pub struct FactRoots {
    pub etc: PathBuf,
    pub proc: PathBuf,
}

impl Default for FactRoots {
    fn default() -> Self {
        FactRoots {
            etc: PathBuf::from("/etc"),
            proc: PathBuf::from("/proc"),
        }
    }
}

fn read_trim(p: &Path) -> String {
    std::fs::read_to_string(p)
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Parses os-release: `(PRETTY_NAME, ID, VERSION_ID)`.
pub fn parse_os_release(text: &str) -> (String, String, String) {
    let mut pretty = String::new();
    let mut id = String::new();
    let mut version = String::new();
    for line in text.lines() {
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        let v = v.trim().trim_matches('"').trim_matches('\'').to_string();
        match k.trim() {
            "PRETTY_NAME" => pretty = v,
            "ID" => id = v,
            "VERSION_ID" => version = v,
            _ => {}
        }
    }
    (pretty, id, version)
}

/// Parses `MemTotal` from /proc/meminfo into bytes.
pub fn parse_mem_total(meminfo: &str) -> u64 {
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kb| kb.parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// Non-loopback IP addresses of up interfaces.
fn addresses() -> Vec<String> {
    let mut out = Vec::new();
    let Ok(ifaddrs) = nix::ifaddrs::getifaddrs() else {
        return out;
    };
    for ifa in ifaddrs {
        if !ifa.flags.contains(nix::net::if_::InterfaceFlags::IFF_UP)
            || ifa.flags.contains(nix::net::if_::InterfaceFlags::IFF_LOOPBACK)
        {
            continue;
        }
        let Some(addr) = ifa.address else { continue };
        if let Some(v4) = addr.as_sockaddr_in() {
            out.push(v4.ip().to_string());
        } else if let Some(v6) = addr.as_sockaddr_in6() {
            let ip = v6.ip();
            if !ip.is_unicast_link_local() {
                out.push(ip.to_string());
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

/// The hostname as the kernel has it.
pub fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_default()
}

/// Collects every fact. Missing sources leave a field empty rather than
/// failing: a node with an odd /etc must still be able to register.
pub fn collect(roots: &FactRoots) -> NodeFacts {
    let os_release = std::fs::read_to_string(roots.etc.join("os-release"))
        .or_else(|_| std::fs::read_to_string("/usr/lib/os-release"))
        .unwrap_or_default();
    let (os, os_id, os_version) = parse_os_release(&os_release);
    let kernel = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    NodeFacts {
        hostname: hostname(),
        machine_id: read_trim(&roots.etc.join("machine-id")),
        boot_id: read_trim(&roots.proc.join("sys/kernel/random/boot_id")),
        kernel,
        os,
        os_id,
        os_version,
        arch: std::env::consts::ARCH.to_string(),
        cpus: std::thread::available_parallelism().map_or(0, |n| n.get() as u32),
        memory_bytes: parse_mem_total(&std::fs::read_to_string(roots.proc.join("meminfo")).unwrap_or_default()),
        addresses: addresses(),
        agent_version: nodekeeper_proto::VERSION.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn os_release_and_meminfo_parse() {
        let (p, id, v) = parse_os_release(
            "NAME=\"Debian GNU/Linux\"\nPRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\nID=debian\nVERSION_ID=\"12\"\n",
        );
        assert_eq!(
            (p.as_str(), id.as_str(), v.as_str()),
            ("Debian GNU/Linux 12 (bookworm)", "debian", "12")
        );
        assert_eq!(
            parse_mem_total("MemTotal:       24589100 kB\nMemFree: 1 kB\n"),
            24589100 * 1024
        );
        assert_eq!(parse_mem_total("garbage"), 0);
    }

    #[test]
    fn facts_of_this_machine_are_filled() {
        let f = collect(&FactRoots::default());
        assert!(!f.hostname.is_empty());
        assert!(!f.kernel.is_empty());
        assert_eq!(f.boot_id.len(), 36, "boot id from /proc: {:?}", f.boot_id);
        assert!(f.cpus >= 1);
        assert!(f.memory_bytes > 0);
    }
}
