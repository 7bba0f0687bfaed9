//! A deterministic harness for the coordinator group: members on a simulated
//! network with virtual time, random faults (dropped and delayed messages,
//! partitions, isolated members, crashes and restarts from disk, members
//! added and removed), and a leader that keeps committing placement epochs.
//! After every tick it checks: at most one leader per term; no committed
//! epoch lost or changed; no member over memory in any committed plan. After
//! the faults heal, every member of the group must reach the latest epoch.
//!
//! `WEFT_SEEDS=N` runs N seeds (default 1,000); `WEFT_SEED=S` runs one.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use raft::eraftpb::{Message, MessageType};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use weft_coordinator::{
    Applied, Command, Coordinator, CoordinatorConfig, MemDisk, Member, ModelRecord, PlacementEpoch,
};
use weft_placement::{Demand, ModelSpec, SiteKind, SolverConfig};

const GIB: u64 = 1 << 30;

/// Faults and proposals happen during this many ticks...
const FAULT_TICKS: u64 = 400;
/// ...then everything heals and every member must catch up within this many.
const HEAL_TICKS: u64 = 600;

struct Net {
    /// (deliver at tick, sequence, message)
    inflight: Vec<(u64, u64, Message)>,
    seq: u64,
    drop: f64,
    max_delay: u64,
    /// Pairs that cannot talk (both directions).
    cut: BTreeSet<(u64, u64)>,
}

impl Net {
    fn blocked(&self, a: u64, b: u64) -> bool {
        self.cut.contains(&(a.min(b), a.max(b)))
    }
}

struct Cluster {
    rng: StdRng,
    seed: u64,
    members: BTreeMap<u64, Option<Coordinator>>,
    disks: BTreeMap<u64, MemDisk>,
    founders: Vec<u64>,
    net: Net,
    now: u64,
    /// term -> leader seen in it
    leaders: HashMap<u64, u64>,
    /// epoch -> the committed epoch as first applied anywhere, with its
    /// log index
    epochs: BTreeMap<u64, (u64, PlacementEpoch)>,
    models: Vec<ModelRecord>,
    fabric: Vec<Member>,
    stats: Stats,
}

/// What a run went through, to show the faults really happened.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
struct Stats {
    epochs: u64,
    terms: u64,
    snapshots_installed: u64,
    crashes: u64,
    restarts: u64,
    voters_added: u64,
    voters_removed: u64,
    partitions: u64,
    lost_messages: u64,
}

impl std::ops::AddAssign for Stats {
    fn add_assign(&mut self, o: Self) {
        self.epochs += o.epochs;
        self.terms += o.terms;
        self.snapshots_installed += o.snapshots_installed;
        self.crashes += o.crashes;
        self.restarts += o.restarts;
        self.voters_added += o.voters_added;
        self.voters_removed += o.voters_removed;
        self.partitions += o.partitions;
        self.lost_messages += o.lost_messages;
    }
}

fn fabric() -> (Vec<Member>, Vec<ModelRecord>) {
    let member = |id: u64, site: &str, kind, mem| Member {
        id,
        name: format!("node-{id}"),
        site: site.into(),
        kind,
        region: 0,
        memory_bytes: mem,
        tokens_per_s: 2000.0,
        slots: 8,
        accelerator: true,
        cost_per_token: 1e-8,
        address: format!("10.0.0.{id}:7000"),
    };
    let model = |name: &str, layers, mb: u64| ModelRecord {
        chunk_bytes: 0,
        chunk_sha256: Vec::new(),
        sites: Vec::new(),
        source: format!("hf:example/{name}.gguf"),
        sha256: "00".repeat(32),
        spec: ModelSpec {
            name: name.into(),
            layers,
            bytes_per_layer: mb << 20,
            shared_bytes: 64 << 20,
            compute_per_token: 1.0,
            kv_bytes_per_token: 0,
            hidden_bytes_per_token: 0,
            min_replicas: 0,
            prefer: None,
            sites: Vec::new(),
        },
    };
    (
        vec![
            member(101, "edge-a", SiteKind::Edge, 4 * GIB),
            member(102, "edge-a", SiteKind::Edge, 4 * GIB),
            member(103, "edge-b", SiteKind::Edge, 2 * GIB),
            member(104, "cloud", SiteKind::Cloud, 40 * GIB),
        ],
        vec![model("small", 18, 12), model("medium", 34, 70)],
    )
}

impl Cluster {
    fn new(seed: u64, voters: usize) -> Self {
        let (fabric, models) = fabric();
        let mut c = Self {
            net: Net {
                inflight: Vec::new(),
                seq: 0,
                drop: 0.0,
                max_delay: 1,
                cut: BTreeSet::new(),
            },
            rng: StdRng::seed_from_u64(seed),
            seed,
            members: BTreeMap::new(),
            disks: BTreeMap::new(),
            founders: (1..=voters as u64).collect(),
            now: 0,
            leaders: HashMap::new(),
            epochs: BTreeMap::new(),
            models,
            fabric,
            stats: Stats::default(),
        };
        for id in c.founders.clone() {
            let founders = c.founders.clone();
            c.open(id, &founders);
        }
        c
    }

