//! The transformer forward over a contiguous layer range, for a batch of
//! sequences at different positions, for every supported family ([`Arch`](crate::gguf::Arch)):
//! Gemma 3 and the Llama block (Llama, SmolLM, Mistral; Qwen2 with its q/k/v
//! biases). The families share one block walk; where they differ (norms,
//! biases, activation, RoPE pairing, embedding scale, sliding windows) the
//! layer holds what its family has and the config says how to apply it.
//!
//! One [`Model::forward`] call runs one engine step: every chunk is a run of
//! consecutive positions of one sequence (a prefill chunk, or a single decode
//! token). All rows of all chunks go through each projection together, so the
//! weights are read once per step, not once per sequence. Attention reads the
//! paged [`KvCache`].
//!
//! A shard `[a, b)` takes token ids when `a = 0` and hidden states otherwise; it
//! returns hidden states, or logits when `b` is the last layer. Pipeline shards
//! on different nodes run these ranges and pass the hidden states on.

use std::ops::Range;
use std::path::Path;

use candle_core::utils::barrier_pool;
use half::f16;
use half::slice::HalfFloatSliceExt;

use crate::error::{KernelError, Result};
use crate::gguf::{Activation, GgufFile, ModelConfig, RopeStyle};
use crate::kv::{KvCache, SeqId, KV_BLOCK_TOKENS};
use crate::quant::{dot_f32, QMatrix, SharedMut};

/// Gemma's extra norms: per head on q and k, and on each block's output
/// before the residual add.
pub(crate) struct GemmaNorms {
    pub(crate) q_norm: Vec<f32>,
    pub(crate) k_norm: Vec<f32>,
    pub(crate) post_attn_norm: Vec<f32>,
    pub(crate) post_ffw_norm: Vec<f32>,
}

/// One transformer block's weights.
pub(crate) struct Layer {
    pub(crate) attn_norm: Vec<f32>,
    pub(crate) q: QMatrix,
    pub(crate) k: QMatrix,
    pub(crate) v: QMatrix,
    /// Biases of q, k and v (Qwen2).
    pub(crate) qkv_bias: Option<[Vec<f32>; 3]>,
    pub(crate) o: QMatrix,
    /// Gemma 3's norms; `None` for the Llama block.
    pub(crate) gemma: Option<GemmaNorms>,
    pub(crate) ffn_norm: Vec<f32>,
    pub(crate) gate: QMatrix,
    pub(crate) up: QMatrix,
    pub(crate) down: QMatrix,
    pub(crate) sliding: bool,
}

/// What a chunk feeds into the shard.
#[derive(Debug, Clone, PartialEq)]
pub enum ChunkInput {
    /// Token ids (the first shard).
    Tokens(Vec<u32>),
    /// Hidden states, `rows × hidden` (every later shard).
    Hidden(Vec<f32>),
}

impl ChunkInput {
    fn rows(&self, hidden: usize) -> usize {
        match self {
            ChunkInput::Tokens(t) => t.len(),
            ChunkInput::Hidden(h) => h.len() / hidden.max(1),
        }
    }
}

/// Consecutive positions of one sequence in one step.
#[derive(Debug, Clone, PartialEq)]
pub struct Chunk {
    /// The sequence.
    pub seq: SeqId,
    /// Position of the first row.
    pub pos: usize,
    /// Its input.
    pub input: ChunkInput,
    /// Whether the last shard should return logits for this chunk's last row.
    pub want_logits: bool,
}

/// What the shard returns for one chunk.
#[derive(Debug, Clone, PartialEq)]
pub enum ChunkOutput {
    /// Hidden states of every row, `rows × hidden` (not the last shard).
    Hidden(Vec<f32>),
    /// Logits of the last row (the last shard), when asked for.
    Logits(Option<Vec<f32>>),
    /// The last layer's hidden state of the last row, before the output
    /// norm, when asked for: what a last shard returns when the chain's
    /// head projects it to logits itself (see [`Model::project`]), so a
    /// row of `hidden` values travels instead of one of `vocab`.
    Last(Option<Vec<f32>>),
}

