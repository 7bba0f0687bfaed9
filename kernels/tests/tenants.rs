//! Many tenants on one engine: fair shares of the tokens, KV quotas, and no
//! tenant's sequences evicted for another's.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use weft_kernels::testing::load_tiny_model;
use weft_kernels::{
    Completion, Engine, EngineConfig, EngineStats, FinishReason, KvCache, LoadedModel, Request,
    SamplingParams, TenantUsage,
};

fn tiny(dir: &Path) -> LoadedModel {
    load_tiny_model(dir).unwrap()
}

fn prompt(n: usize, salt: u32) -> Vec<u32> {
    let mut v = vec![2];
    v.extend((1..n as u32).map(|i| 263 + (i * 7 + salt * 13) % 60));
    v
}

/// An engine whose KV pool holds `blocks` blocks.
fn engine(lm: &LoadedModel, blocks: usize, cfg: EngineConfig) -> Engine {
    let c = lm.model.config();
    Engine::new(
        lm.model.clone(),
        lm.tokenizer.clone(),
        EngineConfig {
            kv_budget_bytes: blocks * KvCache::block_bytes(c.layers, c.kv_dim()),
            ..cfg
        },
    )
    .unwrap()
}

fn ask(id: u64, tenant: &str, prompt: Vec<u32>, params: SamplingParams) -> Request {
    Request {
        id,
        prompt,
        params,
        priority: 0,
        tenant: tenant.into(),
    }
}

/// Each request's tokens when it runs alone with room to spare.
fn alone(lm: &LoadedModel, reqs: &[Request]) -> HashMap<u64, Vec<u32>> {
    reqs.iter()
        .map(|r| {
            let mut e = engine(lm, 256, EngineConfig::default());
            e.add_request(r.clone()).unwrap();
            (
                r.id,
                e.run_to_completion().unwrap().remove(&r.id).unwrap().tokens,
            )
        })
        .collect()
}

/// Adds a step's events to the completions.
fn record(done: &mut HashMap<u64, Completion>, events: Vec<weft_kernels::StepEvent>) {
    for ev in events {
        let c = done.entry(ev.id).or_default();
        c.tokens.extend(ev.token);
        if ev.finish.is_some() {
            c.finish = ev.finish;
        }
    }
}

const TENANTS: [&str; 4] = ["a", "b", "c", "d"];

/// Requests each tenant queued.
const PER_TENANT: usize = 12;

/// Tokens each request asks for.
const TOKENS_EACH: usize = 24;

/// Four tenants' work on one engine that runs 4 sequences at a time,
/// served until half of the tokens are out: tenant a queued all of its
/// work first, then b, c and d.
struct HalfServed {
    engine: Engine,
    /// Tokens each tenant got so far.
    got: BTreeMap<&'static str, usize>,
}

fn four_tenants_half_served(lm: &LoadedModel) -> HalfServed {
    let mut e = engine(
        lm,
        256,
        EngineConfig {
            max_running: 4,
            max_step_tokens: 64,
            ..EngineConfig::default()
        },
    );
    let mut owner = HashMap::new();
    for (t, name) in TENANTS.iter().enumerate() {
        for j in 0..PER_TENANT {
            let id = (t * 100 + j) as u64;
            owner.insert(id, *name);
            e.add_request(ask(
                id,
                name,
                prompt(9, j as u32),
                SamplingParams::greedy(TOKENS_EACH),
            ))
            .unwrap();
        }
    }
    let total = TENANTS.len() * PER_TENANT * TOKENS_EACH;
    let mut got: BTreeMap<&str, usize> = BTreeMap::new();
    while got.values().sum::<usize>() < total / 2 {
        for ev in e.step().unwrap() {
            if ev.token.is_some() {
                *got.entry(owner[&ev.id]).or_default() += 1;
            }
        }
    }
    HalfServed { engine: e, got }
}

#[test]
fn four_tenants_get_equal_shares_of_the_tokens_whatever_order_they_came_in() {
    let dir = tempfile::tempdir().unwrap();
    let h = four_tenants_half_served(&tiny(dir.path()));
    // first come is not first served: while every tenant has work waiting,
    // each gets a quarter of the tokens (within 10% of it)
    let got = &h.got;
    let sum = got.values().sum::<usize>() as f64;
    for name in TENANTS {
        let share = got.get(name).copied().unwrap_or(0) as f64 / sum;
        assert!(
            (share - 0.25).abs() <= 0.025,
            "tenant {name} got {share:.3} of the tokens: {got:?}"
        );
    }
}

#[test]
fn the_engine_reports_every_tenant_with_work() {
    let dir = tempfile::tempdir().unwrap();
    let h = four_tenants_half_served(&tiny(dir.path()));
    let served: Vec<u64> = h.engine.tenants().iter().map(|t| t.served_tokens).collect();
    assert_eq!(served.len(), 4, "{:?}", h.engine.tenants());
}

