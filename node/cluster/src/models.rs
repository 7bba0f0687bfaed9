//! Registering a model with the cluster: its shape for placement, read from
//! the GGUF file itself.

use anyhow::{Context, Result};
use weft_coordinator::ModelRecord;
use weft_kernels::{GgufFile, ModelConfig};
use weft_placement::ModelSpec;

use weft_store::{ModelSource, ModelStore, PipFetcher, StoredModel};

/// Weight bytes of a model with `compute_per_token` 1.0: decoding is bound
/// by reading the weights, so a token costs in proportion to them. A node's
/// `tokens_per_s` is quoted for such a model (1 GiB of weights).
pub const UNIT_COMPUTE_BYTES: f64 = (1u64 << 30) as f64;

/// Chunks peers send model files in, unless `weft cluster model-add
/// --chunk-bytes` says otherwise.
pub const DEFAULT_CHUNK_BYTES: u64 = 4 << 20;

/// Fetches (if needed) and verifies `source`, and describes it for
/// placement under `name` (default: the store's id for it).
pub fn model_record(source: &str, name: Option<&str>) -> Result<ModelRecord> {
    let src = ModelSource::parse(source)?;
    let stored = ModelStore::default_location().resolve(&src, &PipFetcher::default())?;
    record_for(&stored, source, name)
}

/// The sha256 of each `chunk_bytes` piece of the file at `path`.
pub fn chunk_hashes(path: &std::path::Path, chunk_bytes: u64) -> Result<Vec<String>> {
    use sha2::{Digest, Sha256};
    use std::io::Read;
    anyhow::ensure!(chunk_bytes > 0, "chunks must be at least a byte");
    let mut f = std::fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let mut out = Vec::new();
    let mut buf = vec![0u8; chunk_bytes as usize];
    loop {
        let mut filled = 0;
        while filled < buf.len() {
            let n = f.read(&mut buf[filled..])?;
            if n == 0 {
                break;
            }
            filled += n;
        }
        if filled == 0 {
            return Ok(out);
        }
        out.push(hex::encode(Sha256::digest(&buf[..filled])));
        if filled < buf.len() {
            return Ok(out);
        }
    }
}

/// Describes the verified model `stored`, fetched from `source`, for
/// placement under `name` (default: the store's id for it).
pub fn record_for(stored: &StoredModel, source: &str, name: Option<&str>) -> Result<ModelRecord> {
    let f = GgufFile::open(&stored.path)
        .with_context(|| format!("reading {}", stored.path.display()))?;
    let cfg = ModelConfig::from_gguf(&f)?;
    let (layers, shared) = f.weight_bytes()?;
    let total: u64 = layers.iter().sum::<u64>() + shared;
    let spec = ModelSpec {
        name: name.unwrap_or(&stored.id).to_string(),
        layers: cfg.layers as u32,
        // the largest layer, so every layer range fits what is reserved
        bytes_per_layer: layers.iter().copied().max().unwrap_or(0),
        shared_bytes: shared,
        compute_per_token: total as f64 / UNIT_COMPUTE_BYTES,
        // K and V, f16, for every layer and KV head
        kv_bytes_per_token: (cfg.layers * 2 * cfg.kv_heads * cfg.head_dim * 2) as u64,
        hidden_bytes_per_token: (cfg.hidden * 4) as u64,
        min_replicas: 0,
        prefer: None,
        sites: Vec::new(),
    };
    Ok(ModelRecord {
        source: source.to_string(),
        sha256: stored.sha256.clone(),
        spec,
        chunk_bytes: DEFAULT_CHUNK_BYTES,
        chunk_sha256: chunk_hashes(&stored.path, DEFAULT_CHUNK_BYTES)?,
        sites: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gguf_file_is_described_by_its_own_tensors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tiny.gguf");
        let spec = weft_kernels::testing::TinyModelSpec::default();
        weft_kernels::testing::write_tiny_model(&path, &spec).unwrap();
        let r = model_record(path.to_str().unwrap(), Some("tiny")).unwrap();
        let bytes = std::fs::metadata(&path).unwrap().len();
        assert_eq!(r.spec.name, "tiny");
        assert!(r.spec.layers >= 1);
        let weights = r.spec.total_bytes();
        // all tensor bytes, a little less than the file (header, metadata)
        assert!(
            weights <= bytes && weights * 10 > bytes * 8,
            "{weights} of {bytes}"
        );
        assert!(r.spec.kv_bytes_per_token > 0);
        assert_eq!(r.sha256.len(), 64);
    }

    #[test]
    fn a_llama_gguf_is_described_by_its_own_shape() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tiny-llama.gguf");
        let spec = weft_kernels::testing::TinyModelSpec::llama();
        weft_kernels::testing::write_tiny_model(&path, &spec).unwrap();
        let r = model_record(path.to_str().unwrap(), None).unwrap();
        assert_eq!(r.spec.layers, spec.layers as u32);
        // K and V in f16 for each layer's two KV heads
        assert_eq!(
            r.spec.kv_bytes_per_token,
            (spec.layers * 2 * spec.kv_heads * spec.head_dim * 2) as u64
        );
        assert!(r.spec.bytes_per_layer > 0 && r.spec.shared_bytes > 0);
    }
}
