//! The operator HTTP/JSON API. Handlers translate HTTP to fleet calls and
//! fleet errors to status codes; the logic lives in [`crate::fleet`].

use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use nodekeeper_proto::document::parse_resources;
use nodekeeper_proto::{Kind, ResourceError};
use serde_json::{Value, json};

use nodekeeper_proto::api::{List, ListMeta, MAX_PAGE, page};

use crate::fleet::{Fleet, FleetError};

/// Largest request body accepted (a resource file), in bytes.
const MAX_BODY: usize = 4 << 20;

/// An API error: `{"error": "...", "field": "..."}` with a fitting status.
pub struct ApiError(StatusCode, String, Option<String>);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({ "error": self.1 });
        if let Some(f) = self.2 {
            body["field"] = Value::String(f);
        }
        (self.0, axum::Json(body)).into_response()
    }
}

impl From<FleetError> for ApiError {
    fn from(e: FleetError) -> Self {
        let code = match &e {
            FleetError::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
            FleetError::NotFound { .. } => StatusCode::NOT_FOUND,
            FleetError::Conflict { .. } => StatusCode::CONFLICT,
            FleetError::Store(_) => StatusCode::SERVICE_UNAVAILABLE,
        };
        let field = e.field().map(String::from);
        ApiError(code, e.to_string(), field)
    }
}

impl From<ResourceError> for ApiError {
    fn from(e: ResourceError) -> Self {
        FleetError::Invalid(e).into()
    }
}

type Api = Arc<Fleet>;
type JsonResult = Result<axum::Json<Value>, ApiError>;

/// The operator API router.
pub fn router(fleet: Arc<Fleet>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(|| async { "ok" }))
        .route("/metrics", get(metrics))
        .route("/v1/nodes", get(list_nodes))
        .route("/v1/nodes/{name}", get(get_node).delete(delete_node))
        .route("/v1/fleet/summary", get(summary))
        .route("/v1/apply", axum::routing::post(apply_any))
        .route("/v1/{kind}", get(list).post(apply_kind))
        .route("/v1/{kind}/{name}", get(get_one).delete(delete_one))
        .route("/v1/{kind}/{name}/revisions", get(revisions))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .with_state(fleet)
}

fn kind_of(plural: &str) -> Result<Kind, ApiError> {
    Kind::ALL.iter().copied().find(|k| k.plural() == plural).ok_or_else(|| {
        let known: Vec<&str> = Kind::ALL.iter().map(|k| k.plural()).collect();
        let msg = if Kind::planned(plural) {
            format!("{plural} are not served by this hub version yet")
        } else {
            format!("unknown kind {plural:?}; one of nodes, {}", known.join(", "))
        };
        ApiError(StatusCode::NOT_FOUND, msg, Some("kind".into()))
    })
}

async fn metrics(State(f): State<Api>) -> impl IntoResponse {
    f.refresh_component_metrics();
    (
        [(header::CONTENT_TYPE, nodekeeper_proto::daemon::METRICS_CONTENT_TYPE)],
        f.metrics.encode(),
    )
}

/// `?labelSelector=` (kubectl's syntax), `?limit=` and `?continue=` on lists.
#[derive(serde::Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct ListQuery {
    label_selector: Option<String>,
    /// Page size; absent or 0: everything in one answer.
    limit: Option<usize>,
    /// The `metadata.continue` token of the previous page.
    #[serde(rename = "continue")]
    continue_token: Option<String>,
}

impl ListQuery {
    fn limit(&self) -> Result<usize, ApiError> {
        match self.limit {
            None | Some(0) => Ok(usize::MAX),
            Some(n) if n <= MAX_PAGE => Ok(n),
            Some(n) => Err(ApiError(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("limit {n} is larger than {MAX_PAGE}; ask for smaller pages"),
                Some("limit".into()),
            )),
        }
    }
}

fn selector_of(q: &ListQuery) -> Result<Option<nodekeeper_proto::v1::LabelSelector>, ApiError> {
    Ok(q.label_selector
        .as_deref()
        .map(nodekeeper_proto::selector::parse)
        .transpose()?)
}

