//! Configuration: defaults < `--config` TOML file < `COURIER_*` environment < flags (SPEC §4).
//!
//! Every setting is a key of [`KEYS`]. The raw layer collects one string per key with the
//! place it came from ([`RawConfig`]); [`RawConfig::validate`] turns it into a typed
//! [`Config`], with durations and sizes parsed, and names the key and its source in every
//! error. Nothing here reads the clock or opens the data directory.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use courier_storage::FsyncPolicy;

/// A configuration key: its name (`a.b_c`), default (`None`: off) and meaning.
#[derive(Debug, Clone, Copy)]
pub struct Key {
    /// `a.b_c`: `[a] b_c` in TOML, `--a-b-c` as a flag, `COURIER_A_B_C` in the environment.
    pub name: &'static str,
    /// The default as written in the config table; `None` means unset (off).
    pub default: Option<&'static str>,
    /// What it does, for `--help` and the README.
    pub help: &'static str,
}

impl Key {
    /// The command-line flag: `--a-b-c`.
    pub fn flag(&self) -> String {
        self.name.replace(['.', '_'], "-")
    }

    /// The environment variable: `COURIER_A_B_C`.
    pub fn env(&self) -> String {
        format!("COURIER_{}", self.name.replace('.', "_").to_uppercase())
    }
}

const fn key(name: &'static str, default: Option<&'static str>, help: &'static str) -> Key {
    Key {
        name,
        default,
        help,
    }
}

/// Every configuration key, in the order of the README's table.
pub const KEYS: &[Key] = &[
    key(
        "listen",
        Some("127.0.0.1:7070"),
        "HTTP address (port 0: any free port)",
    ),
    key(
        "data_dir",
        Some("./courier-data"),
        "log segments, sled index, admin token",
    ),
    key(
        "fsync",
        Some("always"),
        "always | interval:<duration> | never",
    ),
    key(
        "segment_bytes",
        Some("67108864"),
        "roll to a new segment past this size",
    ),
    key(
        "retention.max_bytes",
        None,
        "delete whole old segments past this total size",
    ),
    key(
        "retention.max_age",
        None,
        "delete whole old segments older than this",
    ),
    key("lease", Some("30s"), "default lease of a delivery"),
    key(
        "max_attempts",
        Some("5"),
        "deliveries before dead-lettering",
    ),
    key(
        "backoff.initial",
        Some("1s"),
        "delay before the first redelivery after an expired lease",
    ),
    key(
        "backoff.max",
        Some("5m"),
        "longest delay before a redelivery",
    ),
    key(
        "backoff.multiplier",
        Some("2.0"),
        "growth of the delay per attempt",
    ),
    key(
        "dedupe_window",
        Some("2m"),
        "how long a client id is remembered",
    ),
    key(
        "presence_ttl",
        Some("30s"),
        "how long an agent counts as online after it was seen",
    ),
    key(
        "limits.max_message_bytes",
        Some("1048576"),
        "one message, as sent",
    ),
    key(
        "limits.max_batch_messages",
        Some("1000"),
        "messages in one batch",
    ),
    key(
        "limits.max_batch_bytes",
        Some("8388608"),
        "bytes of one batch request",
    ),
    key(
        "limits.max_inbox_depth",
        Some("1000000"),
        "ready + in-flight per agent; past it publishes get 429",
    ),
    key(
        "limits.publish_rate",
        Some("0"),
        "messages per second per sending agent (0: off)",
    ),
    key(
        "limits.max_receivers",
        Some("64"),
        "long-polls open at once per agent; past it receive gets 429",
    ),
    key(
        "limits.max_json_depth",
        Some("64"),
        "nesting of arrays and objects in a body or metadata; deeper gets 400",
    ),
    key(
        "auth.mode",
        Some("none"),
        "none (token auth is not in this build yet)",
    ),
    key(
        "auth.admin_token",
        None,
        "the admin token (with auth.mode = token)",
    ),
    key(
        "auth.signing",
        Some("false"),
        "HMAC-signed publishes (not in this build yet)",
    ),
    key(
        "tls.cert",
        None,
        "PEM certificate (TLS is not in this build yet)",
    ),
    key(
        "tls.key",
        None,
        "PEM private key (TLS is not in this build yet)",
    ),
    key("log_format", Some("text"), "text | json"),
    key(
        "log_level",
        Some("info"),
        "error | warn | info | debug | trace; RUST_LOG overrides it",
    ),
];

