//! What constrained decoding costs: decode tokens/s of sequences under a
//! JSON Schema against the same sequences free (1 and 16 at once, one
//! process, measured in turn), and how long the test schemas take to
//! compile (`node/tests/fixtures/json_schemas.json`, each a cache miss).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Parser;
use serde_json::{json, Value};
use weft_kernels::{Backend, Grammar, Grammars};
use weft_store::{ModelSource, ModelStore, PipFetcher};

#[derive(Parser, Debug)]
pub(crate) struct GrammarArgs {
    /// Model source (default: the default model, fetched if needed).
    #[arg(long, default_value = "default")]
    model: String,
    /// CPU threads.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Tokens decoded per sequence.
    #[arg(long, default_value_t = 64)]
    tokens: usize,
    /// Concurrent sequences, one measurement each.
    #[arg(long, value_delimiter = ',', default_value = "1,16")]
    batches: Vec<usize>,
    /// Rounds: free and constrained alternate, the median is reported.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// The schema of the decode measurement: one no answer can close
    /// within the measured tokens, so every step stays under the grammar.
    #[arg(long, default_value = "bench/long_schema.json")]
    long_schema: PathBuf,
    /// The schemas whose compile time is measured.
    #[arg(long, default_value = "node/tests/fixtures/json_schemas.json")]
    schemas: PathBuf,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

pub(crate) fn run(a: GrammarArgs) -> Result<()> {
    weft_kernels::set_threads(a.threads);
    let src = ModelSource::parse(&a.model)?;
    let stored = ModelStore::default_location().resolve(&src, &PipFetcher::default())?;
    let lm = weft_kernels::load(&stored.path, None, Backend::Cpu).context("loading the model")?;
    let t = Instant::now();
    let grammars = Arc::new(Grammars::new(&lm.tokenizer)?);
    let index_s = t.elapsed().as_secs_f64();

    let text = std::fs::read_to_string(&a.schemas)
        .with_context(|| format!("reading {}", a.schemas.display()))?;
    let schemas: serde_json::Map<String, Value> = serde_json::from_str(&text)?;
    let mut compile_ms = Vec::new();
    for (name, schema) in &schemas {
        let g = Grammar::JsonSchema {
            schema: schema.clone(),
            strict: true,
        };
        let t = Instant::now();
        grammars
            .check(&g)
            .with_context(|| format!("schema {name}"))?;
        compile_ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let hit = {
        let (_, first) = schemas.iter().next().context("no schemas")?;
        let t = Instant::now();
        grammars.check(&Grammar::JsonSchema {
            schema: first.clone(),
            strict: true,
        })?;
        t.elapsed().as_secs_f64() * 1e3
    };

    let long = std::fs::read_to_string(&a.long_schema)
        .with_context(|| format!("reading {}", a.long_schema.display()))?;
    let g = Grammar::JsonSchema {
        schema: serde_json::from_str(&long)?,
        strict: true,
    };
    let kv = 1 << 30;
    let mut rows = Vec::new();
    for &n in &a.batches {
        let (mut free, mut held) = (Vec::new(), Vec::new());
        for _ in 0..a.rounds {
            free.push(crate::decode_rate_under(&lm, n, 16, a.tokens, kv, None)?);
            held.push(crate::decode_rate_under(
                &lm,
                n,
                16,
                a.tokens,
                kv,
                Some((&g, &grammars)),
            )?);
        }
        let (f, c) = (median(free), median(held));
        rows.push(json!({"sequences": n, "free_tokens_per_s": f, "constrained_tokens_per_s": c, "ratio": c / f}));
    }
    let sorted = {
        let mut v = compile_ms.clone();
        v.sort_by(f64::total_cmp);
        v
    };
    println!(
        "{}",
        json!({
            "engine": "weft",
            "model": stored.path.file_name().map(|f| f.to_string_lossy().into_owned()),
            "threads": a.threads,
            "tokens": a.tokens,
            "vocabulary_index_s": index_s,
            "compile_ms": {"schemas": compile_ms.len(), "p50": sorted[sorted.len() / 2], "max": sorted[sorted.len() - 1], "cached": hit},
            "decode": rows,
        })
    );
    Ok(())
}
