//! The node side of a worker: starts `weft worker` in its sandbox on one end
//! of a socket pair, routes the worker's events to the requests waiting for
//! them, notices when the worker dies (every in-flight request is told, the
//! node turns not-ready), and restarts it with backoff.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, watch};
use weft_kernels::TenantUsage;

use crate::protocol::{encode, encode_chain, read_any_async, Frame, FromWorker, ToWorker};
use crate::runner::{Runner, Submission, SubmitError, Update, WorkerStats};
use crate::sandbox::Confinement;
use crate::spawn::WorkerSpec;

/// First wait before restarting a worker that died.
const RESTART_BACKOFF_MIN: Duration = Duration::from_millis(200);
/// Longest wait between restarts.
const RESTART_BACKOFF_MAX: Duration = Duration::from_secs(10);
/// A worker that ran this long resets the backoff.
const HEALTHY_RUN: Duration = Duration::from_secs(30);
/// How long a shard worker may take over one chain step.
const CHAIN_CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a worker may take to load its model and say it is ready.
const READY_TIMEOUT: Duration = Duration::from_secs(120);

/// What the node writes to its worker.
#[derive(Debug)]
enum Out {
    Msg(Box<ToWorker>),
    Chain(u64, Vec<u8>),
}

#[derive(Default)]
struct Live {
    tx: Option<mpsc::UnboundedSender<Out>>,
    /// A chain head's steps down its chain (the relay's queue).
    chain: Option<mpsc::UnboundedSender<(u64, Vec<u8>)>>,
    inflight: HashMap<u64, mpsc::UnboundedSender<Update>>,
    /// Chain steps sent to a shard worker, waiting for its reply.
    steps: HashMap<u64, tokio::sync::oneshot::Sender<Vec<u8>>>,
    pid: Option<u32>,
}

struct Shared {
    spec: WorkerSpec,
    live: Mutex<Live>,
    ready: watch::Sender<bool>,
    restarts: AtomicU64,
    next_id: AtomicU64,
    stats: Mutex<WorkerStats>,
    /// Each tenant's use of the engine, as of the last step.
    tenants: Mutex<Vec<TenantUsage>>,
    confinement: Mutex<Option<(Confinement, bool)>>,
    /// Why the worker was refused (below the sandbox policy): it is not
    /// restarted, since a restart would not change the host.
    refused: Mutex<Option<String>>,
    stopping: AtomicBool,
    stop: tokio::sync::Notify,
    /// How long a chain step may take on the worker (ms).
    chain_timeout_ms: AtomicU64,
}

/// Starts, watches and restarts one worker.
#[derive(Clone)]
pub struct Supervisor {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Supervisor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Supervisor")
            .field("ready", &self.is_ready())
            .finish()
    }
}

impl Supervisor {
    /// Starts the worker in the background; [`Supervisor::ready`] tells when it serves.
    pub fn start(spec: WorkerSpec) -> Self {
        let (ready, _) = watch::channel(false);
        let shared = Arc::new(Shared {
            spec,
            live: Mutex::new(Live::default()),
            ready,
            restarts: AtomicU64::new(0),
            next_id: AtomicU64::new(1),
            stats: Mutex::new(WorkerStats::default()),
            tenants: Mutex::default(),
            confinement: Mutex::new(None),
            refused: Mutex::new(None),
            stopping: AtomicBool::new(false),
            stop: tokio::sync::Notify::new(),
            chain_timeout_ms: AtomicU64::new(CHAIN_CALL_TIMEOUT.as_millis() as u64),
        });
        tokio::spawn(run(shared.clone()));
        Self { shared }
    }

    /// Watches readiness.
    pub fn ready(&self) -> watch::Receiver<bool> {
        self.shared.ready.subscribe()
    }

