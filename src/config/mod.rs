//! Configuration: defaults < `--config` TOML file < `COURIER_*` environment < flags (SPEC §4).
//!
//! [`Cli`] declares every key once, with clap's derive: its flag `--a-b-c`, its variable
//! `COURIER_A_B_C`, its default and its help. [`RawConfig`] layers one string per key with the
//! place it came from: the defaults, the TOML file ([`RawConfig::merge_toml`]), then what clap
//! found in the environment and on the command line ([`RawConfig::merge_command_line`]).
//! [`RawConfig::validate`] types them into a [`Config`], durations through
//! [`courier_storage::duration`], and names the key, the value and its source in every error.
//! Values stay text until then so that a bad one is reported the same way from every source.
//! Nothing here reads the clock or opens the data directory.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::parser::ValueSource;
use clap::ArgMatches;
use courier_storage::{duration, FsyncPolicy};

use crate::tls::TlsFiles;

mod cli;

use cli::find_key;
pub use cli::{keys, Cli, Key, ADMIN_TOKEN_VAR};

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
    values: BTreeMap<String, (String, Source)>,
    /// `--insecure`: allow a non-loopback `listen` without auth.
    pub insecure: bool,
}

impl RawConfig {
    /// The defaults alone.
    pub fn defaults() -> Self {
        let mut raw = Self::default();
        for key in keys() {
            if let Some(default) = &key.default {
                raw.values
                    .insert(key.name.clone(), (default.clone(), Source::Default));
            }
        }
        raw
    }

    /// Sets `name` from `source`; unknown names are an error.
    pub fn set(&mut self, name: &str, value: String, source: Source) -> Result<(), String> {
        let key = find_key(name)?;
        self.values.insert(key.name.clone(), (value, source));
        Ok(())
    }

    /// Merges a TOML document: keys at the top and in `[section]` tables (`[a] b_c = ...`),
    /// each a string, number or boolean, kept as text to be typed like every other source.
    pub fn merge_toml(&mut self, text: &str, path: &Path) -> Result<(), ConfigError> {
        let file_error = |reason: String| ConfigError::File {
            path: path.to_path_buf(),
            reason,
        };
        // The error's message and place, not its snippet of the file: the line may hold a
        // secret (auth.admin_token).
        let table: toml::Table = toml::from_str(text).map_err(|e| {
            let place = e.span().map_or(String::new(), |span| {
                let before = &text[..span.start.min(text.len())];
                let line = before.matches('\n').count() + 1;
                let column = before.len() - before.rfind('\n').map_or(0, |n| n + 1) + 1;
                format!(" (line {line}, column {column})")
            });
            file_error(format!("{}{place}", e.message().trim_end()))
        })?;
        for (name, value) in table {
            let entries = match value {
                toml::Value::Table(section) => section
                    .into_iter()
                    .map(|(sub, value)| (format!("{name}.{sub}"), value))
                    .collect(),
                value => vec![(name, value)],
            };
            for (name, value) in entries {
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
        }
        Ok(())
    }

    /// Merges what clap found in the `COURIER_*` variables and in the flags (`matches` of
    /// [`Cli`]), and `--insecure`. Keys clap left at their default keep the lower layers.
    /// [`ADMIN_TOKEN_VAR`] is read here, as clap takes one variable per argument.
    pub fn merge_command_line(&mut self, matches: &ArgMatches) -> Result<(), ConfigError> {
        for key in keys() {
            let source = match matches.value_source(&key.name) {
                Some(ValueSource::EnvVariable) => Source::Env(key.env.clone()),
                Some(ValueSource::CommandLine) => Source::Flag(key.flag.clone()),
                _ => continue,
            };
            if let Some(value) = matches.get_one::<String>(&key.name) {
                self.values
                    .insert(key.name.clone(), (value.clone(), source));
            }
        }
        // SPEC §7's variable wins over COURIER_AUTH_ADMIN_TOKEN, but not over the flag.
        let flag_given = matches.value_source("auth.admin_token") == Some(ValueSource::CommandLine);
        if let Some(token) = std::env::var_os(ADMIN_TOKEN_VAR).filter(|_| !flag_given) {
            let origin = Source::Env(ADMIN_TOKEN_VAR.into());
            let token = token.into_string().map_err(|_| ConfigError::Invalid {
                key: "auth.admin_token",
                value: "(not shown)".into(),
                origin: origin.clone(),
                reason: "not valid UTF-8".into(),
            })?;
            self.values
                .insert("auth.admin_token".into(), (token, origin));
        }
        self.insecure = matches.get_flag("insecure");
        Ok(())
    }

    fn get(&self, name: &str) -> Option<&(String, Source)> {
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
                // A secret is not repeated in an error message (which goes to the logs).
                value: if SECRET_KEYS.contains(&name) {
                    "(not shown)".into()
                } else {
                    value.clone()
                },
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
                max_waiting_requests: self
                    .required("limits.max_waiting_requests", |s| parse_count(s, 1))?,
                header_timeout: self.required("limits.header_timeout", parse_positive_duration)?,
                body_timeout: self.required("limits.body_timeout", parse_positive_duration)?,
                max_connections: self.required("limits.max_connections", |s| parse_count(s, 1))?,
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
            metrics: Metrics {
                max_agent_series: self
                    .required("metrics.max_agent_series", |s| parse_count(s, 0))?,
            },
            auth: Auth {
                mode: self.required("auth.mode", |s| match s {
                    "none" => Ok(AuthMode::None),
                    "token" => Ok(AuthMode::Token),
                    _ => Err("expected `none` or `token`".into()),
                })?,
                admin_token: self.parse("auth.admin_token", parse_admin_token)?,
                signing: self.required("auth.signing", parse_bool)?,
                metrics_open: self.required("auth.metrics_open", parse_bool)?,
            },
            tls: self.tls()?,
            otel: Otel {
                endpoint: self.parse("otel.endpoint", parse_otel_endpoint)?,
            },
            insecure: self.insecure,
        };
        config.check()?;
        Ok(config)
    }

