//! `weft sandbox`: agent sandboxes from the command line, over a node's
//! `/v1/sandboxes` API.

use std::io::{BufRead, Write};

use anyhow::{bail, Context, Result};
use base64::Engine;
use clap::{Args, Subcommand};
use serde_json::{json, Value};

/// Where the node is and who asks.
#[derive(Args, Debug, Clone)]
pub struct Target {
    /// The node's API.
    #[arg(
        long,
        env = "WEFT_URL",
        default_value = "http://127.0.0.1:8080",
        global = true
    )]
    url: String,
    /// An API key (when the node has keys).
    #[arg(long, env = "WEFT_API_KEY", global = true, hide_env_values = true)]
    api_key: Option<String>,
}

#[derive(Subcommand, Debug)]
pub enum SandboxCommand {
    /// Create a sandbox; prints its id.
    Create {
        /// Its template (the node's `[sandboxes.templates]`).
        #[arg(long)]
        template: Option<String>,
        /// `process` or `gvisor`.
        #[arg(long)]
        isolation: Option<String>,
        /// Memory (MiB).
        #[arg(long)]
        memory_mb: Option<u64>,
        /// CPUs.
        #[arg(long)]
        cpus: Option<f64>,
        /// Processes and threads.
        #[arg(long)]
        pids: Option<u64>,
        /// Scratch space (MiB).
        #[arg(long)]
        disk_mb: Option<u64>,
        /// Lifetime (s).
        #[arg(long)]
        timeout_s: Option<u64>,
        /// `NAME=VALUE` for every command (repeatable).
        #[arg(long = "env")]
        env: Vec<String>,
        /// Print the whole answer as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Run a command in a sandbox, its output streamed; exits with its
    /// exit status.
    Exec {
        /// The sandbox.
        id: String,
        /// Working directory under its scratch space.
        #[arg(long, default_value = "")]
        cwd: String,
        /// Wall-clock limit (s).
        #[arg(long)]
        timeout_s: Option<u64>,
        /// `NAME=VALUE` (repeatable).
        #[arg(long = "env")]
        env: Vec<String>,
        /// A file to send as standard input (`-`: this one's).
        #[arg(long)]
        stdin: Option<std::path::PathBuf>,
        /// The program and its arguments.
        #[arg(required = true, last = true)]
        cmd: Vec<String>,
    },
    /// Copy a file into or out of a sandbox: `cp local ID:path` or
    /// `cp ID:path local` (`-` is standard input or output).
    Cp {
        /// From.
        from: String,
        /// To.
        to: String,
    },
    /// Delete sandboxes.
    Rm {
        /// Their ids.
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// List your sandboxes, or `ID[:path]`'s files.
    Ls {
        /// A sandbox, with a directory of its scratch space.
        what: Option<String>,
    },
}

fn env_pairs(v: &[String]) -> Result<serde_json::Map<String, Value>> {
    v.iter()
        .map(|kv| {
            let (k, v) = kv
                .split_once('=')
                .with_context(|| format!("--env {kv:?}: expected NAME=VALUE"))?;
            Ok((k.to_string(), Value::from(v)))
        })
        .collect()
}

struct Client {
    http: reqwest::blocking::Client,
    t: Target,
}

impl Client {
    fn new(t: Target) -> Result<Self> {
        Ok(Self {
            http: reqwest::blocking::Client::builder().timeout(None).build()?,
            t,
        })
    }

    fn req(&self, m: reqwest::Method, path: &str) -> reqwest::blocking::RequestBuilder {
        let r = self
            .http
            .request(m, format!("{}{path}", self.t.url.trim_end_matches('/')));
        match &self.t.api_key {
            Some(k) => r.bearer_auth(k),
            None => r,
        }
    }

    fn check(r: reqwest::blocking::Response) -> Result<reqwest::blocking::Response> {
        if r.status().is_success() {
            return Ok(r);
        }
        let status = r.status();
        let body: Value = r.json().unwrap_or(Value::Null);
        let msg = body["error"]["message"].as_str().unwrap_or("(no message)");
        bail!("{status}: {msg}")
    }

    fn json(&self, m: reqwest::Method, path: &str, body: Option<Value>) -> Result<Value> {
        let mut r = self.req(m, path);
        if let Some(b) = body {
            r = r.json(&b);
        }
        let r = r
            .send()
            .with_context(|| format!("reaching {}", self.t.url))?;
        Ok(Self::check(r)?.json()?)
    }
}

fn split_remote(s: &str) -> Option<(&str, &str)> {
    let (id, path) = s.split_once(':')?;
    id.starts_with("sbx_").then_some((id, path))
}

/// Runs `weft sandbox ...`; returns the exit status to leave with.
pub fn run(t: Target, c: SandboxCommand) -> Result<i32> {
    let client = Client::new(t)?;
    match c {
        SandboxCommand::Create {
            template,
            isolation,
            memory_mb,
            cpus,
            pids,
            disk_mb,
            timeout_s,
            env,
            json,
        } => {
            let mut body = json!({"env": env_pairs(&env)?});
            for (k, v) in [
                ("template", template.map(Value::from)),
                ("isolation", isolation.map(Value::from)),
                ("memory_mb", memory_mb.map(Value::from)),
                ("cpus", cpus.map(Value::from)),
                ("pids", pids.map(Value::from)),
                ("disk_mb", disk_mb.map(Value::from)),
                ("timeout_s", timeout_s.map(Value::from)),
            ] {
                if let Some(v) = v {
                    body[k] = v;
                }
            }
            let v = client.json(reqwest::Method::POST, "/v1/sandboxes", Some(body))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!("{}", v["id"].as_str().unwrap_or_default());
            }
            Ok(0)
        }
        SandboxCommand::Exec {
            id,
            cwd,
            timeout_s,
            env,
            stdin,
            cmd,
        } => {
            let stdin = match stdin {
                None => Vec::new(),
                Some(p) if p.as_os_str() == "-" => {
                    let mut b = Vec::new();
                    std::io::Read::read_to_end(&mut std::io::stdin(), &mut b)?;
                    b
                }
                Some(p) => std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?,
            };
            let mut body = json!({
                "cmd": cmd, "cwd": cwd, "env": env_pairs(&env)?, "stream": true,
                "stdin_b64": base64::engine::general_purpose::STANDARD.encode(&stdin),
            });
            if let Some(s) = timeout_s {
                body["timeout_s"] = s.into();
            }
            let r = client
                .req(reqwest::Method::POST, &format!("/v1/sandboxes/{id}/exec"))
                .json(&body)
                .send()
                .context("reaching the node")?;
            let r = Client::check(r)?;
            stream_exec(std::io::BufReader::new(r))
        }
        SandboxCommand::Cp { from, to } => {
            match (split_remote(&from), split_remote(&to)) {
                (None, Some((id, path))) => {
                    let data = if from == "-" {
                        let mut b = Vec::new();
                        std::io::Read::read_to_end(&mut std::io::stdin(), &mut b)?;
                        b
                    } else {
                        std::fs::read(&from).with_context(|| format!("reading {from}"))?
                    };
                    let r = client
                        .req(reqwest::Method::PUT, &format!("/v1/sandboxes/{id}/files"))
                        .query(&[("path", path)])
                        .body(data)
                        .send()?;
                    Client::check(r)?;
                }
                (Some((id, path)), None) => {
                    let r = client
                        .req(reqwest::Method::GET, &format!("/v1/sandboxes/{id}/files"))
                        .query(&[("path", path)])
                        .send()?;
                    let bytes = Client::check(r)?.bytes()?;
                    if to == "-" {
                        std::io::stdout().write_all(&bytes)?;
                    } else {
                        std::fs::write(&to, &bytes).with_context(|| format!("writing {to}"))?;
                    }
                }
                _ => bail!("one side of cp is a sandbox's ID:path and the other a local path"),
            }
            Ok(0)
        }
        SandboxCommand::Rm { ids } => {
            for id in ids {
                client.json(
                    reqwest::Method::DELETE,
                    &format!("/v1/sandboxes/{id}"),
                    None,
                )?;
                println!("{id}");
            }
            Ok(0)
        }
        SandboxCommand::Ls { what: None } => {
            let v = client.json(reqwest::Method::GET, "/v1/sandboxes", None)?;
            println!(
                "{:<28} {:<10} {:<8} {:<6} {:>11}",
                "ID", "TEMPLATE", "TIER", "LAUNCH", "EXPIRES_IN"
            );
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            for s in v["data"].as_array().cloned().unwrap_or_default() {
                let left = s["expires_at"].as_u64().unwrap_or(0).saturating_sub(now);
                println!(
                    "{:<28} {:<10} {:<8} {:<6} {:>10}s",
                    s["id"].as_str().unwrap_or(""),
                    s["template"].as_str().unwrap_or(""),
                    s["isolation"].as_str().unwrap_or(""),
                    s["launch"].as_str().unwrap_or(""),
                    left
                );
            }
            Ok(0)
        }
        SandboxCommand::Ls { what: Some(w) } => {
            let (id, path) = w.split_once(':').unwrap_or((&w, ""));
            let r = client
                .req(reqwest::Method::GET, &format!("/v1/sandboxes/{id}/files"))
                .query(&[("path", path)])
                .send()?;
            let v: Value = Client::check(r)?.json().context("not a directory")?;
            for e in v["data"].as_array().cloned().unwrap_or_default() {
                println!(
                    "{:<8} {:>10}  {}",
                    e["kind"].as_str().unwrap_or(""),
                    e["size"].as_u64().unwrap_or(0),
                    e["name"].as_str().unwrap_or("")
                );
            }
            Ok(0)
        }
    }
}

/// Prints a streamed command's output as it comes; its exit status (128 +
/// the signal when killed).
fn stream_exec(r: impl BufRead) -> Result<i32> {
    let mut event = String::new();
    for line in r.lines() {
        let line = line?;
        if let Some(e) = line.strip_prefix("event:") {
            event = e.trim().to_string();
            continue;
        }
        let Some(data) = line.strip_prefix("data:") else {
            continue;
        };
        let v: Value = serde_json::from_str(data.trim()).unwrap_or(Value::Null);
        let bytes = || -> Vec<u8> {
            let d = v["data"].as_str().unwrap_or("");
            if v["encoding"] == "base64" {
                base64::engine::general_purpose::STANDARD
                    .decode(d)
                    .unwrap_or_default()
            } else {
                d.as_bytes().to_vec()
            }
        };
        match event.as_str() {
            "stdout" => {
                std::io::stdout().write_all(&bytes())?;
                std::io::stdout().flush()?;
            }
            "stderr" => {
                std::io::stderr().write_all(&bytes())?;
            }
            "end" => {
                if v["timed_out"] == true {
                    eprintln!("weft sandbox: the command ran past its timeout and was killed");
                }
                if v["oom_killed"] == true {
                    eprintln!("weft sandbox: the command was killed for lack of memory");
                }
                return Ok(match (v["exit_code"].as_i64(), v["signal"].as_i64()) {
                    (Some(c), _) => c as i32,
                    (None, Some(s)) => 128 + s as i32,
                    _ => 1,
                });
            }
            "error" => bail!("{}", v["message"].as_str().unwrap_or("the command failed")),
            _ => {}
        }
    }
    bail!("the stream ended before the command did")
}
