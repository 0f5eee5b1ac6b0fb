//! The `UserRepo` contract: creation, reads, history pages and seeding.

use domain::model::{EntryKind, LedgerEntry, User};
use domain::types::{Balance, EntryId};

use super::Stores;
use super::support::{
    amount, apply_ok, at, balance, current, entry_of, full_history, key, ledger_sum, t0, user_id,
};

/// `create_user` hands out increasing ids, each user with balance 0, version 0 and the
/// given creation instant; `get_user` reads it back, and answers `None` for an id nobody
/// has. A user without entries has an empty history, as has an unknown user.
pub async fn user_repo_creates_and_reads(stores: &Stores) {
    let users = stores.users.as_ref();
    let mut created: Vec<User> = Vec::new();
    for i in 0..3 {
        let now = at(i * 1_000 + 123);
        let user = users.create_user(now).await.expect("create_user");
        assert_eq!(user.balance, Balance::ZERO, "a new user has nothing");
        assert_eq!(user.version, 0, "a new user has written nothing");
        assert_eq!(user.created_at, now);
        if let Some(previous) = created.last() {
            assert!(
                user.id > previous.id,
                "ids increase: {} after {}",
                user.id,
                previous.id
            );
        }
        created.push(user);
    }
    for user in &created {
        assert_eq!(users.get_user(user.id).await.unwrap().as_ref(), Some(user));
        let page = users.history(user.id, None, 50).await.unwrap();
        assert!(page.items.is_empty(), "{page:?}");
        assert_eq!(page.next, None);
    }

    let last = created.last().map_or(0, |user| user.id.get());
    let unknown = user_id(last + 1_000);
    assert_eq!(users.get_user(unknown).await.unwrap(), None);
    let page = users.history(unknown, None, 50).await.unwrap();
    assert!(page.items.is_empty(), "{page:?}");
    assert_eq!(page.next, None);
}

