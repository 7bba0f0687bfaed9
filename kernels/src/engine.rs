//! The continuous-batching engine: a step function with no threads and no IO.
//!
//! Requests are added and cancelled at any time; each [`Engine::step`] schedules
//! one decode token for every running sequence and fills the rest of the
//! per-step token budget with prefill chunks (running sequences first, then
//! waiting ones by priority and arrival), runs one batched forward, samples, and
//! returns the new tokens with their text and finish reasons. When the KV pool
//! runs dry the newest running sequence is preempted (its blocks freed, its
//! tokens recomputed later); a sequence that cannot fit even alone ends with an
//! error, never a crash.
//!
//! With the prefix cache on ([`EngineConfig::prefix_cache`]), every block a
//! sequence fills is registered under its prefix's name ([`crate::prefix`]),
//! and a sequence admitted later maps the longest cached run of its own
//! blocks' names (within its tenant's scope and quota, and what every node
//! of a chain holds) and computes only the rest; at least its last token is
//! always computed, for its logits. A preempted sequence maps back what it
//! had registered. A tenant's quota counts the distinct blocks its
//! sequences hold, mapped or written.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

use crate::error::{KernelError, Result};
use crate::grammar::{Allowed, Constraint, Grammars};
use crate::kv::{BlockHash, KvCache, SeqId, KV_BLOCK_TOKENS};
use crate::model::{Chunk, ChunkInput, ChunkOutput, Model};
use crate::prefix::CacheScope;
use crate::sampling::{Sampler, SamplingParams, TokenLogprob, TopOfRow};
use crate::tokenizer::{StreamDecoder, TokenId, Tokenizer};

/// A request's id, chosen by the caller.
pub type RequestId = u64;

/// Engine limits.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EngineConfig {
    /// Most tokens (decode + prefill) one step runs.
    pub max_step_tokens: usize,
    /// Most sequences running at once.
    pub max_running: usize,
    /// Longest sequence (prompt + output); capped by the model's context.
    pub max_context: usize,
    /// Bytes the KV pool may use.
    pub kv_budget_bytes: usize,
    /// Share of the KV pool (0 < share ≤ 1) that one tenant's sequences may
    /// hold; a tenant at its share waits for its own blocks to free.
    #[serde(default = "whole_pool")]
    pub tenant_kv_share: f64,
    /// Shares for named tenants, in place of `tenant_kv_share`.
    #[serde(default)]
    pub tenant_kv_shares: BTreeMap<String, f64>,
    /// Bytes of device memory (weights, KV pool, buffers) a GPU engine may
    /// take; 0: 90% of what is free. The CPU ignores it.
    #[serde(default)]
    pub device_memory_budget: usize,
    /// Keep full blocks after their sequence ends and map them into later
    /// sequences with the same prefix (see the module docs).
    #[serde(default = "on")]
    pub prefix_cache: bool,
}

fn whole_pool() -> f64 {
    1.0
}

fn on() -> bool {
    true
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_step_tokens: 512,
            max_running: 256,
            max_context: 8192,
            kv_budget_bytes: 1 << 30,
            tenant_kv_share: 1.0,
            tenant_kv_shares: BTreeMap::new(),
            device_memory_budget: 0,
            prefix_cache: true,
        }
    }
}

/// A generation request.
#[derive(Debug, Clone)]
pub struct Request {
    /// Caller-chosen id, unique among live requests.
    pub id: RequestId,
    /// Prompt tokens (BOS included if wanted).
    pub prompt: Vec<TokenId>,
    /// Sampling and stopping.
    pub params: SamplingParams,
    /// Higher runs first when admission has to choose.
    pub priority: u8,
    /// Whose request it is: tenants share the engine fairly, each within
    /// its KV quota (see [`EngineConfig::tenant_kv_share`]).
    pub tenant: String,
}

/// What a request resumed on this engine had produced before (see
/// [`Engine::add_resumed`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Resume {
    /// Tokens generated so far.
    pub tokens: Vec<TokenId>,
    /// Bytes of their text the client has already received.
    pub text_bytes: usize,
}

/// Why a sequence ended.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum FinishReason {
    /// A stop token or stop string.
    Stop,
    /// `max_tokens` or the context limit.
    Length,
    /// Cancelled by the caller.
    Cancelled,
    /// The engine could not run it (the message says why).
    Error(String),
    /// The replica lost it midway (a node of its chain failed): not the
    /// request's fault, and another replica can continue it.
    Lost(String),
}

/// What one step produced for one request.
#[derive(Debug, Clone, PartialEq)]
pub struct StepEvent {
    /// The request.
    pub id: RequestId,
    /// The token generated this step, if any (absent for a stop token).
    pub token: Option<TokenId>,
    /// Text that became final this step.
    pub text: String,
    /// Log-probability of the token, when asked for.
    pub logprob: Option<TokenLogprob>,
    /// Set on the request's last event.
    pub finish: Option<FinishReason>,
    /// On a request's first event: prompt tokens it mapped from the prefix
    /// cache instead of computing them.
    pub cached_tokens: Option<usize>,
}

struct Sequence {
    id: RequestId,
    /// Prompt followed by generated tokens.
    tokens: Vec<TokenId>,
    prompt_len: usize,
    /// Positions in the KV cache.
    computed: usize,
    sampler: Sampler,
    /// Its grammar's state, when its output is constrained.
    constraint: Option<Constraint>,
    decoder: StreamDecoder,
    /// Text held back because it may begin a stop string.
    held: String,
    priority: u8,
    arrival: u64,
    tenant: Arc<str>,
    /// Names of its first full blocks' prefixes, as far as known.
    hashes: Vec<BlockHash>,
    /// Leading prompt tokens any tenant may share the cache of.
    shared_tokens: usize,
    /// Prompt tokens mapped from the cache at its last admission.
    cached: usize,
    /// Whether its first event (which reports `cached`) went out.
    reported: bool,
    /// Whether it was admitted before (a preempted sequence maps back its
    /// own blocks: no cache hit).
    admitted: bool,
}

impl Sequence {
    fn generated(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }

    /// Its last event when its grammar cannot go on, saying why.
    fn fail(&mut self, why: String) -> StepEvent {
        StepEvent {
            id: self.id,
            token: None,
            text: String::new(),
            logprob: None,
            finish: Some(FinishReason::Error(why)),
            cached_tokens: None,
        }
    }

    /// Its id, positions computed, positions left, and its tenant.
    fn to_compute(&self) -> (RequestId, usize, usize, Arc<str>) {
        (
            self.id,
            self.computed,
            self.tokens.len() - self.computed,
            self.tenant.clone(),
        )
    }
}

/// A tenant with sequences in the engine.
#[derive(Debug, Default, Clone)]
struct TenantState {
    /// KV blocks its sequences hold (distinct blocks: one its sequences
    /// share, or map from the cache, counts once).
    blocks: usize,
    /// Each block its sequences hold, and how many of them hold it.
    held: HashMap<u32, u32>,
    /// Tokens run for it, prefill and decode: the clock of its fair share.
    served: u64,
    /// Its sequences, waiting or running.
    live: usize,
    /// Times one of its sequences was preempted (always for its own blocks).
    preempted: u64,
}

/// One tenant's use of the engine.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TenantUsage {
    /// The tenant.
    pub tenant: String,
    /// Its sequences running.
    pub running: usize,
    /// Its sequences waiting.
    pub waiting: usize,
    /// KV blocks its sequences hold.
    pub kv_blocks: usize,
    /// KV blocks it may hold.
    pub kv_quota: usize,
    /// Tokens run for it (prompt and generated) while it had sequences.
    pub served_tokens: u64,
    /// Times one of its sequences was preempted.
    pub preemptions: u64,
}

