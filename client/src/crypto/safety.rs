//! Safety numbers: 60 decimal digits two users compare (in person, or over another channel)
//! to confirm that each one's client has the other's real master key.
//!
//! # Derivation (version 1)
//!
//! For each user, `party = u16 BE len(handle) ‖ handle (UTF-8) ‖ master public key (32)`.
//! The two encodings are sorted bytewise, so both sides compute the same number, and
//!
//! ```text
//! out = BLAKE3-derive_key("sealpost safety number v1", party_low ‖ party_high), XOF 60 bytes
//! group i (i = 0..12) = u40 BE(out[5i .. 5i+5]) mod 100000, shown as 5 digits
//! ```
//!
//! The handle length prefix and the fixed key length make the concatenation unambiguous. Each
//! 5-byte chunk reduced mod 10⁵ has a bias below 10⁻⁷, so the number carries about 199 bits;
//! matching a given number with another master key is a 2¹⁹⁹-work second preimage, so unlike
//! Signal's per-user halves no iteration count is needed. The number changes if either
//! handle or either master key changes; device keys are not part of it (they are vouched for
//! by the master key through the signed device list).

use std::fmt;

/// BLAKE3 context of the derivation (hardcoded, globally unique, application-specific).
const CONTEXT: &str = "sealpost safety number v1";

const GROUPS: usize = 12;
const GROUP_BYTES: usize = 5;

/// A safety number: 12 groups of 5 decimal digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct SafetyNumber([u32; GROUPS]);

impl SafetyNumber {
    /// The 12 groups, each below 100000.
    pub fn groups(&self) -> [u32; GROUPS] {
        self.0
    }

    /// The 60 digits without spaces (for a QR code or comparison of pasted text).
    pub fn digits(&self) -> String {
        self.0.iter().map(|g| format!("{g:05}")).collect()
    }
}

impl fmt::Display for SafetyNumber {
    /// Groups separated by spaces: `12345 67890 …`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, group) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            write!(f, "{group:05}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for SafetyNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SafetyNumber({self})")
    }
}

fn party(handle: &str, master_key: &[u8; 32]) -> Vec<u8> {
    // Handles are at most 254 bytes (sealpost_proto::limits); saturate rather than panic on a
    // longer string, which still yields a deterministic, collision-free encoding for all
    // valid handles.
    let len = u16::try_from(handle.len()).unwrap_or(u16::MAX);
    let mut out = Vec::with_capacity(2 + handle.len() + 32);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(handle.as_bytes());
    out.extend_from_slice(master_key);
    out
}

/// The safety number between two users; the same whichever side computes it.
pub fn safety_number(
    local_user: &str,
    local_master: &[u8; 32],
    remote_user: &str,
    remote_master: &[u8; 32],
) -> SafetyNumber {
    let mut pair = [
        party(local_user, local_master),
        party(remote_user, remote_master),
    ];
    pair.sort();
    let mut hasher = blake3::Hasher::new_derive_key(CONTEXT);
    hasher.update(&pair[0]).update(&pair[1]);
    let mut out = [0u8; GROUPS * GROUP_BYTES];
    hasher.finalize_xof().fill(&mut out);

    let mut groups = [0u32; GROUPS];
    for (group, chunk) in groups.iter_mut().zip(out.chunks_exact(GROUP_BYTES)) {
        let mut wide = [0u8; 8];
        wide[8 - GROUP_BYTES..].copy_from_slice(chunk);
        let value = u64::from_be_bytes(wide) % 100_000;
        *group = u32::try_from(value).expect("below 100000");
    }
    SafetyNumber(groups)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symmetric() {
        let (a, b) = ([1u8; 32], [2u8; 32]);
        let ab = safety_number("alice@a.example", &a, "bob@b.example", &b);
        let ba = safety_number("bob@b.example", &b, "alice@a.example", &a);
        assert_eq!(ab, ba);
        assert_eq!(ab.digits().len(), 60);
        assert!(ab.digits().bytes().all(|c| c.is_ascii_digit()));
        assert_eq!(ab.to_string().len(), 60 + 11);
        assert!(ab.groups().iter().all(|&g| g < 100_000));
    }

    #[test]
    fn differs_when_any_input_differs() {
        let (a, b, c) = ([1u8; 32], [2u8; 32], [3u8; 32]);
        let base = safety_number("alice@a.example", &a, "bob@b.example", &b);
        assert_ne!(
            base,
            safety_number("alice@a.example", &a, "bob@b.example", &c)
        );
        assert_ne!(
            base,
            safety_number("alice@a.example", &c, "bob@b.example", &b)
        );
        assert_ne!(
            base,
            safety_number("alice@a.example", &a, "rob@b.example", &b)
        );
        // Swapping keys between the two handles changes the number.
        assert_ne!(
            base,
            safety_number("alice@a.example", &b, "bob@b.example", &a)
        );
    }

    #[test]
    fn pinned_vector() {
        // Pins the derivation: a change here breaks every user's comparison.
        let number = safety_number("alice@a.example", &[1u8; 32], "bob@b.example", &[2u8; 32]);
        assert_eq!(number.digits(), PINNED);
    }

    const PINNED: &str = "132656266724318404290609508200919750101678688872661593468862";
}
