#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Property tests of the value types (what each validating constructor accepts, exactly)
//! and of the idempotency state machine (which transitions exist and what each answers).

use chrono::{DateTime, Utc};
use proptest::prelude::*;

use domain::claims::ClaimRegistry;
use domain::idempotency::{
    Admission, CompletedRecord, Fingerprint, KeyState, RecordOutcome, StoredResponse,
};
use domain::model::EntryKind;
use domain::operations::{OperationKind, charge, pay, use_balance};
use domain::types::{
    Amount, Balance, EntryId, IdempotencyKey, Limits, OrderId, PageLimit, PaymentId, UserId,
};

// ---------------------------------------------------------------------------------------
// Strategies
// ---------------------------------------------------------------------------------------

/// Strings around the interesting shapes of a decimal id: digits, signs, spaces, other text.
fn id_like() -> impl Strategy<Value = String> {
    prop_oneof![
        "[0-9]{0,22}",
        "[1-9][0-9]{17,19}",
        "[-+ 0-9]{0,21}",
        "[0-9]{1,5}[^0-9][0-9]{0,5}",
        any::<String>(),
        any::<i64>().prop_map(|n| n.to_string()),
        any::<u64>().prop_map(|n| n.to_string()),
        any::<i128>().prop_map(|n| n.to_string()),
    ]
}

fn no_leading_zero(s: &str) -> bool {
    !s.starts_with('0')
}

fn limits() -> impl Strategy<Value = Limits> {
    let ceiling = prop_oneof![1_i64..=1_000, 1_i64..=i64::MAX, Just(i64::MAX)];
    (ceiling.clone(), ceiling).prop_map(|(a, b)| Limits::new(a, b).unwrap())
}

/// A value near zero, near `ceiling`, or anywhere.
fn around(ceiling: i64) -> impl Strategy<Value = i64> {
    prop_oneof![
        any::<i64>(),
        -2_i64..=2,
        ceiling.saturating_sub(2)..=ceiling.saturating_add(2),
    ]
}

/// A valid balance under `limits`, often close to its ceiling.
fn balance_under(limits: Limits) -> impl Strategy<Value = Balance> {
    let max = limits.max_balance;
    prop_oneof![
        0..=max,
        max.saturating_sub(3).max(0)..=max,
        0_i64..=3.min(max),
    ]
    .prop_map(move |b| Balance::new(b, &limits).unwrap())
}

/// A valid amount under `limits`.
fn amount_under(limits: Limits) -> impl Strategy<Value = Amount> {
    let max = limits.max_amount;
    prop_oneof![
        1..=max,
        max.saturating_sub(3).max(1)..=max,
        1_i64..=3.min(max)
    ]
    .prop_map(move |a| Amount::new(a, &limits).unwrap())
}

fn user_id() -> impl Strategy<Value = UserId> {
    (1_i64..=1_000).prop_map(|n| UserId::new(n).unwrap())
}

fn fingerprint() -> impl Strategy<Value = Fingerprint> {
    let amount = (1_i64..=1_000).prop_map(|n| Amount::new(n, &Limits::default()).unwrap());
    let order = (1_i64..=1_000).prop_map(|n| OrderId::new(n).unwrap());
    prop_oneof![
        (user_id(), amount.clone()).prop_map(|(u, a)| charge::fingerprint(u, a)),
        (user_id(), amount).prop_map(|(u, a)| use_balance::fingerprint(u, a)),
        (user_id(), order).prop_map(|(u, o)| pay::fingerprint(u, o, None)),
    ]
}

fn two_fingerprints() -> impl Strategy<Value = (Fingerprint, Fingerprint)> {
    (fingerprint(), fingerprint()).prop_filter("distinct", |(a, b)| a != b)
}

fn response() -> impl Strategy<Value = StoredResponse> {
    (100_u16..600, proptest::collection::vec(any::<u8>(), 0..64))
        .prop_map(|(status, body)| StoredResponse { status, body })
}

