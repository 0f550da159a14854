//! The Olm message as it travels inside a sealed envelope: vodozemac's type behind ours, so
//! that the sealing code can carry it and the session code can make and read it without
//! either depending on the other.

use vodozemac::olm;

/// Kind of Olm message, as carried on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OlmMessageKind {
    /// Establishes a session (sent until the peer replies).
    PreKey,
    /// A message on an established session.
    Normal,
}

impl OlmMessageKind {
    /// The wire value (0 pre-key, 1 normal; Olm's own numbering).
    pub fn to_u8(self) -> u8 {
        match self {
            OlmMessageKind::PreKey => 0,
            OlmMessageKind::Normal => 1,
        }
    }
}

/// An encrypted Olm message (vodozemac's type, kept behind this module).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OlmMessage(pub(crate) olm::OlmMessage);

impl OlmMessage {
    /// Pre-key or normal.
    pub fn kind(&self) -> OlmMessageKind {
        match self.0 {
            olm::OlmMessage::PreKey(_) => OlmMessageKind::PreKey,
            olm::OlmMessage::Normal(_) => OlmMessageKind::Normal,
        }
    }

    /// The kind byte and the Olm message bytes (vodozemac's documented encoding).
    pub fn to_parts(&self) -> (u8, Vec<u8>) {
        let (_, bytes) = self.0.to_parts();
        (self.kind().to_u8(), bytes)
    }

    /// Decodes from [`OlmMessage::to_parts`] output; `None` if malformed.
    pub fn from_parts(kind: u8, bytes: &[u8]) -> Option<Self> {
        olm::OlmMessage::from_parts(usize::from(kind), bytes)
            .ok()
            .map(Self)
    }
}
