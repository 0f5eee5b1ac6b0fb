//! Group commit on MySQL/MariaDB: a batch's transaction (`BalanceStore::begin_batch`,
//! `BatchTransaction::commit`) and `IdempotencyRepo::find_many`.
//!
//! These statements are sent as text with their values written in as literals. A batch's
//! statements differ in their number of rows, so prepared statements would be prepared
//! anew for nearly every batch (a round trip each, and a statement cache full of them);
//! text also lets one round trip carry several statements. Every literal is built by
//! [`Sql`] from a typed value: integers, datetimes (digits and separators only) and hex
//! strings (`X'…'`) for every text and byte value, so no value is ever read as SQL.
//!
//! The transaction is two round trips whatever its size: `BEGIN` with the users rows
//! locked and read (in id order, `NOWAIT`, by primary key only) and the keys' live
//! records; then, once the batch is decided, the guarded update of the users rows (one
//! statement for all users; each row only at the version read), a guard that fails the
//! rest unless the update wrote every row, the ledger entries and the records (one
//! multi-row insert each) and `COMMIT`, which runs only if every statement before it did.
//!
//! A batch never waits for a row lock: a users row locked by another transaction (which
//! the user's Redis lock normally rules out: a writer without it, or one whose lease
//! expired) fails the batch at once, and the use case runs its requests alone, each
//! waiting for its own row. A batch shared by many users would otherwise hold all of them
//! up for as long as the one row stays locked (`innodb_lock_wait_timeout`).

use std::fmt::Write as _;

use async_trait::async_trait;
use chrono::{DateTime, NaiveDateTime, Utc};
use domain::idempotency::CompletedRecord;
use domain::model::User;
use domain::ports::{BatchRead, BatchStep, BatchTransaction, RepoError, StepError};
use domain::types::{Balance, IdempotencyKey, UserId};
use sqlx::mysql::MySqlRow;
use sqlx::pool::PoolConnection;
use sqlx::{AssertSqlSafe, MySql, MySqlPool, Row as _};

use crate::convert::{
    RecordColumns, completed_record, from_db_time, idempotency_key, to_db_expiry, to_db_time,
    user_id, version_from_db, version_to_db,
};
use crate::error::{self, Classified, classify, repo, step};
use crate::retry::tested_connection;

/// A statement being written, with literal values.
struct Sql(String);

impl Sql {
    fn new(start: &str) -> Self {
        Self(start.to_owned())
    }

    fn text(&mut self, sql: &str) -> &mut Self {
        self.0.push_str(sql);
        self
    }

    fn int(&mut self, value: i64) -> &mut Self {
        // Writing to a String cannot fail.
        let _ = write!(self.0, "{value}");
        self
    }

    /// Bytes as a hex literal, with a character set introducer for a text column
    /// (`_ascii X'…'`), so the column's collation and index apply to a comparison.
    fn hex(&mut self, charset: Option<&str>, bytes: &[u8]) -> &mut Self {
        if let Some(charset) = charset {
            self.0.push('_');
            self.0.push_str(charset);
            self.0.push(' ');
        }
        self.0.push_str("X'");
        for byte in bytes {
            let _ = write!(self.0, "{byte:02X}");
        }
        self.0.push('\'');
        self
    }

    fn key(&mut self, key: &IdempotencyKey) -> &mut Self {
        self.hex(Some("ascii"), key.as_str().as_bytes())
    }

    fn time(&mut self, at: NaiveDateTime) -> &mut Self {
        let _ = write!(self.0, "'{}'", at.format("%Y-%m-%d %H:%M:%S%.3f"));
        self
    }

    /// `item` written for each of `items`, `separator` between them.
    fn each<T>(
        &mut self,
        items: impl IntoIterator<Item = T>,
        separator: &str,
        mut item: impl FnMut(&mut Self, T),
    ) -> &mut Self {
        for (i, value) in items.into_iter().enumerate() {
            if i > 0 {
                self.text(separator);
            }
            item(self, value);
        }
        self
    }

    fn finish(self) -> AssertSqlSafe<String> {
        AssertSqlSafe(self.0)
    }
}