    fn open(&mut self, id: u64, voters: &[u64]) {
        let disk = self.disks.entry(id).or_default().clone();
        let c = Coordinator::open(
            CoordinatorConfig {
                snapshot_every: self.rng.random_range(5..40),
                ..CoordinatorConfig::new(id)
            },
            Box::new(disk),
            voters,
            self.seed ^ self.now.wrapping_mul(0x9e37),
        )
        .unwrap_or_else(|e| panic!("seed {}: opening {id}: {e}", self.seed));
        self.members.insert(id, Some(c));
    }

    /// A message was lost: the sender's transport tells raft, as a real one
    /// would (a lost snapshot otherwise pauses that peer for good).
    fn lost(&mut self, m: &Message) {
        self.stats.lost_messages += 1;
        if let Some(Some(c)) = self.members.get_mut(&m.from) {
            if m.get_msg_type() == MessageType::MsgSnapshot {
                c.report_snapshot(m.to, false);
            } else {
                c.report_unreachable(m.to);
            }
        }
    }

    fn send(&mut self, msgs: Vec<Message>) {
        for m in msgs {
            if self.rng.random_bool(self.net.drop) || self.net.blocked(m.from, m.to) {
                self.lost(&m);
                continue;
            }
            let at = self.now + self.rng.random_range(0..=self.net.max_delay);
            self.net.seq += 1;
            self.net.inflight.push((at, self.net.seq, m));
        }
    }

    fn process(&mut self, id: u64) {
        let Some(Some(c)) = self.members.get_mut(&id) else {
            return;
        };
        let out = c
            .process()
            .unwrap_or_else(|e| panic!("seed {}: member {id}: {e}", self.seed));
        if out.installed_snapshot.is_some() {
            self.stats.snapshots_installed += 1;
        }
        if std::env::var("WEFT_TRACE").is_ok_and(|t| t == id.to_string() || t == "all") {
            if let Some(i) = out.installed_snapshot {
                eprintln!("t{} member {id}: snapshot at {i}", self.now);
            }
            for a in &out.applied {
                let what = match &a.command {
                    Some(Command::CommitPlacement(p)) => format!("epoch {}", p.epoch),
                    Some(c) => format!("{:?}", std::mem::discriminant(c)),
                    None => "-".into(),
                };
                eprintln!(
                    "t{} member {id}: applied {} ({what}) {:?}",
                    self.now, a.index, a.result
                );
            }
        }
        for a in &out.applied {
            if let (Some(Command::CommitPlacement(p)), Applied::Done) = (&a.command, &a.result) {
                self.check_epoch(id, a.index, p);
            }
        }
        self.send(out.messages);
    }

    fn check_epoch(&mut self, id: u64, index: u64, p: &PlacementEpoch) {
        let seed = self.seed;
        match self.epochs.get(&p.epoch) {
            Some((at, first)) => assert!(
                *at == index && first == p,
                "seed {seed}: epoch {} was committed at index {at}, member {id} applied another at {index}",
                p.epoch
            ),
            None => {
                self.epochs.insert(p.epoch, (index, p.clone()));
                self.stats.epochs += 1;
            }
        }
        // the plan keeps every member within its memory
        let mut used: BTreeMap<u64, u64> = BTreeMap::new();
        for r in &p.placement.replicas {
            let name = &p.models[r.model.0 as usize];
            let model = &self
                .models
                .iter()
                .find(|m| &m.spec.name == name)
                .unwrap()
                .spec;
            for s in &r.shards {
                *used.entry(p.members[s.node.0 as usize]).or_default() +=
                    model.shard_bytes(s.layers.end - s.layers.start);
            }
        }
        for (m, u) in used {
            let cap = self.fabric.iter().find(|f| f.id == m).unwrap().memory_bytes;
            assert!(
                u <= cap,
                "seed {seed}: epoch {} puts {u} bytes on member {m} ({cap})",
                p.epoch
            );
        }
    }

