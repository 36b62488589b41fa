//! The resource envelope (apiVersion/kind/metadata/spec/status) over the
//! generated types, so the hub can store, version and serve every kind with
//! one piece of code.

use serde_json::Value;

use crate::API_VERSION;
use crate::v1::{AgentProfile, Component, DetectorSet, DisruptionBudget, NodeSet, ObjectMeta, RemedyRule};

/// An error in a resource document, naming the field it is about.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{field}: {message}", document.map(|d| format!("document {d}: ")).unwrap_or_default())]
pub struct ResourceError {
    /// Dotted path of the offending field (`spec.heartbeatSeconds`).
    pub field: String,
    /// What is wrong and what is expected.
    pub message: String,
    /// 1-based index of the document in a multi-document input, when known.
    pub document: Option<usize>,
}

impl ResourceError {
    /// An error about `field`.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
            document: None,
        }
    }

    /// The same error, located in document `n` (1-based).
    pub fn in_document(mut self, n: usize) -> Self {
        self.document = Some(n);
        self
    }
}

/// The kinds an operator can apply. `Node` is registered by agents and is not
/// in this list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    NodeSet,
    AgentProfile,
    DetectorSet,
    Component,
    DisruptionBudget,
    RemedyRule,
}

impl Kind {
    /// Every appliable kind.
    pub const ALL: &[Kind] = &[
        Kind::NodeSet,
        Kind::AgentProfile,
        Kind::DetectorSet,
        Kind::Component,
        Kind::DisruptionBudget,
        Kind::RemedyRule,
    ];

    /// The `kind` field value.
    pub fn name(self) -> &'static str {
        match self {
            Kind::NodeSet => "NodeSet",
            Kind::AgentProfile => "AgentProfile",
            Kind::DetectorSet => "DetectorSet",
            Kind::Component => "Component",
            Kind::DisruptionBudget => "DisruptionBudget",
            Kind::RemedyRule => "RemedyRule",
        }
    }

    /// The lower-case plural used in API paths (`/v1/nodesets`).
    pub fn plural(self) -> &'static str {
        match self {
            Kind::NodeSet => "nodesets",
            Kind::AgentProfile => "agentprofiles",
            Kind::DetectorSet => "detectorsets",
            Kind::Component => "components",
            Kind::DisruptionBudget => "disruptionbudgets",
            Kind::RemedyRule => "remedyrules",
        }
    }

    /// Resolves a `kind` field value, a plural, a singular or a short name,
    /// case-insensitively (as kubectl does).
    pub fn parse(s: &str) -> Option<Kind> {
        let s = s.to_ascii_lowercase();
        Kind::ALL.iter().copied().find(|k| {
            let name = k.name().to_ascii_lowercase();
            s == name || s == k.plural() || k.short() == s
        })
    }

    /// The short name for nkctl (`ns`, `ap`).
    pub fn short(self) -> &'static str {
        match self {
            Kind::NodeSet => "ns",
            Kind::AgentProfile => "ap",
            Kind::DetectorSet => "ds",
            Kind::Component => "comp",
            Kind::DisruptionBudget => "db",
            Kind::RemedyRule => "rr",
        }
    }
}

/// A resource of any appliable kind.
// A DetectorSet is large (its checks inline); resources are parsed one by
// one at an apply, so boxing it would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Resource {
    NodeSet(NodeSet),
    AgentProfile(AgentProfile),
    DetectorSet(DetectorSet),
    /// Boxed: a Component is much larger than the other kinds.
    Component(Box<Component>),
    DisruptionBudget(DisruptionBudget),
    RemedyRule(RemedyRule),
}

impl Resource {
    /// The resource's kind.
    pub fn kind(&self) -> Kind {
        match self {
            Resource::NodeSet(_) => Kind::NodeSet,
            Resource::AgentProfile(_) => Kind::AgentProfile,
            Resource::DetectorSet(_) => Kind::DetectorSet,
            Resource::Component(_) => Kind::Component,
            Resource::DisruptionBudget(_) => Kind::DisruptionBudget,
            Resource::RemedyRule(_) => Kind::RemedyRule,
        }
    }

    /// The metadata (always present after parsing).
    pub fn metadata(&self) -> &ObjectMeta {
        static EMPTY: ObjectMeta = ObjectMeta {
            name: String::new(),
            labels: std::collections::BTreeMap::new(),
            resource_version: String::new(),
            generation: 0,
            creation_timestamp: String::new(),
        };
        let m = match self {
            Resource::NodeSet(r) => r.metadata.as_ref(),
            Resource::AgentProfile(r) => r.metadata.as_ref(),
            Resource::DetectorSet(r) => r.metadata.as_ref(),
            Resource::Component(r) => r.metadata.as_ref(),
            Resource::DisruptionBudget(r) => r.metadata.as_ref(),
            Resource::RemedyRule(r) => r.metadata.as_ref(),
        };
        m.unwrap_or(&EMPTY)
    }