/// A loaded shard (a layer range) of a model of any supported family.
pub struct Model {
    cfg: ModelConfig,
    range: Range<usize>,
    embed: Option<QMatrix>,
    output: Option<QMatrix>,
    output_norm: Option<Vec<f32>>,
    /// Whether the output projection is the token embedding.
    tied: bool,
    layers: Vec<Layer>,
    inv_freq_local: f32,
    inv_freq_global: f32,
    /// Per-frequency divisors of the rotation angle (`rope_freqs.weight`,
    /// Llama 3's long-context scaling), `rope_dims / 2` of them.
    rope_factors: Option<Vec<f32>>,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("range", &self.range)
            .field("cfg", &self.cfg)
            .finish()
    }
}

impl Model {
    /// Loads layers `range` of the model in `path` (all layers: `0..cfg.layers`).
    pub fn load(path: &Path, range: Option<Range<usize>>) -> Result<Self> {
        let mut f = GgufFile::open(path)?;
        let cfg = ModelConfig::from_gguf(&f)?;
        Self::from_gguf(&mut f, cfg, range)
    }

    /// Loads a shard from an open file.
    pub fn from_gguf(
        f: &mut GgufFile,
        cfg: ModelConfig,
        range: Option<Range<usize>>,
    ) -> Result<Self> {
        let range = range.unwrap_or(0..cfg.layers);
        if range.start >= range.end || range.end > cfg.layers {
            return Err(KernelError::BadLayerRange {
                start: range.start,
                end: range.end,
                layers: cfg.layers,
            });
        }
        let (h, q, kv, ffn, hd) = (cfg.hidden, cfg.q_dim(), cfg.kv_dim(), cfg.ffn, cfg.head_dim);
        let first = range.start == 0;
        let last = range.end == cfg.layers;
        let tied = !f.has_tensor("output.weight");
        let embed = if first || (last && tied) {
            Some(f.matrix("token_embd.weight", cfg.vocab, h)?)
        } else {
            None
        };
        let output = if last && !tied {
            Some(f.matrix("output.weight", cfg.vocab, h)?)
        } else {
            None
        };
        // a first shard of a tied model can project a chain's last hidden
        // states itself: it has the embedding, and the norm is small
        let output_norm = if last || (first && tied) {
            Some(f.vector("output_norm.weight", h)?)
        } else {
            None
        };
        let arch = cfg.arch;
        let mut layers = Vec::with_capacity(range.len());
        for l in range.clone() {
            let n = |s: &str| format!("blk.{l}.{s}.weight");
            let bias =
                |f: &mut GgufFile, s: &str, len: usize| f.vector(&format!("blk.{l}.{s}.bias"), len);
            // Qwen2 has them; a Llama-layout file may too
            let qkv_bias = if f.has_tensor(&format!("blk.{l}.attn_q.bias")) {
                Some([
                    bias(f, "attn_q", q)?,
                    bias(f, "attn_k", kv)?,
                    bias(f, "attn_v", kv)?,
                ])
            } else {
                None
            };
            let attn_norm = f.vector(&n("attn_norm"), h)?;
            let (wq, wk, wv) = (
                f.matrix(&n("attn_q"), q, h)?,
                f.matrix(&n("attn_k"), kv, h)?,
                f.matrix(&n("attn_v"), kv, h)?,
            );
            let o = f.matrix(&n("attn_output"), h, q)?;
            let gemma = if arch.has_gemma_norms() {
                Some(GemmaNorms {
                    q_norm: f.vector(&n("attn_q_norm"), hd)?,
                    k_norm: f.vector(&n("attn_k_norm"), hd)?,
                    post_attn_norm: f.vector(&n("post_attention_norm"), h)?,
                    post_ffw_norm: f.vector(&n("post_ffw_norm"), h)?,
                })
            } else {
                None
            };
            layers.push(Layer {
                attn_norm,
                q: wq,
                k: wk,
                v: wv,
                qkv_bias,
                o,
                gemma,
                ffn_norm: f.vector(&n("ffn_norm"), h)?,
                gate: f.matrix(&n("ffn_gate"), ffn, h)?,
                up: f.matrix(&n("ffn_up"), ffn, h)?,
                down: f.matrix(&n("ffn_down"), h, ffn)?,
                sliding: cfg.is_sliding(l),
            });
        }
        let rope_factors = if f.has_tensor("rope_freqs.weight") {
            Some(f.vector("rope_freqs.weight", cfg.rope_dims / 2)?)
        } else {
            None
        };
        let rot = cfg.rope_dims;
        let theta_scale = |base: f32| base.powf(-2.0 / rot as f32);
        Ok(Self {
            inv_freq_local: theta_scale(cfg.rope_local),
            inv_freq_global: theta_scale(cfg.rope_global),
            cfg,
            range,
            embed,
            output,
            output_norm,
            tied,
            layers,
            rope_factors,
        })
    }

