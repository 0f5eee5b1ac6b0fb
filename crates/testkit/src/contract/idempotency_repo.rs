//! The `IdempotencyRepo` contract: `find` answers only live records of the user asked
//! about, and `purge_expired` deletes only expired ones, at most `limit` per call.
//! Records are written by the atomic step, so these suites write them through
//! `BalanceStore` (a charge or a refusal).

use chrono::{DateTime, TimeZone, Utc};
use domain::idempotency::{CompletedRecord, Fingerprint, RecordOutcome, StoredResponse};
use domain::model::EntryKind;
use domain::operations::OperationKind;
use domain::ports::{KeyRecord, RefusalRecord};
use domain::types::UserId;

use super::Stores;
use super::support::{at, bounded, key, key_record, step, t0};

/// A refusal of a request of `user` (who has never changed its balance: version 0), to
/// store under `record` with `body`.
fn refusal(user: UserId, record: KeyRecord, body: &[u8]) -> RefusalRecord {
    RefusalRecord {
        user_id: user,
        expected_version: 0,
        key: record,
        response: StoredResponse {
            status: 422,
            body: body.to_vec(),
        },
    }
}

/// `find` answers the completed record of (user, key) exactly as written while
/// `now < expires_at`, and `None` from `expires_at` on. Keys are scoped to their user and
/// case-sensitive; any visible-ASCII key up to 255 characters round-trips; a record that
/// never expires (the domain's unbounded retention, `DateTime::<Utc>::MAX_UTC`) stays live.
pub async fn idempotency_repo_finds_only_live_records_of_their_user(stores: &Stores) {
    let keys = stores.idempotency.as_ref();
    let alice = stores.users.create_user(t0()).await.unwrap();
    let bob = stores.users.create_user(t0()).await.unwrap();

    // A charge whose record lives 10 s.
    let mut change = step(&alice, EntryKind::Charge, 100, "k", at(0));
    change.key = key_record("k", "charge:alice", at(0), 10_000);
    let applied = stores.balances.apply(change).await.unwrap();
    let written = CompletedRecord {
        user_id: alice.id,
        key: key("k"),
        fingerprint: Fingerprint::from_stored("charge:alice"),
        operation: OperationKind::Charge,
        outcome: RecordOutcome::Applied,
        response: applied.response.clone(),
        created_at: at(0),
        expires_at: at(10_000),
    };
    for now in [at(0), at(5_000), at(9_999)] {
        assert_eq!(
            keys.find(alice.id, &key("k"), now).await.unwrap().as_ref(),
            Some(&written),
            "live at {now}"
        );
    }
    for now in [at(10_000), at(10_001), at(60_000)] {
        assert_eq!(
            keys.find(alice.id, &key("k"), now).await.unwrap(),
            None,
            "expired at or before {now}"
        );
    }

    // Another user, another case, another key: none of them is alice's "k".
    assert_eq!(keys.find(bob.id, &key("k"), at(0)).await.unwrap(), None);
    assert_eq!(keys.find(alice.id, &key("K"), at(0)).await.unwrap(), None);
    assert_eq!(keys.find(alice.id, &key("k2"), at(0)).await.unwrap(), None);

    // Bob's own "k" is independent of alice's.
    stores
        .balances
        .record_refusal(refusal(
            bob.id,
            key_record("k", "use:bob", at(1), 60_000),
            b"bob",
        ))
        .await
        .unwrap();
    let bobs = keys.find(bob.id, &key("k"), at(2)).await.unwrap().unwrap();
    assert_eq!(
        (bobs.user_id, bobs.response.body.as_slice()),
        (bob.id, &b"bob"[..])
    );
    assert_eq!(
        keys.find(alice.id, &key("k"), at(2)).await.unwrap(),
        Some(written)
    );

    // Unusual but valid keys: the longest, and every punctuation character.
    let longest = "x".repeat(254) + "y";
    let punctuation = "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~";
    for raw in [longest.as_str(), punctuation, "%", "_"] {
        stores
            .balances
            .record_refusal(refusal(
                bob.id,
                key_record(raw, "odd", at(3), 60_000),
                raw.as_bytes(),
            ))
            .await
            .unwrap();
    }
    for raw in [longest.as_str(), punctuation, "%", "_"] {
        let found = keys.find(bob.id, &key(raw), at(4)).await.unwrap();
        let found = found.unwrap_or_else(|| panic!("the record of key {raw:?}"));
        assert_eq!(
            (found.key.as_str(), found.response.body.as_slice()),
            (raw, raw.as_bytes())
        );
    }
    // A key matches whole, never as a prefix or a pattern.
    assert_eq!(keys.find(bob.id, &key("x"), at(4)).await.unwrap(), None);
    assert_eq!(keys.find(bob.id, &key("y"), at(4)).await.unwrap(), None);

    // A record kept forever.
    let mut forever = key_record("forever", "kept", at(5), 0);
    forever.expires_at = DateTime::<Utc>::MAX_UTC;
    stores
        .balances
        .record_refusal(refusal(bob.id, forever, b"kept"))
        .await
        .unwrap();
    let far = Utc.with_ymd_and_hms(9000, 1, 1, 0, 0, 0).single().unwrap();
    for now in [at(5), far] {
        let found = keys.find(bob.id, &key("forever"), now).await.unwrap();
        assert!(
            found.is_some(),
            "a record that never expires is live at {now}"
        );
    }
}

