//! The fabric's shape: sites (edge or cloud), the nodes at each site, and the
//! links between sites with their latency, bandwidth, class and price.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::{PlacementError, Result};
pub use crate::id::{NodeId, SiteId};

/// Where a site sits in the fabric.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SiteKind {
    /// A gateway or on-premises cluster near the agents.
    #[default]
    Edge,
    /// A cloud region (the core).
    Cloud,
}

/// A place that holds nodes: everything at one site shares a local network.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Site {
    /// Edge or cloud.
    pub kind: SiteKind,
    /// Sites in one region reach each other over edge-edge links; edge sites
    /// reach other regions through the core.
    pub region: u32,
}

/// A machine that can hold model weights and run them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Node {
    /// The site it is at.
    pub site: SiteId,
    /// Bytes available for weights.
    pub memory_bytes: u64,
    /// Aggregate decode rate at full batch, in tokens/s of a model with
    /// `compute_per_token` 1.0.
    pub tokens_per_s: f64,
    /// Concurrent sequences it batches.
    pub slots: u32,
    /// Whether it has an accelerator.
    pub accelerator: bool,
    /// Price of one token of unit compute.
    pub cost_per_token: f64,
}

impl Node {
    /// Decode rate of one sequence when the node is otherwise idle: batching
    /// makes the aggregate higher than one sequence alone, so a lone sequence
    /// gets `SINGLE_SEQUENCE_SHARE` of the aggregate, at most.
    pub fn sequence_tokens_per_s(&self) -> f64 {
        self.tokens_per_s * SINGLE_SEQUENCE_SHARE.max(1.0 / self.slots.max(1) as f64)
    }
}

/// Share of a node's aggregate rate one sequence gets when it runs alone.
pub const SINGLE_SEQUENCE_SHARE: f64 = 0.25;

/// The kind of path between two sites; each class has its own price per byte.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum LinkClass {
    /// Within one site.
    #[default]
    Local,
    /// Between edge sites of one region.
    EdgeToEdge,
    /// Between an edge site and the core (or between edge sites of different
    /// regions, which goes through the core).
    EdgeToCore,
    /// Between cloud regions.
    CoreToCore,
}

impl LinkClass {
    /// All classes, cheapest path first.
    pub const ALL: [LinkClass; 4] = [
        LinkClass::Local,
        LinkClass::EdgeToEdge,
        LinkClass::EdgeToCore,
        LinkClass::CoreToCore,
    ];

    /// The class of the path between two sites.
    pub fn between(a: &Site, b: &Site, same_site: bool) -> Self {
        if same_site {
            return LinkClass::Local;
        }
        match (a.kind, b.kind) {
            (SiteKind::Edge, SiteKind::Edge) if a.region == b.region => LinkClass::EdgeToEdge,
            (SiteKind::Cloud, SiteKind::Cloud) => LinkClass::CoreToCore,
            _ => LinkClass::EdgeToCore,
        }
    }

    /// Whether bytes on this path cross an edge-core link.
    pub fn crosses_core(self) -> bool {
        self == LinkClass::EdgeToCore
    }

    /// Its position in [`LinkClass::ALL`] (and in [`LinkDefaults`] arrays).
    pub fn index(self) -> usize {
        self as usize
    }
}

/// One path between two sites.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Link {
    /// Round-trip time in milliseconds.
    pub rtt_ms: f64,
    /// Bytes per second.
    pub bandwidth_bytes_per_s: f64,
    /// Its class.
    pub class: LinkClass,
}

impl Link {
    /// Milliseconds to carry `bytes` one way, latency included.
    pub fn transfer_ms(&self, bytes: f64) -> f64 {
        self.rtt_ms / 2.0 + bytes / self.bandwidth_bytes_per_s.max(1.0) * 1000.0
    }
}

/// Link parameters for each class, used where no explicit link is given.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LinkDefaults {
    /// Round-trip time per class (ms), in [`LinkClass::ALL`] order.
    pub rtt_ms: [f64; 4],
    /// Bandwidth per class (bytes/s), in [`LinkClass::ALL`] order.
    pub bandwidth_bytes_per_s: [f64; 4],
    /// Price per byte per class, in [`LinkClass::ALL`] order.
    pub cost_per_byte: [f64; 4],
}

impl Default for LinkDefaults {
    fn default() -> Self {
        Self {
            rtt_ms: [0.5, 10.0, 60.0, 30.0],
            bandwidth_bytes_per_s: [1.25e9, 1.25e8, 2.5e6, 1.25e9],
            cost_per_byte: [0.0, 1e-11, 9e-11, 2e-11],
        }
    }
}

impl LinkDefaults {
    /// The price of one byte on a path of class `c`.
    pub fn cost_per_byte(&self, c: LinkClass) -> f64 {
        self.cost_per_byte[c.index()]
    }
}

/// Sites, nodes and links. Deserializing checks it as [`Topology::new`] does.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "TopologySpec")]
pub struct Topology {
    /// All sites; a [`SiteId`] indexes this.
    pub sites: Vec<Site>,
    /// All nodes; a [`NodeId`] indexes this.
    pub nodes: Vec<Node>,
    /// Parameters of paths with no explicit entry in `links`.
    #[serde(default)]
    pub defaults: LinkDefaults,
    /// Measured or configured paths, keyed by the ordered site pair.
    #[serde(default, with = "pair_map")]
    pub links: BTreeMap<(SiteId, SiteId), (f64, f64)>,
    #[serde(skip)]
    by_site: Vec<Vec<NodeId>>,
}