    /// Mutable metadata, created when absent.
    pub fn metadata_mut(&mut self) -> &mut ObjectMeta {
        match self {
            Resource::NodeSet(r) => r.metadata.get_or_insert_with(Default::default),
            Resource::AgentProfile(r) => r.metadata.get_or_insert_with(Default::default),
            Resource::DetectorSet(r) => r.metadata.get_or_insert_with(Default::default),
            Resource::Component(r) => r.metadata.get_or_insert_with(Default::default),
            Resource::DisruptionBudget(r) => r.metadata.get_or_insert_with(Default::default),
            Resource::RemedyRule(r) => r.metadata.get_or_insert_with(Default::default),
        }
    }

    /// The resource name.
    pub fn name(&self) -> &str {
        &self.metadata().name
    }

    /// The spec as JSON, for comparing two versions of a resource.
    pub fn spec_value(&self) -> Value {
        let spec = match self {
            Resource::NodeSet(r) => serde_json::to_value(&r.spec),
            Resource::AgentProfile(r) => serde_json::to_value(&r.spec),
            Resource::DetectorSet(r) => serde_json::to_value(&r.spec),
            Resource::Component(r) => serde_json::to_value(&r.spec),
            Resource::DisruptionBudget(r) => serde_json::to_value(&r.spec),
            Resource::RemedyRule(r) => serde_json::to_value(&r.spec),
        };
        spec.unwrap_or(Value::Null)
    }

    /// Drops any status a client sent: status is owned by the hub.
    pub fn clear_status(&mut self) {
        match self {
            Resource::NodeSet(r) => r.status = None,
            Resource::AgentProfile(r) => r.status = None,
            Resource::DetectorSet(r) => r.status = None,
            Resource::Component(r) => r.status = None,
            Resource::DisruptionBudget(r) => r.status = None,
            Resource::RemedyRule(r) => r.status = None,
        }
    }

    /// Fills in `apiVersion` and `kind` (for resources built in code).
    pub fn normalize_envelope(&mut self) {
        let kind = self.kind().name().to_string();
        let (api, k) = match self {
            Resource::NodeSet(r) => (&mut r.api_version, &mut r.kind),
            Resource::AgentProfile(r) => (&mut r.api_version, &mut r.kind),
            Resource::DetectorSet(r) => (&mut r.api_version, &mut r.kind),
            Resource::Component(r) => (&mut r.api_version, &mut r.kind),
            Resource::DisruptionBudget(r) => (&mut r.api_version, &mut r.kind),
            Resource::RemedyRule(r) => (&mut r.api_version, &mut r.kind),
        };
        *api = API_VERSION.to_string();
        *k = kind;
    }

    /// The whole resource as JSON.
    pub fn to_value(&self) -> Value {
        let v = match self {
            Resource::NodeSet(r) => serde_json::to_value(r),
            Resource::AgentProfile(r) => serde_json::to_value(r),
            Resource::DetectorSet(r) => serde_json::to_value(r),
            Resource::Component(r) => serde_json::to_value(r),
            Resource::DisruptionBudget(r) => serde_json::to_value(r),
            Resource::RemedyRule(r) => serde_json::to_value(r),
        };
        v.unwrap_or(Value::Null)
    }

    /// Parses and validates one resource document already read into JSON.
    /// Errors name the field (`spec.nodeSelector.matchExpressions[0].operator`).
    pub fn from_value(value: Value) -> Result<Resource, ResourceError> {
        let obj = value.as_object().ok_or_else(|| {
            ResourceError::new(
                "",
                "a resource must be a mapping with apiVersion, kind, metadata and spec",
            )
        })?;
        let api = obj.get("apiVersion").and_then(Value::as_str).unwrap_or_default();
        if api != API_VERSION {
            return Err(ResourceError::new(
                "apiVersion",
                format!("must be {API_VERSION:?}, got {api:?}"),
            ));
        }
        let kind_str = obj.get("kind").and_then(Value::as_str).ok_or_else(|| {
            ResourceError::new(
                "kind",
                "missing; one of NodeSet, AgentProfile, DetectorSet, Component, DisruptionBudget, RemedyRule",
            )
        })?;
        let kind = Kind::ALL
            .iter()
            .copied()
            .find(|k| k.name() == kind_str)
            .ok_or_else(|| {
                ResourceError::new(
                    "kind",
                    format!("unknown kind {kind_str:?}; one of NodeSet, AgentProfile, DetectorSet, Component, DisruptionBudget, RemedyRule"),
                )
            })?;
        let mut r = match kind {
            Kind::NodeSet => Resource::NodeSet(typed(value)?),
            Kind::AgentProfile => Resource::AgentProfile(typed(value)?),
            Kind::DetectorSet => Resource::DetectorSet(typed(value)?),
            Kind::Component => Resource::Component(Box::new(typed(value)?)),
            Kind::DisruptionBudget => Resource::DisruptionBudget(typed(value)?),
            Kind::RemedyRule => Resource::RemedyRule(typed(value)?),
        };
        crate::validate::resource(&r)?;
        r.clear_status();
        Ok(r)
    }
}

/// Deserializes into a generated type, keeping the path of the field that failed.
pub fn typed<T: serde::de::DeserializeOwned>(value: Value) -> Result<T, ResourceError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let field = e.path().to_string();
        let field = if field == "." { String::new() } else { field };
        ResourceError::new(field, e.into_inner().to_string())
    })
}
