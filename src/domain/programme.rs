//! Card programmes (issue 3): which keys and which TDCVV2-v1 rules apply to a
//! card, chosen by `keyAssociation` or else by the longest matching BIN prefix.
//!
//! Pure lookups over the configured list; built once at start-up by `config`.

use std::collections::{BTreeMap, HashSet};
use std::num::NonZeroU32;

use crate::hsm::{KeyKind, KeyLabel};

use super::card::{Pan, Tdcvv2Profile};
use super::rotation::{KeyRole, KeyUsage, PreviousKey};

/// One card programme.
#[derive(Clone, Debug)]
pub struct Programme {
    /// Unique name (clients are allowed programmes by name).
    pub name: String,
    /// BIN prefixes (1–11 digits) of the programme's cards.
    pub bin_prefixes: Vec<String>,
    /// Selects this programme when a request names it, whatever the BIN.
    pub key_association: Option<String>,
    /// CVK of static CVV / CVV2 / iCVV.
    pub cvk: KeyLabel,
    /// IMK of contactless dCVV.
    pub imk_dcvv: KeyLabel,
    /// IMK of TDCVV2-v1 (a key of its own, DESIGN 2.4).
    pub imk_tdcvv2: KeyLabel,
    /// IMK of EMV application cryptograms (ARQC / ARPC), when the programme's
    /// cards are chip cards whose cryptograms the gateway checks.
    pub imk_ac: Option<KeyLabel>,
    /// IMK of Mastercard contactless CVC3, when the programme checks it.
    pub imk_cvc3: Option<KeyLabel>,
    /// Window length and past / future tolerance.
    pub profile: Tdcvv2Profile,
    /// Once a window's code is accepted for a card, refuse it for that card.
    pub single_use: bool,
    /// Mismatches within `failure_period_seconds` after which dynamic checks are declined.
    pub failure_limit: Option<NonZeroU32>,
    /// Length of the rolling failure period.
    pub failure_period_seconds: u32,
    /// Previous key versions verification still accepts during their grace
    /// period (key rotation, [`super::rotation`]); empty when nothing rotates.
    pub previous: Vec<PreviousKey>,
}

impl Programme {
    /// Every key label the programme uses, for start-up and readiness checks.
    pub fn key_labels(&self) -> impl Iterator<Item = &KeyLabel> {
        self.current_keys().into_iter().map(|(_, label)| label)
    }

    /// The current key of each kind the programme uses: always a CVK, an
    /// IMK-dCVV and an IMK-TDCVV2; an IMK-AC and an IMK-CVC3 when configured.
    pub fn current_keys(&self) -> Vec<(KeyKind, &KeyLabel)> {
        let optional = [
            (KeyKind::ImkAc, self.imk_ac.as_ref()),
            (KeyKind::ImkCvc3, self.imk_cvc3.as_ref()),
        ];
        [
            (KeyKind::Cvk, &self.cvk),
            (KeyKind::ImkDcvv, &self.imk_dcvv),
            (KeyKind::ImkTdcvv2, &self.imk_tdcvv2),
        ]
        .into_iter()
        .chain(
            optional
                .into_iter()
                .filter_map(|(kind, label)| label.map(|l| (kind, l))),
        )
        .collect()
    }

    /// The current key of `kind`, if the programme uses one.
    pub fn current_key(&self, kind: KeyKind) -> Option<&KeyLabel> {
        self.current_keys()
            .into_iter()
            .find_map(|(k, label)| (k == kind).then_some(label))
    }
}

/// Why a programme list is refused at start-up.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProgrammeError {
    /// Two programmes share a name.
    #[error("programme name {0:?} is used twice")]
    DuplicateName(String),
    /// Two programmes share a BIN prefix, so the card's programme would be ambiguous.
    #[error("BIN prefix {0:?} belongs to two programmes")]
    DuplicatePrefix(String),
    /// Two programmes share a key association.
    #[error("keyAssociation {0:?} belongs to two programmes")]
    DuplicateAssociation(String),
    /// A BIN prefix is not 1 to 11 digits.
    #[error("programme {0:?}: BIN prefixes are 1 to 11 digits")]
    BadPrefix(String),
    /// A programme without any BIN prefix.
    #[error("programme {0:?}: at least one BIN prefix")]
    NoPrefix(String),
}

/// The configured programmes.
#[derive(Clone, Debug, Default)]
pub struct Programmes(Vec<Programme>);

impl Programmes {
    /// Every programme key by label, with each programme's use of it (current keys
    /// and every configured previous key, ended grace periods included: a listing
    /// shows the configuration; [`PreviousKey::accepts_at`] says whether it is used).
    pub fn key_usages(&self) -> BTreeMap<String, Vec<KeyUsage>> {
        let mut out: BTreeMap<String, Vec<KeyUsage>> = BTreeMap::new();
        for p in self.iter() {
            for (kind, label) in p.current_keys() {
                out.entry(label.to_string()).or_default().push(KeyUsage {
                    programme: p.name.clone(),
                    kind,
                    role: KeyRole::Current,
                    accept_until_ms: None,
                });
            }
            for prev in &p.previous {
                out.entry(prev.label.to_string())
                    .or_default()
                    .push(KeyUsage {
                        programme: p.name.clone(),
                        kind: prev.kind,
                        role: KeyRole::Previous,
                        accept_until_ms: Some(prev.accept_until_ms),
                    });
            }
        }
        out
    }

