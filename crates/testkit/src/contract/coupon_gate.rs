//! The `CouponGate` contract: the coupon admission gate's answers, exact counting of its
//! units, the tokens that free them, rebuilding from a snapshot, and the refusals it
//! records and replays.
//!
//! Each suite takes two gates on one backend, as two service instances would have them,
//! both built with a stale-after of [`GATE_STALE_AFTER`]. Every instant is a fixed one
//! (the gate keeps the caller's clock), so nothing here waits for time to pass; the
//! backend only needs to be fresh (a key prefix of the test's own).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use domain::idempotency::{Fingerprint, StoredResponse};
use domain::model::Coupon;
use domain::ports::{CouponGate, GateAnswer, GateRefusal, GateRequest, GateSnapshot, GateView};
use domain::types::{CouponId, CouponName, UserId};

use super::support::{amount, at, bounded, key, t0, user_id};

/// The stale-after the gates under test are built with: a unit pending for longer makes a
/// sold-out answer stale.
pub const GATE_STALE_AFTER: Duration = Duration::from_secs(10);

/// [`GATE_STALE_AFTER`] in ms.
const STALE_MS: i64 = 10_000;

/// How long the refusals of these suites' requests live, unless a suite says otherwise.
const RECORD_MS: i64 = 24 * 3600 * 1000;

type Gate = Arc<dyn CouponGate>;

const SOLD_OUT: GateAnswer = GateAnswer::Refused {
    refusal: GateRefusal::SoldOut,
    stale: false,
};
const STALE_SOLD_OUT: GateAnswer = GateAnswer::Refused {
    refusal: GateRefusal::SoldOut,
    stale: true,
};
const ALREADY_ISSUED: GateAnswer = GateAnswer::Refused {
    refusal: GateRefusal::AlreadyIssued,
    stale: false,
};
const NOT_OPEN: GateAnswer = GateAnswer::Refused {
    refusal: GateRefusal::NotOpen,
    stale: false,
};

fn coupon_id(raw: i64) -> CouponId {
    CouponId::new(raw).expect("a positive coupon id")
}

/// A coupon of `total`, open from [`t0`] and never closing, none issued.
fn coupon(id: i64, total: u32) -> Coupon {
    Coupon {
        id: coupon_id(id),
        name: CouponName::parse("rush").expect("a valid coupon name"),
        discount: amount(100),
        total_quantity: total,
        issued_quantity: 0,
        issue_starts_at: t0(),
        issue_ends_at: None,
        valid_for_days: 30,
        created_at: t0(),
    }
}

/// The database's view: `coupon`, issued to `holders` (user, key).
fn snapshot(mut coupon: Coupon, holders: &[(i64, &str)]) -> GateSnapshot {
    coupon.issued_quantity = u32::try_from(holders.len()).expect("a small snapshot");
    GateSnapshot {
        coupon,
        holders: holders
            .iter()
            .map(|&(user, raw)| (user_id(user), key(raw)))
            .collect(),
    }
}

/// A refusal's bytes: the refusal, the request it answers, and bytes that are not valid
/// UTF-8 (a zero byte and 0xFF), so only a byte-exact gate gives them back unchanged.
fn response(status: u16, code: &str, user: i64, raw_key: &str) -> StoredResponse {
    let mut body =
        format!("{{\"code\":\"{code}\",\"user\":{user},\"key\":\"{raw_key}\"}}").into_bytes();
    body.extend_from_slice(&[0x00, 0xFF, b'|', 0x80]);
    StoredResponse { status, body }
}

/// A request to the gate with what the service keeps beside it: the bytes of each refusal
/// (its user and key in them, and bytes no text encoding keeps) and when a record of its
/// answer expires. Derefs to the [`GateRequest`] the gate is given.
#[derive(Debug, Clone)]
struct Ask {
    request: GateRequest,
    expires_at: DateTime<Utc>,
    sold_out: StoredResponse,
    already_issued: StoredResponse,
    not_open: StoredResponse,
}

impl std::ops::Deref for Ask {
    type Target = GateRequest;

    fn deref(&self) -> &GateRequest {
        &self.request
    }
}

impl std::ops::DerefMut for Ask {
    fn deref_mut(&mut self) -> &mut GateRequest {
        &mut self.request
    }
}

/// A request of `user` under `raw_key` for a unit of `coupon` at `now`: its fingerprint
/// names the user and key (a reuse changes it), its token is fresh, its refusals live for
/// [`RECORD_MS`].
fn request(coupon: i64, user: i64, raw_key: &str, now: DateTime<Utc>) -> Ask {
    Ask {
        request: GateRequest {
            coupon: coupon_id(coupon),
            user: user_id(user),
            key: key(raw_key),
            fingerprint: Fingerprint::from_stored(format!("issue:{coupon}:{user}")),
            token: uuid::Uuid::new_v4().simple().to_string(),
            now,
        },
        expires_at: now + chrono::Duration::milliseconds(RECORD_MS),
        sold_out: response(409, "COUPON_SOLD_OUT", user, raw_key),
        already_issued: response(409, "COUPON_ALREADY_ISSUED", user, raw_key),
        not_open: response(422, "COUPON_NOT_OPEN", user, raw_key),
    }
}