/// Where a value came from, for error messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// The built-in default.
    Default,
    /// The TOML file.
    File(PathBuf),
    /// An environment variable.
    Env(String),
    /// A command-line flag.
    Flag(String),
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Default => write!(f, "the default"),
            Self::File(path) => write!(f, "{}", path.display()),
            Self::Env(var) => write!(f, "environment variable {var}"),
            Self::Flag(flag) => write!(f, "flag --{flag}"),
        }
    }
}

/// A configuration error: which key, from where, and what is wrong with it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A value did not parse.
    #[error("invalid value {value:?} for `{key}` (from {origin}): {reason}")]
    Invalid {
        /// The key.
        key: &'static str,
        /// The value as given.
        value: String,
        /// Where it came from.
        origin: Source,
        /// What is wrong and what would be right.
        reason: String,
    },
    /// The TOML file could not be read or parsed, or names an unknown key.
    #[error("config file {path}: {reason}")]
    File {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// Settings that are fine alone but not together.
    #[error("{0}")]
    Conflict(String),
}

/// One string per key with its source: the merged layers before typing.
#[derive(Debug, Clone, Default)]
pub struct RawConfig {
    values: BTreeMap<&'static str, (String, Source)>,
    /// `--insecure`: allow a non-loopback `listen` without auth.
    pub insecure: bool,
}

impl RawConfig {
    /// The defaults alone.
    pub fn defaults() -> Self {
        let mut raw = Self::default();
        for key in KEYS {
            if let Some(default) = key.default {
                raw.values
                    .insert(key.name, (default.to_owned(), Source::Default));
            }
        }
        raw
    }

    /// Sets `name` from `source`; unknown names are an error.
    pub fn set(&mut self, name: &str, value: String, source: Source) -> Result<(), String> {
        let key = find_key(name)?;
        self.values.insert(key.name, (value, source));
        Ok(())
    }

    /// Merges a TOML document: top-level keys and one level of tables (`[a] b_c = ...`).
    pub fn merge_toml(&mut self, text: &str, path: &std::path::Path) -> Result<(), ConfigError> {
        let file_error = |reason: String| ConfigError::File {
            path: path.to_path_buf(),
            reason,
        };
        let table: toml::Table = text.parse().map_err(|e| file_error(format!("{e}")))?;
        let mut flat = Vec::new();
        for (name, value) in table {
            match value {
                toml::Value::Table(inner) => {
                    for (sub, value) in inner {
                        flat.push((format!("{name}.{sub}"), value));
                    }
                }
                value => flat.push((name, value)),
            }
        }
        for (name, value) in flat {
            let text = match value {
                toml::Value::String(s) => s,
                toml::Value::Integer(i) => i.to_string(),
                toml::Value::Float(x) => x.to_string(),
                toml::Value::Boolean(b) => b.to_string(),
                other => {
                    return Err(file_error(format!(
                        "`{name}` must be a string, number or boolean, not {}",
                        other.type_str()
                    )))
                }
            };
            self.set(&name, text, Source::File(path.to_path_buf()))
                .map_err(file_error)?;
        }
        Ok(())
    }

    /// Merges `COURIER_*` variables from `vars` (the process environment in production).
    pub fn merge_env(&mut self, vars: impl IntoIterator<Item = (String, String)>) {
        let vars: BTreeMap<String, String> = vars.into_iter().collect();
        for key in KEYS {
            let var = key.env();
            if let Some(value) = vars.get(&var) {
                self.values
                    .insert(key.name, (value.clone(), Source::Env(var)));
            }
        }
        // SPEC §7 names this variable for the admin token.
        if let Some(token) = vars.get("COURIER_ADMIN_TOKEN") {
            self.values.insert(
                "auth.admin_token",
                (token.clone(), Source::Env("COURIER_ADMIN_TOKEN".into())),
            );
        }
    }