    /// The weights, for a device to upload: the embedding, the untied
    /// output projection, the output norm, the blocks, and the RoPE
    /// frequency steps (local, global).
    #[cfg(feature = "cuda")]
    #[allow(clippy::type_complexity)]
    pub(crate) fn parts(
        &self,
    ) -> (
        Option<&QMatrix>,
        Option<&QMatrix>,
        Option<&[f32]>,
        &[Layer],
        (f32, f32),
    ) {
        (
            self.embed.as_ref(),
            self.output.as_ref(),
            self.output_norm.as_deref(),
            &self.layers,
            (self.inv_freq_local, self.inv_freq_global),
        )
    }

    /// Whether RoPE divides its angles by per-frequency factors (`rope_freqs.weight`).
    pub fn has_rope_factors(&self) -> bool {
        self.rope_factors.is_some()
    }

    /// The model's hyper-parameters.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// The layers this shard runs.
    pub fn range(&self) -> Range<usize> {
        self.range.clone()
    }

    /// Whether this shard takes token ids.
    pub fn is_first(&self) -> bool {
        self.range.start == 0
    }

    /// Whether this shard produces logits.
    pub fn is_last(&self) -> bool {
        self.range.end == self.cfg.layers
    }

    /// Whether the output projection is the token embedding (so a chain's
    /// head, which holds the embedding, can project to logits).
    pub fn is_tied(&self) -> bool {
        self.tied
    }

    /// Logits of final hidden rows (the last layer's output, before the
    /// output norm): the norm, then the output projection, all rows in one
    /// product. A shard without the projection refuses.
    pub fn project(&self, rows: &[Vec<f32>]) -> Result<Vec<Vec<f32>>> {
        let cfg = &self.cfg;
        let (Some(norm), Some(head)) = (
            self.output_norm.as_ref(),
            self.output.as_ref().or(self.embed.as_ref()),
        ) else {
            return Err(KernelError::BadInput(format!(
                "shard {:?} cannot project to logits",
                self.range
            )));
        };
        let mut lhs = Vec::with_capacity(rows.len() * cfg.hidden);
        for row in rows {
            if row.len() != cfg.hidden {
                return Err(KernelError::BadInput(format!(
                    "a final hidden row of {} values, not {}",
                    row.len(),
                    cfg.hidden
                )));
            }
            let start = lhs.len();
            lhs.extend_from_slice(row);
            rms_norm(&mut lhs[start..], norm, cfg.rms_eps);
        }
        let mut logits = vec![0f32; rows.len() * cfg.vocab];
        if !rows.is_empty() {
            head.matmul(rows.len(), &lhs, &mut logits)?;
        }
        Ok(logits
            .chunks_exact(cfg.vocab)
            .map(<[f32]>::to_vec)
            .collect())
    }

    /// A KV cache for this shard's layers within `budget_bytes`.
    pub fn new_kv_cache(&self, budget_bytes: usize) -> KvCache {
        KvCache::with_budget(self.range.len(), self.cfg.kv_dim(), budget_bytes)
    }

    /// Bytes of weights held by this shard.
    pub fn weight_bytes(&self) -> usize {
        let vecs = |l: &Layer| {
            let gemma = l.gemma.as_ref().map_or(0, |g| {
                g.q_norm.len() + g.k_norm.len() + g.post_attn_norm.len() + g.post_ffw_norm.len()
            });
            let bias = l
                .qkv_bias
                .as_ref()
                .map_or(0, |b| b.iter().map(Vec::len).sum());
            4 * (l.attn_norm.len() + l.ffn_norm.len() + gemma + bias)
        };
        self.layers
            .iter()
            .map(|l| {
                [&l.q, &l.k, &l.v, &l.o, &l.gate, &l.up, &l.down]
                    .iter()
                    .map(|m| m.size_in_bytes())
                    .sum::<usize>()
                    + vecs(l)
            })
            .sum::<usize>()
            + self.embed.as_ref().map_or(0, |m| m.size_in_bytes())
            + self.output.as_ref().map_or(0, |m| m.size_in_bytes())
    }

