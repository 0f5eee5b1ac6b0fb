//! The `BalanceStore` contract: the atomic step. A step writes the users row (balance and
//! version + 1), its ledger entry, the key's completed record and, for a payment, the
//! order's PAID status and its payment, all together; a refused step writes none of them.

use std::sync::{Arc, Mutex};

use domain::idempotency::{CompletedRecord, Fingerprint, RecordOutcome, StoredResponse};
use domain::model::{EntryKind, LedgerEntry, OrderStatus, Payment, User};
use domain::operations::OperationKind;
use domain::ports::{Applied, Assigned, KeyRecord, RefusalRecord, StepError};
use domain::types::OrderId;
use tokio::sync::Barrier;

use super::Stores;
use super::support::{
    DAY_MS, Watch, amount, apply_ok, at, balance, bounded, current, entry_of, full_history,
    funded_user, key, key_record, ledger_sum, naming_ids, order_id, payment_step, payments, step,
    t0, user_id,
};

/// The order's status as stored, `None` when there is no such order.
async fn order_status(stores: &Stores, id: OrderId) -> Option<OrderStatus> {
    stores
        .orders
        .get_order(id)
        .await
        .unwrap()
        .map(|order| order.status)
}

/// `apply` writes the new balance with version + 1, one ledger entry and the key's
/// completed record, and answers the ids it assigned together with the response its
/// `respond` closure built from those same ids.
pub async fn balance_store_apply_writes_everything_together(stores: &Stores) {
    let users = stores.users.as_ref();
    let user = users.create_user(t0()).await.unwrap();

    // The closure sees the ids before the step is committed; they must be the ones answered.
    let seen: Arc<Mutex<Option<Assigned>>> = Arc::default();
    let mut change = step(&user, EntryKind::Charge, 1_000, "c1", at(1_000));
    change.respond = {
        let seen = Arc::clone(&seen);
        Box::new(move |assigned: &Assigned| {
            *seen.lock().unwrap() = Some(assigned.clone());
            naming_ids(assigned)
        })
    };
    let applied = stores.balances.apply(change).await.unwrap();
    assert_eq!(
        seen.lock().unwrap().as_ref(),
        Some(&applied.assigned),
        "respond got the ids"
    );
    assert_eq!(applied.assigned.payment_id, None, "a charge pays nothing");
    assert_eq!(applied.response, naming_ids(&applied.assigned));

    let after = current(users, user.id).await;
    assert_eq!(
        after,
        User {
            balance: balance(1_000),
            version: 1,
            ..user.clone()
        }
    );
    let charge = LedgerEntry {
        id: entry_of(&applied),
        user_id: user.id,
        kind: EntryKind::Charge,
        amount: amount(1_000),
        balance_after: balance(1_000),
        idempotency_key: Some(key("c1")),
        created_at: at(1_000),
    };
    assert_eq!(full_history(users, user.id).await, vec![charge.clone()]);
    let record = stores
        .idempotency
        .find(user.id, &key("c1"), at(1_000))
        .await
        .unwrap();
    assert_eq!(
        record,
        Some(CompletedRecord {
            user_id: user.id,
            key: key("c1"),
            fingerprint: Fingerprint::from_stored(format!("CHARGE:user={}:amount=1000", user.id)),
            operation: OperationKind::Charge,
            outcome: RecordOutcome::Applied,
            response: applied.response.clone(),
            created_at: at(1_000),
            expires_at: at(1_000 + DAY_MS),
        })
    );

    // A use on top, from the version the charge produced.
    let used = stores
        .balances
        .apply(step(&after, EntryKind::Use, 400, "u1", at(2_000)))
        .await
        .unwrap();
    assert!(entry_of(&used) > charge.id, "entry ids increase");
    assert_eq!(used.response, naming_ids(&used.assigned));
    let after_use = current(users, user.id).await;
    assert_eq!((after_use.balance.get(), after_use.version), (600, 2));
    let ledger = full_history(users, user.id).await;
    assert_eq!(ledger.len(), 2);
    assert_eq!(
        (
            ledger[0].id,
            ledger[0].kind,
            ledger[0].amount.get(),
            ledger[0].balance_after.get()
        ),
        (entry_of(&used), EntryKind::Use, 400, 600)
    );
    assert_eq!(ledger_sum(&ledger), after_use.balance.get());
    let record = stores
        .idempotency
        .find(user.id, &key("u1"), at(2_000))
        .await
        .unwrap();
    assert_eq!(record.map(|r| r.response), Some(used.response));

    // The same key for another user is another key.
    let other = users.create_user(t0()).await.unwrap();
    let theirs = apply_ok(stores, other.id, EntryKind::Charge, 5, "c1", at(3_000)).await;
    let found = stores
        .idempotency
        .find(other.id, &key("c1"), at(3_000))
        .await
        .unwrap();
    assert_eq!(found.map(|r| r.response), Some(theirs.response));
    let mine = stores
        .idempotency
        .find(user.id, &key("c1"), at(3_000))
        .await
        .unwrap();
    assert_eq!(mine.map(|r| r.response), Some(applied.response));
}

