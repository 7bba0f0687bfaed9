//! `weft up`'s control plane: a coordinator of one member, embedded in the
//! node. It keeps the same replicated state a cluster keeps (the node as a
//! member, the model it serves, the placement epoch that puts the model on
//! it) in a durable raft log under the node's state directory, so `weft
//! status` reads a single node exactly as it reads a cluster.
//!
//! The state directory holds `ca/` and `identity/` (made on first start),
//! `raft/`, and `cluster.toml`, the config `weft status --config` takes.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use weft_coordinator::{Command, Member};
use weft_placement::{Demand, ModelId, SiteId, SiteKind};

use crate::credentials::{ClusterCa, NodeIdentity, Role};
use crate::member::{self, member_id, MemberHandle, MemberSettings};
use crate::transport::{Caller, Peer, Reply, Request};
use weft_store::StoredModel;

/// The embedded member's node name.
pub const NAME: &str = "local";
/// Its site.
pub const SITE: &str = "local";
/// How long registering with the embedded coordinator may take.
const REGISTER_DEADLINE: Duration = Duration::from_secs(10);

/// The default state directory of `weft up` listening on `addr`: one per
/// address, so several nodes on one machine keep apart. `None` for an
/// ephemeral port (its state lasts only as long as the process).
pub fn default_state_dir(addr: &SocketAddr) -> Option<PathBuf> {
    if addr.port() == 0 {
        return None;
    }
    let base = std::env::var_os("WEFT_STATE_DIR")
        .map(PathBuf::from)
        .or_else(|| dirs::data_dir().map(|d| d.join("weft")))?;
    Some(base.join(format!("up-{}-{}", addr.ip(), addr.port())))
}

/// A running embedded coordinator.
pub struct Embedded {
    handle: MemberHandle,
    /// The config `weft status --config` takes.
    pub config_path: PathBuf,
    /// The member's identity (it signs the node's intent-log checkpoints).
    pub identity: NodeIdentity,
    /// Where to reach it.
    pub peer: Peer,
    _temp: Option<tempfile::TempDir>,
}

impl Embedded {
    /// Stops the coordinator (its state stays on disk).
    pub async fn stop(self) -> Result<()> {
        self.handle.stop().await
    }
}

/// What the embedded coordinator records about the node.
pub struct Served<'a> {
    /// The model file, verified.
    pub stored: &'a StoredModel,
    /// Where it came from (`default`, a path, ...).
    pub source: &'a str,
    /// The id it is served under.
    pub model_id: &'a str,
    /// The API's address.
    pub api: SocketAddr,
    /// The KV budget (bytes).
    pub kv_budget: usize,
    /// The node's metrics registry: the coordinator's metrics go there too.
    pub registry: &'a weft_metrics::Registry,
    /// The node's intent log: the coordinator's records go there too.
    pub log: Option<crate::member::SharedLog>,
}

