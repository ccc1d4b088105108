//! Key management in the token: generation, import from clear components under
//! dual control, listing, and the policy check (DESIGN 3).
//!
//! Clear component bytes live only in `Zeroizing` buffers and in temporary,
//! sensitive session objects used to compute their KCVs. Every refusal
//! (malformed, repeated or miscounted components, a taken label) happens before
//! anything is created; a failure half-way destroys what was created.

use cryptoki::mechanism::Mechanism;
use cryptoki::mechanism::misc::KeyDerivationStringData;
use cryptoki::object::{Attribute, ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use serde::Serialize;
use zeroize::Zeroizing;

use super::error::{HsmError, HsmResult, KeyInputError};
use super::mechanism::{allowed_mechanisms, des3_ecb_encrypt_data};
use super::policy::{Kcv, KeyAttributes, KeyKind, KeyLabel};
use super::token::{
    EphemeralKey, Token, find_key, hmac_kcv, inspect, kcv_des, session_des_encrypt_template,
};

/// A clear key component, as typed or read by a custodian. Zeroized on drop.
pub struct Component(Zeroizing<Vec<u8>>);

impl Component {
    /// Parses a component: hex digits (spaces allowed between groups), exactly
    /// the kind's key length.
    ///
    /// # Errors
    /// `InvalidInput` naming the component's position, never its value.
    pub fn parse(text: &str, kind: KeyKind, position: usize) -> HsmResult<Component> {
        let digits: Zeroizing<String> =
            Zeroizing::new(text.chars().filter(|c| !c.is_whitespace()).collect());
        let want = kind.key_len() * 2;
        let malformed = || {
            HsmError::InvalidInput(KeyInputError::ComponentFormat {
                position,
                digits: want,
            })
        };
        if digits.len() != want || !digits.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(malformed());
        }
        let bytes = hex::decode(digits.as_bytes()).map_err(|_| malformed())?;
        Ok(Component(Zeroizing::new(bytes)))
    }
}

impl std::fmt::Debug for Component {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Component(***)")
    }
}

/// What an import or generation created.
#[derive(Debug, Serialize)]
pub struct CreatedKey {
    /// Label of the key.
    pub label: KeyLabel,
    /// Kind of the key.
    pub kind: KeyKind,
    /// KCV of each component, in the order given (empty for a generated key).
    pub component_kcvs: Vec<Kcv>,
    /// KCV of the key, computed in the token after creation.
    pub kcv: Kcv,
}

/// One gateway key object as listed by `keys list`.
#[derive(Debug, Serialize)]
pub struct KeyListing {
    /// Object label.
    pub label: String,
    /// Key kind.
    pub kind: KeyKind,
    /// `main`, or `single-des` for a CVK's KA‖KA object.
    pub role: &'static str,
    /// Rotation version from the label.
    pub version: u32,
    /// KCV computed in the token (`None` when the key's policy forbids computing it).
    pub kcv: Option<Kcv>,
    /// Security attributes.
    pub attributes: KeyAttributes,
    /// Ways the attributes are wider than the kind allows; empty when conforming.
    pub violations: Vec<String>,
}

pub(super) fn secret_key_template(kind: KeyKind, token: bool) -> Vec<Attribute> {
    let usage = kind.usage();
    vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(kind.key_type().to_cryptoki()),
        Attribute::Token(token),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Modifiable(false),
        Attribute::Encrypt(usage.encrypt),
        Attribute::Decrypt(usage.decrypt),
        Attribute::Sign(usage.sign),
        Attribute::Verify(usage.verify),
        Attribute::Wrap(usage.wrap),
        Attribute::Unwrap(usage.unwrap),
        Attribute::Derive(usage.derive),
        allowed_mechanisms(kind.mechanisms()),
    ]
}

pub(super) fn labelled(mut template: Vec<Attribute>, label: &str, id: Vec<u8>) -> Vec<Attribute> {
    template.push(Attribute::Label(label.as_bytes().to_vec()));
    template.push(Attribute::Id(id));
    template
}

/// Sets odd parity on every byte of a DES key value (the XOR of two
/// odd-parity components has even parity).
fn set_odd_parity(key: &mut [u8]) {
    for b in key {
        let high = *b & 0xFE;
        *b = high | u8::from(high.count_ones() % 2 == 0);
    }
}

/// Objects created so far by one command, destroyed on drop unless kept.
pub(super) struct Created<'s> {
    pub(super) session: &'s Session,
    pub(super) handles: Vec<ObjectHandle>,
}