    fn get(&self, name: &'static str) -> Option<&(String, Source)> {
        self.values.get(name)
    }

    fn parse<T>(
        &self,
        name: &'static str,
        parse: impl Fn(&str) -> Result<T, String>,
    ) -> Result<Option<T>, ConfigError> {
        let Some((value, source)) = self.get(name) else {
            return Ok(None);
        };
        if value == "off" && find_key(name).is_ok_and(|k| k.default.is_none()) {
            return Ok(None);
        }
        parse(value)
            .map(Some)
            .map_err(|reason| ConfigError::Invalid {
                key: name,
                value: value.clone(),
                origin: source.clone(),
                reason,
            })
    }

    fn required<T>(
        &self,
        name: &'static str,
        parse: impl Fn(&str) -> Result<T, String>,
    ) -> Result<T, ConfigError> {
        Ok(self
            .parse(name, parse)?
            .expect("every required key has a default"))
    }

    /// Types and checks every value.
    pub fn validate(&self) -> Result<Config, ConfigError> {
        let config = Config {
            listen: self.required("listen", |s| {
                s.parse::<SocketAddr>()
                    .map_err(|_| "expected an address such as 127.0.0.1:7070".into())
            })?,
            data_dir: self.required("data_dir", |s| Ok(PathBuf::from(s)))?,
            fsync: self.required("fsync", |s| {
                s.parse::<FsyncPolicy>().map_err(|e| e.to_string())
            })?,
            segment_bytes: self.required("segment_bytes", |s| parse_bytes(s, 4096))?,
            retention_max_bytes: self.parse("retention.max_bytes", |s| parse_bytes(s, 1))?,
            retention_max_age: self.parse("retention.max_age", parse_duration)?,
            lease: self.required("lease", parse_positive_duration)?,
            max_attempts: self.required("max_attempts", |s| parse_count(s, 1))?,
            backoff: Backoff {
                initial: self.required("backoff.initial", parse_duration)?,
                max: self.required("backoff.max", parse_duration)?,
                multiplier: self.required("backoff.multiplier", parse_multiplier)?,
            },
            dedupe_window: self.required("dedupe_window", parse_duration)?,
            presence_ttl: self.required("presence_ttl", parse_positive_duration)?,
            limits: Limits {
                max_message_bytes: self
                    .required("limits.max_message_bytes", |s| parse_bytes(s, 64))?,
                max_batch_messages: self
                    .required("limits.max_batch_messages", |s| parse_count(s, 1))?,
                max_batch_bytes: self.required("limits.max_batch_bytes", |s| parse_bytes(s, 64))?,
                max_inbox_depth: self.required("limits.max_inbox_depth", |s| parse_bytes(s, 1))?,
                publish_rate: self.required("limits.publish_rate", |s| parse_count(s, 0))?,
                max_receivers: self.required("limits.max_receivers", |s| parse_count(s, 1))?,
                max_json_depth: self.required("limits.max_json_depth", |s| parse_count(s, 1))?,
            },
            log_format: self.required("log_format", |s| match s {
                "text" => Ok(LogFormat::Text),
                "json" => Ok(LogFormat::Json),
                _ => Err("expected `text` or `json`".into()),
            })?,
            log_level: self.required("log_level", |s| match s {
                "error" | "warn" | "info" | "debug" | "trace" => Ok(s.to_owned()),
                _ => Err("expected error, warn, info, debug or trace".into()),
            })?,
            insecure: self.insecure,
        };
        self.check_unsupported()?;
        config.check()?;
        Ok(config)
    }

    /// Refuses settings of features this build does not have, rather than ignoring them.
    fn check_unsupported(&self) -> Result<(), ConfigError> {
        let not_yet = |name: &'static str, reason: &str| {
            let (value, source) = self
                .get(name)
                .cloned()
                .unwrap_or((String::new(), Source::Default));
            Err(ConfigError::Invalid {
                key: name,
                value,
                origin: source,
                reason: reason.into(),
            })
        };
        if self.parse("auth.mode", |s| Ok(s.to_owned()))?.as_deref() != Some("none") {
            return not_yet(
                "auth.mode",
                "this build serves without authentication only (`none`); token auth is not implemented yet",
            );
        }
        if self.parse("auth.signing", parse_bool)? == Some(true) {
            return not_yet(
                "auth.signing",
                "signed publishes are not implemented yet; set it to false",
            );
        }
        for name in ["tls.cert", "tls.key"] {
            if self.get(name).is_some() {
                return not_yet(
                    name,
                    "TLS is not implemented yet; unset it and terminate TLS in a proxy",
                );
            }
        }
        Ok(())
    }
}

