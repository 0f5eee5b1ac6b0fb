//! `UserRepo`: user creation, the read side of balances and ledgers, and seeding.

use async_trait::async_trait;
use chrono::{DateTime, NaiveDateTime, Utc};
use domain::model::{EntryKind, HistoryPage, LedgerEntry, User};
use domain::ports::{RepoError, UserRepo};
use domain::types::{Amount, Balance, EntryId, UserId};
use sqlx::{MySql, MySqlConnection, QueryBuilder};

use crate::MySqlStore;
use crate::convert::{
    entry_id, entry_kind, from_db_time, idempotency_key, to_db_time, user_id, version_from_db,
};
use crate::error::{Classified, classify, repo};
use crate::sql;
use crate::step::rollback;

/// Users created per seeding transaction: large enough to seed thousands of users in a
/// few round trips, small enough to stay far below the 65 535 placeholders of a statement.
const SEED_BATCH: u32 = 500;

/// How many times one seeded user is retried after InnoDB gave up on a lock (a concurrent
/// seeder holds it); bounded so a stuck database fails the seed instead of hanging it.
const SEED_LOCK_RETRIES: u32 = 3;

type EntryRow = (i64, String, i64, i64, Option<String>, NaiveDateTime);

#[async_trait]
impl UserRepo for MySqlStore {
    async fn create_user(&self, now: DateTime<Utc>) -> Result<User, RepoError> {
        let created_at = to_db_time(now);
        let done = sqlx::query(
            "insert into users (balance, version, created_at, updated_at) values (0, 0, ?, ?)",
        )
        .bind(created_at)
        .bind(created_at)
        .execute(&self.pool)
        .await
        .map_err(repo)?;
        Ok(User {
            id: user_id(done.last_insert_id())?,
            balance: Balance::ZERO,
            version: 0,
            created_at: from_db_time(created_at),
        })
    }

    async fn get_user(&self, id: UserId) -> Result<Option<User>, RepoError> {
        let row: Option<(i64, i64, NaiveDateTime)> = read_retrying!(&self.pool, |db| {
            sqlx::query_as(sql::SELECT_USER)
                .bind(id.get())
                .fetch_optional(db)
        })
        .map_err(repo)?;
        let Some((balance, version, created_at)) = row else {
            return Ok(None);
        };
        Ok(Some(User {
            id,
            balance: Balance::from_stored(balance),
            version: version_from_db(version)?,
            created_at: from_db_time(created_at),
        }))
    }

