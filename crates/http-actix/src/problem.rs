//! Every error the API answers, as `application/problem+json`. The client sees a code, a
//! title and a safe detail; causes are logged with the request id, never sent.

use actix_web::http::StatusCode;
use actix_web::http::header::{self, HeaderValue};
use actix_web::{HttpResponse, ResponseError};
use domain::OperationError;
use domain::types::ValidationError;
use serde::Serialize;
use utoipa::ToSchema;

pub const PROBLEM_JSON: &str = "application/problem+json";

/// Seconds a client should wait before retrying a retryable error.
const RETRY_AFTER_SECS: &str = "1";

/// The problem+json body (RFC 9457) with the service's `code`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct Problem {
    /// A URI reference naming the problem type.
    #[serde(rename = "type")]
    #[schema(example = "/problems/insufficient-balance")]
    pub type_uri: String,
    #[schema(example = "Insufficient balance")]
    pub title: String,
    #[schema(example = 422)]
    pub status: u16,
    #[schema(example = "INSUFFICIENT_BALANCE")]
    pub code: String,
    #[schema(example = "the balance 5000 is less than the requested 10000")]
    pub detail: String,
}

/// The codes of the error table, and the few the transport adds (unknown route or method).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    ValidationError,
    IdempotencyKeyRequired,
    InvalidIdempotencyKey,
    Unauthorized,
    Forbidden,
    UserNotFound,
    OrderNotFound,
    PaymentNotFound,
    CouponNotFound,
    RequestNotFound,
    NotFound,
    MethodNotAllowed,
    RequestTimeout,
    IdempotencyKeyInUse,
    OrderAlreadyPaid,
    OrderCancelled,
    PayloadTooLarge,
    UnsupportedMediaType,
    IdempotencyKeyReused,
    InsufficientBalance,
    BalanceLimitExceeded,
    RefundExceedsPayment,
    CouponSoldOut,
    CouponAlreadyIssued,
    CouponNotOpen,
    CouponNotUsable,
    InternalError,
    LockTimeout,
    ServiceUnavailable,
}

