//! What the kernels' integration tests share: a tiny model written to a
//! temporary folder and loaded on the CPU.

use std::path::PathBuf;

use weft_kernels::testing::{write_tiny_model, TinyModelSpec};
use weft_kernels::{load, Backend, LoadedModel};

/// A tiny model, its file and the folder that holds it.
pub struct Tiny {
    pub _dir: tempfile::TempDir,
    pub path: PathBuf,
    pub lm: LoadedModel,
}

/// Writes a tiny model of `spec` and loads it.
pub fn tiny(spec: TinyModelSpec) -> Tiny {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    write_tiny_model(&path, &spec).unwrap();
    let lm = load(&path, None, Backend::Cpu).unwrap();
    Tiny {
        _dir: dir,
        path,
        lm,
    }
}
