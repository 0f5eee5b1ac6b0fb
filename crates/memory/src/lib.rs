//! In-memory adapters of every port: the zero-setup default of a single instance and the
//! fakes behind the HTTP tests.
//!
//! - [`MemoryStore`] implements `UserRepo`, `OrderRepo`, `CouponRepo`, `IdempotencyRepo` and
//!   `BalanceStore` over one mutex, so each atomic step is one critical section, and
//!   `Auditor` (the reconciliation, in short critical sections);
//! - [`InProcessLockManager`] implements `LockManager` for the tasks of this process only.
//!
//! Nothing here is persisted, and neither adapter guards a second process: run one instance.

mod lock;
mod store;

pub use lock::InProcessLockManager;
pub use store::MemoryStore;
#[cfg(feature = "tamper")]
pub use store::Tamper;
