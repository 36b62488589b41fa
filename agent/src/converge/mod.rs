//! Converge: bring the node to its desired state. Today the agent's own
//! runtime settings (AgentProfile); node components join here.

pub mod settings;
