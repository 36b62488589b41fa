//! /dev/kmsg records as the kernel returns them.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = nodekeeper_agent::detect::source::kmsg::parse_record(data, std::time::SystemTime::UNIX_EPOCH);
});
