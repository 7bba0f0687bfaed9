//! Reading GGUF files: header and metadata through candle's hardened reader,
//! tensor data with our own bounds checks, and the hyper-parameters of each
//! model family ([`Arch`]).
//!
//! Every length in a hostile file is checked against the file's real size before
//! anything is allocated, so a bad file is a [`KernelError`], never a panic or an
//! allocation beyond the file's size.

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, TensorInfo, Value};
use candle_core::quantized::GgmlDType;

use crate::error::{KernelError, Result};
use crate::quant::{tensor_bytes, QMatrix};

/// Architectures this runtime runs.
pub const SUPPORTED_ARCHITECTURES: &str = "gemma3, llama, qwen2";
/// RoPE base of Gemma 3's sliding-window layers (not stored in GGUF files).
pub const GEMMA3_LOCAL_ROPE_BASE: f32 = 10_000.0;
/// Every `GEMMA3_SWA_PATTERN`-th layer is global; the others use the sliding window.
pub const GEMMA3_SWA_PATTERN: usize = 6;
/// Upper bound on any hyper-parameter that sizes a buffer; larger values are hostile.
const MAX_DIM: usize = 1 << 24;

/// An open GGUF file: its parsed header and a handle for tensor data.
pub struct GgufFile {
    path: PathBuf,
    content: Content,
    file_len: u64,
    reader: BufReader<File>,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .finish()
    }
}

