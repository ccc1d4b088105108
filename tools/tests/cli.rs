//! The `dcvv-tools` command line, as a script sees it: the commands it offers,
//! and a refusal before any request when the secret's variable is unset or
//! too short (one line on stderr, a non-zero exit, nothing on stdout, the
//! secret never echoed). Calls against a real gateway are in the gateway's
//! integration tests (`tests/it/cli_call.rs`), which run this same binary.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Output};

fn tools(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_dcvv-tools"));
    command.args(args).env_remove("DCVV_TOOLS_TEST_SECRET");
    for (k, v) in env {
        command.env(k, v);
    }
    command.output().unwrap()
}

const CALL: &[&str] = &[
    "call",
    "--url",
    "http://127.0.0.1:9",
    "--apikey",
    "cms-test",
    "--secret-env",
    "DCVV_TOOLS_TEST_SECRET",
    "--data",
    "{}",
    "POST",
    "/cards/dynamic-cvv2/enquiry",
];

#[test]
fn help_names_both_commands() {
    let out = tools(&["--help"], &[]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("call"), "{text}");
    assert!(text.contains("bench"), "{text}");
    let bench = tools(&["bench", "--help"], &[]);
    assert!(String::from_utf8(bench.stdout).unwrap().contains("http"));
}

#[test]
fn call_refuses_an_unset_secret_variable_before_any_request() {
    let out = tools(CALL, &[]);
    assert!(!out.status.success());
    assert!(out.stdout.is_empty());
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains("DCVV_TOOLS_TEST_SECRET (--secret-env) is not set"),
        "{err}"
    );
}

#[test]
fn call_refuses_a_short_secret_without_echoing_it() {
    let secret = "short-secret-xyz";
    let out = tools(CALL, &[("DCVV_TOOLS_TEST_SECRET", secret)]);
    assert!(!out.status.success());
    assert!(out.stdout.is_empty());
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("DCVV_TOOLS_TEST_SECRET"), "{err}");
    assert!(!err.contains(secret), "{err}");
}