    fn tick(&mut self) {
        self.now += 1;
        let ids: Vec<u64> = self.members.keys().copied().collect();
        for &id in &ids {
            if let Some(Some(c)) = self.members.get_mut(&id) {
                c.tick();
            }
            self.process(id);
        }
        // deliver in (time, send order); messages sent while delivering may
        // arrive within the same tick when their delay is 0
        loop {
            let now = self.now;
            let mut due: Vec<(u64, u64, Message)> = Vec::new();
            self.net.inflight.retain(|x| {
                if x.0 <= now {
                    due.push(x.clone());
                    false
                } else {
                    true
                }
            });
            if due.is_empty() {
                break;
            }
            due.sort_by_key(|x| (x.0, x.1));
            for (_, _, m) in due {
                let (from, to) = (m.from, m.to);
                let snapshot = m.get_msg_type() == MessageType::MsgSnapshot;
                let alive = matches!(self.members.get(&to), Some(Some(_)));
                if self.net.blocked(from, to) || !alive {
                    self.lost(&m);
                    self.process(from);
                    continue;
                }
                if let Some(Some(c)) = self.members.get_mut(&to) {
                    c.step(m)
                        .unwrap_or_else(|e| panic!("seed {}: step: {e}", self.seed));
                }
                if snapshot {
                    if let Some(Some(c)) = self.members.get_mut(&from) {
                        c.report_snapshot(to, true);
                    }
                    self.process(from);
                }
                self.process(to);
            }
        }
        self.check_leaders();
    }

    fn check_leaders(&mut self) {
        if std::env::var("WEFT_TRACE").is_ok_and(|t| t == "all") {
            let v: Vec<String> = self
                .members
                .iter()
                .map(|(id, c)| match c {
                    Some(c) => format!(
                        "{id}:t{}{}c{}v{:?}",
                        c.term(),
                        if c.is_leader() { "L" } else { "" },
                        c.commit_index(),
                        c.voters()
                    ),
                    None => format!("{id}:down"),
                })
                .collect();
            eprintln!("t{} {} cut {:?}", self.now, v.join(" "), self.net.cut);
        }
        for c in self.members.values().flatten() {
            if c.is_leader() {
                match self.leaders.insert(c.term(), c.id()) {
                    Some(p) => assert_eq!(
                        p,
                        c.id(),
                        "seed {}: two leaders in term {}",
                        self.seed,
                        c.term()
                    ),
                    None => self.stats.terms += 1,
                }
            }
        }
    }

    fn leader(&mut self) -> Option<&mut Coordinator> {
        self.members.values_mut().flatten().find(|c| c.is_leader())
    }

    /// The leader proposes: first the fabric, then new epochs as demand moves.
    fn propose_work(&mut self) {
        let demand_rps = self.rng.random_range(1.0..50.0);
        let (fabric, models) = (self.fabric.clone(), self.models.clone());
        let Some(l) = self.leader() else { return };
        let state = l.state().clone();
        let mut cmds = Vec::new();
        for m in &fabric {
            if !state.members.contains_key(&m.id) {
                cmds.push(Command::PutMember(m.clone()));
            }
        }
        for m in &models {
            if !state.models.contains_key(&m.spec.name) {
                cmds.push(Command::PutModel(m.clone()));
            }
        }
        if cmds.is_empty() && state.needs_replan(demand_rps, 0.2) {
            let demand = vec![
                ("edge-a".to_string(), "small".to_string(), d(demand_rps)),
                (
                    "edge-b".to_string(),
                    "medium".to_string(),
                    d(demand_rps / 3.0),
                ),
            ];
            cmds.push(Command::CommitPlacement(
                state.plan_next(&demand, &SolverConfig::default()),
            ));
        }
        for c in cmds {
            let _ = l.propose(&c);
        }
    }

    fn live(&self) -> Vec<u64> {
        self.members
            .iter()
            .filter(|(_, c)| c.is_some())
            .map(|(&i, _)| i)
            .collect()
    }

    fn dead(&self) -> Vec<u64> {
        self.members
            .iter()
            .filter(|(_, c)| c.is_none())
            .map(|(&i, _)| i)
            .collect()
    }