impl GgufFile {
    /// Opens and parses the header of `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|source| KernelError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_file(file, path)
    }

    /// Parses the header of an already open `file` (a sandboxed worker is
    /// handed its model as a descriptor); `path` names it in errors.
    pub fn from_file(file: File, path: &Path) -> Result<Self> {
        let io = |source| KernelError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file_len = file.metadata().map_err(io)?.len();
        let mut reader = BufReader::with_capacity(1 << 20, file);
        let content = Content::read(&mut reader).map_err(|e| KernelError::InvalidGguf {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        if content.tensor_data_offset > file_len {
            return Err(KernelError::InvalidGguf {
                path: path.to_path_buf(),
                reason: format!(
                    "tensor data starts at {} past the end of the file ({file_len} bytes)",
                    content.tensor_data_offset
                ),
            });
        }
        Ok(Self {
            path: path.to_path_buf(),
            content,
            file_len,
            reader,
        })
    }

    /// Where the tensor data begins (the header's length, padded).
    pub fn data_offset(&self) -> u64 {
        self.content.tensor_data_offset
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A metadata value, if present.
    pub fn meta(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    /// A metadata value that must be present.
    pub fn meta_req(&self, key: &str) -> Result<&Value> {
        self.meta(key).ok_or_else(|| KernelError::BadMetadata {
            key: key.into(),
            reason: "missing".into(),
        })
    }

    /// A required unsigned metadata value bounded by a sane maximum.
    pub fn meta_usize(&self, key: &str) -> Result<usize> {
        let v = self.meta_req(key)?;
        let n = match v {
            Value::U8(x) => *x as u64,
            Value::U16(x) => *x as u64,
            Value::U32(x) => *x as u64,
            Value::U64(x) => *x,
            Value::I8(x) if *x >= 0 => *x as u64,
            Value::I16(x) if *x >= 0 => *x as u64,
            Value::I32(x) if *x >= 0 => *x as u64,
            Value::I64(x) if *x >= 0 => *x as u64,
            other => {
                return Err(KernelError::BadMetadata {
                    key: key.into(),
                    reason: format!(
                        "expected an unsigned integer, found {:?}",
                        other.value_type()
                    ),
                })
            }
        };
        if n == 0 || n > MAX_DIM as u64 {
            return Err(KernelError::BadMetadata {
                key: key.into(),
                reason: format!("value {n} is out of range 1..={MAX_DIM}"),
            });
        }
        Ok(n as usize)
    }

    /// An optional unsigned metadata value: `default` when absent, an error
    /// when present but invalid.
    pub fn meta_usize_or(&self, key: &str, default: usize) -> Result<usize> {
        match self.meta(key) {
            Some(_) => self.meta_usize(key),
            None => Ok(default),
        }
    }

    /// A required float metadata value.
    pub fn meta_f32(&self, key: &str) -> Result<f32> {
        match self.meta_req(key)? {
            Value::F32(x) => Ok(*x),
            Value::F64(x) => Ok(*x as f32),
            other => Err(KernelError::BadMetadata {
                key: key.into(),
                reason: format!("expected a float, found {:?}", other.value_type()),
            }),
        }
    }

    /// A required string metadata value.
    pub fn meta_str(&self, key: &str) -> Result<&str> {
        match self.meta_req(key)? {
            Value::String(s) => Ok(s),
            other => Err(KernelError::BadMetadata {
                key: key.into(),
                reason: format!("expected a string, found {:?}", other.value_type()),
            }),
        }
    }

    /// Shape (outermost first) and type of a tensor.
    pub fn tensor_info(&self, name: &str) -> Result<&TensorInfo> {
        self.content
            .tensor_infos
            .get(name)
            .ok_or_else(|| KernelError::MissingTensor { name: name.into() })
    }

    /// Weight bytes per transformer layer (tensors named `blk.N.*`) and of
    /// everything else (embeddings, output head, final norm): what placement
    /// needs to size a replica or a layer-range shard.
    pub fn weight_bytes(&self) -> Result<(Vec<u64>, u64)> {
        let mut layers: Vec<u64> = Vec::new();
        let mut shared = 0u64;
        for (name, info) in &self.content.tensor_infos {
            let elems = info.shape.elem_count();
            let bytes = tensor_bytes(info.ggml_dtype, elems).ok_or_else(|| {
                KernelError::UnsupportedTensorType {
                    name: name.clone(),
                    dtype: format!("{:?} with {elems} elements", info.ggml_dtype),
                }
            })? as u64;
            let layer = name
                .strip_prefix("blk.")
                .and_then(|r| r.split('.').next())
                .and_then(|n| n.parse::<usize>().ok());
            match layer {
                Some(i) => {
                    if layers.len() <= i {
                        layers.resize(i + 1, 0);
                    }
                    layers[i] += bytes;
                }
                None => shared += bytes,
            }
        }
        Ok((layers, shared))
    }

    /// Whether the file has a tensor of this name.
    pub fn has_tensor(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    /// Reads the raw bytes of a tensor after checking they lie inside the file.
    pub fn tensor_data(&mut self, name: &str) -> Result<(Vec<usize>, GgmlDType, Vec<u8>)> {
        let info = self.tensor_info(name)?;
        let dims = info.shape.dims().to_vec();
        let dtype = info.ggml_dtype;
        let elems = dims
            .iter()
            .try_fold(1usize, |a, d| a.checked_mul(*d))
            .filter(|e| *e > 0);
        let size = elems.and_then(|e| tensor_bytes(dtype, e));
        let start = self.content.tensor_data_offset.checked_add(info.offset);
        let (Some(size), Some(start)) = (size, start) else {
            return Err(KernelError::InvalidGguf {
                path: self.path.clone(),
                reason: format!("tensor {name} has an impossible shape {dims:?} for {dtype:?}"),
            });
        };
        let end = start.saturating_add(size as u64);
        if end > self.file_len {
            return Err(KernelError::TensorOutOfBounds {
                name: name.into(),
                start,
                end,
                file_len: self.file_len,
            });
        }
        let io = |source| KernelError::Io {
            path: self.path.clone(),
            source,
        };
        self.reader.seek(SeekFrom::Start(start)).map_err(io)?;
        let mut buf = vec![0u8; size];
        self.reader.read_exact(&mut buf).map_err(io)?;
        Ok((dims, dtype, buf))
    }

    /// Loads a 2-D weight `[rows, cols]`, checking the expected shape.
    pub fn matrix(&mut self, name: &str, rows: usize, cols: usize) -> Result<QMatrix> {
        let (dims, dtype, bytes) = self.tensor_data(name)?;
        if dims != [rows, cols] {
            return Err(KernelError::WrongShape {
                name: name.into(),
                found: dims,
                expected: vec![rows, cols],
            });
        }
        QMatrix::from_bytes(name, dtype, rows, cols, &bytes)
    }

    /// Loads a 1-D f32 vector of length `len` (norm weights).
    pub fn vector(&mut self, name: &str, len: usize) -> Result<Vec<f32>> {
        let (dims, dtype, bytes) = self.tensor_data(name)?;
        if dims != [len] {
            return Err(KernelError::WrongShape {
                name: name.into(),
                found: dims,
                expected: vec![len],
            });
        }
        let m = QMatrix::from_bytes(name, dtype, 1, len, &bytes)?;
        let mut out = vec![0f32; len];
        m.row_f32(0, &mut out)?;
        Ok(out)
    }
}

/// A model family: which blocks a layer has and how they are wired.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    /// Gemma 3: GELU MLP, q/k norms, post-attention and post-MLP norms,
    /// a scaled embedding, sliding-window layers, NeoX RoPE.
    Gemma3,
    /// Llama and its relatives that share the `llama` GGUF layout (SmolLM,
    /// Mistral): SwiGLU MLP, pre-norms only, RoPE on adjacent pairs.
    Llama,
    /// Qwen2: the Llama block with biases on q, k and v and NeoX RoPE.
    Qwen2,
}

/// How RoPE pairs a head's elements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// Element `i` pairs with `i + d/2` (GGML's NeoX mode).
    Neox,
    /// Element `2i` pairs with `2i + 1` (GGML's normal mode, as llama GGUFs
    /// are converted for).
    Adjacent,
}

/// The MLP's gate activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// GELU, tanh approximation (Gemma).
    GeluTanh,
    /// SiLU (SwiGLU: Llama, Qwen2).
    Silu,
}

impl Arch {
    /// The family named by `general.architecture`.
    pub fn from_name(name: &str) -> Result<Self> {
        match name {
            "gemma3" => Ok(Self::Gemma3),
            "llama" => Ok(Self::Llama),
            "qwen2" => Ok(Self::Qwen2),
            other => Err(KernelError::UnsupportedArchitecture {
                found: other.to_string(),
                supported: SUPPORTED_ARCHITECTURES,
            }),
        }
    }

    /// The GGUF metadata prefix (`general.architecture`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Gemma3 => "gemma3",
            Self::Llama => "llama",
            Self::Qwen2 => "qwen2",
        }
    }

    /// How RoPE pairs elements.
    pub fn rope_style(self) -> RopeStyle {
        match self {
            Self::Gemma3 | Self::Qwen2 => RopeStyle::Neox,
            Self::Llama => RopeStyle::Adjacent,
        }
    }

    /// The MLP's activation.
    pub fn activation(self) -> Activation {
        match self {
            Self::Gemma3 => Activation::GeluTanh,
            Self::Llama | Self::Qwen2 => Activation::Silu,
        }
    }

    /// Whether blocks normalize q and k per head and their outputs before
    /// the residual add (Gemma's four extra norms).
    pub fn has_gemma_norms(self) -> bool {
        self == Self::Gemma3
    }

    /// What the embedding rows are multiplied by (Gemma: `sqrt(hidden)`).
    pub fn embed_scale(self, hidden: usize) -> f32 {
        match self {
            Self::Gemma3 => (hidden as f32).sqrt(),
            Self::Llama | Self::Qwen2 => 1.0,
        }
    }
}

