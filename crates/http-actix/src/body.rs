//! Reading requests by hand, so that every refusal is one of the API's problems (actix's
//! own extractor errors would answer in its own format) and nothing past the limit is read.

use std::time::{Duration, Instant};

use actix_web::http::header;
use actix_web::web::{BytesMut, Payload};
use actix_web::{HttpMessage, HttpRequest};
use domain::types::{Amount, IdempotencyKey, Limits, OrderId, UserId};
use futures_util::StreamExt;
use serde_json::error::Category;
use serde_json::{Map, Value};

use crate::middleware::HeadReceived;
use crate::problem::{ApiError, Code};

/// How long after its head a request's body may take to arrive: past it, 408
/// `REQUEST_TIMEOUT` and the connection is closed, so a client trickling bytes cannot hold
/// a connection (and a handler) for ever.
pub const BODY_DEADLINE: Duration = Duration::from_secs(10);

/// Bodies above this are refused with 413 `PAYLOAD_TOO_LARGE`.
pub const MAX_BODY_BYTES: usize = 16 * 1024;

pub const IDEMPOTENCY_KEY_HEADER: &str = "Idempotency-Key";

fn too_large() -> ApiError {
    ApiError::new(
        Code::PayloadTooLarge,
        format!("the request body must not exceed {MAX_BODY_BYTES} bytes"),
    )
}

/// `application/json`, with or without parameters, or any `application/*+json`.
fn is_json(content_type: &str) -> bool {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}

/// Reads the body as a JSON object. `Ok(None)` when there is no body (zero bytes).
///
/// Refuses with 413 past [`MAX_BODY_BYTES`] (by `Content-Length` before reading, and while
/// reading for chunked bodies), 415 when a body or a `Content-Type` is there and is not
/// JSON, and 400 for anything that is not one JSON object with distinct field names.
pub async fn read_json_object(
    req: &HttpRequest,
    mut payload: Payload,
) -> Result<Option<Map<String, Value>>, ApiError> {
    let content_type = match req.headers().get(header::CONTENT_TYPE) {
        Some(value) => Some(value.to_str().map_err(|_| unsupported())?),
        None => None,
    };
    if content_type.is_some_and(|ct| !is_json(ct)) {
        return Err(unsupported());
    }
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        return Err(too_large());
    }

    let head = req
        .extensions()
        .get::<HeadReceived>()
        .map_or_else(Instant::now, |h| h.0);
    let deadline = tokio::time::Instant::from_std(head + BODY_DEADLINE);
    let read = async {
        let mut body = BytesMut::new();
        while let Some(chunk) = payload.next().await {
            let chunk =
                chunk.map_err(|_| ApiError::validation("the request body could not be read"))?;
            if body.len() + chunk.len() > MAX_BODY_BYTES {
                return Err(too_large());
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    };
    let body = tokio::time::timeout_at(deadline, read)
        .await
        .map_err(|_| {
            ApiError::new(
                Code::RequestTimeout,
                format!(
                    "the request body did not arrive within {} s of its head",
                    BODY_DEADLINE.as_secs()
                ),
            )
        })??;
    // No body at all stands for `{}`; a body of blanks is not JSON, and is refused below
    // like any other malformed body.
    if body.is_empty() {
        return Ok(None);
    }
    if content_type.is_none() {
        return Err(unsupported());
    }
    parse_object(&body).map(Some)
}

fn unsupported() -> ApiError {
    ApiError::new(
        Code::UnsupportedMediaType,
        "the request body must be application/json",
    )
}

/// One JSON object; a repeated field name is refused rather than silently resolved.
pub fn parse_object(bytes: &[u8]) -> Result<Map<String, Value>, ApiError> {
    let malformed = || ApiError::validation("the request body is malformed JSON");
    let text = std::str::from_utf8(bytes).map_err(|_| malformed())?;
    let value: UniqueObject = serde_json::from_str(text).map_err(|e| match e.classify() {
        // Not JSON at all: bad syntax, or cut off (blanks only, `{"amount":`).
        Category::Syntax | Category::Eof | Category::Io => malformed(),
        // JSON, but not one object with distinct field names.
        Category::Data if e.to_string().starts_with("duplicate field") => {
            ApiError::validation("the request body repeats a field")
        }
        Category::Data => ApiError::validation("the request body must be a JSON object"),
    })?;
    Ok(value.0)
}

/// A JSON object whose deserialisation fails on a repeated key (serde_json's `Map` would
/// keep the last one, letting `{"amount":1,"amount":1000000}` mean two things).
struct UniqueObject(Map<String, Value>);

impl<'de> serde::Deserialize<'de> for UniqueObject {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = UniqueObject;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut access: A,
            ) -> Result<UniqueObject, A::Error> {
                let mut map = Map::new();
                while let Some((key, value)) = access.next_entry::<String, Value>()? {
                    if map.contains_key(&key) {
                        return Err(serde::de::Error::custom(format_args!(
                            "duplicate field `{key}`"
                        )));
                    }
                    map.insert(key, value);
                }
                Ok(UniqueObject(map))
            }
        }
        deserializer.deserialize_map(Visitor)
    }
}