fn find_key(name: &str) -> Result<&'static Key, String> {
    KEYS.iter().find(|k| k.name == name).ok_or_else(|| {
        let known: Vec<&str> = KEYS.iter().map(|k| k.name).collect();
        format!("unknown key `{name}`; known keys: {}", known.join(", "))
    })
}

/// The typed, checked configuration. Passed explicitly; there are no globals.
#[derive(Debug, Clone)]
pub struct Config {
    /// HTTP address.
    pub listen: SocketAddr,
    /// The data directory.
    pub data_dir: PathBuf,
    /// When appends are fsynced.
    pub fsync: FsyncPolicy,
    /// Segment roll size.
    pub segment_bytes: u64,
    /// Retention by total size, if set.
    pub retention_max_bytes: Option<u64>,
    /// Retention by age, if set.
    pub retention_max_age: Option<Duration>,
    /// Default lease.
    pub lease: Duration,
    /// Default deliveries before dead-lettering.
    pub max_attempts: u32,
    /// Redelivery backoff.
    pub backoff: Backoff,
    /// How long client ids are remembered.
    pub dedupe_window: Duration,
    /// How long an agent is online after it was last seen.
    pub presence_ttl: Duration,
    /// Limits on what clients control.
    pub limits: Limits,
    /// Log output format.
    pub log_format: LogFormat,
    /// Log level when `RUST_LOG` is unset.
    pub log_level: String,
    /// Allow a non-loopback address without auth.
    pub insecure: bool,
}

/// Exponential backoff of redeliveries after an expired lease.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    /// Delay after the first failed delivery.
    pub initial: Duration,
    /// Upper bound of the delay.
    pub max: Duration,
    /// Growth factor per attempt (≥ 1).
    pub multiplier: f64,
}

/// Limits on everything a client controls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// One message's request bytes.
    pub max_message_bytes: u64,
    /// Messages in one batch.
    pub max_batch_messages: u32,
    /// One batch request's bytes.
    pub max_batch_bytes: u64,
    /// Ready + in-flight messages per inbox.
    pub max_inbox_depth: u64,
    /// Messages per second per sender (0: off).
    pub publish_rate: u32,
    /// Long-polls open at once per agent.
    pub max_receivers: u32,
    /// Deepest nesting of arrays and objects in a message body or agent metadata.
    pub max_json_depth: u32,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

impl Config {
    /// The defaults, checked (used by tests and as the base of every load).
    pub fn defaults() -> Self {
        RawConfig::defaults()
            .validate()
            .expect("the defaults are valid")
    }

    fn check(&self) -> Result<(), ConfigError> {
        if !self.listen.ip().is_loopback() && !self.insecure {
            return Err(ConfigError::Conflict(format!(
                "refusing to listen on {} without authentication: bind a loopback address, or pass --insecure to serve an unauthenticated API on the network",
                self.listen
            )));
        }
        if self.backoff.initial > self.backoff.max {
            return Err(ConfigError::Conflict(format!(
                "backoff.initial ({:?}) is above backoff.max ({:?}); lower the first or raise the second",
                self.backoff.initial, self.backoff.max
            )));
        }
        if self.limits.max_message_bytes > self.limits.max_batch_bytes {
            return Err(ConfigError::Conflict(
                "limits.max_message_bytes is above limits.max_batch_bytes: a batch must be able to hold one message".into(),
            ));
        }
        if self.limits.max_batch_bytes > 64 * 1024 * 1024 {
            return Err(ConfigError::Conflict(
                "limits.max_batch_bytes is above 67108864 (64 MiB), the largest record the log takes".into(),
            ));
        }
        Ok(())
    }
}

