//! The card service: every business rule of DESIGN 2.4 and 4 in one place.
//! Which programme a card belongs to, whether the caller may touch it, when a
//! card is expired, enrolment, the dynamic-or-static choice at authorization,
//! single use and the failure limit, and replay refusal.
//!
//! A request crosses to each of its collaborators once (issue 9):
//! - **one token hop**: all keyed work of a request (the PAN-index HMAC, the
//!   enrolment lookup a CVV2 check needs to choose its code, the code) runs in
//!   one call on the blocking pool through [`crate::hsm::blocking`], never on a
//!   runtime worker;
//! - **one store hop**: every state change of the request, together with its
//!   request id, is one [`Store::transact`] closure, run *after* the token work
//!   succeeded, so a failed or refused request changes nothing (DESIGN 7.3) and
//!   a request id is only spent on a request that was carried out. The claim
//!   of the request id in that transaction is the one replay check: a replay
//!   costs its token work and then gets 409 with nothing changed.
//! - **a record first**: before that transaction may commit, a change record
//!   is durable in the audit trail ([`journal`](super::journal)); it is sent
//!   before the token work, so its fsync overlaps that work; when the
//!   transaction does not commit (or never runs), a compensating record says so. A trail that cannot take the
//!   record refuses the change (503 `audit_unavailable`), so the trail never
//!   misses a change, even when it fails while a request is running.
//!
//! No HTTP types here.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use zeroize::Zeroizing;

use crate::hsm::{self, CardCrypto, HsmError, Kcv, KeyKind, KeyLabel};
use crate::store::{CardId, Enrollment, Store, StoreError, StoreTx};

use super::card::{Atc, CodeLength, Expiry, Pan, Psn, SecurityCode, ServiceCode};
use super::emv::{self, ArqcInput};
use super::engine::{Engine, StaticCodeKind, WindowCode};
use super::journal::{ChangeJournal, ChangePhase, ChangeRecord};
use super::programme::{Programme, Programmes};
use super::rotation::{self, KeyRole};
use super::{Cause, Dependency, DomainError};

/// Domain separation of the PAN-index HMAC input (DESIGN 6: the store keys
/// cards by a keyed hash of the PAN, never the PAN).
const PAN_INDEX_CONTEXT: &[u8] = b"dcvv-gateway/pan-index/v1\n";

/// Time source, injectable so tests can stand on a window boundary.
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// Unix epoch milliseconds, UTC.
    fn now_ms(&self) -> u64;
}

/// The system's clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }
}

/// Told about every token call the service makes, and about verifications
/// approved with a previous key version (metrics).
pub trait HsmObserver: Send + Sync + std::fmt::Debug {
    /// One call: its operation name, how long it took, whether it succeeded.
    fn hsm_call(&self, operation: &'static str, elapsed: Duration, ok: bool);

    /// A verification of the programme's card was approved with a previous key
    /// version (key rotation): operators watch this fall to zero before the
    /// grace period ends.
    fn previous_key_match(&self, _programme: &str) {}
}

/// An observer that does nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoObserver;

impl HsmObserver for NoObserver {
    fn hsm_call(&self, _: &'static str, _: Duration, _: bool) {}
}

/// The programmes a client may touch.
#[derive(Debug, Clone)]
pub enum ProgrammeAccess {
    /// Every programme.
    All,
    /// Only these, by name.
    Only(HashSet<String>),
}

impl ProgrammeAccess {
    fn allows(&self, programme: &str) -> bool {
        match self {
            ProgrammeAccess::All => true,
            ProgrammeAccess::Only(names) => names.contains(programme),
        }
    }
}

/// Who is asking, as authenticated by the HTTP layer.
#[derive(Debug, Clone, Copy)]
pub struct Caller<'a> {
    /// Client id (`apikey`).
    pub client: &'a str,
    /// The client's request id, unique per request.
    pub request_id: &'a str,
    /// Programmes the client may touch.
    pub access: &'a ProgrammeAccess,
    /// The programmes as configured when the request began (a reload
    /// replaces them for later requests only).
    pub programmes: &'a Programmes,
}

/// The card fields common to every card request (DESIGN 4).
#[derive(Debug, Clone)]
pub struct CardData {
    /// PAN, Luhn-checked at the edge.
    pub pan: Pan,
    /// Expiry `YYMM`.
    pub expiry: Expiry,
    /// PAN sequence number (`00` when absent).
    pub psn: Psn,
    /// Optional programme selector.
    pub key_association: Option<String>,
}

/// What every card operation reports, for the response and the audit trail.
#[derive(Debug, Clone)]
pub struct CardContext {
    /// `412345******2345`.
    pub masked_pan: String,
    /// The programme's name.
    pub programme: String,
}

/// The key a result was computed under.
#[derive(Debug, Clone)]
pub struct KeyUse {
    /// Its label (carries the version).
    pub label: KeyLabel,
    /// Its KCV.
    pub kcv: Kcv,
}

/// `numberOfValues` after parsing: 1 to 24.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ValueCount(u8);

impl TryFrom<u32> for ValueCount {
    type Error = DomainError;

    fn try_from(n: u32) -> Result<Self, DomainError> {
        u8::try_from(n)
            .ok()
            .filter(|n| (1..=super::engine::MAX_VALUES).contains(n))
            .map(ValueCount)
            .ok_or(DomainError::Invalid {
                field: "numberOfValues",
                reason: "must be 1 to 24",
            })
    }
}

/// Dynamic values handed to the card-management system.
#[derive(Debug)]
pub struct GeneratedValues {
    /// Card and programme.
    pub card: CardContext,
    /// When the values were computed, epoch milliseconds.
    pub generated_at_ms: u64,
    /// The values, first one current.
    pub values: Vec<WindowCode>,
    /// The IMK-TDCVV2 used.
    pub key: KeyUse,
    /// Whether this call enrolled the card.
    pub newly_enrolled: bool,
}

/// Enrolment state after an enrol, unenrol or enquiry.
#[derive(Debug, Clone)]
pub struct EnrollmentStatus {
    /// Card and programme.
    pub card: CardContext,
    /// Enrolled now?
    pub enrolled: bool,
    /// Did this call change it?
    pub changed: bool,
    /// When it was enrolled, epoch seconds.
    pub enrolled_at: Option<i64>,
}

/// How a code was checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// TDCVV2-v1 (enrolled card).
    Dynamic,
    /// Static CVV2 (card not enrolled).
    Static,
    /// Contactless dCVV.
    Dcvv,
    /// Mastercard contactless CVC3.
    Cvc3,
    /// EMV application cryptogram (ARQC).
    Arqc,
}

