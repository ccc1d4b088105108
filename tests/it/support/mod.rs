//! Test harness: a real SoftHSM token for this test process.
//!
//! `.cargo/config.toml` points `SOFTHSM2_CONF` at `target/softhsm-tests/`; the
//! first use in a process writes that config and creates a token with a unique
//! label and random PINs through `softhsm2-util`, before this process loads the
//! PKCS#11 library (SoftHSM only sees tokens that exist when it initializes).
//! Under nextest every test is its own process, so every test gets its own token;
//! tests also use unique key labels so they stay correct under `cargo test`,
//! which runs every test of this binary in one process. A test that needs a
//! process to itself says so with [`in_own_process`].
//! Tokens of test processes that have exited are deleted by the next test process.

pub mod disk;
pub mod faults;
pub mod http;
pub mod instances;
pub mod logs;
pub mod pki;
pub mod postgres;
pub mod reference;
pub mod routes;
pub mod serve;
pub mod trail;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, SystemTime};

use dcvv_gateway::hsm::{Component, HsmSettings, KeyKind, KeyLabel, PinSource, Token};

const MODULES: &[&str] = &[
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
    "/opt/homebrew/lib/softhsm/libsofthsm2.so",
];

/// The SoftHSM module, or a failing test that says how to install it.
pub fn module() -> PathBuf {
    MODULES
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .expect("SoftHSM is not installed: run ./softhsm-setup.sh --deps-only")
}

/// A token made for this test process.
pub struct TestToken {
    pub dir: PathBuf,
    pub label: String,
    pub pin_file: PathBuf,
}

/// `bytes` random bytes from the kernel, as hex.
pub fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut buf))
        .expect("/dev/urandom");
    hex::encode(buf)
}

fn conf_path() -> PathBuf {
    PathBuf::from(
        std::env::var("SOFTHSM2_CONF").expect("SOFTHSM2_CONF is set by .cargo/config.toml"),
    )
}

/// Deletes the tokens of earlier test runs. Each token has an owner file
/// `owners/<label>` holding its process id; a token whose process has exited and
/// which is over ten minutes old (deleting a token while another process scans
/// the slots makes that scan fail) is claimed by renaming its owner file (only
/// one process wins) and deleted, so the directory stays small however often
/// tests run.
fn prune_dead_tokens(dir: &Path, conf: &Path) {
    let owners = dir.join("owners");
    let Ok(entries) = std::fs::read_dir(&owners) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let Some(label) = path.file_name().and_then(|n| n.to_str()).map(str::to_owned) else {
            continue;
        };
        if label.starts_with('.') {
            continue;
        }
        let alive = std::fs::read_to_string(&path)
            .ok()
            .and_then(|pid| pid.trim().parse::<u32>().ok())
            .is_none_or(|pid| Path::new(&format!("/proc/{pid}")).exists());
        let recent = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| SystemTime::now().duration_since(t).ok())
            .is_none_or(|age| age < Duration::from_secs(600));
        let claimed = owners.join(format!(".{label}.{}", std::process::id()));
        if alive || recent || std::fs::rename(&path, &claimed).is_err() {
            continue;
        }
        let _ = Command::new("softhsm2-util")
            .args(["--delete-token", "--token", &label])
            .env("SOFTHSM2_CONF", conf)
            .output();
        let _ = std::fs::remove_file(&claimed);
        let _ = std::fs::remove_file(dir.join(format!("{label}.pin")));
    }
}