    /// Runs one step for `chunks`. The cache must already hold blocks for every
    /// position written (see [`KvCache::reserve`]).
    pub fn forward(&self, chunks: &[Chunk], kv: &mut KvCache) -> Result<Vec<ChunkOutput>> {
        self.run(chunks, kv, true)
    }

    /// As [`Model::forward`], but a last shard returns
    /// [`ChunkOutput::Last`] rows for the head to project.
    pub fn forward_unprojected(
        &self,
        chunks: &[Chunk],
        kv: &mut KvCache,
    ) -> Result<Vec<ChunkOutput>> {
        self.run(chunks, kv, false)
    }

    fn run(&self, chunks: &[Chunk], kv: &mut KvCache, project: bool) -> Result<Vec<ChunkOutput>> {
        let cfg = &self.cfg;
        let h = cfg.hidden;
        if kv.layers() != self.layers.len() || kv.kv_dim() != cfg.kv_dim() {
            return Err(KernelError::BadInput(
                "KV cache does not match this shard".into(),
            ));
        }
        // Gather the input rows.
        let mut rows: Vec<(usize, usize)> = Vec::new(); // (chunk, pos)
        for (ci, c) in chunks.iter().enumerate() {
            let n = c.input.rows(h);
            if n == 0 {
                return Err(KernelError::BadInput(format!(
                    "chunk of sequence {} is empty",
                    c.seq
                )));
            }
            let end = c.pos + n;
            if end > kv.blocks(c.seq)?.len() * KV_BLOCK_TOKENS {
                return Err(KernelError::BadInput(format!(
                    "sequence {} has no KV room for positions up to {end}",
                    c.seq
                )));
            }
            if c.pos > kv.seq_len(c.seq) {
                return Err(KernelError::BadInput(format!(
                    "sequence {} jumps from {} to position {}",
                    c.seq,
                    kv.seq_len(c.seq),
                    c.pos
                )));
            }
            rows.extend((c.pos..end).map(|p| (ci, p)));
        }
        let t = rows.len();
        let mut x = vec![0f32; t * h];
        let mut r = 0;
        for c in chunks {
            match (&c.input, self.is_first()) {
                (ChunkInput::Tokens(toks), true) => {
                    let embed = self.embed.as_ref().ok_or_else(|| {
                        KernelError::BadInput("first shard without embedding".into())
                    })?;
                    let scale = cfg.arch.embed_scale(h);
                    for &tok in toks {
                        if tok as usize >= cfg.vocab {
                            return Err(KernelError::BadInput(format!(
                                "token {tok} outside vocabulary of {}",
                                cfg.vocab
                            )));
                        }
                        let row = &mut x[r * h..(r + 1) * h];
                        embed.row_f32(tok as usize, row)?;
                        if scale != 1.0 {
                            row.iter_mut().for_each(|v| *v *= scale);
                        }
                        r += 1;
                    }
                }
                (ChunkInput::Hidden(hs), false) => {
                    if hs.len() % h != 0 {
                        return Err(KernelError::BadInput(format!(
                            "hidden input of {} values is not a multiple of {h}",
                            hs.len()
                        )));
                    }
                    let n = hs.len() / h;
                    x[r * h..(r + n) * h].copy_from_slice(hs);
                    r += n;
                }
                (ChunkInput::Tokens(_), false) => {
                    return Err(KernelError::BadInput(format!(
                        "shard {:?} takes hidden states, not tokens",
                        self.range
                    )))
                }
                (ChunkInput::Hidden(_), true) => {
                    return Err(KernelError::BadInput(
                        "the first shard takes tokens, not hidden states".into(),
                    ))
                }
            }
        }

        // RoPE tables per row for both bases (one entry per rotated pair).
        let half = cfg.rope_dims / 2;
        let factors = self.rope_factors.as_deref();
        let rope = |scale: f32| -> Vec<(f32, f32)> {
            let mut out = Vec::with_capacity(t * half);
            for &(_, p) in &rows {
                let mut theta = p as f32;
                for i in 0..half {
                    let f = factors.map_or(1.0, |f| f[i]);
                    out.push((theta / f).sin_cos());
                    theta *= scale;
                }
            }
            out
        };
        let rope_local = rope(self.inv_freq_local);
        let rope_global = rope(self.inv_freq_global);

        let mut scratch = Scratch::new(t, cfg);
        // the last shard's output is each chunk's last row, where it wants
        // one: past the last layer's keys and values, only those rows count
        let needed: Option<Vec<usize>> = self.is_last().then(|| {
            let mut keep = Vec::new();
            let mut r = 0;
            for c in chunks {
                r += c.input.rows(h);
                if c.want_logits {
                    keep.push(r - 1);
                }
            }
            keep
        });
        let last = self.layers.len().saturating_sub(1);
        for (li, layer) in self.layers.iter().enumerate() {
            let tables = if layer.sliding {
                &rope_local
            } else {
                &rope_global
            };
            let keep = needed.as_deref().filter(|k| li == last && k.len() < t);
            self.layer_forward(
                li,
                layer,
                chunks,
                &rows,
                &mut x,
                tables,
                kv,
                &mut scratch,
                keep,
            )?;
        }
        for c in chunks {
            let n = c.input.rows(h);
            kv.set_len(c.seq, c.pos + n);
        }

        // Outputs.
        let mut outs = Vec::with_capacity(chunks.len());
        if !self.is_last() {
            let mut r = 0;
            for c in chunks {
                let n = c.input.rows(h);
                outs.push(ChunkOutput::Hidden(x[r * h..(r + n) * h].to_vec()));
                r += n;
            }
            return Ok(outs);
        }
        let mut last_rows = Vec::new();
        let mut r = 0;
        for c in chunks {
            let n = c.input.rows(h);
            if c.want_logits {
                last_rows.push(x[(r + n - 1) * h..(r + n) * h].to_vec());
            }
            r += n;
        }
        if !project {
            let mut it = last_rows.into_iter();
            return Ok(chunks
                .iter()
                .map(|c| ChunkOutput::Last(if c.want_logits { it.next() } else { None }))
                .collect());
        }
        let mut it = self.project(&last_rows)?.into_iter();
        for c in chunks {
            outs.push(ChunkOutput::Logits(if c.want_logits {
                it.next()
            } else {
                None
            }));
        }
        Ok(outs)
    }