/// Why a reservation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Short {
    /// The tenant would go over its share of the pool.
    Quota,
    /// The pool has no free block.
    Pool,
}

/// Counters for metrics and benchmarks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EngineStats {
    /// Steps run.
    pub steps: u64,
    /// Prompt tokens processed (recomputation included).
    pub prefill_tokens: u64,
    /// Tokens generated.
    pub generated_tokens: u64,
    /// Sequences preempted for lack of KV blocks.
    pub preemptions: u64,
    /// Admissions that mapped a cached prefix.
    pub cache_hits: u64,
    /// Prompt tokens mapped from the cache instead of computed.
    pub cached_prompt_tokens: u64,
    /// Cached blocks evicted to make room.
    pub cache_evictions: u64,
}

/// The layers after a head shard, wherever they run: every step the engine
/// sends them the head's hidden states and gets back the last layer's
/// logits. A [`LocalChain`] runs them in this process; the data plane runs
/// them on other nodes.
pub trait Downstream: Send {
    /// Runs `chunks` (hidden-state input, positions as on the head) through
    /// the rest of the model; one output per chunk, logits where asked.
    fn forward(&mut self, chunks: &[Chunk]) -> Result<Vec<ChunkOutput>>;
    /// Forgets sequence `seq` (finished, cancelled or preempted).
    fn release(&mut self, seq: SeqId);
    /// Maps the longest cached run of `hashes` (the names of new sequence
    /// `seq`'s first blocks) on every later shard: the blocks all of them
    /// mapped, which each keeps.
    fn map_prefix(&mut self, seq: SeqId, hashes: &[BlockHash]) -> Result<usize>;
    /// Registers blocks `first..` of `seq` under `hashes` on every later
    /// shard (they computed the same positions).
    fn register(&mut self, seq: SeqId, first: usize, hashes: &[BlockHash]);
}

/// What the engine needs of a chunk's logits, when it wants them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Pick {
    /// The whole row, for the host's sampler.
    Logits,
    /// Only the most likely token.
    Argmax,
    /// The row's best few logits and its softmax sum at this temperature
    /// ([`TopOfRow`]), to draw a top-k / top-p / min-p token from.
    Top {
        /// The sampling temperature.
        temperature: f32,
    },
}

/// What a device step gives for one chunk.
#[derive(Debug, Clone, PartialEq)]
pub enum DeviceOutput {
    /// No logits were asked for (a prefill chunk short of the end).
    Nothing,
    /// The last row's logits, for the host's sampler.
    Logits(Vec<f32>),
    /// The last row's most likely token, picked on the device.
    Argmax(TokenId),
    /// The last row's best logits, for [`Sampler::sample_top`].
    Top(TopOfRow),
}

/// A chunk's output as the engine samples it.
enum Sampled {
    Nothing,
    Logits(Vec<f32>),
    Argmax(TokenId),
    /// Already drawn by the sequence's sampler.
    Drawn(TokenId),
}

/// A whole model on a device other than the CPU (see `cuda::CudaModel`).
/// Its keys and values stay on the device; the engine keeps the block
/// tables in a [`KvCache::tables_only`] of [`DeviceForward::kv_blocks`]
/// blocks and hands it to every step.
pub trait DeviceForward: Send {
    /// Runs one step of token chunks; `picks[i]` says what chunk `i`
    /// needs of its logits (when it wants them).
    fn forward(
        &mut self,
        chunks: &[Chunk],
        kv: &mut KvCache,
        picks: &[Pick],
    ) -> Result<Vec<DeviceOutput>>;
    /// The whole logits row of chunk `chunk` of the last step (when its
    /// top was not enough to draw from).
    fn logits(&mut self, chunk: usize) -> Result<Vec<f32>>;
    /// Blocks of the device's KV pool.
    fn kv_blocks(&self) -> usize;
    /// Most rows (tokens) one step may run.
    fn max_rows(&self) -> usize;
    /// Most sequences one step may run (each may want its logits).
    fn max_sequences(&self) -> usize;
    /// The device, in words.
    fn describe(&self) -> String;
}

/// One shard with its own KV cache: runs hidden states (or tokens, for a
/// head) of any sequences through its layers. A node serving a layer range
/// of a chain runs one; a [`LocalChain`] strings several together.
pub struct Stage {
    shard: Arc<Model>,
    kv: KvCache,
    project: bool,
}

impl std::fmt::Debug for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stage")
            .field("range", &self.shard.range())
            .field("kv", &self.kv)
            .finish()
    }
}

impl Stage {
    /// `shard` with a KV cache of `kv_budget_bytes`.
    pub fn new(shard: Arc<Model>, kv_budget_bytes: usize) -> Self {
        let kv = shard.new_kv_cache(kv_budget_bytes);
        Self {
            shard,
            kv,
            project: true,
        }
    }

    /// A last stage that returns [`ChunkOutput::Last`] rows instead of
    /// logits when the model is tied, for a head that projects them: a
    /// row of `hidden` values travels back instead of one of `vocab`.
    pub fn leaving_projection_to_the_head(mut self) -> Self {
        self.project = !self.shard.is_tied();
        self
    }

    /// The shard.
    pub fn shard(&self) -> &Arc<Model> {
        &self.shard
    }

    /// KV blocks in use and in all.
    pub fn kv_usage(&self) -> (usize, usize) {
        let t = self.kv.total_blocks();
        (t - self.kv.free_blocks(), t)
    }

    /// Runs `chunks` through the shard: each chunk's rows are added to its
    /// sequence's cache at `pos` (a sequence's first chunk starts at 0). A
    /// cache too full for the step is an error, and nothing of the step is
    /// kept for the sequences it had to grow.
    pub fn forward(&mut self, chunks: &[Chunk]) -> Result<Vec<ChunkOutput>> {
        let hidden = self.shard.config().hidden.max(1);
        for c in chunks {
            let rows = match &c.input {
                ChunkInput::Hidden(h) => h.len() / hidden,
                ChunkInput::Tokens(t) => t.len(),
            };
            let have = self.kv.seq_len(c.seq);
            if c.pos > have {
                return Err(KernelError::BadInput(format!(
                    "sequence {} continues at position {} but this shard has {have}",
                    c.seq, c.pos
                )));
            }
            self.kv.reserve(c.seq, c.pos + rows)?;
        }
        if self.project {
            self.shard.forward(chunks, &mut self.kv)
        } else {
            self.shard.forward_unprojected(chunks, &mut self.kv)
        }
    }

    /// Forgets sequence `seq`.
    pub fn release(&mut self, seq: SeqId) {
        self.kv.release(seq);
    }

    /// Maps at most `limit` blocks of the cached run of `hashes` as new
    /// sequence `seq`'s first blocks; the blocks mapped.
    pub fn map_prefix(&mut self, seq: SeqId, hashes: &[BlockHash], limit: usize) -> usize {
        self.kv.map_prefix(seq, hashes, limit)
    }

    /// Keeps only the first `blocks` mapped blocks of `seq`.
    pub fn keep_mapped(&mut self, seq: SeqId, blocks: usize) {
        self.kv.keep_mapped(seq, blocks);
    }

    /// Registers blocks `first..` of `seq` under `hashes`.
    pub fn register(&mut self, seq: SeqId, first: usize, hashes: &[BlockHash]) {
        self.kv.register(seq, first, hashes);
    }

