//! Topic names: the rules they follow and the stable hash that places them on a shard.
//!
//! Topics are created implicitly, so every name that reaches the log is checked here
//! first. The rules (also in `docs/storage-format.md`):
//! - 1 to [`MAX_TOPIC_NAME_BYTES`] bytes;
//! - ASCII letters, digits and `.` `_` `-` `:` only (`*` and `>` are reserved for
//!   topic patterns, whitespace and control characters are never allowed);
//! - dot-separated segments are non-empty: no leading, trailing or doubled `.`.

use xxhash_rust::xxh3::xxh3_64;

/// Longest topic name accepted, in bytes.
pub const MAX_TOPIC_NAME_BYTES: usize = 255;

/// Why a topic name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicNameError {
    #[error("topic name is empty")]
    Empty,
    #[error("topic name is {len} bytes long; the limit is {max}")]
    TooLong { len: usize, max: usize },
    #[error(
        "topic name contains {found:?} at byte {index}; allowed are ASCII letters, digits and . _ - :"
    )]
    InvalidCharacter { found: char, index: usize },
    #[error("topic name {name:?} has an empty segment (leading, trailing or doubled '.')")]
    EmptySegment { name: String },
}

/// Bytes allowed in a topic name (all ASCII, so any other byte, including the first
/// byte of a multi-byte character, is refused at a character boundary).
const ALLOWED: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        table[b] = c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-' | b':');
        b += 1;
    }
    table
};

/// Checks `name` against the topic name rules.
pub fn validate_topic_name(name: &str) -> Result<(), TopicNameError> {
    if name.is_empty() {
        return Err(TopicNameError::Empty);
    }
    if name.len() > MAX_TOPIC_NAME_BYTES {
        return Err(TopicNameError::TooLong {
            len: name.len(),
            max: MAX_TOPIC_NAME_BYTES,
        });
    }
    // The append path checks every record's name: one table look-up per byte.
    if let Some(index) = name.bytes().position(|b| !ALLOWED[usize::from(b)]) {
        let found = name[index..]
            .chars()
            .next()
            .expect("index is a char boundary");
        return Err(TopicNameError::InvalidCharacter { found, index });
    }
    if name.starts_with('.') || name.ends_with('.') || name.contains("..") {
        return Err(TopicNameError::EmptySegment {
            name: name.to_owned(),
        });
    }
    Ok(())
}

/// The 64-bit hash of a topic name used for placement and for the registry.
///
/// XXH3-64 with seed 0 over the name's bytes: a published, platform-independent
/// algorithm, so placement never changes between builds or machines.
pub fn topic_hash(name: &[u8]) -> u64 {
    xxh3_64(name)
}

/// The shard that holds `name`, out of `shard_count` shards.
///
/// `floor(topic_hash(name) * shard_count / 2^64)` (Lemire's "fastrange"): it uses the
/// hash's high bits, leaving the low bits, which index the registry, evenly spread
/// within every shard.
pub fn shard_for_topic(name: &str, shard_count: u32) -> u32 {
    shard_for_hash(topic_hash(name.as_bytes()), shard_count)
}

pub(crate) fn shard_for_hash(hash: u64, shard_count: u32) -> u32 {
    ((u128::from(hash) * u128::from(shard_count)) >> 64) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_chat_topic_names() {
        for name in ["guild.123", "user.456", "a", "guild.1:voice", "x_y-z", "Z9"] {
            assert_eq!(validate_topic_name(name), Ok(()), "{name}");
        }
        assert_eq!(validate_topic_name(&"a".repeat(255)), Ok(()));
    }

    #[test]
    fn rejects_bad_names_with_the_reason() {
        assert_eq!(validate_topic_name(""), Err(TopicNameError::Empty));
        assert_eq!(
            validate_topic_name(&"a".repeat(256)),
            Err(TopicNameError::TooLong { len: 256, max: 255 })
        );
        assert_eq!(
            validate_topic_name("guild 1"),
            Err(TopicNameError::InvalidCharacter {
                found: ' ',
                index: 5
            })
        );
        assert!(matches!(
            validate_topic_name("guild.*"),
            Err(TopicNameError::InvalidCharacter { found: '*', .. })
        ));
        assert!(matches!(
            validate_topic_name("güild"),
            Err(TopicNameError::InvalidCharacter { found: 'ü', .. })
        ));
        for name in [".a", "a.", "a..b"] {
            assert!(matches!(
                validate_topic_name(name),
                Err(TopicNameError::EmptySegment { .. })
            ));
        }
    }

    #[test]
    fn placement_is_stable_and_spread() {
        // Pinned values: placement must never change between releases or machines.
        assert_eq!(topic_hash(b"guild.1"), 0x3f5c_d8b9_edbc_cad5);
        assert_eq!(
            topic_hash(b"guild.123456789012345678"),
            0x9cab_4667_48ef_e1b1
        );
        assert_eq!(shard_for_topic("guild.1", 16), 3);
        assert_eq!(shard_for_topic("user.456", 16), 5);
        assert_eq!(shard_for_topic("guild.123456789012345678", 16), 9);
        let mut counts = [0u32; 16];
        for i in 0..16_000 {
            counts[shard_for_topic(&format!("user.{i}"), 16) as usize] += 1;
        }
        for count in counts {
            assert!((800..1200).contains(&count), "uneven spread: {counts:?}");
        }
        assert_eq!(shard_for_topic("anything", 1), 0);
    }
}
