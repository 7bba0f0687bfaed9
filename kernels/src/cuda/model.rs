//! The whole Gemma 3 forward on a CUDA device, for the engine.
//!
//! At load the weights are dequantized to bf16 and uploaded, and every
//! buffer a step needs (activations for `max_rows` rows, logits for
//! `max_logit_rows` rows, the KV pool) is allocated once, within the
//! memory budget: a step allocates only its small index arrays, so running
//! out of memory is a load-time error that names the budget, and anything
//! later is an error the engine hands to the step's sequences.
//!
//! One step: the host builds the [`StepLayout`] (rows, positions, cache
//! slots, block tables), uploads it, and the device runs the embedding
//! gather, then per layer the norms, the q/k/v projections as cuBLAS bf16
//! GEMMs over every row of the batch, q/k norm with RoPE, the KV store,
//! paged attention (sliding-window or global), the output projection and
//! the GELU MLP; then the output norm and projection for the rows whose
//! logits are wanted, and the argmax of each on the device. Only tokens
//! (or the logits a host sampler needs) come back.

use std::collections::HashMap;
use std::ffi::c_void;

use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType};
use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::{CudaGraph, CudaSlice, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg};

use super::{device_error, Gpu, ROW_THREADS};
use crate::engine::{DeviceForward, DeviceOutput, Pick};
use crate::error::{KernelError, Result};
use crate::gguf::ModelConfig;
use crate::kv::{KvCache, KV_BLOCK_TOKENS};
use crate::layout::StepLayout;
use crate::model::{Chunk, ChunkInput, Model};
use crate::quant::QMatrix;
use crate::sampling::TopOfRow;

/// Room kept for cuBLAS's workspace and the step's index arrays.
const RESERVE_BYTES: usize = 256 << 20;
/// Best logits of a row a top-k / top-p draw gets from the device.
const TOP_K: usize = 64;
/// Room for them, ties at the k-th included.
const TOP_CAP: usize = 2 * TOP_K;

/// How a model is laid out on the device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CudaOptions {
    /// Bytes of device memory weft may take for this model (weights, KV
    /// cache, buffers); 0: 90% of what is free.
    pub memory_budget: usize,
    /// Most bytes of KV cache (less if the budget leaves less).
    pub kv_budget: usize,
    /// Most rows (tokens) one step runs.
    pub max_rows: usize,
    /// Most rows whose logits one step computes (one per sequence at most).
    pub max_logit_rows: usize,
    /// Replay decode steps as CUDA graphs (one per batch size), which cuts
    /// the launch cost of a step to one; off, or where capture fails, every
    /// kernel is launched on its own.
    pub graphs: bool,
}

impl Default for CudaOptions {
    fn default() -> Self {
        Self {
            memory_budget: 0,
            kv_budget: 8 << 30,
            max_rows: 2048,
            max_logit_rows: 256,
            graphs: true,
        }
    }
}

struct DevLayer {
    attn_norm: CudaSlice<f32>,
    q: CudaSlice<u16>,
    k: CudaSlice<u16>,
    v: CudaSlice<u16>,
    o: CudaSlice<u16>,
    q_norm: CudaSlice<f32>,
    k_norm: CudaSlice<f32>,
    post_attn_norm: CudaSlice<f32>,
    ffn_norm: CudaSlice<f32>,
    gate: CudaSlice<u16>,
    up: CudaSlice<u16>,
    down: CudaSlice<u16>,
    post_ffw_norm: CudaSlice<f32>,
    sliding: bool,
}

/// Per-step buffers, allocated once.
struct Buffers {
    x: CudaSlice<f32>,
    normed: CudaSlice<f32>,
    q: CudaSlice<f32>,
    k: CudaSlice<f32>,
    v: CudaSlice<f32>,
    attn: CudaSlice<f32>,
    proj: CudaSlice<f32>,
    gate: CudaSlice<f32>,
    up: CudaSlice<f32>,
    /// bf16 input of the next GEMM.
    xb: CudaSlice<u16>,
    last: CudaSlice<f32>,
    lastb: CudaSlice<u16>,
    logits: CudaSlice<f32>,
    tokens: CudaSlice<u32>,
    positions: CudaSlice<i32>,
    slots: CudaSlice<i32>,
    row_chunk: CudaSlice<i32>,
    logit_rows: CudaSlice<i32>,
    best: CudaSlice<u32>,
    /// Each chunk's block table, `table_stride` entries per chunk.
    tables: CudaSlice<i32>,
    /// Per logit row: 1 / its temperature, and what `top_of_rows` gives.
    inv_t: CudaSlice<f32>,
    top_vals: CudaSlice<f32>,
    top_idx: CudaSlice<u32>,
    top_count: CudaSlice<u32>,
    top_max: CudaSlice<f32>,
    top_total: CudaSlice<f32>,
}