    /// Maps `hashes` as new sequence `seq`'s first blocks, or, when it
    /// holds more, keeps only as many; the blocks it holds after.
    pub fn map_or_keep(&mut self, seq: SeqId, hashes: &[BlockHash]) -> usize {
        if self.kv.contains(seq) {
            self.kv.keep_mapped(seq, hashes.len());
            self.kv
                .blocks(seq)
                .map_or(0, <[u32]>::len)
                .min(hashes.len())
        } else {
            self.kv.map_prefix(seq, hashes, hashes.len())
        }
    }

    /// Cached blocks the shard keeps, and evictions so far.
    pub fn cache_usage(&self) -> (usize, u64) {
        (self.kv.cached_blocks(), self.kv.evictions())
    }
}

/// Downstream shards in this process, one after the other, each with its
/// own KV cache.
pub struct LocalChain {
    stages: Vec<Stage>,
}

impl LocalChain {
    /// The shards, in layer order (the first follows the head; the last
    /// ends the model), each with a cache of `kv_budget_bytes`.
    pub fn new(shards: Vec<Arc<Model>>, kv_budget_bytes: usize) -> Result<Self> {
        if shards.is_empty() || shards.iter().any(|s| s.is_first()) {
            return Err(KernelError::BadInput(
                "a downstream chain is one or more shards after the first".into(),
            ));
        }
        for w in shards.windows(2) {
            if w[0].range().end != w[1].range().start {
                return Err(KernelError::BadInput(format!(
                    "shards {:?} and {:?} are not consecutive",
                    w[0].range(),
                    w[1].range()
                )));
            }
        }
        if !shards.last().is_some_and(|s| s.is_last()) {
            return Err(KernelError::BadInput(
                "the last downstream shard must end the model".into(),
            ));
        }
        Ok(Self {
            stages: shards
                .into_iter()
                .map(|s| Stage::new(s, kv_budget_bytes))
                .collect(),
        })
    }
}

impl LocalChain {
    /// The last shard returns its final hidden states for the head to
    /// project (see [`Stage::leaving_projection_to_the_head`]).
    pub fn leaving_projection_to_the_head(mut self) -> Self {
        if let Some(last) = self.stages.pop() {
            self.stages.push(last.leaving_projection_to_the_head());
        }
        self
    }
}

/// The next shard's input: `chunks` with `outs` (a middle shard's hidden
/// states) in place of their input.
pub fn next_input(chunks: &[Chunk], outs: Vec<ChunkOutput>) -> Result<Vec<Chunk>> {
    if chunks.len() != outs.len() {
        return Err(KernelError::BadInput(format!(
            "{} outputs for {} chunks",
            outs.len(),
            chunks.len()
        )));
    }
    chunks
        .iter()
        .zip(outs)
        .map(|(c, o)| match o {
            ChunkOutput::Hidden(h) => Ok(Chunk {
                seq: c.seq,
                pos: c.pos,
                input: ChunkInput::Hidden(h),
                want_logits: c.want_logits,
            }),
            ChunkOutput::Logits(_) | ChunkOutput::Last(_) => Err(KernelError::BadInput(
                "a shard before the last returned logits".into(),
            )),
        })
        .collect()
}

impl Downstream for LocalChain {
    fn forward(&mut self, chunks: &[Chunk]) -> Result<Vec<ChunkOutput>> {
        let mut input: Vec<Chunk> = chunks.to_vec();
        let last = self.stages.len() - 1;
        for (i, stage) in self.stages.iter_mut().enumerate() {
            let outs = stage.forward(&input)?;
            if i == last {
                return Ok(outs);
            }
            input = next_input(&input, outs)?;
        }
        unreachable!("a chain has at least one stage")
    }

    fn release(&mut self, seq: SeqId) {
        for s in &mut self.stages {
            s.release(seq);
        }
    }

    fn map_prefix(&mut self, seq: SeqId, hashes: &[BlockHash]) -> Result<usize> {
        // each maps what it has of what the one before mapped; all keep
        // what the last mapped
        let mut n = hashes.len();
        for s in &mut self.stages {
            n = s.map_prefix(seq, hashes, n);
        }
        for s in &mut self.stages {
            s.keep_mapped(seq, n);
        }
        Ok(n)
    }

    fn register(&mut self, seq: SeqId, first: usize, hashes: &[BlockHash]) {
        for s in &mut self.stages {
            s.register(seq, first, hashes);
        }
    }
}

/// The batching engine over one full model, or over a head shard whose
/// [`Downstream`] runs the rest.
pub struct Engine {
    model: Arc<Model>,
    /// The layers after the head, when `model` is a head shard.
    rest: Option<Box<dyn Downstream>>,
    /// The device that runs the model, when it is not the CPU.
    device: Option<Box<dyn DeviceForward>>,
    tokenizer: Arc<Tokenizer>,
    kv: KvCache,
    cfg: EngineConfig,
    waiting: VecDeque<Sequence>,
    running: Vec<Sequence>,
    arrivals: u64,
    stats: EngineStats,
    /// Events for requests that ended outside a step (cancel, rejection).
    pending: Vec<StepEvent>,
    /// Tenants with live sequences.
    tenants: HashMap<Arc<str>, TenantState>,
    /// The prefix chain's seed for this model.
    seed: u64,
    /// The tokenizer's grammar compiler, made at the first constrained
    /// request (or shared through [`Engine::set_grammars`]).
    grammars: Option<Arc<Grammars>>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("waiting", &self.waiting.len())
            .field("running", &self.running.len())
            .field("kv", &self.kv)
            .finish()
    }
}

impl Engine {
    /// An engine over a model that holds all layers.
    pub fn new(model: Arc<Model>, tokenizer: Arc<Tokenizer>, cfg: EngineConfig) -> Result<Self> {
        if !model.is_first() || !model.is_last() {
            return Err(KernelError::BadInput(
                "the engine needs a model with all layers; shards are driven by the pipeline"
                    .into(),
            ));
        }
        Self::build(model, None, tokenizer, cfg)
    }

    fn build(
        model: Arc<Model>,
        rest: Option<Box<dyn Downstream>>,
        tokenizer: Arc<Tokenizer>,
        mut cfg: EngineConfig,
    ) -> Result<Self> {
        let bad_share = |v: f64| !(v > 0.0 && v <= 1.0);
        if let Some((who, v)) = std::iter::once(("every tenant", cfg.tenant_kv_share))
            .chain(cfg.tenant_kv_shares.iter().map(|(t, v)| (t.as_str(), *v)))
            .find(|(_, v)| bad_share(*v))
        {
            return Err(KernelError::BadInput(format!(
                "the KV share of {who} is {v}; a share is above 0 and at most 1"
            )));
        }
        cfg.max_context = cfg.max_context.min(model.config().context_length).max(1);
        cfg.max_step_tokens = cfg.max_step_tokens.max(1);
        cfg.max_running = cfg.max_running.max(1);
        let kv = model.new_kv_cache(cfg.kv_budget_bytes);
        let seed = crate::prefix::model_seed(model.config());
        Ok(Self {
            model,
            rest,
            device: None,
            tokenizer,
            kv,
            cfg,
            waiting: VecDeque::new(),
            running: Vec::new(),
            arrivals: 0,
            stats: EngineStats::default(),
            pending: Vec::new(),
            tenants: HashMap::new(),
            seed,
            grammars: None,
        })
    }

