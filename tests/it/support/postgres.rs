//! Test harness: a throwaway PostgreSQL cluster for this test process, from the
//! server binaries of Debian's `postgresql` package (`/usr/lib/postgresql/*/bin`).
//!
//! The first use in a process runs `initdb` into a new temporary directory, picks a
//! free port, and starts the server with `pg_ctl` listening on 127.0.0.1 and on a
//! unix socket inside that directory. PostgreSQL refuses to run as root, so under
//! root the directory is given to the `postgres` user and the binaries run through
//! `runuser -u postgres --`. TCP logins need the password (SCRAM), which the tests
//! hand to the gateway through `database_password_file`, as in production.
//!
//! The server speaks TLS too (`ssl = on`, a self-signed certificate for `localhost`
//! and `127.0.0.1` whose PEM is `ca_file()`), so URLs with `sslmode=verify-full`
//! can be tested; sqlx's default (`prefer`) uses it as well.
//!
//! A watchdog (`setsid -f sh -c …`, outside the test's process group so a killed test
//! does not take it along) waits for this process to exit, however it exits, then
//! stops the server (`-m immediate`) and deletes the directory: no server outlives
//! its test. Every test takes its own database (`fresh_database`).
//!
//! Missing binaries are a failure with the fix in the message, never a skip.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::str::FromStr;
use std::sync::LazyLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::{ConnectOptions, Connection};

/// The running cluster of this test process.
pub struct PgCluster {
    bin: PathBuf,
    /// Temporary directory: `data/`, the socket, the log, the password file.
    pub root: PathBuf,
    pub port: u16,
    password: String,
    /// `runuser -u postgres --` when this process runs as root.
    run_as_postgres: bool,
}

pub static PG: LazyLock<PgCluster> = LazyLock::new(PgCluster::start);

/// Where Debian (and the PGDG packages) put the server binaries; the newest wins.
fn server_bin_dir() -> PathBuf {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = entry.path().join("bin");
            (bin.join("initdb").is_file() && bin.join("pg_ctl").is_file()).then_some((version, bin))
        })
        .collect();
    found.sort();
    match found.pop() {
        Some((_, bin)) => bin,
        None => panic!(
            "PostgreSQL server binaries not found (no /usr/lib/postgresql/*/bin/initdb and \
             pg_ctl): the PostgreSQL store tests need them. Install them with \
             ./softhsm-setup.sh --deps-only (or apt-get install postgresql)"
        ),
    }
}

fn uid_of(user: &str) -> Option<(u32, u32)> {
    let id = |flag: &str| {
        Command::new("id")
            .args([flag, user])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .and_then(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .trim()
                    .parse::<u32>()
                    .ok()
            })
    };
    Some((id("-u")?, id("-g")?))
}

use super::random_hex;
use super::serve::free_port;

