//! `weft operator`: a kube-rs `Controller` per kind. Each reconcile
//! renders what the CR wants ([`crate::render`]), applies it with
//! server-side apply (manager `weft-operator`, forced: the operator owns
//! those fields), reads back the rollout and weft's own state, and writes
//! the CR's status conditions for the generation it saw. Errors requeue
//! with a backoff per object, show in a `Degraded`/`Ready` condition when
//! the API still answers, and as a Warning Event.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Pod, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{
    Api, ApiResource, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams, PostParams,
};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder, Reporter};
use kube::runtime::finalizer::{finalizer, Event as Finalized};
use kube::runtime::{watcher, Controller};
use kube::{Client, Resource, ResourceExt};
use serde_json::{json, Value};
use weft_cluster::credentials::{ClusterCa, NodeIdentity, Role as CertRole, TokenClaims};
use weft_cluster::transport::Peer;

use crate::crd::*;
use crate::fabric::{ClusterAccess, Fabric, FabricStatus};
use crate::render::{self, MANAGER};

/// The finalizer that unplaces a model before its `WeftModel` goes.
pub const MODEL_FINALIZER: &str = "weft.dev/unplace";
/// How often a healthy object is looked at again.
pub const RESYNC: Duration = Duration::from_secs(60);
/// How soon an object whose rollout is under way is looked at again.
pub const ROLLING: Duration = Duration::from_secs(10);
/// Longest backoff after errors.
pub const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// Why a reconcile failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The Kubernetes API.
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// The CR cannot be rendered.
    #[error("{0}")]
    Render(#[from] render::RenderError),
    /// weft's control plane.
    #[error("weft control plane: {0}")]
    Fabric(String),
    /// Credentials.
    #[error("credentials: {0}")]
    Credentials(String),
    /// Something the finalizer helper reported.
    #[error("finalizer: {0}")]
    Finalizer(String),
}

type Result<T, E = Error> = std::result::Result<T, E>;

/// What every reconcile shares.
pub struct Ctx {
    /// The Kubernetes API.
    pub client: Client,
    /// weft's control plane.
    pub fabric: Arc<dyn Fabric>,
    /// Where Events go.
    pub recorder: Recorder,
    /// The time conditions carry.
    pub now: Arc<dyn Fn() -> Timestamp + Send + Sync>,
    /// Unix seconds (join tokens' issue time).
    pub unix_now: Arc<dyn Fn() -> u64 + Send + Sync>,
    failures: Mutex<HashMap<String, u32>>,
    /// Reconciles by kind and outcome, for `/metrics`.
    outcomes: Mutex<BTreeMap<(String, &'static str), u64>>,
}

impl Ctx {
    /// A context with the real clock.
    pub fn new(client: Client, fabric: Arc<dyn Fabric>) -> Self {
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: MANAGER.into(),
                instance: std::env::var("POD_NAME").ok(),
            },
        );
        Self {
            client,
            fabric,
            recorder,
            now: Arc::new(Timestamp::now),
            unix_now: Arc::new(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs())
            }),
            failures: Mutex::new(HashMap::new()),
            outcomes: Mutex::new(BTreeMap::new()),
        }
    }

    fn count(&self, kind: &str, outcome: &'static str) {
        *self
            .outcomes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry((kind.to_string(), outcome))
            .or_insert(0) += 1;
    }

    /// The operator's metrics in Prometheus' text format: reconciles by
    /// kind and outcome, and objects in backoff.
    pub fn metrics_text(&self) -> String {
        let mut out = String::from(
            "# HELP weft_operator_reconciles_total Reconciles by kind and outcome.\n\
             # TYPE weft_operator_reconciles_total counter\n",
        );
        for ((kind, outcome), n) in self
            .outcomes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            out.push_str(&format!(
                "weft_operator_reconciles_total{{kind=\"{kind}\",outcome=\"{outcome}\"}} {n}\n"
            ));
        }
        let backing_off = self
            .failures
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len();
        out.push_str(&format!(
            "# HELP weft_operator_backoff_objects Objects whose last reconcile failed.\n\
             # TYPE weft_operator_backoff_objects gauge\n\
             weft_operator_backoff_objects {backing_off}\n"
        ));
        out
    }

    /// With fixed clocks (tests).
    pub fn with_clock(mut self, now: Timestamp, unix: u64) -> Self {
        self.now = Arc::new(move || now);
        self.unix_now = Arc::new(move || unix);
        self
    }

    /// The backoff after one more failure of `key`: 5 s doubling to
    /// [`MAX_BACKOFF`].
    pub fn backoff(&self, key: &str) -> Duration {
        let mut f = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        let n = f.entry(key.to_string()).or_insert(0);
        *n = (*n + 1).min(16);
        (Duration::from_secs(5) * 2u32.saturating_pow(*n - 1)).min(MAX_BACKOFF)
    }

    fn succeeded(&self, key: &str) {
        self.failures
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key);
    }
}

fn key_of<K: Resource<DynamicType = ()>>(o: &K) -> String {
    format!(
        "{}/{}/{}",
        K::kind(&()),
        o.meta().namespace.as_deref().unwrap_or(""),
        o.meta().name.as_deref().unwrap_or("")
    )
}

/// The error policy every controller uses: back off per object.
pub fn on_error<K: Resource<DynamicType = ()>>(o: Arc<K>, e: &Error, ctx: Arc<Ctx>) -> Action {
    let wait = ctx.backoff(&key_of(&*o));
    tracing::warn!(object = %key_of(&*o), error = %e, retry_s = wait.as_secs(), "reconcile failed");
    Action::requeue(wait)
}

async fn warn<K: Resource<DynamicType = ()>>(ctx: &Ctx, o: &K, reason: &str, e: &Error) {
    let ev = KubeEvent {
        type_: EventType::Warning,
        reason: reason.into(),
        note: Some(truncate(&e.to_string(), 1000)),
        action: "Reconcile".into(),
        secondary: None,
    };
    if let Err(pe) = ctx.recorder.publish(&ev, &o.object_ref(&())).await {
        tracing::warn!(error = %pe, "publishing an Event");
    }
}