    #[allow(clippy::too_many_arguments)]
    fn layer_forward(
        &self,
        li: usize,
        layer: &Layer,
        chunks: &[Chunk],
        rows: &[(usize, usize)],
        x: &mut [f32],
        rope: &[(f32, f32)],
        kv: &mut KvCache,
        s: &mut Scratch,
        keep: Option<&[usize]>,
    ) -> Result<()> {
        let cfg = &self.cfg;
        let (h, hd, t) = (cfg.hidden, cfg.head_dim, rows.len());
        let (qd, kvd) = (cfg.q_dim(), cfg.kv_dim());
        let eps = cfg.rms_eps;
        let half = cfg.rope_dims / 2;
        let style = cfg.arch.rope_style();

        // attention block
        s.normed.copy_from_slice(x);
        for row in s.normed.chunks_exact_mut(h) {
            rms_norm(row, &layer.attn_norm, eps);
        }
        QMatrix::matmul_triple(
            &layer.q, &layer.k, &layer.v, t, &s.normed, &mut s.q, &mut s.k, &mut s.v,
        )?;
        if let Some([bq, bk, bv]) = &layer.qkv_bias {
            add_bias(&mut s.q, bq);
            add_bias(&mut s.k, bk);
            add_bias(&mut s.v, bv);
        }
        let q_scale = 1.0 / (hd as f32).sqrt();
        for r in 0..t {
            let tab = &rope[r * half..(r + 1) * half];
            for head in s.q[r * qd..(r + 1) * qd].chunks_exact_mut(hd) {
                if let Some(g) = &layer.gemma {
                    rms_norm(head, &g.q_norm, eps);
                }
                apply_rope(head, tab, style);
                head.iter_mut().for_each(|v| *v *= q_scale);
            }
            for head in s.k[r * kvd..(r + 1) * kvd].chunks_exact_mut(hd) {
                if let Some(g) = &layer.gemma {
                    rms_norm(head, &g.k_norm, eps);
                }
                apply_rope(head, tab, style);
            }
            let (ci, p) = rows[r];
            kv.write(
                li,
                chunks[ci].seq,
                p,
                &s.k[r * kvd..(r + 1) * kvd],
                &s.v[r * kvd..(r + 1) * kvd],
            )?;
        }
        let window = if layer.sliding {
            cfg.sliding_window
        } else {
            usize::MAX
        };
        let Some(keep) = keep else {
            return self.layer_rest(li, layer, chunks, rows, x, kv, s, window);
        };
        // only the rows in `keep` go on: gathered, finished, put back
        let mut sub = Scratch::new(keep.len(), cfg);
        let mut xs = Vec::with_capacity(keep.len() * h);
        for (i, &r) in keep.iter().enumerate() {
            sub.q[i * qd..(i + 1) * qd].copy_from_slice(&s.q[r * qd..(r + 1) * qd]);
            xs.extend_from_slice(&x[r * h..(r + 1) * h]);
        }
        let sub_rows: Vec<(usize, usize)> = keep.iter().map(|&r| rows[r]).collect();
        self.layer_rest(li, layer, chunks, &sub_rows, &mut xs, kv, &mut sub, window)?;
        for (i, &r) in keep.iter().enumerate() {
            x[r * h..(r + 1) * h].copy_from_slice(&xs[i * h..(i + 1) * h]);
        }
        Ok(())
    }