pub static TOKEN: LazyLock<TestToken> = LazyLock::new(|| {
    let conf = conf_path();
    let dir = conf.parent().unwrap().to_path_buf();
    let tokens = dir.join("tokens");
    std::fs::create_dir_all(&tokens).unwrap();
    std::fs::create_dir_all(dir.join("owners")).unwrap();
    // Same content from every process; written atomically.
    let text = format!(
        "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n",
        tokens.display()
    );
    let tmp = dir.join(format!("softhsm2.conf.{}", std::process::id()));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, &conf).unwrap();
    // Deleting a token while another process initializes one makes that
    // initialization fail now and then: pruning and creating hold one lock.
    let lock = std::fs::File::create(dir.join("tokens.lock")).unwrap();
    lock.lock().unwrap();
    prune_dead_tokens(&dir, &conf);

    let pin = random_hex(8);
    let so_pin = random_hex(8);
    // Seen failing once in a few hundred runs under load, without a message worth
    // acting on: a second attempt is cheap, and the last error is shown if all fail.
    // Each attempt has its own label (a failed attempt can leave a token behind,
    // and two tokens with one label make the lookup refuse both); each label is
    // owned by this process first, so pruning deletes what an attempt left.
    let mut last_error = String::new();
    let mut label = String::new();
    let created = (0..3).any(|attempt| {
        if attempt > 0 {
            std::thread::sleep(Duration::from_millis(200));
        }
        label = format!("t{}-{}", std::process::id(), &random_hex(4));
        std::fs::write(
            dir.join("owners").join(&label),
            std::process::id().to_string(),
        )
        .unwrap();
        let out = Command::new("softhsm2-util")
            .args([
                "--init-token",
                "--free",
                "--label",
                &label,
                "--pin",
                &pin,
                "--so-pin",
                &so_pin,
            ])
            .env("SOFTHSM2_CONF", &conf)
            .output()
            .expect("softhsm2-util (install SoftHSM: ./softhsm-setup.sh --deps-only)");
        last_error = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out.status.success()
    });
    drop(lock);
    assert!(created, "softhsm2-util --init-token failed: {last_error}");
    let pin_file = dir.join(format!("{label}.pin"));
    std::fs::write(&pin_file, format!("{pin}\n")).unwrap();
    TestToken {
        dir,
        label,
        pin_file,
    }
});

/// HSM settings for this process's token.
pub fn hsm_settings() -> HsmSettings {
    HsmSettings {
        module: module(),
        token_label: TOKEN.label.clone(),
        pin: PinSource::File(TOKEN.pin_file.clone()),
        max_sessions: 4,
        checkout_timeout: Duration::from_secs(5),
    }
}

/// The logged-in token of this process (one per process, as in production:
/// SoftHSM has been seen to crash at exit when a process opened two contexts).
pub static HSM: LazyLock<Arc<Token>> =
    LazyLock::new(|| Arc::new(Token::open(&hsm_settings()).expect("open the test token")));

/// Set in the child process that [`in_own_process`] runs a test's body in.
const OWN_PROCESS: &str = "DCVV_TEST_OWN_PROCESS";

/// Whether this process belongs to `test` alone (its name as the test binary
/// lists it, `module::function`), for a test that changes or counts what is
/// process-wide: the token's login or objects, the global log subscriber.
/// Under nextest it does (nextest runs every test in a process of its own);
/// under `cargo test`, which runs every test of this binary in one process, it
/// runs `test` again in a child process of this binary, waits for it, fails if
/// the child failed and returns `false`; in that child it returns `true`. Call
/// it before anything touches the token.
pub fn in_own_process(test: &str) -> bool {
    if std::env::var_os(OWN_PROCESS).is_some()
        || std::env::var("NEXTEST_EXECUTION_MODE").is_ok_and(|mode| mode == "process-per-test")
    {
        return true;
    }
    run_in_child(test, &[(OWN_PROCESS, OsStr::new("1"))]);
    false
}

/// Runs `test` (its name as the test binary lists it) in a child process of
/// this test binary with `env` added; shows the child's output and fails unless
/// the child ran exactly that test and it passed.
pub fn run_in_child(test: &str, env: &[(&str, &OsStr)]) {
    let out = Command::new(std::env::current_exe().unwrap())
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        out.status.success(),
        "{test} failed in its child process ({})",
        out.status
    );
    // A name that matched no test would pass silently: the child ran exactly it.
    assert!(
        stdout.contains("test result: ok. 1 passed"),
        "{test} did not run in its child process"
    );
}

/// A label no other test of this process uses.
pub fn unique_label(prefix: &str) -> KeyLabel {
    static N: AtomicU32 = AtomicU32::new(0);
    format!("{prefix}-{}-v1", N.fetch_add(1, Ordering::Relaxed))
        .parse()
        .unwrap()
}

/// Splits a clear key into two components (random, key XOR random), as two
/// custodians would hold it.
pub fn components(key_hex: &str, kind: KeyKind) -> Vec<Component> {
    let key = hex::decode(key_hex).unwrap();
    let a = hex::decode(random_hex(key.len())).unwrap();
    let b: Vec<u8> = key.iter().zip(&a).map(|(k, r)| k ^ r).collect();
    vec![
        Component::parse(&hex::encode(a), kind, 1).unwrap(),
        Component::parse(&hex::encode(b), kind, 2).unwrap(),
    ]
}

