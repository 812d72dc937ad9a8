//! The topic registry: a packed open-addressing table from a topic to the log position
//! of its latest record.
//!
//! A slot is 16 bytes: the topic name's 64-bit hash and the position. Everything
//! else a topic has — its name, next offset and epoch — is in that latest record,
//! which the append path reads anyway to link the new record to it. So the table
//! stays at 16 bytes per slot, 20–40 bytes per topic at the load factors it runs at
//! (≤ 0.8, power-of-two sizes, linear probing), instead of the ~110 bytes of a
//! `HashMap<String, _>`.
//!
//! Equal hashes are not trusted to mean equal names: a lookup confirms a hash match by
//! comparing the name stored at the slot's position (the `is_topic` callback), so two
//! topics whose hashes collide are still kept apart.

/// Largest load before the table doubles, as a fraction numerator / 10.
const MAX_LOAD_TENTHS: usize = 8;
const MIN_SLOTS: usize = 64;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Slot {
    /// Hash of the topic name; 0 marks an empty slot (a real hash of 0 is stored as 1).
    hash: u64,
    /// Log position of the topic's latest record.
    pos: u64,
}

/// Topic → latest record position.
#[derive(Debug)]
pub struct TopicTable {
    slots: Box<[Slot]>,
    len: usize,
}

impl Default for TopicTable {
    fn default() -> Self {
        Self::new()
    }
}

fn stored_hash(hash: u64) -> u64 {
    hash.max(1)
}

impl TopicTable {
    pub fn new() -> Self {
        Self::with_slots(MIN_SLOTS)
    }

    fn with_slots(slots: usize) -> Self {
        debug_assert!(slots.is_power_of_two());
        TopicTable {
            slots: vec![Slot::default(); slots].into_boxed_slice(),
            len: 0,
        }
    }

    /// Number of topics.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Heap bytes the table takes.
    pub fn memory_bytes(&self) -> usize {
        self.slots.len() * std::mem::size_of::<Slot>()
    }

    fn mask(&self) -> usize {
        self.slots.len() - 1
    }

    /// The slot index of the topic with `hash` for which `is_topic(position)` holds.
    pub fn find(&self, hash: u64, mut is_topic: impl FnMut(u64) -> bool) -> Option<usize> {
        let hash = stored_hash(hash);
        let mask = self.mask();
        let mut index = hash as usize & mask;
        loop {
            let slot = self.slots[index];
            if slot.hash == 0 {
                return None;
            }
            if slot.hash == hash && is_topic(slot.pos) {
                return Some(index);
            }
            index = (index + 1) & mask;
        }
    }

    /// Position stored in slot `index` (from [`TopicTable::find`]).
    pub fn pos(&self, index: usize) -> u64 {
        self.slots[index].pos
    }

    pub fn set_pos(&mut self, index: usize, pos: u64) {
        self.slots[index].pos = pos;
    }

    /// Adds a topic that [`TopicTable::find`] did not find; returns its slot index,
    /// valid until the next insert or rebuild.
    pub fn insert(&mut self, hash: u64, pos: u64) -> usize {
        if (self.len + 1) * 10 > self.slots.len() * MAX_LOAD_TENTHS {
            self.resize(self.slots.len() * 2);
        }
        let index = self.place(Slot {
            hash: stored_hash(hash),
            pos,
        });
        self.len += 1;
        index
    }

    fn place(&mut self, slot: Slot) -> usize {
        let mask = self.mask();
        let mut index = slot.hash as usize & mask;
        while self.slots[index].hash != 0 {
            index = (index + 1) & mask;
        }
        self.slots[index] = slot;
        index
    }

    fn resize(&mut self, slots: usize) {
        let old = std::mem::replace(
            &mut self.slots,
            vec![Slot::default(); slots].into_boxed_slice(),
        );
        for slot in old.iter().filter(|s| s.hash != 0) {
            self.place(*slot);
        }
    }

    /// Keeps only the topics whose latest position satisfies `keep`; returns how many
    /// were removed. Rebuilds the table (shrinking it when it became sparse).
    pub fn retain(&mut self, mut keep: impl FnMut(u64) -> bool) -> usize {
        self.rewrite(|pos| keep(pos).then_some(pos))
    }