fn truncate(s: &str, n: usize) -> String {
    if s.len() <= n {
        return s.to_string();
    }
    let mut end = n;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

/// Wraps a reconcile: a success resets the object's backoff; a failure
/// publishes a Warning Event and goes to [`on_error`].
async fn observed<K, F>(o: &K, ctx: &Ctx, reason: &str, f: F) -> Result<Action>
where
    K: Resource<DynamicType = ()>,
    F: std::future::Future<Output = Result<Action>>,
{
    match f.await {
        Ok(a) => {
            ctx.succeeded(&key_of(o));
            ctx.count(&K::kind(&()), "ok");
            Ok(a)
        }
        Err(e) => {
            ctx.count(&K::kind(&()), "error");
            warn(ctx, o, reason, &e).await;
            Err(e)
        }
    }
}

// ------------------------------------------------------------- conditions

/// A condition of the given generation; its transition time stays what it
/// was while its status does not change.
pub fn condition(
    prev: &[Condition],
    type_: &str,
    status: &str,
    reason: &str,
    message: impl Into<String>,
    generation: Option<i64>,
    now: Timestamp,
) -> Condition {
    let since = prev
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map_or(Time(now), |c| c.last_transition_time.clone());
    Condition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.into(),
        message: truncate(&message.into(), 32768),
        observed_generation: generation,
        last_transition_time: since,
    }
}

/// [`condition`] with the previous conditions, generation and time fixed.
fn conditions_at(
    prev: &[Condition],
    generation: Option<i64>,
    now: Timestamp,
) -> impl Fn(&str, &str, &str, String) -> Condition + '_ {
    move |t, ok, reason, msg| condition(prev, t, ok, reason, msg, generation, now)
}

fn tf(b: bool) -> &'static str {
    if b {
        "True"
    } else {
        "False"
    }
}

// ------------------------------------------------------------------ apply

/// Applies one rendered object (server-side apply, forced) and returns
/// what the API server holds afterwards, status included.
pub async fn apply(client: &Client, obj: &Value) -> Result<Value> {
    let (group, version) = match obj["apiVersion"].as_str().unwrap_or("").split_once('/') {
        Some((g, v)) => (g.to_string(), v.to_string()),
        None => (
            String::new(),
            obj["apiVersion"].as_str().unwrap_or("").to_string(),
        ),
    };
    let gvk = GroupVersionKind::gvk(&group, &version, obj["kind"].as_str().unwrap_or(""));
    let ar = ApiResource::from_gvk(&gvk);
    let ns = obj["metadata"]["namespace"].as_str().unwrap_or("default");
    let name = obj["metadata"]["name"].as_str().unwrap_or("");
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, &ar);
    let got = api
        .patch(
            name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(obj),
        )
        .await?;
    Ok(serde_json::to_value(got).expect("objects serialize"))
}

async fn patch_status<K>(api: &Api<K>, name: &str, status: Value) -> Result<()>
where
    K: Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let body = json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": status,
    });
    api.patch_status(
        name,
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&body),
    )
    .await?;
    Ok(())
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

fn secret_strings(s: &Secret) -> BTreeMap<String, String> {
    s.data
        .iter()
        .flatten()
        .filter_map(|(k, v)| Some((k.clone(), String::from_utf8(v.0.clone()).ok()?)))
        .collect()
}

fn cred(e: impl std::fmt::Display) -> Error {
    Error::Credentials(e.to_string())
}

// ------------------------------------------------------------ credentials

/// What a cluster's credentials Secrets hold once they exist.
pub struct Credentials {
    /// The CA.
    pub ca: ClusterCa,
    /// The operator's admin identity.
    pub admin: NodeIdentity,
}

enum Made<T> {
    Ready(T),
    /// Another writer created it first (409): read it again soon.
    Raced,
}

/// Creates a Secret that must not be overwritten once it exists (it holds
/// keys made once).
async fn create_secret(api: &Api<Secret>, obj: Value) -> Result<Made<()>> {
    let s: Secret = serde_json::from_value(obj).expect("a rendered Secret");
    match api.create(&PostParams::default(), &s).await {
        Ok(_) => Ok(Made::Ready(())),
        Err(e) if is_conflict(&e) => Ok(Made::Raced),
        Err(e) => Err(e.into()),
    }
}

/// The cluster's CA, its coordinators' identities and the operator's
/// admin identity: read from their Secrets, made (once) where missing.
async fn ensure_credentials(c: &WeftCluster, ctx: &Ctx) -> Result<Made<Credentials>> {
    let name = c.name_any();
    let ns = c.namespace().unwrap_or_default();
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let owners = render::owner(
        &WeftCluster::api_version(&()),
        "WeftCluster",
        &name,
        c.meta().uid.as_deref().unwrap_or_default(),
    );
    let labels = (name.as_str(), "credentials");

    let ca = match api.get_opt(&render::ca_secret(&name)).await? {
        Some(s) => {
            let d = secret_strings(&s);
            let (Some(cert), Some(key)) = (d.get("ca.pem"), d.get("ca.key")) else {
                return Err(cred(format!(
                    "Secret {} lacks ca.pem or ca.key",
                    render::ca_secret(&name)
                )));
            };
            ClusterCa::from_pem(cert.clone(), key).map_err(cred)?
        }
        None => {
            let (cert, key) = ClusterCa::generate(&name).map_err(cred)?;
            let data = BTreeMap::from([
                ("ca.pem".to_string(), cert.clone()),
                ("ca.key".to_string(), key.clone()),
            ]);
            let obj = render::secret(&render::ca_secret(&name), &ns, labels, &owners, &data);
            if let Made::Raced = create_secret(&api, obj).await? {
                return Ok(Made::Raced);
            }
            ClusterCa::from_pem(cert, &key).map_err(cred)?
        }
    };

    // every coordinator's identity: the ones already issued are kept
    let ids_name = render::coord_identities_secret(&name);
    let existing = api.get_opt(&ids_name).await?;
    let mut ids = existing.as_ref().map(secret_strings).unwrap_or_default();
    let mut issued = false;
    for k in 0..c.spec.coordinators.replicas {
        let pod = render::coord_pod(&name, k);
        if ids.contains_key(&format!("{pod}.node.key")) {
            continue;
        }
        ids.extend(coordinator_identity(&ca, &pod).map_err(cred)?);
        issued = true;
    }
    let obj = render::secret(&ids_name, &ns, labels, &owners, &ids);
    if existing.is_none() {
        if let Made::Raced = create_secret(&api, obj).await? {
            return Ok(Made::Raced);
        }
    } else if issued {
        apply(&ctx.client, &obj).await?;
    }

    let admin_name = render::admin_secret(&name);
    let admin = match api.get_opt(&admin_name).await? {
        Some(s) => {
            let d = secret_strings(&s);
            let get = |k: &str| d.get(k).cloned().unwrap_or_default();
            NodeIdentity::from_pem(
                &get("name"),
                &get("node.pem"),
                &get("node.key"),
                &get("ca.pem"),
            )
            .map_err(cred)?
        }
        None => {
            let id = ca
                .issue_identity(&format!("{name}-operator"), CertRole::Admin)
                .map_err(cred)?;
            let data = BTreeMap::from([
                ("name".to_string(), id.name.clone()),
                ("node.pem".to_string(), id.cert_pem.clone()),
                ("node.key".to_string(), id.key_pem.clone()),
                ("ca.pem".to_string(), id.ca_pem.clone()),
            ]);
            let obj = render::secret(&admin_name, &ns, labels, &owners, &data);
            if let Made::Raced = create_secret(&api, obj).await? {
                return Ok(Made::Raced);
            }
            id
        }
    };
    Ok(Made::Ready(Credentials { ca, admin }))
}