    /// An engine over a chain: `head` holds the first layers (and the
    /// embedding) and runs them here; `rest` runs the others and returns
    /// the logits. Scheduling, sampling and the head's KV blocks are as for
    /// a whole model.
    pub fn new_chain(
        head: Arc<Model>,
        rest: Box<dyn Downstream>,
        tokenizer: Arc<Tokenizer>,
        cfg: EngineConfig,
    ) -> Result<Self> {
        if !head.is_first() || head.is_last() {
            return Err(KernelError::BadInput(
                "a chain's head holds the first layers, not all of them".into(),
            ));
        }
        Self::build(head, Some(rest), tokenizer, cfg)
    }

    /// An engine whose steps run on `device`; `model` is the same model on
    /// the host, for its configuration. Scheduling, sampling and the KV
    /// block tables are the CPU engine's; the device holds the keys and
    /// values in as many blocks as it says it has room for.
    pub fn on_device(
        model: Arc<Model>,
        device: Box<dyn DeviceForward>,
        tokenizer: Arc<Tokenizer>,
        mut cfg: EngineConfig,
    ) -> Result<Self> {
        cfg.max_step_tokens = cfg.max_step_tokens.min(device.max_rows());
        cfg.max_running = cfg.max_running.min(device.max_sequences());
        cfg.kv_budget_bytes = 0;
        let mut e = Self::new(model, tokenizer, cfg)?;
        let c = e.model.config();
        e.kv = KvCache::tables_only(c.layers, c.kv_dim(), device.kv_blocks());
        e.device = Some(device);
        Ok(e)
    }

    /// Shares a grammar compiler (and its cache) of this engine's tokenizer.
    pub fn set_grammars(&mut self, grammars: Arc<Grammars>) {
        self.grammars = Some(grammars);
    }

    /// The grammar compiler of this engine's tokenizer, made on first use.
    pub fn grammars(&mut self) -> Result<Arc<Grammars>> {
        if let Some(g) = &self.grammars {
            return Ok(g.clone());
        }
        let g = Arc::new(Grammars::new(&self.tokenizer)?);
        self.grammars = Some(g.clone());
        Ok(g)
    }

    /// The device the steps run on, in words (`cpu` without one).
    pub fn device(&self) -> String {
        self.device
            .as_ref()
            .map_or_else(|| "cpu".to_string(), |d| d.describe())
    }

    /// Frees a sequence's KV blocks here and downstream.
    fn release(&mut self, id: RequestId, tenant: &str) {
        let blocks = self.kv.blocks(id).map(<[u32]>::to_vec).unwrap_or_default();
        self.kv.release(id);
        if let Some(t) = self.tenants.get_mut(tenant) {
            for b in blocks {
                if let Some(n) = t.held.get_mut(&b) {
                    *n -= 1;
                    if *n == 0 {
                        t.held.remove(&b);
                    }
                }
            }
            t.blocks = t.held.len();
        }
        if let Some(r) = self.rest.as_mut() {
            r.release(id);
        }
    }

    /// Counts `blocks` as held by one more sequence of `tenant`.
    fn hold(&mut self, tenant: &str, blocks: &[u32]) {
        if let Some(t) = self.tenants.get_mut(tenant) {
            for &b in blocks {
                *t.held.entry(b).or_default() += 1;
            }
            t.blocks = t.held.len();
        }
    }

    /// Frees a sequence that leaves the engine, and its tenant when it was
    /// the tenant's last.
    fn retire(&mut self, s: &Sequence) {
        self.release(s.id, &s.tenant);
        if let Some(t) = self.tenants.get_mut(&s.tenant) {
            t.live -= 1;
            if t.live == 0 {
                self.tenants.remove(&s.tenant);
            }
        }
    }

    /// KV blocks `tenant` may hold.
    fn quota(&self, tenant: &str) -> usize {
        let share = self
            .cfg
            .tenant_kv_shares
            .get(tenant)
            .copied()
            .unwrap_or(self.cfg.tenant_kv_share);
        let total = self.kv.total_blocks();
        ((total as f64 * share).floor() as usize).clamp(1, total)
    }

    /// Reserves KV blocks for positions `0..len` of a sequence of `tenant`,
    /// within the tenant's quota.
    fn reserve(
        &mut self,
        id: RequestId,
        tenant: &str,
        len: usize,
    ) -> std::result::Result<(), Short> {
        let need = self.kv.blocks_needed(id, len);
        if need == 0 {
            return Ok(());
        }
        let held = self.tenants.get(tenant).map_or(0, |t| t.blocks);
        if held + need > self.quota(tenant) {
            return Err(Short::Quota);
        }
        let before = self.kv.blocks(id).map_or(0, <[u32]>::len);
        self.kv.reserve(id, len).map_err(|_| Short::Pool)?;
        let new = self
            .kv
            .blocks(id)
            .map(|b| b[before..].to_vec())
            .unwrap_or_default();
        self.hold(tenant, &new);
        Ok(())
    }

    /// Maps waiting sequence `w`'s longest cached prefix (within its
    /// tenant's quota, and what every node of a chain holds); at least its
    /// last token is left to compute. Returns the tokens mapped.
    fn map_cached(&mut self, w: usize) -> usize {
        let s = &mut self.waiting[w];
        if !self.cfg.prefix_cache || s.computed != 0 || self.kv.contains(s.id) {
            return 0;
        }
        let whole = (s.tokens.len() - 1) / KV_BLOCK_TOKENS;
        crate::prefix::extend(
            &mut s.hashes,
            self.seed,
            &s.tokens,
            whole,
            s.shared_tokens,
            crate::prefix::tenant_salt(&s.tenant),
        );
        let (id, tenant) = (s.id, s.tenant.clone());
        // a block for the tail must be left (free, or evictable)
        if self.kv.free_blocks() == 0 {
            return 0;
        }
        let hashes = &self.waiting[w].hashes[..whole];
        let mut n = self.kv.map_prefix(id, hashes, whole);
        // within the tenant's quota, a block left for the tail: blocks its
        // sequences hold already cost it nothing
        let quota = self.quota(&tenant);
        if let (Some(t), true) = (self.tenants.get(&tenant), n > 0) {
            let blocks = self.kv.blocks(id).map(<[u32]>::to_vec).unwrap_or_default();
            let mut new = 0;
            let mut fits = 0;
            for (k, b) in blocks.iter().enumerate() {
                new += usize::from(!t.held.contains_key(b));
                if t.blocks + new + 1 > quota {
                    break;
                }
                fits = k + 1;
            }
            if fits < n {
                self.kv.keep_mapped(id, fits);
                n = fits;
            }
        }
        if n > 0 {
            if let Some(rest) = self.rest.as_mut() {
                let down = rest.map_prefix(id, &hashes[..n]).unwrap_or(0).min(n);
                if down < n {
                    self.kv.keep_mapped(id, down);
                    if down == 0 {
                        rest.release(id);
                    }
                    n = down;
                }
            }
        }
        if n == 0 {
            return 0;
        }
        let blocks = self.kv.blocks(id).map(<[u32]>::to_vec).unwrap_or_default();
        self.hold(&tenant, &blocks);
        let s = &mut self.waiting[w];
        s.computed = n * KV_BLOCK_TOKENS;
        // what a client is told it found cached is what it found at its
        // first admission (not what it registered itself before a preemption)
        if !s.admitted {
            s.cached = s.computed.min(s.prompt_len);
        }
        s.computed
    }

