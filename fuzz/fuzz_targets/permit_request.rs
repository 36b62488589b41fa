//! The defender's permit requests as the hub handles them: any bytes as a
//! `PermitRequest` (any op, action, id, TTL) from a registered node, on a
//! fleet with a DisruptionBudget, decided, renewed, released and expired.
#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use nodekeeper_hub::fleet::{Fleet, FleetConfig};
use nodekeeper_hub::metrics::Metrics;
use nodekeeper_hub::store::Store;
use nodekeeper_hub::store::memory::Memory;
use nodekeeper_proto::v1::{Hello, PermitRequest};
use prost::Message;

struct World {
    fleet: Arc<Fleet>,
    rt: tokio::runtime::Runtime,
}

fn world() -> &'static World {
    static W: OnceLock<World> = OnceLock::new();
    W.get_or_init(|| {
        let mem = Memory::new();
        let store = Store::with_backend(Box::new(mem.clone()), Metrics::new(), 1 << 16).expect("store");
        let fleet = Fleet::new(store, mem.load(), Metrics::new(), FleetConfig::default()).expect("fleet");
        for n in ["fuzz", "other"] {
            fleet
                .open_session(
                    Hello {
                        node_name: n.into(),
                        protocol: nodekeeper_proto::LINK_PROTOCOL,
                        ..Default::default()
                    },
                    None,
                )
                .expect("session");
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("rt");
        let budget = nodekeeper_proto::document::parse_resources(
            "apiVersion: nodekeeper.io/v1\nkind: DisruptionBudget\nmetadata: {name: fuzz}\nspec: {maxUnavailable: 1, maxPerHour: 1000}\n",
        )
        .expect("budget");
        rt.block_on(fleet.apply(budget)).expect("apply");
        World { fleet, rt }
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(req) = PermitRequest::decode(data) else { return };
    let w = world();
    let node = if req.node_name == "other" { "other" } else { "fuzz" };
    let _ = w.rt.block_on(w.fleet.permit(node, req));
    w.fleet.expire_permits();
    let _ = w.fleet.permits();
});
