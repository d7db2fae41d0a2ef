//! The online commands: they speak the server's HTTP API (`--server URL`).

use std::process::ExitCode;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::output::{self, failed, usage, Outcome};

/// Where the server is and how to authenticate to it: the online commands' shared flags.
#[derive(clap::Args, Clone)]
pub struct ServerArgs {
    /// The server's base URL.
    #[arg(long)]
    pub server: String,
    /// A bearer token for a server with `auth.mode = token`: the admin token for operator
    /// commands (dlq, agents, bench, replay), or an agent's own.
    #[arg(long, env = "COURIER_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// PEM file of the CA that signed an https:// server's certificate (else the public
    /// web PKI roots are trusted).
    #[arg(long, env = "COURIER_CACERT")]
    pub cacert: Option<std::path::PathBuf>,
}

/// A client of one server.
pub struct Client {
    base: String,
    authorization: Option<String>,
    agent: ureq::Agent,
}

impl Client {
    /// A client of `server` (its base URL, for example `http://127.0.0.1:7070`). A request
    /// that gets no answer within a minute fails.
    pub fn new(server: &ServerArgs) -> Result<Self, output::Failure> {
        Self::with_timeout(server, Some(Duration::from_secs(60)))
    }

    /// A client without a timeout per request: ureq's timeout bookkeeping costs the load
    /// generator half its throughput (17.8k against 8.3k publishes/s with 64 publishers).
    pub fn without_timeout(server: &ServerArgs) -> Result<Self, output::Failure> {
        Self::with_timeout(server, None)
    }

    fn with_timeout(args: &ServerArgs, timeout: Option<Duration>) -> Result<Self, output::Failure> {
        let server = &args.server;
        let base = server.trim_end_matches('/').to_owned();
        if !base.starts_with("http://") && !base.starts_with("https://") {
            return Err(usage(format!(
                "--server {server}: expected http://HOST:PORT or https://HOST:PORT"
            )));
        }
        let mut tls = ureq::tls::TlsConfig::builder();
        if let Some(path) = &args.cacert {
            tls = tls.root_certs(read_cacert(path)?);
        }
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(timeout)
            .tls_config(tls.build())
            .build();
        Ok(Self {
            base,
            authorization: args.token.as_ref().map(|t| format!("Bearer {}", t.trim())),
            agent: config.into(),
        })
    }

    /// One request; a non-2xx answer fails with the server's error message.
    pub fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, output::Failure> {
        self.call_raw(method, path, body.unwrap_or(&json!({})).to_string())
    }