/// A payment step marks the order PAID and writes exactly one payment, which `get_payment`
/// answers with the balance right after it; the ledger entry is a PAYMENT. Paying the
/// order again is `OrderNotPending` and writes nothing.
pub async fn balance_store_payment_pays_the_order_once(stores: &Stores) {
    let users = stores.users.as_ref();
    let user = funded_user(stores, 1_000, at(0)).await;
    let order = stores
        .orders
        .create_order(user.id, amount(300), at(1))
        .await
        .unwrap();
    assert!(
        payments(stores).await.iter().all(Option::is_none),
        "no payment yet"
    );

    let applied = stores
        .balances
        .apply(payment_step(&user, &order, "pay-1", at(2_000)))
        .await
        .unwrap();
    let payment_id = applied
        .assigned
        .payment_id
        .expect("a payment id for a payment");
    assert_eq!(
        applied.response,
        naming_ids(&applied.assigned),
        "respond got both ids"
    );

    let paid = stores.orders.get_order(order.id).await.unwrap().unwrap();
    assert_eq!(paid.status, OrderStatus::Paid);
    assert_eq!(
        (paid.id, paid.user_id, paid.amount, paid.created_at),
        (order.id, order.user_id, order.amount, order.created_at)
    );
    let payment = stores.orders.get_payment(payment_id).await.unwrap();
    assert_eq!(
        payment,
        Some(Payment {
            id: payment_id,
            order_id: order.id,
            user_id: user.id,
            amount: amount(300),
            balance_after: balance(700),
            paid_at: at(2_000),
            refunded_total: 0,
            coupon: None,
        })
    );
    let after = current(users, user.id).await;
    assert_eq!((after.balance.get(), after.version), (700, 2));
    let ledger = full_history(users, user.id).await;
    assert_eq!(
        ledger[0],
        LedgerEntry {
            id: entry_of(&applied),
            user_id: user.id,
            kind: EntryKind::Payment,
            amount: amount(300),
            balance_after: balance(700),
            idempotency_key: Some(key("pay-1")),
            created_at: at(2_000),
        }
    );
    assert_eq!(ledger_sum(&ledger), 700);
    let record = stores
        .idempotency
        .find(user.id, &key("pay-1"), at(2_000))
        .await
        .unwrap();
    assert_eq!(record.map(|r| r.response), Some(applied.response));

    // Again, under a fresh key and the current version: refused, and nothing moves.
    let watch = Watch {
        users: vec![user.id],
        keys: vec![(user.id, "pay-2"), (user.id, "pay-1")],
        orders: vec![order.id],
    };
    let before = watch.snapshot(stores, at(3_000)).await;
    let again = stores
        .balances
        .apply(payment_step(&after, &order, "pay-2", at(3_000)))
        .await;
    assert!(
        matches!(again, Err(StepError::OrderNotPending)),
        "{again:?}"
    );
    assert_eq!(watch.snapshot(stores, at(3_000)).await, before);
    let all = payments(stores).await;
    let ids: Vec<_> = all.iter().flatten().map(|p| p.id).collect();
    assert_eq!(ids, vec![payment_id], "exactly one payment");
}

