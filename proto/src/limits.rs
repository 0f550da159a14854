//! Limits both sides enforce. The broker rejects anything larger with a stable error code;
//! clients use the same numbers to avoid building frames the broker would refuse.

/// Largest WebSocket message the broker accepts from a device, in bytes.
pub const MAX_FRAME_BYTES: usize = 512 * 1024;

/// Largest ciphertext of a single copy (one recipient device) of an envelope, in bytes.
pub const MAX_CIPHERTEXT_BYTES: usize = 64 * 1024;

/// Largest ciphertext of a `group_send` (one MLS message for every listed device), in bytes:
/// a Commit that adds hundreds of members, or their Welcome with the group's tree, is
/// hundreds of KiB (adding 999 members at once: about 284 KiB).
pub const MAX_GROUP_CIPHERTEXT_BYTES: usize = 448 * 1024;
/// Most recipients (accounts) of one `group_send`: a group of up to this many members.
pub const MAX_GROUP_RECIPIENTS: usize = 2000;
/// Most devices one `group_send` may address in all (the copies it makes): a group of 1,000
/// accounts of up to four devices each, or 2,000 of two.
pub const MAX_GROUP_DEVICES: usize = 4000;
/// Most devices one account may have; also the most copies a single send may carry.
pub const MAX_DEVICES_PER_USER: usize = 16;

/// Largest piece of an attachment upload (one `PATCH`), in bytes.
pub const MAX_BLOB_PIECE_BYTES: usize = 4 * 1024 * 1024;

/// Most frames one `batch` message carries (the broker to a device that asked for batches).
pub const MAX_BATCH_FRAMES: usize = 256;

/// Most bytes of frames the broker puts in one `batch` message (one frame alone may be
/// larger: it is then sent on its own).
pub const MAX_BATCH_BYTES: usize = 256 * 1024;

/// Most sequence numbers one `ack` frame may carry.
pub const MAX_ACKS_PER_FRAME: usize = 4096;

/// Longest time-to-live a durable envelope may ask for: 30 days.
pub const MAX_DURABLE_TTL_SECS: u32 = 30 * 24 * 3600;

/// Longest time-to-live an urgent envelope (call ringing) may ask for: 5 minutes.
pub const MAX_URGENT_TTL_SECS: u32 = 300;

/// Longest account handle, `name@domain`, in bytes.
pub const MAX_HANDLE_BYTES: usize = 254;

/// Longest local part (before the `@`) of a handle, in bytes.
pub const MAX_HANDLE_NAME_BYTES: usize = 64;

/// Length of a device auth token, in bytes (256 bits).
pub const TOKEN_BYTES: usize = 32;