impl Code {
    /// Every code, in the order of their statuses.
    pub const ALL: [Code; 29] = [
        Code::ValidationError,
        Code::IdempotencyKeyRequired,
        Code::InvalidIdempotencyKey,
        Code::Unauthorized,
        Code::Forbidden,
        Code::UserNotFound,
        Code::OrderNotFound,
        Code::PaymentNotFound,
        Code::CouponNotFound,
        Code::RequestNotFound,
        Code::NotFound,
        Code::MethodNotAllowed,
        Code::RequestTimeout,
        Code::IdempotencyKeyInUse,
        Code::OrderAlreadyPaid,
        Code::OrderCancelled,
        Code::PayloadTooLarge,
        Code::UnsupportedMediaType,
        Code::IdempotencyKeyReused,
        Code::InsufficientBalance,
        Code::BalanceLimitExceeded,
        Code::RefundExceedsPayment,
        Code::CouponSoldOut,
        Code::CouponAlreadyIssued,
        Code::CouponNotOpen,
        Code::CouponNotUsable,
        Code::InternalError,
        Code::LockTimeout,
        Code::ServiceUnavailable,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Code::ValidationError => "VALIDATION_ERROR",
            Code::IdempotencyKeyRequired => "IDEMPOTENCY_KEY_REQUIRED",
            Code::InvalidIdempotencyKey => "INVALID_IDEMPOTENCY_KEY",
            Code::Unauthorized => "UNAUTHORIZED",
            Code::Forbidden => "FORBIDDEN",
            Code::UserNotFound => "USER_NOT_FOUND",
            Code::OrderNotFound => "ORDER_NOT_FOUND",
            Code::PaymentNotFound => "PAYMENT_NOT_FOUND",
            Code::CouponNotFound => "COUPON_NOT_FOUND",
            Code::RequestNotFound => "REQUEST_NOT_FOUND",
            Code::NotFound => "NOT_FOUND",
            Code::MethodNotAllowed => "METHOD_NOT_ALLOWED",
            Code::RequestTimeout => "REQUEST_TIMEOUT",
            Code::IdempotencyKeyInUse => "IDEMPOTENCY_KEY_IN_USE",
            Code::OrderAlreadyPaid => "ORDER_ALREADY_PAID",
            Code::OrderCancelled => "ORDER_CANCELLED",
            Code::PayloadTooLarge => "PAYLOAD_TOO_LARGE",
            Code::UnsupportedMediaType => "UNSUPPORTED_MEDIA_TYPE",
            Code::IdempotencyKeyReused => "IDEMPOTENCY_KEY_REUSED",
            Code::InsufficientBalance => "INSUFFICIENT_BALANCE",
            Code::BalanceLimitExceeded => "BALANCE_LIMIT_EXCEEDED",
            Code::RefundExceedsPayment => "REFUND_EXCEEDS_PAYMENT",
            Code::CouponSoldOut => "COUPON_SOLD_OUT",
            Code::CouponAlreadyIssued => "COUPON_ALREADY_ISSUED",
            Code::CouponNotOpen => "COUPON_NOT_OPEN",
            Code::CouponNotUsable => "COUPON_NOT_USABLE",
            Code::InternalError => "INTERNAL_ERROR",
            Code::LockTimeout => "LOCK_TIMEOUT",
            Code::ServiceUnavailable => "SERVICE_UNAVAILABLE",
        }
    }

    pub fn status(self) -> u16 {
        match self {
            Code::ValidationError | Code::IdempotencyKeyRequired | Code::InvalidIdempotencyKey => {
                400
            }
            Code::Unauthorized => 401,
            Code::Forbidden => 403,
            Code::UserNotFound
            | Code::OrderNotFound
            | Code::PaymentNotFound
            | Code::CouponNotFound
            | Code::RequestNotFound
            | Code::NotFound => 404,
            Code::MethodNotAllowed => 405,
            Code::RequestTimeout => 408,
            Code::IdempotencyKeyInUse | Code::OrderAlreadyPaid | Code::OrderCancelled => 409,
            Code::PayloadTooLarge => 413,
            Code::UnsupportedMediaType => 415,
            Code::IdempotencyKeyReused
            | Code::InsufficientBalance
            | Code::BalanceLimitExceeded
            | Code::RefundExceedsPayment
            | Code::CouponSoldOut
            | Code::CouponAlreadyIssued
            | Code::CouponNotOpen
            | Code::CouponNotUsable => 422,
            Code::InternalError => 500,
            Code::LockTimeout | Code::ServiceUnavailable => 503,
        }
    }

    pub fn title(self) -> &'static str {
        match self {
            Code::ValidationError => "Invalid request",
            Code::IdempotencyKeyRequired => "Idempotency key required",
            Code::InvalidIdempotencyKey => "Invalid idempotency key",
            Code::Unauthorized => "Unauthorized",
            Code::Forbidden => "Forbidden",
            Code::UserNotFound => "User not found",
            Code::OrderNotFound => "Order not found",
            Code::PaymentNotFound => "Payment not found",
            Code::CouponNotFound => "Coupon not found",
            Code::RequestNotFound => "Request not found",
            Code::NotFound => "Not found",
            Code::MethodNotAllowed => "Method not allowed",
            Code::RequestTimeout => "Request timeout",
            Code::IdempotencyKeyInUse => "Idempotency key in use",
            Code::OrderAlreadyPaid => "Order already paid",
            Code::OrderCancelled => "Order cancelled",
            Code::PayloadTooLarge => "Payload too large",
            Code::UnsupportedMediaType => "Unsupported media type",
            Code::IdempotencyKeyReused => "Idempotency key reused",
            Code::InsufficientBalance => "Insufficient balance",
            Code::BalanceLimitExceeded => "Balance limit exceeded",
            Code::RefundExceedsPayment => "Refund exceeds payment",
            Code::CouponSoldOut => "Coupon sold out",
            Code::CouponAlreadyIssued => "Coupon already issued",
            Code::CouponNotOpen => "Coupon not open",
            Code::CouponNotUsable => "Coupon not usable",
            Code::InternalError => "Internal error",
            Code::LockTimeout => "Lock timeout",
            Code::ServiceUnavailable => "Service unavailable",
        }
    }

    /// `/problems/insufficient-balance` for `INSUFFICIENT_BALANCE`.
    pub fn type_uri(self) -> String {
        format!(
            "/problems/{}",
            self.as_str().to_ascii_lowercase().replace('_', "-")
        )
    }

    /// Business refusals: stored with their key and replayed like a success.
    pub fn is_stored(self) -> bool {
        matches!(
            self,
            Code::OrderAlreadyPaid
                | Code::OrderCancelled
                | Code::InsufficientBalance
                | Code::BalanceLimitExceeded
                | Code::RefundExceedsPayment
                | Code::CouponSoldOut
                | Code::CouponAlreadyIssued
                | Code::CouponNotOpen
                | Code::CouponNotUsable
        )
    }

    /// Errors a client should retry after a pause, with the same idempotency key.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            Code::IdempotencyKeyInUse | Code::LockTimeout | Code::ServiceUnavailable
        )
    }
}

