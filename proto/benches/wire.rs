//! The broker's two per-record wire paths, 1,000 records of 100 B to one topic: reading
//! a publish request, and writing a batch of deliveries while the previous batch is
//! still held (as it is while tonic sends it). Each read request is dropped inside the
//! timed loop, on the same thread (the broker frees its records on another).
//!
//! `cargo bench -p switchyard-proto --bench wire`

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use prost::Message;
use prost::bytes::Bytes;
use switchyard_proto::{DeliveryFields, DeliveryWriter, PublishRecord, PublishRequest};

/// The broker's allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const RECORDS: usize = 1000;
const TOPIC: &str = "guild.123456789012345678";

fn wire(c: &mut Criterion) {
    let mut group = c.benchmark_group("wire");
    group.throughput(Throughput::Elements(RECORDS as u64));

    let request = PublishRequest {
        request_id: 7,
        records: (0..RECORDS)
            .map(|_| PublishRecord {
                topic: TOPIC.into(),
                headers: Vec::new(),
                payload: Bytes::from(vec![b'x'; 100]),
            })
            .collect(),
        ..PublishRequest::default()
    };
    let message = Bytes::from(request.encode_to_vec());
    group.bench_function("read publish request", |b| {
        b.iter(|| PublishRequest::decode(black_box(message.clone())).unwrap())
    });

    let payload = vec![b'x'; 100];
    let mut writer = DeliveryWriter::new();
    let mut previous = writer.finish();
    group.bench_function("write delivery batch", |b| {
        b.iter(|| {
            for offset in 0..RECORDS as u64 {
                writer.push(DeliveryFields {
                    topic: TOPIC,
                    offset,
                    epoch: 1,
                    timestamp_ms: 1_800_000_000_000,
                    headers: std::iter::empty(),
                    payload: &payload,
                    subscription_ids: &[3],
                });
            }
            // The batch just written is sent while the next one is written.
            black_box(std::mem::replace(&mut previous, writer.finish()))
        })
    });
    group.finish();
}

criterion_group!(benches, wire);
criterion_main!(benches);
