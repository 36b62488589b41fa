//! Detection: what the agent learns about its node — its facts, and problems
//! found in kernel and system logs by node-problem-detector-compatible rules,
//! and by asking (custom plugins, probes, resource and hardware checks).

pub mod aggregate;
pub mod checks;
pub mod defaults;
pub mod facts;
pub mod manager;
pub mod matcher;
pub mod monitor;
pub mod pipeline;
pub mod rules;
pub mod source;
pub mod stop;
pub mod test_rules;

use std::time::SystemTime;

use nodekeeper_proto::v1::Event;

/// An event from a detector (a log source, a check), now.
pub fn event(source: &str, reason: &str, severity: &str, message: String) -> Event {
    Event {
        time: nodekeeper_proto::time::rfc3339(SystemTime::now()),
        severity: severity.into(),
        reason: reason.into(),
        message,
        source: source.into(),
        count: 1,
        first_time: String::new(),
    }
}
