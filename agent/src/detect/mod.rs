//! Detection: what the agent learns about its node. Today the node's facts;
//! log, probe and hardware detectors join here.

pub mod facts;
