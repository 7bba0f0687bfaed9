//! `weft audit`: verify an intent log (its chain, its signed checkpoints,
//! and the checkpoints the coordinators hold), find decisions in logs, and
//! explain one request.

use std::path::PathBuf;

use anyhow::{Context, Result};
use weft_audit::query::{self, Filter};
use weft_audit::{Checkpoint, Options};
use weft_cluster::credentials::{ClusterTrust, NodeIdentity};

use crate::cluster_config::ClusterConfig;

/// What `weft audit verify` checks a log against.
pub struct Against {
    /// A node's cluster config: the coordinators to read checkpoints and
    /// revocations from, and the CA from its identity.
    pub cluster: Option<PathBuf>,
    /// The cluster CA's certificate (PEM), when the coordinators are not
    /// reachable: signatures are then checked against the CA, without
    /// revocations or the coordinators' checkpoints.
    pub ca: Option<PathBuf>,
    /// Whose log it is (default: the signer of its first checkpoint).
    pub node: Option<String>,
}

/// Runs `weft audit verify`; the exit code (1: the log is broken).
pub fn verify(paths: &[PathBuf], against: Against) -> Result<i32> {
    let mut anchors: Vec<Checkpoint> = Vec::new();
    let mut trust = None;
    let mut trusted_by =
        "the certificates they carry only (pass --cluster or --ca to check whose keys they are)"
            .to_string();
    if let Some(c) = &against.cluster {
        let cfg = ClusterConfig::load(c)?;
        let identity = NodeIdentity::load(&cfg.identity_dir())
            .with_context(|| format!("the identity of {}", c.display()))?;
        let rt = tokio::runtime::Runtime::new()?;
        let status = rt
            .block_on(crate::node::status(&cfg))
            .context("reading the coordinators' checkpoints and revocations")?;
        for n in status.state.checkpoints.values() {
            anchors.extend(n.all());
        }
        trust = Some(ClusterTrust::new(
            &identity.ca_pem,
            status.state.revoked.iter().cloned(),
        )?);
        trusted_by = format!(
            "the cluster's CA and its {} revocations",
            status.state.revoked.len()
        );
    } else if let Some(ca) = &against.ca {
        let pem =
            std::fs::read_to_string(ca).with_context(|| format!("reading {}", ca.display()))?;
        trust = Some(ClusterTrust::new(&pem, [])?);
        trusted_by = format!(
            "the CA in {} (revocations unknown without --cluster)",
            ca.display()
        );
    }
    // whose log it is: as asked, else its checkpoints' signer, else the
    // node its records name (a log stripped of its checkpoints)
    let whose = against.node.clone().or_else(|| log_node(paths));
    if whose.is_none() && !anchors.is_empty() {
        anyhow::bail!(
            "the log names no node (no checkpoint, no record with a node): pass --node NAME to check it against the coordinators' checkpoints"
        );
    }
    // the coordinators hold every node's checkpoints: only this log's count
    let mine: Vec<Checkpoint> = anchors
        .into_iter()
        .filter(|a| whose.as_deref() == Some(a.node.as_str()))
        .collect();
    let opts = Options {
        trust: trust.as_ref().map(|t| t as &dyn weft_audit::Trust),
        anchors: &mine,
        node: whose.as_deref(),
    };
    let r = weft_audit::check(paths, &opts)?;
    if let Some(first_bad) = r.first_problem() {
        for p in &r.problems {
            eprintln!("intent log broken: {p}");
        }
        eprintln!("first bad sequence number: {}", first_bad.seq);
        return Ok(1);
    }
    match r.last_seq {
        Some(last) => println!(
            "ok: {} lines, seq {}..={last}, chain intact; head {}",
            r.lines, r.first_seq, r.head
        ),
        None => println!("ok: the log is empty"),
    }
    if r.pruned_boundary {
        println!(
            "pruned: it starts at seq {} at a signed boundary",
            r.first_seq
        );
    }
    match (r.signed_through, &r.node) {
        (Some(through), Some(n)) => {
            println!(
                "signed: {} checkpoints by {n}, checked against {trusted_by}; signed through seq {through}",
                r.checkpoints
            );
            if let Some(last) = r.last_seq.filter(|l| *l > through + 1) {
                println!(
                    "  seq {}..={last} is after the last checkpoint (signed at the next one)",
                    through + 2
                );
            }
        }
        _ => println!("signed: no checkpoints (the log has no signer)"),
    }
    if against.cluster.is_some() {
        println!(
            "coordinators: {} of their checkpoints of this log match ({} of pruned lines)",
            r.anchors_checked, r.anchors_pruned
        );
    }
    Ok(0)
}

