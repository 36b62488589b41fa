//! The agent link's messages as the hub decodes and handles them: any bytes
//! as an `AgentMessage`, a Hello opening a session, reports ingested into a
//! fleet on the memory store.
#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use nodekeeper_hub::fleet::{Fleet, FleetConfig};
use nodekeeper_hub::metrics::Metrics;
use nodekeeper_hub::store::Store;
use nodekeeper_hub::store::memory::Memory;
use nodekeeper_proto::v1::{AgentMessage, Hello, agent_message};
use prost::Message;

struct World {
    fleet: Arc<Fleet>,
    session: u64,
    rt: tokio::runtime::Runtime,
}

fn world() -> &'static World {
    static W: OnceLock<World> = OnceLock::new();
    W.get_or_init(|| {
        let mem = Memory::new();
        let store = Store::with_backend(Box::new(mem.clone()), Metrics::new(), 1 << 16).expect("store");
        let fleet = Fleet::new(store, mem.load(), Metrics::new(), FleetConfig::default()).expect("fleet");
        let h = fleet
            .open_session(
                Hello {
                    node_name: "fuzz".into(),
                    protocol: nodekeeper_proto::LINK_PROTOCOL,
                    ..Default::default()
                },
                None,
            )
            .expect("session");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("rt");
        World {
            fleet,
            session: h.id,
            rt,
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(m) = AgentMessage::decode(data) else { return };
    let w = world();
    match m.body {
        Some(agent_message::Body::Hello(h)) => {
            let _ = nodekeeper_proto::check_link_protocol("the agent", h.protocol);
            // Another name than the fuzzer's own session, so that one stays.
            if h.node_name != "fuzz" {
                // The Hello's labels also as a join token's: both paths of
                // label derivation see fuzzed keys.
                let join = Some(h.labels.clone());
                let _ = w.fleet.open_session(*h, join);
            }
        }
        Some(agent_message::Body::Reports(b)) => {
            // Whatever a node reports, what it leaves for the audit log is
            // its own doing.
            for r in w.rt.block_on(w.fleet.ingest("fuzz", w.session, b.reports)) {
                assert_eq!(r.actor, "node:fuzz", "{r:?}");
            }
        }
        Some(agent_message::Body::Heartbeat(hb)) => w.fleet.heartbeat("fuzz", w.session, hb.applied_revision),
        Some(agent_message::Body::Applied(a)) => w.fleet.applied("fuzz", w.session, a.revision, &a.error),
        None => {}
    }
});
