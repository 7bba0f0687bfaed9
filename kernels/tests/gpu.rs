//! The CUDA kernels against the CPU path. Most need the `cuda` feature and a
//! GPU with a driver: they are ignored elsewhere, and run with
//! `cargo test -p weft-kernels --features cuda --test gpu -- --include-ignored`
//! on a GPU machine (`bench/gpu/run.sh` runs the bundled binary so). The
//! kernels' compilation needs only NVRTC, which CI fetches from PyPI.
#![cfg(feature = "cuda")]

use weft_kernels::cuda::{driver_present, Gpu};
use weft_kernels::KernelError;

/// Why a test is ignored on machines without a GPU, and how it runs.
const NEEDS_GPU: &str = "needs an NVIDIA GPU with a driver";

/// The GPU; a test that needs one fails without it.
macro_rules! gpu {
    () => {
        Gpu::open(0).unwrap_or_else(|e| panic!("{}: {e}", crate::NEEDS_GPU))
    };
}

/// Values from a small deterministic generator, spread over ±`scale`.
fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

fn max_relative_error(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() / y.abs().max(1e-3))
        .fold(0.0, f32::max)
}

#[test]
fn cuda_is_a_clear_error_where_there_is_no_driver() {
    if driver_present() {
        // there is one: CUDA is available, and says so
        weft_kernels::Backend::Cuda(0).ensure_available().unwrap();
        return;
    }
    match Gpu::open(0) {
        Err(KernelError::BackendUnavailable { reason, .. }) => {
            assert!(reason.contains("no CUDA driver"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    let err = weft_kernels::Backend::Cuda(0)
        .ensure_available()
        .unwrap_err()
        .to_string();
    assert!(err.contains("no CUDA driver"), "{err}");
}

#[test]
#[ignore = "needs an NVIDIA GPU with a driver (run with --include-ignored there)"]
fn a_device_that_is_not_there_is_named_in_the_error() {
    let _gpu = gpu!();
    match Gpu::open(4096) {
        Err(KernelError::BackendUnavailable { reason, .. }) => {
            assert!(reason.contains("no CUDA device 4096"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU with a driver (run with --include-ignored there)"]
fn rms_norm_on_the_device_matches_the_cpu() {
    let gpu = gpu!();
    for cols in [1usize, 7, 640, 1152, 5000] {
        let w = values(cols, 1, 2.0);
        let x = values(cols * 9, 2, 30.0);
        let mut cpu = x.clone();
        for row in cpu.chunks_exact_mut(cols) {
            weft_kernels::model::rms_norm(row, &w, 1e-6);
        }
        let mut dev = x.clone();
        gpu.rms_norm(&mut dev, &w, 1e-6).unwrap();
        let err = max_relative_error(&dev, &cpu);
        assert!(err < 1e-4, "{cols} columns: relative error {err}");
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU with a driver (run with --include-ignored there)"]
fn gelu_on_the_device_matches_the_cpu() {
    let gpu = gpu!();
    let x = values(100_003, 3, 8.0);
    let cpu: Vec<f32> = x
        .iter()
        .map(|&v| weft_kernels::model::gelu_tanh(v))
        .collect();
    let mut dev = x.clone();
    gpu.gelu_tanh(&mut dev).unwrap();
    let err = dev
        .iter()
        .zip(&cpu)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    assert!(err < 1e-5, "absolute error {err}");
}

#[test]
#[ignore = "needs an NVIDIA GPU with a driver (run with --include-ignored there)"]
fn argmax_on_the_device_is_the_cpus_greedy_token_ties_included() {
    let gpu = gpu!();
    let cols = 262_144;
    let mut x = values(cols * 5, 4, 10.0);
    // row 3: a tie between two positions; the lower wins
    x[3 * cols + 77] = 50.0;
    x[3 * cols + 90_000] = 50.0;
    let dev = gpu.argmax_rows(&x, cols).unwrap();
    let cpu: Vec<u32> = x
        .chunks_exact(cols)
        .map(weft_kernels::sampling::argmax)
        .collect();
    assert_eq!(dev, cpu);
    assert_eq!(dev[3], 77);
}

/// NVRTC 13.0 from PyPI's `nvidia-cuda-nvrtc` wheel, fetched once into
/// weft's cache: enough to compile the kernels on a machine without CUDA.
fn nvrtc_from_pypi() -> Result<std::path::PathBuf, String> {
    let home = std::env::var_os("HOME").ok_or("no HOME")?;
    let dir = std::path::Path::new(&home).join(".cache/weft/nvrtc-13.0");
    let lib = dir.join("nvidia/cu13/lib/libnvrtc.so.13");
    if lib.exists() {
        return Ok(lib);
    }
    let wheels = tempfile::tempdir().map_err(|e| e.to_string())?;
    let out = std::process::Command::new("python3")
        .args(["-m", "pip", "download", "--no-deps", "--quiet", "-d"])
        .arg(wheels.path())
        .arg("nvidia-cuda-nvrtc==13.0.*")
        .output()
        .map_err(|e| format!("python3: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "pip could not fetch nvidia-cuda-nvrtc: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    // unpacked beside, then moved in whole: a half-unpacked copy is never
    // taken for the library
    let part = dir.with_extension(format!("part-{}", std::process::id()));
    let unzip = format!(
        "import glob, zipfile; zipfile.ZipFile(glob.glob({:?} + '/*.whl')[0]).extractall({:?})",
        wheels.path().display().to_string(),
        part.display().to_string()
    );
    let ok = std::process::Command::new("python3")
        .args(["-c", &unzip])
        .status()
        .map_err(|e| e.to_string())?
        .success();
    if ok {
        let _ = std::fs::rename(&part, &dir);
        let _ = std::fs::remove_dir_all(&part);
    }
    if lib.exists() {
        Ok(lib)
    } else {
        Err(format!("the wheel did not hold {}", lib.display()))
    }
}

#[test]
fn the_kernels_compile_with_nvrtc() {
    // needs NVRTC only, no driver or device: the one the driver's machine
    // has, or else NVRTC from PyPI
    if !driver_present() && std::env::var_os("WEFT_NVRTC").is_none() {
        match nvrtc_from_pypi() {
            Ok(lib) => weft_kernels::cuda::load_nvrtc(&lib).unwrap(),
            Err(why) => panic!("no NVRTC to compile with: {why}"),
        }
    }
    match weft_kernels::cuda::compile_kernels() {
        Ok(ptx) => {
            let src = ptx.to_src();
            for name in [
                "attention",
                "qk_norm_rope",
                "kv_store",
                "rms_norm_rows",
                "argmax_rows",
                "embed_rows",
                "gelu_mul",
                "to_bf16",
                "gather_rows",
            ] {
                assert!(
                    src.contains(&format!(".entry {name}")),
                    "{name} is missing from the PTX"
                );
            }
        }
        Err(e) => panic!("the kernels do not compile: {e}"),
    }
}

mod model {
    use std::collections::HashMap;

    use weft_kernels::cuda::{CudaModel, CudaOptions, Gpu};
    use weft_kernels::testing::{load_tiny_model, max_relative_error};
    use weft_kernels::{
        Backend, Chunk, ChunkInput, ChunkOutput, DeviceForward, DeviceOutput, EngineConfig,
        KernelError, KvCache, LoadedModel, Pick, Request, SamplingParams, TopOfRow,
    };

    fn tiny(dir: &std::path::Path) -> LoadedModel {
        load_tiny_model(dir).unwrap()
    }

    fn prompt(n: usize, salt: u32) -> Vec<u32> {
        let mut v = vec![2];
        v.extend((1..n as u32).map(|i| 263 + (i * 7 + salt * 13) % 60));
        v
    }

    fn small() -> CudaOptions {
        CudaOptions {
            memory_budget: 0,
            kv_budget: 64 << 20,
            max_rows: 512,
            max_logit_rows: 64,
            graphs: true,
        }
    }

    /// What one sequence's step gave on the device beside the CPU.
    struct StepRow {
        step: usize,
        seq: usize,
        /// The CPU's logits.
        want: Vec<f32>,
        /// The device's output.
        got: DeviceOutput,
        /// For a top of the row, the device's whole row, fetched after.
        row: Option<Vec<f32>>,
    }

    /// Four steps of three sequences, two past the sliding window: prefilled
    /// together, then decoded, each going on with the CPU's greedy token.
    /// The sequences ask the device for their logits, their argmax and the
    /// top of their row (at temperature 0.7). Gives each step's rows and the
    /// device's description after.
    fn four_steps_on_the_device_and_the_cpu() -> (Vec<StepRow>, String) {
        let gpu = gpu!();
        let dir = tempfile::tempdir().unwrap();
        let lm = tiny(dir.path());
        let c = lm.model.config().clone();
        let mut dev = CudaModel::load_on(gpu, &lm.model, small()).unwrap();
        let mut tables = KvCache::tables_only(c.layers, c.kv_dim(), dev.kv_blocks());
        let mut cpu_kv = KvCache::with_blocks(c.layers, c.kv_dim(), dev.kv_blocks());
        let prompts = [prompt(5, 1), prompt(20, 2), prompt(41, 3)];
        let mut chunks: Vec<Chunk> = prompts
            .iter()
            .enumerate()
            .map(|(i, p)| Chunk {
                seq: i as u64,
                pos: 0,
                input: ChunkInput::Tokens(p.clone()),
                want_logits: true,
            })
            .collect();
        let mut rows = Vec::new();
        for step in 0..4 {
            for ch in &chunks {
                let n = match &ch.input {
                    ChunkInput::Tokens(t) => t.len(),
                    ChunkInput::Hidden(_) => unreachable!(),
                };
                tables.reserve(ch.seq, ch.pos + n).unwrap();
                cpu_kv.reserve(ch.seq, ch.pos + n).unwrap();
            }
            let want = lm.model.forward(&chunks, &mut cpu_kv).unwrap();
            let picks = [Pick::Logits, Pick::Argmax, Pick::Top { temperature: 0.7 }];
            let got = dev.forward(&chunks, &mut tables, &picks).unwrap();
            let mut next = Vec::new();
            for (i, (w, g)) in want.into_iter().zip(got).enumerate() {
                let ChunkOutput::Logits(Some(w)) = w else {
                    panic!("{w:?}")
                };
                let best = (0..w.len())
                    .max_by(|&a, &b| w[a].total_cmp(&w[b]).then(b.cmp(&a)))
                    .unwrap() as u32;
                let row = match &g {
                    DeviceOutput::Top(_) => Some(dev.logits(i).unwrap()),
                    DeviceOutput::Nothing => panic!("no output for sequence {i}"),
                    _ => None,
                };
                rows.push(StepRow {
                    step,
                    seq: i,
                    want: w,
                    got: g,
                    row,
                });
                // every sequence goes on with the CPU's token
                next.push(Chunk {
                    seq: i as u64,
                    pos: tables.seq_len(i as u64),
                    input: ChunkInput::Tokens(vec![best]),
                    want_logits: true,
                });
            }
            chunks = next;
        }
        (rows, dev.describe())
    }

    #[test]
    #[ignore = "needs an NVIDIA GPU with a driver (run with --include-ignored there)"]
    fn the_device_forward_gives_the_cpus_logits_in_prefill_and_decode() {
        let (rows, _) = four_steps_on_the_device_and_the_cpu();
        for r in &rows {
            if let DeviceOutput::Logits(g) = &r.got {
                let e = max_relative_error(g, &r.want);
                assert!(
                    e <= 1e-2,
                    "step {}, sequence {}: relative error {e}",
                    r.step,
                    r.seq
                );
            }
        }
    }

    #[test]
    #[ignore = "needs an NVIDIA GPU with a driver (run with --include-ignored there)"]
    fn the_devices_argmax_is_the_cpus_greedy_token_in_prefill_and_decode() {
        let (rows, _) = four_steps_on_the_device_and_the_cpu();
        for r in &rows {
            if let DeviceOutput::Argmax(t) = &r.got {
                let w = &r.want;
                let best = (0..w.len())
                    .max_by(|&a, &b| w[a].total_cmp(&w[b]).then(b.cmp(&a)))
                    .unwrap() as u32;
                assert_eq!(*t, best, "step {}: the device's argmax", r.step);
            }
        }
    }

    #[test]
    #[ignore = "needs an NVIDIA GPU with a driver (run with --include-ignored there)"]
    fn the_top_of_a_row_on_the_device_is_the_hosts_in_prefill_and_decode() {
        let (rows, _) = four_steps_on_the_device_and_the_cpu();
        for r in &rows {
            let (DeviceOutput::Top(top), Some(row)) = (&r.got, &r.row) else {
                continue;
            };
            // what the host would take from the device's own row
            let want = TopOfRow::of(row, top.k, 0.7);
            let sorted = |t: &TopOfRow| {
                let mut c = t.cands.clone();
                c.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
                c.truncate(t.k);
                c
            };
            assert_eq!(sorted(top), sorted(&want), "step {}: the row's top", r.step);
            assert_eq!(top.max, want.max);
            assert!(
                (top.total - want.total).abs() <= 1e-4 * want.total,
                "{} against {}",
                top.total,
                want.total
            );
            assert!(max_relative_error(row, &r.want) <= 1e-2);
        }
    }

    #[test]
    #[ignore = "needs an NVIDIA GPU with a driver (run with --include-ignored there)"]
    fn decode_steps_on_the_device_run_as_a_captured_graph() {
        // the decode steps have one row per sequence
        let (_, d) = four_steps_on_the_device_and_the_cpu();
        assert!(d.contains("1 step graphs"), "{d}");
    }

    #[test]
    #[ignore = "needs an NVIDIA GPU with a driver (run with --include-ignored there)"]
    fn an_engine_on_the_gpu_gives_the_cpus_greedy_tokens() {
        let _ = gpu!();
        let dir = tempfile::tempdir().unwrap();
        let lm = tiny(dir.path());
        let cfg = EngineConfig {
            kv_budget_bytes: 64 << 20,
            max_step_tokens: 64,
            max_running: 16,
            ..EngineConfig::default()
        };
        let reqs: Vec<Request> = (0..8u64)
            .map(|i| Request {
                id: i,
                prompt: prompt(3 + i as usize * 7, i as u32),
                params: SamplingParams::greedy(12),
                priority: 0,
                tenant: format!("t{}", i % 2),
            })
            .collect();
        let run = |backend: Backend| {
            let mut e = backend.engine(&lm, cfg.clone()).unwrap();
            for r in &reqs {
                e.add_request(r.clone()).unwrap();
            }
            e.run_to_completion().unwrap()
        };
        let cpu = run(Backend::Cpu);
        let gpu = run(Backend::Cuda(0));
        let same: HashMap<u64, bool> = reqs
            .iter()
            .map(|r| (r.id, cpu[&r.id].tokens == gpu[&r.id].tokens))
            .collect();
        // bf16 weights on a random-weight model can flip a near tie late in
        // a sequence; the first tokens must agree everywhere
        for r in &reqs {
            let n = 4.min(cpu[&r.id].tokens.len());
            assert_eq!(
                gpu[&r.id].tokens[..n],
                cpu[&r.id].tokens[..n],
                "request {}",
                r.id
            );
        }
        assert!(
            same.values().filter(|s| **s).count() >= 6,
            "whole sequences equal: {same:?}"
        );
    }

    #[test]
    #[ignore = "needs an NVIDIA GPU with a driver (run with --include-ignored there)"]
    fn a_memory_budget_too_small_for_the_model_is_an_error_not_a_crash() {
        let gpu = gpu!();
        let dir = tempfile::tempdir().unwrap();
        let lm = tiny(dir.path());
        let err = CudaModel::load_on(
            gpu,
            &lm.model,
            CudaOptions {
                memory_budget: 1 << 20,
                ..small()
            },
        )
        .unwrap_err();
        assert!(
            matches!(&err, KernelError::DeviceOutOfMemory(m) if m.contains("budget")),
            "{err}"
        );
    }

    #[test]
    #[ignore = "needs an NVIDIA GPU with a driver (run with --include-ignored there)"]
    fn a_memory_budget_beyond_the_free_memory_is_an_error_not_a_crash() {
        let gpu = gpu!();
        let dir = tempfile::tempdir().unwrap();
        let lm = tiny(dir.path());
        let free = gpu.memory().unwrap().0;
        let err = CudaModel::load_on(
            gpu,
            &lm.model,
            CudaOptions {
                memory_budget: free + (1 << 30),
                ..small()
            },
        )
        .unwrap_err();
        assert!(err.to_string().contains("free"), "{err}");
    }

    #[test]
    #[ignore = "needs an NVIDIA GPU with a driver (run with --include-ignored there)"]
    fn a_model_within_its_memory_budget_loads_and_says_what_it_took() {
        let gpu = gpu!();
        let dir = tempfile::tempdir().unwrap();
        let lm = tiny(dir.path());
        let m = CudaModel::load_on(
            gpu,
            &lm.model,
            CudaOptions {
                memory_budget: 512 << 20,
                ..small()
            },
        )
        .unwrap();
        assert!(m.kv_bytes() <= 64 << 20 && m.kv_blocks() > 0);
    }
}
