//! The one place where sqlx errors are told apart, by kind and by MySQL error number,
//! never by message text; and what each class means for a retry.
//!
//! | class | numbers / kinds | a read | a balance step, before COMMIT | at COMMIT |
//! | --- | --- | --- | --- | --- |
//! | [`Classified::LockConflict`] | 1205, 1213 (also Galera's certification failure), 3572 | 503 | version conflict: fresh read, retried | rolled back: retried the same way |
//! | [`Classified::Aborted`] | 1317, 1969, 3024 | retried once | [`StepError::Aborted`]: retried once from a fresh read | outcome unknown: 503 |
//! | [`Classified::ConnectionLost`] | 2006, 2013, 1927, 1053, 4031, `Io`, `Protocol` | retried once on a tested connection | [`StepError::Aborted`] | outcome unknown: 503 |
//! | [`Classified::Unavailable`] | 1040, 1047, 1180, pool timeout/closed, TLS | 503 | 503 | 503 |
//!
//! docs/operations.md ("Database errors: retried or 503") explains why each is exact.

use domain::ports::{RepoError, StepError};
use sqlx::mysql::MySqlDatabaseError;

/// InnoDB chose this transaction as a deadlock victim and rolled it back. Galera reports a
/// certification failure (a conflicting write committed on another node) with this number
/// too, also with the transaction rolled back.
const ER_LOCK_DEADLOCK: u16 = 1213;
/// A row lock was not granted within `innodb_lock_wait_timeout`.
const ER_LOCK_WAIT_TIMEOUT: u16 = 1205;
/// MySQL 8: a `NOWAIT` locking read met a row locked by another transaction (MariaDB
/// reports it as 1205).
const ER_LOCK_NOWAIT: u16 = 3572;
/// A scalar subquery returned more than one row (a batch's guard, see [`guard_failed`]).
const ER_SUBQUERY_NO_1_ROW: u16 = 1242;
/// The statement was killed (`KILL QUERY`, or a failover tool).
const ER_QUERY_INTERRUPTED: u16 = 1317;
/// MariaDB's `max_statement_time` aborted the statement.
const ER_STATEMENT_TIMEOUT: u16 = 1969;
/// MySQL's `max_execution_time` aborted the statement.
const ER_QUERY_TIMEOUT: u16 = 3024;
/// The server refused a new connection: `max_connections` reached.
const ER_CON_COUNT_ERROR: u16 = 1040;
/// Galera: "WSREP has not yet prepared node for application use" (the node is not synced).
const ER_UNKNOWN_COM_ERROR: u16 = 1047;
/// "Error during COMMIT": on Galera, a node that lost the primary component while the
/// transaction ran ("not connected to Primary Component"); the transaction was not
/// replicated, and whether it committed is, in general, not known.
const ER_ERROR_DURING_COMMIT: u16 = 1180;
/// The server is shutting down; it closes the connection after this.
const ER_SERVER_SHUTDOWN: u16 = 1053;
/// MariaDB: the connection was killed (`KILL`); it is closed after this.
const ER_CONNECTION_KILLED: u16 = 1927;
/// MySQL 8: the server closed a connection idle longer than `wait_timeout`.
const ER_CLIENT_INTERACTION_TIMEOUT: u16 = 4031;
/// Client-side "server has gone away", as a proxy may report it.
const CR_SERVER_GONE_ERROR: u16 = 2006;
/// Client-side "lost connection during query", as a proxy may report it.
const CR_SERVER_LOST: u16 = 2013;

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
    /// The server aborted the statement (killed or over its time limit): the statement had
    /// no effect, and the connection is still usable.
    Aborted(sqlx::Error),
    /// The connection broke (or the server closed it) while the statement was sent or
    /// answered: whether the statement took effect is unknown, and the connection is gone.
    ConnectionLost(sqlx::Error),
    /// The database cannot be reached, refused the connection or is not ready; retrying
    /// at once would meet the same condition.
    Unavailable(sqlx::Error),
    /// Anything else, including a CHECK violation: the domain never writes a negative
    /// balance or an unknown kind, so tripping a constraint is a bug, not a business case.
    Unexpected(sqlx::Error),
}

/// The class of an error, without the error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    Duplicate,
    LockConflict,
    Aborted,
    ConnectionLost,
    Unavailable,
    Unexpected,
}

