//! `weft node --config FILE`: a node's place in a cluster, in TOML.
//!
//! ```toml
//! [node]
//! name = "coord-1"                  # its certificate name: [a-z0-9-]{1,63}
//! data_dir = "/var/lib/weft/coord-1" # identity/, raft/ (and ca/ on coordinators)
//! listen = "0.0.0.0:7100"           # cluster traffic (UDP, QUIC)
//! metrics_addr = "127.0.0.1:9100"   # optional: /metrics and /healthz over HTTP
//! site = "edge-a"
//! kind = "edge"                     # or "cloud"
//! region = 0
//! memory_bytes = 8589934592
//! tokens_per_s = 2000.0
//! slots = 8
//!
//! [coordinator]                     # only on coordinators
//! id = 1
//! ca_dir = "/var/lib/weft/ca"       # optional: lets this member admit joiners
//! peers = [
//!   { id = 1, name = "coord-1", addr = "10.0.0.1:7100" },
//!   { id = 2, name = "coord-2", addr = "10.0.0.2:7100" },
//!   { id = 3, name = "coord-3", addr = "10.0.0.3:7100" },
//! ]
//!
//! [overlay]                         # optional: gossip of load, failure detection
//! listen = "/ip4/0.0.0.0/udp/7300/quic-v1"
//! bootstrap = ["/ip4/10.0.0.1/udp/7300/quic-v1"]
//! mdns = true
//!
//! [serve]                           # optional: serve what the placement assigns
//! addr = "0.0.0.0:8080"             # the OpenAI-compatible API (as `weft up`)
//! threads = 0                       # any `weft up` setting but `model`
//!
//! [join]                            # on other nodes, until they hold an identity
//! token = "weft1...."             # `weft cluster join-token --name <this node's name>`: works once
//! # token_dir = "/etc/weft/join"    # or: the token is the file named for this node here
//! coordinators = [ { id = 1, name = "coord-1", addr = "10.0.0.1:7100" } ]
//! ```
//!
//! A peer's `addr` is `IP:PORT` or `DNS-NAME:PORT` (resolved at every
//! connect). `identity_dir` (default `DATA_DIR/identity`) and
//! `advertise_host` (the address peers reach a node at when it listens on
//! `0.0.0.0`) are optional in `[node]`; `weft node --name`, `--site` and
//! `--advertise-host` override the file (a pod's own name and IP).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use weft_coordinator::Member;
use weft_placement::SiteKind;

use weft_cluster::credentials::check_name;
use weft_cluster::member::member_id;
use weft_cluster::transport::Peer;

/// The whole file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// This node.
    pub node: NodeSection,
    /// Present on coordinators.
    pub coordinator: Option<CoordinatorSection>,
    /// Present on nodes that join with a token.
    pub join: Option<JoinSection>,
    /// The gossip overlay (load reports, failure detection); off if absent.
    pub overlay: Option<OverlaySection>,
    /// Serving: the API and engine settings (as `weft up` takes them; the
    /// models are the ones the placement assigns). Absent: this node holds
    /// no models (a coordinator only).
    pub serve: Option<crate::config::NodeConfig>,
}

/// `[overlay]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OverlaySection {
    /// libp2p listen address, e.g. `/ip4/0.0.0.0/udp/7300/quic-v1`.
    pub listen: String,
    /// Peers to dial (libp2p addresses).
    #[serde(default)]
    pub bootstrap: Vec<String>,
    /// Find peers on the LAN with mDNS.
    #[serde(default = "yes")]
    pub mdns: bool,
}

/// `[node]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSection {
    /// Its name.
    pub name: String,
    /// Its state directory.
    pub data_dir: PathBuf,
    /// Cluster address (UDP).
    pub listen: SocketAddr,
    /// Where its certificate and key are (default `DATA_DIR/identity`).
    #[serde(default)]
    pub identity_dir: Option<PathBuf>,
    /// The host peers reach it at, for addresses it listens on at
    /// `0.0.0.0` (default: the listen address as it is).
    #[serde(default)]
    pub advertise_host: Option<String>,
    /// HTTP address for `/metrics` and `/healthz`, if any.
    pub metrics_addr: Option<SocketAddr>,
    /// Its site.
    pub site: String,
    /// Edge or cloud.
    #[serde(default = "edge")]
    pub kind: SiteKind,
    /// Its region.
    #[serde(default)]
    pub region: u32,
    /// Memory it offers for models (bytes); offered only with a `[serve]`
    /// section.
    pub memory_bytes: u64,
    /// Aggregate decode tokens/s at full batch.
    pub tokens_per_s: f64,
    /// Sequences it batches.
    #[serde(default = "default_slots")]
    pub slots: u32,
    /// Whether it has an accelerator.
    #[serde(default)]
    pub accelerator: bool,
    /// Price per token.
    #[serde(default)]
    pub cost_per_token: f64,
}