impl Problem {
    pub fn new(code: Code, detail: impl Into<String>) -> Self {
        Self {
            type_uri: code.type_uri(),
            title: code.title().to_owned(),
            status: code.status(),
            code: code.as_str().to_owned(),
            detail: detail.into(),
        }
    }

    /// The body's bytes. Serialising this struct cannot fail; the fallback keeps the
    /// function total anyway.
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_else(|_| b"{}".to_vec())
    }
}

/// An error answer that is not stored: everything the handlers refuse before or around
/// the operation.
#[derive(Debug, thiserror::Error)]
#[error("{code:?}: {detail}")]
pub struct ApiError {
    pub code: Code,
    pub detail: String,
    /// Extra headers (`Allow` on 405).
    pub allow: Option<&'static str>,
}

impl ApiError {
    pub fn new(code: Code, detail: impl Into<String>) -> Self {
        Self {
            code,
            detail: detail.into(),
            allow: None,
        }
    }

    pub fn validation(detail: impl Into<String>) -> Self {
        Self::new(Code::ValidationError, detail)
    }

    pub fn method_not_allowed(allow: &'static str) -> Self {
        Self {
            code: Code::MethodNotAllowed,
            detail: format!("this resource allows {allow}"),
            allow: Some(allow),
        }
    }
}

impl From<ValidationError> for ApiError {
    fn from(e: ValidationError) -> Self {
        ApiError::validation(e.0)
    }
}

/// The answer to a failed operation that carries no idempotency key (the reads, and the
/// creation of a user or an order): its 503 says only to retry; everything else is as for
/// a balance change.
pub fn read_error(e: OperationError) -> ApiError {
    match e {
        OperationError::Unavailable(cause) => {
            tracing::warn!(error = %format!("{cause:#}"), "dependency unavailable");
            ApiError::new(
                Code::ServiceUnavailable,
                "the service is temporarily unavailable; retry later",
            )
        }
        other => other.into(),
    }
}