impl Created<'_> {
    pub(super) fn keep(mut self) {
        self.handles.clear();
    }
}

impl Drop for Created<'_> {
    fn drop(&mut self) {
        for handle in self.handles.drain(..) {
            if let Err(e) = self.session.destroy_object(handle) {
                tracing::error!(error = %HsmError::from(e), "could not remove a half-created key");
            }
        }
    }
}

impl Token {
    /// Refuses a label that a key (or a CVK's twin) already has, before a ceremony starts.
    ///
    /// # Errors
    /// `LabelExists`, or the token's error.
    pub fn ensure_label_free(&self, label: &KeyLabel) -> HsmResult<()> {
        let session = self.admin_session()?;
        self.refuse_taken_label(&session, label)
    }

    /// Destroys a gateway key (both objects of a CVK). Used by the benchmark for
    /// its temporary keys; key retirement in production goes through the HSM's own tools.
    ///
    /// # Errors
    /// `KeyNotFound`, or the token's error.
    pub(crate) fn destroy_key(&self, label: &KeyLabel) -> HsmResult<()> {
        let _serial = self.admin_lock();
        let session = self.admin_session()?;
        let mut found = false;
        for l in [label.to_string(), label.single_des_twin()] {
            if let Some(handle) = find_key(&session, &l)? {
                session.destroy_object(handle)?;
                found = true;
            }
        }
        self.forget_key(label);
        if found {
            Ok(())
        } else {
            Err(HsmError::KeyNotFound {
                label: label.to_string(),
            })
        }
    }

    pub(super) fn refuse_taken_label(&self, session: &Session, label: &KeyLabel) -> HsmResult<()> {
        for l in [label.to_string(), label.single_des_twin()] {
            if find_key(session, &l)?.is_some() {
                return Err(HsmError::LabelExists { label: l });
            }
        }
        Ok(())
    }

    /// KCV of a clear value, computed in the token through a temporary session object.
    fn clear_value_kcv(&self, session: &Session, kind: KeyKind, value: &[u8]) -> HsmResult<Kcv> {
        let counters = self.op_counters();
        let mut template = if kind.is_des() {
            session_des_encrypt_template()
        } else {
            let mut t = secret_key_template(KeyKind::PanIndex, false);
            t.retain(|a| !matches!(a, Attribute::Modifiable(_)));
            t
        };
        template.push(Attribute::Value(value.to_vec()));
        let key = EphemeralKey::new(session, session.create_object(&template)?, counters);
        if kind.is_des() {
            kcv_des(session, key.handle, counters)
        } else {
            hmac_kcv(session, key.handle, counters)
        }
    }

    /// Imports a key from 2 or 3 clear components (dual control, DESIGN 3).
    ///
    /// # Errors
    /// `InvalidInput` for a wrong count or repeated components, `LabelExists`, or
    /// the token's error; nothing is left in the token on any error.
    pub fn import_key(
        &self,
        kind: KeyKind,
        label: &KeyLabel,
        components: &[Component],
    ) -> HsmResult<CreatedKey> {
        if !(2..=3).contains(&components.len()) {
            return Err(HsmError::InvalidInput(KeyInputError::ComponentCount(
                components.len(),
            )));
        }
        for (i, a) in components.iter().enumerate() {
            for (j, b) in components.iter().enumerate().skip(i + 1) {
                if a.0 == b.0 {
                    return Err(HsmError::InvalidInput(KeyInputError::RepeatedComponents(
                        i + 1,
                        j + 1,
                    )));
                }
            }
        }
        let _serial = self.admin_lock();
        let session = self.admin_session()?;
        self.refuse_taken_label(&session, label)?;

        let mut value = Zeroizing::new(vec![0u8; kind.key_len()]);
        let mut component_kcvs = Vec::with_capacity(components.len());
        for c in components {
            component_kcvs.push(self.clear_value_kcv(&session, kind, &c.0)?);
            value.iter_mut().zip(c.0.iter()).for_each(|(v, b)| *v ^= b);
        }
        if value.iter().all(|b| *b == 0) {
            return Err(HsmError::InvalidInput(KeyInputError::ZeroKey));
        }
        if kind.is_des() {
            set_odd_parity(&mut value);
        }
        let expected = self.clear_value_kcv(&session, kind, &value)?;

        let mut created = Created {
            session: &session,
            handles: Vec::new(),
        };
        let mut template = labelled(
            secret_key_template(kind, true),
            label.as_str(),
            kind.object_id(),
        );
        template.push(Attribute::Value(value.to_vec()));
        created.handles.push(session.create_object(&template)?);
        if kind == KeyKind::Cvk {
            let mut twin_value = Zeroizing::new(value[..8].repeat(2));
            set_odd_parity(&mut twin_value);
            let mut template = labelled(
                secret_key_template(kind, true),
                &label.single_des_twin(),
                KeyKind::single_des_object_id(),
            );
            template.push(Attribute::Value(twin_value.to_vec()));
            created.handles.push(session.create_object(&template)?);
        }
        let kcv = self.created_kcv(&session, kind, &created.handles, label)?;
        if kcv != expected {
            return Err(HsmError::InvalidInput(KeyInputError::KcvMismatch {
                stored: kcv,
                combined: expected,
            }));
        }
        created.keep();
        tracing::info!(key = %label, kind = %kind, kcv = %kcv, "key imported from components");
        Ok(CreatedKey {
            label: label.clone(),
            kind,
            component_kcvs,
            kcv,
        })
    }

