//! The fixup stream decoder (`vmm_switcher::fixup::decode`) on arbitrary
//! bytes: never a panic, and a stream that decodes re-encodes to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmm_switcher::fixup::{decode, encode};

fuzz_target!(|data: &[u8]| {
    // Two bytes of code length, then the stream.
    let (code_len, stream) = match data {
        [a, b, rest @ ..] => (usize::from(u16::from_le_bytes([*a, *b])), rest),
        _ => (0, data),
    };
    if let Ok(records) = decode(stream, code_len) {
        assert!(records.iter().all(|r| (r.off as usize) < code_len));
        let again = encode(&records).expect("decoded records encode");
        assert_eq!(again, stream, "decode/encode round trip");
    }
});
