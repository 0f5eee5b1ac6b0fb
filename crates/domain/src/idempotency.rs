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
//! The in-flight state lives in the instance that runs the request ([`crate::claims`]:
//! claiming is [`KeyState::claim`], releasing is dropping the claim); the completed state
//! is durable and written in the same atomic step as the effect (`complete` is that step).

use chrono::{DateTime, Utc};

use crate::operations::OperationKind;
use crate::types::{IdempotencyKey, UserId};

/// What a request is, for idempotency: the operation, the user and its parameters. The
/// same key with another fingerprint is refused (`IDEMPOTENCY_KEY_REUSED`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Fingerprint(String);

impl Fingerprint {
    /// A fingerprint as stored. Each operation builds its own (`operations::*::fingerprint`);
    /// this also rebuilds one read back from storage.
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

/// What a finished request did: it applied its effect, or it was refused (and changed
/// nothing). Stored with the record, so nothing infers it from the HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RecordOutcome {
    Applied,
    Refused,
}

impl RecordOutcome {
    /// The name used in storage (`APPLIED`, `REFUSED`).
    pub fn as_str(self) -> &'static str {
        match self {
            RecordOutcome::Applied => "APPLIED",
            RecordOutcome::Refused => "REFUSED",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        [RecordOutcome::Applied, RecordOutcome::Refused]
            .into_iter()
            .find(|outcome| outcome.as_str() == raw)
    }
}

/// The rule for records written before records kept their operation and outcome: the
/// operation is the fingerprint's prefix, the outcome the status class (every success of
/// those versions was a 2xx that applied its effect, every stored refusal was not a 2xx).
/// Migration 0007 backfilled old rows with exactly this rule, and readers apply it to a
/// row an older instance writes during a rolling upgrade (both columns null); nothing else
/// infers either. [`legacy_operation`] is `None` for a fingerprint no version ever wrote.
pub fn legacy_operation(fingerprint: &str) -> Option<OperationKind> {
    match fingerprint.split_once(':').map(|(prefix, _)| prefix) {
        Some("charge") => Some(OperationKind::Charge),
        Some("use") => Some(OperationKind::Use),
        Some("payment") => Some(OperationKind::Payment),
        // Refunds came after records kept their operation: no refund record is legacy.
        _ => None,
    }
}

/// The outcome of a record written before records kept it; see [`legacy_operation`].
pub fn legacy_outcome(status: u16) -> RecordOutcome {
    if (200..300).contains(&status) {
        RecordOutcome::Applied
    } else {
        RecordOutcome::Refused
    }
}

/// The durable record of a finished request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompletedRecord {
    pub user_id: UserId,
    pub key: IdempotencyKey,
    pub fingerprint: Fingerprint,
    /// Which operation the request was.
    pub operation: OperationKind,
    /// Whether it applied its effect or was refused.
    pub outcome: RecordOutcome,
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

impl KeyState {
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
}