/// Why a code was declined, or `Match`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// The code is right.
    Match,
    /// The code is wrong.
    Mismatch,
    /// The static CVV2 of an enrolled card.
    StaticCvv2Disabled,
    /// Single use: this window's code was already accepted for this card.
    CodeAlreadyUsed,
    /// The failure limit of the programme is reached.
    TooManyFailures,
}

impl Reason {
    /// Approved only on `Match`.
    pub fn approved(self) -> bool {
        self == Reason::Match
    }
}

/// The business result of a verification (a decline is not an error).
#[derive(Debug, Clone)]
pub struct Verification {
    /// Card and programme.
    pub card: CardContext,
    /// Outcome.
    pub reason: Reason,
    /// How it was checked.
    pub method: Method,
    /// The key that matched (a previous version during a rotation), or the
    /// current key when none did.
    pub key: KeyUse,
    /// Whether `key` is the programme's current key or a previous version.
    pub key_role: KeyRole,
}

/// The result of an ARQC verification: the verification, and the ARPC when it
/// was asked and the ARQC matched.
pub struct ArqcVerification {
    /// Outcome, card, key.
    pub verification: Verification,
    /// ARPC (8 bytes by method 1, 4 by method 2).
    pub arpc: Option<Zeroizing<Vec<u8>>>,
}

/// Shows whether there is an ARPC, never its value.
impl std::fmt::Debug for ArqcVerification {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ArqcVerification")
            .field("verification", &self.verification)
            .field("arpc", &self.arpc.is_some())
            .finish()
    }
}

/// A static code for embossing.
#[derive(Debug)]
pub struct StaticCode {
    /// Card and programme.
    pub card: CardContext,
    /// The code.
    pub code: SecurityCode,
    /// The CVK used.
    pub key: KeyUse,
}

/// What the service needs besides its collaborators.
#[derive(Debug, Clone)]
pub struct ServiceSettings {
    /// The PAN-index HMAC key.
    pub pan_index_key: KeyLabel,
    /// How long a request id is remembered (DESIGN 5: 15 minutes).
    pub replay_window_seconds: u32,
}

/// The card service.
#[derive(Debug)]
pub struct CardService<H> {
    engine: Arc<Engine<H>>,
    store: Store,
    settings: ServiceSettings,
    clock: Arc<dyn Clock>,
    observer: Arc<dyn HsmObserver>,
    journal: Arc<dyn ChangeJournal>,
}

/// What a [`CardService`] works with besides its token.
#[derive(Debug, Clone)]
pub struct ServiceParts {
    /// The store.
    pub store: Store,
    /// Its settings.
    pub settings: ServiceSettings,
    /// Its clock.
    pub clock: Arc<dyn Clock>,
    /// Told about every token call.
    pub observer: Arc<dyn HsmObserver>,
    /// Where change records go before a commit (the audit trail).
    pub journal: Arc<dyn ChangeJournal>,
}

