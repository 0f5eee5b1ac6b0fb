//! The handlers: parse, call the use case, answer. Every path's OpenAPI entry is here.

use std::sync::Arc;

use actix_web::http::StatusCode;
use actix_web::http::header::{self, HeaderValue};
use actix_web::web::{Data, Payload};
use actix_web::{HttpRequest, HttpResponse};
use domain::time::format_rfc3339_millis;
use domain::types::{EntryId, IdempotencyKey, OrderId, PageLimit, PaymentId, RefundReason, UserId};
use domain::{Charge, Execution, Operation, OperationError, Pay, Refund, UseBalance};
use tracing::Instrument;

use crate::AppState;
use crate::auth::Principal;
use crate::body;
use crate::dto::{
    AmountRequest, BalanceAtResponse, BalanceResponse, CancelOrderRequest, ChargeResponse,
    CreateUserRequest, HistoryItem, HistoryResponse, OrderRequest, OrderResponse, PaymentRequest,
    PaymentResponse, RefundRequest, RefundResponse, RefundsResponse, RequestResponse, UseResponse,
};
use crate::problem::{ApiError, Code, PROBLEM_JSON, read_error};

pub const REPLAYED_HEADER: &str = "Idempotent-Replayed";

/// On every stored answer (first and replayed): when its record expires (RFC 3339, ms).
pub const EXPIRES_HEADER: &str = "Idempotency-Expires";

pub(crate) type ApiResult = Result<HttpResponse, ApiError>;

pub(crate) fn json<T: serde::Serialize>(status: StatusCode, body: &T) -> ApiResult {
    let bytes = serde_json::to_vec(body)
        .map_err(|e| ApiError::from(domain::OperationError::Unexpected(e.into())))?;
    Ok(HttpResponse::build(status)
        .insert_header((
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        ))
        .body(bytes))
}

pub(crate) fn path_id<T>(
    req: &HttpRequest,
    name: &str,
    parse: fn(&str) -> Result<T, domain::types::ValidationError>,
) -> Result<T, ApiError> {
    let raw = req.match_info().get(name).unwrap_or_default();
    parse(raw).map_err(|_| ApiError::validation(format!("{name} must be a positive integer")))
}

/// The order, if the principal may see it: another user's is "not found", exactly as a
/// missing one (its existence is not leaked).
async fn visible_order(
    state: &AppState,
    principal: &Principal,
    id: OrderId,
) -> Result<domain::model::Order, ApiError> {
    let order = state.service.order(id).await.map_err(read_error)?;
    if !principal.acts_for(order.user_id) {
        return Err(OperationError::OrderNotFound.into());
    }
    Ok(order)
}

/// The payment, if the principal may see it; as [`visible_order`].
async fn visible_payment(
    state: &AppState,
    principal: &Principal,
    id: PaymentId,
) -> Result<domain::model::Payment, ApiError> {
    let payment = state.service.payment(id).await.map_err(read_error)?;
    if !principal.acts_for(payment.user_id) {
        return Err(OperationError::PaymentNotFound.into());
    }
    Ok(payment)
}

/// Sends a stored (or just stored) response: status and bytes exactly as kept.
pub(crate) fn stored(execution: Execution) -> HttpResponse {
    let status = StatusCode::from_u16(execution.response.status)
        .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let content_type = if status.is_success() {
        "application/json"
    } else {
        PROBLEM_JSON
    };
    let mut response = HttpResponse::build(status);
    response.insert_header((header::CONTENT_TYPE, HeaderValue::from_static(content_type)));
    if execution.replayed {
        response.insert_header((REPLAYED_HEADER, HeaderValue::from_static("true")));
    }
    if let Ok(expires) = HeaderValue::from_str(&format_rfc3339_millis(execution.expires_at)) {
        response.insert_header((EXPIRES_HEADER, expires));
    }
    response.body(execution.response.body)
}

