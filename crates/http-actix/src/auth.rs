//! Who a request acts for, decided once per request on the `/api` scope (so on the route
//! the request reaches, whatever the spelling of its path), and what each handler lets it do.
//!
//! - No `API_TOKEN` and no JWT key configured: the service is open (it sits behind a
//!   gateway) and every request acts for every user.
//! - `Authorization: Bearer <API_TOKEN>`, or a JWT whose `scope` holds `balance:admin`:
//!   acts for every user ([`Principal::Admin`]).
//! - A JWT whose `sub` is a user id: acts for that user only ([`Principal::User`]).
//! - Anything else: 401 `UNAUTHORIZED`.

use std::future::{Ready, ready};

use actix_web::body::{EitherBody, MessageBody};
use actix_web::dev::{Payload, ServiceRequest, ServiceResponse};
use actix_web::http::header::{self, HeaderMap};
use actix_web::middleware::Next;
use actix_web::web::Data;
use actix_web::{Error, FromRequest, HttpMessage, HttpRequest, ResponseError};
use domain::OperationError;
use domain::types::UserId;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::AppState;
use crate::problem::{ApiError, Code};

/// The scope that acts for every user.
pub const ADMIN_SCOPE: &str = "balance:admin";

/// Seconds of clock skew tolerated on `exp` and `nbf`.
pub const JWT_LEEWAY_SECS: u64 = 30;

/// The shortest HS256 secret accepted: the hash's own size (RFC 7518 §3.2).
pub const MIN_HS256_SECRET_BYTES: usize = 32;

/// The shortest service or metrics token accepted: a token anyone can guess is no token.
pub const MIN_TOKEN_CHARS: usize = 32;

/// PEM labels that hold a public key (or a certificate carrying one). A private key is
/// refused: it has no business on the verifying host, and jsonwebtoken would accept an RSA
/// one silently.
const PUBLIC_PEM_LABELS: [&str; 3] = ["PUBLIC KEY", "RSA PUBLIC KEY", "CERTIFICATE"];

/// Whom an authenticated request acts for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Principal {
    /// Every user: no authentication configured, the service token, or an admin JWT.
    Admin,
    /// One user: a JWT whose `sub` is this id.
    User(UserId),
}

impl Principal {
    pub fn acts_for(self, user: UserId) -> bool {
        match self {
            Principal::Admin => true,
            Principal::User(own) => own == user,
        }
    }

    /// Refuses another user's resource with the very answer a user that does not exist
    /// gets, so a token cannot probe which ids exist.
    ///
    /// # Errors
    /// 404 `USER_NOT_FOUND` when this principal does not act for `user`.
    pub fn check_user(self, user: UserId) -> Result<(), ApiError> {
        if self.acts_for(user) {
            Ok(())
        } else {
            Err(OperationError::UserNotFound.into())
        }
    }

    /// # Errors
    /// 403 `FORBIDDEN` for a user token on an operation only an administrator may call.
    pub fn require_admin(self) -> Result<(), ApiError> {
        match self {
            Principal::Admin => Ok(()),
            Principal::User(_) => Err(ApiError::new(
                Code::Forbidden,
                "this operation needs an administrator token",
            )),
        }
    }
}

/// Handlers on the `/api` scope take the principal [`authenticate`] stored. A handler
/// reached without it (a route registered outside the scope by mistake) is refused, never
/// treated as open.
impl FromRequest for Principal {
    type Error = ApiError;
    type Future = Ready<Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        ready(
            req.extensions()
                .get::<Principal>()
                .copied()
                .ok_or_else(unauthorized),
        )
    }
}

fn unauthorized() -> ApiError {
    ApiError::new(Code::Unauthorized, "a valid bearer token is required")
}