impl<H: CardCrypto + Send + Sync + 'static> CardService<H> {
    /// A service over an HSM port and its parts.
    pub fn new(hsm: H, parts: ServiceParts) -> Self {
        let ServiceParts {
            store,
            settings,
            clock,
            observer,
            journal,
        } = parts;
        CardService {
            engine: Arc::new(Engine::new(hsm)),
            store,
            settings,
            clock,
            observer,
            journal,
        }
    }

    /// The engine, over the token.
    pub(super) fn engine(&self) -> &Engine<H> {
        &self.engine
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The clock.
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    /// Labels of every key the service uses now under `programmes`: the
    /// PAN-index key, each programme's current keys, and previous keys still
    /// in their grace period.
    pub fn keys_in_use(&self, programmes: &Programmes) -> HashSet<String> {
        let now_ms = self.now_ms();
        let mut labels = HashSet::from([self.settings.pan_index_key.to_string()]);
        for p in programmes.iter() {
            labels.extend(p.key_labels().map(ToString::to_string));
            labels.extend(
                p.previous
                    .iter()
                    .filter(|k| k.accepts_at(now_ms))
                    .map(|k| k.label.to_string()),
            );
        }
        labels
    }

    /// Spends a request id for a request that changes no card state (key
    /// inventory, static codes, the contactless and EMV checks), under the
    /// change record `announced` before its token work.
    ///
    /// # Errors
    /// `DuplicateRequest`, `Unavailable` (store or audit trail).
    pub async fn record_request(
        &self,
        caller: &Caller<'_>,
        announced: Announced,
    ) -> Result<(), DomainError> {
        let claim = self.claim(caller);
        self.commit(announced, move |tx| {
            claim.apply(tx).map_err(DomainError::from)
        })
        .await
    }

    /// Sends the `before_commit` record of a request that is going to
    /// change the store, before its token work, so that the record's fsync
    /// overlaps that work; the transaction waits for it.
    pub fn announce(
        &self,
        caller: &Caller<'_>,
        operation: &'static str,
        card: Option<(&Pan, &Programme)>,
    ) -> Announced {
        let change = ChangeRecord {
            time_ms: self.now_ms(),
            request_id: caller.request_id.to_owned(),
            client: caller.client.to_owned(),
            operation,
            masked_pan: card.map(|(pan, _)| pan.masked()),
            programme: card.map(|(_, p)| p.name.clone()),
            phase: ChangePhase::BeforeCommit,
        };
        Announced {
            durable: Some(self.journal.record(change.clone())),
            change,
            journal: Arc::clone(&self.journal),
        }
    }

    /// The one way the service changes the store: the `announced` record
    /// durable first, then the transaction; when it does not commit, a
    /// compensating record (`rolled_back`, or `commit_failed` when the work
    /// was done and the commit itself failed).
    ///
    /// # Errors
    /// `Unavailable(Audit)` before anything ran when the journal cannot take
    /// the record; otherwise the transaction's own error.
    async fn commit<T, E, F>(&self, mut announced: Announced, work: F) -> Result<T, E>
    where
        F: FnOnce(&mut StoreTx<'_>) -> Result<T, E> + Send + 'static,
        T: Send + 'static,
        E: From<StoreError> + From<DomainError> + Send + 'static,
    {
        let change = announced.change.clone();
        if let Some(durable) = announced.durable.take()
            && let Err(e) = durable.await
        {
            return Err(DomainError::Unavailable(Dependency::Audit, Cause::Audit(e)).into());
        }
        let worked = Arc::new(AtomicBool::new(false));
        let done = Arc::clone(&worked);
        let result = self
            .store
            .transact(move |tx| {
                let result = work(tx);
                done.store(result.is_ok(), Ordering::Release);
                result
            })
            .await;
        if result.is_err() {
            let phase = if worked.load(Ordering::Acquire) {
                ChangePhase::CommitFailed
            } else {
                ChangePhase::RolledBack
            };
            let request_id = change.request_id.clone();
            let compensating = ChangeRecord { phase, ..change };
            if let Err(e) = self.journal.record(compensating).await {
                // The trail keeps the `before_commit` record: it over-reports,
                // never under-reports.
                tracing::warn!(%request_id, phase = phase.as_str(), error = %e, "compensating audit record not durable");
            }
        }
        result
    }

    /// Checks that every key the service uses is present and within its
    /// policy: the PAN-index key, each programme's keys, and previous key
    /// versions still in their grace period (start-up, readiness). A previous
    /// key whose grace period has ended is not checked: it may be destroyed.
    ///
    /// # Errors
    /// The first key's error.
    pub async fn check_keys(&self, programmes: &Programmes) -> Result<(), DomainError> {
        let now_ms = self.now_ms();
        let mut wanted = vec![(self.settings.pan_index_key.clone(), KeyKind::PanIndex)];
        for p in programmes.iter() {
            wanted.extend(
                p.current_keys()
                    .into_iter()
                    .map(|(kind, label)| (label.clone(), kind)),
            );
            wanted.extend(
                p.previous
                    .iter()
                    .filter(|k| k.accepts_at(now_ms))
                    .map(|k| (k.label.clone(), k.kind)),
            );
        }
        self.on_token("key_check", move |engine| {
            for (label, kind) in &wanted {
                engine.hsm().key_check_value(label, *kind)?;
            }
            Ok(())
        })
        .await
    }

    /// Runs `work` on the blocking pool, timed for the observer.
    async fn on_token<R, F>(&self, operation: &'static str, work: F) -> Result<R, DomainError>
    where
        R: Send + 'static,
        F: FnOnce(&Engine<H>) -> Result<R, DomainError> + Send + 'static,
    {
        let engine = Arc::clone(&self.engine);
        let started = Instant::now();
        let result = hsm::blocking(move || Ok(work(&engine))).await;
        let result = match result {
            Ok(inner) => inner,
            Err(e) => Err(DomainError::from(e)),
        };
        self.observer.hsm_call(
            operation,
            started.elapsed(),
            !result.as_ref().is_err_and(DomainError::is_token_failure),
        );
        result
    }

    fn now_ms(&self) -> u64 {
        self.clock.now_ms()
    }

    fn now_seconds(&self) -> i64 {
        i64::try_from(self.now_ms() / 1000).unwrap_or(i64::MAX)
    }

    /// Programme, access and expiry: the checks every card request passes before
    /// any token or store work.
    fn admit(
        &self,
        caller: &Caller<'_>,
        card: &CardData,
        reject_expired: bool,
    ) -> Result<Programme, DomainError> {
        let programme = self.programme_of(caller, &card.pan, card.key_association.as_deref())?;
        if reject_expired && is_expired(card.expiry, self.now_ms()) {
            return Err(DomainError::CardExpired);
        }
        Ok(programme)
    }

    /// The card's programme, if the caller may use it.
    fn programme_of(
        &self,
        caller: &Caller<'_>,
        pan: &Pan,
        key_association: Option<&str>,
    ) -> Result<Programme, DomainError> {
        let programme = caller
            .programmes
            .resolve(pan, key_association)
            .ok_or(DomainError::UnknownProgramme)?;
        if !caller.access.allows(&programme.name) {
            return Err(DomainError::ProgrammeNotAllowed);
        }
        Ok(programme.clone())
    }

    /// The keys a verification of `kind` tries under `programme` ([`rotation`]),
    /// or `NotConfigured` when the programme has no key of that kind.
    fn verification_keys(
        &self,
        programme: &Programme,
        kind: KeyKind,
    ) -> Result<rotation::Candidates, DomainError> {
        let current = programme
            .current_key(kind)
            .ok_or(DomainError::NotConfigured(kind))?;
        Ok(rotation::candidates(
            current,
            kind,
            &programme.previous,
            self.now_ms(),
        ))
    }

    /// The verification answer of a tried set of keys, counted for the metrics.
    fn verdict<T>(
        &self,
        programme: &Programme,
        context: CardContext,
        method: Method,
        tried: rotation::Tried<T, Kcv>,
    ) -> (Verification, Option<T>) {
        let reason = if tried.matched.is_some() {
            Reason::Match
        } else {
            Reason::Mismatch
        };
        self.count_previous_match(programme, reason, tried.key.role);
        let verification = Verification {
            card: context,
            reason,
            method,
            key: KeyUse {
                label: tried.key.label,
                kcv: tried.check_value,
            },
            key_role: tried.key.role,
        };
        (verification, tried.matched)
    }

    /// The request-id claim of a request, made in its one transaction.
    fn claim(&self, caller: &Caller<'_>) -> Claim {
        let now = self.now_seconds();
        Claim {
            client: caller.client.to_owned(),
            request_id: caller.request_id.to_owned(),
            now,
            expires_at: now + i64::from(self.settings.replay_window_seconds),
        }
    }

    fn context(card: &CardData, programme: &Programme) -> CardContext {
        CardContext {
            masked_pan: card.pan.masked(),
            programme: programme.name.clone(),
        }
    }

    /// `POST /cards/pin/dynamic-values`: `count` TDCVV2-v1 values from the
    /// current window on; enrols the card if it was not (DESIGN 2.4, 4).
    ///
    /// # Errors
    /// `UnknownProgramme`, `ProgrammeNotAllowed`, `CardExpired`,
    /// `DuplicateRequest`, `Hsm`, `Store`.
    pub async fn dynamic_values(
        &self,
        caller: &Caller<'_>,
        card: &CardData,
        count: ValueCount,
    ) -> Result<GeneratedValues, DomainError> {
        let programme = self.admit(caller, card, true)?;
        let announced = self.announce(caller, "dynamic_values", Some((&card.pan, &programme)));
        let now_ms = self.now_ms();
        let (index_key, imk, pan, expiry, profile) = (
            self.settings.pan_index_key.clone(),
            programme.imk_tdcvv2.clone(),
            card.pan.clone(),
            card.expiry,
            programme.profile,
        );
        let (card_id, (values, kcv)) = self
            .on_token("tdcvv2_generate", move |engine| {
                let card_id = pan_index(engine, &index_key, &pan)?;
                let generated =
                    engine.tdcvv2_generate(&imk, &pan, expiry, profile, now_ms / 1000, count.0)?;
                Ok((card_id, generated))
            })
            .await?;
        let claim = self.claim(caller);
        let enrollment = Enrollment {
            programme: programme.name.clone(),
            masked_pan: card.pan.masked(),
            enrolled_at: claim.now,
        };
        let newly_enrolled = self
            .commit(announced, move |tx| {
                claim.apply(tx)?;
                Ok::<_, DomainError>(enroll(tx, &card_id, &enrollment)?)
            })
            .await?;
        Ok(GeneratedValues {
            card: Self::context(card, &programme),
            generated_at_ms: now_ms,
            values,
            key: KeyUse {
                label: programme.imk_tdcvv2.clone(),
                kcv,
            },
            newly_enrolled,
        })
    }

    /// Enrols (`true`) or unenrols (`false`) a card; idempotent.
    ///
    /// # Errors
    /// As [`CardService::dynamic_values`].
    pub async fn set_enrollment(
        &self,
        caller: &Caller<'_>,
        card: &CardData,
        enrol: bool,
    ) -> Result<EnrollmentStatus, DomainError> {
        let programme = self.admit(caller, card, enrol)?;
        let operation = if enrol { "enrollment" } else { "unenrollment" };
        let announced = self.announce(caller, operation, Some((&card.pan, &programme)));
        let card_id = self.card_id(&card.pan).await?;
        let claim = self.claim(caller);
        let enrollment = Enrollment {
            programme: programme.name.clone(),
            masked_pan: card.pan.masked(),
            enrolled_at: claim.now,
        };
        let (changed, enrolled_at) = self
            .commit(announced, move |tx| {
                claim.apply(tx)?;
                let changed = if enrol {
                    enroll(tx, &card_id, &enrollment)?
                } else {
                    tx.unenroll(&card_id)?
                };
                let enrolled_at = tx.enrollment(&card_id)?.map(|e| e.enrolled_at);
                Ok::<_, DomainError>((changed, enrolled_at))
            })
            .await?;
        Ok(EnrollmentStatus {
            card: Self::context(card, &programme),
            enrolled: enrol,
            changed,
            enrolled_at,
        })
    }

    /// Is the card enrolled?
    ///
    /// # Errors
    /// As [`CardService::dynamic_values`], except `CardExpired`.
    pub async fn enquiry(
        &self,
        caller: &Caller<'_>,
        card: &CardData,
    ) -> Result<EnrollmentStatus, DomainError> {
        let programme = self.admit(caller, card, false)?;
        let announced = self.announce(caller, "enquiry", Some((&card.pan, &programme)));
        let card_id = self.card_id(&card.pan).await?;
        let claim = self.claim(caller);
        let enrollment = self
            .commit(announced, move |tx| {
                claim.apply(tx)?;
                Ok::<_, DomainError>(tx.enrollment(&card_id)?)
            })
            .await?;
        Ok(EnrollmentStatus {
            card: Self::context(card, &programme),
            enrolled: enrollment.is_some(),
            changed: false,
            enrolled_at: enrollment.map(|e| e.enrolled_at),
        })
    }

    /// The card's PAN-index key id, computed in the token.
    async fn card_id(&self, pan: &Pan) -> Result<CardId, DomainError> {
        let (label, pan) = (self.settings.pan_index_key.clone(), pan.clone());
        self.on_token("pan_index", move |engine| pan_index(engine, &label, &pan))
            .await
    }

    /// Authorization-time CVV2 check: the dynamic rules for an enrolled card
    /// (windows, single use, failure limit; its static CVV2 is declined), the
    /// static CVV2 otherwise (DESIGN 2.4, 4, 7.5). Each check tries the current
    /// key, then previous versions in their grace period ([`rotation`]); it is
    /// one attempt for the failure limit however many keys it tried.
    ///
    /// Two hops: one blocking call does the token work (the PAN-index HMAC, the
    /// enrolment lookup that decides which code to check, the code), then one
    /// store transaction applies the rules and spends the request id. The
    /// transaction checks that the enrolment is still what the token work saw;
    /// if an enrolment or unenrolment landed in between, the check is made again
    /// (the last attempt goes by the transaction's own view).
    ///
    /// # Errors
    /// As [`CardService::dynamic_values`]. A decline is `Ok`.
    pub async fn verify_cvv2(
        &self,
        caller: &Caller<'_>,
        card: &CardData,
        cvv2: SecurityCode,
    ) -> Result<Verification, DomainError> {
        let programme = self.admit(caller, card, true)?;
        let context = Self::context(card, &programme);
        let rules = CardRules::of(&programme);
        let mut attempt = 1;
        loop {
            let announced =
                self.announce(caller, "cvv2_verification", Some((&card.pan, &programme)));
            let checked = self.check_cvv2(&programme, card, &cvv2).await?;
            let claim = self.claim(caller);
            let card_id = checked.card_id;
            let (enrolled, matched, is_static) =
                (checked.enrolled, checked.matched, checked.is_static);
            let strict = attempt < STALE_ATTEMPTS;
            let outcome = self
                .commit(announced, move |tx| {
                    claim.apply(tx)?;
                    let now_enrolled = tx.enrollment(&card_id)?.is_some();
                    if now_enrolled != enrolled && strict {
                        return Err(TxError::Stale);
                    }
                    if !enrolled {
                        return Ok(if matched.is_some() {
                            Reason::Match
                        } else {
                            Reason::Mismatch
                        });
                    }
                    tx.lock_card(&card_id)?; // count-then-record below, also across instances
                    Ok(rules.apply(tx, &card_id, claim.now, matched, is_static)?)
                })
                .await;
            let reason = match outcome {
                Ok(reason) => reason,
                Err(TxError::Stale) => {
                    attempt += 1;
                    continue;
                }
                Err(TxError::Domain(e)) => return Err(e),
            };
            self.count_previous_match(&programme, reason, checked.key.role);
            let method = if !enrolled || reason == Reason::StaticCvv2Disabled {
                Method::Static
            } else {
                Method::Dynamic
            };
            return Ok(Verification {
                card: context,
                reason,
                method,
                key: KeyUse {
                    label: checked.key.label,
                    kcv: checked.check_value,
                },
                key_role: checked.key.role,
            });
        }
    }

    /// The token work of a CVV2 check, in one blocking call: the card's id,
    /// its enrolment as last committed, and the code under the matching rules
    /// (the dynamic code of an enrolled card, with the static CVV2 to name a
    /// decline; the static CVV2 otherwise).
    async fn check_cvv2(
        &self,
        programme: &Programme,
        card: &CardData,
        cvv2: &SecurityCode,
    ) -> Result<Cvv2Check, DomainError> {
        let now_ms = self.now_ms();
        // Current key first, then previous versions in their grace period (rotation).
        let cvks = rotation::candidates(&programme.cvk, KeyKind::Cvk, &programme.previous, now_ms);
        let imks = rotation::candidates(
            &programme.imk_tdcvv2,
            KeyKind::ImkTdcvv2,
            &programme.previous,
            now_ms,
        );
        let (store, index_key) = (self.store.clone(), self.settings.pan_index_key.clone());
        let (pan, expiry, profile, candidate) = (
            card.pan.clone(),
            card.expiry,
            programme.profile,
            cvv2.clone(),
        );
        self.on_token("cvv2_verify", move |engine| {
            let card_id = pan_index(engine, &index_key, &pan)?;
            if store.enrollment_blocking(&card_id)?.is_none() {
                let tried = static_cvv2_match(engine, &cvks, &pan, expiry, &candidate)?;
                return Ok(Cvv2Check {
                    card_id,
                    enrolled: false,
                    matched: tried.matched.map(|()| 0),
                    is_static: tried.matched.is_some(),
                    key: tried.key,
                    check_value: tried.check_value,
                });
            }
            let tried = rotation::first_match(&imks, |imk| {
                let kcv = engine.hsm().key_check_value(imk, KeyKind::ImkTdcvv2)?;
                let matched =
                    engine.tdcvv2_verify(imk, &pan, expiry, profile, now_ms / 1000, &candidate)?;
                Ok::<_, DomainError>((matched, kcv))
            })?;
            // Only a mismatch needs the static CVV2, to name the decline.
            let is_static = match tried.matched {
                Some(_) => false,
                None => static_cvv2_match(engine, &cvks, &pan, expiry, &candidate)?
                    .matched
                    .is_some(),
            };
            Ok(Cvv2Check {
                card_id,
                enrolled: true,
                matched: tried.matched,
                is_static,
                key: tried.key,
                check_value: tried.check_value,
            })
        })
        .await
    }

    /// Counts an approval with a previous key version (metrics).
    fn count_previous_match(&self, programme: &Programme, reason: Reason, role: KeyRole) {
        if reason.approved() && role == KeyRole::Previous {
            self.observer.previous_key_match(&programme.name);
        }
    }

    /// Static CVV / CVV2 / iCVV for embossing (DESIGN 2.1).
    ///
    /// # Errors
    /// As [`CardService::dynamic_values`].
    pub async fn security_code(
        &self,
        caller: &Caller<'_>,
        card: &CardData,
        kind: StaticCodeKind,
        digits: CodeLength,
    ) -> Result<StaticCode, DomainError> {
        let programme = self.admit(caller, card, true)?;
        let announced = self.announce(caller, "security_code", Some((&card.pan, &programme)));
        let (cvk, pan, expiry) = (programme.cvk.clone(), card.pan.clone(), card.expiry);
        let issued = self
            .on_token("static_code", move |engine| {
                engine.static_code(&cvk, &pan, expiry, kind, digits)
            })
            .await?;
        self.record_request(caller, announced).await?;
        Ok(StaticCode {
            card: Self::context(card, &programme),
            code: issued.code,
            key: KeyUse {
                label: programme.cvk.clone(),
                kcv: issued.kcv,
            },
        })
    }

    /// Contactless dCVV check (DESIGN 2.3), under the current IMK-dCVV, then
    /// previous versions in their grace period ([`rotation`]).
    ///
    /// # Errors
    /// As [`CardService::dynamic_values`]. A decline is `Ok`.
    pub async fn verify_dcvv(
        &self,
        caller: &Caller<'_>,
        card: &CardData,
        service_code: ServiceCode,
        atc: Atc,
        dcvv: SecurityCode,
    ) -> Result<Verification, DomainError> {
        let programme = self.admit(caller, card, true)?;
        let imks = self.verification_keys(&programme, KeyKind::ImkDcvv)?;
        let announced = self.announce(caller, "dcvv_verification", Some((&card.pan, &programme)));
        let (pan, expiry) = (card.pan.clone(), card.expiry);
        let tried = self
            .on_token("dcvv_verify", move |engine| {
                rotation::first_match(&imks, |imk| {
                    let issued = engine.dcvv(imk, &pan, expiry, service_code, atc)?;
                    Ok::<_, DomainError>((issued.code.matches(&dcvv).then_some(()), issued.kcv))
                })
            })
            .await?;
        self.record_request(caller, announced).await?;
        let (verification, _) = self.verdict(
            &programme,
            Self::context(card, &programme),
            Method::Dcvv,
            tried,
        );
        Ok(verification)
    }

    /// Mastercard contactless CVC3 check (DESIGN 2.6), under the current
    /// IMK-CVC3, then previous versions in their grace period.
    ///
    /// # Errors
    /// `NotConfigured` when the programme has no IMK-CVC3; otherwise as
    /// [`CardService::dynamic_values`]. A decline is `Ok`.
    pub async fn verify_cvc3(
        &self,
        caller: &Caller<'_>,
        card: &CardData,
        input: Cvc3Input,
    ) -> Result<Verification, DomainError> {
        let programme = self.admit(caller, card, true)?;
        let imks = self.verification_keys(&programme, KeyKind::ImkCvc3)?;
        let announced = self.announce(caller, "cvc3_verification", Some((&card.pan, &programme)));
        let (pan, psn) = (card.pan.clone(), card.psn);
        let tried = self
            .on_token("cvc3_verify", move |engine| {
                rotation::first_match(&imks, |imk| {
                    let (computed, kcv) = engine.cvc3(
                        imk,
                        &pan,
                        psn,
                        &input.track_data,
                        input.unpredictable_number,
                        input.atc,
                    )?;
                    let matched = emv::cvc3_matches(&computed, &input.cvc3);
                    Ok::<_, DomainError>((matched.then_some(()), kcv))
                })
            })
            .await?;
        self.record_request(caller, announced).await?;
        let (verification, _) = self.verdict(
            &programme,
            Self::context(card, &programme),
            Method::Cvc3,
            tried,
        );
        Ok(verification)
    }

    /// EMV ARQC check (DESIGN 2.7) under the current IMK-AC, then previous
    /// versions in their grace period; with the ARPC when asked and matched.
    /// The card has no expiry here: the PAN and PSN are key derivation data.
    ///
    /// # Errors
    /// `Invalid` for a field combination the cryptogram version does not
    /// allow; `NotConfigured` when the programme has no IMK-AC; otherwise as
    /// [`CardService::dynamic_values`]. A decline is `Ok`.
    pub async fn verify_arqc(
        &self,
        caller: &Caller<'_>,
        card: &EmvCard,
        input: ArqcInput,
    ) -> Result<ArqcVerification, DomainError> {
        input.check()?;
        let programme = self.programme_of(caller, &card.pan, card.key_association.as_deref())?;
        let imks = self.verification_keys(&programme, KeyKind::ImkAc)?;
        let announced = self.announce(caller, "arqc_verification", Some((&card.pan, &programme)));
        let (pan, psn) = (card.pan.clone(), card.psn);
        let tried = self
            .on_token("arqc_verify", move |engine| {
                rotation::first_match(&imks, |imk| {
                    let outcome = engine.arqc(imk, &pan, psn, &input)?;
                    Ok::<_, DomainError>((outcome.matched.then_some(outcome.arpc), outcome.kcv))
                })
            })
            .await?;
        self.record_request(caller, announced).await?;
        let context = CardContext {
            masked_pan: card.pan.masked(),
            programme: programme.name.clone(),
        };
        let (verification, arpc) = self.verdict(&programme, context, Method::Arqc, tried);
        Ok(ArqcVerification {
            verification,
            arpc: arpc.flatten(),
        })
    }
}

/// The card of an EMV cryptogram check: no expiry (the PAN and PSN derive the
/// card key; the cryptogram itself shows the card).
#[derive(Debug, Clone)]
pub struct EmvCard {
    /// PAN (no Luhn check: derivation data, as in payShield `KQ`).
    pub pan: Pan,
    /// PAN sequence number (`00` when absent).
    pub psn: Psn,
    /// Optional programme selector.
    pub key_association: Option<String>,
}

/// A CVC3 to check, parsed.
pub struct Cvc3Input {
    /// The track data the card MACs (track 2 equivalent data or track 1
    /// discretionary data, as the card's profile says).
    pub track_data: Zeroizing<Vec<u8>>,
    /// Unpredictable number, 4 bytes.
    pub unpredictable_number: [u8; 4],
    /// ATC, 2 bytes.
    pub atc: [u8; 2],
    /// The CVC3 read, 3–5 digits.
    pub cvc3: Zeroizing<String>,
}

/// Shows nothing: the track data and the CVC3 are card data.
impl std::fmt::Debug for Cvc3Input {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cvc3Input").finish_non_exhaustive()
    }
}

/// How many times a CVV2 check is made when an enrolment change lands between
/// its token work and its transaction (the last attempt is never refused).
const STALE_ATTEMPTS: u32 = 3;

/// A `before_commit` change record on its way to the journal
/// ([`CardService::announce`]). Dropped before its transaction ran (the token
/// work failed, or the request was refused), it sends the compensating
/// `rolled_back` record, without waiting: the trail may over-report a change,
/// never miss one.
pub struct Announced {
    change: ChangeRecord,
    durable: Option<super::journal::JournalFuture>,
    journal: Arc<dyn ChangeJournal>,
}

impl std::fmt::Debug for Announced {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Announced")
            .field("change", &self.change)
            .field("waited", &self.durable.is_none())
            .finish_non_exhaustive()
    }
}

