//! The operator's reconciles against a mocked API server (kube-rs'
//! tower-test pattern): each test lists every request the operator must
//! send, in order, answers each one, and fails on a request it did not
//! expect, on one missing, and on a request left over. weft's coordinators
//! are a fake [`Fabric`] that records what it was asked.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use http::{Request, Response};
use http_body_util::BodyExt;
use kube::client::Body;
use kube::runtime::controller::Action;
use kube::Client;
use serde_json::{json, Value};
use weft_coordinator::ModelRecord;
use weft_operator::controller::{self, Ctx};
use weft_operator::crd::*;
use weft_operator::fabric::{ClusterAccess, Fabric, FabricStatus, Placed};
use weft_operator::render;

const NS: &str = "weft";

/// One request the operator must send, and the answer it gets.
struct Call {
    method: &'static str,
    path: String,
    status: u16,
    /// The answer's body; `None`: the request's own body echoed back (what
    /// server-side apply returns), with `extra` merged in.
    reply: Option<Value>,
    extra: Value,
}

fn call(method: &'static str, path: impl Into<String>, status: u16, reply: Value) -> Call {
    Call {
        method,
        path: path.into(),
        status,
        reply: Some(reply),
        extra: Value::Null,
    }
}

/// A status write of `cr`, answered with the CR and the status written.
fn status_applied<T: serde::Serialize>(path: impl Into<String>, cr: &T) -> Call {
    applied(path, serde_json::to_value(cr).unwrap())
}

/// A server-side apply answered with the object applied plus `extra`.
fn applied(path: impl Into<String>, extra: Value) -> Call {
    Call {
        method: "PATCH",
        path: path.into(),
        status: 200,
        reply: None,
        extra,
    }
}

fn not_found() -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": "not found"})
}

fn merge(into: &mut Value, extra: &Value) {
    match (into, extra) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in b {
                merge(a.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
        (a, b) if !b.is_null() => *a = b.clone(),
        _ => {}
    }
}

/// What the operator sent, by path, for the test to look into.
type Seen = Arc<Mutex<Vec<(String, String, Value)>>>;

/// Answers `calls` in order, then expects the client to go away.
fn api_server(calls: Vec<Call>) -> (Client, Seen, tokio::task::JoinHandle<()>) {
    let (svc, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let seen: Seen = Arc::default();
    let s2 = seen.clone();
    let task = tokio::spawn(async move {
        for c in calls {
            let next = tokio::time::timeout(Duration::from_secs(5), handle.next_request())
                .await
                .unwrap_or_else(|_| panic!("the operator never sent {} {}", c.method, c.path));
            let (req, send) = next
                .unwrap_or_else(|| panic!("the operator stopped before {} {}", c.method, c.path));
            let method = req.method().to_string();
            let path = req.uri().path().to_string();
            let bytes = req.into_body().collect().await.unwrap().to_bytes();
            let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            s2.lock()
                .unwrap()
                .push((method.clone(), path.clone(), body.clone()));
            assert_eq!(
                (method.as_str(), path.as_str()),
                (c.method, c.path.as_str()),
                "the operator sent {method} {path} where {} {} was expected",
                c.method,
                c.path
            );
            let mut reply = c.reply.unwrap_or(body);
            merge(&mut reply, &c.extra);
            send.send_response(
                Response::builder()
                    .status(c.status)
                    .header("content-type", "application/json")
                    .body(Body::from(serde_json::to_vec(&reply).unwrap()))
                    .unwrap(),
            );
        }
        if let Some((req, _)) = handle.next_request().await {
            panic!("unexpected request: {} {}", req.method(), req.uri());
        }
    });
    (Client::new(svc, NS), seen, task)
}

/// The coordinators, faked: a status to report, and what was asked.
#[derive(Default)]
struct FakeFabric {
    status: Mutex<FabricStatus>,
    puts: Mutex<Vec<ModelRecord>>,
    removed: Mutex<Vec<String>>,
    fetched: Mutex<u32>,
    fetch_fails: Mutex<bool>,
}

fn record(name: &str) -> ModelRecord {
    ModelRecord {
        source: "default".into(),
        sha256: "a".repeat(64),
        spec: weft_placement::ModelSpec {
            name: name.into(),
            layers: 18,
            bytes_per_layer: 1 << 20,
            shared_bytes: 1 << 24,
            compute_per_token: 1.0,
            kv_bytes_per_token: 1024,
            hidden_bytes_per_token: 2048,
            min_replicas: 0,
            prefer: None,
            sites: Vec::new(),
        },
        chunk_bytes: 0,
        chunk_sha256: Vec::new(),
        sites: Vec::new(),
    }
}

impl Fabric for FakeFabric {
    fn status<'a>(&'a self, _: &'a ClusterAccess) -> BoxFuture<'a, anyhow::Result<FabricStatus>> {
        let s = self.status.lock().unwrap().clone();
        Box::pin(async move { Ok(s) })
    }
    fn put_model<'a>(
        &'a self,
        _: &'a ClusterAccess,
        r: ModelRecord,
    ) -> BoxFuture<'a, anyhow::Result<()>> {
        self.puts.lock().unwrap().push(r);
        Box::pin(async { Ok(()) })
    }
    fn remove_model<'a>(
        &'a self,
        _: &'a ClusterAccess,
        name: &'a str,
    ) -> BoxFuture<'a, anyhow::Result<()>> {
        self.removed.lock().unwrap().push(name.to_string());
        Box::pin(async { Ok(()) })
    }
    fn model_record<'a>(
        &'a self,
        _: &'a str,
        served: &'a str,
    ) -> BoxFuture<'a, anyhow::Result<ModelRecord>> {
        *self.fetched.lock().unwrap() += 1;
        let r = record(served);
        let fail = *self.fetch_fails.lock().unwrap();
        Box::pin(async move {
            if fail {
                anyhow::bail!("pip download: no such package")
            }
            Ok(r)
        })
    }
}

fn ctx(client: Client, fabric: Arc<FakeFabric>) -> Arc<Ctx> {
    Arc::new(
        Ctx::new(client, fabric).with_clock("2026-12-01T12:00:00Z".parse().unwrap(), 1_796_126_400),
    )
}

