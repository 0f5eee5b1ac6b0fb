//! Validated value types. Each constructor is the only way to build the value, so an
//! invalid id, amount or key cannot reach a use case.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::model::EntryKind;

/// Why a raw value was refused. The message is safe to show to a client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ValidationError(pub String);

impl ValidationError {
    fn new(message: impl Into<String>) -> Self {
        Self(message.into())
    }
}

macro_rules! positive_id {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(i64);

        impl $name {
            /// Accepts 1..=i64::MAX.
            ///
            /// # Errors
            /// A [`ValidationError`] for zero or a negative number.
            pub fn new(value: i64) -> Result<Self, ValidationError> {
                if value >= 1 {
                    Ok(Self(value))
                } else {
                    Err(ValidationError::new(concat!($what, " must be a positive integer")))
                }
            }

            /// Parses a path or query segment in its one canonical form: ASCII digits, no
            /// sign, no spaces, no leading zero.
            ///
            /// # Errors
            /// A [`ValidationError`] for anything that is not a positive 64-bit integer.
            pub fn parse(raw: &str) -> Result<Self, ValidationError> {
                if raw.is_empty()
                    || raw.len() > 19
                    || raw.starts_with('0')
                    || !raw.bytes().all(|b| b.is_ascii_digit())
                {
                    return Err(ValidationError::new(concat!($what, " must be a positive integer")));
                }
                raw.parse::<i64>()
                    .map_err(|_| ValidationError::new(concat!($what, " must be a positive integer")))
                    .and_then(Self::new)
            }

            pub fn get(self) -> i64 {
                self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }
    };
}

positive_id!(
    /// A user's id (the users row's primary key).
    UserId,
    "userId"
);
positive_id!(
    /// An order's id.
    OrderId,
    "orderId"
);
positive_id!(
    /// A payment's id.
    PaymentId,
    "paymentId"
);
positive_id!(
    /// A refund's id.
    RefundId,
    "refundId"
);
positive_id!(
    /// A coupon's id (the coupon itself: its stock, discount and issuing window).
    CouponId,
    "couponId"
);
positive_id!(
    /// A user coupon's id: one coupon issued to one user.
    UserCouponId,
    "userCouponId"
);
positive_id!(
    /// A ledger entry's id; history pages are keyed by it.
    EntryId,
    "before"
);

/// The per-operation and per-account ceilings (`MAX_AMOUNT`, `MAX_BALANCE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_amount: i64,
    pub max_balance: i64,
}

impl Limits {
    pub const DEFAULT_MAX_AMOUNT: i64 = 1_000_000_000;
    pub const DEFAULT_MAX_BALANCE: i64 = 1_000_000_000_000;

    /// # Errors
    /// A [`ValidationError`] when a ceiling is not positive.
    pub fn new(max_amount: i64, max_balance: i64) -> Result<Self, ValidationError> {
        if max_amount < 1 || max_balance < 1 {
            return Err(ValidationError::new(
                "MAX_AMOUNT and MAX_BALANCE must be positive",
            ));
        }
        Ok(Self {
            max_amount,
            max_balance,
        })
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_amount: Self::DEFAULT_MAX_AMOUNT,
            max_balance: Self::DEFAULT_MAX_BALANCE,
        }
    }
}

/// An amount of money for one operation: 1..=`MAX_AMOUNT` won.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct Amount(i64);

impl Amount {
    /// # Errors
    /// A [`ValidationError`] for zero, a negative amount or one above `limits.max_amount`.
    pub fn new(value: i64, limits: &Limits) -> Result<Self, ValidationError> {
        if value <= 0 {
            return Err(ValidationError::new("amount must be greater than 0"));
        }
        if value > limits.max_amount {
            return Err(ValidationError(format!(
                "amount must not exceed {}",
                limits.max_amount
            )));
        }
        Ok(Self(value))
    }

    /// Rebuilds an amount read back from storage, where it was validated on the way in.
    pub fn from_stored(value: i64) -> Self {
        Self(value)
    }

    pub fn get(self) -> i64 {
        self.0
    }

    /// This amount less `discount`, never below 0, and the part of the discount that was
    /// taken off. The one way to get an amount of 0: a payment a coupon covered in full.
    pub fn less(self, discount: Amount) -> (Amount, Amount) {
        let taken = discount.0.min(self.0);
        (Amount(self.0 - taken), Amount(taken))
    }
}

impl fmt::Display for Amount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A balance: 0..=`MAX_BALANCE` won.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct Balance(i64);

impl Balance {
    pub const ZERO: Balance = Balance(0);

    /// # Errors
    /// A [`ValidationError`] for a negative balance or one above `limits.max_balance`.
    pub fn new(value: i64, limits: &Limits) -> Result<Self, ValidationError> {
        if value < 0 {
            return Err(ValidationError::new("balance must not be negative"));
        }
        if value > limits.max_balance {
            return Err(ValidationError(format!(
                "balance must not exceed {}",
                limits.max_balance
            )));
        }
        Ok(Self(value))
    }

    /// Rebuilds a balance read back from storage.
    pub fn from_stored(value: i64) -> Self {
        Self(value)
    }

    pub fn get(self) -> i64 {
        self.0
    }

    /// The balance after adding `amount`, or `None` when it would pass `limits.max_balance`.
    pub fn credit(self, amount: Amount, limits: &Limits) -> Option<Balance> {
        self.0
            .checked_add(amount.0)
            .filter(|b| *b <= limits.max_balance)
            .map(Balance)
    }

