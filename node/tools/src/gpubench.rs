//! `weft gpu-bench`: the CUDA backend measured on this machine's GPU, for
//! `bench/gpu/run.sh` on a machine with a driver and no Rust toolchain.
//!
//! In order: correctness against the CPU backend (the same greedy tokens
//! for 5 prompts, and the logits' relative error), decode throughput at
//! each batch size with contexts of `--context` tokens and the prefill rate
//! on the way, a 4-tenant fairness run, and the fraction of the
//! memory-bandwidth floor each decode step reaches (weight bytes plus the
//! KV bytes a step reads, over the measured device-to-device copy
//! bandwidth). Prints one table; exits 1 when correctness fails.

use std::path::PathBuf;

use weft_kernels::Backend;

/// `weft gpu-bench` arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct GpuBenchArgs {
    /// The GGUF file, a model name (fetched on first use), or `synthetic`:
    /// random weights in the default model's shapes and quantizations,
    /// written on the spot (for a GPU machine the real file cannot reach;
    /// the speed is the real model's, the text is not).
    #[arg(long, default_value = "default")]
    pub model: String,
    /// The device.
    #[arg(long, default_value = "cuda:0")]
    pub device: Backend,
    /// Prompt tokens of each sequence in the throughput runs.
    #[arg(long, default_value_t = 512)]
    pub context: usize,
    /// Batch sizes of the decode runs.
    #[arg(long, value_delimiter = ',', default_value = "1,8,64,256")]
    pub batches: Vec<usize>,
    /// Decode steps timed per batch size.
    #[arg(long, default_value_t = 64)]
    pub decode_steps: usize,
    /// Greedy tokens compared per prompt.
    #[arg(long, default_value_t = 32)]
    pub check_tokens: usize,
    /// Also write the table to this file.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// Writes the synthetic model (see [`GpuBenchArgs::model`]) into `dir`.
pub fn synthetic_model(dir: &std::path::Path) -> anyhow::Result<PathBuf> {
    let path = dir.join("synthetic-gemma-3-270m.gguf");
    weft_kernels::testing::write_tiny_model(
        &path,
        &weft_kernels::testing::TinyModelSpec::gemma3_270m(),
    )?;
    Ok(path)
}

/// The prompts of the correctness run.
pub const PROMPTS: [&str; 5] = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea,",
    "The three primary colors are",
    "Water boils at a temperature of",
];

/// Runs the benchmark on the model file `path`.
#[cfg(not(feature = "cuda"))]
pub fn run(_: &GpuBenchArgs, _: &std::path::Path) -> anyhow::Result<bool> {
    anyhow::bail!("weft was built without CUDA; rebuild with `--features cuda`")
}

/// Runs the benchmark on the model file `path`; returns whether the
/// correctness checks passed and every section ran.
#[cfg(feature = "cuda")]
pub fn run(a: &GpuBenchArgs, path: &std::path::Path) -> anyhow::Result<bool> {
    imp::run(a, path)
}

#[cfg(feature = "cuda")]
mod imp {
    use std::collections::{BTreeMap, HashMap};
    use std::fmt::Write as _;
    use std::time::Instant;

    use anyhow::{bail, Context, Result};
    use weft_kernels::cuda::{CudaModel, CudaOptions, Gpu};
    use weft_kernels::testing::max_relative_error;
    use weft_kernels::{
        Backend, Chunk, ChunkInput, ChunkOutput, DeviceForward, DeviceOutput, Engine, EngineConfig,
        KvCache, LoadedModel, Pick, Request, SamplingParams, KV_BLOCK_TOKENS,
    };

    use super::{GpuBenchArgs, PROMPTS};

    struct Table {
        rows: Vec<(String, String, String)>,
        failures: usize,
    }

    impl Table {
        fn row(&mut self, what: impl Into<String>, value: impl Into<String>, target: &str) {
            let (w, v) = (what.into(), value.into());
            eprintln!("  {w}: {v}");
            self.rows.push((w, v, target.to_string()));
        }

