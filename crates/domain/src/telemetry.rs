//! Metric names shared by the use cases and the adapters (Prometheus text on `/metrics`).

/// Seconds spent waiting for a user lock (histogram).
pub const LOCK_WAIT_SECONDS: &str = "balance_lock_wait_seconds";
/// Locks taken.
pub const LOCK_ACQUIRED_TOTAL: &str = "balance_lock_acquired_total";
/// Lock waits that ran out (`LOCK_TIMEOUT`).
pub const LOCK_TIMEOUTS_TOTAL: &str = "balance_lock_timeouts_total";
/// Releases that found the lease already gone (it expired while the holder worked).
pub const LOCK_LEASE_LOST_TOTAL: &str = "balance_lock_lease_lost_total";
/// Balance changes that ran under the database guard alone because the lock service was down.
pub const LOCK_DEGRADED_TOTAL: &str = "balance_lock_degraded_total";
/// Balance changes refused because the lock service was down and the policy is `fail`.
pub const LOCK_UNAVAILABLE_TOTAL: &str = "balance_lock_unavailable_total";
/// Writes refused by the version check (a lost optimistic race).
pub const OPTIMISTIC_CONFLICTS_TOTAL: &str = "balance_optimistic_conflicts_total";
/// Attempts re-run from a fresh read after a conflict.
pub const OPTIMISTIC_RETRIES_TOTAL: &str = "balance_optimistic_retries_total";
/// Balance changes run again after the store aborted their step before the commit.
pub const STEP_ABORTED_RETRIES_TOTAL: &str = "balance_step_aborted_retries_total";
/// Requests that ran out of optimistic retries.
pub const OPTIMISTIC_EXHAUSTED_TOTAL: &str = "balance_optimistic_exhausted_total";
/// Requests answered from a stored response.
pub const IDEMPOTENT_REPLAYS_TOTAL: &str = "balance_idempotent_replays_total";
/// Duplicates answered `IDEMPOTENCY_KEY_IN_USE`.
pub const IDEMPOTENCY_IN_USE_TOTAL: &str = "balance_idempotency_in_use_total";
/// Keys refused because they were used for another request.
pub const IDEMPOTENCY_REUSED_TOTAL: &str = "balance_idempotency_reused_total";
/// Balance changes committed, by operation.
pub const OPERATIONS_APPLIED_TOTAL: &str = "balance_operations_applied_total";
/// Business refusals stored, by operation.
pub const OPERATIONS_REFUSED_TOTAL: &str = "balance_operations_refused_total";
/// Expired idempotency records deleted by the purge.
pub const IDEMPOTENCY_PURGED_TOTAL: &str = "balance_idempotency_purged_total";
/// Breaches found by the last audit run (gauge), by check.
pub const AUDIT_BREACHES: &str = "balance_audit_breaches";
/// When the last audit finished (gauge, Unix seconds).
pub const AUDIT_LAST_RUN_SECONDS: &str = "balance_audit_last_run_timestamp_seconds";
/// Coupon issues the admission gate answered without the database, by answer.
pub const COUPON_GATE_ANSWERED_TOTAL: &str = "coupon_gate_answered_total";
/// Times the gate was rebuilt from the database (missing, or a unit pending too long).
pub const COUPON_GATE_REBUILDS_TOTAL: &str = "coupon_gate_rebuilds_total";
/// Issues the database refused after the gate let them through (the gate is then dropped).
pub const COUPON_GATE_DISAGREED_TOTAL: &str = "coupon_gate_disagreed_total";
/// Issues that ran under the database guard alone because the gate could not be asked.
pub const COUPON_GATE_BYPASSED_TOTAL: &str = "coupon_gate_bypassed_total";
/// Requests per group-commit transaction (histogram).
pub const BATCH_SIZE: &str = "balance_batch_size";
/// Group-commit transactions run (counter; its rate is batches per second).
pub const BATCHES_TOTAL: &str = "balance_batches_total";
/// Seconds a request waited in the queue before its batch began (histogram).
pub const BATCH_QUEUED_SECONDS: &str = "balance_batch_queued_seconds";
/// Batches whose transaction failed and whose requests were then run one by one (counter).
pub const BATCH_FALLBACKS_TOTAL: &str = "balance_batch_fallbacks_total";
