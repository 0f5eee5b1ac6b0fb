//! The statements of a charge and of a coupon issue, as text: used by the adapter and by
//! the database baseline (`crates/bench`), so the baseline measures exactly what the
//! service sends.
//!
//! A charge is [`FIND_KEY`] (no lock), then under the user lock [`SELECT_USER`], then one
//! transaction: [`UPDATE_BALANCE`] (when it matches nothing, [`USER_EXISTS`] tells a
//! missing user from a version conflict), [`INSERT_LEDGER_ENTRY`], [`INSERT_KEY_RECORD`],
//! COMMIT.
//!
//! An issue's transaction is [`BUMP_VERSION`], [`INSERT_USER_COUPON`],
//! [`INSERT_KEY_RECORD`], [`COUNT_ISSUED`], COMMIT.

/// The fresh read of a user before a change (`UserRepo::get_user`).
pub const SELECT_USER: &str = "select balance, version, created_at from users where id = ?";

/// The optimistic guard: only the version that was read may be replaced. Binds: balance,
/// updated_at, id, version.
pub const UPDATE_BALANCE: &str = "update users set balance = ?, version = version + 1, updated_at = ? \
     where id = ? and version = ?";

/// After [`UPDATE_BALANCE`] matched nothing: is the user there at all?
pub const USER_EXISTS: &str = "select id from users where id = ?";

/// The ledger entry of a change, with the expiry of the key's record written with it (for
/// the audit). Binds: user_id, kind, amount, balance_after, idempotency_key, created_at,
/// key_expires_at.
pub const INSERT_LEDGER_ENTRY: &str = "insert into ledger_entries \
     (user_id, kind, amount, balance_after, idempotency_key, created_at, key_expires_at) \
     values (?, ?, ?, ?, ?, ?, ?)";

/// The key's completed record, in the same transaction as the change. Binds: user_id,
/// idempotency_key, fingerprint, operation, outcome, response_status, response_body,
/// created_at, expires_at. (`status` is still written for instances of the version before
/// migration 0007, which filter on it during a rolling upgrade.)
pub const INSERT_KEY_RECORD: &str = "insert into idempotency_records \
     (user_id, idempotency_key, fingerprint, operation, outcome, status, response_status, \
      response_body, created_at, expires_at) \
     values (?, ?, ?, ?, ?, 'COMPLETED', ?, ?, ?, ?)";

/// A live completed record of a key (`IdempotencyRepo::find`), read before the lock.
/// Binds: user_id, idempotency_key, now.
pub const FIND_KEY: &str = "select fingerprint, operation, outcome, response_status, response_body, \
     created_at, expires_at \
     from idempotency_records \
     where user_id = ? and idempotency_key = ? and status = 'COMPLETED' \
     and expires_at > ?";

/// The guard of a step that leaves the balance as it is (issuing a coupon): the version
/// still moves on, so every write in the user's key space is ordered by it. Binds:
/// updated_at, id, version.
pub const BUMP_VERSION: &str = "update users set version = version + 1, updated_at = ? \
     where id = ? and version = ?";

/// A coupon issued to a user. Binds: coupon_id, user_id, discount, issued_at, expires_at,
/// idempotency_key.
pub const INSERT_USER_COUPON: &str = "insert into user_coupons \
     (coupon_id, user_id, discount, issued_at, expires_at, idempotency_key) \
     values (?, ?, ?, ?, ?, ?)";

/// The issued count up by one, only below the stock: the last statement of an issue, so
/// the row lock every issue of the coupon queues on is held only until the commit. Binds:
/// id.
pub const COUNT_ISSUED: &str = "update coupons set issued_quantity = issued_quantity + 1 \
     where id = ? and issued_quantity < total_quantity";