impl Drop for Announced {
    fn drop(&mut self) {
        if self.durable.take().is_some() {
            let compensating = ChangeRecord {
                phase: ChangePhase::RolledBack,
                ..self.change.clone()
            };
            drop(self.journal.record(compensating));
        }
    }
}

/// The request-id claim of a request (DESIGN 5: replay), made in the request's
/// one transaction.
#[derive(Debug)]
struct Claim {
    client: String,
    request_id: String,
    now: i64,
    expires_at: i64,
}

impl Claim {
    fn apply(&self, tx: &mut StoreTx<'_>) -> Result<(), StoreError> {
        tx.claim_request(&self.client, &self.request_id, self.now, self.expires_at)
    }
}

/// Enrols the card if it is not; a new enrolment starts with no failures.
fn enroll(
    tx: &mut StoreTx<'_>,
    card: &CardId,
    enrollment: &Enrollment,
) -> Result<bool, StoreError> {
    let newly = tx.enroll(card, enrollment)?;
    if newly {
        tx.clear_failures(card)?;
    }
    Ok(newly)
}

/// The PAN-index id of a card: HMAC-SHA256 in the token (DESIGN 6).
fn pan_index<H: CardCrypto>(
    engine: &Engine<H>,
    label: &KeyLabel,
    pan: &Pan,
) -> Result<CardId, DomainError> {
    let mut input = zeroize::Zeroizing::new(PAN_INDEX_CONTEXT.to_vec());
    input.extend_from_slice(pan.digits().as_bytes());
    let digest = engine.hsm().hmac(label, KeyKind::PanIndex, &input)?;
    let bytes: [u8; 32] = digest[..].try_into().map_err(|_| {
        DomainError::from(HsmError::Wrapper(hsm::Malfunction::OutputLength {
            mechanism: hsm::Mechanism::Sha256Hmac,
            len: digest.len(),
        }))
    })?;
    Ok(CardId(bytes))
}

