//! Envelope ids already handled, so that a redelivery (the broker resends what was not
//! acknowledged, e.g. after a reconnect) is dropped instead of decrypted a second time.
//! Both clients keep one in the record saved with their ratchets.

use std::collections::{HashSet, VecDeque};

use serde::{Deserialize, Deserializer, Serialize, Serializer, ser::SerializeSeq};
use serde_bytes::{ByteBuf, Bytes};

/// The most recent [`SeenIds::CAPACITY`] envelope ids handled, oldest first.
///
/// Serialized as the list of ids, oldest first (in MessagePack an array of bin 16); on
/// decoding, entries of another length are skipped and the oldest dropped past the capacity.
#[derive(Clone, Default)]
pub struct SeenIds {
    order: VecDeque<[u8; 16]>,
    index: HashSet<[u8; 16]>,
}

impl SeenIds {
    /// How many ids are remembered.
    pub const CAPACITY: usize = 4096;

    /// Whether `id` was handled.
    pub fn contains(&self, id: &[u8; 16]) -> bool {
        self.index.contains(id)
    }

    /// Remembers `id`, forgetting the oldest past the capacity. Returns whether it is new.
    pub fn insert(&mut self, id: [u8; 16]) -> bool {
        if !self.index.insert(id) {
            return false;
        }
        self.order.push_back(id);
        while self.order.len() > Self::CAPACITY {
            if let Some(old) = self.order.pop_front() {
                self.index.remove(&old);
            }
        }
        true
    }

    /// How many ids are remembered.
    pub fn len(&self) -> usize {
        self.order.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
}

impl Serialize for SeenIds {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut seq = serializer.serialize_seq(Some(self.order.len()))?;
        for id in &self.order {
            seq.serialize_element(Bytes::new(id))?;
        }
        seq.end()
    }
}

impl<'de> Deserialize<'de> for SeenIds {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let mut seen = SeenIds::default();
        for id in Vec::<ByteBuf>::deserialize(deserializer)? {
            if let Ok(id) = <[u8; 16]>::try_from(id.as_slice()) {
                seen.insert(id);
            }
        }
        Ok(seen)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u32) -> [u8; 16] {
        let mut id = [0u8; 16];
        id[..4].copy_from_slice(&n.to_be_bytes());
        id
    }

    #[test]
    fn remembers_the_most_recent_ids_across_encoding() {
        let mut seen = SeenIds::default();
        let n = u32::try_from(SeenIds::CAPACITY).unwrap();
        for i in 0..n + 10 {
            assert!(seen.insert(id(i)));
        }
        assert!(!seen.insert(id(n + 9)), "already there");
        assert_eq!(seen.len(), SeenIds::CAPACITY);
        assert!(!seen.contains(&id(9)), "the oldest were forgotten");
        assert!(seen.contains(&id(10)));
        let decoded: SeenIds =
            rmp_serde::from_slice(&rmp_serde::to_vec(&seen).unwrap()).expect("decodes");
        assert_eq!(decoded.len(), SeenIds::CAPACITY);
        assert!(decoded.contains(&id(n + 9)) && !decoded.contains(&id(9)));
        // The oldest is still the first to go.
        let mut decoded = decoded;
        decoded.insert(id(n + 10));
        assert!(!decoded.contains(&id(10)));
    }

    #[test]
    fn reads_the_list_of_ids_as_records_stored_it() {
        // A record written as a plain list of byte strings, one of them malformed.
        let stored: Vec<ByteBuf> = vec![
            ByteBuf::from(id(1).to_vec()),
            ByteBuf::from(vec![1, 2, 3]),
            ByteBuf::from(id(2).to_vec()),
        ];
        let seen: SeenIds = rmp_serde::from_slice(&rmp_serde::to_vec(&stored).unwrap()).unwrap();
        assert_eq!(seen.len(), 2);
        assert!(seen.contains(&id(1)) && seen.contains(&id(2)));
        let again: Vec<ByteBuf> =
            rmp_serde::from_slice(&rmp_serde::to_vec(&seen).unwrap()).unwrap();
        assert_eq!(
            again,
            vec![ByteBuf::from(id(1).to_vec()), ByteBuf::from(id(2).to_vec())]
        );
    }
}