/// The rows of a text read, sent once more on a tested connection when the first attempt
/// lost its connection (as every read of the adapter).
async fn fetch(pool: &MySqlPool, sql: Sql) -> Result<Vec<MySqlRow>, RepoError> {
    let sql = sql.0;
    read_retrying!(pool, |db| {
        sqlx::raw_sql(AssertSqlSafe(sql.clone())).fetch_all(db)
    })
    .map_err(repo)
}

/// The columns of a batch's users, as [`user_row`] reads them, and how many.
const USER_COLUMNS: &str = "id, balance, version, created_at";
const USER_WIDTH: usize = 4;

fn user_row(row: &MySqlRow) -> anyhow::Result<User> {
    let id: i64 = row.try_get(0)?;
    let balance: i64 = row.try_get(1)?;
    let version: i64 = row.try_get(2)?;
    let created_at: NaiveDateTime = row.try_get(3)?;
    Ok(User {
        id: user_id(id)?,
        balance: Balance::from_stored(balance),
        version: version_from_db(version)?,
        created_at: from_db_time(created_at),
    })
}

/// The columns of a record, as [`record_row`] reads them.
const RECORD_COLUMNS: &str = "user_id, idempotency_key, fingerprint, operation, outcome, \
     response_status, response_body, created_at, expires_at";

fn record_row(row: &MySqlRow) -> anyhow::Result<CompletedRecord> {
    let user: i64 = row.try_get(0)?;
    let key: String = row.try_get(1)?;
    let columns = RecordColumns {
        fingerprint: row.try_get(2)?,
        operation: row.try_get(3)?,
        outcome: row.try_get(4)?,
        status: row.try_get(5)?,
        body: row.try_get(6)?,
        created_at: row.try_get(7)?,
        expires_at: row.try_get(8)?,
    };
    completed_record(user_id(user)?, idempotency_key(&key)?, columns)
}

/// `select … from idempotency_records where …`: the live completed records among `keys`.
fn select_records(sql: &mut Sql, keys: &[(UserId, IdempotencyKey)], now: DateTime<Utc>) {
    sql.text("select ")
        .text(RECORD_COLUMNS)
        .text(
            " from idempotency_records \
             where status = 'COMPLETED' and expires_at > ",
        )
        .time(to_db_time(now))
        .text(" and (");
    sql.each(keys, " or ", |sql, (user, key)| {
        sql.text("(user_id = ")
            .int(user.get())
            .text(" and idempotency_key = ")
            .key(key)
            .text(")");
    })
    .text(")");
}

/// `BalanceStore::begin_batch`: one round trip, `BEGIN`, the users rows locked and read
/// (in id order, `NOWAIT`, by primary key only), and the keys' live records.
pub(crate) async fn begin_batch(
    pool: &MySqlPool,
    users: &[UserId],
    keys: &[(UserId, IdempotencyKey)],
    now: DateTime<Utc>,
) -> Result<Box<dyn BatchTransaction>, StepError> {
    // `force index (primary)`: on a table small next to the batch the optimizer may
    // prefer a scan of the whole index, and a locking scan locks (and waits for) every
    // row it passes, not only the batch's own.
    let mut sql = Sql::new("begin; select ");
    sql.text(USER_COLUMNS)
        .text(" from users force index (primary) where id in (");
    if users.is_empty() {
        sql.text("null");
    }
    sql.each(users, ", ", |sql, id| {
        sql.int(id.get());
    })
    .text(") order by id for update nowait");
    if !keys.is_empty() {
        sql.text("; ");
        select_records(&mut sql, keys, now);
    }
    let sql = sql.0;

    // The first round trip may meet a connection that died idle: nothing has happened
    // then (an open transaction dies with its session), so it begins once more on a
    // tested connection.
    let conn = pool.acquire().await.map_err(step)?;
    let mut tx = OpenTx { conn, open: true };
    let read = match sqlx::raw_sql(AssertSqlSafe(sql.clone()))
        .fetch_all(&mut *tx.conn)
        .await
    {
        Err(e) if error::connection_lost(&e) => {
            tracing::info!(error = %e, "a pooled connection was found dead at a batch's BEGIN; beginning again on a tested one");
            drop(tx);
            let conn = tested_connection(pool).await.map_err(step)?;
            tx = OpenTx { conn, open: true };
            sqlx::raw_sql(AssertSqlSafe(sql))
                .fetch_all(&mut *tx.conn)
                .await
        }
        other => other,
    };
    let rows = match read {
        Ok(rows) => rows,
        Err(e) => {
            // A row locked elsewhere (`NOWAIT`) is a lock conflict: the use case runs the
            // batch's requests alone, each waiting for its own row.
            tx.rollback().await;
            return Err(step(e));
        }
    };
    // The two reads' rows, told apart by their width.
    let mut read = BatchRead::default();
    let parsed = rows.iter().try_for_each(|row| {
        if row.len() == USER_WIDTH {
            read.users.push(user_row(row)?);
        } else {
            read.records.push(record_row(row)?);
        }
        anyhow::Ok(())
    });
    if let Err(e) = parsed {
        tx.rollback().await;
        return Err(StepError::Unexpected(e));
    }
    Ok(Box::new(MySqlBatch { tx, read }))
}

