//! Conversions between the wire types (`switchyard_proto`) and the storage types.
//! `pb::` types go no further into the broker than this file.

use bytes::Bytes;
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

/// A batch's positions as runs of consecutive offsets in one epoch (a batch of one
/// topic's records is one run), each as long as it can be. Expanding the runs gives
/// back exactly the list, whatever topics the records are in.
pub fn position_runs(appended: &[Appended]) -> Vec<pb::PositionRun> {
    let mut runs: Vec<pb::PositionRun> = Vec::new();
    for a in appended {
        match runs.last_mut() {
            Some(run)
                if run.epoch == a.epoch && run.offset.checked_add(run.count) == Some(a.offset) =>
            {
                run.count += 1;
            }
            _ => runs.push(pb::PositionRun {
                offset: a.offset,
                epoch: a.epoch,
                count: 1,
            }),
        }
    }
    runs
}

/// The answer to a written batch: a position per record, or runs if asked.
pub fn publish_response(request_id: u64, appended: &[Appended], runs: bool) -> pb::PublishResponse {
    if runs {
        pb::PublishResponse {
            request_id,
            position_runs: position_runs(appended),
            ..Default::default()
        }
    } else {
        pb::PublishResponse {
            request_id,
            positions: appended.iter().map(position).collect(),
            ..Default::default()
        }
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

/// A record as filters and the delivery writer read it, wherever it is held: in a
/// live batch (storage types) or in a delivery read back from the log (wire types).
#[derive(Debug, Clone, Copy)]
pub struct RecordView<'a> {
    pub topic: &'a str,
    pub offset: u64,
    pub epoch: u64,
    pub timestamp_ms: u64,
    pub headers: HeaderIter<'a>,
    pub payload: &'a Bytes,
}

/// A record's headers as `(key, value)` pairs.
#[derive(Debug, Clone, Copy)]
pub enum HeaderIter<'a> {
    Stored(&'a [Header]),
    Wire(&'a [pb::Header]),
}

impl<'a> Iterator for HeaderIter<'a> {
    type Item = (&'a str, &'a str);

    fn next(&mut self) -> Option<Self::Item> {
        match self {
            HeaderIter::Stored(headers) => {
                let (first, rest) = headers.split_first()?;
                *headers = rest;
                Some((&first.key, &first.value))
            }
            HeaderIter::Wire(headers) => {
                let (first, rest) = headers.split_first()?;
                *headers = rest;
                Some((&first.key, &first.value))
            }
        }
    }
}

impl<'a> RecordView<'a> {
    /// Record `index` of a live batch.
    pub fn live(batch: &'a LiveBatch, index: usize) -> RecordView<'a> {
        let record = &batch.records[index];
        let position = batch.positions[index];
        RecordView {
            topic: &record.topic,
            offset: position.offset,
            epoch: position.epoch,
            timestamp_ms: batch.timestamp_ms,
            headers: HeaderIter::Stored(&record.headers),
            payload: &record.payload,
        }
    }

    pub fn of(delivery: &'a pb::Delivery) -> RecordView<'a> {
        RecordView {
            topic: &delivery.topic,
            offset: delivery.offset,
            epoch: delivery.epoch,
            timestamp_ms: delivery.timestamp_ms,
            headers: HeaderIter::Wire(&delivery.headers),
            payload: &delivery.payload,
        }
    }

    /// The record as a delivery to `subscription_ids`, for the delivery writer.
    pub fn fields(self, subscription_ids: &'a [u64]) -> pb::DeliveryFields<'a, HeaderIter<'a>> {
        pb::DeliveryFields {
            topic: self.topic,
            offset: self.offset,
            epoch: self.epoch,
            timestamp_ms: self.timestamp_ms,
            headers: self.headers,
            payload: self.payload,
            subscription_ids,
        }
    }

    /// The record as a delivery to `subscription_ids`, owned (to be held back).
    pub fn to_delivery(self, subscription_ids: Vec<u64>) -> pb::Delivery {
        pb::Delivery {
            topic: self.topic.to_owned(),
            offset: self.offset,
            epoch: self.epoch,
            timestamp_ms: self.timestamp_ms,
            headers: self
                .headers
                .map(|(key, value)| pb::Header {
                    key: key.to_owned(),
                    value: value.to_owned(),
                })
                .collect(),
            payload: self.payload.clone(),
            subscription_ids,
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_expand_to_exactly_the_positions_they_encode() {
        let positions = [
            (0, 1),
            (1, 1),
            (2, 1),
            (9, 1),
            (3, 1),
            (4, 2),
            (5, 2),
            (5, 2),
            (u64::MAX, 2),
            (0, 2),
        ];
        let appended: Vec<Appended> = positions
            .iter()
            .map(|&(offset, epoch)| Appended { offset, epoch })
            .collect();
        let runs = position_runs(&appended);
        let got: Vec<_> = runs.iter().map(|r| (r.offset, r.epoch, r.count)).collect();
        assert_eq!(
            got,
            [
                (0, 1, 3),
                (9, 1, 1),
                (3, 1, 1),
                (4, 2, 2),
                (5, 2, 1),
                (u64::MAX, 2, 1),
                (0, 2, 1)
            ]
        );
        let expanded: Vec<_> = runs
            .iter()
            .flat_map(|r| (0..r.count).map(|i| (r.offset + i, r.epoch)))
            .collect();
        assert_eq!(expanded, positions);
        assert!(position_runs(&[]).is_empty());
    }
}
