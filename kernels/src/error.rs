//! The one error type of `weft-kernels`.

use std::path::PathBuf;

/// Everything that can go wrong while loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// The file could not be opened or read.
    #[error("cannot read model file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file is not a GGUF file, or its header is damaged or hostile.
    #[error("invalid GGUF file {path}: {reason}")]
    InvalidGguf { path: PathBuf, reason: String },
    /// The GGUF holds a model family weft does not run.
    #[error("unsupported model architecture {found:?} (weft runs: {supported})")]
    UnsupportedArchitecture {
        found: String,
        supported: &'static str,
    },
    /// The family runs on the CPU but not yet on this device backend.
    #[error("the {backend} backend does not run {arch} models yet (the CPU backend does)")]
    ArchitectureNotOnBackend { arch: String, backend: &'static str },
    /// A metadata key the model needs is absent or has the wrong type.
    #[error("model metadata {key} is missing or invalid: {reason}")]
    BadMetadata { key: String, reason: String },
    /// A tensor the model needs is absent.
    #[error("tensor {name} is missing from the model file")]
    MissingTensor { name: String },
    /// A tensor has a shape other than the hyper-parameters imply.
    #[error("tensor {name} has shape {found:?}, expected {expected:?}")]
    WrongShape {
        name: String,
        found: Vec<usize>,
        expected: Vec<usize>,
    },
    /// A tensor's data lies (partly) outside the file: the file is truncated or lies.
    #[error("tensor {name} needs bytes {start}..{end} but the file has {file_len} bytes")]
    TensorOutOfBounds {
        name: String,
        start: u64,
        end: u64,
        file_len: u64,
    },
    /// A tensor uses a quantization this runtime cannot multiply.
    #[error("tensor {name} has unsupported type {dtype}")]
    UnsupportedTensorType { name: String, dtype: String },
    /// The tokenizer metadata is incomplete or inconsistent.
    #[error("invalid tokenizer: {0}")]
    Tokenizer(String),
    /// The model has no chat template, so chat requests cannot be rendered.
    #[error("this model has no chat template (tokenizer.chat_template): use completions, or a model with one")]
    NoChatTemplate,
    /// The chat template failed to compile or render.
    #[error("chat template: {0}")]
    ChatTemplate(String),
    /// A requested layer range does not fit the model.
    #[error("layer range {start}..{end} is invalid for a model with {layers} layers")]
    BadLayerRange {
        start: usize,
        end: usize,
        layers: usize,
    },
    /// The step's inputs do not fit the shard (tokens to a middle shard, wrong widths, ...).
    #[error("invalid step input: {0}")]
    BadInput(String),
    /// The KV pool has no free block left.
    #[error("KV cache pool exhausted: need {needed} more blocks, {free} free of {total}")]
    KvExhausted {
        needed: usize,
        free: usize,
        total: usize,
    },
    /// A sequence id the cache or engine does not know.
    #[error("unknown sequence {0}")]
    UnknownSequence(u64),
    /// A request that can never run (prompt over the context, empty prompt, ...).
    #[error("request rejected: {0}")]
    Rejected(String),
    /// A grammar (JSON Schema, regex, Lark) that cannot be compiled or
    /// enforced, or a sequence's grammar that failed.
    #[error("{0}")]
    Grammar(String),
    /// The device ran out of memory (or the configured budget).
    #[error("out of device memory: {0}")]
    DeviceOutOfMemory(String),
    /// The selected backend is not available in this build or on this machine.
    #[error("backend {backend} unavailable: {reason}")]
    BackendUnavailable {
        backend: &'static str,
        reason: String,
    },
    /// An error reported by candle.
    #[error("tensor library error: {0}")]
    Candle(#[from] candle_core::Error),
}

/// The result type of this crate.
pub type Result<T> = std::result::Result<T, KernelError>;
