//! Where the long skip pointers of busy topics lead, kept in memory so that an
//! append does not read old records.
//!
//! A record's `skip_pos` points at its topic's record `offset & (offset - 1)` (see
//! [`crate::storage::shard`]). The shard finds it by walking back along the topic's
//! chain from the latest record, and for an offset with `k` trailing zero bits the
//! walk reads records up to `2^k` of the topic's records back (the target itself): at
//! a power of two, the whole of the topic's history. Those records are old. With a
//! page-cache window (`StoreConfig::page_cache_per_shard`) they have left memory, so
//! the append stalls on a disk read, holding the shard, and every append behind it
//! waits. Measured (100 B records, one topic, 64 MiB window, ~2M records/s): a major
//! fault every 2^19 records, 25–40 MB/s read back from the disk (readahead).
//!
//! For a topic whose offset has reached `2^MIN_LEVEL`, the cache keeps, for each
//! level `j ≥ MIN_LEVEL`, the position of the topic's latest record whose offset is a
//! multiple of `2^j`. That is exactly the skip target of an offset with `j` trailing
//! zeros, so such appends read nothing; shorter walks (at most `2^(MIN_LEVEL-1)`
//! records back, the target included) stay, and touch recent records only while the
//! topic is busy. The entry is kept up to date by every append at such an offset; a
//! level not seen since the entry was made is learned from one walk.
//!
//! Bounds: at most `CAPACITY` topics per shard (the least recently used goes; a full
//! cache scans its entries to find it), each up to ~600 bytes with its name and the
//! map's overhead (58 levels of 8 bytes once offset 0 is learned), so at most ~0.7 MB
//! per shard; a topic of fewer than 64 records never enters.
//! Nothing here is persistent: after a restart the cache fills again as topics grow.

use std::collections::HashMap;

use crate::hash::BuildIdentityHasher;
use crate::storage::record::NO_POSITION;

/// Offsets with fewer trailing zero bits than this are walked to, as before.
pub const MIN_LEVEL: u32 = 6;
/// Topics per shard the cache follows.
const CAPACITY: usize = 1024;
/// A level the entry has not learned yet.
const UNKNOWN: u64 = NO_POSITION - 1;

#[derive(Debug)]
struct Entry {
    /// The topic's name: equal hashes are not trusted to mean the same topic.
    topic: Box<[u8]>,
    /// `levels[i]`: position of the topic's latest record whose offset is a multiple
    /// of `2^(MIN_LEVEL + i)`, or `UNKNOWN`.
    levels: Vec<u64>,
    /// When the entry was last used (the cache's clock), for eviction.
    used: u64,
}

/// The skip targets of a shard's busy topics.
#[derive(Debug, Default)]
pub struct SkipCache {
    /// Keyed by the topic's hash (xxh3), used as it is.
    entries: HashMap<u64, Entry, BuildIdentityHasher>,
    clock: u64,
    capacity: Option<usize>,
}

impl SkipCache {
    /// A cache following at most `capacity` topics (tests use small ones).
    #[cfg(test)]
    pub fn with_capacity(capacity: usize) -> SkipCache {
        SkipCache {
            capacity: Some(capacity),
            ..SkipCache::default()
        }
    }

