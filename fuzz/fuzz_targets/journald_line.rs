//! Lines of `journalctl -o json`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(line) = std::str::from_utf8(data) else { return };
    let _ = nodekeeper_agent::detect::source::journald::parse_line(
        line,
        &[
            nodekeeper_agent::detect::source::journald::Filter::new(Some("kubelet"), None),
            nodekeeper_agent::detect::source::journald::Filter::new(None, Some("containerd")),
        ],
    );
});
