//! Contract suites of what refunds, cancellations and the balance at a time add to the
//! ports: the refund branch of the atomic step (`BalanceStore`), the refunds listing and
//! the guarded cancellation (`OrderRepo`), and `UserRepo::balance_at`.

use domain::model::{EntryKind, OrderStatus, Payment, PaymentStatus, User};
use domain::ports::StepError;

use super::Stores;
use super::support::{
    Watch, amount, apply_ok, at, balance, current, entry_of, full_history, funded_user, key,
    payment_step, refund_step,
};

/// A user funded with 1,000 who paid an order of 300: the user (balance 700) and the payment.
async fn paid(stores: &Stores) -> (User, Payment) {
    let user = funded_user(stores, 1_000, at(0)).await;
    let order = stores
        .orders
        .create_order(user.id, amount(300), at(1))
        .await
        .unwrap();
    let applied = stores
        .balances
        .apply(payment_step(&user, &order, "pay", at(2)))
        .await
        .unwrap();
    let payment = stores
        .orders
        .get_payment(applied.assigned.payment_id.unwrap())
        .await
        .unwrap()
        .unwrap();
    (current(stores.users.as_ref(), user.id).await, payment)
}

/// A refund writes the balance, a REFUND entry, the refund row and the payment's refunded
/// total together; the one that completes the payment makes its order REFUNDED.
pub async fn balance_store_refund_writes_everything_together(stores: &Stores) {
    let users = stores.users.as_ref();
    let (user, payment) = paid(stores).await;

    let first = stores
        .balances
        .apply(refund_step(&user, &payment, 100, 0, "refund-1", at(10)))
        .await
        .unwrap();
    let refund_id = first.assigned.refund_id.expect("a refund id for a refund");
    assert_eq!(first.assigned.payment_id, None);
    let after = current(users, user.id).await;
    assert_eq!(
        (after.balance.get(), after.version),
        (800, user.version + 1)
    );
    let ledger = full_history(users, user.id).await;
    assert_eq!(
        (
            ledger[0].id,
            ledger[0].kind,
            ledger[0].amount,
            ledger[0].balance_after,
            ledger[0].idempotency_key.clone(),
            ledger[0].created_at
        ),
        (
            entry_of(&first),
            EntryKind::Refund,
            amount(100),
            balance(800),
            Some(key("refund-1")),
            at(10)
        )
    );
    let shown = stores
        .orders
        .get_payment(payment.id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (shown.refunded_total, shown.status()),
        (100, PaymentStatus::PartiallyRefunded)
    );
    let order = stores
        .orders
        .get_order(payment.order_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(order.status, OrderStatus::Paid);

    let rest = stores
        .balances
        .apply(refund_step(&after, &shown, 200, 100, "refund-2", at(20)))
        .await
        .unwrap();
    let shown = stores
        .orders
        .get_payment(payment.id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (shown.refunded_total, shown.status()),
        (300, PaymentStatus::Refunded)
    );
    let order = stores
        .orders
        .get_order(payment.order_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(order.status, OrderStatus::Refunded);
    assert_eq!(current(users, user.id).await.balance.get(), 1_000);

    let listed = stores.orders.refunds(payment.id, 10).await.unwrap();
    let seen: Vec<_> = listed
        .iter()
        .map(|r| {
            (
                r.id,
                r.payment_id,
                r.order_id,
                r.user_id,
                r.amount.get(),
                r.balance_after.get(),
                r.refunded_total,
                r.payment_status,
                r.reason.as_ref().map(|reason| reason.as_str().to_owned()),
                r.created_at,
            )
        })
        .collect();
    let contract = Some("contract".to_owned());
    assert_eq!(
        seen,
        vec![
            (
                refund_id,
                payment.id,
                payment.order_id,
                user.id,
                100,
                800,
                100,
                PaymentStatus::PartiallyRefunded,
                contract.clone(),
                at(10)
            ),
            (
                rest.assigned.refund_id.unwrap(),
                payment.id,
                payment.order_id,
                user.id,
                200,
                1_000,
                300,
                PaymentStatus::Refunded,
                contract,
                at(20)
            ),
        ],
        "oldest first, each with the payment as it was right after it"
    );
    assert_eq!(stores.orders.refunds(payment.id, 1).await.unwrap().len(), 1);
}

/// A refund decided on a stale refunded total, past the payment's amount, or of another
/// user's payment is `PaymentChanged` and writes nothing.
pub async fn balance_store_refund_guarded_by_the_payment_writes_nothing(stores: &Stores) {
    let (user, payment) = paid(stores).await;
    let other = funded_user(stores, 50, at(3)).await;
    let watch = Watch {
        users: vec![user.id, other.id],
        keys: vec![(user.id, "stale"), (user.id, "past"), (other.id, "foreign")],
        orders: vec![payment.order_id],
    };
    let before = watch.snapshot(stores, at(30)).await;
    for (change, what) in [
        (
            refund_step(&user, &payment, 100, 50, "stale", at(30)),
            "a stale total",
        ),
        (
            refund_step(&user, &payment, 301, 0, "past", at(30)),
            "past the amount",
        ),
        (
            refund_step(&other, &payment, 10, 0, "foreign", at(30)),
            "another user's payment",
        ),
    ] {
        let result = stores.balances.apply(change).await;
        assert!(
            matches!(result, Err(StepError::PaymentChanged)),
            "{what}: {result:?}"
        );
    }
    assert_eq!(watch.snapshot(stores, at(30)).await, before);
    assert!(
        stores
            .orders
            .refunds(payment.id, 10)
            .await
            .unwrap()
            .is_empty()
    );
}

/// Only a PENDING order is cancelled; a cancelled one stays so, a paid one is left alone.
pub async fn order_repo_cancels_only_pending_orders(stores: &Stores) {
    let user = funded_user(stores, 1_000, at(0)).await;
    let order = stores
        .orders
        .create_order(user.id, amount(100), at(1))
        .await
        .unwrap();
    for _ in 0..2 {
        let cancelled = stores.orders.cancel_order(order.id).await.unwrap().unwrap();
        assert_eq!(
            (cancelled.id, cancelled.status, cancelled.amount),
            (order.id, OrderStatus::Cancelled, amount(100))
        );
    }
    let (_, payment) = paid(stores).await;
    let left = stores
        .orders
        .cancel_order(payment.order_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(left.status, OrderStatus::Paid);
    let missing = domain::types::OrderId::new(9_999).unwrap();
    assert_eq!(stores.orders.cancel_order(missing).await.unwrap(), None);
}

/// `balance_at` is the `balance_after` of the newest entry at or before the instant.
pub async fn user_repo_balance_at_reads_the_ledger(stores: &Stores) {
    let users = stores.users.as_ref();
    let user = funded_user(stores, 100, at(1_000)).await;
    apply_ok(stores, user.id, EntryKind::Charge, 50, "second", at(2_000)).await;
    apply_ok(stores, user.id, EntryKind::Use, 30, "third", at(2_000)).await;
    apply_ok(stores, user.id, EntryKind::Charge, 5, "fourth", at(3_000)).await;
    let seen: Vec<Option<i64>> = futures_at(
        users,
        user.id,
        &[999, 1_000, 1_999, 2_000, 2_999, 3_000, 9_000],
    )
    .await;
    // At 2,000 two entries share the instant: the later one (by id) counts.
    assert_eq!(
        seen,
        vec![
            None,
            Some(100),
            Some(100),
            Some(120),
            Some(120),
            Some(125),
            Some(125)
        ]
    );
    let stranger = domain::types::UserId::new(9_999).unwrap();
    assert_eq!(users.balance_at(stranger, at(9_000)).await.unwrap(), None);
}

async fn futures_at(
    users: &dyn domain::ports::UserRepo,
    id: domain::types::UserId,
    instants: &[i64],
) -> Vec<Option<i64>> {
    let mut seen = Vec::new();
    for ms in instants {
        let found = users.balance_at(id, at(*ms)).await.unwrap();
        seen.push(found.map(|b| b.get()));
    }
    seen
}
