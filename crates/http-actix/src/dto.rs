//! The JSON shapes of the API (camelCase, money as integers, times RFC 3339 UTC with ms):
//! the answers, and the request bodies that the handlers read and the OpenAPI document shows.

use std::collections::BTreeMap;

use domain::idempotency::CompletedRecord;
use domain::model::{Coupon, LedgerEntry, Order, Payment, Refund, User, UserCoupon};
use domain::outcome::RefundReceipt;
use domain::time::format_rfc3339_millis;
use domain::types::{Amount, Limits, OrderId, UserCouponId, UserId};
use serde::de::IgnoredAny;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa::openapi::RefOr;
use utoipa::openapi::schema::{AdditionalProperties, ObjectBuilder, Schema};

use crate::body::{self, Field, Integer, KeyedBody};
use crate::problem::ApiError;

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
    /// With a coupon only: the part of the order's amount the coupon paid (`amount` is
    /// what the balance paid: the order's amount less this, possibly 0).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(example = 5000)]
    pub discount: Option<i64>,
    /// With a coupon only: the user coupon the payment used.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(example = 7)]
    pub user_coupon_id: Option<i64>,
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
            discount: p.coupon.map(|used| used.discount.get()),
            user_coupon_id: p.coupon.map(|used| used.user_coupon.get()),
        }
    }
}

/// A coupon: its stock, discount and issuing window.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CouponResponse {
    #[schema(example = 1)]
    pub coupon_id: i64,
    #[schema(example = "WELCOME")]
    pub name: String,
    #[schema(example = 5000)]
    pub discount: i64,
    #[schema(example = 100)]
    pub total_quantity: u32,
    /// How many were issued so far (never above `totalQuantity`).
    #[schema(example = 0)]
    pub issued_quantity: u32,
    #[schema(example = "2026-11-22T14:00:00.000Z")]
    pub issue_starts_at: String,
    /// Null: issuing never closes.
    #[schema(example = json!(null))]
    pub issue_ends_at: Option<String>,
    #[schema(example = 30)]
    pub valid_for_days: u32,
}

impl From<&Coupon> for CouponResponse {
    fn from(c: &Coupon) -> Self {
        Self {
            coupon_id: c.id.get(),
            name: c.name.as_str().to_owned(),
            discount: c.discount.get(),
            total_quantity: c.total_quantity,
            issued_quantity: c.issued_quantity,
            issue_starts_at: format_rfc3339_millis(c.issue_starts_at),
            issue_ends_at: c.issue_ends_at.map(format_rfc3339_millis),
            valid_for_days: c.valid_for_days,
        }
    }
}

/// A coupon issued to a user, as its issue answers it and as the user's coupons list it.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct UserCouponResponse {
    #[schema(example = 7)]
    pub user_coupon_id: i64,
    #[schema(example = 1)]
    pub coupon_id: i64,
    #[schema(example = 1)]
    pub user_id: i64,
    #[schema(example = 5000)]
    pub discount: i64,
    /// AVAILABLE, USED (by a payment not refunded in full) or EXPIRED.
    #[schema(example = "AVAILABLE")]
    pub status: String,
    #[schema(example = "2026-11-22T14:00:00.123Z")]
    pub issued_at: String,
    #[schema(example = "2026-12-22T14:00:00.123Z")]
    pub expires_at: String,
}

impl UserCouponResponse {
    /// The user coupon as it is at `now`.
    pub fn at(c: &UserCoupon, now: chrono::DateTime<chrono::Utc>) -> Self {
        Self {
            user_coupon_id: c.id.get(),
            coupon_id: c.coupon_id.get(),
            user_id: c.user_id.get(),
            discount: c.discount.get(),
            status: c.status_at(now).as_str().to_owned(),
            issued_at: format_rfc3339_millis(c.issued_at),
            expires_at: format_rfc3339_millis(c.expires_at),
        }
    }
}

/// A user's coupons, newest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct UserCouponsResponse {
    pub items: Vec<UserCouponResponse>,
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
    /// A listed refund reads exactly as its request's answer did.
    fn from(r: &Refund) -> Self {
        Self::from(&RefundReceipt::from(r))
    }
}