        fn failed(&mut self, what: &str, e: anyhow::Error) {
            self.failures += 1;
            self.row(format!("{what}: FAILED"), format!("{e:#}"), "");
        }

        fn render(&self) -> String {
            let mut s = String::from("| measure | value | target |\n|---|---|---|\n");
            for (w, v, t) in &self.rows {
                let _ = writeln!(s, "| {w} | {v} | {t} |");
            }
            s
        }
    }

    fn ordinal(b: Backend) -> Result<usize> {
        match b {
            Backend::Cuda(n) => Ok(n),
            Backend::Cpu => bail!("gpu-bench measures a CUDA device (--device cuda:N)"),
        }
    }

    pub fn run(a: &GpuBenchArgs, path: &std::path::Path) -> Result<bool> {
        let ord = ordinal(a.device)?;
        let gpu = Gpu::open(ord)?;
        let info = gpu.info().clone();
        let bandwidth = gpu.copy_bandwidth()?;
        drop(gpu);
        eprintln!(
            "{} ({} MiB, compute {}.{}); loading {}",
            info.name,
            info.total_memory >> 20,
            info.capability.0,
            info.capability.1,
            path.display()
        );
        let lm = weft_kernels::load(path, None, Backend::Cpu)
            .with_context(|| format!("loading {}", path.display()))?;
        let mut t = Table {
            rows: Vec::new(),
            failures: 0,
        };
        // a section that fails says so in the table, and the next still
        // runs: one run on a lent GPU should tell all it can
        let ok = match correctness(a, &lm, ord, &mut t) {
            Ok(same) => same,
            Err(e) => {
                t.failed("correctness", e);
                false
            }
        };
        if let Err(e) = throughput(a, &lm, ord, bandwidth, &mut t) {
            t.failed("throughput", e);
        }
        if let Err(e) = launches(a, &lm, ord, &mut t) {
            t.failed("graphs against plain launches", e);
        }
        if let Err(e) = fairness(&lm, ord, &mut t) {
            t.failed("fairness", e);
        }
        t.row(
            "device-to-device copy bandwidth",
            format!("{:.0} GB/s", bandwidth / 1e9),
            "",
        );
        let table = format!(
            "weft gpu-bench on {} (driver memory {} MiB), model {}, contexts of {} tokens\n\n{}",
            info.name,
            info.total_memory >> 20,
            path.file_name()
                .map_or_else(String::new, |n| n.to_string_lossy().into()),
            a.context,
            t.render()
        );
        println!("{table}");
        if let Some(out) = &a.out {
            std::fs::write(out, &table).with_context(|| format!("writing {}", out.display()))?;
        }
        Ok(ok && t.failures == 0)
    }