/// A new identity for coordinator pod `pod`, as the entries of the
/// coordinators' identities Secret (its certificate, key, CA certificate
/// and name, which the StatefulSet mounts under `/etc/weft/identities/<pod>/`).
pub fn coordinator_identity(ca: &ClusterCa, pod: &str) -> anyhow::Result<[(String, String); 4]> {
    let id = ca.issue_identity(pod, CertRole::Coordinator)?;
    Ok([
        (format!("{pod}.node.pem"), id.cert_pem),
        (format!("{pod}.node.key"), id.key_pem),
        (format!("{pod}.ca.pem"), id.ca_pem),
        (format!("{pod}.name"), pod.to_string()),
    ])
}

/// The coordinators of cluster `c` as weft peers (stable DNS names).
pub fn peers_of(c: &WeftCluster) -> Vec<Peer> {
    let name = c.name_any();
    let ns = c.namespace().unwrap_or_default();
    (0..c.spec.coordinators.replicas)
        .map(|k| Peer {
            id: k as u64 + 1,
            name: render::coord_pod(&name, k),
            addr: render::coord_addr(&name, &ns, k),
        })
        .collect()
}

/// The status conditions a CR holds now.
trait Conditioned {
    fn conditions(&self) -> Vec<Condition>;
}

macro_rules! conditioned {
    ($($k:ty),*) => {$(
        impl Conditioned for $k {
            fn conditions(&self) -> Vec<Condition> {
                self.status.as_ref().map(|s| s.conditions.clone()).unwrap_or_default()
            }
        }
    )*};
}
conditioned!(WeftCluster, FabricNodePool, WeftModel, AgentPolicy);

/// What every reconcile reads of its object first.
struct Start<K: Resource> {
    name: String,
    ns: String,
    api: Api<K>,
    generation: Option<i64>,
    prev: Vec<Condition>,
    now: Timestamp,
}

fn start<K>(o: &K, ctx: &Ctx) -> Start<K>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope> + Conditioned,
{
    let ns = o.namespace().unwrap_or_default();
    Start {
        name: o.name_any(),
        api: Api::namespaced(ctx.client.clone(), &ns),
        ns,
        generation: o.meta().generation,
        prev: o.conditions(),
        now: (ctx.now)(),
    }
}

// ---------------------------------------------------------------- WeftCluster

/// Reconciles a `WeftCluster`.
pub async fn reconcile_cluster(c: Arc<WeftCluster>, ctx: Arc<Ctx>) -> Result<Action> {
    observed(&*c, &ctx, "ReconcileFailed", cluster_inner(&c, &ctx)).await
}

