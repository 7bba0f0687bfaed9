//! The replicated state machine: members, models, placement epochs and
//! revoked credentials. Every replica applies the same committed commands in
//! the same order and reaches the same state; a command that does not fit
//! the state (a stale epoch, a plan over a member's memory) is refused the
//! same way everywhere.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde::{Deserialize, Serialize};
use weft_placement::{
    solve, Demand, LinkDefaults, ModelSpec, Node, NodeId, Placement, PlanCost, Site, SiteId,
    SiteKind, SolverConfig, Topology,
};

use crate::error::{CoordinatorError, Result};

/// A node of the fabric as the coordinators know it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Member {
    /// Its id (unique in the cluster, never 0).
    pub id: u64,
    /// Its name, for people.
    pub name: String,
    /// The site it is at.
    pub site: String,
    /// Edge or cloud.
    pub kind: SiteKind,
    /// The region of its site.
    pub region: u32,
    /// Bytes it offers for weights and KV cache.
    pub memory_bytes: u64,
    /// Aggregate tokens/s at full batch.
    pub tokens_per_s: f64,
    /// Sequences it batches.
    pub slots: u32,
    /// Whether it has an accelerator.
    pub accelerator: bool,
    /// Price per token.
    pub cost_per_token: f64,
    /// Where peers reach it.
    pub address: String,
}

/// A model the fabric serves.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelRecord {
    /// Its source (`default`, a PyPI package, `hf:` name or path).
    pub source: String,
    /// sha256 of the GGUF file.
    pub sha256: String,
    /// Its shape for placement (its `name` is the model's name).
    pub spec: ModelSpec,
    /// Size of the chunks peers send each other the file in (the last
    /// one may be shorter); 0 when the record has no chunk list.
    #[serde(default)]
    pub chunk_bytes: u64,
    /// sha256 of each chunk, in order: a node fetching the file from peers
    /// checks every chunk as it arrives.
    #[serde(default)]
    pub chunk_sha256: Vec<String>,
}

/// Where a coordinator added at run time can be reached (founders are in
/// every member's configuration).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CoordinatorRecord {
    /// Its raft id.
    pub id: u64,
    /// Its node name.
    pub name: String,
    /// Its cluster address.
    pub addr: String,
}

/// One committed placement.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlacementEpoch {
    /// 1, 2, 3, ... in commit order.
    pub epoch: u64,
    /// Member ids in the order the placement's `NodeId`s index.
    pub members: Vec<u64>,
    /// Model names in the order the placement's `ModelId`s index.
    pub models: Vec<String>,
    /// Where every model runs.
    pub placement: Placement,
    /// The objective's terms when it was planned.
    pub cost: PlanCost,
    /// Aggregate demand (requests/s) it was planned for.
    pub demand_rps: f64,
    /// The demand it was planned for, by (site, model) name: a new leader
    /// re-plans from it until fresher load reports arrive.
    #[serde(default)]
    pub demand: Vec<(String, String, Demand)>,
    /// Round trips measured between sites that it was planned with (the
    /// rest used the link-class defaults).
    #[serde(default)]
    pub links: Vec<SiteLink>,
}

/// A round trip measured between two sites (by name).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SiteLink {
    /// One site.
    pub a: String,
    /// The other.
    pub b: String,
    /// Round trip (ms).
    pub rtt_ms: f64,
}

/// A change to the control state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Command {
    /// Adds a member or updates it.
    PutMember(Member),
    /// Removes a member.
    RemoveMember {
        /// Its id.
        id: u64,
    },
    /// Adds a model or updates it.
    PutModel(ModelRecord),
    /// Removes a model.
    RemoveModel {
        /// Its name.
        name: String,
    },
    /// Commits a new placement epoch.
    CommitPlacement(PlacementEpoch),
    /// Revokes a credential (by fingerprint): its holder is refused from now on.
    Revoke {
        /// The credential's fingerprint.
        fingerprint: String,
    },
}

impl Command {
    /// The command as a log entry's bytes.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("commands always serialize")
    }

    /// A command from a log entry's bytes.
    pub fn decode(b: &[u8]) -> Result<Self> {
        serde_json::from_slice(b).map_err(|e| CoordinatorError::Codec {
            what: "command",
            why: e.to_string(),
        })
    }
}

