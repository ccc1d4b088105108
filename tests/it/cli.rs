//! The key-ceremony command line against a real SoftHSM token: what it prints,
//! what it refuses, and that a refusal creates nothing.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::support;

const K: &str = "0123456789ABCDEFFEDCBA9876543210";
const C1: &str = "11111111111111112222222222222222";

fn xor_hex(a: &str, b: &str) -> String {
    let (a, b) = (hex::decode(a).unwrap(), hex::decode(b).unwrap());
    hex::encode_upper(a.iter().zip(&b).map(|(x, y)| x ^ y).collect::<Vec<u8>>())
}

struct Ceremony {
    dir: tempfile::TempDir,
    config: PathBuf,
}

impl Ceremony {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let config = support::config_file(dir.path());
        Ceremony { dir, config }
    }

    fn file(&self, name: &str, text: &str) -> String {
        let path = self.dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    }

    fn run(&self, args: &[&str]) -> (bool, String, String) {
        support::gateway(&self.config, args)
    }

    fn listing(&self) -> Value {
        let (ok, stdout, stderr) = self.run(&["keys", "list", "--json"]);
        assert!(ok, "{stderr}");
        serde_json::from_str(&stdout).unwrap()
    }

    /// The listed keys whose label starts with `prefix` (other tests of this
    /// process may be adding keys of their own meanwhile).
    fn listing_of(&self, prefix: &str) -> Vec<Value> {
        self.listing()
            .as_array()
            .unwrap()
            .iter()
            .filter(|k| k["label"].as_str().unwrap().starts_with(prefix))
            .cloned()
            .collect()
    }

    fn import(&self, kind: &str, label: &str, components: &[&str]) -> (bool, String, String) {
        let mut args = vec!["keys", "import", "--kind", kind, "--label", label];
        let files: Vec<String> = components
            .iter()
            .enumerate()
            .map(|(i, c)| self.file(&format!("c{i}.hex"), &format!("{c}\n")))
            .collect();
        for f in &files {
            args.push("--component-file");
            args.push(f);
        }
        self.run(&args)
    }
}

fn entry<'a>(listing: &'a Value, label: &str) -> Option<&'a Value> {
    listing
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["label"] == label)
}

fn assert_one_line_error(stderr: &str, expected: &str) {
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line expected: {stderr}");
    assert_eq!(lines[0], format!("error: {expected}"));
}

#[test]
fn import_prints_component_and_final_kcvs_and_lists_the_key() {
    let c = Ceremony::new();
    let c2 = xor_hex(K, C1);
    let (ok, stdout, stderr) = c.import("cvk", "cli-cvk-v3", &[C1, &c2]);
    assert!(ok, "{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{stdout}");
    assert!(lines[0].starts_with("component 1 KCV: "));
    assert!(lines[1].starts_with("component 2 KCV: "));
    assert_eq!(
        lines[2],
        "cvk key cli-cvk-v3 (version 3) created, KCV 08D7B4 (computed in the token)"
    );
    // Neither component nor the key is echoed anywhere.
    for secret in [C1, &c2, K] {
        assert!(!stdout.contains(secret) && !stderr.contains(secret));
    }

    let listing = c.listing();
    let key = entry(&listing, "cli-cvk-v3").expect("listed");
    assert_eq!(key["kind"], "cvk");
    assert_eq!(key["version"], 3);
    assert_eq!(key["kcv"], "08D7B4");
    assert_eq!(key["attributes"]["sensitive"], true);
    assert_eq!(key["attributes"]["extractable"], false);
    assert_eq!(key["attributes"]["modifiable"], false);
    assert_eq!(key["attributes"]["encrypt"], true);
    assert_eq!(key["attributes"]["decrypt"], false);
    assert_eq!(
        key["attributes"]["allowed_mechanisms"],
        serde_json::json!(["CKM_DES3_ECB"])
    );
    assert_eq!(key["violations"], serde_json::json!([]));
    assert_eq!(
        entry(&listing, "cli-cvk-v3:ka").expect("KA||KA listed")["role"],
        "single-des"
    );
}

#[test]
fn three_components_combine() {
    let c = Ceremony::new();
    let c2 = "0F0F0F0F0F0F0F0FF0F0F0F0F0F0F0F0";
    let c3 = xor_hex(&xor_hex(K, C1), c2);
    let (ok, stdout, stderr) = c.import("imk-tdcvv2", "cli-imk3", &[C1, c2, &c3]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("component 3 KCV: "));
    assert!(stdout.ends_with(
        "imk-tdcvv2 key cli-imk3 (version 1) created, KCV 08D7B4 (computed in the token)\n"
    ));
}

