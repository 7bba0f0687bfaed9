//! Properties of the solver and the router over many seeded random
//! instances: never over memory or compute, every replica a whole chain of
//! layers, every demanded model placed when capacity allows, the same input
//! giving the same plan, an unchanged demand moving nothing, and the router
//! never choosing a node that cannot take the request.

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use weft_placement::{
    route, solve, Candidate, Criticality, Demand, DropReason, Intent, LinkClass, LinkDefaults,
    LinkEstimate, ModelId, ModelSpec, Node, NodeId, NodeState, Placement, Plan, Rejection,
    RouteRequest, RouterConfig, Site, SiteId, SiteKind, SolverConfig, Topology,
};

const CASES: u64 = 500;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

struct Instance {
    topology: Topology,
    models: Vec<ModelSpec>,
    demand: Vec<Demand>,
}

/// A random fabric; with `ample`, the cloud can hold and run everything.
fn instance(rng: &mut StdRng, ample: bool) -> Instance {
    let edges = rng.random_range(1..=6);
    let clouds = rng.random_range(1..=2);
    let mut sites = Vec::new();
    for i in 0..edges {
        sites.push(Site {
            kind: SiteKind::Edge,
            region: (i % 2) as u32,
        });
    }
    for _ in 0..clouds {
        sites.push(Site {
            kind: SiteKind::Cloud,
            region: 0,
        });
    }
    let models: Vec<ModelSpec> = (0..rng.random_range(1..=5))
        .map(|i| ModelSpec {
            name: format!("m{i}"),
            layers: rng.random_range(4..=40),
            bytes_per_layer: rng.random_range(10..=300) * MIB,
            shared_bytes: rng.random_range(0..=1024) * MIB,
            compute_per_token: rng.random_range(0.2..5.0),
            kv_bytes_per_token: rng.random_range(0..=200_000),
            hidden_bytes_per_token: 0,
        })
        .collect();
    let mut nodes = Vec::new();
    for (s, site) in sites.iter().enumerate() {
        let cloud = site.kind == SiteKind::Cloud;
        for _ in 0..rng.random_range(1..=4) {
            let memory_bytes = if cloud && ample {
                models
                    .iter()
                    .map(|m| m.shard_memory(m.layers, SolverConfig::default().kv_reserve_tokens))
                    .sum::<u64>()
                    + GIB
            } else if cloud {
                rng.random_range(20..=80) * GIB
            } else {
                rng.random_range(1..=16) * GIB
            };
            let slots = rng.random_range(1..=32);
            nodes.push(Node {
                site: SiteId(s as u32),
                memory_bytes,
                tokens_per_s: if cloud && ample {
                    1e9
                } else {
                    rng.random_range(100.0..10_000.0)
                },
                slots,
                accelerator: rng.random(),
                cost_per_token: rng.random_range(1e-8..1e-7),
            });
        }
    }
    let mut pairs: Vec<(usize, usize)> = (0..sites.len())
        .flat_map(|s| (0..models.len()).map(move |m| (s, m)))
        .collect();
    pairs.shuffle(rng);
    pairs.truncate(rng.random_range(1..=pairs.len()));
    let demand = pairs
        .into_iter()
        .map(|(s, m)| Demand {
            site: SiteId(s as u32),
            model: ModelId(m as u32),
            requests_per_s: rng.random_range(0.01..50.0),
            prompt_tokens: rng.random_range(0.0..4000.0),
            output_tokens: rng.random_range(1.0..256.0),
            deadline_ms: rng
                .random_bool(0.5)
                .then(|| rng.random_range(200.0..10_000.0)),
        })
        .collect();
    let topology = Topology::new(sites, nodes, LinkDefaults::default()).unwrap();
    Instance {
        topology,
        models,
        demand,
    }
}

fn config(rng: &mut StdRng) -> SolverConfig {
    SolverConfig {
        amortize_s: [3600.0, 86_400.0, 604_800.0][rng.random_range(0..3)],
        ..SolverConfig::default()
    }
}

fn plan(i: &Instance, current: &Placement, c: &SolverConfig) -> Plan {
    solve(&i.topology, &i.models, &i.demand, current, c).unwrap()
}

