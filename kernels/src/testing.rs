//! Test support: writes tiny random-weight GGUFs of each family.
//!
//! The Gemma 3 one has the same tensor names and quantizations as the real
//! Gemma model (Q5_0, Q8_0, Q4_K, Q6_K), a few layers (one global, the rest
//! sliding with a short window), and a small SentencePiece-style vocabulary
//! with byte fallback, control and user-defined tokens. The Llama one
//! ([`TinyModelSpec::llama`]) is SmolLM2-shaped: Q4_1 layers, a Q8_0 tied
//! embedding, grouped-query attention, and a byte-level BPE vocabulary with
//! merges and a ChatML template. Tests exercise every code path in
//! milliseconds. [`TinyModelSpec::gemma3_270m`] gives the Gemma model's
//! shapes instead, with random weights: what a GPU benchmark needs where the
//! real file cannot be brought.

use std::path::Path;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

use crate::error::Result;
use crate::gguf::Arch;
use crate::sampling::Rng;

/// Shape of the tiny model.
#[derive(Debug, Clone)]
pub struct TinyModelSpec {
    /// The family.
    pub arch: Arch,
    /// Transformer blocks (Gemma: every 6th is global).
    pub layers: usize,
    /// Sliding window of the local layers.
    pub sliding_window: usize,
    /// Trained context length.
    pub context_length: usize,
    /// Weight seed.
    pub seed: u64,
    /// Residual width.
    pub hidden: usize,
    /// MLP width.
    pub ffn: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Head width.
    pub head_dim: usize,
    /// Vocabulary size (at least the tiny vocabulary's 512; the rest are
    /// unused pieces).
    pub vocab: usize,
    /// The chat template written into the file (`None`: the file has none).
    pub chat_template: Option<String>,
}

impl Default for TinyModelSpec {
    fn default() -> Self {
        Self {
            arch: Arch::Gemma3,
            layers: 6,
            sliding_window: 8,
            context_length: 1024,
            seed: 7,
            hidden: TINY_HIDDEN,
            ffn: TINY_FFN,
            heads: TINY_HEADS,
            kv_heads: 1,
            head_dim: TINY_HEAD_DIM,
            vocab: 512,
            chat_template: Some(TINY_GEMMA_TEMPLATE.into()),
        }
    }
}

/// The tiny Gemma model's chat template: Gemma's turns, the system prompt
/// folded into the first user turn, content trimmed.
pub const TINY_GEMMA_TEMPLATE: &str = "{{ bos_token }}{% set ns = namespace(system='', first=true) %}{% for m in messages %}{% if m.role in ['system', 'developer'] %}{% set ns.system = ns.system + (m.content | trim) %}{% endif %}{% endfor %}{% for m in messages %}{% if m.role not in ['system', 'developer'] %}{% set role = 'model' if m.role in ['assistant', 'model'] else 'user' %}{{ '<start_of_turn>' + role + '\n' }}{% if role == 'user' and ns.first and ns.system %}{{ ns.system + '\n\n' }}{% endif %}{% if role == 'user' %}{% set ns.first = false %}{% endif %}{{ (m.content | trim) + '<end_of_turn>\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}";

/// The tiny Llama model's chat template: ChatML.
pub const TINY_CHATML_TEMPLATE: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

impl TinyModelSpec {
    /// Gemma 3 270M's shapes (the default model), with random weights.
    pub fn gemma3_270m() -> Self {
        Self {
            arch: Arch::Gemma3,
            layers: 18,
            sliding_window: 512,
            context_length: 32768,
            seed: 270,
            hidden: 640,
            ffn: 2048,
            heads: 4,
            kv_heads: 1,
            head_dim: 256,
            vocab: 262_144,
            chat_template: None,
        }
    }

    /// A tiny SmolLM2-shaped Llama: 4 layers, 4 query heads over 2 KV heads,
    /// a byte-level BPE vocabulary and a ChatML template.
    pub fn llama() -> Self {
        Self {
            arch: Arch::Llama,
            layers: 4,
            sliding_window: 0,
            kv_heads: 2,
            chat_template: Some(TINY_CHATML_TEMPLATE.into()),
            ..Self::default()
        }
    }

    /// The tiny Llama with Qwen2's layout (biases on q, k and v; NeoX RoPE).
    pub fn qwen2() -> Self {
        Self {
            arch: Arch::Qwen2,
            ..Self::llama()
        }
    }
}

