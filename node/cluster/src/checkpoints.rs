//! A node's intent-log checkpoints: signed at an interval (retention
//! applied at the same beat) and at shutdown, and committed to the
//! coordinators' replicated state, where the node's log can later be
//! checked against a record the node cannot change.

use std::time::Duration;

use tokio::sync::watch;
use weft_audit::{reason, Checkpoint};
use weft_coordinator::Command;

use crate::transport::{Caller, Peer, Reply, Request};

/// An intent log several parts of one process write.
pub type SharedLog = std::sync::Arc<std::sync::Mutex<weft_audit::IntentLog>>;

/// How long committing one checkpoint may take.
const COMMIT_DEADLINE: Duration = Duration::from_secs(5);

/// Commits `cp` to the coordinators at `peers`.
pub async fn commit(caller: &Caller, peers: &[Peer], cp: Checkpoint) -> anyhow::Result<()> {
    let seq = cp.seq;
    let req = Request::Propose {
        command: Command::Checkpoint(cp),
    };
    match caller.ask(peers, &req, COMMIT_DEADLINE).await? {
        Reply::Committed { refused: None, .. } => Ok(()),
        Reply::Committed {
            refused: Some(why), ..
        } => anyhow::bail!("the coordinators refused the checkpoint of seq {seq}: {why}"),
        Reply::Error { message } => {
            anyhow::bail!("the coordinators refused the checkpoint of seq {seq}: {message}")
        }
        other => anyhow::bail!("an unexpected answer to a checkpoint: {other:?}"),
    }
}

/// Signs a checkpoint of `log` every `every` and commits the latest one
/// (rotations sign theirs in between) until `stop` turns true; then signs
/// the shutdown checkpoint and commits it.
pub async fn run(
    log: SharedLog,
    every: Duration,
    caller: Caller,
    peers: Vec<Peer>,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut committed: Option<u64> = None;
    loop {
        let stopping = tokio::select! {
            _ = tick.tick() => false,
            _ = stop.wait_for(|s| *s) => true,
        };
        let why = if stopping {
            reason::SHUTDOWN
        } else {
            reason::INTERVAL
        };
        let latest = {
            let mut l = log.lock().unwrap_or_else(|e| e.into_inner());
            if let Err(e) = l.maintain() {
                tracing::error!("applying the intent log's retention: {e}");
            }
            if let Err(e) = l.checkpoint(why) {
                tracing::error!("signing the intent log's checkpoint: {e}");
            }
            l.latest_checkpoint().cloned()
        };
        if let Some(cp) = latest.filter(|cp| committed.is_none_or(|c| cp.seq > c)) {
            let seq = cp.seq;
            match commit(&caller, &peers, cp).await {
                Ok(()) => committed = Some(seq),
                Err(e) => {
                    tracing::warn!("intent log checkpoint not committed (tried again later): {e:#}")
                }
            }
        }
        if stopping {
            return;
        }
    }
}