impl From<&RefundReceipt> for RefundResponse {
    fn from(r: &RefundReceipt) -> Self {
        Self {
            refund_id: r.refund_id.get(),
            payment_id: r.payment_id.get(),
            order_id: r.order_id.get(),
            user_id: r.user_id.get(),
            amount: r.amount.get(),
            balance: r.balance.get(),
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
    /// CHARGE, USE, PAYMENT, REFUND or COUPON_ISSUE.
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
    pub fn of(record: CompletedRecord) -> Option<Self> {
        let body = String::from_utf8(record.response.body).ok()?;
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
    /// CHARGE, USE, PAYMENT, REFUND or COUPON_ISSUE.
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

// ----- request bodies: what the handlers read (`crate::body::read`), and the schemas -----
//
// Each field is a `Field`, which takes any JSON value; the methods below refuse what is
// wrong, in the API's words, one field after the other in a fixed order. The `schema`
// attributes say what a field must be, for the OpenAPI document.

/// Body of a charge or a use.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AmountRequest {
    /// 1..=MAX_AMOUNT (1000000000 by default).
    #[schema(value_type = i64, required = true, example = 10000, minimum = 1, maximum = 1_000_000_000)]
    #[serde(default)]
    pub amount: Integer,
    /// Optional if the `Idempotency-Key` header is sent; both must then agree.
    #[schema(
        value_type = Option<String>,
        example = "3f1c2a9e-6a1b-4a59-9d4e-2b7f0c8f1d11",
        min_length = 1,
        max_length = 255,
        pattern = "^[\\x21-\\x7E]+$"
    )]
    #[serde(default)]
    pub idempotency_key: Field<String>,
}

impl AmountRequest {
    pub fn amount(&self, limits: &Limits) -> Result<Amount, ApiError> {
        body::amount(&self.amount, limits)
    }
}

impl KeyedBody for AmountRequest {
    fn idempotency_key(&self) -> &Field<String> {
        &self.idempotency_key
    }
}

/// Body of an order.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct OrderRequest {
    #[schema(value_type = i64, required = true, example = 1, minimum = 1)]
    #[serde(default)]
    pub user_id: Integer,
    /// 1..=MAX_AMOUNT (1000000000 by default).
    #[schema(value_type = i64, required = true, example = 15000, minimum = 1, maximum = 1_000_000_000)]
    #[serde(default)]
    pub amount: Integer,
}

impl OrderRequest {
    pub fn user_id(&self) -> Result<UserId, ApiError> {
        body::id(&self.user_id, "userId", UserId::new)
    }

    pub fn amount(&self, limits: &Limits) -> Result<Amount, ApiError> {
        body::amount(&self.amount, limits)
    }
}

/// Body of a payment.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PaymentRequest {
    #[schema(value_type = i64, required = true, example = 9, minimum = 1)]
    #[serde(default)]
    pub order_id: Integer,
    #[schema(value_type = i64, required = true, example = 1, minimum = 1)]
    #[serde(default)]
    pub user_id: Integer,
    #[schema(
        value_type = Option<String>,
        example = "3f1c2a9e-6a1b-4a59-9d4e-2b7f0c8f1d11",
        min_length = 1,
        max_length = 255,
        pattern = "^[\\x21-\\x7E]+$"
    )]
    #[serde(default)]
    pub idempotency_key: Field<String>,
    /// A user coupon of this user to pay part of the order with (its discount is taken
    /// off the amount, never below 0).
    #[schema(value_type = Option<i64>, example = 7, minimum = 1)]
    #[serde(default)]
    pub user_coupon_id: Integer,
}

impl PaymentRequest {
    pub fn order_id(&self) -> Result<OrderId, ApiError> {
        body::id(&self.order_id, "orderId", OrderId::new)
    }

    pub fn user_id(&self) -> Result<UserId, ApiError> {
        body::id(&self.user_id, "userId", UserId::new)
    }

    pub fn user_coupon_id(&self) -> Result<Option<UserCouponId>, ApiError> {
        body::optional_id(&self.user_coupon_id, "userCouponId", UserCouponId::new)
    }
}

