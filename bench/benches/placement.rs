//! Criterion benchmarks of the placement hot paths:
//!
//! - `route/100`: one routing decision over 100 candidates (target: ≤ 10 µs
//!   at p99). Criterion reports the mean; the p50 and p99 of single calls,
//!   timed one by one, are printed after it.
//! - `solve/10000x100`: a plan for the `sim scale` fabric, 10,000 nodes and
//!   100 models, from an empty placement (target: ≤ 1 s).
//!
//! `cargo bench -p weft-bench --bench placement`

use std::hint::black_box;
use std::time::Instant;

use criterion::{criterion_group, criterion_main, Criterion};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use weft_placement::{
    route, solve, Candidate, Criticality, Intent, LinkClass, LinkEstimate, ModelId, NodeId,
    NodeState, Placement, RouteRequest, RouterConfig,
};

const CANDIDATES: usize = 100;

fn candidates(seed: u64) -> Vec<Candidate> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..CANDIDATES)
        .map(|n| {
            let slots = rng.random_range(4..=32);
            Candidate {
                state: NodeState {
                    node: NodeId(n as u32),
                    holds_model: true,
                    running: rng.random_range(0..=slots),
                    queued: rng.random_range(0..16),
                    slots,
                    running_tokens: rng.random_range(0.0..3000.0),
                    queued_tokens: rng.random_range(0.0..5000.0),
                    queued_critical_tokens: rng.random_range(0.0..500.0),
                    tokens_per_s: rng.random_range(1000.0..10_000.0),
                    sequence_tokens_per_s: rng.random_range(50.0..300.0),
                    free_kv_tokens: 1 << 20,
                    report_age_ms: rng.random_range(0.0..500.0),
                    cost_per_token: rng.random_range(2e-8..1e-7),
                    energy_per_token_j: 0.0,
                    cached_prompt_tokens: 0.0,
                },
                link: LinkEstimate {
                    rtt_ms: rng.random_range(0.5..80.0),
                    bandwidth_bytes_per_s: rng.random_range(2.5e6..1.25e9),
                    class: LinkClass::EdgeToEdge,
                    cost_per_byte: 1e-11,
                },
            }
        })
        .collect()
}

fn request() -> RouteRequest {
    RouteRequest {
        model: ModelId(0),
        intent: Intent {
            criticality: Criticality::Standard,
            deadline_ms: Some(5_000),
            max_cost: Some(1e-2),
        },
        prompt_tokens: 1000,
        output_tokens: 64,
        compute_per_token: 1.0,
    }
}

fn bench_route(c: &mut Criterion) {
    let cands = candidates(1);
    let req = request();
    let config = RouterConfig::default();
    c.bench_function("route/100", |b| {
        b.iter(|| route(black_box(&req), black_box(&cands), &config))
    });
    // single calls timed one by one, for the tail
    let sets: Vec<Vec<Candidate>> = (0..64).map(candidates).collect();
    let mut times: Vec<f64> = Vec::with_capacity(200_000);
    for i in 0..200_000 {
        let t = Instant::now();
        black_box(route(&req, &sets[i % sets.len()], &config));
        times.push(t.elapsed().as_secs_f64() * 1e6);
    }
    times.sort_by(f64::total_cmp);
    let pct = |p: f64| times[((p * times.len() as f64) as usize).min(times.len() - 1)];
    println!(
        "route/100 single calls: p50 {:.2} µs, p99 {:.2} µs, p99.9 {:.2} µs (200000 calls)",
        pct(0.50),
        pct(0.99),
        pct(0.999)
    );
}

fn bench_solve(c: &mut Criterion) {
    let f = weft_bench::sim::scale::fabric(1, 1_000_000);
    let config = weft_bench::sim::scale::solver_config();
    let empty = Placement::default();
    let mut g = c.benchmark_group("solve");
    g.sample_size(10);
    g.bench_function("10000x100", |b| {
        b.iter(|| {
            solve(
                &f.topology,
                &f.models,
                black_box(&f.demand),
                &empty,
                &config,
            )
            .unwrap()
        })
    });
    g.finish();
}

criterion_group!(benches, bench_route, bench_solve);
criterion_main!(benches);
