//! Reading resource documents: YAML or JSON, several documents per input
//! (`---` separated YAML, a JSON object, or a JSON `{"items": [...]}` list).

use serde_json::Value;

use crate::resource::{Resource, ResourceError};

/// Parses every document in `text` and validates each one. The first error
/// stops parsing and names the document (1-based) and field, so a caller can
/// refuse the whole input before applying any of it.
pub fn parse_resources(text: &str) -> Result<Vec<Resource>, ResourceError> {
    let mut out = Vec::new();
    for (i, value) in parse_values(text)?.into_iter().enumerate() {
        out.push(Resource::from_value(value).map_err(|e| e.in_document(i + 1))?);
    }
    Ok(out)
}

/// Reads every YAML/JSON document in `text` into JSON values; empty documents
/// are skipped and `{"items": [...]}` lists are flattened.
pub fn parse_values(text: &str) -> Result<Vec<Value>, ResourceError> {
    let mut out = Vec::new();
    for (i, doc) in serde_norway::Deserializer::from_str(text).enumerate() {
        let value: Value = serde::Deserialize::deserialize(doc)
            .map_err(|e| ResourceError::new("", format!("not valid YAML or JSON: {e}")).in_document(i + 1))?;
        match value {
            Value::Null => {}
            Value::Object(mut m) if m.contains_key("items") && !m.contains_key("kind") => {
                if let Some(Value::Array(items)) = m.remove("items") {
                    out.extend(items);
                }
            }
            v => out.push(v),
        }
    }
    if out.is_empty() {
        return Err(ResourceError::new("", "no resource documents found"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn several_yaml_documents_parse_and_validate() {
        let text = r#"
apiVersion: nodekeeper.io/v1
kind: NodeSet
metadata: {name: zone-a}
spec:
  selector:
    matchLabels: {zone: a}
---
apiVersion: nodekeeper.io/v1
kind: AgentProfile
metadata: {name: debug}
spec:
  logLevel: debug
  heartbeatSeconds: 5
  labels: {team: infra}
"#;
        let rs = parse_resources(text).expect("valid");
        assert_eq!(rs.len(), 2);
        assert_eq!(rs[0].name(), "zone-a");
        match &rs[1] {
            Resource::AgentProfile(ap) => {
                let spec = ap.spec.as_ref().expect("spec");
                assert_eq!(spec.log_level.as_deref(), Some("debug"));
                assert_eq!(spec.heartbeat_seconds, Some(5));
            }
            other => panic!("wrong kind {other:?}"),
        }
    }

    #[test]
    fn json_items_list_is_flattened() {
        let text =
            r#"{"items":[{"apiVersion":"nodekeeper.io/v1","kind":"NodeSet","metadata":{"name":"a"},"spec":{}}]}"#;
        assert_eq!(parse_resources(text).expect("valid").len(), 1);
    }

    fn err(text: &str) -> ResourceError {
        parse_resources(text).expect_err("must be refused")
    }

    #[test]
    fn errors_name_the_document_and_field() {
        let good = "apiVersion: nodekeeper.io/v1\nkind: NodeSet\nmetadata: {name: a}\nspec: {}\n";
        let e = err(&format!(
            "{good}---\napiVersion: nodekeeper.io/v1\nkind: AgentProfile\nmetadata: {{name: b}}\nspec: {{heartbeatSeconds: 0}}\n"
        ));
        assert_eq!(e.document, Some(2));
        assert_eq!(e.field, "spec.heartbeatSeconds");

        let e = err("apiVersion: nodekeeper.io/v1\nkind: AgentProfile\nmetadata: {name: b}\nspec: {logLevl: debug}\n");
        assert_eq!(e.field, "spec.logLevl");
        assert!(e.message.contains("unknown field"), "{e}");

        let e = err(
            "apiVersion: nodekeeper.io/v1\nkind: AgentProfile\nmetadata: {name: b}\nspec: {heartbeatSeconds: soon}\n",
        );
        assert_eq!(e.field, "spec.heartbeatSeconds");

        let e = err("apiVersion: nodekeeper.io/v1\nkind: AgentProfile\nmetadata: {name: b}\nspec: {logLevel: loud}\n");
        assert_eq!(e.field, "spec.logLevel");

        let e = err("apiVersion: v2\nkind: NodeSet\nmetadata: {name: a}\nspec: {}\n");
        assert_eq!(e.field, "apiVersion");

        let e = err("apiVersion: nodekeeper.io/v1\nkind: Widget\nmetadata: {name: a}\nspec: {}\n");
        assert_eq!(e.field, "kind");

        let e = err("apiVersion: nodekeeper.io/v1\nkind: NodeSet\nmetadata: {name: Bad_Name}\nspec: {}\n");
        assert_eq!(e.field, "metadata.name");

        let e = err(
            "apiVersion: nodekeeper.io/v1\nkind: NodeSet\nmetadata: {name: a}\nspec:\n  selector:\n    matchExpressions:\n    - {key: zone, operator: Near, values: [a]}\n",
        );
        assert_eq!(e.field, "spec.selector.matchExpressions[0].operator");

        let e = err(
            "apiVersion: nodekeeper.io/v1\nkind: NodeSet\nmetadata: {name: a}\nspec:\n  selector:\n    matchLabels: {zone: 'a b'}\n",
        );
        assert!(e.field.starts_with("spec.selector.matchLabels"), "{e}");

        let e = err("apiVersion: nodekeeper.io/v1\nkind: NodeSet\nmetadata: {name: a}\n");
        assert_eq!(e.field, "spec");

        let e = err("kind: [unterminated\n");
        assert!(e.message.contains("not valid YAML"), "{e}");

        let e = err("");
        assert!(e.message.contains("no resource"), "{e}");
    }

    #[test]
    fn status_sent_by_a_client_is_dropped() {
        let rs = parse_resources("apiVersion: nodekeeper.io/v1\nkind: AgentProfile\nmetadata: {name: b}\nspec: {}\nstatus: {selectedNodes: 3}\n").expect("valid");
        match &rs[0] {
            Resource::AgentProfile(ap) => assert!(ap.status.is_none()),
            other => panic!("wrong kind {other:?}"),
        }
    }
}

#[cfg(test)]
mod detector_set_tests {
    use super::*;

    #[test]
    fn detector_sets_validate_their_log_monitors_with_field_paths() {
        let good = "apiVersion: nodekeeper.io/v1\nkind: DetectorSet\nmetadata: {name: app}\nspec:\n  nodeSelector: {matchLabels: {role: web}}\n  logMonitors:\n  - plugin: filelog\n    logPath: /var/log/app.log\n    source: app\n    conditions: [{type: AppStuck, reason: AppFine, message: ok}]\n    rules:\n    - {type: temporary, reason: AppBoom, pattern: 'Boom .*'}\n    - {type: permanent, condition: AppStuck, reason: AppHung, pattern: 'hung', clearAfter: 5m}\n";
        let rs = parse_resources(good).expect("valid");
        assert_eq!(rs[0].kind(), crate::Kind::DetectorSet);
        let bad = good.replace(
            "condition: AppStuck, reason: AppHung",
            "condition: Nope, reason: AppHung",
        );
        let e = parse_resources(&bad).expect_err("undeclared condition");
        assert_eq!(e.field, "spec.logMonitors[0].rules[1].condition");
        let bad = good.replace("'Boom .*'", "'(unclosed'");
        assert_eq!(
            parse_resources(&bad).expect_err("bad regex").field,
            "spec.logMonitors[0].rules[0].pattern"
        );
        let bad = good.replace("plugin: filelog", "plugin: custom");
        assert_eq!(
            parse_resources(&bad).expect_err("plugin").field,
            "spec.logMonitors[0].plugin"
        );
        let bad = good.replace("clearAfter: 5m", "clearAfter: soon");
        assert_eq!(
            parse_resources(&bad).expect_err("duration").field,
            "spec.logMonitors[0].rules[1].clearAfter"
        );
    }
}
