//! The JSON shapes of the API (camelCase, money as integers, times RFC 3339 UTC with ms).

use domain::model::{LedgerEntry, Order, Payment, User};
use domain::time::format_rfc3339_millis;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct BalanceResponse {
    #[schema(example = 1)]
    pub user_id: i64,
    #[schema(example = 110000)]
    pub balance: i64,
}

impl From<&User> for BalanceResponse {
    fn from(user: &User) -> Self {
        Self {
            user_id: user.id.get(),
            balance: user.balance.get(),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ChargeResponse {
    pub user_id: i64,
    pub balance: i64,
    #[schema(example = 10000)]
    pub charged_amount: i64,
    #[schema(example = "2026-11-22T14:00:00.123Z")]
    pub transaction_time: String,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct UseResponse {
    pub user_id: i64,
    pub balance: i64,
    #[schema(example = 10000)]
    pub used_amount: i64,
    #[schema(example = "2026-11-22T14:00:00.123Z")]
    pub transaction_time: String,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PaymentResponse {
    #[schema(example = 3)]
    pub payment_id: i64,
    #[schema(example = 9)]
    pub order_id: i64,
    pub user_id: i64,
    #[schema(example = 15000)]
    pub amount: i64,
    /// The user's balance right after the payment.
    #[schema(example = 95000)]
    pub balance: i64,
    #[schema(example = "COMPLETED")]
    pub status: String,
    #[schema(example = "2026-11-22T14:00:00.123Z")]
    pub paid_at: String,
}

impl From<&Payment> for PaymentResponse {
    fn from(p: &Payment) -> Self {
        Self {
            payment_id: p.id.get(),
            order_id: p.order_id.get(),
            user_id: p.user_id.get(),
            amount: p.amount.get(),
            balance: p.balance_after.get(),
            status: "COMPLETED".to_owned(),
            paid_at: format_rfc3339_millis(p.paid_at),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct OrderResponse {
    #[schema(example = 9)]
    pub order_id: i64,
    pub user_id: i64,
    #[schema(example = 15000)]
    pub amount: i64,
    /// PENDING or PAID.
    #[schema(example = "PENDING")]
    pub status: String,
    #[schema(example = "2026-11-22T14:00:00.123Z")]
    pub created_at: String,
}

impl From<&Order> for OrderResponse {
    fn from(o: &Order) -> Self {
        Self {
            order_id: o.id.get(),
            user_id: o.user_id.get(),
            amount: o.amount.get(),
            status: o.status.as_str().to_owned(),
            created_at: format_rfc3339_millis(o.created_at),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct HistoryItem {
    #[schema(example = 7)]
    pub id: i64,
    /// CHARGE, USE or PAYMENT.
    #[serde(rename = "type")]
    #[schema(example = "CHARGE")]
    pub kind: String,
    /// Always positive; `type` gives the direction.
    #[schema(example = 10000)]
    pub amount: i64,
    #[schema(example = 110000)]
    pub balance_after: i64,
    /// Null for a seeded opening balance.
    pub idempotency_key: Option<String>,
    #[schema(example = "2026-11-22T14:00:00.123Z")]
    pub created_at: String,
}

impl From<&LedgerEntry> for HistoryItem {
    fn from(e: &LedgerEntry) -> Self {
        Self {
            id: e.id.get(),
            kind: e.kind.as_str().to_owned(),
            amount: e.amount.get(),
            balance_after: e.balance_after.get(),
            idempotency_key: e.idempotency_key.as_ref().map(|k| k.as_str().to_owned()),
            created_at: format_rfc3339_millis(e.created_at),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct HistoryResponse {
    pub items: Vec<HistoryItem>,
    /// The `before` value for the next page; null on the last page.
    pub next: Option<i64>,
}

// ----- request bodies, as documented; parsing is done by `crate::body` -----

/// Body of a charge or a use.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[allow(dead_code)] // documents the body in the OpenAPI document
pub struct AmountRequest {
    /// 1..=MAX_AMOUNT (1000000000 by default).
    #[schema(example = 10000, minimum = 1, maximum = 1_000_000_000)]
    pub amount: i64,
    /// Optional if the `Idempotency-Key` header is sent; both must then agree.
    #[schema(
        example = "3f1c2a9e-6a1b-4a59-9d4e-2b7f0c8f1d11",
        min_length = 1,
        max_length = 255,
        pattern = "^[\\x21-\\x7E]+$"
    )]
    pub idempotency_key: Option<String>,
}

/// Body of an order.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[allow(dead_code)]
pub struct OrderRequest {
    #[schema(example = 1, minimum = 1)]
    pub user_id: i64,
    /// 1..=MAX_AMOUNT (1000000000 by default).
    #[schema(example = 15000, minimum = 1, maximum = 1_000_000_000)]
    pub amount: i64,
}

/// Body of a payment.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[allow(dead_code)]
pub struct PaymentRequest {
    #[schema(example = 9, minimum = 1)]
    pub order_id: i64,
    #[schema(example = 1, minimum = 1)]
    pub user_id: i64,
    #[schema(
        example = "3f1c2a9e-6a1b-4a59-9d4e-2b7f0c8f1d11",
        min_length = 1,
        max_length = 255,
        pattern = "^[\\x21-\\x7E]+$"
    )]
    pub idempotency_key: Option<String>,
}

/// Body of a new user: empty, or an empty object (no initial balance through the API).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub struct CreateUserRequest {}
