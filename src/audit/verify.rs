//! Offline verification of a trail: files in chain order (a directory's
//! `audit-<seq>.jsonl` files sorted by name, or the files as given), each line
//! checked for canonical form, its own hash, its seq (+1 each), its `prev`
//! (the hash of the line before, across files; [`GENESIS`] at the start), and
//! each seal's HMAC, checked in the token. The first bad line is reported as
//! `FILE:LINE: REASON`.
//!
//! Records after the last seal are chained but not sealed: whoever can write the
//! files could rewrite that tail and its hashes. They are reported, and are an
//! error with `require_sealed`.

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::SealChecker;
use super::record::{self, Fields, GENESIS, parse_file_name, seal_message};
use crate::hsm::{HsmError, KeyLabel};

/// How strict a verification is.
#[derive(Debug, Clone, Copy, Default)]
pub struct VerifyOptions {
    /// Records after the last seal are an error (else only reported).
    pub require_sealed: bool,
    /// Accept a trail that starts after genesis (older files archived
    /// elsewhere): the first record's `prev` is taken on trust.
    pub partial: bool,
}

/// What a good trail holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifySummary {
    /// Files read.
    pub files: usize,
    /// Records of every kind.
    pub records: u64,
    /// Seal records among them.
    pub seals: u64,
    /// Seq of the first and the last record.
    pub first_seq: Option<u64>,
    /// Seq of the last record.
    pub last_seq: Option<u64>,
    /// Seq of the last seal.
    pub last_sealed_seq: Option<u64>,
    /// Records after the last seal, and where the first of them is.
    pub unsealed: u64,
    /// `FILE:LINE` of the first unsealed record.
    pub first_unsealed_at: Option<String>,
}

/// The first bad record.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{file}:{line}: {reason}")]
pub struct VerifyError {
    /// The file.
    pub file: String,
    /// 1-based line (0 when the file itself is the problem).
    pub line: usize,
    /// Why.
    pub reason: String,
}

/// Trail files in chain order: a directory's trail files sorted by name, a
/// file as given.
///
/// # Errors
/// A path that cannot be read.
pub fn collect_files(paths: &[PathBuf]) -> Result<Vec<PathBuf>, VerifyError> {
    let mut files = Vec::new();
    for path in paths {
        let fail = |reason: String| VerifyError {
            file: path.display().to_string(),
            line: 0,
            reason,
        };
        if path.is_dir() {
            let mut found: Vec<(u64, PathBuf)> = std::fs::read_dir(path)
                .map_err(|e| fail(e.to_string()))?
                .filter_map(Result::ok)
                .filter_map(|e| {
                    let name = e.file_name();
                    parse_file_name(name.to_str()?).map(|seq| (seq, e.path()))
                })
                .collect();
            found.sort();
            if found.is_empty() {
                return Err(fail("no audit-<seq>.jsonl files in this directory".into()));
            }
            files.extend(found.into_iter().map(|(_, p)| p));
        } else if path.is_file() {
            files.push(path.clone());
        } else {
            return Err(fail("no such file or directory".into()));
        }
    }
    Ok(files)
}

/// Verifies the trail made of `paths` (see the module documentation).
///
/// # Errors
/// The first bad record, or a file that cannot be read.
pub fn verify_paths(
    paths: &[PathBuf],
    checker: &dyn SealChecker,
    options: VerifyOptions,
) -> Result<VerifySummary, VerifyError> {
    let files = collect_files(paths)?;
    let mut summary = VerifySummary::default();
    let mut head: Option<(u64, String)> = None;
    for file in &files {
        verify_file(file, checker, options, &mut head, &mut summary)?;
        summary.files += 1;
    }
    if options.require_sealed
        && let Some(at) = &summary.first_unsealed_at
    {
        let (file, line) = at.rsplit_once(':').unwrap_or((at.as_str(), "0"));
        return Err(VerifyError {
            file: file.to_owned(),
            line: line.parse().unwrap_or(0),
            reason: format!(
                "{} record(s) from here on are not covered by a seal (--require-sealed)",
                summary.unsealed
            ),
        });
    }
    if summary.records == 0 {
        return Err(VerifyError {
            file: files
                .first()
                .map(|f| f.display().to_string())
                .unwrap_or_default(),
            line: 0,
            reason: "the trail holds no record".into(),
        });
    }
    Ok(summary)
}

