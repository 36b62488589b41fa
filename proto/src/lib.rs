//! The nodekeeper contract: wire messages of the agent link, the resource
//! model and its validation. Every other crate uses these definitions, so the
//! agent, hub, CLI and tests can never disagree about a field.

pub mod api;
pub mod checks;
pub mod codec;
pub mod component;
pub mod config;
pub mod count;
#[cfg(feature = "daemon")]
pub mod daemon;
pub mod document;
pub mod quantity;
pub mod remedy;
pub mod resource;
pub mod rules;
pub mod selector;
pub mod time;
#[cfg(feature = "tls")]
pub mod tls;
pub mod token;
pub mod validate;
pub mod window;

/// Generated protobuf types and the `AgentLink` gRPC service.
#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("nodekeeper.v1");
}

/// The calls of containerd's gRPC API the containerd probe and the
/// cleanDisk remedy make.
#[allow(clippy::all, missing_docs)]
pub mod containerd {
    pub mod version {
        tonic::include_proto!("containerd.services.version.v1");
    }
    pub mod containers {
        tonic::include_proto!("containerd.services.containers.v1");
    }
    pub mod images {
        tonic::include_proto!("containerd.services.images.v1");
    }
}

pub use resource::{Kind, Resource, ResourceError};

/// The `apiVersion` every nodekeeper resource carries.
pub const API_VERSION: &str = "nodekeeper.io/v1";

/// Version of the agent link protocol spoken by this build.
pub const LINK_PROTOCOL: u32 = 1;

/// Oldest link protocol this build still speaks (a hub serves agents from
/// here up to [`LINK_PROTOCOL`], so a fleet upgrades hub first, then agents).
pub const MIN_LINK_PROTOCOL: u32 = 1;

/// The gRPC metadata key in which a hub at one of its limits says, in
/// milliseconds, when an agent should try again (agents add jitter).
pub const RETRY_AFTER_MS: &str = "retry-after-ms";

/// Whether this build speaks link protocol `p`; `Err` says why not and what
/// to do, for the refusal message.
pub fn check_link_protocol(who: &str, p: u32) -> Result<(), String> {
    if (MIN_LINK_PROTOCOL..=LINK_PROTOCOL).contains(&p) {
        return Ok(());
    }
    let upgrade = if p > LINK_PROTOCOL { "this side" } else { who };
    Err(format!(
        "{who} speaks link protocol {p}, this build speaks {MIN_LINK_PROTOCOL}..={LINK_PROTOCOL} (version {VERSION}); upgrade {upgrade}"
    ))
}

/// Version of this build (the workspace version).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