/// Why an authentication setting cannot be used; the message names the variable.
#[derive(Debug, thiserror::Error)]
pub enum AuthConfigError {
    #[error("AUTH_JWT_SECRET must be at least {MIN_HS256_SECRET_BYTES} bytes (it is {0})")]
    SecretTooShort(usize),
    #[error("AUTH_JWT_SECRET cannot be used as an HS256 key")]
    UnusableSecret,
    #[error(
        "AUTH_JWT_PUBLIC_KEY_FILE must hold a PEM public key of RSA (RS256) or Ed25519 (EdDSA)"
    )]
    UnsupportedKey,
    #[error("AUTH_JWT_PUBLIC_KEY_FILE holds a PRIVATE key: give the service the public key only")]
    PrivateKey,
    #[error(
        "{0} must be at least {MIN_TOKEN_CHARS} visible ASCII characters (no spaces); unset it to turn it off"
    )]
    WeakToken(&'static str),
}

/// Verifies per-user JWTs with one key and one algorithm, fixed at start: a token that
/// names another algorithm (`none`, or HS256 signed with the public key as a secret) is
/// refused before its signature is looked at.
#[derive(Clone)]
pub struct JwtVerifier {
    key: DecodingKey,
    validation: Validation,
}

impl std::fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtVerifier")
            .field("algorithms", &self.validation.algorithms)
            .finish_non_exhaustive()
    }
}

/// The claims this service reads; `exp` (and `nbf`, `aud`, `iss` when configured) are
/// checked by the library.
#[derive(Debug, Deserialize)]
struct Claims {
    sub: Option<String>,
    scope: Option<String>,
}

impl JwtVerifier {
    /// HS256 with a shared secret (`AUTH_JWT_SECRET`).
    ///
    /// # Errors
    /// A secret shorter than [`MIN_HS256_SECRET_BYTES`].
    pub fn hs256(secret: &[u8]) -> Result<Self, AuthConfigError> {
        if secret.len() < MIN_HS256_SECRET_BYTES {
            return Err(AuthConfigError::SecretTooShort(secret.len()));
        }
        let key = DecodingKey::from_secret(secret).map_err(|_| AuthConfigError::UnusableSecret)?;
        Ok(Self::new(key, Algorithm::HS256))
    }

    /// RS256 or EdDSA, chosen by the kind of PEM public key (`AUTH_JWT_PUBLIC_KEY_FILE`).
    ///
    /// # Errors
    /// A PEM that is neither an RSA nor an Ed25519 public key.
    pub fn from_public_key_pem(pem: &[u8]) -> Result<Self, AuthConfigError> {
        let text = std::str::from_utf8(pem).map_err(|_| AuthConfigError::UnsupportedKey)?;
        let label = text
            .lines()
            .find_map(|l| l.trim().strip_prefix("-----BEGIN "))
            .and_then(|l| l.strip_suffix("-----"))
            .ok_or(AuthConfigError::UnsupportedKey)?;
        if label.contains("PRIVATE") {
            return Err(AuthConfigError::PrivateKey);
        }
        if !PUBLIC_PEM_LABELS.contains(&label) {
            return Err(AuthConfigError::UnsupportedKey);
        }
        if let Ok(key) = DecodingKey::from_rsa_pem(pem) {
            return Ok(Self::new(key, Algorithm::RS256));
        }
        if let Ok(key) = DecodingKey::from_ed_pem(pem) {
            return Ok(Self::new(key, Algorithm::EdDSA));
        }
        Err(AuthConfigError::UnsupportedKey)
    }

    fn new(key: DecodingKey, algorithm: Algorithm) -> Self {
        let mut validation = Validation::new(algorithm);
        validation.algorithms = vec![algorithm];
        validation.leeway = JWT_LEEWAY_SECS;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.validate_aud = false;
        validation.set_required_spec_claims(&["exp"]);
        Self { key, validation }
    }

    /// Requires `aud` to hold this audience (`AUTH_JWT_AUDIENCE`).
    #[must_use]
    pub fn with_audience(mut self, audience: &str) -> Self {
        self.validation.set_audience(&[audience]);
        self.validation.validate_aud = true;
        self.validation.set_required_spec_claims(&["exp", "aud"]);
        self
    }

    /// Requires `iss` to be this issuer (`AUTH_JWT_ISSUER`).
    #[must_use]
    pub fn with_issuer(mut self, issuer: &str) -> Self {
        self.validation.set_issuer(&[issuer]);
        let mut required: Vec<String> = self
            .validation
            .required_spec_claims
            .iter()
            .cloned()
            .collect();
        required.push("iss".to_owned());
        self.validation.set_required_spec_claims(&required);
        self
    }

