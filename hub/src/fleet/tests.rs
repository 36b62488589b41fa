//! The fleet's rules without SQLite or a network: the store is the memory
//! backend, sessions are opened with Hellos, reports ingested directly.

use std::sync::Arc;
use std::time::{Duration, Instant};

use nodekeeper_proto::document::parse_resources;
use nodekeeper_proto::v1::{Event, Hello, NodeFacts, Report, report};

use super::{ApplyAction, Fleet, FleetConfig, FleetError};
use crate::metrics::Metrics;
use crate::store::Store;
use crate::store::memory::Memory;

fn fleet_on(mem: &Memory) -> Arc<Fleet> {
    let store = Store::with_backend(Box::new(mem.clone()), Metrics::new(), 64).expect("store");
    Fleet::new(store, mem.load(), Metrics::new(), FleetConfig::default()).expect("fleet")
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn hello(name: &str, machine: &str) -> Hello {
    Hello {
        node_name: name.into(),
        facts: Some(NodeFacts {
            machine_id: machine.into(),
            ..Default::default()
        }),
        protocol: nodekeeper_proto::LINK_PROTOCOL,
        ..Default::default()
    }
}

fn event(seq: u64, reason: &str) -> Report {
    Report {
        sequence: seq,
        body: Some(report::Body::Event(Event {
            reason: reason.into(),
            severity: "Info".into(),
            message: "m".into(),
            time: "2026-01-01T00:00:00Z".into(),
            ..Default::default()
        })),
        ..Default::default()
    }
}

const PROFILE: &str = "apiVersion: nodekeeper.io/v1\nkind: AgentProfile\nmetadata: {name: p}\nspec: {logLevel: debug, labels: {team: a}}\n";

fn apply(f: &Fleet, yaml: &str) -> Result<Vec<super::ApplyResult>, FleetError> {
    rt().block_on(f.apply(parse_resources(yaml).expect("parse")))
}

#[test]
fn apply_creates_then_changes_nothing_then_bumps_generation_only_on_spec_changes() {
    let mem = Memory::new();
    let f = fleet_on(&mem);
    let r = apply(&f, PROFILE).expect("apply");
    assert_eq!(r[0].action, ApplyAction::Created);
    assert_eq!(r[0].resource["metadata"]["generation"], 1);
    let rv1 = r[0].resource["metadata"]["resourceVersion"]
        .as_str()
        .expect("rv")
        .to_string();
    assert_eq!(apply(&f, PROFILE).expect("again")[0].action, ApplyAction::Unchanged);
    // Labels only: configured, same generation, new resourceVersion.
    let labelled = PROFILE.replace("metadata: {name: p}", "metadata: {name: p, labels: {x: y}}");
    let r = apply(&f, &labelled).expect("labels");
    assert_eq!(r[0].action, ApplyAction::Configured);
    assert_eq!(r[0].resource["metadata"]["generation"], 1);
    assert_ne!(r[0].resource["metadata"]["resourceVersion"], rv1.as_str());
    // A spec change with the current resourceVersion bumps the generation;
    // with a stale one it is refused and changes nothing.
    let rv2 = r[0].resource["metadata"]["resourceVersion"]
        .as_str()
        .expect("rv")
        .to_string();
    let edit = |rv: &str, level: &str| {
        format!(
            "apiVersion: nodekeeper.io/v1\nkind: AgentProfile\nmetadata: {{name: p, resourceVersion: '{rv}'}}\nspec: {{logLevel: {level}}}\n"
        )
    };
    let err = apply(&f, &edit(&rv1, "warn")).expect_err("stale");
    assert_eq!(err.field(), Some("metadata.resourceVersion"), "{err}");
    let r = apply(&f, &edit(&rv2, "warn")).expect("current");
    assert_eq!(r[0].resource["metadata"]["generation"], 2);
    // Survives a restart, from what was committed.
    let again = fleet_on(&mem);
    let p = again.get(nodekeeper_proto::Kind::AgentProfile, "p").expect("p");
    assert_eq!(p["metadata"]["generation"], 2);
    assert_eq!(p["spec"]["logLevel"], "warn");
}

#[test]
fn two_components_may_not_claim_one_file() {
    let f = fleet_on(&Memory::new());
    let c = |name: &str| {
        format!(
            "apiVersion: nodekeeper.io/v1\nkind: Component\nmetadata: {{name: {name}}}\nspec:\n  version: \"1\"\n  files: [{{path: /etc/shared.conf, template: x}}]\n"
        )
    };
    apply(&f, &c("a")).expect("first");
    let err = apply(&f, &c("b")).expect_err("claimed twice");
    assert!(matches!(err, FleetError::Conflict { .. }), "{err}");
    assert!(err.to_string().contains("a"), "{err}");
    assert!(
        f.get(nodekeeper_proto::Kind::Component, "b").is_err(),
        "nothing applied"
    );
}

#[test]
fn a_failing_store_applies_nothing() {
    let mem = Memory::new();
    let f = fleet_on(&mem);
    mem.set_failing(true);
    let err = apply(&f, PROFILE).expect_err("store down");
    assert!(matches!(err, FleetError::Store(_)), "{err}");
    assert!(f.get(nodekeeper_proto::Kind::AgentProfile, "p").is_err());
    assert_eq!(f.summary().resources["agentprofiles"], 0);
    mem.set_failing(false);
    assert_eq!(apply(&f, PROFILE).expect("store back")[0].action, ApplyAction::Created);
}

#[test]
fn reports_are_deduplicated_by_sequence_and_acknowledged_after_commit() {
    let mem = Memory::new();
    let f = fleet_on(&mem);
    let h = f.open_session(hello("n1", "m1"), None).expect("session");
    let rt = rt();
    rt.block_on(f.ingest("n1", h.id, vec![event(1, "A"), event(2, "B"), event(3, "C")]));
    let mut acks = h.acks.clone();
    rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(5), acks.wait_for(|s| *s == 3))
            .await
            .expect("ack in time")
            .expect("ack");
    });
    // A replay of 2..3 and a new 4: only 4 counts.
    rt.block_on(f.ingest("n1", h.id, vec![event(2, "B"), event(3, "C"), event(4, "D")]));
    let n = f.get_node("n1").expect("node");
    let st = n.status.expect("status");
    assert_eq!((st.report_sequence, st.reports_received), (4, 4));
    assert_eq!(
        st.recent_events
            .iter()
            .filter(|e| e.reason == "B")
            .map(|e| e.count)
            .sum::<u64>(),
        1
    );
    rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(5), acks.wait_for(|s| *s == 4))
            .await
            .expect("ack in time")
            .expect("ack");
    });
    // Nothing is acknowledged while the store cannot commit.
    mem.set_failing(true);
    rt.block_on(f.ingest("n1", h.id, vec![event(5, "E")]));
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(*h.acks.borrow(), 4, "an uncommitted report is not acknowledged");
    mem.set_failing(false);
    // A restarted fleet knows what was committed, so the agent resends 5.
    let again = fleet_on(&mem);
    let h2 = again.open_session(hello("n1", "m1"), None).expect("session");
    assert_eq!(h2.welcome.report_sequence, 4);
    // A report from a replaced session is ignored.
    rt.block_on(f.ingest("n1", h.id + 1000, vec![event(9, "Z")]));
}