impl std::fmt::Display for Arch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A model's hyper-parameters, read from the GGUF metadata.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ModelConfig {
    /// The family.
    pub arch: Arch,
    /// Vocabulary size (rows of the embedding).
    pub vocab: usize,
    /// Residual width.
    pub hidden: usize,
    /// Transformer blocks.
    pub layers: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (grouped-query attention).
    pub kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Leading elements of each head RoPE rotates (the rest pass through).
    pub rope_dims: usize,
    /// MLP inner width.
    pub ffn: usize,
    /// RMS norm epsilon.
    pub rms_eps: f32,
    /// RoPE base of the global layers.
    pub rope_global: f32,
    /// RoPE base of the sliding-window layers.
    pub rope_local: f32,
    /// Sliding window (tokens) of the local layers.
    pub sliding_window: usize,
    /// Every `swa_pattern`-th layer is global; 0: every layer is.
    pub swa_pattern: usize,
    /// Trained context length.
    pub context_length: usize,
}

impl ModelConfig {
    /// Reads and checks the hyper-parameters of a GGUF of a supported family.
    pub fn from_gguf(f: &GgufFile) -> Result<Self> {
        let arch = Arch::from_name(f.meta_str("general.architecture")?)?;
        let key = |k: &str| format!("{}.{k}", arch.name());
        let hidden = f.meta_usize(&key("embedding_length"))?;
        let heads = f.meta_usize(&key("attention.head_count"))?;
        let kv_heads = f.meta_usize_or(&key("attention.head_count_kv"), heads)?;
        // Llama files often leave the head width implied
        let head_dim = f.meta_usize_or(&key("attention.key_length"), hidden / heads)?;
        let value_dim = f.meta_usize_or(&key("attention.value_length"), head_dim)?;
        let rope_dims = f.meta_usize_or(&key("rope.dimension_count"), head_dim)?;
        if value_dim != head_dim
            || head_dim == 0
            || heads % kv_heads != 0
            || head_dim % 2 != 0
            || rope_dims % 2 != 0
            || rope_dims > head_dim
        {
            return Err(KernelError::BadMetadata {
                key: key("attention"),
                reason: format!(
                    "heads {heads}, kv heads {kv_heads}, key {head_dim}, value {value_dim}, rope {rope_dims} are inconsistent"
                ),
            });
        }
        let vocab = match f.meta("tokenizer.ggml.tokens") {
            Some(Value::Array(a)) => a.len(),
            _ => f.tensor_info("token_embd.weight")?.shape.dims()[0],
        };
        let (rope_default, sliding_window, swa_pattern) = match arch {
            Arch::Gemma3 => (
                1_000_000.0,
                f.meta_usize(&key("attention.sliding_window"))
                    .unwrap_or(usize::MAX),
                GEMMA3_SWA_PATTERN,
            ),
            Arch::Llama | Arch::Qwen2 => (10_000.0, usize::MAX, 0),
        };
        let rope_global = f.meta_f32(&key("rope.freq_base")).unwrap_or(rope_default);
        // position scaling other than none would change every rotation:
        // refused rather than run wrong
        if let Some(Value::String(kind)) = f.meta(&key("rope.scaling.type")) {
            if kind != "none" {
                return Err(KernelError::BadMetadata {
                    key: key("rope.scaling.type"),
                    reason: format!("RoPE scaling {kind:?} is not supported"),
                });
            }
        }
        Ok(Self {
            arch,
            vocab,
            hidden,
            layers: f.meta_usize(&key("block_count"))?,
            heads,
            kv_heads,
            head_dim,
            rope_dims,
            ffn: f.meta_usize(&key("feed_forward_length"))?,
            rms_eps: f.meta_f32(&key("attention.layer_norm_rms_epsilon"))?,
            rope_global,
            rope_local: if arch == Arch::Gemma3 {
                GEMMA3_LOCAL_ROPE_BASE
            } else {
                rope_global
            },
            sliding_window,
            swa_pattern,
            context_length: f.meta_usize(&key("context_length"))?,
        })
    }

    /// Whether layer `l` attends through the sliding window.
    pub fn is_sliding(&self, layer: usize) -> bool {
        self.swa_pattern != 0 && !(layer + 1).is_multiple_of(self.swa_pattern)
    }

    /// Width of all key (or value) heads together.
    pub fn kv_dim(&self) -> usize {
        self.kv_heads * self.head_dim
    }

    /// Width of all query heads together.
    pub fn q_dim(&self) -> usize {
        self.heads * self.head_dim
    }
}
