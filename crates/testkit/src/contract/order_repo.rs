//! The `OrderRepo` contract: orders are created PENDING and read back; unknown orders and
//! payments are `None`. (Payments are written by the atomic step: see `balance_store`.)

use domain::model::OrderStatus;
use domain::types::PaymentId;

use super::Stores;
use super::support::{amount, at, order_id};

/// `create_order` writes a PENDING order of the user with increasing ids; `get_order`
/// reads it back exactly; unknown order and payment ids answer `None`.
pub async fn order_repo_creates_and_reads(stores: &Stores) {
    let user = stores.users.create_user(at(0)).await.unwrap().id;

    let first = stores
        .orders
        .create_order(user, amount(500), at(1))
        .await
        .unwrap();
    let second = stores
        .orders
        .create_order(user, amount(700), at(2))
        .await
        .unwrap();
    assert_eq!(
        (
            first.user_id,
            first.amount.get(),
            first.status,
            first.created_at
        ),
        (user, 500, OrderStatus::Pending, at(1))
    );
    assert_eq!(
        (
            second.user_id,
            second.amount.get(),
            second.status,
            second.created_at
        ),
        (user, 700, OrderStatus::Pending, at(2))
    );
    assert!(
        second.id > first.id,
        "ids increase: {} after {}",
        second.id,
        first.id
    );

    assert_eq!(
        stores.orders.get_order(first.id).await.unwrap(),
        Some(first)
    );
    assert_eq!(
        stores.orders.get_order(second.id).await.unwrap(),
        Some(second.clone())
    );
    let unknown = order_id(second.id.get() + 1_000);
    assert_eq!(stores.orders.get_order(unknown).await.unwrap(), None);
    let no_payment = PaymentId::new(1).unwrap();
    assert_eq!(
        stores.orders.get_payment(no_payment).await.unwrap(),
        None,
        "nothing was paid yet"
    );
}