    /// The balance after taking `amount`, or `None` when the balance is too small.
    pub fn debit(self, amount: Amount) -> Option<Balance> {
        self.0
            .checked_sub(amount.0)
            .filter(|b| *b >= 0)
            .map(Balance)
    }

    /// The balance after a ledger entry of `kind` and `amount`, in the direction
    /// [`EntryKind::sign`] gives it; `None` when it would leave 0..=`MAX_BALANCE`.
    pub fn moved(self, kind: EntryKind, amount: Amount, limits: &Limits) -> Option<Balance> {
        if kind.sign() > 0 {
            self.credit(amount, limits)
        } else {
            self.debit(amount)
        }
    }
}

impl fmt::Display for Balance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A client's idempotency key: 1 to 255 characters of visible ASCII (0x21–0x7E).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    pub const MAX_LEN: usize = 255;

    /// # Errors
    /// A [`ValidationError`] for an empty key, one longer than 255 characters, or one with
    /// a character outside 0x21–0x7E (spaces and control characters included).
    pub fn parse(raw: &str) -> Result<Self, ValidationError> {
        if raw.is_empty() || raw.len() > Self::MAX_LEN {
            return Err(ValidationError::new(
                "idempotency key must be 1 to 255 characters long",
            ));
        }
        if !raw.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
            return Err(ValidationError::new(
                "idempotency key must contain only visible ASCII characters",
            ));
        }
        Ok(Self(raw.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for IdempotencyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Why a refund was made, as the client wrote it: at most 255 characters, none of them a
/// control character (it is stored and shown to people).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct RefundReason(String);

impl RefundReason {
    pub const MAX_CHARS: usize = 255;

    /// # Errors
    /// A [`ValidationError`] for a reason over 255 characters or with a control character.
    pub fn parse(raw: &str) -> Result<Self, ValidationError> {
        if raw.chars().count() > Self::MAX_CHARS {
            return Err(ValidationError::new(
                "reason must be at most 255 characters long",
            ));
        }
        if raw.chars().any(char::is_control) {
            return Err(ValidationError::new(
                "reason must not contain control characters",
            ));
        }
        Ok(Self(raw.to_owned()))
    }

    /// Rebuilds a reason read back from storage, where it was validated on the way in.
    pub fn from_stored(raw: String) -> Self {
        Self(raw)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A coupon's name: 1 to 100 characters, none of them a control character.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct CouponName(String);

impl CouponName {
    pub const MAX_CHARS: usize = 100;

    /// # Errors
    /// A [`ValidationError`] for an empty name, one over 100 characters or one with a
    /// control character.
    pub fn parse(raw: &str) -> Result<Self, ValidationError> {
        let chars = raw.chars().count();
        if chars == 0 || chars > Self::MAX_CHARS {
            return Err(ValidationError::new(
                "name must be 1 to 100 characters long",
            ));
        }
        if raw.chars().any(char::is_control) {
            return Err(ValidationError::new(
                "name must not contain control characters",
            ));
        }
        Ok(Self(raw.to_owned()))
    }

    /// Rebuilds a name read back from storage, where it was validated on the way in.
    pub fn from_stored(raw: String) -> Self {
        Self(raw)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The number of history entries on one page: 1..=500, 50 when not given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageLimit(u32);

impl PageLimit {
    pub const MAX: u32 = 500;
    pub const DEFAULT: PageLimit = PageLimit(50);

    /// Parses the `limit` query parameter.
    ///
    /// # Errors
    /// A [`ValidationError`] for anything but an integer from 1 to 500.
    pub fn parse(raw: &str) -> Result<Self, ValidationError> {
        let invalid = || ValidationError::new("limit must be an integer from 1 to 500");
        if raw.is_empty()
            || raw.len() > 3
            || raw.starts_with('0')
            || !raw.bytes().all(|b| b.is_ascii_digit())
        {
            return Err(invalid());
        }
        match raw.parse::<u32>() {
            Ok(n) if (1..=Self::MAX).contains(&n) => Ok(Self(n)),
            _ => Err(invalid()),
        }
    }

    pub fn get(self) -> u32 {
        self.0
    }
}

impl Default for PageLimit {
    fn default() -> Self {
        Self::DEFAULT
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refund_reason_is_short_text_without_control_characters() {
        assert!(RefundReason::parse("").is_ok());
        assert!(
            RefundReason::parse(&"é".repeat(255)).is_ok(),
            "characters, not bytes"
        );
        assert!(RefundReason::parse(&"a".repeat(256)).is_err());
        for raw in ["a\nb", "\u{0}", "tab\t", "\u{7f}", "\u{85}"] {
            assert!(RefundReason::parse(raw).is_err(), "{raw:?}");
        }
    }

    #[test]
    fn numbers_have_one_canonical_form() {
        assert_eq!(UserId::parse("7").map(UserId::get), Ok(7));
        for raw in [
            "07",
            "007",
            "0",
            "+7",
            " 7",
            "7 ",
            "",
            "9223372036854775808",
        ] {
            assert!(UserId::parse(raw).is_err(), "{raw:?}");
        }
        assert_eq!(PageLimit::parse("50").map(PageLimit::get), Ok(50));
        assert_eq!(RefundId::parse("4").map(RefundId::get), Ok(4));
        for raw in ["050", "0", "501", "5a", ""] {
            assert!(PageLimit::parse(raw).is_err(), "{raw:?}");
        }
    }
}
