//! Unit tests of the configuration layers.

use clap::CommandFactory;

use super::*;

fn check_err(raw: &RawConfig, expected: &str) {
    let error = raw.validate().expect_err("should be refused").to_string();
    assert!(error.contains(expected), "{error:?} lacks {expected:?}");
}

/// `args` as clap parses them. The environment is the process's: the variables are
/// checked on the real binary (tests/integration/config.rs), not set here.
fn command_line(args: &[&str]) -> ArgMatches {
    Cli::command()
        .try_get_matches_from(std::iter::once("courier").chain(args.iter().copied()))
        .expect("valid flags")
}

#[test]
fn defaults_match_the_spec() {
    let config = Config::defaults();
    assert_eq!(config.listen, "127.0.0.1:7070".parse().unwrap());
    assert_eq!(config.data_dir, PathBuf::from("./courier-data"));
    assert_eq!(config.fsync, FsyncPolicy::Always);
    assert_eq!(config.segment_bytes, 64 * 1024 * 1024);
    assert_eq!(config.lease, Duration::from_secs(30));
    assert_eq!(config.max_attempts, 5);
    assert_eq!(config.backoff.initial, Duration::from_secs(1));
    assert_eq!(config.backoff.max, Duration::from_secs(300));
    assert_eq!(config.dedupe_window, Duration::from_secs(120));
    assert_eq!(config.limits.max_message_bytes, 1_048_576);
    assert_eq!(config.limits.max_batch_messages, 1000);
    assert_eq!(config.retention_max_age, None);
}

#[test]
fn durations_take_units_and_refuse_bare_numbers() {
    let mut raw = RawConfig::defaults();
    for (text, lease) in [
        ("250ms", 250),
        ("30s", 30_000),
        ("5m", 300_000),
        ("2h", 7_200_000),
    ] {
        raw.set("lease", text.into(), Source::Default).unwrap();
        assert_eq!(raw.validate().unwrap().lease, Duration::from_millis(lease));
    }
    raw.set("dedupe_window", "7d".into(), Source::Default)
        .unwrap();
    assert_eq!(
        raw.validate().unwrap().dedupe_window,
        Duration::from_secs(7 * 86_400)
    );
    raw.set("lease", "30".into(), Source::Default).unwrap();
    check_err(&raw, "no unit");
    raw.set("lease", "3x".into(), Source::Default).unwrap();
    check_err(&raw, "unknown unit");
    raw.set("lease", "-1s".into(), Source::Default).unwrap();
    check_err(&raw, "`lease`");
}

#[test]
fn layers_apply_in_spec_order() {
    let mut raw = RawConfig::defaults();
    let path = std::path::Path::new("courier.toml");
    raw.merge_toml(
        "lease = \"10s\"\nmax_attempts = 3\n[backoff]\ninitial = \"2s\"\n",
        path,
    )
    .unwrap();
    raw.merge_command_line(&command_line(&[
        "--max-attempts",
        "7",
        "--backoff-initial",
        "3s",
    ]))
    .unwrap();
    let config = raw.validate().unwrap();
    assert_eq!(config.lease, Duration::from_secs(10));
    assert_eq!(config.max_attempts, 7);
    assert_eq!(config.backoff.initial, Duration::from_secs(3));
}

#[test]
fn errors_name_the_key_and_its_source() {
    let mut raw = RawConfig::defaults();
    raw.merge_command_line(&command_line(&["--lease", "soon"]))
        .unwrap();
    check_err(
        &raw,
        "invalid value \"soon\" for `lease` (from flag --lease)",
    );

    let mut raw = RawConfig::defaults();
    let path = std::path::Path::new("c.toml");
    raw.merge_toml("[limits]\nmax_batch_messages = 0\n", path)
        .unwrap();
    check_err(
        &raw,
        "invalid value \"0\" for `limits.max_batch_messages` (from c.toml)",
    );

    let mut raw = RawConfig::defaults();
    let error = raw
        .merge_toml("[limits]\nmax_mesage_bytes = 5\n", path)
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("unknown key `limits.max_mesage_bytes`"),
        "{error}"
    );
}

