//! Replica floors (`ModelSpec::min_replicas`, a WeftModel's replicas): a
//! model keeps at least that many replicas placed whatever the demand,
//! spread over sites, edge first; a lower floor lets replicas without
//! demand go; a floor beyond capacity places what fits.

use weft_placement::{
    solve, Demand, LinkDefaults, ModelId, ModelSpec, Node, Placement, Reason, Site, SiteId,
    SiteKind, SolverConfig, Topology,
};

const GIB: u64 = 1 << 30;

/// Two edge sites and a cloud site, each with one node of `gib` GiB.
fn fabric(gib: u64) -> Topology {
    let sites = vec![
        Site {
            kind: SiteKind::Cloud,
            region: 0,
        },
        Site {
            kind: SiteKind::Edge,
            region: 0,
        },
        Site {
            kind: SiteKind::Edge,
            region: 0,
        },
    ];
    let nodes = (0..3)
        .map(|s| Node {
            site: SiteId(s),
            memory_bytes: gib * GIB,
            tokens_per_s: 1000.0,
            slots: 8,
            accelerator: false,
            cost_per_token: 1e-8,
        })
        .collect();
    Topology::new(sites, nodes, LinkDefaults::default()).unwrap()
}

fn model(floor: u32) -> ModelSpec {
    ModelSpec {
        name: "m".into(),
        layers: 8,
        bytes_per_layer: 32 << 20,
        shared_bytes: 64 << 20,
        compute_per_token: 1.0,
        kv_bytes_per_token: 1024,
        hidden_bytes_per_token: 0,
        min_replicas: floor,
        prefer: None,
        sites: Vec::new(),
    }
}

fn count(p: &Placement) -> usize {
    p.replicas.iter().filter(|r| r.model == ModelId(0)).count()
}

#[test]
fn a_model_with_a_floor_is_placed_without_any_demand() {
    let plan = solve(
        &fabric(4),
        &[model(2)],
        &[],
        &Placement::default(),
        &SolverConfig::default(),
    )
    .unwrap();
    assert_eq!(count(&plan.placement), 2);
    assert!(plan
        .placement
        .replicas
        .iter()
        .all(|r| r.reasons.contains(&Reason::MinReplicas { min_replicas: 2 })));
}

#[test]
fn a_floor_spreads_its_replicas_over_sites_edge_first() {
    let plan = solve(
        &fabric(4),
        &[model(2)],
        &[],
        &Placement::default(),
        &SolverConfig::default(),
    )
    .unwrap();
    let mut sites: Vec<u32> = plan.placement.replicas.iter().map(|r| r.site.0).collect();
    sites.sort_unstable();
    assert_eq!(sites, [1, 2], "two edge sites, one replica each");
}

#[test]
fn a_model_without_a_floor_or_demand_is_not_placed() {
    let plan = solve(
        &fabric(4),
        &[model(0)],
        &[],
        &Placement::default(),
        &SolverConfig::default(),
    )
    .unwrap();
    assert_eq!(count(&plan.placement), 0);
}

#[test]
fn replicas_over_a_lowered_floor_go_when_nothing_asks_for_them() {
    let t = fabric(4);
    let c = SolverConfig::default();
    let three = solve(&t, &[model(3)], &[], &Placement::default(), &c).unwrap();
    assert_eq!(count(&three.placement), 3);
    let one = solve(&t, &[model(1)], &[], &three.placement, &c).unwrap();
    assert_eq!(count(&one.placement), 1);
    assert_eq!(
        one.placement.replicas[0].reasons,
        [Reason::Kept],
        "the kept one moved"
    );
}

#[test]
fn a_floor_already_met_moves_nothing() {
    let t = fabric(4);
    let c = SolverConfig::default();
    let first = solve(&t, &[model(2)], &[], &Placement::default(), &c).unwrap();
    let again = solve(&t, &[model(2)], &[], &first.placement, &c).unwrap();
    assert_eq!(again.cost.moved_bytes, 0);
    assert!(again
        .placement
        .replicas
        .iter()
        .all(|r| r.reasons == [Reason::Kept]));
}

#[test]
fn a_floor_beyond_capacity_places_what_fits() {
    // a node of 1 GiB holds one replica of this one, and no more
    let big = ModelSpec {
        bytes_per_layer: 80 << 20,
        ..model(5)
    };
    let plan = solve(
        &fabric(1),
        &[big],
        &[],
        &Placement::default(),
        &SolverConfig::default(),
    )
    .unwrap();
    assert_eq!(count(&plan.placement), 3);
}

#[test]
fn a_floor_never_places_fewer_replicas_than_demand_alone() {
    let t = fabric(4);
    let demand: Vec<Demand> = (0..3)
        .map(|s| Demand {
            site: SiteId(s),
            model: ModelId(0),
            requests_per_s: 50.0,
            prompt_tokens: 200.0,
            output_tokens: 32.0,
            deadline_ms: None,
        })
        .collect();
    let c = SolverConfig::default();
    let by_demand = solve(&t, &[model(0)], &demand, &Placement::default(), &c).unwrap();
    let with_floor = solve(&t, &[model(1)], &demand, &Placement::default(), &c).unwrap();
    assert!(count(&by_demand.placement) >= 1);
    assert!(count(&with_floor.placement) >= count(&by_demand.placement));
}

#[test]
fn a_floor_goes_only_to_the_sites_its_model_names() {
    let m = ModelSpec {
        sites: vec![SiteId(2)],
        ..model(2)
    };
    let plan = solve(
        &fabric(4),
        &[m],
        &[],
        &Placement::default(),
        &SolverConfig::default(),
    )
    .unwrap();
    assert!(count(&plan.placement) >= 1);
    assert!(
        plan.placement.replicas.iter().all(|r| r.site == SiteId(2)),
        "{:?}",
        plan.placement
    );
}

#[test]
fn a_model_preferring_the_cloud_puts_its_floor_there_first() {
    let m = ModelSpec {
        prefer: Some(SiteKind::Cloud),
        ..model(1)
    };
    let plan = solve(
        &fabric(4),
        &[m],
        &[],
        &Placement::default(),
        &SolverConfig::default(),
    )
    .unwrap();
    assert_eq!(plan.placement.replicas.len(), 1);
    assert_eq!(
        plan.placement.replicas[0].site,
        SiteId(0),
        "site 0 is the cloud"
    );
}