    /// Runs one chain step on a shard worker: the encoded
    /// [`crate::chain::Message`] in, its encoded reply out.
    pub async fn chain_call(&self, body: Vec<u8>) -> Result<Vec<u8>, SubmitError> {
        let rx = {
            let mut live = self.shared.live.lock().unwrap_or_else(|e| e.into_inner());
            let Some(tx) = live.tx.clone().filter(|_| self.is_ready()) else {
                return Err(SubmitError::NotReady);
            };
            let step = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
            let (otx, orx) = tokio::sync::oneshot::channel();
            if tx.send(Out::Chain(step, body)).is_err() {
                return Err(SubmitError::NotReady);
            }
            live.steps.insert(step, otx);
            orx
        };
        let bound = Duration::from_millis(self.shared.chain_timeout_ms.load(Ordering::Relaxed));
        match tokio::time::timeout(bound, rx).await {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(_)) => Err(SubmitError::NotReady),
            Err(_) => Err(SubmitError::TimedOut(bound)),
        }
    }

    /// Bounds each chain step on the worker by `d` from now on (default
    /// 60 s).
    pub fn set_chain_timeout(&self, d: Duration) {
        self.shared
            .chain_timeout_ms
            .store(d.as_millis() as u64, Ordering::Relaxed);
    }

    /// Sends a chain message that wants no reply (a release); dropped when
    /// no worker runs (its cache went with it).
    pub fn chain_send(&self, body: Vec<u8>) {
        let live = self.shared.live.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(tx) = &live.tx {
            let _ = tx.send(Out::Chain(0, body));
        }
    }

    /// Stops the worker and does not restart it.
    pub fn shutdown(&self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        self.shared.stop.notify_waiters();
        self.shared.stop.notify_one();
    }
}

impl Runner for Supervisor {
    /// Whether a worker is up and serving.
    fn is_ready(&self) -> bool {
        *self.shared.ready.borrow()
    }

    /// Worker restarts since the node started.
    fn restarts(&self) -> u64 {
        self.shared.restarts.load(Ordering::Relaxed)
    }