/// The objects of k8s/examples/`file` of `kind`, typed.
fn example<T: serde::de::DeserializeOwned>(file: &str, kind: &str) -> T {
    let text = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../examples")
            .join(file),
    )
    .unwrap();
    let v = weft_operator::documents(&text)
        .unwrap()
        .into_iter()
        .find(|d| d["kind"] == kind)
        .unwrap();
    serde_json::from_value(v).unwrap()
}

fn with_meta<T: kube::Resource>(mut o: T, generation: i64) -> T {
    let m = o.meta_mut();
    m.uid = Some("0f0e0d0c-0000-4000-8000-000000000001".into());
    m.generation = Some(generation);
    o
}

fn cluster(generation: i64) -> WeftCluster {
    with_meta(example("edge-site/site.yaml", "WeftCluster"), generation)
}

fn core(path: &str) -> String {
    format!("/api/v1/namespaces/{NS}/{path}")
}

fn weft(path: &str) -> String {
    format!("/apis/weft.dev/v1alpha1/namespaces/{NS}/{path}")
}

/// Where server-side apply of a rendered object goes.
fn path_of(o: &Value) -> String {
    let kind = o["kind"].as_str().unwrap().to_lowercase();
    let plural = if kind.ends_with('y') {
        format!("{}ies", &kind[..kind.len() - 1])
    } else {
        format!("{kind}s")
    };
    let name = o["metadata"]["name"].as_str().unwrap();
    match o["apiVersion"].as_str().unwrap() {
        "v1" => core(&format!("{plural}/{name}")),
        gv => format!("/apis/{gv}/namespaces/{NS}/{plural}/{name}"),
    }
}

fn secret(name: &str, data: &[(&str, &str)]) -> Value {
    use base64::Engine;
    let d: serde_json::Map<String, Value> = data
        .iter()
        .map(|(k, v)| {
            (
                k.to_string(),
                json!(base64::engine::general_purpose::STANDARD.encode(v)),
            )
        })
        .collect();
    json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": NS}, "data": d})
}

/// A Secret's entry as written (base64 `data`), decoded.
fn data_of(secret: &Value, key: &str) -> Option<String> {
    use base64::Engine;
    let b = secret["data"][key].as_str()?;
    String::from_utf8(base64::engine::general_purpose::STANDARD.decode(b).ok()?).ok()
}

/// The cluster's own API keys (its `api.apiKeysSecret`): tenant `ops`.
fn ops_keys() -> Value {
    secret("weft-api-keys", &[("ops", "sk-ops-000000001")])
}

/// What writing the tenants Secret reads and writes: the cluster's own
/// keys, the policies (`policies`), each subject's Secret (`subjects`), then
/// the apply.
fn tenants_calls(policies: Vec<Value>, subjects: Vec<(&str, u16, Value)>) -> Vec<Call> {
    let mut calls = vec![
        call("GET", core("secrets/weft-api-keys"), 200, ops_keys()),
        call(
            "GET",
            weft("agentpolicies"),
            200,
            json!({"apiVersion": "weft.dev/v1alpha1", "kind": "AgentPolicyList", "metadata": {}, "items": policies}),
        ),
    ];
    for (name, status, body) in subjects {
        calls.push(call("GET", core(&format!("secrets/{name}")), status, body));
    }
    calls.push(applied(core("secrets/factory-7-tenants"), Value::Null));
    calls
}

/// The tenants file the operator wrote last.
fn tenants_written(seen: &Seen) -> weft_api::TenantsFile {
    let seen = seen.lock().unwrap();
    let body = &seen
        .iter()
        .rev()
        .find(|(m, p, _)| m == "PATCH" && p.ends_with("/secrets/factory-7-tenants"))
        .expect("no tenants Secret was written")
        .2;
    weft_api::TenantsFile::parse(&data_of(body, "tenants.toml").unwrap()).unwrap()
}

/// The cluster's credentials as Secrets the API server already holds.
struct Creds {
    ca: Value,
    ids: Value,
    admin: Value,
}

fn creds(c: &WeftCluster) -> Creds {
    use weft_cluster::credentials::{ClusterCa, Role};
    let name = c.metadata.name.clone().unwrap();
    let (cert, key) = ClusterCa::generate(&name).unwrap();
    let ca = ClusterCa::from_pem(cert.clone(), &key).unwrap();
    let mut ids = Vec::new();
    for k in 0..c.spec.coordinators.replicas {
        let pod = render::coord_pod(&name, k);
        let id = ca.issue_identity(&pod, Role::Coordinator).unwrap();
        ids.push((format!("{pod}.node.pem"), id.cert_pem));
        ids.push((format!("{pod}.node.key"), id.key_pem));
        ids.push((format!("{pod}.ca.pem"), id.ca_pem));
        ids.push((format!("{pod}.name"), pod));
    }
    let ids_ref: Vec<(&str, &str)> = ids.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
    let admin = ca
        .issue_identity(&format!("{name}-operator"), Role::Admin)
        .unwrap();
    Creds {
        ca: secret(
            &render::ca_secret(&name),
            &[("ca.pem", &cert), ("ca.key", &key)],
        ),
        ids: secret(&render::coord_identities_secret(&name), &ids_ref),
        admin: secret(
            &render::admin_secret(&name),
            &[
                ("name", &admin.name),
                ("node.pem", &admin.cert_pem),
                ("node.key", &admin.key_pem),
                ("ca.pem", &admin.ca_pem),
            ],
        ),
    }
}

fn existing_creds(c: &WeftCluster) -> Vec<Call> {
    let cr = creds(c);
    let name = c.metadata.name.clone().unwrap();
    vec![
        call(
            "GET",
            core(&format!("secrets/{}", render::ca_secret(&name))),
            200,
            cr.ca,
        ),
        call(
            "GET",
            core(&format!(
                "secrets/{}",
                render::coord_identities_secret(&name)
            )),
            200,
            cr.ids,
        ),
        call(
            "GET",
            core(&format!("secrets/{}", render::admin_secret(&name))),
            200,
            cr.admin,
        ),
    ]
}