    /// Moves every topic to the position `to` gives for its latest position, or
    /// removes it when `to` gives none; returns how many were removed. Rebuilds the
    /// table when any was removed.
    pub fn rewrite(&mut self, mut to: impl FnMut(u64) -> Option<u64>) -> usize {
        let before = self.len;
        let kept: Vec<Slot> = self
            .slots
            .iter()
            .filter(|s| s.hash != 0)
            .filter_map(|s| to(s.pos).map(|pos| Slot { hash: s.hash, pos }))
            .collect();
        if kept.len() == before {
            for (slot, new) in self.slots.iter_mut().filter(|s| s.hash != 0).zip(kept) {
                slot.pos = new.pos;
            }
            return 0;
        }
        let mut slots = MIN_SLOTS;
        while kept.len() * 10 > slots * MAX_LOAD_TENTHS / 2 {
            slots *= 2;
        }
        *self = Self::with_slots(slots);
        for slot in kept {
            self.place(slot);
            self.len += 1;
        }
        before - self.len
    }

    /// Every stored position, in table order.
    pub fn positions(&self) -> impl Iterator<Item = u64> + '_ {
        self.slots.iter().filter(|s| s.hash != 0).map(|s| s.pos)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// A stand-in for the log: position → name.
    fn lookup(
        table: &TopicTable,
        names: &HashMap<u64, String>,
        name: &str,
        hash: u64,
    ) -> Option<u64> {
        table
            .find(hash, |pos| names.get(&pos).is_some_and(|n| n == name))
            .map(|i| table.pos(i))
    }

    #[test]
    fn inserts_finds_updates_and_grows() {
        let mut table = TopicTable::new();
        let mut names = HashMap::new();
        for i in 0..10_000u64 {
            let name = format!("user.{i}");
            let hash = crate::storage::topic::topic_hash(name.as_bytes());
            assert_eq!(lookup(&table, &names, &name, hash), None);
            let index = table.insert(hash, i * 8);
            // The slot it returns is the topic's, even when the insert grew the table.
            assert_eq!(table.pos(index), i * 8);
            names.insert(i * 8, name);
        }
        assert_eq!(table.len(), 10_000);
        assert!(table.memory_bytes() <= 16 * 32_768);
        for i in 0..10_000u64 {
            let name = format!("user.{i}");
            let hash = crate::storage::topic::topic_hash(name.as_bytes());
            assert_eq!(lookup(&table, &names, &name, hash), Some(i * 8));
        }
    }

    #[test]
    fn colliding_hashes_are_told_apart_by_name() {
        let mut table = TopicTable::new();
        let mut names = HashMap::new();
        // Same hash, even 0 (stored as 1), for three different topics.
        for (pos, name) in [(8u64, "a"), (16, "b"), (24, "c")] {
            assert_eq!(lookup(&table, &names, name, 0), None);
            table.insert(0, pos);
            names.insert(pos, name.to_owned());
        }
        assert_eq!(lookup(&table, &names, "b", 0), Some(16));
        let index = table.find(0, |p| names[&p] == "b").unwrap();
        table.set_pos(index, 32);
        names.insert(32, "b".to_owned());
        assert_eq!(lookup(&table, &names, "b", 0), Some(32));
        assert_eq!(lookup(&table, &names, "c", 0), Some(24));
    }

    #[test]
    fn retain_removes_and_keeps_the_rest_findable() {
        let mut table = TopicTable::new();
        for i in 1..=1000u64 {
            table.insert(i.wrapping_mul(0x9E37_79B9_7F4A_7C15), i);
        }
        assert_eq!(table.retain(|pos| pos > 900), 900);
        assert_eq!(table.len(), 100);
        for i in 1..=1000u64 {
            let found = table.find(i.wrapping_mul(0x9E37_79B9_7F4A_7C15), |pos| pos == i);
            assert_eq!(found.is_some(), i > 900, "topic {i}");
        }
        assert_eq!(table.retain(|_| true), 0);
    }
}