/// A batch's open transaction: its users rows locked until it ends.
struct MySqlBatch {
    tx: OpenTx,
    read: BatchRead,
}

#[async_trait]
impl BatchTransaction for MySqlBatch {
    fn read(&self) -> &BatchRead {
        &self.read
    }

    async fn commit(self: Box<Self>, batch: &BatchStep) -> Result<(), StepError> {
        let MySqlBatch { tx, .. } = *self;
        if batch.is_empty() {
            tx.rollback().await;
            return Ok(());
        }
        apply_batch(tx, batch).await
    }
}

/// `IdempotencyRepo::find_many`: one lookup by primary key per (user, key).
pub(crate) async fn find_many(
    pool: &MySqlPool,
    keys: &[(UserId, IdempotencyKey)],
    now: DateTime<Utc>,
) -> Result<Vec<CompletedRecord>, RepoError> {
    if keys.is_empty() {
        return Ok(Vec::new());
    }
    let mut sql = Sql::new("");
    select_records(&mut sql, keys, now);
    fetch(pool, sql)
        .await?
        .iter()
        .map(record_row)
        .collect::<anyhow::Result<Vec<_>>>()
        .map_err(RepoError::Unexpected)
}

/// The statements of a batch's write, after its [`begin_batch`]: the users update (one
/// statement for all; each row only at the version the batch read), the guard that
/// fails the statements when it did not write every row, the inserts and `COMMIT`.
fn statements(batch: &BatchStep) -> Result<Sql, StepError> {
    let at = to_db_time(batch.at);
    let mut update = Sql::new("update users force index (primary) set ");
    if let [only] = batch.users.as_slice() {
        update
            .text("balance = ")
            .int(only.balance_after.get())
            .text(", version = version + 1, updated_at = ")
            .time(at)
            .text(" where id = ")
            .int(only.user_id.get())
            .text(" and version = ")
            .int(version_to_db(only.expected_version)?);
    } else {
        update.text("balance = case id");
        for user in &batch.users {
            update
                .text(" when ")
                .int(user.user_id.get())
                .text(" then ")
                .int(user.balance_after.get());
        }
        update
            .text(" end, version = version + 1, updated_at = ")
            .time(at)
            .text(" where id in (")
            .each(&batch.users, ", ", |sql, user| {
                sql.int(user.user_id.get());
            })
            .text(") and version = case id");
        for user in &batch.users {
            update
                .text(" when ")
                .int(user.user_id.get())
                .text(" then ")
                .int(version_to_db(user.expected_version)?);
        }
        update.text(" end");
    }
    // The guard: unless the update wrote every users row of the batch (`ROW_COUNT()`: the
    // rows the statement before changed, each with its version moved on), the scalar
    // subquery has two rows, the statement fails (`ER_SUBQUERY_NO_1_ROW`), and the
    // statements after it, `COMMIT` among them, do not run. The rows are locked since
    // `begin_batch` read them, so this holds unless something broke that lock.
    update
        .text("; set @balance_batch_guard = (select 1 union all select 1 from dual where row_count() <> ")
        .int(batch.users.len() as i64)
        .text("); ");

    let mut inserts = Sql::new("");
    let entries = batch
        .users
        .iter()
        .flat_map(|user| user.writes.iter().map(move |write| (user.user_id, write)))
        .filter_map(|(user, write)| write.ledger.map(|ledger| (user, write, ledger)));
    let mut first = true;
    for (user, write, (kind, movement)) in entries {
        inserts.text(if first {
            "insert into ledger_entries \
             (user_id, kind, amount, balance_after, idempotency_key, created_at, key_expires_at) \
             values ("
        } else {
            ", ("
        });
        first = false;
        inserts
            .int(user.get())
            .text(", '")
            .text(kind.as_str())
            .text("', ")
            .int(movement.amount.get())
            .text(", ")
            .int(movement.balance_after.get())
            .text(", ")
            .key(&write.key.key)
            .text(", ")
            .time(at)
            .text(", ")
            .time(to_db_expiry(write.key.expires_at))
            .text(")");
    }
    if !first {
        inserts.text("; ");
    }
    inserts.text(
        "insert into idempotency_records \
         (user_id, idempotency_key, fingerprint, operation, outcome, status, response_status, \
          response_body, created_at, expires_at) values ",
    );
    let mut first = true;
    for user in &batch.users {
        for write in &user.writes {
            if !first {
                inserts.text(", ");
            }
            first = false;
            inserts
                .text("(")
                .int(user.user_id.get())
                .text(", ")
                .key(&write.key.key)
                .text(", ")
                .hex(Some("utf8mb4"), write.key.fingerprint.as_str().as_bytes())
                .text(", '")
                .text(write.key.operation.as_str())
                .text("', '")
                .text(write.outcome().as_str())
                .text("', 'COMPLETED', ")
                .int(i64::from(write.response.status))
                .text(", ")
                .hex(None, &write.response.body)
                .text(", ")
                .time(to_db_time(write.key.created_at))
                .text(", ")
                .time(to_db_expiry(write.key.expires_at))
                .text(")");
        }
    }
    inserts.text("; commit");
    update.text(&inserts.0);
    Ok(update)
}

