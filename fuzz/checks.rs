//! The properties each fuzz target checks, shared by the libFuzzer targets in `fuzz_targets/`
//! and by `proto/tests/fuzz_corpus.rs`, which replays the checked-in corpora under plain
//! `cargo test`. Both include this file with `#[path]`, so it may use nothing but `std` and
//! `sealpost_proto`.
//!
//! Every check takes the raw input bytes and panics when a property is violated.

use sealpost_proto::federation::{HandshakeFrame, LinkFrame, MAX_LINK_FRAME_BYTES};
use sealpost_proto::limits::{MAX_FRAME_BYTES, MAX_HANDLE_BYTES};
use sealpost_proto::{ClientFrame, DecodeError, Handle, ServerFrame};

/// Decoding never panics, and whatever decodes survives an encode/decode round trip.
///
/// The bytes themselves need not round-trip: a decoder accepts non-canonical MessagePack (wide
/// integers, structs as maps, ignored fields), which the encoder normalises.
pub(crate) fn client_frame(data: &[u8]) {
    let Ok(frame) = ClientFrame::decode(data) else {
        return;
    };
    let encoded = frame.encode();
    match ClientFrame::decode(&encoded) {
        Ok(again) => assert_eq!(again, frame, "client frame changed on round trip"),
        // A non-canonical input right at the size limit can re-encode a few bytes larger (a
        // short byte array becomes a `bin`), which the decoder then rightly refuses.
        Err(DecodeError::TooLarge(n)) if n > MAX_FRAME_BYTES => {}
        Err(e) => panic!("re-encoded client frame {frame:?} does not decode: {e}"),
    }
}

/// Same property as [`client_frame`], for frames from the broker; also, the broker's
/// clone-free `deliver` encoder agrees with the general one.
pub(crate) fn server_frame(data: &[u8]) {
    // A batch reads as its frames, each of which re-encodes into a batch that reads the same.
    if let Ok(frames) = ServerFrame::decode_all(data) {
        let encoded: Vec<Vec<u8>> = frames.iter().map(ServerFrame::encode).collect();
        if let Ok(again) = ServerFrame::decode_all(&ServerFrame::encode_batch(&encoded)) {
            assert_eq!(again, frames, "batch changed on round trip");
        }
    }
    let Ok(frame) = ServerFrame::decode(data) else {
        return;
    };
    let encoded = frame.encode();
    if let ServerFrame::Deliver { seq, envelope } = &frame {
        assert_eq!(ServerFrame::encode_deliver(*seq, envelope), encoded);
    }
    match ServerFrame::decode(&encoded) {
        Ok(again) => assert_eq!(again, frame, "server frame changed on round trip"),
        Err(DecodeError::TooLarge(n)) if n > MAX_FRAME_BYTES => {}
        Err(e) => panic!("re-encoded server frame {frame:?} does not decode: {e}"),
    }
}

/// Parsing never panics; an accepted handle is exactly its input, parses again to itself, and
/// keeps the documented invariants.
pub(crate) fn handle(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(handle) = Handle::parse(s) else {
        return;
    };
    assert_eq!(handle.as_str(), s);
    assert_eq!(handle.to_string(), s);
    assert_eq!(Handle::parse(handle.as_str()).as_ref(), Ok(&handle));
    assert!(
        s.len() <= MAX_HANDLE_BYTES,
        "handle over the length limit: {s:?}"
    );
    assert!(
        s.bytes().all(|b| b.is_ascii() && !b.is_ascii_uppercase()),
        "handle is not lower-case ASCII: {s:?}"
    );
    let (_, domain) = s.split_once('@').expect("an accepted handle has an @");
    assert_eq!(handle.domain(), domain);
}

/// Same property as [`client_frame`], for the federation protocol: both the encrypted link
/// frames and the clear handshake frames (the same bytes go to both decoders).
pub(crate) fn federation_frame(data: &[u8]) {
    if let Ok(frame) = LinkFrame::decode(data) {
        match LinkFrame::decode(&frame.encode()) {
            Ok(again) => assert_eq!(again, frame, "link frame changed on round trip"),
            Err(DecodeError::TooLarge(n)) if n > MAX_LINK_FRAME_BYTES => {}
            Err(e) => panic!("re-encoded link frame {frame:?} does not decode: {e}"),
        }
    }
    if let Ok(frame) = HandshakeFrame::decode(data) {
        match HandshakeFrame::decode(&frame.encode()) {
            Ok(again) => assert_eq!(again, frame, "handshake frame changed on round trip"),
            Err(DecodeError::TooLarge(_)) => {}
            Err(e) => panic!("re-encoded handshake frame {frame:?} does not decode: {e}"),
        }
    }
}
