//! The application plaintext inside an Olm message.
//!
//! # Encoding
//!
//! ```text
//! +------------+----------------+-----------------------------------------+
//! | u8 format  | u16 kind (BE)  | body: MessagePack, structs as positional |
//! |    = 1     |                | arrays                                  |
//! +------------+----------------+-----------------------------------------+
//! ```
//!
//! | kind | variant | body |
//! |---|---|---|
//! | 1 | [`Payload::Text`] | `[str body]` |
//!
//! New kinds (delivery tokens, call signaling, receipts, …) take new numbers; a client that
//! meets a kind it does not know gets [`PayloadError::UnknownKind`] and can tell its user to
//! update, instead of failing to decrypt. New fields go at the end of a body, with
//! `#[serde(default)]`, so older bodies still decode.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::decode_exact;

/// Format byte of the payload encoding.
const FORMAT: u8 = 1;

const KIND_TEXT: u16 = 1;

/// Why a decrypted plaintext could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum PayloadError {
    /// The plaintext is empty, truncated or not valid MessagePack for its kind.
    #[error("malformed payload")]
    Malformed,
    /// The plaintext uses a format this build does not know.
    #[error("unsupported payload format {0}")]
    UnsupportedFormat(u8),
    /// A payload kind this build does not know (sent by a newer client).
    #[error("unknown payload kind {0}")]
    UnknownKind(u16),
}

/// What one device says to another, end to end.
///
/// `Debug` shows the kind and sizes, never the content.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Payload {
    /// A text message.
    Text {
        /// The message text.
        body: String,
    },
}

#[derive(Serialize, Deserialize)]
struct TextBody(String);

impl Payload {
    /// Encodes as described in the module doc.
    pub fn encode(&self) -> Vec<u8> {
        let (kind, body) = match self {
            Payload::Text { body } => (KIND_TEXT, rmp_serde::to_vec(&TextBody(body.clone()))),
        };
        let body = body.expect("payload bodies always encode");
        let mut out = Vec::with_capacity(3 + body.len());
        out.push(FORMAT);
        out.extend_from_slice(&kind.to_be_bytes());
        out.extend_from_slice(&body);
        out
    }

    /// Decodes; never panics on untrusted input.
    pub fn decode(bytes: &[u8]) -> Result<Self, PayloadError> {
        let (&format, rest) = bytes.split_first().ok_or(PayloadError::Malformed)?;
        if format != FORMAT {
            return Err(PayloadError::UnsupportedFormat(format));
        }
        let (kind, body) = rest
            .split_first_chunk::<2>()
            .ok_or(PayloadError::Malformed)?;
        match u16::from_be_bytes(*kind) {
            KIND_TEXT => {
                let TextBody(body) = decode_exact(body).ok_or(PayloadError::Malformed)?;
                Ok(Payload::Text { body })
            }
            other => Err(PayloadError::UnknownKind(other)),
        }
    }
}

impl fmt::Debug for Payload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Payload::Text { body } => f
                .debug_struct("Text")
                .field("body_len", &body.len())
                .finish_non_exhaustive(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_round_trips() {
        let payload = Payload::Text {
            body: "hello, Bob ☕".into(),
        };
        let bytes = payload.encode();
        assert_eq!(&bytes[..3], &[1, 0, 1]);
        assert_eq!(Payload::decode(&bytes), Ok(payload));
    }

    #[test]
    fn debug_hides_content() {
        let payload = Payload::Text {
            body: "canary-secret".into(),
        };
        let shown = format!("{payload:?}");
        assert!(!shown.contains("canary"), "{shown}");
    }

    #[test]
    fn bad_input_is_an_error() {
        assert_eq!(Payload::decode(&[]), Err(PayloadError::Malformed));
        assert_eq!(Payload::decode(&[1, 0]), Err(PayloadError::Malformed));
        assert_eq!(
            Payload::decode(&[2, 0, 1]),
            Err(PayloadError::UnsupportedFormat(2))
        );
        assert_eq!(
            Payload::decode(&[1, 0, 9, 0x90]),
            Err(PayloadError::UnknownKind(9))
        );
        assert_eq!(
            Payload::decode(&[1, 0, 1, 0xc1]),
            Err(PayloadError::Malformed)
        );
        let mut trailing = Payload::Text { body: "x".into() }.encode();
        trailing.push(0);
        assert_eq!(Payload::decode(&trailing), Err(PayloadError::Malformed));
    }
}