impl From<OperationError> for ApiError {
    fn from(e: OperationError) -> Self {
        match e {
            OperationError::UserNotFound => {
                ApiError::new(Code::UserNotFound, "no user has this id")
            }
            OperationError::OrderNotFound => {
                // The same words for a lookup and a payment, and for another user's order
                // as for none at all.
                ApiError::new(Code::OrderNotFound, "no order has this id")
            }
            OperationError::PaymentNotFound => {
                ApiError::new(Code::PaymentNotFound, "no payment has this id")
            }
            OperationError::CouponNotFound => {
                ApiError::new(Code::CouponNotFound, "no coupon has this id")
            }
            OperationError::RequestNotFound => ApiError::new(
                Code::RequestNotFound,
                "no finished request with this idempotency key is recorded for this user; \
                 sending the request again with the same key is safe",
            ),
            OperationError::OrderAlreadyPaid => ApiError::new(
                Code::OrderAlreadyPaid,
                "the order is already paid and cannot be cancelled",
            ),
            OperationError::KeyInUse => ApiError::new(
                Code::IdempotencyKeyInUse,
                "a request with this idempotency key is still being processed; retry later",
            ),
            OperationError::KeyReused => ApiError::new(
                Code::IdempotencyKeyReused,
                "this idempotency key was already used for a different request",
            ),
            OperationError::LockTimeout => ApiError::new(
                Code::LockTimeout,
                "the account is busy with other operations; retry later with the same idempotency key",
            ),
            OperationError::Unavailable(cause) => {
                tracing::warn!(error = %format!("{cause:#}"), "dependency unavailable");
                ApiError::new(
                    Code::ServiceUnavailable,
                    "the service is temporarily unavailable; retry later with the same idempotency key",
                )
            }
            OperationError::Unexpected(cause) => {
                tracing::error!(error = %format!("{cause:#}"), "unexpected failure");
                ApiError::new(Code::InternalError, "an unexpected error occurred")
            }
        }
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        StatusCode::from_u16(self.code.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }

    fn error_response(&self) -> HttpResponse {
        let body = Problem::new(self.code, self.detail.clone()).to_bytes();
        let mut response = HttpResponse::build(self.status_code());
        response.insert_header((header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON)));
        if self.code.is_retryable() {
            response.insert_header((
                header::RETRY_AFTER,
                HeaderValue::from_static(RETRY_AFTER_SECS),
            ));
        }
        if let Some(allow) = self.allow {
            response.insert_header((header::ALLOW, HeaderValue::from_static(allow)));
        }
        if self.code == Code::RequestTimeout {
            // The rest of a body that came too slowly is not waited for: the connection goes.
            response.force_close();
        }
        if self.code == Code::Unauthorized {
            response.insert_header((header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer")));
        }
        response.body(body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `ALL` lists each code once, in status order; the match below stops compiling when a
    /// code is added, as a reminder to add it to `ALL`.
    #[test]
    fn all_lists_every_code_once() {
        let exhaustive = |code: Code| match code {
            Code::ValidationError
            | Code::IdempotencyKeyRequired
            | Code::InvalidIdempotencyKey
            | Code::Unauthorized
            | Code::Forbidden
            | Code::UserNotFound
            | Code::OrderNotFound
            | Code::PaymentNotFound
            | Code::CouponNotFound
            | Code::RequestNotFound
            | Code::NotFound
            | Code::MethodNotAllowed
            | Code::RequestTimeout
            | Code::IdempotencyKeyInUse
            | Code::OrderAlreadyPaid
            | Code::OrderCancelled
            | Code::PayloadTooLarge
            | Code::UnsupportedMediaType
            | Code::IdempotencyKeyReused
            | Code::InsufficientBalance
            | Code::BalanceLimitExceeded
            | Code::RefundExceedsPayment
            | Code::CouponSoldOut
            | Code::CouponAlreadyIssued
            | Code::CouponNotOpen
            | Code::CouponNotUsable
            | Code::InternalError
            | Code::LockTimeout
            | Code::ServiceUnavailable => code.as_str(),
        };
        let names: std::collections::BTreeSet<_> =
            Code::ALL.iter().map(|c| exhaustive(*c)).collect();
        assert_eq!(names.len(), Code::ALL.len());
        assert!(Code::ALL.windows(2).all(|w| w[0].status() <= w[1].status()));
    }

    #[test]
    fn a_read_that_cannot_run_is_told_to_retry_without_a_key() {
        let read = read_error(OperationError::Unavailable(anyhow::anyhow!("down")));
        assert_eq!(read.code, Code::ServiceUnavailable);
        assert!(!read.detail.contains("idempotency"), "{}", read.detail);
        let write = ApiError::from(OperationError::Unavailable(anyhow::anyhow!("down")));
        assert!(
            write.detail.contains("same idempotency key"),
            "{}",
            write.detail
        );
        let response = read.error_response();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(response.headers().contains_key(header::RETRY_AFTER));
    }

    #[test]
    fn a_timed_out_body_closes_the_connection() {
        let response = ApiError::new(Code::RequestTimeout, "late").error_response();
        assert_eq!(response.status(), StatusCode::REQUEST_TIMEOUT);
        assert!(response.head().connection_type() == actix_web::http::ConnectionType::Close);
    }
}
