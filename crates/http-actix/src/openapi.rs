//! The OpenAPI document, generated from the handlers' annotations.

use utoipa::openapi::example::ExampleBuilder;
use utoipa::openapi::header::HeaderBuilder;
use utoipa::openapi::schema::{ObjectBuilder, Type};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{ContentBuilder, Ref, RefOr, ResponseBuilder};
use utoipa::{Modify, OpenApi};

use crate::coupons;
use crate::dto::{
    AmountRequest, BalanceAtResponse, BalanceResponse, ChargeResponse, CouponRequest,
    CouponResponse, CreateUserRequest, HistoryItem, HistoryResponse, IssueRequest, OrderRequest,
    OrderResponse, PaymentRequest, PaymentResponse, RefundRequest, RefundResponse, RefundsResponse,
    RequestResponse, UseResponse, UserCouponResponse, UserCouponsResponse,
};
use crate::health::{self, DependencyState, LiveResponse, ReadyResponse};
use crate::problem::{Code, PROBLEM_JSON, Problem};
use crate::routes::{self, EXPIRES_HEADER, REPLAYED_HEADER};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Balance service",
        description = "Balances, orders and payments with idempotency keys, a per-user lock and an optimistic version guard.",
        version = "1.0.0"
    ),
    paths(
        routes::create_user,
        routes::get_balance,
        routes::charge,
        routes::use_balance,
        routes::history,
        routes::create_order,
        routes::get_order,
        routes::pay,
        routes::get_payment,
        routes::cancel_order,
        routes::refund,
        routes::list_refunds,
        routes::get_request,
        coupons::create_coupon,
        coupons::get_coupon,
        coupons::issue_coupon,
        coupons::list_user_coupons,
        health::live,
        health::ready,
        health::metrics,
    ),
    components(schemas(
        AmountRequest, OrderRequest, PaymentRequest, CreateUserRequest,
        BalanceResponse, ChargeResponse, UseResponse, PaymentResponse, OrderResponse,
        HistoryItem, HistoryResponse, RefundRequest, RefundResponse, RefundsResponse,
        BalanceAtResponse, RequestResponse, CouponRequest, CouponResponse, IssueRequest,
        UserCouponResponse, UserCouponsResponse,
        Problem, LiveResponse, ReadyResponse, DependencyState,
    )),
    modifiers(&SecurityAndProblems),
    tags(
        (name = "users"), (name = "balance"), (name = "orders"), (name = "payments"), (name = "coupons"), (name = "health"),
    )
)]
#[derive(Debug)]
pub struct ApiDoc;

/// Declares the bearer schemes, and on every `/api` operation the problems it can answer
/// (see [`problems`]), each response with an example of each of its codes: one table
/// here rather than the same rows in every handler's annotation.
struct SecurityAndProblems;

impl Modify for SecurityAndProblems {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "`API_TOKEN` (acts for every user), or a JWT (`AUTH_JWT_SECRET` / `AUTH_JWT_PUBLIC_KEY_FILE`) whose `sub` is a user id (acts for that user) or whose `scope` holds `balance:admin`. Needed only when one of them is configured.",
                    ))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "metrics_bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("`METRICS_TOKEN`, when it is set."))
                    .build(),
            ),
        );
        // The transport's own answers, on any path: reusable responses for clients to name.
        components.responses.insert(
            "NotFound".to_owned(),
            problem_response_of(
                "",
                &[Code::NotFound],
                false,
                "- `NOT_FOUND`: no resource at this path",
            ),
        );
        components.responses.insert(
            "MethodNotAllowed".to_owned(),
            problem_response_of(
                "",
                &[Code::MethodNotAllowed],
                false,
                "- `METHOD_NOT_ALLOWED`: the path exists, the method does not; `Allow` lists those it has",
            ),
        );
        for (path, item) in &mut openapi.paths.paths {
            let api = path == "/api" || path.starts_with("/api/");
            for (operation, has_body) in [(&mut item.get, false), (&mut item.post, true)] {
                let Some(operation) = operation else { continue };
                let id = operation.operation_id.clone().unwrap_or_default();
                if id == "metrics" {
                    operation.responses.responses.insert(
                        "401".to_owned(),
                        problem_response_of(
                            "metrics",
                            &[Code::Unauthorized],
                            false,
                            "- `UNAUTHORIZED`: `METRICS_TOKEN` is set and the request's bearer token is missing or wrong",
                        ),
                    );
                }
                if api {
                    add_problems(operation, &id, has_body);
                }
                for response in operation.responses.responses.values_mut() {
                    if let RefOr::T(response) = response {
                        response.headers.insert(
                            "X-Request-Id".to_owned(),
                            RefOr::T(header(
                                Type::String,
                                "The request's id: the client's own when it sent a sane one, else a new UUID; every log line of the request carries it",
                            )),
                        );
                    }
                }
            }
        }
    }
}