/// Runs a balance change on its own task: a client that disconnects must not cancel it
/// half-way (between commit and lock release, say).
async fn execute(state: &AppState, command: Arc<dyn Operation>) -> ApiResult {
    let service = state.service.clone();
    detached(async move { service.execute(command).await }).await
}

/// Runs a keyed change on its own task and sends its stored answer.
pub(crate) async fn detached<F>(change: F) -> ApiResult
where
    F: std::future::Future<Output = Result<Execution, OperationError>> + Send + 'static,
{
    // The task keeps the request's span, so its log lines carry the request id too.
    let span = tracing::Span::current();
    let execution = tokio::spawn(change.instrument(span))
        .await
        .map_err(|e| ApiError::from(domain::OperationError::Unexpected(e.into())))??;
    Ok(stored(execution))
}

/// Create a user with a zero balance.
#[utoipa::path(
    post, path = "/api/users", tag = "users",
    request_body(content = Option<CreateUserRequest>, content_type = "application/json", description = "No body at all (zero bytes), or `{}`; no initial balance can be set. A body of blanks is not JSON: 400"),
    responses(
        (status = 201, description = "Created", body = BalanceResponse, headers(("Location" = String, description = "The new user's balance URL"))),
    ),
    security((), ("bearer" = []))
)]
pub async fn create_user(
    state: Data<AppState>,
    principal: Principal,
    req: HttpRequest,
    payload: Payload,
) -> ApiResult {
    principal.require_admin()?;
    body::read::<CreateUserRequest>(&req, payload)
        .await?
        .check()?;
    // No key: a 503 here says only to retry, as for a read.
    let user = state.service.create_user().await.map_err(read_error)?;
    let mut response = json(StatusCode::CREATED, &BalanceResponse::from(&user))?;
    if let Ok(location) = HeaderValue::from_str(&format!("/api/users/{}/balance", user.id)) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    Ok(response)
}

/// A user's balance (committed state, no lock); with `at`, its balance at that time.
#[utoipa::path(
    get, path = "/api/users/{userId}/balance", tag = "balance",
    params(
        ("userId" = i64, Path, minimum = 1),
        ("at" = Option<String>, Query, format = DateTime, description = "RFC 3339: the balance after the last ledger entry at or before it (0 before the first; a time not in the past: the current balance). The answer then carries `at`, in UTC with milliseconds"),
    ),
    responses(
        (status = 200, description = "The balance; with `at`, a `BalanceAtResponse`", body = BalanceResponse),
    ),
    security((), ("bearer" = []))
)]
pub async fn get_balance(
    state: Data<AppState>,
    principal: Principal,
    req: HttpRequest,
) -> ApiResult {
    let user = path_id(&req, "userId", UserId::parse)?;
    let mut at = None;
    for (name, value) in query_pairs(req.query_string())? {
        if name == "at" && at.replace(value).is_some() {
            return Err(ApiError::validation("at is given more than once"));
        }
    }
    let at = at
        .map(|raw| domain::time::parse_instant(&raw, "at"))
        .transpose()?;
    principal.check_user(user)?;
    let Some(at) = at else {
        let user = state.service.balance(user).await.map_err(read_error)?;
        return json(StatusCode::OK, &BalanceResponse::from(&user));
    };
    let balance = state
        .service
        .balance_at(user, at)
        .await
        .map_err(read_error)?;
    json(
        StatusCode::OK,
        &BalanceAtResponse {
            user_id: user.get(),
            balance: balance.get(),
            at: format_rfc3339_millis(at),
        },
    )
}

