//! Remedies: a condition held long enough starts a job that climbs a ladder
//! of actions under the defender's permits (issue 15). What is here so far is
//! the job's lifecycle as a pure state machine ([`job`]); the RemedyRule
//! resource, the executor that persists jobs and runs the actions, and the
//! hub's side are not built yet.

pub mod job;
