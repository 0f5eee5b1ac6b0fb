//! What wraps every request: its id, authentication, a log line and metrics.

use std::time::Instant;

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::Method;
use actix_web::http::header::{HeaderName, HeaderValue};
use actix_web::middleware::Next;
use actix_web::{Error, HttpMessage};
use tracing::Instrument;

pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

pub const HTTP_REQUESTS_TOTAL: &str = "http_requests_total";
pub const HTTP_REQUEST_DURATION_SECONDS: &str = "http_request_duration_seconds";

/// The request's id, as stored in the request's extensions.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

/// When the request's head was handed to the application: a body must have arrived
/// [`crate::body::BODY_DEADLINE`] after it.
#[derive(Debug, Clone, Copy)]
pub struct HeadReceived(pub Instant);

/// A client's id is kept if it is 1–128 characters of letters, digits and `-_.:`; anything
/// else (empty, too long, spaces, control bytes) is replaced, so ids are safe in logs.
fn sane_request_id(value: &HeaderValue) -> Option<String> {
    let raw = value.to_str().ok()?;
    let ok = !raw.is_empty()
        && raw.len() <= 128
        && raw
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'));
    ok.then(|| raw.to_owned())
}

/// The method as a metric label: one of a fixed set, so a client inventing method names
/// cannot grow the metric series without bound.
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::OPTIONS => "OPTIONS",
        _ => "OTHER",
    }
}

/// Assigns the request id, logs one line per request inside a span that carries the id,
/// and records the request metrics (labels from bounded sets: the method's, the route's
/// pattern, the status). Authentication is not here but on the `/api` scope
/// ([`crate::auth::authenticate`]), where routing has already decided what the path means.
pub async fn observe(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<impl MessageBody>, Error> {
    let started = Instant::now();
    let request_id = req
        .headers()
        .get(&REQUEST_ID)
        .and_then(sane_request_id)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    req.extensions_mut().insert(RequestId(request_id.clone()));
    req.extensions_mut().insert(HeadReceived(started));
    let method = method_label(req.method());
    let span = tracing::info_span!("request", request_id = %request_id, method = %req.method(), path = %req.path());

    let mut response = next.call(req).instrument(span.clone()).await?;

    if let Ok(value) = HeaderValue::from_str(&request_id) {
        response.headers_mut().insert(REQUEST_ID, value);
    }
    let status = response.status().as_u16();
    let route = response
        .request()
        .match_pattern()
        .unwrap_or_else(|| "unmatched".to_owned());
    let elapsed = started.elapsed();
    metrics::counter!(HTTP_REQUESTS_TOTAL,
        "method" => method, "route" => route.clone(), "status" => status.to_string())
    .increment(1);
    metrics::histogram!(HTTP_REQUEST_DURATION_SECONDS, "method" => method, "route" => route)
        .record(elapsed.as_secs_f64());
    span.in_scope(|| {
        tracing::info!(
            status,
            duration_ms = elapsed.as_secs_f64() * 1000.0,
            "request finished"
        );
    });
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids() {
        assert_eq!(
            sane_request_id(&HeaderValue::from_static("abc-123_x.y:z")),
            Some("abc-123_x.y:z".to_owned())
        );
        assert_eq!(sane_request_id(&HeaderValue::from_static("")), None);
        assert_eq!(sane_request_id(&HeaderValue::from_static("a b")), None);
        assert_eq!(sane_request_id(&HeaderValue::from_static("<script>")), None);
        let long = "a".repeat(129);
        assert_eq!(
            sane_request_id(&HeaderValue::from_str(&long).unwrap_or(HeaderValue::from_static(""))),
            None
        );
    }

    #[test]
    fn methods_are_a_bounded_set() {
        assert_eq!(method_label(&Method::GET), "GET");
        assert_eq!(method_label(&Method::POST), "POST");
        for invented in ["FOO", "X-1", "get"] {
            let method = Method::from_bytes(invented.as_bytes()).unwrap_or(Method::TRACE);
            assert_eq!(method_label(&method), "OTHER", "{invented}");
        }
    }
}
