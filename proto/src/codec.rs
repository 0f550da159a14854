//! The framing both protocols share: `[version][kind][MessagePack body]`, bodies as positional
//! arrays, no trailing bytes. `frame` (device protocol) and `federation` (broker links) differ
//! only in their version byte, kinds and size limits.

use std::io::Cursor;

use serde::{Serialize, de::DeserializeOwned};

use crate::error::DecodeError;

/// Encodes `[version][kind][body]`.
pub(crate) fn encode<T: Serialize>(version: u8, kind: u8, body: &T) -> Vec<u8> {
    let mut out = vec![version, kind];
    // Writing into a Vec cannot fail, and every body type serializes (no maps with non-string
    // keys, no unsupported types).
    rmp_serde::encode::write(&mut out, body).expect("frame bodies always serialize into a Vec");
    out
}

/// Splits the header off and checks version and size.
pub(crate) fn header(bytes: &[u8], version: u8, max: usize) -> Result<(u8, &[u8]), DecodeError> {
    if bytes.len() > max {
        return Err(DecodeError::TooLarge(bytes.len()));
    }
    match bytes {
        [v, kind, body @ ..] if *v == version => Ok((*kind, body)),
        [v, _, ..] => Err(DecodeError::UnsupportedVersion(*v)),
        _ => Err(DecodeError::Truncated),
    }
}

/// Decodes a body, rejecting trailing bytes.
pub(crate) fn body<T: DeserializeOwned>(body: &[u8]) -> Result<T, DecodeError> {
    let mut de = rmp_serde::Deserializer::new(Cursor::new(body));
    let value = T::deserialize(&mut de).map_err(|e| DecodeError::Malformed(e.to_string()))?;
    let used = usize::try_from(de.position()).unwrap_or(usize::MAX);
    if used < body.len() {
        return Err(DecodeError::TrailingBytes(body.len() - used));
    }
    Ok(value)
}