/// An admission as the service makes it: a refusal it answers (not a stale one, which it
/// asks again about after a rebuild) is stored in the database and then recorded at the
/// gate with the request's bytes.
async fn admit(gate: &dyn CouponGate, request: &Ask) -> GateAnswer {
    let answer = admit_only(gate, request).await;
    if let GateAnswer::Refused {
        refusal,
        stale: false,
    } = &answer
    {
        let response = match refusal {
            GateRefusal::SoldOut => &request.sold_out,
            GateRefusal::AlreadyIssued => &request.already_issued,
            GateRefusal::NotOpen => &request.not_open,
        };
        bounded(
            "record",
            gate.record(
                request.coupon,
                request.user,
                &request.key,
                &request.fingerprint,
                response,
                request.now,
                request.expires_at,
            ),
        )
        .await
        .unwrap_or_else(|e| panic!("record of {request:?}: {e:?}"));
    }
    answer
}

/// The gate's admission alone.
async fn admit_only(gate: &dyn CouponGate, request: &GateRequest) -> GateAnswer {
    bounded("admit", gate.admit(request))
        .await
        .unwrap_or_else(|e| panic!("admit of {request:?}: {e:?}"))
}

/// A refusal is not recorded by the admission itself (the database has it first): until
/// it is recorded, the same request is decided again, and a refusal that noticed a stale
/// unit leaves nothing behind to replay after the rebuild.
pub async fn coupon_gate_admission_records_nothing(first: Gate, second: Gate) {
    load(first.as_ref(), &snapshot(coupon(1, 1), &[]), at(0)).await;
    let holder = request(1, 1, "k-1", at(0));
    assert_eq!(
        admit_only(first.as_ref(), &holder).await,
        GateAnswer::Admitted
    );
    let refused = request(1, 2, "k-2", at(10));
    assert_eq!(admit_only(first.as_ref(), &refused).await, SOLD_OUT);
    assert_eq!(admit_only(second.as_ref(), &refused).await, SOLD_OUT);
    let mut reuse = request(1, 2, "k-2", at(20));
    reuse.fingerprint = Fingerprint::from_stored("issue:other");
    assert_eq!(admit_only(first.as_ref(), &reuse).await, SOLD_OUT);
    // A unit freed meanwhile (its step refused) goes to that very key.
    give_back(first.as_ref(), 1, 1, &holder.token).await;
    assert_eq!(
        admit_only(second.as_ref(), &request(1, 2, "k-2", at(40))).await,
        GateAnswer::Admitted
    );
}

async fn load(gate: &dyn CouponGate, snapshot: &GateSnapshot, now: DateTime<Utc>) {
    bounded("load", gate.load(snapshot, now, GATE_STALE_AFTER))
        .await
        .unwrap_or_else(|e| panic!("load of coupon {}: {e:?}", snapshot.coupon.id));
}

async fn confirm(gate: &dyn CouponGate, coupon: i64, user: i64, raw_key: &str) {
    bounded(
        "confirm",
        gate.confirm(coupon_id(coupon), user_id(user), &key(raw_key)),
    )
    .await
    .unwrap_or_else(|e| panic!("confirm: {e:?}"));
}

async fn give_back(gate: &dyn CouponGate, coupon: i64, user: i64, token: &str) {
    bounded(
        "give_back",
        gate.give_back(coupon_id(coupon), user_id(user), token),
    )
    .await
    .unwrap_or_else(|e| panic!("give_back: {e:?}"));
}

async fn inspect(gate: &dyn CouponGate, coupon: i64) -> Option<GateView> {
    bounded("inspect", gate.inspect(coupon_id(coupon)))
        .await
        .unwrap_or_else(|e| panic!("inspect: {e:?}"))
}

async fn view(gate: &dyn CouponGate, coupon: i64) -> GateView {
    inspect(gate, coupon)
        .await
        .unwrap_or_else(|| panic!("the gate of coupon {coupon} is missing"))
}

fn issued(view: &GateView) -> BTreeSet<(i64, String)> {
    view.issued
        .iter()
        .map(|(user, key)| (user.get(), key.as_str().to_owned()))
        .collect()
}

fn pending(view: &GateView) -> BTreeSet<(i64, DateTime<Utc>)> {
    view.pending
        .iter()
        .map(|&(user, since)| (user.get(), since))
        .collect()
}

fn replay_of(request: &Ask, response: &StoredResponse) -> GateAnswer {
    GateAnswer::Replay {
        response: response.clone(),
        expires_at: request.expires_at,
    }
}