    /// The same greedy tokens as the CPU for every prompt, and the logits
    /// of each prompt's last position within a relative error of 1e-2.
    fn correctness(a: &GpuBenchArgs, lm: &LoadedModel, ord: usize, t: &mut Table) -> Result<bool> {
        let prompts: Vec<Vec<u32>> = PROMPTS
            .iter()
            .map(|p| lm.tokenizer.encode(p, true, false))
            .collect();
        let cfg = EngineConfig {
            kv_budget_bytes: 256 << 20,
            max_running: 8,
            ..EngineConfig::default()
        };
        let mut runs = Vec::new();
        for backend in [Backend::Cpu, Backend::Cuda(ord)] {
            let mut e = backend.engine(lm, cfg.clone())?;
            for (i, p) in prompts.iter().enumerate() {
                e.add_request(Request {
                    id: i as u64,
                    prompt: p.clone(),
                    params: SamplingParams::greedy(a.check_tokens),
                    priority: 0,
                    tenant: String::new(),
                })?;
            }
            runs.push(e.run_to_completion()?);
        }
        let same = (0..prompts.len() as u64)
            .filter(|i| runs[0][i].tokens == runs[1][i].tokens)
            .count();
        for i in 0..prompts.len() as u64 {
            if runs[0][&i].tokens != runs[1][&i].tokens {
                eprintln!(
                    "  prompt {i}: cpu {:?}\n            gpu {:?}",
                    runs[0][&i].tokens, runs[1][&i].tokens
                );
            }
        }
        t.row(
            format!(
                "greedy tokens equal to the CPU's ({} prompts × {} tokens)",
                prompts.len(),
                a.check_tokens
            ),
            format!("{same}/{}", prompts.len()),
            "all",
        );
        // logits of each prompt's last position, one prompt at a time
        let c = lm.model.config().clone();
        let mut dev = CudaModel::load(
            &lm.model,
            ord,
            CudaOptions {
                kv_budget: 64 << 20,
                max_rows: 256,
                max_logit_rows: 8,
                ..CudaOptions::default()
            },
        )?;
        let mut worst = 0f32;
        for (i, p) in prompts.iter().enumerate() {
            let chunk = [Chunk {
                seq: i as u64,
                pos: 0,
                input: ChunkInput::Tokens(p.clone()),
                want_logits: true,
            }];
            let mut tables = KvCache::tables_only(c.layers, c.kv_dim(), dev.kv_blocks());
            tables.reserve(i as u64, p.len())?;
            let mut cpu_kv = KvCache::with_blocks(c.layers, c.kv_dim(), p.len().div_ceil(16));
            cpu_kv.reserve(i as u64, p.len())?;
            let want = lm.model.forward(&chunk, &mut cpu_kv)?;
            let got = dev.forward(&chunk, &mut tables, &[Pick::Logits])?;
            match (&want[0], &got[0]) {
                (ChunkOutput::Logits(Some(w)), DeviceOutput::Logits(g)) => {
                    worst = worst.max(max_relative_error(g, w))
                }
                other => bail!("unexpected outputs {other:?}"),
            }
        }
        t.row(
            "logits, largest relative error against the CPU",
            format!("{worst:.2e}"),
            "≤ 1e-2",
        );
        Ok(same == prompts.len() && worst <= 1e-2)
    }