/// Applies of every object the cluster renders; the StatefulSet answers
/// with `sts_status` at `sts_generation`.
fn cluster_applies(c: &WeftCluster, sts_generation: i64, sts_status: Value) -> Vec<Call> {
    render::cluster(c)
        .unwrap()
        .iter()
        .map(|o| {
            let extra = if o["kind"] == "StatefulSet" {
                json!({"metadata": {"generation": sts_generation}, "status": sts_status})
            } else {
                Value::Null
            };
            applied(path_of(o), extra)
        })
        .collect()
}

fn rolled_out(n: i64, generation: i64) -> Value {
    json!({"observedGeneration": generation, "replicas": n, "readyReplicas": n, "updatedReplicas": n,
           "currentRevision": "r1", "updateRevision": "r1"})
}

fn led() -> FabricStatus {
    FabricStatus {
        leader: Some("factory-7-coord-0".into()),
        voters: vec![
            "factory-7-coord-0".into(),
            "factory-7-coord-1".into(),
            "factory-7-coord-2".into(),
        ],
        epoch: Some(4),
        ..Default::default()
    }
}

/// The status the operator wrote last (a PATCH to a `/status` path).
fn status_written(seen: &Seen) -> Value {
    seen.lock()
        .unwrap()
        .iter()
        .rev()
        .find(|(m, p, _)| m == "PATCH" && p.ends_with("/status"))
        .map(|(_, _, b)| b["status"].clone())
        .expect("no status was written")
}

fn cond<'a>(status: &'a Value, t: &str) -> &'a Value {
    status["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == t)
        .unwrap_or_else(|| panic!("no {t} condition in {status}"))
}

async fn finish(task: tokio::task::JoinHandle<()>, ctx: Arc<Ctx>) {
    drop(ctx);
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("the mocked API server did not finish")
        .expect("the mocked API server saw something unexpected");
}

// ---------------------------------------------------------------- WeftCluster

#[tokio::test]
async fn a_new_cluster_gets_a_ca_identities_and_every_object_then_ready() {
    let c = cluster(1);
    let mut calls = vec![
        call("GET", core("secrets/factory-7-ca"), 404, not_found()),
        call(
            "POST",
            core("secrets"),
            201,
            json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "factory-7-ca"}}),
        ),
        call(
            "GET",
            core("secrets/factory-7-coord-identities"),
            404,
            not_found(),
        ),
        call(
            "POST",
            core("secrets"),
            201,
            json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "factory-7-coord-identities"}}),
        ),
        call("GET", core("secrets/factory-7-admin"), 404, not_found()),
        call(
            "POST",
            core("secrets"),
            201,
            json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "factory-7-admin"}}),
        ),
    ];
    calls.extend(cluster_applies(&c, 1, rolled_out(3, 1)));
    calls.extend(tenants_calls(vec![], vec![]));
    calls.push(status_applied(weft("weftclusters/factory-7/status"), &c));
    let (client, seen, task) = api_server(calls);
    let fabric = Arc::new(FakeFabric::default());
    *fabric.status.lock().unwrap() = led();
    let ctx = ctx(client, fabric);
    let action = controller::reconcile_cluster(Arc::new(c), ctx.clone())
        .await
        .unwrap();
    assert_eq!(action, Action::requeue(controller::RESYNC));
    finish(task, ctx).await;

    let s = status_written(&seen);
    assert_eq!(cond(&s, "Ready")["status"], "True", "{s}");
    assert_eq!(cond(&s, "RaftQuorum")["reason"], "LeaderElected");
    assert_eq!(s["leader"], "factory-7-coord-0");
    assert_eq!(s["placementEpoch"], 4);
    assert_eq!(s["observedGeneration"], 1);
    // the identities Secret holds one identity per coordinator, each for its own name
    let seen = seen.lock().unwrap();
    let ids = &seen
        .iter()
        .find(|(m, _, b)| m == "POST" && b["metadata"]["name"] == "factory-7-coord-identities")
        .unwrap()
        .2;
    for k in 0..3 {
        assert_eq!(
            data_of(ids, &format!("factory-7-coord-{k}.name")),
            Some(format!("factory-7-coord-{k}"))
        );
    }
}

#[tokio::test]
async fn a_cluster_is_not_ready_while_its_new_generation_rolls_out() {
    let c = cluster(2);
    let mut calls = existing_creds(&c);
    // the StatefulSet took the new spec (generation 2) but its controller
    // has only seen generation 1, with one pod updated
    calls.extend(cluster_applies(
        &c,
        2,
        json!({"observedGeneration": 1, "replicas": 3, "readyReplicas": 3, "updatedReplicas": 1,
               "currentRevision": "r1", "updateRevision": "r2"}),
    ));
    calls.extend(tenants_calls(vec![], vec![]));
    calls.push(status_applied(weft("weftclusters/factory-7/status"), &c));
    let (client, seen, task) = api_server(calls);
    let fabric = Arc::new(FakeFabric::default());
    *fabric.status.lock().unwrap() = led();
    let ctx = ctx(client, fabric);
    let action = controller::reconcile_cluster(Arc::new(c), ctx.clone())
        .await
        .unwrap();
    assert_eq!(action, Action::requeue(controller::ROLLING));
    finish(task, ctx).await;
    let s = status_written(&seen);
    assert_eq!(cond(&s, "Ready")["status"], "False");
    assert_eq!(cond(&s, "Ready")["reason"], "Updating");
    assert_eq!(cond(&s, "Progressing")["status"], "True");
    assert_eq!(s["observedGeneration"], 2);
    assert_eq!(cond(&s, "Ready")["observedGeneration"], 2);
}

#[tokio::test]
async fn a_cluster_without_a_quorum_says_so() {
    let c = cluster(1);
    let mut calls = existing_creds(&c);
    calls.extend(cluster_applies(
        &c,
        1,
        json!({"observedGeneration": 1, "replicas": 3, "readyReplicas": 1, "updatedReplicas": 3,
               "currentRevision": "r1", "updateRevision": "r1"}),
    ));
    calls.extend(tenants_calls(vec![], vec![]));
    calls.push(status_applied(weft("weftclusters/factory-7/status"), &c));
    let (client, seen, task) = api_server(calls);
    let ctx = ctx(client, Arc::new(FakeFabric::default()));
    controller::reconcile_cluster(Arc::new(c), ctx.clone())
        .await
        .unwrap();
    finish(task, ctx).await;
    let s = status_written(&seen);
    assert_eq!(cond(&s, "RaftQuorum")["reason"], "NotEnoughCoordinators");
    assert_eq!(cond(&s, "Ready")["reason"], "PodsNotReady");
    assert_eq!(cond(&s, "Degraded")["status"], "True");
}