/// Without a load the gate has nothing: every admit is `Missing`, give-back creates
/// nothing, inspect says `None`; a confirm keeps only its issued holder, which the load
/// keeps though its snapshot lacks it (read before that unit's commit); a load creates
/// exactly the coupon's state.
pub async fn coupon_gate_is_missing_until_loaded(first: Gate, second: Gate) {
    let r = request(1, 10, "k-10", at(0));
    assert_eq!(admit(first.as_ref(), &r).await, GateAnswer::Missing);
    assert_eq!(admit(second.as_ref(), &r).await, GateAnswer::Missing);
    confirm(first.as_ref(), 1, 10, "k-10").await;
    give_back(first.as_ref(), 1, 10, &r.token).await;
    assert_eq!(inspect(second.as_ref(), 1).await, None);

    let mut closing = coupon(1, 5);
    closing.issue_ends_at = Some(at(60_000));
    load(first.as_ref(), &snapshot(closing, &[(20, "k-20")]), at(0)).await;
    assert_eq!(
        view(second.as_ref(), 1).await,
        GateView {
            total: 5,
            taken: 2,
            issue_starts_at: t0(),
            issue_ends_at: Some(at(60_000)),
            issued: vec![(user_id(10), key("k-10")), (user_id(20), key("k-20"))],
            pending: Vec::new(),
        }
    );
    // Another coupon is still missing.
    assert_eq!(inspect(first.as_ref(), 2).await, None);
    assert_eq!(
        admit(first.as_ref(), &request(2, 10, "k-10", at(0))).await,
        GateAnswer::Missing
    );
}

/// Units go to the first requests, pending under their tokens since their admission,
/// until the stock is taken; then sold out.
pub async fn coupon_gate_admits_until_sold_out(first: Gate, second: Gate) {
    load(
        first.as_ref(),
        &snapshot(coupon(1, 3), &[(1, "k-1")]),
        at(0),
    )
    .await;
    assert_eq!(
        admit(first.as_ref(), &request(1, 2, "k-2", at(10))).await,
        GateAnswer::Admitted
    );
    assert_eq!(
        admit(second.as_ref(), &request(1, 3, "k-3", at(20))).await,
        GateAnswer::Admitted
    );
    assert_eq!(
        admit(first.as_ref(), &request(1, 4, "k-4", at(30))).await,
        SOLD_OUT
    );
    assert_eq!(
        admit(second.as_ref(), &request(1, 5, "k-5", at(40))).await,
        SOLD_OUT
    );
    let state = view(first.as_ref(), 1).await;
    assert_eq!(state.total, 3);
    assert_eq!(state.taken, 3);
    assert_eq!(issued(&state), BTreeSet::from([(1, "k-1".to_owned())]));
    assert_eq!(pending(&state), BTreeSet::from([(2, at(10)), (3, at(20))]));
}

/// A refusal is recorded under its key: the same request gets the very bytes back (and
/// their expiry) from either gate, even once the refusal no longer holds; another request
/// under the key is a reuse; other keys are answered afresh.
pub async fn coupon_gate_replays_a_recorded_refusal_byte_for_byte(first: Gate, second: Gate) {
    load(first.as_ref(), &snapshot(coupon(1, 1), &[]), at(0)).await;
    let holder = request(1, 1, "k-1", at(0));
    assert_eq!(admit(first.as_ref(), &holder).await, GateAnswer::Admitted);
    let refused = request(1, 2, "k-2", at(100));
    assert_eq!(admit(first.as_ref(), &refused).await, SOLD_OUT);

    // A later retry of the same request: its own request bytes differ, the record wins.
    let mut retry = request(1, 2, "k-2", at(5_000));
    retry.sold_out.body = b"other bytes".to_vec();
    let replayed = replay_of(&refused, &refused.sold_out);
    assert_eq!(admit(second.as_ref(), &retry).await, replayed);
    assert_eq!(admit(first.as_ref(), &retry).await, replayed);

    // Another request under the key.
    let mut reuse = request(1, 2, "k-2", at(6_000));
    reuse.fingerprint = Fingerprint::from_stored("issue:other");
    assert_eq!(admit(first.as_ref(), &reuse).await, GateAnswer::Reused);

    // A unit freed (the holder's step refused, its unit given back): the key still
    // replays its refusal, while a new key of the same user is admitted.
    give_back(first.as_ref(), 1, 1, &holder.token).await;
    assert_eq!(admit(second.as_ref(), &retry).await, replayed);
    assert_eq!(
        admit(second.as_ref(), &request(1, 2, "k-2b", at(7_000))).await,
        GateAnswer::Admitted
    );
    // The replay counted nothing.
    assert_eq!(view(first.as_ref(), 1).await.taken, 1);

    // Each refusal replays its own bytes: already-issued and not-open too.
    confirm(first.as_ref(), 1, 2, "k-2b").await;
    let again = request(1, 2, "k-2c", at(8_000));
    assert_eq!(admit(first.as_ref(), &again).await, ALREADY_ISSUED);
    assert_eq!(
        admit(second.as_ref(), &request(1, 2, "k-2c", at(9_000))).await,
        replay_of(&again, &again.already_issued)
    );
    let mut later = coupon(3, 1);
    later.issue_starts_at = at(1_000_000);
    load(first.as_ref(), &snapshot(later, &[]), at(0)).await;
    let early = request(3, 4, "k-4", at(0));
    assert_eq!(admit(first.as_ref(), &early).await, NOT_OPEN);
    assert_eq!(
        admit(second.as_ref(), &request(3, 4, "k-4", at(2_000_000))).await,
        replay_of(&early, &early.not_open)
    );
}

