//! Key rotation (issue 4; DESIGN 3, versions `…-v1`, `…-v2`): which key
//! versions a verification tries, and in which order.
//!
//! A programme names its *current* key of each kind (CVK, IMK-dCVV,
//! IMK-TDCVV2, and IMK-AC / IMK-CVC3 where configured) and, optionally, *previous* versions, each with the end of its
//! grace period (`accept_until`, exclusive). The rule:
//! - generation (dynamic values, static CVV / CVV2 / iCVV) always uses the
//!   current key;
//! - a verification tries the current key first and, only if it does not
//!   match, each previous key of the same kind whose grace period has not ended
//!   at the request's time, in configuration order, and stops at the first match;
//! - a previous key whose grace period has ended is never tried, never checked
//!   in the token and does not count as in use.
//!
//! Pure: no token, no store, no clock of its own (callers pass the service
//! clock's time), so every rule here is unit-tested.

use crate::hsm::{KeyKind, KeyLabel};

/// The kinds of key a card programme uses, and so may rotate.
pub const ROTATING_KINDS: [KeyKind; 5] = [
    KeyKind::Cvk,
    KeyKind::ImkDcvv,
    KeyKind::ImkTdcvv2,
    KeyKind::ImkAc,
    KeyKind::ImkCvc3,
];

/// A previous version of one of a programme's keys, accepted by verifications
/// until `accept_until_ms`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PreviousKey {
    /// `cvk`, `imk-dcvv` or `imk-tdcvv2`.
    pub kind: KeyKind,
    /// The older version's label.
    pub label: KeyLabel,
    /// End of the grace period, Unix epoch milliseconds, exclusive: a request
    /// at this instant or later is not checked against this key.
    pub accept_until_ms: u64,
}

impl PreviousKey {
    /// Whether the grace period is still running at `now_ms`.
    pub fn accepts_at(&self, now_ms: u64) -> bool {
        now_ms < self.accept_until_ms
    }
}

/// A key's role in a programme.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KeyRole {
    /// The version generation uses and verification tries first.
    Current,
    /// An older version, accepted by verification during its grace period.
    Previous,
}

impl KeyRole {
    /// `current` or `previous`, as in listings.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyRole::Current => "current",
            KeyRole::Previous => "previous",
        }
    }
}

/// One key a verification tries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    /// Its label.
    pub label: KeyLabel,
    /// Current or previous.
    pub role: KeyRole,
}

/// The keys one verification tries, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidates {
    /// Tried first.
    pub current: Candidate,
    /// Tried in this order when the current key does not match.
    pub previous: Vec<Candidate>,
}

/// The keys a verification of `kind` tries at `now_ms`: the current key, then
/// each previous key of that kind still in its grace period, in configuration
/// order.
pub fn candidates(
    current: &KeyLabel,
    kind: KeyKind,
    previous: &[PreviousKey],
    now_ms: u64,
) -> Candidates {
    Candidates {
        current: Candidate {
            label: current.clone(),
            role: KeyRole::Current,
        },
        previous: previous
            .iter()
            .filter(|p| p.kind == kind && p.accepts_at(now_ms))
            .map(|p| Candidate {
                label: p.label.clone(),
                role: KeyRole::Previous,
            })
            .collect(),
    }
}

/// What [`first_match`] found.
#[derive(Debug)]
pub struct Tried<T, C> {
    /// What the matching key's attempt returned, or `None` when no key matched.
    pub matched: Option<T>,
    /// The key that matched, or the current key when none did.
    pub key: Candidate,
    /// That key's check value.
    pub check_value: C,
}

/// Tries the current key, then the previous ones in order, with `attempt`
/// (which returns `Some` on a match, with the key's check value) and stops at
/// the first match. Without a match the result names the current key. One
/// verification, however many keys it tried: the caller counts it once.
///
/// # Errors
/// The first error of an attempt (a later key is then not tried).
pub fn first_match<T, C, E>(
    keys: &Candidates,
    mut attempt: impl FnMut(&KeyLabel) -> Result<(Option<T>, C), E>,
) -> Result<Tried<T, C>, E> {
    let (matched, check_value) = attempt(&keys.current.label)?;
    if matched.is_some() {
        return Ok(Tried {
            matched,
            key: keys.current.clone(),
            check_value,
        });
    }
    for other in &keys.previous {
        let (found, value) = attempt(&other.label)?;
        if found.is_some() {
            return Ok(Tried {
                matched: found,
                key: other.clone(),
                check_value: value,
            });
        }
    }
    Ok(Tried {
        matched: None,
        key: keys.current.clone(),
        check_value,
    })
}

