//! `IdempotencyRepo`: the read side and the purge of completed records. Records are
//! written inside a balance step ([`crate::step`]), and for a refusal the coupon gate
//! decided, on their own (`insert_refusal`).

use async_trait::async_trait;
use chrono::{DateTime, NaiveDateTime, Utc};
use domain::idempotency::{CompletedRecord, RecordOutcome, StoredResponse};
use domain::ports::{IdempotencyRepo, KeyRecord, RepoError, StepError};
use domain::types::{IdempotencyKey, UserId};

use crate::MySqlStore;
use crate::convert::{RecordColumns, completed_record, to_db_time};
use crate::error::repo;
use crate::sql;

#[async_trait]
impl IdempotencyRepo for MySqlStore {
    async fn find(
        &self,
        user: UserId,
        key: &IdempotencyKey,
        now: DateTime<Utc>,
    ) -> Result<Option<CompletedRecord>, RepoError> {
        // The primary key (user_id, idempotency_key) scopes the key to its user, and the
        // ascii_bin collation makes the match byte for byte.
        type Row = (
            String,
            Option<String>,
            Option<String>,
            u16,
            Vec<u8>,
            NaiveDateTime,
            NaiveDateTime,
        );
        let row: Option<Row> = read_retrying!(&self.pool, |db| {
            sqlx::query_as(sql::FIND_KEY)
                .bind(user.get())
                .bind(key.as_str())
                .bind(to_db_time(now))
                .fetch_optional(db)
        })
        .map_err(repo)?;
        let Some((fingerprint, operation, outcome, status, body, created_at, expires_at)) = row
        else {
            return Ok(None);
        };
        let columns = RecordColumns {
            fingerprint,
            operation,
            outcome,
            status,
            body,
            created_at,
            expires_at,
        };
        Ok(Some(completed_record(user, key.clone(), columns)?))
    }

    async fn find_many(
        &self,
        keys: &[(UserId, IdempotencyKey)],
        now: DateTime<Utc>,
    ) -> Result<Vec<CompletedRecord>, RepoError> {
        crate::batch::find_many(&self.pool, keys, now).await
    }

    async fn insert_refusal(
        &self,
        user: UserId,
        key: &KeyRecord,
        response: &StoredResponse,
    ) -> Result<Option<CompletedRecord>, RepoError> {
        // Autocommit statements on one connection: the insert, and only when it meets an
        // expired record of the key, that record's delete and the insert again (as the
        // balance step writes its record). A live record stays, and is the answer.
        for _ in 0..2 {
            let mut conn = self.pool.acquire().await.map_err(repo)?;
            match crate::step::put_record(&mut conn, user, key, RecordOutcome::Refused, response)
                .await
            {
                Ok(()) => return Ok(None),
                Err(StepError::KeyTaken) => {}
                Err(StepError::Unavailable(cause) | StepError::Aborted(cause)) => {
                    return Err(RepoError::Unavailable(cause));
                }
                Err(other) => return Err(RepoError::Unexpected(anyhow::Error::new(other))),
            }
            drop(conn);
            if let Some(live) = self.find(user, &key.key, key.created_at).await? {
                return Ok(Some(live));
            }
            // It expired between the insert and the read: insert again.
        }
        Err(RepoError::Unavailable(anyhow::anyhow!(
            "the record of a key kept expiring while a refusal was stored under it"
        )))
    }

    async fn purge_expired(&self, now: DateTime<Utc>, limit: u32) -> Result<u64, RepoError> {
        if limit == 0 {
            return Ok(0);
        }
        // One bounded statement per call keeps each purge transaction (and its row locks)
        // short. Concurrent purges from several instances are safe: a row deleted by one
        // is simply not found by the other, which waits on its lock and moves on.
        let done = sqlx::query(
            "delete from idempotency_records where expires_at <= ? order by expires_at limit ?",
        )
        .bind(to_db_time(now))
        .bind(limit)
        .execute(&self.pool)
        .await
        .map_err(repo)?;
        Ok(done.rows_affected())
    }
}
