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
    /// The sites (by name) its floor replicas may go to (empty: any); the
    /// planner gives them to the solver as `spec.sites`.
    #[serde(default)]
    pub sites: Vec<String>,
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
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
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
    /// The models' replica floors (`min_replicas`, where not 0) it was
    /// planned for: a changed floor asks for a new plan.
    #[serde(default)]
    pub floors: BTreeMap<String, u32>,
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
    /// A node's signed checkpoint of its intent log (the leader checked
    /// that the node itself signed it): kept as its latest, the one before
    /// it joining a sparse history. One going backwards is refused.
    Checkpoint(weft_audit::Checkpoint),
    /// A node joins with a token the leader checked: the token's nonce is
    /// consumed (refused if it was before) and the member put, at once.
    Join {
        /// What the node offers (its name is the token's).
        member: Member,
        /// The token's nonce.
        nonce: String,
        /// When the token expires (unix seconds): until then its nonce is
        /// remembered.
        expires: u64,
        /// The leader's clock when it checked the token (unix seconds):
        /// nonces of tokens expired by then are forgotten.
        now: u64,
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
    /// Nonces of redeemed join tokens that have not expired yet, with
    /// their expiry (unix seconds).
    #[serde(default)]
    pub tokens_used: BTreeMap<String, u64>,
    /// Each node's intent-log checkpoints, by node name.
    #[serde(default)]
    pub checkpoints: BTreeMap<String, NodeCheckpoints>,
}

/// A node's checkpoints as the coordinators hold them: a record its
/// writer cannot change, to check its log against.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeCheckpoints {
    /// The latest.
    pub latest: weft_audit::Checkpoint,
    /// Earlier ones, oldest first, thinned to at most
    /// [`CHECKPOINT_HISTORY`] spread over the log.
    pub history: Vec<weft_audit::Checkpoint>,
}

impl NodeCheckpoints {
    /// All of them, oldest first, each with its certificate.
    pub fn all(&self) -> Vec<weft_audit::Checkpoint> {
        let mut out: Vec<_> = self
            .history
            .iter()
            .chain(std::iter::once(&self.latest))
            .cloned()
            .collect();
        // the history keeps a certificate only where the next one's differs
        let mut cert = String::new();
        for c in out.iter_mut().rev() {
            if c.cert.is_empty() {
                c.cert = cert.clone();
            } else {
                cert = c.cert.clone();
            }
        }
        out
    }

    /// Makes `cp` the latest, the one before it joining the history.
    fn push(&mut self, cp: &weft_audit::Checkpoint) {
        let mut before = std::mem::replace(&mut self.latest, cp.clone());
        // every node's status read carries these: one certificate per key
        if before.cert == self.latest.cert {
            before.cert.clear();
        }
        self.history.push(before);
        thin(&mut self.history);
    }
}

/// Earlier checkpoints kept per node.
pub const CHECKPOINT_HISTORY: usize = 16;

