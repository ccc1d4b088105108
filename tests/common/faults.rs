//! Faults of the token for the fault tests (issue 4, part 5): taking this test
//! process's SoftHSM token away and putting it back, and changing its PIN file.
//!
//! SoftHSM keeps each token in a directory under `tokens/` named by a UUID; the
//! one of this process is found by its unique label in `token.object`. Taking
//! it away renames the directory out of `tokens/` (to `away/<label>`, same file
//! system, so it is one atomic rename): as root, `chmod 000` does not take it
//! away (root ignores the mode; checked in `tests/token_faults.rs`). Only this
//! process's own token moves, so no other test process is affected. A guard
//! puts the token back if the test fails half-way.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::TOKEN;

/// The directory of this process's token under `tokens/`.
pub fn token_dir() -> PathBuf {
    let token = &*TOKEN;
    let tokens = token.dir.join("tokens");
    let mut found = Vec::new();
    for entry in std::fs::read_dir(&tokens).unwrap().flatten() {
        let Ok(bytes) = std::fs::read(entry.path().join("token.object")) else {
            continue;
        };
        // The label is stored as 32 bytes padded with spaces.
        let mut padded = token.label.clone().into_bytes();
        padded.resize(32, b' ');
        if bytes.windows(padded.len()).any(|w| w == padded.as_slice()) {
            found.push(entry.path());
        }
    }
    assert_eq!(
        found.len(),
        1,
        "exactly one token directory carries label {}: {found:?}",
        token.label
    );
    found.pop().unwrap()
}

/// The token while it is away; puts it back when dropped.
pub struct Away {
    home: PathBuf,
    away: PathBuf,
    back: bool,
}

/// Moves this process's token directory out of SoftHSM's token directory.
pub fn take_token_away() -> Away {
    let home = token_dir();
    let dir = TOKEN.dir.join("away");
    std::fs::create_dir_all(&dir).unwrap();
    prune_stranded(&dir);
    let away = dir.join(&TOKEN.label);
    std::fs::rename(&home, &away).unwrap();
    assert!(!home.exists());
    Away {
        home,
        away,
        back: false,
    }
}

impl Away {
    /// Moves the token directory back where it was.
    pub fn put_back(mut self) {
        self.restore();
    }

    fn restore(&mut self) {
        if !self.back {
            std::fs::rename(&self.away, &self.home).unwrap();
            self.back = true;
        }
    }
}

impl Drop for Away {
    fn drop(&mut self) {
        if !self.back {
            let _ = std::fs::rename(&self.away, &self.home);
            self.back = true;
        }
    }
}

/// Deletes tokens stranded in `away/` by test processes killed before their
/// guard ran: those whose owner file is gone (pruned) and that are over ten
/// minutes old. A live process's token always has its owner file.
fn prune_stranded(dir: &std::path::Path) {
    let owners = TOKEN.dir.join("owners");
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let old = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| std::time::SystemTime::now().duration_since(t).ok())
            .is_some_and(|age| age > Duration::from_secs(600));
        if old && !owners.join(entry.file_name()).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// Replaces the PIN file's content; returns the right PIN to put back with
/// [`set_pin`].
pub fn set_pin(pin: &str) -> String {
    let old = std::fs::read_to_string(&TOKEN.pin_file).unwrap();
    std::fs::write(&TOKEN.pin_file, format!("{pin}\n")).unwrap();
    old.trim_end().to_owned()
}

/// Polls `check` every 50 ms until it returns `Some`, at most `limit`; returns
/// the value and how long it took, or panics naming `what`.
pub async fn within<T, F, Fut>(limit: Duration, what: &str, mut check: F) -> (T, Duration)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let started = Instant::now();
    loop {
        if let Some(value) = check().await {
            return (value, started.elapsed());
        }
        assert!(
            started.elapsed() < limit,
            "{what}: not within {} ms",
            limit.as_millis()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