#[test]
fn non_loopback_listen_needs_insecure() {
    let mut raw = RawConfig::defaults();
    raw.set("listen", "0.0.0.0:7070".into(), Source::Default)
        .unwrap();
    check_err(&raw, "--insecure");
    raw.merge_command_line(&command_line(&["--insecure"]))
        .unwrap();
    assert!(raw.validate().is_ok());
}

#[test]
fn token_auth_allows_a_network_listen_and_hides_the_admin_token() {
    let mut raw = RawConfig::defaults();
    raw.set("listen", "0.0.0.0:7070".into(), Source::Default)
        .unwrap();
    raw.set("auth.mode", "token".into(), Source::Default)
        .unwrap();
    raw.set("auth.admin_token", "short".into(), Source::Default)
        .unwrap();
    check_err(&raw, "at least 24");
    let secret = "0123456789abcdef0123456789abcdef";
    raw.set("auth.admin_token", secret.into(), Source::Default)
        .unwrap();
    let config = raw.validate().unwrap();
    assert_eq!(config.auth.mode, AuthMode::Token);
    assert_eq!(config.auth.admin_token.as_deref(), Some(secret));
    assert!(!format!("{config:?}").contains(secret));
    raw.set("auth.mode", "tokens".into(), Source::Default)
        .unwrap();
    check_err(&raw, "expected `none` or `token`");
}

#[test]
fn tls_files_go_together() {
    let mut raw = RawConfig::defaults();
    raw.set("tls.cert", "cert.pem".into(), Source::Default)
        .unwrap();
    check_err(&raw, "tls.cert and tls.key go together");
    raw.set("tls.key", "key.pem".into(), Source::Default)
        .unwrap();
    let tls = raw.validate().unwrap().tls.expect("TLS on");
    assert_eq!(tls.cert, PathBuf::from("cert.pem"));
    assert_eq!(tls.key, PathBuf::from("key.pem"));
}

#[test]
fn every_key_has_flag_and_env_names() {
    assert_eq!(keys().len(), 34);
    for key in keys() {
        assert_eq!(key.flag, key.name.replace(['.', '_'], "-"));
        let env = format!("COURIER_{}", key.name.replace('.', "_").to_uppercase());
        assert_eq!(key.env, env);
    }
    let key = find_key("limits.max_inbox_depth").unwrap();
    assert_eq!(key.flag, "limits-max-inbox-depth");
    assert_eq!(key.env, "COURIER_LIMITS_MAX_INBOX_DEPTH");
}

#[test]
fn help_lists_every_key_with_its_default() {
    let help = Cli::command().render_help().to_string();
    for key in keys() {
        let default = key.default.as_deref().unwrap_or("off");
        let line = help
            .split("\n      --")
            .find(|entry| entry.starts_with(&format!("{} ", key.flag)))
            .unwrap_or_else(|| panic!("--help lacks --{}:\n{help}", key.flag));
        assert!(
            line.contains(&format!("[default: {default}]")),
            "--{} does not show its default {default}: {line}",
            key.flag
        );
    }
}

#[test]
fn otel_endpoint_is_an_http_url_and_needs_the_otel_feature() {
    for bad in ["127.0.0.1:4318", "ftp://c:4318", "http://", "http:// c"] {
        let mut raw = RawConfig::defaults();
        raw.merge_command_line(&command_line(&["--otel-endpoint", bad]))
            .expect("parsed");
        check_err(&raw, "otel.endpoint");
    }
    let mut raw = RawConfig::defaults();
    raw.merge_command_line(&command_line(&["--otel-endpoint", "http://127.0.0.1:4318"]))
        .expect("parsed");
    if cfg!(feature = "otel") {
        let config = raw.validate().expect("valid");
        assert_eq!(
            config.otel.endpoint.as_deref(),
            Some("http://127.0.0.1:4318")
        );
    } else {
        check_err(&raw, "build it with the cargo feature `otel`");
    }
}