/// A field that must be a whole number; `None` when absent or null.
fn integer_field(body: &Map<String, Value>, name: &str) -> Result<Option<i64>, ApiError> {
    match body.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => match n.as_i64() {
            Some(v) => Ok(Some(v)),
            None if n.is_u64() => Ok(Some(i64::MAX)), // above every limit; refused by the caller
            None => Err(ApiError::validation(format!("{name} must be an integer"))),
        },
        Some(_) => Err(ApiError::validation(format!("{name} must be an integer"))),
    }
}

/// The `amount` field, within 1..=`MAX_AMOUNT`.
pub fn amount(body: &Map<String, Value>, limits: &Limits) -> Result<Amount, ApiError> {
    match integer_field(body, "amount")? {
        None => Err(ApiError::validation("amount is required")),
        Some(v) => Ok(Amount::new(v, limits)?),
    }
}

/// A required positive id field such as `userId` or `orderId`.
pub fn id_field(body: &Map<String, Value>, name: &str) -> Result<i64, ApiError> {
    match integer_field(body, name)? {
        None => Err(ApiError::validation(format!("{name} is required"))),
        Some(v) if v >= 1 => Ok(v),
        Some(_) => Err(ApiError::validation(format!(
            "{name} must be a positive integer"
        ))),
    }
}

pub fn user_id_field(body: &Map<String, Value>) -> Result<UserId, ApiError> {
    Ok(UserId::new(id_field(body, "userId")?)?)
}

pub fn order_id_field(body: &Map<String, Value>) -> Result<OrderId, ApiError> {
    Ok(OrderId::new(id_field(body, "orderId")?)?)
}

