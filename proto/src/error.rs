//! Errors of the codec, and the stable codes the broker puts on the wire.

/// Why a frame could not be decoded. Each variant is a problem with the bytes received, never a
/// bug on the decoding side.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    /// The frame is shorter than its two-byte header.
    #[error("frame shorter than its header")]
    Truncated,
    /// The version byte names a protocol version this build does not speak.
    #[error("unsupported protocol version {0}")]
    UnsupportedVersion(u8),
    /// The kind byte names no frame type of this direction.
    #[error("unknown frame type {0:#04x}")]
    UnknownFrameType(u8),
    /// The frame is larger than [`crate::limits::MAX_FRAME_BYTES`].
    #[error("frame of {0} bytes exceeds the limit")]
    TooLarge(usize),
    /// The MessagePack body does not match the frame type's schema.
    #[error("malformed frame body: {0}")]
    Malformed(String),
    /// The body decoded but bytes were left over after it.
    #[error("{0} trailing bytes after the frame body")]
    TrailingBytes(usize),
}

impl DecodeError {
    /// The wire error code reported to the peer for this decode failure.
    pub fn code(&self) -> ErrorCode {
        match self {
            DecodeError::Truncated | DecodeError::Malformed(_) | DecodeError::TrailingBytes(_) => {
                ErrorCode::MalformedFrame
            }
            DecodeError::UnsupportedVersion(_) => ErrorCode::UnsupportedVersion,
            DecodeError::UnknownFrameType(_) => ErrorCode::UnknownFrameType,
            DecodeError::TooLarge(_) => ErrorCode::FrameTooLarge,
        }
    }
}

macro_rules! wire_enum {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident = $value:literal => $text:literal,)* }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[repr(u16)]
        pub enum $name {
            $($(#[$vmeta])* $variant = $value,)*
        }

        impl $name {
            /// Every value this build knows, in wire order (to register metric labels up front).
            pub const ALL: &'static [Self] = &[$(Self::$variant,)*];

            /// The numeric value sent on the wire.
            pub fn as_u16(self) -> u16 {
                self as u16
            }

            /// The value for a number received on the wire, if this build knows it.
            pub fn from_u16(value: u16) -> Option<Self> {
                match value {
                    $($value => Some(Self::$variant),)*
                    _ => None,
                }
            }

            /// A stable snake_case name, used in logs, metrics labels and close reasons.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(Self::$variant => $text,)*
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

wire_enum! {
    /// Stable error codes carried by [`crate::ServerFrame::Error`] and rejected
    /// [`crate::SendOutcome`]s. Numbers never change meaning; new codes are appended.
    ErrorCode {
        /// The frame's bytes do not decode.
        MalformedFrame = 1 => "malformed_frame",
        /// The frame's version byte is not spoken by this broker.
        UnsupportedVersion = 2 => "unsupported_version",
        /// The frame's type byte is unknown.
        UnknownFrameType = 3 => "unknown_frame_type",
        /// The frame exceeds the size limit.
        FrameTooLarge = 4 => "frame_too_large",
        /// One ciphertext exceeds the per-copy size limit.
        EnvelopeTooLarge = 5 => "envelope_too_large",
        /// A frame other than `auth` arrived before authentication.
        NotAuthenticated = 6 => "not_authenticated",
        /// The user, device or token is unknown, wrong or revoked.
        BadToken = 7 => "bad_token",
        /// The recipient account does not exist.
        UnknownRecipient = 8 => "unknown_recipient",
        /// The send's device set differs from the recipient's current devices.
        StaleDevices = 9 => "stale_devices",
        /// A recipient device's queue is at its quota; nothing was stored.
        MailboxFull = 10 => "mailbox_full",
        /// Too many frames or connections; slow down.
        RateLimited = 11 => "rate_limited",
        /// An ack named a sequence number that is not outstanding for this device.
        UnknownSeq = 12 => "unknown_seq",
        /// The time-to-live is zero or above the class's maximum.
        InvalidTtl = 13 => "invalid_ttl",
        /// A handle is not of the form `name@domain`.
        InvalidHandle = 14 => "invalid_handle",
        /// A second `auth` frame arrived on an authenticated connection.
        AlreadyAuthenticated = 15 => "already_authenticated",
        /// The send carries no copies, too many, or names a device twice.
        InvalidCopies = 16 => "invalid_copies",
        /// The broker could not make the envelope durable (for example, the disk is full);
        /// nothing was stored and the send may be retried later.
        StoreUnavailable = 17 => "store_unavailable",
        /// The broker failed in a way that is its own fault.
        Internal = 18 => "internal",
        /// The broker is shutting down; retry against another instance or later.
        ShuttingDown = 19 => "shutting_down",
        /// The recipient's domain is neither served by this broker nor a federation peer.
        UnknownDomain = 20 => "unknown_domain",
        /// A sealed send or key claim lacks a valid delivery token for the recipient.
        BadDeliveryToken = 21 => "bad_delivery_token",
        /// The frame is not accepted on this endpoint (the anonymous endpoint takes only
        /// `sealed_send` and `group_send`, and the authenticated one everything but
        /// `sealed_send`).
        WrongEndpoint = 22 => "wrong_endpoint",
        /// Federation: the calling broker's domain is not a known peer, or the link was
        /// addressed to another domain.
        UnknownPeer = 23 => "unknown_peer",
        /// Federation: the peer's static key does not match its domain's key.
        PeerAuthFailed = 24 => "peer_auth_failed",
        /// No such device or key.
        NotFound = 25 => "not_found",
        /// Federation: the recipient's broker cannot be reached now; retry later.
        PeerUnavailable = 26 => "peer_unavailable",
        /// An ordered group send (a Commit) for an epoch the group has left, or whose epoch
        /// another member's send already took: process what arrived, then retry on top of it.
        StaleEpoch = 27 => "stale_epoch",
        /// A group send addresses too many recipients, or one twice.
        InvalidRecipients = 28 => "invalid_recipients",
    }
}

wire_enum! {
    /// WebSocket close codes (4000–4999, the private-use range, plus standard ones) with which
    /// the broker ends a device connection. The close reason text is [`CloseCode::as_str`].
    CloseCode {
        /// The broker is shutting down (RFC 6455 "going away").
        GoingAway = 1001 => "going_away",
        /// The peer broke the protocol (RFC 6455 "protocol error").
        ProtocolError = 1002 => "protocol_error",
        /// A frame exceeded the size limit (RFC 6455 "message too big").
        TooBig = 1009 => "message_too_big",
        /// The broker is short of buffer memory; reconnect after a backoff (RFC 6455 "try
        /// again later").
        TryAgainLater = 1013 => "try_again_later",
        /// Another connection authenticated as the same device.
        Displaced = 4000 => "displaced",
        /// Authentication failed or did not happen in time.
        AuthFailed = 4001 => "auth_failed",
        /// The device did not read its deliveries fast enough; it resumes from the store.
        SlowConsumer = 4003 => "slow_consumer",
        /// The device was removed from its account.
        DeviceRevoked = 4004 => "device_revoked",
        /// The connection sent too many frames.
        RateLimited = 4005 => "rate_limited",
        /// Nothing was heard from the device within the idle timeout.
        IdleTimeout = 4006 => "idle_timeout",
        /// Federation: the link was refused (unknown peer, failed handshake, bad frames).
        PeerRefused = 4007 => "peer_refused",
    }
}
