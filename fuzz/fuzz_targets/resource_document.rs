//! Resource documents as operators apply them (YAML or JSON, several per
//! input): parsed, validated, and turned back into their JSON form.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(docs) = nodekeeper_proto::document::parse_resources(text) {
        for d in docs {
            let v = d.to_value();
            // What the hub stores reads back as the same resource.
            let again = nodekeeper_proto::Resource::from_value(v.clone()).expect("a stored resource reads back");
            assert_eq!(again.to_value(), v);
        }
    }
});