/// Charge money to a user's balance, once per idempotency key.
#[utoipa::path(
    post, path = "/api/users/{userId}/balance/charge", tag = "balance",
    params(
        ("userId" = i64, Path, minimum = 1),
        ("Idempotency-Key" = Option<String>, Header, description = "Or the body's idempotencyKey"),
    ),
    request_body(content = AmountRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "Charged, or the replay of a finished request", body = ChargeResponse),
    ),
    security((), ("bearer" = []))
)]
pub async fn charge(
    state: Data<AppState>,
    principal: Principal,
    req: HttpRequest,
    payload: Payload,
) -> ApiResult {
    let user = path_id(&req, "userId", UserId::parse)?;
    let body::Keyed { key, body } = body::read_keyed::<AmountRequest>(&req, payload).await?;
    let amount = body.amount(state.service.limits())?;
    principal.check_user(user)?;
    execute(&state, Arc::new(Charge { user, amount, key })).await
}

/// Use (deduct) money from a user's balance, once per idempotency key.
#[utoipa::path(
    post, path = "/api/users/{userId}/balance/use", tag = "balance",
    params(
        ("userId" = i64, Path, minimum = 1),
        ("Idempotency-Key" = Option<String>, Header, description = "Or the body's idempotencyKey"),
    ),
    request_body(content = AmountRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "Used, or the replay of a finished request", body = UseResponse),
    ),
    security((), ("bearer" = []))
)]
pub async fn use_balance(
    state: Data<AppState>,
    principal: Principal,
    req: HttpRequest,
    payload: Payload,
) -> ApiResult {
    let user = path_id(&req, "userId", UserId::parse)?;
    let body::Keyed { key, body } = body::read_keyed::<AmountRequest>(&req, payload).await?;
    let amount = body.amount(state.service.limits())?;
    principal.check_user(user)?;
    execute(&state, Arc::new(UseBalance { user, amount, key })).await
}

/// A user's ledger, newest first, in pages.
#[utoipa::path(
    get, path = "/api/users/{userId}/balance/history", tag = "balance",
    params(
        ("userId" = i64, Path, minimum = 1),
        ("limit" = Option<i64>, Query, minimum = 1, maximum = 500, description = "Default 50"),
        ("before" = Option<i64>, Query, minimum = 1, description = "Only entries with a smaller id"),
    ),
    responses(
        (status = 200, description = "One page of the ledger, newest first; `next` is the `before` of the following page, null on the last", body = HistoryResponse),
    ),
    security((), ("bearer" = []))
)]
pub async fn history(state: Data<AppState>, principal: Principal, req: HttpRequest) -> ApiResult {
    let user = path_id(&req, "userId", UserId::parse)?;
    let mut limit = None;
    let mut before = None;
    for (name, value) in query_pairs(req.query_string())? {
        let slot = match name.as_str() {
            "limit" => &mut limit,
            "before" => &mut before,
            _ => continue,
        };
        if slot.replace(value).is_some() {
            return Err(ApiError::validation(format!(
                "{name} is given more than once"
            )));
        }
    }
    let limit = match limit {
        Some(raw) => PageLimit::parse(&raw)?,
        None => PageLimit::default(),
    };
    let before = match before {
        Some(raw) => Some(
            EntryId::parse(&raw)
                .map_err(|_| ApiError::validation("before must be a positive integer"))?,
        ),
        None => None,
    };
    principal.check_user(user)?;
    let page = state
        .service
        .history(user, before, limit)
        .await
        .map_err(read_error)?;
    json(
        StatusCode::OK,
        &HistoryResponse {
            items: page.items.iter().map(HistoryItem::from).collect(),
            next: page.next.map(EntryId::get),
        },
    )
}

fn query_pairs(query: &str) -> Result<Vec<(String, String)>, ApiError> {
    serde_urlencoded::from_str::<Vec<(String, String)>>(query)
        .map_err(|_| ApiError::validation("the query string is malformed"))
}

