//! # weft-kernels
//!
//! weft's model runtime: it loads a GGUF of a supported family (Gemma 3,
//! Llama, Qwen2), tokenizes, and runs any
//! contiguous range of layers over a batch of sequences at different
//! positions, with a paged KV cache, sampling and a continuous-batching engine.
//! It knows nothing of HTTP, peers or placement.
//!
//! ## Layout
//!
//! - [`gguf`]: reading GGUF files (bounds-checked), the model families
//!   ([`Arch`]) and their hyper-parameters.
//! - [`quant`]: quantized weight matrices and their products (our AVX2 Q4_1,
//!   Q5_0 and Q8_0 kernels, candle's for the rest).
//! - [`tokenizer`]: SentencePiece-style and byte-level BPE tokenizers, the
//!   streaming detokenizer.
//! - [`chat`]: the model's own chat template, rendered with minijinja.
//! - [`kv`]: the paged KV cache (block pool with a byte budget, block tables).
//! - [`model`]: the forward of every family over a layer range and a batch of chunks.
//! - [`sampling`]: greedy / temperature / top-k / top-p / min-p, penalties, seeds, log-probs.
//! - [`engine`]: the continuous-batching step function (no threads, no IO).
//! - [`backend`]: the device seam (CPU; CUDA behind the `cuda` feature) and thread count.
//! - `cuda` (feature `cuda`): the CUDA device, its run-time compiled kernels.
//! - [`testing`]: writes tiny random-weight Gemma-3- and Llama-shaped GGUFs for tests.
//! - [`error`]: the crate's error type.

pub mod backend;
pub mod chat;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod engine;
pub mod error;
pub mod gguf;
pub mod grammar;
pub mod kv;
pub mod layout;
pub mod model;
pub mod prefix;
pub mod quant;
pub mod sampling;
pub mod testing;
pub mod tokenizer;

use std::path::Path;
use std::sync::Arc;

pub use backend::{set_threads, Backend};
pub use engine::{
    next_input, Completion, DeviceForward, DeviceOutput, Downstream, Engine, EngineConfig,
    EngineStats, FinishReason, LocalChain, Pick, Request, RequestId, Resume, Stage, StepEvent,
    TenantUsage,
};
pub use error::{KernelError, Result};
pub use gguf::{Activation, Arch, GgufFile, ModelConfig, RopeStyle};
pub use grammar::{Constraint, Grammar, GrammarStats, Grammars};
pub use kv::{BlockHash, KvCache, SeqId, KV_BLOCK_TOKENS};
pub use layout::StepLayout;
pub use model::{Chunk, ChunkInput, ChunkOutput, Model};
pub use prefix::CacheScope;
pub use sampling::{Sampler, SamplingParams, TokenLogprob, TopOfRow};
pub use tokenizer::{ChatMessage, StreamDecoder, TokenId, Tokenizer};

/// A model and its tokenizer, loaded from one GGUF file.
#[derive(Debug, Clone)]
pub struct LoadedModel {
    /// The weights (of the requested layer range).
    pub model: Arc<Model>,
    /// The tokenizer.
    pub tokenizer: Arc<Tokenizer>,
}

/// Loads layers `range` (all when `None`) and the tokenizer from `path` on `backend`.
pub fn load(
    path: &Path,
    range: Option<std::ops::Range<usize>>,
    backend: Backend,
) -> Result<LoadedModel> {
    backend.ensure_available()?;
    load_gguf(GgufFile::open(path)?, range)
}

/// As [`load`], from a model file already open (`path` names it in errors).
pub fn load_file(
    file: std::fs::File,
    path: &Path,
    range: Option<std::ops::Range<usize>>,
    backend: Backend,
) -> Result<LoadedModel> {
    backend.ensure_available()?;
    load_gguf(GgufFile::from_file(file, path)?, range)
}

fn load_gguf(mut f: GgufFile, range: Option<std::ops::Range<usize>>) -> Result<LoadedModel> {
    let cfg = ModelConfig::from_gguf(&f)?;
    let tokenizer = Tokenizer::from_gguf(&f)?;
    if tokenizer.vocab_size() != cfg.vocab {
        return Err(KernelError::Tokenizer(format!(
            "{} tokens for a model with {} embedding rows",
            tokenizer.vocab_size(),
            cfg.vocab
        )));
    }
    let model = Model::from_gguf(&mut f, cfg, range)?;
    Ok(LoadedModel {
        model: Arc::new(model),
        tokenizer: Arc::new(tokenizer),
    })
}