fn labels_of(v: &Value) -> std::collections::BTreeMap<String, String> {
    v["metadata"]["labels"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                .collect()
        })
        .unwrap_or_default()
}

async fn list_nodes(
    State(f): State<Api>,
    Query(q): Query<ListQuery>,
) -> Result<axum::Json<List<nodekeeper_proto::v1::Node>>, ApiError> {
    let sel = selector_of(&q)?;
    let limit = q.limit()?;
    let after = q.continue_token.as_deref().unwrap_or_default();
    let (items, next) = f.list_nodes_page(sel.as_ref(), after, limit);
    Ok(axum::Json(List {
        items,
        metadata: ListMeta { continue_token: next },
    }))
}

async fn get_node(State(f): State<Api>, Path(name): Path<String>) -> JsonResult {
    let node = f.get_node(&name)?;
    Ok(axum::Json(serde_json::to_value(node).unwrap_or(Value::Null)))
}

#[derive(serde::Deserialize, Default)]
struct DeleteQuery {
    #[serde(default)]
    force: bool,
}

async fn delete_node(State(f): State<Api>, Path(name): Path<String>, Query(q): Query<DeleteQuery>) -> JsonResult {
    let node = f.delete_node(&name, q.force).await?;
    Ok(axum::Json(serde_json::to_value(node).unwrap_or(Value::Null)))
}

async fn summary(State(f): State<Api>) -> JsonResult {
    Ok(axum::Json(serde_json::to_value(f.summary()).unwrap_or(Value::Null)))
}

async fn list(State(f): State<Api>, Path(kind): Path<String>, Query(q): Query<ListQuery>) -> JsonResult {
    let kind = kind_of(&kind)?;
    let sel = selector_of(&q)?;
    let limit = q.limit()?;
    let after = q.continue_token.as_deref().unwrap_or_default();
    let name = |r: &Value| r["metadata"]["name"].as_str().unwrap_or_default().to_string();
    let selected = f
        .list(kind)
        .into_iter()
        .filter(|r| nodekeeper_proto::selector::selects(sel.as_ref(), &labels_of(r)))
        .filter(|r| after.is_empty() || name(r).as_str() > after);
    let (items, next) = page(selected, limit, name);
    Ok(axum::Json(
        json!({ "items": items, "metadata": ListMeta { continue_token: next } }),
    ))
}

async fn get_one(State(f): State<Api>, Path((kind, name)): Path<(String, String)>) -> JsonResult {
    let kind = kind_of(&kind)?;
    Ok(axum::Json(f.get(kind, &name)?))
}

async fn revisions(State(f): State<Api>, Path((kind, name)): Path<(String, String)>) -> JsonResult {
    let k = kind_of(&kind)?;
    Ok(axum::Json(json!({ "items": f.revisions(k, &name)? })))
}

async fn delete_one(State(f): State<Api>, Path((kind, name)): Path<(String, String)>) -> JsonResult {
    let kind = kind_of(&kind)?;
    Ok(axum::Json(f.delete(kind, &name).await?))
}

async fn apply_kind(State(f): State<Api>, Path(kind): Path<String>, body: String) -> JsonResult {
    let kind = kind_of(&kind)?;
    let docs = parse_resources(&body)?;
    if let Some((i, d)) = docs.iter().enumerate().find(|(_, d)| d.kind() != kind) {
        return Err(ResourceError::new(
            "kind",
            format!(
                "{} posted to /v1/{}; use /v1/{} or /v1/apply",
                d.kind().name(),
                kind.plural(),
                d.kind().plural()
            ),
        )
        .in_document(i + 1)
        .into());
    }
    apply_docs(&f, docs).await
}

async fn apply_any(State(f): State<Api>, body: String) -> JsonResult {
    let docs = parse_resources(&body)?;
    apply_docs(&f, docs).await
}

async fn apply_docs(f: &Fleet, docs: Vec<nodekeeper_proto::Resource>) -> JsonResult {
    let results = f.apply(docs).await?;
    Ok(axum::Json(json!({ "items": results })))
}