/// What the token work of a CVV2 check found.
#[derive(Debug)]
struct Cvv2Check {
    card_id: CardId,
    /// The card's enrolment as the token work saw it.
    enrolled: bool,
    /// The matching window (dynamic), or `Some(0)` for a static match.
    matched: Option<u64>,
    /// The candidate is the card's static CVV2.
    is_static: bool,
    key: rotation::Candidate,
    check_value: Kcv,
}

/// Why a verification's transaction stopped: a refusal or fault, or the
/// enrolment it was computed for has changed (check again).
#[derive(Debug)]
enum TxError {
    Domain(DomainError),
    Stale,
}

impl From<StoreError> for TxError {
    fn from(e: StoreError) -> Self {
        TxError::Domain(e.into())
    }
}

impl From<DomainError> for TxError {
    fn from(e: DomainError) -> Self {
        TxError::Domain(e)
    }
}

/// A programme's dynamic CVV2 rules (DESIGN 2.4): single use and the failure
/// limit, applied in the card's transaction.
#[derive(Debug, Clone, Copy)]
struct CardRules {
    single_use: bool,
    failure_limit: Option<u32>,
    failure_period_seconds: u32,
    window_seconds: u32,
    past_windows: u32,
}

impl CardRules {
    fn of(programme: &Programme) -> Self {
        CardRules {
            single_use: programme.single_use,
            failure_limit: programme.failure_limit.map(|l| l.get()),
            failure_period_seconds: programme.failure_period_seconds,
            window_seconds: programme.profile.window_seconds(),
            past_windows: programme.profile.past_windows(),
        }
    }