/// What applying a command did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Applied {
    /// The state changed.
    Done,
    /// The command was refused, the same way on every replica.
    Refused(String),
}

/// The control state every coordinator holds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ControlState {
    /// Members by id.
    pub members: BTreeMap<u64, Member>,
    /// Models by name.
    pub models: BTreeMap<String, ModelRecord>,
    /// The latest committed placement, if any.
    pub placement: Option<PlacementEpoch>,
    /// Revoked credential fingerprints.
    pub revoked: BTreeSet<String>,
    /// Index of the last log entry applied.
    pub applied_index: u64,
    /// The latest committed epochs, oldest first (at most
    /// [`EPOCH_HISTORY`]): epoch number and the log index it committed at.
    #[serde(default)]
    pub history: VecDeque<(u64, u64)>,
    /// Coordinators added at run time, by raft id (removed ones are dropped).
    #[serde(default)]
    pub coordinators: BTreeMap<u64, CoordinatorRecord>,
}

/// Committed epochs remembered in [`ControlState::history`].
pub const EPOCH_HISTORY: usize = 1024;

/// One thing a member is assigned in an epoch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holding {
    /// The model's name.
    pub model: String,
    /// The layers it runs.
    pub layers: std::ops::Range<u32>,
    /// Whether it is the whole model (a replica of one shard).
    pub whole: bool,
}

impl std::fmt::Display for Holding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}[{}..{})",
            self.model, self.layers.start, self.layers.end
        )
    }
}

impl PlacementEpoch {
    /// For a chain of `model` whose first range member `id` runs: the
    /// members after it with their layers, in order. `None` when `id`
    /// heads no chain of `model` (a whole replica is no chain).
    pub fn chain_after(&self, id: u64, model: &str) -> Option<Vec<(u64, std::ops::Range<u32>)>> {
        let idx = self.members.iter().position(|&m| m == id)?;
        let mid = self.models.iter().position(|m| m == model)?;
        let r = self.placement.replicas.iter().find(|r| {
            r.model.0 as usize == mid && r.shards.len() > 1 && r.shards[0].node.0 as usize == idx
        })?;
        r.shards[1..]
            .iter()
            .map(|sh| Some((*self.members.get(sh.node.0 as usize)?, sh.layers.clone())))
            .collect()
    }

    /// What member `id` runs in this epoch, each model's shards in layer
    /// order (a member may hold several replicas' shards of one model).
    pub fn held_by(&self, id: u64) -> Vec<Holding> {
        let Some(idx) = self.members.iter().position(|&m| m == id) else {
            return Vec::new();
        };
        let mut out: Vec<Holding> = self
            .placement
            .replicas
            .iter()
            .flat_map(|r| {
                let whole = r.shards.len() == 1;
                r.shards.iter().map(move |sh| (r.model, sh, whole))
            })
            .filter(|(_, sh, _)| sh.node.0 as usize == idx)
            .filter_map(|(model, sh, whole)| {
                Some(Holding {
                    model: self.models.get(model.0 as usize)?.clone(),
                    layers: sh.layers.clone(),
                    whole,
                })
            })
            .collect();
        out.sort_by(|a, b| (&a.model, a.layers.start).cmp(&(&b.model, b.layers.start)));
        out.dedup();
        out
    }
}

impl ControlState {
    /// Records a change of the voting coordinators.
    pub fn apply_voter_change(&mut self, id: u64, add: bool, record: Option<CoordinatorRecord>) {
        match (add, record) {
            (true, Some(r)) => {
                self.coordinators.insert(id, r);
            }
            (true, None) => {}
            (false, _) => {
                self.coordinators.remove(&id);
            }
        }
    }

    /// The current epoch (0 before the first placement).
    pub fn epoch(&self) -> u64 {
        self.placement.as_ref().map_or(0, |p| p.epoch)
    }