    /// Decode tokens/s at each batch size, prefill tokens/s on the way,
    /// and the fraction of the bandwidth floor a decode step reaches.
    fn throughput(
        a: &GpuBenchArgs,
        lm: &LoadedModel,
        ord: usize,
        bandwidth: f64,
        t: &mut Table,
    ) -> Result<()> {
        let c = lm.model.config().clone();
        let most = a.batches.iter().copied().max().unwrap_or(1);
        // sequences that finish their prefill first decode while the rest
        // prefill; room enough that none ends inside the timed steps
        let max_tokens = 3 * a.decode_steps + 64;
        let max_context = a.context + max_tokens + 8;
        let per_seq = max_context.div_ceil(KV_BLOCK_TOKENS) + 1;
        let kv_bytes = most * per_seq * KvCache::block_bytes(c.layers, c.kv_dim());
        let dev = CudaModel::load(
            &lm.model,
            ord,
            CudaOptions {
                kv_budget: kv_bytes,
                max_rows: 4096,
                max_logit_rows: most,
                ..CudaOptions::default()
            },
        )?;
        let weight_bytes = dev.weight_bytes();
        let mut e = Engine::on_device(
            lm.model.clone(),
            Box::new(dev),
            lm.tokenizer.clone(),
            EngineConfig {
                max_step_tokens: 4096,
                max_running: most,
                max_context,
                ..EngineConfig::default()
            },
        )?;
        let mut batch = Batch::new(a, 0x2545_f491_4f6c_dd1d);
        for &b in &a.batches {
            let (prefill_s, decode_s, tokens) =
                batch.run(&mut e, b, SamplingParams::greedy(max_tokens))?;
            let step_s = decode_s / a.decode_steps as f64;
            // bytes one decode step reads: every weight, and each
            // sequence's keys and values (a sliding layer only its window)
            let ctx = a.context + a.decode_steps / 2;
            let kv_read: usize = (0..c.layers)
                .map(|l| {
                    let seen = if c.is_sliding(l) {
                        ctx.min(c.sliding_window)
                    } else {
                        ctx
                    };
                    seen * c.kv_dim() * 2 * 2
                })
                .sum::<usize>()
                * b;
            let floor_s = (weight_bytes + kv_read) as f64 / bandwidth;
            let target = match b {
                1 => "≥ 1,500",
                256 => "≥ 100,000",
                _ => "",
            };
            t.row(
                format!("decode tokens/s, batch {b}"),
                format!("{:.0}", tokens as f64 / decode_s),
                target,
            );
            t.row(
                format!("  step time / bandwidth floor, batch {b}"),
                format!(
                    "{:.3} ms / {:.3} ms: {:.0}% of the floor",
                    step_s * 1e3,
                    floor_s * 1e3,
                    100.0 * floor_s / step_s
                ),
                if b == 256 { "about 40%" } else { "" },
            );
            t.row(
                format!("  prefill tokens/s, batch {b}"),
                format!("{:.0}", (b * a.context) as f64 / prefill_s),
                "",
            );
        }
        // the largest batch again, drawing top-p tokens on the device
        let b = most;
        let sampled = SamplingParams {
            temperature: 0.8,
            top_p: 0.95,
            seed: Some(7),
            ..SamplingParams::greedy(max_tokens)
        };
        let (_, decode_s, tokens) = batch.run(&mut e, b, sampled)?;
        t.row(
            format!("decode tokens/s, batch {b}, top-p 0.95 draws"),
            format!("{:.0}", tokens as f64 / decode_s),
            "",
        );
        t.row("device after the runs", e.device(), "");
        Ok(())
    }

    /// Sequences of random prompt tokens for the throughput runs.
    struct Batch {
        rng: u64,
        next_id: u64,
        context: usize,
        steps: usize,
    }

    impl Batch {
        /// Sequences of `a.context` prompt tokens from the seed `rng`,
        /// timed over `a.decode_steps` steps.
        fn new(a: &GpuBenchArgs, rng: u64) -> Self {
            Self {
                rng,
                next_id: 0,
                context: a.context,
                steps: a.decode_steps,
            }
        }

        /// Runs `b` sequences: their prefill until each has its first
        /// token, then `steps` timed decode steps; cancels them. Returns
        /// the prefill seconds, the decode seconds and the tokens decoded.
        fn run(
            &mut self,
            e: &mut Engine,
            b: usize,
            params: SamplingParams,
        ) -> Result<(f64, f64, usize)> {
            let mut ids = Vec::new();
            for _ in 0..b {
                let mut prompt = vec![2u32];
                while prompt.len() < self.context {
                    self.rng ^= self.rng << 13;
                    self.rng ^= self.rng >> 7;
                    self.rng ^= self.rng << 17;
                    prompt.push(1000 + (self.rng % 200_000) as u32);
                }
                e.add_request(Request {
                    id: self.next_id,
                    prompt,
                    params: params.clone(),
                    priority: 0,
                    tenant: String::new(),
                })?;
                ids.push(self.next_id);
                self.next_id += 1;
            }
            let t0 = Instant::now();
            let mut started: HashMap<u64, bool> = HashMap::new();
            while started.len() < b {
                for ev in e.step()? {
                    if ev.token.is_some() {
                        started.insert(ev.id, true);
                    }
                    if let Some(f) = ev.finish {
                        bail!("request {} ended early: {f:?}", ev.id);
                    }
                }
            }
            let prefill_s = t0.elapsed().as_secs_f64();
            let t1 = Instant::now();
            let mut tokens = 0usize;
            for _ in 0..self.steps {
                tokens += e.step()?.iter().filter(|ev| ev.token.is_some()).count();
            }
            let decode_s = t1.elapsed().as_secs_f64();
            for id in &ids {
                e.cancel(*id);
            }
            e.run_to_completion()?;
            Ok((prefill_s, decode_s, tokens))
        }
    }