#[test]
fn refused_imports_create_nothing() {
    let c = Ceremony::new();
    assert!(c.import("cvk", "ref-taken", &[C1, &xor_hex(K, C1)]).0);
    let before = c.listing_of("ref-");
    assert_eq!(before.len(), 2, "ref-taken and ref-taken:ka");
    let c2 = xor_hex(K, C1);
    let cases: Vec<(&str, &str, Vec<&str>, String)> = vec![
        ("cvk", "ref-new-a", vec![C1, "0123"], "component 2 is not 32 hex digits".into()),
        ("cvk", "ref-new-b", vec![C1, "0123456789ABCDEFFEDCBA987654321G"], "component 2 is not 32 hex digits".into()),
        ("cvk", "ref-new-c", vec![C1, C1], "components 1 and 2 are the same".into()),
        ("cvk", "ref-new-d", vec![C1, &c2, C1], "components 1 and 3 are the same".into()),
        ("cvk", "ref-new-e", vec![C1], "a key is imported from 2 or 3 components, not 1".into()),
        ("cvk", "ref-new-f", vec![C1, &c2, K, "22222222222222222222222222222222"], "a key is imported from 2 or 3 components, not 4".into()),
        ("cvk", "ref-taken", vec![C1, &c2], "a key with label ref-taken already exists".into()),
        ("pan-index", "ref-new-g", vec![C1, &c2], "component 1 is not 64 hex digits".into()),
        ("des", "ref-new-h", vec![C1, &c2], "unknown key kind \"des\" (expected one of cvk, imk-dcvv, imk-tdcvv2, imk-ac, imk-cvc3, pan-index, audit-seal)".into()),
        ("cvk", "bad label", vec![C1, &c2], "a key label is 1 to 64 characters of A-Z a-z 0-9 . _ -".into()),
    ];
    for (kind, label, components, expected) in cases {
        let (ok, stdout, stderr) = c.import(kind, label, &components);
        assert!(!ok, "{label}: {stdout}");
        assert_one_line_error(&stderr, &expected);
        assert_eq!(c.listing_of("ref-"), before, "{label} changed the token");
    }
}

#[test]
fn generate_every_kind_and_refuse_a_taken_label() {
    let c = Ceremony::new();
    for kind in ["cvk", "imk-dcvv", "imk-tdcvv2", "pan-index", "audit-seal"] {
        let label = format!("cli-gen-{kind}-v2");
        let (ok, stdout, stderr) = c.run(&["keys", "generate", "--kind", kind, "--label", &label]);
        assert!(ok, "{stderr}");
        assert!(
            stdout.starts_with(&format!("{kind} key {label} (version 2) created, KCV ")),
            "{stdout}"
        );
    }
    let listing = c.listing();
    for kind in ["cvk", "imk-dcvv", "imk-tdcvv2", "pan-index", "audit-seal"] {
        let key = entry(&listing, &format!("cli-gen-{kind}-v2")).unwrap();
        assert_eq!(key["kind"], kind);
        assert_eq!(key["kcv"].as_str().unwrap().len(), 6);
        assert_eq!(key["violations"], serde_json::json!([]));
    }
    let (ok, _, stderr) = c.run(&[
        "keys",
        "generate",
        "--kind",
        "cvk",
        "--label",
        "cli-gen-cvk-v2",
    ]);
    assert!(!ok);
    assert_one_line_error(&stderr, "a key with label cli-gen-cvk-v2 already exists");
    let ours = |l: &Value| -> Vec<Value> {
        l.as_array()
            .unwrap()
            .iter()
            .filter(|k| k["label"].as_str().unwrap().starts_with("cli-gen-"))
            .cloned()
            .collect()
    };
    assert_eq!(ours(&c.listing()), ours(&listing));

    let (ok, table, _) = c.run(&["keys", "list"]);
    assert!(ok);
    assert!(table.starts_with("LABEL"));
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("cli-gen-imk-dcvv-v2") && l.contains("usage=derive"))
    );
}