    /// KCV of a just-created key, computed in the token the way `keys list` does.
    pub(super) fn created_kcv(
        &self,
        session: &Session,
        kind: KeyKind,
        handles: &[ObjectHandle],
        label: &KeyLabel,
    ) -> HsmResult<Kcv> {
        let main = *handles.first().ok_or_else(|| HsmError::KeyNotFound {
            label: label.to_string(),
        })?;
        self.object_kcv(session, kind, main)?
            .ok_or_else(|| HsmError::KeyPolicy {
                label: label.to_string(),
                violations: vec!["the token gives no check value for this key".into()],
            })
    }

    fn object_kcv(
        &self,
        session: &Session,
        kind: KeyKind,
        handle: ObjectHandle,
    ) -> HsmResult<Option<Kcv>> {
        let counters = self.op_counters();
        Ok(match kind {
            KeyKind::Cvk => Some(kcv_des(session, handle, counters)?),
            KeyKind::ImkDcvv | KeyKind::ImkTdcvv2 | KeyKind::ImkAc | KeyKind::ImkCvc3 => {
                inspect(session, handle)?.check_value
            }
            KeyKind::PanIndex | KeyKind::AuditSeal => Some(hmac_kcv(session, handle, counters)?),
        })
    }

    /// Generates a key inside the token.
    ///
    /// A CVK's KA‖KB and KA‖KA are both derived from one temporary random
    /// derive-only key with `CKM_DES3_ECB_ENCRYPT_DATA` over random X1‖X2 and X1‖X1,
    /// so KA never leaves the token.
    ///
    /// # Errors
    /// `LabelExists`, or the token's error; nothing is left in the token on error.
    pub fn generate_key(&self, kind: KeyKind, label: &KeyLabel) -> HsmResult<CreatedKey> {
        let _serial = self.admin_lock();
        let session = self.admin_session()?;
        self.refuse_taken_label(&session, label)?;
        let mut created = Created {
            session: &session,
            handles: Vec::new(),
        };
        let template = labelled(
            secret_key_template(kind, true),
            label.as_str(),
            kind.object_id(),
        );
        match kind {
            KeyKind::Cvk => {
                let seed = EphemeralKey::new(
                    &session,
                    session.generate_key(
                        &Mechanism::Des2KeyGen,
                        &secret_key_template(KeyKind::ImkDcvv, false),
                    )?,
                    self.op_counters(),
                );
                let mut x = Zeroizing::new(vec![0u8; 16]);
                session.generate_random_slice(&mut x)?;
                let pair_data = Zeroizing::new(x.to_vec());
                let twin_data = Zeroizing::new(x[..8].repeat(2));
                // SoftHSM refuses CKA_MODIFIABLE=false in a derive template (it sets
                // attributes after the template), so derive session objects and copy
                // them into non-modifiable token objects.
                for (data, label, id) in [
                    (&pair_data, label.to_string(), kind.object_id()),
                    (
                        &twin_data,
                        label.single_des_twin(),
                        KeyKind::single_des_object_id(),
                    ),
                ] {
                    let params = KeyDerivationStringData::new(data);
                    let derived = EphemeralKey::new(
                        &session,
                        session.derive_key(
                            &des3_ecb_encrypt_data(&params),
                            seed.handle,
                            &session_des_encrypt_template(),
                        )?,
                        self.op_counters(),
                    );
                    created.handles.push(session.copy_object(
                        derived.handle,
                        // SoftHSM applies a copy template in order and refuses any
                        // attribute after CKA_MODIFIABLE=false: keep it last.
                        &[
                            Attribute::Token(true),
                            Attribute::Label(label.into_bytes()),
                            Attribute::Id(id),
                            Attribute::Modifiable(false),
                        ],
                    )?);
                }
                // KA = KB would make the CVK single DES; 2^-64, but cheap to rule out.
                let pair = self.object_kcv(&session, kind, created.handles[0])?;
                let twin = self.object_kcv(&session, kind, created.handles[1])?;
                if pair == twin {
                    return Err(HsmError::InvalidInput(KeyInputError::EqualHalves));
                }
            }
            KeyKind::ImkDcvv | KeyKind::ImkTdcvv2 | KeyKind::ImkAc | KeyKind::ImkCvc3 => {
                created
                    .handles
                    .push(session.generate_key(&Mechanism::Des2KeyGen, &template)?);
            }
            KeyKind::PanIndex | KeyKind::AuditSeal => {
                let mut template = template;
                template.push(Attribute::ValueLen(32.into()));
                created
                    .handles
                    .push(session.generate_key(&Mechanism::GenericSecretKeyGen, &template)?);
            }
        }
        let kcv = self.created_kcv(&session, kind, &created.handles, label)?;
        created.keep();
        tracing::info!(key = %label, kind = %kind, kcv = %kcv, "key generated in the token");
        Ok(CreatedKey {
            label: label.clone(),
            kind,
            component_kcvs: Vec::new(),
            kcv,
        })
    }