/// `history` answers the user's entries newest first (by id), only those below `before`,
/// at most `limit`; `next` is the last item's id while older entries remain and `None` on
/// the last page, also when that page is exactly full. Other users' entries never show,
/// and `before` need not be an id of this user.
pub async fn user_repo_pages_history_newest_first(stores: &Stores) {
    let users = stores.users.as_ref();
    let me = users.create_user(t0()).await.unwrap().id;
    let other = users.create_user(t0()).await.unwrap().id;

    // Seven entries of mine (charges and uses), with some of the other user's in between,
    // so my ids are not contiguous.
    let mut mine: Vec<LedgerEntry> = Vec::new();
    let mut theirs: Vec<EntryId> = Vec::new();
    let mut running = 0;
    for i in 0..7_i64 {
        let (kind, value) = if i % 3 == 2 {
            (EntryKind::Use, 50)
        } else {
            (EntryKind::Charge, 100 * (i + 1))
        };
        let raw = format!("h-{i}");
        let when = at(i * 10);
        let applied = apply_ok(stores, me, kind, value, &raw, when).await;
        running += kind.sign() * value;
        mine.push(LedgerEntry {
            id: entry_of(&applied),
            user_id: me,
            kind,
            amount: amount(value),
            balance_after: balance(running),
            idempotency_key: Some(key(&raw)),
            created_at: when,
        });
        if i % 2 == 0 {
            let applied = apply_ok(stores, other, EntryKind::Charge, 1, &raw, when).await;
            theirs.push(entry_of(&applied));
        }
    }
    for pair in mine.windows(2) {
        assert!(
            pair[1].id > pair[0].id,
            "entry ids grow with time: {pair:?}"
        );
    }
    let newest_first: Vec<LedgerEntry> = mine.iter().rev().cloned().collect();
    let ids = |entries: &[LedgerEntry]| entries.iter().map(|e| e.id.get()).collect::<Vec<_>>();

    let all = users.history(me, None, 500).await.unwrap();
    assert_eq!(
        all.items, newest_first,
        "every field of every entry, newest first"
    );
    assert_eq!(all.next, None);

    // Exactly full: seven entries on a page of seven is the last page.
    let exact = users.history(me, None, 7).await.unwrap();
    assert_eq!(ids(&exact.items), ids(&newest_first));
    assert_eq!(
        exact.next, None,
        "a page that holds the oldest entry is the last"
    );
    let short = users.history(me, None, 6).await.unwrap();
    assert_eq!(ids(&short.items), ids(&newest_first[..6]));
    assert_eq!(short.next, Some(newest_first[5].id));

    // Paging from the top with every page size walks the whole ledger once.
    for limit in 1..=8_u32 {
        let mut seen: Vec<LedgerEntry> = Vec::new();
        let mut before = None;
        loop {
            let page = users.history(me, before, limit).await.unwrap();
            assert!(
                !page.items.is_empty() && page.items.len() <= limit as usize,
                "limit {limit}, before {before:?}: {} items",
                page.items.len()
            );
            seen.extend(page.items.iter().cloned());
            if seen.len() < newest_first.len() {
                let last = page.items.last().map(|entry| entry.id);
                assert_eq!(page.next, last, "limit {limit}: next names the last item");
                before = page.next;
            } else {
                assert_eq!(page.next, None, "limit {limit}: the last page has no next");
                break;
            }
        }
        assert_eq!(ids(&seen), ids(&newest_first), "limit {limit}");
    }

    // `before` between my entries, at another user's entry: only mine below it.
    for before in &theirs {
        let page = users.history(me, Some(*before), 500).await.unwrap();
        let expected: Vec<i64> = ids(&newest_first)
            .into_iter()
            .filter(|id| *id < before.get())
            .collect();
        assert_eq!(ids(&page.items), expected, "before {before}");
        assert_eq!(page.next, None);
    }
    let newest = newest_first[0].id.get();
    let above = users
        .history(me, EntryId::new(newest + 1_000).ok(), 3)
        .await
        .unwrap();
    assert_eq!(ids(&above.items), ids(&newest_first[..3]));
    assert_eq!(above.next, Some(newest_first[2].id));
    let oldest = newest_first[6].id;
    let below = users.history(me, Some(oldest), 3).await.unwrap();
    assert!(below.items.is_empty(), "nothing is older than the oldest");
    assert_eq!(below.next, None);

    let their_history = full_history(users, other).await;
    assert!(their_history.iter().all(|entry| entry.user_id == other));
    let mut their_ids: Vec<i64> = their_history.iter().map(|e| e.id.get()).collect();
    their_ids.reverse();
    assert_eq!(
        their_ids,
        theirs.iter().map(|id| id.get()).collect::<Vec<_>>()
    );
}

/// `seed_users` creates the users 1..=count that do not exist yet, each with the balance
/// and one opening CHARGE entry without a key (so the ledger sums to the balance), leaves
/// existing users alone, and says how many it created; running it again creates none.
/// Users created afterwards get higher ids. A zero balance needs no entry.
pub async fn user_repo_seeds_idempotently(stores: &Stores) {
    let users = stores.users.as_ref();

    assert_eq!(users.seed_users(0, balance(1_000), t0()).await.unwrap(), 0);
    assert_eq!(users.seed_users(3, balance(1_000), t0()).await.unwrap(), 3);
    assert_eq!(users.seed_users(3, balance(1_000), t0()).await.unwrap(), 0);
    assert_eq!(users.seed_users(5, balance(1_000), at(5)).await.unwrap(), 2);

    for raw in 1..=5 {
        let id = user_id(raw);
        let seeded = current(users, id).await;
        let when = if raw <= 3 { t0() } else { at(5) };
        assert_eq!(
            (seeded.balance.get(), seeded.version, seeded.created_at),
            (1_000, 0, when),
            "user {raw}"
        );
        let ledger = full_history(users, id).await;
        assert_eq!(
            ledger.len(),
            1,
            "one opening entry for user {raw}: {ledger:?}"
        );
        let opening = &ledger[0];
        assert_eq!(opening.user_id, id);
        assert_eq!(opening.kind, EntryKind::Charge);
        assert_eq!(opening.amount.get(), 1_000);
        assert_eq!(opening.balance_after.get(), 1_000);
        assert_eq!(opening.idempotency_key, None, "seeded entries have no key");
        assert_eq!(opening.created_at, when);
        assert_eq!(ledger_sum(&ledger), seeded.balance.get());
    }

    // An existing user is left as it is, with its history.
    apply_ok(stores, user_id(2), EntryKind::Use, 300, "spend", at(10)).await;
    let spent = current(users, user_id(2)).await;
    let spent_history = full_history(users, user_id(2)).await;
    assert_eq!(
        users.seed_users(6, balance(1_000), at(20)).await.unwrap(),
        1
    );
    assert_eq!(current(users, user_id(2)).await, spent);
    assert_eq!(full_history(users, user_id(2)).await, spent_history);
    assert_eq!(ledger_sum(&spent_history), 700);

    // Created users come after the seeded ones.
    let created = users.create_user(at(30)).await.unwrap();
    assert!(
        created.id.get() > 6,
        "created user {} collides with the seeded 1..=6",
        created.id
    );
    assert_eq!(created.balance, Balance::ZERO);

    // Seeding past it: it is skipped, the gap before it and the ids after it are filled.
    let count = created.id.get() + 2;
    let seeded = users
        .seed_users(u32::try_from(count).unwrap(), Balance::ZERO, at(40))
        .await
        .unwrap();
    assert_eq!(
        seeded,
        u64::try_from(count - 7).unwrap(),
        "all of 7..={count} but {}",
        created.id
    );
    assert_eq!(current(users, created.id).await, created);
    for raw in 7..=count {
        let id = user_id(raw);
        let user = current(users, id).await;
        let ledger = full_history(users, id).await;
        assert_eq!(user.balance, Balance::ZERO, "user {raw}");
        assert_eq!(ledger_sum(&ledger), 0, "user {raw}: {ledger:?}");
        assert!(ledger.iter().all(|entry| entry.amount.get() > 0));
    }
}