/// An answer the database stored under a key, recorded at the gate: the key's replays then
/// come from the gate with the database's bytes and expiry, even where the gate would have
/// decided it afresh; a record already there is kept; an expired answer records nothing.
pub async fn coupon_gate_records_what_the_database_answered(first: Gate, second: Gate) {
    load(
        first.as_ref(),
        &snapshot(coupon(1, 5), &[(1, "k-1")]),
        at(0),
    )
    .await;
    // The database refused user 1's second key (while the gate passed it).
    let second_key = request(1, 1, "k-1b", at(10));
    let stored = response(422, "COUPON_ALREADY_ISSUED", 1, "stored by the database");
    let expires = at(10) + chrono::Duration::milliseconds(RECORD_MS);
    let record = |gate: &Gate, response: &StoredResponse, now: DateTime<Utc>, expires| {
        let gate = Arc::clone(gate);
        let (fingerprint, response) = (second_key.fingerprint.clone(), response.clone());
        async move {
            bounded(
                "record",
                gate.record(
                    coupon_id(1),
                    user_id(1),
                    &key("k-1b"),
                    &fingerprint,
                    &response,
                    now,
                    expires,
                ),
            )
            .await
            .unwrap_or_else(|e| panic!("record: {e:?}"));
        }
    };
    record(&first, &stored, at(10), expires).await;
    let replayed = GateAnswer::Replay {
        response: stored.clone(),
        expires_at: expires,
    };
    assert_eq!(
        admit(second.as_ref(), &request(1, 1, "k-1b", at(20))).await,
        replayed
    );
    // A second copy does not replace the first.
    record(&second, &response(422, "OTHER", 1, "x"), at(30), expires).await;
    assert_eq!(
        admit(first.as_ref(), &request(1, 1, "k-1b", at(40))).await,
        replayed
    );
    // Another request under the key is a reuse; nothing was counted.
    let mut reuse = request(1, 1, "k-1b", at(50));
    reuse.fingerprint = Fingerprint::from_stored("issue:other");
    assert_eq!(admit(first.as_ref(), &reuse).await, GateAnswer::Reused);
    assert_eq!(view(first.as_ref(), 1).await.taken, 1);
    // An answer already expired leaves no record: the gate decides that key itself.
    let late = request(1, 2, "k-2", at(100));
    bounded(
        "record",
        first.record(
            coupon_id(1),
            user_id(2),
            &key("k-2"),
            &late.fingerprint,
            &stored,
            at(100),
            at(100),
        ),
    )
    .await
    .unwrap_or_else(|e| panic!("record: {e:?}"));
    assert_eq!(admit(second.as_ref(), &late).await, GateAnswer::Admitted);
}

/// A user the gate holds as issued: the same key passes (the database replays it), any
/// other key is refused as already issued, before the issue window and the stock are
/// looked at.
pub async fn coupon_gate_refuses_a_second_unit_to_a_holder(first: Gate, second: Gate) {
    let mut closed = coupon(1, 1);
    closed.issue_ends_at = Some(at(1_000));
    load(first.as_ref(), &snapshot(closed, &[(1, "k-1")]), at(0)).await;
    assert_eq!(
        admit(first.as_ref(), &request(1, 1, "k-1", at(5_000))).await,
        GateAnswer::Pass
    );
    // Sold out and closed, yet the answer is that the user has one.
    assert_eq!(
        admit(second.as_ref(), &request(1, 1, "k-other", at(5_000))).await,
        ALREADY_ISSUED
    );
    // Another user: closed comes before sold out.
    assert_eq!(
        admit(second.as_ref(), &request(1, 2, "k-2", at(5_000))).await,
        NOT_OPEN
    );
    assert_eq!(
        admit(second.as_ref(), &request(1, 3, "k-3", at(500))).await,
        SOLD_OUT
    );
    let state = view(first.as_ref(), 1).await;
    assert_eq!((state.taken, state.pending.len()), (1, 0));
}

/// A user with a unit pending passes, under its key or another (a retry, or a second
/// request racing it): the database decides, and no second unit is taken.
pub async fn coupon_gate_passes_a_user_with_a_pending_unit(first: Gate, second: Gate) {
    load(first.as_ref(), &snapshot(coupon(1, 5), &[]), at(0)).await;
    let admitted = request(1, 1, "k-1", at(10));
    assert_eq!(admit(first.as_ref(), &admitted).await, GateAnswer::Admitted);
    assert_eq!(
        admit(second.as_ref(), &request(1, 1, "k-1", at(20))).await,
        GateAnswer::Pass
    );
    assert_eq!(
        admit(first.as_ref(), &request(1, 1, "k-1b", at(30))).await,
        GateAnswer::Pass
    );
    let state = view(second.as_ref(), 1).await;
    assert_eq!(state.taken, 1);
    assert_eq!(pending(&state), BTreeSet::from([(1, at(10))]));
    // The passes took no unit and hold no token: only the admission's token frees it.
    give_back(first.as_ref(), 1, 1, "not-the-token").await;
    assert_eq!(view(first.as_ref(), 1).await.taken, 1);
    give_back(second.as_ref(), 1, 1, &admitted.token).await;
    let state = view(first.as_ref(), 1).await;
    assert_eq!((state.taken, state.pending.len()), (0, 0));
}

