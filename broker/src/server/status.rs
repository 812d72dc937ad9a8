//! The one place where storage errors become gRPC statuses. Codes follow what a
//! client should do: INVALID_ARGUMENT — fix the request; RESOURCE_EXHAUSTED — retry
//! later; OUT_OF_RANGE / FAILED_PRECONDITION — move the read position; UNAVAILABLE —
//! try another broker or later; DATA_LOSS — a record is damaged on disk.

use tonic::{Code, Status};

use crate::storage::{AppendError, ReadError};

/// The status code for an append error.
pub fn append_code(error: &AppendError) -> Code {
    match error {
        AppendError::InvalidTopic { .. }
        | AppendError::RecordTooLarge { .. }
        | AppendError::BatchTooLarge { .. }
        | AppendError::TooManyRecords { .. }
        | AppendError::EmptyBatch
        | AppendError::InvalidHeader { .. } => Code::InvalidArgument,
        AppendError::DiskBudgetExceeded { .. } | AppendError::DiskFull(_) => {
            Code::ResourceExhausted
        }
        AppendError::Io(_) => Code::Internal,
        AppendError::ShardFailed { .. } | AppendError::EpochsExhausted | AppendError::Closed => {
            Code::Unavailable
        }
    }
}

pub fn append_status(error: &AppendError) -> Status {
    Status::new(append_code(error), error.to_string())
}

pub fn read_status(error: &ReadError) -> Status {
    let code = match error {
        ReadError::InvalidTopic { .. } => Code::InvalidArgument,
        ReadError::OffsetNotRetained { .. } | ReadError::OffsetOutOfRange { .. } => {
            Code::OutOfRange
        }
        ReadError::HistoryLost { .. } => Code::FailedPrecondition,
        ReadError::CorruptRecord { .. } => Code::DataLoss,
        ReadError::Closed => Code::Unavailable,
    };
    Status::new(code, error.to_string())
}
