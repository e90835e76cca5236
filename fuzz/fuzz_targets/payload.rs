//! The parsers a node runs on untrusted bytes before anything is unpacked: the simple-signing
//! payload, signature decoding, and the OCI index and manifest JSON.
#![no_main]
use keel::container::{oci, signature};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = signature::parse_payload(data);
    // Split: the first byte says how much of the rest is the "signature" text.
    if let Some((&n, rest)) = data.split_first() {
        let n = usize::from(n).min(rest.len());
        let (sig, payload) = rest.split_at(n);
        let _ = signature::verify(payload, &String::from_utf8_lossy(sig), &[]);
    }
    let _ = serde_json::from_slice::<oci::Index>(data);
    let _ = serde_json::from_slice::<oci::Manifest>(data);
    let _ = serde_json::from_slice::<oci::ImageConfig>(data);
});
