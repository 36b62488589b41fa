//! Converge: bring the node to its desired state: the agent's own runtime
//! settings (AgentProfile) and node components at their declared versions.

pub mod component;
pub mod liveness;
pub mod settings;