/// The merges of the tiny byte-level vocabulary, best first (`Ġ` is the
/// space's byte character).
pub const TINY_BPE_MERGES: &[&str] = &[
    "h e",
    "l l",
    "he ll",
    "hell o",
    "Ġ h",
    "Ġh ello",
    "o r",
    "Ġ w",
    "Ġw or",
    "l d",
    "Ġwor ld",
    "Ġ t",
    "Ġt he",
    "t h",
    "i n",
    "e r",
    "Ġ a",
    "a n",
    "Ġa n",
    "Ġan d",
    "u s",
    "us er",
    "Ċ Ċ",
    "Ġ Ġ",
    "ĠĠ ĠĠ",
    "Ã ©",
];

/// The tiny byte-level BPE vocabulary padded to `size`: specials, the 256
/// byte characters in byte order, then each merge's result.
pub fn tiny_bpe_vocab(size: usize) -> (Vec<String>, Vec<i32>, Vec<String>) {
    let mut pieces: Vec<String> = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let mut kinds = vec![3, 3, 3];
    let chars = crate::tokenizer::gpt2_byte_chars();
    for c in chars {
        pieces.push(c.to_string());
        kinds.push(1);
    }
    for m in TINY_BPE_MERGES {
        let merged = m.replace(' ', "");
        if !pieces.contains(&merged) {
            pieces.push(merged);
            kinds.push(1);
        }
    }
    let mut i = 0;
    while pieces.len() < size.max(512) {
        pieces.push(format!("<unused{i}>"));
        kinds.push(5);
        i += 1;
    }
    let merges = TINY_BPE_MERGES.iter().map(|m| m.to_string()).collect();
    (pieces, kinds, merges)
}

/// Residual width of the tiny model.
pub const TINY_HIDDEN: usize = 256;
/// MLP width of the tiny model.
pub const TINY_FFN: usize = 512;
/// Head width of the tiny model.
pub const TINY_HEAD_DIM: usize = 64;
/// Query heads of the tiny model.
pub const TINY_HEADS: usize = 4;

/// The tiny model's vocabulary: specials, `\n` (user-defined), 256 bytes, and pieces.
pub fn tiny_vocab() -> (Vec<String>, Vec<f32>, Vec<i32>) {
    vocab_of(512)
}

/// The tiny vocabulary padded with unused pieces to `size` (at least 512).
fn vocab_of(size: usize) -> (Vec<String>, Vec<f32>, Vec<i32>) {
    let mut pieces: Vec<String> = [
        "<pad>",
        "<eos>",
        "<bos>",
        "<unk>",
        "<start_of_turn>",
        "<end_of_turn>",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut kinds = vec![3, 3, 3, 2, 3, 3];
    pieces.push("\n".into());
    kinds.push(4);
    for b in 0..256 {
        pieces.push(format!("<0x{b:02X}>"));
        kinds.push(6);
    }
    let mut normal: Vec<String> = Vec::new();
    for c in 'a'..='z' {
        normal.push(c.to_string());
        normal.push(format!("\u{2581}{c}"));
    }
    for w in [
        "he",
        "ll",
        "llo",
        "\u{2581}he",
        "\u{2581}hello",
        "\u{2581}the",
        "th",
        "in",
        "er",
        "on",
        "\u{2581}wor",
        "ld",
        "\u{2581}world",
        "é",
        "\u{2581}",
        "user",
        "model",
    ] {
        normal.push(w.to_string());
    }
    let first_normal = pieces.len();
    pieces.extend(normal);
    kinds.resize(pieces.len(), 1);
    let mut i = 0;
    while pieces.len() < size.max(512) {
        pieces.push(format!("<unused{i}>"));
        kinds.push(5);
        i += 1;
    }
    // longer pieces score higher, so merges prefer them
    let scores = pieces
        .iter()
        .enumerate()
        .map(|(i, p)| {
            if i >= first_normal && kinds[i] == 1 {
                p.chars().count() as f32 - i as f32 * 1e-3
            } else {
                0.0
            }
        })
        .collect();
    (pieces, scores, kinds)
}

fn random(rng: &mut Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|_| ((rng.uniform() as f32) * 2.0 - 1.0) * scale)
        .collect()
}

fn quantized(
    rng: &mut Rng,
    rows: usize,
    cols: usize,
    scale: f32,
    dtype: GgmlDType,
) -> Result<QTensor> {
    let t = Tensor::from_vec(random(rng, rows * cols, scale), (rows, cols), &Device::Cpu)?;
    Ok(QTensor::quantize(&t, dtype)?)
}