    async fn history(
        &self,
        id: UserId,
        before: Option<EntryId>,
        limit: u32,
    ) -> Result<HistoryPage, RepoError> {
        if limit == 0 {
            return Ok(HistoryPage {
                items: Vec::new(),
                next: None,
            });
        }
        // One row more than asked tells whether an older page exists without a count.
        let fetch = i64::from(limit) + 1;
        let rows: Vec<EntryRow> = match before {
            Some(before) => read_retrying!(&self.pool, |db| {
                sqlx::query_as(
                    "select id, kind, amount, balance_after, idempotency_key, created_at \
                     from ledger_entries where user_id = ? and id < ? \
                     order by id desc limit ?",
                )
                .bind(id.get())
                .bind(before.get())
                .bind(fetch)
                .fetch_all(db)
            }),
            None => read_retrying!(&self.pool, |db| {
                sqlx::query_as(
                    "select id, kind, amount, balance_after, idempotency_key, created_at \
                     from ledger_entries where user_id = ? \
                     order by id desc limit ?",
                )
                .bind(id.get())
                .bind(fetch)
                .fetch_all(db)
            }),
        }
        .map_err(repo)?;

        let more = rows.len() > limit as usize;
        let items = rows
            .into_iter()
            .take(limit as usize)
            .map(|(entry, kind, amount, balance_after, key, created_at)| {
                Ok(LedgerEntry {
                    id: entry_id(entry)?,
                    user_id: id,
                    kind: entry_kind(&kind)?,
                    amount: Amount::from_stored(amount),
                    balance_after: Balance::from_stored(balance_after),
                    idempotency_key: key.as_deref().map(idempotency_key).transpose()?,
                    created_at: from_db_time(created_at),
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let next = if more {
            items.last().map(|entry| entry.id)
        } else {
            None
        };
        Ok(HistoryPage { items, next })
    }

    async fn balance_at(
        &self,
        id: UserId,
        at: DateTime<Utc>,
    ) -> Result<Option<Balance>, RepoError> {
        // One seek on ledger_entries_user_created_at (migration 0008).
        let row: Option<(i64,)> = read_retrying!(&self.pool, |db| {
            sqlx::query_as(
                "select balance_after from ledger_entries \
                 where user_id = ? and created_at <= ? \
                 order by created_at desc, id desc limit 1",
            )
            .bind(id.get())
            .bind(to_db_time(at))
            .fetch_optional(db)
        })
        .map_err(repo)?;
        Ok(row.map(|(balance,)| Balance::from_stored(balance)))
    }

    async fn seed_users(
        &self,
        count: u32,
        balance: Balance,
        now: DateTime<Utc>,
    ) -> Result<u64, RepoError> {
        let at = to_db_time(now);
        let mut created = 0;
        let mut first = 1;
        while first <= count {
            let last = count.min(first.saturating_add(SEED_BATCH - 1));
            created += self.seed_range(first, last, balance, at).await?;
            match last.checked_add(1) {
                Some(next) => first = next,
                None => break,
            }
        }
        Ok(created)
    }
}

impl MySqlStore {
    /// Seeds the missing users among `first..=last`: one transaction for the whole batch,
    /// or, when a concurrent seeder got there first (a duplicate key), one per user.
    async fn seed_range(
        &self,
        first: u32,
        last: u32,
        balance: Balance,
        at: NaiveDateTime,
    ) -> Result<u64, RepoError> {
        // A plain read: a user that appears after it is caught by its primary key below.
        let existing: Vec<(i64,)> =
            sqlx::query_as("select id from users where id between ? and ? order by id")
                .bind(first)
                .bind(last)
                .fetch_all(&self.pool)
                .await
                .map_err(repo)?;
        let existing: std::collections::HashSet<i64> =
            existing.into_iter().map(|(id,)| id).collect();
        let missing: Vec<i64> = (i64::from(first)..=i64::from(last))
            .filter(|id| !existing.contains(id))
            .collect();
        if missing.is_empty() {
            return Ok(0);
        }

        match self.insert_seeded(&missing, balance, at).await {
            Ok(()) => Ok(missing.len() as u64),
            // Another seeder created some of these users since the read: redo the batch
            // one user at a time so each existing one is skipped and the rest still created.
            Err(Classified::Duplicate(_) | Classified::LockConflict(_)) => {
                let mut created = 0;
                for id in missing {
                    if self.seed_one(id, balance, at).await? {
                        created += 1;
                    }
                }
                Ok(created)
            }
            Err(other) => Err(other.into_repo()),
        }
    }

    /// Creates one seeded user; `false` when it exists already.
    async fn seed_one(
        &self,
        id: i64,
        balance: Balance,
        at: NaiveDateTime,
    ) -> Result<bool, RepoError> {
        let mut attempt = 0;
        loop {
            match self.insert_seeded(&[id], balance, at).await {
                Ok(()) => return Ok(true),
                Err(Classified::Duplicate(_)) => return Ok(false),
                Err(Classified::LockConflict(_)) if attempt < SEED_LOCK_RETRIES => attempt += 1,
                Err(other) => return Err(other.into_repo()),
            }
        }
    }

    /// Inserts users `ids` with `balance` and, when it is positive, their opening CHARGE
    /// entries (no key), in one transaction: all of them or none.
    async fn insert_seeded(
        &self,
        ids: &[i64],
        balance: Balance,
        at: NaiveDateTime,
    ) -> Result<(), Classified> {
        let mut tx = self.pool.begin().await.map_err(classify)?;
        match insert_seeded_in(&mut tx, ids, balance, at).await {
            Ok(()) => tx.commit().await.map_err(classify),
            Err(e) => {
                // At once, so a concurrent seeder waiting on these ids goes on.
                rollback(tx).await;
                Err(e)
            }
        }
    }
}

async fn insert_seeded_in(
    conn: &mut MySqlConnection,
    ids: &[i64],
    balance: Balance,
    at: NaiveDateTime,
) -> Result<(), Classified> {
    let mut users = QueryBuilder::<MySql>::new(
        "insert into users (id, balance, version, created_at, updated_at) ",
    );
    users.push_values(ids, |mut row, id| {
        row.push_bind(*id)
            .push_bind(balance.get())
            .push_bind(0_i64)
            .push_bind(at)
            .push_bind(at);
    });
    // Not cached: the statement's shape changes with the batch size.
    users
        .build()
        .persistent(false)
        .execute(&mut *conn)
        .await
        .map_err(classify)?;

    if balance.get() > 0 {
        let mut entries = QueryBuilder::<MySql>::new(
            "insert into ledger_entries \
                 (user_id, kind, amount, balance_after, idempotency_key, created_at) ",
        );
        entries.push_values(ids, |mut row, id| {
            row.push_bind(*id)
                .push_bind(EntryKind::Charge.as_str())
                .push_bind(balance.get())
                .push_bind(balance.get())
                .push_bind(None::<String>)
                .push_bind(at);
        });
        entries
            .build()
            .persistent(false)
            .execute(&mut *conn)
            .await
            .map_err(classify)?;
    }
    Ok(())
}