/// Issuing is open from `issue_starts_at` to (excluded) `issue_ends_at`, on the caller's
/// clock; a coupon without an end never closes.
pub async fn coupon_gate_refuses_outside_the_issue_window(first: Gate, second: Gate) {
    let mut window = coupon(1, 10);
    window.issue_starts_at = at(1_000);
    window.issue_ends_at = Some(at(5_000));
    load(first.as_ref(), &snapshot(window, &[]), at(0)).await;
    assert_eq!(
        admit(first.as_ref(), &request(1, 1, "k-1", at(999))).await,
        NOT_OPEN
    );
    assert_eq!(
        admit(second.as_ref(), &request(1, 2, "k-2", at(1_000))).await,
        GateAnswer::Admitted
    );
    assert_eq!(
        admit(second.as_ref(), &request(1, 3, "k-3", at(4_999))).await,
        GateAnswer::Admitted
    );
    assert_eq!(
        admit(first.as_ref(), &request(1, 4, "k-4", at(5_000))).await,
        NOT_OPEN
    );
    assert_eq!(view(first.as_ref(), 1).await.taken, 2);

    load(first.as_ref(), &snapshot(coupon(2, 10), &[]), at(0)).await;
    assert_eq!(
        admit(first.as_ref(), &request(2, 1, "k-1", at(-1))).await,
        NOT_OPEN
    );
    let far = at(100 * 365 * 24 * 3600 * 1000);
    assert_eq!(
        admit(second.as_ref(), &request(2, 5, "k-5", far)).await,
        GateAnswer::Admitted
    );
}

/// Confirm makes the user an issued holder counted once: a pending unit becomes issued,
/// a unit the gate did not hold is counted, an issued one is left alone; on a missing
/// gate it creates nothing.
pub async fn coupon_gate_confirm_counts_each_unit_once(first: Gate, second: Gate) {
    load(first.as_ref(), &snapshot(coupon(1, 5), &[]), at(0)).await;
    assert_eq!(
        admit(first.as_ref(), &request(1, 1, "k-1", at(10))).await,
        GateAnswer::Admitted
    );
    confirm(second.as_ref(), 1, 1, "k-1").await;
    confirm(first.as_ref(), 1, 1, "k-1").await;
    let state = view(first.as_ref(), 1).await;
    assert_eq!(state.taken, 1);
    assert_eq!(issued(&state), BTreeSet::from([(1, "k-1".to_owned())]));
    assert!(state.pending.is_empty());

    // Pending under one key, issued under another (a racing request of the same user).
    assert_eq!(
        admit(first.as_ref(), &request(1, 2, "k-2a", at(20))).await,
        GateAnswer::Admitted
    );
    confirm(second.as_ref(), 1, 2, "k-2b").await;
    // Issued without the gate (it passed the request): counted now, once.
    confirm(first.as_ref(), 1, 3, "k-3").await;
    confirm(second.as_ref(), 1, 3, "k-3").await;
    let state = view(second.as_ref(), 1).await;
    assert_eq!(state.taken, 3);
    assert_eq!(
        issued(&state),
        BTreeSet::from([
            (1, "k-1".to_owned()),
            (2, "k-2b".to_owned()),
            (3, "k-3".to_owned())
        ])
    );
    assert!(state.pending.is_empty());

    confirm(first.as_ref(), 9, 1, "k-1").await;
    assert_eq!(inspect(second.as_ref(), 9).await, None);
}

/// Give-back frees exactly the unit pending under its token, once: not with another
/// token, not twice, not after confirm; the freed unit goes to the next request.
pub async fn coupon_gate_give_back_frees_exactly_its_own_unit(first: Gate, second: Gate) {
    load(first.as_ref(), &snapshot(coupon(1, 2), &[]), at(0)).await;
    let one = request(1, 1, "k-1", at(10));
    let two = request(1, 2, "k-2", at(20));
    assert_eq!(admit(first.as_ref(), &one).await, GateAnswer::Admitted);
    assert_eq!(admit(second.as_ref(), &two).await, GateAnswer::Admitted);
    assert_eq!(
        admit(first.as_ref(), &request(1, 3, "k-3", at(30))).await,
        SOLD_OUT
    );

    give_back(first.as_ref(), 1, 1, &two.token).await;
    give_back(first.as_ref(), 1, 2, &one.token).await;
    give_back(first.as_ref(), 1, 1, "").await;
    give_back(first.as_ref(), 1, 1, &one.token[1..]).await;
    assert_eq!(view(second.as_ref(), 1).await.taken, 2);

    give_back(second.as_ref(), 1, 1, &one.token).await;
    give_back(first.as_ref(), 1, 1, &one.token).await;
    let state = view(first.as_ref(), 1).await;
    assert_eq!(state.taken, 1);
    assert_eq!(pending(&state), BTreeSet::from([(2, at(20))]));

    // Confirmed: its token frees nothing any more.
    confirm(first.as_ref(), 1, 2, "k-2").await;
    give_back(second.as_ref(), 1, 2, &two.token).await;
    assert_eq!(view(first.as_ref(), 1).await.taken, 1);

    // Exactly one unit is free: one more admission, then sold out again.
    assert_eq!(
        admit(second.as_ref(), &request(1, 4, "k-4", at(40))).await,
        GateAnswer::Admitted
    );
    assert_eq!(
        admit(first.as_ref(), &request(1, 5, "k-5", at(50))).await,
        SOLD_OUT
    );
    // The user whose unit was given back asks again under a new key: sold out too.
    assert_eq!(
        admit(first.as_ref(), &request(1, 1, "k-1b", at(60))).await,
        SOLD_OUT
    );
}