    /// Registers the blocks running sequence `i` filled, here and on the
    /// rest of its chain.
    fn register_full(&mut self, i: usize) {
        if !self.cfg.prefix_cache {
            return;
        }
        let s = &mut self.running[i];
        let full = s.computed / KV_BLOCK_TOKENS;
        let first = self.kv.registered(s.id);
        if full <= first {
            return;
        }
        crate::prefix::extend(
            &mut s.hashes,
            self.seed,
            &s.tokens,
            full,
            s.shared_tokens,
            crate::prefix::tenant_salt(&s.tenant),
        );
        let hashes = &s.hashes[first..full];
        self.kv.register(s.id, first, hashes);
        if let Some(rest) = self.rest.as_mut() {
            rest.register(s.id, first, hashes);
        }
    }

    /// Each tenant's use of the engine, by name.
    pub fn tenants(&self) -> Vec<TenantUsage> {
        let mut out: Vec<TenantUsage> = self
            .tenants
            .iter()
            .map(|(name, t)| TenantUsage {
                tenant: name.to_string(),
                running: self.running.iter().filter(|s| &s.tenant == name).count(),
                waiting: self.waiting.iter().filter(|s| &s.tenant == name).count(),
                kv_blocks: t.blocks,
                kv_quota: self.quota(name),
                served_tokens: t.served,
                preemptions: t.preempted,
            })
            .collect();
        out.sort_by(|a, b| a.tenant.cmp(&b.tenant));
        out
    }

    /// The engine's limits (after capping to the model).
    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &Arc<Tokenizer> {
        &self.tokenizer
    }