/// Create an order to pay later.
#[utoipa::path(
    post, path = "/api/orders", tag = "orders",
    request_body(content = OrderRequest, content_type = "application/json"),
    responses(
        (status = 201, description = "Created, PENDING", body = OrderResponse, headers(("Location" = String, description = "The new order's URL"))),
    ),
    security((), ("bearer" = []))
)]
pub async fn create_order(
    state: Data<AppState>,
    principal: Principal,
    req: HttpRequest,
    payload: Payload,
) -> ApiResult {
    let body: OrderRequest = body::read(&req, payload).await?;
    let user = body.user_id()?;
    let amount = body.amount(state.service.limits())?;
    principal.check_user(user)?;
    let order = state
        .service
        .create_order(user, amount)
        .await
        .map_err(read_error)?;
    let mut response = json(StatusCode::CREATED, &OrderResponse::from(&order))?;
    if let Ok(location) = HeaderValue::from_str(&format!("/api/orders/{}", order.id)) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    Ok(response)
}

/// An order.
#[utoipa::path(
    get, path = "/api/orders/{orderId}", tag = "orders",
    params(("orderId" = i64, Path, minimum = 1)),
    responses(
        (status = 200, description = "The order", body = OrderResponse),
    ),
    security((), ("bearer" = []))
)]
pub async fn get_order(state: Data<AppState>, principal: Principal, req: HttpRequest) -> ApiResult {
    let id = path_id(&req, "orderId", OrderId::parse)?;
    let order = visible_order(&state, &principal, id).await?;
    json(StatusCode::OK, &OrderResponse::from(&order))
}

/// Pay an order from the user's balance, once per idempotency key.
#[utoipa::path(
    post, path = "/api/payments", tag = "payments",
    params(("Idempotency-Key" = Option<String>, Header, description = "Or the body's idempotencyKey")),
    request_body(content = PaymentRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "Paid, or the replay of a finished request", body = PaymentResponse),
    ),
    security((), ("bearer" = []))
)]
pub async fn pay(
    state: Data<AppState>,
    principal: Principal,
    req: HttpRequest,
    payload: Payload,
) -> ApiResult {
    let body::Keyed { key, body } = body::read_keyed::<PaymentRequest>(&req, payload).await?;
    let order = body.order_id()?;
    let user = body.user_id()?;
    let coupon = body.user_coupon_id()?;
    principal.check_user(user)?;
    execute(
        &state,
        Arc::new(Pay {
            user,
            order,
            key,
            coupon,
        }),
    )
    .await
}

/// A payment.
#[utoipa::path(
    get, path = "/api/payments/{paymentId}", tag = "payments",
    params(("paymentId" = i64, Path, minimum = 1)),
    responses(
        (status = 200, description = "The payment", body = PaymentResponse),
    ),
    security((), ("bearer" = []))
)]
pub async fn get_payment(
    state: Data<AppState>,
    principal: Principal,
    req: HttpRequest,
) -> ApiResult {
    let id = path_id(&req, "paymentId", PaymentId::parse)?;
    let payment = visible_payment(&state, &principal, id).await?;
    json(StatusCode::OK, &PaymentResponse::from(&payment))
}

/// Cancel a PENDING order. Cancelling a cancelled order answers the same 200.
#[utoipa::path(
    post, path = "/api/orders/{orderId}/cancel", tag = "orders",
    params(("orderId" = i64, Path, minimum = 1)),
    request_body(content = Option<CreateUserRequest>, content_type = "application/json", description = "No body at all, or `{}`"),
    responses(
        (status = 200, description = "The order, CANCELLED", body = OrderResponse),
    ),
    security((), ("bearer" = []))
)]
pub async fn cancel_order(
    state: Data<AppState>,
    principal: Principal,
    req: HttpRequest,
    payload: Payload,
) -> ApiResult {
    let id = path_id(&req, "orderId", OrderId::parse)?;
    body::read::<CancelOrderRequest>(&req, payload)
        .await?
        .check()?;
    visible_order(&state, &principal, id).await?;
    let order = state.service.cancel_order(id).await.map_err(read_error)?;
    json(StatusCode::OK, &OrderResponse::from(&order))
}