    /// Every gateway key object in the token (`CKA_ID` starting `dcvvgw:`), with its
    /// attributes and any policy violation; a CVK without its KA‖KA twin is reported.
    ///
    /// # Errors
    /// The token's error.
    pub fn list_keys(&self) -> HsmResult<Vec<KeyListing>> {
        let session = self.admin_session()?;
        let handles = session.find_objects(&[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::Token(true),
        ])?;
        let mut listing = Vec::new();
        for handle in handles {
            let info = inspect(&session, handle)?;
            let Some((kind, single_des)) = info.kind else {
                continue;
            };
            let violations = info.attrs.violations(kind);
            // Only a conforming key is used, even to compute its check value.
            let kcv = if violations.is_empty() {
                self.object_kcv(&session, kind, handle)?
            } else {
                None
            };
            let version = info
                .label
                .trim_end_matches(super::policy::SINGLE_DES_SUFFIX)
                .parse::<KeyLabel>()
                .map_or(1, |l| l.version());
            listing.push(KeyListing {
                label: info.label,
                kind,
                role: if single_des { "single-des" } else { "main" },
                version,
                kcv,
                attributes: info.attrs,
                violations,
            });
        }
        let twins: Vec<String> = listing
            .iter()
            .filter(|k| k.role == "single-des")
            .map(|k| k.label.clone())
            .collect();
        for key in listing
            .iter_mut()
            .filter(|k| k.kind == KeyKind::Cvk && k.role == "main")
        {
            if !twins.contains(&format!(
                "{}{}",
                key.label,
                super::policy::SINGLE_DES_SUFFIX
            )) {
                key.violations.push("its KA||KA object is missing".into());
            }
        }
        listing.sort_by(|a, b| a.label.cmp(&b.label));
        Ok(listing)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn components_are_parsed_strictly_and_never_echoed() {
        let ok =
            Component::parse("0123 4567 89AB CDEF FEDC BA98 7654 3210", KeyKind::Cvk, 1).unwrap();
        assert_eq!(ok.0.len(), 16);
        assert_eq!(format!("{ok:?}"), "Component(***)");
        for bad in ["0123", "0123456789ABCDEFFEDCBA987654321G", &"00".repeat(17)] {
            let err = Component::parse(bad, KeyKind::Cvk, 2)
                .unwrap_err()
                .to_string();
            assert_eq!(err, "component 2 is not 32 hex digits");
        }
        assert!(Component::parse(&"AB".repeat(32), KeyKind::PanIndex, 1).is_ok());
        assert!(Component::parse(&"AB".repeat(16), KeyKind::PanIndex, 1).is_err());
    }

    #[test]
    fn parity_is_odd_and_key_bits_are_kept() {
        let mut key = [0x00, 0x01, 0xFE, 0xFF, 0x12, 0x34];
        set_odd_parity(&mut key);
        assert_eq!(key, [0x01, 0x01, 0xFE, 0xFE, 0x13, 0x34]);
        assert!(key.iter().all(|b| b.count_ones() % 2 == 1));
    }
}