    fn capacity(&self) -> usize {
        self.capacity.unwrap_or(CAPACITY)
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// The position of the topic's latest record whose offset is a multiple of
    /// `2^level` (`level ≥ MIN_LEVEL`), if known. (It may have been dropped by
    /// retention since: the caller checks.)
    pub fn get(&mut self, hash: u64, topic: &[u8], level: u32) -> Option<u64> {
        debug_assert!(level >= MIN_LEVEL);
        self.clock += 1;
        let entry = self.entries.get_mut(&hash)?;
        if *entry.topic != *topic {
            return None;
        }
        entry.used = self.clock;
        match entry.levels.get((level - MIN_LEVEL) as usize) {
            Some(&pos) if pos != UNKNOWN => Some(pos),
            _ => None,
        }
    }

    /// The topic's record at `offset`, just appended, is at `pos`: it is now the
    /// latest multiple of `2^j` for every level `j` up to `offset`'s trailing zeros.
    /// Every record at an offset with `MIN_LEVEL` or more trailing zeros must be
    /// reported here for as long as its topic has an entry.
    pub fn appended(&mut self, hash: u64, topic: &[u8], offset: u64, pos: u64) {
        if offset != 0 {
            self.set(hash, topic, MIN_LEVEL, offset.trailing_zeros(), pos);
        }
    }

    /// A walk for an offset with `level` trailing zeros found its skip target, the
    /// record at `target` (`offset & (offset - 1)`), at `pos`: no multiple of
    /// `2^level` or above lies between them, so `target` is the latest multiple of
    /// `2^j` for the levels `j` from `level` up to its own trailing zeros.
    pub fn learned(&mut self, hash: u64, topic: &[u8], level: u32, target: u64, pos: u64) {
        let top = if target == 0 {
            63
        } else {
            target.trailing_zeros()
        };
        self.set(hash, topic, level.max(MIN_LEVEL), top, pos);
    }

    /// Levels `from..=to` of the topic are at `pos`.
    fn set(&mut self, hash: u64, topic: &[u8], from: u32, to: u32, pos: u64) {
        if to < from {
            return;
        }
        self.clock += 1;
        let clock = self.clock;
        if !self.entries.contains_key(&hash) && self.entries.len() >= self.capacity() {
            self.evict();
        }
        let entry = self.entries.entry(hash).or_insert_with(|| Entry {
            topic: topic.into(),
            levels: Vec::new(),
            used: clock,
        });
        if *entry.topic != *topic {
            // Another topic with the same hash: the newer one takes the entry.
            entry.topic = topic.into();
            entry.levels.clear();
        }
        entry.used = clock;
        let (from, to) = ((from - MIN_LEVEL) as usize, (to - MIN_LEVEL) as usize);
        if entry.levels.len() <= to {
            entry.levels.resize(to + 1, UNKNOWN);
        }
        entry.levels[from..=to].fill(pos);
    }

    /// The topic was created anew (its history had aged out): what the cache knew
    /// of it is wrong now.
    pub fn forget(&mut self, hash: u64, topic: &[u8]) {
        if !self.entries.is_empty()
            && self
                .entries
                .get(&hash)
                .is_some_and(|entry| *entry.topic == *topic)
        {
            self.entries.remove(&hash);
        }
    }

    /// Forgets everything (the log was cut back).
    pub fn clear(&mut self) {
        self.entries.clear();
    }

    fn evict(&mut self) {
        if let Some(oldest) = self
            .entries
            .iter()
            .min_by_key(|(_, entry)| entry.used)
            .map(|(&hash, _)| hash)
        {
            self.entries.remove(&oldest);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_growing_topic_is_walked_once_and_then_answered_from_the_cache() {
        let mut cache = SkipCache::default();
        let pos = |offset: u64| 1000 + 3 * offset;
        let mut walks = Vec::new();
        for offset in 1..5000u64 {
            let level = offset.trailing_zeros();
            if level >= MIN_LEVEL {
                let target = offset & (offset - 1);
                match cache.get(7, b"t", level) {
                    Some(found) => assert_eq!(found, pos(target), "offset {offset}"),
                    None => {
                        // What the shard's walk would find.
                        walks.push(offset);
                        cache.learned(7, b"t", level, target, pos(target));
                    }
                }
            }
            cache.appended(7, b"t", offset, pos(offset));
        }
        assert_eq!(walks, [1 << MIN_LEVEL]);
    }

    #[test]
    fn a_walk_teaches_only_the_levels_its_target_is_the_latest_of() {
        let mut cache = SkipCache::default();
        cache.learned(7, b"t", MIN_LEVEL, 0, 100);
        cache.appended(7, b"t", 5 << MIN_LEVEL, 250);
        // From 3 · 2^(MIN_LEVEL+1), a walk finds 2^(MIN_LEVEL+2): the latest
        // multiple of 2^(MIN_LEVEL+1) and 2^(MIN_LEVEL+2), not of 2^MIN_LEVEL.
        cache.learned(7, b"t", MIN_LEVEL + 1, 4 << MIN_LEVEL, 220);
        assert_eq!(cache.get(7, b"t", MIN_LEVEL), Some(250));
        assert_eq!(cache.get(7, b"t", MIN_LEVEL + 1), Some(220));
        assert_eq!(cache.get(7, b"t", MIN_LEVEL + 2), Some(220));
        assert_eq!(cache.get(7, b"t", MIN_LEVEL + 3), Some(100));
        // Offsets below the first level are not kept.
        cache.appended(7, b"t", (5 << MIN_LEVEL) + 1, 300);
        assert_eq!(cache.get(7, b"t", MIN_LEVEL), Some(250));
    }

    #[test]
    fn levels_not_seen_are_unknown_and_other_topics_miss() {
        let mut cache = SkipCache::default();
        cache.appended(7, b"t", 1 << MIN_LEVEL, 100);
        assert_eq!(cache.get(7, b"t", MIN_LEVEL), Some(100));
        assert_eq!(cache.get(7, b"t", MIN_LEVEL + 1), None);
        // Same hash, other name: not this entry.
        assert_eq!(cache.get(7, b"u", MIN_LEVEL), None);
        assert_eq!(cache.get(8, b"t", MIN_LEVEL), None);
        // The other name takes the entry over, starting from nothing.
        cache.appended(7, b"u", 2 << MIN_LEVEL, 500);
        assert_eq!(cache.get(7, b"u", MIN_LEVEL + 1), Some(500));
        assert_eq!(cache.get(7, b"t", MIN_LEVEL), None);
        cache.forget(7, b"t");
        assert_eq!(cache.len(), 1, "forgetting another name leaves the entry");
        cache.forget(7, b"u");
        assert_eq!(cache.len(), 0);
    }

    #[test]
    fn the_least_recently_used_topic_goes_when_full() {
        let mut cache = SkipCache::with_capacity(2);
        cache.learned(1, b"a", MIN_LEVEL, 0, 10);
        cache.learned(2, b"b", MIN_LEVEL, 0, 20);
        assert_eq!(cache.get(1, b"a", MIN_LEVEL), Some(10));
        cache.learned(3, b"c", MIN_LEVEL, 0, 30);
        assert_eq!(cache.len(), 2);
        assert_eq!(
            cache.get(2, b"b", MIN_LEVEL),
            None,
            "b was least recently used"
        );
        assert_eq!(cache.get(1, b"a", MIN_LEVEL), Some(10));
        assert_eq!(cache.get(3, b"c", MIN_LEVEL), Some(30));
    }
}
