//! The command line: the key ceremony (`keys ...`, including the RSA wrapping
//! key and wrapped key import), the token check (`hsm check`: the mechanisms
//! the configuration needs, and the key policy), `serve`, the engine's benchmark
//! (`bench engine`), the audit trail's verifier (`audit verify`), and the
//! configuration's built-in defaults (`config defaults`). The signed client
//! (`call`) and the benchmark of a running gateway (`bench http`) are the
//! `dcvv-tools` crate's (`tools/`); the pieces of this module it reuses are
//! public: [`mod@bench`]'s engine-only figures,
//! [`with_token`] and [`CliError`].
//!
//! Output on stdout is the commands' contract (tooling parses `keys list --json`);
//! logs go to stderr. Every error is one line and a non-zero exit; no command
//! prints a PIN, a component or any key value.

// The CLI's output on stdout is its contract with people and scripts.
#![allow(clippy::print_stdout)]

mod audit;
pub mod bench;
mod clients;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::Settings;
use crate::domain::programme::Programmes;
use crate::domain::rotation;
use crate::hsm::{
    Component, CreatedKey, HsmError, Kcv, KeyKind, KeyLabel, KeyListing, OaepHash, Token,
};
use crate::telemetry::{self, LogFormat};

/// dcvv-gateway: card security codes computed inside a PKCS#11 HSM.
#[derive(Debug, Parser)]
#[command(name = "dcvv-gateway", version, about)]
pub struct Cli {
    /// Gateway configuration file (TOML).
    #[arg(long, value_name = "FILE", default_value = "hsm-config/gateway.toml")]
    config: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Key management in the token.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Token checks.
    #[command(subcommand)]
    Hsm(HsmCommand),
    /// Benchmarks against the configured token.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Run the HTTP service.
    Serve,
    /// The audit trail.
    #[command(subcommand)]
    Audit(audit::AuditCommand),
    /// The configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// API clients.
    #[command(subcommand)]
    Clients(clients::ClientsCommand),
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Print the built-in default of every key that has one, as TOML (reads no config file).
    Defaults,
}

#[derive(Debug, Subcommand)]
enum KeysCommand {
    /// Generate a key inside the token.
    Generate {
        /// cvk, imk-dcvv, imk-tdcvv2, imk-ac, imk-cvc3, pan-index or audit-seal.
        #[arg(long)]
        kind: String,
        /// Label of the new key (e.g. cvk-visa-v1).
        #[arg(long)]
        label: String,
    },
    /// Import a key from 2 or 3 clear components (dual control).
    Import {
        /// cvk, imk-dcvv, imk-tdcvv2, imk-ac, imk-cvc3, pan-index or audit-seal.
        #[arg(long)]
        kind: String,
        /// Label of the new key.
        #[arg(long)]
        label: String,
        /// File holding one component in hex; repeat per component. Without it,
        /// components are typed without echo.
        #[arg(long = "component-file", value_name = "PATH")]
        component_files: Vec<PathBuf>,
    },
    /// Generate an RSA-3072 wrapping key pair in the token (unwrap only) and print its
    /// public key as PEM for the party that sends keys wrapped under it.
    WrappingKey {
        /// Label of the key pair (e.g. wrap-acme-v1).
        #[arg(long)]
        label: String,
        /// Write the PEM public key to this new file instead of stdout.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
        /// Export the public key of the existing key pair instead of generating one.
        #[arg(long)]
        export: bool,
    },
    /// Import a double-length DES key sent wrapped under a wrapping key (RSA-OAEP).
    ImportWrapped {
        /// imk-dcvv, imk-tdcvv2, imk-ac or imk-cvc3.
        #[arg(long)]
        kind: String,
        /// Label of the new key.
        #[arg(long)]
        label: String,
        /// Label of the wrapping key pair the key was wrapped under.
        #[arg(long, value_name = "LABEL")]
        wrapping_key: String,
        /// File holding the wrapped key: hex (whitespace allowed) or raw bytes.
        #[arg(long, value_name = "FILE")]
        wrapped_file: PathBuf,
        /// The key's KCV as the sender states it (6 hex digits).
        #[arg(long)]
        kcv: String,
        /// OAEP hash, also used for MGF1: sha256, or sha1 (the only one SoftHSM 2.6 accepts).
        #[arg(long, value_name = "HASH", default_value = "sha256")]
        oaep_hash: String,
    },
    /// List every gateway key with its KCV and security attributes.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum HsmCommand {
    /// Check that the token has every mechanism the configured keys need, and every
    /// gateway key against its kind's policy; non-zero exit if a mechanism is
    /// lacking or a key is too wide.
    Check,
}

