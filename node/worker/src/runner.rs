//! What the API needs of whatever runs its requests: submit, cancel, a
//! stream of [`Update`]s, readiness and load. The [`Supervisor`] of a
//! worker process is one; a test can supply its own.
//!
//! [`Supervisor`]: crate::Supervisor

use tokio::sync::mpsc;
use weft_kernels::{FinishReason, Resume, SamplingParams, TenantUsage, TokenLogprob};

use crate::sandbox::Confinement;

/// What a request hears from the engine running it.
#[derive(Debug, Clone, PartialEq)]
pub enum Update {
    /// Tokens and text.
    Event {
        /// The token.
        token: Option<u32>,
        /// Final text.
        text: String,
        /// Its log-probability.
        logprob: Option<TokenLogprob>,
        /// Set on the last update.
        finish: Option<FinishReason>,
        /// On the first update: prompt tokens mapped from the prefix cache.
        cached: Option<usize>,
    },
    /// The engine refused the request.
    Rejected(String),
    /// The worker died before the request finished.
    WorkerLost,
}

/// Load figures of the engine.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WorkerStats {
    /// Requests waiting in the engine.
    pub waiting: usize,
    /// Requests running in the engine.
    pub running: usize,
    /// KV blocks in use.
    pub kv_used: usize,
    /// KV blocks in all.
    pub kv_total: usize,
    /// The prefix cache's counters.
    pub cache: CacheStats,
}

/// What the prefix cache did since the worker started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CacheStats {
    /// Admissions that mapped a cached prefix.
    pub hits: u64,
    /// Prompt tokens mapped instead of computed.
    pub cached_tokens: u64,
    /// Prompt tokens computed.
    pub computed_tokens: u64,
    /// Cached blocks evicted for room.
    pub evictions: u64,
    /// Blocks the cache keeps now.
    pub blocks: usize,
}

/// Why a request could not be handed over.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SubmitError {
    /// No worker is ready.
    #[error("the model worker is not ready")]
    NotReady,
    /// The worker did not answer in time.
    #[error("the model worker did not answer within {0:?}")]
    TimedOut(std::time::Duration),
}

/// One request as it is handed to a [`Runner`].
#[derive(Debug, Clone)]
pub struct Submission {
    /// Prompt tokens.
    pub prompt: Vec<u32>,
    /// Sampling and stopping.
    pub params: SamplingParams,
    /// Higher is admitted first.
    pub priority: u8,
    /// What another replica produced before it failed mid-stream.
    pub resume: Resume,
    /// Whose request it is.
    pub tenant: String,
    /// Leading prompt tokens any tenant may share the prefix cache of (a
    /// prefix the node's configuration marks shared).
    pub shared_tokens: usize,
    /// The `traceparent` (with the submitting node's span as parent) and
    /// request id that a chain's later nodes log the sequence under.
    pub trace: Option<(String, String)>,
}

/// Something that runs requests on a model.
pub trait Runner: Send + Sync {
    /// Whether it serves now.
    fn is_ready(&self) -> bool;
    /// Hands a request over; its updates arrive on the returned receiver
    /// under the returned id.
    fn submit(
        &self,
        request: Submission,
    ) -> Result<(u64, mpsc::UnboundedReceiver<Update>), SubmitError>;
    /// Cancels a request (its client went away, its deadline passed).
    fn cancel(&self, id: u64);
    /// The latest load figures.
    fn stats(&self) -> WorkerStats;
    /// Requests handed over and not finished.
    fn inflight(&self) -> usize;
    /// Restarts of what runs the requests since the node started.
    fn restarts(&self) -> u64;
    /// Each tenant's use of the engine (those with sequences in it).
    fn tenants(&self) -> Vec<TenantUsage>;
    /// The worker's process id as the node sees it, if one runs.
    fn worker_pid(&self) -> Option<u32>;
    /// The worker's confinement (its report corrected by what the host
    /// sees), and whether it reached the address it was told to probe.
    fn confinement(&self) -> Option<(Confinement, bool)>;
    /// Why the worker was refused for good (below the sandbox policy), if
    /// it was.
    fn refused(&self) -> Option<String>;
}
