//! The JSON shapes of the API (camelCase, money as integers, times RFC 3339 UTC with ms).

use domain::idempotency::CompletedRecord;
use domain::model::{LedgerEntry, Order, Payment, Refund, User};
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
    /// COMPLETED when paid; on `GET /api/payments/{id}` also PARTIALLY_REFUNDED or
    /// REFUNDED.
    #[schema(example = "COMPLETED")]
    pub status: String,
    #[schema(example = "2026-11-22T14:00:00.123Z")]
    pub paid_at: String,
    /// How much of the amount has been refunded (`GET /api/payments/{id}` only; the
    /// payment's own answer is as it was when it was paid).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(example = 0)]
    pub refunded_total: Option<i64>,
}

impl From<&Payment> for PaymentResponse {
    fn from(p: &Payment) -> Self {
        Self {
            payment_id: p.id.get(),
            order_id: p.order_id.get(),
            user_id: p.user_id.get(),
            amount: p.amount.get(),
            balance: p.balance_after.get(),
            status: p.status().as_str().to_owned(),
            paid_at: format_rfc3339_millis(p.paid_at),
            refunded_total: Some(p.refunded_total),
        }
    }
}

/// A refund, as its request answers it and as the payment's refunds list it.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RefundResponse {
    #[schema(example = 4)]
    pub refund_id: i64,
    #[schema(example = 3)]
    pub payment_id: i64,
    #[schema(example = 9)]
    pub order_id: i64,
    pub user_id: i64,
    #[schema(example = 5000)]
    pub amount: i64,
    /// The user's balance right after the refund.
    #[schema(example = 100000)]
    pub balance: i64,
    /// The payment's refunded total right after the refund.
    #[schema(example = 5000)]
    pub refunded_total: i64,
    /// The payment's status right after the refund: PARTIALLY_REFUNDED or REFUNDED.
    #[schema(example = "PARTIALLY_REFUNDED")]
    pub payment_status: String,
    /// The request's `reason`, null when it gave none.
    #[schema(example = "size")]
    pub reason: Option<String>,
    #[schema(example = "2026-11-22T14:00:00.123Z")]
    pub created_at: String,
}

impl From<&Refund> for RefundResponse {
    fn from(r: &Refund) -> Self {
        Self {
            refund_id: r.id.get(),
            payment_id: r.payment_id.get(),
            order_id: r.order_id.get(),
            user_id: r.user_id.get(),
            amount: r.amount.get(),
            balance: r.balance_after.get(),
            refunded_total: r.refunded_total,
            payment_status: r.payment_status.as_str().to_owned(),
            reason: r.reason.as_ref().map(|reason| reason.as_str().to_owned()),
            created_at: format_rfc3339_millis(r.created_at),
        }
    }
}

/// A payment's refunds, oldest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct RefundsResponse {
    pub items: Vec<RefundResponse>,
}

/// A user's balance at a past time.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct BalanceAtResponse {
    #[schema(example = 1)]
    pub user_id: i64,
    #[schema(example = 90000)]
    pub balance: i64,
    /// The time asked for, in UTC with milliseconds.
    #[schema(example = "2026-11-22T14:00:00.000Z")]
    pub at: String,
}

/// What became of a request: its stored answer.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RequestResponse {
    #[schema(example = "3f1c2a9e-6a1b-4a59-9d4e-2b7f0c8f1d11")]
    pub idempotency_key: String,
    /// CHARGE, USE, PAYMENT or REFUND.
    #[schema(example = "CHARGE")]
    pub operation: String,
    /// The HTTP status the request was (and is, on a replay) answered with.
    #[schema(example = 200)]
    pub status: u16,
    /// The stored body, byte for byte: the success or the problem the request answered.
    #[schema(value_type = Object)]
    pub response: Box<serde_json::value::RawValue>,
    #[schema(example = "2026-11-22T14:00:00.123Z")]
    pub created_at: String,
    /// After this the record is gone and the key may be used afresh.
    #[schema(example = "2026-11-23T14:00:00.123Z")]
    pub expires_at: String,
}

impl RequestResponse {
    /// `None` when the stored body is not JSON (no version ever stored such a body).
    pub fn of(record: &CompletedRecord) -> Option<Self> {
        let body = String::from_utf8(record.response.body.clone()).ok()?;
        Some(Self {
            idempotency_key: record.key.as_str().to_owned(),
            operation: record.operation.as_str().to_owned(),
            status: record.response.status,
            response: serde_json::value::RawValue::from_string(body).ok()?,
            created_at: format_rfc3339_millis(record.created_at),
            expires_at: format_rfc3339_millis(record.expires_at),
        })
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
    /// PENDING, PAID, CANCELLED or REFUNDED.
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
    /// CHARGE, USE, PAYMENT or REFUND.
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

/// Body of a refund.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[allow(dead_code)]
pub struct RefundRequest {
    /// 1..=MAX_AMOUNT, at most what is left of the payment; absent: all that is left.
    #[schema(example = 5000, minimum = 1, maximum = 1_000_000_000)]
    pub amount: Option<i64>,
    #[schema(
        example = "3f1c2a9e-6a1b-4a59-9d4e-2b7f0c8f1d11",
        min_length = 1,
        max_length = 255,
        pattern = "^[\\x21-\\x7E]+$"
    )]
    pub idempotency_key: Option<String>,
    /// Why, in the client's words: at most 255 characters, no control characters. Stored
    /// with the refund; not part of the request's fingerprint.
    #[schema(example = "size", max_length = 255)]
    pub reason: Option<String>,
}

/// Body of a new user: empty, or an empty object (no initial balance through the API).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub struct CreateUserRequest {}