async fn cluster_inner(c: &WeftCluster, ctx: &Ctx) -> Result<Action> {
    let Start {
        name,
        api,
        generation,
        prev,
        now,
        ..
    } = start(c, ctx);

    let objects = match render::cluster(c) {
        Ok(o) => o,
        Err(e) => {
            let status = json!({
                "observedGeneration": generation,
                "conditions": [
                    condition(&prev, "Ready", "False", "InvalidSpec", e.to_string(), generation, now),
                    condition(&prev, "Degraded", "True", "InvalidSpec", e.to_string(), generation, now),
                ],
            });
            patch_status(&api, &name, status).await?;
            // nothing will change until the spec does
            return Ok(Action::await_change());
        }
    };
    let creds = match ensure_credentials(c, ctx).await? {
        Made::Ready(c) => c,
        Made::Raced => return Ok(Action::requeue(Duration::from_secs(1))),
    };
    let mut sts = Value::Null;
    for o in &objects {
        let got = apply(&ctx.client, o).await?;
        if o["kind"] == "StatefulSet" {
            sts = got;
        }
    }
    // the tenants Secret follows the policies, deleted ones included
    write_tenants(c, ctx).await?;
    let want = c.spec.coordinators.replicas as i64;
    let st = &sts["status"];
    let num = |k: &str| st[k].as_i64().unwrap_or(0);
    let current_gen = sts["metadata"]["generation"].as_i64();
    let rolled = st["observedGeneration"].as_i64() == current_gen
        && num("updatedReplicas") == want
        && st["currentRevision"] == st["updateRevision"];
    let ready = num("readyReplicas");

    let access = ClusterAccess {
        peers: peers_of(c),
        identity: Arc::new(creds.admin),
    };
    let fabric: Option<std::result::Result<FabricStatus, String>> = if ready * 2 > want {
        Some(ctx.fabric.status(&access).await.map_err(|e| e.to_string()))
    } else {
        None
    };
    let quorum = match &fabric {
        Some(Ok(f)) if f.leader.is_some() => condition(
            &prev,
            "RaftQuorum",
            "True",
            "LeaderElected",
            format!(
                "{} of {want} coordinators vote; {} leads",
                f.voters.len(),
                f.leader.as_deref().unwrap_or("")
            ),
            generation,
            now,
        ),
        Some(Ok(_)) => condition(
            &prev,
            "RaftQuorum",
            "False",
            "NoLeader",
            "the coordinators answer but have no leader",
            generation,
            now,
        ),
        Some(Err(e)) => condition(
            &prev,
            "RaftQuorum",
            "Unknown",
            "Unreachable",
            format!("asking the coordinators: {e}"),
            generation,
            now,
        ),
        None => condition(
            &prev,
            "RaftQuorum",
            "False",
            "NotEnoughCoordinators",
            format!(
                "{ready} of {want} coordinators are ready; a quorum needs {}",
                want / 2 + 1
            ),
            generation,
            now,
        ),
    };
    let has_quorum = quorum.status == "True";
    let progressing = if rolled {
        condition(
            &prev,
            "Progressing",
            "False",
            "RolloutComplete",
            "every coordinator runs the current spec",
            generation,
            now,
        )
    } else {
        condition(
            &prev,
            "Progressing",
            "True",
            "Updating",
            format!("{} of {want} coordinators updated", num("updatedReplicas")),
            generation,
            now,
        )
    };
    let degraded = if ready < want && rolled {
        condition(
            &prev,
            "Degraded",
            "True",
            "PodsNotReady",
            format!("{ready} of {want} coordinators are ready"),
            generation,
            now,
        )
    } else {
        condition(
            &prev,
            "Degraded",
            "False",
            "AsExpected",
            "",
            generation,
            now,
        )
    };
    let is_ready = rolled && ready == want && has_quorum;
    let ready_c = condition(
        &prev,
        "Ready",
        tf(is_ready),
        if is_ready {
            "Ready"
        } else if !rolled {
            "Updating"
        } else if ready < want {
            "PodsNotReady"
        } else {
            "NoQuorum"
        },
        if is_ready {
            "the coordinators are rolled out and have a leader".to_string()
        } else {
            quorum.message.clone()
        },
        generation,
        now,
    );
    let f = fabric.and_then(|f| f.ok()).unwrap_or_default();
    let mut status = json!({
        "observedGeneration": generation,
        "conditions": [ready_c, quorum, progressing, degraded],
        "members": f.voters,
    });
    if let Some(l) = f.leader {
        status["leader"] = json!(l);
    }
    if let Some(e) = f.epoch {
        status["placementEpoch"] = json!(e);
    }
    patch_status(&api, &name, status).await?;
    Ok(Action::requeue(if is_ready { RESYNC } else { ROLLING }))
}

// ------------------------------------------------------------- FabricNodePool

/// The weft node names a pool's pods take.
async fn pool_node_names(p: &FabricNodePool, ctx: &Ctx) -> Result<Vec<String>> {
    if render::is_daemonset(p) {
        let sel: Vec<String> = p
            .spec
            .node_selector
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let nodes: Api<Node> = Api::all(ctx.client.clone());
        let list = nodes
            .list(&ListParams::default().labels(&sel.join(",")))
            .await?;
        Ok(list
            .items
            .iter()
            .map(|n| render::weft_node_name(&n.name_any()))
            .collect())
    } else {
        Ok((0..p.spec.replicas.unwrap_or(1))
            .map(|k| format!("{}-{k}", p.name_any()))
            .collect())
    }
}

/// Reconciles a `FabricNodePool`.
pub async fn reconcile_pool(p: Arc<FabricNodePool>, ctx: Arc<Ctx>) -> Result<Action> {
    observed(&*p, &ctx, "ReconcileFailed", pool_inner(&p, &ctx)).await
}

