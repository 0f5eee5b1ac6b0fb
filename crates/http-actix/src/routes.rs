//! The handlers: parse, call the use case, answer. Every path's OpenAPI entry is here.

use std::sync::Arc;

use actix_web::http::StatusCode;
use actix_web::http::header::{self, HeaderValue};
use actix_web::web::{Data, Payload};
use actix_web::{HttpRequest, HttpResponse};
use domain::types::{EntryId, OrderId, PageLimit, PaymentId, UserId};
use domain::{Charge, Execution, Operation, OperationError, Pay, UseBalance};
use tracing::Instrument;

use crate::AppState;
use crate::auth::Principal;
use crate::body;
use crate::dto::{
    AmountRequest, BalanceResponse, ChargeResponse, CreateUserRequest, HistoryItem,
    HistoryResponse, OrderRequest, OrderResponse, PaymentRequest, PaymentResponse, UseResponse,
};
use crate::problem::{ApiError, PROBLEM_JSON, read_error};

pub const REPLAYED_HEADER: &str = "Idempotent-Replayed";

type ApiResult = Result<HttpResponse, ApiError>;

fn json<T: serde::Serialize>(status: StatusCode, body: &T) -> ApiResult {
    let bytes = serde_json::to_vec(body)
        .map_err(|e| ApiError::from(domain::OperationError::Unexpected(e.into())))?;
    Ok(HttpResponse::build(status)
        .insert_header((
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        ))
        .body(bytes))
}

fn path_id<T>(
    req: &HttpRequest,
    name: &str,
    parse: fn(&str) -> Result<T, domain::types::ValidationError>,
) -> Result<T, ApiError> {
    let raw = req.match_info().get(name).unwrap_or_default();
    parse(raw).map_err(|_| ApiError::validation(format!("{name} must be a positive integer")))
}

/// Sends a stored (or just stored) response: status and bytes exactly as kept.
fn stored(execution: Execution) -> HttpResponse {
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
    response.body(execution.response.body)
}

/// Runs a balance change on its own task: a client that disconnects must not cancel it
/// half-way (between commit and lock release, say).
async fn execute(state: &AppState, command: Arc<dyn Operation>) -> ApiResult {
    let service = state.service.clone();
    // The task keeps the request's span, so its log lines carry the request id too.
    let span = tracing::Span::current();
    let execution = tokio::spawn(async move { service.execute(command).await }.instrument(span))
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

/// A user's balance (committed state, no lock).
#[utoipa::path(
    get, path = "/api/users/{userId}/balance", tag = "balance",
    params(("userId" = i64, Path, minimum = 1)),
    responses(
        (status = 200, description = "The balance", body = BalanceResponse),
    ),
    security((), ("bearer" = []))
)]
pub async fn get_balance(
    state: Data<AppState>,
    principal: Principal,
    req: HttpRequest,
) -> ApiResult {
    let user = path_id(&req, "userId", UserId::parse)?;
    principal.check_user(user)?;
    let user = state.service.balance(user).await.map_err(read_error)?;
    json(StatusCode::OK, &BalanceResponse::from(&user))
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
    let order = state.service.order(id).await.map_err(read_error)?;
    if !principal.acts_for(order.user_id) {
        return Err(OperationError::OrderNotFound.into());
    }
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
    principal.check_user(user)?;
    execute(&state, Arc::new(Pay { user, order, key })).await
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
    let payment = state.service.payment(id).await.map_err(read_error)?;
    if !principal.acts_for(payment.user_id) {
        return Err(OperationError::PaymentNotFound.into());
    }
    json(StatusCode::OK, &PaymentResponse::from(&payment))
}