    /// Whether `aud` is checked (`AUTH_JWT_AUDIENCE`).
    pub fn checks_audience(&self) -> bool {
        self.validation.validate_aud
    }

    pub fn algorithm(&self) -> Algorithm {
        self.validation
            .algorithms
            .first()
            .copied()
            .unwrap_or(Algorithm::HS256)
    }

    /// The principal of a valid token; `None` for anything else (bad signature, expired,
    /// another algorithm, neither a user `sub` nor the admin scope).
    fn verify(&self, token: &str) -> Option<Principal> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation).ok()?;
        let claims = data.claims;
        if claims
            .scope
            .as_deref()
            .is_some_and(|s| s.split(' ').any(|s| s == ADMIN_SCOPE))
        {
            return Some(Principal::Admin);
        }
        let user = UserId::parse(claims.sub.as_deref()?).ok()?;
        Some(Principal::User(user))
    }
}

/// The authentication settings of the `/api` scope.
#[derive(Clone, Default)]
pub struct Authenticator {
    api_token: Option<Vec<u8>>,
    jwt: Option<JwtVerifier>,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("api_token", &self.api_token.as_ref().map(|_| "[REDACTED]"))
            .field("jwt", &self.jwt)
            .finish()
    }
}

impl Authenticator {
    /// # Errors
    /// A service token that is empty or weak ([`check_token`]).
    pub fn new(api_token: Option<&str>, jwt: Option<JwtVerifier>) -> Result<Self, AuthConfigError> {
        Ok(Self {
            api_token: api_token
                .map(|t| check_token("API_TOKEN", t).map(|t| t.as_bytes().to_vec()))
                .transpose()?,
            jwt,
        })
    }

    /// No authentication configured: every request acts for every user.
    pub fn is_open(&self) -> bool {
        self.api_token.is_none() && self.jwt.is_none()
    }

    /// # Errors
    /// 401 `UNAUTHORIZED` when authentication is configured and the request carries no
    /// acceptable bearer token.
    pub fn authenticate(&self, headers: &HeaderMap) -> Result<Principal, ApiError> {
        if self.is_open() {
            return Ok(Principal::Admin);
        }
        let token = bearer_token(headers).ok_or_else(unauthorized)?;
        if self
            .api_token
            .as_deref()
            .is_some_and(|expected| same_secret(token.as_bytes(), expected))
        {
            return Ok(Principal::Admin);
        }
        self.jwt
            .as_ref()
            .and_then(|jwt| jwt.verify(token))
            .ok_or_else(unauthorized)
    }
}

/// The token of the one `Authorization: Bearer …` header; `None` when there is none, more
/// than one, or another scheme.
pub fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let mut values = headers.get_all(header::AUTHORIZATION);
    let value = values.next()?;
    if values.next().is_some() {
        return None;
    }
    let (scheme, token) = value.to_str().ok()?.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// A service or metrics token as configured: set means set (an empty value is refused
/// rather than read as "off", so a missing secret mount cannot open the API), at least
/// [`MIN_TOKEN_CHARS`] visible ASCII characters (what a bearer header can carry whole).
///
/// # Errors
/// [`AuthConfigError::WeakToken`] naming `variable`.
pub fn check_token<'a>(variable: &'static str, token: &'a str) -> Result<&'a str, AuthConfigError> {
    let visible = token.bytes().all(|b| b.is_ascii_graphic());
    if visible && token.len() >= MIN_TOKEN_CHARS {
        Ok(token)
    } else {
        Err(AuthConfigError::WeakToken(variable))
    }
}

/// Compares the SHA-256 digests in constant time (`subtle`): timing reveals neither how
/// much of a guessed token was right nor how long the real one is.
pub fn same_secret(presented: &[u8], expected: &[u8]) -> bool {
    Sha256::digest(presented)
        .ct_eq(&Sha256::digest(expected))
        .into()
}

