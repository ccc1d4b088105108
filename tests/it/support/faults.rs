//! Faults of the token for the fault tests (issue 4, part 5): taking this test
//! process's SoftHSM token away and putting it back, and changing its PIN file.
//!
//! SoftHSM keeps each token in a directory under `tokens/` named by a UUID; the
//! one of this process is found by its unique label in `token.object`. Taking
//! it away renames the directory out of `tokens/` (to `away/<label>`, same file
//! system, so it is one atomic rename): as root, `chmod 000` does not take it
//! away (root ignores the mode; checked in `token_faults.rs`). A guard
//! puts the token back if the test fails half-way.
//!
//! Moving a directory in the `tokens/` directory every test process shares
//! disturbs the others: a process that initializes SoftHSM or lists its slots at
//! that moment can see a token half-gone, and `softhsm2-util --init-token` can
//! fail after creating its token (the retry then makes a second token with the
//! same label). So a fault test runs in a child process of its test binary with
//! a SoftHSM configuration and token directory of its own
//! ([`in_private_softhsm`]).

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::{TOKEN, run_in_child};

/// Set in the child process that runs a fault test's body.
const PRIVATE: &str = "DCVV_TEST_PRIVATE_SOFTHSM";

/// Runs `test` (the calling test's name as the test binary lists it,
/// `module::function`) again in a child process of this test binary whose
/// `SOFTHSM2_CONF` points at a directory of its own, so its token directory can
/// be moved without touching the shared one. Returns `true` in the child, which
/// runs the test's body; in the parent it waits for the child, fails if the
/// child failed, deletes the child's SoftHSM directory and returns `false`. Call
/// it before anything touches the token.
pub fn in_private_softhsm(test: &str) -> bool {
    if std::env::var_os(PRIVATE).is_some() {
        return true;
    }
    let shared = PathBuf::from(std::env::var("SOFTHSM2_CONF").unwrap());
    let private = shared.parent().unwrap().join("private");
    std::fs::create_dir_all(&private).unwrap();
    prune_private(&private);
    let dir = private.join(std::process::id().to_string());
    std::fs::create_dir_all(&dir).unwrap();
    let conf = dir.join("softhsm2.conf");
    // Deleted also when the child failed.
    let _cleanup = RemoveDir(dir);
    run_in_child(
        test,
        &[
            ("SOFTHSM2_CONF", conf.as_os_str()),
            (PRIVATE, OsStr::new("1")),
        ],
    );
    false
}

/// Deletes a directory when dropped.
struct RemoveDir(PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Deletes the private SoftHSM directories of parent processes that are gone.
fn prune_private(private: &Path) {
    for entry in std::fs::read_dir(private).into_iter().flatten().flatten() {
        let alive = entry
            .file_name()
            .to_str()
            .is_none_or(|pid| Path::new("/proc").join(pid).exists());
        if !alive {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

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
