//! Feeds arbitrary bytes to the record frame decoder: it must never panic, and a
//! frame it accepts must re-encode to the same bytes.
//!
//! `cargo +nightly fuzz run decode_frame` (from `broker/`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchyard_broker::storage::record::{
    decode_frame, encode_frame, frame_len, headers_encoded_len, padded_len,
};

fuzz_target!(|data: &[u8]| {
    let Ok(view) = decode_frame(data) else {
        return;
    };
    let Ok(record) = view.to_record() else {
        return;
    };
    let len = frame_len(
        record.topic.len(),
        headers_encoded_len(&record.headers),
        record.payload.len(),
    );
    assert_eq!(len, view.frame_len);
    let mut out = vec![0u8; padded_len(len)];
    encode_frame(&mut out, &view.meta, record.topic.as_bytes(), &record.headers, &record.payload);
    assert_eq!(&out[..len], &data[..len]);
});