/// Whose log `paths` is: the signer of its first checkpoint, else the
/// node its first record naming one names. Reads up to the first
/// checkpoint only.
fn log_node(paths: &[PathBuf]) -> Option<String> {
    let files = weft_audit::resolve(paths).ok()?;
    let (mut signer, mut named) = (None, None);
    let _ = weft_audit::read_lines(&files, |_, _, _, parsed| {
        let Ok(l) = parsed else { return true };
        signer = Checkpoint::from_record(&l.record)
            .and_then(|c| c.ok())
            .map(|c| c.node);
        if named.is_none() {
            named = l
                .record
                .get("node")
                .and_then(serde_json::Value::as_str)
                .map(String::from);
        }
        signer.is_none()
    });
    signer.or(named)
}

/// The filters and output of `weft audit query`.
#[derive(clap::Args, Debug)]
pub struct QueryArgs {
    /// Written at or after: 2026-12-02T10:00:00Z, Unix seconds or ms, or
    /// an age (15m, 2h, 7d).
    #[arg(long)]
    pub since: Option<String>,
    /// Written before (the same forms).
    #[arg(long)]
    pub until: Option<String>,
    /// The tenant.
    #[arg(long)]
    pub tenant: Option<String>,
    /// The model.
    #[arg(long)]
    pub model: Option<String>,
    /// The request id (the routing node's or the serving node's).
    #[arg(long)]
    pub request_id: Option<String>,
    /// The decision (routed, admitted, refused, rerouted) or event
    /// (sandbox.create, control-refused, control-applied, checkpoint).
    #[arg(long)]
    pub decision: Option<String>,
    /// Words of the refusal reason (case-insensitive).
    #[arg(long)]
    pub reason: Option<String>,
    /// The node that wrote, was chosen for, or served it.
    #[arg(long)]
    pub node: Option<String>,
    /// JSON lines (each line as stored, with its node) instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Only the last N matches.
    #[arg(long, value_name = "N")]
    pub limit: Option<usize>,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Runs `weft audit query` over `logs` (directories or files, rotated
/// files included).
pub fn query(logs: &[PathBuf], a: QueryArgs) -> Result<()> {
    let now = now_ms();
    let time = |t: &Option<String>, flag: &str| -> Result<Option<u64>> {
        t.as_deref()
            .map(|t| query::parse_time(t, now).map_err(|e| anyhow::anyhow!("{flag}: {e}")))
            .transpose()
    };
    let filter = Filter {
        since_ms: time(&a.since, "--since")?,
        until_ms: time(&a.until, "--until")?,
        tenant: a.tenant,
        model: a.model,
        request_id: a.request_id,
        decision: a.decision,
        reason: a.reason,
        node: a.node,
    };
    let mut found: Vec<_> = query::read(logs)?
        .into_iter()
        .filter(|f| filter.matches(f))
        .collect();
    found.sort_by_key(|f| f.line.at_unix_ms);
    if let Some(n) = a.limit {
        let skip = found.len().saturating_sub(n);
        found.drain(..skip);
    }
    if a.json {
        for f in &found {
            let mut v = serde_json::to_value(&f.line)?;
            v["node"] = f.node.clone().into();
            println!("{v}");
        }
    } else {
        print!("{}", query::table(&found));
    }
    Ok(())
}

/// Runs `weft audit explain`; the exit code (1: no line names it).
pub fn explain(id: &str, logs: &[PathBuf]) -> Result<i32> {
    let found = query::read(logs)?;
    match query::explain(id, &found) {
        Some(text) => {
            print!("{text}");
            Ok(0)
        }
        None => {
            eprintln!(
                "no line of {} names request {id:?}",
                logs.iter()
                    .map(|l| l.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            Ok(1)
        }
    }
}