    /// The decision for an enrolled card, a pure function of what the
    /// transaction read: blocked by the failure limit (`failures` is the count
    /// in the period, read only when the programme has a limit), else a match
    /// spends its window (single use), else a failure is counted.
    fn decide(
        self,
        now: i64,
        failures: Option<u32>,
        matched: Option<u64>,
        is_static: bool,
    ) -> Decision {
        if let (Some(limit), Some(failures)) = (self.failure_limit, failures)
            && failures >= limit
        {
            return Decision::Blocked;
        }
        if let Some(window) = matched {
            if !self.single_use {
                return Decision::Match;
            }
            let window = i64::try_from(window).unwrap_or(i64::MAX);
            let w = i64::from(self.window_seconds);
            // The window's code is acceptable until G windows after it have passed.
            let last_acceptable = (window
                .saturating_add(1)
                .saturating_add(i64::from(self.past_windows)))
            .saturating_mul(w);
            return Decision::SpendWindow {
                window,
                last_acceptable,
            };
        }
        Decision::Fail {
            reason: if is_static {
                Reason::StaticCvv2Disabled
            } else {
                Reason::Mismatch
            },
            counted_until: self
                .failure_limit
                .map(|_| now + i64::from(self.failure_period_seconds)),
        }
    }

    /// Reads what [`CardRules::decide`] needs in `tx`, and records its decision there.
    fn apply(
        self,
        tx: &mut StoreTx<'_>,
        card: &CardId,
        now: i64,
        matched: Option<u64>,
        is_static: bool,
    ) -> Result<Reason, StoreError> {
        let failures = match self.failure_limit {
            Some(_) => Some(tx.failures_since(card, now - i64::from(self.failure_period_seconds))?),
            None => None,
        };
        Ok(match self.decide(now, failures, matched, is_static) {
            Decision::Blocked => Reason::TooManyFailures,
            Decision::Match => Reason::Match,
            Decision::SpendWindow {
                window,
                last_acceptable,
            } => {
                if tx.claim_window(card, window, now, last_acceptable)? {
                    Reason::Match
                } else {
                    Reason::CodeAlreadyUsed
                }
            }
            Decision::Fail {
                reason,
                counted_until,
            } => {
                if let Some(until) = counted_until {
                    tx.add_failure(card, now, until)?;
                }
                reason
            }
        })
    }
}