fn config_variant(dir: &Path, from: &Path, edit: impl Fn(String) -> String) -> PathBuf {
    let path = dir.join("variant.toml");
    std::fs::write(&path, edit(std::fs::read_to_string(from).unwrap())).unwrap();
    path
}

#[test]
fn startup_errors_are_one_clear_line() {
    let c = Ceremony::new();
    let module = support::module().display().to_string();
    type Edit = Box<dyn Fn(String) -> String>;
    let cases: Vec<(Edit, String)> = vec![
        (
            Box::new(|t: String| {
                t.replace(
                    &format!("token_label = {:?}", support::TOKEN.label),
                    "token_label = \"absent\"",
                )
            }),
            "no token with label \"absent\"".into(),
        ),
        (
            Box::new(move |t: String| t.replace(&module, "/nonexistent/libsofthsm2.so")),
            "PKCS#11 module not found or not loadable: /nonexistent/libsofthsm2.so".into(),
        ),
    ];
    for (edit, expected) in cases {
        let config = config_variant(c.dir.path(), &c.config, edit);
        let (ok, _, stderr) = support::gateway(&config, &["keys", "list"]);
        assert!(!ok);
        assert_one_line_error(&stderr, &expected);
    }
    let wrong = c.file("wrong.pin", "000000\n");
    let config = config_variant(c.dir.path(), &c.config, |t| {
        t.replace(&support::TOKEN.pin_file.display().to_string(), &wrong)
    });
    let (ok, _, stderr) = support::gateway(&config, &["hsm", "check"]);
    assert!(!ok);
    assert_one_line_error(&stderr, "the token refused the user PIN (wrong PIN)");

    let (ok, _, stderr) = support::gateway(Path::new("/nonexistent.toml"), &["keys", "list"]);
    assert!(!ok);
    assert_one_line_error(
        &stderr,
        "configuration: no config file at /nonexistent.toml",
    );
}

#[test]
fn mutual_tls_errors_stop_the_gateway_in_one_line() {
    let c = Ceremony::new();
    let (_, cert, key) = support::http::self_signed_tls(c.dir.path());
    let bad_ca = c.file("clients-ca.pem", "not a certificate\n");
    let with = |server: &str, client: &str| {
        config_variant(c.dir.path(), &c.config, |t| {
            format!(
                "{t}[server]\ntls_cert_file = {:?}\ntls_key_file = {:?}\n{server}\n\
                 [[programmes]]\nname = \"demo\"\nbin_prefixes = [\"412345\"]\n\
                 cvk = \"cvk-demo-v1\"\nimk_dcvv = \"imk-dcvv-demo-v1\"\n\
                 imk_tdcvv2 = \"imk-tdcvv2-demo-v1\"\nwindow_seconds = 300\n\
                 [[clients]]\napikey = \"cms\"\nsecrets = [{{ file = \"cms.secret\" }}]\n\
                 scopes = [\"keys\"]\nprogrammes = [\"*\"]\n{client}\n",
                cert.display().to_string(),
                key.display().to_string(),
            )
        })
    };
    // A pin without a client CA: refused at load, by every command.
    let config = with("", "tls_client_subject = \"CN=cms\"");
    let (ok, _, stderr) = support::gateway(&config, &["keys", "list"]);
    assert!(!ok);
    assert_one_line_error(
        &stderr,
        "configuration: clients.cms.tls_client_subject: a certificate pin needs \
         server.client_ca_file (mutual TLS), or no client certificate is asked for",
    );
    // A client CA file with no certificate: `serve` stops before it listens
    // (after its log lines of opening the token), with one error line.
    let config = with(&format!("client_ca_file = {bad_ca:?}"), "");
    let (ok, _, stderr) = support::gateway(&config, &["serve"]);
    assert!(!ok);
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error")).collect();
    assert_eq!(
        errors,
        [format!(
            "error: refusing to start: TLS: server.client_ca_file {bad_ca}: holds no PEM CERTIFICATE"
        )],
        "{stderr}"
    );
    assert!(!stderr.contains("listening"), "{stderr}");
}

