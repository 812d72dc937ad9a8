//! Conversions between the wire types (`switchyard_proto`) and the storage types.
//! `pb::` types go no further into the broker than this file.

use switchyard_proto as pb;

use crate::server::hub::LiveBatch;
use crate::storage::{Ack, Appended, Header, NewRecord, Record, TopicInfo};

pub fn ack(level: pb::AckLevel) -> Ack {
    match level {
        pb::AckLevel::Durable => Ack::Durable,
        pb::AckLevel::Written | pb::AckLevel::Unspecified => Ack::Written,
    }
}

/// A publish request's records and acknowledgement level.
pub fn publish_request(request: pb::PublishRequest) -> (Vec<NewRecord>, Ack) {
    let level = ack(request.ack());
    (request.records.into_iter().map(new_record).collect(), level)
}

pub fn new_record(record: pb::PublishRecord) -> NewRecord {
    NewRecord {
        topic: record.topic,
        headers: record
            .headers
            .into_iter()
            .map(|h| Header {
                key: h.key,
                value: h.value,
            })
            .collect(),
        payload: record.payload,
    }
}

pub fn position(appended: &Appended) -> pb::Position {
    pb::Position {
        offset: appended.offset,
        epoch: appended.epoch,
    }
}

pub fn delivery(record: Record, subscription_ids: Vec<u64>) -> pb::Delivery {
    pb::Delivery {
        topic: record.topic,
        offset: record.offset,
        epoch: record.epoch,
        timestamp_ms: record.timestamp_ms,
        headers: record
            .headers
            .into_iter()
            .map(|h| pb::Header {
                key: h.key,
                value: h.value,
            })
            .collect(),
        payload: record.payload,
        subscription_ids,
    }
}

/// Record `index` of a live batch, for no subscription yet.
pub fn live_delivery(batch: &LiveBatch, index: usize) -> pb::Delivery {
    let record = &batch.records[index];
    let position = batch.positions[index];
    pb::Delivery {
        topic: record.topic.clone(),
        offset: position.offset,
        epoch: position.epoch,
        timestamp_ms: batch.timestamp_ms,
        headers: record
            .headers
            .iter()
            .map(|h| pb::Header {
                key: h.key.clone(),
                value: h.value.clone(),
            })
            .collect(),
        payload: record.payload.clone(),
        subscription_ids: Vec::new(),
    }
}

pub fn topic_info(info: Option<TopicInfo>) -> pb::TopicInfoResponse {
    match info {
        Some(info) => pb::TopicInfoResponse {
            exists: true,
            epoch: info.epoch,
            earliest_offset: info.earliest_offset,
            next_offset: info.next_offset,
            latest_timestamp_ms: info.latest_timestamp_ms,
        },
        None => pb::TopicInfoResponse::default(),
    }
}
