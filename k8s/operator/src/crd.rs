//! The custom resources of group `weft.dev`, version `v1alpha1`: what a
//! platform engineer declares. The CRDs' YAML in `k8s/crds/` is written
//! from these types by `crdgen` (and a test fails when it drifts); the
//! schema carries the rules an apiserver enforces (CEL where a rule spans
//! fields).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{ResourceRequirements, Toleration};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The API group.
pub const GROUP: &str = "weft.dev";
/// The API version.
pub const VERSION: &str = "v1alpha1";

/// How a worker or agent sandbox is isolated (weft's tiers).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema, Default)]
#[serde(rename_all = "lowercase")]
pub enum SandboxTier {
    /// Namespaces, a dedicated uid, a new root, seccomp, Landlock, a cgroup.
    #[default]
    Process,
    /// The same under gVisor (`runsc`).
    Gvisor,
}

/// Where a model prefers to be placed.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema, Default)]
#[serde(rename_all = "lowercase")]
pub enum Prefer {
    /// Edge sites, next to the agents.
    Edge,
    /// Cloud regions.
    Cloud,
    /// Wherever placement scores best.
    #[default]
    Any,
}

/// A request's criticality (weft's intent).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema, Default)]
#[serde(rename_all = "lowercase")]
pub enum Criticality {
    /// Served first, never shed.
    Critical,
    /// The default.
    #[default]
    Standard,
    /// Shed first under load.
    Sheddable,
}

// ---------------------------------------------------------------- WeftCluster

/// A weft cluster: its coordinators (a Raft group), its API service, how
/// its workers are isolated, and its monitoring.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "weft.dev",
    version = "v1alpha1",
    kind = "WeftCluster",
    namespaced,
    status = "WeftClusterStatus",
    shortname = "wc",
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Leader","type":"string","jsonPath":".status.leader"}"#,
    printcolumn = r#"{"name":"Epoch","type":"integer","jsonPath":".status.placementEpoch"}"#,
    cel
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WeftClusterSpec {
    /// The weft image every pod of the cluster runs.
    #[x_kube(validation = Rule::new("self != ''").message("image must be set"))]
    pub image: String,
    /// The coordinators.
    #[serde(default)]
    pub coordinators: Coordinators,
    /// The OpenAI-compatible API's Service.
    #[serde(default)]
    pub api: ApiService,
    /// How model workers are isolated.
    #[serde(default)]
    pub isolation: WorkerIsolation,
    /// Metrics scraping.
    #[serde(default)]
    pub monitoring: Monitoring,
}

/// The coordinators: a StatefulSet of Raft members with their storage.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Coordinators {
    /// How many: 1 (one machine, no fault tolerance), 3 or 5 (a Raft
    /// quorum survives 1 or 2 losses). An even count adds no tolerance.
    /// Fixed once the cluster exists: the operator does not change a Raft
    /// group's membership.
    #[serde(default = "three")]
    #[x_kube(validation = Rule::new("self == 1 || self == 3 || self == 5").message("coordinators.replicas must be 1, 3 or 5 (an odd Raft group)"))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("coordinators.replicas cannot change once the cluster exists (the operator does not change a Raft group's membership)"))]
    pub replicas: i32,
    /// Each one's volume for its Raft log and snapshots.
    #[serde(default)]
    pub storage: Storage,
}

fn three() -> i32 {
    3
}

impl Default for Coordinators {
    fn default() -> Self {
        Self {
            replicas: 3,
            storage: Storage::default(),
        }
    }
}

/// A PersistentVolumeClaim's size and class.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Storage {
    /// Its size (a quantity such as `1Gi`).
    #[serde(default = "one_gi")]
    pub size: String,
    /// Its StorageClass (the cluster's default when unset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class_name: Option<String>,
}

fn one_gi() -> String {
    "1Gi".into()
}

