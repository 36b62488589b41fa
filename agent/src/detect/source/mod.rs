//! Log sources the log monitors read.

pub mod kmsg;