fn instant() -> impl Strategy<Value = DateTime<Utc>> {
    (0_i64..=4_000_000_000_000).prop_map(|ms| DateTime::from_timestamp_millis(ms).unwrap())
}

fn key() -> impl Strategy<Value = IdempotencyKey> {
    "[!-~]{1,40}".prop_map(|k| IdempotencyKey::parse(&k).unwrap())
}

/// A completed record with a lifetime of `1..=ttl_ms` milliseconds.
fn record(fingerprint: Fingerprint) -> impl Strategy<Value = CompletedRecord> {
    (user_id(), key(), response(), instant(), 1_i64..=172_800_000).prop_map(
        move |(user_id, key, response, created_at, ttl)| CompletedRecord {
            user_id,
            key,
            fingerprint: fingerprint.clone(),
            operation: OperationKind::Charge,
            outcome: RecordOutcome::Applied,
            response,
            created_at,
            expires_at: created_at + chrono::Duration::milliseconds(ttl),
        },
    )
}

fn ms(n: i64) -> chrono::Duration {
    chrono::Duration::milliseconds(n)
}

// ---------------------------------------------------------------------------------------
// Ids
// ---------------------------------------------------------------------------------------

proptest! {
    #[test]
    fn every_positive_i64_in_decimal_is_a_user_id(n in prop_oneof![1_i64..=i64::MAX, 1_i64..=20, Just(i64::MAX)]) {
        prop_assert_eq!(UserId::parse(&n.to_string()).map(UserId::get), Ok(n));
        prop_assert_eq!(UserId::new(n).map(UserId::get), Ok(n));
        prop_assert_eq!(UserId::new(n).unwrap().to_string(), n.to_string());
    }

    #[test]
    fn zero_negatives_and_numbers_past_i64_are_not_user_ids(
        n in prop_oneof![i64::MIN..=0, Just(0), Just(i64::MIN)],
        past in (u128::from(i64::MAX.unsigned_abs()) + 1)..=u128::MAX,
    ) {
        prop_assert!(UserId::new(n).is_err());
        prop_assert!(UserId::parse(&n.to_string()).is_err());
        prop_assert!(UserId::parse(&past.to_string()).is_err());
    }

    /// Without leading zeros, a string is a user id exactly when it is the decimal form of
    /// a positive i64: no sign, no space, no other character.
    #[test]
    fn user_id_parse_accepts_exactly_positive_decimal_i64s(s in id_like()) {
        let canonical = s.parse::<i64>().ok().filter(|n| *n >= 1 && n.to_string() == s);
        let parsed = UserId::parse(&s).map(UserId::get).ok();
        if no_leading_zero(&s) {
            prop_assert_eq!(parsed, canonical, "{:?}", s);
        } else {
            // Leading zeros: whatever is accepted is digits naming that same number.
            if let Some(n) = parsed {
                prop_assert!(s.bytes().all(|b| b.is_ascii_digit()));
                prop_assert_eq!(s.parse::<i64>().ok(), Some(n));
            }
        }
    }

    /// The other ids share UserId's rules.
    #[test]
    fn order_payment_and_entry_ids_parse_like_user_ids(s in id_like()) {
        let user = UserId::parse(&s).map(UserId::get).ok();
        prop_assert_eq!(OrderId::parse(&s).map(OrderId::get).ok(), user);
        prop_assert_eq!(PaymentId::parse(&s).map(PaymentId::get).ok(), user);
        prop_assert_eq!(EntryId::parse(&s).map(EntryId::get).ok(), user);
    }
}

// ---------------------------------------------------------------------------------------
// Idempotency keys
// ---------------------------------------------------------------------------------------

fn key_like() -> impl Strategy<Value = String> {
    prop_oneof![
        "[!-~]{1,255}",
        "[!-~]{250,260}",
        "[ -\\x7f]{0,20}",
        "[!-~]{0,5}[\\x00-\\x20\\x7f][!-~]{0,5}",
        "[!-~]{0,5}[^\\x00-\\x7f][!-~]{0,5}",
        any::<String>(),
    ]
}