impl Default for Storage {
    fn default() -> Self {
        Self {
            size: one_gi(),
            storage_class_name: None,
        }
    }
}

/// The API's Service and who may reach it.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ApiService {
    /// Its port.
    #[serde(default = "api_port")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 65535").message("api.port must be a port number"))]
    pub port: i32,
    /// `ClusterIP`, `NodePort` or `LoadBalancer`.
    #[serde(default = "cluster_ip")]
    #[x_kube(validation = Rule::new("self in ['ClusterIP', 'NodePort', 'LoadBalancer']").message("api.serviceType must be ClusterIP, NodePort or LoadBalancer"))]
    pub service_type: String,
    /// Namespaces whose pods (the agents) the NetworkPolicy lets reach
    /// the API; the cluster's own namespace always may.
    #[serde(default)]
    pub agent_namespaces: Vec<String>,
    /// A Secret (same namespace) of API keys, if any: each entry's name is
    /// a tenant, its value that tenant's key. `AgentPolicy` subjects add to
    /// it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_keys_secret: Option<String>,
}

fn api_port() -> i32 {
    8080
}

fn cluster_ip() -> String {
    "ClusterIP".into()
}

impl Default for ApiService {
    fn default() -> Self {
        Self {
            port: api_port(),
            service_type: cluster_ip(),
            agent_namespaces: Vec::new(),
            api_keys_secret: None,
        }
    }
}

/// How model workers are isolated.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkerIsolation {
    /// The pods' RuntimeClass (for example `gvisor`, from the
    /// `runtime-gvisor` component); the node's default when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime_class_name: Option<String>,
    /// weft's own worker sandbox inside the pod.
    #[serde(default)]
    pub sandbox: SandboxTier,
}

/// Metrics scraping.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Monitoring {
    /// Whether the pods are annotated and a NetworkPolicy lets the
    /// monitoring namespace scrape `/metrics`.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// The namespace Prometheus runs in.
    #[serde(default = "monitoring_ns")]
    pub namespace: String,
}

fn yes() -> bool {
    true
}

fn monitoring_ns() -> String {
    "monitoring".into()
}

impl Default for Monitoring {
    fn default() -> Self {
        Self {
            enabled: true,
            namespace: monitoring_ns(),
        }
    }
}

/// What the operator and the coordinators report of a cluster.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct WeftClusterStatus {
    /// The generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, `RaftQuorum`, `Progressing`, `Degraded`.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// The Raft leader's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader: Option<String>,
    /// The coordinators' names.
    #[serde(default)]
    pub members: Vec<String>,
    /// The committed placement epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement_epoch: Option<u64>,
}

// ------------------------------------------------------------- FabricNodePool

/// A fabric node's role.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// An edge gateway: a DaemonSet by default, kept through partitions.
    Edge,
    /// A cloud region: a StatefulSet by default.
    Cloud,
}

/// How a pool's pods are run.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum Workload {
    /// One pod per selected node.
    DaemonSet,
    /// `replicas` pods with stable names and their own caches.
    StatefulSet,
}