/// The problems of one `/api` operation, one response per status, and
/// `Idempotent-Replayed` on the answers a keyed operation stores.
fn add_problems(operation: &mut utoipa::openapi::path::Operation, id: &str, has_body: bool) {
    let codes = problems(id, has_body).unwrap_or_default();
    let keyed = codes.contains(&Code::IdempotencyKeyRequired);
    let mut statuses: Vec<u16> = codes.iter().map(|c| c.status()).collect();
    statuses.dedup();
    for status in statuses {
        let of_status: Vec<Code> = codes
            .iter()
            .copied()
            .filter(|c| c.status() == status)
            .collect();
        let description = of_status
            .iter()
            .map(|c| format!("- `{}`: {}", c.as_str(), when(*c)))
            .collect::<Vec<_>>()
            .join("\n");
        operation
            .responses
            .responses
            .entry(status.to_string())
            .or_insert_with(|| problem_response_of(id, &of_status, keyed, &description));
    }
    if !keyed {
        return;
    }
    for (status, response) in &mut operation.responses.responses {
        let stored = status == "200"
            || codes
                .iter()
                .any(|c| c.is_stored() && c.status().to_string() == *status);
        if let (true, RefOr::T(response)) = (stored, response) {
            response.headers.insert(
                REPLAYED_HEADER.to_owned(),
                RefOr::T(header(
                    Type::String,
                    "`true` when this is the stored answer of an earlier request with the same key",
                )),
            );
            response.headers.insert(
                EXPIRES_HEADER.to_owned(),
                RefOr::T(header(
                    Type::String,
                    "When this answer's record expires (RFC 3339, ms): until then a retry with the key replays it, after it the key runs afresh",
                )),
            );
        }
    }
}

/// What every `/api` operation can answer, whatever it does.
const EVERY_API_OPERATION: [Code; 4] = [
    Code::ValidationError,
    Code::Unauthorized,
    Code::InternalError,
    Code::ServiceUnavailable,
];

/// What every operation with a body can answer while reading it.
const EVERY_BODY: [Code; 3] = [
    Code::RequestTimeout,
    Code::PayloadTooLarge,
    Code::UnsupportedMediaType,
];

/// What every keyed balance change can answer about its key and its lock.
const EVERY_KEYED_CHANGE: [Code; 5] = [
    Code::IdempotencyKeyRequired,
    Code::InvalidIdempotencyKey,
    Code::IdempotencyKeyInUse,
    Code::IdempotencyKeyReused,
    Code::LockTimeout,
];

/// The problems the `/api` operation `operation_id` can answer, in status order; `None`
/// for an operation this table does not know (a test holds every route to it).
pub fn problems(operation_id: &str, has_body: bool) -> Option<Vec<Code>> {
    let (keyed, own): (bool, &[Code]) = match operation_id {
        "create_user" | "create_coupon" => (false, &[Code::Forbidden]),
        "get_coupon" => (false, &[Code::CouponNotFound]),
        "list_user_coupons" => (false, &[Code::UserNotFound]),
        "issue_coupon" => (
            true,
            &[
                Code::UserNotFound,
                Code::CouponNotFound,
                Code::CouponSoldOut,
                Code::CouponAlreadyIssued,
                Code::CouponNotOpen,
            ],
        ),
        "get_balance" | "history" | "create_order" => (false, &[Code::UserNotFound]),
        "get_order" => (false, &[Code::OrderNotFound]),
        "get_payment" | "list_refunds" => (false, &[Code::PaymentNotFound]),
        "cancel_order" => (false, &[Code::OrderNotFound, Code::OrderAlreadyPaid]),
        "get_request" => (
            false,
            &[
                Code::UserNotFound,
                Code::RequestNotFound,
                Code::IdempotencyKeyInUse,
            ],
        ),
        "refund" => (
            true,
            &[
                Code::PaymentNotFound,
                Code::BalanceLimitExceeded,
                Code::RefundExceedsPayment,
            ],
        ),
        "charge" => (true, &[Code::UserNotFound, Code::BalanceLimitExceeded]),
        "use_balance" => (true, &[Code::UserNotFound, Code::InsufficientBalance]),
        "pay" => (
            true,
            &[
                Code::UserNotFound,
                Code::OrderNotFound,
                Code::OrderAlreadyPaid,
                Code::OrderCancelled,
                Code::InsufficientBalance,
                Code::CouponNotUsable,
            ],
        ),
        _ => return None,
    };
    let mut codes: Vec<Code> = EVERY_API_OPERATION.to_vec();
    codes.extend_from_slice(own);
    if has_body {
        codes.extend_from_slice(&EVERY_BODY);
    }
    if keyed {
        codes.extend_from_slice(&EVERY_KEYED_CHANGE);
    }
    // In the order of `Code::ALL`, which is by status.
    Some(
        Code::ALL
            .into_iter()
            .filter(|c| codes.contains(c))
            .collect(),
    )
}

