//! nodekeeper-hub: streams desired state to agents over gRPC, aggregates
//! their reports, and serves the operator API, on an embedded SQLite store.

pub mod api;
pub mod auth;
pub mod config;
pub mod defender;
pub mod failpoint;
pub mod fleet;
pub mod link;
pub mod metrics;
pub mod rollout;
pub mod store;
