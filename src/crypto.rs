//! The broker's only cryptography: device auth tokens (random, stored as keyed BLAKE3
//! hashes, compared in constant time), one-time session tickets (keyed BLAKE3 MACs) and
//! platform registration tokens (Ed25519), and the key-transparency log's keys ([`LogKeys`]).
//!
//! The broker holds no key that opens an envelope.

use std::{io::Write, path::Path};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use rand::RngCore;
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

/// BLAKE3 `derive_key` context for the token-hashing key: hardcoded, globally unique,
/// application-specific.
const TOKEN_HASH_CONTEXT: &str = "sealpost 2026-11-26 device auth token hash v1";

/// BLAKE3 `derive_key` context for the delivery-token hashing key.
const DELIVERY_TOKEN_HASH_CONTEXT: &str = "sealpost 2026-11-26 delivery token hash v1";

/// BLAKE3 `derive_key` context for a delivery token's proof (see [`delivery_proof`]).
const DELIVERY_PROOF_CONTEXT: &str = "sealpost 2026-12-06 delivery token proof v1";

/// BLAKE3 `derive_key` context for the key that hashes an attachment's uploader.
const BLOB_OWNER_CONTEXT: &str = "sealpost 2026-12-06 attachment owner v1";

/// BLAKE3 `derive_key` context for the session-ticket MAC key.
const SESSION_TICKET_CONTEXT: &str = "sealpost 2026-12-06 session ticket mac v1";

/// Session tickets are issued for a window of this length and redeemable in it and the next:
/// they live between 30 and 60 seconds.
pub const TICKET_WINDOW_MS: u64 = 30_000;

/// Length of a session ticket's random part; the rest is its MAC.
pub const TICKET_NONCE_BYTES: usize = 16;

/// Domain separation prefix of what the platform signs.
const REGISTRATION_CONTEXT: &[u8] = b"sealpost-registration-v1:";

/// A device's 256-bit auth token. Handed to the device once; never stored, logged or printed.
///
/// Boxed, so that moving a token copies a pointer, not the secret: every copy of the bytes
/// would be one more place to wipe.
pub struct DeviceToken(Box<Zeroizing<[u8; 32]>>);

impl DeviceToken {
    /// A fresh random token.
    pub fn generate() -> Self {
        let mut bytes = Box::new(Zeroizing::new([0u8; 32]));
        rand::rngs::OsRng.fill_bytes(&mut bytes[..]);
        DeviceToken(bytes)
    }

    /// A token received from a device; `None` if it is not 32 bytes.
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        if bytes.len() != 32 {
            return None;
        }
        let mut token = Box::new(Zeroizing::new([0u8; 32]));
        token.copy_from_slice(bytes);
        Some(DeviceToken(token))
    }

    /// A token in its text form (unpadded base64url).
    pub fn from_text(text: &str) -> Option<Self> {
        let bytes = Zeroizing::new(URL_SAFE_NO_PAD.decode(text).ok()?);
        let token = Self::from_bytes(&bytes);
        // The decoder's working copies are on the stack.
        wipe_stack();
        token
    }

    /// The text form handed to the device. The returned string is not zeroized.
    pub fn to_text(&self) -> String {
        URL_SAFE_NO_PAD.encode(&self.0[..])
    }
}

/// Overwrites the stack below the caller's frame, where the functions it just called left
/// their locals: copies of a secret that a hash or a decoder made there (no allocator sees
/// them, so the zeroing allocator cannot wipe them). Called right after such a call.
///
/// A plain `memset` the optimiser must keep (the array is handed to `black_box`), not
/// `zeroize`'s byte-by-byte volatile writes: it runs on every sealed send (delivery tokens).
#[inline(never)]
fn wipe_stack() {
    std::hint::black_box(&mut [0u8; WIPED_STACK_BYTES]);
}

/// How much of the stack [`wipe_stack`] overwrites: more than BLAKE3 and the base64 decoder
/// use below their caller.
const WIPED_STACK_BYTES: usize = 8 * 1024;