/// A pool of fabric nodes (model servers) of one cluster.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "weft.dev",
    version = "v1alpha1",
    kind = "FabricNodePool",
    namespaced,
    status = "FabricNodePoolStatus",
    shortname = "fnp",
    scale = r#"{"specReplicasPath":".spec.replicas","statusReplicasPath":".status.replicas","labelSelectorPath":".status.selector"}"#,
    printcolumn = r#"{"name":"Role","type":"string","jsonPath":".spec.role"}"#,
    printcolumn = r#"{"name":"Ready","type":"integer","jsonPath":".status.readyReplicas"}"#,
    printcolumn = r#"{"name":"Replicas","type":"integer","jsonPath":".status.replicas"}"#,
    cel
)]
#[x_kube(validation = Rule::new("!has(self.replicas) || (has(self.workload) ? self.workload == 'StatefulSet' : self.role == 'cloud')").message("replicas applies to a StatefulSet pool; a DaemonSet runs one pod per selected node"))]
#[x_kube(validation = Rule::new("!has(self.modelCache) || (has(self.modelCache.pvc) != has(self.modelCache.hostPath))").message("modelCache is either a pvc or a hostPath"))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FabricNodePoolSpec {
    /// The `WeftCluster` (same namespace) the nodes join.
    #[x_kube(validation = Rule::new("self != ''").message("clusterRef must name a WeftCluster"))]
    pub cluster_ref: String,
    /// `edge` or `cloud`.
    pub role: Role,
    /// DaemonSet (the edge default) or StatefulSet (the cloud default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<Workload>,
    /// Pods of a StatefulSet pool (the scale subresource's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 0").message("replicas cannot be negative"))]
    pub replicas: Option<i32>,
    /// The site (default: the pool's name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site: Option<String>,
    /// The region (weft numbers regions by a hash of the name; region 0
    /// when unset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// Nodes the pods may run on.
    #[serde(default)]
    pub node_selector: BTreeMap<String, String>,
    /// Taints the pods tolerate (an edge pool also tolerates
    /// `unreachable` and `not-ready` while `autonomy` holds).
    #[serde(default)]
    pub tolerations: Vec<Toleration>,
    /// The node container's requests and limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// NVIDIA GPUs per pod (`nvidia.com/gpu`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 0").message("gpus cannot be negative"))]
    pub gpus: Option<i32>,
    /// Where the verified model cache lives.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_cache: Option<ModelCache>,
    /// Keep an edge pod through a partition from the control plane
    /// (tolerate `unreachable` and `not-ready` without eviction), as
    /// weft's edge nodes keep serving on their own. Default: true for
    /// edge, false for cloud.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autonomy: Option<bool>,
}

/// The model cache: a PVC per pod, or a host directory.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ModelCache {
    /// A PVC (per pod of a StatefulSet pool).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pvc: Option<Storage>,
    /// A host directory (an edge gateway's disk). Pod Security's
    /// `restricted` and `baseline` levels refuse hostPath volumes: the
    /// namespace must allow them, and the directory must be writable by
    /// uid 65532. Neither set: an emptyDir (fetched again with each pod).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_path: Option<String>,
}

/// What the operator reports of a pool.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct FabricNodePoolStatus {
    /// The generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Pods.
    #[serde(default)]
    pub replicas: i32,
    /// Ready pods.
    #[serde(default)]
    pub ready_replicas: i32,
    /// Pods of the current generation.
    #[serde(default)]
    pub updated_replicas: i32,
    /// The pods' label selector (for the scale subresource).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// `Ready` (reasons such as `InsufficientCapacity`, `PodsNotReady`,
    /// `Updating`), `Progressing`.
    #[serde(default)]
    pub conditions: Vec<Condition>,
}

// ------------------------------------------------------------------ WeftModel

/// The signal a model scales on.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum Signal {
    /// Requests waiting (`weft_queue_depth`).
    QueueDepth,
    /// KV-cache use (`weft_kv_blocks_used / weft_kv_blocks_capacity`).
    KvCacheUse,
    /// Time to first token, p95.
    TtftP95,
}

/// What acts on a model's scaling.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema, Default)]
#[serde(rename_all = "lowercase")]
pub enum Actuator {
    /// A KEDA ScaledObject (the `keda` component).
    #[default]
    Keda,
    /// An HPA fed by prometheus-adapter.
    Hpa,
    /// None: replicas stay as the status reports them.
    None,
}