/// When a code is answered, in a few words (the response's description).
fn when(code: Code) -> &'static str {
    match code {
        Code::ValidationError => {
            "a malformed path id, query, JSON body or field (an amount that is missing, not an integer, not positive or above MAX_AMOUNT)"
        }
        Code::IdempotencyKeyRequired => {
            "neither the Idempotency-Key header nor the idempotencyKey field"
        }
        Code::InvalidIdempotencyKey => {
            "a key that is not 1 to 255 visible ASCII characters, or a header and a field that differ"
        }
        Code::Unauthorized => {
            "API_TOKEN or a JWT key is configured and the bearer token is missing, invalid or expired (with `WWW-Authenticate: Bearer`)"
        }
        Code::Forbidden => "a user's JWT; this operation needs the API_TOKEN or an admin JWT",
        Code::UserNotFound => "no such user, or another user's (a user token)",
        Code::OrderNotFound => "no such order, or another user's",
        Code::PaymentNotFound => "no such payment, or another user's",
        Code::CouponNotFound => "no such coupon",
        Code::RequestNotFound => {
            "no finished request with this key for this user (never sent, expired, or still running on another instance); re-sending it with the same key is safe"
        }
        Code::NotFound => "no resource at this path",
        Code::MethodNotAllowed => "the path exists, the method does not",
        Code::RequestTimeout => {
            "the body did not arrive within 10 s of the request's head; the connection is closed"
        }
        Code::IdempotencyKeyInUse => {
            "the first request with this key is still in flight; retry after `Retry-After`"
        }
        Code::OrderAlreadyPaid => {
            "the order is paid already (stored and replayed when paying; not stored when cancelling)"
        }
        Code::OrderCancelled => "the order was cancelled (stored and replayed)",
        Code::PayloadTooLarge => "a body over 16 KiB",
        Code::UnsupportedMediaType => "a body or Content-Type that is not JSON",
        Code::IdempotencyKeyReused => "this key was used for another request; nothing applied",
        Code::InsufficientBalance => "the balance is below the amount (stored and replayed)",
        Code::BalanceLimitExceeded => "the balance would exceed MAX_BALANCE (stored and replayed)",
        Code::RefundExceedsPayment => {
            "the refund is above what is left of the payment, or nothing is left (stored and replayed)"
        }
        Code::CouponSoldOut => {
            "every unit of the coupon was issued, or is being issued, when the request came (stored and replayed)"
        }
        Code::CouponAlreadyIssued => {
            "the user holds this coupon already, under whatever key (stored and replayed)"
        }
        Code::CouponNotOpen => {
            "before the coupon's issueStartsAt, or from its issueEndsAt on (stored and replayed)"
        }
        Code::CouponNotUsable => {
            "the user coupon is used, expired, or not this user's (stored and replayed)"
        }
        Code::InternalError => "an unexpected failure (logged with the request id)",
        Code::LockTimeout => {
            "the user's lock was not had within LOCK_WAIT_MS; retry with the same key after `Retry-After`"
        }
        Code::ServiceUnavailable => {
            "the database, or Redis under LOCK_ON_REDIS_DOWN=fail, cannot be reached; retry after `Retry-After`"
        }
    }
}

