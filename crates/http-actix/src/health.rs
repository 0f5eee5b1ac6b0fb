//! Liveness, readiness and the Prometheus endpoint.

use std::sync::Arc;
use std::time::Duration;

use actix_web::http::StatusCode;
use actix_web::http::header::{self, HeaderValue};
use actix_web::web::Data;
use actix_web::{HttpRequest, HttpResponse};
use async_trait::async_trait;
use serde::Serialize;
use utoipa::ToSchema;

use crate::AppState;
use crate::auth::{bearer_token, same_secret};
use crate::problem::{ApiError, Code};

/// Something the service needs to do its work, as readiness sees it.
#[async_trait]
pub trait Dependency: Send + Sync {
    /// `database` or `lock`.
    fn name(&self) -> &'static str;
    /// What backs it: `memory`, `mysql`, `in-process`, `redis`.
    fn kind(&self) -> &'static str;
    /// Whether the service is unready while this is down (Redis is not, under `degrade`).
    fn required(&self) -> bool;
    /// # Errors
    /// Why the dependency cannot be used right now.
    async fn check(&self) -> anyhow::Result<()>;
}

/// A dependency that lives in the process and is always there (the in-memory defaults).
#[derive(Debug, Clone)]
pub struct InProcess {
    pub name: &'static str,
    pub kind: &'static str,
}

#[async_trait]
impl Dependency for InProcess {
    fn name(&self) -> &'static str {
        self.name
    }
    fn kind(&self) -> &'static str {
        self.kind
    }
    fn required(&self) -> bool {
        true
    }
    async fn check(&self) -> anyhow::Result<()> {
        Ok(())
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct LiveResponse {
    #[schema(example = "UP")]
    pub status: &'static str,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct DependencyState {
    /// UP or DOWN.
    #[schema(example = "UP")]
    pub status: &'static str,
    #[schema(example = "mysql")]
    pub kind: &'static str,
    /// Whether the service is unready while this dependency is down.
    pub required: bool,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ReadyResponse {
    /// UP when every required dependency is UP.
    #[schema(example = "UP")]
    pub status: &'static str,
    pub dependencies: std::collections::BTreeMap<&'static str, DependencyState>,
}

/// How long one dependency check may take before it counts as down.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

fn json_response<T: Serialize>(status: StatusCode, body: &T) -> HttpResponse {
    HttpResponse::build(status)
        .insert_header((
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        ))
        .insert_header((header::CACHE_CONTROL, HeaderValue::from_static("no-store")))
        .body(serde_json::to_vec(body).unwrap_or_default())
}

/// The process is up.
#[utoipa::path(get, path = "/health/live", tag = "health", responses((status = 200, description = "The process is up", body = LiveResponse)))]
pub async fn live() -> HttpResponse {
    json_response(StatusCode::OK, &LiveResponse { status: "UP" })
}

/// The service can take traffic: every required dependency answers.
#[utoipa::path(get, path = "/health/ready", tag = "health", responses(
    (status = 200, description = "Every required dependency answers", body = ReadyResponse),
    (status = 503, description = "A required dependency is down", body = ReadyResponse),
))]
pub async fn ready(state: Data<AppState>) -> HttpResponse {
    let checks = state.dependencies.iter().map(|dep| {
        let dep = Arc::clone(dep);
        async move {
            let up = matches!(
                tokio::time::timeout(CHECK_TIMEOUT, dep.check()).await,
                Ok(Ok(()))
            );
            (dep, up)
        }
    });
    let results = futures_util::future::join_all(checks).await;
    let mut all_up = true;
    let mut dependencies = std::collections::BTreeMap::new();
    for (dep, up) in results {
        if !up && dep.required() {
            all_up = false;
        }
        dependencies.insert(
            dep.name(),
            DependencyState {
                status: if up { "UP" } else { "DOWN" },
                kind: dep.kind(),
                required: dep.required(),
            },
        );
    }
    let (status, word) = if all_up {
        (StatusCode::OK, "UP")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "DOWN")
    };
    json_response(
        status,
        &ReadyResponse {
            status: word,
            dependencies,
        },
    )
}

/// Prometheus text format; with `METRICS_TOKEN` set, only for `Authorization: Bearer <METRICS_TOKEN>`.
#[utoipa::path(get, path = "/metrics", tag = "health",
    responses(
        (status = 200, description = "Prometheus text exposition", content_type = "text/plain"),
    ),
    security((), ("metrics_bearer" = []))
)]
pub async fn metrics(state: Data<AppState>, req: HttpRequest) -> Result<HttpResponse, ApiError> {
    if let Some(expected) = &state.metrics_token {
        let presented = bearer_token(req.headers()).unwrap_or_default();
        if !same_secret(presented.as_bytes(), expected.as_bytes()) {
            return Err(ApiError::new(
                Code::Unauthorized,
                "a valid bearer token (METRICS_TOKEN) is required",
            ));
        }
    }
    let text = state
        .metrics
        .as_ref()
        .map(|h| h.render())
        .unwrap_or_default();
    Ok(HttpResponse::Ok()
        .insert_header((
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        ))
        .body(text))
}
