//! The coupon contract: `CouponRepo` (creation, reads, a user's holding and listing, the
//! gate's snapshot) and the coupon branches of the atomic step (`BalanceStore`): issuing
//! one unit writes a user coupon, the coupon's count and the user's version, and moves no
//! money (no ledger entry); never past the stock nor twice to one user, racing or not;
//! paying with a coupon uses it once, only by its user and only before it expires (a
//! payment of 0 when it covers the whole order); a refund in full sets it free again, a
//! partial one does not.

use std::sync::{Arc, Mutex};

use domain::idempotency::{CompletedRecord, RecordOutcome};
use domain::model::{
    Coupon, CouponStatus, CouponUse, EntryKind, LedgerEntry, NewCoupon, Order, OrderStatus,
    Payment, PaymentStatus, User, UserCoupon,
};
use domain::operations::{OperationKind, coupon_issue};
use domain::ports::{Applied, Assigned, GateSnapshot, StepError};
use domain::types::{Amount, CouponId, CouponName, UserCouponId};
use tokio::sync::Barrier;

use super::Stores;
use super::support::{
    DAY_MS, Watch, amount, at, balance, bounded, coupon_payment_step, current, entry_of,
    full_history, funded_user, gate_snapshot, issue_step, key, naming_ids, new_coupon,
    payment_step, refund_step,
};

/// Creates `coupon` at [`at`]`(0)`.
async fn create(stores: &Stores, coupon: NewCoupon) -> Coupon {
    stores
        .coupons
        .create_coupon(coupon, at(0))
        .await
        .expect("create_coupon")
}

/// Issues `coupon` to `user` (as stored now) under `raw_key` at `when`; it must apply.
/// Returns the user coupon as stored.
async fn issued(
    stores: &Stores,
    user: &User,
    coupon: &Coupon,
    raw_key: &str,
    when: i64,
) -> UserCoupon {
    let user = current(stores.users.as_ref(), user.id).await;
    let applied = stores
        .balances
        .apply(issue_step(&user, coupon, raw_key, at(when)))
        .await
        .unwrap_or_else(|e| panic!("issuing coupon {} to user {}: {e:?}", coupon.id, user.id));
    let id = applied
        .assigned
        .user_coupon_id
        .expect("an issue assigns the user coupon's id");
    user_coupon(stores, id).await
}

/// The user coupon as stored; it must exist.
async fn user_coupon(stores: &Stores, id: UserCouponId) -> UserCoupon {
    stores
        .coupons
        .get_user_coupon(id)
        .await
        .expect("get_user_coupon")
        .unwrap_or_else(|| panic!("user coupon {id} exists"))
}

/// The payment as stored; it must exist.
async fn payment_of(stores: &Stores, applied: &Applied) -> Payment {
    let id = applied
        .assigned
        .payment_id
        .expect("a payment assigns its id");
    stores
        .orders
        .get_payment(id)
        .await
        .expect("get_payment")
        .unwrap_or_else(|| panic!("payment {id} exists"))
}

async fn order(stores: &Stores, user: &User, value: i64, when: i64) -> Order {
    stores
        .orders
        .create_order(user.id, amount(value), at(when))
        .await
        .expect("create_order")
}