fn component(seq: u64, phase: &str, reason: &str, error: &str, version: &str) -> Report {
    Report {
        sequence: seq,
        body: Some(report::Body::Component(nodekeeper_proto::v1::NodeComponent {
            name: "tool".into(),
            declared_version: version.into(),
            phase: phase.into(),
            reason: reason.into(),
            last_error: error.into(),
            ..Default::default()
        })),
        ..Default::default()
    }
}

#[test]
fn an_artifact_refusal_is_audited_once_and_another_nodes_job_is_refused() {
    use nodekeeper_proto::component::ARTIFACT_REFUSED;
    let f = fleet_on(&Memory::new());
    let h = f.open_session(hello("n1", "m1"), None).expect("session");
    let rt = rt();
    let no_sig = "Downloading: artifact http://x/tool has no signature";
    let audits = rt.block_on(f.ingest("n1", h.id, vec![component(1, "Failed", ARTIFACT_REFUSED, no_sig, "1")]));
    assert_eq!(audits.len(), 1, "{audits:?}");
    let a = &audits[0];
    assert_eq!((a.actor.as_str(), a.action.as_str()), ("node:n1", "artifact"));
    assert_eq!(a.resource, "components/tool");
    assert!(
        a.result.starts_with("refused: ") && a.result.contains("no signature"),
        "{a:?}"
    );
    // The agent's retry walks the preparation again, keeping its last error
    // and reason, and is refused again: nothing new for the log.
    let retry = vec![
        component(2, "Downloading", ARTIFACT_REFUSED, no_sig, "1"),
        component(3, "Failed", ARTIFACT_REFUSED, no_sig, "1"),
    ];
    assert!(rt.block_on(f.ingest("n1", h.id, retry)).is_empty());
    // Another reason, or another version refused, is.
    let bad_sig = "Verifying: artifact http://x/tool: the signature does not verify";
    let again = rt.block_on(f.ingest("n1", h.id, vec![component(4, "Failed", ARTIFACT_REFUSED, bad_sig, "1")]));
    assert_eq!(again.len(), 1, "{again:?}");
    let v2 = rt.block_on(f.ingest("n1", h.id, vec![component(5, "Failed", ARTIFACT_REFUSED, bad_sig, "2")]));
    assert_eq!(v2.len(), 1, "{v2:?}");
    // An ordinary failure is not a refusal.
    let failed = rt.block_on(f.ingest("n1", h.id, vec![component(6, "Failed", "", "download: timed out", "3")]));
    assert!(failed.is_empty(), "{failed:?}");
    // A reason no agent sends, as long as a node can make it, is not kept.
    let huge = "x".repeat(100_000);
    assert!(
        rt.block_on(f.ingest("n1", h.id, vec![component(7, "Failed", &huge, "e", "4")]))
            .is_empty()
    );
    let st = f.get_node("n1").expect("node").status.expect("status");
    assert_eq!(st.components[0].declared_version, "3", "{:?}", st.components);

    // A remedy job names its node; a node may report only its own.
    let job = |seq: u64, id: &str, node: &str| Report {
        sequence: seq,
        body: Some(report::Body::Remedy(nodekeeper_proto::v1::RemedyJob {
            id: id.into(),
            node: node.into(),
            rule: "r".into(),
            phase: "Succeeded".into(),
            ..Default::default()
        })),
        ..Default::default()
    };
    let refused = rt.block_on(f.ingest("n1", h.id, vec![job(8, "theirs", "n2"), job(9, "mine", "n1")]));
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_eq!(
        (refused[0].action.as_str(), refused[0].resource.as_str()),
        ("report", "nodes/n2")
    );
    assert!(
        refused[0].result.contains("a node speaks only for itself"),
        "{refused:?}"
    );
    let ids: Vec<String> = f
        .remedy_jobs(&super::JobFilter::default())
        .into_iter()
        .map(|j| j.id)
        .collect();
    assert_eq!(ids, ["mine"], "another node's job is not taken");
    // Both were acknowledged: resending cannot help.
    assert_eq!(
        f.get_node("n1").expect("node").status.expect("status").report_sequence,
        9
    );
}

