//! A tour of the storage engine: opens (or reopens) a store in `./data`, appends a few
//! chat events, reads them back and prints what the store holds.
//!
//! `cargo run --release -p switchyard-broker --example store_tour [DATA_DIR]`
//!
//! Run it twice: the second run finds the first run's records and carries on with the
//! next offsets.

use anyhow::Context;
use switchyard_broker::storage::{Ack, NewRecord, ReadLimits, Store, StoreConfig};

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let data_dir = std::env::args().nth(1).unwrap_or_else(|| "data".into());
    let store = Store::open(StoreConfig::new(&data_dir))
        .with_context(|| format!("opening the store in {data_dir}"))?;

    let events = vec![
        NewRecord::new("guild.1", &br#"{"content":"hello"}"#[..])
            .with_header("type", "MESSAGE_CREATE")
            .with_header("channel_id", "10"),
        NewRecord::new("guild.1", &br#"{"name":"general"}"#[..])
            .with_header("type", "CHANNEL_UPDATE"),
        NewRecord::new("user.42", &br#"{"guild_id":"1"}"#[..])
            .with_header("type", "GUILD_MEMBER_ADD"),
    ];
    let appended = store.append(events, Ack::Durable)?;
    for a in &appended {
        println!("appended: offset {} epoch {:#x}", a.offset, a.epoch);
    }

    for topic in ["guild.1", "user.42"] {
        let info = store.topic_info(topic)?.context("topic just written")?;
        println!(
            "{topic}: offsets {}..{} (epoch {:#x}), shard {}",
            info.earliest_offset,
            info.next_offset,
            info.epoch,
            store.shard_of(topic)
        );
        let latest = store.read_latest(topic, 3, 1 << 20)?;
        for r in latest.records {
            let kind = r
                .headers
                .iter()
                .find(|h| h.key == "type")
                .map_or("-", |h| h.value.as_str());
            println!(
                "  #{} {kind} {}",
                r.offset,
                String::from_utf8_lossy(&r.payload)
            );
        }
    }
    let batch = store.read("guild.1", 0, ReadLimits::default())?;
    println!(
        "guild.1 holds {} records; stats: {:?}",
        batch.records.len(),
        store.stats()
    );
    store.close()?;
    Ok(())
}