/// What the card's rules decide for one verification of an enrolled card.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Decision {
    /// Refused before the code counts: the failure limit is reached.
    Blocked,
    /// A match under a programme without single use.
    Match,
    /// A match whose window is spent now: approved if no one spent it before.
    SpendWindow {
        /// The matched window.
        window: i64,
        /// Until when the spent window must be remembered (Unix seconds).
        last_acceptable: i64,
    },
    /// No match: declined, and counted as a failure until `counted_until`
    /// when the programme limits failures.
    Fail {
        /// Why declined.
        reason: Reason,
        /// End of the failure's period, when it is counted.
        counted_until: Option<i64>,
    },
}

/// Checks a static CVV2 under each candidate CVK (current first, then previous
/// versions in their grace period), stopping at the first match.
fn static_cvv2_match<H: CardCrypto>(
    engine: &Engine<H>,
    cvks: &rotation::Candidates,
    pan: &Pan,
    expiry: Expiry,
    candidate: &SecurityCode,
) -> Result<rotation::Tried<(), Kcv>, DomainError> {
    rotation::first_match(cvks, |cvk| {
        let issued =
            engine.static_code(cvk, pan, expiry, StaticCodeKind::Cvv2, CodeLength::THREE)?;
        Ok((issued.code.matches(candidate).then_some(()), issued.kcv))
    })
}