    fn fault(&mut self) {
        let ids: Vec<u64> = self.members.keys().copied().collect();
        match self.rng.random_range(0..10) {
            0 => {
                // partition into two random groups
                self.stats.partitions += 1;
                self.net.cut.clear();
                let side: Vec<bool> = ids.iter().map(|_| self.rng.random_bool(0.5)).collect();
                for (i, &a) in ids.iter().enumerate() {
                    for (j, &b) in ids.iter().enumerate() {
                        if a < b && side[i] != side[j] {
                            self.net.cut.insert((a, b));
                        }
                    }
                }
            }
            1 => {
                // isolate one member
                self.stats.partitions += 1;
                self.net.cut.clear();
                let x = ids[self.rng.random_range(0..ids.len())];
                for &b in &ids {
                    if b != x {
                        self.net.cut.insert((x.min(b), x.max(b)));
                    }
                }
            }
            2 => self.net.cut.clear(),
            3 => self.net.drop = [0.0, 0.05, 0.2][self.rng.random_range(0..3)],
            4 => self.net.max_delay = self.rng.random_range(0..4),
            5 | 6 => {
                // crash a live member (its disk stays)
                let live = self.live();
                if live.len() > 1 {
                    let x = live[self.rng.random_range(0..live.len())];
                    self.members.insert(x, None);
                    self.stats.crashes += 1;
                }
            }
            7 => {
                // restart a crashed member from its disk
                let dead = self.dead();
                if !dead.is_empty() {
                    let x = dead[self.rng.random_range(0..dead.len())];
                    let founders = self.founders.clone();
                    self.open(x, &founders);
                    self.stats.restarts += 1;
                }
            }
            8 => {
                // add a new voter; it starts empty and the leader catches it up
                let next = self.members.keys().max().copied().unwrap_or(0) + 1;
                if next <= 7 {
                    let added = self.leader().map(|l| l.change_voter(next, true).is_ok());
                    if added == Some(true) {
                        self.open(next, &[]);
                        self.stats.voters_added += 1;
                    }
                }
            }
            _ => {
                // remove a voter other than the leader, keeping at least three
                let Some((lid, voters)) = self.leader().map(|l| (l.id(), l.voters())) else {
                    return;
                };
                if voters.len() > 3 {
                    let x = *voters.iter().rev().find(|&&v| v != lid).unwrap();
                    if self.leader().unwrap().change_voter(x, false).is_ok() {
                        self.stats.voters_removed += 1;
                    }
                }
            }
        }
    }

    fn heal(&mut self) {
        self.net.cut.clear();
        self.net.drop = 0.0;
        self.net.max_delay = 1;
        let founders = self.founders.clone();
        for x in self.dead() {
            self.open(x, &founders);
        }
    }
}

fn d(rps: f64) -> Demand {
    Demand {
        site: weft_placement::SiteId(0),
        model: weft_placement::ModelId(0),
        requests_per_s: rps,
        prompt_tokens: 500.0,
        output_tokens: 64.0,
        deadline_ms: None,
    }
}

/// Runs one seed; returns what it went through. Every member of the group
/// reached the latest epoch after healing.
fn run(seed: u64) -> Stats {
    let voters = if seed.is_multiple_of(2) { 3 } else { 5 };
    let mut c = Cluster::new(seed, voters);
    for t in 0..FAULT_TICKS {
        if t % 7 == 0 {
            c.propose_work();
        }
        if t > 30 && c.rng.random_bool(0.03) {
            c.fault();
        }
        c.tick();
    }
    c.heal();
    for t in 0..HEAL_TICKS {
        if t % 7 == 0 && t < HEAL_TICKS / 2 {
            c.propose_work();
        }
        c.tick();
        if t < HEAL_TICKS / 2 {
            continue;
        }
        let latest = c.epochs.keys().max().copied().unwrap_or(0);
        let group: BTreeSet<u64> = c
            .leader()
            .map(|l| l.voters().into_iter().collect())
            .unwrap_or_default();
        let caught_up = c
            .members
            .iter()
            .filter(|(id, _)| group.contains(id))
            .all(|(_, m)| m.as_ref().is_some_and(|m| m.state().epoch() == latest));
        if !group.is_empty() && latest > 0 && caught_up {
            return c.stats;
        }
    }
    let epochs: Vec<(u64, u64, bool)> = c
        .members
        .values()
        .flatten()
        .map(|m| (m.id(), m.state().epoch(), m.is_leader()))
        .collect();
    panic!(
        "seed {seed}: the group did not reach the latest epoch {:?} after healing: {epochs:?}",
        c.epochs.keys().max()
    )
}

#[test]
fn a_thousand_seeds_of_faults_keep_the_invariants() {
    let seeds: Vec<u64> = match std::env::var("WEFT_SEED") {
        Ok(s) => vec![s.parse().expect("WEFT_SEED is a number")],
        Err(_) => {
            let n = std::env::var("WEFT_SEEDS")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(1000);
            (0..n).collect()
        }
    };
    let mut total = Stats::default();
    for &seed in &seeds {
        total += run(seed);
    }
    eprintln!("{} seeds: {total:?}", seeds.len());
    // the workload committed placements and the faults really happened
    let n = seeds.len() as u64;
    assert!(total.epochs >= 2 * n, "{total:?}");
    if n >= 100 {
        for (what, v) in [
            ("new terms", total.terms),
            ("snapshots installed", total.snapshots_installed),
            ("crashes", total.crashes),
            ("restarts", total.restarts),
            ("voters added", total.voters_added),
            ("voters removed", total.voters_removed),
            ("partitions", total.partitions),
            ("lost messages", total.lost_messages),
        ] {
            assert!(v >= n / 10, "only {v} {what} over {n} seeds: {total:?}");
        }
    }
}

#[test]
fn the_same_seed_runs_the_same_way() {
    assert_eq!(run(4242), run(4242));
}
