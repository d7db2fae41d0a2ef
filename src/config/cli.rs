//! The command line: [`Cli`] declares every configuration key once (flag, `COURIER_*`
//! variable, default, help), and [`keys`] reads the list back from it.

use std::path::PathBuf;
use std::sync::OnceLock;

use clap::{CommandFactory, Parser};

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
    /// request calls waiting for their reply at once; past it a request gets 429
    #[arg(
        id = "limits.max_waiting_requests",
        long = "limits-max-waiting-requests"
    )]
    #[arg(env = "COURIER_LIMITS_MAX_WAITING_REQUESTS", default_value = "10000")]
    pub limits_max_waiting_requests: String,
    /// nesting of arrays and objects in a body or metadata; deeper gets 400
    #[arg(id = "limits.max_json_depth", long = "limits-max-json-depth")]
    #[arg(env = "COURIER_LIMITS_MAX_JSON_DEPTH", default_value = "64")]
    pub limits_max_json_depth: String,
    /// time for a request's headers to arrive; a slower client's connection is closed
    #[arg(id = "limits.header_timeout", long = "limits-header-timeout")]
    #[arg(env = "COURIER_LIMITS_HEADER_TIMEOUT", default_value = "10s")]
    pub limits_header_timeout: String,
    /// time for a request's body to arrive after its headers; else 408 and the connection closes
    #[arg(id = "limits.body_timeout", long = "limits-body-timeout")]
    #[arg(env = "COURIER_LIMITS_BODY_TIMEOUT", default_value = "30s")]
    pub limits_body_timeout: String,
    /// connections open at once; more wait in the listen backlog
    #[arg(id = "limits.max_connections", long = "limits-max-connections")]
    #[arg(env = "COURIER_LIMITS_MAX_CONNECTIONS", default_value = "10000")]
    pub limits_max_connections: String,
    /// inboxes (agents and capability queues) with depth series of their own in /metrics; the rest are summed under inbox="$other"
    #[arg(id = "metrics.max_agent_series", long = "metrics-max-agent-series")]
    #[arg(env = "COURIER_METRICS_MAX_AGENT_SERIES", default_value = "1000")]
    pub metrics_max_agent_series: String,
    /// none | token: bearer tokens for every route but /healthz and /readyz (SPEC §7)
    #[arg(id = "auth.mode", long = "auth-mode")]
    #[arg(env = "COURIER_AUTH_MODE", default_value = "none")]
    pub auth_mode: String,
    /// the admin token (with auth.mode = token); COURIER_ADMIN_TOKEN also sets it [default: off]
    #[arg(id = "auth.admin_token", long = "auth-admin-token")]
    #[arg(env = "COURIER_AUTH_ADMIN_TOKEN", hide_env_values = true)]
    pub auth_admin_token: Option<String>,
    /// with auth.mode = token: /metrics and /v1/stats without the admin token
    #[arg(id = "auth.metrics_open", long = "auth-metrics-open")]
    #[arg(env = "COURIER_AUTH_METRICS_OPEN", default_value = "false")]
    pub auth_metrics_open: String,
    /// with auth.mode = token: publishes and requests carry a Courier-Signature (SPEC §7)
    #[arg(id = "auth.signing", long = "auth-signing")]
    #[arg(env = "COURIER_AUTH_SIGNING", default_value = "false")]
    pub auth_signing: String,
    /// PEM certificate chain; with tls.key, serve HTTPS (TLS 1.2/1.3; SIGHUP reloads both) [default: off]
    #[arg(id = "tls.cert", long = "tls-cert")]
    #[arg(env = "COURIER_TLS_CERT")]
    pub tls_cert: Option<String>,
    /// PEM private key of tls.cert [default: off]
    #[arg(id = "tls.key", long = "tls-key")]
    #[arg(env = "COURIER_TLS_KEY")]
    pub tls_key: Option<String>,
    /// OTLP/HTTP collector (e.g. http://127.0.0.1:4318): trace spans go to <endpoint>/v1/traces in protobuf; needs a build with the cargo feature `otel` [default: off]
    #[arg(id = "otel.endpoint", long = "otel-endpoint")]
    #[arg(env = "COURIER_OTEL_ENDPOINT")]
    pub otel_endpoint: Option<String>,
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

pub(super) fn find_key(name: &str) -> Result<&'static Key, String> {
    keys().iter().find(|k| k.name == name).ok_or_else(|| {
        let known: Vec<&str> = keys().iter().map(|k| k.name.as_str()).collect();
        format!("unknown key `{name}`; known keys: {}", known.join(", "))
    })
}