impl Buffers {
    /// Bytes the buffers take for `rows` rows and `logit_rows` logit rows.
    fn bytes(cfg: &ModelConfig, rows: usize, logit_rows: usize) -> usize {
        let (h, q, kv, f) = (cfg.hidden, cfg.q_dim(), cfg.kv_dim(), cfg.ffn);
        let f32s = rows * (3 * h + 2 * q + 2 * kv + 2 * f) + logit_rows * (h + cfg.vocab);
        let u16s = rows * h.max(q).max(f) + logit_rows * h;
        let tables = logit_rows * cfg.context_length.div_ceil(KV_BLOCK_TOKENS);
        4 * f32s + 2 * u16s + 4 * (5 * rows + (6 + 2 * TOP_CAP) * logit_rows + tables)
    }
}

/// A whole model on a CUDA device. See the module's documentation.
pub struct CudaModel {
    gpu: Gpu,
    cfg: ModelConfig,
    embed: CudaSlice<u16>,
    /// The output projection when it is not the embedding.
    output: Option<CudaSlice<u16>>,
    output_norm: CudaSlice<f32>,
    layers: Vec<DevLayer>,
    /// Per layer: `[block][slot][kv_dim]` keys and values, f16 bits.
    kc: Vec<CudaSlice<u16>>,
    vc: Vec<CudaSlice<u16>>,
    blocks: usize,
    buf: Buffers,
    opts: CudaOptions,
    freqs: (f32, f32),
    weight_bytes: usize,
    /// Block-table entries per chunk: the longest context's blocks.
    table_stride: usize,
    /// Captured decode steps by (rows, logit rows, whether any row wants
    /// its top).
    graphs: HashMap<(usize, usize, bool), Graph>,
    /// Each chunk's logit row in the last step.
    last_rows: Vec<Option<usize>>,
    /// Why graphs are off, when capture failed.
    graphs_off: Option<String>,
}

/// A captured step.
struct Graph(CudaGraph);

// SAFETY: a graph is launched only through its CudaModel, which one thread
// uses at a time (the engine's); cudarc binds the context to the calling
// thread before each launch, and CUDA graph handles are not tied to the
// thread that made them.
#[allow(unsafe_code)]
unsafe impl Send for Graph {}

impl std::fmt::Debug for CudaModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaModel")
            .field("device", self.gpu.info())
            .field("blocks", &self.blocks)
            .field("weight_bytes", &self.weight_bytes)
            .finish()
    }
}

fn oom(what: &str, need: usize, budget: usize) -> KernelError {
    KernelError::DeviceOutOfMemory(format!(
        "{what} need {} MiB; the budget is {} MiB",
        need >> 20,
        budget >> 20
    ))
}

impl CudaModel {
    /// Uploads `model` (all of its layers) to CUDA device `ordinal`.
    pub fn load(model: &Model, ordinal: usize, opts: CudaOptions) -> Result<Self> {
        let gpu = Gpu::open(ordinal)?;
        Self::load_on(gpu, model, opts)
    }