/// A card is valid through the last day of its expiry month (UTC).
fn is_expired(expiry: Expiry, now_ms: u64) -> bool {
    let Ok(now) =
        time::OffsetDateTime::from_unix_timestamp(i64::try_from(now_ms / 1000).unwrap_or(i64::MAX))
    else {
        return true;
    };
    let digits = expiry.as_str();
    let (Ok(yy), Ok(mm)) = (digits[..2].parse::<i32>(), digits[2..].parse::<u8>()) else {
        return true;
    };
    let expiry_month = (2000 + yy) * 12 + i32::from(mm);
    let current_month = now.year() * 12 + i32::from(u8::from(now.month()));
    expiry_month < current_month
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(single_use: bool, failure_limit: Option<u32>) -> CardRules {
        CardRules {
            single_use,
            failure_limit,
            failure_period_seconds: 86_400,
            window_seconds: 300,
            past_windows: 1,
        }
    }

    const NOW: i64 = 1_800_000_000;

    #[test]
    fn a_card_at_its_failure_limit_is_blocked_even_with_the_right_code() {
        let r = rules(true, Some(5));
        assert_eq!(r.decide(NOW, Some(5), Some(7), false), Decision::Blocked);
        assert_eq!(r.decide(NOW, Some(9), None, false), Decision::Blocked);
        // One below the limit still counts the code.
        assert!(matches!(
            r.decide(NOW, Some(4), Some(7), false),
            Decision::SpendWindow { .. }
        ));
    }

    #[test]
    fn a_match_spends_its_window_until_the_grace_windows_after_it_have_passed() {
        let window = u64::try_from(NOW / 300).unwrap();
        assert_eq!(
            rules(true, None).decide(NOW, None, Some(window), false),
            Decision::SpendWindow {
                window: NOW / 300,
                last_acceptable: (NOW / 300 + 2) * 300,
            }
        );
        // Without single use a match is approved and nothing is spent.
        assert_eq!(
            rules(false, Some(5)).decide(NOW, Some(0), Some(window), false),
            Decision::Match
        );
    }

    #[test]
    fn a_mismatch_is_counted_only_under_a_failure_limit_and_names_a_static_code() {
        assert_eq!(
            rules(true, Some(5)).decide(NOW, Some(0), None, false),
            Decision::Fail {
                reason: Reason::Mismatch,
                counted_until: Some(NOW + 86_400),
            }
        );
        assert_eq!(
            rules(true, None).decide(NOW, None, None, true),
            Decision::Fail {
                reason: Reason::StaticCvv2Disabled,
                counted_until: None,
            }
        );
    }

    fn ms(date: time::OffsetDateTime) -> u64 {
        u64::try_from(date.unix_timestamp()).unwrap() * 1000
    }

    #[test]
    fn a_card_is_valid_through_its_expiry_month() {
        let expiry: Expiry = "2612".parse().unwrap();
        let last_second = time::macros::datetime!(2026-12-31 23:59:59 UTC);
        let next_month = time::macros::datetime!(2027-01-01 00:00:00 UTC);
        assert!(!is_expired(expiry, ms(last_second)));
        assert!(is_expired(expiry, ms(next_month)));
        assert!(!is_expired("2701".parse().unwrap(), ms(next_month)));
    }

    #[test]
    fn value_counts_are_1_to_24() {
        assert!(ValueCount::try_from(0).is_err());
        assert!(ValueCount::try_from(1).is_ok());
        assert!(ValueCount::try_from(24).is_ok());
        assert!(ValueCount::try_from(25).is_err());
        assert!(ValueCount::try_from(256 + 1).is_err());
    }
}