/// `purge_expired(now, limit)` deletes at most `limit` records that expired at or before
/// `now` and says how many; live records stay. Purges running at once from several
/// instances delete each expired record once between them.
pub async fn idempotency_repo_purges_only_expired_records(stores: &Stores) {
    let keys = stores.idempotency.as_ref();
    let alice = stores.users.create_user(t0()).await.unwrap().id;
    let bob = stores.users.create_user(t0()).await.unwrap().id;
    // Expiring at +10 s, +20 s and +30 s; one live for an hour.
    let records = [
        (alice, "p1", 10_000),
        (alice, "p2", 20_000),
        (bob, "p3", 30_000),
        (alice, "live", 3_600_000),
    ];
    for (user, raw, ttl) in records {
        let record = key_record(raw, "purge", t0(), ttl);
        stores
            .balances
            .record_refusal(refusal(user, record, b"r"))
            .await
            .unwrap();
    }
    // And one written by a charge, expiring at +10 s too.
    let mut change = step(
        &stores.users.get_user(bob).await.unwrap().unwrap(),
        EntryKind::Charge,
        5,
        "c1",
        t0(),
    );
    change.key = key_record("c1", "charge", t0(), 10_000);
    stores.balances.apply(change).await.unwrap();

    assert_eq!(
        keys.purge_expired(at(9_999), 10).await.unwrap(),
        0,
        "none expired yet"
    );
    assert_eq!(
        keys.purge_expired(at(20_000), 0).await.unwrap(),
        0,
        "a limit of 0"
    );
    // p1, c1 and p2 (the last exactly at its expiry), one per call.
    for _ in 0..3 {
        assert_eq!(keys.purge_expired(at(20_000), 1).await.unwrap(), 1);
    }
    assert_eq!(keys.purge_expired(at(20_000), 1).await.unwrap(), 0);
    assert!(
        keys.find(bob, &key("p3"), at(20_000))
            .await
            .unwrap()
            .is_some()
    );
    assert!(
        keys.find(alice, &key("live"), at(20_000))
            .await
            .unwrap()
            .is_some()
    );

    assert_eq!(keys.purge_expired(at(30_000), 10).await.unwrap(), 1, "p3");
    assert_eq!(keys.purge_expired(at(30_000), 10).await.unwrap(), 0);
    let live = keys.find(alice, &key("live"), at(30_000)).await.unwrap();
    assert!(live.is_some(), "a live record is never purged");

    // Purged records are gone, not hidden: at an instant before their expiry they are no
    // longer found either.
    assert_eq!(keys.find(alice, &key("p1"), at(1)).await.unwrap(), None);
    assert_eq!(keys.find(bob, &key("p3"), at(1)).await.unwrap(), None);
    assert_eq!(keys.find(bob, &key("c1"), at(1)).await.unwrap(), None);

    // Twelve more expired records (alice's: bob's version has moved), purged by three
    // instances at once.
    for i in 0..12 {
        let record = key_record(&format!("many-{i}"), "purge", at(40_000), 1_000 + i);
        stores
            .balances
            .record_refusal(refusal(alice, record, b"r"))
            .await
            .unwrap();
    }
    let (a, b, c) = bounded("three concurrent purges", async {
        tokio::join!(
            keys.purge_expired(at(60_000), 5),
            keys.purge_expired(at(60_000), 5),
            keys.purge_expired(at(60_000), 5),
        )
    })
    .await;
    let purged = a.unwrap() + b.unwrap() + c.unwrap();
    let rest = keys.purge_expired(at(60_000), 100).await.unwrap();
    assert_eq!(
        purged + rest,
        12,
        "each expired record purged once ({purged} + {rest})"
    );
    assert!(
        keys.find(alice, &key("live"), at(60_000))
            .await
            .unwrap()
            .is_some()
    );
}