#[derive(Debug, Subcommand)]
enum BenchCommand {
    /// Token and engine throughput for 1 and 2 worker threads, with calls per operation.
    Engine {
        /// Seconds per measurement.
        #[arg(long, default_value_t = 3.0)]
        seconds: f64,
        /// Emit JSON.
        #[arg(long)]
        json: bool,
    },
}

/// A command failure: one line for stderr.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Bad configuration.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The token said no.
    #[error(transparent)]
    Hsm(#[from] HsmError),
    /// A card operation of the benchmark failed.
    #[error(transparent)]
    Domain(#[from] crate::domain::DomainError),
    /// Keys too wide for their policy.
    #[error("{0} key(s) refused by policy")]
    PolicyViolations(usize),
    /// The token lacks mechanisms or flags the configured keys need (and keys
    /// may be refused by policy too: `refused`, possibly 0).
    #[error(
        "the token lacks {lacking} mechanism(s) or flag(s) the configuration needs{}",
        also_refused(*.refused)
    )]
    TokenLacks {
        /// `token lacks ...` lines printed.
        lacking: usize,
        /// Keys refused by policy.
        refused: usize,
    },
    /// I/O on the terminal, a component file or the listener.
    #[error("{0}")]
    Io(String),
}

/// `; N key(s) refused by policy`, or nothing when none is.
fn also_refused(refused: usize) -> String {
    if refused == 0 {
        String::new()
    } else {
        format!("; {refused} key(s) refused by policy")
    }
}

/// Parses arguments, runs the command, and turns the outcome into an exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let serving = matches!(cli.command, Command::Serve);
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // The stderr of `serve` is the service's log: in JSON, its last line is
            // JSON too. Other commands, and a configuration that could not be read
            // (the log's format unknown), end with one `error:` line.
            if serving
                && telemetry::installed() == Some(LogFormat::Json)
                && tracing::enabled!(tracing::Level::ERROR)
            {
                tracing::error!(error = %e, "dcvv-gateway serve stopped");
            } else {
                eprintln!("error: {e}");
            }
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<(), CliError> {
    let command = match cli.command {
        // The built-in defaults are the code's: no configuration file, no token.
        Command::Config(ConfigCommand::Defaults) => {
            telemetry::init(LogFormat::Text, false);
            print_defaults();
            return Ok(());
        }
        // A new secret needs neither the configuration nor the token.
        Command::Clients(cmd) => {
            telemetry::init(LogFormat::Text, false);
            return clients::run(cmd);
        }
        command => command,
    };
    // The configuration names the log's format, so it is read first; nothing
    // logs while it loads, and its errors are the `error:` line of `main`.
    let settings = Settings::load(&cli.config)?;
    telemetry::init(settings.log.format, matches!(command, Command::Serve));
    match command {
        Command::Config(_) | Command::Clients(_) => Ok(()), // handled above
        Command::Serve => {
            crate::gateway::run_blocking(settings).map_err(|e| CliError::Io(e.to_string()))
        }
        Command::Keys(cmd) => with_token(&settings, |token| keys(token, cmd, &settings.programmes)),
        Command::Hsm(HsmCommand::Check) => with_token(&settings, |token| check(token, &settings)),
        Command::Bench(BenchCommand::Engine { seconds, json }) => {
            with_token(&settings, |token| bench::engine(token, seconds, json))
        }
        Command::Audit(cmd) => with_token(&settings, |token| audit::run(token, cmd)),
    }
}

