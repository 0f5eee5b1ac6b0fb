//! Port contract suites: what every adapter of a port must do, written once and run against
//! the in-memory adapters and the real ones alike (`tests/contracts.rs`).
//!
//! Each suite is a public async function that takes the adapter under test and panics
//! (through `assert!`) when the adapter breaks the contract its port documents in
//! `domain::ports`:
//!
//! - [`UserRepo`](domain::ports::UserRepo): [`user_repo_creates_and_reads`],
//!   [`user_repo_pages_history_newest_first`], [`user_repo_seeds_idempotently`],
//!   [`user_repo_seeding_skips_created_users`],
//!   [`user_repo_seeding_a_zero_balance_writes_no_entries`];
//! - [`OrderRepo`](domain::ports::OrderRepo): [`order_repo_creates_and_reads`];
//! - [`CouponRepo`](domain::ports::CouponRepo): [`coupon_repo_creates_and_reads`], and the
//!   coupon branches of the atomic step (`contract/coupons.rs`):
//!   [`balance_store_issue_writes_the_user_coupon`],
//!   [`balance_store_issue_to_a_holder_is_coupon_changed`],
//!   [`balance_store_issue_past_the_stock_is_coupon_changed`],
//!   [`balance_store_concurrent_issues_never_pass_the_stock`],
//!   [`balance_store_pay_with_a_coupon_uses_it_once`],
//!   [`balance_store_pay_with_a_foreign_or_expired_coupon_is_coupon_changed`],
//!   [`balance_store_pay_with_a_coupon_covering_the_order_pays_nothing`],
//!   [`balance_store_refund_in_full_frees_the_coupon`];
//! - [`IdempotencyRepo`](domain::ports::IdempotencyRepo):
//!   [`idempotency_repo_finds_only_live_records_of_their_user`],
//!   [`idempotency_repo_purges_only_expired_records`],
//!   [`idempotency_repo_purges_the_oldest_expired_first`];
//! - [`BalanceStore`](domain::ports::BalanceStore), the atomic step:
//!   [`balance_store_apply_writes_everything_together`],
//!   [`balance_store_payment_pays_the_order_once`],
//!   [`balance_store_stale_version_writes_nothing`],
//!   [`balance_store_live_key_writes_nothing`],
//!   [`balance_store_unknown_user_writes_nothing`],
//!   [`balance_store_unpayable_order_writes_nothing`],
//!   [`balance_store_replaces_an_expired_record`],
//!   [`balance_store_a_replaced_record_lives_by_its_own_expiry`],
//!   [`balance_store_checks_the_user_then_the_version_then_the_key`],
//!   [`balance_store_records_refusals_under_the_guards`],
//!   [`balance_store_records_say_what_happened`],
//!   [`balance_store_concurrent_applies_on_one_version_let_exactly_one_win`],
//!   [`balance_store_concurrent_applies_of_different_users_all_succeed`];
//! - [`Auditor`](domain::ports::Auditor), over books written through the ports and then
//!   corrupted through [`Corrupt`] (`contract/auditor.rs` lists them: clean books, one
//!   corruption per breach, the cap, concurrent writes, retention, and the same for
//!   coupons: [`write_coupon_books`] and the `auditor_finds_*coupon*` suites);
//! - [`LockManager`](domain::ports::LockManager): [`lock_is_exclusive`],
//!   [`lock_waiter_acquires_soon_after_release`],
//!   [`lock_lease_expiry_frees_the_key_but_not_for_the_old_holder`],
//!   [`lock_release_is_owner_only`], [`lock_serializes_concurrent_increments`],
//!   [`lock_an_expired_lease_is_taken_without_waiting`],
//!   [`lock_times_out_soon_after_its_wait`].
//!
//! Every store suite expects a new, empty store (the suites that seed rely on it), and
//! uses fixed instants at millisecond precision, the precision the ports keep. The lock
//! suites use short real durations (a contract must hold on Redis, whose clock cannot be
//! paused) and assert outcomes, with only generous upper bounds on how long things take.

// Test support: a broken contract is a failed test, and a panic is how it fails. Clippy's
// allow-in-tests settings do not reach a library module, hence this.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod auditor;
mod balance_store;
mod corrupt;
mod coupons;
mod idempotency_repo;
mod lock_manager;
mod order_repo;
mod refunds;
mod support;
mod user_repo;

/// The `CouponGate` suites, by their path: `contract::coupon_gate::coupon_gate_…`.
pub mod coupon_gate;

use std::sync::Arc;

use domain::ports::{BalanceStore, CouponRepo, IdempotencyRepo, OrderRepo, UserRepo};