/// Body of a new coupon (`POST /api/coupons`).
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CouponRequest {
    /// 1 to 100 characters.
    #[schema(value_type = String, required = true, example = "WELCOME", min_length = 1, max_length = 100)]
    #[serde(default)]
    pub name: Field<String>,
    /// 1..=MAX_AMOUNT: taken off the amount of the order it pays.
    #[schema(value_type = i64, required = true, example = 5000, minimum = 1, maximum = 1_000_000_000)]
    #[serde(default)]
    pub discount: Integer,
    #[schema(value_type = i64, required = true, example = 100, minimum = 1, maximum = 10_000_000)]
    #[serde(default)]
    pub total_quantity: Integer,
    /// RFC 3339; absent: now.
    #[schema(value_type = Option<String>, format = DateTime, example = "2026-11-22T14:00:00.000Z")]
    #[serde(default)]
    pub issue_starts_at: Field<String>,
    /// RFC 3339, after `issueStartsAt`; absent: issuing never closes.
    #[schema(value_type = Option<String>, format = DateTime, example = "2026-11-29T14:00:00.000Z")]
    #[serde(default)]
    pub issue_ends_at: Field<String>,
    /// How long an issued coupon stays usable; absent: 30.
    #[schema(value_type = Option<i64>, example = 30, minimum = 1, maximum = 3650)]
    #[serde(default)]
    pub valid_for_days: Integer,
}

impl CouponRequest {
    pub fn name(&self) -> Result<String, ApiError> {
        match &self.name {
            Field::Given(name) => Ok(name.clone()),
            Field::Absent => Err(ApiError::validation("name is required")),
            Field::Wrong => Err(ApiError::validation("name must be a string")),
        }
    }

    pub fn discount(&self, limits: &Limits) -> Result<Amount, ApiError> {
        match body::integer(&self.discount, "discount")? {
            None => Err(ApiError::validation("discount is required")),
            Some(v) => Amount::new(v, limits)
                .map_err(|e| ApiError::validation(e.0.replacen("amount", "discount", 1))),
        }
    }

    pub fn total_quantity(&self) -> Result<i64, ApiError> {
        body::integer(&self.total_quantity, "totalQuantity")?
            .ok_or_else(|| ApiError::validation("totalQuantity is required"))
    }

    pub fn valid_for_days(&self) -> Result<Option<i64>, ApiError> {
        body::integer(&self.valid_for_days, "validForDays")
    }

    /// `(issueStartsAt, issueEndsAt)` as given (strings), each `None` when absent.
    pub fn window(&self) -> Result<(Option<String>, Option<String>), ApiError> {
        let text = |field: &Field<String>, name: &str| match field {
            Field::Absent => Ok(None),
            Field::Given(raw) => Ok(Some(raw.clone())),
            Field::Wrong => Err(ApiError::validation(format!("{name} must be a string"))),
        };
        Ok((
            text(&self.issue_starts_at, "issueStartsAt")?,
            text(&self.issue_ends_at, "issueEndsAt")?,
        ))
    }
}

/// Body of a coupon issue (`POST /api/coupons/{couponId}/issue`).
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct IssueRequest {
    #[schema(value_type = i64, required = true, example = 1, minimum = 1)]
    #[serde(default)]
    pub user_id: Integer,
    /// Optional if the `Idempotency-Key` header is sent; both must then agree.
    #[schema(
        value_type = Option<String>,
        example = "3f1c2a9e-6a1b-4a59-9d4e-2b7f0c8f1d11",
        min_length = 1,
        max_length = 255,
        pattern = "^[\\x21-\\x7E]+$"
    )]
    #[serde(default)]
    pub idempotency_key: Field<String>,
}

impl IssueRequest {
    pub fn user_id(&self) -> Result<UserId, ApiError> {
        body::id(&self.user_id, "userId", UserId::new)
    }
}

impl KeyedBody for IssueRequest {
    fn idempotency_key(&self) -> &Field<String> {
        &self.idempotency_key
    }
}

impl KeyedBody for PaymentRequest {
    fn idempotency_key(&self) -> &Field<String> {
        &self.idempotency_key
    }
}