/// Hashes device tokens under a key derived from the server secret (`server.key` in the data
/// directory), so a stolen database alone does not let anyone check token guesses offline.
pub struct TokenHasher {
    key: Zeroizing<[u8; 32]>,
    delivery_key: Zeroizing<[u8; 32]>,
    ticket_key: Zeroizing<[u8; 32]>,
}

/// What a broker forwards to a peer instead of a delivery token a client presented, and what
/// the recipient's broker stores the keyed hash of: a one-way derivation of the token. A
/// proof admits sealed envelopes only over an authenticated federation link (clients must
/// present the token itself, whose proof the broker derives), so the sender's outbox never
/// holds what a client could use on `/v1/sealed`.
pub fn delivery_proof(token: &[u8]) -> [u8; 32] {
    blake3::derive_key(DELIVERY_PROOF_CONTEXT, token)
}

/// A one-time session ticket: what a device presents to log in on `/v1/ws` instead of its
/// token, so that the token itself never sits in a long-lived connection's buffers. 16 random
/// bytes and a 128-bit MAC binding them to the device and a time window; no state is kept
/// until it is redeemed (then its nonce is remembered until it expires, see
/// `gateway::tickets`). Never stored, logged or printed.
pub struct SessionTicket(Zeroizing<[u8; 32]>);

impl SessionTicket {
    /// The text form handed to the device (unpadded base64url). Not zeroized.
    pub fn to_text(&self) -> String {
        URL_SAFE_NO_PAD.encode(self.0.as_ref())
    }
}

