//! The OpenAPI document, generated from the handlers' annotations.

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{ContentBuilder, Ref, RefOr, ResponseBuilder};
use utoipa::{Modify, OpenApi};

use crate::dto::{
    AmountRequest, BalanceResponse, ChargeResponse, CreateUserRequest, HistoryItem,
    HistoryResponse, OrderRequest, OrderResponse, PaymentRequest, PaymentResponse, UseResponse,
};
use crate::health::{self, DependencyState, LiveResponse, ReadyResponse};
use crate::problem::{Code, PROBLEM_JSON, Problem};
use crate::routes;

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
        health::live,
        health::ready,
        health::metrics,
    ),
    components(schemas(
        AmountRequest, OrderRequest, PaymentRequest, CreateUserRequest,
        BalanceResponse, ChargeResponse, UseResponse, PaymentResponse, OrderResponse,
        HistoryItem, HistoryResponse, Problem, LiveResponse, ReadyResponse, DependencyState,
    )),
    modifiers(&BearerAuth),
    tags(
        (name = "users"), (name = "balance"), (name = "orders"), (name = "payments"), (name = "health"),
    )
)]
#[derive(Debug)]
pub struct ApiDoc;

/// Declares the bearer schemes, and on every `/api` operation the 401 the `/api` scope
/// answers when authentication is configured (one place, as the check itself is one place).
struct BearerAuth;

impl Modify for BearerAuth {
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
        for (path, item) in &mut openapi.paths.paths {
            if !(path == "/api" || path.starts_with("/api/")) {
                continue;
            }
            for operation in [&mut item.get, &mut item.post].into_iter().flatten() {
                operation
                    .responses
                    .responses
                    .entry("401".to_owned())
                    .or_insert_with(|| {
                        problem_response(
                            "API_TOKEN or a JWT key is configured and the bearer token is missing, invalid or expired",
                            Code::Unauthorized,
                            "a valid bearer token is required",
                        )
                    });
            }
        }
    }
}

/// A problem+json response with an example of its own code.
pub fn problem_response(
    description: &str,
    code: Code,
    detail: &str,
) -> RefOr<utoipa::openapi::Response> {
    let example = serde_json::to_value(Problem::new(code, detail)).unwrap_or_default();
    RefOr::T(
        ResponseBuilder::new()
            .description(description)
            .content(
                PROBLEM_JSON,
                ContentBuilder::new()
                    .schema(Some(Ref::from_schema_name("Problem")))
                    .example(Some(example))
                    .build(),
            )
            .build(),
    )
}

/// The document as served at `/api-docs/openapi.json`, pretty-printed.
///
/// # Errors
/// When it cannot be serialised (it always can; the type allows it).
pub fn document_json() -> Result<String, serde_json::Error> {
    ApiDoc::openapi().to_pretty_json()
}