/// A purge bounded by its limit deletes the records that expired first: of three expired
/// records, a purge of two leaves the one that expired last, whoever's it is.
pub async fn idempotency_repo_purges_the_oldest_expired_first(stores: &Stores) {
    let keys = stores.idempotency.as_ref();
    let alice = stores.users.create_user(t0()).await.unwrap().id;
    let bob = stores.users.create_user(t0()).await.unwrap().id;
    // Written out of expiry order, and across users.
    let records = [
        (bob, "second", at(0), 20_000),
        (alice, "last", at(0), 30_000),
        (alice, "first", at(5_000), 5_000),
        (bob, "live", at(0), 3_600_000),
    ];
    for (user, raw, created, ttl) in records {
        let record = key_record(raw, "purge", created, ttl);
        stores
            .balances
            .record_refusal(refusal(user, record, b"r"))
            .await
            .unwrap();
    }

    assert_eq!(keys.purge_expired(at(30_000), 2).await.unwrap(), 2);
    let left = |user, raw: &'static str| async move {
        keys.find(user, &key(raw), at(1)).await.unwrap().is_some()
    };
    assert!(!left(alice, "first").await, "expired first, purged");
    assert!(!left(bob, "second").await, "expired second, purged");
    assert!(
        left(alice, "last").await,
        "expired last, left for the next purge"
    );
    assert!(left(bob, "live").await);
    assert_eq!(keys.purge_expired(at(30_000), 2).await.unwrap(), 1);
    assert!(!left(alice, "last").await);
    assert!(left(bob, "live").await, "a live record is never purged");
}

/// `insert_refusal` stores a refusal decided without a step (the coupon gate's) as the
/// key's REFUSED record, in the key space of its user only; a live record of the key (of a
/// step, or an earlier refusal) stays and is returned instead; an expired one is replaced.
pub async fn idempotency_repo_inserts_a_refusal_only_where_the_key_is_free(stores: &Stores) {
    let keys = stores.idempotency.as_ref();
    let alice = stores.users.create_user(t0()).await.unwrap();
    let bob = stores.users.create_user(t0()).await.unwrap();
    let sold_out = StoredResponse {
        status: 422,
        body: b"{\"code\":\"COUPON_SOLD_OUT\"}".to_vec(),
    };
    let mut record = key_record("g", "coupon_issue:alice", at(0), 10_000);
    record.operation = OperationKind::CouponIssue;
    let inserted = bounded(
        "insert_refusal",
        keys.insert_refusal(alice.id, &record, &sold_out),
    )
    .await
    .unwrap();
    assert_eq!(inserted, None);
    let stored = CompletedRecord {
        user_id: alice.id,
        key: key("g"),
        fingerprint: Fingerprint::from_stored("coupon_issue:alice"),
        operation: OperationKind::CouponIssue,
        outcome: RecordOutcome::Refused,
        response: sold_out.clone(),
        created_at: at(0),
        expires_at: at(10_000),
    };
    assert_eq!(
        keys.find(alice.id, &key("g"), at(1)).await.unwrap(),
        Some(stored.clone())
    );
    // Bob's key space is his own.
    assert_eq!(keys.find(bob.id, &key("g"), at(1)).await.unwrap(), None);

    // A second refusal under the key, even of another request: the first stands.
    let mut other = key_record("g", "coupon_issue:other", at(5), 10_000);
    other.operation = OperationKind::CouponIssue;
    let answer = StoredResponse {
        status: 422,
        body: b"other".to_vec(),
    };
    assert_eq!(
        keys.insert_refusal(alice.id, &other, &answer)
            .await
            .unwrap(),
        Some(stored.clone())
    );
    // A key a step wrote stands too, and is what the step stored.
    let change = step(&bob, EntryKind::Charge, 100, "c", at(0));
    let applied = stores.balances.apply(change).await.unwrap();
    let mut refused = key_record("c", "coupon_issue:bob", at(10), 10_000);
    refused.operation = OperationKind::CouponIssue;
    let earlier = keys
        .insert_refusal(bob.id, &refused, &sold_out)
        .await
        .unwrap()
        .expect("the charge's record stands");
    assert_eq!(
        (earlier.outcome, earlier.response),
        (RecordOutcome::Applied, applied.response)
    );
    // Expired: replaced by the new refusal.
    let mut later = key_record("g", "coupon_issue:later", at(10_000), 5_000);
    later.operation = OperationKind::CouponIssue;
    assert_eq!(
        keys.insert_refusal(alice.id, &later, &answer)
            .await
            .unwrap(),
        None
    );
    let found = keys.find(alice.id, &key("g"), at(10_001)).await.unwrap();
    assert_eq!(
        found.map(|r| (r.fingerprint, r.response, r.expires_at)),
        Some((
            Fingerprint::from_stored("coupon_issue:later"),
            answer,
            at(15_000)
        ))
    );
}
