//! Inspection: finding a gateway key object by label and reading what the
//! policy needs to know about it (its `CKA_ID` kind, security attributes,
//! usage flags, allowed mechanisms and check value).
//!
//! Read-only: nothing here uses a key in an operation, creates or destroys an
//! object, or reads a key value. An attribute the token hides or cannot report
//! is taken at its widest, so a key can never look narrower than it is.

use cryptoki::object::{Attribute, AttributeType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;

use crate::hsm::error::{HsmError, HsmResult};
use crate::hsm::mechanism::{AllowedMechanisms, read_allowed_mechanisms};
use crate::hsm::policy::{Kcv, KeyAttributes, KeyKind, Usage};
use crate::hsm::types::KeyType;

/// What the token says about one key object.
#[derive(Debug)]
pub(in crate::hsm) struct Inspected {
    pub(in crate::hsm) label: String,
    pub(in crate::hsm) kind: Option<(KeyKind, bool)>,
    pub(in crate::hsm) attrs: KeyAttributes,
    pub(in crate::hsm) check_value: Option<Kcv>,
}

/// Finds the one token secret key with `label`.
pub(in crate::hsm) fn find_key(session: &Session, label: &str) -> HsmResult<Option<ObjectHandle>> {
    let found = session.find_objects(&[
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::Token(true),
        Attribute::Label(label.as_bytes().to_vec()),
    ])?;
    match found.as_slice() {
        [] => Ok(None),
        [one] => Ok(Some(*one)),
        _ => Err(HsmError::DuplicateLabel {
            label: label.to_owned(),
        }),
    }
}

/// The one key with `label`, its kind and what the token says about it, if
/// it is a gateway key within its policy.
pub(super) fn inspect_checked(
    session: &Session,
    label: &str,
) -> HsmResult<(ObjectHandle, KeyKind, Inspected)> {
    let handle = find_key(session, label)?.ok_or_else(|| HsmError::KeyNotFound {
        label: label.to_owned(),
    })?;
    let info = inspect(session, handle)?;
    let Some((kind, _)) = info.kind else {
        return Err(HsmError::KeyPolicy {
            label: label.to_owned(),
            violations: vec!["CKA_ID does not name a gateway key kind".into()],
        });
    };
    let violations = info.attrs.violations(kind);
    if !violations.is_empty() {
        return Err(HsmError::KeyPolicy {
            label: label.to_owned(),
            violations,
        });
    }
    Ok((handle, kind, info))
}

/// Reads the attributes the policy needs.
pub(in crate::hsm) fn inspect(session: &Session, handle: ObjectHandle) -> HsmResult<Inspected> {
    let wanted = [
        AttributeType::Label,
        AttributeType::Id,
        AttributeType::KeyType,
        AttributeType::Token,
        AttributeType::Private,
        AttributeType::Sensitive,
        AttributeType::Extractable,
        AttributeType::Modifiable,
        AttributeType::Encrypt,
        AttributeType::Decrypt,
        AttributeType::Sign,
        AttributeType::Verify,
        AttributeType::Wrap,
        AttributeType::Unwrap,
        AttributeType::Derive,
        AttributeType::CheckValue,
    ];
    let mut label = String::new();
    let mut kind = None;
    let mut check_value = None;
    // Unknown or absent attributes stay at their widest reading, so a token that
    // hides one cannot make a key look narrower than it is.
    let mut attrs = KeyAttributes {
        key_type: KeyType::GenericSecret,
        token: false,
        private: false,
        sensitive: false,
        extractable: true,
        modifiable: true,
        usage: Usage {
            encrypt: true,
            decrypt: true,
            sign: true,
            verify: true,
            wrap: true,
            unwrap: true,
            derive: true,
        },
        allowed_mechanisms: Vec::new(),
        allowed_mechanisms_unreadable: false,
    };
    match read_allowed_mechanisms(session, handle)? {
        AllowedMechanisms::Listed(list) => attrs.allowed_mechanisms = list,
        AllowedMechanisms::Unreadable => attrs.allowed_mechanisms_unreadable = true,
    }
    for attribute in session.get_attributes(handle, &wanted)? {
        match attribute {
            Attribute::Label(v) => label = String::from_utf8_lossy(&v).into_owned(),
            Attribute::Id(v) => kind = KeyKind::from_object_id(&v),
            Attribute::KeyType(t) => attrs.key_type = KeyType::from_cryptoki(t),
            Attribute::Token(b) => attrs.token = b,
            Attribute::Private(b) => attrs.private = b,
            Attribute::Sensitive(b) => attrs.sensitive = b,
            Attribute::Extractable(b) => attrs.extractable = b,
            Attribute::Modifiable(b) => attrs.modifiable = b,
            Attribute::Encrypt(b) => attrs.usage.encrypt = b,
            Attribute::Decrypt(b) => attrs.usage.decrypt = b,
            Attribute::Sign(b) => attrs.usage.sign = b,
            Attribute::Verify(b) => attrs.usage.verify = b,
            Attribute::Wrap(b) => attrs.usage.wrap = b,
            Attribute::Unwrap(b) => attrs.usage.unwrap = b,
            Attribute::Derive(b) => attrs.usage.derive = b,
            Attribute::CheckValue(v) => check_value = Kcv::from_prefix(&v),
            _ => {}
        }
    }
    Ok(Inspected {
        label,
        kind,
        attrs,
        check_value,
    })
}
