//! `bench engine`: throughput of the token and of the engine on one token, for 1
//! and 2 worker threads, each figure also as a ratio of the raw single-block
//! encryption rate, plus the token operations each engine operation costs (CVC3
//! and ARQC of every cryptogram version included; a
//! production HSM is licensed by calls per second).
//!
//! The benchmark generates its own temporary keys in the token under labels
//! `bench-<pid>-...` and destroys them when it ends, also on error.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use super::CliError;

/// One benchmarked operation; the argument varies the card per call.
type BenchOp<'a> = &'a (dyn Fn(u64) -> Result<(), DomainError> + Sync);
/// An owned [`BenchOp`], for operations built in a loop.
type OwnedBenchOp<'a> = Box<dyn Fn(u64) -> Result<(), DomainError> + Sync + 'a>;
use zeroize::Zeroizing;

use crate::domain::{
    ArqcInput, CodeLength, CryptogramVersion, DomainError, Engine, Expiry, Pan, Psn, SecurityCode,
    StaticCodeKind, Tdcvv2Profile,
};
use crate::hsm::{
    BlockCipher, CardCrypto, CvvKeySource, HsmError, KeyKind, KeyLabel, OpCounts, Token,
    WorkerFailure,
};
use crate::http::process::Stat;

/// Temporary keys, destroyed on drop.
struct BenchKeys<'t> {
    token: &'t Token,
    /// Every key generated so far, destroyed on drop.
    created: Vec<KeyLabel>,
    cvk: KeyLabel,
    imk: KeyLabel,
    imk_ac: KeyLabel,
    imk_cvc3: KeyLabel,
}

impl<'t> BenchKeys<'t> {
    fn create(token: &'t Token) -> Result<Self, CliError> {
        let pid = std::process::id();
        let label = |kind: KeyKind| format!("bench-{pid}-{}", kind.as_str()).parse::<KeyLabel>();
        let mut keys = BenchKeys {
            token,
            created: Vec::new(),
            cvk: label(KeyKind::Cvk)?,
            imk: label(KeyKind::ImkTdcvv2)?,
            imk_ac: label(KeyKind::ImkAc)?,
            imk_cvc3: label(KeyKind::ImkCvc3)?,
        };
        for (kind, label) in [
            (KeyKind::Cvk, keys.cvk.clone()),
            (KeyKind::ImkTdcvv2, keys.imk.clone()),
            (KeyKind::ImkAc, keys.imk_ac.clone()),
            (KeyKind::ImkCvc3, keys.imk_cvc3.clone()),
        ] {
            token.generate_key(kind, &label)?;
            keys.created.push(label);
        }
        Ok(keys)
    }
}

impl Drop for BenchKeys<'_> {
    fn drop(&mut self) {
        for label in &self.created {
            if let Err(e) = self.token.destroy_key(label) {
                tracing::warn!(key = %label, error = %e, "could not remove a benchmark key");
            }
        }
    }
}

#[derive(Debug, Serialize)]
struct Figure {
    operation: String,
    threads: usize,
    per_second: f64,
    ratio_to_raw: f64,
    token_operations_per_op: f64,
    pkcs11_calls_per_op: f64,
}

/// Runs `op` on `threads` threads for `seconds`; returns operations per second
/// and the token operations they cost.
fn measure(
    token: &Token,
    threads: usize,
    seconds: f64,
    op: BenchOp<'_>,
) -> Result<(f64, u64, OpCounts), CliError> {
    let done = AtomicU64::new(0);
    let before = token.counters();
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(seconds);
    let failures: Vec<DomainError> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                let done = &done;
                scope.spawn(move || -> Result<(), DomainError> {
                    let mut i = t as u64 * 1_000_000_007;
                    while Instant::now() < deadline {
                        op(i)?;
                        i += 1;
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(())
                })
            })
            .collect();
        workers
            .into_iter()
            .filter_map(|w| match w.join() {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(e),
                Err(_) => Some(HsmError::Worker(WorkerFailure::Panicked).into()),
            })
            .collect()
    });
    if let Some(e) = failures.into_iter().next() {
        return Err(e.into());
    }
    let elapsed = start.elapsed().as_secs_f64();
    let n = done.load(Ordering::Relaxed);
    Ok((n as f64 / elapsed, n, token.counters().since(&before)))
}

/// A Luhn-free test PAN that changes with `i` (the engine does not need Luhn).
fn pan_for(i: u64) -> Result<Pan, DomainError> {
    format!("4{:015}", i % 1_000_000_000_000_000).parse()
}