    /// The model.
    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }

    /// Counters since start.
    pub fn stats(&self) -> EngineStats {
        EngineStats {
            cache_evictions: self.kv.evictions(),
            ..self.stats
        }
    }

    /// KV blocks the prefix cache keeps (held by sequences or not).
    pub fn cached_blocks(&self) -> usize {
        self.kv.cached_blocks()
    }

    /// Requests waiting for admission.
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Requests running.
    pub fn running(&self) -> usize {
        self.running.len()
    }

    /// KV blocks in use and in all.
    pub fn kv_usage(&self) -> (usize, usize) {
        let t = self.kv.total_blocks();
        (t - self.kv.free_blocks(), t)
    }

    /// Whether a step would do anything.
    pub fn has_work(&self) -> bool {
        !self.waiting.is_empty() || !self.running.is_empty() || !self.pending.is_empty()
    }

    /// Queues a request. Fails at once for requests that can never run.
    pub fn add_request(&mut self, req: Request) -> Result<()> {
        self.add_resumed(req, Resume::default())
    }

    /// Queues a request that already produced `resume.tokens` elsewhere (a
    /// replica that failed mid-stream): the sequence goes on after them as
    /// if it had generated them itself. They count against `max_tokens`,
    /// the sampler has seen them (penalties, and one draw each for a seeded
    /// sampler), and their text past `resume.text_bytes` (held back for a
    /// possible stop string, or half a character) is still to come.
    pub fn add_resumed(&mut self, req: Request, resume: Resume) -> Result<()> {
        self.add_with(req, resume, CacheScope::default())
    }

    /// [`Engine::add_resumed`], with the cache scope of its prompt: its
    /// first `scope.shared_tokens` tokens may map (and fill) blocks any
    /// tenant shares.
    pub fn add_with(&mut self, req: Request, resume: Resume, scope: CacheScope) -> Result<()> {
        if req.prompt.is_empty() {
            return Err(KernelError::Rejected("the prompt is empty".into()));
        }
        if req.prompt.len() >= self.cfg.max_context {
            return Err(KernelError::Rejected(format!(
                "the prompt has {} tokens; the context holds {}",
                req.prompt.len(),
                self.cfg.max_context
            )));
        }
        let vocab = self.model.config().vocab as u32;
        if let Some(bad) = req.prompt.iter().find(|&&t| t >= vocab) {
            return Err(KernelError::Rejected(format!(
                "token {bad} is outside the vocabulary"
            )));
        }
        if self.contains(req.id) {
            return Err(KernelError::Rejected(format!(
                "request {} already exists",
                req.id
            )));
        }
        let need = req.prompt.len().div_ceil(crate::kv::KV_BLOCK_TOKENS);
        if need > self.kv.total_blocks() {
            return Err(KernelError::Rejected(format!(
                "the prompt needs {need} KV blocks; the pool has {}",
                self.kv.total_blocks()
            )));
        }
        if need > self.quota(&req.tenant) {
            return Err(KernelError::Rejected(format!(
                "the prompt needs {need} KV blocks; tenant {:?} may hold {}",
                req.tenant,
                self.quota(&req.tenant)
            )));
        }
        if !resume.tokens.is_empty() {
            if resume.tokens.len() >= req.params.max_tokens {
                return Err(KernelError::Rejected(format!(
                    "{} tokens already generated of max_tokens {}: nothing left to resume",
                    resume.tokens.len(),
                    req.params.max_tokens
                )));
            }
            if req.prompt.len() + resume.tokens.len() >= self.cfg.max_context {
                return Err(KernelError::Rejected(
                    "the prompt and the resumed tokens fill the context".into(),
                ));
            }
            if let Some(bad) = resume.tokens.iter().find(|&&t| t >= vocab) {
                return Err(KernelError::Rejected(format!(
                    "resumed token {bad} is outside the vocabulary"
                )));
            }
        }
        let mut constraint = match &req.params.grammar {
            None => None,
            Some(g) => Some(
                self.grammars()?
                    .compile(g)
                    .map_err(|e| KernelError::Rejected(e.to_string()))?,
            ),
        };
        if let Some(c) = constraint.as_mut() {
            for &t in &resume.tokens {
                c.commit(t).map_err(|e| {
                    KernelError::Rejected(format!("the resumed tokens do not fit the grammar: {e}"))
                })?;
            }
        }
        self.arrivals += 1;
        let seed = req.id.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ self.arrivals;
        let prompt_len = req.prompt.len();
        let mut seq = Sequence {
            id: req.id,
            prompt_len,
            tokens: req.prompt,
            computed: 0,
            sampler: Sampler::new(req.params, seed),
            constraint,
            decoder: StreamDecoder::new(),
            held: String::new(),
            priority: req.priority,
            arrival: self.arrivals,
            tenant: Arc::from(req.tenant),
            hashes: Vec::new(),
            shared_tokens: scope.shared_tokens.min(prompt_len),
            cached: 0,
            reported: false,
            admitted: false,
        };
        let mut text = String::new();
        for &t in &resume.tokens {
            seq.tokens.push(t);
            seq.sampler.replay(t);
            text.push_str(&seq.decoder.push(&self.tokenizer, t));
        }
        if resume.text_bytes < text.len() && text.is_char_boundary(resume.text_bytes) {
            seq.held = text[resume.text_bytes..].to_string();
        }
        // a tenant that comes (back) starts at the least-served live
        // tenant's clock: idle time earns no credit to crowd out the others
        let clock = self.tenants.values().map(|t| t.served).min().unwrap_or(0);
        self.tenants
            .entry(seq.tenant.clone())
            .or_insert_with(|| TenantState {
                served: clock,
                ..TenantState::default()
            })
            .live += 1;
        self.enqueue(seq);
        Ok(())
    }

    fn enqueue(&mut self, seq: Sequence) {
        // by priority (high first), then arrival
        let at = self
            .waiting
            .iter()
            .position(|w| {
                (w.priority, std::cmp::Reverse(w.arrival))
                    < (seq.priority, std::cmp::Reverse(seq.arrival))
            })
            .unwrap_or(self.waiting.len());
        self.waiting.insert(at, seq);
    }

    fn contains(&self, id: RequestId) -> bool {
        self.running.iter().any(|s| s.id == id) || self.waiting.iter().any(|s| s.id == id)
    }

    /// Cancels a request; its blocks are freed and the next step reports it
    /// with [`FinishReason::Cancelled`]. Returns whether it was known.
    pub fn cancel(&mut self, id: RequestId) -> bool {
        let found = if let Some(i) = self.running.iter().position(|s| s.id == id) {
            Some(self.running.remove(i))
        } else if let Some(i) = self.waiting.iter().position(|s| s.id == id) {
            self.waiting.remove(i)
        } else {
            None
        };
        let found = found.is_some_and(|s| {
            self.retire(&s);
            true
        });
        if found {
            self.pending.push(StepEvent {
                id,
                token: None,
                text: String::new(),
                logprob: None,
                finish: Some(FinishReason::Cancelled),
                cached_tokens: None,
            });
        }
        found
    }

    /// Runs one step and returns what it produced.
    pub fn step(&mut self) -> Result<Vec<StepEvent>> {
        let mut events = std::mem::take(&mut self.pending);
        let plan = self.schedule(&mut events);
        if plan.is_empty() {
            return Ok(events);
        }
        self.stats.steps += 1;
        let chunks: Vec<Chunk> = plan
            .iter()
            .map(|&(i, n)| {
                let s = &self.running[i];
                Chunk {
                    seq: s.id,
                    pos: s.computed,
                    input: ChunkInput::Tokens(s.tokens[s.computed..s.computed + n].to_vec()),
                    want_logits: s.computed + n == s.tokens.len(),
                }
            })
            .collect();
        // the constrained sequences' masks are computed on a thread of
        // their own while the model runs: off the step's critical path
        let work: Vec<(usize, Constraint)> = plan
            .iter()
            .zip(&chunks)
            .filter(|(_, c)| c.want_logits)
            .filter_map(|(&(i, _), _)| self.running[i].constraint.take().map(|c| (i, c)))
            .collect();
        let (outs, work) = if work.is_empty() {
            (self.outputs(&plan, chunks, &mut events), Vec::new())
        } else {
            std::thread::scope(|sc| {
                let masks = sc.spawn(move || {
                    work.into_iter()
                        .map(|(i, mut c)| {
                            let a = c.allowed();
                            (i, c, a)
                        })
                        .collect::<Vec<_>>()
                });
                let outs = self.outputs(&plan, chunks, &mut events);
                (outs, masks.join().expect("the mask thread does not panic"))
            })
        };
        // the constraints go back, unless the step ended their sequences
        let mut masks = HashMap::new();
        if !matches!(outs, Ok(None)) {
            for (i, c, a) in work {
                self.running[i].constraint = Some(c);
                masks.insert(i, a);
            }
        }
        let Some(outs) = outs? else {
            return Ok(events);
        };
        Ok(self.sample(&plan, outs, events, masks))
    }

    /// Runs a planned step's chunks and gives each its output to sample;
    /// `None` when the step failed and ended its sequences (`events` says
    /// why).
    fn outputs(
        &mut self,
        plan: &[(usize, usize)],
        chunks: Vec<Chunk>,
        events: &mut Vec<StepEvent>,
    ) -> Result<Option<Vec<Sampled>>> {
        if self.device.is_some() {
            return Ok(self.device_step(plan, chunks, events));
        }
        let mut outs = self.model.forward(&chunks, &mut self.kv)?;
        if let Some(rest) = self.rest.as_mut() {
            // the head's hidden states go down the chain; logits come back
            let next = next_input(&chunks, outs)?;
            match one_per_chunk(
                rest.forward(&next).and_then(|o| self.project(o)),
                next.len(),
            ) {
                Ok(o) => outs = o,
                Err(why) => {
                    // the chain's caches no longer match the head's: every
                    // running sequence ends with the reason
                    let why = format!("the model's later layers failed: {why}");
                    self.end_running(events, FinishReason::Lost(why));
                    return Ok(None);
                }
            }
        }
        Ok(Some(
            outs.into_iter()
                .map(|o| match o {
                    ChunkOutput::Logits(Some(l)) => Sampled::Logits(l),
                    _ => Sampled::Nothing,
                })
                .collect(),
        ))
    }

    /// Runs a planned step on the device and samples its outputs. A device
    /// that fails (out of memory, a kernel error) ends the step's running
    /// sequences with the reason; the engine goes on.
    fn device_step(
        &mut self,
        plan: &[(usize, usize)],
        chunks: Vec<Chunk>,
        events: &mut Vec<StepEvent>,
    ) -> Option<Vec<Sampled>> {
        let picks: Vec<Pick> = plan
            .iter()
            .map(|&(i, _)| {
                let p = self.running[i].sampler.params();
                if self.running[i].constraint.is_some() {
                    // the mask is applied to the whole row here
                    Pick::Logits
                } else if p.wants_only_the_argmax() {
                    Pick::Argmax
                } else if p.can_sample_from_the_top() {
                    Pick::Top {
                        temperature: p.temperature,
                    }
                } else {
                    Pick::Logits
                }
            })
            .collect();
        let device = self.device.as_mut().expect("a device step has a device");
        let outs = match one_per_chunk(device.forward(&chunks, &mut self.kv, &picks), chunks.len())
        {
            Ok(o) => o,
            Err(why) => {
                let why = format!("the device failed: {why}");
                self.end_running(events, FinishReason::Error(why));
                return None;
            }
        };
        // a draw from the top of a row, or the whole row where that is
        // not enough
        let mut sampled = Vec::with_capacity(outs.len());
        for (ci, (&(i, _), out)) in plan.iter().zip(outs).enumerate() {
            sampled.push(match out {
                DeviceOutput::Nothing => Sampled::Nothing,
                DeviceOutput::Logits(l) => Sampled::Logits(l),
                DeviceOutput::Argmax(t) => Sampled::Argmax(t),
                DeviceOutput::Top(top) => match self.running[i].sampler.sample_top(&top) {
                    Some(t) => Sampled::Drawn(t),
                    None => match device.logits(ci) {
                        Ok(l) => Sampled::Logits(l),
                        Err(e) => {
                            let why = format!("the device failed: {e}");
                            self.end_running(events, FinishReason::Error(why));
                            return None;
                        }
                    },
                },
            });
        }
        Some(sampled)
    }

    /// Ends every running sequence with `reason` (their caches no longer
    /// match what they computed).
    fn end_running(&mut self, events: &mut Vec<StepEvent>, reason: FinishReason) {
        for s in std::mem::take(&mut self.running) {
            self.retire(&s);
            events.push(StepEvent {
                id: s.id,
                token: None,
                text: String::new(),
                logprob: None,
                finish: Some(reason.clone()),
                cached_tokens: None,
            });
        }
    }

    /// Advances each planned sequence past its chunk, samples the ones
    /// with an output, and retires those that finished.
    fn sample(
        &mut self,
        plan: &[(usize, usize)],
        outs: Vec<Sampled>,
        mut events: Vec<StepEvent>,
        mut masks: HashMap<usize, Result<Allowed>>,
    ) -> Vec<StepEvent> {
        let mut finished = Vec::new();
        for (&(i, n), out) in plan.iter().zip(outs) {
            let s = &mut self.running[i];
            let was_prefill = s.computed < s.prompt_len;
            s.computed += n;
            if was_prefill {
                self.stats.prefill_tokens +=
                    n.min(s.prompt_len.saturating_sub(s.computed - n)) as u64;
            }
            let (tok, logprob) = match out {
                Sampled::Nothing => continue, // a prefill chunk short of the end
                Sampled::Logits(mut logits) => {
                    if let Some(c) = s.constraint.as_mut() {
                        let allowed = masks.remove(&i).unwrap_or_else(|| c.allowed());
                        let masked = allowed
                            .and_then(|a| a.apply(&mut logits, &s.sampler.params().stop_tokens));
                        if let Err(e) = masked {
                            events.push(s.fail(e.to_string()));
                            finished.push(i);
                            continue;
                        }
                    }
                    s.sampler.sample(&mut logits)
                }
                Sampled::Argmax(tok) => {
                    s.sampler.replay(tok);
                    (tok, None)
                }
                Sampled::Drawn(tok) => (tok, None),
            };
            self.stats.generated_tokens += 1;
            let is_stop = s.sampler.params().stop_tokens.contains(&tok);
            let done = match s.constraint.as_mut() {
                Some(c) if !is_stop => match c.commit(tok) {
                    Ok(()) => c.is_finished(),
                    Err(e) => {
                        events.push(s.fail(e.to_string()));
                        finished.push(i);
                        continue;
                    }
                },
                _ => false,
            };
            let mut ev = Self::accept(&self.tokenizer, s, tok, logprob, self.cfg.max_context, done);
            if !s.reported {
                s.reported = true;
                ev.cached_tokens = Some(s.cached);
            }
            if ev.finish.is_some() {
                finished.push(i);
            }
            events.push(ev);
        }
        for &(i, _) in plan {
            self.register_full(i);
        }
        finished.sort_unstable();
        for i in finished.into_iter().rev() {
            let s = self.running.remove(i);
            self.retire(&s);
        }
        events
    }

    /// Projects the chain's [`ChunkOutput::Last`] rows to logits here, all
    /// in one product; other outputs pass as they are.
    fn project(&self, outs: Vec<ChunkOutput>) -> Result<Vec<ChunkOutput>> {
        let rows: Vec<Vec<f32>> = outs
            .iter()
            .filter_map(|o| match o {
                ChunkOutput::Last(Some(r)) => Some(r.clone()),
                _ => None,
            })
            .collect();
        if rows.is_empty() {
            return Ok(outs);
        }
        let mut logits = self.model.project(&rows)?.into_iter();
        Ok(outs
            .into_iter()
            .map(|o| match o {
                ChunkOutput::Last(Some(_)) => ChunkOutput::Logits(logits.next()),
                ChunkOutput::Last(None) => ChunkOutput::Logits(None),
                other => other,
            })
            .collect())
    }

    /// Applies a sampled token: stop checks, text, finish reason.
    fn accept(
        tokenizer: &Tokenizer,
        s: &mut Sequence,
        tok: TokenId,
        logprob: Option<TokenLogprob>,
        max_context: usize,
        grammar_done: bool,
    ) -> StepEvent {
        let params = s.sampler.params();
        let stop_tok = params.stop_tokens.contains(&tok);
        let mut ev = StepEvent {
            id: s.id,
            token: None,
            text: String::new(),
            logprob,
            finish: None,
            cached_tokens: None,
        };
        if stop_tok {
            ev.text = std::mem::take(&mut s.held) + &s.decoder.finish();
            ev.finish = Some(FinishReason::Stop);
            return ev;
        }
        s.tokens.push(tok);
        ev.token = Some(tok);
        let delta = s.decoder.push(tokenizer, tok);
        s.held.push_str(&delta);
        let stops = &params.stop_strings;
        if let Some(at) = stops.iter().filter_map(|st| s.held.find(st.as_str())).min() {
            ev.text = s.held[..at].to_string();
            s.held.clear();
            ev.finish = Some(FinishReason::Stop);
            return ev;
        }
        if grammar_done {
            // the grammar's output is complete: nothing may follow
            ev.text = std::mem::take(&mut s.held) + &s.decoder.finish();
            ev.finish = Some(FinishReason::Stop);
            return ev;
        }
        let out_of_room = s.generated() >= params.max_tokens || s.tokens.len() >= max_context;
        if out_of_room {
            ev.text = std::mem::take(&mut s.held) + &s.decoder.finish();
            ev.finish = Some(FinishReason::Length);
            return ev;
        }
        // hold back the longest tail that could still begin a stop string
        let keep = stops
            .iter()
            .map(|st| longest_prefix_suffix(&s.held, st))
            .max()
            .unwrap_or(0);
        let cut = s.held.len() - keep;
        ev.text = s.held[..cut].to_string();
        s.held.drain(..cut);
        ev
    }

    /// Chooses this step's chunks as (running index, tokens), admitting and
    /// preempting as the budget, the KV pool and the tenants' quotas allow.
    /// A sequence short of blocks only ever preempts its own tenant's
    /// sequences; waiting ones are admitted by priority, then from the
    /// tenant served least so far, then by arrival.
    fn schedule(&mut self, events: &mut Vec<StepEvent>) -> Vec<(usize, usize)> {
        let mut budget = self.cfg.max_step_tokens;
        let mut plan: Vec<(usize, usize)> = Vec::new();
        // tenants with a running sequence held back by their quota
        let mut held_back: Vec<Arc<str>> = Vec::new();
        // 1. one token for every sequence that is decoding
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let (id, computed, len, tenant) = {
                let s = &self.running[i];
                (s.id, s.computed, s.tokens.len(), s.tenant.clone())
            };
            if computed + 1 != len {
                i += 1;
                continue;
            }
            let short = match self.reserve(id, &tenant, computed + 1) {
                Ok(()) => {
                    self.plan(&mut plan, i, 1);
                    budget -= 1;
                    i += 1;
                    continue;
                }
                Err(short) => short,
            };
            // no block for it: its tenant's newest sequence (maybe this
            // one) gives its blocks back and waits
            let newest = self
                .newest_of(&tenant)
                .expect("the tenant has this sequence running");
            let s = self.running.remove(newest);
            self.release(s.id, &s.tenant);
            fix_plan(&mut plan, newest);
            let alone = match short {
                Short::Pool => self.running.is_empty(),
                Short::Quota => self.newest_of(&tenant).is_none(),
            };
            if newest == i && alone {
                events.push(self.too_big(&s, short));
                self.retire(&s);
            } else {
                self.requeue(s);
            }
            if newest < i {
                i -= 1;
            }
        }
        // 2. prefill chunks of running sequences
        for i in 0..self.running.len() {
            if budget == 0 {
                break;
            }
            let s = &self.running[i];
            if s.computed + 1 >= s.tokens.len() || plan.iter().any(|p| p.0 == i) {
                continue;
            }
            let (id, computed, left, tenant) = s.to_compute();
            match self.reserve_chunk(id, &tenant, computed, left.min(budget)) {
                Ok(n) => {
                    self.plan(&mut plan, i, n);
                    budget -= n;
                }
                Err(Short::Quota) => held_back.push(tenant),
                Err(Short::Pool) => {}
            }
        }
        // 3. admit waiting sequences, fairly across tenants
        let mut passed: Vec<Arc<str>> = Vec::new();
        while budget > 0 && self.running.len() < self.cfg.max_running {
            let Some(w) = self.next_waiting(&passed) else {
                break;
            };
            let mapped = self.map_cached(w);
            let s = &self.waiting[w];
            let (id, computed, left, tenant) = s.to_compute();
            let reserved = self.reserve_chunk(id, &tenant, computed, left.min(budget));
            if reserved.is_err() && mapped > 0 {
                // not admitted after all: the mapped blocks go back
                self.release(id, &tenant);
                let s = &mut self.waiting[w];
                s.computed = 0;
                if !s.admitted {
                    s.cached = 0;
                }
            }
            match reserved {
                Ok(n) => {
                    let mut s = self.waiting.remove(w).expect("index is in range");
                    if !s.admitted && s.cached > 0 {
                        self.stats.cache_hits += 1;
                        self.stats.cached_prompt_tokens += s.cached as u64;
                    }
                    s.admitted = true;
                    self.running.push(s);
                    self.plan(&mut plan, self.running.len() - 1, n);
                    budget -= n;
                }
                // the tenant is at its quota: its sequences wait, others go on
                Err(Short::Quota) => passed.push(tenant),
                Err(Short::Pool) => break,
            }
        }
        // 4. a tenant whose running sequences all wait on its quota frees
        // its newest, or fails it when it cannot fit in the quota alone
        held_back.sort();
        held_back.dedup();
        for tenant in held_back {
            let planned = plan.iter().any(|p| self.running[p.0].tenant == tenant);
            let Some(newest) = self.newest_of(&tenant).filter(|_| !planned) else {
                continue;
            };
            let s = self.running.remove(newest);
            fix_plan(&mut plan, newest);
            self.release(s.id, &s.tenant);
            if self.newest_of(&tenant).is_none() {
                events.push(self.too_big(&s, Short::Quota));
                self.retire(&s);
            } else {
                self.requeue(s);
            }
        }
        // 5. nothing could run for lack of blocks: the tenant holding the
        // most frees its newest sequence so the others progress, or one that
        // cannot fit even alone fails
        if plan.is_empty() && !self.running.is_empty() {
            let tenant = self
                .tenants
                .iter()
                .filter(|(name, _)| self.newest_of(name).is_some())
                .max_by_key(|(name, t)| (t.blocks, std::cmp::Reverse(Arc::clone(name))))
                .map(|(name, _)| Arc::clone(name))
                .expect("a running sequence has a tenant");
            let newest = self.newest_of(&tenant).expect("the tenant is running");
            let s = self.running.remove(newest);
            self.release(s.id, &s.tenant);
            if self.running.is_empty() {
                events.push(self.too_big(&s, Short::Pool));
                self.retire(&s);
            } else {
                self.requeue(s);
            }
        } else if plan.is_empty() && self.running.is_empty() {
            if let Some(w) = self.next_waiting(&[]) {
                let s = self.waiting.remove(w).expect("index is in range");
                events.push(self.too_big(&s, Short::Pool));
                self.retire(&s);
            }
        }
        plan
    }

    /// Adds a chunk to the plan and to its tenant's served tokens.
    fn plan(&mut self, plan: &mut Vec<(usize, usize)>, i: usize, n: usize) {
        plan.push((i, n));
        if let Some(t) = self.tenants.get_mut(&self.running[i].tenant) {
            t.served += n as u64;
        }
    }

    /// The running index of `tenant`'s newest sequence.
    fn newest_of(&self, tenant: &str) -> Option<usize> {
        (0..self.running.len())
            .filter(|&j| &*self.running[j].tenant == tenant)
            .max_by_key(|&j| self.running[j].arrival)
    }

    /// The waiting sequence to admit next, outside the tenants `passed`:
    /// the highest priority, then the tenant served least, then the oldest.
    fn next_waiting(&self, passed: &[Arc<str>]) -> Option<usize> {
        let served = |s: &Sequence| self.tenants.get(&s.tenant).map_or(0, |t| t.served);
        (0..self.waiting.len())
            .filter(|&w| !passed.contains(&self.waiting[w].tenant))
            .min_by_key(|&w| {
                let s = &self.waiting[w];
                (std::cmp::Reverse(s.priority), served(s), s.arrival)
            })
    }

    /// Reserves blocks for up to `want` more positions, halving the chunk
    /// until it fits; why not, when not even one position fits.
    fn reserve_chunk(
        &mut self,
        id: RequestId,
        tenant: &str,
        computed: usize,
        want: usize,
    ) -> std::result::Result<usize, Short> {
        let mut n = want;
        let mut short = Short::Pool;
        while n > 0 {
            match self.reserve(id, tenant, computed + n) {
                Ok(()) => return Ok(n),
                Err(s) => short = s,
            }
            n /= 2;
        }
        Err(short)
    }

    fn too_big(&self, s: &Sequence, short: Short) -> StepEvent {
        let why = match short {
            Short::Pool => "the KV cache is too small for this sequence".to_string(),
            Short::Quota => format!(
                "the KV quota of tenant {:?} ({} blocks) is too small for this sequence",
                s.tenant,
                self.quota(&s.tenant)
            ),
        };
        StepEvent {
            id: s.id,
            token: None,
            text: String::new(),
            logprob: None,
            finish: Some(FinishReason::Error(why)),
            cached_tokens: None,
        }
    }

    fn requeue(&mut self, mut s: Sequence) {
        self.stats.preemptions += 1;
        if let Some(t) = self.tenants.get_mut(&s.tenant) {
            t.preempted += 1;
        }
        s.computed = 0;
        self.enqueue(s);
    }
}

