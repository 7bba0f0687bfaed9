//! The simulator's scenarios at small scale, as regression checks of what
//! the full runs in `bench/results/` show: the paper's ordering
//! (round-robin slowest, weft fastest), edge placement keeping bytes off the
//! core without losing latency, and the same seed giving the same numbers.

use weft_bench::sim::edge::{self, EdgePolicy};
use weft_bench::sim::paper::{simulate, PolicyKind, Row};

fn mean_all(rows: &[Row]) -> f64 {
    rows.iter().find(|r| r.class == "all").unwrap().summary.mean
}

#[test]
fn paper_ordering_round_robin_then_paper_scheduler_then_weft() {
    let run = |k| simulate(k, 2000, 50, 7, 20_000.0);
    let rr = mean_all(&run(PolicyKind::RoundRobin));
    let ia = mean_all(&run(PolicyKind::PaperIntentAware));
    let weft_rows = run(PolicyKind::Weft);
    let weft = mean_all(&weft_rows);
    assert!(
        rr > ia && ia > weft,
        "mean latency: round-robin {rr:.1}, paper {ia:.1}, weft {weft:.1} ms"
    );
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

#[test]
fn the_same_seed_gives_the_same_numbers_and_another_seed_does_not() {
    let a = simulate(PolicyKind::Weft, 500, 20, 3, 5_000.0);
    let b = simulate(PolicyKind::Weft, 500, 20, 3, 5_000.0);
    let c = simulate(PolicyKind::Weft, 500, 20, 4, 5_000.0);
    let key = |rows: &[Row]| -> Vec<(u64, usize)> {
        rows.iter()
            .map(|r| (r.summary.mean.to_bits(), r.summary.n))
            .collect()
    };
    assert_eq!(key(&a), key(&b));
    assert_ne!(key(&a), key(&c));
}

#[test]
fn edge_weft_keeps_bytes_off_the_core_without_losing_latency() {
    let cloud = edge::simulate(EdgePolicy::CloudOnly, 5, 40.0).unwrap();
    let weft = edge::simulate(EdgePolicy::Weft, 5, 40.0).unwrap();
    assert!(
        weft.core_bytes <= 0.1 * cloud.core_bytes,
        "edge-core bytes: weft {:.3e}, cloud-only {:.3e}",
        weft.core_bytes,
        cloud.core_bytes
    );
    for (class, (w, c)) in ["critical", "standard", "sheddable"]
        .iter()
        .zip(weft.p95_ms.iter().zip(&cloud.p95_ms))
    {
        assert!(w <= c, "{class} p95: weft {w:.1} ms, cloud-only {c:.1} ms");
    }
    assert_eq!(weft.refused, 0);
}