/// Opens the token, runs a command, and finalizes the library whatever the outcome.
///
/// # Errors
/// The token's error opening or finalizing it, or the command's.
pub fn with_token(
    settings: &Settings,
    command: impl FnOnce(&Token) -> Result<(), CliError>,
) -> Result<(), CliError> {
    let token = Token::open(&settings.hsm)?;
    let outcome = command(&token);
    let closed = token.finalize();
    outcome?;
    Ok(closed?)
}

fn keys(token: &Token, cmd: KeysCommand, programmes: &Programmes) -> Result<(), CliError> {
    match cmd {
        KeysCommand::Generate { kind, label } => {
            let (kind, label) = parse_kind_label(&kind, &label)?;
            print_created(&token.generate_key(kind, &label)?);
            Ok(())
        }
        KeysCommand::Import {
            kind,
            label,
            component_files,
        } => {
            let (kind, label) = parse_kind_label(&kind, &label)?;
            token.ensure_label_free(&label)?;
            let components = if component_files.is_empty() {
                prompt_components(kind)?
            } else {
                read_components(kind, &component_files)?
            };
            print_created(&token.import_key(kind, &label, &components)?);
            Ok(())
        }
        KeysCommand::WrappingKey { label, out, export } => {
            let label: KeyLabel = label.parse()?;
            // The file is created first, so a key is never generated without its export.
            let file = out
                .as_ref()
                .map(|path| {
                    std::fs::File::create_new(path).map_err(|e| {
                        CliError::Io(format!("public key file {}: {}", path.display(), e.kind()))
                    })
                })
                .transpose()?;
            let key = if export {
                token.wrapping_key(&label)?
            } else {
                token.generate_wrapping_key(&label)?
            };
            let done = if export { "exported" } else { "created" };
            match (file, &out) {
                (Some(mut file), Some(path)) => {
                    file.write_all(key.public_key_pem.as_bytes()).map_err(|e| {
                        CliError::Io(format!("public key file {}: {}", path.display(), e.kind()))
                    })?;
                    println!(
                        "wrapping key {} (RSA-{}) {done}; public key written to {}",
                        key.label,
                        key.modulus_bits,
                        path.display()
                    );
                }
                _ => {
                    // stdout carries the PEM alone, so it can be redirected to a file.
                    let _ = write!(std::io::stdout().lock(), "{}", key.public_key_pem);
                    eprintln!(
                        "wrapping key {} (RSA-{}) {done}; public key above",
                        key.label, key.modulus_bits
                    );
                }
            }
            Ok(())
        }
        KeysCommand::ImportWrapped {
            kind,
            label,
            wrapping_key,
            wrapped_file,
            kcv,
            oaep_hash,
        } => {
            let (kind, label) = parse_kind_label(&kind, &label)?;
            let wrapping: KeyLabel = wrapping_key.parse()?;
            let kcv: Kcv = kcv.parse()?;
            let hash: OaepHash = oaep_hash.parse()?;
            let cryptogram = read_wrapped(&wrapped_file)?;
            print_created(&token.import_wrapped_key(
                kind,
                &label,
                &wrapping,
                &cryptogram,
                kcv,
                hash,
            )?);
            Ok(())
        }
        KeysCommand::List { json } => {
            let keys = token.list_keys()?;
            let usages = programmes.key_usages();
            let keys: Vec<Listed<'_>> = keys
                .iter()
                .map(|key| Listed {
                    used_by: used_by(&usages, key),
                    key,
                })
                .collect();
            if json {
                let text = serde_json::to_string(&keys).map_err(|e| CliError::Io(e.to_string()))?;
                // A closed stdout (e.g. `| head`) is not an error worth reporting.
                let _ = writeln!(std::io::stdout().lock(), "{text}");
            } else {
                print_table(&keys);
            }
            Ok(())
        }
    }
}

fn print_defaults() {
    // A closed stdout (e.g. `| head`) is not an error worth reporting.
    let _ = write!(
        std::io::stdout().lock(),
        "# dcvv-gateway {}: built-in configuration defaults, taken by every key that neither\n\
         # the config file nor the environment sets. Keys not named here have no default.\n\
         # hsm-config/gateway.toml describes every key.\n{}",
        env!("CARGO_PKG_VERSION"),
        crate::config::defaults_toml()
    );
}

