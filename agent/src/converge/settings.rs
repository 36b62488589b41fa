//! Applying the agent settings of a desired state: log level, heartbeat
//! interval, extra labels. Desired state comes from the network, so it is
//! checked before anything changes, and cached on disk so the agent applies
//! it at start even when the hub is unreachable.

use nodekeeper_proto::v1::{AgentSettings, DesiredState};
use nodekeeper_proto::validate;
use prost::Message;

use crate::runtime::{Agent, default_settings};
use crate::store::keys;

/// Checks settings received from the hub. Log monitors and components equal
/// to ones in `applied` (checked when they were applied) are not compiled
/// again: a hub restart resends every node's whole desired state, and
/// compiling regexes and templates once per unchanged item is wasted work on
/// every node.
pub fn check(s: &AgentSettings, applied: Option<&AgentSettings>) -> Result<(), String> {
    if !validate::LOG_LEVELS.contains(&s.log_level.as_str()) {
        return Err(format!("settings.logLevel: {:?} is not a log level", s.log_level));
    }
    if !validate::HEARTBEAT_RANGE.contains(&s.heartbeat_seconds) {
        return Err(format!(
            "settings.heartbeatSeconds: {} is out of range",
            s.heartbeat_seconds
        ));
    }
    validate::labels("settings.labels", &s.labels).map_err(|e| e.to_string())?;
    let known_monitor = |m| applied.is_some_and(|a| a.log_monitors.contains(m));
    let known_component = |c| applied.is_some_and(|a| a.components.contains(c));
    for (i, m) in s.log_monitors.iter().enumerate() {
        if known_monitor(m) {
            continue;
        }
        nodekeeper_proto::rules::check(m)
            .map_err(|e| format!("settings.logMonitors[{i}].{}: {}", e.field, e.message))?;
    }
    nodekeeper_proto::checks::check_detectors(
        "settings",
        &s.custom_plugin_monitors,
        &s.probes,
        s.resources.as_ref(),
        s.hardware.as_ref(),
    )
    .map_err(|e| e.to_string())?;
    for (i, r) in s.remedy_rules.iter().enumerate() {
        let spec = r
            .spec
            .as_ref()
            .ok_or_else(|| format!("settings.remedyRules[{i}].spec: missing"))?;
        nodekeeper_proto::remedy::check(&format!("settings.remedyRules[{i}].spec"), spec).map_err(|e| e.to_string())?;
    }
    for (i, c) in s.components.iter().enumerate() {
        if known_component(c) {
            continue;
        }
        validate::dns_subdomain(&format!("settings.components[{i}].name"), &c.name).map_err(|e| e.to_string())?;
        let spec = c
            .spec
            .as_ref()
            .ok_or_else(|| format!("settings.components[{i}].spec: missing"))?;
        nodekeeper_proto::component::check(&format!("settings.components[{i}].spec"), spec)
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Applies a desired state: checks it, persists it (with a store), then
/// switches the running settings. Nothing changes when it fails.
pub fn apply(agent: &Agent, d: DesiredState) -> Result<(), String> {
    let revision = d.revision;
    let encoded = agent.store.as_ref().map(|_| d.encode_to_vec());
    let settings = d.settings.unwrap_or_else(default_settings);
    agent.with_settings(|current| check(&settings, Some(current)))?;
    if let (Some(store), Some(encoded)) = (&agent.store, encoded) {
        store
            .put_all(&[
                (keys::DESIRED, encoded),
                (keys::APPLIED_REVISION, revision.to_be_bytes().to_vec()),
            ])
            .map_err(|e| e.to_string())?;
    }
    if let Some(log) = &agent.log {
        log.set(&settings.log_level)?;
    }
    let changed = agent.set_applied(DesiredState {
        revision,
        settings: Some(settings),
    });
    agent.metrics.applied_revision.set(revision as i64);
    if changed {
        tracing::info!(revision, "applied new agent settings");
        // Copied only when they changed: a hub restart resends every node's
        // whole desired state, mostly unchanged.
        let (monitors, components) = agent.with_settings(|s| (s.log_monitors.clone(), s.components.clone()));
        agent.update_detectors(monitors);
        agent.checks_changed.notify_one();
        agent.update_components(components);
    }
    Ok(())
}

/// Applies the cached desired state at start, before any hub is reached.
pub fn restore(agent: &Agent) -> Result<(), String> {
    let Some(store) = &agent.store else {
        return Ok(());
    };
    let Some(bytes) = store.get(keys::DESIRED).map_err(|e| e.to_string())? else {
        return Ok(());
    };
    let d = DesiredState::decode(bytes.as_slice()).map_err(|e| format!("cached desired state is unreadable: {e}"))?;
    let revision = d.revision;
    apply(agent, d)?;
    tracing::info!(revision, "applied cached desired state");
    Ok(())
}
