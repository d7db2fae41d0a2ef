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
use std::sync::OnceLock;
use std::time::Duration;

use clap::parser::ValueSource;
use clap::{ArgMatches, CommandFactory, Parser};
use courier_storage::{duration, FsyncPolicy};

/// The command line of `courier`: `--config`, `--insecure`, and every configuration key as a
/// flag with its variable, default and help. An argument's id is its key's name: a key in a
/// `[section]` (`a.b_c`) names its id and flag, the others take both from the field's name.
///
/// The key fields are the declaration, and nothing reads them: [`RawConfig::merge_command_line`]
/// reads each key from the [`ArgMatches`] by id, because layering the file under the
/// environment needs to know where clap found each value ([`ArgMatches::value_source`]).
#[derive(Debug, Parser)]
#[command(
    name = "courier",
    version,
    about = "A durable message log service for software agents",
    long_about = None,
    mut_args = shown_as_value,
    after_help = "Every setting also comes from the TOML file (--config) and from COURIER_* variables;\n\
                  precedence: defaults < file < environment < flags. Example:\n  \
                  courier --listen 127.0.0.1:7070 --data-dir ./courier-data --fsync always"
)]
pub struct Cli {
    /// TOML configuration file
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// allow a non-loopback listen address without authentication
    #[arg(long)]
    pub insecure: bool,
    /// HTTP address (port 0: any free port)
    #[arg(long, env = "COURIER_LISTEN", default_value = "127.0.0.1:7070")]
    pub listen: String,
    /// log segments, sled index, admin token
    #[arg(long, env = "COURIER_DATA_DIR", default_value = "./courier-data")]
    pub data_dir: String,
    /// always | interval:<duration> | never
    #[arg(long, env = "COURIER_FSYNC", default_value = "always")]
    pub fsync: String,
    /// roll to a new segment past this size
    #[arg(long, env = "COURIER_SEGMENT_BYTES", default_value = "67108864")]
    pub segment_bytes: String,
    /// delete whole old segments past this total size [default: off]
    #[arg(id = "retention.max_bytes", long = "retention-max-bytes")]
    #[arg(env = "COURIER_RETENTION_MAX_BYTES")]
    pub retention_max_bytes: Option<String>,
    /// delete whole old segments older than this [default: off]
    #[arg(id = "retention.max_age", long = "retention-max-age")]
    #[arg(env = "COURIER_RETENTION_MAX_AGE")]
    pub retention_max_age: Option<String>,
    /// default lease of a delivery
    #[arg(long, env = "COURIER_LEASE", default_value = "30s")]
    pub lease: String,
    /// deliveries before dead-lettering
    #[arg(long, env = "COURIER_MAX_ATTEMPTS", default_value = "5")]
    pub max_attempts: String,
    /// delay before the first redelivery after an expired lease
    #[arg(id = "backoff.initial", long = "backoff-initial")]
    #[arg(env = "COURIER_BACKOFF_INITIAL", default_value = "1s")]
    pub backoff_initial: String,
    /// longest delay before a redelivery
    #[arg(id = "backoff.max", long = "backoff-max")]
    #[arg(env = "COURIER_BACKOFF_MAX", default_value = "5m")]
    pub backoff_max: String,
    /// growth of the delay per attempt
    #[arg(id = "backoff.multiplier", long = "backoff-multiplier")]
    #[arg(env = "COURIER_BACKOFF_MULTIPLIER", default_value = "2.0")]
    pub backoff_multiplier: String,
    /// how long a client id is remembered
    #[arg(long, env = "COURIER_DEDUPE_WINDOW", default_value = "2m")]
    pub dedupe_window: String,
    /// how long an agent counts as online after it was seen
    #[arg(long, env = "COURIER_PRESENCE_TTL", default_value = "30s")]
    pub presence_ttl: String,
    /// one message, as sent
    #[arg(id = "limits.max_message_bytes", long = "limits-max-message-bytes")]
    #[arg(env = "COURIER_LIMITS_MAX_MESSAGE_BYTES", default_value = "1048576")]
    pub limits_max_message_bytes: String,
    /// messages in one batch
    #[arg(id = "limits.max_batch_messages", long = "limits-max-batch-messages")]
    #[arg(env = "COURIER_LIMITS_MAX_BATCH_MESSAGES", default_value = "1000")]
    pub limits_max_batch_messages: String,
    /// bytes of one batch request
    #[arg(id = "limits.max_batch_bytes", long = "limits-max-batch-bytes")]
    #[arg(env = "COURIER_LIMITS_MAX_BATCH_BYTES", default_value = "8388608")]
    pub limits_max_batch_bytes: String,
    /// ready + in-flight per agent; past it publishes get 429
    #[arg(id = "limits.max_inbox_depth", long = "limits-max-inbox-depth")]
    #[arg(env = "COURIER_LIMITS_MAX_INBOX_DEPTH", default_value = "1000000")]
    pub limits_max_inbox_depth: String,
    /// messages per second per sending agent (0: off)
    #[arg(id = "limits.publish_rate", long = "limits-publish-rate")]
    #[arg(env = "COURIER_LIMITS_PUBLISH_RATE", default_value = "0")]
    pub limits_publish_rate: String,
    /// long-polls open at once per agent; past it receive gets 429
    #[arg(id = "limits.max_receivers", long = "limits-max-receivers")]
    #[arg(env = "COURIER_LIMITS_MAX_RECEIVERS", default_value = "64")]
    pub limits_max_receivers: String,
    /// nesting of arrays and objects in a body or metadata; deeper gets 400
    #[arg(id = "limits.max_json_depth", long = "limits-max-json-depth")]
    #[arg(env = "COURIER_LIMITS_MAX_JSON_DEPTH", default_value = "64")]
    pub limits_max_json_depth: String,
    /// none (token auth is not in this build yet)
    #[arg(id = "auth.mode", long = "auth-mode")]
    #[arg(env = "COURIER_AUTH_MODE", default_value = "none")]
    pub auth_mode: String,
    /// the admin token (with auth.mode = token); COURIER_ADMIN_TOKEN also sets it [default: off]
    #[arg(id = "auth.admin_token", long = "auth-admin-token")]
    #[arg(env = "COURIER_AUTH_ADMIN_TOKEN", hide_env_values = true)]
    pub auth_admin_token: Option<String>,
    /// HMAC-signed publishes (not in this build yet)
    #[arg(id = "auth.signing", long = "auth-signing")]
    #[arg(env = "COURIER_AUTH_SIGNING", default_value = "false")]
    pub auth_signing: String,
    /// PEM certificate (TLS is not in this build yet) [default: off]
    #[arg(id = "tls.cert", long = "tls-cert")]
    #[arg(env = "COURIER_TLS_CERT")]
    pub tls_cert: Option<String>,
    /// PEM private key (TLS is not in this build yet) [default: off]
    #[arg(id = "tls.key", long = "tls-key")]
    #[arg(env = "COURIER_TLS_KEY")]
    pub tls_key: Option<String>,
    /// text | json
    #[arg(long, env = "COURIER_LOG_FORMAT", default_value = "text")]
    pub log_format: String,
    /// error | warn | info | debug | trace; RUST_LOG overrides it
    #[arg(long, env = "COURIER_LOG_LEVEL", default_value = "info")]
    pub log_level: String,
}