#[tokio::test]
async fn a_conflict_creating_the_ca_requeues_soon_without_an_error() {
    let c = cluster(1);
    let calls = vec![
        call("GET", core("secrets/factory-7-ca"), 404, not_found()),
        call(
            "POST",
            core("secrets"),
            409,
            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "AlreadyExists", "code": 409, "message": "exists"}),
        ),
    ];
    let (client, _seen, task) = api_server(calls);
    let ctx = ctx(client, Arc::new(FakeFabric::default()));
    let action = controller::reconcile_cluster(Arc::new(c), ctx.clone())
        .await
        .unwrap();
    assert_eq!(action, Action::requeue(Duration::from_secs(1)));
    finish(task, ctx).await;
}

#[tokio::test]
async fn a_server_error_fails_the_reconcile_with_an_event_and_backs_off() {
    let c = cluster(1);
    let first = render::cluster(&c).unwrap()[0].clone();
    let mut calls = existing_creds(&c);
    calls.push(call("PATCH", path_of(&first), 500,
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "InternalError", "code": 500, "message": "etcd is down"})));
    calls.push(call("POST", format!("/apis/events.k8s.io/v1/namespaces/{NS}/events"), 201,
        json!({"apiVersion": "events.k8s.io/v1", "kind": "Event", "metadata": {"name": "e"}, "eventTime": "2026-12-01T12:00:00.000000Z"})));
    let (client, seen, task) = api_server(calls);
    let ctx = ctx(client, Arc::new(FakeFabric::default()));
    let c = Arc::new(c);
    let e = controller::reconcile_cluster(c.clone(), ctx.clone())
        .await
        .unwrap_err();
    assert!(e.to_string().contains("etcd is down"), "{e}");
    // the error policy backs off, longer each time
    assert_eq!(
        controller::on_error(c.clone(), &e, ctx.clone()),
        Action::requeue(Duration::from_secs(5))
    );
    assert_eq!(
        controller::on_error(c, &e, ctx.clone()),
        Action::requeue(Duration::from_secs(10))
    );
    finish(task, ctx).await;
    let seen = seen.lock().unwrap();
    let ev = &seen.last().unwrap().2;
    assert_eq!(ev["type"], "Warning");
    assert_eq!(ev["reason"], "ReconcileFailed");
}

#[tokio::test]
async fn an_invalid_cluster_says_why_and_waits_for_a_change() {
    let mut c = cluster(3);
    c.spec.coordinators.replicas = 4;
    let calls = vec![status_applied(weft("weftclusters/factory-7/status"), &c)];
    let (client, seen, task) = api_server(calls);
    let ctx = ctx(client, Arc::new(FakeFabric::default()));
    let action = controller::reconcile_cluster(Arc::new(c), ctx.clone())
        .await
        .unwrap();
    assert_eq!(action, Action::await_change());
    finish(task, ctx).await;
    let s = status_written(&seen);
    assert_eq!(cond(&s, "Ready")["reason"], "InvalidSpec");
    assert!(cond(&s, "Ready")["message"]
        .as_str()
        .unwrap()
        .contains("1, 3 or 5"));
}

// ------------------------------------------------------------- FabricNodePool

fn edge_pool() -> FabricNodePool {
    with_meta(example("edge-site/site.yaml", "FabricNodePool"), 1)
}

fn node(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": {"weft.dev/gateway": "true"}}})
}

fn pool_start(p: &FabricNodePool, nodes: &[&str]) -> (Vec<Call>, WeftCluster) {
    let c = cluster(1);
    let cr = creds(&c);
    let mut cj = serde_json::to_value(&c).unwrap();
    cj["metadata"]["namespace"] = json!(NS);
    let calls = vec![
        call("GET", weft("weftclusters/factory-7"), 200, cj),
        call("GET", core("secrets/factory-7-ca"), 200, cr.ca),
        call(
            "GET",
            core(&format!(
                "secrets/{}",
                render::join_secret(p.metadata.name.as_deref().unwrap())
            )),
            404,
            not_found(),
        ),
        call(
            "GET",
            "/api/v1/nodes",
            200,
            json!({"apiVersion": "v1", "kind": "NodeList", "metadata": {}, "items": nodes.iter().map(|n| node(n)).collect::<Vec<_>>()}),
        ),
        call("GET", core("secrets/factory-7-admin"), 200, cr.admin),
        applied(core("secrets/gateways-join"), Value::Null),
    ];
    (calls, c)
}

/// Applies of what the edge pool renders; its DaemonSet answers with
/// `desired` pods scheduled, `ready` ready and `updated` updated.
fn pool_applies(
    p: &FabricNodePool,
    c: &WeftCluster,
    desired: i64,
    ready: i64,
    updated: i64,
) -> Vec<Call> {
    render::pool(p, c)
        .unwrap()
        .iter()
        .map(|o| {
            let extra = if o["kind"] == "DaemonSet" {
                json!({"metadata": {"generation": 1}, "status": {"observedGeneration": 1,
                    "desiredNumberScheduled": desired, "numberReady": ready, "updatedNumberScheduled": updated}})
            } else {
                Value::Null
            };
            applied(path_of(o), extra)
        })
        .collect()
}