impl TokenHasher {
    /// Loads the server secret from `dir/server.key`, creating it (mode 0600) if absent.
    pub fn load_or_create(dir: &Path) -> std::io::Result<Self> {
        let path = dir.join("server.key");
        let secret = match std::fs::read(&path) {
            Ok(bytes) => Zeroizing::new(bytes),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut fresh = Zeroizing::new(vec![0u8; 32]);
                rand::rngs::OsRng.fill_bytes(&mut fresh);
                let tmp = dir.join("server.key.tmp");
                let mut opts = std::fs::OpenOptions::new();
                opts.write(true).create(true).truncate(true);
                #[cfg(unix)]
                std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
                let mut f = opts.open(&tmp)?;
                f.write_all(&fresh)?;
                f.sync_all()?;
                std::fs::rename(&tmp, &path)?;
                std::fs::File::open(dir)?.sync_all()?;
                fresh
            }
            Err(e) => return Err(e),
        };
        if secret.len() != 32 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "server.key is not 32 bytes",
            ));
        }
        Ok(TokenHasher {
            key: Zeroizing::new(blake3::derive_key(TOKEN_HASH_CONTEXT, &secret)),
            delivery_key: Zeroizing::new(blake3::derive_key(DELIVERY_TOKEN_HASH_CONTEXT, &secret)),
            ticket_key: Zeroizing::new(blake3::derive_key(SESSION_TICKET_CONTEXT, &secret)),
        })
    }

    /// A secret for another use of the server secret (`context`: a hard-coded, unique
    /// string), e.g. the key that hashes names in the NATS store. The copy is not zeroized.
    pub fn derive_secret(&self, context: &str) -> [u8; 32] {
        blake3::derive_key(context, self.key.as_ref())
    }

    /// What an attachment of `user` is counted under (for its quota): a keyed hash, so the
    /// blob store holds no handle.
    pub fn blob_owner(&self, user: &str) -> [u8; 32] {
        let key = self.derive_secret(BLOB_OWNER_CONTEXT);
        *blake3::keyed_hash(&key, user.as_bytes()).as_bytes()
    }

    /// The stored form of a token.
    pub fn hash(&self, token: &DeviceToken) -> [u8; 32] {
        let hash = *blake3::keyed_hash(&self.key, &token.0[..]).as_bytes();
        // BLAKE3 copies its input into blocks on the stack.
        wipe_stack();
        hash
    }

    /// Whether `token` matches `stored`, in constant time.
    pub fn verify(&self, token: &DeviceToken, stored: &[u8; 32]) -> bool {
        self.hash(token).ct_eq(stored).into()
    }

    /// The stored form of a delivery token (any length; clients use 32 random bytes).
    pub fn hash_delivery_token(&self, token: &[u8]) -> [u8; 32] {
        let hash = *blake3::keyed_hash(&self.delivery_key, token).as_bytes();
        wipe_stack();
        hash
    }

    /// Whether a delivery token matches `stored`, in constant time.
    pub fn verify_delivery_token(&self, token: &[u8], stored: &[u8; 32]) -> bool {
        self.hash_delivery_token(token).ct_eq(stored).into()
    }

    /// A fresh session ticket for `user`'s `device`, issued at `now_ms`.
    pub fn issue_ticket(&self, user: &str, device: u32, now_ms: u64) -> SessionTicket {
        let mut ticket = Zeroizing::new([0u8; 32]);
        rand::rngs::OsRng.fill_bytes(&mut ticket[..TICKET_NONCE_BYTES]);
        let mut nonce = [0u8; TICKET_NONCE_BYTES];
        nonce.copy_from_slice(&ticket[..TICKET_NONCE_BYTES]);
        let mac = self.ticket_mac(user, device, now_ms / TICKET_WINDOW_MS, &nonce);
        ticket[TICKET_NONCE_BYTES..].copy_from_slice(&mac);
        SessionTicket(ticket)
    }

    /// The nonce of `ticket` if it is a ticket for `user`'s `device` that has not expired at
    /// `now_ms` (whether it was used before is the caller's to check). Constant time in the
    /// MAC comparison.
    pub fn check_ticket(
        &self,
        user: &str,
        device: u32,
        ticket: &[u8],
        now_ms: u64,
    ) -> Option<[u8; TICKET_NONCE_BYTES]> {
        if ticket.len() != 32 {
            return None;
        }
        let (nonce, mac) = ticket.split_at(TICKET_NONCE_BYTES);
        let nonce: [u8; TICKET_NONCE_BYTES] = nonce.try_into().ok()?;
        let window = now_ms / TICKET_WINDOW_MS;
        let valid = [window, window.saturating_sub(1)]
            .iter()
            .fold(subtle::Choice::from(0), |ok, w| {
                ok | self.ticket_mac(user, device, *w, &nonce).ct_eq(mac)
            });
        bool::from(valid).then_some(nonce)
    }

    fn ticket_mac(
        &self,
        user: &str,
        device: u32,
        window: u64,
        nonce: &[u8; TICKET_NONCE_BYTES],
    ) -> [u8; 16] {
        let mut h = blake3::Hasher::new_keyed(&self.ticket_key);
        h.update(&(user.len() as u64).to_be_bytes())
            .update(user.as_bytes())
            .update(&device.to_be_bytes())
            .update(&window.to_be_bytes())
            .update(nonce);
        let mut mac = [0u8; 16];
        mac.copy_from_slice(&h.finalize().as_bytes()[..16]);
        mac
    }

    /// The stored form of a link code.
    pub fn hash_link_code(&self, code: &str) -> [u8; 32] {
        blake3::keyed_hash(&self.key, code.as_bytes()).into()
    }
}

/// Short BLAKE3 digest of bytes, for logs: identifies an envelope without revealing it.
pub fn digest(bytes: &[u8]) -> String {
    let h = blake3::hash(bytes);
    h.to_hex()[..16].to_owned()
}

/// Why a platform registration token was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RegistrationTokenError {
    /// Not `payload.signature` in base64url, or the payload is not the documented JSON.
    #[error("malformed registration token")]
    Malformed,
    /// The signature does not verify under the platform key.
    #[error("registration token signature is invalid")]
    BadSignature,
    /// The token is for another handle.
    #[error("registration token is for another handle")]
    WrongHandle,
    /// The token has expired.
    #[error("registration token has expired")]
    Expired,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct RegistrationClaims {
    handle: String,
    /// Expiry, seconds since the Unix epoch.
    exp: u64,
}