async fn pool_inner(p: &FabricNodePool, ctx: &Ctx) -> Result<Action> {
    let Start {
        name,
        ns,
        api,
        generation,
        prev,
        now,
    } = start(p, ctx);
    let selector = render::pool_selector(p);
    let not_ready = |reason: &str, msg: String| {
        json!({
            "observedGeneration": generation,
            "selector": selector,
            "conditions": [condition(&prev, "Ready", "False", reason, msg, generation, now)],
        })
    };

    let clusters: Api<WeftCluster> = Api::namespaced(ctx.client.clone(), &ns);
    let Some(cluster) = clusters.get_opt(&p.spec.cluster_ref).await? else {
        let msg = format!("no WeftCluster {:?} in namespace {ns}", p.spec.cluster_ref);
        patch_status(&api, &name, not_ready("ClusterNotFound", msg)).await?;
        return Ok(Action::requeue(ROLLING));
    };
    let objects = match render::pool(p, &cluster) {
        Ok(o) => o,
        Err(e) => {
            patch_status(&api, &name, not_ready("InvalidSpec", e.to_string())).await?;
            return Ok(Action::await_change());
        }
    };
    // the join tokens: one per node name, kept until it expires unused
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let Some(ca_secret) = secrets
        .get_opt(&render::ca_secret(&cluster.name_any()))
        .await?
    else {
        let msg = format!(
            "the cluster's CA (Secret {}) is not made yet",
            render::ca_secret(&cluster.name_any())
        );
        patch_status(&api, &name, not_ready("CredentialsPending", msg)).await?;
        return Ok(Action::requeue(ROLLING));
    };
    let d = secret_strings(&ca_secret);
    let ca = ClusterCa::from_pem(
        d.get("ca.pem").cloned().unwrap_or_default(),
        d.get("ca.key").map(String::as_str).unwrap_or_default(),
    )
    .map_err(cred)?;
    let join_name = render::join_secret(&name);
    let mut tokens = secrets
        .get_opt(&join_name)
        .await?
        .as_ref()
        .map(secret_strings)
        .unwrap_or_default();
    let names = pool_node_names(p, ctx).await?;
    let unix = (ctx.unix_now)();
    tokens.retain(|k, _| names.contains(k));
    // a token its node redeemed is replaced, so a pod that comes back
    // without its identity (a new pod, an emptied volume) can join again
    let used = match access_for(&cluster, ctx).await? {
        Some(a) => match ctx.fabric.status(&a).await {
            Ok(s) => s.used_tokens,
            Err(e) => {
                tracing::debug!(error = %e, "coordinators not asked which tokens were used");
                Default::default()
            }
        },
        None => Default::default(),
    };
    for n in &names {
        let fresh = tokens
            .get(n)
            .and_then(|t| TokenClaims::peek(t).ok())
            .is_some_and(|c| c.expires > unix && !used.contains(&c.nonce));
        if !fresh {
            let t = ca
                .issue_token(unix, render::JOIN_TOKEN_TTL_S, n, CertRole::Node)
                .map_err(cred)?;
            tokens.insert(n.clone(), t);
        }
    }
    let own = render::owner(
        &FabricNodePool::api_version(&()),
        "FabricNodePool",
        &name,
        p.meta().uid.as_deref().unwrap_or_default(),
    );
    apply(
        &ctx.client,
        &render::secret(
            &join_name,
            &ns,
            (&cluster.name_any(), "node"),
            &own,
            &tokens,
        ),
    )
    .await?;

    let mut workload = Value::Null;
    for o in &objects {
        let got = apply(&ctx.client, o).await?;
        if o["kind"] == "DaemonSet" || o["kind"] == "StatefulSet" {
            workload = got;
        }
    }
    let st = &workload["status"];
    let num = |k: &str| st[k].as_i64().unwrap_or(0) as i32;
    let (want, ready, updated) = if render::is_daemonset(p) {
        (
            num("desiredNumberScheduled"),
            num("numberReady"),
            num("updatedNumberScheduled"),
        )
    } else {
        (
            p.spec.replicas.unwrap_or(1),
            num("readyReplicas"),
            num("updatedReplicas"),
        )
    };
    let seen = st["observedGeneration"].as_i64() == workload["metadata"]["generation"].as_i64();
    let (ok, reason, msg) = if !seen || updated < want {
        (
            false,
            "Updating",
            format!("{updated} of {want} pods run the current spec"),
        )
    } else if want == 0 && render::is_daemonset(p) {
        (
            false,
            "InsufficientCapacity",
            "no node matches the pool's nodeSelector".to_string(),
        )
    } else if ready < want {
        // tell a pod that cannot be scheduled from one that is starting
        let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
        let list = pods.list(&ListParams::default().labels(&selector)).await?;
        let unschedulable = list.items.iter().find_map(|pod| {
            pod.status
                .as_ref()?
                .conditions
                .as_ref()?
                .iter()
                .find(|c| {
                    c.type_ == "PodScheduled"
                        && c.status == "False"
                        && c.reason.as_deref() == Some("Unschedulable")
                })
                .map(|c| c.message.clone().unwrap_or_default())
        });
        match unschedulable {
            Some(why) => (
                false,
                "InsufficientCapacity",
                format!("{} of {want} pods cannot be scheduled: {why}", want - ready),
            ),
            None => (
                false,
                "PodsNotReady",
                format!("{ready} of {want} pods are ready"),
            ),
        }
    } else {
        (
            true,
            "Ready",
            format!("{ready} of {want} pods are ready on the current spec"),
        )
    };
    let status = json!({
        "observedGeneration": generation,
        "replicas": want,
        "readyReplicas": ready,
        "updatedReplicas": updated,
        "selector": selector,
        "conditions": [
            condition(&prev, "Ready", tf(ok), reason, msg, generation, now),
            condition(&prev, "Progressing", tf(reason == "Updating"), if reason == "Updating" { "Updating" } else { "RolloutComplete" }, "", generation, now),
        ],
    });
    patch_status(&api, &name, status).await?;
    Ok(Action::requeue(if ok { RESYNC } else { ROLLING }))
}

// ------------------------------------------------------------------ WeftModel

async fn access_for(cluster: &WeftCluster, ctx: &Ctx) -> Result<Option<ClusterAccess>> {
    let secrets: Api<Secret> =
        Api::namespaced(ctx.client.clone(), &cluster.namespace().unwrap_or_default());
    let Some(s) = secrets
        .get_opt(&render::admin_secret(&cluster.name_any()))
        .await?
    else {
        return Ok(None);
    };
    let d = secret_strings(&s);
    let get = |k: &str| d.get(k).cloned().unwrap_or_default();
    let identity = NodeIdentity::from_pem(
        &get("name"),
        &get("node.pem"),
        &get("node.key"),
        &get("ca.pem"),
    )
    .map_err(cred)?;
    Ok(Some(ClusterAccess {
        peers: peers_of(cluster),
        identity: Arc::new(identity),
    }))
}

/// Reconciles a `WeftModel` (through the `weft.dev/unplace` finalizer).
pub async fn reconcile_model(m: Arc<WeftModel>, ctx: Arc<Ctx>) -> Result<Action> {
    let api: Api<WeftModel> =
        Api::namespaced(ctx.client.clone(), &m.namespace().unwrap_or_default());
    let c2 = ctx.clone();
    let m2 = m.clone();
    observed(&*m2, &ctx, "ReconcileFailed", async move {
        finalizer(&api, MODEL_FINALIZER, m, |ev| async {
            match ev {
                Finalized::Apply(m) => model_apply(&m, &c2).await,
                Finalized::Cleanup(m) => model_cleanup(&m, &c2).await,
            }
        })
        .await
        .map_err(|e| match e {
            kube::runtime::finalizer::Error::ApplyFailed(e)
            | kube::runtime::finalizer::Error::CleanupFailed(e) => e,
            other => Error::Finalizer(other.to_string()),
        })
    })
    .await
}