#[tokio::test]
async fn an_edge_pool_gets_a_join_token_per_matching_node_and_a_daemonset() {
    let p = edge_pool();
    let (mut calls, c) = pool_start(&p, &["gw-1", "ip-10-0-0-7.eu-west-1.compute.internal"]);
    calls.extend(pool_applies(&p, &c, 2, 2, 2));
    calls.push(status_applied(weft("fabricnodepools/gateways/status"), &p));
    let (client, seen, task) = api_server(calls);
    let ctx = ctx(client, Arc::new(FakeFabric::default()));
    controller::reconcile_pool(Arc::new(p), ctx.clone())
        .await
        .unwrap();
    finish(task, ctx).await;
    let s = status_written(&seen);
    assert_eq!(cond(&s, "Ready")["status"], "True", "{s}");
    assert_eq!(s["readyReplicas"], 2);
    assert_eq!(
        s["selector"],
        "app.kubernetes.io/instance=factory-7,weft.dev/pool=gateways"
    );
    // each node's token is for its own (mapped) name, from the cluster's CA
    let seen = seen.lock().unwrap();
    let join = &seen
        .iter()
        .find(|(m, p, _)| m == "PATCH" && p.ends_with("/secrets/gateways-join"))
        .unwrap()
        .2;
    let tokens: BTreeMap<String, String> = join["data"]
        .as_object()
        .unwrap()
        .keys()
        .map(|k| (k.clone(), data_of(join, k).unwrap()))
        .collect();
    let odd = weft_cluster::credentials::node_name_for("ip-10-0-0-7.eu-west-1.compute.internal");
    assert_eq!(tokens.keys().cloned().collect::<Vec<_>>(), {
        let mut v = vec!["gw-1".to_string(), odd.clone()];
        v.sort();
        v
    });
    for (name, t) in &tokens {
        let claims = weft_cluster::credentials::TokenClaims::peek(t).unwrap();
        assert_eq!(&claims.name, name);
        assert_eq!(claims.role, weft_cluster::credentials::Role::Node);
    }
}