    /// Batch-1 decode with the step graphs and with plain launches, side by
    /// side: what the graphs save in launch overhead.
    fn launches(a: &GpuBenchArgs, lm: &LoadedModel, ord: usize, t: &mut Table) -> Result<()> {
        let mut rates = Vec::new();
        for graphs in [true, false] {
            let dev = CudaModel::load(
                &lm.model,
                ord,
                CudaOptions {
                    kv_budget: 256 << 20,
                    max_rows: 1024,
                    max_logit_rows: 8,
                    graphs,
                    ..CudaOptions::default()
                },
            )?;
            let mut e = Engine::on_device(
                lm.model.clone(),
                Box::new(dev),
                lm.tokenizer.clone(),
                EngineConfig {
                    max_running: 8,
                    max_context: a.context + 4 * a.decode_steps + 72,
                    ..EngineConfig::default()
                },
            )?;
            let mut batch = Batch::new(a, 0x1234_5678_9abc_def1);
            let (_, decode_s, tokens) =
                batch.run(&mut e, 1, SamplingParams::greedy(3 * a.decode_steps + 64))?;
            rates.push((tokens as f64 / decode_s, e.device()));
        }
        t.row(
            "decode tokens/s, batch 1: step graphs / plain launches",
            format!(
                "{:.0} / {:.0} ({:.2}×); {}",
                rates[0].0,
                rates[1].0,
                rates[0].0 / rates[1].0,
                rates[0].1
            ),
            "",
        );
        Ok(())
    }

    /// Four tenants; the first queues all its work before the others:
    /// each tenant's share of the tokens while all have work waiting.
    fn fairness(lm: &LoadedModel, ord: usize, t: &mut Table) -> Result<()> {
        let mut e = Backend::Cuda(ord).engine(
            lm,
            EngineConfig {
                kv_budget_bytes: 1 << 30,
                max_running: 32,
                max_step_tokens: 2048,
                ..EngineConfig::default()
            },
        )?;
        let tenants = ["a", "b", "c", "d"];
        let (per, max_tokens) = (64usize, 32usize);
        let mut owner = HashMap::new();
        for (ti, name) in tenants.iter().enumerate() {
            for j in 0..per {
                let id = (ti * 1000 + j) as u64;
                owner.insert(id, *name);
                let text = format!("Request {j} of tenant {name}: tell me about the number {j}.");
                e.add_request(Request {
                    id,
                    prompt: lm.tokenizer.encode(&text, true, false),
                    params: SamplingParams::greedy(max_tokens),
                    priority: 0,
                    tenant: name.to_string(),
                })?;
            }
        }
        let total = tenants.len() * per * max_tokens;
        let mut got: BTreeMap<&str, usize> = BTreeMap::new();
        while got.values().sum::<usize>() < total / 2 {
            for ev in e.step()? {
                if ev.token.is_some() {
                    *got.entry(owner[&ev.id]).or_default() += 1;
                }
            }
        }
        e.run_to_completion()?;
        let sum = got.values().sum::<usize>() as f64;
        let worst = tenants
            .iter()
            .map(|n| (got.get(n).copied().unwrap_or(0) as f64 / sum - 0.25).abs() / 0.25)
            .fold(0.0, f64::max);
        t.row(
            "4 tenants, largest deviation from an equal share of tokens",
            format!(
                "{:.1}% (shares {})",
                100.0 * worst,
                tenants
                    .iter()
                    .map(|n| format!("{n} {:.3}", got.get(n).copied().unwrap_or(0) as f64 / sum))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            "≤ 10%",
        );
        Ok(())
    }
}
