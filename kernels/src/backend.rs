//! The backend seam: which device runs the model.
//!
//! The CPU backend (candle-core's quantized kernels plus ours) is always
//! there. The `cuda` feature builds the CUDA device code ([`crate::cuda`]);
//! until the model's forward runs on it, asking for CUDA is a clear error
//! (no driver, no such device, or not yet) rather than a silent fall back to
//! the CPU.

use crate::error::{KernelError, Result};

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
            Backend::Cuda(n) => Err(KernelError::BackendUnavailable {
                backend: "cuda",
                reason: cuda_unavailable_reason(n),
            }),
        }
    }
}

#[cfg(not(feature = "cuda"))]
fn cuda_unavailable_reason(_: usize) -> String {
    "weft was built without CUDA; rebuild with `--features cuda`".into()
}

#[cfg(feature = "cuda")]
fn cuda_unavailable_reason(ordinal: usize) -> String {
    match crate::cuda::Gpu::open(ordinal) {
        Ok(gpu) => format!(
            "found {}, but this version of weft cannot run the model on CUDA yet",
            gpu.info().name
        ),
        Err(KernelError::BackendUnavailable { reason, .. }) => reason,
        Err(e) => e.to_string(),
    }
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
    fn cuda_is_a_clear_error_until_filled() {
        let b: Backend = "cuda:1".parse().unwrap();
        assert_eq!(b, Backend::Cuda(1));
        let err = b.ensure_available().unwrap_err().to_string();
        assert!(err.contains("cuda"), "{err}");
        assert!(Backend::Cpu.ensure_available().is_ok());
        assert!("tpu".parse::<Backend>().is_err());
    }
}
