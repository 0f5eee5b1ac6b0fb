//! The balance service's domain: value types, entities, the idempotency state machine,
//! the ports and the use cases. Nothing here names a database, a Redis client or HTTP.

pub mod claims;
pub mod error;
pub mod idempotency;
pub mod model;
pub mod operations;
pub mod outcome;
pub mod ports;
pub mod service;
pub mod telemetry;
pub mod time;
pub mod types;

pub use error::OperationError;
pub use operations::{Charge, IssueCoupon, Operation, OperationKind, Pay, Refund, UseBalance};
pub use service::{BalanceService, Execution, GroupCommit, LockUnavailablePolicy, Ports, Settings};
