//! `trivial`: an HTTP server that answers every request, whatever its method and path, with
//! status 200 and one fixed JSON body the size and shape of a charge's answer. The benchmark
//! runs the original's k6 profile against it in the same run as against the service, so the
//! load client's own floor (k6 and the kernel on the same cores, nothing behind the socket)
//! is measured beside the service's latency.

use std::net::SocketAddr;

use actix_web::http::header::ContentType;
use actix_web::{App, HttpResponse, HttpServer, web};
use clap::Parser;

/// A charge's answer (`ChargeResponse` of crates/http-actix), fixed: 95 bytes.
const BODY: &str = r#"{"userId":1,"balance":90000,"chargedAmount":10000,"transactionTime":"2026-11-22T14:00:00.123Z"}"#;

#[derive(Debug, Parser)]
#[command(
    name = "trivial",
    about = "Answers every request with 200 and a fixed charge-sized JSON body: the load client's floor."
)]
struct Args {
    /// Address to listen on.
    #[arg(long, env = "BIND_ADDR", default_value = "127.0.0.1:8090")]
    bind: SocketAddr,
    /// Worker threads (default: one per core, as the service).
    #[arg(long)]
    workers: Option<usize>,
}

/// The request's body is read whole (as the service reads a charge's) and dropped.
async fn answer(_body: web::Bytes) -> HttpResponse {
    HttpResponse::Ok()
        .insert_header(ContentType::json())
        .body(BODY)
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let workers = args
        .workers
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, usize::from));
    HttpServer::new(|| App::new().default_service(web::to(answer)))
        .workers(workers)
        // SIGTERM (the bench's stop) ends it at once: k6 has closed its connections by then.
        .shutdown_timeout(1)
        .bind(args.bind)?
        .run()
        .await
}