#[test]
fn conforming_keys_pass_hsm_check() {
    let c = Ceremony::new();
    let kinds = ["cvk", "imk-dcvv", "imk-tdcvv2", "pan-index", "audit-seal"];
    for kind in kinds {
        let label = format!("chk-{kind}");
        let (ok, stdout, stderr) = c.run(&["keys", "generate", "--kind", kind, "--label", &label]);
        assert!(ok, "keys generate --kind {kind}: {stdout}\n{stderr}");
    }
    let (ok, stdout, stderr) = c.run(&["hsm", "check"]);
    assert!(ok, "{stdout}\n{stderr}");
    for kind in kinds {
        assert!(
            stdout.contains(&format!("ok        chk-{kind} ({kind} main)")),
            "{stdout}"
        );
    }
    assert!(
        stdout.contains("ok        chk-cvk:ka (cvk single-des)"),
        "{stdout}"
    );
    assert!(stdout.trim_end().ends_with("all within policy"), "{stdout}");
}

fn gateway_with_env(config: &Path, env: &[(&str, &str)], args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_dcvv-gateway"))
        .arg("--config")
        .arg(config)
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn environment_overrides_the_file_and_can_carry_the_pin() {
    let c = Ceremony::new();
    let (ok, _, stderr) = gateway_with_env(
        &c.config,
        &[("DCVV_GATEWAY__HSM__TOKEN_LABEL", "from-env")],
        &["keys", "list"],
    );
    assert!(!ok);
    assert_one_line_error(&stderr, "no token with label \"from-env\"");

    let (ok, _, stderr) = gateway_with_env(
        &c.config,
        &[("DCVV_GATEWAY__HSM__MAX_SESSIONS", "0")],
        &["keys", "list"],
    );
    assert!(!ok);
    assert_one_line_error(&stderr, "configuration: hsm.max_sessions: 1 to 256");

    // pin_env instead of pin_file.
    let pin = std::fs::read_to_string(&support::TOKEN.pin_file).unwrap();
    let config = config_variant(c.dir.path(), &c.config, |t| {
        t.lines()
            .map(|l| {
                if l.starts_with("pin_file") {
                    "pin_env = \"DCVV_TEST_PIN\"".to_owned()
                } else {
                    l.to_owned()
                }
            })
            .collect::<Vec<_>>()
            .join("\n")
    });
    let (ok, _, stderr) =
        gateway_with_env(&config, &[("DCVV_TEST_PIN", pin.trim())], &["hsm", "check"]);
    assert!(ok, "{stderr}");
    let (ok, _, stderr) = gateway_with_env(&config, &[], &["hsm", "check"]);
    assert!(!ok);
    assert_one_line_error(
        &stderr,
        "cannot read the user PIN: environment variable DCVV_TEST_PIN is not set",
    );
}

/// A config with only the keys that have no default: one programme, one client.
const WITHOUT_DEFAULTS: &str = r#"
[hsm]
module = "/usr/lib/softhsm/libsofthsm2.so"
token_label = "dcvv-dev"
pin_file = "user.pin"
[server]
tls_cert_file = "server.pem"
tls_key_file = "server.key"
[[programmes]]
name = "demo"
bin_prefixes = ["412345"]
cvk = "cvk-demo-v1"
imk_dcvv = "imk-dcvv-demo-v1"
imk_tdcvv2 = "imk-tdcvv2-demo-v1"
window_seconds = 300
[[clients]]
apikey = "cms"
secrets = [{ file = "cms.secret" }]
scopes = ["keys"]
programmes = ["*"]
"#;

/// Keys of the committed gateway.toml that have no built-in default.
const NO_DEFAULT: &[&str] = &[
    "hsm.module",
    "hsm.token_label",
    "hsm.pin_file",
    "server.tls_cert_file",
    "server.tls_key_file",
    "server.client_ca_file",
    "programmes.name",
    "programmes.bin_prefixes",
    "programmes.key_association",
    "programmes.cvk",
    "programmes.imk_dcvv",
    "programmes.imk_tdcvv2",
    "programmes.imk_ac",
    "programmes.imk_cvc3",
    "programmes.window_seconds",
    "clients.apikey",
    "clients.secrets",
    "clients.scopes",
    "clients.programmes",
    "clients.tls_client_subject",
    "clients.tls_client_spki_sha256",
];

/// The tables of a section: the section itself, or each table of an array of tables.
fn tables_of(value: &toml::Value) -> Vec<&toml::Table> {
    match value {
        toml::Value::Table(table) => vec![table],
        toml::Value::Array(tables) => tables.iter().filter_map(toml::Value::as_table).collect(),
        other => panic!("not a section: {other}"),
    }
}

#[test]
fn config_defaults_print_the_code_defaults_as_toml() {
    // No config file is read (this one does not exist), and no token is opened.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_dcvv-gateway"))
        .args(["--config", "/nonexistent.toml", "config", "defaults"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let printed = String::from_utf8(out.stdout).unwrap();
    let defaults: toml::Table = printed.parse().expect("config defaults prints TOML");
    assert!(printed.contains("# worker_threads: "), "{printed}");

    // Laid over a config that sets only the keys without a default, the printed
    // defaults change nothing the gateway loads: they are the code's defaults, and
    // every key they name exists (unknown keys are refused).
    let bare: toml::Table = WITHOUT_DEFAULTS.parse().unwrap();
    let mut with_defaults = bare.clone();
    for (section, value) in &defaults {
        let printed = tables_of(value);
        assert_eq!(printed.len(), 1, "[{section}]: one table of defaults");
        let target = with_defaults
            .entry(section.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        let targets: Vec<&mut toml::Table> = match target {
            toml::Value::Table(table) => vec![table],
            toml::Value::Array(tables) => tables
                .iter_mut()
                .filter_map(toml::Value::as_table_mut)
                .collect(),
            other => panic!("not a section: {other}"),
        };
        for table in targets {
            for (key, default) in printed[0] {
                assert!(
                    table.insert(key.clone(), default.clone()).is_none(),
                    "{section}.{key} is set by the bare config"
                );
            }
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let load = |name: &str, table: &toml::Table| {
        let path = dir.path().join(name);
        std::fs::write(&path, toml::to_string(table).unwrap()).unwrap();
        dcvv_gateway::config::Settings::load(&path)
            .unwrap_or_else(|e| panic!("{name}: {e}\n{}", toml::to_string(table).unwrap()))
    };
    assert_eq!(
        format!("{:?}", load("bare.toml", &bare)),
        format!("{:?}", load("with-defaults.toml", &with_defaults)),
    );

    // Every key the committed config sets either has a printed default or none at all.
    let committed: toml::Table = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("hsm-config/gateway.toml"),
    )
    .unwrap()
    .parse()
    .unwrap();
    for (section, value) in &committed {
        for table in tables_of(value) {
            for key in table.keys() {
                let name = format!("{section}.{key}");
                let printed = defaults
                    .get(section)
                    .map(tables_of)
                    .is_some_and(|t| t[0].contains_key(key));
                assert!(
                    printed || NO_DEFAULT.contains(&name.as_str()),
                    "{name}: no default printed"
                );
                assert!(
                    !(printed && NO_DEFAULT.contains(&name.as_str())),
                    "{name}: printed, yet listed as having no default"
                );
            }
        }
    }
}

#[test]
fn clients_new_secret_writes_a_file_of_mode_600_and_never_prints_the_secret() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let new_secret = |apikey: &str, out: &Path| {
        std::process::Command::new(env!("CARGO_BIN_EXE_dcvv-gateway"))
            .args(["--config", "/nonexistent.toml", "clients", "new-secret"])
            .args(["--apikey", apikey, "--out"])
            .arg(out)
            .output()
            .unwrap()
    };
    let path = dir.path().join("cms.secret");
    let out = new_secret("cms", &path);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(out.status.success(), "{stderr}");
    let secret = std::fs::read_to_string(&path).unwrap();
    let secret = secret.strip_suffix('\n').expect("one line");
    assert_eq!(secret.len(), 43, "32 random bytes, URL-safe Base64");
    assert!(
        secret
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    );
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert!(
        stdout.contains("cms") && stdout.contains("cms.secret"),
        "{stdout}"
    );
    assert!(!stdout.contains(secret) && !stderr.contains(secret));
    // The gateway loads it as a client secret.
    dcvv_gateway::http::signature::ClientSecret::new(zeroize::Zeroizing::new(secret.to_owned()))
        .unwrap();

    // Another secret is another value; an existing file is never overwritten.
    let other = dir.path().join("other.secret");
    assert!(new_secret("cms", &other).status.success());
    assert_ne!(std::fs::read_to_string(&other).unwrap().trim_end(), secret);
    let again = new_secret("cms", &path);
    assert!(!again.status.success());
    assert_eq!(std::fs::read_to_string(&path).unwrap().trim_end(), secret);
    // A bad apikey creates nothing.
    let refused = dir.path().join("refused.secret");
    let bad = new_secret("has space", &refused);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--apikey"));
    assert!(!refused.exists());
}