/// A step whose expected version is not the stored one (stale or ahead) is
/// `VersionConflict` and writes nothing: no balance, entry, record, order or payment.
pub async fn balance_store_stale_version_writes_nothing(stores: &Stores) {
    let user = funded_user(stores, 1_000, at(0)).await; // version 1
    let order = stores
        .orders
        .create_order(user.id, amount(100), at(1))
        .await
        .unwrap();
    let watch = Watch {
        users: vec![user.id],
        keys: vec![(user.id, "fund"), (user.id, "late")],
        orders: vec![order.id],
    };
    let before = watch.snapshot(stores, at(10)).await;

    for version in [0, 2, 7] {
        let mut charge = step(&user, EntryKind::Charge, 10, "late", at(10));
        charge.expected_version = version;
        let refused = stores.balances.apply(charge).await;
        assert!(
            matches!(refused, Err(StepError::VersionConflict)),
            "version {version}: {refused:?}"
        );

        let mut payment = payment_step(&user, &order, "late", at(10));
        payment.expected_version = version;
        let refused = stores.balances.apply(payment).await;
        assert!(
            matches!(refused, Err(StepError::VersionConflict)),
            "version {version}: {refused:?}"
        );

        assert_eq!(
            watch.snapshot(stores, at(10)).await,
            before,
            "version {version}"
        );
    }

    // The right version still goes through afterwards.
    apply_ok(stores, user.id, EntryKind::Charge, 10, "late", at(20)).await;
    assert_eq!(current(stores.users.as_ref(), user.id).await.version, 2);
}

/// A step under a key that has a live record for this user is `KeyTaken` and writes
/// nothing; the record stays the first request's.
pub async fn balance_store_live_key_writes_nothing(stores: &Stores) {
    let user = funded_user(stores, 1_000, at(0)).await;
    let used = apply_ok(stores, user.id, EntryKind::Use, 100, "k", at(1_000)).await;
    let user = current(stores.users.as_ref(), user.id).await;
    let order = stores
        .orders
        .create_order(user.id, amount(100), at(1_500))
        .await
        .unwrap();
    let watch = Watch {
        users: vec![user.id],
        keys: vec![(user.id, "k"), (user.id, "fund")],
        orders: vec![order.id],
    };
    let before = watch.snapshot(stores, at(2_000)).await;

    // Still live a moment before it expires, whatever the new request is.
    let late = at(1_000 + DAY_MS - 1);
    let attempts = [
        step(&user, EntryKind::Use, 100, "k", at(2_000)),
        step(&user, EntryKind::Charge, 50, "k", late),
        step(&user, EntryKind::Charge, 50, "fund", at(2_000)),
        payment_step(&user, &order, "k", at(2_000)),
    ];
    for change in attempts {
        let what = format!("{change:?}");
        let refused = stores.balances.apply(change).await;
        assert!(
            matches!(refused, Err(StepError::KeyTaken)),
            "{what}: {refused:?}"
        );
        assert_eq!(watch.snapshot(stores, at(2_000)).await, before, "{what}");
    }
    let record = stores
        .idempotency
        .find(user.id, &key("k"), at(2_000))
        .await
        .unwrap();
    assert_eq!(record.map(|r| r.response), Some(used.response));
}

/// A step or a refusal for a user that does not exist is `UserNotFound` and writes
/// nothing, for that id or anyone else.
pub async fn balance_store_unknown_user_writes_nothing(stores: &Stores) {
    let known = funded_user(stores, 1_000, at(0)).await;
    let order = stores
        .orders
        .create_order(known.id, amount(100), at(1))
        .await
        .unwrap();
    let nobody = user_id(known.id.get() + 1_000);
    let watch = Watch {
        users: vec![known.id, nobody],
        keys: vec![(nobody, "n"), (known.id, "n"), (known.id, "fund")],
        orders: vec![order.id],
    };
    let before = watch.snapshot(stores, at(10)).await;
    let ghost = User {
        id: nobody,
        balance: balance(0),
        version: 0,
        created_at: t0(),
    };

    let charged = stores
        .balances
        .apply(step(&ghost, EntryKind::Charge, 10, "n", at(10)))
        .await;
    assert!(
        matches!(charged, Err(StepError::UserNotFound)),
        "{charged:?}"
    );
    let paid = stores
        .balances
        .apply(payment_step(
            &User {
                balance: balance(1_000),
                ..ghost.clone()
            },
            &order,
            "n",
            at(10),
        ))
        .await;
    assert!(matches!(paid, Err(StepError::UserNotFound)), "{paid:?}");
    let refused = stores
        .balances
        .record_refusal(RefusalRecord {
            user_id: nobody,
            expected_version: 0,
            key: key_record("n", "refused", at(10), 60_000),
            response: StoredResponse {
                status: 422,
                body: b"no".to_vec(),
            },
        })
        .await;
    assert!(
        matches!(refused, Err(StepError::UserNotFound)),
        "{refused:?}"
    );

    assert_eq!(watch.snapshot(stores, at(10)).await, before);
    assert_eq!(
        stores.users.get_user(nobody).await.unwrap(),
        None,
        "no user was made up"
    );
}