    /// Applies `cmd`, committed at log index `index`.
    pub fn apply(&mut self, index: u64, cmd: &Command) -> Applied {
        self.applied_index = index;
        match cmd {
            Command::PutMember(m) => {
                if m.id == 0 {
                    return Applied::Refused("member id 0 is reserved".into());
                }
                self.members.insert(m.id, m.clone());
            }
            Command::RemoveMember { id } => {
                if self.members.remove(id).is_none() {
                    return Applied::Refused(format!("no member {id}"));
                }
            }
            Command::PutModel(m) => {
                self.models.insert(m.spec.name.clone(), m.clone());
            }
            Command::RemoveModel { name } => {
                if self.models.remove(name).is_none() {
                    return Applied::Refused(format!("no model {name}"));
                }
            }
            Command::CommitPlacement(p) => {
                if let Err(why) = self.check_epoch(p) {
                    return Applied::Refused(why);
                }
                self.placement = Some(p.clone());
                self.history.push_back((p.epoch, index));
                if self.history.len() > EPOCH_HISTORY {
                    self.history.pop_front();
                }
            }
            Command::Revoke { fingerprint } => {
                self.revoked.insert(fingerprint.clone());
            }
        }
        Applied::Done
    }

    /// Why `p` cannot be the next epoch, if it cannot: it must follow the
    /// current epoch, name only current members and models, and keep every
    /// member within its memory.
    pub fn check_epoch(&self, p: &PlacementEpoch) -> Result<(), String> {
        if p.epoch != self.epoch() + 1 {
            return Err(format!(
                "epoch {} is stale: the current epoch is {}",
                p.epoch,
                self.epoch()
            ));
        }
        let mut used = vec![0u64; p.members.len()];
        for r in &p.placement.replicas {
            let name = p
                .models
                .get(r.model.0 as usize)
                .ok_or_else(|| format!("replica of unknown model {}", r.model))?;
            let model = self
                .models
                .get(name)
                .ok_or_else(|| format!("model {name} is not registered"))?;
            for s in &r.shards {
                let i = s.node.0 as usize;
                let id = p
                    .members
                    .get(i)
                    .ok_or_else(|| format!("shard on unknown node {}", s.node))?;
                if !self.members.contains_key(id) {
                    return Err(format!("member {id} is not in the cluster"));
                }
                used[i] += model.spec.shard_bytes(s.layers.end - s.layers.start);
            }
        }
        for (i, &u) in used.iter().enumerate() {
            let m = &self.members[&p.members[i]];
            if u > m.memory_bytes {
                return Err(format!(
                    "member {} would hold {u} bytes of weights, over its {}",
                    m.id, m.memory_bytes
                ));
            }
        }
        Ok(())
    }

    /// The topology of the current members (sites sorted by name, nodes by
    /// id) and the member id of each node.
    pub fn topology(&self) -> (Topology, Vec<u64>) {
        let mut site_names: Vec<&str> = self.members.values().map(|m| m.site.as_str()).collect();
        site_names.sort_unstable();
        site_names.dedup();
        let sites: Vec<Site> = site_names
            .iter()
            .map(|name| {
                let m = self
                    .members
                    .values()
                    .find(|m| m.site == *name)
                    .expect("site has a member");
                Site {
                    kind: m.kind,
                    region: m.region,
                }
            })
            .collect();
        let nodes: Vec<Node> = self
            .members
            .values()
            .map(|m| Node {
                site: SiteId(
                    site_names
                        .binary_search(&m.site.as_str())
                        .expect("known site") as u32,
                ),
                memory_bytes: m.memory_bytes,
                tokens_per_s: m.tokens_per_s.max(1e-3),
                slots: m.slots.max(1),
                accelerator: m.accelerator,
                cost_per_token: m.cost_per_token,
            })
            .collect();
        let ids = self.members.keys().copied().collect();
        let t = Topology::new(sites, nodes, LinkDefaults::default())
            .expect("member sites are consistent by construction");
        (t, ids)
    }

    /// Whether a new plan is due: membership or the model set changed since
    /// the last epoch, or aggregate demand moved by more than `band` (a
    /// fraction) from what it was planned for.
    pub fn needs_replan(&self, demand_rps: f64, band: f64) -> bool {
        let Some(p) = &self.placement else {
            return !self.members.is_empty() && !self.models.is_empty();
        };
        let ids: Vec<u64> = self.members.keys().copied().collect();
        let models: Vec<String> = self.models.keys().cloned().collect();
        if ids != p.members || models != p.models {
            return true;
        }
        let base = p.demand_rps.max(1e-9);
        ((demand_rps - p.demand_rps) / base).abs() > band
    }