/// The class of a server (or proxy) error number.
fn class_of_number(number: u16) -> Class {
    match number {
        ER_LOCK_DEADLOCK | ER_LOCK_WAIT_TIMEOUT | ER_LOCK_NOWAIT => Class::LockConflict,
        ER_QUERY_INTERRUPTED | ER_STATEMENT_TIMEOUT | ER_QUERY_TIMEOUT => Class::Aborted,
        ER_SERVER_SHUTDOWN
        | ER_CONNECTION_KILLED
        | ER_CLIENT_INTERACTION_TIMEOUT
        | CR_SERVER_GONE_ERROR
        | CR_SERVER_LOST => Class::ConnectionLost,
        ER_CON_COUNT_ERROR | ER_UNKNOWN_COM_ERROR | ER_ERROR_DURING_COMMIT => Class::Unavailable,
        _ => Class::Unexpected,
    }
}

/// Whether a batch's guard failed: its scalar subquery had two rows
/// (`ER_SUBQUERY_NO_1_ROW`), because the batch's update did not write every users row.
/// No other statement of a batch's write has a scalar subquery.
pub(crate) fn guard_failed(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(db) => db
            .try_downcast_ref::<MySqlDatabaseError>()
            .is_some_and(|db| db.number() == ER_SUBQUERY_NO_1_ROW),
        _ => false,
    }
}

fn class_of(e: &sqlx::Error) -> Class {
    match e {
        sqlx::Error::Database(db) if db.is_unique_violation() => Class::Duplicate,
        sqlx::Error::Database(db) if db.is_check_violation() => Class::Unexpected,
        sqlx::Error::Database(db) => db
            .try_downcast_ref::<MySqlDatabaseError>()
            .map_or(Class::Unexpected, |db| class_of_number(db.number())),
        // A socket that died mid-statement surfaces as `Io` (reset, broken pipe, EOF), or
        // as `Protocol` when it died inside a packet.
        sqlx::Error::Io(_) | sqlx::Error::Protocol(_) => Class::ConnectionLost,
        // A pool that cannot hand out a connection in time (the server is down: sqlx
        // retries refused connects until the acquire timeout) is `PoolTimedOut`.
        sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => Class::Unavailable,
        _ => Class::Unexpected,
    }
}

/// Sorts `e` into what the adapter can act on.
pub(crate) fn classify(e: sqlx::Error) -> Classified {
    match class_of(&e) {
        Class::Duplicate => Classified::Duplicate(e),
        Class::LockConflict => Classified::LockConflict(e),
        Class::Aborted => Classified::Aborted(e),
        Class::ConnectionLost => Classified::ConnectionLost(e),
        Class::Unavailable => Classified::Unavailable(e),
        Class::Unexpected => Classified::Unexpected(e),
    }
}

/// Whether a failed read may be sent once more (on a tested connection): a read has no
/// effect, so only whether a second try can succeed matters.
pub(crate) fn read_may_retry(e: &sqlx::Error) -> bool {
    matches!(class_of(e), Class::Aborted | Class::ConnectionLost)
}

/// Whether the statement failed because its connection is gone, so the next attempt
/// should not take another connection that may have died the same way untested.
pub(crate) fn connection_lost(e: &sqlx::Error) -> bool {
    class_of(e) == Class::ConnectionLost
}

impl Classified {
    /// The port error of a read or a simple write. Every transient class is reported as
    /// unavailable (503, retryable by the client) rather than as a bug.
    pub(crate) fn into_repo(self) -> RepoError {
        match self {
            Classified::LockConflict(e)
            | Classified::Aborted(e)
            | Classified::ConnectionLost(e)
            | Classified::Unavailable(e) => RepoError::Unavailable(e.into()),
            Classified::Duplicate(e) | Classified::Unexpected(e) => RepoError::Unexpected(e.into()),
        }
    }

    /// The port error of a statement of a balance step before its COMMIT (call sites
    /// that expect a duplicate match [`Classified::Duplicate`] first). The transaction
    /// has not committed, so nothing of it is written whatever the class.
    pub(crate) fn into_step(self) -> StepError {
        match self {
            Classified::LockConflict(e) => {
                tracing::debug!(error = %e, "lock conflict in a balance step; reported as a version conflict");
                StepError::VersionConflict
            }
            Classified::Aborted(e) | Classified::ConnectionLost(e) => StepError::Aborted(e.into()),
            Classified::Unavailable(e) => StepError::Unavailable(e.into()),
            Classified::Duplicate(e) | Classified::Unexpected(e) => StepError::Unexpected(e.into()),
        }
    }