#[test]
fn fair_sharing_still_runs_every_sequence_to_its_length() {
    let dir = tempfile::tempdir().unwrap();
    let mut h = four_tenants_half_served(&tiny(dir.path()));
    let rest = h.engine.run_to_completion().unwrap();
    assert!(rest
        .values()
        .all(|c| c.finish == Some(FinishReason::Length) && c.tokens.len() <= TOKENS_EACH));
}

#[test]
fn tenants_leave_with_their_last_sequence() {
    let dir = tempfile::tempdir().unwrap();
    let mut h = four_tenants_half_served(&tiny(dir.path()));
    h.engine.run_to_completion().unwrap();
    assert!(
        h.engine.tenants().is_empty(),
        "tenants leave with their last sequence"
    );
}

/// Blocks in the pool of the KV share tests.
const SHARED_BLOCKS: usize = 24;

/// One tenant ("greedy-agent", with half the pool as its share) floods an
/// engine with long sequences (each grows to 5 blocks); another
/// ("polite") comes later with a few.
struct Flood {
    reqs: Vec<Request>,
    /// Each request's tokens when it runs alone.
    alone: HashMap<u64, Vec<u32>>,
    done: HashMap<u64, Completion>,
    /// The tenants after each step.
    tenants_by_step: Vec<Vec<TenantUsage>>,
    stats: EngineStats,
}

fn flood(lm: &LoadedModel) -> Flood {
    let mut e = engine(
        lm,
        SHARED_BLOCKS,
        EngineConfig {
            max_step_tokens: 64,
            tenant_kv_shares: [("greedy-agent".to_string(), 0.5)].into(),
            ..EngineConfig::default()
        },
    );
    let mut reqs = Vec::new();
    for j in 0..8 {
        reqs.push(ask(
            j,
            "greedy-agent",
            prompt(20, j as u32),
            SamplingParams::greedy(60),
        ));
    }
    for j in 0..3 {
        reqs.push(ask(
            50 + j,
            "polite",
            prompt(20, 9 + j as u32),
            SamplingParams::greedy(40),
        ));
    }
    let want = alone(lm, &reqs);
    let mut done: HashMap<u64, Completion> = HashMap::new();
    let mut tenants_by_step = Vec::new();
    let mut steps = 0;
    for r in &reqs[..8] {
        e.add_request(r.clone()).unwrap();
    }
    while e.has_work() {
        steps += 1;
        if steps == 3 {
            for r in &reqs[8..] {
                e.add_request(r.clone()).unwrap();
            }
        }
        record(&mut done, e.step().unwrap());
        tenants_by_step.push(e.tenants());
    }
    Flood {
        reqs,
        alone: want,
        done,
        tenants_by_step,
        stats: e.stats(),
    }
}

#[test]
fn a_tenant_never_holds_more_kv_blocks_than_its_quota() {
    let dir = tempfile::tempdir().unwrap();
    let f = flood(&tiny(dir.path()));
    for t in f.tenants_by_step.iter().flatten() {
        assert!(t.kv_blocks <= t.kv_quota, "{t:?}");
    }
}

#[test]
fn a_tenants_kv_share_sets_its_quota() {
    let dir = tempfile::tempdir().unwrap();
    let f = flood(&tiny(dir.path()));
    for t in f.tenants_by_step.iter().flatten() {
        if t.tenant == "greedy-agent" {
            assert_eq!(t.kv_quota, SHARED_BLOCKS / 2);
        }
    }
}

#[test]
fn a_tenant_at_its_kv_share_waits_for_its_own_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let f = flood(&tiny(dir.path()));
    let usage = f.stats;
    assert!(usage.preemptions > 0, "the quota never pinched: {usage:?}");
}

#[test]
fn with_a_tenant_at_its_kv_share_every_sequence_gives_its_tokens_alone() {
    let dir = tempfile::tempdir().unwrap();
    let f = flood(&tiny(dir.path()));
    // preempted ones were recomputed, the others ran untouched, and none
    // failed
    for r in &f.reqs {
        let c = &f.done[&r.id];
        assert_eq!(c.finish, Some(FinishReason::Length), "request {}", r.id);
        assert_eq!(c.tokens, f.alone[&r.id], "request {}", r.id);
    }
}

/// Tenant a's one sequence and tenant b's three on a pool of 7 blocks of
/// 16 positions. a's came first and needs its second block after 2 tokens;
/// b's came after and each stays within the 2 blocks of its prompt. When a
/// needs a block the pool is dry, and b's sequences are the newest.
struct ShortOfBlocks {
    reqs: Vec<Request>,
    alone: HashMap<u64, Vec<u32>>,
    done: HashMap<u64, Completion>,
    /// Each tenant's preemptions, as last seen.
    preempted: HashMap<String, u64>,
}

