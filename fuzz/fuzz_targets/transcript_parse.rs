//! The COM1 transcript parser (`integration::transcript::Report::parse`) on
//! arbitrary bytes: never a panic, whatever the serial line carried.
#![no_main]

use integration::transcript::Report;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let r = Report::parse(data);
    let _ = r.crc_ok();
    for d in &r.dumps {
        let _ = r.dump(&d.name);
        let _ = d.u32_at(d.bytes.len().saturating_sub(4));
    }
    // Parsing is a function of the bytes.
    assert_eq!(Report::parse(data), r);
});