/// Starts the embedded coordinator in `state_dir` (a temporary directory
/// if `None`) and records the node, its model and a placement epoch.
pub async fn start(state_dir: Option<PathBuf>, served: Served<'_>) -> Result<Embedded> {
    let (dir, temp) = match state_dir {
        Some(d) => (d, None),
        None => {
            let t = tempfile::tempdir().context("a temporary state directory")?;
            (t.path().to_path_buf(), Some(t))
        }
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let (ca, identity) = credentials(&dir)?;
    let listen: SocketAddr = "127.0.0.1:0".parse().expect("an address");
    let mut settings = MemberSettings::new(
        1,
        listen,
        dir.clone(),
        vec![Peer {
            id: 1,
            name: NAME.into(),
            addr: listen.to_string(),
        }],
    );
    settings.tick = Duration::from_millis(20);
    settings.registry = served.registry.clone();
    settings.shared_log = served.log.clone();
    let handle = member::start(settings, identity.clone(), Some(ca)).await?;
    let me = Peer {
        id: 1,
        name: NAME.into(),
        addr: handle.local_addr.to_string(),
    };
    let config_path = dir.join("cluster.toml");
    write_config(&config_path, &dir, &me)?;
    let embedded = Embedded {
        handle,
        config_path,
        identity: identity.clone(),
        peer: me.clone(),
        _temp: temp,
    };
    register(&identity, &me, &served).await?;
    Ok(embedded)
}

/// The CA and the member's identity, made on first start.
fn credentials(dir: &Path) -> Result<(ClusterCa, NodeIdentity)> {
    let (ca_dir, id_dir) = (dir.join("ca"), dir.join("identity"));
    if id_dir.exists() {
        let ca = ClusterCa::load(&ca_dir)?;
        let identity = NodeIdentity::load(&id_dir)?;
        let role = crate::credentials::cert_identity(identity.cert_der()).map(|p| p.role);
        if role == Some(Role::Coordinator) {
            return Ok((ca, identity));
        }
        // made before certificates carried roles: this member holds the CA,
        // so it issues itself a coordinator's certificate
        let identity = ca.issue_identity(NAME, Role::Coordinator)?;
        identity.save(&id_dir)?;
        return Ok((ca, identity));
    }
    let ca = ClusterCa::init(&ca_dir, "weft-up")?;
    let identity = ca.issue_identity(NAME, Role::Coordinator)?;
    identity.save(&id_dir)?;
    Ok((ca, identity))
}

fn write_config(path: &Path, dir: &Path, me: &Peer) -> Result<()> {
    let text = format!(
        "# written by `weft up` for `weft status --config {}`\n\
         [node]\nname = \"{NAME}\"\ndata_dir = \"{}\"\nlisten = \"{}\"\nsite = \"{SITE}\"\n\
         memory_bytes = 1\ntokens_per_s = 1.0\n\n\
         [coordinator]\nid = 1\nca_dir = \"{}\"\npeers = [{{ id = 1, name = \"{NAME}\", addr = \"{}\" }}]\n",
        path.display(),
        dir.display(),
        me.addr,
        dir.join("ca").display(),
        me.addr,
    );
    let tmp = path.with_extension("toml.tmp");
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Records the node, its model and the epoch that places the model on it.
async fn register(identity: &NodeIdentity, me: &Peer, s: &Served<'_>) -> Result<()> {
    let record = crate::models::record_for(s.stored, s.source, Some(s.model_id))?;
    let member = Member {
        id: member_id(NAME),
        name: NAME.into(),
        site: SITE.into(),
        kind: SiteKind::Edge,
        region: 0,
        // room for the weights and the KV pool this node was given
        memory_bytes: record.spec.total_bytes() + s.kv_budget as u64,
        tokens_per_s: 1000.0,
        slots: 8,
        accelerator: false,
        cost_per_token: 0.0,
        address: s.api.to_string(),
    };
    let caller = Caller::new(identity)?;
    let peers = [me.clone()];
    for command in [Command::PutMember(member), Command::PutModel(record)] {
        let r = caller
            .ask(&peers, &Request::Propose { command }, REGISTER_DEADLINE)
            .await?;
        if !matches!(r, Reply::Committed { refused: None, .. }) {
            bail!("the embedded coordinator refused: {r:?}");
        }
    }
    let demand = vec![(
        SITE.to_string(),
        s.model_id.to_string(),
        Demand {
            site: SiteId(0),
            model: ModelId(0),
            requests_per_s: 1.0,
            prompt_tokens: 1000.0,
            output_tokens: 128.0,
            deadline_ms: None,
        },
    )];
    let r = caller
        .ask(&peers, &Request::Replan { demand }, REGISTER_DEADLINE)
        .await?;
    if !matches!(r, Reply::Committed { refused: None, .. }) {
        bail!("the embedded coordinator refused the placement: {r:?}");
    }
    Ok(())
}