fn check_plan(i: &Instance, p: &Plan, c: &SolverConfig, seed: u64) {
    let used = p
        .placement
        .memory_used(&i.topology, &i.models, c.kv_reserve_tokens);
    for (n, (&u, node)) in used.iter().zip(&i.topology.nodes).enumerate() {
        assert!(
            u <= node.memory_bytes,
            "seed {seed}: node {n} holds {u} bytes of {}",
            node.memory_bytes
        );
    }
    for r in &p.placement.replicas {
        let m = &i.models[r.model.0 as usize];
        let mut next = 0;
        for s in &r.shards {
            assert_eq!(s.layers.start, next, "seed {seed}: gap in {r:?}");
            assert!(s.layers.end > s.layers.start, "seed {seed}: empty shard");
            assert_eq!(
                i.topology.node(s.node).site,
                r.site,
                "seed {seed}: shard off-site"
            );
            next = s.layers.end;
        }
        assert_eq!(
            next, m.layers,
            "seed {seed}: {r:?} does not cover the model"
        );
        assert!(
            !r.reasons.is_empty(),
            "seed {seed}: a replica without reasons"
        );
    }
    // compute: what the allocations put on each node stays within its share
    let mut work = vec![0.0; i.topology.nodes.len()];
    for a in &p.allocations {
        let d = &i.demand[a.demand];
        let r = &p.placement.replicas[a.replica];
        assert_eq!(
            r.model, d.model,
            "seed {seed}: demand sent to another model"
        );
        let m = &i.models[d.model.0 as usize];
        let per_request = d.work_tokens_per_s(m, c.prefill_share) / d.requests_per_s;
        for s in &r.shards {
            let frac = (s.layers.end - s.layers.start) as f64 / m.layers as f64;
            work[s.node.0 as usize] += a.requests_per_s * per_request * frac;
        }
    }
    for (n, (&w, node)) in work.iter().zip(&i.topology.nodes).enumerate() {
        let cap = node.tokens_per_s * (1.0 - c.headroom);
        assert!(
            w <= cap * (1.0 + 1e-9) + 1e-9,
            "seed {seed}: node {n} runs {w} of {cap}"
        );
    }
}

#[test]
fn plans_stay_within_memory_and_compute_and_cover_whole_models() {
    for seed in 0..CASES {
        let mut rng = StdRng::seed_from_u64(seed);
        let i = instance(&mut rng, false);
        let c = config(&mut rng);
        let p = plan(&i, &Placement::default(), &c);
        check_plan(&i, &p, &c, seed);
        // served plus unserved is all the demand
        let served: f64 = p.allocations.iter().map(|a| a.requests_per_s).sum();
        let asked: f64 = i.demand.iter().map(|d| d.requests_per_s).sum();
        let gap = (served + p.cost.unserved_per_s - asked).abs();
        assert!(
            gap <= asked * 1e-6,
            "seed {seed}: {served} + {} != {asked}",
            p.cost.unserved_per_s
        );
    }
}

#[test]
fn every_demanded_model_is_placed_when_capacity_allows() {
    for seed in 0..CASES {
        let mut rng = StdRng::seed_from_u64(seed);
        let i = instance(&mut rng, true);
        let c = config(&mut rng);
        let p = plan(&i, &Placement::default(), &c);
        check_plan(&i, &p, &c, seed);
        assert!(p.cost.unserved_per_s < 1e-9, "seed {seed}: {:?}", p.cost);
        for d in &i.demand {
            assert!(
                p.placement.replicas.iter().any(|r| r.model == d.model),
                "seed {seed}: {} demanded but not placed",
                d.model
            );
        }
    }
}

#[test]
fn the_same_input_gives_the_same_plan_whatever_the_demand_order() {
    for seed in 0..CASES {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut i = instance(&mut rng, false);
        let c = config(&mut rng);
        let a = plan(&i, &Placement::default(), &c);
        assert_eq!(a, plan(&i, &Placement::default(), &c), "seed {seed}");
        i.demand.shuffle(&mut rng);
        let b = plan(&i, &Placement::default(), &c);
        assert_eq!(
            a.placement, b.placement,
            "seed {seed}: order changed the placement"
        );
        assert_eq!(a.cost.moved_bytes, b.cost.moved_bytes, "seed {seed}");
    }
}

#[test]
fn an_unchanged_demand_moves_nothing() {
    for seed in 0..CASES {
        let mut rng = StdRng::seed_from_u64(seed);
        let i = instance(&mut rng, false);
        let c = config(&mut rng);
        let first = plan(&i, &Placement::default(), &c);
        let again = plan(&i, &first.placement, &c);
        check_plan(&i, &again, &c, seed);
        assert_eq!(again.cost.moved_bytes, 0, "seed {seed}: {:?}", again.cost);
        let shape = |p: &Placement| -> Vec<_> {
            p.replicas
                .iter()
                .map(|r| (r.model, r.site, r.shards.clone()))
                .collect()
        };
        assert_eq!(
            shape(&first.placement),
            shape(&again.placement),
            "seed {seed}"
        );
        assert!(again.dropped.is_empty(), "seed {seed}");
    }
}