/// The temporary keys, the engine over the token, and fixed card data: what
/// every benchmarked engine operation runs on.
struct Fixture<'t> {
    keys: BenchKeys<'t>,
    engine: Engine<&'t Token>,
    expiry: Expiry,
    profile: Tdcvv2Profile,
    now: u64,
    wrong: SecurityCode,
}

impl<'t> Fixture<'t> {
    /// Creates the temporary keys and warms the key cache (resolution, policy
    /// check, working copies) outside any timing.
    fn create(token: &'t Token) -> Result<Self, CliError> {
        let keys = BenchKeys::create(token)?;
        let fixture = Fixture {
            keys,
            engine: Engine::new(token),
            expiry: "2812".parse().map_err(|_| CliError::Io("expiry".into()))?,
            profile: Tdcvv2Profile::new(300, 1, 0).map_err(|_| CliError::Io("profile".into()))?,
            now: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_err(|e| CliError::Io(e.to_string()))?
                .as_secs(),
            wrong: SecurityCode::parse("cvv2", "000").map_err(|_| CliError::Io("code".into()))?,
        };
        fixture.raw(0)?;
        fixture.verify(0)?;
        fixture.cvc3(0)?;
        fixture.arqc(0, CryptogramVersion::VisaCvn10)?;
        Ok(fixture)
    }

    fn raw(&self, _: u64) -> Result<(), DomainError> {
        self.engine
            .hsm()
            .with_cvv_keys(CvvKeySource::Cvk(&self.keys.cvk), |k: &dyn BlockCipher| {
                k.encrypt_double(&[0u8; 8]).map(drop)
            })
            .map_err(DomainError::from)
    }

    fn static_cvv2(&self, i: u64) -> Result<(), DomainError> {
        self.engine
            .static_code(
                &self.keys.cvk,
                &pan_for(i)?,
                self.expiry,
                StaticCodeKind::Cvv2,
                CodeLength::THREE,
            )
            .map(drop)
    }

    /// A code that (almost always) does not match: every window is computed and
    /// compared, as for any verification (the engine has no early exit).
    fn verify(&self, i: u64) -> Result<(), DomainError> {
        self.engine
            .tdcvv2_verify(
                &self.keys.imk,
                &pan_for(i)?,
                self.expiry,
                self.profile,
                self.now,
                &self.wrong,
            )
            .map(drop)
    }

    /// A CVC3 over 19 bytes of track 2 equivalent data.
    fn cvc3(&self, i: u64) -> Result<(), DomainError> {
        let atc = (i as u16).to_be_bytes();
        self.engine
            .cvc3(
                &self.keys.imk_cvc3,
                &pan_for(i)?,
                Psn::NONE,
                &[0x51; 19],
                [0, 0, 0x08, 0x99],
                atc,
            )
            .map(drop)
    }

    /// An ARQC of `version` over 43 bytes of CDOL1 data (the pyemv Visa
    /// layout with a 7-byte IAD), declined: no ARPC is made.
    fn arqc(&self, i: u64, version: CryptogramVersion) -> Result<(), DomainError> {
        let input = ArqcInput {
            version,
            transaction_data: Zeroizing::new(vec![0x5A; 43]),
            padding: version.default_padding(),
            atc: (i as u16).to_be_bytes(),
            unpredictable_number: Some([0x11; 4]),
            arqc: [0; 8],
            arpc: None,
        };
        self.engine
            .arqc(&self.keys.imk_ac, &pan_for(i)?, Psn::NONE, &input)
            .map(drop)
    }

    fn generate(&self, i: u64, count: u8) -> Result<(), DomainError> {
        self.engine
            .tdcvv2_generate(
                &self.keys.imk,
                &pan_for(i)?,
                self.expiry,
                self.profile,
                self.now,
                count,
            )
            .map(drop)
    }
}

/// An engine operation that `dcvv-tools bench http` sets its HTTP figures against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EngineOp {
    /// TDCVV2-v1 verification with G = 1, F = 0 (2 windows computed and compared).
    Tdcvv2Verify,
    /// TDCVV2-v1 generation of this many values (1–24).
    Tdcvv2Generate(u8),
}

/// What `dcvv-tools bench http` sets one HTTP operation against.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EngineRate {
    /// Operations per second.
    pub per_second: f64,
    /// CPU time of this process (the engine and the token library, which runs
    /// in it) per operation over the measurement; `None` without `/proc`.
    pub cpu_seconds_per_op: Option<f64>,
}

/// Process CPU seconds spent over `cpu_seconds` for `ops` operations.
pub fn per_op(cpu_seconds: f64, ops: u64) -> Option<f64> {
    (ops > 0 && cpu_seconds >= 0.0).then(|| cpu_seconds / ops as f64)
}