fn parse_kind_label(kind: &str, label: &str) -> Result<(KeyKind, KeyLabel), CliError> {
    Ok((kind.parse()?, label.parse()?))
}

fn read_components(kind: KeyKind, files: &[PathBuf]) -> Result<Vec<Component>, CliError> {
    files
        .iter()
        .enumerate()
        .map(|(i, path)| {
            let text = zeroize::Zeroizing::new(std::fs::read_to_string(path).map_err(|e| {
                CliError::Io(format!("component file {}: {}", path.display(), e.kind()))
            })?);
            Ok(Component::parse(&text, kind, i + 1)?)
        })
        .collect()
}

/// A wrapped key from a file: hex digits (whitespace allowed, as AWS Payment
/// Cryptography's `WrappedKeyCryptogram`), or the raw cryptogram.
fn read_wrapped(path: &std::path::Path) -> Result<Vec<u8>, CliError> {
    let bytes = std::fs::read(path)
        .map_err(|e| CliError::Io(format!("wrapped key file {}: {}", path.display(), e.kind())))?;
    if bytes
        .iter()
        .all(|b| b.is_ascii_hexdigit() || b.is_ascii_whitespace())
    {
        let digits: Vec<u8> = bytes
            .into_iter()
            .filter(|b| !b.is_ascii_whitespace())
            .collect();
        hex::decode(digits).map_err(|_| {
            CliError::Io(format!(
                "wrapped key file {}: an odd number of hex digits",
                path.display()
            ))
        })
    } else {
        Ok(bytes)
    }
}

fn prompt_components(kind: KeyKind) -> Result<Vec<Component>, CliError> {
    let digits = kind.key_len() * 2;
    let mut components = Vec::new();
    for position in 1..=3 {
        let optional = if position == 3 {
            ", empty to finish with two"
        } else {
            ""
        };
        let text = zeroize::Zeroizing::new(
            rpassword::prompt_password(format!(
                "Component {position} ({digits} hex digits, not echoed{optional}): "
            ))
            .map_err(|e| {
                CliError::Io(format!(
                    "cannot read a component from the terminal: {}",
                    e.kind()
                ))
            })?,
        );
        if position == 3 && text.trim().is_empty() {
            break;
        }
        components.push(Component::parse(&text, kind, position)?);
    }
    Ok(components)
}

fn print_created(created: &CreatedKey) {
    for (i, kcv) in created.component_kcvs.iter().enumerate() {
        println!("component {} KCV: {kcv}", i + 1);
    }
    println!(
        "{} key {} (version {}) created, KCV {} (computed in the token)",
        created.kind,
        created.label,
        created.label.version(),
        created.kcv
    );
}

fn attribute_summary(key: &KeyListing) -> String {
    let a = &key.attributes;
    let flag = |on: bool, name: &str| {
        if on {
            name.to_owned()
        } else {
            format!("!{name}")
        }
    };
    let usage = [
        (a.usage.encrypt, "encrypt"),
        (a.usage.decrypt, "decrypt"),
        (a.usage.sign, "sign"),
        (a.usage.verify, "verify"),
        (a.usage.wrap, "wrap"),
        (a.usage.unwrap, "unwrap"),
        (a.usage.derive, "derive"),
    ]
    .iter()
    .filter(|(on, _)| *on)
    .map(|(_, n)| *n)
    .collect::<Vec<_>>()
    .join("+");
    format!(
        "{} {} {} {} {} usage={}",
        flag(a.token, "token"),
        flag(a.private, "private"),
        flag(a.sensitive, "sensitive"),
        flag(a.extractable, "extractable"),
        flag(a.modifiable, "modifiable"),
        if usage.is_empty() { "none" } else { &usage }
    )
}

/// A key of `keys list` with the configured programmes' use of it (key rotation).
#[derive(serde::Serialize)]
struct Listed<'a> {
    #[serde(flatten)]
    key: &'a KeyListing,
    /// `{programme, role: current | previous, accept_until}` per programme naming it.
    used_by: Vec<UsedBy>,
}