/// A payment of an order that is not this user's PENDING order (already paid, another
/// user's, or no order at all) is `OrderNotPending` and writes nothing.
pub async fn balance_store_unpayable_order_writes_nothing(stores: &Stores) {
    let me = funded_user(stores, 1_000, at(0)).await;
    let other = funded_user(stores, 1_000, at(0)).await;
    let paid = stores
        .orders
        .create_order(me.id, amount(100), at(1))
        .await
        .unwrap();
    stores
        .balances
        .apply(payment_step(&me, &paid, "first-payment", at(2)))
        .await
        .unwrap();
    let me = current(stores.users.as_ref(), me.id).await;
    let theirs = stores
        .orders
        .create_order(other.id, amount(100), at(3))
        .await
        .unwrap();
    let missing = {
        let mut order = theirs.clone();
        order.id = order_id(theirs.id.get() + 1_000);
        order.user_id = me.id;
        order
    };

    let watch = Watch {
        users: vec![me.id, other.id],
        keys: vec![
            (me.id, "again"),
            (me.id, "theirs"),
            (me.id, "missing"),
            (other.id, "fund"),
        ],
        orders: vec![paid.id, theirs.id, missing.id],
    };
    let before = watch.snapshot(stores, at(10)).await;
    assert_eq!(order_status(stores, paid.id).await, Some(OrderStatus::Paid));

    for (order, raw) in [(&paid, "again"), (&theirs, "theirs"), (&missing, "missing")] {
        let refused = stores
            .balances
            .apply(payment_step(&me, order, raw, at(10)))
            .await;
        assert!(
            matches!(refused, Err(StepError::OrderNotPending)),
            "paying order {} ({raw}): {refused:?}",
            order.id
        );
        assert_eq!(watch.snapshot(stores, at(10)).await, before, "after {raw}");
    }
    assert_eq!(
        order_status(stores, theirs.id).await,
        Some(OrderStatus::Pending)
    );
}