fn verify_file(
    path: &Path,
    checker: &dyn SealChecker,
    options: VerifyOptions,
    head: &mut Option<(u64, String)>,
    summary: &mut VerifySummary,
) -> Result<(), VerifyError> {
    let name = path.display().to_string();
    let fail = |line: usize, reason: String| VerifyError {
        file: name.clone(),
        line,
        reason,
    };
    let bytes = std::fs::read(path).map_err(|e| fail(0, format!("cannot read: {e}")))?;
    if bytes.is_empty() {
        return Ok(());
    }
    if bytes.last() != Some(&b'\n') {
        let line = bytes.iter().filter(|&&b| b == b'\n').count() + 1;
        return Err(fail(
            line,
            "the last line is incomplete (file truncated or a write interrupted)".into(),
        ));
    }
    let promised = path
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(parse_file_name);
    for (index, raw) in bytes[..bytes.len() - 1].split(|&b| b == b'\n').enumerate() {
        let line = index + 1;
        let fields: Fields = serde_json::from_slice(raw)
            .map_err(|_| fail(line, "not a JSON record (edited or corrupted)".into()))?;
        if record::canonical(&fields) != raw {
            return Err(fail(
                line,
                "not in canonical form (edited, or not written by the gateway)".into(),
            ));
        }
        let seq = fields.get("seq").and_then(Value::as_u64);
        let prev = fields.get("prev").and_then(Value::as_str);
        let hash = fields.get("hash").and_then(Value::as_str);
        let kind = fields.get("kind").and_then(Value::as_str);
        let (Some(seq), Some(prev), Some(hash), Some(kind)) = (seq, prev, hash, kind) else {
            return Err(fail(line, "missing seq, prev, hash or kind".into()));
        };
        if record::hash_of(&fields) != hash {
            return Err(fail(
                line,
                "hash does not match the record's content (record edited)".into(),
            ));
        }
        if line == 1
            && let Some(promised) = promised
            && promised != seq
        {
            return Err(fail(
                line,
                format!(
                    "file name says the first seq is {promised}, the record has {seq} (file renamed?)"
                ),
            ));
        }
        match head.as_ref() {
            None if options.partial => {}
            None => {
                if seq != 1 || prev != GENESIS {
                    return Err(fail(
                        line,
                        format!(
                            "the trail does not start at genesis (seq {seq}): earlier records or files are missing (--partial to verify from here)"
                        ),
                    ));
                }
            }
            Some((last_seq, last_hash)) => {
                if seq != last_seq + 1 {
                    return Err(fail(
                        line,
                        format!(
                            "seq {seq} where {} was expected (a record or file deleted, inserted or reordered)",
                            last_seq + 1
                        ),
                    ));
                }
                if prev != last_hash {
                    return Err(fail(
                        line,
                        "prev does not match the hash of the record before (a record deleted, inserted, reordered or edited)".into(),
                    ));
                }
            }
        }
        match kind {
            "request" | "change" | "notice" => {
                if summary.unsealed == 0 {
                    summary.first_unsealed_at = Some(format!("{name}:{line}"));
                }
                summary.unsealed += 1;
            }
            "seal" => {
                check_seal(&fields, seq, prev, checker)
                    .map_err(|problem| fail(line, problem.to_string()))?;
                summary.seals += 1;
                summary.last_sealed_seq = Some(seq);
                summary.unsealed = 0;
                summary.first_unsealed_at = None;
            }
            other => return Err(fail(line, format!("unknown record kind {other:?}"))),
        }
        summary.records += 1;
        summary.first_seq.get_or_insert(seq);
        summary.last_seq = Some(seq);
        *head = Some((seq, hash.to_owned()));
    }
    Ok(())
}

/// Why a seal record does not hold.
#[derive(Debug, thiserror::Error)]
enum SealProblem {
    #[error("seal without key_label")]
    NoKeyLabel,
    #[error("seal key_label is not a key label")]
    BadKeyLabel,
    #[error("seal mac is not hex")]
    BadMac,
    #[error(
        "seal does not verify under {0} in the token (forged seal, or records before it rewritten)"
    )]
    Forged(KeyLabel),
    #[error("seal cannot be checked: {0}")]
    Unchecked(#[source] HsmError),
}

fn check_seal(
    fields: &Fields,
    seq: u64,
    prev: &str,
    checker: &dyn SealChecker,
) -> Result<(), SealProblem> {
    let label = fields
        .get("key_label")
        .and_then(Value::as_str)
        .ok_or(SealProblem::NoKeyLabel)?;
    let label: KeyLabel = label.parse().map_err(|_| SealProblem::BadKeyLabel)?;
    let mac = fields
        .get("mac")
        .and_then(Value::as_str)
        .and_then(|m| hex::decode(m).ok())
        .ok_or(SealProblem::BadMac)?;
    match checker.check(&label, &seal_message(seq, prev), &mac) {
        Ok(true) => Ok(()),
        Ok(false) => Err(SealProblem::Forged(label)),
        Err(e) => Err(SealProblem::Unchecked(e)),
    }
}
