//! `weft-bench chain`: decode tokens/s of a model split over a 2-node chain
//! against one node holding it whole, side by side: two fabrics up at once,
//! measured in turn, every node with one worker thread. The chain's greedy
//! text is checked against the whole model's on the way.

use anyhow::Result;
use clap::Parser;

/// Arguments of `weft-bench chain`.
#[derive(Parser, Debug)]
pub struct ChainArgs {
    #[command(flatten)]
    pub fabric: crate::failover::FabricArgs,
    /// Tokens per stream.
    #[arg(long, default_value_t = 128)]
    pub max_tokens: u32,
    /// Concurrent streams, as a comma-separated list of batch sizes.
    #[arg(long, value_delimiter = ',', default_value = "1,4")]
    pub streams: Vec<usize>,
    /// Rounds per batch size (whole, then chain, each round).
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
}

/// Runs the measurement and prints a markdown table.
pub fn run(a: ChainArgs) -> Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    let opts = a.fabric.options()?;
    let mut rows = Vec::new();
    for &streams in &a.streams {
        let r = rt.block_on(weft_tools::demo::chain(
            &opts,
            a.max_tokens,
            streams,
            a.rounds,
        ))?;
        rows.push(r);
    }
    if let Some(r) = rows.first() {
        println!("chain: {}\n", r.chain.join(", "));
    }
    println!("| streams | round | whole model, 1 node (tokens/s) | 2-node chain (tokens/s) | chain / whole | same text |");
    println!("|---|---|---|---|---|---|");
    for r in &rows {
        for (i, (w, c)) in r
            .whole_tokens_per_s
            .iter()
            .zip(&r.chain_tokens_per_s)
            .enumerate()
        {
            println!(
                "| {} | {} | {w:.1} | {c:.1} | {:.2} | {} |",
                r.streams,
                i + 1,
                c / w,
                r.same_text
            );
        }
        let median = |v: &[f64]| {
            let mut v = v.to_vec();
            v.sort_by(f64::total_cmp);
            v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
        };
        let (w, c) = (median(&r.whole_tokens_per_s), median(&r.chain_tokens_per_s));
        println!(
            "| {} | median | {w:.1} | {c:.1} | **{:.2}** | {} |",
            r.streams,
            c / w,
            r.same_text
        );
    }
    Ok(())
}
