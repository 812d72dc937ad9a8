//! The broker's two per-record wire paths, 1,000 records of 100 B to one topic: reading
//! a publish request, and writing a batch of deliveries while the previous batch is
//! still held (as it is while tonic sends it). Each read request is dropped inside the
//! timed loop, on the same thread (the broker frees its records on another). And the
//! client's: reading a batch of 1,000 deliveries, dropped inside the loop too.
//!
//! `cargo bench -p switchyard-proto --bench wire`

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use prost::Message;
use prost::bytes::Bytes;
use switchyard_proto::{
    DeliveryFields, DeliveryWriter, PublishRecord, PublishRequest, SubscribeResponse,
    read_deliveries, subscribe_response::Event,
};

/// The broker's allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const RECORDS: usize = 1000;
const TOPIC: &str = "guild.123456789012345678";

/// Writes the records of one batch of deliveries (1,000 of 100 B).
fn write_batch(writer: &mut DeliveryWriter) {
    let payload = [b'x'; 100];
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
}

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

    let mut writer = DeliveryWriter::new();
    let mut previous = writer.finish();
    group.bench_function("write delivery batch", |b| {
        b.iter(|| {
            write_batch(&mut writer);
            // The batch just written is sent while the next one is written.
            black_box(std::mem::replace(&mut previous, writer.finish()))
        })
    });

    // Written here, not taken from the bench above, which a filter may skip.
    write_batch(&mut writer);
    let response = SubscribeResponse {
        event: Some(Event::Deliveries(writer.finish())),
    };
    let message = Bytes::from(response.encode_to_vec());
    group.bench_function("read delivery batch", |b| {
        b.iter(|| read_deliveries(black_box(&message)).unwrap().unwrap())
    });
    group.finish();
}

criterion_group!(benches, wire);
criterion_main!(benches);
