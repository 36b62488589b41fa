//! The node-local status socket: HTTP/JSON over a Unix socket (mode 0660,
//! group `socketGroup`), for nkctl on the node and local tooling.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use nodekeeper_proto::api::{ApiError, EventRecorded, List};
use nodekeeper_proto::v1::Event;

use crate::runtime::Agent;

/// Severities a local event may carry.
const SEVERITIES: &[&str] = &["Info", "Warning", "Error"];

/// The routes of the optional TCP `metrics.listen`: metrics and health only.
/// Whatever reads node details or changes state stays on the Unix socket,
/// whose mode and group decide who may use it.
pub fn metrics_router(agent: Arc<Agent>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .with_state(agent)
}

/// The socket's routes.
pub fn router(agent: Arc<Agent>) -> Router {
    Router::new()
        .route("/v1/status", get(status))
        .route("/v1/events", get(events).post(post_event))
        .route("/v1/conditions", get(conditions))
        .route("/v1/components", get(components))
        .route("/v1/remedies", get(remedies))
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .with_state(agent)
}

async fn status(State(a): State<Arc<Agent>>) -> impl IntoResponse {
    axum::Json(a.status())
}

async fn conditions(State(a): State<Arc<Agent>>) -> impl IntoResponse {
    axum::Json(List {
        items: a.conditions(),
        metadata: Default::default(),
    })
}

async fn components(State(a): State<Arc<Agent>>) -> impl IntoResponse {
    axum::Json(List {
        items: a.components(),
        metadata: Default::default(),
    })
}

async fn remedies(State(a): State<Arc<Agent>>) -> impl IntoResponse {
    axum::Json(serde_json::json!({ "items": a.remedies.list() }))
}

async fn events(State(a): State<Arc<Agent>>) -> impl IntoResponse {
    axum::Json(List {
        items: a.events(),
        metadata: Default::default(),
    })
}

async fn metrics(State(a): State<Arc<Agent>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            nodekeeper_proto::daemon::CLASSIC_METRICS_CONTENT_TYPE,
        )],
        a.metrics.encode(),
    )
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct NewEvent {
    reason: String,
    #[serde(default)]
    message: String,
    #[serde(default = "default_severity")]
    severity: String,
    #[serde(default = "default_source")]
    source: String,
}

fn default_severity() -> String {
    "Info".into()
}

fn default_source() -> String {
    "local".into()
}

fn bad(field: &str, msg: String) -> (StatusCode, axum::Json<serde_json::Value>) {
    (
        StatusCode::UNPROCESSABLE_ENTITY,
        axum::Json(
            serde_json::to_value(ApiError {
                error: msg,
                field: (!field.is_empty()).then(|| field.to_string()),
            })
            .unwrap_or_default(),
        ),
    )
}

/// Records an event on this node (from a script, a plugin or an operator);
/// answers once it is stored in the outbox.
async fn post_event(State(a): State<Arc<Agent>>, body: String) -> impl IntoResponse {
    let e: NewEvent = match serde_json::from_str(&body) {
        Ok(e) => e,
        Err(e) => {
            return bad("", format!("event must be JSON {{reason, message, severity}}: {e}"));
        }
    };
    let reason_ok =
        !e.reason.is_empty() && e.reason.len() <= 128 && e.reason.chars().all(|c| c.is_ascii_alphanumeric());
    if !reason_ok {
        return bad(
            "reason",
            format!("{:?} must be 1-128 ASCII letters and digits (CamelCase)", e.reason),
        );
    }
    if !SEVERITIES.contains(&e.severity.as_str()) {
        return bad(
            "severity",
            format!("{:?}: one of {}", e.severity, SEVERITIES.join(", ")),
        );
    }
    if e.message.len() > 4096 {
        return bad("message", "longer than 4096 bytes".into());
    }
    let ev = Event {
        reason: e.reason,
        message: e.message,
        severity: e.severity,
        source: e.source,
        ..Default::default()
    };
    // Stored with an fsync: off the runtime's workers.
    let recorded = match tokio::task::spawn_blocking(move || a.record_event(ev)).await {
        Ok(r) => r,
        Err(e) => {
            return (
                StatusCode::INTERNAL_SERVER_ERROR,
                axum::Json(
                    serde_json::to_value(ApiError {
                        error: format!("recording the event failed: {e}"),
                        field: None,
                    })
                    .unwrap_or_default(),
                ),
            );
        }
    };
    match recorded {
        Ok(sequence) => (
            StatusCode::CREATED,
            axum::Json(serde_json::to_value(EventRecorded { sequence }).unwrap_or_default()),
        ),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(
                serde_json::to_value(ApiError {
                    error: e.to_string(),
                    field: None,
                })
                .unwrap_or_default(),
            ),
        ),
    }
}

/// Binds the socket: removes a stale one, creates the directory, sets mode
/// 0660 and the group.
pub fn bind(path: &Path, group: &str) -> anyhow::Result<tokio::net::UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating socket directory {}", dir.display()))?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(e).with_context(|| format!("removing stale socket {}", path.display()));
        }
    }
    let listener = tokio::net::UnixListener::bind(path).with_context(|| {
        format!(
            "binding socket {}; set `socket` in the config to a writable path",
            path.display()
        )
    })?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .with_context(|| format!("chmod 0660 {}", path.display()))?;
    match nix::unistd::Group::from_name(group) {
        Ok(Some(g)) => {
            if let Err(e) = nix::unistd::chown(path, None, Some(g.gid)) {
                tracing::warn!(socket = %path.display(), group, error = %e, "cannot give the socket to its group");
            }
        }
        _ => tracing::debug!(group, "socket group does not exist; socket stays root-only"),
    }
    Ok(listener)
}