/// Parses an Ed25519 public key given as base64 (standard or url-safe) of 32 bytes.
pub fn parse_platform_key(text: &str) -> Option<VerifyingKey> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .or_else(|_| URL_SAFE_NO_PAD.decode(text.trim()))
        .ok()?;
    VerifyingKey::from_bytes(&bytes.try_into().ok()?).ok()
}

/// Checks a registration token minted by the host platform:
/// `base64url(json {"handle","exp"}) "." base64url(ed25519 signature)`, where the signature
/// covers `"sealpost-registration-v1:" || json`.
pub fn verify_registration_token(
    key: &VerifyingKey,
    token: &str,
    handle: &str,
    now_secs: u64,
) -> Result<(), RegistrationTokenError> {
    use RegistrationTokenError::*;
    let (payload, sig) = token.split_once('.').ok_or(Malformed)?;
    let payload = URL_SAFE_NO_PAD.decode(payload).map_err(|_| Malformed)?;
    let sig = URL_SAFE_NO_PAD.decode(sig).map_err(|_| Malformed)?;
    let sig = Signature::from_slice(&sig).map_err(|_| Malformed)?;
    let mut signed = REGISTRATION_CONTEXT.to_vec();
    signed.extend_from_slice(&payload);
    key.verify_strict(&signed, &sig).map_err(|_| BadSignature)?;
    let claims: RegistrationClaims = serde_json::from_slice(&payload).map_err(|_| Malformed)?;
    if claims.handle != handle {
        return Err(WrongHandle);
    }
    if claims.exp <= now_secs {
        return Err(Expired);
    }
    Ok(())
}

/// Mints a registration token (what the host platform does; used by the `mint-token`
/// command and tests).
pub fn mint_registration_token(key: &SigningKey, handle: &str, exp_secs: u64) -> String {
    let payload = serde_json::to_vec(&RegistrationClaims {
        handle: handle.to_owned(),
        exp: exp_secs,
    })
    .expect("claims serialize");
    let mut signed = REGISTRATION_CONTEXT.to_vec();
    signed.extend_from_slice(&payload);
    let sig = key.sign(&signed);
    format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(&payload),
        URL_SAFE_NO_PAD.encode(sig.to_bytes())
    )
}

/// BLAKE3 `derive_key` context for the key-transparency log's Ed25519 signing key.
const LOG_SIGNING_CONTEXT: &str = "sealpost 2026-12-06 transparency log signing key";

/// BLAKE3 `derive_key` context for the key-transparency log's VRF key.
const LOG_VRF_CONTEXT: &str = "sealpost 2026-12-06 transparency log VRF key";

/// The key-transparency log's keys, derived from the server secret: an Ed25519 key that signs
/// epoch roots and co-signatures, and the VRF key that hides handles in the tree. No `Debug`.
pub struct LogKeys {
    signing: SigningKey,
    vrf: Zeroizing<[u8; 32]>,
}

impl LogKeys {
    /// The log's keys for this server secret.
    pub fn derive(hasher: &TokenHasher) -> Self {
        let seed = Zeroizing::new(hasher.derive_secret(LOG_SIGNING_CONTEXT));
        LogKeys {
            signing: SigningKey::from_bytes(&seed),
            vrf: Zeroizing::new(hasher.derive_secret(LOG_VRF_CONTEXT)),
        }
    }

    /// Keys from raw seeds (tests and the deliberately equivocating test hook).
    pub fn from_seeds(signing: [u8; 32], vrf: [u8; 32]) -> Self {
        LogKeys {
            signing: SigningKey::from_bytes(&signing),
            vrf: Zeroizing::new(vrf),
        }
    }

    /// The public half of the signing key.
    pub fn public(&self) -> [u8; 32] {
        self.signing.verifying_key().to_bytes()
    }

    /// The VRF secret, for akd.
    pub fn vrf_secret(&self) -> &[u8; 32] {
        &self.vrf
    }