/// `create_coupon` writes a coupon with nothing issued (its name byte for byte, its
/// window to the millisecond), with increasing ids; `get_coupon` reads it back, with the
/// issued count; `holding`, `get_user_coupon` and `user_coupons` (newest first, at most
/// `limit`) read what was issued; `gate_snapshot` is the coupon with every holder and the
/// key that issued it. Unknown ids answer `None` (an empty list for a user).
pub async fn coupon_repo_creates_and_reads(stores: &Stores) {
    let coupons = stores.coupons.as_ref();
    let name = CouponName::parse("봄 세일 🌸 Spring").unwrap();
    let windowed = NewCoupon::new(
        name.clone(),
        amount(1_500),
        100,
        Some(at(1_001)),
        Some(at(90_000_999)),
        Some(7),
        at(0),
    )
    .unwrap();
    let first = coupons.create_coupon(windowed, at(5)).await.unwrap();
    assert_eq!(
        first,
        Coupon {
            id: first.id,
            name,
            discount: amount(1_500),
            total_quantity: 100,
            issued_quantity: 0,
            issue_starts_at: at(1_001),
            issue_ends_at: Some(at(90_000_999)),
            valid_for_days: 7,
            created_at: at(5),
        }
    );
    let second = coupons
        .create_coupon(new_coupon("WELCOME", 500, 2, 30), at(6))
        .await
        .unwrap();
    assert!(second.id > first.id, "{} after {}", second.id, first.id);
    assert_eq!(second.issue_ends_at, None, "a window that never closes");
    assert_eq!(
        coupons.get_coupon(first.id).await.unwrap(),
        Some(first.clone())
    );
    assert_eq!(
        coupons.get_coupon(second.id).await.unwrap(),
        Some(second.clone())
    );
    let unknown = CouponId::new(second.id.get() + 1_000).unwrap();
    assert_eq!(coupons.get_coupon(unknown).await.unwrap(), None);
    assert_eq!(coupons.gate_snapshot(unknown).await.unwrap(), None);
    assert_eq!(
        coupons.gate_snapshot(first.id).await.unwrap(),
        Some(GateSnapshot {
            coupon: first.clone(),
            holders: Vec::new(),
        })
    );

    let a = stores.users.create_user(at(0)).await.unwrap();
    let b = stores.users.create_user(at(0)).await.unwrap();
    let stranger = stores.users.create_user(at(0)).await.unwrap();
    assert_eq!(coupons.holding(first.id, a.id).await.unwrap(), None);
    assert_eq!(coupons.user_coupons(a.id, 10).await.unwrap(), Vec::new());

    let a_first = issued(stores, &a, &first, "i", 2_345).await;
    let a_second = issued(stores, &a, &second, "j", 2_346).await;
    let b_first = issued(stores, &b, &first, "i", 2_347).await;
    assert_eq!(
        a_first,
        UserCoupon {
            id: a_first.id,
            coupon_id: first.id,
            user_id: a.id,
            discount: amount(1_500),
            payment: None,
            issued_at: at(2_345),
            expires_at: at(2_345 + 7 * DAY_MS),
            idempotency_key: key("i"),
        }
    );
    assert!(a_second.id > a_first.id && b_first.id > a_second.id);
    assert_eq!(
        coupons.holding(first.id, a.id).await.unwrap(),
        Some(a_first.clone())
    );
    assert_eq!(
        coupons.holding(first.id, b.id).await.unwrap(),
        Some(b_first.clone())
    );
    assert_eq!(coupons.holding(second.id, b.id).await.unwrap(), None);
    assert_eq!(coupons.holding(first.id, stranger.id).await.unwrap(), None);
    let nobody = UserCouponId::new(b_first.id.get() + 1_000).unwrap();
    assert_eq!(coupons.get_user_coupon(nobody).await.unwrap(), None);

    assert_eq!(
        coupons.user_coupons(a.id, 10).await.unwrap(),
        vec![a_second.clone(), a_first.clone()],
        "newest first"
    );
    assert_eq!(coupons.user_coupons(a.id, 1).await.unwrap(), vec![a_second]);
    assert_eq!(coupons.user_coupons(b.id, 10).await.unwrap(), vec![b_first]);
    assert_eq!(
        coupons.user_coupons(stranger.id, 10).await.unwrap(),
        Vec::new()
    );

    let mut holders = vec![(a.id, key("i")), (b.id, key("i"))];
    holders.sort();
    assert_eq!(
        gate_snapshot(stores, first.id).await,
        Some(GateSnapshot {
            coupon: Coupon {
                issued_quantity: 2,
                ..first
            },
            holders,
        })
    );
    assert_eq!(
        gate_snapshot(stores, second.id).await,
        Some(GateSnapshot {
            coupon: Coupon {
                issued_quantity: 1,
                ..second
            },
            holders: vec![(a.id, key("j"))],
        })
    );
}

