//! The filelog translator on log lines, the outside input it sees: each of
//! NPD's filelog configurations (timestamp and message regexes, Go time
//! layout; the first input byte picks one) applied to the rest of the input
//! as a line, and the Go time parser on an input layout and value (the
//! patterns themselves come from rule files: `npd_rules` fuzzes those).
#![no_main]

use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use libfuzzer_sys::fuzz_target;
use nodekeeper_agent::detect::source::file::{Translator, parse_go_time};
use nodekeeper_proto::v1::LogPluginConfig;

/// NPD's shipped filelog configurations (config/*-filelog.json).
const CONFIGS: &[(&str, &str, &str)] = &[
    ("^.{15}", "kernel: \\[.*\\] (.*)", "Jan _2 15:04:05"),
    (
        "^time=\"(\\S*)\"",
        "msg=\"([^\n]*)\"",
        "2006-01-02T15:04:05.999999999-07:00",
    ),
    (
        "^.{15}",
        "(?i)Currently unreadable.*sectors|(?i)Offline uncorrectable sectors",
        "Jan _2 15:04:05",
    ),
];

fn translators() -> &'static [Translator] {
    static T: OnceLock<Vec<Translator>> = OnceLock::new();
    T.get_or_init(|| {
        CONFIGS
            .iter()
            .map(|(ts, msg, layout)| {
                Translator::new(
                    &LogPluginConfig {
                        timestamp: Some(ts.to_string()),
                        message: Some(msg.to_string()),
                        timestamp_format: Some(layout.to_string()),
                        ..Default::default()
                    },
                    &["skip".to_string()],
                )
                .expect("NPD's configurations compile")
            })
            .collect()
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&pick, line)) = data.split_first() else {
        return;
    };
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let t = &translators()[usize::from(pick) % CONFIGS.len()];
    let _ = t.translate(line, now);
    // The same bytes as "layout NUL value" for the time parser.
    if let Some(nul) = line.iter().position(|b| *b == 0)
        && let (Ok(layout), Ok(value)) = (std::str::from_utf8(&line[..nul]), std::str::from_utf8(&line[nul + 1..]))
    {
        let _ = parse_go_time(layout, value, now);
    }
});
