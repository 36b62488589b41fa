//! node-problem-detector rule files (JSON or YAML): parsed, checked, and
//! their patterns compiled into the agent's matcher.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let _ = nodekeeper_agent::detect::rules::parse(std::path::Path::new("fuzz.json"), text);
});
