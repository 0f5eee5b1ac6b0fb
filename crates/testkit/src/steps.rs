//! Hand-built atomic steps, for the adapter suites that write books directly through
//! `BalanceStore` (as the use case would, without it).

// Test support: a step no operation builds is a broken test, and a panic is how it fails.
#![allow(clippy::panic)]

use domain::model::EntryKind;
use domain::operations::{Effect, Movement, OperationKind};
use domain::types::{Amount, Balance, OrderId};

/// The effect of a step that writes a `kind` entry of `amount` leaving `balance_after`
/// (and, for a payment, pays `order`), with the operation that writes it.
///
/// # Panics
/// For a payment without an order, or an order with another kind: no operation does that.
pub fn effect(
    kind: EntryKind,
    amount: Amount,
    balance_after: Balance,
    order: Option<OrderId>,
) -> (Effect, OperationKind) {
    let movement = Movement {
        amount,
        balance_after,
    };
    match (kind, order) {
        (EntryKind::Charge, None) => (Effect::Charge(movement), OperationKind::Charge),
        (EntryKind::Use, None) => (Effect::Use(movement), OperationKind::Use),
        (EntryKind::Payment, Some(order)) => {
            let pay = Effect::Pay {
                order,
                movement,
                coupon: None,
            };
            (pay, OperationKind::Payment)
        }
        other => panic!("no operation writes {other:?}"),
    }
}