/// A load replaces the state with the snapshot's holders (issued, whatever the gate held
/// for them), keeps the users the gate held as issued that the snapshot lacks (written only
/// after a commit, so true: the snapshot was read before it), and keeps the units pending
/// for less than the stale-after of users held by neither, with their tokens and admission
/// times; stale ones are dropped.
pub async fn coupon_gate_load_keeps_fresh_pending_units_and_drops_stale_ones(
    first: Gate,
    second: Gate,
) {
    load(
        first.as_ref(),
        &snapshot(coupon(1, 10), &[(9, "k-9")]),
        at(0),
    )
    .await;
    let stale = request(1, 1, "k-1", at(1_000));
    let edge = request(1, 2, "k-2", at(5_000));
    let fresh = request(1, 3, "k-3", at(8_000));
    let committed = request(1, 4, "k-4", at(8_000));
    for r in [&stale, &edge, &fresh, &committed] {
        assert_eq!(admit(first.as_ref(), r).await, GateAnswer::Admitted);
    }
    // User 4's step committed; user 9, issued, is not in this snapshot (read before its
    // commit); the stock grew; loaded at 15 s: user 1 has been pending for 14 s.
    let mut grown = coupon(1, 20);
    grown.issue_ends_at = Some(at(90_000));
    load(
        second.as_ref(),
        &snapshot(grown, &[(4, "k-4"), (7, "k-7")]),
        at(5_000 + STALE_MS),
    )
    .await;
    let state = view(first.as_ref(), 1).await;
    assert_eq!(
        (state.total, state.taken, state.issue_ends_at),
        (20, 5, Some(at(90_000)))
    );
    assert_eq!(
        issued(&state),
        BTreeSet::from([
            (4, "k-4".to_owned()),
            (7, "k-7".to_owned()),
            (9, "k-9".to_owned())
        ])
    );
    assert_eq!(
        pending(&state),
        BTreeSet::from([(2, at(5_000)), (3, at(8_000))])
    );

    // The kept units keep their tokens: each frees only its own.
    give_back(first.as_ref(), 1, 3, &fresh.token).await;
    give_back(first.as_ref(), 1, 1, &stale.token).await;
    let state = view(second.as_ref(), 1).await;
    assert_eq!(state.taken, 4);
    assert_eq!(pending(&state), BTreeSet::from([(2, at(5_000))]));
    // User 9 is still a holder: another key of it is already issued.
    assert_eq!(
        admit(first.as_ref(), &request(1, 9, "k-9b", at(20_000))).await,
        ALREADY_ISSUED
    );
    // Loading an empty snapshot later drops everything pending, and no issued holder.
    load(first.as_ref(), &snapshot(coupon(1, 20), &[]), at(1_000_000)).await;
    let state = view(second.as_ref(), 1).await;
    assert_eq!(
        (state.taken, state.issued.len(), state.pending.len()),
        (3, 3, 0)
    );
}

/// A unit the gate lost in a rebuild (pending too long) whose step commits after all is
/// counted by its confirm, once.
pub async fn coupon_gate_confirm_after_a_load_that_lost_the_unit_counts_it_once(
    first: Gate,
    second: Gate,
) {
    load(first.as_ref(), &snapshot(coupon(1, 2), &[]), at(0)).await;
    let slow = request(1, 1, "k-1", at(100));
    assert_eq!(admit(first.as_ref(), &slow).await, GateAnswer::Admitted);
    load(
        second.as_ref(),
        &snapshot(coupon(1, 2), &[]),
        at(100 + STALE_MS + 1),
    )
    .await;
    let state = view(first.as_ref(), 1).await;
    assert_eq!((state.taken, state.pending.len()), (0, 0));

    confirm(first.as_ref(), 1, 1, "k-1").await;
    confirm(second.as_ref(), 1, 1, "k-1").await;
    let state = view(second.as_ref(), 1).await;
    assert_eq!(state.taken, 1);
    assert_eq!(issued(&state), BTreeSet::from([(1, "k-1".to_owned())]));
    // Its late give-back (a racing failure path) frees nothing.
    give_back(first.as_ref(), 1, 1, &slow.token).await;
    assert_eq!(view(first.as_ref(), 1).await.taken, 1);
    assert_eq!(
        admit(first.as_ref(), &request(1, 2, "k-2", at(20_000))).await,
        GateAnswer::Admitted
    );
    assert_eq!(
        admit(second.as_ref(), &request(1, 3, "k-3", at(20_000))).await,
        SOLD_OUT
    );
}