/// A completed record that has expired (at or before the new step's instant) no longer
/// holds its key: a step or a refusal under that key replaces it.
pub async fn balance_store_replaces_an_expired_record(stores: &Stores) {
    let users = stores.users.as_ref();
    let user = users.create_user(t0()).await.unwrap();

    let mut first = step(&user, EntryKind::Charge, 100, "k", at(0));
    first.key = key_record("k", "first", at(0), 10_000);
    stores.balances.apply(first).await.unwrap();
    let user = current(users, user.id).await;

    let mut early = step(&user, EntryKind::Charge, 50, "k", at(9_999));
    early.key = key_record("k", "second", at(9_999), 10_000);
    let refused = stores.balances.apply(early).await;
    assert!(
        matches!(refused, Err(StepError::KeyTaken)),
        "still live: {refused:?}"
    );

    // Exactly at its expiry the record is dead and the key free.
    let mut second = step(&user, EntryKind::Charge, 50, "k", at(10_000));
    second.key = key_record("k", "second", at(10_000), 10_000);
    let applied = stores.balances.apply(second).await.unwrap();
    let found = stores
        .idempotency
        .find(user.id, &key("k"), at(10_000))
        .await
        .unwrap();
    assert_eq!(
        found,
        Some(CompletedRecord {
            user_id: user.id,
            key: key("k"),
            fingerprint: Fingerprint::from_stored("second"),
            operation: OperationKind::Charge,
            outcome: RecordOutcome::Applied,
            response: applied.response,
            created_at: at(10_000),
            expires_at: at(20_000),
        })
    );
    let after = current(users, user.id).await;
    assert_eq!((after.balance.get(), after.version), (150, 2));
    let ledger = full_history(users, user.id).await;
    assert_eq!(ledger.len(), 2, "both steps stay in the ledger");
    assert!(
        ledger
            .iter()
            .all(|entry| entry.idempotency_key == Some(key("k")))
    );

    // A refusal replaces an expired record the same way.
    let refusal = |created: i64, body: &[u8]| RefusalRecord {
        user_id: user.id,
        expected_version: 2,
        key: key_record("r", &format!("refusal@{created}"), at(created), 1_000),
        response: StoredResponse {
            status: 422,
            body: body.to_vec(),
        },
    };
    stores
        .balances
        .record_refusal(refusal(30_000, b"one"))
        .await
        .unwrap();
    let taken = stores
        .balances
        .record_refusal(refusal(30_999, b"two"))
        .await;
    assert!(matches!(taken, Err(StepError::KeyTaken)), "{taken:?}");
    stores
        .balances
        .record_refusal(refusal(31_000, b"two"))
        .await
        .unwrap();
    let found = stores
        .idempotency
        .find(user.id, &key("r"), at(31_000))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (found.fingerprint.as_str(), found.response.body.as_slice()),
        ("refusal@31000", &b"two"[..])
    );
    // And a step replaces an expired refusal.
    let mut over = step(&after, EntryKind::Use, 10, "r", at(32_000));
    over.key = key_record("r", "use", at(32_000), 10_000);
    let applied = stores.balances.apply(over).await.unwrap();
    let found = stores
        .idempotency
        .find(user.id, &key("r"), at(32_000))
        .await
        .unwrap();
    assert_eq!(found.map(|r| r.response), Some(applied.response));
}

/// `record_refusal` stores the refusal's response under its key without touching the
/// balance, the version or the ledger; it is refused with `VersionConflict` when the
/// version moved since the refusal was decided and with `KeyTaken` when the key has a
/// live record, and then stores nothing. A stored refusal holds its key against steps.
pub async fn balance_store_records_refusals_under_the_guards(stores: &Stores) {
    let user = funded_user(stores, 1_000, at(0)).await; // version 1, key "fund"
    let refusal = |raw: &str, version: u64, body: &[u8]| RefusalRecord {
        user_id: user.id,
        expected_version: version,
        key: KeyRecord {
            operation: OperationKind::Use,
            ..key_record(raw, "use:too-much", at(5_000), 60_000)
        },
        response: StoredResponse {
            status: 422,
            body: body.to_vec(),
        },
    };
    let watch = Watch {
        users: vec![user.id],
        keys: vec![(user.id, "fund")],
        orders: vec![],
    };
    let untouched = watch.snapshot(stores, at(5_000)).await;

    let body: &[u8] = b"{\"code\":\"INSUFFICIENT_BALANCE\"}\x00\xff";
    stores
        .balances
        .record_refusal(refusal("r1", 1, body))
        .await
        .unwrap();
    assert_eq!(
        watch.snapshot(stores, at(5_000)).await,
        untouched,
        "no balance change"
    );
    let stored = stores
        .idempotency
        .find(user.id, &key("r1"), at(5_000))
        .await
        .unwrap();
    assert_eq!(
        stored,
        Some(CompletedRecord {
            user_id: user.id,
            key: key("r1"),
            fingerprint: Fingerprint::from_stored("use:too-much"),
            operation: OperationKind::Use,
            outcome: RecordOutcome::Refused,
            response: StoredResponse {
                status: 422,
                body: body.to_vec(),
            },
            created_at: at(5_000),
            expires_at: at(65_000),
        })
    );

    let watch = Watch {
        users: vec![user.id],
        keys: vec![(user.id, "fund"), (user.id, "r1"), (user.id, "r2")],
        orders: vec![],
    };
    let before = watch.snapshot(stores, at(5_000)).await;
    for version in [0, 2] {
        let stale = stores
            .balances
            .record_refusal(refusal("r2", version, b"stale"))
            .await;
        assert!(
            matches!(stale, Err(StepError::VersionConflict)),
            "version {version}: {stale:?}"
        );
    }
    for raw in ["r1", "fund"] {
        let taken = stores
            .balances
            .record_refusal(refusal(raw, 1, b"again"))
            .await;
        assert!(
            matches!(taken, Err(StepError::KeyTaken)),
            "{raw}: {taken:?}"
        );
    }
    assert_eq!(watch.snapshot(stores, at(5_000)).await, before);

    // The refusal's record holds its key against a step too.
    let user = current(stores.users.as_ref(), user.id).await;
    let step_on_it = stores
        .balances
        .apply(step(&user, EntryKind::Use, 10, "r1", at(6_000)))
        .await;
    assert!(
        matches!(step_on_it, Err(StepError::KeyTaken)),
        "{step_on_it:?}"
    );
    assert_eq!(watch.snapshot(stores, at(5_000)).await, before);
}