/// The idempotency key, from the `Idempotency-Key` header or the `idempotencyKey` field.
/// Both may be sent if they agree; neither is 400 `IDEMPOTENCY_KEY_REQUIRED`.
pub fn idempotency_key(
    req: &HttpRequest,
    body: Option<&Map<String, Value>>,
) -> Result<IdempotencyKey, ApiError> {
    let invalid = |detail: &str| ApiError::new(Code::InvalidIdempotencyKey, detail);
    let mut headers = req.headers().get_all(IDEMPOTENCY_KEY_HEADER);
    let from_header = match headers.next() {
        None => None,
        Some(first) => {
            if headers.any(|other| other != first) {
                return Err(invalid(
                    "the Idempotency-Key header is sent more than once with different values",
                ));
            }
            let raw = first.to_str().map_err(|_| {
                invalid("the idempotency key must contain only visible ASCII characters")
            })?;
            Some(raw)
        }
    };
    let from_body = match body.and_then(|b| b.get("idempotencyKey")) {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.as_str()),
        Some(_) => return Err(invalid("idempotencyKey must be a string")),
    };
    let raw = match (from_header, from_body) {
        (None, None) => {
            return Err(ApiError::new(
                Code::IdempotencyKeyRequired,
                "an idempotency key is required: send the Idempotency-Key header or the idempotencyKey field",
            ));
        }
        (Some(h), Some(b)) if h != b => {
            return Err(invalid(
                "the Idempotency-Key header and the idempotencyKey field differ",
            ));
        }
        (Some(k), _) | (None, Some(k)) => k,
    };
    IdempotencyKey::parse(raw).map_err(|e| ApiError::new(Code::InvalidIdempotencyKey, e.0))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[test]
    fn json_media_types() {
        assert!(is_json("application/json"));
        assert!(is_json("Application/JSON; charset=utf-8"));
        assert!(is_json("application/problem+json"));
        assert!(!is_json("text/plain"));
        assert!(!is_json("application/x-www-form-urlencoded"));
        assert!(!is_json(""));
    }

    #[test]
    fn duplicate_fields_are_refused() {
        let err = parse_object(br#"{"amount":1,"amount":2}"#).unwrap_err();
        assert_eq!(err.code, Code::ValidationError);
        assert!(err.detail.contains("repeats"));
    }

    #[test]
    fn malformed_json_is_called_so() {
        for body in [
            &b"{\"amount\":"[..],
            b"{",
            b"   ",
            b"\n",
            b"{not json",
            b"\xff",
            b"{\"a\":1}x",
        ] {
            let err = parse_object(body).unwrap_err();
            assert_eq!(err.code, Code::ValidationError);
            assert_eq!(
                err.detail,
                "the request body is malformed JSON",
                "{}",
                String::from_utf8_lossy(body)
            );
        }
        for body in [&b"[1,2]"[..], b"1", b"\"x\"", b"null"] {
            assert_eq!(
                parse_object(body).unwrap_err().detail,
                "the request body must be a JSON object"
            );
        }
    }

    #[test]
    fn non_objects_are_refused() {
        for body in [
            &b"[1,2]"[..],
            b"1",
            b"\"x\"",
            b"null",
            b"{",
            b"{\"a\":1}x",
            b"\xff",
        ] {
            assert_eq!(parse_object(body).unwrap_err().code, Code::ValidationError);
        }
    }

    #[test]
    fn amounts() {
        let limits = Limits::default();
        let parse = |s: &str| amount(&parse_object(s.as_bytes()).unwrap(), &limits);
        assert_eq!(parse(r#"{"amount":10000}"#).unwrap().get(), 10000);
        for bad in [
            r#"{}"#,
            r#"{"amount":null}"#,
            r#"{"amount":0}"#,
            r#"{"amount":-5}"#,
            r#"{"amount":1.5}"#,
            r#"{"amount":10000.0}"#,
            r#"{"amount":"100"}"#,
            r#"{"amount":1000000001}"#,
            r#"{"amount":9223372036854775807}"#,
            r#"{"amount":9223372036854775808}"#,
            r#"{"amount":100000000000000000000000}"#,
            r#"{"amount":true}"#,
        ] {
            assert_eq!(parse(bad).unwrap_err().code, Code::ValidationError, "{bad}");
        }
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            /// Arbitrary bytes never panic the parser: one JSON object or a 400.
            #[test]
            fn any_bytes_parse_or_are_refused(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
                match parse_object(&bytes) {
                    Ok(map) => prop_assert!(serde_json::to_value(&map).is_ok()),
                    Err(e) => prop_assert_eq!(e.code, Code::ValidationError),
                }
            }

            /// Every integer amount is accepted exactly when it is within 1..=MAX_AMOUNT.
            #[test]
            fn integer_amounts(value in any::<i64>()) {
                let limits = Limits::default();
                let body = parse_object(format!(r#"{{"amount":{value}}}"#).as_bytes()).unwrap();
                let ok = (1..=limits.max_amount).contains(&value);
                prop_assert_eq!(amount(&body, &limits).is_ok(), ok);
            }

            /// Fractions and numbers past 64 bits are refused, never truncated.
            #[test]
            fn non_integers_are_refused(whole in 1i64..1_000, frac in 1u32..1000, big in 19usize..40) {
                let limits = Limits::default();
                let fraction = parse_object(format!(r#"{{"amount":{whole}.{frac}}}"#).as_bytes()).unwrap();
                prop_assert!(amount(&fraction, &limits).is_err());
                let huge = parse_object(format!(r#"{{"amount":9{}}}"#, "9".repeat(big)).as_bytes()).unwrap();
                prop_assert!(amount(&huge, &limits).is_err());
            }

            /// A body key is accepted exactly when it is 1..=255 visible ASCII characters.
            #[test]
            fn body_keys(key in prop_oneof!["\\PC{0,300}", "[ -~]{0,300}", "[!-~]{250,260}"]) {
                let req = actix_web::test::TestRequest::default().to_http_request();
                let mut body = Map::new();
                body.insert("idempotencyKey".to_owned(), Value::String(key.clone()));
                let valid = !key.is_empty() && key.len() <= 255 && key.bytes().all(|b| (0x21..=0x7e).contains(&b));
                let parsed = idempotency_key(&req, Some(&body));
                prop_assert_eq!(parsed.is_ok(), valid);
                if let Ok(parsed) = parsed {
                    prop_assert_eq!(parsed.as_str(), key.as_str());
                } else if let Err(e) = parsed {
                    prop_assert_eq!(e.code, Code::InvalidIdempotencyKey);
                }
            }
        }
    }
}
