//! Reading request bodies into the request types of [`crate::dto`], so that every refusal
//! is one of the API's problems and nothing past the limit is read.
//!
//! The bytes are read here rather than by actix's `Json` extractor, which has no deadline
//! for a body that trickles (408, below); serde does the rest. A body is parsed twice:
//! first as one JSON object with distinct top-level names ([`object`]), which decides
//! between "malformed", "not an object" and "repeats a field" in the order the faults come
//! in the text; then into the request type, whose fields are [`Field`]s that take any JSON
//! value, so that each field is refused with the API's words and in the API's order (the
//! key before the amount) by the type's own methods, not by the deserialiser.

use std::time::{Duration, Instant};

use actix_web::http::header;
use actix_web::web::{BytesMut, Payload};
use actix_web::{HttpMessage, HttpRequest};
use domain::types::{Amount, IdempotencyKey, Limits};
use futures_util::StreamExt;
use serde::de::{DeserializeOwned, DeserializeSeed, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};
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

/// Reads the body into `T`; no body at all (zero bytes) is `T::default()`, as `{}` would be.
///
/// Refuses with 413 past [`MAX_BODY_BYTES`] (by `Content-Length` before reading, and while
/// reading for chunked bodies), 408 when the body is not there [`BODY_DEADLINE`] after the
/// head, 415 when a body or a `Content-Type` is there and is not JSON, and 400 for anything
/// that is not one JSON object with distinct field names.
pub async fn read<T: DeserializeOwned + Default>(
    req: &HttpRequest,
    payload: Payload,
) -> Result<T, ApiError> {
    match read_bytes(req, payload).await? {
        None => Ok(T::default()),
        Some(bytes) => parse(&bytes),
    }
}

/// A request type that may carry the idempotency key in its body.
pub trait KeyedBody {
    /// The body's `idempotencyKey` field.
    fn idempotency_key(&self) -> &Field<String>;
}

/// A body together with its request's idempotency key, from the header or the body.
#[derive(Debug)]
pub struct Keyed<T> {
    pub key: IdempotencyKey,
    pub body: T,
}

/// [`read`], then the idempotency key ([`idempotency_key`]): a key that is missing or
/// wrong is refused before any other field of the body.
pub async fn read_keyed<T: DeserializeOwned + Default + KeyedBody>(
    req: &HttpRequest,
    payload: Payload,
) -> Result<Keyed<T>, ApiError> {
    let body: T = read(req, payload).await?;
    let key = idempotency_key(req, body.idempotency_key())?;
    Ok(Keyed { key, body })
}

/// The body's bytes, `None` when there are none; see [`read`] for the refusals.
async fn read_bytes(req: &HttpRequest, mut payload: Payload) -> Result<Option<BytesMut>, ApiError> {
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
    // No body at all stands for `{}`; a body of blanks is not JSON, and is refused by the
    // parser like any other malformed body.
    if body.is_empty() {
        return Ok(None);
    }
    if content_type.is_none() {
        return Err(unsupported());
    }
    Ok(Some(body))
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

fn unsupported() -> ApiError {
    ApiError::new(
        Code::UnsupportedMediaType,
        "the request body must be application/json",
    )
}

fn too_large() -> ApiError {
    ApiError::new(
        Code::PayloadTooLarge,
        format!("the request body must not exceed {MAX_BODY_BYTES} bytes"),
    )
}

/// A body's bytes as `T`: one JSON object with distinct names ([`object`]), then `T`.
pub fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let object = object(bytes)?;
    // `T`'s fields are `Field`s, which take any value: nothing is refused here that a test
    // of the request types would not show (`dto`'s tests parse arbitrary objects).
    T::deserialize(Value::Object(object))
        .map_err(|_| ApiError::validation("the request body does not have the documented shape"))
}

