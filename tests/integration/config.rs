//! The configuration as an operator meets it, on the real binary: a bad value from a flag, a
//! `COURIER_*` variable or the `--config` file stops the start with exit code 2 and a message
//! naming the key, the value and where it came from; the layers apply in SPEC §4's order.
#![allow(
    clippy::disallowed_methods,
    reason = "the test waits for the binary with a deadline; the server's own time is not read here"
)]

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use courier::config::{keys, ADMIN_TOKEN_VAR};

/// Runs `courier` with `args` and `env` (and no other configuration variable) until it exits;
/// returns its exit code and stderr. A start that does not fail within 20 s is a failure.
fn refused_start(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().expect("temp dir");
    let stderr_path = dir.path().join("stderr.log");
    let mut command = Command::new(env!("CARGO_BIN_EXE_courier"));
    command
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path().join("data"))
        .args(args)
        .env_remove(ADMIN_TOKEN_VAR)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr_path).expect("stderr file"));
    for key in keys() {
        command.env_remove(&key.env);
    }
    let mut child = command.envs(env.iter().copied()).spawn().expect("spawn");
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("courier {args:?} with {env:?} started instead of refusing");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let stderr = std::fs::read_to_string(&stderr_path).expect("stderr");
    (status.code(), stderr)
}

fn check_refused(args: &[&str], env: &[(&str, &str)], expected: &str) {
    let (code, stderr) = refused_start(args, env);
    assert_eq!(
        code,
        Some(2),
        "exit code of {args:?} with {env:?}: {stderr}"
    );
    assert!(
        stderr.contains(expected),
        "{args:?} with {env:?}: expected {expected:?} in:\n{stderr}"
    );
}

fn write_config(dir: &Path, text: &str) -> String {
    let path = dir.join("courier.toml");
    std::fs::write(&path, text).expect("write config");
    path.to_str().expect("UTF-8 temp path").to_owned()
}

#[test]
fn bad_values_stop_the_start_naming_key_value_and_source() {
    check_refused(
        &["--lease", "5"],
        &[],
        "invalid value \"5\" for `lease` (from flag --lease): `5` has no unit",
    );
    check_refused(
        &[],
        &[("COURIER_LEASE", "abc")],
        "invalid value \"abc\" for `lease` (from environment variable COURIER_LEASE)",
    );
    let dir = tempfile::tempdir().expect("temp dir");
    let file = write_config(dir.path(), "[limits]\nmax_batch_messages = 0\n");
    check_refused(
        &["--config", &file],
        &[],
        &format!(
            "invalid value \"0\" for `limits.max_batch_messages` (from {file}): must be at least 1"
        ),
    );
    let file = write_config(dir.path(), "[limits]\nmax_mesage_bytes = 5\n");
    check_refused(
        &["--config", &file],
        &[],
        &format!("config file {file}: unknown key `limits.max_mesage_bytes`"),
    );
    check_refused(
        &[],
        &[("COURIER_AUTH_MODE", "tokens")],
        "invalid value \"tokens\" for `auth.mode` (from environment variable COURIER_AUTH_MODE): expected `none` or `token`",
    );
    check_refused(
        &["--auth-mode", "token"],
        &[("COURIER_ADMIN_TOKEN", "short")],
        "invalid value \"(not shown)\" for `auth.admin_token` (from environment variable COURIER_ADMIN_TOKEN): expected at least 24",
    );
}

#[test]
fn layers_apply_in_spec_order() {
    // Each layer sets an invalid lease: the message names the one that won.
    let dir = tempfile::tempdir().expect("temp dir");
    let file = write_config(dir.path(), "lease = \"from-file\"\n");
    let env = [("COURIER_LEASE", "from-env")];
    check_refused(
        &["--config", &file, "--lease", "from-flag"],
        &env,
        "(from flag --lease)",
    );
    check_refused(
        &["--config", &file],
        &env,
        "(from environment variable COURIER_LEASE)",
    );
    check_refused(&["--config", &file], &[], &format!("(from {file})"));
}