    /// The latest load figures.
    fn stats(&self) -> WorkerStats {
        *self.shared.stats.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Each tenant's use of the engine (those with sequences in it).
    fn tenants(&self) -> Vec<TenantUsage> {
        self.shared
            .tenants
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Requests handed to the worker and not finished.
    fn inflight(&self) -> usize {
        self.shared
            .live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .inflight
            .len()
    }

    /// The worker's process id (as the node sees it).
    fn worker_pid(&self) -> Option<u32> {
        self.shared
            .live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pid
    }

    /// The worker's report on its confinement, and whether it reached the probe address.
    fn confinement(&self) -> Option<(Confinement, bool)> {
        self.shared
            .confinement
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn refused(&self) -> Option<String> {
        self.shared
            .refused
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Hands a request to the worker; updates arrive on the returned receiver.
    fn submit(&self, r: Submission) -> Result<(u64, mpsc::UnboundedReceiver<Update>), SubmitError> {
        let mut live = self.shared.live.lock().unwrap_or_else(|e| e.into_inner());
        let Some(tx) = live.tx.clone().filter(|_| self.is_ready()) else {
            return Err(SubmitError::NotReady);
        };
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        if let (Some(chain), Some((traceparent, request_id))) = (&live.chain, r.trace) {
            // ahead of the sequence's first step: the chain's later nodes
            // log their part of it under its trace
            let note = crate::chain::Message::Trace(vec![crate::chain::SeqTrace {
                seq: id,
                traceparent,
                request_id,
            }]);
            let _ = chain.send((0, crate::chain::encode_message(&note)));
        }
        let (utx, urx) = mpsc::unbounded_channel();
        if tx
            .send(Out::Msg(Box::new(ToWorker::Submit {
                id,
                prompt: r.prompt,
                params: r.params,
                priority: r.priority,
                resume: r.resume,
                tenant: r.tenant,
                shared_tokens: r.shared_tokens,
            })))
            .is_err()
        {
            return Err(SubmitError::NotReady);
        }
        live.inflight.insert(id, utx);
        Ok((id, urx))
    }

    /// Cancels a request (a client went away, a deadline passed).
    fn cancel(&self, id: u64) {
        let mut live = self.shared.live.lock().unwrap_or_else(|e| e.into_inner());
        if live.inflight.remove(&id).is_some() {
            if let Some(tx) = &live.tx {
                let _ = tx.send(Out::Msg(Box::new(ToWorker::Cancel { id })));
            }
        }
    }
}

async fn run(shared: Arc<Shared>) {
    let mut backoff = RESTART_BACKOFF_MIN;
    loop {
        if shared.stopping.load(Ordering::SeqCst) {
            return;
        }
        let started = Instant::now();
        if let Err(e) = serve_one(&shared).await {
            tracing::error!("model worker failed: {e:#}");
        }
        shared.ready.send_replace(false);
        // every request still waiting hears that its worker is gone
        let orphans: Vec<_> = {
            let mut live = shared.live.lock().unwrap_or_else(|e| e.into_inner());
            live.tx = None;
            live.chain = None;
            live.pid = None;
            live.steps.clear(); // their callers hear the worker is gone
            live.inflight.drain().collect()
        };
        for (_, tx) in orphans {
            let _ = tx.send(Update::WorkerLost);
        }
        if shared.stopping.load(Ordering::SeqCst) {
            return;
        }
        shared.restarts.fetch_add(1, Ordering::Relaxed);
        if started.elapsed() >= HEALTHY_RUN {
            backoff = RESTART_BACKOFF_MIN;
        }
        tracing::warn!(
            wait_ms = backoff.as_millis() as u64,
            "restarting the model worker"
        );
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = shared.stop.notified() => return,
        }
        backoff = (backoff * 2).min(RESTART_BACKOFF_MAX);
    }
}

/// Runs one worker process until it exits or the node stops.
async fn serve_one(shared: &Arc<Shared>) -> anyhow::Result<()> {
    let spec = &shared.spec;
    let mut spawned = crate::spawn::spawn(spec, &[])?;
    shared.live.lock().unwrap_or_else(|e| e.into_inner()).pid = spawned.child.id();
    let mut rd = std::mem::replace(&mut spawned.reader, Box::new(tokio::io::empty()));
    let mut wr = std::mem::replace(&mut spawned.writer, Box::new(tokio::io::sink()));

    // the model loads; wait for Ready
    let first = tokio::select! {
        f = tokio::time::timeout(READY_TIMEOUT, read_any_async::<FromWorker>(&mut rd)) => f,
        _ = shared.stop.notified() => { let _ = spawned.child.start_kill(); return Ok(()); }
    };
    match first {
        Ok(Ok(Frame::Msg(FromWorker::Ready {
            confinement,
            reached_node,
            kv_blocks,
            ..
        }))) => {
            let confinement = crate::spawn::verify(&spawned, &spec.sandbox, confinement);
            let missing = confinement.missing.clone();
            *shared.confinement.lock().unwrap_or_else(|e| e.into_inner()) =
                Some((confinement, reached_node));
            if !missing.is_empty() {
                let names: Vec<String> = missing.iter().map(ToString::to_string).collect();
                if spec.sandbox.policy.strict {
                    let why = format!(
                        "the worker lacks {} (sandbox = \"{}\"); set sandbox = \"relaxed\" to run it anyway",
                        names.join(", "),
                        spec.sandbox.policy.tier
                    );
                    *shared.refused.lock().unwrap_or_else(|e| e.into_inner()) = Some(why.clone());
                    shared.stopping.store(true, Ordering::SeqCst);
                    let _ = spawned.child.start_kill();
                    anyhow::bail!("refused: {why}");
                }
                tracing::warn!(missing = %names.join(", "), "the worker runs without these layers (sandbox = \"relaxed\")");
            }
            // a fresh worker: all of its cache is free
            *shared.stats.lock().unwrap_or_else(|e| e.into_inner()) = WorkerStats {
                kv_total: kv_blocks,
                ..WorkerStats::default()
            };
        }
        Ok(Ok(other)) => anyhow::bail!("worker spoke before it was ready: {other:?}"),
        Ok(Err(e)) => {
            let status = spawned.child.wait().await?;
            anyhow::bail!("worker exited while loading ({status}): {e}")
        }
        Err(_) => {
            let _ = spawned.child.start_kill();
            anyhow::bail!("worker did not become ready within {READY_TIMEOUT:?}")
        }
    }
    let (tx, mut rx) = mpsc::unbounded_channel::<Out>();
    // a head's steps go down its chain, in order, by one task per worker
    let relay = spec.chain.as_ref().map(|link| {
        let (steps_tx, steps_rx) = mpsc::unbounded_channel();
        let replies = tx.clone();
        tokio::spawn(link.relay(
            steps_rx,
            Box::new(move |step, body| {
                let _ = replies.send(Out::Chain(step, body));
            }),
        ));
        steps_tx
    });
    {
        let mut live = shared.live.lock().unwrap_or_else(|e| e.into_inner());
        live.tx = Some(tx);
        live.chain = relay.clone();
    }
    shared.ready.send_replace(true);
    tracing::info!(pid = spawned.child.id(), tier = %spawned.tier, "model worker ready");

    let writer = async move {
        while let Some(m) = rx.recv().await {
            let bytes = match m {
                Out::Msg(m) => encode(&m)?,
                Out::Chain(step, body) => encode_chain(step, &body)?,
            };
            wr.write_all(&bytes).await?;
        }
        anyhow::Ok(())
    };
    let reader = async {
        loop {
            let msg = match read_any_async::<FromWorker>(&mut rd).await? {
                Frame::Msg(m) => m,
                Frame::Chain { step, body } => {
                    if let Some(relay) = &relay {
                        // from a head: down the chain
                        let _ = relay.send((step, body));
                    } else if let Some(tx) = shared
                        .live
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .steps
                        .remove(&step)
                    {
                        // from a shard: the reply to a step
                        let _ = tx.send(body);
                    }
                    continue;
                }
            };
            match msg {
                FromWorker::Event {
                    id,
                    token,
                    text,
                    logprob,
                    finish,
                    cached,
                } => {
                    let done = finish.is_some();
                    let mut live = shared.live.lock().unwrap_or_else(|e| e.into_inner());
                    if let Some(tx) = live.inflight.get(&id) {
                        let _ = tx.send(Update::Event {
                            token,
                            text,
                            logprob,
                            finish,
                            cached,
                        });
                    }
                    if done {
                        live.inflight.remove(&id);
                    }
                }
                FromWorker::Rejected { id, reason } => {
                    let tx = shared
                        .live
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .inflight
                        .remove(&id);
                    if let Some(tx) = tx {
                        let _ = tx.send(Update::Rejected(reason));
                    }
                }
                FromWorker::Stats {
                    waiting,
                    running,
                    kv_used,
                    kv_total,
                    tenants,
                    cache,
                } => {
                    *shared.stats.lock().unwrap_or_else(|e| e.into_inner()) = WorkerStats {
                        waiting,
                        running,
                        kv_used,
                        kv_total,
                        cache,
                    };
                    *shared.tenants.lock().unwrap_or_else(|e| e.into_inner()) = tenants;
                }
                FromWorker::Ready { .. } => {}
            }
        }
        #[allow(unreachable_code)]
        anyhow::Ok(())
    };
    let outcome = tokio::select! {
        r = reader => r,
        r = writer => r,
        s = spawned.child.wait() => Err(anyhow::anyhow!("worker exited: {}", s?)),
        _ = shared.stop.notified() => Ok(()),
    };
    let _ = spawned.child.start_kill();
    let _ = spawned.child.wait().await;
    outcome
}
