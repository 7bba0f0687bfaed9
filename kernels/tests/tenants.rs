//! Many tenants on one engine: fair shares of the tokens, KV quotas, and no
//! tenant's sequences evicted for another's.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use weft_kernels::testing::load_tiny_model;
use weft_kernels::{
    Completion, Engine, EngineConfig, FinishReason, KvCache, LoadedModel, Request, SamplingParams,
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

#[test]
fn four_tenants_get_equal_shares_of_the_tokens_whatever_order_they_came_in() {
    let dir = tempfile::tempdir().unwrap();
    let lm = tiny(dir.path());
    let mut e = engine(
        &lm,
        256,
        EngineConfig {
            max_running: 4,
            max_step_tokens: 64,
            ..EngineConfig::default()
        },
    );
    // tenant a queues all of its work first, then b, c and d
    let tenants = ["a", "b", "c", "d"];
    let mut owner = HashMap::new();
    for (t, name) in tenants.iter().enumerate() {
        for j in 0..12 {
            let id = (t * 100 + j) as u64;
            owner.insert(id, *name);
            e.add_request(ask(
                id,
                name,
                prompt(9, j as u32),
                SamplingParams::greedy(24),
            ))
            .unwrap();
        }
    }
    let total = 4 * 12 * 24;
    let mut got: BTreeMap<&str, usize> = BTreeMap::new();
    while got.values().sum::<usize>() < total / 2 {
        for ev in e.step().unwrap() {
            if ev.token.is_some() {
                *got.entry(owner[&ev.id]).or_default() += 1;
            }
        }
    }
    // first come is not first served: while every tenant has work waiting,
    // each gets a quarter of the tokens (within 10% of it)
    let sum = got.values().sum::<usize>() as f64;
    for name in tenants {
        let share = got.get(name).copied().unwrap_or(0) as f64 / sum;
        assert!(
            (share - 0.25).abs() <= 0.025,
            "tenant {name} got {share:.3} of the tokens: {got:?}"
        );
    }
    let served: Vec<u64> = e.tenants().iter().map(|t| t.served_tokens).collect();
    assert_eq!(served.len(), 4, "{:?}", e.tenants());
    let rest = e.run_to_completion().unwrap();
    assert!(rest
        .values()
        .all(|c| c.finish == Some(FinishReason::Length) && c.tokens.len() <= 24));
    assert!(
        e.tenants().is_empty(),
        "tenants leave with their last sequence"
    );
}

#[test]
fn a_tenant_at_its_kv_share_waits_for_its_own_blocks_and_the_others_run_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let lm = tiny(dir.path());
    let blocks = 24;
    let mut e = engine(
        &lm,
        blocks,
        EngineConfig {
            max_step_tokens: 64,
            tenant_kv_shares: [("greedy-agent".to_string(), 0.5)].into(),
            ..EngineConfig::default()
        },
    );
    // one tenant floods the engine with long sequences (each grows to 5
    // blocks); another comes later with a few
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
    let want = alone(&lm, &reqs);
    let mut done: HashMap<u64, Completion> = HashMap::new();
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
        for t in e.tenants() {
            assert!(t.kv_blocks <= t.kv_quota, "{t:?}");
            if t.tenant == "greedy-agent" {
                assert_eq!(t.kv_quota, blocks / 2);
            }
        }
    }
    let usage = e.stats();
    assert!(usage.preemptions > 0, "the quota never pinched: {usage:?}");
    // every sequence finished with the tokens it has alone: preempted ones
    // were recomputed, and none failed
    for r in &reqs {
        let c = &done[&r.id];
        assert_eq!(c.finish, Some(FinishReason::Length), "request {}", r.id);
        assert_eq!(c.tokens, want[&r.id], "request {}", r.id);
    }
}

#[test]
fn a_sequence_short_of_blocks_preempts_its_own_tenant_never_another() {
    let dir = tempfile::tempdir().unwrap();
    let lm = tiny(dir.path());
    // 7 blocks of 16 positions. Tenant a's one sequence came first and
    // needs its second block after 2 tokens; tenant b's three came after
    // and each stays within the 2 blocks of its prompt. When a needs a
    // block the pool is dry, and b's sequences are the newest.
    let mut e = engine(
        &lm,
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
    let want = alone(&lm, &reqs);
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
    assert_eq!(
        preempted.get("b").copied().unwrap_or(0),
        0,
        "a evicted b's sequences: {preempted:?}"
    );
    assert!(preempted["a"] > 0, "a never had to wait: {preempted:?}");
    for r in &reqs {
        assert_eq!(done[&r.id].tokens, want[&r.id], "request {}", r.id);
    }
}

#[test]
fn work_larger_than_a_tenants_quota_is_refused_or_ended_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let lm = tiny(dir.path());
    let cfg = EngineConfig {
        tenant_kv_share: 0.25,
        ..EngineConfig::default()
    };
    let mut e = engine(&lm, 16, cfg.clone());
    // a prompt of 5 blocks against a quota of 4 never runs
    let err = e
        .add_request(ask(1, "small", prompt(70, 1), SamplingParams::greedy(4)))
        .unwrap_err()
        .to_string();
    assert!(err.contains("\"small\"") && err.contains("4"), "{err}");
    // one that outgrows the quota ends with an error naming it, and the
    // engine goes on with the others
    e.add_request(ask(2, "small", prompt(60, 2), SamplingParams::greedy(30)))
        .unwrap();
    e.add_request(ask(3, "other", prompt(10, 3), SamplingParams::greedy(8)))
        .unwrap();
    let out = e.run_to_completion().unwrap();
    match &out[&2].finish {
        Some(FinishReason::Error(m)) => assert!(m.contains("quota"), "{m}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        out[&2].tokens.len(),
        64 - 60 + 1,
        "it ran until its 4th block filled"
    );
    assert_eq!(out[&3].finish, Some(FinishReason::Length));
    // shares outside (0, 1] are refused when the engine is built
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