fn edge() -> SiteKind {
    SiteKind::Edge
}

fn default_slots() -> u32 {
    8
}

/// `[coordinator]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoordinatorSection {
    /// This member's raft id.
    pub id: u64,
    /// The cluster CA's directory, if this member admits joiners.
    pub ca_dir: Option<PathBuf>,
    /// The founding coordinators.
    pub peers: Vec<Peer>,
    /// Raft tick (ms).
    #[serde(default = "default_tick")]
    pub tick_ms: u64,
    /// Whether this member founds the group with `peers` (true for the
    /// founders); a coordinator added later sets false and is added with
    /// `AddCoordinator` from a running member.
    #[serde(default = "yes")]
    pub bootstrap: bool,
}

fn yes() -> bool {
    true
}

fn default_tick() -> u64 {
    100
}

/// `[join]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinSection {
    /// The join token.
    #[serde(default)]
    pub token: Option<String>,
    /// Or a directory holding a token per node name (a file named for
    /// this node): how the Kubernetes operator hands tokens to a pool.
    #[serde(default)]
    pub token_dir: Option<PathBuf>,
    /// Coordinators to ask.
    pub coordinators: Vec<Peer>,
}

impl JoinSection {
    /// The token for node `name`.
    pub fn token(&self, name: &str) -> Result<String> {
        match (&self.token, &self.token_dir) {
            (Some(t), None) => Ok(t.trim().to_string()),
            (None, Some(d)) => {
                let p = d.join(name);
                let t = std::fs::read_to_string(&p)
                    .with_context(|| format!("reading this node's join token {}", p.display()))?;
                Ok(t.trim().to_string())
            }
            _ => bail!("[join] needs exactly one of token and token_dir"),
        }
    }
}

/// What `weft node`'s flags put over the file.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `--name`: mapped to a node name (see `node_name_for`).
    pub name: Option<String>,
    /// `--site`.
    pub site: Option<String>,
    /// `--advertise-host`.
    pub advertise_host: Option<String>,
}

impl ClusterConfig {
    /// Reads and checks a config file.
    pub fn load(path: &Path) -> Result<Self> {
        Self::load_with(path, &Overrides::default())
    }