/// Issuing writes the user coupon, the coupon's count + 1 and the user's version + 1,
/// leaves the balance and the ledger as they are, stores the record APPLIED, and hands
/// `respond` the user coupon's id (and no entry, payment or refund id).
pub async fn balance_store_issue_writes_the_user_coupon(stores: &Stores) {
    let user = funded_user(stores, 1_000, at(0)).await;
    let ledger = full_history(stores.users.as_ref(), user.id).await;
    let coupon = create(stores, new_coupon("WELCOME", 500, 10, 30)).await;

    let seen: Arc<Mutex<Option<Assigned>>> = Arc::default();
    let mut change = issue_step(&user, &coupon, "issue", at(1_000));
    change.respond = {
        let seen = Arc::clone(&seen);
        Box::new(move |assigned: &Assigned| {
            *seen.lock().unwrap() = Some(assigned.clone());
            naming_ids(assigned)
        })
    };
    let applied = stores.balances.apply(change).await.unwrap();
    let id = applied
        .assigned
        .user_coupon_id
        .expect("the user coupon's id");
    assert_eq!(
        (
            applied.assigned.entry_id,
            applied.assigned.payment_id,
            applied.assigned.refund_id
        ),
        (None, None, None),
        "no money moves"
    );
    assert_eq!(seen.lock().unwrap().as_ref(), Some(&applied.assigned));
    assert_eq!(applied.response, naming_ids(&applied.assigned));

    let after = current(stores.users.as_ref(), user.id).await;
    assert_eq!(
        after,
        User {
            version: user.version + 1,
            ..user.clone()
        },
        "the version moves, the balance does not"
    );
    assert_eq!(
        full_history(stores.users.as_ref(), user.id).await,
        ledger,
        "no ledger entry"
    );
    let expected = UserCoupon {
        id,
        coupon_id: coupon.id,
        user_id: user.id,
        discount: amount(500),
        payment: None,
        issued_at: at(1_000),
        expires_at: at(1_000 + 30 * DAY_MS),
        idempotency_key: key("issue"),
    };
    assert_eq!(user_coupon(stores, id).await, expected);
    assert_eq!(expected.status_at(at(1_000)), CouponStatus::Available);
    assert_eq!(
        stores.coupons.holding(coupon.id, user.id).await.unwrap(),
        Some(expected.clone())
    );
    assert_eq!(
        stores.coupons.user_coupons(user.id, 10).await.unwrap(),
        vec![expected]
    );
    assert_eq!(
        stores
            .coupons
            .get_coupon(coupon.id)
            .await
            .unwrap()
            .map(|c| c.issued_quantity),
        Some(1)
    );
    let record = stores
        .idempotency
        .find(user.id, &key("issue"), at(1_000))
        .await
        .unwrap();
    assert_eq!(
        record,
        Some(CompletedRecord {
            user_id: user.id,
            key: key("issue"),
            fingerprint: coupon_issue::fingerprint(user.id, coupon.id),
            operation: OperationKind::CouponIssue,
            outcome: RecordOutcome::Applied,
            response: applied.response,
            created_at: at(1_000),
            expires_at: at(1_000 + DAY_MS),
        })
    );
}

/// A second issue of one coupon to one user, under a fresh key and the current version
/// and with stock left, is `CouponChanged` and writes nothing.
pub async fn balance_store_issue_to_a_holder_is_coupon_changed(stores: &Stores) {
    let user = stores.users.create_user(at(0)).await.unwrap();
    let coupon = create(stores, new_coupon("ONCE", 100, 10, 30)).await;
    issued(stores, &user, &coupon, "first", 10).await;
    let user = current(stores.users.as_ref(), user.id).await;
    let watch = Watch {
        users: vec![user.id],
        keys: vec![(user.id, "first"), (user.id, "second")],
        orders: vec![],
    };
    let before = watch.snapshot(stores, at(20)).await;
    let again = stores
        .balances
        .apply(issue_step(&user, &coupon, "second", at(20)))
        .await;
    assert!(matches!(again, Err(StepError::CouponChanged)), "{again:?}");
    assert_eq!(watch.snapshot(stores, at(20)).await, before);
}

/// The last unit goes to the user who asks for it; after it, issuing is
/// `CouponChanged` and writes nothing, and the count stays at the stock.
pub async fn balance_store_issue_past_the_stock_is_coupon_changed(stores: &Stores) {
    let coupon = create(stores, new_coupon("TWO", 100, 2, 30)).await;
    let mut users = Vec::new();
    for _ in 0..3 {
        users.push(stores.users.create_user(at(0)).await.unwrap());
    }
    issued(stores, &users[0], &coupon, "k", 10).await;
    issued(stores, &users[1], &coupon, "k", 11).await;
    let late = &users[2];
    let watch = Watch {
        users: users.iter().map(|u| u.id).collect(),
        keys: vec![(late.id, "k")],
        orders: vec![],
    };
    let before = watch.snapshot(stores, at(20)).await;
    let refused = stores
        .balances
        .apply(issue_step(late, &coupon, "k", at(20)))
        .await;
    assert!(
        matches!(refused, Err(StepError::CouponChanged)),
        "{refused:?}"
    );
    assert_eq!(watch.snapshot(stores, at(20)).await, before);
    let shown = gate_snapshot(stores, coupon.id).await.unwrap();
    assert_eq!(shown.coupon.issued_quantity, 2);
    let mut holders = vec![(users[0].id, key("k")), (users[1].id, key("k"))];
    holders.sort();
    assert_eq!(shown.holders, holders);
}