/// Why a programme's previous keys are refused at start-up.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RotationError {
    /// The kind is not one a programme uses.
    #[error(
        "{0:?} is not a kind of key a programme uses (cvk, imk-dcvv, imk-tdcvv2, imk-ac, imk-cvc3)"
    )]
    KindNotUsed(String),
    /// A previous key of a kind the programme has no current key of.
    #[error("the programme has no current {0} key, so no previous one either")]
    NoCurrentKey(&'static str),
    /// A previous label is the programme's current key of that kind.
    #[error("{0} is the programme's current {1} key; a previous key is an older version")]
    SameAsCurrent(String, &'static str),
    /// The same previous label is named twice.
    #[error("{0} is named as a previous key twice")]
    Duplicate(String),
}

/// The kind of a `[[programmes.previous]]` entry: one of [`ROTATING_KINDS`].
///
/// # Errors
/// `KindNotUsed` for any other text.
pub fn rotating_kind(text: &str) -> Result<KeyKind, RotationError> {
    ROTATING_KINDS
        .into_iter()
        .find(|k| k.as_str() == text)
        .ok_or_else(|| RotationError::KindNotUsed(text.to_owned()))
}

/// Checks one programme's previous keys against its current ones: no previous
/// label equal to the current key of its kind, none named twice. (That each
/// exists in the token with the right kind and policy is checked at start-up.)
///
/// # Errors
/// The index of the first bad entry and what is wrong with it.
pub fn validate(
    current: &[(KeyKind, &KeyLabel)],
    previous: &[PreviousKey],
) -> Result<(), (usize, RotationError)> {
    for (i, p) in previous.iter().enumerate() {
        if !current.iter().any(|(k, _)| *k == p.kind) {
            return Err((i, RotationError::NoCurrentKey(p.kind.as_str())));
        }
        if current.iter().any(|(k, l)| *k == p.kind && **l == p.label) {
            return Err((
                i,
                RotationError::SameAsCurrent(p.label.to_string(), p.kind.as_str()),
            ));
        }
        if previous[..i].iter().any(|q| q.label == p.label) {
            return Err((i, RotationError::Duplicate(p.label.to_string())));
        }
    }
    Ok(())
}

/// How one programme uses one key, for key listings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyUsage {
    /// The programme's name.
    pub programme: String,
    /// The kind the programme uses the key as.
    pub kind: KeyKind,
    /// Current or previous.
    pub role: KeyRole,
    /// For a previous key, the end of its grace period (Unix ms, exclusive).
    pub accept_until_ms: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Tdcvv2Profile;
    use crate::domain::programme::{Programme, Programmes};

    fn label(s: &str) -> KeyLabel {
        s.parse().unwrap()
    }

    fn prev(kind: KeyKind, l: &str, until: u64) -> PreviousKey {
        PreviousKey {
            kind,
            label: label(l),
            accept_until_ms: until,
        }
    }

    #[test]
    fn the_grace_period_ends_exclusively_at_accept_until() {
        let p = prev(KeyKind::Cvk, "cvk-v1", 1_000_000);
        assert!(p.accepts_at(0));
        assert!(p.accepts_at(999_999));
        assert!(!p.accepts_at(1_000_000), "accept_until itself declines");
        assert!(!p.accepts_at(1_000_001));
    }

    #[test]
    fn candidates_are_current_first_then_previous_of_the_kind_in_grace() {
        let previous = [
            prev(KeyKind::ImkTdcvv2, "imk-t-v2", 5_000),
            prev(KeyKind::Cvk, "cvk-v1", 5_000),
            prev(KeyKind::ImkTdcvv2, "imk-t-v1", 2_000),
        ];
        let names = |now| {
            let c = candidates(&label("imk-t-v3"), KeyKind::ImkTdcvv2, &previous, now);
            std::iter::once(c.current)
                .chain(c.previous)
                .map(|c| (c.label.to_string(), c.role))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            names(1_999),
            vec![
                ("imk-t-v3".into(), KeyRole::Current),
                ("imk-t-v2".into(), KeyRole::Previous),
                ("imk-t-v1".into(), KeyRole::Previous),
            ]
        );
        assert_eq!(
            names(2_000),
            vec![
                ("imk-t-v3".into(), KeyRole::Current),
                ("imk-t-v2".into(), KeyRole::Previous),
            ]
        );
        assert_eq!(names(5_000), vec![("imk-t-v3".into(), KeyRole::Current)]);
        // A CVK verification never tries an IMK.
        let cvks = candidates(&label("cvk-v2"), KeyKind::Cvk, &previous, 0);
        assert_eq!(cvks.previous.len(), 1);
        assert_eq!(cvks.previous[0].label, label("cvk-v1"));
    }

    #[test]
    fn first_match_stops_at_the_first_matching_key() {
        let previous = [
            prev(KeyKind::Cvk, "cvk-v2", 10),
            prev(KeyKind::Cvk, "cvk-v1", 10),
        ];
        let all = candidates(&label("cvk-v3"), KeyKind::Cvk, &previous, 0);
        let mut tried = Vec::new();
        let found = first_match(&all, |l| {
            tried.push(l.to_string());
            Ok::<_, ()>(((l.as_str() == "cvk-v2").then_some(7), format!("kcv-{l}")))
        })
        .unwrap();
        assert_eq!(tried, ["cvk-v3", "cvk-v2"], "cvk-v1 is not tried");
        assert_eq!(found.matched, Some(7));
        assert_eq!(found.key.label, label("cvk-v2"));
        assert_eq!(found.key.role, KeyRole::Previous);
        assert_eq!(found.check_value, "kcv-cvk-v2");

        // The current key matching tries nothing else.
        let mut count = 0;
        let found = first_match(&all, |_| {
            count += 1;
            Ok::<_, ()>((Some(()), 0))
        })
        .unwrap();
        assert_eq!((count, found.key.role), (1, KeyRole::Current));
    }

    #[test]
    fn no_match_names_the_current_key_and_errors_stop_the_search() {
        let previous = [prev(KeyKind::Cvk, "cvk-v1", 10)];
        let all = candidates(&label("cvk-v2"), KeyKind::Cvk, &previous, 0);
        let none = first_match(&all, |l| Ok::<_, ()>((None::<()>, l.to_string()))).unwrap();
        assert!(none.matched.is_none());
        assert_eq!(none.key.role, KeyRole::Current);
        assert_eq!(none.check_value, "cvk-v2");

        let failed = first_match(&all, |l| {
            if l.as_str() == "cvk-v1" {
                Err("gone")
            } else {
                Ok((None::<()>, ()))
            }
        });
        assert_eq!(failed.unwrap_err(), "gone");
    }

    #[test]
    fn kinds_and_labels_are_validated() {
        assert_eq!(rotating_kind("cvk"), Ok(KeyKind::Cvk));
        assert_eq!(rotating_kind("imk-tdcvv2"), Ok(KeyKind::ImkTdcvv2));
        assert!(matches!(
            rotating_kind("pan-index"),
            Err(RotationError::KindNotUsed(_))
        ));
        assert!(rotating_kind("CVK").is_err());

        let (cvk, imk) = (label("cvk-v2"), label("imk-v2"));
        let current = [(KeyKind::Cvk, &cvk), (KeyKind::ImkDcvv, &imk)];
        assert!(validate(&current, &[prev(KeyKind::Cvk, "cvk-v1", 1)]).is_ok());
        assert_eq!(
            validate(
                &current,
                &[
                    prev(KeyKind::Cvk, "cvk-v1", 1),
                    prev(KeyKind::Cvk, "cvk-v2", 1)
                ]
            ),
            Err((1, RotationError::SameAsCurrent("cvk-v2".into(), "cvk")))
        );
        assert_eq!(
            validate(
                &current,
                &[
                    prev(KeyKind::Cvk, "cvk-v1", 1),
                    prev(KeyKind::Cvk, "cvk-v1", 2)
                ]
            ),
            Err((1, RotationError::Duplicate("cvk-v1".into())))
        );
    }

    #[test]
    fn usages_list_current_and_previous_roles_per_programme() {
        let programme = |name: &str, prefix: &str, cvk: &str, previous| Programme {
            name: name.into(),
            bin_prefixes: vec![prefix.into()],
            key_association: None,
            cvk: label(cvk),
            imk_dcvv: label(&format!("imk-dcvv-{name}-v1")),
            imk_tdcvv2: label(&format!("imk-tdcvv2-{name}-v1")),
            imk_ac: None,
            imk_cvc3: None,
            profile: Tdcvv2Profile::new(300, 1, 0).unwrap(),
            single_use: true,
            failure_limit: None,
            failure_period_seconds: 86_400,
            previous,
        };
        let list = Programmes::new(vec![
            programme(
                "a",
                "4",
                "cvk-v2",
                vec![prev(KeyKind::Cvk, "cvk-v1", 9_000)],
            ),
            programme("b", "5", "cvk-v1", vec![]),
        ])
        .unwrap();
        let usages = list.key_usages();
        let v1 = &usages["cvk-v1"];
        assert_eq!(v1.len(), 2);
        assert_eq!(
            (v1[0].programme.as_str(), v1[0].role, v1[0].accept_until_ms),
            ("a", KeyRole::Previous, Some(9_000))
        );
        assert_eq!(
            (v1[1].programme.as_str(), v1[1].role, v1[1].accept_until_ms),
            ("b", KeyRole::Current, None)
        );
        assert_eq!(usages["cvk-v2"][0].role, KeyRole::Current);
        assert_eq!(usages["imk-tdcvv2-a-v1"][0].kind, KeyKind::ImkTdcvv2);
        assert!(!usages.contains_key("pan-index-v1"));
    }
}