    /// The next epoch for `demand` (by site name and model name), planned
    /// with `weft-placement` from the current placement.
    pub fn plan_next(
        &self,
        demand: &[(String, String, Demand)],
        config: &SolverConfig,
    ) -> PlacementEpoch {
        self.plan_next_without(demand, config, &BTreeSet::new())
    }

    /// Whether the current placement puts anything on a member in `down`.
    pub fn placement_uses(&self, down: &BTreeSet<u64>) -> bool {
        self.placement.as_ref().is_some_and(|p| {
            p.placement.replicas.iter().any(|r| {
                r.shards.iter().any(|s| {
                    p.members
                        .get(s.node.0 as usize)
                        .is_some_and(|id| down.contains(id))
                })
            })
        })
    }

    /// Like [`ControlState::plan_next`], with the members in `down` (not
    /// heard from) given no memory: their replicas move elsewhere.
    pub fn plan_next_without(
        &self,
        demand: &[(String, String, Demand)],
        config: &SolverConfig,
        down: &BTreeSet<u64>,
    ) -> PlacementEpoch {
        self.plan_next_measured(demand, config, down, &[])
    }

    /// The topology of the current members with the measured round trips
    /// in `links` in place of the class defaults (links naming sites that
    /// have no member are ignored).
    pub fn topology_measured(&self, links: &[SiteLink]) -> (Topology, Vec<u64>) {
        let (mut topology, ids) = self.topology();
        let mut site_names: Vec<&str> = self.members.values().map(|m| m.site.as_str()).collect();
        site_names.sort_unstable();
        site_names.dedup();
        for l in links {
            let (Ok(a), Ok(b)) = (
                site_names.binary_search(&l.a.as_str()),
                site_names.binary_search(&l.b.as_str()),
            ) else {
                continue;
            };
            if a == b || !l.rtt_ms.is_finite() || l.rtt_ms < 0.0 {
                continue;
            }
            let (a, b) = (SiteId(a as u32), SiteId(b as u32));
            let bw = topology.link(a, b).bandwidth_bytes_per_s;
            topology.set_link(a, b, l.rtt_ms, bw);
        }
        (topology, ids)
    }

    /// Like [`ControlState::plan_next_without`], planning with the round
    /// trips measured between sites.
    pub fn plan_next_measured(
        &self,
        demand: &[(String, String, Demand)],
        config: &SolverConfig,
        down: &BTreeSet<u64>,
        links: &[SiteLink],
    ) -> PlacementEpoch {
        let named_demand = demand;
        let (mut topology, ids) = self.topology_measured(links);
        for (i, id) in ids.iter().enumerate() {
            if down.contains(id) {
                topology.nodes[i].memory_bytes = 0;
            }
        }
        let names: Vec<String> = self.models.keys().cloned().collect();
        let specs: Vec<ModelSpec> = self.models.values().map(|m| m.spec.clone()).collect();
        let mut site_names: Vec<&str> = self.members.values().map(|m| m.site.as_str()).collect();
        site_names.sort_unstable();
        site_names.dedup();
        let demand: Vec<Demand> = demand
            .iter()
            .filter_map(|(site, model, d)| {
                let s = site_names.binary_search(&site.as_str()).ok()?;
                let m = names.binary_search(model).ok()?;
                Some(Demand {
                    site: SiteId(s as u32),
                    model: weft_placement::ModelId(m as u32),
                    ..d.clone()
                })
            })
            .collect();
        let current = self.current_in(&ids, &names, &topology);
        let plan = solve(&topology, &specs, &demand, &current, config)
            .expect("topology and demand are built consistent");
        PlacementEpoch {
            epoch: self.epoch() + 1,
            members: ids,
            models: names,
            placement: plan.placement,
            cost: plan.cost,
            demand_rps: demand.iter().map(|d| d.requests_per_s).sum(),
            demand: named_demand.to_vec(),
            links: links.to_vec(),
        }
    }