/// A model to serve: where from, where to, how critical, how many.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "weft.dev",
    version = "v1alpha1",
    kind = "WeftModel",
    namespaced,
    status = "WeftModelStatus",
    shortname = "wm",
    scale = r#"{"specReplicasPath":".spec.replicas","statusReplicasPath":".status.replicas","labelSelectorPath":".status.selector"}"#,
    printcolumn = r#"{"name":"Served","type":"string","jsonPath":".spec.servedName"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Replicas","type":"integer","jsonPath":".status.replicas"}"#,
    cel
)]
// with autoscaling, replicas belongs to the autoscaler (KEDA or an HPA write
// it through the scale subresource, which the apiserver checks against
// these rules too), so it may only sit within the autoscaler's bounds
#[x_kube(validation = Rule::new("!has(self.autoscaling) || !has(self.replicas) || (self.replicas >= self.autoscaling.minReplicas && self.replicas <= self.autoscaling.maxReplicas)").message("with autoscaling, replicas is the autoscaler's: leave it unset (or within minReplicas..maxReplicas)"))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WeftModelSpec {
    /// The `WeftCluster` (same namespace) that serves it; the namespace's
    /// only one when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_ref: Option<String>,
    /// The name clients ask for (`model` in a request).
    #[x_kube(validation = Rule::new("self.matches('^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$')").message("servedName: letters, digits and . _ : -, at most 128"))]
    pub served_name: String,
    /// Where it comes from: any source `weft model pull` takes (`default`,
    /// a PyPI package, `hf:org/repo/file.gguf`).
    #[x_kube(validation = Rule::new("self != ''").message("source must be set"))]
    pub source: String,
    /// The file's sha256, checked before it is served.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.matches('^[0-9a-f]{64}$')").message("sha256 is 64 lowercase hex digits"))]
    pub sha256: Option<String>,
    /// Placement hints.
    #[serde(default)]
    pub placement: PlacementHints,
    /// Its requests' default criticality.
    #[serde(default)]
    pub criticality: Criticality,
    /// Fixed replicas (the scale subresource's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 0").message("replicas cannot be negative"))]
    pub replicas: Option<i32>,
    /// Replicas from a signal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<Autoscaling>,
}

/// Where a model prefers to go.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PlacementHints {
    /// `edge`, `cloud` or `any`.
    #[serde(default)]
    pub prefer: Prefer,
    /// Sites it should be at (all, when empty).
    #[serde(default)]
    pub sites: Vec<String>,
}

/// Scaling a model on weft's own signals.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("self.minReplicas <= self.maxReplicas").message("autoscaling.minReplicas is above maxReplicas"))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Autoscaling {
    /// The signal.
    pub signal: Signal,
    /// Its target per replica (requests waiting, a fraction of the KV
    /// cache, or milliseconds).
    #[x_kube(validation = Rule::new("self > 0.0").message("autoscaling.target must be above 0"))]
    pub target: f64,
    /// Fewest replicas.
    #[serde(default = "one")]
    #[x_kube(validation = Rule::new("self >= 0").message("minReplicas cannot be negative"))]
    pub min_replicas: i32,
    /// Most replicas.
    #[x_kube(validation = Rule::new("self >= 1").message("maxReplicas must be at least 1"))]
    pub max_replicas: i32,
    /// Seconds a lower signal must last before scaling down (models load
    /// slowly).
    #[serde(default = "five_minutes")]
    pub scale_down_stabilization_seconds: i32,
    /// What acts on it.
    #[serde(default)]
    pub actuator: Actuator,
}

fn one() -> i32 {
    1
}

fn five_minutes() -> i32 {
    300
}

/// The state of one placement of a model.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum PlacementState {
    /// Assigned, not yet loading.
    Pending,
    /// Loading on its node.
    Loading,
    /// Serving.
    Loaded,
    /// Failed (see its reason).
    Failed,
}

