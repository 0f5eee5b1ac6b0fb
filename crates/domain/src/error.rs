//! Errors of the use cases. None of these is stored under an idempotency key: a retry
//! with the same key runs afresh.

use crate::ports::{LockError, RepoError, StepError};

#[derive(Debug, thiserror::Error)]
pub enum OperationError {
    #[error("user not found")]
    UserNotFound,
    #[error("order not found")]
    OrderNotFound,
    #[error("payment not found")]
    PaymentNotFound,
    #[error("coupon not found")]
    CouponNotFound,
    /// No finished request with this key is recorded for the user (never sent, still
    /// running on another instance, or expired).
    #[error("request not found")]
    RequestNotFound,
    /// Cancelling an order that was paid (or refunded).
    #[error("the order is already paid")]
    OrderAlreadyPaid,
    /// A request with this key is still in flight.
    #[error("a request with this idempotency key is still being processed")]
    KeyInUse,
    /// The key was used with another operation, user or amount.
    #[error("the idempotency key was already used for a different request")]
    KeyReused,
    /// The user's lock stayed busy for the whole wait.
    #[error("the account is busy")]
    LockTimeout,
    /// A dependency is down, or the optimistic retries ran out; retryable.
    #[error("the service is temporarily unavailable")]
    Unavailable(#[source] anyhow::Error),
    #[error(transparent)]
    Unexpected(#[from] anyhow::Error),
}

impl From<RepoError> for OperationError {
    fn from(e: RepoError) -> Self {
        match e {
            RepoError::Unavailable(cause) => OperationError::Unavailable(cause),
            RepoError::Unexpected(cause) => OperationError::Unexpected(cause),
        }
    }
}

impl From<LockError> for OperationError {
    fn from(e: LockError) -> Self {
        match e {
            LockError::Timeout => OperationError::LockTimeout,
            LockError::Unavailable(cause) => OperationError::Unavailable(cause),
            LockError::Unexpected(cause) => OperationError::Unexpected(cause),
        }
    }
}

impl From<StepError> for OperationError {
    fn from(e: StepError) -> Self {
        match e {
            StepError::UserNotFound => OperationError::UserNotFound,
            StepError::Aborted(cause) | StepError::Unavailable(cause) => {
                OperationError::Unavailable(cause)
            }
            StepError::Unexpected(cause) => OperationError::Unexpected(cause),
            other => OperationError::Unexpected(anyhow::Error::new(other)),
        }
    }
}