/// Drops the checkpoint whose neighbours are closest together (never the
/// first or the last), until `h` fits: what is kept stays spread over
/// the whole log, dense near its end. A certificate the dropped one held
/// passes to the one before it, if that one relied on it.
fn thin(h: &mut Vec<weft_audit::Checkpoint>) {
    while h.len() > CHECKPOINT_HISTORY {
        let i = (1..h.len() - 1)
            .min_by_key(|&i| h[i + 1].seq - h[i - 1].seq)
            .expect("more than two");
        let gone = h.remove(i);
        if !gone.cert.is_empty() && h[i - 1].cert.is_empty() {
            h[i - 1].cert = gone.cert;
        }
    }
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
            Command::Checkpoint(cp) => match self.checkpoints.get_mut(&cp.node) {
                None => {
                    self.checkpoints.insert(
                        cp.node.clone(),
                        NodeCheckpoints {
                            latest: cp.clone(),
                            history: Vec::new(),
                        },
                    );
                }
                Some(n) if cp.seq < n.latest.seq => {
                    return Applied::Refused(format!(
                        "{}'s checkpoint of seq {} goes back before the one held (seq {})",
                        cp.node, cp.seq, n.latest.seq
                    ));
                }
                Some(n) if cp.seq == n.latest.seq => {
                    if cp.head != n.latest.head {
                        return Applied::Refused(format!(
                            "{}'s checkpoint of seq {} names another head than the one held",
                            cp.node, cp.seq
                        ));
                    }
                }
                Some(n) => n.push(cp),
            },
            Command::Join {
                member,
                nonce,
                expires,
                now,
            } => {
                self.tokens_used.retain(|_, e| *e >= *now);
                if self.tokens_used.contains_key(nonce) {
                    return Applied::Refused("this join token was already used".into());
                }
                if *expires < *now {
                    return Applied::Refused(format!(
                        "the join token expired {} s ago",
                        now - expires
                    ));
                }
                if member.id == 0 {
                    return Applied::Refused("member id 0 is reserved".into());
                }
                self.tokens_used.insert(nonce.clone(), *expires);
                self.members.insert(member.id, member.clone());
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
        self.replan_cause(demand_rps, band).is_some()
    }

    /// Why a new plan is due, if it is: `first` (no placement yet),
    /// `members`, `models`, `floors` or `demand` (see
    /// [`ControlState::needs_replan`]), as `weft_placement_replans_total`'s
    /// `cause` label writes it.
    pub fn replan_cause(&self, demand_rps: f64, band: f64) -> Option<&'static str> {
        let Some(p) = &self.placement else {
            return (!self.members.is_empty() && !self.models.is_empty()).then_some("first");
        };
        let ids: Vec<u64> = self.members.keys().copied().collect();
        let models: Vec<String> = self.models.keys().cloned().collect();
        if ids != p.members {
            return Some("members");
        }
        if models != p.models {
            return Some("models");
        }
        if self.floors() != p.floors {
            return Some("floors");
        }
        let base = p.demand_rps.max(1e-9);
        (((demand_rps - p.demand_rps) / base).abs() > band).then_some("demand")
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
        let mut site_names: Vec<&str> = self.members.values().map(|m| m.site.as_str()).collect();
        site_names.sort_unstable();
        site_names.dedup();
        // a model's sites by name, as this topology's ids (named sites that
        // have no members yet match nothing: its floor waits for them)
        let specs: Vec<ModelSpec> = self
            .models
            .values()
            .map(|m| {
                let mut spec = m.spec.clone();
                spec.sites = m
                    .sites
                    .iter()
                    .map(|n| {
                        site_names
                            .binary_search(&n.as_str())
                            .map_or(SiteId(u32::MAX), |i| SiteId(i as u32))
                    })
                    .collect();
                spec
            })
            .collect();
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
            floors: self.floors(),
        }
    }

    /// Every model's replica floor, where it has one.
    pub fn floors(&self) -> BTreeMap<String, u32> {
        self.models
            .iter()
            .filter(|(_, m)| m.spec.min_replicas > 0)
            .map(|(n, m)| (n.clone(), m.spec.min_replicas))
            .collect()
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
            sites: Vec::new(),
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
                min_replicas: 0,
                prefer: None,
                sites: Vec::new(),
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

    /// A state of `members` and the model "small".
    fn state_of(members: [Member; 2]) -> ControlState {
        let mut s = ControlState::default();
        let [a, b] = members;
        for (i, c) in [
            Command::PutMember(a),
            Command::PutMember(b),
            Command::PutModel(model("small", 18, 14)),
        ]
        .iter()
        .enumerate()
        {
            assert_eq!(s.apply(i as u64 + 1, c), Applied::Done);
        }
        s
    }

    /// A small edge member, a large cloud one, and the model "small".
    fn state() -> ControlState {
        state_of([member(7, "edge-a", 4), member(9, "cloud", 40)])
    }

    /// A state where the edge site has no room: its demand is served from
    /// the cloud.
    fn served_from_the_cloud() -> ControlState {
        state_of([member(7, "edge-a", 0), member(9, "cloud", 40)])
    }

    /// Demand at the edge site with a 2 s deadline.
    fn demand_with_a_deadline() -> (String, String, Demand) {
        let mut d = demand("edge-a", "small", 20.0);
        d.2.deadline_ms = Some(2000.0);
        d
    }

    /// A measured 3 s round trip between the cloud and the edge site.
    fn slow_link() -> [SiteLink; 1] {
        [SiteLink {
            a: "cloud".into(),
            b: "edge-a".into(),
            rtt_ms: 3000.0,
        }]
    }

    /// The next epoch for the edge site's demand, planned with `links`.
    fn plan_with_deadline(s: &ControlState, links: &[SiteLink]) -> PlacementEpoch {
        let d = demand_with_a_deadline();
        let cfg = SolverConfig::default();
        s.plan_next_measured(std::slice::from_ref(&d), &cfg, &BTreeSet::new(), links)
    }

    fn join(nonce: &str, expires: u64, now: u64) -> Command {
        Command::Join {
            member: member(11, "edge-b", 4),
            nonce: nonce.into(),
            expires,
            now,
        }
    }

    #[test]
    fn a_join_puts_the_member() {
        let mut s = ControlState::default();
        assert_eq!(s.apply(1, &join("n1", 200, 100)), Applied::Done);
        assert!(s.members.contains_key(&11));
    }

    #[test]
    fn a_token_redeemed_twice_is_refused_the_second_time() {
        let mut s = ControlState::default();
        s.apply(1, &join("n1", 200, 100));
        s.members.clear();
        let r = s.apply(2, &join("n1", 200, 150));
        assert!(
            matches!(r, Applied::Refused(ref w) if w.contains("already used")),
            "{r:?}"
        );
        assert!(s.members.is_empty(), "a refused join put its member");
    }

    #[test]
    fn a_join_with_an_expired_token_is_refused() {
        let mut s = ControlState::default();
        let r = s.apply(1, &join("n1", 100, 160));
        assert!(
            matches!(r, Applied::Refused(ref w) if w.contains("expired 60 s ago")),
            "{r:?}"
        );
        assert!(s.members.is_empty());
    }

    #[test]
    fn nonces_of_expired_tokens_are_forgotten() {
        let mut s = ControlState::default();
        s.apply(1, &join("n1", 200, 100));
        s.apply(2, &join("n2", 900, 300));
        assert_eq!(s.tokens_used.keys().collect::<Vec<_>>(), ["n2"]);
    }

    #[test]
    fn a_measured_round_trip_replaces_the_default_in_the_topology() {
        let s = served_from_the_cloud();
        let (t, _) = s.topology_measured(&slow_link());
        assert_eq!(t.link(SiteId(0), SiteId(1)).rtt_ms, 3000.0);
    }

    #[test]
    fn with_the_default_round_trips_the_cloud_meets_the_edges_deadline() {
        let default = plan_with_deadline(&served_from_the_cloud(), &[]);
        assert_eq!(default.cost.misses_per_s, 0.0, "{:?}", default.cost);
    }

    #[test]
    fn a_measured_round_trip_past_the_deadline_counts_as_misses() {
        let measured = plan_with_deadline(&served_from_the_cloud(), &slow_link());
        assert!(
            measured.cost.misses_per_s > 0.0,
            "a 3 s round trip misses a 2 s deadline: {:?}",
            measured.cost
        );
    }

    #[test]
    fn a_plan_keeps_the_links_it_was_measured_with() {
        let measured = plan_with_deadline(&served_from_the_cloud(), &slow_link());
        assert_eq!(measured.links, slow_link());
    }

    #[test]
    fn measured_links_naming_unknown_sites_are_ignored() {
        let s = served_from_the_cloud();
        let odd = [SiteLink {
            a: "nowhere".into(),
            b: "edge-a".into(),
            rtt_ms: 1.0,
        }];
        assert_eq!(s.topology_measured(&odd).0, s.topology().0);
    }

    /// An epoch for a model that no edge node holds alone (18 × 140 MiB)
    /// but three together do, and the member at the head of its chain.
    fn a_chain_of_three() -> (PlacementEpoch, u64) {
        let mut s = ControlState::default();
        for (i, c) in [
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
        (p, head)
    }

    #[test]
    fn a_chains_head_learns_who_runs_the_rest_in_layer_order() {
        let (p, head) = a_chain_of_three();
        let r = &p.placement.replicas[0];
        let rest = p.chain_after(head, "big").unwrap();
        let want: Vec<(u64, std::ops::Range<u32>)> = r.shards[1..]
            .iter()
            .map(|sh| (p.members[sh.node.0 as usize], sh.layers.clone()))
            .collect();
        assert_eq!(rest, want);
        assert_eq!(rest.last().unwrap().1.end, 18);
        assert_eq!(rest[0].1.start, r.shards[0].layers.end);
    }

    #[test]
    fn the_rest_of_a_chain_heads_nothing() {
        let (p, head) = a_chain_of_three();
        for (id, _) in &p.chain_after(head, "big").unwrap() {
            assert_eq!(p.chain_after(*id, "big"), None);
        }
    }

    #[test]
    fn no_one_heads_a_chain_for_an_unknown_model() {
        let (p, head) = a_chain_of_three();
        assert_eq!(p.chain_after(head, "other"), None);
    }

    /// The first epoch for 20 requests/s at the edge site.
    fn first_plan(s: &ControlState) -> PlacementEpoch {
        s.plan_next(&[demand("edge-a", "small", 20.0)], &SolverConfig::default())
    }

    /// The state with its first epoch committed at index 4, and the epoch.
    fn committed() -> (ControlState, PlacementEpoch) {
        let mut s = state();
        let p = first_plan(&s);
        assert_eq!(
            s.apply(4, &Command::CommitPlacement(p.clone())),
            Applied::Done
        );
        (s, p)
    }

    #[test]
    fn a_state_without_a_placement_needs_a_plan() {
        assert_eq!(
            state().replan_cause(10.0, 0.2),
            Some("first"),
            "no placement yet"
        );
    }

    #[test]
    fn the_first_plan_is_epoch_1_and_places_replicas() {
        let p = first_plan(&state());
        assert_eq!(p.epoch, 1);
        assert!(!p.placement.replicas.is_empty());
    }

    #[test]
    fn a_planned_epoch_applies() {
        let (s, _) = committed();
        assert_eq!(s.epoch(), 1);
    }

    #[test]
    fn the_same_epoch_again_is_refused_as_stale() {
        let (mut s, p) = committed();
        assert!(
            matches!(s.apply(5, &Command::CommitPlacement(p.clone())), Applied::Refused(w) if w.contains("stale"))
        );
    }

    #[test]
    fn an_epoch_that_puts_a_model_on_a_member_too_small_for_it_is_refused() {
        let (mut s, p) = committed();
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
    fn a_demand_change_inside_the_band_needs_no_replan() {
        let (s, _) = committed();
        assert!(!s.needs_replan(22.0, 0.2), "10% is inside the band");
    }

    #[test]
    fn a_demand_change_beyond_the_band_needs_a_replan() {
        let (s, _) = committed();
        assert_eq!(
            s.replan_cause(30.0, 0.2),
            Some("demand"),
            "50% is outside it"
        );
    }

    /// The committed state after a member joined at index 5.
    fn with_a_new_member() -> ControlState {
        let (mut s, _) = committed();
        s.apply(5, &Command::PutMember(member(11, "edge-b", 4)));
        s
    }

    /// The committed state after model `name`'s floor became `floor`.
    fn with_floor(name: &str, floor: u32) -> ControlState {
        let (mut s, _) = committed();
        let mut m = s.models[name].clone();
        m.spec.min_replicas = floor;
        s.apply(5, &Command::PutModel(m));
        s
    }

    #[test]
    fn a_models_sites_reach_the_solver_by_name() {
        // no demand at all: only the floor places it, and only at "cloud"
        let mut s = state();
        let mut m = s.models["small"].clone();
        m.spec.min_replicas = 1;
        m.sites = vec!["cloud".into()];
        s.apply(4, &Command::PutModel(m));
        let p = s.plan_next(&[], &SolverConfig::default());
        let at: Vec<u32> = p.placement.replicas.iter().map(|r| r.site.0).collect();
        // site ids are the sorted site names: "cloud" 0, "edge-a" 1
        assert_eq!(at, [0]);
    }

    #[test]
    fn a_model_naming_only_sites_without_members_waits_for_them() {
        let mut s = state();
        let mut m = s.models["small"].clone();
        m.spec.min_replicas = 1;
        m.sites = vec!["edge-z".into()];
        s.apply(4, &Command::PutModel(m));
        let p = s.plan_next(&[], &SolverConfig::default());
        assert!(p.placement.replicas.is_empty());
    }

    #[test]
    fn a_changed_replica_floor_needs_a_replan() {
        let name = state().models.keys().next().unwrap().clone();
        assert_eq!(with_floor(&name, 2).replan_cause(20.0, 0.2), Some("floors"));
    }

    #[test]
    fn a_plan_records_the_floors_it_met() {
        let name = state().models.keys().next().unwrap().clone();
        let s = with_floor(&name, 2);
        let next = first_plan(&s);
        assert_eq!(next.floors.get(&name), Some(&2));
        let mut s = s;
        s.apply(6, &Command::CommitPlacement(next));
        assert!(!s.needs_replan(20.0, 0.2), "the floor is planned for");
    }

    #[test]
    fn a_new_member_needs_a_replan() {
        assert_eq!(
            with_a_new_member().replan_cause(20.0, 0.2),
            Some("members"),
            "a new member"
        );
    }

    #[test]
    fn the_next_plan_takes_the_next_epoch() {
        let next = first_plan(&with_a_new_member());
        assert_eq!(next.epoch, 2);
    }

    #[test]
    fn the_next_plan_for_the_same_demand_keeps_what_was_placed() {
        // nothing moves
        let next = first_plan(&with_a_new_member());
        assert_eq!(next.cost.moved_bytes, 0, "{:?}", next.cost);
    }

    #[test]
    fn the_state_round_trips_through_bytes() {
        let s = state();
        assert_eq!(ControlState::decode(&s.encode()).unwrap(), s);
    }

    #[test]
    fn a_command_round_trips_through_bytes() {
        let c = Command::Revoke {
            fingerprint: "f".into(),
        };
        assert_eq!(Command::decode(&c.encode()).unwrap(), c);
    }

    #[test]
    fn bytes_that_are_not_a_command_do_not_decode() {
        assert!(Command::decode(b"{not json").is_err());
    }

    fn checkpoint(node: &str, seq: u64, head: &str) -> Command {
        Command::Checkpoint(weft_audit::Checkpoint {
            node: node.into(),
            seq,
            head: head.into(),
            at_unix_ms: seq,
            reason: "interval".into(),
            cert: String::new(),
            sig: String::new(),
        })
    }

    #[test]
    fn a_checkpoint_going_back_is_refused() {
        let mut s = ControlState::default();
        assert_eq!(s.apply(1, &checkpoint("gw-1", 10, "a")), Applied::Done);
        assert!(matches!(
            s.apply(2, &checkpoint("gw-1", 9, "b")),
            Applied::Refused(_)
        ));
        assert!(matches!(
            s.apply(3, &checkpoint("gw-1", 10, "c")),
            Applied::Refused(_)
        ));
        assert_eq!(s.checkpoints["gw-1"].latest.seq, 10);
    }

    #[test]
    fn a_nodes_checkpoint_history_stays_bounded_and_spans_its_log() {
        let mut s = ControlState::default();
        for i in 1..=500u64 {
            assert_eq!(s.apply(i, &checkpoint("gw-1", i * 10, "h")), Applied::Done);
        }
        let held = &s.checkpoints["gw-1"];
        assert_eq!(held.latest.seq, 5000);
        assert_eq!(held.history.len(), CHECKPOINT_HISTORY);
        assert_eq!(held.history[0].seq, 10, "the oldest is kept");
        assert!(held.history.windows(2).all(|w| w[0].seq < w[1].seq));
    }

    #[test]
    fn each_held_checkpoint_comes_back_with_the_certificate_it_was_signed_with() {
        let mut s = ControlState::default();
        for i in 1..=100u64 {
            let Command::Checkpoint(mut cp) = checkpoint("gw-1", i, "h") else {
                unreachable!()
            };
            // the node's key is renewed after seq 30, 60 and 90
            cp.cert = format!("cert-{}", (i - 1) / 30);
            assert_eq!(s.apply(i, &Command::Checkpoint(cp)), Applied::Done);
        }
        for cp in s.checkpoints["gw-1"].all() {
            assert_eq!(
                cp.cert,
                format!("cert-{}", (cp.seq - 1) / 30),
                "seq {}",
                cp.seq
            );
        }
    }
}
