//! `weft-bench agents`: the multi-turn agent workload on the real model,
//! prefix cache off and on, side by side in one run.
//!
//! Every agent's prompt starts with the same system prompt and tool
//! definitions (`--context` tokens); each turn appends what the model
//! answered and a tool output of 100–300 tokens, and the agent sends its
//! next turn when the answer is complete (closed loop). Measured per turn:
//! time to first token (from the request's submission to the step that
//! produced its first token); over the run: generated tokens/s and all
//! tokens (prompt and generated) per second. The greedy tokens of every
//! turn are compared between the two runs. `--single` runs one agent alone
//! and prints its turns' token ids, for llama.cpp to replay
//! (`bench/llamacpp_agents.py`).

use std::collections::HashMap;
use std::time::Instant;

use anyhow::Result;
use clap::Parser;
use serde::Serialize;
use weft_kernels::{Engine, EngineConfig, LoadedModel, Request, SamplingParams};

/// `weft-bench agents` arguments.
#[derive(Parser, Debug, Clone)]
pub struct AgentsArgs {
    /// Model source.
    #[arg(long, default_value = "default")]
    pub model: String,
    /// CPU threads.
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Agents at once.
    #[arg(long, default_value_t = 4)]
    pub agents: usize,
    /// Turns per agent.
    #[arg(long, default_value_t = 6)]
    pub turns: usize,
    /// Tokens of the shared system prompt and tool definitions.
    #[arg(long, default_value_t = 1500)]
    pub context: usize,
    /// Tokens each answer is allowed (greedy, no stop).
    #[arg(long, default_value_t = 32)]
    pub answer: usize,
    /// Write the turns of one agent alone (token ids) to this JSON file.
    #[arg(long)]
    pub single: Option<std::path::PathBuf>,
}

/// One run's figures.
#[derive(Debug, Clone, Serialize)]
pub struct AgentsRun {
    /// Whether the prefix cache was on.
    pub cache: bool,
    /// Agents at once.
    pub agents: usize,
    /// Per turn: TTFT p50 and p95 over the agents (ms).
    pub ttft_ms: Vec<(f64, f64)>,
    /// Per turn: the prompt tokens and how many of them were cached (the
    /// first agent's).
    pub prompt_tokens: Vec<(usize, usize)>,
    /// Generated tokens per second over the run.
    pub generated_per_s: f64,
    /// Prompt and generated tokens per second over the run.
    pub tokens_per_s: f64,
    /// Wall time of the run (s).
    pub seconds: f64,
    /// Each (agent, turn)'s generated tokens.
    #[serde(skip)]
    pub answers: HashMap<(usize, usize), Vec<u32>>,
}

/// A tool output of 100 to 300 tokens for `agent`'s `turn`, deterministic.
fn tool_output(agent: usize, turn: usize) -> Vec<u32> {
    let n = 100 + (agent * 37 + turn * 91) % 201;
    (0..n)
        .map(|i| 3000 + ((i * 104_729 + agent * 7919 + turn * 15_485_863) % 15_000) as u32)
        .collect()
}

/// The shared context: a system prompt and tool definitions.
fn context(n: usize) -> Vec<u32> {
    let mut v = vec![2u32];
    v.extend((0..n.saturating_sub(1)).map(|i| 1000 + ((i * 7919) % 20_000) as u32));
    v
}

/// What a run has submitted so far.
struct Book<'a> {
    submitted: &'a mut HashMap<u64, (usize, usize, Instant)>,
    prompts: &'a mut Vec<(usize, usize)>,
    prompt_total: &'a mut u64,
    params: &'a SamplingParams,
}

impl Book<'_> {
    /// Sends `agent`'s turn `t`: its conversation so far and a tool output.
    fn submit(
        &mut self,
        e: &mut Engine,
        agent: usize,
        t: usize,
        history: &mut Vec<u32>,
    ) -> Result<()> {
        history.extend(tool_output(agent, t));
        let id = (agent * 1000 + t) as u64;
        *self.prompt_total += history.len() as u64;
        if agent == 0 {
            self.prompts[t].0 = history.len();
        }
        e.add_request(Request {
            id,
            prompt: history.clone(),
            params: self.params.clone(),
            priority: 0,
            tenant: "agents".into(),
        })?;
        self.submitted.insert(id, (agent, t, Instant::now()));
        Ok(())
    }
}

