//! `weft-bench api`: the same greedy workload through `weft up`'s HTTP API
//! (streamed, with the sandboxed worker) and through the engine in-process.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde_json::json;
use weft_kernels::{Backend, Engine, EngineConfig, Request, SamplingParams};
use weft_store::{ModelSource, ModelStore, PipFetcher};

use crate::ApiArgs;

const PROMPT: &str =
    "Write a short story about a lighthouse keeper who finds a message in a bottle.";

fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// Engine in-process: (ttft s, inter-token gaps s) for one greedy stream.
fn engine_stream(
    lm: &weft_kernels::LoadedModel,
    prompt: &[u32],
    tokens: usize,
) -> Result<(f64, Vec<f64>)> {
    let mut e = Engine::new(
        lm.model.clone(),
        lm.tokenizer.clone(),
        EngineConfig::default(),
    )?;
    e.add_request(Request {
        id: 1,
        prompt: prompt.to_vec(),
        params: SamplingParams::greedy(tokens),
        priority: 1,
        tenant: String::new(),
    })?;
    let t0 = Instant::now();
    let mut last = None;
    let mut ttft = 0.0;
    let mut gaps = Vec::new();
    while e.has_work() {
        for ev in e.step()? {
            if ev.token.is_some() {
                let now = Instant::now();
                match last {
                    None => ttft = now.duration_since(t0).as_secs_f64(),
                    Some(l) => gaps.push(now.duration_since(l).as_secs_f64()),
                }
                last = Some(now);
            }
        }
    }
    Ok((ttft, gaps))
}

/// Engine in-process: tokens/s with `n` sequences decoding together.
fn engine_aggregate(
    lm: &weft_kernels::LoadedModel,
    prompt: &[u32],
    n: usize,
    tokens: usize,
) -> Result<f64> {
    let mut e = Engine::new(
        lm.model.clone(),
        lm.tokenizer.clone(),
        EngineConfig {
            max_running: n,
            ..EngineConfig::default()
        },
    )?;
    for i in 0..n {
        e.add_request(Request {
            id: i as u64,
            prompt: prompt.to_vec(),
            params: SamplingParams::greedy(tokens),
            priority: 1,
            tenant: String::new(),
        })?;
    }
    let t0 = Instant::now();
    while e.has_work() {
        e.step()?;
    }
    Ok(e.stats().generated_tokens as f64 / t0.elapsed().as_secs_f64())
}

/// One streamed request through the API: (ttft s, inter-token gaps s, tokens).
fn api_stream(
    client: &reqwest::blocking::Client,
    base: &str,
    tokens: usize,
) -> Result<(f64, Vec<f64>, usize)> {
    let t0 = Instant::now();
    let r = client
        .post(format!("{base}/v1/completions"))
        .json(&json!({"model": "default", "prompt": PROMPT, "max_tokens": tokens, "temperature": 0, "stream": true}))
        .send()?;
    anyhow::ensure!(r.status().is_success(), "status {}", r.status());
    let mut last = None;
    let mut ttft = 0.0;
    let mut gaps = Vec::new();
    let mut n = 0;
    for line in BufReader::new(r).lines() {
        let line = line?;
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            break;
        }
        let v: serde_json::Value = serde_json::from_str(data)?;
        // an event per token whose text is complete (English text: every token)
        if v["choices"][0]["text"]
            .as_str()
            .is_some_and(|t| !t.is_empty())
        {
            let now = Instant::now();
            match last {
                None => ttft = now.duration_since(t0).as_secs_f64(),
                Some(l) => gaps.push(now.duration_since(l).as_secs_f64()),
            }
            last = Some(now);
            n += 1;
        }
    }
    Ok((ttft, gaps, n))
}