/// Seeding a store where users were created first: those keep their state, every other
/// id up to `count` is seeded, and the next created user comes after all of them.
pub async fn user_repo_seeding_skips_created_users(stores: &Stores) {
    let users = stores.users.as_ref();
    let first = users.create_user(t0()).await.unwrap();
    let second = users.create_user(t0()).await.unwrap();
    let count = second.id.get() + 3;

    let seeded = users
        .seed_users(u32::try_from(count).unwrap(), balance(500), at(1))
        .await
        .unwrap();
    assert_eq!(
        seeded,
        u64::try_from(count - 2).unwrap(),
        "all of 1..={count} but two"
    );
    for raw in 1..=count {
        let id = user_id(raw);
        let user = current(users, id).await;
        let ledger = full_history(users, id).await;
        if id == first.id || id == second.id {
            assert_eq!(
                user.balance,
                Balance::ZERO,
                "created user {raw} is left alone"
            );
            assert!(ledger.is_empty(), "created user {raw}: {ledger:?}");
        } else {
            assert_eq!(
                (user.balance.get(), user.version),
                (500, 0),
                "seeded user {raw}"
            );
            assert_eq!(ledger.len(), 1, "seeded user {raw}: {ledger:?}");
        }
        assert_eq!(ledger_sum(&ledger), user.balance.get(), "user {raw}");
    }
    assert_eq!(
        users
            .seed_users(u32::try_from(count).unwrap(), balance(500), at(2))
            .await
            .unwrap(),
        0
    );

    let next = users.create_user(at(3)).await.unwrap();
    assert!(
        next.id.get() > count,
        "created user {} collides with the seeded 1..={count}",
        next.id
    );
}

/// Seeding with a zero balance creates the users without any ledger entry (an opening
/// CHARGE of nothing is no entry at all), so each ledger still sums to its balance.
pub async fn user_repo_seeding_a_zero_balance_writes_no_entries(stores: &Stores) {
    let users = stores.users.as_ref();
    assert_eq!(users.seed_users(3, Balance::ZERO, t0()).await.unwrap(), 3);
    for raw in 1..=3 {
        let seeded = current(users, user_id(raw)).await;
        assert_eq!(
            (seeded.balance, seeded.version, seeded.created_at),
            (Balance::ZERO, 0, t0()),
            "user {raw}"
        );
        let ledger = full_history(users, user_id(raw)).await;
        assert!(ledger.is_empty(), "user {raw}: {ledger:?}");
    }
    assert_eq!(users.seed_users(3, Balance::ZERO, at(1)).await.unwrap(), 0);
}
