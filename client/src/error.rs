//! The client's errors.

use tonic::Code;

/// What went wrong talking to a broker.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    /// The broker's address could not be used.
    #[error("invalid broker address {address:?}: {reason}")]
    InvalidAddress { address: String, reason: String },
    /// No connection could be made, or it broke.
    #[error("cannot reach the broker: {0}")]
    Unreachable(String),
    /// The broker refused the request (the code says whether a retry can help).
    #[error("{code:?}: {message}")]
    Refused { code: Code, message: String },
    /// The producer or subscriber was closed.
    #[error("closed")]
    Closed,
}

impl ClientError {
    /// Whether trying again later can succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            ClientError::Unreachable(_) => true,
            ClientError::Refused { code, .. } => is_retryable_code(*code),
            ClientError::InvalidAddress { .. } | ClientError::Closed => false,
        }
    }
}

/// Codes that mean "later, or elsewhere" rather than "never".
pub fn is_retryable_code(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable
            | Code::ResourceExhausted
            | Code::Aborted
            | Code::DeadlineExceeded
            | Code::Unknown
    )
}

impl From<tonic::Status> for ClientError {
    fn from(status: tonic::Status) -> Self {
        ClientError::Refused {
            code: status.code(),
            message: status.message().to_owned(),
        }
    }
}

impl From<tonic::transport::Error> for ClientError {
    fn from(error: tonic::transport::Error) -> Self {
        ClientError::Unreachable(error.to_string())
    }
}