    /// A layer past its keys and values: attention, the output
    /// projection, the MLP, for `rows` (whose queries are in `s.q`).
    #[allow(clippy::too_many_arguments)]
    fn layer_rest(
        &self,
        li: usize,
        layer: &Layer,
        chunks: &[Chunk],
        rows: &[(usize, usize)],
        x: &mut [f32],
        kv: &KvCache,
        s: &mut Scratch,
        window: usize,
    ) -> Result<()> {
        let cfg = &self.cfg;
        let (h, t, eps) = (cfg.hidden, rows.len(), cfg.rms_eps);
        attention(cfg, kv, li, chunks, rows, &s.q, &mut s.attn, window)?;
        layer.o.matmul(t, &s.attn, &mut s.proj)?;
        let post_attn = layer.gemma.as_ref().map(|g| &g.post_attn_norm[..]);
        residual_add(x, &mut s.proj, post_attn, h, eps);

        // MLP block
        s.normed.copy_from_slice(x);
        for row in s.normed.chunks_exact_mut(h) {
            rms_norm(row, &layer.ffn_norm, eps);
        }
        QMatrix::matmul_pair(&layer.gate, &layer.up, t, &s.normed, &mut s.gate, &mut s.up)?;
        match cfg.arch.activation() {
            Activation::GeluTanh => s
                .gate
                .iter_mut()
                .zip(s.up.iter())
                .for_each(|(g, u)| *g = gelu_ggml(*g) * u),
            Activation::Silu => s
                .gate
                .iter_mut()
                .zip(s.up.iter())
                .for_each(|(g, u)| *g = silu(*g) * u),
        }
        layer.down.matmul(t, &s.gate, &mut s.proj)?;
        let post_ffw = layer.gemma.as_ref().map(|g| &g.post_ffw_norm[..]);
        residual_add(x, &mut s.proj, post_ffw, h, eps);
        Ok(())
    }
}

/// `x += norm(proj)` row by row, the norm only where the family has one.
fn residual_add(x: &mut [f32], proj: &mut [f32], norm: Option<&[f32]>, h: usize, eps: f32) {
    for (xr, pr) in x.chunks_exact_mut(h).zip(proj.chunks_exact_mut(h)) {
        if let Some(w) = norm {
            rms_norm(pr, w, eps);
        }
        xr.iter_mut().zip(pr.iter()).for_each(|(a, b)| *a += b);
    }
}

/// Adds `bias` to every row of `rows`.
fn add_bias(rows: &mut [f32], bias: &[f32]) {
    for row in rows.chunks_exact_mut(bias.len()) {
        row.iter_mut().zip(bias).for_each(|(v, b)| *v += b);
    }
}

/// Per-step buffers, sized once for all layers.
struct Scratch {
    normed: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    attn: Vec<f32>,
    proj: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
}

impl Scratch {
    fn new(t: usize, cfg: &ModelConfig) -> Self {
        Self {
            normed: vec![0.0; t * cfg.hidden],
            q: vec![0.0; t * cfg.q_dim()],
            k: vec![0.0; t * cfg.kv_dim()],
            v: vec![0.0; t * cfg.kv_dim()],
            attn: vec![0.0; t * cfg.q_dim()],
            proj: vec![0.0; t * cfg.hidden],
            gate: vec![0.0; t * cfg.ffn],
            up: vec![0.0; t * cfg.ffn],
        }
    }
}

