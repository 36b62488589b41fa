//! The scale harness in a short, untimed form for CI: a few hundred hollow
//! agents (the real link code in one process) against a real hub. The timed
//! figures come from scripts/bench/hub-scale.sh.

use std::time::Duration;

use nodekeeper_e2e::{Hollow, Hub, TempDir, nkctl, wait_for};

const N: u64 = 300;
const T: Duration = Duration::from_secs(120);

#[test]
fn hollow_fleet_registers_syncs_survives_a_hub_restart_and_loses_no_report() {
    let tmp = TempDir::new("scale");
    let mut hub = Hub::start(tmp.path(), "");
    let hollow = Hollow::start(tmp.path(), &hub.grpc_url(), N as usize);

    wait_for("all registered and Ready", T, || {
        Some(hub.summary()).filter(|s| s["nodes"]["ready"] == N && s["nodes"]["total"] == N)
    });

    // Paged lists: pages of 100 with continue tokens cover every node once,
    // in name order; nkctl streams them in pages of 7.
    let mut names = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = hub.get(&format!("/v1/nodes?limit=100&continue={token}")).expect("page");
        pages += 1;
        for n in page["items"].as_array().expect("items") {
            names.push(n["metadata"]["name"].as_str().expect("name").to_string());
        }
        token = page["metadata"]["continue"].as_str().unwrap_or_default().to_string();
        if token.is_empty() {
            break;
        }
    }
    assert_eq!(pages, 3);
    let mut sorted = names.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(names, sorted, "in order, each once");
    assert_eq!(names.len() as u64, N);
    let out = hub.nkctl(&["get", "nodes", "--chunk-size", "7"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let table = String::from_utf8_lossy(&out.stdout);
    let rows: Vec<&str> = table
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().next().unwrap_or(""))
        .collect();
    assert_eq!(rows, names, "one header, then every node once, in order");
    assert!(table.lines().next().is_some_and(|h| h.starts_with("NAME")));
    let (code, body) = hub.request("GET", "/v1/nodes?limit=999999", "").expect("get");
    assert_eq!(code, 422, "{body}");

    // One AgentProfile selecting every node reaches all of them.
    let rev0 = hub.summary()["revision"].as_u64().expect("revision");
    let profile = "apiVersion: nodekeeper.io/v1\nkind: AgentProfile\nmetadata: {name: all}\nspec: {logLevel: warn, labels: {wave: one}}\n";
    let out = nkctl(&hub.http_url(), None, &["apply", "-f", "-"], Some(profile));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    wait_for("all inSync", T, || {
        Some(hub.summary()).filter(|s| s["nodes"]["inSync"] == N && s["revision"].as_u64() >= Some(rev0 + N))
    });
    assert!(
        hollow.stats()["appliedRevisionMin"].as_u64() > Some(rev0),
        "every hollow agent applied the new revision"
    );

    // A burst of reports, then a hub crash while some may still be in flight.
    hollow.burst(5);
    hub.kill9();
    hollow.burst(3);
    hub.restart();
    wait_for("all back, Ready and inSync", T, || {
        Some(hub.summary())
            .filter(|s| s["nodes"]["ready"] == N && s["nodes"]["inSync"] == N && s["nodes"]["connected"] == N)
    });
    wait_for("every report acknowledged", T, || {
        (hollow.stats()["outboxPending"] == 0).then_some(())
    });

    // Exactly once: every node received each of its sequence numbers once.
    let nodes = hub.get("/v1/nodes").expect("nodes");
    let items = nodes["items"].as_array().expect("items");
    assert_eq!(items.len() as u64, N);
    let mut received = 0;
    for n in items {
        let st = &n["status"];
        assert_eq!(
            st["reportSequence"], 8,
            "{}: 5 + 3 condition changes",
            n["metadata"]["name"]
        );
        assert_eq!(st["reportsReceived"], st["reportSequence"], "{}", n["metadata"]["name"]);
        assert_eq!(st["reportsDropped"], 0);
        received += st["reportsReceived"].as_u64().unwrap_or(0);
    }
    assert_eq!(received, hollow.stats()["reportsAssigned"].as_u64().expect("assigned"));
}