/// One JSON object whose top-level names are distinct. serde derive refuses a repeated
/// known field by itself, but ignores unknown ones and stops before the repeat's value;
/// this checks every name, after its value, so `{"pad":1,"pad":2}` and
/// `{"amount":1,"amount":` are answered as they always were.
fn object(bytes: &[u8]) -> Result<Map<String, Value>, ApiError> {
    let malformed = || ApiError::validation("the request body is malformed JSON");
    // Bad UTF-8 anywhere is malformed, whatever comes before it.
    let text = std::str::from_utf8(bytes).map_err(|_| malformed())?;
    let mut repeated = false;
    let mut de = serde_json::Deserializer::from_str(text);
    let parsed = DistinctNames {
        repeated: &mut repeated,
    }
    .deserialize(&mut de)
    .and_then(|object| de.end().map(|()| object));
    parsed.map_err(|e| match e.classify() {
        // Not JSON at all: bad syntax, or cut off (blanks only, `{"amount":`).
        Category::Syntax | Category::Eof | Category::Io => malformed(),
        // JSON, but not one object with distinct field names.
        Category::Data if repeated => ApiError::validation("the request body repeats a field"),
        Category::Data => ApiError::validation("the request body must be a JSON object"),
    })
}

/// Reads one JSON object, and says in `repeated` whether it failed on a repeated name
/// (serde_json's errors carry only a message beyond their category).
struct DistinctNames<'a> {
    repeated: &'a mut bool,
}

impl<'de> DeserializeSeed<'de> for DistinctNames<'_> {
    type Value = Map<String, Value>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for DistinctNames<'_> {
    type Value = Map<String, Value>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<Self::Value, A::Error> {
        let mut map = Map::new();
        while let Some((key, value)) = access.next_entry::<String, Value>()? {
            if map.contains_key(&key) {
                *self.repeated = true;
                return Err(serde::de::Error::custom("a repeated field"));
            }
            map.insert(key, value);
        }
        Ok(map)
    }
}

/// One field of a request body as sent, before it is checked: absent (or null), a value of
/// the wanted type, or some other JSON value. Deserialising a `Field` never fails, so the
/// request type's methods refuse wrong fields in the API's words and order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Field<T> {
    #[default]
    Absent,
    Given(T),
    Wrong,
}

impl<'de, T: DeserializeOwned> Deserialize<'de> for Field<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Ok(match Value::deserialize(deserializer)? {
            Value::Null => Field::Absent,
            value => T::deserialize(value).map_or(Field::Wrong, Field::Given),
        })
    }
}

/// A JSON integer. Wider than `i64` so that one past it (up to `u64::MAX`) is "too large"
/// rather than "not an integer"; fractions and anything wider are not integers (serde_json
/// reads them as floats, which an integer type refuses).
pub type Integer = Field<i128>;

/// A whole-number field; `None` when absent or null, numbers above `i64::MAX` as `i64::MAX`
/// (above every limit, and refused by the caller).
pub fn integer(field: &Integer, name: &str) -> Result<Option<i64>, ApiError> {
    match *field {
        Field::Absent => Ok(None),
        Field::Given(v) => Ok(Some(i64::try_from(v).unwrap_or(if v > 0 {
            i64::MAX
        } else {
            i64::MIN
        }))),
        Field::Wrong => Err(ApiError::validation(format!("{name} must be an integer"))),
    }
}

/// An `amount` field, within 1..=`MAX_AMOUNT`; `None` when absent.
pub fn optional_amount(field: &Integer, limits: &Limits) -> Result<Option<Amount>, ApiError> {
    match integer(field, "amount")? {
        None => Ok(None),
        Some(v) => Ok(Some(Amount::new(v, limits)?)),
    }
}

/// A required `amount` field, within 1..=`MAX_AMOUNT`.
pub fn amount(field: &Integer, limits: &Limits) -> Result<Amount, ApiError> {
    optional_amount(field, limits)?.ok_or_else(|| ApiError::validation("amount is required"))
}

/// A required positive id field such as `userId` or `orderId`, built by `new`.
pub fn id<T>(
    field: &Integer,
    name: &str,
    new: fn(i64) -> Result<T, domain::types::ValidationError>,
) -> Result<T, ApiError> {
    match integer(field, name)? {
        None => Err(ApiError::validation(format!("{name} is required"))),
        Some(v) if v >= 1 => Ok(new(v)?),
        Some(_) => Err(ApiError::validation(format!(
            "{name} must be a positive integer"
        ))),
    }
}

