//! The one place where sqlx errors are told apart, by kind and by MySQL error number,
//! never by message text.

use domain::ports::{RepoError, StepError};
use sqlx::mysql::MySqlDatabaseError;

/// InnoDB chose this transaction as a deadlock victim and rolled it back.
const ER_LOCK_DEADLOCK: u16 = 1213;
/// A row lock was not granted within `innodb_lock_wait_timeout`.
const ER_LOCK_WAIT_TIMEOUT: u16 = 1205;
/// The server refused a new connection: `max_connections` reached.
const ER_CON_COUNT_ERROR: u16 = 1040;
/// The server is shutting down.
const ER_SERVER_SHUTDOWN: u16 = 1053;

/// What a failed statement means to the adapter.
#[derive(Debug)]
pub(crate) enum Classified {
    /// A primary or unique key already holds the value. Each call site decides what that
    /// means there (key taken, order paid, user already seeded).
    Duplicate(sqlx::Error),
    /// InnoDB gave up on a row lock (deadlock or lock wait timeout). Only balance steps
    /// take contended locks, and there the cause is always a concurrent writer of the same
    /// rows, so the step reports a version conflict and the use case retries from a fresh
    /// read: the same remedy as a lost optimistic race, and bounded by the same budget.
    LockConflict(sqlx::Error),
    /// The database cannot be reached or refused the connection; a retry may succeed.
    Unavailable(sqlx::Error),
    /// Anything else, including a CHECK violation: the domain never writes a negative
    /// balance or an unknown kind, so tripping a constraint is a bug, not a business case.
    Unexpected(sqlx::Error),
}

/// Sorts `e` into what the adapter can act on.
pub(crate) fn classify(e: sqlx::Error) -> Classified {
    enum Class {
        Duplicate,
        LockConflict,
        Unavailable,
        Unexpected,
    }
    let class = match &e {
        sqlx::Error::Database(db) if db.is_unique_violation() => Class::Duplicate,
        sqlx::Error::Database(db) if db.is_check_violation() => Class::Unexpected,
        sqlx::Error::Database(db) => match db
            .try_downcast_ref::<MySqlDatabaseError>()
            .map(MySqlDatabaseError::number)
        {
            Some(ER_LOCK_DEADLOCK | ER_LOCK_WAIT_TIMEOUT) => Class::LockConflict,
            Some(ER_CON_COUNT_ERROR | ER_SERVER_SHUTDOWN) => Class::Unavailable,
            _ => Class::Unexpected,
        },
        // Connection refused, reset or timed out surface as `Io`; a pool that cannot hand
        // out a connection in time (the server is down: sqlx retries refused connects until
        // the acquire timeout) as `PoolTimedOut`.
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => Class::Unavailable,
        _ => Class::Unexpected,
    };
    match class {
        Class::Duplicate => Classified::Duplicate(e),
        Class::LockConflict => Classified::LockConflict(e),
        Class::Unavailable => Classified::Unavailable(e),
        Class::Unexpected => Classified::Unexpected(e),
    }
}

impl Classified {
    /// The port error of a read or a simple write. A lock conflict there is transient, so
    /// it is reported as unavailable (retryable) rather than as a bug.
    pub(crate) fn into_repo(self) -> RepoError {
        match self {
            Classified::LockConflict(e) | Classified::Unavailable(e) => {
                RepoError::Unavailable(e.into())
            }
            Classified::Duplicate(e) | Classified::Unexpected(e) => RepoError::Unexpected(e.into()),
        }
    }

    /// The port error of a balance step, for a statement where a duplicate is not expected
    /// (call sites that expect one match [`Classified::Duplicate`] first).
    pub(crate) fn into_step(self) -> StepError {
        match self {
            Classified::LockConflict(e) => {
                tracing::debug!(error = %e, "lock conflict in a balance step; reported as a version conflict");
                StepError::VersionConflict
            }
            Classified::Unavailable(e) => StepError::Unavailable(e.into()),
            Classified::Duplicate(e) | Classified::Unexpected(e) => StepError::Unexpected(e.into()),
        }
    }
}

/// `?` on a sqlx call in a read or simple write.
pub(crate) fn repo(e: sqlx::Error) -> RepoError {
    classify(e).into_repo()
}

/// `?` on a sqlx call in a balance step.
pub(crate) fn step(e: sqlx::Error) -> StepError {
    classify(e).into_step()
}
