//! The HTTP adapter: routes, request parsing, problem+json errors, health, metrics and the
//! OpenAPI document with its Swagger UI (vendored: no CDN at build or run time).

pub mod body;
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
use actix_web::{App, Error, HttpResponse};
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
    /// `API_TOKEN`: when set, `/api/*` needs `Authorization: Bearer <token>`.
    pub api_token: Option<String>,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState")
            .field("service", &self.service)
            .field("dependencies", &self.dependencies.len())
            .field("api_token", &self.api_token.as_ref().map(|_| "[REDACTED]"))
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
        .service(
            web::resource("/api/users")
                .route(web::post().to(routes::create_user))
                .default_service(only("POST")),
        )
        .service(
            web::resource("/api/users/{userId}/balance")
                .route(web::get().to(routes::get_balance))
                .default_service(only("GET")),
        )
        .service(
            web::resource("/api/users/{userId}/balance/charge")
                .route(web::post().to(routes::charge))
                .default_service(only("POST")),
        )
        .service(
            web::resource("/api/users/{userId}/balance/use")
                .route(web::post().to(routes::use_balance))
                .default_service(only("POST")),
        )
        .service(
            web::resource("/api/users/{userId}/balance/history")
                .route(web::get().to(routes::history))
                .default_service(only("GET")),
        )
        .service(
            web::resource("/api/orders")
                .route(web::post().to(routes::create_order))
                .default_service(only("POST")),
        )
        .service(
            web::resource("/api/orders/{orderId}")
                .route(web::get().to(routes::get_order))
                .default_service(only("GET")),
        )
        .service(
            web::resource("/api/payments")
                .route(web::post().to(routes::pay))
                .default_service(only("POST")),
        )
        .service(
            web::resource("/api/payments/{paymentId}")
                .route(web::get().to(routes::get_payment))
                .default_service(only("GET")),
        )
        .service(
            web::resource("/health/live")
                .route(web::get().to(health::live))
                .default_service(only("GET")),
        )
        .service(
            web::resource("/health/ready")
                .route(web::get().to(health::ready))
                .default_service(only("GET")),
        )
        .service(
            web::resource("/metrics")
                .route(web::get().to(health::metrics))
                .default_service(only("GET")),
        )
        .service(web::redirect("/swagger-ui", "/swagger-ui/"))
        .service(swagger)
        .default_service(web::to(not_found))
}