pub(crate) fn run(a: ApiArgs) -> Result<()> {
    weft_kernels::set_threads(a.threads);
    let stored = ModelStore::default_location()
        .resolve(&ModelSource::parse("default")?, &PipFetcher::default())?;
    let lm = weft_kernels::load(&stored.path, None, Backend::Cpu)?;
    let prompt = lm.tokenizer.encode(PROMPT, true, false);

    // the engine alone
    engine_stream(&lm, &prompt, 8)?; // warm-up
    let (mut e_ttft, mut e_gaps) = (Vec::new(), Vec::new());
    for _ in 0..a.repeats {
        let (t, g) = engine_stream(&lm, &prompt, a.tokens)?;
        e_ttft.push(t);
        e_gaps.extend(g);
    }
    let e_agg = engine_aggregate(&lm, &prompt, a.clients, a.tokens)?;
    drop(lm);

    // the API: `weft up` next to this binary
    let weft = std::env::current_exe()?.with_file_name("weft");
    let mut child = Command::new(&weft)
        .args([
            "up",
            "--addr",
            "127.0.0.1:0",
            "--threads",
            &a.threads.to_string(),
            "--model",
        ])
        .arg(&stored.path)
        .env("WEFT_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", weft.display()))?;
    let mut lines = BufReader::new(child.stdout.take().context("stdout")?).lines();
    let first = lines.next().context("weft up printed nothing")??;
    std::thread::spawn(move || for _ in lines {});
    let base = first
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .context("no URL")?
        .to_string();
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(600))
        .build()?;
    let deadline = Instant::now() + Duration::from_secs(120);
    while !client
        .get(format!("{base}/readyz"))
        .send()
        .is_ok_and(|r| r.status().is_success())
    {
        anyhow::ensure!(Instant::now() < deadline, "weft up never became ready");
        std::thread::sleep(Duration::from_millis(50));
    }
    api_stream(&client, &base, 8)?; // warm-up
    let (mut a_ttft, mut a_gaps) = (Vec::new(), Vec::new());
    for _ in 0..a.repeats {
        let (t, g, _) = api_stream(&client, &base, a.tokens)?;
        a_ttft.push(t);
        a_gaps.extend(g);
    }
    let t0 = Instant::now();
    let handles: Vec<_> = (0..a.clients)
        .map(|_| {
            let (client, base) = (client.clone(), base.clone());
            std::thread::spawn(move || api_stream(&client, &base, a.tokens))
        })
        .collect();
    let mut agg_tokens = 0;
    let mut agg_gaps = Vec::new();
    for h in handles {
        let (_, g, n) = h
            .join()
            .map_err(|_| anyhow::anyhow!("client thread panicked"))??;
        agg_tokens += n;
        agg_gaps.extend(g);
    }
    let a_agg = agg_tokens as f64 / t0.elapsed().as_secs_f64();
    let _ = child.kill();
    let _ = child.wait();

    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let report = json!({
        "threads": a.threads,
        "tokens": a.tokens,
        "clients": a.clients,
        "engine": {"ttft_ms_p50": pct(&mut e_ttft.clone(), 0.5) * 1e3, "itl_ms_mean": mean(&e_gaps) * 1e3, "itl_ms_p99": pct(&mut e_gaps.clone(), 0.99) * 1e3, "aggregate_tokens_per_s": e_agg},
        "api": {"ttft_ms_p50": pct(&mut a_ttft.clone(), 0.5) * 1e3, "itl_ms_mean": mean(&a_gaps) * 1e3, "itl_ms_p99": pct(&mut a_gaps.clone(), 0.99) * 1e3, "aggregate_tokens_per_s": a_agg, "aggregate_itl_ms_p99": pct(&mut agg_gaps, 0.99) * 1e3},
        "per_token_overhead_ms_mean": (mean(&a_gaps) - mean(&e_gaps)) * 1e3,
        "per_token_overhead_ms_p99": (pct(&mut a_gaps, 0.99) - pct(&mut e_gaps, 0.99)) * 1e3,
        "aggregate_ratio": a_agg / e_agg,
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}