/// This process's CPU time so far (user + system), `None` without `/proc`.
pub fn own_cpu_seconds() -> Option<f64> {
    Stat::read(None).ok().map(|s| s.cpu_seconds())
}

/// Engine-only operations per second of each of `ops`, and this process's CPU
/// per operation, each run on `threads` threads for `seconds`, in this process,
/// on temporary keys created in the token for the purpose and destroyed before
/// returning (also on error).
///
/// # Errors
/// The token's error creating the keys or during a measurement.
pub fn engine_rates(
    token: &Token,
    ops: &[EngineOp],
    threads: usize,
    seconds: f64,
) -> Result<Vec<EngineRate>, CliError> {
    let fixture = Fixture::create(token)?;
    let verify = |i: u64| fixture.verify(i);
    ops.iter()
        .map(|op| {
            let cpu_before = own_cpu_seconds();
            let (per_second, done, _) = match *op {
                EngineOp::Tdcvv2Verify => measure(token, threads, seconds, &verify)?,
                EngineOp::Tdcvv2Generate(count) => measure(token, threads, seconds, &|i: u64| {
                    fixture.generate(i, count)
                })?,
            };
            let cpu_seconds_per_op = cpu_before
                .zip(own_cpu_seconds())
                .and_then(|(before, after)| per_op(after - before, done));
            Ok(EngineRate {
                per_second,
                cpu_seconds_per_op,
            })
        })
        .collect()
}

pub(super) fn engine(token: &Token, seconds: f64, json: bool) -> Result<(), CliError> {
    let fixture = Fixture::create(token)?;
    let raw = |i: u64| fixture.raw(i);
    let cvv2 = |i: u64| fixture.static_cvv2(i);
    let verify = |i: u64| fixture.verify(i);
    let generate = |i: u64| fixture.generate(i, 24);
    let cvc3 = |i: u64| fixture.cvc3(i);
    let f = &fixture;
    let arqcs: Vec<(String, OwnedBenchOp<'_>)> = CryptogramVersion::ALL
        .into_iter()
        .map(|version| {
            let op: OwnedBenchOp<'_> = Box::new(move |i: u64| f.arqc(i, version));
            (format!("ARQC {}", version.as_str()), op)
        })
        .collect();

    let mut ops: Vec<(&str, BenchOp<'_>)> = vec![
        ("raw single-block C_Encrypt", &raw),
        ("static CVV2", &cvv2),
        ("TDCVV2-v1 verify (2 windows)", &verify),
        ("TDCVV2-v1 generate 24 values", &generate),
        ("CVC3 (19-byte track 2 data)", &cvc3),
    ];
    ops.extend(
        arqcs
            .iter()
            .map(|(name, op)| (name.as_str(), &**op as BenchOp<'_>)),
    );
    let mut figures = Vec::new();
    for threads in [1, 2] {
        let mut raw_rate = 0.0;
        for &(name, op) in &ops {
            let (rate, n, counts) = measure(token, threads, seconds, op)?;
            if raw_rate == 0.0 {
                raw_rate = rate;
            }
            let per = |x: u64| if n == 0 { 0.0 } else { x as f64 / n as f64 };
            figures.push(Figure {
                operation: name.to_owned(),
                threads,
                per_second: rate,
                ratio_to_raw: rate / raw_rate,
                token_operations_per_op: per(counts.operations()),
                pkcs11_calls_per_op: per(counts.pkcs11_calls()),
            });
        }
    }
    // The keys are destroyed before the figures print.
    drop(ops);
    drop(arqcs);
    drop(fixture);
    print_figures(&figures, seconds, json)
}

fn print_figures(figures: &[Figure], seconds: f64, json: bool) -> Result<(), CliError> {
    if json {
        let text =
            serde_json::to_string_pretty(figures).map_err(|e| CliError::Io(e.to_string()))?;
        println!("{text}");
        return Ok(());
    }
    println!("dcvv-gateway bench engine: {seconds} s per figure, one token");
    println!(
        "{:<32} {:>7} {:>10} {:>8} {:>10} {:>12}",
        "operation", "threads", "per second", "x raw", "token ops", "PKCS#11 calls"
    );
    for f in figures {
        println!(
            "{:<32} {:>7} {:>10.0} {:>8.3} {:>10.2} {:>12.2}",
            f.operation,
            f.threads,
            f.per_second,
            f.ratio_to_raw,
            f.token_operations_per_op,
            f.pkcs11_calls_per_op
        );
    }
    Ok(())
}