/// An optional positive id field such as `userCouponId`; `None` when absent or null.
pub fn optional_id<T>(
    field: &Integer,
    name: &str,
    new: fn(i64) -> Result<T, domain::types::ValidationError>,
) -> Result<Option<T>, ApiError> {
    match field {
        Field::Absent => Ok(None),
        _ => id(field, name, new).map(Some),
    }
}

/// The idempotency key, from the `Idempotency-Key` header or the `idempotencyKey` field.
/// Both may be sent if they agree; neither is 400 `IDEMPOTENCY_KEY_REQUIRED`.
pub fn idempotency_key(
    req: &HttpRequest,
    from_body: &Field<String>,
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
    let from_body = match from_body {
        Field::Absent => None,
        Field::Given(s) => Some(s.as_str()),
        Field::Wrong => return Err(invalid("idempotencyKey must be a string")),
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
    fn repeated_names_are_refused_known_or_not() {
        for body in [
            &br#"{"amount":1,"amount":2}"#[..],
            br#"{"pad":1,"amount":1,"pad":1}"#,
            // The repeat is seen once its value is read, before what follows it.
            br#"{"a":1,"a":2,"b":"#,
        ] {
            let err = object(body).unwrap_err();
            assert_eq!(err.code, Code::ValidationError);
            assert_eq!(err.detail, "the request body repeats a field");
        }
        // Inside a value, a repeat is the value's business (and is ignored with it).
        assert!(object(br#"{"a":{"b":1,"b":2}}"#).is_ok());
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
            b"{\"a\":1,\"a\":",
            b"{\"a\":1e400}",
            // Bad UTF-8 anywhere, even after a repeat.
            b"{\"a\":1,\"a\":2,\"\xff\":1}",
        ] {
            let err = object(body).unwrap_err();
            assert_eq!(err.code, Code::ValidationError);
            assert_eq!(
                err.detail,
                "the request body is malformed JSON",
                "{}",
                String::from_utf8_lossy(body)
            );
        }
        for body in [&b"[1,2]"[..], b"1", b"\"x\"", b"null", b"[1", b"[1,2]x"] {
            assert_eq!(
                object(body).unwrap_err().detail,
                "the request body must be a JSON object",
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn integers_saturate_past_i64_and_refuse_the_rest() {
        let field = |s: &str| -> Integer { serde_json::from_str(s).unwrap() };
        assert_eq!(integer(&field("7"), "n").unwrap(), Some(7));
        assert_eq!(integer(&field("null"), "n").unwrap(), None);
        assert_eq!(integer(&Field::Absent, "n").unwrap(), None);
        assert_eq!(
            integer(&field("9223372036854775808"), "n").unwrap(),
            Some(i64::MAX)
        );
        assert_eq!(
            integer(&field("-9223372036854775808"), "n").unwrap(),
            Some(i64::MIN)
        );
        for wrong in [
            "1.0",
            "1e2",
            "\"1\"",
            "true",
            "[]",
            "{}",
            "18446744073709551616",
        ] {
            assert_eq!(
                integer(&field(wrong), "n").unwrap_err().detail,
                "n must be an integer",
                "{wrong}"
            );
        }
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            /// Arbitrary bytes never panic the parser: one JSON object or a 400.
            #[test]
            fn any_bytes_parse_or_are_refused(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
                match object(&bytes) {
                    Ok(map) => prop_assert!(serde_json::to_value(&map).is_ok()),
                    Err(e) => prop_assert_eq!(e.code, Code::ValidationError),
                }
            }

            /// A body key is accepted exactly when it is 1..=255 visible ASCII characters.
            #[test]
            fn body_keys(key in prop_oneof!["\\PC{0,300}", "[ -~]{0,300}", "[!-~]{250,260}"]) {
                let req = actix_web::test::TestRequest::default().to_http_request();
                let valid = !key.is_empty() && key.len() <= 255 && key.bytes().all(|b| (0x21..=0x7e).contains(&b));
                let parsed = idempotency_key(&req, &Field::Given(key.clone()));
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
