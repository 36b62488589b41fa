//! Reporting: what the node tells the hub (and the local socket), kept in a
//! durable outbox until the hub acknowledges it.

pub mod outbox;
