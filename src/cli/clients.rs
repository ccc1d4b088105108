//! `clients new-secret`: a new random client secret written to a file of mode
//! 600 that did not exist, never to the terminal or the log (issue 12). The
//! secret is what [`ClientSecret::generate`] makes: 32 bytes from the OS,
//! URL-safe Base64, 43 characters. The file is what a `[[clients]]` entry's
//! `secrets = [{ file = "..." }]` names; the rotation procedure is in
//! docs/operations/configuration.md.

use std::io::Write;
use std::path::{Path, PathBuf};

use clap::Subcommand;

use super::CliError;
use crate::http::signature::{ClientSecret, is_valid_apikey};

/// `clients ...`.
#[derive(Debug, Subcommand)]
pub enum ClientsCommand {
    /// Write a new random secret (43 characters) for a client to a new file of mode 600;
    /// the secret is never printed.
    NewSecret {
        /// The client's apikey (named in the message only; the file holds the secret alone).
        #[arg(long)]
        apikey: String,
        /// The file to create; refused if it exists.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
}

/// Runs a `clients` command (no configuration file, no token).
///
/// # Errors
/// A bad apikey, an existing file, or the file or the random source failing.
pub fn run(cmd: ClientsCommand) -> Result<(), CliError> {
    match cmd {
        ClientsCommand::NewSecret { apikey, out } => {
            if !is_valid_apikey(&apikey) {
                return Err(CliError::Io(
                    "--apikey: 1 to 64 printable characters".into(),
                ));
            }
            let secret = ClientSecret::generate()
                .map_err(|e| CliError::Io(format!("the OS random source failed: {e}")))?;
            write_new(&out, secret.expose())?;
            println!(
                "wrote a new secret for client {apikey} to {} (mode 600, 43 characters); \
                 add it to the client's secrets, reload or restart, then hand it over",
                out.display()
            );
            Ok(())
        }
    }
}

/// Creates `path` (never overwrites) with mode 600 and writes `text` and a newline.
fn write_new(path: &Path, text: &str) -> Result<(), CliError> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options
        .open(path)
        .map_err(|e| CliError::Io(format!("{}: {e}", path.display())))?;
    file.write_all(text.as_bytes())
        .and_then(|()| file.write_all(b"\n"))
        .and_then(|()| file.sync_all())
        .map_err(|e| CliError::Io(format!("{}: {e}", path.display())))
}