    /// Uploads `model` to an open device.
    pub fn load_on(gpu: Gpu, model: &Model, opts: CudaOptions) -> Result<Self> {
        let cfg = model.config().clone();
        if !model.is_first() || !model.is_last() {
            return Err(KernelError::BadInput(
                "the CUDA backend runs whole models, not layer ranges".into(),
            ));
        }
        if !cfg.head_dim.is_multiple_of(32)
            || cfg.head_dim > 512
            || !cfg.heads.is_multiple_of(cfg.kv_heads)
        {
            return Err(KernelError::BadInput(format!(
                "the CUDA attention needs a head size that is a multiple of 32 up to 512 (this model has {}), and whole query groups",
                cfg.head_dim
            )));
        }
        // the device kernels are Gemma 3's block (q/k norms, post norms,
        // GELU, NeoX RoPE); other families run on the CPU
        if cfg.arch != crate::gguf::Arch::Gemma3 {
            return Err(KernelError::ArchitectureNotOnBackend {
                arch: cfg.arch.to_string(),
                backend: "CUDA",
            });
        }
        if cfg.rope_dims != cfg.head_dim || model.has_rope_factors() {
            return Err(KernelError::BadInput(
                "the CUDA kernels rotate whole heads without frequency factors".into(),
            ));
        }
        let (embed, output, norm, layers, freqs) = model.parts();
        if layers.iter().any(|l| l.qkv_bias.is_some()) {
            return Err(KernelError::BadInput(
                "the CUDA kernels have no q/k/v biases".into(),
            ));
        }
        let embed =
            embed.ok_or_else(|| KernelError::BadInput("the model has no embedding".into()))?;
        let norm =
            norm.ok_or_else(|| KernelError::BadInput("the model has no output norm".into()))?;
        let opts = CudaOptions {
            max_rows: opts.max_rows.max(1),
            max_logit_rows: opts.max_logit_rows.max(1),
            ..opts
        };

        // the budget, checked before anything is allocated
        let (free, _) = gpu.memory()?;
        let budget = if opts.memory_budget == 0 {
            free / 10 * 9
        } else if opts.memory_budget > free {
            return Err(KernelError::DeviceOutOfMemory(format!(
                "the memory budget of {} MiB is more than the {} MiB free on {}",
                opts.memory_budget >> 20,
                free >> 20,
                gpu.info().name
            )));
        } else {
            opts.memory_budget
        };
        let mats = |l: &crate::model::Layer| {
            [&l.q, &l.k, &l.v, &l.o, &l.gate, &l.up, &l.down]
                .iter()
                .map(|m| 2 * m.rows() * m.cols())
                .sum::<usize>()
        };
        let weight_bytes = 2 * embed.rows() * embed.cols()
            + output.map_or(0, |m| 2 * m.rows() * m.cols())
            + layers.iter().map(mats).sum::<usize>()
            + 4 * (norm.len() + layers.len() * (4 * cfg.hidden + 2 * cfg.head_dim));
        let buffer_bytes = Buffers::bytes(&cfg, opts.max_rows, opts.max_logit_rows);
        let fixed = weight_bytes + buffer_bytes + RESERVE_BYTES;
        let block_bytes = KvCache::block_bytes(cfg.layers, cfg.kv_dim());
        let one_sequence = cfg.context_length.div_ceil(KV_BLOCK_TOKENS).min(64) * block_bytes;
        if fixed + one_sequence > budget {
            return Err(oom(
                "the weights, the step buffers and a KV cache for one sequence",
                fixed + one_sequence,
                budget,
            ));
        }
        let blocks = ((budget - fixed).min(opts.kv_budget) / block_bytes).max(1);

        let s = gpu.stream.clone();
        let up16 = |m: &QMatrix| -> Result<CudaSlice<u16>> {
            let bits = bf16_bits(m)?;
            s.clone_htod(&bits).map_err(|e| device_error("upload", e))
        };
        let up32 = |v: &[f32]| -> Result<CudaSlice<f32>> {
            s.clone_htod(v).map_err(|e| device_error("upload", e))
        };
        let mut dev_layers = Vec::with_capacity(layers.len());
        for l in layers {
            let g = l
                .gemma
                .as_ref()
                .ok_or_else(|| KernelError::BadInput("a Gemma 3 layer without its norms".into()))?;
            dev_layers.push(DevLayer {
                attn_norm: up32(&l.attn_norm)?,
                q: up16(&l.q)?,
                k: up16(&l.k)?,
                v: up16(&l.v)?,
                o: up16(&l.o)?,
                q_norm: up32(&g.q_norm)?,
                k_norm: up32(&g.k_norm)?,
                post_attn_norm: up32(&g.post_attn_norm)?,
                ffn_norm: up32(&l.ffn_norm)?,
                gate: up16(&l.gate)?,
                up: up16(&l.up)?,
                down: up16(&l.down)?,
                post_ffw_norm: up32(&g.post_ffw_norm)?,
                sliding: l.sliding,
            });
        }
        let zeros16 = |n| zeros::<u16>(&s, n);
        let zeros32 = |n| zeros::<f32>(&s, n);
        let zeros_i = |n| zeros::<i32>(&s, n);
        let zeros_u = |n| zeros::<u32>(&s, n);
        let per_layer = blocks * KV_BLOCK_TOKENS * cfg.kv_dim();
        let mut kc = Vec::with_capacity(cfg.layers);
        let mut vc = Vec::with_capacity(cfg.layers);
        for _ in 0..cfg.layers {
            kc.push(zeros16(per_layer)?);
            vc.push(zeros16(per_layer)?);
        }
        let (r, lr) = (opts.max_rows, opts.max_logit_rows);
        let (h, q, kv, f) = (cfg.hidden, cfg.q_dim(), cfg.kv_dim(), cfg.ffn);
        let buf = Buffers {
            x: zeros32(r * h)?,
            normed: zeros32(r * h)?,
            q: zeros32(r * q)?,
            k: zeros32(r * kv)?,
            v: zeros32(r * kv)?,
            attn: zeros32(r * q)?,
            proj: zeros32(r * h)?,
            gate: zeros32(r * f)?,
            up: zeros32(r * f)?,
            xb: zeros16(r * h.max(q).max(f))?,
            last: zeros32(lr * h)?,
            lastb: zeros16(lr * h)?,
            logits: zeros32(lr * cfg.vocab)?,
            tokens: zeros_u(r)?,
            positions: zeros_i(r)?,
            slots: zeros_i(r)?,
            row_chunk: zeros_i(r)?,
            logit_rows: zeros_i(lr)?,
            best: zeros_u(lr)?,
            tables: zeros_i(lr * cfg.context_length.div_ceil(KV_BLOCK_TOKENS))?,
            inv_t: zeros32(lr)?,
            top_vals: zeros32(lr * TOP_CAP)?,
            top_idx: zeros_u(lr * TOP_CAP)?,
            top_count: zeros_u(lr)?,
            top_max: zeros32(lr)?,
            top_total: zeros32(lr)?,
        };
        let model = Self {
            embed: up16(embed)?,
            output: output.map(up16).transpose()?,
            output_norm: up32(norm)?,
            layers: dev_layers,
            kc,
            vc,
            blocks,
            buf,
            opts,
            freqs,
            weight_bytes,
            table_stride: cfg.context_length.div_ceil(KV_BLOCK_TOKENS),
            graphs: HashMap::new(),
            last_rows: Vec::new(),
            graphs_off: None,
            cfg,
            gpu,
        };
        model
            .gpu
            .stream
            .synchronize()
            .map_err(|e| device_error("upload", e))?;
        Ok(model)
    }