#[test]
fn ready_follows_the_session_and_heartbeats() {
    let f = fleet_on(&Memory::new());
    let ready = |f: &Fleet| {
        let n = f.get_node("n1").expect("node");
        let c = n
            .status
            .expect("status")
            .conditions
            .into_iter()
            .find(|c| c.r#type == "Ready")
            .expect("Ready");
        (c.status, c.reason)
    };
    let h = f.open_session(hello("n1", "m1"), None).expect("session");
    assert_eq!(ready(&f), ("True".into(), "AgentConnected".into()));
    assert_eq!(f.summary().nodes.ready, 1);
    // Heartbeats stop: Unknown after the grace period (at least three 10 s
    // heartbeats), not before.
    f.tick_at(Instant::now() + Duration::from_secs(20));
    assert_eq!(ready(&f).0, "True");
    f.tick_at(Instant::now() + Duration::from_secs(45));
    assert_eq!(ready(&f), ("Unknown".into(), "NodeStatusUnknown".into()));
    assert_eq!((f.summary().nodes.ready, f.summary().nodes.unknown), (0, 1));
    // A heartbeat brings it back; closing the session makes it Unknown.
    f.heartbeat("n1", h.id, 0);
    assert_eq!(ready(&f).0, "True");
    f.close_session("n1", h.id);
    assert_eq!(ready(&f), ("Unknown".into(), "AgentDisconnected".into()));
    // Another machine may not take a connected node's name.
    let _h = f.open_session(hello("n1", "m1"), None).expect("same machine again");
    let Err(err) = f.open_session(hello("n1", "other"), None) else {
        panic!("another machine took a connected node's name")
    };
    assert!(err.to_string().contains("another machine"), "{err}");
}

#[test]
fn desired_state_follows_profiles_and_labels_survive_a_restart() {
    let mem = Memory::new();
    let f = fleet_on(&mem);
    let h = f.open_session(hello("n1", "m1"), None).expect("session");
    let r0 = h.desired.borrow().revision;
    apply(&f, PROFILE).expect("apply");
    let d = h.desired.borrow().clone();
    assert!(d.revision > r0);
    assert_eq!(d.settings.as_ref().map(|s| s.value.log_level.as_str()), Some("debug"));
    let labels = f.get_node("n1").expect("node").metadata.expect("meta").labels;
    assert_eq!(labels.get("team").map(String::as_str), Some("a"));
    // Before the fan-out's write is even committed the hub may die; the
    // next one computes the same settings and labels from the resources.
    std::thread::sleep(Duration::from_millis(50));
    let again = fleet_on(&mem);
    let n = again.get_node("n1").expect("node");
    assert_eq!(
        n.metadata.expect("meta").labels.get("team").map(String::as_str),
        Some("a")
    );
    assert_eq!(
        n.status.expect("status").settings.map(|s| s.log_level),
        Some("debug".into())
    );
}

fn permit(f: &Fleet, node: &str, op: &str, action: &str, id: &str) -> nodekeeper_proto::v1::PermitDecision {
    rt().block_on(f.permit(
        node,
        nodekeeper_proto::v1::PermitRequest {
            op: op.into(),
            action: action.into(),
            reason: "test".into(),
            permit_id: id.into(),
            ttl_seconds: 30,
            node_name: node.into(),
            job: String::new(),
        },
    ))
    .expect("decision")
}

#[test]
fn permits_are_budgeted_one_per_node_renewed_released_frozen_and_survive_a_restart() {
    let mem = Memory::new();
    let f = fleet_on(&mem);
    for (i, n) in ["a", "b", "c"].iter().enumerate() {
        f.open_session(hello(n, &format!("m{i}")), None).expect("session");
    }
    apply(
        &f,
        "apiVersion: nodekeeper.io/v1\nkind: DisruptionBudget\nmetadata: {name: one}\nspec: {maxUnavailable: 1}\n",
    )
    .expect("budget");
    let a = permit(&f, "a", "acquire", "component/k", "");
    assert!(a.granted, "{a:?}");
    let again = permit(&f, "a", "acquire", "component/k", "");
    assert_eq!(
        (again.granted, &again.permit_id),
        (true, &a.permit_id),
        "the same ask gets the same permit"
    );
    let other = permit(&f, "a", "acquire", "remedy/r", "");
    assert!(
        !other.granted && other.reason.contains("one disruptive action at a time"),
        "{other:?}"
    );
    let b = permit(&f, "b", "acquire", "component/k", "");
    assert!(!b.granted && b.reason.contains("DisruptionBudget one: 1 of 3"), "{b:?}");
    assert!(
        !permit(&f, "b", "renew", "", &a.permit_id).granted,
        "b cannot renew a's permit"
    );
    assert!(permit(&f, "a", "renew", "", &a.permit_id).granted);
    assert_eq!(f.permits().len(), 1);

    // The grant is in the store: a restarted hub still counts it.
    let f2 = fleet_on(&mem);
    assert_eq!(f2.permits().len(), 1, "stored permits are loaded");
    for (i, n) in ["a", "b", "c"].iter().enumerate() {
        f2.open_session(hello(n, &format!("m{i}")), None).expect("session");
    }
    assert!(
        !permit(&f2, "b", "acquire", "component/k", "").granted,
        "still within the budget after a restart"
    );
    permit(&f2, "a", "release", "", &a.permit_id);
    assert!(
        permit(&f2, "b", "acquire", "component/k", "").granted,
        "released, so b may go"
    );

    rt().block_on(f2.set_freeze(true, "drill", "tester")).expect("freeze");
    let c = permit(&f2, "c", "acquire", "component/k", "");
    assert!(!c.granted && c.reason.contains("frozen (drill; by tester"), "{c:?}");
    let node = f2.get_node("c").expect("node");
    let events = node.status.expect("status").recent_events;
    assert!(events.iter().any(|e| e.reason == "PermitDenied"), "{events:?}");
    let f3 = fleet_on(&mem);
    assert!(f3.freeze_state().frozen, "the freeze is stored");
}

fn ask_job(f: &Fleet, node: &str, action: &str, job: &str) -> nodekeeper_proto::v1::PermitDecision {
    rt().block_on(f.permit(
        node,
        nodekeeper_proto::v1::PermitRequest {
            op: "acquire".into(),
            action: action.into(),
            reason: "test".into(),
            ttl_seconds: 30,
            node_name: node.into(),
            job: job.into(),
            ..Default::default()
        },
    ))
    .expect("decision")
}

fn raised(seq: u64, ty: &str) -> Report {
    Report {
        sequence: seq,
        body: Some(report::Body::Condition(nodekeeper_proto::v1::ConditionChange {
            condition: Some(nodekeeper_proto::v1::Condition {
                r#type: ty.into(),
                status: "True".into(),
                reason: "R".into(),
                last_transition_time: nodekeeper_proto::time::now_rfc3339(),
                ..Default::default()
            }),
            removed: false,
        })),
        ..Default::default()
    }
}

#[test]
fn remedy_permits_follow_max_concurrent_the_breaker_and_the_approval_queue() {
    let mem = Memory::new();
    let f = fleet_on(&mem);
    let rt = rt();
    let mut ids = Vec::new();
    for i in 0..10 {
        let h = f
            .open_session(hello(&format!("n{i}"), &format!("m{i}")), None)
            .expect("session");
        ids.push(h.id);
    }
    apply(
        &f,
        "apiVersion: nodekeeper.io/v1\nkind: RemedyRule\nmetadata: {name: kubelet}\nspec:\n  conditions: [{type: KubeletUnhealthy, forSeconds: 0}]\n  steps: [{action: restartUnit, params: {unit: kubelet.service}, verifySeconds: 30}]\n  maxConcurrent: 2\n  breaker: {threshold: 30%, windowSeconds: 60}\n---\napiVersion: nodekeeper.io/v1\nkind: RemedyRule\nmetadata: {name: disk}\nspec:\n  approval: manual\n  conditions: [{type: DiskPressure}]\n  steps: [{action: reboot}]\n",
    )
    .expect("rules");
    // The rule reaches the nodes' desired settings.
    let n0 = f.get_node("n0").expect("node");
    let rules = n0.status.expect("status").settings.expect("settings").remedy_rules;
    assert_eq!(rules.len(), 2, "{rules:?}");
    // Three raise the condition: maxConcurrent lets two through, not a third.
    for (i, id) in ids.iter().enumerate().take(3) {
        rt.block_on(f.ingest(&format!("n{i}"), *id, vec![raised(1, "KubeletUnhealthy")]));
    }
    assert!(ask_job(&f, "n0", "remedy/kubelet", "j0").granted);
    assert!(ask_job(&f, "n1", "remedy/kubelet", "j1").granted);
    let third = ask_job(&f, "n2", "remedy/kubelet", "j2");
    assert!(!third.granted && !third.terminal, "{third:?}");
    assert!(third.reason.contains("maxConcurrent allows 2"), "{third:?}");
    // Four raising within the window is more than 30 % of 10. The rule is
    // at maxConcurrent, so the request is refused for now without counting
    // the fleet; the every-second evaluation opens the breaker, which then
    // refuses for good, and fires once.
    rt.block_on(f.ingest("n3", ids[3], vec![raised(1, "KubeletUnhealthy")]));
    let fourth = ask_job(&f, "n3", "remedy/kubelet", "j3");
    assert!(
        !fourth.granted && !fourth.terminal && fourth.reason.contains("maxConcurrent"),
        "{fourth:?}"
    );
    f.tick_remedies();
    let fourth = ask_job(&f, "n3", "remedy/kubelet", "j3");
    assert!(!fourth.granted && fourth.terminal, "{fourth:?}");
    assert!(fourth.reason.contains("breaker is open"), "{fourth:?}");
    rt.block_on(f.ingest("n4", ids[4], vec![raised(1, "KubeletUnhealthy")]));
    f.tick_remedies();
    assert_eq!(f.incidents().len(), 1, "one FleetIncident: {:?}", f.incidents());
    let rr = f.get(nodekeeper_proto::Kind::RemedyRule, "kubelet").expect("rule");
    let st = rr["status"].clone();
    assert_eq!(
        (st["breakerOpen"].as_bool(), st["raisedInWindow"].as_u64()),
        (Some(true), Some(5)),
        "{st}"
    );
    // A restarted hub still has it open.
    let f2 = fleet_on(&mem);
    assert!(f2.breakers()["kubelet"].open, "the breaker is stored");
    // The operator resets it: raises before the reset are not counted again.
    rt.block_on(f.reset_breaker("kubelet", "alice")).expect("reset");
    let again = ask_job(&f, "n2", "remedy/kubelet", "j2");
    assert!(!again.granted && !again.terminal, "still maxConcurrent: {again:?}");
    permit(
        &f,
        "n0",
        "release",
        "",
        &f.permits().iter().find(|p| p.node == "n0").expect("n0's permit").id,
    );
    assert!(
        ask_job(&f, "n2", "remedy/kubelet", "j2").granted,
        "after reset and a release the rule works again"
    );
    // A request that could be granted has the breaker evaluated at its
    // decision: four new raises since the reset open it there.
    let n1 = f
        .permits()
        .iter()
        .find(|p| p.node == "n1")
        .expect("n1's permit")
        .id
        .clone();
    permit(&f, "n1", "release", "", &n1);
    rt.block_on(f.ingest("n0", ids[0], vec![raised(2, "KubeletUnhealthy")]));
    for (i, id) in ids.iter().enumerate().skip(7) {
        rt.block_on(f.ingest(&format!("n{i}"), *id, vec![raised(1, "KubeletUnhealthy")]));
    }
    let d = ask_job(&f, "n7", "remedy/kubelet", "j7");
    assert!(
        !d.granted && d.terminal && d.reason.contains("breaker is open"),
        "opened at this decision: {d:?}"
    );
    assert_eq!(f.incidents().len(), 2, "a second storm, a second FleetIncident");
    rt.block_on(f.reset_breaker("kubelet", "alice")).expect("reset");

    // Manual approval: queued, waits, approved → granted; denied → for good.
    rt.block_on(f.ingest("n5", ids[5], vec![raised(1, "DiskPressure")]));
    let q = ask_job(&f, "n5", "remedy/disk", "d5");
    assert!(
        !q.granted && !q.terminal && q.reason.contains("nkctl remedy approve d5"),
        "{q:?}"
    );
    assert!(!ask_job(&f, "n5", "remedy/disk", "d5").granted, "still waiting");
    rt.block_on(f.decide_approval("d5", true, "bob")).expect("approve");
    assert!(matches!(
        rt.block_on(f.decide_approval("d5", false, "eve")),
        Err(FleetError::Conflict { .. })
    ));
    assert!(ask_job(&f, "n5", "remedy/disk", "d5").granted, "approved");
    ask_job(&f, "n6", "remedy/disk", "d6");
    rt.block_on(f.decide_approval("d6", false, "bob")).expect("deny");
    let d = ask_job(&f, "n6", "remedy/disk", "d6");
    assert!(!d.granted && d.terminal && d.reason.contains("denied by bob"), "{d:?}");
    // An unknown rule is refused for good.
    assert!(ask_job(&f, "n7", "remedy/nope", "x").terminal);

    // Jobs the agents report are kept and carry who approved them; a job
    // that names no node is the reporting node's (one naming another node
    // is refused: an_artifact_refusal_is_audited_once_and_another_nodes_job_is_refused).
    let job = nodekeeper_proto::v1::RemedyJob {
        id: "d5".into(),
        node: String::new(),
        rule: "disk".into(),
        phase: "Acting".into(),
        start_time: nodekeeper_proto::time::now_rfc3339(),
        ..Default::default()
    };
    rt.block_on(f.ingest(
        "n5",
        ids[5],
        vec![Report {
            sequence: 2,
            body: Some(report::Body::Remedy(job)),
            ..Default::default()
        }],
    ));
    let j = f.remedy_job("d5").expect("job");
    assert_eq!(
        (j.node.as_str(), j.approved_by.as_str()),
        ("n5", "bob"),
        "the reporting node, the approver"
    );
    assert_eq!(
        f.remedy_jobs(&super::JobFilter {
            node: Some("n5".into()),
            ..Default::default()
        })
        .len(),
        1
    );
}

#[test]
fn the_settings_cache_finds_a_key_by_value_and_keeps_different_keys_apart() {
    use std::collections::BTreeMap;

    use nodekeeper_proto::v1::AgentSettings;

    use super::SettingsCache;
    use crate::store::SharedSettings;

    let labels = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    };
    let released =
        |pairs: &[(&str, i64)]| -> BTreeMap<String, i64> { pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect() };
    let settings = |level: &str| {
        SharedSettings::new(AgentSettings {
            log_level: level.into(),
            ..Default::default()
        })
    };
    let mut cache = SettingsCache::default();
    let (zone_a, zone_b) = (labels(&[("zone", "a")]), labels(&[("zone", "b")]));
    let (none, kubelet) = (released(&[]), released(&[("kubelet", 2)]));
    assert!(cache.get(&zone_a, &none).is_none(), "empty cache");
    cache.insert(&zone_a, &none, settings("info"));
    cache.insert(&zone_a, &kubelet, settings("warn"));
    cache.insert(&zone_b, &none, settings("debug"));
    // Keys built anew (equal by value, not the inserted maps) find their entry.
    fn level(cache: &SettingsCache, l: &BTreeMap<String, String>, r: &BTreeMap<String, i64>) -> Option<String> {
        cache.get(l, r).map(|s| s.value.log_level.clone())
    }
    assert_eq!(
        level(&cache, &labels(&[("zone", "a")]), &released(&[])).as_deref(),
        Some("info")
    );
    assert_eq!(
        level(&cache, &zone_a, &released(&[("kubelet", 2)])).as_deref(),
        Some("warn")
    );
    assert_eq!(level(&cache, &zone_b, &none).as_deref(), Some("debug"));
    assert_eq!(
        level(&cache, &zone_a, &released(&[("kubelet", 3)])),
        None,
        "another released revision"
    );
    assert_eq!(
        level(&cache, &labels(&[("zone", "a"), ("gpu", "1")]), &none),
        None,
        "another label set"
    );
    // Inserting a key again replaces its entry.
    cache.insert(&zone_b, &none, settings("error"));
    assert_eq!(level(&cache, &zone_b, &none).as_deref(), Some("error"));
    cache.clear();
    assert!(cache.get(&zone_a, &none).is_none(), "cleared");
}