/// Body of a new user: none at all, or `{}`. No field is accepted: no initial balance can
/// be set through the API (charge the user instead), and nothing else either.
///
/// The fields sent are kept only to be refused by name; the schema (below, by hand) is the
/// empty object, which a derived one could not say beside the flattened map.
#[derive(Debug, Default, Deserialize)]
pub struct CreateUserRequest {
    /// Every field sent, by name; sorted, so the refusal names the same one whatever the
    /// order they came in.
    #[serde(flatten)]
    pub fields: BTreeMap<String, IgnoredAny>,
}

impl CreateUserRequest {
    /// Refuses a `balance` in its own words, and any other field.
    pub fn check(&self) -> Result<(), ApiError> {
        if self.fields.contains_key("balance") {
            return Err(ApiError::validation(
                "an initial balance cannot be set through the API; charge the user instead",
            ));
        }
        match self.fields.keys().next() {
            None => Ok(()),
            Some(field) => Err(ApiError::validation(format!(
                "the body of a new user must be empty or {{}}; unknown field {field:?}"
            ))),
        }
    }
}

impl utoipa::PartialSchema for CreateUserRequest {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .description(Some(
                "Body of a new user: none at all, or `{}`. No field is accepted: no initial balance can be set through the API (charge the user instead), and nothing else either.",
            ))
            .additional_properties(Some(AdditionalProperties::<Schema>::FreeForm(false)))
            .into()
    }
}

impl ToSchema for CreateUserRequest {}

/// Longest `reason` of a refund, in characters.
pub const MAX_REFUND_REASON_CHARS: usize = 255;

/// Body of a refund (`POST /api/payments/{paymentId}/refunds`).
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RefundRequest {
    /// 1..=MAX_AMOUNT, and at most what is not refunded yet; absent (or null): all of that.
    #[schema(value_type = Option<i64>, example = 5000, minimum = 1, maximum = 1_000_000_000)]
    #[serde(default)]
    pub amount: Integer,
    /// Optional if the `Idempotency-Key` header is sent; both must then agree.
    #[schema(
        value_type = Option<String>,
        example = "3f1c2a9e-6a1b-4a59-9d4e-2b7f0c8f1d11",
        min_length = 1,
        max_length = 255,
        pattern = "^[\\x21-\\x7E]+$"
    )]
    #[serde(default)]
    pub idempotency_key: Field<String>,
    /// Why, for people; at most 255 characters.
    #[schema(value_type = Option<String>, example = "size", max_length = 255)]
    #[serde(default)]
    pub reason: Field<String>,
}

impl RefundRequest {
    /// The amount to refund; `None` for everything not refunded yet.
    pub fn amount(&self, limits: &Limits) -> Result<Option<Amount>, ApiError> {
        body::optional_amount(&self.amount, limits)
    }

    /// The reason, if one is given: a string of at most [`MAX_REFUND_REASON_CHARS`]
    /// characters (not bytes: `"환불"` is two).
    pub fn reason(&self) -> Result<Option<String>, ApiError> {
        match &self.reason {
            Field::Absent => Ok(None),
            Field::Given(reason) if reason.chars().count() <= MAX_REFUND_REASON_CHARS => {
                Ok(Some(reason.clone()))
            }
            Field::Given(_) => Err(ApiError::validation(format!(
                "reason must be at most {MAX_REFUND_REASON_CHARS} characters long"
            ))),
            Field::Wrong => Err(ApiError::validation("reason must be a string")),
        }
    }
}

impl KeyedBody for RefundRequest {
    fn idempotency_key(&self) -> &Field<String> {
        &self.idempotency_key
    }
}

/// Body of an order's cancellation (`POST /api/orders/{orderId}/cancel`): none at all, or
/// `{}`. It carries nothing (cancelling moves no money, so it takes no key), and a field
/// sent is refused rather than ignored, as for a new user.
#[derive(Debug, Default, Deserialize)]
pub struct CancelOrderRequest {
    /// Every field sent, by name, sorted: each is refused.
    #[serde(flatten)]
    pub fields: BTreeMap<String, IgnoredAny>,
}

impl CancelOrderRequest {
    /// Refuses any field.
    pub fn check(&self) -> Result<(), ApiError> {
        match self.fields.keys().next() {
            None => Ok(()),
            Some(field) => Err(ApiError::validation(format!(
                "the body of a cancellation must be empty or {{}}; unknown field {field:?}"
            ))),
        }
    }
}

