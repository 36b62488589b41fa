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