/// Many users racing for a small stock at once, without any lock (as with the Redis gate
/// down): exactly the stock is issued, each winner once, every other one is
/// `CouponChanged` and writes nothing.
pub async fn balance_store_concurrent_issues_never_pass_the_stock(stores: &Stores) {
    const USERS: usize = 16;
    const STOCK: u32 = 5;
    let coupon = create(stores, new_coupon("RUSH", 100, i64::from(STOCK), 30)).await;
    let mut users = Vec::new();
    for _ in 0..USERS {
        users.push(stores.users.create_user(at(0)).await.unwrap());
    }
    let start = Arc::new(Barrier::new(USERS));
    let mut racers = Vec::new();
    for user in users.clone() {
        let (stores, start, coupon) = (stores.clone(), Arc::clone(&start), coupon.clone());
        racers.push(tokio::spawn(async move {
            let change = issue_step(&user, &coupon, "rush", at(10));
            start.wait().await;
            (user, stores.balances.apply(change).await)
        }));
    }
    let mut won = Vec::new();
    let mut lost = Vec::new();
    for racer in racers {
        let (user, result) = bounded("a racing issue", racer).await.unwrap();
        match result {
            Ok(applied) => won.push((user, applied)),
            Err(StepError::CouponChanged) => lost.push(user),
            Err(other) => panic!(
                "user {}: only CouponChanged may refuse, got {other:?}",
                user.id
            ),
        }
    }
    assert_eq!(won.len(), STOCK as usize, "exactly the stock is issued");
    let shown = gate_snapshot(stores, coupon.id).await.unwrap();
    assert_eq!(shown.coupon.issued_quantity, STOCK);
    let mut winners: Vec<_> = won.iter().map(|(user, _)| (user.id, key("rush"))).collect();
    winners.sort();
    assert_eq!(shown.holders, winners);
    for (user, applied) in &won {
        let held = stores.coupons.user_coupons(user.id, 10).await.unwrap();
        assert_eq!(
            held.iter().map(|c| c.id).collect::<Vec<_>>(),
            vec![applied.assigned.user_coupon_id.unwrap()]
        );
        assert_eq!(current(stores.users.as_ref(), user.id).await.version, 1);
    }
    for user in &lost {
        assert_eq!(current(stores.users.as_ref(), user.id).await.version, 0);
        assert_eq!(stores.coupons.user_coupons(user.id, 10).await.unwrap(), []);
        let record = stores
            .idempotency
            .find(user.id, &key("rush"), at(10))
            .await
            .unwrap();
        assert_eq!(record, None, "user {} lost and stored nothing", user.id);
    }
}

