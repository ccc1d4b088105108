//! `audit verify PATH...`: checks a trail's chain and seals (seals in the
//! token) across rotated files; the first bad record is the error
//! (`FILE:LINE: REASON`, non-zero exit). A tail of records after the last seal
//! is reported on stderr, and is an error with `--require-sealed`.

use std::path::PathBuf;

use clap::Subcommand;

use crate::audit::{VerifyOptions, verify_paths};
use crate::hsm::Token;

use super::CliError;

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Verify an audit trail: hash chain, seq, and every seal (HMAC checked in the token).
    Verify {
        /// Trail files in chain order, or a directory (its audit-<seq>.jsonl files, by name).
        #[arg(required = true, value_name = "PATH")]
        paths: Vec<PathBuf>,
        /// Records after the last seal are an error instead of a warning.
        #[arg(long)]
        require_sealed: bool,
        /// The trail may start after genesis (older files archived elsewhere).
        #[arg(long)]
        partial: bool,
    },
}

pub fn run(token: &Token, command: AuditCommand) -> Result<(), CliError> {
    let AuditCommand::Verify {
        paths,
        require_sealed,
        partial,
    } = command;
    let summary = verify_paths(
        &paths,
        token,
        VerifyOptions {
            require_sealed,
            partial,
        },
    )
    .map_err(|e| CliError::Io(e.to_string()))?;
    let range = match (summary.first_seq, summary.last_seq) {
        (Some(a), Some(b)) => format!("seq {a} to {b}"),
        _ => "no records".into(),
    };
    println!(
        "ok: {} file(s), {} record(s) ({range}), {} seal(s), last sealed seq {}",
        summary.files,
        summary.records,
        summary.seals,
        summary
            .last_sealed_seq
            .map_or_else(|| "none".to_owned(), |s| s.to_string()),
    );
    if summary.unsealed > 0 {
        eprintln!(
            "warning: {} record(s) after the last seal are chained but not sealed (from {})",
            summary.unsealed,
            summary.first_unsealed_at.as_deref().unwrap_or("?")
        );
    } else {
        println!("every record is covered by a seal");
    }
    Ok(())
}