impl PgCluster {
    fn start() -> PgCluster {
        let bin = server_bin_dir();
        let as_root = std::fs::metadata("/proc/self")
            .map(|m| m.uid())
            .unwrap_or(1)
            == 0;
        let root =
            std::env::temp_dir().join(format!("dcvv-pg-{}-{}", std::process::id(), random_hex(4)));
        std::fs::create_dir_all(&root).unwrap();
        let password = random_hex(16);
        let pwfile = root.join("superuser.pw");
        std::fs::write(&pwfile, format!("{password}\n")).unwrap();
        if as_root {
            let (uid, gid) = uid_of("postgres").expect(
                "running as root, but there is no `postgres` user to run the server as \
                 (install Debian's postgresql package: ./softhsm-setup.sh --deps-only)",
            );
            std::os::unix::fs::chown(&root, Some(uid), Some(gid)).unwrap();
            std::os::unix::fs::chown(&pwfile, Some(uid), Some(gid)).unwrap();
        }
        let cluster = PgCluster {
            bin,
            root,
            port: free_port(),
            password,
            run_as_postgres: as_root,
        };
        cluster.spawn_watchdog();
        let data = cluster.data_dir();
        cluster.run(
            "initdb",
            &[
                "-D",
                data.to_str().unwrap(),
                "-U",
                "postgres",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "--pwfile",
                pwfile.to_str().unwrap(),
                "-E",
                "UTF8",
                "--locale=C.UTF-8",
                "--no-sync",
            ],
        );
        let _ = std::fs::remove_file(&pwfile);
        let tls = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()])
            .unwrap();
        let (cert, key) = (
            cluster.root.join("server.crt"),
            cluster.root.join("server.key"),
        );
        std::fs::write(&cert, tls.cert.pem()).unwrap();
        std::fs::write(cluster.ca_file(), tls.cert.pem()).unwrap();
        std::fs::write(&key, tls.key_pair.serialize_pem()).unwrap();
        std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        if as_root {
            let (uid, gid) = uid_of("postgres").unwrap();
            for file in [&cert, &key] {
                std::os::unix::fs::chown(file, Some(uid), Some(gid)).unwrap();
            }
        }
        // Settings for a test server: small, quick to stop; fsync stays on.
        let conf = format!(
            "\nport = {}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\n\
             max_connections = 200\nshared_buffers = 16MB\nlog_min_messages = warning\n\
             ssl = on\nssl_cert_file = '{}'\nssl_key_file = '{}'\n",
            cluster.port,
            cluster.root.display(),
            cert.display(),
            key.display()
        );
        let conf_path = data.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf_path).unwrap();
        text.push_str(&conf);
        std::fs::write(&conf_path, text).unwrap();
        cluster.start_server();
        cluster
    }

    fn data_dir(&self) -> PathBuf {
        self.root.join("data")
    }

    fn command(&self, program: &str) -> Command {
        let path = self.bin.join(program);
        if self.run_as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(path);
            c
        } else {
            Command::new(path)
        }
    }

    fn run(&self, program: &str, args: &[&str]) {
        let out = self
            .command(program)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
        assert!(
            out.status.success(),
            "{program} {args:?} failed: {}{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(self.root.join("server.log")).unwrap_or_default()
        );
    }

    /// Stops the server and deletes the directory once this process has exited.
    fn spawn_watchdog(&self) {
        let pg_ctl = self.bin.join("pg_ctl");
        let stop = if self.run_as_postgres {
            format!("runuser -u postgres -- {} ", pg_ctl.display())
        } else {
            format!("{} ", pg_ctl.display())
        };
        let script = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 0.5; done; \
             {stop} -D '{data}' -m immediate stop >/dev/null 2>&1; rm -rf '{root}'",
            pid = std::process::id(),
            data = self.data_dir().display(),
            root = self.root.display(),
        );
        // `setsid -f` forks the watchdog into its own session and returns at once.
        let started = Command::new("setsid")
            .args(["-f", "sh", "-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("setsid (util-linux) to start the PostgreSQL watchdog");
        assert!(started.success(), "setsid -f failed: {started}");
    }

    /// `pg_ctl start`, waiting until the server accepts connections.
    pub fn start_server(&self) {
        let log = self.root.join("server.log");
        self.run(
            "pg_ctl",
            &[
                "-D",
                self.data_dir().to_str().unwrap(),
                "-l",
                log.to_str().unwrap(),
                "-w",
                "-t",
                "60",
                "start",
            ],
        );
    }

    /// `pg_ctl stop -m fast`: open sessions are terminated (SQLSTATE 57P01), new
    /// connections refused, as when an operator stops the database.
    pub fn stop_server(&self) {
        self.run(
            "pg_ctl",
            &[
                "-D",
                self.data_dir().to_str().unwrap(),
                "-m",
                "fast",
                "-w",
                "stop",
            ],
        );
    }

    /// The PEM the server's TLS certificate verifies against (for `sslrootcert`).
    pub fn ca_file(&self) -> PathBuf {
        self.root.join("ca.pem")
    }

    /// The URL of `database` as the gateway is configured with it: no password.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// A file holding the superuser's password, for `database_password_file`.
    pub fn password_file(&self, dir: &Path) -> PathBuf {
        let path = dir.join("database.pw");
        std::fs::write(&path, format!("{}\n", self.password)).unwrap();
        path
    }

    pub fn password(&self) -> &str {
        &self.password
    }

    /// Connection options for `database`, password included (for raw connections).
    pub fn options(&self, database: &str) -> PgConnectOptions {
        PgConnectOptions::from_str(&self.url(database))
            .unwrap()
            .password(&self.password)
    }

    /// A raw connection to `database`, as another client would have.
    pub async fn connect(&self, database: &str) -> PgConnection {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match self.options(database).connect().await {
                Ok(conn) => return conn,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("cannot connect to the test PostgreSQL: {e}"),
            }
        }
    }

    /// Creates a new, empty database and returns its name.
    pub async fn fresh_database(&self) -> String {
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "t{}_{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let mut admin = self.connect("postgres").await;
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut admin)
            .await
            .unwrap();
        admin.close().await.unwrap();
        name
    }
}
