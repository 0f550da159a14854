//! A map from device id to per-device state, kept as a vector sorted by id.
//!
//! Every mailbox holds one entry per device of its user, at most
//! [`MAX_DEVICES_PER_USER`](sealpost_proto::limits::MAX_DEVICES_PER_USER), usually one or two.
//! A `BTreeMap` allocates a node with room for eleven entries on the first insert (1.9 KB per
//! mailbox with the current `DeviceQueue`); this holds exactly one slot per device.
//! Lookups are a binary search over a handful of entries. Iteration is in id order, like the
//! `BTreeMap` it replaces.

use std::ops::Index;

use sealpost_proto::DeviceId;

/// Sorted by id, without duplicates, with no spare capacity.
pub(crate) struct DeviceMap<V> {
    entries: Vec<(DeviceId, V)>,
}

impl<V> DeviceMap<V> {
    pub(crate) const fn new() -> Self {
        DeviceMap {
            entries: Vec::new(),
        }
    }

    fn position(&self, id: &DeviceId) -> Result<usize, usize> {
        self.entries.binary_search_by_key(id, |(k, _)| *k)
    }

    pub(crate) fn get(&self, id: &DeviceId) -> Option<&V> {
        let i = self.position(id).ok()?;
        Some(&self.entries[i].1)
    }

    pub(crate) fn get_mut(&mut self, id: &DeviceId) -> Option<&mut V> {
        let i = self.position(id).ok()?;
        Some(&mut self.entries[i].1)
    }

    pub(crate) fn contains_key(&self, id: &DeviceId) -> bool {
        self.position(id).is_ok()
    }

    /// Inserts or replaces; returns the replaced value.
    pub(crate) fn insert(&mut self, id: DeviceId, value: V) -> Option<V> {
        match self.position(&id) {
            Ok(i) => Some(std::mem::replace(&mut self.entries[i].1, value)),
            Err(i) => {
                // Grow by exactly one: devices are added rarely, and a mailbox lives long.
                self.entries.reserve_exact(1);
                self.entries.insert(i, (id, value));
                None
            }
        }
    }

    pub(crate) fn remove(&mut self, id: &DeviceId) -> Option<V> {
        let i = self.position(id).ok()?;
        let (_, value) = self.entries.remove(i);
        self.entries.shrink_to_fit();
        Some(value)
    }

    pub(crate) fn keys(&self) -> impl Iterator<Item = &DeviceId> {
        self.entries.iter().map(|(k, _)| k)
    }

    pub(crate) fn values(&self) -> impl Iterator<Item = &V> {
        self.entries.iter().map(|(_, v)| v)
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = (&DeviceId, &V)> {
        self.entries.iter().map(|(k, v)| (k, v))
    }
}

impl<V> Index<&DeviceId> for DeviceMap<V> {
    type Output = V;

    /// Panics if the device is absent, like `BTreeMap`'s index.
    fn index(&self, id: &DeviceId) -> &V {
        self.get(id).expect("device in the map")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn behaves_like_a_sorted_map() {
        let mut m = DeviceMap::new();
        assert!(m.insert(DeviceId(3), "c").is_none());
        assert!(m.insert(DeviceId(1), "a").is_none());
        assert!(m.insert(DeviceId(2), "b").is_none());
        assert_eq!(m.insert(DeviceId(2), "B"), Some("b"));
        assert_eq!(
            m.keys().copied().collect::<Vec<_>>(),
            [DeviceId(1), DeviceId(2), DeviceId(3)]
        );
        assert_eq!(m.values().copied().collect::<Vec<_>>(), ["a", "B", "c"]);
        assert_eq!(m[&DeviceId(3)], "c");
        assert!(m.contains_key(&DeviceId(1)));
        *m.get_mut(&DeviceId(1)).expect("present") = "A";
        assert_eq!(m.get(&DeviceId(1)), Some(&"A"));
        assert_eq!(m.remove(&DeviceId(1)), Some("A"));
        assert_eq!(m.remove(&DeviceId(1)), None);
        assert!(m.get(&DeviceId(1)).is_none());
        assert_eq!(
            m.iter().map(|(k, v)| (*k, *v)).collect::<Vec<_>>(),
            [(DeviceId(2), "B"), (DeviceId(3), "c")]
        );
        assert_eq!(m.entries.capacity(), 2);
    }
}