/// Runs `a.agents` agents for `a.turns` turns on `lm` with the prefix cache
/// `on` or off.
pub fn run_agents(lm: &LoadedModel, a: &AgentsArgs, agents: usize, on: bool) -> Result<AgentsRun> {
    let mut e = Engine::new(
        lm.model.clone(),
        lm.tokenizer.clone(),
        EngineConfig {
            kv_budget_bytes: 2 << 30,
            max_running: 64,
            max_step_tokens: 512,
            prefix_cache: on,
            ..EngineConfig::default()
        },
    )?;
    let base = context(a.context);
    // each agent's conversation so far, its turn, and its request's times
    let mut history: Vec<Vec<u32>> = vec![base; agents];
    let mut submitted: HashMap<u64, (usize, usize, Instant)> = HashMap::new();
    let mut first: HashMap<u64, f64> = HashMap::new();
    let mut answers: HashMap<(usize, usize), Vec<u32>> = HashMap::new();
    let mut ttft: Vec<Vec<f64>> = vec![Vec::new(); a.turns];
    let mut prompts = vec![(0usize, 0usize); a.turns];
    let (mut generated, mut prompt_total) = (0u64, 0u64);
    let params = SamplingParams {
        max_tokens: a.answer,
        ..SamplingParams::greedy(a.answer)
    };
    let mut book = Book {
        submitted: &mut submitted,
        prompts: &mut prompts,
        prompt_total: &mut prompt_total,
        params: &params,
    };
    let start = Instant::now();
    for (agent, h) in history.iter_mut().enumerate() {
        book.submit(&mut e, agent, 0, h)?;
    }
    while e.has_work() {
        for ev in e.step()? {
            let (agent, t, at) = book.submitted[&ev.id];
            if let Some(c) = ev.cached_tokens {
                if agent == 0 {
                    book.prompts[t].1 = c;
                }
            }
            if let Some(tok) = ev.token {
                first
                    .entry(ev.id)
                    .or_insert_with(|| at.elapsed().as_secs_f64() * 1e3);
                answers.entry((agent, t)).or_default().push(tok);
                generated += 1;
            }
            if ev.finish.is_some() {
                ttft[t].push(first.get(&ev.id).copied().unwrap_or(f64::NAN));
                // the answer joins the conversation; the next turn follows
                let answer = answers.get(&(agent, t)).cloned().unwrap_or_default();
                history[agent].extend(answer);
                if t + 1 < a.turns {
                    book.submit(&mut e, agent, t + 1, &mut history[agent])?;
                }
            }
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    let pct = |v: &mut Vec<f64>, q: f64| {
        v.sort_by(f64::total_cmp);
        v[((v.len() as f64 - 1.0) * q).round() as usize]
    };
    Ok(AgentsRun {
        cache: on,
        agents,
        ttft_ms: ttft
            .iter_mut()
            .map(|v| (pct(v, 0.5), pct(v, 0.95)))
            .collect(),
        prompt_tokens: prompts,
        generated_per_s: generated as f64 / seconds,
        tokens_per_s: (generated + prompt_total) as f64 / seconds,
        seconds,
        answers,
    })
}

/// One agent's turns as llama.cpp replays them: each turn's prompt token
/// ids (the answers weft gave with the cache off, so both see the same
/// prompts).
pub fn single_turns(a: &AgentsArgs, off: &AgentsRun) -> Vec<Vec<u32>> {
    let mut history = context(a.context);
    let mut out = Vec::new();
    for t in 0..a.turns {
        history.extend(tool_output(0, t));
        out.push(history.clone());
        history.extend(off.answers.get(&(0, t)).cloned().unwrap_or_default());
    }
    out
}

/// `weft-bench prefix-fabric` arguments.
#[derive(Parser, Debug)]
pub struct PrefixFabricArgs {
    #[command(flatten)]
    pub fabric: crate::failover::FabricArgs,
    /// Agents at once.
    #[arg(long, default_value_t = 6)]
    pub agents: usize,
    /// Turns per agent.
    #[arg(long, default_value_t = 4)]
    pub turns: usize,
    /// Tokens of the shared system prompt and tool definitions.
    #[arg(long, default_value_t = 1500)]
    pub context: usize,
    /// Tokens per answer.
    #[arg(long, default_value_t = 16)]
    pub answer: u32,
}

/// Runs the three routing modes and prints a markdown table and the JSON.
pub fn prefix_fabric(a: PrefixFabricArgs) -> Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    let opts = a.fabric.options()?;
    let runs = rt.block_on(weft_tools::demo::prefix_routing(
        &opts, a.agents, a.turns, a.context, a.answer,
    ))?;
    println!("| routing | hit rate | TTFT p50 (ms) | TTFT p95 (ms) | generated tokens/s | turns per gateway |");
    println!("|---|---|---|---|---|---|");
    for r in &runs {
        println!(
            "| {} | {:.2} | {:.0} | {:.0} | {:.1} | {} |",
            r.mode,
            r.hit_rate,
            r.ttft_ms.0,
            r.ttft_ms.1,
            r.tokens_per_s,
            r.served_by
                .iter()
                .map(|(n, c)| format!("{n}: {c}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    eprintln!("{}", serde_json::to_string(&runs)?);
    Ok(())
}