/// One placement of a model.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModelPlacement {
    /// The node.
    pub node: String,
    /// Its site.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site: Option<String>,
    /// Its layer range, when the model is sharded (`0..18`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layers: Option<String>,
    /// Its state.
    pub state: PlacementState,
    /// Why, when it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// What the operator and the coordinators report of a model.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct WeftModelStatus {
    /// The generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The serving pods of its cluster (the scale subresource's selector,
    /// which an HPA needs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// Loaded replicas.
    #[serde(default)]
    pub replicas: i32,
    /// Where it is placed.
    #[serde(default)]
    pub placements: Vec<ModelPlacement>,
    /// The placement epoch these come from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement_epoch: Option<u64>,
    /// The kind of autoscaler the operator made for it (`ScaledObject` or
    /// `HorizontalPodAutoscaler`), so it goes when autoscaling does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaler: Option<String>,
    /// `Accepted`, `ArtifactsReady`, `Placed`, `Ready`.
    #[serde(default)]
    pub conditions: Vec<Condition>,
}

// ---------------------------------------------------------------- AgentPolicy

/// What the agents of some tenants may do: which keys are theirs, which
/// models they may call, their limits, and their sandboxes' rules.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "weft.dev",
    version = "v1alpha1",
    kind = "AgentPolicy",
    namespaced,
    status = "AgentPolicyStatus",
    shortname = "ap",
    printcolumn = r#"{"name":"Enforced","type":"string","jsonPath":".status.conditions[?(@.type==\"Enforced\")].status"}"#,
    cel
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AgentPolicySpec {
    /// The `WeftCluster` (same namespace) it applies to.
    #[x_kube(validation = Rule::new("self != ''").message("clusterRef must name a WeftCluster"))]
    pub cluster_ref: String,
    /// API keys (from Secrets) and the tenant each belongs to.
    #[x_kube(validation = Rule::new("size(self) > 0").message("subjects must name at least one key"))]
    pub subjects: Vec<Subject>,
    /// Models they may call (`servedName`s; all when empty).
    #[serde(default)]
    pub models: Vec<String>,
    /// Their limits (each tenant's own).
    #[serde(default)]
    pub limits: PolicyLimits,
    /// Criticalities they may ask for (all when empty).
    #[serde(default)]
    pub criticalities: Vec<Criticality>,
    /// Their agent sandboxes' rules (none: no sandboxes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandboxes: Option<SandboxRules>,
}

/// An API key in a Secret, and its tenant.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Subject {
    /// The Secret (same namespace).
    pub secret_name: String,
    /// The key in it whose value is the API key.
    pub secret_key: String,
    /// The tenant the key's requests count against.
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$')").message("tenant: lowercase letters, digits and -, at most 63"))]
    pub tenant: String,
}

/// A tenant's limits (weft's `[tenants.NAME]`).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicyLimits {
    /// Requests per minute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests_per_minute: Option<u64>,
    /// Tokens per minute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_minute: Option<u64>,
    /// Requests at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrent: Option<u64>,
    /// Most of the KV cache its sequences may hold, above 0 and at most 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self > 0.0 && self <= 1.0").message("kvShare is above 0 and at most 1"))]
    pub kv_share: Option<f64>,
}

/// The agent sandbox service's rules for these tenants.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SandboxRules {
    /// The tier their sandboxes get.
    #[serde(default)]
    pub isolation: SandboxTier,
    /// Templates they may use (all the node's when empty).
    #[serde(default)]
    pub templates: Vec<String>,
    /// Sandboxes at once, per tenant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_sandboxes: Option<u64>,
    /// Their sandboxes' memory together (MiB), per tenant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mb: Option<u64>,
    /// Their network: only `disabled` for now.
    #[serde(default = "disabled")]
    #[x_kube(validation = Rule::new("self == 'disabled'").message("sandboxes.network: only 'disabled' is supported"))]
    pub network: String,
}

fn disabled() -> String {
    "disabled".into()
}

/// What the operator reports of a policy.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct AgentPolicyStatus {
    /// The generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Accepted`, `ResolvedRefs` (its Secrets exist), `Enforced` (the
    /// nodes applied it).
    #[serde(default)]
    pub conditions: Vec<Condition>,
}
