//! The coupon handlers: create and read coupons, issue one to a user (first come first
//! served, once per key), and list a user's coupons.

use actix_web::HttpRequest;
use actix_web::http::StatusCode;
use actix_web::http::header::{self, HeaderValue};
use actix_web::web::{Data, Payload};
use domain::IssueCoupon;
use domain::model::NewCoupon;
use domain::time::{parse_instant, truncate_to_millis};
use domain::types::{CouponId, CouponName, UserId};

use crate::AppState;
use crate::auth::Principal;
use crate::body;
use crate::dto::{
    CouponRequest, CouponResponse, IssueRequest, UserCouponResponse, UserCouponsResponse,
};
use crate::problem::read_error;
use crate::routes::{ApiResult, detached, json, path_id};

/// Create a coupon (an administrator's operation).
#[utoipa::path(
    post, path = "/api/coupons", tag = "coupons",
    request_body(content = CouponRequest, content_type = "application/json"),
    responses(
        (status = 201, description = "Created, nothing issued yet", body = CouponResponse, headers(("Location" = String, description = "The new coupon's URL"))),
    ),
    security((), ("bearer" = []))
)]
pub async fn create_coupon(
    state: Data<AppState>,
    principal: Principal,
    req: HttpRequest,
    payload: Payload,
) -> ApiResult {
    principal.require_admin()?;
    let body: CouponRequest = body::read(&req, payload).await?;
    let name = CouponName::parse(&body.name()?)?;
    let discount = body.discount(state.service.limits())?;
    let total = body.total_quantity()?;
    let (starts, ends) = body.window()?;
    let instant = |raw: Option<String>, name: &str| {
        raw.map(|raw| parse_instant(&raw, name).map(truncate_to_millis))
            .transpose()
    };
    let starts = instant(starts, "issueStartsAt")?;
    let ends = instant(ends, "issueEndsAt")?;
    let days = body.valid_for_days()?;
    let coupon = NewCoupon::new(
        name,
        discount,
        total,
        starts,
        ends,
        days,
        state.service.now(),
    )?;
    let coupon = state
        .service
        .create_coupon(coupon)
        .await
        .map_err(read_error)?;
    let mut response = json(StatusCode::CREATED, &CouponResponse::from(&coupon))?;
    if let Ok(location) = HeaderValue::from_str(&format!("/api/coupons/{}", coupon.id)) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    Ok(response)
}

/// A coupon, with how many were issued so far.
#[utoipa::path(
    get, path = "/api/coupons/{couponId}", tag = "coupons",
    params(("couponId" = i64, Path, minimum = 1)),
    responses(
        (status = 200, description = "The coupon", body = CouponResponse),
    ),
    security((), ("bearer" = []))
)]
pub async fn get_coupon(
    state: Data<AppState>,
    _principal: Principal,
    req: HttpRequest,
) -> ApiResult {
    let id = path_id(&req, "couponId", CouponId::parse)?;
    let coupon = state.service.coupon(id).await.map_err(read_error)?;
    json(StatusCode::OK, &CouponResponse::from(&coupon))
}

/// Issue one of the coupon to a user, first come first served, once per idempotency key.
#[utoipa::path(
    post, path = "/api/coupons/{couponId}/issue", tag = "coupons",
    params(
        ("couponId" = i64, Path, minimum = 1),
        ("Idempotency-Key" = Option<String>, Header, description = "Or the body's idempotencyKey"),
    ),
    request_body(content = IssueRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "Issued (AVAILABLE), or the replay of a finished request", body = UserCouponResponse),
    ),
    security((), ("bearer" = []))
)]
pub async fn issue_coupon(
    state: Data<AppState>,
    principal: Principal,
    req: HttpRequest,
    payload: Payload,
) -> ApiResult {
    let coupon = path_id(&req, "couponId", CouponId::parse)?;
    let body::Keyed { key, body } = body::read_keyed::<IssueRequest>(&req, payload).await?;
    let user = body.user_id()?;
    principal.check_user(user)?;
    let service = state.service.clone();
    let op = IssueCoupon { user, coupon, key };
    // On its own task, as every keyed change: a client that goes away must not cancel the
    // step half-way (between the commit and the gate's settling, say).
    detached(async move { service.issue_coupon(op).await }).await
}

/// A user's coupons, newest first.
#[utoipa::path(
    get, path = "/api/users/{userId}/coupons", tag = "coupons",
    params(("userId" = i64, Path, minimum = 1)),
    responses(
        (status = 200, description = "The user's coupons, newest first (at most 1000), each AVAILABLE, USED or EXPIRED", body = UserCouponsResponse),
    ),
    security((), ("bearer" = []))
)]
pub async fn list_user_coupons(
    state: Data<AppState>,
    principal: Principal,
    req: HttpRequest,
) -> ApiResult {
    let user = path_id(&req, "userId", UserId::parse)?;
    principal.check_user(user)?;
    let listing = state.service.user_coupons(user).await.map_err(read_error)?;
    json(
        StatusCode::OK,
        &UserCouponsResponse {
            items: listing
                .items
                .iter()
                .map(|c| UserCouponResponse::at(c, listing.at))
                .collect(),
        },
    )
}
