//! `weft-bench tenants`: four tenants on one engine, the first queueing all
//! of its work before the others. Each tenant's share of the tokens while
//! all of them have work waiting, with the fair scheduler and, side by
//! side, with first-come-first-served (every request under one tenant name,
//! which is what the engine did before it knew tenants). Then a tenant
//! capped at a quarter of the KV cache floods it, and the others' sequences
//! are counted for preemptions.

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Parser;
use weft_kernels::{Backend, Engine, EngineConfig, LoadedModel, Request, SamplingParams};
use weft_store::{ModelSource, ModelStore, PipFetcher};

#[derive(Parser, Debug)]
pub(crate) struct TenantsArgs {
    /// Model source (default: the default model, fetched if needed).
    #[arg(long, default_value = "default")]
    model: String,
    /// CPU threads.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Requests per tenant.
    #[arg(long, default_value_t = 16)]
    per_tenant: usize,
    /// Tokens each request generates.
    #[arg(long, default_value_t = 24)]
    tokens: usize,
    /// Sequences the engine runs at once.
    #[arg(long, default_value_t = 8)]
    max_running: usize,
}

const TENANTS: [&str; 4] = ["a", "b", "c", "d"];

/// Each tenant's share of the tokens until half of all were generated.
fn shares(
    lm: &LoadedModel,
    a: &TenantsArgs,
    one_name: bool,
) -> Result<(BTreeMap<&'static str, f64>, f64)> {
    let mut e = Backend::Cpu.engine(
        lm,
        EngineConfig {
            max_running: a.max_running,
            kv_budget_bytes: 256 << 20,
            ..EngineConfig::default()
        },
    )?;
    let mut owner = HashMap::new();
    for (ti, name) in TENANTS.iter().enumerate() {
        for j in 0..a.per_tenant {
            let id = (ti * 1000 + j) as u64;
            owner.insert(id, *name);
            let text = format!("Request {j} from team {name}: describe the number {j}.");
            e.add_request(Request {
                id,
                prompt: lm.tokenizer.encode(&text, true, false),
                // greedy params carry no stop token: every request runs its length
                params: SamplingParams::greedy(a.tokens),
                priority: 0,
                tenant: if one_name {
                    String::new()
                } else {
                    name.to_string()
                },
            })?;
        }
    }
    let total = TENANTS.len() * a.per_tenant * a.tokens;
    let mut got: BTreeMap<&str, usize> = BTreeMap::new();
    let t = Instant::now();
    while got.values().sum::<usize>() < total / 2 {
        for ev in e.step()? {
            if ev.token.is_some() {
                *got.entry(owner[&ev.id]).or_default() += 1;
            }
        }
    }
    let secs = t.elapsed().as_secs_f64();
    let sum = got.values().sum::<usize>() as f64;
    Ok((
        TENANTS
            .iter()
            .map(|n| (*n, got.get(n).copied().unwrap_or(0) as f64 / sum))
            .collect(),
        sum / secs,
    ))
}

/// The preemptions each tenant's sequences suffered while one tenant,
/// capped at a quarter of a small KV cache, floods it.
fn flood(lm: &LoadedModel, a: &TenantsArgs) -> Result<Vec<(String, u64, usize, usize)>> {
    let c = lm.model.config();
    let blocks = 48;
    let mut e = Backend::Cpu.engine(
        lm,
        EngineConfig {
            max_running: 32,
            kv_budget_bytes: blocks * weft_kernels::KvCache::block_bytes(c.layers, c.kv_dim()),
            tenant_kv_shares: [("flood".to_string(), 0.25)].into(),
            ..EngineConfig::default()
        },
    )?;
    let mut id = 0;
    let mut add = |e: &mut Engine, tenant: &str, n: usize, tokens: usize| -> Result<()> {
        for j in 0..n {
            id += 1;
            let text = format!("Write a long story about the number {j}, please.");
            e.add_request(Request {
                id,
                prompt: lm.tokenizer.encode(&text, true, false),
                params: SamplingParams::greedy(tokens),
                priority: 0,
                tenant: tenant.into(),
            })?;
        }
        Ok(())
    };
    add(&mut e, "flood", 16, 4 * a.tokens)?;
    add(&mut e, "steady", 4, 2 * a.tokens)?;
    let mut peak: HashMap<String, (u64, usize, usize)> = HashMap::new();
    while e.has_work() {
        e.step()?;
        for t in e.tenants() {
            let p = peak.entry(t.tenant.clone()).or_default();
            p.0 = t.preemptions;
            p.1 = p.1.max(t.kv_blocks);
            p.2 = t.kv_quota;
        }
    }
    let mut out: Vec<_> = peak
        .into_iter()
        .map(|(t, (p, b, q))| (t, p, b, q))
        .collect();
    out.sort();
    Ok(out)
}

pub(crate) fn run(a: TenantsArgs) -> Result<()> {
    weft_kernels::set_threads(a.threads);
    let src = ModelSource::parse(&a.model)?;
    let stored = ModelStore::default_location().resolve(&src, &PipFetcher::default())?;
    let lm = weft_kernels::load(&stored.path, None, Backend::Cpu).context("loading the model")?;
    let worst = |s: &BTreeMap<&str, f64>| {
        s.values()
            .map(|v| (v - 0.25).abs() / 0.25)
            .fold(0.0, f64::max)
    };
    let (fair, fair_rate) = shares(&lm, &a, false)?;
    let (fifo, fifo_rate) = shares(&lm, &a, true)?;
    println!(
        "4 tenants, {} requests each of {} tokens, {} running at once; tenant a queued first",
        a.per_tenant, a.tokens, a.max_running
    );
    println!("| scheduler | a | b | c | d | largest deviation from 1/4 | tokens/s |");
    println!("|---|---|---|---|---|---|---|");
    for (name, s, rate) in [
        ("fair (weft)", &fair, fair_rate),
        ("first come, first served", &fifo, fifo_rate),
    ] {
        println!(
            "| {name} | {:.3} | {:.3} | {:.3} | {:.3} | {:.1}% | {rate:.1} |",
            s["a"],
            s["b"],
            s["c"],
            s["d"],
            100.0 * worst(s)
        );
    }
    println!();
    println!("tenant `flood` (16 long requests, kv_share 0.25) beside `steady` (4), 48 KV blocks:");
    println!("| tenant | preemptions suffered | most KV blocks held | quota |");
    println!("|---|---|---|---|");
    for (t, p, b, q) in flood(&lm, &a)? {
        println!("| {t} | {p} | {b} | {q} |");
    }
    Ok(())
}