#[derive(serde::Serialize)]
struct UsedBy {
    programme: String,
    role: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    accept_until: Option<String>,
}

fn used_by(usages: &BTreeMap<String, Vec<rotation::KeyUsage>>, key: &KeyListing) -> Vec<UsedBy> {
    // A CVK's KA‖KA twin (`LABEL:ka`) is used with its CVK.
    let main = key
        .label
        .strip_suffix(":ka")
        .filter(|_| key.role == "single-des")
        .unwrap_or(&key.label);
    usages
        .get(main)
        .into_iter()
        .flatten()
        .map(|u| UsedBy {
            programme: u.programme.clone(),
            role: u.role.as_str(),
            accept_until: u.accept_until_ms.and_then(rfc3339_ms),
        })
        .collect()
}

/// RFC 3339 UTC text of Unix milliseconds (second precision).
fn rfc3339_ms(ms: u64) -> Option<String> {
    let seconds = i64::try_from(ms / 1000).ok()?;
    time::OffsetDateTime::from_unix_timestamp(seconds)
        .ok()?
        .format(&time::format_description::well_known::Rfc3339)
        .ok()
}

fn print_table(keys: &[Listed<'_>]) {
    let mut out = std::io::stdout().lock();
    // A closed stdout (e.g. `| head`) is not an error worth reporting.
    let _ = writeln!(
        out,
        "{:<28} {:<11} {:<10} {:>3} {:<6} {:<8} ATTRIBUTES / USED BY",
        "LABEL", "KIND", "ROLE", "VER", "KCV", "POLICY"
    );
    for Listed { key: k, used_by } in keys {
        let kcv = k.kcv.map_or_else(|| "-".to_owned(), |c| c.to_string());
        let policy = if k.violations.is_empty() {
            "ok"
        } else {
            "TOO-WIDE"
        };
        let used: Vec<String> = used_by
            .iter()
            .map(|u| match &u.accept_until {
                Some(until) => format!("{}:{}(until={until})", u.programme, u.role),
                None => format!("{}:{}", u.programme, u.role),
            })
            .collect();
        let used = if used.is_empty() {
            String::new()
        } else {
            format!(" used-by={}", used.join(","))
        };
        let _ = writeln!(
            out,
            "{:<28} {:<11} {:<10} {:>3} {:<6} {:<8} {}{used}",
            k.label,
            k.kind.as_str(),
            k.role,
            k.version,
            kcv,
            policy,
            attribute_summary(k)
        );
    }
}

fn check(token: &Token, settings: &Settings) -> Result<(), CliError> {
    // What the configured keys need of the token, the same check `serve` makes.
    let needs = crate::gateway::mechanism_needs(settings);
    let lacks = crate::gateway::check_mechanisms(token, &needs)?;
    for need in needs.iter() {
        match lacks.iter().find(|l| l.need == *need) {
            Some(lack) => println!("{lack}"),
            None => println!("token has {need}"),
        }
    }
    let keys = token.list_keys()?;
    let mut refused = 0;
    for key in &keys {
        if key.violations.is_empty() {
            println!("ok        {} ({} {})", key.label, key.kind, key.role);
        } else {
            refused += 1;
            println!(
                "TOO WIDE  {} ({} {}): {}",
                key.label,
                key.kind,
                key.role,
                key.violations.join(", ")
            );
        }
    }
    // Load every main key the way the engine does: resolution, policy and KCV.
    for key in keys
        .iter()
        .filter(|k| k.role == "main" && k.violations.is_empty())
    {
        let label: KeyLabel = key.label.parse()?;
        if let Err(e) = token.load_key(&label, key.kind) {
            refused += 1;
            println!("REFUSED   {}: {e}", key.label);
        }
    }
    if keys.is_empty() {
        println!("no gateway keys in the token");
    }
    if !lacks.is_empty() {
        return Err(CliError::TokenLacks {
            lacking: lacks.len(),
            refused,
        });
    }
    if refused > 0 {
        return Err(CliError::PolicyViolations(refused));
    }
    println!("{} key object(s) checked, all within policy", keys.len());
    Ok(())
}
