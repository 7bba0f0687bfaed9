//! `weft-bench sim`: a seeded discrete-event simulator that drives the real
//! router and solver from `weft-placement`.
//!
//! - [`engine`]: nodes, links, reports, events.
//! - [`paper`]: the seed paper's 50-node experiment, round-robin against its
//!   intent-aware scheduler against weft.
//! - [`edge`]: edge sites and a cloud region; cloud-only against nearest
//!   replica against weft's placement and routing.
//! - [`scale`]: a million agents over 10,000 nodes.
//! - [`plot`]: PNG line charts.

pub mod edge;
pub mod engine;
pub mod paper;
pub mod plot;
pub mod scale;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use rand::rngs::StdRng;
use rand::Rng;

/// `weft-bench sim` arguments.
#[derive(Parser, Debug)]
pub struct SimArgs {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand, Debug)]
enum Scenario {
    /// The seed paper's experiment: 50 nodes, 20% critical / 80% batch,
    /// 100 to 5,000 agents; round-robin, the paper's intent-aware scheduler, weft.
    Paper(paper::PaperArgs),
    /// Edge sites with gateways and one cloud region: cloud-only, nearest
    /// replica, weft (placement + routing).
    Edge(edge::EdgeArgs),
    /// 1,000,000 agents over 10,000 nodes.
    Scale(scale::ScaleArgs),
}

/// Runs one scenario.
pub fn run(a: SimArgs) -> Result<()> {
    match a.scenario {
        Scenario::Paper(a) => paper::run(&a).map(|_| ()),
        Scenario::Edge(a) => edge::run(&a).map(|_| ()),
        Scenario::Scale(a) => scale::run(&a).map(|_| ()),
    }
}

/// Arguments every scenario takes.
#[derive(Parser, Debug, Clone)]
pub struct Common {
    /// Seed of every random draw.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Where tables and plots go.
    #[arg(long, default_value = "bench/results")]
    pub out: PathBuf,
}

impl Common {
    /// Creates the output folder.
    pub fn out_dir(&self) -> Result<&Path> {
        std::fs::create_dir_all(&self.out)
            .with_context(|| format!("creating {}", self.out.display()))?;
        Ok(&self.out)
    }
}

/// An exponential draw with mean `mean`.
pub fn exp(rng: &mut StdRng, mean: f64) -> f64 {
    let u: f64 = rng.random::<f64>();
    -(1.0 - u).ln() * mean
}

/// Mean and percentiles of a sample.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Summary {
    /// Samples.
    pub n: usize,
    /// Mean.
    pub mean: f64,
    /// Median.
    pub p50: f64,
    /// 95th percentile.
    pub p95: f64,
    /// 99th percentile.
    pub p99: f64,
}

impl Summary {
    /// Summarises `v` (sorted in place); all zero when empty.
    pub fn of(v: &mut [f64]) -> Self {
        if v.is_empty() {
            return Self::default();
        }
        v.sort_by(f64::total_cmp);
        let pct = |p: f64| v[((p * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
        Self {
            n: v.len(),
            mean: v.iter().sum::<f64>() / v.len() as f64,
            p50: pct(0.50),
            p95: pct(0.95),
            p99: pct(0.99),
        }
    }
}

/// Writes `rows` (first row the header) as CSV and as a markdown table.
pub fn write_table(
    dir: &Path,
    stem: &str,
    title: &str,
    notes: &str,
    rows: &[Vec<String>],
) -> Result<()> {
    let csv: String = rows.iter().map(|r| r.join(",") + "\n").collect();
    std::fs::write(dir.join(format!("{stem}.csv")), csv)?;
    let mut md = format!("# {title}\n\n{notes}\n\n");
    if let Some((head, body)) = rows.split_first() {
        md += &format!("| {} |\n", head.join(" | "));
        md += &format!("|{}\n", "---|".repeat(head.len()));
        for r in body {
            md += &format!("| {} |\n", r.join(" | "));
        }
    }
    std::fs::write(dir.join(format!("{stem}.md")), md)?;
    Ok(())
}