/// Parses `250ms`, `30s`, `5m`, `2h`, `7d` (a bare number is not accepted: give the unit).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("`{text}` has no unit; write it as 250ms, 30s, 5m, 2h or 7d"))?;
    let (number, unit) = text.split_at(split);
    let n: u64 = number.parse().map_err(|_| {
        format!("`{text}` does not start with a whole number; write it as 250ms, 30s, 5m, 2h or 7d")
    })?;
    let ms_per = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(format!("unknown unit `{unit}`; use ms, s, m, h or d")),
    };
    n.checked_mul(ms_per)
        .map(Duration::from_millis)
        .ok_or_else(|| format!("`{text}` is too long a duration"))
}

fn parse_positive_duration(text: &str) -> Result<Duration, String> {
    let duration = parse_duration(text)?;
    if duration.is_zero() {
        return Err("must be more than zero".into());
    }
    Ok(duration)
}

fn parse_bytes(text: &str, min: u64) -> Result<u64, String> {
    let n: u64 = text
        .trim()
        .parse()
        .map_err(|_| "expected a whole number of bytes".to_string())?;
    if n < min {
        return Err(format!("must be at least {min}"));
    }
    Ok(n)
}

fn parse_count(text: &str, min: u32) -> Result<u32, String> {
    let n: u32 = text
        .trim()
        .parse()
        .map_err(|_| "expected a whole number".to_string())?;
    if n < min {
        return Err(format!("must be at least {min}"));
    }
    Ok(n)
}

fn parse_multiplier(text: &str) -> Result<f64, String> {
    let x: f64 = text
        .trim()
        .parse()
        .map_err(|_| "expected a number such as 2.0".to_string())?;
    if !(1.0..=100.0).contains(&x) {
        return Err("must be between 1.0 and 100.0".into());
    }
    Ok(x)
}

fn parse_bool(text: &str) -> Result<bool, String> {
    match text {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err("expected true or false".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_err(raw: &RawConfig, expected: &str) {
        let error = raw.validate().expect_err("should be refused").to_string();
        assert!(error.contains(expected), "{error:?} lacks {expected:?}");
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
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 86_400)));
        assert!(parse_duration("30").unwrap_err().contains("no unit"));
        assert!(parse_duration("3w").unwrap_err().contains("unknown unit"));
        assert!(parse_duration("-1s").is_err());
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
        raw.merge_env([("COURIER_MAX_ATTEMPTS".to_string(), "7".to_string())]);
        raw.set(
            "backoff.initial",
            "3s".into(),
            Source::Flag("backoff-initial".into()),
        )
        .unwrap();
        let config = raw.validate().unwrap();
        assert_eq!(config.lease, Duration::from_secs(10));
        assert_eq!(config.max_attempts, 7);
        assert_eq!(config.backoff.initial, Duration::from_secs(3));
    }

    #[test]
    fn errors_name_the_key_and_its_source() {
        let mut raw = RawConfig::defaults();
        raw.merge_env([("COURIER_LEASE".to_string(), "soon".to_string())]);
        check_err(&raw, "`lease` (from environment variable COURIER_LEASE)");

        let mut raw = RawConfig::defaults();
        let error = raw
            .merge_toml(
                "[limits]\nmax_mesage_bytes = 5\n",
                std::path::Path::new("c.toml"),
            )
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
        raw.insecure = true;
        assert!(raw.validate().is_ok());
    }

    #[test]
    fn features_not_in_this_build_are_refused_not_ignored() {
        let mut raw = RawConfig::defaults();
        raw.set("auth.mode", "token".into(), Source::Default)
            .unwrap();
        check_err(&raw, "not implemented yet");
        let mut raw = RawConfig::defaults();
        raw.set("tls.cert", "cert.pem".into(), Source::Default)
            .unwrap();
        check_err(&raw, "TLS");
    }

    #[test]
    fn every_key_has_flag_and_env_names() {
        let key = find_key("limits.max_inbox_depth").unwrap();
        assert_eq!(key.flag(), "limits-max-inbox-depth");
        assert_eq!(key.env(), "COURIER_LIMITS_MAX_INBOX_DEPTH");
    }
}