proptest! {
    #[test]
    fn idempotency_key_parse_accepts_exactly_1_to_255_visible_ascii_characters(s in key_like()) {
        let valid = (1..=255).contains(&s.chars().count())
            && s.chars().all(|c| ('\u{21}'..='\u{7e}').contains(&c));
        match IdempotencyKey::parse(&s) {
            Ok(k) => {
                prop_assert!(valid, "accepted {:?}", s);
                prop_assert_eq!(k.as_str(), s.as_str());
                prop_assert_eq!(k.to_string(), s);
            }
            Err(_) => prop_assert!(!valid, "refused {:?}", s),
        }
    }
}

#[test]
fn idempotency_key_length_bounds() {
    assert!(IdempotencyKey::parse("").is_err());
    assert!(IdempotencyKey::parse("!").is_ok());
    assert!(IdempotencyKey::parse(&"~".repeat(255)).is_ok());
    assert!(IdempotencyKey::parse(&"~".repeat(256)).is_err());
    assert!(IdempotencyKey::parse("a b").is_err());
    assert!(IdempotencyKey::parse("é").is_err());
}

// ---------------------------------------------------------------------------------------
// Page limits
// ---------------------------------------------------------------------------------------

#[test]
fn page_limit_accepts_exactly_1_to_500_among_canonical_numbers() {
    for n in 0..=10_000_u32 {
        let parsed = PageLimit::parse(&n.to_string()).map(PageLimit::get).ok();
        let expected = (1..=500).contains(&n).then_some(n);
        assert_eq!(parsed, expected, "{n}");
    }
    assert_eq!(PageLimit::default().get(), 50);
}

proptest! {
    #[test]
    fn page_limit_parse_accepts_exactly_the_strings_1_to_500(s in id_like()) {
        let canonical = (1..=500_u32).find(|n| n.to_string() == s);
        let parsed = PageLimit::parse(&s).map(PageLimit::get).ok();
        if no_leading_zero(&s) {
            prop_assert_eq!(parsed, canonical, "{:?}", s);
        } else if let Some(n) = parsed {
            prop_assert!(s.bytes().all(|b| b.is_ascii_digit()));
            prop_assert_eq!(s.parse::<u32>().ok(), Some(n));
        }
    }
}

// ---------------------------------------------------------------------------------------
// Limits, amounts and balances
// ---------------------------------------------------------------------------------------