fn short_of_blocks(lm: &LoadedModel) -> ShortOfBlocks {
    let mut e = engine(
        lm,
        7,
        EngineConfig {
            max_step_tokens: 128,
            ..EngineConfig::default()
        },
    );
    let mut reqs = vec![ask(1, "a", prompt(14, 1), SamplingParams::greedy(60))];
    for j in 0..3 {
        reqs.push(ask(
            10 + j,
            "b",
            prompt(17, 2 + j as u32),
            SamplingParams::greedy(10),
        ));
    }
    let want = alone(lm, &reqs);
    for r in &reqs {
        e.add_request(r.clone()).unwrap();
    }
    let mut preempted: HashMap<String, u64> = HashMap::new();
    let mut done: HashMap<u64, Completion> = HashMap::new();
    while e.has_work() {
        record(&mut done, e.step().unwrap());
        for t in e.tenants() {
            preempted.insert(t.tenant, t.preemptions);
        }
    }
    ShortOfBlocks {
        reqs,
        alone: want,
        done,
        preempted,
    }
}

#[test]
fn a_sequence_short_of_blocks_never_preempts_another_tenants() {
    let dir = tempfile::tempdir().unwrap();
    let preempted = short_of_blocks(&tiny(dir.path())).preempted;
    assert_eq!(
        preempted.get("b").copied().unwrap_or(0),
        0,
        "a evicted b's sequences: {preempted:?}"
    );
}

#[test]
fn a_sequence_short_of_blocks_preempts_its_own_tenant() {
    let dir = tempfile::tempdir().unwrap();
    let preempted = short_of_blocks(&tiny(dir.path())).preempted;
    assert!(preempted["a"] > 0, "a never had to wait: {preempted:?}");
}

#[test]
fn a_tenant_preempting_its_own_sequence_changes_no_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let s = short_of_blocks(&tiny(dir.path()));
    for r in &s.reqs {
        assert_eq!(s.done[&r.id].tokens, s.alone[&r.id], "request {}", r.id);
    }
}

/// An engine of 16 blocks where a tenant may hold a quarter of them.
fn quarter_shares(lm: &LoadedModel) -> Engine {
    let cfg = EngineConfig {
        tenant_kv_share: 0.25,
        ..EngineConfig::default()
    };
    engine(lm, 16, cfg)
}

#[test]
fn a_prompt_larger_than_its_tenants_quota_is_refused_naming_the_tenant_and_quota() {
    let dir = tempfile::tempdir().unwrap();
    let mut e = quarter_shares(&tiny(dir.path()));
    // a prompt of 5 blocks against a quota of 4 never runs
    let err = e
        .add_request(ask(1, "small", prompt(70, 1), SamplingParams::greedy(4)))
        .unwrap_err()
        .to_string();
    assert!(err.contains("\"small\"") && err.contains("4"), "{err}");
}

/// On a quarter-share engine, a "small" sequence (2) that outgrows its
/// tenant's quota beside an "other" one (3) that does not: what they gave.
fn outgrown(lm: &LoadedModel) -> HashMap<u64, Completion> {
    let mut e = quarter_shares(lm);
    e.add_request(ask(2, "small", prompt(60, 2), SamplingParams::greedy(30)))
        .unwrap();
    e.add_request(ask(3, "other", prompt(10, 3), SamplingParams::greedy(8)))
        .unwrap();
    e.run_to_completion().unwrap()
}

#[test]
fn a_sequence_that_outgrows_its_tenants_quota_ends_with_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let out = outgrown(&tiny(dir.path()));
    match &out[&2].finish {
        Some(FinishReason::Error(m)) => assert!(m.contains("quota"), "{m}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_sequence_that_outgrows_its_tenants_quota_runs_until_the_quota_is_full() {
    let dir = tempfile::tempdir().unwrap();
    let out = outgrown(&tiny(dir.path()));
    assert_eq!(
        out[&2].tokens.len(),
        64 - 60 + 1,
        "it ran until its 4th block filled"
    );
}

#[test]
fn the_engine_goes_on_with_the_others_when_a_sequence_outgrows_its_quota() {
    let dir = tempfile::tempdir().unwrap();
    let out = outgrown(&tiny(dir.path()));
    assert_eq!(out[&3].finish, Some(FinishReason::Length));
}

#[test]
fn kv_shares_outside_0_to_1_are_refused_when_the_engine_is_built() {
    let dir = tempfile::tempdir().unwrap();
    let lm = tiny(dir.path());
    for bad in [0.0, -0.5, 1.5, f64::NAN] {
        let c = lm.model.config();
        let r = Engine::new(
            lm.model.clone(),
            lm.tokenizer.clone(),
            EngineConfig {
                tenant_kv_shares: [("x".to_string(), bad)].into(),
                kv_budget_bytes: 16 * KvCache::block_bytes(c.layers, c.kv_dim()),
                ..EngineConfig::default()
            },
        );
        let err = r.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("share of x"), "share {bad}: {err:?}");
    }
}
