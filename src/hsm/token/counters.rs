//! Counts of the token operations the gateway makes, for the benchmark and the
//! metrics. Counting only: nothing here calls the token or decides anything.

use std::sync::atomic::{AtomicU64, Ordering};

/// Counts of token operations, for the benchmark and metrics.
#[derive(Debug, Default)]
pub(in crate::hsm) struct OpCounters {
    derive: AtomicU64,
    encrypt: AtomicU64,
    destroy: AtomicU64,
    sign: AtomicU64,
}

/// A snapshot of the token's operation counts ([`Token::counters`](super::Token::counters)).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct OpCounts {
    /// `C_DeriveKey` calls.
    pub derive: u64,
    /// Encryptions (`C_EncryptInit` + `C_Encrypt`).
    pub encrypt: u64,
    /// `C_DestroyObject` calls.
    pub destroy: u64,
    /// Signatures (`C_SignInit` + `C_Sign`).
    pub sign: u64,
}

impl OpCounts {
    /// Token operations in all.
    pub fn operations(&self) -> u64 {
        self.derive + self.encrypt + self.destroy + self.sign
    }

    /// PKCS#11 function calls behind them: cryptoki's `encrypt` and `sign` are an
    /// init call plus two calls (the first asks for the output length).
    pub fn pkcs11_calls(&self) -> u64 {
        self.derive + self.destroy + 3 * (self.encrypt + self.sign)
    }

    /// Difference since an earlier snapshot.
    pub fn since(&self, earlier: &OpCounts) -> OpCounts {
        OpCounts {
            derive: self.derive - earlier.derive,
            encrypt: self.encrypt - earlier.encrypt,
            destroy: self.destroy - earlier.destroy,
            sign: self.sign - earlier.sign,
        }
    }
}

impl OpCounters {
    fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// One `C_DeriveKey`.
    pub(super) fn count_derive(&self) {
        Self::bump(&self.derive);
    }

    /// One encryption.
    pub(super) fn count_encrypt(&self) {
        Self::bump(&self.encrypt);
    }

    /// One `C_DestroyObject`.
    pub(super) fn count_destroy(&self) {
        Self::bump(&self.destroy);
    }

    /// One signature.
    pub(super) fn count_sign(&self) {
        Self::bump(&self.sign);
    }

    /// Current counts.
    pub fn snapshot(&self) -> OpCounts {
        OpCounts {
            derive: self.derive.load(Ordering::Relaxed),
            encrypt: self.encrypt.load(Ordering::Relaxed),
            destroy: self.destroy.load(Ordering::Relaxed),
            sign: self.sign.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn op_counts_translate_to_pkcs11_calls() {
        let counts = OpCounts {
            derive: 2,
            encrypt: 2,
            destroy: 2,
            sign: 0,
        };
        assert_eq!(counts.operations(), 6);
        assert_eq!(counts.pkcs11_calls(), 10);
        assert_eq!(counts.since(&counts), OpCounts::default());
    }
}