/// Steps racing on one version (as from several instances without the lock): exactly one
/// is applied and every other one is `VersionConflict`, writing nothing.
pub async fn balance_store_concurrent_applies_on_one_version_let_exactly_one_win(stores: &Stores) {
    const RACERS: usize = 8;
    let user = funded_user(stores, 1_000, at(0)).await;
    let order = stores
        .orders
        .create_order(user.id, amount(100), at(1))
        .await
        .unwrap();
    let start = Arc::new(Barrier::new(RACERS));
    let mut racers = Vec::new();
    for i in 0..RACERS {
        let (stores, start, user, order) = (
            stores.clone(),
            Arc::clone(&start),
            user.clone(),
            order.clone(),
        );
        racers.push(tokio::spawn(async move {
            let raw = format!("race-{i}");
            // Charges, uses and payments of the one order, all on the same read.
            let change = match i % 3 {
                0 => step(&user, EntryKind::Charge, 10 + i as i64, &raw, at(10)),
                1 => step(&user, EntryKind::Use, 10 + i as i64, &raw, at(10)),
                _ => payment_step(&user, &order, &raw, at(10)),
            };
            start.wait().await;
            (raw, stores.balances.apply(change).await)
        }));
    }
    let mut won: Vec<(String, Applied)> = Vec::new();
    let mut lost = Vec::new();
    for racer in racers {
        let (raw, result) = bounded("a racing step", racer).await.unwrap();
        match result {
            Ok(applied) => won.push((raw, applied)),
            Err(StepError::VersionConflict) => lost.push(raw),
            Err(other) => panic!("{raw}: only VersionConflict may refuse a racer, got {other:?}"),
        }
    }
    assert_eq!(won.len(), 1, "exactly one racer wins: {won:?}");
    let (winner, applied) = won.remove(0);

    let after = current(stores.users.as_ref(), user.id).await;
    assert_eq!(after.version, user.version + 1, "one write");
    let ledger = full_history(stores.users.as_ref(), user.id).await;
    assert_eq!(ledger.len(), 2, "the funding and the winner: {ledger:?}");
    assert_eq!(ledger[0].id, entry_of(&applied));
    assert_eq!(ledger[0].idempotency_key, Some(key(&winner)));
    assert_eq!(ledger[0].balance_after, after.balance);
    assert_eq!(ledger_sum(&ledger), after.balance.get());
    let record = stores
        .idempotency
        .find(user.id, &key(&winner), at(10))
        .await
        .unwrap();
    assert_eq!(record.map(|r| r.response), Some(applied.response));
    for raw in &lost {
        let record = stores
            .idempotency
            .find(user.id, &key(raw), at(10))
            .await
            .unwrap();
        assert_eq!(record, None, "{raw} lost and stored nothing");
    }
    let paid = stores.orders.get_order(order.id).await.unwrap().unwrap();
    let payments: Vec<_> = payments(stores).await.into_iter().flatten().collect();
    match applied.assigned.payment_id {
        Some(id) => {
            assert_eq!(paid.status, OrderStatus::Paid);
            assert_eq!(payments.iter().map(|p| p.id).collect::<Vec<_>>(), vec![id]);
        }
        None => {
            assert_eq!(paid.status, OrderStatus::Pending);
            assert!(payments.is_empty(), "{payments:?}");
        }
    }
}