async fn model_apply(m: &WeftModel, ctx: &Ctx) -> Result<Action> {
    let Start {
        name,
        ns,
        api,
        generation,
        prev,
        now,
    } = start(m, ctx);
    let c = conditions_at(&prev, generation, now);
    let write = |conds: Vec<Condition>, extra: Value| {
        let mut s = json!({"observedGeneration": generation, "conditions": conds});
        if let Value::Object(x) = extra {
            for (k, v) in x {
                s[k] = v;
            }
        }
        s
    };

    let clusters: Api<WeftCluster> = Api::namespaced(ctx.client.clone(), &ns);
    let list = clusters.list(&ListParams::default()).await?;
    let cluster = match render::model_cluster(m, &list.items) {
        Ok(c) => c.clone(),
        Err(e) => {
            let s = write(
                vec![
                    c("Accepted", "False", "ClusterNotFound", e.to_string()),
                    c("Ready", "False", "ClusterNotFound", e.to_string()),
                ],
                json!({}),
            );
            patch_status(&api, &name, s).await?;
            return Ok(Action::requeue(ROLLING));
        }
    };
    let Some(access) = access_for(&cluster, ctx).await? else {
        let msg = "the cluster's admin identity is not made yet".to_string();
        let s = write(
            vec![
                c("Accepted", "True", "Accepted", String::new()),
                c("Ready", "False", "CredentialsPending", msg),
            ],
            json!({}),
        );
        patch_status(&api, &name, s).await?;
        return Ok(Action::requeue(ROLLING));
    };
    let status = ctx
        .fabric
        .status(&access)
        .await
        .map_err(|e| Error::Fabric(e.to_string()))?;
    let served = &m.spec.served_name;
    let registered = status.models.get(served).cloned();
    let want_sha = m.spec.sha256.clone();
    let same_file = registered
        .as_ref()
        .is_some_and(|r| want_sha.as_ref().is_none_or(|w| w == &r.sha256));
    let mut up_to_date = same_file && registered.as_ref().is_some_and(|r| placed_as_wanted(r, m));
    if same_file && !up_to_date {
        // only its replicas or placement hints changed (kubectl scale, an
        // autoscaler): the registered record with them, nothing fetched again
        let mut r = registered.clone().expect("registered");
        place_as_wanted(&mut r, m);
        ctx.fabric
            .put_model(&access, r)
            .await
            .map_err(|e| Error::Fabric(e.to_string()))?;
        up_to_date = true;
    }
    if !up_to_date {
        let record = match ctx.fabric.model_record(&m.spec.source, served).await {
            Ok(r) => r,
            Err(e) => {
                let s = write(
                    vec![
                        c("Accepted", "True", "Accepted", String::new()),
                        c("ArtifactsReady", "False", "FetchFailed", format!("{e:#}")),
                        c("Ready", "False", "FetchFailed", format!("{e:#}")),
                    ],
                    json!({}),
                );
                patch_status(&api, &name, s).await?;
                // an error, so the object backs off (and an Event says why)
                return Err(Error::Fabric(format!("fetching {}: {e:#}", m.spec.source)));
            }
        };
        if let Some(w) = &want_sha {
            if &record.sha256 != w {
                let msg = format!(
                    "{} has sha256 {}, the spec says {w}",
                    m.spec.source, record.sha256
                );
                let s = write(
                    vec![
                        c("Accepted", "True", "Accepted", String::new()),
                        c("ArtifactsReady", "False", "Sha256Mismatch", msg.clone()),
                        c("Ready", "False", "Sha256Mismatch", msg),
                    ],
                    json!({}),
                );
                patch_status(&api, &name, s).await?;
                return Ok(Action::await_change());
            }
        }
        let mut record = record;
        place_as_wanted(&mut record, m);
        ctx.fabric
            .put_model(&access, record)
            .await
            .map_err(|e| Error::Fabric(e.to_string()))?;
        up_to_date = true;
    }
    // its autoscaler (KEDA or an HPA) on the scale subresource; the other
    // kind goes, so a changed actuator leaves no second one behind
    let scalers = render::model(m, &cluster)?;
    for o in &scalers {
        apply(&ctx.client, o).await?;
    }
    // what there is to take away: the other kind when autoscaling is on;
    // the one the status says was made when it was turned off
    let made = m.status.as_ref().and_then(|s| s.autoscaler.clone());
    let actuator = m.spec.autoscaling.as_ref().map(|a| a.actuator);
    if actuator.is_some() || made.is_some() {
        let drop_keda = actuator != Some(Actuator::Keda)
            && (actuator.is_some() || made.as_deref() == Some("ScaledObject"));
        let drop_hpa = actuator != Some(Actuator::Hpa)
            && (actuator.is_some() || made.as_deref() == Some("HorizontalPodAutoscaler"));
        if drop_keda {
            delete_if_there(ctx, &ns, "keda.sh", "v1alpha1", "ScaledObject", &name).await?;
        }
        if drop_hpa {
            delete_if_there(
                ctx,
                &ns,
                "autoscaling",
                "v2",
                "HorizontalPodAutoscaler",
                &name,
            )
            .await?;
        }
    }
    let placed = status.placements.get(served).cloned().unwrap_or_default();
    let placements: Vec<ModelPlacement> = placed
        .iter()
        .map(|p| ModelPlacement {
            node: p.node.clone(),
            site: (!p.site.is_empty()).then(|| p.site.clone()),
            layers: p.layers.clone(),
            state: match p.loaded {
                Some(true) => PlacementState::Loaded,
                Some(false) => PlacementState::Loading,
                None => PlacementState::Pending,
            },
            reason: None,
        })
        .collect();
    let loaded = placements
        .iter()
        .filter(|p| p.state == PlacementState::Loaded)
        .count() as i32;
    let is_placed = !placements.is_empty();
    let ready = loaded > 0 && up_to_date;
    let s = write(
        vec![
            c("Accepted", "True", "Accepted", String::new()),
            c(
                "ArtifactsReady",
                "True",
                "Verified",
                format!("registered as {served}"),
            ),
            c(
                "Placed",
                tf(is_placed),
                if is_placed {
                    "Placed"
                } else {
                    "AwaitingPlacement"
                },
                if is_placed {
                    format!(
                        "{} placements in epoch {}",
                        placements.len(),
                        status.epoch.unwrap_or(0)
                    )
                } else {
                    "no placement epoch holds it yet".into()
                },
            ),
            c(
                "Ready",
                tf(ready),
                if ready {
                    "Serving"
                } else if is_placed {
                    "Loading"
                } else {
                    "AwaitingPlacement"
                },
                format!("{loaded} of {} placements loaded", placements.len()),
            ),
        ],
        json!({"replicas": loaded, "placements": placements, "placementEpoch": status.epoch,
               "selector": format!("app.kubernetes.io/instance={},weft.dev/serves=true", cluster.name_any()),
               "autoscaler": scalers.first().map(|o| o["kind"].clone())}),
    );
    patch_status(&api, &name, s).await?;
    Ok(Action::requeue(if ready { RESYNC } else { ROLLING }))
}

