//! The OpenAPI document, generated from the handlers' annotations.

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::dto::{
    AmountRequest, BalanceResponse, ChargeResponse, CreateUserRequest, HistoryItem,
    HistoryResponse, OrderRequest, OrderResponse, PaymentRequest, PaymentResponse, UseResponse,
};
use crate::health::{self, DependencyState, LiveResponse, ReadyResponse};
use crate::problem::Problem;
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

/// Declares the optional bearer token (`API_TOKEN`).
struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}