/// A `detail` the code is answered with by `operation_id`, for its example.
fn example_detail(code: Code, operation_id: &str, keyed: bool) -> &'static str {
    match code {
        Code::ValidationError => match operation_id {
            "charge" | "use_balance" => "amount must be greater than 0",
            "create_order" => "userId is required",
            "pay" => "orderId is required",
            "get_balance" | "history" => "userId must be a positive integer",
            "get_order" | "cancel_order" => "orderId must be a positive integer",
            "refund" => "amount must be greater than 0",
            "list_refunds" => "paymentId must be a positive integer",
            "get_request" => "idempotency key must be 1 to 255 characters long",
            "get_payment" => "paymentId must be a positive integer",
            "create_coupon" => "name is required",
            "get_coupon" | "issue_coupon" => "couponId must be a positive integer",
            "list_user_coupons" => "userId must be a positive integer",
            _ => "the request body is malformed JSON",
        },
        Code::IdempotencyKeyRequired => {
            "an idempotency key is required: send the Idempotency-Key header or the idempotencyKey field"
        }
        Code::InvalidIdempotencyKey => {
            "the Idempotency-Key header and the idempotencyKey field differ"
        }
        Code::Unauthorized => "a valid bearer token is required",
        Code::Forbidden => "this operation needs an administrator token",
        Code::UserNotFound => "no user has this id",
        Code::OrderNotFound => "no order has this id",
        Code::PaymentNotFound => "no payment has this id",
        Code::CouponNotFound => "no coupon has this id",
        Code::RequestNotFound => {
            "no finished request with this idempotency key is recorded for this user; sending the request again with the same key is safe"
        }
        Code::NotFound => "no resource at this path",
        Code::MethodNotAllowed => "this resource allows GET, HEAD",
        Code::RequestTimeout => "the request body did not arrive within 10 s of its head",
        Code::IdempotencyKeyInUse => {
            "a request with this idempotency key is still being processed; retry later"
        }
        Code::OrderAlreadyPaid => "order 9 is already paid",
        Code::OrderCancelled => "order 9 is cancelled",
        Code::PayloadTooLarge => "the request body must not exceed 16384 bytes",
        Code::UnsupportedMediaType => "the request body must be application/json",
        Code::IdempotencyKeyReused => {
            "this idempotency key was already used for a different request"
        }
        Code::InsufficientBalance => "the balance 5000 is less than the requested 10000",
        Code::BalanceLimitExceeded => {
            "charging 10000 to the balance 999999995000 would exceed the maximum balance 1000000000000"
        }
        Code::RefundExceedsPayment => {
            "refunding 20000 exceeds the 10000 left to refund of payment 3"
        }
        Code::CouponSoldOut => "coupon 1 is sold out",
        Code::CouponAlreadyIssued => "coupon 1 was already issued to this user",
        Code::CouponNotOpen => "coupon 1 is not being issued at this time",
        Code::CouponNotUsable => {
            "user coupon 7 cannot be used: it is used, expired or not this user's"
        }
        Code::InternalError => "an unexpected error occurred",
        Code::LockTimeout => {
            "the account is busy with other operations; retry later with the same idempotency key"
        }
        Code::ServiceUnavailable if keyed => {
            "the service is temporarily unavailable; retry later with the same idempotency key"
        }
        Code::ServiceUnavailable => "the service is temporarily unavailable; retry later",
    }
}

/// A problem+json response with one named example per code (the Swagger UI offers them
/// in a list), and `Retry-After` when its codes are retryable.
fn problem_response_of(
    operation_id: &str,
    codes: &[Code],
    keyed: bool,
    description: &str,
) -> RefOr<utoipa::openapi::Response> {
    let examples = codes.iter().map(|code| {
        let value = serde_json::to_value(Problem::new(
            *code,
            example_detail(*code, operation_id, keyed),
        ))
        .unwrap_or_default();
        (
            code.as_str(),
            ExampleBuilder::new()
                .summary(code.title())
                .value(Some(value))
                .build(),
        )
    });
    let mut response = ResponseBuilder::new().description(description).content(
        PROBLEM_JSON,
        ContentBuilder::new()
            .schema(Some(Ref::from_schema_name("Problem")))
            .examples_from_iter(examples)
            .build(),
    );
    if codes.iter().any(|c| c.is_retryable()) {
        response = response.header(
            "Retry-After",
            header(
                Type::Integer,
                "Seconds to wait before retrying (with the retryable codes)",
            ),
        );
    }
    if codes.contains(&Code::Unauthorized) {
        response = response.header("WWW-Authenticate", header(Type::String, "`Bearer`"));
    }
    if codes.contains(&Code::MethodNotAllowed) {
        response = response.header(
            "Allow",
            header(
                Type::String,
                "The methods the path answers, e.g. `GET, HEAD`",
            ),
        );
    }
    RefOr::T(response.build())
}

fn header(schema_type: Type, description: &str) -> utoipa::openapi::header::Header {
    HeaderBuilder::new()
        .schema(Some(ObjectBuilder::new().schema_type(schema_type)))
        .description(Some(description))
        .build()
}

/// The document as served at `/api-docs/openapi.json`, pretty-printed.
///
/// # Errors
/// When it cannot be serialised (it always can; the type allows it).
pub fn document_json() -> Result<String, serde_json::Error> {
    ApiDoc::openapi().to_pretty_json()
}