    /// TLS files: both or neither.
    fn tls(&self) -> Result<Option<TlsFiles>, ConfigError> {
        let cert = self.parse("tls.cert", |s| Ok(PathBuf::from(s)))?;
        let key = self.parse("tls.key", |s| Ok(PathBuf::from(s)))?;
        match (cert, key) {
            (Some(cert), Some(key)) => Ok(Some(TlsFiles { cert, key })),
            (None, None) => Ok(None),
            _ => Err(ConfigError::Conflict(
                "tls.cert and tls.key go together: set both (TLS on) or neither".into(),
            )),
        }
    }
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
    /// Prometheus metrics (SPEC §8).
    pub metrics: Metrics,
    /// Authentication and authorization (SPEC §7).
    pub auth: Auth,
    /// TLS certificate and key, when TLS is on.
    pub tls: Option<TlsFiles>,
    /// Trace export (SPEC §8).
    pub otel: Otel,
    /// Allow a non-loopback address without auth.
    pub insecure: bool,
}

/// Prometheus metrics (SPEC §8).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Metrics {
    /// Inboxes with depth series of their own; the others are summed into one series.
    pub max_agent_series: u32,
}

/// Trace export over OTLP/HTTP (SPEC §8; the cargo feature `otel`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Otel {
    /// The collector's OTLP/HTTP base URL; spans go to `<endpoint>/v1/traces`. `None`: no
    /// export.
    pub endpoint: Option<String>,
}

/// `otel.endpoint`: an `http://` or `https://` URL with a host, in a build that can export.
fn parse_otel_endpoint(text: &str) -> Result<String, String> {
    let rest = text
        .strip_prefix("http://")
        .or_else(|| text.strip_prefix("https://"))
        .ok_or("expected an http:// or https:// URL, such as http://127.0.0.1:4318")?;
    let host = rest.split(['/', '?', '#']).next().unwrap_or_default();
    if host.is_empty() || text.chars().any(char::is_whitespace) {
        return Err("expected a URL with a host, such as http://127.0.0.1:4318".into());
    }
    if cfg!(feature = "otel") {
        Ok(text.to_owned())
    } else {
        Err("this courier was built without trace export; build it with the cargo feature `otel` (cargo build --release --features otel)".into())
    }
}

/// Authentication and authorization (SPEC §7).
#[derive(Clone, PartialEq, Eq)]
pub struct Auth {
    /// Whether requests need a token.
    pub mode: AuthMode,
    /// The admin token from the configuration; `None`: `<data_dir>/admin.token` (generated
    /// at the first start).
    pub admin_token: Option<String>,
    /// Publishes and requests must carry a valid `Courier-Signature`.
    pub signing: bool,
    /// `/metrics` and `/v1/stats` open to anyone (else the admin's).
    pub metrics_open: bool,
}

impl fmt::Debug for Auth {
    /// Never shows the admin token (the configuration is logged at start).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Auth")
            .field("mode", &self.mode)
            .field(
                "admin_token",
                &self.admin_token.as_ref().map(|_| "(set, not shown)"),
            )
            .field("signing", &self.signing)
            .field("metrics_open", &self.metrics_open)
            .finish()
    }
}

/// Whether requests need a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMode {
    /// Anyone who reaches the port may do anything (loopback only, unless `--insecure`).
    None,
    /// Bearer tokens: the admin's, and one per agent.
    Token,
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
    /// Request calls waiting for their reply at once.
    pub max_waiting_requests: u32,
    /// Time for a request's headers to arrive.
    pub header_timeout: Duration,
    /// Time for a request's body to arrive after its headers.
    pub body_timeout: Duration,
    /// Connections open at once.
    pub max_connections: u32,
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
        if !self.listen.ip().is_loopback() && self.auth.mode == AuthMode::None && !self.insecure {
            return Err(ConfigError::Conflict(format!(
                "refusing to listen on {} without authentication: set auth.mode = token, bind a loopback address, or pass --insecure to serve an unauthenticated API on the network",
                self.listen
            )));
        }
        if self.auth.signing && self.auth.mode == AuthMode::None {
            return Err(ConfigError::Conflict(
                "auth.signing = true needs auth.mode = token: a signature is keyed by the caller's token".into(),
            ));
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

fn parse_duration(text: &str) -> Result<Duration, String> {
    duration::parse(text).map_err(|e| e.to_string())
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

/// Keys whose values are secrets: never shown in errors or logs.
const SECRET_KEYS: &[&str] = &["auth.admin_token"];

/// The smallest admin token the configuration takes: guessing it must be out of reach.
const MIN_ADMIN_TOKEN_CHARS: usize = 24;

fn parse_admin_token(text: &str) -> Result<String, String> {
    if text.chars().count() < MIN_ADMIN_TOKEN_CHARS || !text.chars().all(|c| c.is_ascii_graphic()) {
        return Err(format!(
            "expected at least {MIN_ADMIN_TOKEN_CHARS} visible ASCII characters without spaces (for example 32 random bytes in hex), or leave it unset to have one generated into <data_dir>/admin.token"
        ));
    }
    Ok(text.to_owned())
}

fn parse_bool(text: &str) -> Result<bool, String> {
    match text {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err("expected true or false".into()),
    }
}

#[cfg(test)]
mod tests;