    /// The device.
    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    /// Bytes of weights on the device.
    pub fn weight_bytes(&self) -> usize {
        self.weight_bytes
    }

    /// Bytes of the KV pool on the device.
    pub fn kv_bytes(&self) -> usize {
        self.blocks * KvCache::block_bytes(self.cfg.layers, self.cfg.kv_dim())
    }
}

/// The device and the model's shape: what every launch needs.
struct Dev<'a> {
    gpu: &'a Gpu,
    cfg: &'a ModelConfig,
}

impl Dev<'_> {
    /// `y[rows × n] = x[rows × k] · w[n × k]ᵀ` with bf16 `x` and `w`, f32 `y`.
    fn gemm(
        &self,
        w: &CudaSlice<u16>,
        n: usize,
        k: usize,
        x: &CudaSlice<u16>,
        rows: usize,
        y: &mut CudaSlice<f32>,
    ) -> Result<()> {
        debug_assert!(w.len() >= n * k && x.len() >= rows * k && y.len() >= rows * n);
        let s = &self.gpu.stream;
        let (alpha, beta) = (1.0f32, 0.0f32);
        let (wp, _wg) = w.device_ptr(s);
        let (xp, _xg) = x.device_ptr(s);
        let (yp, _yg) = y.device_ptr_mut(s);
        // SAFETY: column-major view of row-major data: yᵀ (n × rows) =
        // w (k × n, transposed) · xᵀ (k × rows). w holds n × k values, x
        // rows × k and y rows × n (the buffers are sized for max_rows); the
        // handle runs on this stream.
        #[allow(unsafe_code)]
        unsafe {
            cudarc::cublas::result::gemm_ex(
                *self.gpu.blas.handle(),
                cublasOperation_t::CUBLAS_OP_T,
                cublasOperation_t::CUBLAS_OP_N,
                n as i32,
                rows as i32,
                k as i32,
                (&alpha as *const f32).cast::<c_void>(),
                wp as *const c_void,
                cudaDataType::CUDA_R_16BF,
                k as i32,
                xp as *const c_void,
                cudaDataType::CUDA_R_16BF,
                k as i32,
                (&beta as *const f32).cast::<c_void>(),
                yp as *mut c_void,
                cudaDataType::CUDA_R_32F,
                n as i32,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| device_error("GEMM", e))
    }

    /// `dst = bf16(src[..n])`.
    fn to_bf16(&self, src: &CudaSlice<f32>, dst: &mut CudaSlice<u16>, n: usize) -> Result<()> {
        let mut b = self.gpu.stream.launch_builder(self.gpu.kernel("to_bf16"));
        b.arg(src).arg(dst).arg(&n);
        // SAFETY: (const float*, unsigned short*, size_t); both hold n values.
        #[allow(unsafe_code)]
        unsafe { b.launch(LaunchConfig::for_num_elems(n as u32)) }
            .map_err(|e| device_error("to_bf16", e))?;
        Ok(())
    }

    /// `out = (accumulate ? out : 0) + norm(x) · w`, `rows` rows of `cols`.
    #[allow(clippy::too_many_arguments)]
    fn norm(
        &self,
        x: &CudaSlice<f32>,
        out: &mut CudaSlice<f32>,
        w: &CudaSlice<f32>,
        cols: usize,
        rows: usize,
        accumulate: bool,
    ) -> Result<()> {
        let (cols, eps, acc) = (cols as i32, self.cfg.rms_eps, accumulate as i32);
        let mut b = self
            .gpu
            .stream
            .launch_builder(self.gpu.kernel("rms_norm_rows"));
        b.arg(x).arg(out).arg(w).arg(&cols).arg(&eps).arg(&acc);
        // SAFETY: (const float*, float*, const float*, int, float, int);
        // x and out hold rows × cols values, w cols.
        #[allow(unsafe_code)]
        unsafe { b.launch(row_launch(rows)) }.map_err(|e| device_error("rms_norm_rows", e))?;
        Ok(())
    }

    /// `x = norm(x) · w`, `rows` rows of `cols`.
    fn norm_in_place(
        &self,
        x: &mut CudaSlice<f32>,
        w: &CudaSlice<f32>,
        cols: usize,
        rows: usize,
    ) -> Result<()> {
        let s = &self.gpu.stream;
        let (cols, eps, acc) = (cols as i32, self.cfg.rms_eps, 0i32);
        let (xp, _g) = x.device_ptr_mut(s);
        let mut b = s.launch_builder(self.gpu.kernel("rms_norm_rows"));
        b.arg(&xp).arg(&xp).arg(w).arg(&cols).arg(&eps).arg(&acc);
        // SAFETY: as in `norm`, with one buffer in and out, which the kernel
        // allows (each value is read before it is written, by the thread
        // that writes it).
        #[allow(unsafe_code)]
        unsafe { b.launch(row_launch(rows)) }.map_err(|e| device_error("rms_norm_rows", e))?;
        Ok(())
    }

    /// Norm, RoPE and scale of every head of `x` (`rows × heads × head_dim`).
    #[allow(clippy::too_many_arguments)]
    fn qk_norm_rope(
        &self,
        x: &mut CudaSlice<f32>,
        w: &CudaSlice<f32>,
        positions: &CudaSlice<i32>,
        rows: usize,
        heads: usize,
        freq: f32,
        post_scale: f32,
    ) -> Result<()> {
        let hd = self.cfg.head_dim;
        let threads = (hd / 2).next_power_of_two().clamp(32, 256) as u32;
        let (heads_i, hd_i, eps) = (heads as i32, hd as i32, self.cfg.rms_eps);
        let mut b = self
            .gpu
            .stream
            .launch_builder(self.gpu.kernel("qk_norm_rope"));
        b.arg(x)
            .arg(w)
            .arg(positions)
            .arg(&heads_i)
            .arg(&hd_i)
            .arg(&eps)
            .arg(&freq)
            .arg(&post_scale);
        let cfg = LaunchConfig {
            grid_dim: ((rows * heads) as u32, 1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: threads * 4,
        };
        // SAFETY: (float*, const float*, const int*, int, int, float, float,
        // float); x holds rows × heads × head_dim values, positions rows.
        #[allow(unsafe_code)]
        unsafe { b.launch(cfg) }.map_err(|e| device_error("qk_norm_rope", e))?;
        Ok(())
    }

    /// `gate = gelu(gate) · up` over `n` values.
    fn gelu_mul(&self, gate: &mut CudaSlice<f32>, up: &CudaSlice<f32>, n: usize) -> Result<()> {
        let mut b = self.gpu.stream.launch_builder(self.gpu.kernel("gelu_mul"));
        b.arg(gate).arg(up).arg(&n);
        // SAFETY: (float*, const float*, size_t); both hold n values.
        #[allow(unsafe_code)]
        unsafe { b.launch(LaunchConfig::for_num_elems(n as u32)) }
            .map_err(|e| device_error("gelu_mul", e))?;
        Ok(())
    }
}

impl CudaModel {
    /// Runs every layer over the step's rows, from `buf.x` back into it.
    fn layers_forward(&mut self, t: usize) -> Result<()> {
        let dev = Dev {
            gpu: &self.gpu,
            cfg: &self.cfg,
        };
        let cfg = &self.cfg;
        let buf = &mut self.buf;
        let stride = self.table_stride as i32;
        let (h, qd, kvd, f) = (cfg.hidden, cfg.q_dim(), cfg.kv_dim(), cfg.ffn);
        let q_scale = 1.0 / (cfg.head_dim as f32).sqrt();
        let s = &self.gpu.stream;
        for (li, l) in self.layers.iter().enumerate() {
            let freq = if l.sliding {
                self.freqs.0
            } else {
                self.freqs.1
            };
            let window = if l.sliding {
                cfg.sliding_window as i32
            } else {
                0
            };
            // attention block
            dev.norm(&buf.x, &mut buf.normed, &l.attn_norm, h, t, false)?;
            dev.to_bf16(&buf.normed, &mut buf.xb, t * h)?;
            dev.gemm(&l.q, qd, h, &buf.xb, t, &mut buf.q)?;
            dev.gemm(&l.k, kvd, h, &buf.xb, t, &mut buf.k)?;
            dev.gemm(&l.v, kvd, h, &buf.xb, t, &mut buf.v)?;
            dev.qk_norm_rope(
                &mut buf.q,
                &l.q_norm,
                &buf.positions,
                t,
                cfg.heads,
                freq,
                q_scale,
            )?;
            dev.qk_norm_rope(
                &mut buf.k,
                &l.k_norm,
                &buf.positions,
                t,
                cfg.kv_heads,
                freq,
                1.0,
            )?;
            {
                let kvd_i = kvd as i32;
                let mut b = s.launch_builder(self.gpu.kernel("kv_store"));
                b.arg(&buf.k)
                    .arg(&buf.v)
                    .arg(&mut self.kc[li])
                    .arg(&mut self.vc[li])
                    .arg(&buf.slots)
                    .arg(&kvd_i);
                // SAFETY: (const float*, const float*, unsigned short*,
                // unsigned short*, const int*, int): k and v hold t rows of
                // kv_dim; every slot is below blocks × block size (the
                // layout takes them from the engine's tables of this pool).
                #[allow(unsafe_code)]
                unsafe { b.launch(row_launch(t)) }.map_err(|e| device_error("kv_store", e))?;
            }
            {
                let (rows_i, heads_i, kvh_i, hd_i) = (
                    t as i32,
                    cfg.heads as i32,
                    cfg.kv_heads as i32,
                    cfg.head_dim as i32,
                );
                let mut b = s.launch_builder(self.gpu.kernel("attention"));
                b.arg(&buf.q)
                    .arg(&self.kc[li])
                    .arg(&self.vc[li])
                    .arg(&mut buf.attn)
                    .arg(&buf.positions)
                    .arg(&buf.row_chunk)
                    .arg(&buf.tables)
                    .arg(&stride)
                    .arg(&rows_i)
                    .arg(&heads_i)
                    .arg(&kvh_i)
                    .arg(&hd_i)
                    .arg(&window);
                let warps = (t * cfg.heads) as u32;
                let cfg = LaunchConfig {
                    grid_dim: (warps.div_ceil(4), 1, 1),
                    block_dim: (128, 1, 1),
                    shared_mem_bytes: 0,
                };
                // SAFETY: (const float*, const unsigned short*, const
                // unsigned short*, float*, const int*, const int*, const
                // int*, int, int, int, int, int, int): q and attn hold t ×
                // heads × head_dim values; positions and row_chunk t; tables
                // max_blocks per chunk, covering every position a row sees.
                #[allow(unsafe_code)]
                unsafe { b.launch(cfg) }.map_err(|e| device_error("attention", e))?;
            }
            dev.to_bf16(&buf.attn, &mut buf.xb, t * qd)?;
            dev.gemm(&l.o, h, qd, &buf.xb, t, &mut buf.proj)?;
            dev.norm(&buf.proj, &mut buf.x, &l.post_attn_norm, h, t, true)?;
            // MLP block
            dev.norm(&buf.x, &mut buf.normed, &l.ffn_norm, h, t, false)?;
            dev.to_bf16(&buf.normed, &mut buf.xb, t * h)?;
            dev.gemm(&l.gate, f, h, &buf.xb, t, &mut buf.gate)?;
            dev.gemm(&l.up, f, h, &buf.xb, t, &mut buf.up)?;
            dev.gelu_mul(&mut buf.gate, &buf.up, t * f)?;
            dev.to_bf16(&buf.gate, &mut buf.xb, t * f)?;
            dev.gemm(&l.down, h, f, &buf.xb, t, &mut buf.proj)?;
            dev.norm(&buf.proj, &mut buf.x, &l.post_ffw_norm, h, t, true)?;
        }
        Ok(())
    }

    /// Logits of the rows `layout.logit_rows` into `buf.logits`, the
    /// argmax of each into `buf.best`, and with `top` the best of each
    /// into the `top_*` buffers.
    fn logits(&mut self, n: usize, top: bool) -> Result<()> {
        let dev = Dev {
            gpu: &self.gpu,
            cfg: &self.cfg,
        };
        let cfg = &self.cfg;
        let buf = &mut self.buf;
        let s = &self.gpu.stream;
        let h = cfg.hidden as i32;
        let mut b = s.launch_builder(self.gpu.kernel("gather_rows"));
        b.arg(&buf.x)
            .arg(&buf.logit_rows)
            .arg(&mut buf.last)
            .arg(&h);
        // SAFETY: (const float*, const int*, float*, int): every gathered
        // row index is below the step's rows; last holds n rows of hidden.
        #[allow(unsafe_code)]
        unsafe { b.launch(row_launch(n)) }.map_err(|e| device_error("gather_rows", e))?;
        dev.norm_in_place(&mut buf.last, &self.output_norm, cfg.hidden, n)?;
        dev.to_bf16(&buf.last, &mut buf.lastb, n * cfg.hidden)?;
        let head = self.output.as_ref().unwrap_or(&self.embed);
        dev.gemm(head, cfg.vocab, cfg.hidden, &buf.lastb, n, &mut buf.logits)?;
        let vocab = cfg.vocab as i32;
        let mut b = s.launch_builder(self.gpu.kernel("argmax_rows"));
        b.arg(&buf.logits).arg(&vocab).arg(&mut buf.best);
        let launch = LaunchConfig {
            grid_dim: (n as u32, 1, 1),
            block_dim: (ROW_THREADS, 1, 1),
            shared_mem_bytes: ROW_THREADS * 8,
        };
        // SAFETY: (const float*, int, unsigned*): logits holds n rows of
        // vocab values, best n slots.
        #[allow(unsafe_code)]
        unsafe { b.launch(launch) }.map_err(|e| device_error("argmax_rows", e))?;
        if top {
            let (k, cap) = (TOP_K as i32, TOP_CAP as i32);
            let mut b = s.launch_builder(self.gpu.kernel("top_of_rows"));
            b.arg(&buf.logits)
                .arg(&vocab)
                .arg(&k)
                .arg(&cap)
                .arg(&buf.inv_t)
                .arg(&mut buf.top_vals)
                .arg(&mut buf.top_idx)
                .arg(&mut buf.top_count)
                .arg(&mut buf.top_max)
                .arg(&mut buf.top_total);
            let launch = LaunchConfig {
                grid_dim: (n as u32, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: (const float*, int, int, int, const float*, float*,
            // unsigned*, unsigned*, float*, float*): logits holds n rows of
            // vocab values; inv_t, top_count, top_max and top_total n slots;
            // top_vals and top_idx n × cap; the kernel's static shared
            // arrays are sized for its 256 threads.
            #[allow(unsafe_code)]
            unsafe { b.launch(launch) }.map_err(|e| device_error("top_of_rows", e))?;
        }
        Ok(())
    }

    /// Launches a whole step for `t` rows, `n` of them wanting logits,
    /// over the inputs already in the buffers.
    fn launch_step(&mut self, t: usize, n: usize, top: bool) -> Result<()> {
        let (hidden, scale) = (self.cfg.hidden as i32, (self.cfg.hidden as f32).sqrt());
        let mut b = self
            .gpu
            .stream
            .launch_builder(self.gpu.kernel("embed_rows"));
        b.arg(&self.embed)
            .arg(&self.buf.tokens)
            .arg(&mut self.buf.x)
            .arg(&hidden)
            .arg(&scale);
        // SAFETY: (const unsigned short*, const unsigned int*, float*, int,
        // float): every token is below vocab (the layout checks), x holds t
        // rows of hidden.
        #[allow(unsafe_code)]
        unsafe { b.launch(row_launch(t)) }.map_err(|e| device_error("embed_rows", e))?;
        self.layers_forward(t)?;
        if n > 0 {
            self.logits(n, top)?;
        }
        Ok(())
    }

    /// Captures the step's launches for `t` rows and `n` logit rows as a
    /// graph, without running them.
    fn capture(&mut self, t: usize, n: usize, top: bool) -> Result<CudaGraph> {
        let s = self.gpu.stream.clone();
        s.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(|e| device_error("graph capture", e))?;
        let launched = self.launch_step(t, n, top);
        // always end the capture, so the stream is usable again
        let graph = s.end_capture(CUgraphInstantiate_flags(0));
        launched?;
        graph
            .map_err(|e| device_error("graph capture", e))?
            .ok_or_else(|| KernelError::BadInput("CUDA graph capture gave no graph".into()))
    }

    /// Runs one step. See the module's documentation.
    fn step(
        &mut self,
        chunks: &[Chunk],
        kv: &mut KvCache,
        picks: &[Pick],
    ) -> Result<Vec<DeviceOutput>> {
        if kv.layers() != self.cfg.layers || kv.total_blocks() > self.blocks {
            return Err(KernelError::BadInput(
                "the block tables are not of this device's KV pool".into(),
            ));
        }
        let layout = StepLayout::new(chunks, kv, self.cfg.vocab)?;
        let (t, n) = (layout.rows(), layout.logit_rows.len());
        if t > self.opts.max_rows || chunks.len() > self.opts.max_logit_rows {
            return Err(KernelError::BadInput(format!(
                "a step of {t} rows in {} chunks; this device runs at most {} and {}",
                chunks.len(),
                self.opts.max_rows,
                self.opts.max_logit_rows
            )));
        }
        if layout.max_blocks > self.table_stride {
            return Err(KernelError::BadInput(format!(
                "a sequence of {} blocks; the context holds {}",
                layout.max_blocks, self.table_stride
            )));
        }
        // the block tables at a fixed stride, so a captured step reads them
        // where they are each time
        let mut tables = vec![-1i32; chunks.len() * self.table_stride];
        for (ci, row) in layout.tables.chunks(layout.max_blocks.max(1)).enumerate() {
            tables[ci * self.table_stride..ci * self.table_stride + row.len()].copy_from_slice(row);
        }
        let s = self.gpu.stream.clone();
        let copy = |e| device_error("copy", e);
        let b = &mut self.buf;
        s.memcpy_htod(&layout.tokens, &mut b.tokens.slice_mut(..t))
            .map_err(copy)?;
        s.memcpy_htod(&layout.positions, &mut b.positions.slice_mut(..t))
            .map_err(copy)?;
        s.memcpy_htod(&layout.slots, &mut b.slots.slice_mut(..t))
            .map_err(copy)?;
        s.memcpy_htod(&layout.row_chunk, &mut b.row_chunk.slice_mut(..t))
            .map_err(copy)?;
        s.memcpy_htod(&tables, &mut b.tables.slice_mut(..tables.len()))
            .map_err(copy)?;
        // each wanting chunk's logit row, and 1 / temperature for its top
        let pick = |ci: usize| picks.get(ci).copied().unwrap_or(Pick::Logits);
        self.last_rows.clear();
        let mut inv_t = Vec::with_capacity(n);
        for (ci, c) in chunks.iter().enumerate() {
            if c.want_logits {
                self.last_rows.push(Some(inv_t.len()));
                inv_t.push(match pick(ci) {
                    Pick::Top { temperature } if temperature > 0.0 => 1.0 / temperature,
                    _ => 1.0,
                });
            } else {
                self.last_rows.push(None);
            }
        }
        let top = chunks
            .iter()
            .enumerate()
            .any(|(ci, c)| c.want_logits && matches!(pick(ci), Pick::Top { .. }));
        if n > 0 {
            s.memcpy_htod(&layout.logit_rows, &mut b.logit_rows.slice_mut(..n))
                .map_err(copy)?;
            s.memcpy_htod(&inv_t, &mut b.inv_t.slice_mut(..n))
                .map_err(copy)?;
        }
        let decode = t == chunks.len();
        let key = (t, n, top);
        if decode && self.opts.graphs && !self.graphs.contains_key(&key) {
            match self.capture(t, n, top) {
                Ok(g) => {
                    self.graphs.insert(key, Graph(g));
                }
                Err(e) => {
                    // launch kernel by kernel from now on
                    self.graphs_off = Some(e.to_string());
                    self.opts.graphs = false;
                }
            }
        }
        match self.graphs.get(&key).filter(|_| decode && self.opts.graphs) {
            Some(g) => g.0.launch().map_err(|e| device_error("graph launch", e))?,
            None => self.launch_step(t, n, top)?,
        }
        for c in chunks {
            if let ChunkInput::Tokens(toks) = &c.input {
                kv.set_len(c.seq, c.pos + toks.len());
            }
        }
        let mut outs: Vec<DeviceOutput> = chunks.iter().map(|_| DeviceOutput::Nothing).collect();
        if n == 0 {
            s.synchronize().map_err(|e| device_error("step", e))?;
            return Ok(outs);
        }
        let best = s.clone_dtoh(&self.buf.best.slice(..n)).map_err(copy)?;
        let tops = if top {
            let b = &self.buf;
            Some((
                s.clone_dtoh(&b.top_vals.slice(..n * TOP_CAP))
                    .map_err(copy)?,
                s.clone_dtoh(&b.top_idx.slice(..n * TOP_CAP))
                    .map_err(copy)?,
                s.clone_dtoh(&b.top_count.slice(..n)).map_err(copy)?,
                s.clone_dtoh(&b.top_max.slice(..n)).map_err(copy)?,
                s.clone_dtoh(&b.top_total.slice(..n)).map_err(copy)?,
            ))
        } else {
            None
        };
        for (ci, row) in self.last_rows.clone().into_iter().enumerate() {
            let Some(k) = row else { continue };
            outs[ci] = match (pick(ci), &tops) {
                (Pick::Argmax, _) => DeviceOutput::Argmax(best[k]),
                (Pick::Top { .. }, Some((vals, idx, count, max, total))) => {
                    let c = (count[k] as usize).min(TOP_CAP);
                    let at = k * TOP_CAP;
                    DeviceOutput::Top(TopOfRow {
                        cands: idx[at..at + c]
                            .iter()
                            .copied()
                            .zip(vals[at..at + c].iter().copied())
                            .collect(),
                        k: TOP_K,
                        max: max[k],
                        total: total[k] as f64,
                    })
                }
                _ => DeviceOutput::Logits(self.logits_row(k)?),
            };
        }
        Ok(outs)
    }

    /// Logit row `k` of the last step.
    fn logits_row(&self, k: usize) -> Result<Vec<f32>> {
        let vocab = self.cfg.vocab;
        self.gpu
            .stream
            .clone_dtoh(&self.buf.logits.slice(k * vocab..(k + 1) * vocab))
            .map_err(|e| device_error("copy", e))
    }
}

impl DeviceForward for CudaModel {
    fn forward(
        &mut self,
        chunks: &[Chunk],
        kv: &mut KvCache,
        picks: &[Pick],
    ) -> Result<Vec<DeviceOutput>> {
        self.step(chunks, kv, picks)
    }

    fn logits(&mut self, chunk: usize) -> Result<Vec<f32>> {
        match self.last_rows.get(chunk).copied().flatten() {
            Some(k) => self.logits_row(k),
            None => Err(KernelError::BadInput(format!(
                "chunk {chunk} of the last step has no logits"
            ))),
        }
    }

    fn kv_blocks(&self) -> usize {
        self.blocks
    }

    fn max_rows(&self) -> usize {
        self.opts.max_rows
    }

    fn max_sequences(&self) -> usize {
        self.opts.max_logit_rows
    }

    fn describe(&self) -> String {
        let i = self.gpu.info();
        let graphs = match (&self.graphs_off, self.opts.graphs) {
            (Some(why), _) => format!("graphs off: {why}"),
            (None, true) => format!("{} step graphs", self.graphs.len()),
            (None, false) => "no graphs".into(),
        };
        format!("cuda:{} ({}, {graphs})", i.ordinal, i.name)
    }
}

/// `n` zeroed values (at least one) on the stream's device.
fn zeros<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
    s: &std::sync::Arc<cudarc::driver::CudaStream>,
    n: usize,
) -> Result<CudaSlice<T>> {
    s.alloc_zeros::<T>(n.max(1))
        .map_err(|e| device_error("allocation", e))
}

/// bf16 bit patterns of a matrix's values, row by row.
fn bf16_bits(m: &QMatrix) -> Result<Vec<u16>> {
    let (rows, cols) = (m.rows(), m.cols());
    let mut out = vec![0u16; rows * cols];
    let mut row = vec![0f32; cols];
    for r in 0..rows {
        m.row_f32(r, &mut row)?;
        for (d, v) in out[r * cols..(r + 1) * cols].iter_mut().zip(&row) {
            *d = half::bf16::from_f32(*v).to_bits();
        }
    }
    Ok(out)
}

fn row_launch(rows: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (ROW_THREADS, 1, 1),
        shared_mem_bytes: ROW_THREADS * 4,
    }
}
