//! nodekeeper-agent: detects faults on its node, converges node components
//! to their declared state, reports to the hub, and serves a local socket.

pub mod config;
pub mod containerd;
pub mod converge;
pub mod detect;
pub mod exec;
pub mod hollow;
pub mod link;
pub mod metrics;
pub mod remedy;
pub mod report;
pub mod retry;
pub mod runtime;
pub mod status;
pub mod store;