/// Paying with a coupon takes its discount off the order: the balance pays the rest (the
/// payment's amount and its PAYMENT entry), the payment names the coupon and the
/// discount, and the coupon is USED by it. Using it again is `CouponChanged` and writes
/// nothing.
pub async fn balance_store_pay_with_a_coupon_uses_it_once(stores: &Stores) {
    let user = funded_user(stores, 1_000, at(0)).await;
    let coupon = create(stores, new_coupon("THREE", 300, 10, 30)).await;
    let free = issued(stores, &user, &coupon, "issue", 100).await;
    let first = order(stores, &user, 500, 200).await;
    let user = current(stores.users.as_ref(), user.id).await;

    let applied = stores
        .balances
        .apply(coupon_payment_step(&user, &first, &free, "pay-1", at(300)))
        .await
        .unwrap();
    let payment = payment_of(stores, &applied).await;
    assert_eq!(
        payment,
        Payment {
            id: payment.id,
            order_id: first.id,
            user_id: user.id,
            amount: amount(200),
            balance_after: balance(800),
            paid_at: at(300),
            refunded_total: 0,
            coupon: Some(CouponUse {
                user_coupon: free.id,
                discount: amount(300),
            }),
        }
    );
    let used = user_coupon(stores, free.id).await;
    assert_eq!(
        used,
        UserCoupon {
            payment: Some(payment.id),
            ..free.clone()
        }
    );
    assert_eq!(used.status_at(at(300)), CouponStatus::Used);
    let after = current(stores.users.as_ref(), user.id).await;
    assert_eq!(
        (after.balance.get(), after.version),
        (800, user.version + 1)
    );
    let ledger = full_history(stores.users.as_ref(), user.id).await;
    assert_eq!(
        ledger[0],
        LedgerEntry {
            id: entry_of(&applied),
            user_id: user.id,
            kind: EntryKind::Payment,
            amount: amount(200),
            balance_after: balance(800),
            idempotency_key: Some(key("pay-1")),
            created_at: at(300),
        }
    );
    let paid = stores.orders.get_order(first.id).await.unwrap().unwrap();
    assert_eq!(paid.status, OrderStatus::Paid);

    // The same coupon on another order: used already.
    let second = order(stores, &user, 500, 400).await;
    let watch = Watch {
        users: vec![user.id],
        keys: vec![(user.id, "pay-2")],
        orders: vec![first.id, second.id],
    };
    let before = watch.snapshot(stores, at(500)).await;
    let again = stores
        .balances
        .apply(coupon_payment_step(
            &after,
            &second,
            &free,
            "pay-2",
            at(500),
        ))
        .await;
    assert!(matches!(again, Err(StepError::CouponChanged)), "{again:?}");
    assert_eq!(watch.snapshot(stores, at(500)).await, before);
}

/// Paying with another user's coupon, with one that does not exist, or with one of
/// one's own from the instant it expires is `CouponChanged` and writes nothing; a
/// millisecond before it expires it pays.
pub async fn balance_store_pay_with_a_foreign_or_expired_coupon_is_coupon_changed(stores: &Stores) {
    let me = funded_user(stores, 1_000, at(0)).await;
    let other = funded_user(stores, 1_000, at(0)).await;
    let coupon = create(stores, new_coupon("DAY", 300, 10, 1)).await;
    let theirs = issued(stores, &other, &coupon, "issue", 100).await;
    let mine = issued(stores, &me, &coupon, "issue", 100).await;
    let mut missing = mine.clone();
    missing.id = UserCouponId::new(theirs.id.get().max(mine.id.get()) + 1_000).unwrap();
    let bill = order(stores, &me, 500, 200).await;
    let me = current(stores.users.as_ref(), me.id).await;
    assert_eq!(mine.expires_at, at(100 + DAY_MS));

    let watch = Watch {
        users: vec![me.id, other.id],
        keys: vec![(me.id, "foreign"), (me.id, "missing"), (me.id, "expired")],
        orders: vec![bill.id],
    };
    let before = watch.snapshot(stores, at(300)).await;
    for (coupon, raw, when) in [
        (&theirs, "foreign", at(300)),
        (&missing, "missing", at(300)),
        (&mine, "expired", mine.expires_at),
    ] {
        let refused = stores
            .balances
            .apply(coupon_payment_step(&me, &bill, coupon, raw, when))
            .await;
        assert!(
            matches!(refused, Err(StepError::CouponChanged)),
            "{raw}: {refused:?}"
        );
        assert_eq!(watch.snapshot(stores, at(300)).await, before, "{raw}");
    }

    let last_moment = mine.expires_at - chrono::Duration::milliseconds(1);
    let applied = stores
        .balances
        .apply(coupon_payment_step(
            &me,
            &bill,
            &mine,
            "in-time",
            last_moment,
        ))
        .await
        .unwrap();
    let payment = payment_of(stores, &applied).await;
    assert_eq!(user_coupon(stores, mine.id).await.payment, Some(payment.id));
    assert_eq!(user_coupon(stores, theirs.id).await.payment, None);
}