/// `x ← x / rms(x) · w`; the sum of squares is taken in f64 as ggml does.
pub fn rms_norm(x: &mut [f32], w: &[f32], eps: f32) {
    let ss: f64 = x.iter().map(|v| (*v as f64) * (*v as f64)).sum();
    let mean = (ss / x.len() as f64) as f32;
    let scale = 1.0 / (mean + eps).sqrt();
    x.iter_mut().zip(w).for_each(|(v, w)| *v = *v * scale * w);
}

/// Rotates the first `2 · tab.len()` elements of one head; the rest pass
/// through. NeoX pairs element `i` with `i + n/2`, adjacent pairs `2i` with
/// `2i + 1`.
fn apply_rope(x: &mut [f32], tab: &[(f32, f32)], style: RopeStyle) {
    let n = 2 * tab.len();
    let x = &mut x[..n];
    match style {
        RopeStyle::Neox => {
            let (a, b) = x.split_at_mut(n / 2);
            for ((x0, x1), (sin, cos)) in a.iter_mut().zip(b.iter_mut()).zip(tab) {
                let (u, v) = (*x0, *x1);
                *x0 = u * cos - v * sin;
                *x1 = v * cos + u * sin;
            }
        }
        RopeStyle::Adjacent => {
            for (pair, (sin, cos)) in x.chunks_exact_mut(2).zip(tab) {
                let (u, v) = (pair[0], pair[1]);
                pair[0] = u * cos - v * sin;
                pair[1] = v * cos + u * sin;
            }
        }
    }
}

/// SiLU, `x · sigmoid(x)`, in f32 as ggml's CPU backend computes it.
#[inline]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// GELU with the tanh approximation, as Gemma uses.
#[inline]
pub fn gelu_tanh(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    0.5 * x * (1.0 + (SQRT_2_OVER_PI * x * (1.0 + 0.044_715 * x * x)).tanh())
}

/// GELU as ggml's CPU backend computes it: through a table indexed by the
/// input's f16 bits (input and output rounded to f16), exact outside ±10.
/// Matching it keeps greedy tokens close to llama.cpp's, and a table lookup is
/// much cheaper than `tanh`.
#[inline]
pub fn gelu_ggml(x: f32) -> f32 {
    static TABLE: std::sync::OnceLock<Vec<f32>> = std::sync::OnceLock::new();
    if x <= -10.0 {
        0.0
    } else if x >= 10.0 {
        x
    } else {
        let table = TABLE.get_or_init(|| {
            (0..=u16::MAX)
                .map(|bits| f16::from_f32(gelu_tanh(f16::from_bits(bits).to_f32())).to_f32())
                .collect()
        });
        table[f16::from_f32(x).to_bits() as usize]
    }
}

/// Query rows of one chunk that one attention work item takes.
const ATTN_ROWS_PER_ITEM: usize = 16;

