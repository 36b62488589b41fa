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