pub use auditor::{
    AUDIT_LEASE, AUDIT_TTL, AuditBooks, Audited, CouponBooks, assert_finds,
    auditor_accepts_two_payments_of_one_amount_in_one_millisecond, auditor_changes_nothing,
    auditor_finds_a_bumped_balance, auditor_finds_a_coupon_issue_turned_refusal,
    auditor_finds_a_coupon_issue_with_a_ledger_entry,
    auditor_finds_a_coupon_used_by_a_payment_not_its_own, auditor_finds_a_deleted_ledger_entry,
    auditor_finds_a_deleted_payment, auditor_finds_a_deleted_payment_with_a_coupon,
    auditor_finds_a_deleted_user_coupon, auditor_finds_a_key_applied_twice_within_its_retention,
    auditor_finds_a_newest_entry_that_disagrees_with_the_balance,
    auditor_finds_a_paid_order_without_a_payment,
    auditor_finds_a_payment_of_an_order_that_is_not_paid,
    auditor_finds_a_payment_without_its_ledger_entry,
    auditor_finds_a_refunded_payment_whose_order_is_still_paid,
    auditor_finds_a_refunded_total_its_refunds_do_not_add_up_to,
    auditor_finds_a_refusal_turned_success, auditor_finds_a_refusal_with_an_effect,
    auditor_finds_a_refused_coupon_issue_with_a_coupon,
    auditor_finds_a_second_entry_of_one_key_at_one_instant, auditor_finds_a_used_coupon_set_free,
    auditor_finds_an_empty_store_clean, auditor_finds_an_issued_count_off_its_user_coupons,
    auditor_finds_books_written_through_the_ports_clean, auditor_finds_coupon_books_clean,
    auditor_finds_ledger_entries_of_a_missing_user, auditor_finds_refunded_books_clean,
    auditor_goes_by_the_recorded_outcome_not_the_status,
    auditor_judges_a_reuse_by_its_records_expiry, auditor_lists_up_to_the_cap_and_counts_in_full,
    auditor_sees_no_false_breach_during_concurrent_writes,
    balance_store_refuses_to_complete_a_refund_of_an_order_not_paid, breaches, sec,
    write_audit_books, write_coupon_books,
};
pub use balance_store::{
    balance_store_a_replaced_record_lives_by_its_own_expiry,
    balance_store_apply_writes_everything_together,
    balance_store_checks_the_user_then_the_version_then_the_key,
    balance_store_concurrent_applies_of_different_users_all_succeed,
    balance_store_concurrent_applies_on_one_version_let_exactly_one_win,
    balance_store_live_key_writes_nothing, balance_store_payment_pays_the_order_once,
    balance_store_records_refusals_under_the_guards, balance_store_records_say_what_happened,
    balance_store_replaces_an_expired_record, balance_store_stale_version_writes_nothing,
    balance_store_unknown_user_writes_nothing, balance_store_unpayable_order_writes_nothing,
};
pub use corrupt::{Corrupt, ForgedEntry, ForgedUserCoupon};
pub use coupons::{
    balance_store_concurrent_issues_never_pass_the_stock,
    balance_store_issue_past_the_stock_is_coupon_changed,
    balance_store_issue_to_a_holder_is_coupon_changed, balance_store_issue_writes_the_user_coupon,
    balance_store_pay_with_a_coupon_covering_the_order_pays_nothing,
    balance_store_pay_with_a_coupon_uses_it_once,
    balance_store_pay_with_a_foreign_or_expired_coupon_is_coupon_changed,
    balance_store_refund_in_full_frees_the_coupon, coupon_repo_creates_and_reads,
};
pub use idempotency_repo::{
    idempotency_repo_finds_only_live_records_of_their_user,
    idempotency_repo_inserts_a_refusal_only_where_the_key_is_free,
    idempotency_repo_purges_only_expired_records, idempotency_repo_purges_the_oldest_expired_first,
};
pub use lock_manager::{
    lock_an_expired_lease_is_taken_without_waiting, lock_is_exclusive,
    lock_lease_expiry_frees_the_key_but_not_for_the_old_holder, lock_release_is_owner_only,
    lock_serializes_concurrent_increments, lock_times_out_soon_after_its_wait,
    lock_waiter_acquires_soon_after_release,
};
pub use order_repo::order_repo_creates_and_reads;
pub use refunds::{
    balance_store_refund_guarded_by_the_payment_writes_nothing,
    balance_store_refund_writes_everything_together, order_repo_cancels_only_pending_orders,
    user_repo_balance_at_reads_the_ledger,
};
pub use user_repo::{
    user_repo_creates_and_reads, user_repo_pages_history_newest_first,
    user_repo_seeding_a_zero_balance_writes_no_entries, user_repo_seeding_skips_created_users,
    user_repo_seeds_idempotently,
};

/// One store seen through each of its repository ports, as the service wires it. The
/// ports are `'static` trait objects so the concurrent suites can hand them to tasks.
#[derive(Clone)]
pub struct Stores {
    pub users: Arc<dyn UserRepo>,
    pub orders: Arc<dyn OrderRepo>,
    pub coupons: Arc<dyn CouponRepo>,
    pub idempotency: Arc<dyn IdempotencyRepo>,
    pub balances: Arc<dyn BalanceStore>,
}

impl Stores {
    /// Every port of `store`, all sharing the one store.
    pub fn new<S>(store: S) -> Self
    where
        S: UserRepo + OrderRepo + CouponRepo + IdempotencyRepo + BalanceStore + 'static,
    {
        let store = Arc::new(store);
        Self {
            users: Arc::clone(&store) as Arc<dyn UserRepo>,
            orders: Arc::clone(&store) as Arc<dyn OrderRepo>,
            coupons: Arc::clone(&store) as Arc<dyn CouponRepo>,
            idempotency: Arc::clone(&store) as Arc<dyn IdempotencyRepo>,
            balances: store,
        }
    }
}

impl std::fmt::Debug for Stores {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stores").finish_non_exhaustive()
    }
}