/// A sold-out answer is stale while some unit has been pending for longer than the
/// stale-after (on the caller's clock), and only then.
pub async fn coupon_gate_sold_out_says_when_a_unit_is_pending_too_long(first: Gate, second: Gate) {
    load(
        first.as_ref(),
        &snapshot(coupon(1, 2), &[(5, "k-5")]),
        at(0),
    )
    .await;
    assert_eq!(
        admit(first.as_ref(), &request(1, 1, "k-1", at(1_000))).await,
        GateAnswer::Admitted
    );
    assert_eq!(
        admit(second.as_ref(), &request(1, 2, "k-2", at(1_000 + STALE_MS))).await,
        SOLD_OUT
    );
    assert_eq!(
        admit(first.as_ref(), &request(1, 3, "k-3", at(1_001 + STALE_MS))).await,
        STALE_SOLD_OUT
    );
    // Only sold-out answers say so.
    assert_eq!(
        admit(first.as_ref(), &request(1, 5, "k-5b", at(1_001 + STALE_MS))).await,
        ALREADY_ISSUED
    );
    // Settled: no longer stale.
    confirm(second.as_ref(), 1, 1, "k-1").await;
    assert_eq!(
        admit(second.as_ref(), &request(1, 4, "k-4", at(2_000 + STALE_MS))).await,
        SOLD_OUT
    );
}

/// A recorded refusal lives until the request's `expires_at` (on the caller's clock):
/// replayed just before, answered afresh from then on, under a new expiry.
pub async fn coupon_gate_recorded_refusal_expires_with_its_expiry(first: Gate, second: Gate) {
    load(first.as_ref(), &snapshot(coupon(1, 1), &[]), at(0)).await;
    let holder = request(1, 1, "k-1", at(0));
    assert_eq!(admit(first.as_ref(), &holder).await, GateAnswer::Admitted);
    let mut refused = request(1, 2, "k-2", at(0));
    refused.expires_at = at(60_000);
    assert_eq!(admit(first.as_ref(), &refused).await, SOLD_OUT);
    let mut reuse = request(1, 2, "k-2", at(59_999));
    reuse.fingerprint = Fingerprint::from_stored("issue:other");
    assert_eq!(admit(second.as_ref(), &reuse).await, GateAnswer::Reused);
    assert_eq!(
        admit(second.as_ref(), &request(1, 2, "k-2", at(59_999))).await,
        replay_of(&refused, &refused.sold_out)
    );

    // Expired: the key is free. Another request under it is answered afresh...
    give_back(first.as_ref(), 1, 1, &holder.token).await;
    let mut after = request(1, 2, "k-2", at(60_000));
    after.fingerprint = Fingerprint::from_stored("issue:other");
    assert_eq!(admit(second.as_ref(), &after).await, GateAnswer::Admitted);
    confirm(first.as_ref(), 1, 2, "k-2").await;

    // ... and a new refusal lives by its own expiry.
    let late = request(1, 3, "k-3", at(70_000));
    assert_eq!(admit(first.as_ref(), &late).await, SOLD_OUT);
    assert_eq!(
        admit(second.as_ref(), &request(1, 3, "k-3", at(80_000))).await,
        replay_of(&late, &late.sold_out)
    );
    // A refusal whose expiry is already past is answered but not recorded.
    let mut gone = request(1, 4, "k-4", at(90_000));
    gone.expires_at = at(90_000);
    assert_eq!(admit(first.as_ref(), &gone).await, SOLD_OUT);
    let mut reuse = request(1, 4, "k-4", at(90_000));
    reuse.fingerprint = Fingerprint::from_stored("issue:other");
    assert_eq!(admit(second.as_ref(), &reuse).await, SOLD_OUT);
}

/// Forget drops the coupon's state (the next admit is `Missing`) but not the refusals it
/// recorded, which replay once it is loaded again.
pub async fn coupon_gate_forget_drops_the_state_but_keeps_the_records(first: Gate, second: Gate) {
    load(
        first.as_ref(),
        &snapshot(coupon(1, 1), &[(1, "k-1")]),
        at(0),
    )
    .await;
    load(first.as_ref(), &snapshot(coupon(2, 1), &[]), at(0)).await;
    let refused = request(1, 2, "k-2", at(10));
    assert_eq!(admit(first.as_ref(), &refused).await, SOLD_OUT);
    bounded("forget", second.forget(coupon_id(1)))
        .await
        .unwrap_or_else(|e| panic!("forget: {e:?}"));
    assert_eq!(inspect(first.as_ref(), 1).await, None);
    assert_eq!(admit(first.as_ref(), &refused).await, GateAnswer::Missing);
    // Other coupons keep theirs.
    assert_eq!(view(first.as_ref(), 2).await.total, 1);

    load(
        second.as_ref(),
        &snapshot(coupon(1, 5), &[(1, "k-1")]),
        at(20),
    )
    .await;
    assert_eq!(
        admit(first.as_ref(), &request(1, 2, "k-2", at(30))).await,
        replay_of(&refused, &refused.sold_out)
    );
    assert_eq!(
        admit(first.as_ref(), &request(1, 3, "k-3", at(30))).await,
        GateAnswer::Admitted
    );
}