#[test]
fn a_node_that_loses_its_memory_loses_only_its_replicas() {
    for seed in 0..CASES {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut i = instance(&mut rng, true);
        let c = config(&mut rng);
        let first = plan(&i, &Placement::default(), &c);
        let Some(victim) = first.placement.replicas.first().map(|r| r.shards[0].node) else {
            continue;
        };
        i.topology.nodes[victim.0 as usize].memory_bytes = 0;
        let again = plan(&i, &first.placement, &c);
        check_plan(&i, &again, &c, seed);
        for (r, why) in &again.dropped {
            assert!(
                r.shards.iter().any(|s| s.node == victim),
                "seed {seed}: dropped {r:?}"
            );
            assert_eq!(why, &DropReason::OverMemory { node: victim }, "seed {seed}");
        }
        let kept = first
            .placement
            .replicas
            .iter()
            .filter(|r| r.shards.iter().all(|s| s.node != victim))
            .count();
        let still = again
            .placement
            .replicas
            .iter()
            .filter(|r| r.reasons == [weft_placement::Reason::Kept])
            .count();
        assert_eq!(kept, still, "seed {seed}: untouched replicas must stay");
        let clouds = i
            .topology
            .nodes
            .iter()
            .filter(|n| i.topology.site(n.site).kind == SiteKind::Cloud && n.memory_bytes > 0)
            .count();
        if clouds > 0 {
            assert!(
                again.cost.unserved_per_s < 1e-9,
                "seed {seed}: the cloud can take it all"
            );
        }
    }
}

fn candidates(rng: &mut StdRng) -> Vec<Candidate> {
    (0..rng.random_range(0..40))
        .map(|n| {
            let slots = rng.random_range(1..=32);
            let class = [
                LinkClass::Local,
                LinkClass::EdgeToEdge,
                LinkClass::EdgeToCore,
            ][rng.random_range(0..3)];
            Candidate {
                state: NodeState {
                    node: NodeId(n),
                    holds_model: rng.random_bool(0.6),
                    running: rng.random_range(0..=slots),
                    queued: rng.random_range(0..80),
                    slots,
                    running_tokens: rng.random_range(0.0..5000.0),
                    queued_tokens: rng.random_range(0.0..20_000.0),
                    queued_critical_tokens: rng.random_range(0.0..2000.0),
                    tokens_per_s: rng.random_range(100.0..10_000.0),
                    sequence_tokens_per_s: rng.random_range(10.0..400.0),
                    free_kv_tokens: rng.random_range(0..100_000),
                    report_age_ms: rng.random_range(0.0..8000.0),
                    cost_per_token: rng.random_range(1e-8..1e-7),
                    energy_per_token_j: 0.0,
                },
                link: LinkEstimate {
                    rtt_ms: rng.random_range(0.1..150.0),
                    bandwidth_bytes_per_s: rng.random_range(1e6..1e9),
                    class,
                    cost_per_byte: rng.random_range(0.0..1e-10),
                },
            }
        })
        .collect()
}

#[test]
fn the_router_only_picks_eligible_nodes_with_the_model_and_the_best_utility() {
    let config = RouterConfig::default();
    for seed in 0..CASES * 10 {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut cands = candidates(&mut rng);
        let criticality = [
            Criticality::Critical,
            Criticality::Standard,
            Criticality::Sheddable,
        ][rng.random_range(0..3)];
        let req = RouteRequest {
            model: ModelId(0),
            intent: Intent {
                criticality,
                deadline_ms: rng.random_bool(0.5).then(|| rng.random_range(50..20_000)),
                max_cost: rng.random_bool(0.2).then(|| rng.random_range(1e-6..1e-3)),
            },
            prompt_tokens: rng.random_range(0..4000),
            output_tokens: rng.random_range(1..512),
            compute_per_token: rng.random_range(0.2..5.0),
        };
        let d = route(&req, &cands, &config);
        assert_eq!(
            d.candidates.len(),
            cands.len(),
            "seed {seed}: every candidate is recorded"
        );
        match &d.choice {
            Ok(node) => {
                let c = cands.iter().find(|c| c.state.node == *node).unwrap();
                assert!(
                    c.state.holds_model,
                    "seed {seed}: chose a node without the model"
                );
                let s = d.chosen().unwrap();
                assert!(s.excluded.is_none(), "seed {seed}: chose an excluded node");
                for o in d.candidates.iter().filter(|o| o.excluded.is_none()) {
                    assert!(
                        o.utility <= s.utility,
                        "seed {seed}: a better node was left"
                    );
                }
                assert_eq!(d.utility, s.utility);
            }
            Err(Rejection::NoReplica) => {
                assert!(cands.iter().all(|c| !c.state.holds_model), "seed {seed}");
            }
            Err(_) => {
                assert!(cands.iter().any(|c| c.state.holds_model), "seed {seed}");
            }
        }
        // the choice does not depend on the candidates' order
        cands.shuffle(&mut rng);
        assert_eq!(
            route(&req, &cands, &config).choice,
            d.choice,
            "seed {seed}: order mattered"
        );
    }
}