fn norm(rng: &mut Rng, n: usize) -> Result<QTensor> {
    let v: Vec<f32> = random(rng, n, 0.1).into_iter().map(|x| 1.0 + x).collect();
    let t = Tensor::from_vec(v, n, &Device::Cpu)?;
    Ok(QTensor::quantize(&t, GgmlDType::F32)?)
}

/// Writes the tiny model to `path`.
pub fn write_tiny_model(path: &Path, spec: &TinyModelSpec) -> Result<()> {
    let mut rng = Rng::new(spec.seed);
    let gemma = spec.arch == Arch::Gemma3;
    let (h, f, hd, nh, nkv) = (
        spec.hidden,
        spec.ffn,
        spec.head_dim,
        spec.heads,
        spec.kv_heads,
    );
    let vocab = if gemma {
        vocab_of(spec.vocab).0.len()
    } else {
        tiny_bpe_vocab(spec.vocab).0.len()
    };
    // k-quants need rows of a multiple of 256 values
    let k_or = |cols: usize, k: GgmlDType| {
        if cols.is_multiple_of(256) {
            k
        } else {
            GgmlDType::Q8_0
        }
    };
    // Gemma's quantizations, or SmolLM2's (Q4_1 everywhere in the blocks)
    let pick = |g: GgmlDType| if gemma { g } else { GgmlDType::Q4_1 };
    let mut tensors: Vec<(String, QTensor)> = vec![
        (
            "token_embd.weight".into(),
            quantized(&mut rng, vocab, h, 1.0, GgmlDType::Q8_0)?,
        ),
        ("output_norm.weight".into(), norm(&mut rng, h)?),
    ];
    let w = 0.08;
    for l in 0..spec.layers {
        let n = |s: &str| format!("blk.{l}.{s}.weight");
        tensors.push((n("attn_norm"), norm(&mut rng, h)?));
        tensors.push((
            n("attn_q"),
            quantized(&mut rng, nh * hd, h, w, pick(GgmlDType::Q5_0))?,
        ));
        tensors.push((
            n("attn_k"),
            quantized(&mut rng, nkv * hd, h, w, pick(GgmlDType::Q5_0))?,
        ));
        tensors.push((
            n("attn_v"),
            quantized(&mut rng, nkv * hd, h, w, pick(GgmlDType::Q8_0))?,
        ));
        if spec.arch == Arch::Qwen2 {
            for (name, len) in [
                ("attn_q", nh * hd),
                ("attn_k", nkv * hd),
                ("attn_v", nkv * hd),
            ] {
                let b = Tensor::from_vec(random(&mut rng, len, 0.2), len, &Device::Cpu)?;
                tensors.push((
                    format!("blk.{l}.{name}.bias"),
                    QTensor::quantize(&b, GgmlDType::F32)?,
                ));
            }
        }
        tensors.push((
            n("attn_output"),
            quantized(&mut rng, h, nh * hd, w, pick(k_or(nh * hd, GgmlDType::Q4K)))?,
        ));
        if gemma {
            tensors.push((n("attn_q_norm"), norm(&mut rng, hd)?));
            tensors.push((n("attn_k_norm"), norm(&mut rng, hd)?));
            tensors.push((n("post_attention_norm"), norm(&mut rng, h)?));
        }
        tensors.push((n("ffn_norm"), norm(&mut rng, h)?));
        tensors.push((
            n("ffn_gate"),
            quantized(&mut rng, f, h, w, pick(GgmlDType::Q5_0))?,
        ));
        tensors.push((
            n("ffn_up"),
            quantized(&mut rng, f, h, w, pick(GgmlDType::Q5_0))?,
        ));
        tensors.push((
            n("ffn_down"),
            quantized(&mut rng, h, f, w, pick(k_or(f, GgmlDType::Q6K)))?,
        ));
        if gemma {
            tensors.push((n("post_ffw_norm"), norm(&mut rng, h)?));
        }
    }
    let u32v = |v: usize| Value::U32(v as u32);
    let arch = spec.arch.name();
    let key = |k: &str| format!("{arch}.{k}");
    let mut meta: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(arch.into())),
        (
            "general.name".into(),
            Value::String(format!("weft tiny {arch} test model")),
        ),
        (key("context_length"), u32v(spec.context_length)),
        (key("embedding_length"), u32v(h)),
        (key("block_count"), u32v(spec.layers)),
        (key("feed_forward_length"), u32v(f)),
        (key("attention.head_count"), u32v(nh)),
        (key("attention.head_count_kv"), u32v(nkv)),
        (key("attention.layer_norm_rms_epsilon"), Value::F32(1e-6)),
    ];
    if gemma {
        let (pieces, scores, kinds) = vocab_of(spec.vocab);
        meta.extend([
            (key("attention.key_length"), u32v(hd)),
            (key("attention.value_length"), u32v(hd)),
            (key("rope.freq_base"), Value::F32(1_000_000.0)),
            (key("attention.sliding_window"), u32v(spec.sliding_window)),
            ("tokenizer.ggml.model".into(), Value::String("llama".into())),
            (
                "tokenizer.ggml.tokens".into(),
                Value::Array(pieces.into_iter().map(Value::String).collect()),
            ),
            (
                "tokenizer.ggml.scores".into(),
                Value::Array(scores.into_iter().map(Value::F32).collect()),
            ),
            (
                "tokenizer.ggml.token_type".into(),
                Value::Array(kinds.into_iter().map(Value::I32).collect()),
            ),
            ("tokenizer.ggml.bos_token_id".into(), u32v(2)),
            ("tokenizer.ggml.eos_token_id".into(), u32v(1)),
            ("tokenizer.ggml.add_bos_token".into(), Value::Bool(true)),
            ("tokenizer.ggml.add_space_prefix".into(), Value::Bool(false)),
        ]);
    } else {
        // SmolLM2 leaves the head width implied (hidden / heads)
        assert_eq!(h, nh * hd, "a tiny Llama's heads fill its width");
        let (pieces, kinds, merges) = tiny_bpe_vocab(spec.vocab);
        meta.extend([
            (key("rope.freq_base"), Value::F32(100_000.0)),
            (key("rope.dimension_count"), u32v(hd)),
            ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
            ("tokenizer.ggml.pre".into(), Value::String("smollm".into())),
            (
                "tokenizer.ggml.tokens".into(),
                Value::Array(pieces.into_iter().map(Value::String).collect()),
            ),
            (
                "tokenizer.ggml.token_type".into(),
                Value::Array(kinds.into_iter().map(Value::I32).collect()),
            ),
            (
                "tokenizer.ggml.merges".into(),
                Value::Array(merges.into_iter().map(Value::String).collect()),
            ),
            ("tokenizer.ggml.bos_token_id".into(), u32v(1)),
            ("tokenizer.ggml.eos_token_id".into(), u32v(2)),
            ("tokenizer.ggml.add_bos_token".into(), Value::Bool(false)),
        ]);
    }
    if let Some(t) = &spec.chat_template {
        meta.push(("tokenizer.chat_template".into(), Value::String(t.clone())));
    }
    let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut file = std::io::BufWriter::new(std::fs::File::create(path).map_err(|source| {
        crate::KernelError::Io {
            path: path.to_path_buf(),
            source,
        }
    })?);
    gguf_file::write(&mut file, &meta_refs, &tensor_refs)?;
    use std::io::Write;
    file.flush().map_err(|source| crate::KernelError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(())
}

/// ‖a − b‖ / ‖a‖, in f64 (for comparing logits or hidden states).
pub fn relative_error(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| ((x - y) as f64).powi(2))
        .sum::<f64>()
        .sqrt();
    let den: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    num / den
}

/// Largest |a − b| over the largest |b|: the relative error of logits that
/// the GPU checks hold to 1e-2.
pub fn max_relative_error(a: &[f32], b: &[f32]) -> f32 {
    let d = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max);
    d / b.iter().map(|y| y.abs()).fold(1e-6, f32::max)
}

/// Writes the tiny model (default shape) into `dir` and loads it on the CPU.
pub fn load_tiny_model(dir: &Path) -> Result<crate::LoadedModel> {
    load_tiny(dir, &TinyModelSpec::default())
}

/// Writes a tiny model of `spec` into `dir` and loads it on the CPU.
pub fn load_tiny(dir: &Path, spec: &TinyModelSpec) -> Result<crate::LoadedModel> {
    let path = dir.join(format!("tiny-{}.gguf", spec.arch));
    write_tiny_model(&path, spec)?;
    crate::load(&path, None, crate::Backend::Cpu)
}