/// Wraps the `/api` scope: stores the request's [`Principal`] for the handlers, or answers
/// 401. It runs for every request routed into the scope, so no spelling of a path that
/// reaches a handler can skip it.
pub async fn authenticate(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<EitherBody<impl MessageBody>>, Error> {
    let decided = match req.app_data::<Data<AppState>>() {
        Some(state) => state.auth.authenticate(req.headers()),
        // No state means a miswired app: refuse rather than run open.
        None => Err(unauthorized()),
    };
    match decided {
        Ok(principal) => {
            req.extensions_mut().insert(principal);
            Ok(next.call(req).await?.map_into_left_body())
        }
        Err(error) => Ok(req
            .into_response(error.error_response())
            .map_into_right_body()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_compare_whole() {
        assert!(same_secret(b"token", b"token"));
        assert!(!same_secret(b"token", b"tokem"));
        assert!(!same_secret(b"token", b"token2"));
        assert!(!same_secret(b"", b"x"));
    }

    #[test]
    fn bearer_header_forms() {
        let mut headers = HeaderMap::new();
        assert_eq!(bearer_token(&headers), None);
        headers.insert(
            header::AUTHORIZATION,
            header::HeaderValue::from_static("bearer abc"),
        );
        assert_eq!(bearer_token(&headers), Some("abc"));
        headers.insert(
            header::AUTHORIZATION,
            header::HeaderValue::from_static("Basic abc"),
        );
        assert_eq!(bearer_token(&headers), None);
        headers.insert(
            header::AUTHORIZATION,
            header::HeaderValue::from_static("Bearer "),
        );
        assert_eq!(bearer_token(&headers), None);
        headers.insert(
            header::AUTHORIZATION,
            header::HeaderValue::from_static("Bearer a"),
        );
        headers.append(
            header::AUTHORIZATION,
            header::HeaderValue::from_static("Bearer a"),
        );
        assert_eq!(bearer_token(&headers), None, "two headers are ambiguous");
    }

    #[test]
    fn weak_tokens_are_refused() {
        for weak in [
            "",
            "a",
            " padded-token-of-more-than-32-characters ",
            "tab\tin-a-token-of-more-than-32-chars",
        ] {
            assert!(check_token("API_TOKEN", weak).is_err(), "{weak:?}");
        }
        assert!(check_token("API_TOKEN", "0123456789abcdef0123456789abcdef").is_ok());
        assert!(
            Authenticator::new(Some(""), None).is_err(),
            "empty is not off"
        );
    }

    #[test]
    fn private_keys_are_refused() {
        let private =
            b"-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIA==\n-----END PRIVATE KEY-----\n";
        assert!(matches!(
            JwtVerifier::from_public_key_pem(private),
            Err(AuthConfigError::PrivateKey)
        ));
        let rsa = b"-----BEGIN RSA PRIVATE KEY-----\nAA==\n-----END RSA PRIVATE KEY-----\n";
        assert!(matches!(
            JwtVerifier::from_public_key_pem(rsa),
            Err(AuthConfigError::PrivateKey)
        ));
        assert!(matches!(
            JwtVerifier::from_public_key_pem(b"not a pem"),
            Err(AuthConfigError::UnsupportedKey)
        ));
    }

    #[test]
    fn short_secrets_are_refused() {
        assert!(matches!(
            JwtVerifier::hs256(b"short"),
            Err(AuthConfigError::SecretTooShort(5))
        ));
        assert!(JwtVerifier::hs256(&[7u8; 32]).is_ok());
    }

    #[test]
    fn principals() {
        let one = UserId::new(1).unwrap_or_else(|_| unreachable!());
        let two = UserId::new(2).unwrap_or_else(|_| unreachable!());
        assert!(Principal::Admin.acts_for(two));
        assert!(Principal::User(one).acts_for(one));
        assert!(!Principal::User(one).acts_for(two));
        assert!(Principal::User(one).require_admin().is_err());
        assert_eq!(
            Principal::User(one).check_user(two).map_err(|e| e.code),
            Err(Code::UserNotFound)
        );
    }
}