    /// The current placement re-indexed to `ids` and `names`, dropping
    /// replicas whose members or models are gone.
    fn current_in(&self, ids: &[u64], names: &[String], t: &Topology) -> Placement {
        let Some(p) = &self.placement else {
            return Placement::default();
        };
        let mut out = Placement::default();
        'replica: for r in &p.placement.replicas {
            let Some(m) = p
                .models
                .get(r.model.0 as usize)
                .and_then(|n| names.binary_search(n).ok())
            else {
                continue;
            };
            let mut shards = Vec::new();
            for s in &r.shards {
                let Some(i) = p
                    .members
                    .get(s.node.0 as usize)
                    .and_then(|id| ids.binary_search(id).ok())
                else {
                    continue 'replica;
                };
                shards.push(weft_placement::Shard {
                    node: NodeId(i as u32),
                    layers: s.layers.clone(),
                });
            }
            let site = t.node(shards[0].node).site;
            out.replicas.push(weft_placement::Replica {
                model: weft_placement::ModelId(m as u32),
                site,
                shards,
                reasons: r.reasons.clone(),
            });
        }
        out
    }

    /// The state as snapshot bytes.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("the state always serializes")
    }

    /// A state from snapshot bytes.
    pub fn decode(b: &[u8]) -> Result<Self> {
        serde_json::from_slice(b).map_err(|e| CoordinatorError::Codec {
            what: "snapshot",
            why: e.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(id: u64, site: &str, memory_gib: u64) -> Member {
        Member {
            id,
            name: format!("n{id}"),
            site: site.into(),
            kind: if site.starts_with("cloud") {
                SiteKind::Cloud
            } else {
                SiteKind::Edge
            },
            region: 0,
            memory_bytes: memory_gib << 30,
            tokens_per_s: 2000.0,
            slots: 8,
            accelerator: true,
            cost_per_token: 1e-8,
            address: String::new(),
        }
    }

    fn model(name: &str, layers: u32, mib_per_layer: u64) -> ModelRecord {
        ModelRecord {
            chunk_bytes: 0,
            chunk_sha256: Vec::new(),
            source: "default".into(),
            sha256: String::new(),
            spec: ModelSpec {
                name: name.into(),
                layers,
                bytes_per_layer: mib_per_layer << 20,
                shared_bytes: 0,
                compute_per_token: 1.0,
                kv_bytes_per_token: 0,
                hidden_bytes_per_token: 0,
            },
        }
    }

    fn demand(site: &str, model: &str, rps: f64) -> (String, String, Demand) {
        (
            site.into(),
            model.into(),
            Demand {
                site: SiteId(0),
                model: weft_placement::ModelId(0),
                requests_per_s: rps,
                prompt_tokens: 1000.0,
                output_tokens: 64.0,
                deadline_ms: None,
            },
        )
    }

    fn state() -> ControlState {
        let mut s = ControlState::default();
        for (i, c) in [
            Command::PutMember(member(7, "edge-a", 4)),
            Command::PutMember(member(9, "cloud", 40)),
            Command::PutModel(model("small", 18, 14)),
        ]
        .iter()
        .enumerate()
        {
            assert_eq!(s.apply(i as u64 + 1, c), Applied::Done);
        }
        s
    }

    #[test]
    fn measured_round_trips_replace_the_defaults_and_count_against_deadlines() {
        let mut s = ControlState::default();
        for (i, c) in [
            // the edge site has no room: its demand is served from the cloud
            Command::PutMember(member(7, "edge-a", 0)),
            Command::PutMember(member(9, "cloud", 40)),
            Command::PutModel(model("small", 18, 14)),
        ]
        .iter()
        .enumerate()
        {
            assert_eq!(s.apply(i as u64 + 1, c), Applied::Done);
        }
        let mut d = demand("edge-a", "small", 20.0);
        d.2.deadline_ms = Some(2000.0);
        let slow = [SiteLink {
            a: "cloud".into(),
            b: "edge-a".into(),
            rtt_ms: 3000.0,
        }];
        let (t, _) = s.topology_measured(&slow);
        assert_eq!(t.link(SiteId(0), SiteId(1)).rtt_ms, 3000.0);
        let cfg = SolverConfig::default();
        let none = BTreeSet::new();
        let default = s.plan_next_measured(std::slice::from_ref(&d), &cfg, &none, &[]);
        let measured = s.plan_next_measured(std::slice::from_ref(&d), &cfg, &none, &slow);
        assert_eq!(default.cost.misses_per_s, 0.0, "{:?}", default.cost);
        assert!(
            measured.cost.misses_per_s > 0.0,
            "a 3 s round trip misses a 2 s deadline: {:?}",
            measured.cost
        );
        assert_eq!(measured.links, slow);
        // links naming unknown sites are ignored
        let odd = [SiteLink {
            a: "nowhere".into(),
            b: "edge-a".into(),
            rtt_ms: 1.0,
        }];
        assert_eq!(s.topology_measured(&odd).0, s.topology().0);
    }

    #[test]
    fn a_chains_head_learns_who_runs_the_rest_in_layer_order() {
        let mut s = ControlState::default();
        for (i, c) in [
            // no edge node holds the model's 18 × 140 MiB, three together do
            Command::PutMember(member(3, "edge-a", 1)),
            Command::PutMember(member(5, "edge-a", 1)),
            Command::PutMember(member(8, "edge-a", 1)),
            Command::PutModel(model("big", 18, 140)),
        ]
        .iter()
        .enumerate()
        {
            assert_eq!(s.apply(i as u64 + 1, c), Applied::Done);
        }
        let p = s.plan_next(&[demand("edge-a", "big", 1.0)], &SolverConfig::default());
        let r = &p.placement.replicas[0];
        assert_eq!(r.shards.len(), 3, "{:?}", p.placement);
        let head = p.members[r.shards[0].node.0 as usize];
        let rest = p.chain_after(head, "big").unwrap();
        let want: Vec<(u64, std::ops::Range<u32>)> = r.shards[1..]
            .iter()
            .map(|sh| (p.members[sh.node.0 as usize], sh.layers.clone()))
            .collect();
        assert_eq!(rest, want);
        assert_eq!(rest.last().unwrap().1.end, 18);
        assert_eq!(rest[0].1.start, r.shards[0].layers.end);
        // the others head nothing; nor does anyone for an unknown model
        for (id, _) in &rest {
            assert_eq!(p.chain_after(*id, "big"), None);
        }
        assert_eq!(p.chain_after(head, "other"), None);
    }

    #[test]
    fn a_planned_epoch_applies_and_a_stale_or_oversized_one_is_refused() {
        let mut s = state();
        assert!(s.needs_replan(10.0, 0.2), "no placement yet");
        let p = s.plan_next(&[demand("edge-a", "small", 20.0)], &SolverConfig::default());
        assert_eq!(p.epoch, 1);
        assert!(!p.placement.replicas.is_empty());
        assert_eq!(
            s.apply(4, &Command::CommitPlacement(p.clone())),
            Applied::Done
        );
        assert_eq!(s.epoch(), 1);
        // the same epoch again is stale
        assert!(
            matches!(s.apply(5, &Command::CommitPlacement(p.clone())), Applied::Refused(w) if w.contains("stale"))
        );
        // a plan that puts the model on a member too small for it
        let mut big = p.clone();
        big.epoch = 2;
        s.members.get_mut(&7).unwrap().memory_bytes = 1 << 20;
        let on_seven = big.members.iter().position(|&id| id == 7).unwrap();
        big.placement.replicas[0].shards[0].node = NodeId(on_seven as u32);
        assert!(
            matches!(s.apply(6, &Command::CommitPlacement(big)), Applied::Refused(w) if w.contains("over its"))
        );
        assert_eq!(s.epoch(), 1);
    }

    #[test]
    fn replanning_waits_for_a_change_beyond_the_band() {
        let mut s = state();
        let p = s.plan_next(&[demand("edge-a", "small", 20.0)], &SolverConfig::default());
        s.apply(4, &Command::CommitPlacement(p));
        assert!(!s.needs_replan(22.0, 0.2), "10% is inside the band");
        assert!(s.needs_replan(30.0, 0.2), "50% is outside it");
        s.apply(5, &Command::PutMember(member(11, "edge-b", 4)));
        assert!(s.needs_replan(20.0, 0.2), "a new member");
        // the next plan keeps what was placed: nothing moves
        let next = s.plan_next(&[demand("edge-a", "small", 20.0)], &SolverConfig::default());
        assert_eq!(next.epoch, 2);
        assert_eq!(next.cost.moved_bytes, 0, "{:?}", next.cost);
    }

    #[test]
    fn commands_and_state_round_trip_through_bytes() {
        let s = state();
        assert_eq!(ControlState::decode(&s.encode()).unwrap(), s);
        let c = Command::Revoke {
            fingerprint: "f".into(),
        };
        assert_eq!(Command::decode(&c.encode()).unwrap(), c);
        assert!(Command::decode(b"{not json").is_err());
    }
}
