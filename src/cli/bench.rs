//! `bench engine`: throughput of the token and of the engine on one token, for 1
//! and 2 worker threads, each figure also as a ratio of the raw single-block
//! encryption rate, plus the token operations each engine operation costs (a
//! production HSM is licensed by calls per second).
//!
//! The benchmark generates its own temporary keys in the token under labels
//! `bench-<pid>-...` and destroys them when it ends, also on error.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use super::CliError;

/// One benchmarked operation; the argument varies the card per call.
type BenchOp<'a> = &'a (dyn Fn(u64) -> Result<(), HsmError> + Sync);
use crate::domain::{CodeLength, Engine, Expiry, Pan, SecurityCode, StaticCodeKind, Tdcvv2Profile};
use crate::hsm::{
    BlockCipher, CardCrypto, CvvKeySource, HsmError, KeyKind, KeyLabel, OpCounts, Token,
};

/// Temporary keys, destroyed on drop.
struct BenchKeys<'t> {
    token: &'t Token,
    cvk: KeyLabel,
    imk: KeyLabel,
}

impl<'t> BenchKeys<'t> {
    fn create(token: &'t Token) -> Result<Self, CliError> {
        let pid = std::process::id();
        let cvk: KeyLabel = format!("bench-{pid}-cvk").parse()?;
        let imk: KeyLabel = format!("bench-{pid}-imk-tdcvv2").parse()?;
        token.generate_key(KeyKind::Cvk, &cvk)?;
        let keys = BenchKeys {
            token,
            cvk,
            imk: imk.clone(),
        };
        token.generate_key(KeyKind::ImkTdcvv2, &imk)?;
        Ok(keys)
    }
}

impl Drop for BenchKeys<'_> {
    fn drop(&mut self) {
        for label in [&self.cvk, &self.imk] {
            if let Err(e) = self.token.destroy_key(label) {
                tracing::warn!(key = %label, error = %e, "could not remove a benchmark key");
            }
        }
    }
}

#[derive(Debug, Serialize)]
struct Figure {
    operation: &'static str,
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
    let failures: Vec<HsmError> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                let done = &done;
                scope.spawn(move || -> Result<(), HsmError> {
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
                Err(_) => Some(HsmError::Worker("benchmark thread panicked".into())),
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
fn pan_for(i: u64) -> Result<Pan, HsmError> {
    format!("4{:015}", i % 1_000_000_000_000_000)
        .parse()
        .map_err(|_| HsmError::InvalidInput("benchmark PAN".into()))
}

pub(super) fn engine(token: &Token, seconds: f64, json: bool) -> Result<(), CliError> {
    let keys = BenchKeys::create(token)?;
    let engine = Engine::new(token);
    let expiry: Expiry = "2812".parse().map_err(|_| CliError::Io("expiry".into()))?;
    let profile = Tdcvv2Profile::new(300, 1, 0).map_err(|_| CliError::Io("profile".into()))?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_err(|e| CliError::Io(e.to_string()))?
        .as_secs();
    let wrong = SecurityCode::parse("cvv2", "000").map_err(|_| CliError::Io("code".into()))?;
    let domain = |e: crate::domain::DomainError| match e {
        crate::domain::DomainError::Hsm(h) => h,
        other => HsmError::InvalidInput(other.to_string()),
    };

    let raw = |_: u64| -> Result<(), HsmError> {
        token.with_cvv_keys(CvvKeySource::Cvk(&keys.cvk), |k: &dyn BlockCipher| {
            k.encrypt_double(&[0u8; 8]).map(drop)
        })
    };
    let cvv2 = |i: u64| -> Result<(), HsmError> {
        engine
            .static_code(
                &keys.cvk,
                &pan_for(i)?,
                expiry,
                StaticCodeKind::Cvv2,
                CodeLength::THREE,
            )
            .map(drop)
            .map_err(domain)
    };
    // A code that (almost always) does not match: every window is computed and compared.
    let verify = |i: u64| -> Result<(), HsmError> {
        engine
            .tdcvv2_verify(&keys.imk, &pan_for(i)?, expiry, profile, now, &wrong)
            .map(drop)
            .map_err(domain)
    };
    let generate = |i: u64| -> Result<(), HsmError> {
        engine
            .tdcvv2_generate(&keys.imk, &pan_for(i)?, expiry, profile, now, 24)
            .map(drop)
            .map_err(domain)
    };
    // Warm the key cache (resolution, policy check, working copies) outside the timing.
    raw(0)?;
    verify(0)?;

    let ops: [(&'static str, BenchOp<'_>); 4] = [
        ("raw single-block C_Encrypt", &raw),
        ("static CVV2", &cvv2),
        ("TDCVV2-v1 verify (2 windows)", &verify),
        ("TDCVV2-v1 generate 24 values", &generate),
    ];
    let mut figures = Vec::new();
    for threads in [1, 2] {
        let mut raw_rate = 0.0;
        for (name, op) in ops {
            let (rate, n, counts) = measure(token, threads, seconds, op)?;
            if raw_rate == 0.0 {
                raw_rate = rate;
            }
            let per = |x: u64| if n == 0 { 0.0 } else { x as f64 / n as f64 };
            figures.push(Figure {
                operation: name,
                threads,
                per_second: rate,
                ratio_to_raw: rate / raw_rate,
                token_operations_per_op: per(counts.operations()),
                pkcs11_calls_per_op: per(counts.pkcs11_calls()),
            });
        }
    }
    drop(keys);
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
