//! The simulator's scenarios at small scale, as regression checks of what
//! the full runs in `bench/results/` show: the paper's ordering
//! (round-robin slowest, weft fastest), edge placement keeping bytes off the
//! core without losing latency, and the same seed giving the same numbers.

use weft_bench::sim::edge::{self, EdgePolicy};
use weft_bench::sim::paper::{simulate, PolicyKind, Row};

fn mean_all(rows: &[Row]) -> f64 {
    rows.iter().find(|r| r.class == "all").unwrap().summary.mean
}

/// The paper's scenario at small scale under policy `k`.
fn paper(k: PolicyKind) -> Vec<Row> {
    simulate(k, 2000, 50, 7, 20_000.0)
}

#[test]
fn paper_ordering_round_robin_then_paper_scheduler_then_weft() {
    let rr = mean_all(&paper(PolicyKind::RoundRobin));
    let ia = mean_all(&paper(PolicyKind::PaperIntentAware));
    let weft = mean_all(&paper(PolicyKind::Weft));
    assert!(
        rr > ia && ia > weft,
        "mean latency: round-robin {rr:.1}, paper {ia:.1}, weft {weft:.1} ms"
    );
}

#[test]
fn weft_keeps_the_paper_scenarios_critical_p99_within_the_deadline() {
    let weft_rows = paper(PolicyKind::Weft);
    let critical = weft_rows.iter().find(|r| r.class == "critical").unwrap();
    assert!(
        critical.summary.n > 100,
        "too few critical tasks: {}",
        critical.summary.n
    );
    assert!(
        critical.summary.p99 <= weft_bench::sim::paper::CRITICAL_DEADLINE_MS as f64,
        "weft's critical p99 {:.1} ms is past the deadline",
        critical.summary.p99
    );
}

/// A small weft run's numbers with `seed`: each row's mean (bit for bit)
/// and count.
fn numbers(seed: u64) -> Vec<(u64, usize)> {
    simulate(PolicyKind::Weft, 500, 20, seed, 5_000.0)
        .iter()
        .map(|r| (r.summary.mean.to_bits(), r.summary.n))
        .collect()
}

#[test]
fn the_same_seed_gives_the_same_numbers() {
    assert_eq!(numbers(3), numbers(3));
}

#[test]
fn another_seed_gives_other_numbers() {
    assert_ne!(numbers(3), numbers(4));
}

/// The edge scenario under cloud-only placement and under weft.
fn edge_runs() -> (edge::EdgeRow, edge::EdgeRow) {
    let cloud = edge::simulate(EdgePolicy::CloudOnly, 5, 40.0).unwrap();
    let weft = edge::simulate(EdgePolicy::Weft, 5, 40.0).unwrap();
    (cloud, weft)
}

#[test]
fn edge_weft_keeps_bytes_off_the_core() {
    let (cloud, weft) = edge_runs();
    assert!(
        weft.core_bytes <= 0.1 * cloud.core_bytes,
        "edge-core bytes: weft {:.3e}, cloud-only {:.3e}",
        weft.core_bytes,
        cloud.core_bytes
    );
}

#[test]
fn edge_weft_loses_no_latency_against_cloud_only() {
    let (cloud, weft) = edge_runs();
    for (class, (w, c)) in ["critical", "standard", "sheddable"]
        .iter()
        .zip(weft.p95_ms.iter().zip(&cloud.p95_ms))
    {
        assert!(w <= c, "{class} p95: weft {w:.1} ms, cloud-only {c:.1} ms");
    }
}

#[test]
fn edge_weft_refuses_nothing() {
    let (_, weft) = edge_runs();
    assert_eq!(weft.refused, 0);
}

/// The edge scenario's agent sessions, routed without and with the prefix
/// term.
fn session_runs() -> &'static (edge::EdgeRow, edge::EdgeRow) {
    static R: std::sync::OnceLock<(edge::EdgeRow, edge::EdgeRow)> = std::sync::OnceLock::new();
    R.get_or_init(|| {
        (
            edge::simulate_with(EdgePolicy::Weft, 5, 40.0, Some(false)).unwrap(),
            edge::simulate_with(EdgePolicy::Weft, 5, 40.0, Some(true)).unwrap(),
        )
    })
}

#[test]
fn edge_sessions_find_their_prefix_cached_more_often_with_prefix_aware_routing() {
    // the blind router is sticky too (equal nodes tie to the same one), so
    // the gain is where load moves a session elsewhere
    let (blind, aware) = session_runs();
    assert!(
        aware.hit_rate >= 0.9,
        "prefix-aware hit rate {}",
        aware.hit_rate
    );
    assert!(
        aware.hit_rate > blind.hit_rate + 0.05,
        "{} vs {}",
        aware.hit_rate,
        blind.hit_rate
    );
}

#[test]
fn edge_sessions_get_their_first_token_sooner_with_prefix_aware_routing() {
    let (blind, aware) = session_runs();
    assert!(
        aware.ttft_ms[0] < blind.ttft_ms[0],
        "TTFT p50 {} vs {}",
        aware.ttft_ms[0],
        blind.ttft_ms[0]
    );
}