    /// Reads a config file, puts `o` over it, and checks the result.
    pub fn load_with(path: &Path, o: &Overrides) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let mut c: Self =
            toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        let set = |v: &Option<String>| v.as_ref().filter(|s| !s.trim().is_empty()).cloned();
        if let Some(n) = set(&o.name) {
            c.node.name = weft_cluster::credentials::node_name_for(&n);
        }
        if let Some(s) = set(&o.site) {
            c.node.site = s;
        }
        if let Some(h) = set(&o.advertise_host) {
            c.node.advertise_host = Some(h);
        }
        c.check()
            .with_context(|| format!("checking {}", path.display()))?;
        Ok(c)
    }

    fn check(&self) -> Result<()> {
        check_name(&self.node.name)?;
        if let Some(serve) = &self.serve {
            serve.validate().context("[serve]")?;
        }
        if self.node.memory_bytes == 0
            || !self.node.tokens_per_s.is_finite()
            || self.node.tokens_per_s <= 0.0
        {
            bail!("[node] memory_bytes and tokens_per_s must be positive");
        }
        if let Some(c) = &self.coordinator {
            if c.id == 0 {
                bail!("[coordinator] id 0 is reserved");
            }
            let me = c.peers.iter().find(|p| p.id == c.id);
            match me {
                Some(p) if p.name == self.node.name => {}
                Some(p) => bail!(
                    "[coordinator] peer {} is named {:?}, but [node] name is {:?}",
                    c.id,
                    p.name,
                    self.node.name
                ),
                None => bail!("[coordinator] peers must include this member (id {})", c.id),
            }
            let mut ids: Vec<u64> = c.peers.iter().map(|p| p.id).collect();
            ids.sort_unstable();
            ids.dedup();
            if ids.len() != c.peers.len() {
                bail!("[coordinator] peer ids must be unique");
            }
            for p in &c.peers {
                check_name(&p.name)?;
            }
        }
        for p in self.coordinators() {
            weft_cluster::transport::check_addr(&p.addr)
                .map_err(|e| anyhow::anyhow!("coordinator {}: {e}", p.name))?;
        }
        if let Some(j) = &self.join {
            if j.token.is_some() == j.token_dir.is_some() {
                bail!("[join] needs exactly one of token and token_dir");
            }
        }
        if self.coordinator.is_none() && self.join.is_none() && !self.has_identity() {
            bail!(
                "this node has no identity in {} and no [join] section: give it a join token",
                self.identity_dir().display()
            );
        }
        Ok(())
    }

    /// Where the node's certificate and key live.
    pub fn identity_dir(&self) -> PathBuf {
        self.node
            .identity_dir
            .clone()
            .unwrap_or_else(|| self.node.data_dir.join("identity"))
    }

    /// How peers reach `addr`, a socket this node listens on: the
    /// advertised host in place of an unspecified IP.
    pub fn advertised(&self, addr: SocketAddr) -> String {
        match &self.node.advertise_host {
            Some(h) if addr.ip().is_unspecified() => {
                if h.contains(':') && !h.starts_with('[') {
                    format!("[{h}]:{}", addr.port())
                } else {
                    format!("{h}:{}", addr.port())
                }
            }
            _ => addr.to_string(),
        }
    }

    /// Whether the node already holds an identity.
    pub fn has_identity(&self) -> bool {
        weft_cluster::credentials::NodeIdentity::exists(&self.identity_dir())
    }

    /// This node as a member of the control state.
    pub fn member(&self) -> Member {
        let n = &self.node;
        Member {
            id: member_id(&n.name),
            name: n.name.clone(),
            site: n.site.clone(),
            kind: n.kind,
            region: n.region,
            // a node that serves nothing offers nothing to the placement
            memory_bytes: if self.serve.is_some() {
                n.memory_bytes
            } else {
                0
            },
            tokens_per_s: n.tokens_per_s,
            slots: n.slots,
            accelerator: n.accelerator,
            cost_per_token: n.cost_per_token,
            address: self.advertised(n.listen),
        }
    }

    /// Coordinators this node can ask.
    pub fn coordinators(&self) -> Vec<Peer> {
        match (&self.coordinator, &self.join) {
            (Some(c), _) => c.peers.clone(),
            (None, Some(j)) => j.coordinators.clone(),
            (None, None) => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<ClusterConfig> {
        let c: ClusterConfig = toml::from_str(s)?;
        c.check()?;
        Ok(c)
    }

    const NODE: &str = r#"
[node]
name = "coord-1"
data_dir = "/tmp/nowhere"
listen = "127.0.0.1:7100"
site = "edge-a"
memory_bytes = 1000
tokens_per_s = 10.0
"#;

    fn coordinator(id: u64, name: &str) -> String {
        format!(
            "{NODE}\n[coordinator]\nid = {id}\npeers = [{{ id = 1, name = \"{name}\", addr = \"127.0.0.1:7100\" }}]\n"
        )
    }

    #[test]
    fn a_coordinator_listing_itself_is_its_own_member() {
        let c = parse(&coordinator(1, "coord-1")).unwrap();
        assert_eq!(c.coordinators().len(), 1);
        assert_eq!(c.member().name, "coord-1");
    }

    #[test]
    fn a_coordinator_missing_from_its_peers_is_refused() {
        assert!(parse(&coordinator(2, "coord-1"))
            .unwrap_err()
            .to_string()
            .contains("include this member"));
    }

    #[test]
    fn a_coordinator_listed_under_another_name_is_refused() {
        assert!(parse(&coordinator(1, "other"))
            .unwrap_err()
            .to_string()
            .contains("named"));
    }

    #[test]
    fn a_plain_node_needs_an_identity_or_a_join_token() {
        assert!(parse(NODE).unwrap_err().to_string().contains("join token"));
    }

    #[test]
    fn a_misspelt_setting_is_refused() {
        let typo = NODE.replace("site =", "sight =");
        assert!(parse(&typo).is_err());
    }

    #[test]
    fn a_bad_node_name_is_refused() {
        let bad_name = NODE.replace("coord-1", "Coord 1");
        assert!(parse(&format!(
            "{bad_name}\n[join]\ntoken = \"t\"\ncoordinators = []\n"
        ))
        .is_err());
    }

    #[test]
    fn a_coordinator_peer_may_be_a_dns_name() {
        let c = parse(&coordinator(1, "coord-1").replace(
            "127.0.0.1:7100\" }]",
            "coord-1.weft-coord.weft.svc:7100\" }]",
        ))
        .unwrap();
        assert_eq!(c.coordinators()[0].addr, "coord-1.weft-coord.weft.svc:7100");
    }

    #[test]
    fn a_peer_address_without_a_port_is_refused() {
        let e =
            parse(&coordinator(1, "coord-1").replace("127.0.0.1:7100\" }]", "coord-1.svc\" }]"))
                .unwrap_err();
        assert!(format!("{e:#}").contains("HOST:PORT"), "{e:#}");
    }

    #[test]
    fn a_peer_address_that_is_no_host_name_is_refused() {
        let e = parse(&coordinator(1, "coord-1").replace("127.0.0.1:7100\" }]", "a b/c:7100\" }]"))
            .unwrap_err();
        assert!(
            format!("{e:#}").contains("neither an IP address nor a DNS name"),
            "{e:#}"
        );
    }

    fn joiner(join: &str) -> String {
        format!("{NODE}\n[join]\n{join}\ncoordinators = [{{ id = 1, name = \"c\", addr = \"127.0.0.1:7100\" }}]\n")
    }

    #[test]
    fn a_join_section_needs_a_token_or_a_token_dir_not_both() {
        assert!(parse(&joiner("")).is_err());
        assert!(parse(&joiner("token = \"t\"\ntoken_dir = \"/x\"")).is_err());
        assert!(parse(&joiner("token_dir = \"/x\"")).is_ok());
    }

    #[test]
    fn a_token_dir_gives_the_token_named_for_this_node() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("coord-1"), "weft1.mine.mac\n").unwrap();
        std::fs::write(dir.path().join("other"), "weft1.theirs.mac\n").unwrap();
        let c = parse(&joiner(&format!("token_dir = {:?}", dir.path()))).unwrap();
        assert_eq!(c.join.unwrap().token("coord-1").unwrap(), "weft1.mine.mac");
    }

    #[test]
    fn a_missing_token_file_says_which_file() {
        let dir = tempfile::tempdir().unwrap();
        let c = parse(&joiner(&format!("token_dir = {:?}", dir.path()))).unwrap();
        let e = c.join.unwrap().token("coord-1").unwrap_err();
        assert!(format!("{e:#}").contains("coord-1"), "{e:#}");
    }

    fn load(text: &str, o: &Overrides) -> Result<ClusterConfig> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("node.toml");
        std::fs::write(&p, text).unwrap();
        ClusterConfig::load_with(&p, o)
    }

    #[test]
    fn the_name_flag_maps_a_host_name_to_a_node_name() {
        let c = load(
            &joiner("token = \"t\""),
            &Overrides {
                name: Some("ip-10-0-0-7.eu-west-1.compute.internal".into()),
                ..Default::default()
            },
        )
        .unwrap();
        assert!(check_name(&c.node.name).is_ok(), "{}", c.node.name);
        assert!(
            c.node.name.starts_with("ip-10-0-0-7-eu-west-1"),
            "{}",
            c.node.name
        );
    }

    #[test]
    fn an_empty_site_flag_keeps_the_files_site() {
        let c = load(
            &joiner("token = \"t\""),
            &Overrides {
                site: Some(String::new()),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(c.node.site, "edge-a");
    }

    #[test]
    fn a_node_listening_on_every_address_is_advertised_at_its_host() {
        let text =
            joiner("token = \"t\"").replace("127.0.0.1:7100\"\nsite", "0.0.0.0:7100\"\nsite");
        let c = load(
            &text,
            &Overrides {
                advertise_host: Some("10.1.2.3".into()),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(c.member().address, "10.1.2.3:7100");
    }
}