/// Shows every key's value in `--help` as `<VALUE>` (clap's derive would show its id).
fn shown_as_value(arg: clap::Arg) -> clap::Arg {
    if arg.get_env().is_some() {
        arg.value_name("VALUE")
    } else {
        arg
    }
}

/// SPEC §7's name for `auth.admin_token` in the environment, besides `COURIER_AUTH_ADMIN_TOKEN`
/// (over which it wins).
pub const ADMIN_TOKEN_VAR: &str = "COURIER_ADMIN_TOKEN";

/// A configuration key, as [`Cli`] declares it.
#[derive(Debug, Clone)]
pub struct Key {
    /// `a.b_c`: `[a] b_c` in TOML.
    pub name: String,
    /// The flag without its dashes: `a-b-c`.
    pub flag: String,
    /// The environment variable: `COURIER_A_B_C`.
    pub env: String,
    /// The default as `--help` shows it; `None` means unset (off).
    pub default: Option<String>,
}

/// Every configuration key, in the order of `--help` and of the README's table: the
/// arguments of [`Cli`] that have a variable.
pub fn keys() -> &'static [Key] {
    static KEYS: OnceLock<Vec<Key>> = OnceLock::new();
    KEYS.get_or_init(|| {
        Cli::command()
            .get_arguments()
            .filter_map(|arg| {
                Some(Key {
                    name: arg.get_id().to_string(),
                    flag: arg.get_long()?.to_owned(),
                    env: arg.get_env()?.to_str()?.to_owned(),
                    default: arg
                        .get_default_values()
                        .first()
                        .map(|value| value.to_string_lossy().into_owned()),
                })
            })
            .collect()
    })
}

fn find_key(name: &str) -> Result<&'static Key, String> {
    keys().iter().find(|k| k.name == name).ok_or_else(|| {
        let known: Vec<&str> = keys().iter().map(|k| k.name.as_str()).collect();
        format!("unknown key `{name}`; known keys: {}", known.join(", "))
    })
}

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
        let table: toml::Table = toml::from_str(text).map_err(|e| file_error(e.to_string()))?;
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
            let token = token.into_string().map_err(|token| ConfigError::Invalid {
                key: "auth.admin_token",
                value: token.to_string_lossy().into_owned(),
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
        assert_eq!(keys().len(), 27);
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
}