/// Steps of different users at the same time do not get in each other's way: each one is
/// applied on its first try.
pub async fn balance_store_concurrent_applies_of_different_users_all_succeed(stores: &Stores) {
    const USERS: usize = 8;
    const STEPS: usize = 5;
    let mut everyone = Vec::new();
    for _ in 0..USERS {
        let user = funded_user(stores, 1_000, at(0)).await;
        let order = stores
            .orders
            .create_order(user.id, amount(100), at(1))
            .await
            .unwrap();
        everyone.push((user.id, order));
    }
    let start = Arc::new(Barrier::new(USERS));
    let mut tasks = Vec::new();
    for (id, order) in everyone.clone() {
        let (stores, start) = (stores.clone(), Arc::clone(&start));
        tasks.push(tokio::spawn(async move {
            start.wait().await;
            for i in 0..STEPS {
                // The same keys for every user: keys are per user.
                let raw = format!("step-{i}");
                let user = current(stores.users.as_ref(), id).await;
                let change = match i {
                    2 => payment_step(&user, &order, &raw, at(10 + i as i64)),
                    _ if i % 2 == 0 => step(&user, EntryKind::Use, 7, &raw, at(10 + i as i64)),
                    _ => step(&user, EntryKind::Charge, 11, &raw, at(10 + i as i64)),
                };
                if let Err(e) = stores.balances.apply(change).await {
                    panic!("user {id}, {raw}: a step of one user alone must apply, got {e:?}");
                }
            }
        }));
    }
    for task in tasks {
        bounded("one user's steps", task).await.unwrap();
    }
    for (id, order) in everyone {
        let user = current(stores.users.as_ref(), id).await;
        let ledger = full_history(stores.users.as_ref(), id).await;
        assert_eq!(user.version, 1 + STEPS as u64, "user {id}");
        assert_eq!(ledger.len(), 1 + STEPS, "user {id}");
        assert_eq!(
            user.balance.get(),
            1_000 + 2 * 11 - 2 * 7 - 100,
            "user {id}"
        );
        assert_eq!(ledger_sum(&ledger), user.balance.get(), "user {id}");
        let status = order_status(stores, order.id).await;
        assert_eq!(status, Some(OrderStatus::Paid), "user {id}'s order");
    }
}

/// The record says what happened, whatever its bytes: [`BalanceStore::apply`] stores its
/// record APPLIED and [`BalanceStore::record_refusal`] REFUSED, each with the operation its
/// key record names, and `find` gives both back (a stored success whose status is not 2xx
/// and a refusal answered 200 included: nothing is read from the status).
///
/// [`BalanceStore::apply`]: domain::ports::BalanceStore::apply
/// [`BalanceStore::record_refusal`]: domain::ports::BalanceStore::record_refusal
pub async fn balance_store_records_say_what_happened(stores: &Stores) {
    let user = funded_user(stores, 1_000, at(0)).await;
    let found = |raw: &'static str| {
        let stores = stores.clone();
        async move {
            let record = stores
                .idempotency
                .find(user_id(user.id.get()), &key(raw), at(1_000))
                .await
                .unwrap()
                .unwrap_or_else(|| panic!("the record of {raw}"));
            (record.operation, record.outcome, record.response.status)
        }
    };
    assert_eq!(
        found("fund").await,
        (OperationKind::Charge, RecordOutcome::Applied, 200)
    );

    // A payment answered with a status that is not 2xx is still APPLIED.
    let order = stores
        .orders
        .create_order(user.id, amount(300), at(100))
        .await
        .unwrap();
    let mut pay = payment_step(&user, &order, "p", at(200));
    pay.respond = Box::new(|_| StoredResponse {
        status: 409,
        body: b"odd".to_vec(),
    });
    stores.balances.apply(pay).await.unwrap();
    assert_eq!(
        found("p").await,
        (OperationKind::Payment, RecordOutcome::Applied, 409)
    );

    // A refusal answered 200 is still REFUSED.
    let after = current(stores.users.as_ref(), user.id).await;
    stores
        .balances
        .record_refusal(RefusalRecord {
            user_id: after.id,
            expected_version: after.version,
            key: KeyRecord {
                operation: OperationKind::Use,
                ..key_record("r", "use:refused", at(300), DAY_MS)
            },
            response: StoredResponse {
                status: 200,
                body: b"{}".to_vec(),
            },
        })
        .await
        .unwrap();
    assert_eq!(
        found("r").await,
        (OperationKind::Use, RecordOutcome::Refused, 200)
    );
}