/// A coupon worth at least the order pays all of it: a payment of 0 from the balance,
/// with a PAYMENT entry of 0, the discount the order's amount, the order PAID and the
/// coupon USED; the balance stays, the version moves.
pub async fn balance_store_pay_with_a_coupon_covering_the_order_pays_nothing(stores: &Stores) {
    let user = funded_user(stores, 100, at(0)).await;
    let coupon = create(stores, new_coupon("BIG", 500, 10, 30)).await;
    let free = issued(stores, &user, &coupon, "issue", 100).await;
    let bill = order(stores, &user, 300, 200).await;
    let user = current(stores.users.as_ref(), user.id).await;

    let applied = stores
        .balances
        .apply(coupon_payment_step(&user, &bill, &free, "pay", at(300)))
        .await
        .unwrap();
    let payment = payment_of(stores, &applied).await;
    let nothing = Amount::from_stored(0);
    assert_eq!(
        payment,
        Payment {
            id: payment.id,
            order_id: bill.id,
            user_id: user.id,
            amount: nothing,
            balance_after: balance(100),
            paid_at: at(300),
            refunded_total: 0,
            coupon: Some(CouponUse {
                user_coupon: free.id,
                discount: amount(300),
            }),
        }
    );
    assert_eq!(payment.status(), PaymentStatus::Completed);
    let after = current(stores.users.as_ref(), user.id).await;
    assert_eq!(
        (after.balance.get(), after.version),
        (100, user.version + 1)
    );
    let ledger = full_history(stores.users.as_ref(), user.id).await;
    assert_eq!(
        (
            ledger.len(),
            ledger[0].id,
            ledger[0].kind,
            ledger[0].amount,
            ledger[0].balance_after
        ),
        (
            2,
            entry_of(&applied),
            EntryKind::Payment,
            nothing,
            balance(100)
        )
    );
    let paid = stores.orders.get_order(bill.id).await.unwrap().unwrap();
    assert_eq!(paid.status, OrderStatus::Paid);
    assert_eq!(user_coupon(stores, free.id).await.payment, Some(payment.id));
}

/// A partial refund of a payment with a coupon leaves the coupon USED; the refund that
/// completes the payment sets it free in the same step, and it pays again.
pub async fn balance_store_refund_in_full_frees_the_coupon(stores: &Stores) {
    let user = funded_user(stores, 1_000, at(0)).await;
    let coupon = create(stores, new_coupon("BACK", 300, 10, 30)).await;
    let free = issued(stores, &user, &coupon, "issue", 100).await;
    let bill = order(stores, &user, 1_000, 200).await;
    let user = current(stores.users.as_ref(), user.id).await;
    let applied = stores
        .balances
        .apply(coupon_payment_step(&user, &bill, &free, "pay", at(300)))
        .await
        .unwrap();
    let payment = payment_of(stores, &applied).await;
    assert_eq!(payment.amount, amount(700));

    let user = current(stores.users.as_ref(), user.id).await;
    stores
        .balances
        .apply(refund_step(&user, &payment, 200, 0, "part", at(400)))
        .await
        .unwrap();
    assert_eq!(
        user_coupon(stores, free.id).await.payment,
        Some(payment.id),
        "a partial refund keeps the coupon used"
    );

    let user = current(stores.users.as_ref(), user.id).await;
    let payment = stores
        .orders
        .get_payment(payment.id)
        .await
        .unwrap()
        .unwrap();
    stores
        .balances
        .apply(refund_step(&user, &payment, 500, 200, "rest", at(500)))
        .await
        .unwrap();
    let refunded = stores
        .orders
        .get_payment(payment.id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (refunded.refunded_total, refunded.status(), refunded.coupon),
        (700, PaymentStatus::Refunded, payment.coupon),
        "the payment still says which coupon it used"
    );
    let order_now = stores.orders.get_order(bill.id).await.unwrap().unwrap();
    assert_eq!(order_now.status, OrderStatus::Refunded);
    let freed = user_coupon(stores, free.id).await;
    assert_eq!(freed, free, "free again, as issued");
    assert_eq!(freed.status_at(at(500)), CouponStatus::Available);

    // And it pays another order.
    let next = order(stores, &user, 400, 600).await;
    let user = current(stores.users.as_ref(), user.id).await;
    assert_eq!(user.balance.get(), 1_000);
    let again = stores
        .balances
        .apply(coupon_payment_step(
            &user,
            &next,
            &freed,
            "pay-again",
            at(700),
        ))
        .await
        .unwrap();
    let second = payment_of(stores, &again).await;
    assert_eq!(second.amount, amount(100));
    assert_eq!(user_coupon(stores, free.id).await.payment, Some(second.id));
    // A plain payment of a user with a coupon leaves the coupon alone.
    let plain = order(stores, &user, 50, 800).await;
    let user = current(stores.users.as_ref(), user.id).await;
    stores
        .balances
        .apply(payment_step(&user, &plain, "plain", at(900)))
        .await
        .unwrap();
    assert_eq!(user_coupon(stores, free.id).await.payment, Some(second.id));
}
