//! The client's errors: [`ClientError`] for operations, [`EnvelopeError`] for one delivered
//! envelope that was rejected.
//!
//! One enum serves the engine and the network SDK, so that an error keeps its variant on its
//! way out (callers match on [`ClientError::MasterKeyChanged`] whichever layer found it). The
//! variants only the network SDK can produce (HTTP, WebSockets, the state directory) exist
//! only with the `net` feature, and so do the transport errors they carry ([`ApiError`],
//! [`ConnError`]; also re-exported from `api` and `conn`). They are defined here, not beside
//! their transports, so that this module imports no other part of the crate: the engine, the
//! HTTP bodies and the network modules all depend on it, never the other way round.
//! `Display` texts never contain keys, tokens or plaintext.

#[cfg(feature = "net")]
use std::path::PathBuf;

use sealpost_proto::ErrorCode;

use crate::crypto::{DeviceListError, KeyError, SafetyNumber, SealError, SessionError, StoreError};

/// Why an operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The broker's HTTP API refused or could not be reached.
    #[cfg(feature = "net")]
    #[error(transparent)]
    Api(#[from] ApiError),
    /// A WebSocket connection failed.
    #[cfg(feature = "net")]
    #[error(transparent)]
    Conn(#[from] ConnError),
    /// The local state could not be read or written.
    #[error("local state: {0}")]
    Store(#[from] StoreError),
    /// An attachment could not be opened or checked.
    #[error("{0}")]
    Attachment(#[from] crate::crypto::AttachmentError),
    /// The state directory could not be used.
    #[cfg(feature = "net")]
    #[error("state directory {path}: {error}")]
    Io {
        /// The directory or file.
        path: PathBuf,
        /// What went wrong.
        error: std::io::Error,
    },
    /// There is no account in the state directory.
    #[cfg(feature = "net")]
    #[error("no Sealpost account in {0}; run register or link first")]
    NotRegistered(PathBuf),
    /// The state directory already holds an account.
    #[cfg(feature = "net")]
    #[error("{0} already holds a Sealpost account")]
    AlreadyRegistered(PathBuf),
    /// Another process has the state directory open.
    #[cfg(feature = "net")]
    #[error("another process is using {0}")]
    Locked(PathBuf),
    /// A contact's device list is signed by a master key other than the pinned one.
    #[error(
        "WARNING: the master key of {user} has changed. This happens when they reset their \
         account, or when someone (including the broker) is trying to intercept your messages. \
         Nothing was sent. Compare the new safety number with them ({new_safety_number}) and \
         accept the change only if it matches."
    )]
    MasterKeyChanged {
        /// The contact.
        user: String,
        /// The safety number with the new master key.
        new_safety_number: SafetyNumber,
        /// The new master key.
        new_master_key: [u8; 32],
    },
    /// A device list does not verify (signature, user, rollback, ...).
    #[error("the device list of {user} does not verify: {error}")]
    DeviceList {
        /// Whose list.
        user: String,
        /// Why.
        error: DeviceListError,
    },
    /// A device list's key-transparency evidence, or its domain's log, failed a check: the
    /// list is not used (nothing is sent to that contact) until it verifies.
    #[error("the keys of {user} could not be verified in the key-transparency log: {error}")]
    Transparency {
        /// Whose list.
        user: String,
        /// Why.
        error: crate::crypto::transparency::TransparencyError,
    },
    /// The account has published no device list.
    #[error("{0} has not published a device list")]
    NoDeviceList(String),
    /// An operation needs a verified device list this device does not hold (yet): fetch it.
    #[error("no verified device list of {0}")]
    ListNotVerified(String),
    /// Not a valid handle.
    #[error("invalid handle {0:?}: {1}")]
    InvalidHandle(String, String),
    /// The broker refused a send.
    #[error("the broker refused the message: {0}")]
    SendRefused(ErrorCode),
    /// The recipient's devices kept changing during the send.
    #[error("the device list of {0} kept changing; try again")]
    DevicesUnstable(String),
    /// A key from the directory is not valid for its device.
    #[error("bad key from the directory for {user} device {device}: {error}")]
    BadKey {
        /// Whose.
        user: String,
        /// Which device.
        device: u32,
        /// Why.
        error: KeyError,
    },
    /// An Olm operation failed while sending.
    #[error("encryption failed: {0}")]
    Session(#[from] SessionError),
    /// Sealing failed.
    #[error("sealing failed: {0}")]
    Seal(#[from] SealError),
    /// The link code is not `<code>.<secret>` as shown by the existing device.
    #[error("malformed link code: expected the code exactly as the existing device shows it")]
    BadLinkCode,
    /// Waited too long.
    #[cfg(feature = "net")]
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
    /// This device was removed from its account.
    #[cfg(feature = "net")]
    #[error("this device was removed from the account")]
    DeviceRevoked,
    /// The request does not make sense (for example removing this device from itself).
    #[error("{0}")]
    Invalid(String),
}

/// Why one delivered envelope was rejected. It has been acked: it will not come again.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EnvelopeError {
    /// An envelope that could not be read yet could not be kept either: too many are held
    /// for its sender (or its domain, or in all).
    #[error("an envelope from {user} could not be kept for later: too many are held")]
    HoldDropped {
        /// The claimed sender.
        user: String,
    },
    /// The sealed layer does not open with this device's key and address: the envelope is
    /// for another device, or was altered in transit.
    #[error("envelope does not open on this device (addressed to another device, or altered): {0}")]
    Unseal(SealError),
    /// The claimed sender's device is not in its signed device list.
    #[error("sender {user} device {device} is not in their signed device list")]
    UnknownSenderDevice {
        /// The claimed sender.
        user: String,
        /// The claimed device.
        device: u32,
    },
    /// The claimed sender's device list could not be verified.
    #[error("cannot verify sender {user}: {error}")]
    SenderUnverified {
        /// The claimed sender.
        user: String,
        /// Why (for example a changed master key).
        error: Box<ClientError>,
    },
    /// Decryption refused the message: forged sender, replay, wrong recipient, tampering.
    #[error("rejected envelope claiming to come from {user} device {device}: {error}")]
    Session {
        /// The claimed sender.
        user: String,
        /// The claimed device.
        device: u32,
        /// The Olm check that failed.
        error: SessionError,
    },
    /// An authentic message of a kind that makes no sense from this sender now.
    #[error("unexpected {kind} from {user}")]
    Unexpected {
        /// The kind of payload.
        kind: &'static str,
        /// The sender.
        user: String,
    },
    /// A link request or grant whose proof does not match any code this device knows.
    #[error("link message with a wrong code proof (or an expired code)")]
    BadLinkProof,
    /// A valid link request could not be completed (publishing the list or sending the
    /// grant failed); link the device again.
    #[error("could not complete linking a device: {0}")]
    LinkFailed(Box<ClientError>),
    /// A group envelope that cannot be read: malformed, of a group this device is not in,
    /// or of an epoch whose secrets are gone.
    #[error("group envelope: {0}")]
    Group(crate::crypto::group::GroupError),
}

/// Why an API call failed.
#[cfg(feature = "net")]
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ApiError {
    /// The broker could not be reached or the connection failed.
    #[error("cannot reach the broker: {0}")]
    Transport(String),
    /// The broker answered with an error status.
    #[error("broker refused {what}: {status} {code}: {message}")]
    Refused {
        /// What was asked.
        what: &'static str,
        /// HTTP status.
        status: u16,
        /// The broker's stable error code (`not_found`, `unauthorized`, ...).
        code: String,
        /// The broker's explanation.
        message: String,
    },
    /// The broker's answer is not what the API documents.
    #[error("unexpected answer to {0}")]
    BadAnswer(&'static str),
}

#[cfg(feature = "net")]
impl ApiError {
    /// The HTTP status of a refusal.
    pub fn status(&self) -> Option<u16> {
        match self {
            ApiError::Refused { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// Whether asking again later may succeed: the broker was unreachable, unavailable
    /// (5xx: shutting down, its store failing, or a peer broker it asked being down) or
    /// asked to slow down (429). Anything else is the broker's considered answer.
    pub fn is_transient(&self) -> bool {
        match self {
            ApiError::Transport(_) => true,
            ApiError::Refused { status, .. } => *status >= 500 || *status == 429,
            ApiError::BadAnswer(_) => false,
        }
    }
}

/// Why a connection failed or ended.
#[cfg(feature = "net")]
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConnError {
    /// Connecting, reading or writing failed.
    #[error("connection to the broker failed: {0}")]
    Transport(String),
    /// The broker closed the connection.
    #[error("broker closed the connection ({code:?}: {reason})")]
    Closed {
        /// The WebSocket close code, if the broker sent one.
        code: Option<u16>,
        /// The close reason.
        reason: String,
    },
    /// The broker sent bytes that are not a frame.
    #[error("undecodable frame from the broker: {0}")]
    Decode(String),
    /// The broker refused the device's credentials.
    #[error("broker refused authentication: {code}: {message}")]
    AuthRefused {
        /// The broker's error code.
        code: ErrorCode,
        /// Its explanation.
        message: String,
    },
    /// Connecting or authenticating took too long.
    #[error("timed out connecting to the broker")]
    Timeout,
}

#[cfg(feature = "net")]
impl ConnError {
    /// A failed session-ticket request, as a failed connection: a refused token (401) is
    /// refused authentication, anything else a transport failure.
    pub(crate) fn from_api(e: ApiError) -> Self {
        match e {
            ApiError::Refused {
                status: 401,
                message,
                ..
            } => ConnError::AuthRefused {
                code: ErrorCode::BadToken,
                message,
            },
            ApiError::Refused {
                status: 429,
                message,
                ..
            } => ConnError::AuthRefused {
                code: ErrorCode::RateLimited,
                message,
            },
            other => ConnError::Transport(other.to_string()),
        }
    }

    /// Whether the broker closed this connection because the device was removed.
    pub fn is_device_revoked(&self) -> bool {
        matches!(
            self,
            ConnError::Closed {
                code: Some(4004),
                ..
            }
        ) || matches!(
            self,
            ConnError::AuthRefused {
                code: ErrorCode::BadToken,
                ..
            }
        )
    }
}