    /// Signs `bytes` (a root's or a co-signature's signed bytes, already domain-separated).
    pub fn sign(&self, bytes: &[u8]) -> [u8; 64] {
        self.signing.sign(bytes).to_bytes()
    }
}

/// Whether `signature` is `key`'s (strict Ed25519) over `bytes`.
pub fn verify_log_signature(key: &[u8; 32], bytes: &[u8], signature: &[u8; 64]) -> bool {
    VerifyingKey::from_bytes(key)
        .and_then(|k| k.verify_strict(bytes, &Signature::from_bytes(signature)))
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_hash_and_verify() {
        let dir = tempfile::tempdir().unwrap();
        let h = TokenHasher::load_or_create(dir.path()).unwrap();
        let t = DeviceToken::generate();
        let stored = h.hash(&t);
        assert!(h.verify(&DeviceToken::from_text(&t.to_text()).unwrap(), &stored));
        assert!(!h.verify(&DeviceToken::generate(), &stored));
        // Same secret after reload.
        let h2 = TokenHasher::load_or_create(dir.path()).unwrap();
        assert!(h2.verify(&t, &stored));
        assert!(DeviceToken::from_bytes(&[0; 31]).is_none());
    }

    #[test]
    fn session_tickets_bind_a_device_and_expire() {
        let dir = tempfile::tempdir().unwrap();
        let h = TokenHasher::load_or_create(dir.path()).unwrap();
        let now = 10 * TICKET_WINDOW_MS + 5;
        let t = h.issue_ticket("a@x", 1, now);
        let nonce = h.check_ticket("a@x", 1, t.0.as_ref(), now).expect("valid");
        assert_eq!(nonce[..], t.0[..TICKET_NONCE_BYTES]);
        // Still good in the next window, not after it.
        assert!(
            h.check_ticket("a@x", 1, t.0.as_ref(), now + TICKET_WINDOW_MS)
                .is_some()
        );
        assert!(
            h.check_ticket("a@x", 1, t.0.as_ref(), now + 2 * TICKET_WINDOW_MS)
                .is_none()
        );
        // Not for another device or account, not before it was issued, not altered.
        assert!(h.check_ticket("a@x", 2, t.0.as_ref(), now).is_none());
        assert!(h.check_ticket("b@x", 1, t.0.as_ref(), now).is_none());
        assert!(
            h.check_ticket("a@x", 1, t.0.as_ref(), now - TICKET_WINDOW_MS)
                .is_none()
        );
        let mut altered = *t.0;
        altered[0] ^= 1;
        assert!(h.check_ticket("a@x", 1, &altered, now).is_none());
        assert!(h.check_ticket("a@x", 1, &altered[..31], now).is_none());
        // Another broker's secret does not accept it.
        let other = TokenHasher::load_or_create(tempfile::tempdir().unwrap().path()).unwrap();
        assert!(other.check_ticket("a@x", 1, t.0.as_ref(), now).is_none());
    }

    #[test]
    fn registration_tokens() {
        let key = SigningKey::generate(&mut rand::rngs::OsRng);
        let vk = key.verifying_key();
        let t = mint_registration_token(&key, "a@x", 100);
        assert_eq!(verify_registration_token(&vk, &t, "a@x", 99), Ok(()));
        assert_eq!(
            verify_registration_token(&vk, &t, "b@x", 99),
            Err(RegistrationTokenError::WrongHandle)
        );
        assert_eq!(
            verify_registration_token(&vk, &t, "a@x", 100),
            Err(RegistrationTokenError::Expired)
        );
        let other = SigningKey::generate(&mut rand::rngs::OsRng).verifying_key();
        assert_eq!(
            verify_registration_token(&other, &t, "a@x", 1),
            Err(RegistrationTokenError::BadSignature)
        );
        assert_eq!(
            verify_registration_token(&vk, "garbage", "a@x", 1),
            Err(RegistrationTokenError::Malformed)
        );
    }
}
