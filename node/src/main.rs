//! The `weft` command line.
#![forbid(unsafe_code)]

use std::io::Write;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use weft_kernels::{Backend, ChatMessage, Engine, EngineConfig, Request, SamplingParams};
use weft_node::model_store::{ModelSource, ModelStore, PipFetcher};

/// weft: an edge-to-cloud inference fabric for AI agents.
#[derive(Parser, Debug)]
#[command(name = "weft", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Generate text from a prompt with a local model (fetched on first use).
    Generate(GenerateArgs),
    /// Manage the model cache.
    #[command(subcommand)]
    Model(ModelCommand),
}

#[derive(Parser, Debug)]
struct GenerateArgs {
    /// The prompt.
    prompt: String,
    /// Model source: `default`, a known model name, a .gguf path, or hf:org/repo/file.gguf.
    #[arg(long, env = "WEFT_MODEL", default_value = "default")]
    model: String,
    /// CPU threads for the kernels (0: all cores).
    #[arg(long, env = "WEFT_THREADS", default_value_t = 0)]
    threads: usize,
    /// Tokens to generate at most.
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// Sampling temperature (0: greedy).
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Nucleus sampling mass.
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Top-k cut (0: off).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Random seed.
    #[arg(long)]
    seed: Option<u64>,
    /// Treat the prompt as one user message of a chat (Gemma chat template).
    #[arg(long)]
    chat: bool,
    /// Device: cpu, cuda or cuda:N.
    #[arg(long, env = "WEFT_DEVICE", default_value = "cpu")]
    device: String,
}

#[derive(Subcommand, Debug)]
enum ModelCommand {
    /// Fetch a model into the cache and verify it.
    Pull {
        /// `default`, a known model name, a .gguf path, or hf:org/repo/file.gguf.
        source: String,
    },
    /// List cached models with their sha256 status.
    List,
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("WEFT_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Generate(a) => generate(a),
        Command::Model(ModelCommand::Pull { source }) => {
            let src = ModelSource::parse(&source)?;
            let m = ModelStore::default_location().resolve(
                &src,
                &PipFetcher {
                    verbose: true,
                    ..Default::default()
                },
            )?;
            println!(
                "{}  {}  {} bytes  sha256 {}",
                m.id,
                m.path.display(),
                m.bytes,
                m.sha256
            );
            Ok(())
        }
        Command::Model(ModelCommand::List) => {
            let store = ModelStore::default_location();
            let list = store.list();
            if list.is_empty() {
                println!("no models cached in {}", store.dir().display());
            }
            for (m, ok) in list {
                println!(
                    "{:<28} {:>10} bytes  {}  {}",
                    m.id,
                    m.bytes,
                    if ok { "verified" } else { "SHA256 MISMATCH" },
                    m.path.display()
                );
            }
            Ok(())
        }
    }
}

fn generate(a: GenerateArgs) -> Result<()> {
    weft_kernels::set_threads(a.threads);
    let backend: Backend = a.device.parse()?;
    let src = ModelSource::parse(&a.model)?;
    let stored = ModelStore::default_location().resolve(
        &src,
        &PipFetcher {
            verbose: true,
            ..Default::default()
        },
    )?;
    let t0 = Instant::now();
    let lm = weft_kernels::load(&stored.path, None, backend)
        .with_context(|| format!("loading {}", stored.path.display()))?;
    let load_s = t0.elapsed().as_secs_f64();
    let tok = lm.tokenizer.clone();
    let prompt = if a.chat {
        tok.encode_chat(&[ChatMessage {
            role: "user".into(),
            content: a.prompt.clone(),
        }])
    } else {
        tok.encode(&a.prompt, true, false)
    };
    let mut engine = Engine::new(lm.model, lm.tokenizer, EngineConfig::default())?;
    let params = SamplingParams {
        temperature: a.temperature,
        top_p: a.top_p,
        top_k: a.top_k,
        seed: a.seed,
        max_tokens: a.max_tokens,
        stop_tokens: tok.stop_tokens(),
        ..SamplingParams::default()
    };
    engine.add_request(Request {
        id: 1,
        prompt,
        params,
        priority: 0,
    })?;
    let t1 = Instant::now();
    let mut first = None;
    let mut n = 0usize;
    let mut out = std::io::stdout().lock();
    while engine.has_work() {
        for ev in engine.step()? {
            if ev.token.is_some() {
                n += 1;
                first.get_or_insert_with(|| t1.elapsed());
            }
            write!(out, "{}", ev.text)?;
            out.flush()?;
            if let Some(f) = ev.finish {
                writeln!(out)?;
                let total = t1.elapsed().as_secs_f64();
                let ttft = first.map_or(0.0, |d| d.as_secs_f64());
                eprintln!(
                    "[{n} tokens, finish {f:?}; load {load_s:.2}s, first token {ttft:.3}s, {:.1} tokens/s]",
                    (n.saturating_sub(1)) as f64 / (total - ttft).max(1e-9)
                );
            }
        }
    }
    Ok(())
}
