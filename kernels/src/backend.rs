//! The backend seam: which device runs the model.
//!
//! The CPU backend (candle-core's quantized kernels plus ours) is always
//! there. The `cuda` feature builds the CUDA device code ([`crate::cuda`]).
//! Asking for CUDA where it cannot run is a clear error (built without it,
//! no driver, no such device), never a silent fall back to the CPU.

use crate::engine::{Engine, EngineConfig};
use crate::error::{KernelError, Result};
use crate::LoadedModel;

/// Where the model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum Backend {
    /// CPU cores.
    #[default]
    Cpu,
    /// The CUDA device with this ordinal.
    Cuda(usize),
}

impl std::str::FromStr for Backend {
    type Err = KernelError;

    /// `cpu`, `cuda` or `cuda:N`.
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "cpu" => Ok(Self::Cpu),
            "cuda" | "gpu" => Ok(Self::Cuda(0)),
            other => other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| KernelError::BackendUnavailable {
                    backend: "unknown",
                    reason: format!("{other:?} is not a backend (use cpu, cuda or cuda:N)"),
                }),
        }
    }
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Backend::Cpu => write!(f, "cpu"),
            Backend::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl Backend {
    /// Checks that this build and machine can run the backend.
    pub fn ensure_available(self) -> Result<()> {
        match self {
            Backend::Cpu => Ok(()),
            Backend::Cuda(n) => cuda_available(n),
        }
    }

    /// An engine for `lm` (a whole model) on this backend. On a GPU the
    /// weights, the KV pool (`cfg.kv_budget_bytes` at most) and the step
    /// buffers (`cfg.max_step_tokens` rows, `cfg.max_running` sequences)
    /// are allocated within `cfg.device_memory_budget` (0: 90% of the free
    /// memory), or the load fails saying what did not fit.
    pub fn engine(self, lm: &LoadedModel, cfg: EngineConfig) -> Result<Engine> {
        match self {
            Backend::Cpu => Engine::new(lm.model.clone(), lm.tokenizer.clone(), cfg),
            Backend::Cuda(n) => cuda_engine(n, lm, cfg),
        }
    }
}

#[cfg(not(feature = "cuda"))]
fn built_without_cuda() -> KernelError {
    KernelError::BackendUnavailable {
        backend: "cuda",
        reason: "weft was built without CUDA; rebuild with `--features cuda`".into(),
    }
}

#[cfg(not(feature = "cuda"))]
fn cuda_available(_: usize) -> Result<()> {
    Err(built_without_cuda())
}

#[cfg(not(feature = "cuda"))]
fn cuda_engine(_: usize, _: &LoadedModel, _: EngineConfig) -> Result<Engine> {
    Err(built_without_cuda())
}

#[cfg(feature = "cuda")]
fn cuda_available(ordinal: usize) -> Result<()> {
    crate::cuda::Gpu::open(ordinal).map(|_| ())
}

#[cfg(feature = "cuda")]
fn cuda_engine(ordinal: usize, lm: &LoadedModel, cfg: EngineConfig) -> Result<Engine> {
    let opts = crate::cuda::CudaOptions {
        memory_budget: cfg.device_memory_budget,
        kv_budget: cfg.kv_budget_bytes,
        max_rows: cfg.max_step_tokens,
        max_logit_rows: cfg.max_running,
        ..crate::cuda::CudaOptions::default()
    };
    let device = crate::cuda::CudaModel::load(&lm.model, ordinal, opts)?;
    Engine::on_device(
        lm.model.clone(),
        Box::new(device),
        lm.tokenizer.clone(),
        cfg,
    )
}

/// Sets the number of CPU threads the kernels use. Call it before the first
/// model is loaded: the worker pool is created once, on first use.
pub fn set_threads(n: usize) {
    if n > 0 {
        std::env::set_var("CANDLE_NUM_THREADS", n.to_string());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cuda_backend_parses_with_its_device_ordinal() {
        let b: Backend = "cuda:1".parse().unwrap();
        assert_eq!(b, Backend::Cuda(1));
    }

    #[test]
    fn cuda_without_a_gpu_is_a_clear_error() {
        let err = Backend::Cuda(1).ensure_available().unwrap_err().to_string();
        assert!(err.contains("cuda"), "{err}");
    }

    #[test]
    fn the_cpu_backend_is_always_available() {
        assert!(Backend::Cpu.ensure_available().is_ok());
    }

    #[test]
    fn an_unknown_backend_does_not_parse() {
        assert!("tpu".parse::<Backend>().is_err());
    }
}
