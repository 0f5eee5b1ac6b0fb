//! The HTTP adapter: routes, request parsing, problem+json errors, health, metrics and the
//! OpenAPI document with its Swagger UI (vendored: no CDN at build or run time).

pub mod auth;
pub mod body;
pub mod coupons;
pub mod dto;
pub mod encoder;
pub mod health;
pub mod middleware;
pub mod openapi;
pub mod problem;
pub mod routes;

use std::sync::Arc;

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceFactory, ServiceRequest, ServiceResponse};
use actix_web::web::{self, Data};
use actix_web::{App, Error, HttpResponse, guard};
use domain::BalanceService;
use metrics_exporter_prometheus::PrometheusHandle;
use utoipa::OpenApi;
use utoipa_swagger_ui::SwaggerUi;

pub use encoder::JsonEncoder;
pub use health::{Dependency, InProcess};

use problem::{ApiError, Code};

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    pub service: BalanceService,
    /// Checked by `/health/ready`.
    pub dependencies: Vec<Arc<dyn Dependency>>,
    /// Renders `/metrics`; `None` serves an empty page.
    pub metrics: Option<PrometheusHandle>,
    /// Who `/api/*` requests act for (`API_TOKEN`, `AUTH_JWT_*`).
    pub auth: auth::Authenticator,
    /// `METRICS_TOKEN`: when set, `/metrics` needs `Authorization: Bearer <token>`.
    pub metrics_token: Option<String>,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState")
            .field("service", &self.service)
            .field("dependencies", &self.dependencies.len())
            .field("auth", &self.auth)
            .field(
                "metrics_token",
                &self.metrics_token.as_ref().map(|_| "[REDACTED]"),
            )
            .finish_non_exhaustive()
    }
}

async fn not_found() -> Result<HttpResponse, ApiError> {
    Err(ApiError::new(Code::NotFound, "no resource at this path"))
}

fn only(allow: &'static str) -> actix_web::Route {
    web::route()
        .to(move || async move { Err::<HttpResponse, _>(ApiError::method_not_allowed(allow)) })
}

/// GET, and HEAD wherever GET answers (actix sends HEAD's headers without the body).
fn get() -> actix_web::Route {
    web::route().guard(guard::Any(guard::Get()).or(guard::Head()))
}

/// A resource with one route, 405 (listing `allow`) for every other method.
fn resource(path: &str, allow: &'static str, route: actix_web::Route) -> actix_web::Resource {
    web::resource(path)
        .route(route)
        .default_service(only(allow))
}

/// GET (and HEAD) only.
fn readable<F, Args>(path: &str, handler: F) -> actix_web::Resource
where
    F: actix_web::Handler<Args>,
    Args: actix_web::FromRequest + 'static,
    F::Output: actix_web::Responder + 'static,
{
    resource(path, "GET, HEAD", get().to(handler))
}

/// The whole application: routes, middleware, docs and problem+json fallbacks.
pub fn build_app(
    state: Data<AppState>,
) -> App<
    impl ServiceFactory<
        ServiceRequest,
        Config = (),
        Response = ServiceResponse<impl MessageBody>,
        Error = Error,
        InitError = (),
    >,
> {
    let swagger = SwaggerUi::new("/swagger-ui/{_:.*}")
        .url("/api-docs/openapi.json", openapi::ApiDoc::openapi())
        .config(utoipa_swagger_ui::Config::default().validator_url("none"));
    App::new()
        .app_data(state)
        .wrap(actix_web::middleware::from_fn(middleware::observe))
        // Authentication wraps the whole scope: it runs on the route a request reaches, so
        // no spelling of a path (percent-encoding, case, dots) that routes here can skip it.
        .service(
            web::scope("/api")
                .wrap(actix_web::middleware::from_fn(auth::authenticate))
                .service(resource(
                    "/users",
                    "POST",
                    web::post().to(routes::create_user),
                ))
                .service(readable("/users/{userId}/balance", routes::get_balance))
                .service(resource(
                    "/users/{userId}/balance/charge",
                    "POST",
                    web::post().to(routes::charge),
                ))
                .service(resource(
                    "/users/{userId}/balance/use",
                    "POST",
                    web::post().to(routes::use_balance),
                ))
                .service(readable("/users/{userId}/balance/history", routes::history))
                .service(resource(
                    "/orders",
                    "POST",
                    web::post().to(routes::create_order),
                ))
                .service(readable("/orders/{orderId}", routes::get_order))
                .service(resource(
                    "/orders/{orderId}/cancel",
                    "POST",
                    web::post().to(routes::cancel_order),
                ))
                .service(resource("/payments", "POST", web::post().to(routes::pay)))
                .service(readable("/payments/{paymentId}", routes::get_payment))
                .service(
                    web::resource("/payments/{paymentId}/refunds")
                        .route(get().to(routes::list_refunds))
                        .route(web::post().to(routes::refund))
                        .default_service(only("GET, HEAD, POST")),
                )
                .service(readable(
                    "/users/{userId}/requests/{idempotencyKey}",
                    routes::get_request,
                ))
                .service(resource(
                    "/coupons",
                    "POST",
                    web::post().to(coupons::create_coupon),
                ))
                .service(readable("/coupons/{couponId}", coupons::get_coupon))
                .service(resource(
                    "/coupons/{couponId}/issue",
                    "POST",
                    web::post().to(coupons::issue_coupon),
                ))
                .service(readable(
                    "/users/{userId}/coupons",
                    coupons::list_user_coupons,
                ))
                .default_service(web::to(not_found)),
        )
        .service(readable("/health/live", health::live))
        .service(readable("/health/ready", health::ready))
        .service(readable("/metrics", health::metrics))
        .service(web::redirect("/swagger-ui", "/swagger-ui/"))
        .service(web::redirect("/", "/swagger-ui/"))
        .service(swagger)
        .default_service(web::to(not_found))
}
