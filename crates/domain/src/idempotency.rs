//! The idempotency state machine, as pure code.
//!
//! A key, scoped to one user, is in one of three states:
//!
//! ```text
//!            claim                 complete(response)
//!   Free ─────────────▶ InFlight ─────────────────────▶ Completed ──┐
//!    ▲                     │                                │       │ replay (same fingerprint)
//!    │      release        │                                │ ◀─────┘
//!    └─────────────────────┘        expire (past expires_at)│
//!    ▲──────────────────────────────────────────────────────┘
//! ```
//!
//! - `claim` is refused with `InUse` while another request holds the key, and with `Reused`
//!   when the holder's fingerprint differs;
//! - a completed key answers `Replay` with the stored status and body for the same
//!   fingerprint and `Reused` for any other;
//! - `release` (a failure that is not stored: lock timeout, 5xx, unknown user) frees the
//!   key so that a retry runs afresh.
//!
//! The in-flight state lives in the instance that runs the request ([`crate::claims`]);
//! the completed state is durable and written in the same atomic step as the effect.

use chrono::{DateTime, Utc};

use crate::types::{Amount, IdempotencyKey, OrderId, UserId};

/// What a request is, for idempotency: the operation, the user and its parameters. The
/// same key with another fingerprint is refused (`IDEMPOTENCY_KEY_REUSED`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Fingerprint(String);

impl Fingerprint {
    pub fn charge(user: UserId, amount: Amount) -> Self {
        Self(format!("charge:user={user}:amount={amount}"))
    }

    pub fn use_balance(user: UserId, amount: Amount) -> Self {
        Self(format!("use:user={user}:amount={amount}"))
    }

    pub fn payment(user: UserId, order: OrderId) -> Self {
        Self(format!("payment:user={user}:order={order}"))
    }

    /// Rebuilds a fingerprint read back from storage.
    pub fn from_stored(raw: impl Into<String>) -> Self {
        Self(raw.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The exact response of a finished request: replays send these bytes unchanged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredResponse {
    pub status: u16,
    pub body: Vec<u8>,
}

/// The durable record of a finished request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompletedRecord {
    pub user_id: UserId,
    pub key: IdempotencyKey,
    pub fingerprint: Fingerprint,
    pub response: StoredResponse,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
}

impl CompletedRecord {
    pub fn is_expired(&self, now: DateTime<Utc>) -> bool {
        now >= self.expires_at
    }
}

/// The state of one (user, key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyState {
    Free,
    InFlight { fingerprint: Fingerprint },
    Completed(CompletedRecord),
}

/// The answer to a request that arrives with a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// The key is free: this request claims it and runs.
    Run,
    /// The key finished with the same fingerprint: answer the stored response.
    Replay(StoredResponse),
    /// Another request with this key and fingerprint is still running.
    InUse,
    /// The key was used with another fingerprint.
    Reused,
}

/// A transition the state machine does not allow.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransitionError {
    #[error("only an in-flight key can be completed or released")]
    NotInFlight,
    #[error("the key is held by a request with another fingerprint")]
    NotTheHolder,
}

impl KeyState {
    /// The state as seen at `now`: a completed record past its expiry is free again.
    pub fn at(self, now: DateTime<Utc>) -> KeyState {
        match self {
            KeyState::Completed(record) if record.is_expired(now) => KeyState::Free,
            other => other,
        }
    }

    /// What a request with `fingerprint` gets at `now`.
    pub fn admit(&self, fingerprint: &Fingerprint, now: DateTime<Utc>) -> Admission {
        match self {
            KeyState::Free => Admission::Run,
            KeyState::InFlight { fingerprint: held } if held == fingerprint => Admission::InUse,
            KeyState::InFlight { .. } => Admission::Reused,
            KeyState::Completed(record) if record.is_expired(now) => Admission::Run,
            KeyState::Completed(record) if &record.fingerprint == fingerprint => {
                Admission::Replay(record.response.clone())
            }
            KeyState::Completed(_) => Admission::Reused,
        }
    }

    /// Claims the key for a request, if [`KeyState::admit`] lets it run.
    ///
    /// # Errors
    /// The admission that is not [`Admission::Run`].
    pub fn claim(
        self,
        fingerprint: Fingerprint,
        now: DateTime<Utc>,
    ) -> Result<KeyState, Admission> {
        match self.admit(&fingerprint, now) {
            Admission::Run => Ok(KeyState::InFlight { fingerprint }),
            refused => Err(refused),
        }
    }

    /// Finishes an in-flight key with the response to store.
    ///
    /// # Errors
    /// [`TransitionError`] when the key is not in flight, or held for another fingerprint.
    pub fn complete(self, record: CompletedRecord) -> Result<KeyState, TransitionError> {
        match self {
            KeyState::InFlight { fingerprint } if fingerprint == record.fingerprint => {
                Ok(KeyState::Completed(record))
            }
            KeyState::InFlight { .. } => Err(TransitionError::NotTheHolder),
            _ => Err(TransitionError::NotInFlight),
        }
    }

    /// Frees an in-flight key after a failure that is not stored.
    ///
    /// # Errors
    /// [`TransitionError::NotInFlight`] when the key is not in flight.
    pub fn release(self) -> Result<KeyState, TransitionError> {
        match self {
            KeyState::InFlight { .. } => Ok(KeyState::Free),
            _ => Err(TransitionError::NotInFlight),
        }
    }
}
