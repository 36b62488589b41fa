//! A journal entry's fields as libsystemd hands them (`FIELD=value`, any
//! bytes), one per line of the input.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nodekeeper_agent::detect::source::journald::{Fields, Filter};

fuzz_target!(|data: &[u8]| {
    let filters = [
        Filter::new(Some("kubelet"), None),
        Filter::new(None, Some("containerd")),
        Filter::new(None, None),
    ];
    let mut fields = Fields::default();
    for field in data.split(|b| *b == b'\n') {
        fields.add(field, &filters);
    }
    let streams = fields.streams(&filters);
    assert!(streams & 0b100 != 0, "the whole-journal filter takes every entry");
    let _ = fields.message();
});