    /// Checks the list: unique names, prefixes and associations.
    ///
    /// # Errors
    /// The first problem found.
    pub fn new(list: Vec<Programme>) -> Result<Programmes, ProgrammeError> {
        let mut names = HashSet::new();
        let mut prefixes = HashSet::new();
        let mut associations = HashSet::new();
        for p in &list {
            if !names.insert(p.name.as_str()) {
                return Err(ProgrammeError::DuplicateName(p.name.clone()));
            }
            if p.bin_prefixes.is_empty() {
                return Err(ProgrammeError::NoPrefix(p.name.clone()));
            }
            for prefix in &p.bin_prefixes {
                if !(1..=11).contains(&prefix.len()) || !prefix.bytes().all(|b| b.is_ascii_digit())
                {
                    return Err(ProgrammeError::BadPrefix(p.name.clone()));
                }
                if !prefixes.insert(prefix.as_str()) {
                    return Err(ProgrammeError::DuplicatePrefix(prefix.clone()));
                }
            }
            if let Some(a) = &p.key_association
                && !associations.insert(a.as_str())
            {
                return Err(ProgrammeError::DuplicateAssociation(a.clone()));
            }
        }
        Ok(Programmes(list))
    }

    /// All programmes.
    pub fn iter(&self) -> impl Iterator<Item = &Programme> {
        self.0.iter()
    }

    /// The programme of a card: the one named by `key_association` when given
    /// (it must also cover the card's BIN), else the longest matching prefix.
    pub fn resolve(&self, pan: &Pan, key_association: Option<&str>) -> Option<&Programme> {
        let digits = pan.digits();
        let covers = |p: &Programme| -> Option<usize> {
            p.bin_prefixes
                .iter()
                .filter(|prefix| digits.starts_with(prefix.as_str()))
                .map(String::len)
                .max()
        };
        match key_association {
            Some(a) => self
                .0
                .iter()
                .find(|p| p.key_association.as_deref() == Some(a))
                .filter(|p| covers(p).is_some()),
            None => self
                .0
                .iter()
                .filter_map(|p| covers(p).map(|len| (len, p)))
                .max_by_key(|(len, _)| *len)
                .map(|(_, p)| p),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn programme(name: &str, prefixes: &[&str], association: Option<&str>) -> Programme {
        Programme {
            name: name.into(),
            bin_prefixes: prefixes.iter().map(|s| s.to_string()).collect(),
            key_association: association.map(Into::into),
            cvk: "cvk-v1".parse().unwrap(),
            imk_dcvv: "imk-dcvv-v1".parse().unwrap(),
            imk_tdcvv2: "imk-tdcvv2-v1".parse().unwrap(),
            imk_ac: None,
            imk_cvc3: None,
            profile: Tdcvv2Profile::new(300, 1, 0).unwrap(),
            single_use: true,
            failure_limit: NonZeroU32::new(5),
            failure_period_seconds: 86_400,
            previous: Vec::new(),
        }
    }

    fn pan(s: &str) -> Pan {
        s.parse().unwrap()
    }

    #[test]
    fn longest_prefix_wins_and_association_selects() {
        let list = Programmes::new(vec![
            programme("visa", &["4"], None),
            programme("gold", &["412345"], Some("GOLD")),
            programme("other", &["5"], Some("OTHER")),
        ])
        .unwrap();
        let card = pan("4123450000000002");
        assert_eq!(list.resolve(&card, None).unwrap().name, "gold");
        assert_eq!(
            list.resolve(&pan("4000000000000002"), None).unwrap().name,
            "visa"
        );
        assert_eq!(list.resolve(&card, Some("GOLD")).unwrap().name, "gold");
        // An association that does not cover the card's BIN selects nothing.
        assert!(list.resolve(&card, Some("OTHER")).is_none());
        assert!(list.resolve(&card, Some("NONE")).is_none());
        assert!(list.resolve(&pan("6011000000000004"), None).is_none());
    }

    #[test]
    fn ambiguous_lists_are_refused() {
        let twice = Programmes::new(vec![
            programme("a", &["4"], None),
            programme("a", &["5"], None),
        ]);
        assert_eq!(
            twice.unwrap_err(),
            ProgrammeError::DuplicateName("a".into())
        );
        let prefix = Programmes::new(vec![
            programme("a", &["41"], None),
            programme("b", &["41"], None),
        ]);
        assert_eq!(
            prefix.unwrap_err(),
            ProgrammeError::DuplicatePrefix("41".into())
        );
        let assoc = Programmes::new(vec![
            programme("a", &["41"], Some("X")),
            programme("b", &["42"], Some("X")),
        ]);
        assert_eq!(
            assoc.unwrap_err(),
            ProgrammeError::DuplicateAssociation("X".into())
        );
        assert!(Programmes::new(vec![programme("a", &["4x"], None)]).is_err());
        assert!(Programmes::new(vec![programme("a", &[], None)]).is_err());
    }
}
