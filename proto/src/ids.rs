//! Identifiers: account handles, device ids and envelope ids.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::limits::{MAX_HANDLE_BYTES, MAX_HANDLE_NAME_BYTES};

/// An account handle `name@domain`: lower-case ASCII, no phone number anywhere.
///
/// The name is 1–64 of `a-z 0-9 . _ -`; the domain is dot-separated labels of `a-z 0-9 -`
/// (each 1–63 bytes, not starting or ending with `-`). Handles never contain `0xff`, which the
/// broker's store relies on as a key separator.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct Handle(String);

/// Why a string is not a valid [`Handle`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HandleError {
    /// The handle has no `@`, or more than one.
    #[error("a handle is name@domain")]
    Shape,
    /// The handle is longer than the limit.
    #[error("handle longer than {MAX_HANDLE_BYTES} bytes")]
    TooLong,
    /// The name part is empty, too long, or has a character outside `a-z 0-9 . _ -`.
    #[error("the name of a handle is 1-{MAX_HANDLE_NAME_BYTES} of a-z 0-9 . _ -")]
    Name,
    /// The domain part is not a lower-case DNS name.
    #[error("the domain of a handle is a lower-case DNS name")]
    Domain,
}

impl Handle {
    /// Validates `s` as a handle.
    pub fn parse(s: &str) -> Result<Self, HandleError> {
        if s.len() > MAX_HANDLE_BYTES {
            return Err(HandleError::TooLong);
        }
        let (name, domain) = s.split_once('@').ok_or(HandleError::Shape)?;
        if domain.contains('@') {
            return Err(HandleError::Shape);
        }
        let name_ok = !name.is_empty()
            && name.len() <= MAX_HANDLE_NAME_BYTES
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b));
        if !name_ok {
            return Err(HandleError::Name);
        }
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        };
        if !domain.split('.').all(label_ok) {
            return Err(HandleError::Domain);
        }
        Ok(Handle(s.to_owned()))
    }

    /// The handle as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The domain part, after the `@`.
    pub fn domain(&self) -> &str {
        self.0.split_once('@').map_or("", |(_, d)| d)
    }
}

impl fmt::Display for Handle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Handle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Handle({})", self.0)
    }
}

impl<'de> Deserialize<'de> for Handle {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Handle::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// A device of an account, numbered by the broker from 1 when the device is added.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct DeviceId(pub u32);

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl fmt::Debug for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DeviceId({})", self.0)
    }
}

/// A client-chosen 128-bit envelope id. It makes retried sends idempotent at the broker and
/// lets clients discard redeliveries. Clients pick it at random.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EnvelopeId(pub [u8; 16]);

impl EnvelopeId {
    /// The id's bytes.
    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }
}

impl fmt::Debug for EnvelopeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("EnvelopeId(")?;
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        f.write_str(")")
    }
}

impl Serialize for EnvelopeId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for EnvelopeId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let bytes = serde_bytes::ByteBuf::deserialize(d)?;
        let arr: [u8; 16] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| serde::de::Error::invalid_length(bytes.len(), &"16 bytes"))?;
        Ok(EnvelopeId(arr))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handles() {
        assert!(Handle::parse("alice@example.com").is_ok());
        assert!(Handle::parse("a.b_c-d@localhost").is_ok());
        assert_eq!(Handle::parse("alice").unwrap_err(), HandleError::Shape);
        assert_eq!(Handle::parse("a@b@c").unwrap_err(), HandleError::Shape);
        assert_eq!(Handle::parse("Alice@x.y").unwrap_err(), HandleError::Name);
        assert_eq!(Handle::parse("@x.y").unwrap_err(), HandleError::Name);
        assert_eq!(Handle::parse("a@").unwrap_err(), HandleError::Domain);
        assert_eq!(Handle::parse("a@x..y").unwrap_err(), HandleError::Domain);
        assert_eq!(Handle::parse("a@-x.y").unwrap_err(), HandleError::Domain);
        assert_eq!(
            Handle::parse("+15551234@x.y").unwrap_err(),
            HandleError::Name
        );
        assert_eq!(
            Handle::parse("alice@example.com").unwrap().domain(),
            "example.com"
        );
    }
}