/// How the model's spec asks weft to place it: its floor, the kind of site
/// its floor replicas go to first, and the sites they may go to.
pub fn place_as_wanted(r: &mut weft_coordinator::ModelRecord, m: &WeftModel) {
    r.spec.min_replicas = desired_floor(m);
    r.spec.prefer = match m.spec.placement.prefer {
        Prefer::Edge => Some(weft_placement::SiteKind::Edge),
        Prefer::Cloud => Some(weft_placement::SiteKind::Cloud),
        Prefer::Any => None,
    };
    r.sites = m.spec.placement.sites.clone();
}

/// Whether the registered record places the model as its spec asks.
fn placed_as_wanted(r: &weft_coordinator::ModelRecord, m: &WeftModel) -> bool {
    let mut want = r.clone();
    place_as_wanted(&mut want, m);
    &want == r
}

/// The replicas weft keeps placed for a model whatever the demand: its
/// `replicas` (which an autoscaler moves), else its autoscaling minimum,
/// else one.
pub fn desired_floor(m: &WeftModel) -> u32 {
    m.spec
        .replicas
        .or(m.spec.autoscaling.as_ref().map(|a| a.min_replicas))
        .unwrap_or(1)
        .max(0) as u32
}

/// Deletes an object if it exists (and if its kind is served at all: a
/// cluster without KEDA has no ScaledObjects).
async fn delete_if_there(
    ctx: &Ctx,
    ns: &str,
    group: &str,
    version: &str,
    kind: &str,
    name: &str,
) -> Result<()> {
    let ar = ApiResource::from_gvk(&GroupVersionKind::gvk(group, version, kind));
    let api: Api<DynamicObject> = Api::namespaced_with(ctx.client.clone(), ns, &ar);
    match api.delete(name, &Default::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

async fn model_cleanup(m: &WeftModel, ctx: &Ctx) -> Result<Action> {
    let ns = m.namespace().unwrap_or_default();
    let clusters: Api<WeftCluster> = Api::namespaced(ctx.client.clone(), &ns);
    let list = clusters.list(&ListParams::default()).await?;
    // no cluster, or no credentials: nothing holds the model any more
    let Ok(cluster) = render::model_cluster(m, &list.items) else {
        return Ok(Action::await_change());
    };
    let Some(access) = access_for(cluster, ctx).await? else {
        return Ok(Action::await_change());
    };
    ctx.fabric
        .remove_model(&access, &m.spec.served_name)
        .await
        .map_err(|e| Error::Fabric(e.to_string()))?;
    Ok(Action::await_change())
}

// ---------------------------------------------------------------- AgentPolicy

/// Reconciles an `AgentPolicy`: every policy of its cluster is compiled
/// into the cluster's tenants Secret, which the nodes load without a
/// restart.
pub async fn reconcile_policy(p: Arc<AgentPolicy>, ctx: Arc<Ctx>) -> Result<Action> {
    observed(&*p, &ctx, "ReconcileFailed", policy_inner(&p, &ctx)).await
}

/// What in a policy weft's nodes cannot enforce, if anything.
pub fn unsupported(p: &AgentPolicy, _c: &WeftCluster) -> Option<String> {
    let s = p.spec.sandboxes.as_ref()?;
    if s.max_sandboxes == Some(0) {
        return None;
    }
    Some(
        "sandboxes: agent sandboxes need a node that runs as root (each sandbox gets a kernel uid of its own), and weft's pods run as non-root; leave sandboxes out, or set maxSandboxes: 0"
            .into(),
    )
}

/// The shortest API key a node takes.
pub const MIN_KEY_LEN: usize = 8;

/// What writing a cluster's tenants Secret found.
#[derive(Debug, Default)]
pub struct TenantsWritten {
    /// Per policy: the references it names that do not resolve.
    pub missing: BTreeMap<String, Vec<String>>,
    /// Per policy: why it was left out although its references resolve.
    pub refused: BTreeMap<String, String>,
    /// The file's sha256 (first 8 bytes, hex).
    pub digest: String,
}

/// Compiles every `AgentPolicy` of cluster `c` (and its `api.apiKeysSecret`)
/// into the tenants Secret its nodes load; a policy whose keys do not
/// resolve, or that asks for what the nodes cannot enforce, is left out.
/// Run by both the cluster's and the policies' reconciles, so a deleted
/// policy's keys are gone within a resync.
pub async fn write_tenants(c: &WeftCluster, ctx: &Ctx) -> Result<TenantsWritten> {
    let cname = c.name_any();
    let ns = c.namespace().unwrap_or_default();
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let mut out = TenantsWritten::default();
    let mut extra = BTreeMap::new();
    if let Some(name) = &c.spec.api.api_keys_secret {
        match secrets.get_opt(name).await? {
            Some(s) => {
                for (tenant, key) in secret_strings(&s) {
                    if key.trim().len() >= MIN_KEY_LEN {
                        extra.insert(key.trim().to_string(), tenant);
                    } else {
                        tracing::warn!(secret = %name, %tenant, "an API key shorter than {MIN_KEY_LEN} characters is left out");
                    }
                }
            }
            None => {
                tracing::warn!(secret = %name, cluster = %cname, "the cluster's apiKeysSecret does not exist")
            }
        }
    }
    let policies: Api<AgentPolicy> = Api::namespaced(ctx.client.clone(), &ns);
    let all = policies.list(&ListParams::default()).await?;
    let mut keys = BTreeMap::new();
    let mut resolved = Vec::new();
    for q in all.items.iter().filter(|q| q.spec.cluster_ref == cname) {
        let qname = q.name_any();
        let mut ok = true;
        if let Some(why) = unsupported(q, c) {
            out.refused.insert(qname.clone(), why);
            ok = false;
        }
        for sub in &q.spec.subjects {
            let got = secrets.get_opt(&sub.secret_name).await?;
            let v = got
                .as_ref()
                .and_then(|s| secret_strings(s).get(&sub.secret_key).cloned());
            match v.map(|v| v.trim().to_string()) {
                Some(v) if v.len() >= MIN_KEY_LEN => {
                    keys.insert((sub.secret_name.clone(), sub.secret_key.clone()), v);
                }
                Some(v) if !v.is_empty() => {
                    ok = false;
                    out.refused.insert(
                        qname.clone(),
                        format!(
                            "the key {:?} in Secret {:?} is shorter than {MIN_KEY_LEN} characters",
                            sub.secret_key, sub.secret_name
                        ),
                    );
                }
                _ => {
                    ok = false;
                    out.missing
                        .entry(qname.clone())
                        .or_default()
                        .push(match got {
                            Some(_) => {
                                format!("key {:?} in Secret {:?}", sub.secret_key, sub.secret_name)
                            }
                            None => format!("Secret {:?}", sub.secret_name),
                        });
                }
            }
        }
        if ok {
            resolved.push(q.clone());
        }
    }
    let toml = render::tenants_toml(&resolved, &keys, &extra)?;
    let own = render::owner(
        &WeftCluster::api_version(&()),
        "WeftCluster",
        &cname,
        c.meta().uid.as_deref().unwrap_or_default(),
    );
    let data = BTreeMap::from([("tenants.toml".to_string(), toml.clone())]);
    apply(
        &ctx.client,
        &render::secret(
            &render::tenants_secret(&cname),
            &ns,
            (&cname, "tenants"),
            &own,
            &data,
        ),
    )
    .await?;
    use sha2::Digest;
    out.digest = hex::encode(&sha2::Sha256::digest(toml.as_bytes())[..8]);
    Ok(out)
}

async fn policy_inner(p: &AgentPolicy, ctx: &Ctx) -> Result<Action> {
    let Start {
        name,
        ns,
        api,
        generation,
        prev,
        now,
    } = start(p, ctx);
    let c = conditions_at(&prev, generation, now);

    let clusters: Api<WeftCluster> = Api::namespaced(ctx.client.clone(), &ns);
    let Some(cluster) = clusters.get_opt(&p.spec.cluster_ref).await? else {
        let msg = format!("no WeftCluster {:?} in namespace {ns}", p.spec.cluster_ref);
        let s = json!({"observedGeneration": generation, "conditions": [c("Accepted", "False", "ClusterNotFound", msg)]});
        patch_status(&api, &name, s).await?;
        return Ok(Action::requeue(ROLLING));
    };
    // the RuntimeClass the cluster's pods name must exist
    let mut missing = Vec::new();
    if let Some(rc) = &cluster.spec.isolation.runtime_class_name {
        let rcs: Api<k8s_openapi::api::node::v1::RuntimeClass> = Api::all(ctx.client.clone());
        if rcs.get_opt(rc).await?.is_none() {
            missing.push(format!("RuntimeClass {rc:?}"));
        }
    }
    let written = write_tenants(&cluster, ctx).await?;
    missing.extend(written.missing.get(&name).cloned().unwrap_or_default());
    let secret = render::tenants_secret(&cluster.name_any());
    let accepted = match written.refused.get(&name) {
        Some(why) if unsupported(p, &cluster).is_some() => {
            c("Accepted", "False", "Unsupported", why.clone())
        }
        Some(why) => c("Accepted", "False", "InvalidKey", why.clone()),
        None => c("Accepted", "True", "Accepted", String::new()),
    };
    let refs = if missing.is_empty() {
        c(
            "ResolvedRefs",
            "True",
            "Resolved",
            "its Secrets and the cluster's RuntimeClass exist".into(),
        )
    } else {
        c(
            "ResolvedRefs",
            "False",
            "NotFound",
            format!("missing: {}", missing.join(", ")),
        )
    };
    let enforced = if let Some(why) = written.refused.get(&name) {
        c(
            "Enforced",
            "False",
            if accepted.reason == "Unsupported" {
                "Unsupported"
            } else {
                "InvalidKey"
            },
            why.clone(),
        )
    } else if !missing.is_empty() {
        c(
            "Enforced",
            "False",
            "RefsNotResolved",
            "its keys are left out of the tenants file until they resolve".into(),
        )
    } else {
        c("Enforced", "True", "Distributed", format!(
            "in Secret {secret} (sha256 {}…); nodes reload it when the kubelet updates their volume",
            written.digest
        ))
    };
    let ok = missing.is_empty() && !written.refused.contains_key(&name);
    let s = json!({"observedGeneration": generation, "conditions": [accepted, refs, enforced]});
    patch_status(&api, &name, s).await?;
    Ok(Action::requeue(if ok { RESYNC } else { ROLLING }))
}

// -------------------------------------------------------------------- run

/// Runs the four controllers with `ctx` until SIGTERM or SIGINT: in `namespace`, or
/// in every namespace when it is `None`.
pub async fn run(ctx: Arc<Ctx>, namespace: Option<String>) -> anyhow::Result<()> {
    let client = ctx.client.clone();
    fn api<K>(client: &Client, ns: &Option<String>) -> Api<K>
    where
        K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>,
    {
        match ns {
            Some(n) => Api::namespaced(client.clone(), n),
            None => Api::all(client.clone()),
        }
    }
    let cfg = watcher::Config::default();
    use k8s_openapi::api::apps::v1::{DaemonSet, StatefulSet};
    let clusters = Controller::new(api::<WeftCluster>(&client, &namespace), cfg.clone())
        .owns(api::<StatefulSet>(&client, &namespace), cfg.clone())
        .shutdown_on_signal()
        .run(reconcile_cluster, on_error, ctx.clone())
        .for_each(|_| async {});
    let pools = Controller::new(api::<FabricNodePool>(&client, &namespace), cfg.clone())
        .owns(api::<DaemonSet>(&client, &namespace), cfg.clone())
        .owns(api::<StatefulSet>(&client, &namespace), cfg.clone())
        .shutdown_on_signal()
        .run(reconcile_pool, on_error, ctx.clone())
        .for_each(|_| async {});
    let models = Controller::new(api::<WeftModel>(&client, &namespace), cfg.clone())
        .shutdown_on_signal()
        .run(reconcile_model, on_error, ctx.clone())
        .for_each(|_| async {});
    let policies = Controller::new(api::<AgentPolicy>(&client, &namespace), cfg)
        .shutdown_on_signal()
        .run(reconcile_policy, on_error, ctx)
        .for_each(|_| async {});
    tracing::info!(namespace = ?namespace, "weft operator running");
    futures::join!(clusters, pools, models, policies);
    Ok(())
}