/// Imports a clear test key through the same path as `keys import`.
pub fn import(key_hex: &str, kind: KeyKind, prefix: &str) -> KeyLabel {
    let label = unique_label(prefix);
    HSM.import_key(kind, &label, &components(key_hex, kind))
        .unwrap();
    label
}

/// A gateway config file for this token, for CLI tests.
pub fn config_file(dir: &Path) -> PathBuf {
    let path = dir.join("gateway.toml");
    std::fs::write(
        &path,
        format!(
            "[hsm]\nmodule = {:?}\ntoken_label = {:?}\npin_file = {:?}\n",
            module().display().to_string(),
            TOKEN.label,
            TOKEN.pin_file.display().to_string()
        ),
    )
    .unwrap();
    path
}

/// Runs the gateway binary; returns (exit success, stdout, stderr).
pub fn gateway(config: &Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_dcvv-gateway"))
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A session of a second cryptoki context on this process's token, opened
/// read-write and logged in, for what the gateway would never do itself
/// (planting keys, counting objects, dropping the login). Login state is per
/// process, so logging in here is "already logged in" once the gateway has.
pub fn raw_session() -> cryptoki::session::Session {
    use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
    use cryptoki::error::{Error, RvError};
    // The token must exist before this process initializes the library.
    let token = &*TOKEN;
    let ctx = Pkcs11::new(module()).unwrap();
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(Error::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => panic!("{e}"),
    }
    let slot = ctx
        .get_slots_with_token()
        .unwrap()
        .into_iter()
        // A slot whose token another process is creating or deleting cannot be
        // read: skip it (asking for initialized tokens would fail on it).
        .find(|s| {
            ctx.get_token_info(*s).is_ok_and(|info| {
                info.token_initialized() && info.label().trim_end() == token.label
            })
        })
        .unwrap();
    let session = ctx.open_rw_session(slot).unwrap();
    let pin = std::fs::read_to_string(&token.pin_file).unwrap();
    match session.login(
        cryptoki::session::UserType::User,
        Some(&pin.trim().to_owned().into()),
    ) {
        Ok(()) | Err(Error::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
        Err(e) => panic!("{e}"),
    }
    session
}

/// Plants a CVK (both objects) behind the gateway's back, with the policy's
/// attributes except as `widen` says (e.g. `CKA_EXTRACTABLE` true).
pub fn plant_cvk(label: &KeyLabel, widen: &[cryptoki::object::Attribute]) {
    use cryptoki::mechanism::MechanismType;
    use cryptoki::object::{Attribute, KeyType, ObjectClass};
    let session = raw_session();
    for (l, id, value) in [
        (
            label.to_string(),
            b"dcvvgw:cvk".to_vec(),
            "0123456789ABCDEFFEDCBA9876543210",
        ),
        (
            label.single_des_twin(),
            b"dcvvgw:cvk:ka".to_vec(),
            "0123456789ABCDEF0123456789ABCDEF",
        ),
    ] {
        let mut template = vec![
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::DES2),
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Label(l.into_bytes()),
            Attribute::Id(id),
            Attribute::Value(hex::decode(value).unwrap()),
            Attribute::Encrypt(true),
            Attribute::Decrypt(false),
            Attribute::Derive(false),
            Attribute::Sign(false),
            Attribute::Verify(false),
            Attribute::Wrap(false),
            Attribute::Unwrap(false),
            Attribute::AllowedMechanisms(vec![MechanismType::DES3_ECB]),
        ];
        let defaults = [Attribute::Sensitive(true), Attribute::Extractable(false)];
        for d in defaults {
            if !widen
                .iter()
                .any(|w| w.attribute_type() == d.attribute_type())
            {
                template.push(d);
            }
        }
        template.extend_from_slice(widen);
        session.create_object(&template).unwrap();
    }
}

/// A second connection to a SQLite store holding its write lock (`BEGIN
/// IMMEDIATE`) until it is dropped or rolled back: the gateway's next write
/// waits for it, up to its `acquire_timeout_ms`, then answers 503.
pub async fn lock_sqlite(db: &Path) -> sqlx::SqliteConnection {
    use sqlx::Connection;
    let mut locker = sqlx::SqliteConnection::connect(&format!("sqlite://{}", db.display()))
        .await
        .unwrap();
    sqlx::query("BEGIN IMMEDIATE")
        .execute(&mut locker)
        .await
        .unwrap();
    locker
}