/// A topology as written in a file, before it is checked and indexed.
#[derive(Deserialize)]
struct TopologySpec {
    sites: Vec<Site>,
    nodes: Vec<Node>,
    #[serde(default)]
    defaults: LinkDefaults,
    #[serde(default, with = "pair_map")]
    links: BTreeMap<(SiteId, SiteId), (f64, f64)>,
}

impl TryFrom<TopologySpec> for Topology {
    type Error = PlacementError;

    fn try_from(s: TopologySpec) -> Result<Self> {
        let mut t = Topology::new(s.sites, s.nodes, s.defaults)?;
        t.links = s.links;
        t.index()?;
        Ok(t)
    }
}

impl Topology {
    /// A topology; checks that every node's site exists and every figure is sane.
    pub fn new(sites: Vec<Site>, nodes: Vec<Node>, defaults: LinkDefaults) -> Result<Self> {
        let mut t = Self {
            sites,
            nodes,
            defaults,
            links: BTreeMap::new(),
            by_site: Vec::new(),
        };
        t.index()?;
        Ok(t)
    }

    /// Rebuilds the per-site index and validates (after deserializing).
    pub fn index(&mut self) -> Result<()> {
        let mut by_site = vec![Vec::new(); self.sites.len()];
        for (i, n) in self.nodes.iter().enumerate() {
            let id = NodeId(i as u32);
            let list = by_site
                .get_mut(n.site.0 as usize)
                .ok_or(PlacementError::UnknownSite { site: n.site })?;
            if !(n.tokens_per_s.is_finite() && n.tokens_per_s > 0.0) || n.slots == 0 {
                return Err(PlacementError::InvalidNode {
                    node: id,
                    why: "tokens_per_s must be positive and slots at least 1",
                });
            }
            list.push(id);
        }
        for &(a, b) in self.links.keys() {
            for s in [a, b] {
                if s.0 as usize >= self.sites.len() {
                    return Err(PlacementError::UnknownSite { site: s });
                }
            }
        }
        self.by_site = by_site;
        Ok(())
    }

    /// Sets the measured RTT (ms) and bandwidth (bytes/s) between two sites.
    pub fn set_link(&mut self, a: SiteId, b: SiteId, rtt_ms: f64, bandwidth_bytes_per_s: f64) {
        self.links
            .insert(ordered(a, b), (rtt_ms, bandwidth_bytes_per_s));
    }

    /// The nodes at `site`.
    pub fn nodes_at(&self, site: SiteId) -> &[NodeId] {
        self.by_site
            .get(site.0 as usize)
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }

    /// The node with id `id`.
    pub fn node(&self, id: NodeId) -> &Node {
        &self.nodes[id.0 as usize]
    }

    /// The site with id `id`.
    pub fn site(&self, id: SiteId) -> &Site {
        &self.sites[id.0 as usize]
    }

    /// The path between two sites.
    pub fn link(&self, a: SiteId, b: SiteId) -> Link {
        let class = LinkClass::between(self.site(a), self.site(b), a == b);
        let (rtt_ms, bw) = self.links.get(&ordered(a, b)).copied().unwrap_or((
            self.defaults.rtt_ms[class.index()],
            self.defaults.bandwidth_bytes_per_s[class.index()],
        ));
        Link {
            rtt_ms,
            bandwidth_bytes_per_s: bw,
            class,
        }
    }
}

impl Topology {
    /// The path between two sites as the router takes it: round trip,
    /// bandwidth, class, and the class's price per byte.
    pub fn link_estimate(&self, a: SiteId, b: SiteId) -> LinkEstimate {
        let l = self.link(a, b);
        LinkEstimate {
            rtt_ms: l.rtt_ms,
            bandwidth_bytes_per_s: l.bandwidth_bytes_per_s,
            class: l.class,
            cost_per_byte: self.defaults.cost_per_byte(l.class),
        }
    }
}

fn ordered(a: SiteId, b: SiteId) -> (SiteId, SiteId) {
    if a <= b {
        (a, b)
    } else {
        (b, a)
    }
}

/// JSON maps need string keys: links are written as a list of
/// `[a, b, rtt_ms, bandwidth]`.
mod pair_map {
    use super::SiteId;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};
    use std::collections::BTreeMap;

    type Map = BTreeMap<(SiteId, SiteId), (f64, f64)>;

    pub fn serialize<S: Serializer>(m: &Map, s: S) -> Result<S::Ok, S::Error> {
        let v: Vec<(SiteId, SiteId, f64, f64)> =
            m.iter().map(|(&(a, b), &(r, w))| (a, b, r, w)).collect();
        v.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Map, D::Error> {
        let v: Vec<(SiteId, SiteId, f64, f64)> = Vec::deserialize(d)?;
        Ok(v.into_iter()
            .map(|(a, b, r, w)| (super::ordered(a, b), (r, w)))
            .collect())
    }
}

/// The path from the request's origin to a candidate.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LinkEstimate {
    /// Measured round trip (ms).
    pub rtt_ms: f64,
    /// Estimated bytes/s.
    pub bandwidth_bytes_per_s: f64,
    /// Its class.
    pub class: LinkClass,
    /// Price per byte.
    pub cost_per_byte: f64,
}
