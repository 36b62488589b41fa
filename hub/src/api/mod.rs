//! The operator HTTP/JSON API. Handlers translate HTTP to fleet calls and
//! fleet errors to status codes; the logic lives in [`crate::fleet`].

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::{ConnectInfo, FromRef, Path, Query, Request, State};
use axum::http::{Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use nodekeeper_proto::document::parse_resources;
use nodekeeper_proto::{Kind, ResourceError};
use serde_json::{Value, json};

use nodekeeper_proto::api::{List, ListMeta, MAX_PAGE, page};

use crate::auth::audit::Record;
use crate::auth::tokens::Role;
use crate::auth::{Auth, Principal, TokenRequest};
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
        let mut r = (self.0, axum::Json(body)).into_response();
        r.extensions_mut().insert(ErrorNote(self.1));
        r
    }
}

/// Why a request failed, for the audit log.
#[derive(Clone)]
struct ErrorNote(String);

/// What a mutation changed, for the audit log (actor and source are the
/// request's).
#[derive(Clone)]
struct AuditNotes(Vec<Record>);

fn noted(body: Value, notes: Vec<Record>) -> Response {
    let mut r = axum::Json(body).into_response();
    r.extensions_mut().insert(AuditNotes(notes));
    r
}

fn note_of(action: &str, resource: &Value) -> Record {
    let kind = resource["kind"].as_str().unwrap_or_default();
    let plural = Kind::parse(kind).map_or_else(|| kind.to_ascii_lowercase(), |k| k.plural().to_string());
    let name = resource["metadata"]["name"].as_str().unwrap_or_default();
    Record::new("", action, format!("{plural}/{name}"))
        .version(resource["metadata"]["resourceVersion"].as_str().unwrap_or_default())
}

/// The API's state: the fleet, and who may do what.
#[derive(Clone)]
pub struct ApiState {
    pub fleet: Arc<Fleet>,
    pub auth: Arc<Auth>,
}

impl FromRef<ApiState> for Arc<Fleet> {
    fn from_ref(s: &ApiState) -> Arc<Fleet> {
        s.fleet.clone()
    }
}

impl FromRef<ApiState> for Arc<Auth> {
    fn from_ref(s: &ApiState) -> Arc<Auth> {
        s.auth.clone()
    }
}

/// The role a request needs; `None`: served to anyone (health, metrics).
fn required_role(method: &Method, path: &str) -> Option<Role> {
    if matches!(path, "/healthz" | "/readyz" | "/metrics") {
        return None;
    }
    let read = method == Method::GET || method == Method::HEAD;
    Some(if path == "/v1/tokens" || path.starts_with("/v1/tokens/") {
        Role::Admin
    } else if path.starts_with("/v1/audit") {
        if read { Role::Operator } else { Role::Admin }
    } else if path.starts_with("/v1/nodes/") && !read {
        Role::Admin
    } else if read {
        Role::Viewer
    } else {
        Role::Operator
    })
}

/// Authenticates the bearer token, checks the role, and audits every
/// mutation and every refusal.
async fn authorize(State(auth): State<Arc<Auth>>, mut req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let Some(need) = required_role(&method, &path) else {
        return next.run(req).await;
    };
    let source = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.to_string())
        .unwrap_or_default();
    let action = format!("{} {path}", method.as_str());
    let header = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    let principal: Principal = match auth.authenticate(header) {
        Ok(p) => p,
        Err(why) => {
            auth.record(
                Record::new("unauthenticated", action, path)
                    .refused(&why)
                    .source(source),
            );
            let mut r = ApiError(StatusCode::UNAUTHORIZED, why, None).into_response();
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
            return r;
        }
    };
    if principal.role < need {
        let why = format!(
            "{} has role {}; {} {} needs {}",
            principal.name,
            principal.role.as_str(),
            method.as_str(),
            path,
            need.as_str()
        );
        auth.record(Record::new(&principal.name, action, path).refused(&why).source(source));
        return ApiError(StatusCode::FORBIDDEN, why, None).into_response();
    }
    req.extensions_mut().insert(principal.clone());
    let resp = next.run(req).await;
    let read = method == Method::GET || method == Method::HEAD;
    if !read {
        let status = resp.status();
        let error = resp.extensions().get::<ErrorNote>().map(|e| e.0.clone());
        match resp.extensions().get::<AuditNotes>() {
            Some(notes) if status.is_success() => {
                for n in &notes.0 {
                    let mut r = n.clone();
                    r.actor = principal.name.clone();
                    auth.record(r.source(&source));
                }
            }
            _ => {
                let r = Record::new(&principal.name, action, path).source(source);
                auth.record(if status.is_success() {
                    r
                } else {
                    r.failed(error.unwrap_or_else(|| status.to_string()))
                });
            }
        }
    }
    resp
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
type ApiResult = Result<Response, ApiError>;
type JsonResult = Result<axum::Json<Value>, ApiError>;