impl utoipa::PartialSchema for CancelOrderRequest {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .description(Some(
                "Body of an order's cancellation: none at all, or `{}`. No field is accepted.",
            ))
            .additional_properties(Some(AdditionalProperties::<Schema>::FreeForm(false)))
            .into()
    }
}

impl ToSchema for CancelOrderRequest {}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use crate::body::parse;
    use crate::problem::Code;

    fn limits() -> Limits {
        Limits::default()
    }

    #[test]
    fn amounts_are_whole_numbers_within_the_limit() {
        let amount = |s: &str| {
            parse::<AmountRequest>(s.as_bytes())
                .unwrap()
                .amount(&limits())
        };
        assert_eq!(amount(r#"{"amount":10000}"#).unwrap().get(), 10000);
        assert_eq!(
            amount(r#"{"amount":1000000000}"#).unwrap().get(),
            1_000_000_000
        );
        for (bad, detail) in [
            (r#"{}"#, "amount is required"),
            (r#"{"amount":null}"#, "amount is required"),
            (r#"{"amount":0}"#, "amount must be greater than 0"),
            (r#"{"amount":-5}"#, "amount must be greater than 0"),
            (r#"{"amount":1.5}"#, "amount must be an integer"),
            (r#"{"amount":10000.0}"#, "amount must be an integer"),
            (r#"{"amount":1e3}"#, "amount must be an integer"),
            (r#"{"amount":"100"}"#, "amount must be an integer"),
            (r#"{"amount":true}"#, "amount must be an integer"),
            (r#"{"amount":[1]}"#, "amount must be an integer"),
            (
                r#"{"amount":1000000001}"#,
                "amount must not exceed 1000000000",
            ),
            (
                r#"{"amount":9223372036854775807}"#,
                "amount must not exceed 1000000000",
            ),
            // Past i64 but within u64: too large, not "not an integer".
            (
                r#"{"amount":9223372036854775808}"#,
                "amount must not exceed 1000000000",
            ),
            (
                r#"{"amount":18446744073709551615}"#,
                "amount must not exceed 1000000000",
            ),
            // Past u64, or below i64::MIN: serde_json reads a float.
            (
                r#"{"amount":18446744073709551616}"#,
                "amount must be an integer",
            ),
            (
                r#"{"amount":-9223372036854775809}"#,
                "amount must be an integer",
            ),
            (
                r#"{"amount":100000000000000000000000}"#,
                "amount must be an integer",
            ),
        ] {
            let err = amount(bad).unwrap_err();
            assert_eq!(
                (err.code, err.detail.as_str()),
                (Code::ValidationError, detail),
                "{bad}"
            );
        }
    }

    #[test]
    fn ids_are_positive_integers() {
        let pay = |s: &str| parse::<PaymentRequest>(s.as_bytes()).unwrap();
        let ok = pay(r#"{"orderId":9,"userId":1}"#);
        assert_eq!(
            (ok.order_id().unwrap().get(), ok.user_id().unwrap().get()),
            (9, 1)
        );
        for (bad, detail) in [
            (r#"{}"#, "orderId is required"),
            (r#"{"orderId":0}"#, "orderId must be a positive integer"),
            (r#"{"orderId":-1}"#, "orderId must be a positive integer"),
            (r#"{"orderId":"9"}"#, "orderId must be an integer"),
            (r#"{"orderId":9.5}"#, "orderId must be an integer"),
        ] {
            assert_eq!(pay(bad).order_id().unwrap_err().detail, detail, "{bad}");
        }
        let order = parse::<OrderRequest>(br#"{"amount":5}"#).unwrap();
        assert_eq!(order.user_id().unwrap_err().detail, "userId is required");
        assert_eq!(order.amount(&limits()).unwrap().get(), 5);
    }

    #[test]
    fn a_new_user_takes_no_field() {
        let check = |s: &str| parse::<CreateUserRequest>(s.as_bytes()).unwrap().check();
        assert!(check("{}").is_ok());
        assert!(CreateUserRequest::default().check().is_ok());
        for body in [
            r#"{"balance":1}"#,
            r#"{"balance":null}"#,
            r#"{"a":1,"balance":1}"#,
        ] {
            assert_eq!(
                check(body).unwrap_err().detail,
                "an initial balance cannot be set through the API; charge the user instead"
            );
        }
        // The first name in sorted order, whatever the order sent.
        assert_eq!(
            check(r#"{"zz":1,"b":{"x":1},"a":[]}"#).unwrap_err().detail,
            r#"the body of a new user must be empty or {}; unknown field "a""#
        );
    }

    #[test]
    fn refunds_take_an_optional_amount_and_reason() {
        let refund = |s: &str| parse::<RefundRequest>(s.as_bytes()).unwrap();
        let all = refund("{}");
        assert_eq!(all.amount(&limits()).unwrap(), None);
        assert_eq!(all.reason().unwrap(), None);
        assert_eq!(all.idempotency_key, Field::Absent);
        let part = refund(r#"{"amount":5000,"idempotencyKey":"k","reason":"size"}"#);
        assert_eq!(part.amount(&limits()).unwrap().map(Amount::get), Some(5000));
        assert_eq!(part.reason().unwrap().as_deref(), Some("size"));
        assert_eq!(part.idempotency_key, Field::Given("k".to_owned()));
        assert_eq!(
            refund(r#"{"amount":null,"reason":null}"#)
                .amount(&limits())
                .unwrap(),
            None
        );
        for (bad, detail) in [
            (r#"{"amount":0}"#, "amount must be greater than 0"),
            (r#"{"amount":"5"}"#, "amount must be an integer"),
            (r#"{"amount":1.5}"#, "amount must be an integer"),
            (
                r#"{"amount":1000000001}"#,
                "amount must not exceed 1000000000",
            ),
        ] {
            assert_eq!(
                refund(bad).amount(&limits()).unwrap_err().detail,
                detail,
                "{bad}"
            );
        }
        // 255 characters, counted as characters: 255 Hangul syllables are 765 bytes.
        for fits in ["x".repeat(255), "환".repeat(255), String::new()] {
            let body = serde_json::json!({ "reason": fits }).to_string();
            assert_eq!(refund(&body).reason().unwrap(), Some(fits));
        }
        for (reason, detail) in [
            (
                serde_json::json!("x".repeat(256)),
                "reason must be at most 255 characters long",
            ),
            (
                serde_json::json!("환".repeat(256)),
                "reason must be at most 255 characters long",
            ),
            (serde_json::json!(5), "reason must be a string"),
            (serde_json::json!(["size"]), "reason must be a string"),
        ] {
            let body = serde_json::json!({ "reason": reason }).to_string();
            let err = refund(&body).reason().unwrap_err();
            assert_eq!(
                (err.code, err.detail.as_str()),
                (Code::ValidationError, detail)
            );
        }
    }

    #[test]
    fn a_refund_key_comes_from_the_header_or_the_body() {
        use crate::body::idempotency_key;
        let with_header = |key: &str| {
            actix_web::test::TestRequest::default()
                .insert_header(("Idempotency-Key", key))
                .to_http_request()
        };
        let none = actix_web::test::TestRequest::default().to_http_request();
        let body = parse::<RefundRequest>(br#"{"idempotencyKey":"r-1"}"#).unwrap();
        assert_eq!(
            idempotency_key(&none, body.idempotency_key())
                .unwrap()
                .as_str(),
            "r-1"
        );
        assert_eq!(
            idempotency_key(&with_header("r-1"), body.idempotency_key())
                .unwrap()
                .as_str(),
            "r-1"
        );
        let differ = idempotency_key(&with_header("r-2"), body.idempotency_key()).unwrap_err();
        assert_eq!(differ.code, Code::InvalidIdempotencyKey);
        let empty = RefundRequest::default();
        assert_eq!(
            idempotency_key(&with_header("r-3"), empty.idempotency_key())
                .unwrap()
                .as_str(),
            "r-3"
        );
        assert_eq!(
            idempotency_key(&none, empty.idempotency_key())
                .unwrap_err()
                .code,
            Code::IdempotencyKeyRequired
        );
        let wrong = parse::<RefundRequest>(br#"{"idempotencyKey":7}"#).unwrap();
        assert_eq!(
            idempotency_key(&none, wrong.idempotency_key())
                .unwrap_err()
                .code,
            Code::InvalidIdempotencyKey
        );
    }

    #[test]
    fn a_cancellation_takes_no_field() {
        assert!(parse::<CancelOrderRequest>(b"{}").unwrap().check().is_ok());
        assert!(CancelOrderRequest::default().check().is_ok());
        assert_eq!(
            parse::<CancelOrderRequest>(br#"{"why":"late","at":1}"#)
                .unwrap()
                .check()
                .unwrap_err()
                .detail,
            r#"the body of a cancellation must be empty or {}; unknown field "at""#
        );
        for bad in [&b"[]"[..], b" ", b"{\"a\":1,\"a\":1}"] {
            assert_eq!(
                parse::<CancelOrderRequest>(bad).unwrap_err().code,
                Code::ValidationError
            );
        }
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        /// A JSON value of some kind, as text.
        fn value() -> impl Strategy<Value = String> {
            prop_oneof![
                Just("null".to_owned()),
                any::<bool>().prop_map(|b| b.to_string()),
                any::<i64>().prop_map(|n| n.to_string()),
                any::<u64>().prop_map(|n| n.to_string()),
                any::<f64>()
                    .prop_filter("finite", |f| f.is_finite())
                    .prop_map(|f| format!("{f:?}")),
                "\\PC{0,20}".prop_map(|s| serde_json::to_string(&s).unwrap()),
                Just("[1,{\"a\":2}]".to_owned()),
                Just("{\"b\":{}}".to_owned()),
                Just("9999999999999999999999".to_owned()),
            ]
        }

        proptest! {
            /// Any JSON object with distinct names, the request types' own among them,
            /// becomes every request type: their fields take any value, so the refusals
            /// are the types' methods', in the API's words.
            #[test]
            fn any_object_becomes_every_request_type(
                fields in proptest::collection::btree_map(
                    prop_oneof![
                        Just("amount".to_owned()), Just("idempotencyKey".to_owned()),
                        Just("userId".to_owned()), Just("orderId".to_owned()),
                        Just("reason".to_owned()), Just("balance".to_owned()),
                        "[a-z]{1,8}",
                    ],
                    value(),
                    0..8,
                )
            ) {
                let text = format!(
                    "{{{}}}",
                    fields.iter().map(|(k, v)| format!("{k:?}:{v}")).collect::<Vec<_>>().join(",")
                );
                prop_assert!(parse::<AmountRequest>(text.as_bytes()).is_ok(), "{}", text);
                prop_assert!(parse::<OrderRequest>(text.as_bytes()).is_ok(), "{}", text);
                prop_assert!(parse::<PaymentRequest>(text.as_bytes()).is_ok(), "{}", text);
                prop_assert!(parse::<CreateUserRequest>(text.as_bytes()).is_ok(), "{}", text);
                prop_assert!(parse::<RefundRequest>(text.as_bytes()).is_ok(), "{}", text);
                prop_assert!(parse::<CancelOrderRequest>(text.as_bytes()).is_ok(), "{}", text);
            }

            /// Every integer amount is accepted exactly when it is within 1..=MAX_AMOUNT.
            #[test]
            fn integer_amounts(value in any::<i64>()) {
                let body = parse::<AmountRequest>(format!(r#"{{"amount":{value}}}"#).as_bytes()).unwrap();
                let ok = (1..=limits().max_amount).contains(&value);
                prop_assert_eq!(body.amount(&limits()).is_ok(), ok);
            }

            /// Fractions and numbers past 64 bits are refused, never truncated.
            #[test]
            fn non_integers_are_refused(whole in 1i64..1_000, frac in 1u32..1000, big in 19usize..40) {
                let fraction = parse::<AmountRequest>(format!(r#"{{"amount":{whole}.{frac}}}"#).as_bytes()).unwrap();
                prop_assert!(fraction.amount(&limits()).is_err());
                let huge = parse::<AmountRequest>(format!(r#"{{"amount":9{}}}"#, "9".repeat(big)).as_bytes()).unwrap();
                prop_assert!(huge.amount(&limits()).is_err());
            }
        }
    }
}
