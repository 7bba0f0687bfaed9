//! `weft-bench failover`: the failover gap across processes. A `weft demo`
//! fabric places the model on both nodes of one edge site; streams enter at
//! the other site's gateways and are forwarded there; once they are under
//! way the replica carrying the most is killed with SIGKILL. Each cut
//! stream's gap is the time from the kill to its next token; the stream
//! must also end with the text one node gives alone.

use std::path::PathBuf;

use anyhow::Result;
use clap::Parser;

/// What the benchmarks that start a fabric of `weft` processes need.
#[derive(clap::Args, Debug)]
pub struct FabricArgs {
    /// The `weft` binary the nodes run.
    #[arg(long, default_value = "target/release/weft")]
    pub weft: PathBuf,
    /// Model source (`default`, a .gguf path, ...).
    #[arg(long, default_value = "default")]
    pub model: String,
}

impl FabricArgs {
    /// The fabric's options; WEFT_DEMO_KEEP=1 keeps each fabric's configs
    /// and logs (the path is printed).
    pub fn options(&self) -> Result<weft_tools::demo::DemoOptions> {
        Ok(weft_tools::demo::DemoOptions {
            model: self.model.clone(),
            quick: true,
            out: None,
            keep: std::env::var_os("WEFT_DEMO_KEEP").is_some(),
            exe: std::fs::canonicalize(&self.weft)?,
            serve_extra: String::new(),
            tokens_per_s: 2000.0,
        })
    }
}

/// Arguments of `weft-bench failover`.
#[derive(Parser, Debug)]
pub struct FailoverArgs {
    #[command(flatten)]
    pub fabric: FabricArgs,
    /// Concurrent streams.
    #[arg(long, default_value_t = 40)]
    pub streams: usize,
    /// Tokens per stream.
    #[arg(long, default_value_t = 64)]
    pub max_tokens: u32,
    /// Kills to measure (a fresh fabric each).
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
}

/// Runs the rounds and prints a markdown table.
pub fn run(a: FailoverArgs) -> Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    let opts = a.fabric.options()?;
    println!("| round | streams | killed | cut streams | completed | exact text | gap p50 | gap p99 | gap max |");
    println!("|---|---|---|---|---|---|---|---|---|");
    let mut all = Vec::new();
    for round in 1..=a.rounds {
        let r = rt.block_on(weft_tools::demo::failover(&opts, a.streams, a.max_tokens))?;
        println!(
            "| {round} | {} | {} | {} | {} | {} | {:.0} ms | {:.0} ms | {:.0} ms |",
            r.streams,
            r.victim,
            r.cut,
            r.completed,
            r.exact,
            r.p50_ms,
            r.p99_ms,
            r.gap_ms.last().copied().unwrap_or(f64::NAN)
        );
        all.extend(r.gap_ms);
    }
    all.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        let rank = ((p / 100.0) * all.len() as f64).ceil() as usize;
        all.get(rank.clamp(1, all.len().max(1)) - 1)
            .copied()
            .unwrap_or(f64::NAN)
    };
    println!(
        "\nall rounds: {} cut streams, gap p50 {:.0} ms, p99 {:.0} ms (target p99 <= 2000 ms)",
        all.len(),
        pct(50.0),
        pct(99.0)
    );
    Ok(())
}