#[tokio::test]
async fn a_pool_whose_pods_cannot_be_scheduled_says_insufficient_capacity() {
    let p = edge_pool();
    let (mut calls, c) = pool_start(&p, &["gw-1"]);
    calls.extend(pool_applies(&p, &c, 1, 0, 1));
    calls.push(call("GET", core("pods"), 200, json!({"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": [{
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "gateways-x"},
        "status": {"conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                                   "message": "0/1 nodes are available: 1 Insufficient memory."}]}}]})));
    calls.push(status_applied(weft("fabricnodepools/gateways/status"), &p));
    let (client, seen, task) = api_server(calls);
    let ctx = ctx(client, Arc::new(FakeFabric::default()));
    controller::reconcile_pool(Arc::new(p), ctx.clone())
        .await
        .unwrap();
    finish(task, ctx).await;
    let r = cond(&status_written(&seen), "Ready").clone();
    assert_eq!(r["reason"], "InsufficientCapacity");
    assert!(
        r["message"]
            .as_str()
            .unwrap()
            .contains("Insufficient memory"),
        "{r}"
    );
}

#[tokio::test]
async fn a_pool_of_a_missing_cluster_says_cluster_not_found() {
    let p = edge_pool();
    let calls = vec![
        call("GET", weft("weftclusters/factory-7"), 404, not_found()),
        status_applied(weft("fabricnodepools/gateways/status"), &p),
    ];
    let (client, seen, task) = api_server(calls);
    let ctx = ctx(client, Arc::new(FakeFabric::default()));
    controller::reconcile_pool(Arc::new(p), ctx.clone())
        .await
        .unwrap();
    finish(task, ctx).await;
    assert_eq!(
        cond(&status_written(&seen), "Ready")["reason"],
        "ClusterNotFound"
    );
}

// ------------------------------------------------------------------ WeftModel

fn model(finalized: bool, deleting: bool) -> WeftModel {
    let mut m: WeftModel = with_meta(example("edge-site/site.yaml", "WeftModel"), 1);
    if finalized {
        m.metadata.finalizers = Some(vec![controller::MODEL_FINALIZER.into()]);
    }
    if deleting {
        m.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            "2026-12-01T12:00:00Z".parse().unwrap(),
        ));
    }
    m
}

fn cluster_list(c: &WeftCluster) -> Value {
    let mut cj = serde_json::to_value(c).unwrap();
    cj["metadata"]["namespace"] = json!(NS);
    json!({"apiVersion": "weft.dev/v1alpha1", "kind": "WeftClusterList", "metadata": {}, "items": [cj]})
}

#[tokio::test]
async fn a_new_model_gets_its_finalizer_before_anything_else() {
    let m = model(false, false);
    let mut back = serde_json::to_value(&m).unwrap();
    back["metadata"]["finalizers"] = json!([controller::MODEL_FINALIZER]);
    let calls = vec![call("PATCH", weft("weftmodels/smollm2-135m"), 200, back)];
    let (client, seen, task) = api_server(calls);
    let fabric = Arc::new(FakeFabric::default());
    let ctx = ctx(client, fabric.clone());
    controller::reconcile_model(Arc::new(m), ctx.clone())
        .await
        .unwrap();
    finish(task, ctx).await;
    let patch = seen.lock().unwrap()[0].2.to_string();
    assert!(patch.contains(controller::MODEL_FINALIZER), "{patch}");
    assert!(fabric.puts.lock().unwrap().is_empty());
}

#[tokio::test]
async fn a_model_is_registered_with_the_coordinators_and_its_placements_reported() {
    let m = model(true, false);
    let c = cluster(1);
    let calls = vec![
        call("GET", weft("weftclusters"), 200, cluster_list(&c)),
        call("GET", core("secrets/factory-7-admin"), 200, creds(&c).admin),
        status_applied(weft("weftmodels/smollm2-135m/status"), &m),
    ];
    let (client, seen, task) = api_server(calls);
    let fabric = Arc::new(FakeFabric::default());
    let mut st = led();
    st.placements.insert(
        "smollm2-135m".into(),
        vec![
            Placed {
                node: "gw-1".into(),
                site: "factory-7".into(),
                layers: None,
                loaded: Some(true),
            },
            Placed {
                node: "gw-2".into(),
                site: "factory-7".into(),
                layers: None,
                loaded: Some(false),
            },
        ],
    );
    *fabric.status.lock().unwrap() = st;
    let ctx = ctx(client, fabric.clone());
    controller::reconcile_model(Arc::new(m), ctx.clone())
        .await
        .unwrap();
    finish(task, ctx).await;
    assert_eq!(
        fabric
            .puts
            .lock()
            .unwrap()
            .iter()
            .map(|r| r.spec.name.clone())
            .collect::<Vec<_>>(),
        ["smollm2-135m"]
    );
    // its replicas (1) are the floor weft keeps placed, where it asks
    let put = fabric.puts.lock().unwrap()[0].clone();
    assert_eq!(put.spec.min_replicas, 1);
    assert_eq!(put.spec.prefer, Some(weft_placement::SiteKind::Edge));
    assert_eq!(put.sites, ["factory-7"]);
    let s = status_written(&seen);
    assert_eq!(s["replicas"], 1);
    assert_eq!(s["placements"][0]["state"], "Loaded");
    assert_eq!(s["placements"][1]["state"], "Loading");
    assert_eq!(cond(&s, "Placed")["status"], "True");
    assert_eq!(cond(&s, "Ready")["status"], "True");
}

#[tokio::test]
async fn a_model_whose_file_does_not_match_its_sha256_is_not_registered() {
    let mut m = model(true, false);
    m.spec.sha256 = Some("b".repeat(64));
    let c = cluster(1);
    let calls = vec![
        call("GET", weft("weftclusters"), 200, cluster_list(&c)),
        call("GET", core("secrets/factory-7-admin"), 200, creds(&c).admin),
        status_applied(weft("weftmodels/smollm2-135m/status"), &m),
    ];
    let (client, seen, task) = api_server(calls);
    let fabric = Arc::new(FakeFabric::default());
    let ctx = ctx(client, fabric.clone());
    controller::reconcile_model(Arc::new(m), ctx.clone())
        .await
        .unwrap();
    finish(task, ctx).await;
    assert!(
        fabric.puts.lock().unwrap().is_empty(),
        "a mismatched file was registered"
    );
    assert_eq!(
        cond(&status_written(&seen), "ArtifactsReady")["reason"],
        "Sha256Mismatch"
    );
}

#[tokio::test]
async fn a_deleted_model_is_unplaced_before_its_finalizer_is_removed() {
    let m = model(true, true);
    let c = cluster(1);
    let mut back = serde_json::to_value(&m).unwrap();
    back["metadata"]["finalizers"] = json!([]);
    let calls = vec![
        call("GET", weft("weftclusters"), 200, cluster_list(&c)),
        call("GET", core("secrets/factory-7-admin"), 200, creds(&c).admin),
        call("PATCH", weft("weftmodels/smollm2-135m"), 200, back),
    ];
    let (client, seen, task) = api_server(calls);
    let fabric = Arc::new(FakeFabric::default());
    let ctx = ctx(client, fabric.clone());
    controller::reconcile_model(Arc::new(m), ctx.clone())
        .await
        .unwrap();
    finish(task, ctx).await;
    assert_eq!(*fabric.removed.lock().unwrap(), ["smollm2-135m"]);
    let patch = seen.lock().unwrap().last().unwrap().2.to_string();
    assert!(
        patch.contains("remove"),
        "the finalizer was not removed: {patch}"
    );
}

// ---------------------------------------------------------------- AgentPolicy

fn policy() -> AgentPolicy {
    with_meta(example("edge-site/site.yaml", "AgentPolicy"), 1)
}

fn policy_calls(key_secret: (u16, Value)) -> Vec<Call> {
    policy_calls_for(policy(), key_secret)
}

fn policy_calls_for(p: AgentPolicy, key_secret: (u16, Value)) -> Vec<Call> {
    let c = cluster(1);
    let mut cj = serde_json::to_value(&c).unwrap();
    cj["metadata"]["namespace"] = json!(NS);
    let mut pj = serde_json::to_value(&p).unwrap();
    pj["metadata"]["namespace"] = json!(NS);
    let mut calls = vec![
        call("GET", weft("weftclusters/factory-7"), 200, cj),
        call(
            "GET",
            "/apis/node.k8s.io/v1/runtimeclasses/gvisor",
            200,
            json!({"apiVersion": "node.k8s.io/v1", "kind": "RuntimeClass", "metadata": {"name": "gvisor"}, "handler": "runsc"}),
        ),
    ];
    calls.extend(tenants_calls(
        vec![pj],
        vec![("line-agents-key", key_secret.0, key_secret.1)],
    ));
    calls.push(status_applied(weft("agentpolicies/line-agents/status"), &p));
    calls
}

#[tokio::test]
async fn a_policy_puts_its_keys_and_limits_into_the_tenants_secret() {
    let calls = policy_calls((
        200,
        secret("line-agents-key", &[("api-key", "sk-line-0123456789")]),
    ));
    let (client, seen, task) = api_server(calls);
    let ctx = ctx(client, Arc::new(FakeFabric::default()));
    controller::reconcile_policy(Arc::new(policy()), ctx.clone())
        .await
        .unwrap();
    finish(task, ctx).await;
    let s = status_written(&seen);
    assert_eq!(cond(&s, "ResolvedRefs")["status"], "True");
    assert_eq!(cond(&s, "Enforced")["status"], "True");
    // what the operator writes is what a node reads
    let f = tenants_written(&seen);
    assert_eq!(
        f.api_keys.0.get("sk-line-0123456789").map(String::as_str),
        Some("line-agents")
    );
    let t = &f.tenants["line-agents"];
    assert_eq!(t.requests_per_minute, Some(600));
    assert_eq!(t.max_concurrent, Some(8));
    assert_eq!(t.models.as_deref(), Some(&["smollm2-135m".to_string()][..]));
    // no sandboxes in the policy: none for the tenant
    assert_eq!(t.max_sandboxes, Some(0));
    // the cluster's own keys are there too
    assert_eq!(
        f.api_keys.0.get("sk-ops-000000001").map(String::as_str),
        Some("ops")
    );
}

#[tokio::test]
async fn a_policy_naming_a_missing_secret_is_resolved_refs_false_and_its_keys_left_out() {
    let calls = policy_calls((404, not_found()));
    let (client, seen, task) = api_server(calls);
    let ctx = ctx(client, Arc::new(FakeFabric::default()));
    controller::reconcile_policy(Arc::new(policy()), ctx.clone())
        .await
        .unwrap();
    finish(task, ctx).await;
    let s = status_written(&seen);
    assert_eq!(cond(&s, "ResolvedRefs")["status"], "False");
    assert!(cond(&s, "ResolvedRefs")["message"]
        .as_str()
        .unwrap()
        .contains("line-agents-key"));
    assert_eq!(cond(&s, "Enforced")["status"], "False");
    let f = tenants_written(&seen);
    assert!(
        !f.api_keys.0.values().any(|t| t == "line-agents"),
        "{:?}",
        f.api_keys
    );
}

/// A model registered as `record("smollm2-135m")` with `floor`.
fn registered_with_floor(floor: u32) -> FabricStatus {
    let mut st = led();
    let mut registered = record("smollm2-135m");
    registered.spec.min_replicas = floor;
    // as the edge example places it: the edge first, at factory-7 only
    registered.spec.prefer = Some(weft_placement::SiteKind::Edge);
    registered.sites = vec!["factory-7".into()];
    st.models.insert("smollm2-135m".into(), registered);
    st
}

fn model_calls(m: &WeftModel) -> Vec<Call> {
    let c = cluster(1);
    vec![
        call("GET", weft("weftclusters"), 200, cluster_list(&c)),
        call("GET", core("secrets/factory-7-admin"), 200, creds(&c).admin),
        status_applied(weft("weftmodels/smollm2-135m/status"), m),
    ]
}

#[tokio::test]
async fn a_scaled_model_moves_its_floor_without_fetching_its_file_again() {
    let mut m = model(true, false);
    m.spec.replicas = Some(3);
    let (client, _seen, task) = api_server(model_calls(&m));
    let fabric = Arc::new(FakeFabric::default());
    *fabric.status.lock().unwrap() = registered_with_floor(1);
    let ctx = ctx(client, fabric.clone());
    controller::reconcile_model(Arc::new(m), ctx.clone())
        .await
        .unwrap();
    finish(task, ctx).await;
    assert_eq!(
        *fabric.fetched.lock().unwrap(),
        0,
        "the file was fetched again"
    );
    let puts = fabric.puts.lock().unwrap();
    assert_eq!(puts.len(), 1);
    assert_eq!(puts[0].spec.min_replicas, 3);
}

#[tokio::test]
async fn a_model_already_registered_as_wanted_is_not_put_again() {
    let m = model(true, false);
    let (client, _seen, task) = api_server(model_calls(&m));
    let fabric = Arc::new(FakeFabric::default());
    *fabric.status.lock().unwrap() = registered_with_floor(1);
    let ctx = ctx(client, fabric.clone());
    controller::reconcile_model(Arc::new(m), ctx.clone())
        .await
        .unwrap();
    finish(task, ctx).await;
    assert!(fabric.puts.lock().unwrap().is_empty());
}

#[tokio::test]
async fn an_autoscaled_model_gets_its_scaled_object_and_no_hpa() {
    let mut m: WeftModel = with_meta(example("cloud-region/site.yaml", "WeftModel"), 1);
    m.metadata.finalizers = Some(vec![controller::MODEL_FINALIZER.into()]);
    let c: WeftCluster = with_meta(example("cloud-region/site.yaml", "WeftCluster"), 1);
    let so = render::model(&m, &c).unwrap().remove(0);
    let calls = vec![
        call("GET", weft("weftclusters"), 200, cluster_list(&c)),
        call("GET", core("secrets/eu-west-admin"), 200, creds(&c).admin),
        applied(path_of(&so), Value::Null),
        call(
            "DELETE",
            format!("/apis/autoscaling/v2/namespaces/{NS}/horizontalpodautoscalers/smollm2-135m"),
            404,
            not_found(),
        ),
        status_applied(weft("weftmodels/smollm2-135m/status"), &m),
    ];
    let (client, seen, task) = api_server(calls);
    let fabric = Arc::new(FakeFabric::default());
    let ctx = ctx(client, fabric.clone());
    controller::reconcile_model(Arc::new(m), ctx.clone())
        .await
        .unwrap();
    finish(task, ctx).await;
    // until KEDA scales it, weft keeps the autoscaler's minimum placed
    assert_eq!(fabric.puts.lock().unwrap()[0].spec.min_replicas, 1);
    let seen = seen.lock().unwrap();
    let applied_so = &seen
        .iter()
        .find(|(_, p, _)| p.contains("/scaledobjects/"))
        .unwrap()
        .2;
    assert_eq!(applied_so["spec"]["scaleTargetRef"]["kind"], "WeftModel");
}

#[tokio::test]
async fn a_policy_asking_for_agent_sandboxes_is_not_accepted() {
    let mut p = policy();
    p.spec.sandboxes = Some(SandboxRules {
        isolation: SandboxTier::Process,
        templates: Vec::new(),
        max_sandboxes: Some(4),
        memory_mb: None,
        network: "disabled".into(),
    });
    let calls = policy_calls_for(
        p.clone(),
        (
            200,
            secret("line-agents-key", &[("api-key", "sk-line-0123456789")]),
        ),
    );
    let (client, seen, task) = api_server(calls);
    let ctx = ctx(client, Arc::new(FakeFabric::default()));
    controller::reconcile_policy(Arc::new(p), ctx.clone())
        .await
        .unwrap();
    finish(task, ctx).await;
    let s = status_written(&seen);
    assert_eq!(cond(&s, "Accepted")["reason"], "Unsupported");
    assert_eq!(cond(&s, "Enforced")["status"], "False");
    assert!(!tenants_written(&seen)
        .api_keys
        .0
        .contains_key("sk-line-0123456789"));
}

#[tokio::test]
async fn a_policy_with_a_key_too_short_for_the_nodes_is_not_enforced() {
    let calls = policy_calls((200, secret("line-agents-key", &[("api-key", "short")])));
    let (client, seen, task) = api_server(calls);
    let ctx = ctx(client, Arc::new(FakeFabric::default()));
    controller::reconcile_policy(Arc::new(policy()), ctx.clone())
        .await
        .unwrap();
    finish(task, ctx).await;
    let s = status_written(&seen);
    assert_eq!(cond(&s, "Accepted")["reason"], "InvalidKey");
    assert_eq!(cond(&s, "Enforced")["status"], "False");
    // the file stays one every node takes
    assert!(!tenants_written(&seen).api_keys.0.contains_key("short"));
}

#[tokio::test]
async fn a_deleted_policys_keys_leave_the_tenants_secret_at_the_clusters_next_reconcile() {
    // no policy any more: the cluster's reconcile writes the file without it
    let c = cluster(1);
    let mut calls = existing_creds(&c);
    calls.extend(cluster_applies(&c, 1, rolled_out(3, 1)));
    calls.extend(tenants_calls(vec![], vec![]));
    calls.push(status_applied(weft("weftclusters/factory-7/status"), &c));
    let (client, seen, task) = api_server(calls);
    let fabric = Arc::new(FakeFabric::default());
    *fabric.status.lock().unwrap() = led();
    let ctx = ctx(client, fabric);
    controller::reconcile_cluster(Arc::new(c), ctx.clone())
        .await
        .unwrap();
    finish(task, ctx).await;
    let f = tenants_written(&seen);
    assert_eq!(
        f.api_keys.0.len(),
        1,
        "only the cluster's own key: {:?}",
        f.api_keys
    );
    assert!(f.tenants.is_empty());
}

#[tokio::test]
async fn a_redeemed_join_token_is_replaced_so_a_returning_pod_can_join() {
    use weft_cluster::credentials::{ClusterCa, Role};
    let p = edge_pool();
    let c = cluster(1);
    let cr = creds(&c);
    let ca = {
        let cert = data_of(&cr.ca, "ca.pem").unwrap();
        let key = data_of(&cr.ca, "ca.key").unwrap();
        ClusterCa::from_pem(cert, &key).unwrap()
    };
    let old = ca
        .issue_token(1_796_126_000, 86_400, "gw-1", Role::Node)
        .unwrap();
    let nonce = weft_cluster::credentials::TokenClaims::peek(&old)
        .unwrap()
        .nonce;
    let mut cj = serde_json::to_value(&c).unwrap();
    cj["metadata"]["namespace"] = json!(NS);
    let mut calls = vec![
        call("GET", weft("weftclusters/factory-7"), 200, cj),
        call("GET", core("secrets/factory-7-ca"), 200, cr.ca.clone()),
        call(
            "GET",
            core("secrets/gateways-join"),
            200,
            secret("gateways-join", &[("gw-1", &old)]),
        ),
        call(
            "GET",
            "/api/v1/nodes",
            200,
            json!({"apiVersion": "v1", "kind": "NodeList", "metadata": {}, "items": [node("gw-1")]}),
        ),
        call("GET", core("secrets/factory-7-admin"), 200, cr.admin),
        applied(core("secrets/gateways-join"), Value::Null),
    ];
    calls.extend(pool_applies(&p, &c, 1, 1, 1));
    calls.push(status_applied(weft("fabricnodepools/gateways/status"), &p));
    let (client, seen, task) = api_server(calls);
    let fabric = Arc::new(FakeFabric::default());
    let mut st = led();
    st.used_tokens.insert(nonce);
    *fabric.status.lock().unwrap() = st;
    let ctx = ctx(client, fabric);
    controller::reconcile_pool(Arc::new(p), ctx.clone())
        .await
        .unwrap();
    finish(task, ctx).await;
    let seen = seen.lock().unwrap();
    let join = &seen
        .iter()
        .find(|(m, p, _)| m == "PATCH" && p.ends_with("/secrets/gateways-join"))
        .unwrap()
        .2;
    let new = data_of(join, "gw-1").unwrap();
    assert_ne!(new, old, "the redeemed token was handed out again");
    assert_eq!(
        weft_cluster::credentials::TokenClaims::peek(&new)
            .unwrap()
            .name,
        "gw-1"
    );
}

#[tokio::test]
async fn a_model_whose_file_cannot_be_fetched_fails_and_backs_off() {
    let m = model(true, false);
    let mut calls = model_calls(&m);
    calls.push(call(
        "POST",
        format!("/apis/events.k8s.io/v1/namespaces/{NS}/events"),
        201,
        json!({"apiVersion": "events.k8s.io/v1", "kind": "Event", "metadata": {"name": "e"}, "eventTime": "2026-12-01T12:00:00.000000Z"}),
    ));
    let (client, seen, task) = api_server(calls);
    let fabric = Arc::new(FakeFabric::default());
    *fabric.fetch_fails.lock().unwrap() = true;
    let ctx = ctx(client, fabric);
    let m = Arc::new(m);
    let e = controller::reconcile_model(m.clone(), ctx.clone())
        .await
        .unwrap_err();
    assert!(e.to_string().contains("no such package"), "{e}");
    assert_eq!(
        controller::on_error(m.clone(), &e, ctx.clone()),
        Action::requeue(Duration::from_secs(5))
    );
    assert_eq!(
        controller::on_error(m, &e, ctx.clone()),
        Action::requeue(Duration::from_secs(10))
    );
    finish(task, ctx).await;
    assert_eq!(
        cond(&status_written(&seen), "ArtifactsReady")["reason"],
        "FetchFailed"
    );
}

#[tokio::test]
async fn turning_autoscaling_off_deletes_the_autoscaler_the_operator_made() {
    let mut m: WeftModel = with_meta(example("cloud-region/site.yaml", "WeftModel"), 2);
    m.metadata.finalizers = Some(vec![controller::MODEL_FINALIZER.into()]);
    m.spec.autoscaling = None;
    m.spec.replicas = Some(2);
    m.status = Some(WeftModelStatus {
        autoscaler: Some("ScaledObject".into()),
        ..Default::default()
    });
    let c: WeftCluster = with_meta(example("cloud-region/site.yaml", "WeftCluster"), 1);
    let calls = vec![
        call("GET", weft("weftclusters"), 200, cluster_list(&c)),
        call("GET", core("secrets/eu-west-admin"), 200, creds(&c).admin),
        call(
            "DELETE",
            format!("/apis/keda.sh/v1alpha1/namespaces/{NS}/scaledobjects/smollm2-135m"),
            200,
            json!({"kind": "Status", "apiVersion": "v1", "status": "Success", "code": 200}),
        ),
        status_applied(weft("weftmodels/smollm2-135m/status"), &m),
    ];
    let (client, seen, task) = api_server(calls);
    let ctx = ctx(client, Arc::new(FakeFabric::default()));
    controller::reconcile_model(Arc::new(m), ctx.clone())
        .await
        .unwrap();
    finish(task, ctx).await;
    assert_eq!(status_written(&seen).get("autoscaler"), Some(&Value::Null));
}
