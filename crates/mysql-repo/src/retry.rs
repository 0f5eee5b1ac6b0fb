//! Second attempts after a lost connection: a read is sent once more, and a balance step's
//! `BEGIN` once more, on a connection that has just answered a ping.
//!
//! The pool hands out idle connections untested (see [`crate::connect_with`]), so after the
//! database drops its connections (a restart, a `KILL`, a failover) every idle one is dead
//! and would fail one request each. The first failure is retried on a tested connection,
//! and finding one closes every dead connection met on the way, which clears the pool.

use sqlx::pool::PoolConnection;
use sqlx::{Connection as _, MySql, MySqlPool};

/// A pooled connection that answered a ping. Each dead connection met on the way is
/// closed; a pool of only dead idle connections ends by opening a new one.
///
/// # Errors
/// The last ping's failure when no connection answers within the pool's size plus one
/// tries, or the pool's own failure to hand out a connection.
pub(crate) async fn tested_connection(
    pool: &MySqlPool,
) -> Result<PoolConnection<MySql>, sqlx::Error> {
    // Every idle connection, then a new one: bounded by the pool's size.
    let tries = pool.options().get_max_connections().saturating_add(1);
    let mut last = sqlx::Error::PoolTimedOut;
    for _ in 0..tries {
        let mut conn = pool.acquire().await?;
        match conn.ping().await {
            Ok(()) => return Ok(conn),
            Err(e) => {
                // Not back to the pool: it is dead, and the release would ping it again.
                conn.close_on_drop();
                last = e;
            }
        }
    }
    Err(last)
}

/// Runs a read (`$run`, with `$exec` bound to an executor) on the pool, and once more on a
/// tested connection when the first attempt lost its connection or was aborted by the
/// server ([`crate::error::read_may_retry`]). A read has no effect, so sending it twice
/// is harmless. Evaluates to the `Result` of the last attempt.
macro_rules! read_retrying {
    ($pool:expr, |$exec:ident| $run:expr) => {{
        let pool: &::sqlx::MySqlPool = $pool;
        let first = {
            let $exec = pool;
            $run.await
        };
        match first {
            Err(e) if $crate::error::read_may_retry(&e) => {
                ::tracing::info!(error = %e, "a read failed on a transient condition; retrying once on a tested connection");
                match $crate::retry::tested_connection(pool).await {
                    Ok(mut conn) => {
                        let $exec = &mut *conn;
                        $run.await
                    }
                    Err(again) => Err(again),
                }
            }
            other => other,
        }
    }};
}
