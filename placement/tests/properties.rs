//! Properties of the solver and the router over many seeded random
//! instances: never over memory or compute, every replica a whole chain of
//! layers, every demanded model placed when capacity allows, the same input
//! giving the same plan, an unchanged demand moving nothing, and the router
//! never choosing a node that cannot take the request.

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use weft_placement::{
    route, solve, Candidate, Criticality, Decision, Demand, DropReason, Intent, LinkClass,
    LinkDefaults, LinkEstimate, ModelId, ModelSpec, Node, NodeId, NodeState, Placement, Plan,
    Rejection, RouteRequest, RouterConfig, Site, SiteId, SiteKind, SolverConfig, Topology,
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
            min_replicas: 0,
            prefer: None,
            sites: Vec::new(),
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

/// Every node holds no more than its memory.
fn check_memory(i: &Instance, p: &Plan, c: &SolverConfig, seed: u64) {
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
}

/// Every replica is a whole chain of the model's layers on one site, with
/// its reasons.
fn check_chains(i: &Instance, p: &Plan, seed: u64) {
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
}

/// What the allocations put on each node stays within its share of
/// compute, and each demand goes to a replica of its model.
fn check_compute(i: &Instance, p: &Plan, c: &SolverConfig, seed: u64) {
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

/// A plan a fabric can run: within memory and compute, of whole chains.
fn check_plan(i: &Instance, p: &Plan, c: &SolverConfig, seed: u64) {
    check_memory(i, p, c, seed);
    check_chains(i, p, seed);
    check_compute(i, p, c, seed);
}

/// A seeded random instance (with `ample` capacity or not), a solver
/// config, and the plan for it from nothing.
fn first_plan(seed: u64, ample: bool) -> (Instance, SolverConfig, Plan) {
    let mut rng = StdRng::seed_from_u64(seed);
    let i = instance(&mut rng, ample);
    let c = config(&mut rng);
    let p = plan(&i, &Placement::default(), &c);
    (i, c, p)
}

#[test]
fn plans_stay_within_memory() {
    for seed in 0..CASES {
        for ample in [false, true] {
            let (i, c, p) = first_plan(seed, ample);
            check_memory(&i, &p, &c, seed);
        }
    }
}

#[test]
fn plans_stay_within_compute() {
    for seed in 0..CASES {
        for ample in [false, true] {
            let (i, c, p) = first_plan(seed, ample);
            check_compute(&i, &p, &c, seed);
        }
    }
}

#[test]
fn plans_place_whole_chains_of_layers() {
    for seed in 0..CASES {
        for ample in [false, true] {
            let (i, _, p) = first_plan(seed, ample);
            check_chains(&i, &p, seed);
        }
    }
}

#[test]
fn served_plus_unserved_is_all_the_demand() {
    for seed in 0..CASES {
        let (i, _, p) = first_plan(seed, false);
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
fn no_demand_goes_unserved_when_capacity_allows() {
    for seed in 0..CASES {
        let (_, _, p) = first_plan(seed, true);
        assert!(p.cost.unserved_per_s < 1e-9, "seed {seed}: {:?}", p.cost);
    }
}

#[test]
fn every_demanded_model_is_placed_when_capacity_allows() {
    for seed in 0..CASES {
        let (i, _, p) = first_plan(seed, true);
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
fn the_same_input_gives_the_same_plan() {
    for seed in 0..CASES {
        let (i, c, a) = first_plan(seed, false);
        assert_eq!(a, plan(&i, &Placement::default(), &c), "seed {seed}");
    }
}

/// The plan for a seeded random instance, and the plan for the same
/// instance with its demand shuffled.
fn plans_in_two_demand_orders(seed: u64) -> (Plan, Plan) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut i = instance(&mut rng, false);
    let c = config(&mut rng);
    let a = plan(&i, &Placement::default(), &c);
    i.demand.shuffle(&mut rng);
    let b = plan(&i, &Placement::default(), &c);
    (a, b)
}

#[test]
fn the_demand_order_does_not_change_the_placement() {
    for seed in 0..CASES {
        let (a, b) = plans_in_two_demand_orders(seed);
        assert_eq!(
            a.placement, b.placement,
            "seed {seed}: order changed the placement"
        );
    }
}

#[test]
fn the_demand_order_does_not_change_the_bytes_moved() {
    for seed in 0..CASES {
        let (a, b) = plans_in_two_demand_orders(seed);
        assert_eq!(a.cost.moved_bytes, b.cost.moved_bytes, "seed {seed}");
    }
}

/// A seeded random instance, its solver config, its plan from nothing,
/// and the plan again from that plan.
fn planned_twice(seed: u64) -> (Instance, SolverConfig, Plan, Plan) {
    let (i, c, first) = first_plan(seed, false);
    let again = plan(&i, &first.placement, &c);
    (i, c, first, again)
}

#[test]
fn a_replan_for_an_unchanged_demand_stays_runnable() {
    for seed in 0..CASES {
        let (i, c, _, again) = planned_twice(seed);
        check_plan(&i, &again, &c, seed);
    }
}

#[test]
fn an_unchanged_demand_moves_nothing() {
    for seed in 0..CASES {
        let (_, _, first, again) = planned_twice(seed);
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
fn an_unchanged_demand_costs_no_bytes_moved() {
    for seed in 0..CASES {
        let (_, _, _, again) = planned_twice(seed);
        assert_eq!(again.cost.moved_bytes, 0, "seed {seed}: {:?}", again.cost);
    }
}

/// A seeded instance with ample capacity, planned from nothing, then
/// planned again after the node of its first replica's first shard lost
/// all its memory: the instance after, its solver config, the first plan,
/// the victim and the plan after. `None` where the first plan placed
/// nothing.
struct LostMemory {
    i: Instance,
    c: SolverConfig,
    first: Plan,
    victim: NodeId,
    again: Plan,
}

fn after_a_node_loses_its_memory(seed: u64) -> Option<LostMemory> {
    let (mut i, c, first) = first_plan(seed, true);
    let victim = first.placement.replicas.first().map(|r| r.shards[0].node)?;
    i.topology.nodes[victim.0 as usize].memory_bytes = 0;
    let again = plan(&i, &first.placement, &c);
    Some(LostMemory {
        i,
        c,
        first,
        victim,
        again,
    })
}

#[test]
fn a_replan_after_a_node_loses_its_memory_stays_runnable() {
    for seed in 0..CASES {
        let Some(l) = after_a_node_loses_its_memory(seed) else {
            continue;
        };
        check_plan(&l.i, &l.again, &l.c, seed);
    }
}

#[test]
fn a_node_that_loses_its_memory_loses_only_its_replicas() {
    for seed in 0..CASES {
        let Some(l) = after_a_node_loses_its_memory(seed) else {
            continue;
        };
        for (r, _) in &l.again.dropped {
            assert!(
                r.shards.iter().any(|s| s.node == l.victim),
                "seed {seed}: dropped {r:?}"
            );
        }
    }
}

#[test]
fn replicas_dropped_with_a_nodes_memory_say_it_is_over_memory() {
    for seed in 0..CASES {
        let Some(l) = after_a_node_loses_its_memory(seed) else {
            continue;
        };
        for (_, why) in &l.again.dropped {
            assert_eq!(
                why,
                &DropReason::OverMemory { node: l.victim },
                "seed {seed}"
            );
        }
    }
}

#[test]
fn replicas_off_a_node_that_loses_its_memory_stay() {
    for seed in 0..CASES {
        let Some(l) = after_a_node_loses_its_memory(seed) else {
            continue;
        };
        let kept = l
            .first
            .placement
            .replicas
            .iter()
            .filter(|r| r.shards.iter().all(|s| s.node != l.victim))
            .count();
        let still = l
            .again
            .placement
            .replicas
            .iter()
            .filter(|r| r.reasons == [weft_placement::Reason::Kept])
            .count();
        assert_eq!(kept, still, "seed {seed}: untouched replicas must stay");
    }
}

#[test]
fn the_cloud_takes_the_demand_of_a_node_that_loses_its_memory() {
    for seed in 0..CASES {
        let Some(l) = after_a_node_loses_its_memory(seed) else {
            continue;
        };
        let i = &l.i;
        let clouds = i
            .topology
            .nodes
            .iter()
            .filter(|n| i.topology.site(n.site).kind == SiteKind::Cloud && n.memory_bytes > 0)
            .count();
        if clouds > 0 {
            assert!(
                l.again.cost.unserved_per_s < 1e-9,
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
                    cached_prompt_tokens: 0.0,
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

/// A seeded random routing case: the candidates, the request, the
/// router's decision over them, and the generator to go on with.
struct Routing {
    cands: Vec<Candidate>,
    req: RouteRequest,
    d: Decision,
    rng: StdRng,
}

/// Routing cases are cheap: ten times as many as solver instances.
const ROUTING_CASES: u64 = CASES * 10;

fn routing(seed: u64) -> Routing {
    let mut rng = StdRng::seed_from_u64(seed);
    let cands = candidates(&mut rng);
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
    let d = route(&req, &cands, &RouterConfig::default());
    Routing { cands, req, d, rng }
}

#[test]
fn the_router_records_every_candidate() {
    for seed in 0..ROUTING_CASES {
        let r = routing(seed);
        assert_eq!(
            r.d.candidates.len(),
            r.cands.len(),
            "seed {seed}: every candidate is recorded"
        );
    }
}

#[test]
fn the_router_only_picks_a_node_with_the_model() {
    for seed in 0..ROUTING_CASES {
        let r = routing(seed);
        if let Ok(node) = &r.d.choice {
            let c = r.cands.iter().find(|c| c.state.node == *node).unwrap();
            assert!(
                c.state.holds_model,
                "seed {seed}: chose a node without the model"
            );
        }
    }
}

#[test]
fn the_router_never_picks_an_excluded_node() {
    for seed in 0..ROUTING_CASES {
        let r = routing(seed);
        if r.d.choice.is_ok() {
            let s = r.d.chosen().unwrap();
            assert!(s.excluded.is_none(), "seed {seed}: chose an excluded node");
        }
    }
}

#[test]
fn the_router_picks_the_best_utility_of_the_eligible_nodes() {
    for seed in 0..ROUTING_CASES {
        let r = routing(seed);
        if r.d.choice.is_ok() {
            let s = r.d.chosen().unwrap();
            for o in r.d.candidates.iter().filter(|o| o.excluded.is_none()) {
                assert!(
                    o.utility <= s.utility,
                    "seed {seed}: a better node was left"
                );
            }
        }
    }
}

#[test]
fn the_routers_decision_carries_the_chosen_nodes_utility() {
    for seed in 0..ROUTING_CASES {
        let r = routing(seed);
        if r.d.choice.is_ok() {
            assert_eq!(r.d.utility, r.d.chosen().unwrap().utility, "seed {seed}");
        }
    }
}

#[test]
fn the_router_finds_no_replica_only_where_no_node_holds_the_model() {
    for seed in 0..ROUTING_CASES {
        let r = routing(seed);
        if let Err(Rejection::NoReplica) = &r.d.choice {
            assert!(r.cands.iter().all(|c| !c.state.holds_model), "seed {seed}");
        }
    }
}

#[test]
fn the_router_refuses_for_other_reasons_only_where_some_node_holds_the_model() {
    for seed in 0..ROUTING_CASES {
        let r = routing(seed);
        if matches!(&r.d.choice, Err(e) if !matches!(e, Rejection::NoReplica)) {
            assert!(r.cands.iter().any(|c| c.state.holds_model), "seed {seed}");
        }
    }
}

#[test]
fn the_routers_choice_does_not_depend_on_the_candidates_order() {
    for seed in 0..ROUTING_CASES {
        let Routing {
            mut cands,
            req,
            d,
            mut rng,
        } = routing(seed);
        cands.shuffle(&mut rng);
        assert_eq!(
            route(&req, &cands, &RouterConfig::default()).choice,
            d.choice,
            "seed {seed}: order mattered"
        );
    }
}
