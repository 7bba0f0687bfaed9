//! The operator's side of weft's own control plane: it registers and
//! removes models and reads the coordinators' state through the cluster's
//! authenticated admin path (QUIC, mutual TLS, an `admin` certificate the
//! operator issued itself with the cluster CA). A trait, so the reconcile
//! tests can stand in for the coordinators.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use futures::future::BoxFuture;
use weft_cluster::credentials::NodeIdentity;
use weft_cluster::transport::{Caller, Peer, Reply, Request};
use weft_coordinator::{Command, ModelRecord};

/// How to reach one cluster's coordinators.
#[derive(Clone)]
pub struct ClusterAccess {
    /// The coordinators.
    pub peers: Vec<Peer>,
    /// The operator's admin identity for this cluster.
    pub identity: Arc<NodeIdentity>,
}

/// One placement as the coordinators and the nodes' load reports show it.
#[derive(Debug, Clone, PartialEq)]
pub struct Placed {
    /// The node.
    pub node: String,
    /// Its site.
    pub site: String,
    /// Its layers (`a..b`), when the model is split.
    pub layers: Option<String>,
    /// Whether the node reports the model loaded (`None`: no report).
    pub loaded: Option<bool>,
}

/// What the operator reads of a cluster.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FabricStatus {
    /// The leader's node name.
    pub leader: Option<String>,
    /// Voting coordinators' names.
    pub voters: Vec<String>,
    /// Members by name.
    pub members: BTreeSet<String>,
    /// The committed placement epoch.
    pub epoch: Option<u64>,
    /// Registered models by name.
    pub models: BTreeMap<String, ModelRecord>,
    /// Placements by model name.
    pub placements: BTreeMap<String, Vec<Placed>>,
    /// Nonces of join tokens redeemed (and not expired).
    pub used_tokens: BTreeSet<String>,
}

/// weft's control plane, as the operator uses it.
pub trait Fabric: Send + Sync {
    /// The coordinators' state.
    fn status<'a>(&'a self, c: &'a ClusterAccess) -> BoxFuture<'a, anyhow::Result<FabricStatus>>;
    /// Registers (or updates) a model.
    fn put_model<'a>(
        &'a self,
        c: &'a ClusterAccess,
        record: ModelRecord,
    ) -> BoxFuture<'a, anyhow::Result<()>>;
    /// Removes a model: it is unplaced at the next epoch.
    fn remove_model<'a>(
        &'a self,
        c: &'a ClusterAccess,
        name: &'a str,
    ) -> BoxFuture<'a, anyhow::Result<()>>;
    /// A model's record (its shape read from the GGUF file, fetched and
    /// verified first) under `served_name`.
    fn model_record<'a>(
        &'a self,
        source: &'a str,
        served_name: &'a str,
    ) -> BoxFuture<'a, anyhow::Result<ModelRecord>>;
}

/// The real one: QUIC to the coordinators, models fetched into the
/// operator's own cache.
#[derive(Default)]
pub struct Quic;

/// How long one admin request may take, redirects and retries included.
const ASK: std::time::Duration = std::time::Duration::from_secs(15);

async fn ask(c: &ClusterAccess, req: Request) -> anyhow::Result<Reply> {
    let caller = Caller::new(&c.identity)?;
    match caller.ask(&c.peers, &req, ASK).await? {
        Reply::Error { message } => anyhow::bail!("the coordinators refused: {message}"),
        Reply::Committed {
            refused: Some(why), ..
        } => anyhow::bail!("the control state refused it: {why}"),
        r => Ok(r),
    }
}

impl Fabric for Quic {
    fn status<'a>(&'a self, c: &'a ClusterAccess) -> BoxFuture<'a, anyhow::Result<FabricStatus>> {
        Box::pin(async move {
            let Reply::Status(r) = ask(c, Request::Status).await? else {
                anyhow::bail!("the coordinators answered Status with something else");
            };
            Ok(status_of(&r, &c.peers))
        })
    }

    fn put_model<'a>(
        &'a self,
        c: &'a ClusterAccess,
        record: ModelRecord,
    ) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async move {
            ask(
                c,
                Request::Propose {
                    command: Command::PutModel(record),
                },
            )
            .await
            .map(drop)
        })
    }

    fn remove_model<'a>(
        &'a self,
        c: &'a ClusterAccess,
        name: &'a str,
    ) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async move {
            ask(
                c,
                Request::Propose {
                    command: Command::RemoveModel { name: name.into() },
                },
            )
            .await
            .map(drop)
        })
    }

    fn model_record<'a>(
        &'a self,
        source: &'a str,
        served_name: &'a str,
    ) -> BoxFuture<'a, anyhow::Result<ModelRecord>> {
        let (source, name) = (source.to_string(), served_name.to_string());
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                weft_cluster::models::model_record(&source, Some(&name))
            })
            .await?
        })
    }
}

/// The operator's view of a coordinator's status report (`peers` name
/// the founding coordinators' raft ids).
pub fn status_of(r: &weft_cluster::transport::StatusReport, peers: &[Peer]) -> FabricStatus {
    let st = &r.state;
    let name_of = |id: u64| st.members.get(&id).map(|m| m.name.clone());
    let voter = |id: u64| {
        peers
            .iter()
            .find(|p| p.id == id)
            .map(|p| p.name.clone())
            .or_else(|| st.coordinators.get(&id).map(|c| c.name.clone()))
    };
    let mut placements: BTreeMap<String, Vec<Placed>> = BTreeMap::new();
    if let Some(p) = &st.placement {
        for rep in &p.placement.replicas {
            let Some(model) = p.models.get(rep.model.0 as usize) else {
                continue;
            };
            let total = st.models.get(model).map_or(0, |m| m.spec.layers);
            for sh in &rep.shards {
                let Some(id) = p.members.get(sh.node.0 as usize) else {
                    continue;
                };
                let node = name_of(*id).unwrap_or_else(|| id.to_string());
                let site = st
                    .members
                    .get(id)
                    .map(|m| m.site.clone())
                    .unwrap_or_default();
                let whole = sh.layers.start == 0 && sh.layers.end == total;
                placements.entry(model.clone()).or_default().push(Placed {
                    loaded: r
                        .load
                        .get(&node)
                        .map(|l| l.report.models.iter().any(|m| m == model)),
                    node,
                    site,
                    layers: (!whole).then(|| format!("{}..{}", sh.layers.start, sh.layers.end)),
                });
            }
        }
    }
    FabricStatus {
        leader: r.leader.and_then(voter),
        voters: r.voters.iter().filter_map(|v| voter(*v)).collect(),
        members: st.members.values().map(|m| m.name.clone()).collect(),
        epoch: st.placement.as_ref().map(|p| p.epoch),
        models: st.models.clone(),
        placements,
        used_tokens: st.tokens_used.keys().cloned().collect(),
    }
}