/// Refund a payment, in part or the rest, once per idempotency key (the payment user's).
#[utoipa::path(
    post, path = "/api/payments/{paymentId}/refunds", tag = "payments",
    params(
        ("paymentId" = i64, Path, minimum = 1),
        ("Idempotency-Key" = Option<String>, Header, description = "Or the body's idempotencyKey"),
    ),
    request_body(content = RefundRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "Refunded, or the replay of a finished request", body = RefundResponse),
    ),
    security((), ("bearer" = []))
)]
pub async fn refund(
    state: Data<AppState>,
    principal: Principal,
    req: HttpRequest,
    payload: Payload,
) -> ApiResult {
    let payment = path_id(&req, "paymentId", PaymentId::parse)?;
    let body::Keyed { key, body } = body::read_keyed::<RefundRequest>(&req, payload).await?;
    let amount = body.amount(state.service.limits())?;
    let reason = body
        .reason()?
        .map(|raw| RefundReason::parse(&raw))
        .transpose()?;
    // The refund runs as the payment's user: its lock, its key space, its balance.
    let found = visible_payment(&state, &principal, payment).await?;
    let op = Refund {
        user: found.user_id,
        payment,
        amount,
        reason,
        key,
    };
    execute(&state, Arc::new(op)).await
}

/// A payment's refunds, oldest first.
#[utoipa::path(
    get, path = "/api/payments/{paymentId}/refunds", tag = "payments",
    params(("paymentId" = i64, Path, minimum = 1)),
    responses(
        (status = 200, description = "The refunds, oldest first (at most 1000)", body = RefundsResponse),
    ),
    security((), ("bearer" = []))
)]
pub async fn list_refunds(
    state: Data<AppState>,
    principal: Principal,
    req: HttpRequest,
) -> ApiResult {
    let id = path_id(&req, "paymentId", PaymentId::parse)?;
    visible_payment(&state, &principal, id).await?;
    let refunds = state.service.refunds(id).await.map_err(read_error)?;
    json(
        StatusCode::OK,
        &RefundsResponse {
            items: refunds.iter().map(RefundResponse::from).collect(),
        },
    )
}

/// What became of a request with this key: its stored answer, without sending it again.
#[utoipa::path(
    get, path = "/api/users/{userId}/requests/{idempotencyKey}", tag = "balance",
    params(
        ("userId" = i64, Path, minimum = 1),
        ("idempotencyKey" = String, Path, description = "The key, percent-encoded"),
    ),
    responses(
        (status = 200, description = "The finished request and its stored answer", body = RequestResponse),
    ),
    security((), ("bearer" = []))
)]
pub async fn get_request(
    state: Data<AppState>,
    principal: Principal,
    req: HttpRequest,
) -> ApiResult {
    let user = path_id(&req, "userId", UserId::parse)?;
    let raw = req.match_info().get("idempotencyKey").unwrap_or_default();
    let key = IdempotencyKey::parse(&percent_decoded(raw))
        .map_err(|e| ApiError::new(Code::InvalidIdempotencyKey, e.0))?;
    principal.check_user(user)?;
    let record = state
        .service
        .request(user, &key)
        .await
        .map_err(read_error)?;
    let answer = RequestResponse::of(record).ok_or_else(|| {
        ApiError::from(OperationError::Unexpected(anyhow::anyhow!(
            "the stored answer of a request is not JSON"
        )))
    })?;
    json(StatusCode::OK, &answer)
}

/// A path segment with its remaining `%XX` escapes decoded. The router decodes all but
/// `%2F`, `%25` and `%2B` (so that `/` inside a segment does not split it); decoding the
/// rest here gives the key the client percent-encoded. An escape that is not one (`%zz`)
/// stays as it is, and then fails the key's own check.
fn percent_decoded(segment: &str) -> String {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&byte) = bytes.get(i) {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|pair| std::str::from_utf8(pair).ok())
            .and_then(|pair| u8::from_str_radix(pair, 16).ok());
        match (byte, hex) {
            (b'%', Some(decoded)) => {
                out.push(decoded);
                i += 3;
            }
            _ => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}