/// A step that is wrong in more than one way is refused for the first of them in one
/// order, the same in every adapter: the user before the version (a user that does not
/// exist is `UserNotFound` whatever version the step expected), and the version before
/// the key (a stale step under a live key is `VersionConflict`: the caller re-reads and
/// then finds the record). Each refusal writes nothing.
pub async fn balance_store_checks_the_user_then_the_version_then_the_key(stores: &Stores) {
    let user = funded_user(stores, 1_000, at(0)).await; // version 1, key "fund" live
    let nobody = user_id(user.id.get() + 1_000);
    let watch = Watch {
        users: vec![user.id, nobody],
        keys: vec![(user.id, "fund"), (nobody, "fund")],
        orders: vec![],
    };
    let before = watch.snapshot(stores, at(10)).await;

    // A stale version under the live key: the version answers.
    for version in [0, 2] {
        let mut stale = step(&user, EntryKind::Charge, 10, "fund", at(10));
        stale.expected_version = version;
        let refused = stores.balances.apply(stale).await;
        assert!(
            matches!(refused, Err(StepError::VersionConflict)),
            "version {version} under a live key: {refused:?}"
        );
        assert_eq!(watch.snapshot(stores, at(10)).await, before, "{version}");
    }

    // Nobody, expecting some version: the user answers.
    let ghost = User {
        id: nobody,
        balance: balance(0),
        version: 3,
        created_at: t0(),
    };
    let refused = stores
        .balances
        .apply(step(&ghost, EntryKind::Charge, 10, "fund", at(10)))
        .await;
    assert!(
        matches!(refused, Err(StepError::UserNotFound)),
        "{refused:?}"
    );
    assert_eq!(watch.snapshot(stores, at(10)).await, before);
}

/// A record that replaced an expired one is judged by its own expiry alone: a refusal
/// takes the key of a step's expired record (and the other way round, see
/// [`balance_store_replaces_an_expired_record`]), and purging at the old record's expiry
/// deletes nothing of the new one, which stays found until its own expiry.
pub async fn balance_store_a_replaced_record_lives_by_its_own_expiry(stores: &Stores) {
    let user = stores.users.create_user(t0()).await.unwrap();
    let mut charge = step(&user, EntryKind::Charge, 100, "k", at(0));
    charge.key = key_record("k", "charge", at(0), 10_000);
    stores.balances.apply(charge).await.unwrap();
    let user = current(stores.users.as_ref(), user.id).await;

    stores
        .balances
        .record_refusal(RefusalRecord {
            user_id: user.id,
            expected_version: user.version,
            key: key_record("k", "refusal", at(10_000), 10_000),
            response: StoredResponse {
                status: 422,
                body: b"refused".to_vec(),
            },
        })
        .await
        .unwrap();
    let found = stores
        .idempotency
        .find(user.id, &key("k"), at(10_000))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (
            found.fingerprint.as_str(),
            found.outcome,
            found.created_at,
            found.expires_at
        ),
        ("refusal", RecordOutcome::Refused, at(10_000), at(20_000))
    );

    assert_eq!(
        stores
            .idempotency
            .purge_expired(at(10_000), 10)
            .await
            .unwrap(),
        0,
        "the old expiry went with the old record"
    );
    let still = stores
        .idempotency
        .find(user.id, &key("k"), at(19_999))
        .await
        .unwrap();
    assert_eq!(still, Some(found));
    assert_eq!(
        stores
            .idempotency
            .purge_expired(at(20_000), 10)
            .await
            .unwrap(),
        1,
        "purged at its own expiry"
    );
    let gone = stores
        .idempotency
        .find(user.id, &key("k"), at(19_999))
        .await
        .unwrap();
    assert_eq!(gone, None);
}