/// The outputs of a step of `chunks` chunks, or why there are not one per
/// chunk.
fn one_per_chunk<T>(r: Result<Vec<T>>, chunks: usize) -> std::result::Result<Vec<T>, String> {
    match r {
        Ok(o) if o.len() == chunks => Ok(o),
        Ok(o) => Err(format!("{} outputs for {chunks} chunks", o.len())),
        Err(e) => Err(e.to_string()),
    }
}

/// Drops the plan entry of a removed running index and shifts the later ones.
fn fix_plan(plan: &mut Vec<(usize, usize)>, removed: usize) {
    plan.retain(|p| p.0 != removed);
    for p in plan.iter_mut() {
        if p.0 > removed {
            p.0 -= 1;
        }
    }
}

/// Length of the longest proper prefix of `stop` that `text` ends with.
fn longest_prefix_suffix(text: &str, stop: &str) -> usize {
    let max = stop.len().saturating_sub(1).min(text.len());
    (1..=max)
        .rev()
        .find(|&n| {
            text.is_char_boundary(text.len() - n)
                && stop.is_char_boundary(n)
                && text.ends_with(&stop[..n])
        })
        .unwrap_or(0)
}

/// Per-request results collected from events, for callers that do not stream.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Completion {
    /// Generated tokens.
    pub tokens: Vec<TokenId>,
    /// Generated text.
    pub text: String,
    /// Log-probabilities, when asked for.
    pub logprobs: Vec<TokenLogprob>,
    /// Why it ended.
    pub finish: Option<FinishReason>,
}

impl Engine {
    /// Runs steps until every current request has finished; returns their results.
    pub fn run_to_completion(&mut self) -> Result<HashMap<RequestId, Completion>> {
        let mut out: HashMap<RequestId, Completion> = HashMap::new();
        while self.has_work() {
            for ev in self.step()? {
                let c = out.entry(ev.id).or_default();
                c.tokens.extend(ev.token);
                c.text.push_str(&ev.text);
                c.logprobs.extend(ev.logprob);
                if ev.finish.is_some() {
                    c.finish = ev.finish;
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::longest_prefix_suffix;

    #[test]
    fn stop_prefixes_are_found() {
        assert_eq!(longest_prefix_suffix("hello wo", "world"), 2);
        assert_eq!(longest_prefix_suffix("hello", "world"), 0);
        assert_eq!(longest_prefix_suffix("ab", "abc"), 2);
        assert_eq!(longest_prefix_suffix("xé", "éa"), 2);
    }
}