/// The operator API router.
pub fn router(fleet: Arc<Fleet>, auth: Arc<Auth>) -> Router {
    let state = ApiState { fleet, auth };
    Router::new()
        .route("/v1/tokens", get(list_tokens).post(create_token))
        .route("/v1/tokens/{id}", axum::routing::delete(delete_token))
        .route("/v1/nodes/{name}/revoke", post(revoke_node))
        .route("/v1/audit", get(audit))
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
        .route("/v1/components/{name}/rollout/{verb}", post(rollout_verb))
        .route("/v1/permits", get(permits))
        .route("/v1/remedies", get(remedies))
        .route("/v1/remedies/{id}", get(remedy))
        .route("/v1/remedies/{id}/{verb}", post(remedy_verb))
        .route("/v1/remedyrules/{name}/breaker/reset", post(breaker_reset))
        .route("/v1/incidents", get(incidents))
        .route("/v1/freeze", get(freeze_state).post(set_freeze))
        .layer(axum::middleware::from_fn_with_state(state.clone(), authorize))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .with_state(state)
}

fn kind_of(plural: &str) -> Result<Kind, ApiError> {
    Kind::ALL.iter().copied().find(|k| k.plural() == plural).ok_or_else(|| {
        let known: Vec<&str> = Kind::ALL.iter().map(|k| k.plural()).collect();
        let msg = format!("unknown kind {plural:?}; one of nodes, {}", known.join(", "));
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

async fn delete_node(State(s): State<ApiState>, Path(name): Path<String>, Query(q): Query<DeleteQuery>) -> ApiResult {
    let node = s.fleet.delete_node(&name, q.force).await?;
    // The name is free again: another machine may join as it.
    s.auth.forget(&name);
    let v = serde_json::to_value(node).unwrap_or(Value::Null);
    let note = Record::new("", "delete", format!("nodes/{name}"));
    Ok(noted(v, vec![note]))
}

async fn revoke_node(State(s): State<ApiState>, Path(name): Path<String>) -> ApiResult {
    if !s.auth.revoke(&name).await.map_err(FleetError::Store)? {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("node {name:?} has no identity on this hub (never joined, or deleted)"),
            None,
        ));
    }
    s.fleet.end_session(&name);
    tracing::warn!(node = %name, "node revoked; its certificates are refused from now on");
    let v = json!({ "node": name, "revoked": true });
    Ok(noted(v, vec![Record::new("", "revoke", format!("nodes/{name}"))]))
}

async fn create_token(
    State(s): State<ApiState>,
    axum::Extension(p): axum::Extension<Principal>,
    body: String,
) -> ApiResult {
    let req: TokenRequest = serde_json::from_str(&body)
        .map_err(|e| ApiError(StatusCode::UNPROCESSABLE_ENTITY, format!("token request: {e}"), None))?;
    let (text, t) = s
        .auth
        .create_token(req, &p.name)
        .await
        .map_err(|e| ApiError(StatusCode::UNPROCESSABLE_ENTITY, e, None))?;
    let mut v = t.view();
    v["token"] = Value::String(text);
    v["caCertHash"] = Value::String(s.auth.ca_pin());
    Ok(noted(
        v,
        vec![Record::new("", "token.create", format!("tokens/{}", t.id))],
    ))
}

async fn list_tokens(State(a): State<Arc<Auth>>) -> JsonResult {
    Ok(axum::Json(json!({ "items": a.tokens() })))
}

async fn delete_token(State(a): State<Arc<Auth>>, Path(id): Path<String>) -> ApiResult {
    match a.delete_token(&id).await.map_err(FleetError::Store)? {
        Some(t) => Ok(noted(
            t.view(),
            vec![Record::new("", "token.delete", format!("tokens/{id}"))],
        )),
        None => Err(ApiError(StatusCode::NOT_FOUND, format!("token {id:?} not found"), None)),
    }
}

/// `GET /v1/audit`: `since`/`until` (RFC 3339, or a duration back from
/// now such as `1h`), `actor`, `action` (a prefix), `limit`, `continue`.
#[derive(serde::Deserialize, Default)]
struct AuditQuery {
    since: Option<String>,
    until: Option<String>,
    actor: Option<String>,
    action: Option<String>,
    limit: Option<usize>,
    #[serde(rename = "continue")]
    continue_token: Option<String>,
}

fn time_param(field: &str, s: &str) -> Result<std::time::SystemTime, ApiError> {
    if let Some(t) = nodekeeper_proto::time::parse_rfc3339(s) {
        return Ok(t);
    }
    humantime::parse_duration(s)
        .ok()
        .and_then(|d| std::time::SystemTime::now().checked_sub(d))
        .ok_or_else(|| {
            ApiError(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("{field} {s:?}: an RFC 3339 time or a duration back from now (1h)"),
                Some(field.into()),
            )
        })
}

async fn audit(State(a): State<Arc<Auth>>, Query(q): Query<AuditQuery>) -> JsonResult {
    let limit = match q.limit {
        None | Some(0) => MAX_PAGE,
        Some(n) if n <= MAX_PAGE => n,
        Some(n) => {
            return Err(ApiError(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("limit {n} is larger than {MAX_PAGE}; ask for smaller pages"),
                Some("limit".into()),
            ));
        }
    };
    let after = match q.continue_token.as_deref().filter(|s| !s.is_empty()) {
        Some(c) => c.parse().map_err(|_| {
            ApiError(
                StatusCode::UNPROCESSABLE_ENTITY,
                "bad continue token".into(),
                Some("continue".into()),
            )
        })?,
        None => 0,
    };
    let query = crate::auth::audit::Query {
        since: q.since.as_deref().map(|s| time_param("since", s)).transpose()?,
        until: q.until.as_deref().map(|s| time_param("until", s)).transpose()?,
        actor: q.actor.filter(|s| !s.is_empty()),
        action: q.action.filter(|s| !s.is_empty()),
        after,
        limit,
    };
    let (items, more) = a.audit(&query);
    let next = if more {
        items.last().map(|e| e.id.to_string()).unwrap_or_default()
    } else {
        String::new()
    };
    Ok(axum::Json(
        json!({ "items": items, "metadata": ListMeta { continue_token: next } }),
    ))
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

#[derive(serde::Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct RolloutBody {
    to_revision: Option<i64>,
}

/// `POST /v1/components/{name}/rollout/{pause|resume|undo}`.
async fn rollout_verb(State(f): State<Api>, Path((name, verb)): Path<(String, String)>, body: String) -> ApiResult {
    let b: RolloutBody = if body.trim().is_empty() {
        RolloutBody::default()
    } else {
        serde_json::from_str(&body).map_err(|e| ResourceError::new("", format!("the request body: {e}")))?
    };
    let v = match verb.as_str() {
        "pause" => f.set_paused(&name, true).await?,
        "resume" => f.set_paused(&name, false).await?,
        "undo" => f.undo(&name, b.to_revision).await?,
        other => {
            return Err(ApiError(
                StatusCode::NOT_FOUND,
                format!("no rollout verb {other:?}; pause, resume or undo"),
                None,
            ));
        }
    };
    let note = note_of(&format!("rollout {verb}"), &v);
    Ok(noted(v, vec![note]))
}

async fn remedies(
    State(f): State<Api>,
    axum::extract::Query(q): axum::extract::Query<crate::fleet::JobFilter>,
) -> JsonResult {
    Ok(axum::Json(json!({ "items": f.remedy_jobs(&q) })))
}

async fn remedy(State(f): State<Api>, Path(id): Path<String>) -> JsonResult {
    Ok(axum::Json(serde_json::to_value(f.remedy_job(&id)?).unwrap_or_default()))
}

async fn remedy_verb(
    State(f): State<Api>,
    principal: Option<axum::Extension<Principal>>,
    Path((id, verb)): Path<(String, String)>,
) -> ApiResult {
    let approve = match verb.as_str() {
        "approve" => true,
        "deny" => false,
        other => {
            return Err(ApiError(
                StatusCode::NOT_FOUND,
                format!("no remedy verb {other:?}; approve or deny"),
                None,
            ));
        }
    };
    let actor = principal
        .map(|p| p.0.name.clone())
        .unwrap_or_else(|| "anonymous".into());
    let a = f.decide_approval(&id, approve, &actor).await?;
    let note = Record::new(
        "",
        format!("remedy {verb} (node {}, rule {})", a.node, a.rule),
        format!("remedies/{id}"),
    );
    Ok(noted(serde_json::to_value(a).unwrap_or_default(), vec![note]))
}

async fn breaker_reset(
    State(f): State<Api>,
    principal: Option<axum::Extension<Principal>>,
    Path(name): Path<String>,
) -> ApiResult {
    let actor = principal
        .map(|p| p.0.name.clone())
        .unwrap_or_else(|| "anonymous".into());
    let b = f.reset_breaker(&name, &actor).await?;
    let note = Record::new("", "remedy breaker reset", format!("remedyrules/{name}"));
    Ok(noted(serde_json::to_value(b).unwrap_or_default(), vec![note]))
}

async fn incidents(State(f): State<Api>) -> JsonResult {
    Ok(axum::Json(json!({ "items": f.incidents() })))
}

async fn permits(State(f): State<Api>) -> JsonResult {
    Ok(axum::Json(json!({ "items": f.permits() })))
}

async fn freeze_state(State(f): State<Api>) -> JsonResult {
    Ok(axum::Json(serde_json::to_value(f.freeze_state()).unwrap_or_default()))
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct FreezeBody {
    frozen: bool,
    #[serde(default)]
    reason: String,
}

/// `POST /v1/freeze {"frozen": true, "reason": "..."}`: while frozen the
/// defender grants no new permits.
async fn set_freeze(State(f): State<Api>, principal: Option<axum::Extension<Principal>>, body: String) -> ApiResult {
    let b: FreezeBody =
        serde_json::from_str(&body).map_err(|e| ResourceError::new("frozen", format!("the request body: {e}")))?;
    if b.frozen && b.reason.trim().is_empty() {
        return Err(ResourceError::new("reason", "say why the fleet is frozen (nkctl freeze on --reason TEXT)").into());
    }
    let actor = principal
        .map(|p| p.0.name.clone())
        .unwrap_or_else(|| "anonymous".into());
    let v = f.set_freeze(b.frozen, &b.reason, &actor).await?;
    let action = if b.frozen {
        format!("freeze on ({})", b.reason.trim())
    } else {
        "freeze off".to_string()
    };
    let note = Record::new("", action, "fleet/freeze");
    Ok(noted(serde_json::to_value(v).unwrap_or_default(), vec![note]))
}

async fn delete_one(State(f): State<Api>, Path((kind, name)): Path<(String, String)>) -> ApiResult {
    let kind = kind_of(&kind)?;
    let v = f.delete(kind, &name).await?;
    let note = note_of("delete", &v);
    Ok(noted(v, vec![note]))
}

async fn apply_kind(State(f): State<Api>, Path(kind): Path<String>, body: String) -> ApiResult {
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

async fn apply_any(State(f): State<Api>, body: String) -> ApiResult {
    let docs = parse_resources(&body)?;
    apply_docs(&f, docs).await
}

async fn apply_docs(f: &Fleet, docs: Vec<nodekeeper_proto::Resource>) -> ApiResult {
    let results = f.apply(docs).await?;
    let notes = results
        .iter()
        .map(|r| {
            let action = serde_json::to_value(r.action)
                .ok()
                .and_then(|v| v.as_str().map(String::from))
                .unwrap_or_default();
            note_of(&format!("apply ({action})"), &r.resource)
        })
        .collect();
    Ok(noted(json!({ "items": results }), notes))
}
