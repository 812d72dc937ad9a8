//! A fast hasher for maps keyed by integers the broker looks up per subscription
//! per record (SipHash showed in profiles there). Not for keys an adversary picks to
//! hurt others: a map keyed by a client's own ids slows only that client.

use std::hash::{BuildHasherDefault, Hasher};

/// Mixes each `u64` written with a multiply and a rotate (the high bits, which
/// hashbrown uses for its control bytes, and the low bits, for the bucket, both
/// depend on every input bit).
#[derive(Debug, Default)]
pub struct IntHasher(u64);

impl Hasher for IntHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }

    fn write_u64(&mut self, value: u64) {
        self.0 = (self.0.rotate_left(29) ^ value)
            .wrapping_mul(0x9e37_79b9_7f4a_7c15)
            .rotate_left(26);
    }
}

/// Builds [`IntHasher`]s for `HashMap`s.
pub type BuildIntHasher = BuildHasherDefault<IntHasher>;

/// For keys that are already good 64-bit hashes (xxh3 of a topic name, of a filter
/// context): uses them as they are.
#[derive(Debug, Default)]
pub struct IdentityHasher(u64);

impl Hasher for IdentityHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, value: u64) {
        self.0 = value;
    }
}

pub type BuildIdentityHasher = BuildHasherDefault<IdentityHasher>;