    /// The port error of a failed COMMIT. Only a lock conflict is known to have rolled
    /// the transaction back; after anything else the commit may have happened, so the
    /// step is not retried here: the client's retry with the same key replays the record
    /// if it did.
    pub(crate) fn into_commit(self) -> StepError {
        match self {
            Classified::LockConflict(e) => {
                tracing::debug!(error = %e, "the commit of a balance step was rolled back by a lock conflict");
                StepError::VersionConflict
            }
            Classified::Aborted(e) | Classified::ConnectionLost(e) | Classified::Unavailable(e) => {
                tracing::warn!(error = %e, "the commit of a balance step failed; its outcome is unknown");
                StepError::Unavailable(e.into())
            }
            Classified::Duplicate(e) | Classified::Unexpected(e) => StepError::Unexpected(e.into()),
        }
    }
}

/// `?` on a sqlx call in a read or simple write.
pub(crate) fn repo(e: sqlx::Error) -> RepoError {
    classify(e).into_repo()
}

/// `?` on a sqlx call in a balance step, before its COMMIT.
pub(crate) fn step(e: sqlx::Error) -> StepError {
    classify(e).into_step()
}

/// `?` on the COMMIT of a balance step.
pub(crate) fn commit(e: sqlx::Error) -> StepError {
    classify(e).into_commit()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_conflicts_are_deadlocks_and_lock_wait_timeouts() {
        assert_eq!(class_of_number(1213), Class::LockConflict);
        assert_eq!(class_of_number(1205), Class::LockConflict);
        assert_eq!(class_of_number(3572), Class::LockConflict);
    }

    #[test]
    fn interrupted_and_timed_out_statements_are_aborted() {
        assert_eq!(class_of_number(1317), Class::Aborted);
        assert_eq!(class_of_number(1969), Class::Aborted);
        assert_eq!(class_of_number(3024), Class::Aborted);
    }

    #[test]
    fn a_closed_or_killed_connection_is_lost() {
        for number in [2006, 2013, 1927, 1053, 4031] {
            assert_eq!(class_of_number(number), Class::ConnectionLost, "{number}");
        }
    }

    #[test]
    fn a_full_server_or_a_galera_node_not_ready_is_unavailable() {
        assert_eq!(class_of_number(1040), Class::Unavailable);
        assert_eq!(class_of_number(1047), Class::Unavailable);
    }

    #[test]
    fn a_galera_node_that_lost_the_primary_component_mid_transaction_is_unavailable() {
        // Seen in the fault suite (galera-sigstop-node): 1180 "Error while appending
        // streaming replication fragment (provider status: Not connected to Primary
        // Component)" on the node that had been stopped, once it ran again.
        assert_eq!(class_of_number(1180), Class::Unavailable);
    }

    #[test]
    fn other_numbers_are_unexpected() {
        // Syntax error, unknown column, data too long: bugs, not conditions to retry.
        for number in [1064, 1054, 1406, 0] {
            assert_eq!(class_of_number(number), Class::Unexpected, "{number}");
        }
    }

    #[test]
    fn a_dead_socket_is_a_lost_connection() {
        let reset = sqlx::Error::Io(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        let eof = sqlx::Error::Io(std::io::Error::from(std::io::ErrorKind::UnexpectedEof));
        let garbled = sqlx::Error::Protocol("a packet cut short".to_owned());
        for e in [reset, eof, garbled] {
            assert!(read_may_retry(&e), "{e:?}");
            assert!(connection_lost(&e), "{e:?}");
            assert!(matches!(step(e), StepError::Aborted(_)));
        }
    }

    #[test]
    fn a_lost_commit_is_not_retried_but_unavailable() {
        let lost = sqlx::Error::Io(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        assert!(matches!(commit(lost), StepError::Unavailable(_)));
        let garbled = sqlx::Error::Protocol("a packet cut short".to_owned());
        assert!(matches!(commit(garbled), StepError::Unavailable(_)));
    }

    #[test]
    fn a_pool_that_cannot_connect_is_unavailable_and_not_retried() {
        for e in [sqlx::Error::PoolTimedOut, sqlx::Error::PoolClosed] {
            assert!(!read_may_retry(&e), "{e:?}");
            assert!(matches!(repo(e), RepoError::Unavailable(_)));
        }
        assert!(matches!(
            step(sqlx::Error::PoolTimedOut),
            StepError::Unavailable(_)
        ));
    }

    #[test]
    fn a_missing_row_is_unexpected() {
        assert!(!read_may_retry(&sqlx::Error::RowNotFound));
        assert!(matches!(
            repo(sqlx::Error::RowNotFound),
            RepoError::Unexpected(_)
        ));
    }
}