/// Causal attention of every row over its sequence's cached positions, with an
/// optional sliding window. A work item is (chunk, KV head, block of rows): it
/// widens the keys and values it can see from f16 once, then serves every
/// query head of its group for every row of the block. As in llama.cpp, the
/// query meets the f16 keys as f16 and the weights meet the f16 values as f16.
#[allow(clippy::too_many_arguments)]
fn attention(
    cfg: &ModelConfig,
    kv: &KvCache,
    li: usize,
    chunks: &[Chunk],
    rows: &[(usize, usize)],
    q: &[f32],
    out: &mut [f32],
    window: usize,
) -> Result<()> {
    let (hd, heads, kvd, qd) = (cfg.head_dim, cfg.heads, cfg.kv_dim(), cfg.q_dim());
    let group = heads / cfg.kv_heads;
    let (kc, vc) = kv.layer(li);
    let tables: Vec<&[u32]> = chunks
        .iter()
        .map(|c| kv.blocks(c.seq))
        .collect::<Result<_>>()?;
    // (chunk, kv head, first global row, end global row)
    let mut items: Vec<(usize, usize, usize, usize)> = Vec::new();
    let mut start = 0;
    while start < rows.len() {
        let ci = rows[start].0;
        let mut end = start;
        while end < rows.len() && rows[end].0 == ci {
            end += 1;
        }
        let mut r = start;
        while r < end {
            let e = (r + ATTN_ROWS_PER_ITEM).min(end);
            for g in 0..cfg.kv_heads {
                items.push((ci, g, r, e));
            }
            r = e;
        }
        start = end;
    }
    let dst = SharedMut(out.as_mut_ptr());
    let items = &items;
    barrier_pool().execute_chunked(items.len(), move |range| {
        let dst = dst;
        let (mut kbuf, mut vbuf): (Vec<f32>, Vec<f32>) = (Vec::new(), Vec::new());
        let mut scores: Vec<f32> = Vec::new();
        let mut qbuf: Vec<f32> = Vec::new();
        let mut acc: Vec<f32> = Vec::new();
        let mut queries: Vec<(usize, usize, usize, usize)> = Vec::new();
        for &(ci, g, r0, r1) in &items[range] {
            let table = tables[ci];
            let (p_first, p_last) = (rows[r0].1, rows[r1 - 1].1);
            let lo = (p_first + 1).saturating_sub(window);
            let span = p_last + 1 - lo;
            kbuf.resize(span * hd, 0.0);
            vbuf.resize(span * hd, 0.0);
            for pos in lo..=p_last {
                let o = (table[pos / KV_BLOCK_TOKENS] as usize * KV_BLOCK_TOKENS
                    + pos % KV_BLOCK_TOKENS)
                    * kvd
                    + g * hd;
                let at = (pos - lo) * hd;
                kc[o..o + hd].convert_to_f32_slice(&mut kbuf[at..at + hd]);
                vc[o..o + hd].convert_to_f32_slice(&mut vbuf[at..at + hd]);
            }
            // every query of the block: (row, head, first and last visible slot)
            queries.clear();
            for (r, &(_, p)) in rows.iter().enumerate().take(r1).skip(r0) {
                for head in g * group..(g + 1) * group {
                    queries.push((r, head, (p + 1).saturating_sub(window) - lo, p - lo));
                }
            }
            let nq = queries.len();
            // the queries meet the f16 keys as f16
            qbuf.resize(nq * hd, 0.0);
            for (qi, &(r, head, _, _)) in queries.iter().enumerate() {
                let src = &q[r * qd + head * hd..r * qd + (head + 1) * hd];
                for (d, v) in qbuf[qi * hd..(qi + 1) * hd].iter_mut().zip(src) {
                    *d = f16::from_f32(*v).to_f32();
                }
            }
            // scores: each key row is loaded once for all queries that see it
            scores.clear();
            scores.resize(nq * span, f32::NEG_INFINITY);
            for j in 0..span {
                let krow = &kbuf[j * hd..(j + 1) * hd];
                for (qi, &(_, _, first, last)) in queries.iter().enumerate() {
                    if (first..=last).contains(&j) {
                        scores[qi * span + j] = dot_f32(&qbuf[qi * hd..(qi + 1) * hd], krow);
                    }
                }
            }
            // softmax per query; the weights meet the f16 values as f16
            for (qi, &(_, _, first, last)) in queries.iter().enumerate() {
                let row = &mut scores[qi * span + first..qi * span + last + 1];
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut sum = 0f64;
                for sc in row.iter_mut() {
                    *sc = (*sc - max).exp();
                    sum += *sc as f64;
                }
                let inv = (1.0 / sum) as f32;
                for sc in row.iter_mut() {
                    *sc = f16::from_f32(*sc * inv).to_f32();
                }
            }
            // weighted values: each value row is loaded once for all queries
            acc.clear();
            acc.resize(nq * hd, 0.0);
            for j in 0..span {
                let vrow = &vbuf[j * hd..(j + 1) * hd];
                for (qi, &(_, _, first, last)) in queries.iter().enumerate() {
                    if (first..=last).contains(&j) {
                        let w = scores[qi * span + j];
                        acc[qi * hd..(qi + 1) * hd]
                            .iter_mut()
                            .zip(vrow)
                            .for_each(|(a, v)| *a += w * v);
                    }
                }
            }
            for (qi, &(r, head, _, _)) in queries.iter().enumerate() {
                // SAFETY: each (row, head) slice of `out` is written by exactly one item.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        acc[qi * hd..].as_ptr(),
                        dst.0.add(r * qd + head * hd),
                        hd,
                    );
                }
            }
        }
    });
    Ok(())
}