/// `users` rush coupon 1 at once, alternating between the gates, at `now`: each one's
/// request (with its token) and answer.
async fn rush(
    first: &Gate,
    second: &Gate,
    users: std::ops::RangeInclusive<i64>,
    now: DateTime<Utc>,
) -> Vec<(GateRequest, GateAnswer)> {
    let tasks: Vec<_> = users
        .map(|user| {
            let gate = Arc::clone(if user % 2 == 0 { first } else { second });
            let request = request(1, user, &format!("k-{user}"), now);
            tokio::spawn(async move {
                let answer = admit(gate.as_ref(), &request).await;
                (request.request, answer)
            })
        })
        .collect();
    let mut answers = Vec::new();
    for task in tasks {
        answers.push(
            bounded("a rushing admit", task)
                .await
                .expect("the admit task finishes"),
        );
    }
    answers
}

/// The users admitted in a rush; every other answer must be a sold-out.
fn admitted_in(answers: &[(GateRequest, GateAnswer)]) -> Vec<&GateRequest> {
    answers
        .iter()
        .filter_map(|(request, answer)| match answer {
            GateAnswer::Admitted => Some(request),
            &SOLD_OUT => None,
            other => panic!("user {} got {other:?}", request.user),
        })
        .collect()
}

/// 200 users rush a stock of 20 at once, through both gates: exactly 20 are admitted,
/// every other one is refused as sold out, and the gate holds exactly the admitted.
/// Half of them then confirm and half give back, all at once: a second rush gets
/// exactly the 10 units given back.
pub async fn coupon_gate_admits_exactly_the_stock_under_concurrency(first: Gate, second: Gate) {
    load(first.as_ref(), &snapshot(coupon(1, 20), &[]), at(0)).await;
    let answers = rush(&first, &second, 1..=200, at(10)).await;
    let admitted = admitted_in(&answers);
    assert_eq!(admitted.len(), 20);
    let state = view(first.as_ref(), 1).await;
    assert_eq!(state.taken, 20);
    let held: BTreeSet<UserId> = state.pending.iter().map(|&(u, _)| u).collect();
    let expected: BTreeSet<UserId> = admitted.iter().map(|r| r.user).collect();
    assert_eq!(held, expected);

    let settles: Vec<_> = admitted
        .iter()
        .enumerate()
        .map(|(i, request)| {
            let gate = Arc::clone(if i % 2 == 0 { &first } else { &second });
            let request = (*request).clone();
            tokio::spawn(async move {
                let (coupon, user) = (request.coupon.get(), request.user.get());
                if i % 2 == 0 {
                    confirm(gate.as_ref(), coupon, user, request.key.as_str()).await;
                } else {
                    // Twice, from both sides: still one unit.
                    give_back(gate.as_ref(), coupon, user, &request.token).await;
                    give_back(gate.as_ref(), coupon, user, &request.token).await;
                }
            })
        })
        .collect();
    for task in settles {
        bounded("a settle", task)
            .await
            .expect("the settle task finishes");
    }
    let state = view(second.as_ref(), 1).await;
    assert_eq!(
        (state.taken, state.issued.len(), state.pending.len()),
        (10, 10, 0)
    );

    let answers = rush(&first, &second, 201..=400, at(20)).await;
    assert_eq!(admitted_in(&answers).len(), 10);
    let state = view(first.as_ref(), 1).await;
    assert_eq!(
        (state.taken, state.issued.len(), state.pending.len()),
        (20, 10, 10)
    );
}

/// A snapshot of 100,000 holders loads in one call, and the gate then knows every one.
pub async fn coupon_gate_loads_a_large_snapshot(first: Gate, second: Gate) {
    const HOLDERS: i64 = 100_000;
    let keys: Vec<String> = (1..=HOLDERS).map(|u| format!("key-{u}")).collect();
    let holders: Vec<(i64, &str)> = (1..=HOLDERS)
        .map(|u| (u, keys[usize::try_from(u - 1).expect("an index")].as_str()))
        .collect();
    let total = u32::try_from(HOLDERS).expect("a small stock") + 1;
    load(first.as_ref(), &snapshot(coupon(1, total), &holders), at(0)).await;
    let state = view(second.as_ref(), 1).await;
    assert_eq!(state.taken, total - 1);
    assert_eq!(
        state.issued.len(),
        usize::try_from(HOLDERS).expect("a count")
    );
    assert_eq!(
        issued(&state).get(&(77_777, "key-77777".to_owned())),
        Some(&(77_777, "key-77777".to_owned()))
    );
    assert_eq!(
        admit(second.as_ref(), &request(1, 54_321, "key-54321", at(10))).await,
        GateAnswer::Pass
    );
    assert_eq!(
        admit(second.as_ref(), &request(1, 54_321, "another", at(10))).await,
        ALREADY_ISSUED
    );
    assert_eq!(
        admit(first.as_ref(), &request(1, HOLDERS + 1, "k-new", at(10))).await,
        GateAnswer::Admitted
    );
    assert_eq!(
        admit(first.as_ref(), &request(1, HOLDERS + 2, "k-late", at(10))).await,
        SOLD_OUT
    );
    // Reloaded with the same snapshot: the fresh pending unit is kept, counted once.
    load(
        second.as_ref(),
        &snapshot(coupon(1, total), &holders),
        at(20),
    )
    .await;
    let state = view(first.as_ref(), 1).await;
    assert_eq!(state.taken, total);
    assert_eq!(state.pending.len(), 1);
}
