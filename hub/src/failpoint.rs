//! Test hooks for crash and stall tests, in debug builds only: the names in
//! `NODEKEEPER_FAILPOINT` (comma separated) switch them on. Release builds
//! compile them away.

/// Ends the process with SIGKILL at the named point, as a crash or power
/// loss would (no destructors, no flush).
pub fn kill_if(name: &str) {
    #[cfg(debug_assertions)]
    if enabled(name) {
        tracing::warn!(failpoint = name, "failpoint: killing the hub");
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    }
    #[cfg(not(debug_assertions))]
    let _ = name;
}

/// Whether failpoint `name` is switched on.
#[cfg(debug_assertions)]
pub fn enabled(name: &str) -> bool {
    std::env::var("NODEKEEPER_FAILPOINT").is_ok_and(|v| v.split(',').any(|f| f == name))
}

/// The time the hub's controllers see. Debug builds only: with
/// `clock=PATH` in `NODEKEEPER_FAILPOINT`, the RFC 3339 time in PATH (when
/// it exists and parses) replaces the real clock, so tests can move time
/// for rollout windows and permit TTLs. Release builds read the real clock.
pub fn now() -> std::time::SystemTime {
    #[cfg(debug_assertions)]
    if let Some(path) = std::env::var("NODEKEEPER_FAILPOINT")
        .ok()
        .and_then(|v| v.split(',').find_map(|f| f.strip_prefix("clock=").map(String::from)))
        && let Ok(text) = std::fs::read_to_string(&path)
        && let Some(t) = nodekeeper_proto::time::parse_rfc3339(text.trim())
    {
        return t;
    }
    std::time::SystemTime::now()
}
