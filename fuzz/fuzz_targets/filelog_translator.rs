//! The filelog translator: a rule file's `pluginConfig` (timestamp and
//! message regexes, a Go time layout) applied to log lines. The input is
//! four fields separated by NUL: timestamp regex, message regex, layout,
//! line. Patterns longer than 64 bytes are skipped: compiling them is the
//! regex crate's business (its size limits apply) and only slows the search
//! for bugs in the translator and the time parser.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nodekeeper_agent::detect::source::file::{Translator, parse_go_time};
use nodekeeper_proto::v1::LogPluginConfig;

fuzz_target!(|data: &[u8]| {
    let mut parts = data.splitn(4, |b| *b == 0);
    let (Some(ts), Some(msg), Some(layout), Some(line)) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return;
    };
    let (Ok(ts), Ok(msg), Ok(layout)) = (std::str::from_utf8(ts), std::str::from_utf8(msg), std::str::from_utf8(layout))
    else {
        return;
    };
    let now = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000);
    if let Ok(s) = std::str::from_utf8(line) {
        let _ = parse_go_time(layout, s, now);
    }
    if ts.len() > 64 || msg.len() > 64 {
        return;
    }
    let c = LogPluginConfig {
        timestamp: Some(ts.to_string()).filter(|s| !s.is_empty()),
        message: Some(msg.to_string()).filter(|s| !s.is_empty()),
        timestamp_format: Some(layout.to_string()),
        ..Default::default()
    };
    if let Ok(t) = Translator::new(&c) {
        let _ = t.translate(line, now);
    }
});