proptest! {
    #[test]
    fn limits_need_both_ceilings_positive(a in around(0), b in around(0)) {
        prop_assert_eq!(Limits::new(a, b).is_ok(), a >= 1 && b >= 1);
    }

    #[test]
    fn amount_new_accepts_exactly_1_to_max_amount(
        (limits, v) in limits().prop_flat_map(|l| (Just(l), around(l.max_amount))),
    ) {
        let got = Amount::new(v, &limits).map(Amount::get).ok();
        let expected = (1..=limits.max_amount).contains(&v).then_some(v);
        prop_assert_eq!(got, expected);
    }

    #[test]
    fn balance_new_accepts_exactly_0_to_max_balance(
        (limits, v) in limits().prop_flat_map(|l| (Just(l), around(l.max_balance))),
    ) {
        let got = Balance::new(v, &limits).map(Balance::get).ok();
        let expected = (0..=limits.max_balance).contains(&v).then_some(v);
        prop_assert_eq!(got, expected);
    }

    /// A credit is refused exactly when it would pass the ceiling (overflow included), and
    /// never yields a balance outside 0..=max_balance.
    #[test]
    fn credit_never_passes_the_ceiling(
        (limits, balance, amount) in limits()
            .prop_flat_map(|l| (Just(l), balance_under(l), amount_under(l))),
    ) {
        let sum = i128::from(balance.get()) + i128::from(amount.get());
        match balance.credit(amount, &limits) {
            Some(after) => {
                prop_assert_eq!(i128::from(after.get()), sum);
                prop_assert!((0..=limits.max_balance).contains(&after.get()));
                prop_assert_eq!(after.debit(amount), Some(balance), "a debit undoes it");
            }
            None => prop_assert!(sum > i128::from(limits.max_balance)),
        }
    }

    /// A debit is refused exactly when the amount is above the balance, and never goes
    /// below zero.
    #[test]
    fn debit_never_goes_below_zero(
        (limits, balance, amount) in limits()
            .prop_flat_map(|l| (Just(l), balance_under(l), amount_under(l))),
    ) {
        match balance.debit(amount) {
            Some(after) => {
                prop_assert_eq!(after.get(), balance.get() - amount.get());
                prop_assert!(after.get() >= 0);
                prop_assert!(after.get() <= limits.max_balance);
                prop_assert_eq!(after.credit(amount, &limits), Some(balance), "a credit undoes it");
            }
            None => prop_assert!(amount.get() > balance.get()),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Fingerprints
// ---------------------------------------------------------------------------------------

proptest! {
    /// Two requests share a fingerprint exactly when they are the same operation, user and
    /// parameter: otherwise a reused key would replay another request's answer.
    #[test]
    fn fingerprints_tell_requests_apart(
        u1 in user_id(), u2 in user_id(), x1 in 1_i64..=1_000, x2 in 1_i64..=1_000,
    ) {
        let l = Limits::default();
        let (a1, a2) = (Amount::new(x1, &l).unwrap(), Amount::new(x2, &l).unwrap());
        let (o1, o2) = (OrderId::new(x1).unwrap(), OrderId::new(x2).unwrap());
        let same = u1 == u2 && x1 == x2;
        prop_assert_eq!(charge::fingerprint(u1, a1) == charge::fingerprint(u2, a2), same);
        prop_assert_eq!(use_balance::fingerprint(u1, a1) == use_balance::fingerprint(u2, a2), same);
        prop_assert_eq!(pay::fingerprint(u1, o1, None) == pay::fingerprint(u2, o2, None), same);
        prop_assert_ne!(charge::fingerprint(u1, a1), use_balance::fingerprint(u2, a2));
        prop_assert_ne!(charge::fingerprint(u1, a1), pay::fingerprint(u2, o2, None));
        prop_assert_ne!(use_balance::fingerprint(u1, a1), pay::fingerprint(u2, o2, None));
        let stored = Fingerprint::from_stored(charge::fingerprint(u1, a1).as_str());
        prop_assert_eq!(stored, charge::fingerprint(u1, a1));
    }
}

// ---------------------------------------------------------------------------------------
// The idempotency state machine
// ---------------------------------------------------------------------------------------

proptest! {
    #[test]
    fn a_free_key_admits_a_run_and_is_claimed(fp in fingerprint(), now in instant()) {
        prop_assert_eq!(KeyState::Free.admit(&fp, now), Admission::Run);
        prop_assert_eq!(
            KeyState::Free.claim(fp.clone(), now),
            Ok(KeyState::InFlight { fingerprint: fp })
        );
    }

    /// Until its expiry a completed key replays the very same response to its fingerprint,
    /// however often it is asked; from the expiry on it is free.
    #[test]
    fn a_completed_key_replays_its_response_until_expiry_then_runs(
        (rec, before, after) in fingerprint().prop_flat_map(record).prop_flat_map(|r| {
            let life = (r.expires_at - r.created_at).num_milliseconds();
            (Just(r), proptest::collection::vec(0..life, 1..8), 0_i64..=10_000_000_000)
        }),
    ) {
        let state = KeyState::Completed(rec.clone());
        let fp = rec.fingerprint.clone();
        for offset in before {
            let t = rec.created_at + ms(offset);
            prop_assert_eq!(state.admit(&fp, t), Admission::Replay(rec.response.clone()));
            prop_assert_eq!(state.clone().claim(fp.clone(), t), Err(Admission::Replay(rec.response.clone())));
        }
        let expired = rec.expires_at + ms(after);
        prop_assert_eq!(state.admit(&fp, expired), Admission::Run);
        prop_assert_eq!(
            state.claim(fp.clone(), expired),
            Ok(KeyState::InFlight { fingerprint: fp })
        );
    }

    #[test]
    fn a_completed_key_refuses_another_fingerprint_as_reused_until_expiry(
        (rec, other, offset) in two_fingerprints().prop_flat_map(|(a, b)| (record(a), Just(b)))
            .prop_flat_map(|(r, b)| {
                let life = (r.expires_at - r.created_at).num_milliseconds();
                (Just(r), Just(b), 0..life)
            }),
    ) {
        let state = KeyState::Completed(rec.clone());
        let t = rec.created_at + ms(offset);
        prop_assert_eq!(state.admit(&other, t), Admission::Reused);
        prop_assert_eq!(state.clone().claim(other.clone(), t), Err(Admission::Reused));
        prop_assert_eq!(state.admit(&other, rec.expires_at), Admission::Run);
    }

    #[test]
    fn an_in_flight_key_is_in_use_for_its_fingerprint_and_reused_for_others(
        (held, other) in two_fingerprints(), now in instant(),
    ) {
        let state = KeyState::InFlight { fingerprint: held.clone() };
        prop_assert_eq!(state.admit(&held, now), Admission::InUse);
        prop_assert_eq!(state.admit(&other, now), Admission::Reused);
        prop_assert_eq!(state.clone().claim(held, now), Err(Admission::InUse));
        prop_assert_eq!(state.clone().claim(other, now), Err(Admission::Reused));
    }

}

/// One step of a random walk over one key's life.
#[derive(Debug, Clone)]
enum Step {
    Claim(usize),
    Complete(usize, StoredResponse, i64),
    Release,
    Wait(i64),
}

fn steps() -> impl Strategy<Value = Vec<Step>> {
    let step = prop_oneof![
        (0_usize..3).prop_map(Step::Claim),
        (0_usize..3, response(), 1_i64..=1_000).prop_map(|(f, r, ttl)| Step::Complete(f, r, ttl)),
        Just(Step::Release),
        (0_i64..=1_500).prop_map(Step::Wait),
    ];
    proptest::collection::vec(step, 1..40)
}

proptest! {
    /// Every ledger kind moves a balance by exactly its signed amount (or not at all when the
    /// result would leave 0..=MAX_BALANCE): the arithmetic and `EntryKind::sign` agree.
    #[test]
    fn a_balance_moves_by_the_sign_of_its_entry_kind(
        (limits, balance, amount) in limits().prop_flat_map(|l| (Just(l), balance_under(l), amount_under(l))),
    ) {
        for kind in EntryKind::ALL {
            let want = i128::from(balance.get()) + i128::from(kind.sign()) * i128::from(amount.get());
            let got = balance.moved(kind, amount, &limits).map(|b| i128::from(b.get()));
            let in_bounds = (0..=i128::from(limits.max_balance)).contains(&want);
            prop_assert_eq!(got, in_bounds.then_some(want), "{:?}", kind);
        }
    }
}

proptest! {
    /// Walks one key through random claims, completions, releases and waits and checks
    /// every answer against the contract: a completed key replays the response of the
    /// completion that made it (and nothing else) until it expires, a key is never claimed
    /// twice, and a completion or release outside the in-flight state changes nothing.
    #[test]
    fn a_key_walks_the_state_machine_by_the_contract(walk in steps()) {
        let fps = [
            Fingerprint::from_stored("charge:user=1:amount=10"),
            Fingerprint::from_stored("charge:user=1:amount=11"),
            Fingerprint::from_stored("use:user=1:amount=10"),
        ];
        let user = UserId::new(1).unwrap();
        let key = IdempotencyKey::parse("walk").unwrap();
        let mut now = DateTime::from_timestamp_millis(1_795_356_000_000).unwrap();
        let mut state = KeyState::Free;
        // What the contract says the key holds: nothing, a holder, or (fp, response, expiry).
        let mut holder: Option<Fingerprint> = None;
        let mut done: Option<(Fingerprint, StoredResponse, DateTime<Utc>)> = None;

        for step in walk {
            match step {
                Step::Claim(i) => {
                    let fp = &fps[i];
                    let live = done.as_ref().filter(|(_, _, exp)| now < *exp);
                    let expected = match (&holder, live) {
                        (Some(h), _) if h == fp => Err(Admission::InUse),
                        (Some(_), _) => Err(Admission::Reused),
                        (None, Some((f, r, _))) if f == fp => Err(Admission::Replay(r.clone())),
                        (None, Some(_)) => Err(Admission::Reused),
                        (None, None) => Ok(()),
                    };
                    match (state.clone().claim(fp.clone(), now), expected) {
                        (Ok(next), Ok(())) => {
                            prop_assert_eq!(&next, &KeyState::InFlight { fingerprint: fp.clone() });
                            state = next;
                            holder = Some(fp.clone());
                            done = None;
                        }
                        (Err(got), Err(want)) => prop_assert_eq!(got, want),
                        (got, want) => {
                            return Err(TestCaseError::fail(format!("claim: got {got:?}, want {want:?}")));
                        }
                    }
                }
                Step::Complete(i, response, ttl) => {
                    // Only the holder's request completes (its atomic step writes the record).
                    if holder.as_ref() == Some(&fps[i]) {
                        state = KeyState::Completed(CompletedRecord {
                            user_id: user,
                            key: key.clone(),
                            fingerprint: fps[i].clone(),
                            operation: OperationKind::Charge,
                            outcome: RecordOutcome::Applied,
                            response: response.clone(),
                            created_at: now,
                            expires_at: now + ms(ttl),
                        });
                        holder = None;
                        done = Some((fps[i].clone(), response, now + ms(ttl)));
                    }
                }
                Step::Release => {
                    // A failure that is not stored drops the holder's claim.
                    if holder.take().is_some() {
                        state = KeyState::Free;
                    }
                }
                Step::Wait(d) => now += ms(d),
            }
            // Every fingerprint gets the answer the contract gives at this instant.
            for fp in &fps {
                let live = done.as_ref().filter(|(_, _, exp)| now < *exp);
                let want = match (&holder, live) {
                    (Some(h), _) if h == fp => Admission::InUse,
                    (Some(_), _) => Admission::Reused,
                    (None, Some((f, r, _))) if f == fp => Admission::Replay(r.clone()),
                    (None, Some(_)) => Admission::Reused,
                    (None, None) => Admission::Run,
                };
                prop_assert_eq!(state.admit(fp, now), want);
            }
        }
    }

    /// The in-flight registry applies the same rules per (user, key), and a dropped claim
    /// frees its key.
    #[test]
    fn claims_hold_a_key_per_user_until_dropped(
        (fp, other) in two_fingerprints(), u1 in user_id(), u2 in user_id(), k in key(),
    ) {
        let registry = ClaimRegistry::new();
        let held = registry.claim(u1, &k, &fp).unwrap();
        prop_assert_eq!(registry.claim(u1, &k, &fp).err(), Some(Admission::InUse));
        prop_assert_eq!(registry.claim(u1, &k, &other).err(), Some(Admission::Reused));
        if u1 != u2 {
            let elsewhere = registry.claim(u2, &k, &fp);
            prop_assert!(elsewhere.is_ok(), "another user's key is another key");
        }
        prop_assert_eq!(registry.in_flight(), 1);
        drop(held);
        prop_assert_eq!(registry.in_flight(), 0);
        prop_assert!(registry.claim(u1, &k, &other).is_ok());
    }
}