/// A connection with a transaction begun by text: if it is dropped before the
/// transaction ended (an error on the way out of a rollback), it is closed rather than
/// handed back to the pool with the transaction open.
struct OpenTx {
    conn: PoolConnection<MySql>,
    open: bool,
}

impl Drop for OpenTx {
    fn drop(&mut self) {
        if self.open {
            self.conn.close_on_drop();
        }
    }
}

impl OpenTx {
    async fn rollback(mut self) {
        match sqlx::raw_sql("rollback").execute(&mut *self.conn).await {
            Ok(_) => self.open = false,
            // Closed on drop: the server rolls back when the session ends.
            Err(e) => tracing::debug!(error = %e, "rollback of a failed batch failed"),
        }
    }
}

/// The write of a batch and its `COMMIT`, on the transaction `begin_batch` opened: one
/// round trip. The statements stop at the first that fails, so a batch that did not
/// write every users row (the guard) or met a taken key never commits: the transaction
/// is left open and rolled back here. A failed guard or a duplicate can only be that
/// statement's; a lock conflict rolled back either way; anything else may have been the
/// COMMIT's, of unknown outcome, and the connection is closed (a transaction still open
/// ends with its session).
async fn apply_batch(mut tx: OpenTx, batch: &BatchStep) -> Result<(), StepError> {
    let sql = statements(batch)?.finish();
    match sqlx::raw_sql(sql).execute(&mut *tx.conn).await {
        Ok(_) => {
            tx.open = false;
            Ok(())
        }
        Err(e) if error::guard_failed(&e) => {
            // A users row moved on since the batch read it (or is gone).
            tx.rollback().await;
            Err(StepError::VersionConflict)
        }
        Err(e) => match classify(e) {
            // A record of one of the keys exists (live, written since the batch read it,
            // or expired and not yet purged): the use case runs the requests one by one.
            Classified::Duplicate(_) => {
                tx.rollback().await;
                Err(StepError::KeyTaken)
            }
            conflict @ Classified::LockConflict(_) => {
                tx.rollback().await;
                Err(conflict.into_step())
            }
            // After anything else the batch may have committed, so it is never run again
            // request by request (its requests are answered 503 and their retries replay
            // or run afresh).
            other => Err(match other.into_commit() {
                StepError::Unexpected(cause) => StepError::Unavailable(cause),
                unknown => unknown,
            }),
        },
    }
}
