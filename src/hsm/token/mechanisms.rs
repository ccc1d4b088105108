//! The token's mechanism table: what `C_GetMechanismInfo` reports on the
//! token's slot for each mechanism asked about (issue 11, item 4).
//!
//! Read-only, and no session is needed. The comparison with what the gateway
//! needs is `capability`'s.

use crate::hsm::capability::MechanismTable;
use crate::hsm::error::{Benign, HsmResult, tolerate};
use crate::hsm::types::Mechanism;

use super::Token;

impl Token {
    /// The flags the token reports for each of `mechanisms`, or that it lacks one.
    ///
    /// Each mechanism is asked about with `C_GetMechanismInfo` (`CKR_MECHANISM_INVALID`:
    /// the token lacks it). `C_GetMechanismList` is not used: cryptoki 0.12 drops
    /// every value it has no type for from that list, `CKM_DES3_ECB_ENCRYPT_DATA`
    /// among them, so the list would say every token lacks the derivation.
    ///
    /// # Errors
    /// `TokenDown` while the token is down, or the token's error.
    pub fn mechanism_table(&self, mechanisms: &[Mechanism]) -> HsmResult<MechanismTable> {
        let _library = self.shared()?;
        let slot = self.slot();
        let mut entries = Vec::with_capacity(mechanisms.len());
        for &m in mechanisms {
            let info = tolerate(
                self.ctx.get_mechanism_info(slot, m.to_cryptoki()),
                Benign::MechanismInvalid,
            )?;
            entries.push((m, info.as_ref().map(MechanismTable::flags_of)));
        }
        Ok(MechanismTable::new(entries))
    }
}