    /// [`Client::call`] with a body that is already JSON text.
    pub fn call_raw(
        &self,
        method: &str,
        path: &str,
        body: String,
    ) -> Result<Value, output::Failure> {
        let text = self.send(method, path, body)?;
        Ok(serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// [`Client::call`] read into `T`, so that parts of the answer the caller does not need
    /// (message bodies of any depth) are skipped rather than built into a tree.
    pub fn call_typed<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
    ) -> Result<T, output::Failure> {
        let text = self.send(method, path, "{}".to_owned())?;
        serde_json::from_str(&text).map_err(|e| {
            failed(anyhow::anyhow!(
                "{method} {}{path}: the answer does not have the expected shape: {e}",
                self.base
            ))
        })
    }

    /// Adds the bearer token, if there is one.
    fn authorize<B>(&self, request: ureq::RequestBuilder<B>) -> ureq::RequestBuilder<B> {
        match &self.authorization {
            Some(value) => request.header("authorization", value),
            None => request,
        }
    }

    /// Sends one request and returns the text of a 2xx answer; anything else fails with
    /// the server's error message.
    fn send(&self, method: &str, path: &str, body: String) -> Result<String, output::Failure> {
        let url = format!("{}{path}", self.base);
        let sent = match method {
            "GET" => self.authorize(self.agent.get(&url)).call(),
            "PUT" => self
                .authorize(self.agent.put(&url))
                .header("content-type", "application/json")
                .send(body),
            _ => self
                .authorize(self.agent.post(&url))
                .header("content-type", "application/json")
                .send(body),
        };
        let mut response = sent.map_err(|e| failed(anyhow::anyhow!("{method} {url}: {e}")))?;
        let status = response.status().as_u16();
        let text = response
            .body_mut()
            .read_to_string()
            .map_err(|e| failed(anyhow::anyhow!("{method} {url}: reading the answer: {e}")))?;
        if !(200..300).contains(&status) {
            let value: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
            let message = value["error"]["message"].as_str().unwrap_or(&text);
            let hint = match (status, &self.authorization) {
                (401, None) => " (pass --token or set COURIER_TOKEN)",
                _ => "",
            };
            return Err(failed(anyhow::anyhow!(
                "{method} {url}: {status}: {message}{hint}"
            )));
        }
        Ok(text)
    }
}

/// The certificates of a `--cacert` PEM file, as the roots to trust.
fn read_cacert(path: &std::path::Path) -> Result<ureq::tls::RootCerts, output::Failure> {
    let pem = std::fs::read(path)
        .map_err(|e| usage(format!("--cacert {}: cannot read it: {e}", path.display())))?;
    let certs: Vec<ureq::tls::Certificate<'static>> = ureq::tls::parse_pem(&pem)
        .filter_map(|item| match item {
            Ok(ureq::tls::PemItem::Certificate(cert)) => Some(cert),
            _ => None,
        })
        .collect();
    if certs.is_empty() {
        return Err(usage(format!(
            "--cacert {}: no PEM certificate in it",
            path.display()
        )));
    }
    Ok(ureq::tls::RootCerts::from(certs))
}

/// A page of `GET /v1/agents/{agent}/dead-letters`, without the message bodies.
#[derive(Deserialize)]
struct DeadPage {
    dead_letters: Vec<DeadRow>,
}

#[derive(Serialize, Deserialize)]
struct DeadRow {
    offset: u64,
    id: String,
    reason: String,
    attempts: u64,
    dead_lettered_at: String,
}

/// `dlq list`: every dead letter of `agent`, oldest first, paging through the API.
pub fn dlq_list(client: &Client, agent: &str, json: bool) -> Outcome {
    let mut rows = Vec::new();
    let mut after: Option<u64> = None;
    loop {
        let mut path = format!("/v1/agents/{agent}/dead-letters?limit=1000");
        if let Some(after) = after {
            path.push_str(&format!("&after={after}"));
        }
        let page: DeadPage = client.call_typed("GET", &path)?;
        let count = page.dead_letters.len();
        rows.extend(page.dead_letters);
        match rows.last() {
            Some(last) if count == 1000 => after = Some(last.offset),
            _ => break,
        }
    }
    if json {
        output::json(&json!({"agent": agent, "dead_letters": rows}));
    } else {
        let cells: Vec<Vec<String>> = rows
            .iter()
            .map(|r| {
                vec![
                    r.offset.to_string(),
                    r.id.clone(),
                    r.reason.clone(),
                    r.attempts.to_string(),
                    r.dead_lettered_at.clone(),
                ]
            })
            .collect();
        output::table(
            &["OFFSET", "ID", "REASON", "ATTEMPTS", "DEAD_LETTERED_AT"],
            &cells,
        );
        println!("{} dead letters for {agent}", rows.len());
    }
    Ok(ExitCode::SUCCESS)
}

/// `dlq redrive`: all dead letters, or the given offsets, back into the inbox.
pub fn dlq_redrive(
    client: &Client,
    agent: &str,
    all: bool,
    offsets: &[u64],
    json: bool,
) -> Outcome {
    let body = match (all, offsets.is_empty()) {
        (true, true) => json!({"all": true}),
        (false, false) => json!({"offsets": offsets}),
        _ => return Err(usage("give either --all or one or more --offset".into())),
    };
    let path = format!("/v1/agents/{agent}/dead-letters/redrive");
    let reply = client.call("POST", &path, Some(&body))?;
    let redriven = reply["redriven"].as_u64().unwrap_or(0);
    if json {
        output::json(&json!({"agent": agent, "redriven": redriven}));
    } else {
        println!("redrove {redriven} dead letters of {agent} back into its inbox (attempts reset)");
    }
    Ok(ExitCode::SUCCESS)
}

/// `agents token-rotate`: a new token for `agent`, printed once.
pub fn token_rotate(client: &Client, agent: &str, json: bool) -> Outcome {
    let reply = client.call("POST", &format!("/v1/agents/{agent}/token"), None)?;
    let token = reply["token"]
        .as_str()
        .ok_or_else(|| failed(anyhow::anyhow!("the server's answer has no token: {reply}")))?;
    if json {
        output::json(&json!({"agent": agent, "token": token}));
    } else {
        println!("{token}");
    }
    Ok(ExitCode::SUCCESS)
}
