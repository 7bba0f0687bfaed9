//! `k8s/` as a platform engineer applies it, checked offline: every
//! overlay renders with `kubectl kustomize` and passes `kubernetes-validate
//! --strict` against Kubernetes 1.33, its custom resources pass their CRDs'
//! checks, and every pod runs locked down. The objects the operator renders
//! for the examples are held in golden files (`WEFT_BLESS=1` rewrites them
//! after a deliberate change) and pass the same validation.

use std::path::Path;

use serde_json::Value;
use weft_operator::crd::*;
use weft_operator::render;

mod common;
use common::{k8s, kubernetes_validate as validate, kustomize};

fn overlay(name: &str) -> Vec<Value> {
    let text = kustomize(&k8s().join("overlays").join(name));
    validate(&text).unwrap_or_else(|e| panic!("overlay {name}: {e}"));
    weft_operator::documents(&text).unwrap()
}

fn assert_overlay(name: &str) {
    let docs = overlay(name);
    let kinds: Vec<&str> = docs.iter().map(|d| d["kind"].as_str().unwrap()).collect();
    for want in [
        "CustomResourceDefinition",
        "Deployment",
        "ClusterRole",
        "NetworkPolicy",
        "WeftCluster",
    ] {
        assert!(
            kinds.contains(&want),
            "overlay {name} has no {want}: {kinds:?}"
        );
    }
    for d in &docs {
        assert!(
            weft_operator::check(d).is_ok(),
            "overlay {name}: {} {} fails its CRD's checks: {:?}",
            d["kind"],
            d["metadata"]["name"],
            weft_operator::check(d)
        );
    }
}

#[test]
fn the_edge_overlay_renders_and_validates() {
    assert_overlay("edge");
}

#[test]
fn the_cloud_overlay_renders_and_validates() {
    assert_overlay("cloud");
}

#[test]
fn the_dev_overlay_renders_and_validates() {
    assert_overlay("dev");
}

#[test]
fn the_prometheus_adapter_overlay_renders_and_validates() {
    assert_overlay("cloud-hpa");
}

#[test]
fn the_prometheus_adapter_overlay_scales_the_cloud_pool_with_an_hpa() {
    let docs = overlay("cloud-hpa");
    let hpa = docs
        .iter()
        .find(|d| d["kind"] == "HorizontalPodAutoscaler")
        .unwrap();
    assert_eq!(hpa["spec"]["scaleTargetRef"]["kind"], "FabricNodePool");
    assert_eq!(
        hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"],
        300
    );
    assert!(!docs
        .iter()
        .any(|d| d["kind"] == "ScaledObject"
            && d["spec"]["scaleTargetRef"]["kind"] == "FabricNodePool"));
}

#[test]
fn the_edge_overlay_keeps_the_operator_through_a_partition() {
    let docs = overlay("edge");
    let op = docs.iter().find(|d| d["kind"] == "Deployment").unwrap();
    let keys: Vec<&str> = op["spec"]["template"]["spec"]["tolerations"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t.get("tolerationSeconds").is_none())
        .map(|t| t["key"].as_str().unwrap())
        .collect();
    assert!(keys.contains(&"node.kubernetes.io/unreachable"), "{keys:?}");
}

/// Every pod template's containers run as non-root, with a read-only root
/// filesystem, no escalation, no capabilities, resources and probes.
fn assert_locked_down(docs: &[Value], what: &str) {
    let mut pods = 0;
    for d in docs {
        let spec = match d["kind"].as_str().unwrap() {
            "Deployment" | "StatefulSet" | "DaemonSet" => &d["spec"]["template"]["spec"],
            _ => continue,
        };
        pods += 1;
        let who = format!("{what}: {} {}", d["kind"], d["metadata"]["name"]);
        assert_eq!(spec["securityContext"]["runAsNonRoot"], true, "{who}");
        assert_eq!(spec["hostNetwork"], Value::Null, "{who}");
        for c in spec["containers"].as_array().unwrap() {
            let sc = &c["securityContext"];
            assert_eq!(sc["runAsNonRoot"], true, "{who}");
            assert_eq!(sc["readOnlyRootFilesystem"], true, "{who}");
            assert_eq!(sc["allowPrivilegeEscalation"], false, "{who}");
            assert_eq!(
                sc["capabilities"]["drop"],
                serde_json::json!(["ALL"]),
                "{who}"
            );
            assert_eq!(sc["capabilities"].get("add"), None, "{who}");
            assert!(c["resources"]["requests"].is_object(), "{who}: no requests");
            assert!(c["resources"]["limits"].is_object(), "{who}: no limits");
            assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz", "{who}");
            assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz", "{who}");
        }
    }
    assert!(pods > 0, "{what}: no pods");
}

#[test]
fn every_pod_an_overlay_runs_is_locked_down() {
    for o in ["edge", "cloud", "cloud-hpa", "dev"] {
        assert_locked_down(&overlay(o), o);
    }
}

/// `promtool ARGS` in the monitoring component's rules directory.
fn promtool(args: &[&str]) -> std::process::Output {
    std::process::Command::new("promtool")
        .args(args)
        .current_dir(k8s().join("components/monitoring/rules"))
        .output()
        .expect("promtool (Debian prometheus; scripts/install_test_deps.sh installs it)")
}

fn said(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn the_monitoring_rules_pass_promtool() {
    let out = promtool(&["check", "rules", "recording.yaml", "alerts.yaml"]);
    assert!(out.status.success(), "{}", said(&out));
}

#[test]
fn every_alert_fires_when_it_should_and_not_otherwise() {
    let out = promtool(&["test", "rules", "alerts_test.yaml"]);
    assert!(out.status.success(), "{}", said(&out));
}

#[test]
fn every_alert_has_a_test() {
    let alerts =
        std::fs::read_to_string(k8s().join("components/monitoring/rules/alerts.yaml")).unwrap();
    let tests = std::fs::read_to_string(k8s().join("components/monitoring/rules/alerts_test.yaml"))
        .unwrap();
    for line in alerts
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
    {
        assert!(
            tests.contains(&format!("alertname: {line}")),
            "alert {line} has no promtool test"
        );
    }
}

#[test]
fn the_monitoring_component_ships_the_rules_it_tests() {
    let docs = overlay("cloud");
    let cm = docs
        .iter()
        .find(|d| d["kind"] == "ConfigMap" && d["metadata"]["name"] == "weft-prometheus-rules")
        .expect("no weft-prometheus-rules ConfigMap");
    for f in ["recording.yaml", "alerts.yaml"] {
        let on_disk =
            std::fs::read_to_string(k8s().join("components/monitoring/rules").join(f)).unwrap();
        assert_eq!(cm["data"][f].as_str(), Some(on_disk.as_str()), "{f}");
    }
}

/// The groups of the monitoring component's rule files, in order.
fn rule_groups() -> Vec<Value> {
    ["recording.yaml", "alerts.yaml"]
        .iter()
        .flat_map(|f| {
            let text =
                std::fs::read_to_string(k8s().join("components/monitoring/rules").join(f)).unwrap();
            let v: Value = serde_yaml::from_str(&text).unwrap();
            v["groups"].as_array().unwrap().clone()
        })
        .collect()
}

#[test]
fn the_prometheus_rule_holds_exactly_the_tested_rule_files() {
    let path = k8s().join("components/prometheus-operator/prometheusrule.yaml");
    if std::env::var_os("WEFT_BLESS").is_some() {
        let rule = serde_json::json!({
            "apiVersion": "monitoring.coreos.com/v1",
            "kind": "PrometheusRule",
            "metadata": {
                "name": "weft",
                "namespace": "monitoring",
                "labels": {"app.kubernetes.io/name": "weft"},
            },
            "spec": {"groups": rule_groups()},
        });
        let text = format!(
            "# The monitoring component's rules/recording.yaml and rules/alerts.yaml\n\
             # as a PrometheusRule. Generated: edit those files, then run\n\
             # WEFT_BLESS=1 cargo test -p weft-operator --test manifests\n{}",
            serde_yaml::to_string(&rule).unwrap()
        );
        std::fs::write(&path, text).unwrap();
    }
    let on_disk: Value =
        serde_yaml::from_str(&std::fs::read_to_string(&path).unwrap_or_default()).unwrap();
    assert_eq!(on_disk["kind"], "PrometheusRule");
    assert!(
        on_disk["spec"]["groups"] == Value::Array(rule_groups()),
        "{} differs from the rule files: rerun with WEFT_BLESS=1",
        path.display()
    );
}

#[test]
fn the_service_monitor_selects_every_clusters_metrics_service() {
    let docs = overlay("cloud-hpa");
    let sm = docs
        .iter()
        .find(|d| d["kind"] == "ServiceMonitor")
        .expect("no ServiceMonitor in the cloud-hpa overlay");
    let (rendered, _) = rendered("cloud-region");
    let svc = rendered
        .iter()
        .find(|d| {
            d["kind"] == "Service"
                && d["metadata"]["name"]
                    .as_str()
                    .is_some_and(|n| n.ends_with("-metrics"))
        })
        .expect("the operator renders no metrics Service");
    for (k, v) in sm["spec"]["selector"]["matchLabels"].as_object().unwrap() {
        assert_eq!(&svc["metadata"]["labels"][k], v, "label {k}");
    }
    let port = sm["spec"]["endpoints"][0]["port"].as_str().unwrap();
    assert!(
        svc["spec"]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == port),
        "{svc}"
    );
    // the Service reaches every pod of the cluster: coordinators and pools
    let sel = svc["spec"]["selector"].as_object().unwrap();
    for d in rendered
        .iter()
        .filter(|d| matches!(d["kind"].as_str(), Some("StatefulSet" | "DaemonSet")))
    {
        let labels = &d["spec"]["template"]["metadata"]["labels"];
        for (k, v) in sel {
            assert_eq!(&labels[k], v, "{} {}", d["kind"], d["metadata"]["name"]);
        }
    }
}

#[test]
fn the_dashboard_is_provisioned_for_grafanas_sidecar_and_parses() {
    let docs = overlay("cloud");
    let cm = docs
        .iter()
        .find(|d| d["kind"] == "ConfigMap" && d["metadata"]["name"] == "weft-grafana-dashboards")
        .expect("no weft-grafana-dashboards ConfigMap");
    assert_eq!(cm["metadata"]["labels"]["grafana_dashboard"], "1");
    let d: Value = serde_json::from_str(cm["data"]["weft.json"].as_str().unwrap()).unwrap();
    let panels: Vec<&Value> = d["panels"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["type"] != "row")
        .collect();
    assert!(panels.len() >= 15, "{} panels", panels.len());
    for p in panels {
        let targets = p["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "panel {} has no query", p["title"]);
        assert!(
            targets.iter().all(|t| t["expr"].is_string()),
            "{}",
            p["title"]
        );
    }
}

// ------------------------------------------------------- what the operator renders

/// Everything the operator renders for an example (credentials' Secrets
/// and join tokens aside), with a fixed uid, as YAML documents.
fn rendered(example: &str) -> (Vec<Value>, String) {
    let text =
        std::fs::read_to_string(k8s().join("examples").join(example).join("site.yaml")).unwrap();
    let docs = weft_operator::documents(&text).unwrap();
    let uid = |mut v: Value| {
        v["metadata"]["uid"] = Value::String("00000000-0000-4000-8000-000000000000".into());
        v
    };
    let clusters: Vec<WeftCluster> = docs
        .iter()
        .filter(|d| d["kind"] == "WeftCluster")
        .map(|d| serde_json::from_value(uid(d.clone())).unwrap())
        .collect();
    let mut out = Vec::new();
    for c in &clusters {
        out.extend(render::cluster(c).unwrap());
    }
    for d in docs.iter().filter(|d| d["kind"] == "FabricNodePool") {
        let p: FabricNodePool = serde_json::from_value(uid(d.clone())).unwrap();
        let c = clusters
            .iter()
            .find(|c| c.metadata.name.as_deref() == Some(&p.spec.cluster_ref))
            .unwrap();
        out.extend(render::pool(&p, c).unwrap());
    }
    for d in docs.iter().filter(|d| d["kind"] == "WeftModel") {
        let m: WeftModel = serde_json::from_value(uid(d.clone())).unwrap();
        out.extend(render::model(&m, render::model_cluster(&m, &clusters).unwrap()).unwrap());
    }
    let yaml = out
        .iter()
        .map(|o| serde_yaml::to_string(o).unwrap())
        .collect::<Vec<_>>()
        .join("---\n");
    (out, yaml)
}

fn assert_golden(example: &str) {
    let (_, yaml) = rendered(example);
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(format!("{example}.yaml"));
    if std::env::var_os("WEFT_BLESS").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &yaml).unwrap();
    }
    let want = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        want == yaml,
        "the operator renders {example} differently from {}: check the change, then rerun with WEFT_BLESS=1",
        path.display()
    );
}

#[test]
fn the_edge_site_renders_as_its_golden_file() {
    assert_golden("edge-site");
}

#[test]
fn the_cloud_region_renders_as_its_golden_file() {
    assert_golden("cloud-region");
}

#[test]
fn what_the_operator_renders_passes_strict_validation() {
    for e in ["edge-site", "cloud-region"] {
        let (_, yaml) = rendered(e);
        validate(&yaml).unwrap_or_else(|err| panic!("{e}: {err}"));
    }
}

#[test]
fn every_pod_the_operator_renders_is_locked_down() {
    for e in ["edge-site", "cloud-region"] {
        assert_locked_down(&rendered(e).0, e);
    }
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

#[test]
fn an_edge_pool_is_a_daemonset_kept_through_a_partition() {
    let (docs, _) = rendered("edge-site");
    let ds = find(&docs, "DaemonSet", "gateways");
    let tol = ds["spec"]["template"]["spec"]["tolerations"]
        .as_array()
        .unwrap();
    for key in [
        "node.kubernetes.io/unreachable",
        "node.kubernetes.io/not-ready",
    ] {
        let t = tol
            .iter()
            .find(|t| t["key"] == key)
            .unwrap_or_else(|| panic!("no toleration of {key}"));
        assert_eq!(t["effect"], "NoExecute");
        assert!(
            t.get("tolerationSeconds").is_none(),
            "{key} is tolerated only for a while"
        );
    }
}

#[test]
fn a_cloud_pool_is_a_statefulset_with_a_cache_claim_per_pod_and_its_gpus() {
    let (docs, _) = rendered("cloud-region");
    let sts = find(&docs, "StatefulSet", "gpu-pool");
    assert_eq!(sts["spec"]["replicas"], 4);
    let claims: Vec<&str> = sts["spec"]["volumeClaimTemplates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["metadata"]["name"].as_str().unwrap())
        .collect();
    assert!(claims.contains(&"models"), "{claims:?}");
    assert_eq!(
        sts["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"],
        "1"
    );
}

#[test]
fn the_coordinators_disruption_budget_keeps_a_quorum() {
    for (e, name, quorum) in [
        ("edge-site", "factory-7-coord", 2),
        ("cloud-region", "eu-west-coord", 3),
    ] {
        let (docs, _) = rendered(e);
        assert_eq!(
            find(&docs, "PodDisruptionBudget", name)["spec"]["minAvailable"],
            quorum,
            "{e}"
        );
    }
}

#[test]
fn the_coordinators_find_each_other_by_stable_names() {
    let (docs, _) = rendered("edge-site");
    let cm = find(&docs, "ConfigMap", "factory-7-config");
    let toml_text = cm["data"]["factory-7-coord-1.toml"].as_str().unwrap();
    let v: toml::Value = toml::from_str(toml_text).unwrap();
    let peers = v["coordinator"]["peers"].as_array().unwrap();
    assert_eq!(peers.len(), 3);
    assert_eq!(
        peers[2]["addr"].as_str(),
        Some("factory-7-coord-2.factory-7-coord.weft.svc:7100")
    );
    assert_eq!(v["coordinator"]["id"].as_integer(), Some(2));
    let svc = find(&docs, "Service", "factory-7-coord");
    assert_eq!(svc["spec"]["clusterIP"], "None");
}

#[test]
fn weft_pods_are_denied_all_traffic_but_what_a_policy_opens() {
    let (docs, _) = rendered("edge-site");
    let deny = find(&docs, "NetworkPolicy", "factory-7-deny-all");
    assert_eq!(
        deny["spec"]["policyTypes"],
        serde_json::json!(["Ingress", "Egress"])
    );
    assert!(deny["spec"].get("ingress").is_none() && deny["spec"].get("egress").is_none());
    // the API is open to the cluster's own namespace and the agents' only
    let api = find(&docs, "NetworkPolicy", "factory-7-allow-api");
    let from = api["spec"]["ingress"][0]["from"].as_array().unwrap();
    let namespaces: Vec<&Value> = from
        .iter()
        .filter_map(|f| f.get("namespaceSelector"))
        .collect();
    assert_eq!(namespaces.len(), 1);
    assert_eq!(
        namespaces[0]["matchLabels"]["kubernetes.io/metadata.name"],
        "agents"
    );
    // metrics only from the monitoring namespace
    let m = find(&docs, "NetworkPolicy", "factory-7-allow-metrics");
    assert_eq!(
        m["spec"]["ingress"][0]["from"][0]["namespaceSelector"]["matchLabels"]
            ["kubernetes.io/metadata.name"],
        "monitoring"
    );
}

#[test]
fn weft_pods_carry_no_kubernetes_api_token() {
    let (docs, _) = rendered("edge-site");
    for d in docs
        .iter()
        .filter(|d| matches!(d["kind"].as_str(), Some("StatefulSet" | "DaemonSet")))
    {
        assert_eq!(
            d["spec"]["template"]["spec"]["automountServiceAccountToken"], false,
            "{}",
            d["metadata"]["name"]
        );
    }
}

#[test]
fn a_keda_model_scales_on_its_signal_with_a_slow_scale_down() {
    let (docs, _) = rendered("cloud-region");
    let so = find(&docs, "ScaledObject", "smollm2-135m");
    assert_eq!(so["spec"]["scaleTargetRef"]["kind"], "WeftModel");
    assert_eq!(so["spec"]["maxReplicaCount"], 8);
    let q = so["spec"]["triggers"][0]["metadata"]["query"]
        .as_str()
        .unwrap();
    assert!(
        q.contains("weft:queue_depth:sum") && q.contains("weft_cluster=\"eu-west\""),
        "{q}"
    );
    assert_eq!(
        so["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]
            ["stabilizationWindowSeconds"],
        300
    );
}

#[test]
fn an_autoscaler_that_is_turned_off_renders_nothing() {
    let text = std::fs::read_to_string(k8s().join("examples/cloud-region/site.yaml")).unwrap();
    let docs = weft_operator::documents(&text).unwrap();
    let c: WeftCluster = serde_json::from_value(
        docs.iter()
            .find(|d| d["kind"] == "WeftCluster")
            .unwrap()
            .clone(),
    )
    .unwrap();
    let mut m: WeftModel = serde_json::from_value(
        docs.iter()
            .find(|d| d["kind"] == "WeftModel")
            .unwrap()
            .clone(),
    )
    .unwrap();
    m.spec.autoscaling.as_mut().unwrap().actuator = Actuator::None;
    assert!(render::model(&m, &c).unwrap().is_empty());
    m.spec.autoscaling.as_mut().unwrap().actuator = Actuator::Hpa;
    let hpa = render::model(&m, &c).unwrap();
    assert_eq!(hpa[0]["kind"], "HorizontalPodAutoscaler");
    validate(&serde_yaml::to_string(&hpa[0]).unwrap()).unwrap();
}

#[test]
fn every_weft_pod_is_scraped_on_the_port_its_metrics_policy_opens() {
    for e in ["edge-site", "cloud-region"] {
        let (docs, _) = rendered(e);
        for d in docs
            .iter()
            .filter(|d| matches!(d["kind"].as_str(), Some("StatefulSet" | "DaemonSet")))
        {
            let t = &d["spec"]["template"];
            let port: i64 = t["metadata"]["annotations"]["prometheus.io/port"]
                .as_str()
                .unwrap()
                .parse()
                .unwrap();
            let named = t["spec"]["containers"][0]["ports"]
                .as_array()
                .unwrap()
                .iter()
                .find(|p| p["name"] == "metrics")
                .unwrap_or_else(|| {
                    panic!("{e}: {} has no port named metrics", d["metadata"]["name"])
                });
            assert_eq!(
                named["containerPort"], port,
                "{e}: {}",
                d["metadata"]["name"]
            );
            assert_eq!(
                t["spec"]["containers"][0]["readinessProbe"]["httpGet"]["port"],
                "metrics"
            );
        }
    }
}

#[test]
fn a_pool_pod_fetches_models_into_its_cache_volume() {
    let (docs, _) = rendered("cloud-region");
    let c = &find(&docs, "StatefulSet", "gpu-pool")["spec"]["template"]["spec"]["containers"][0];
    let env = c["env"].as_array().unwrap();
    let cache = env.iter().find(|e| e["name"] == "WEFT_CACHE_DIR").unwrap()["value"]
        .as_str()
        .unwrap();
    // the store keeps models in $WEFT_CACHE_DIR/models
    let mounts = c["volumeMounts"].as_array().unwrap();
    assert!(
        mounts
            .iter()
            .any(|m| m["name"] == "models" && m["mountPath"] == format!("{cache}/models")),
        "{mounts:?}"
    );
}

#[test]
fn an_edge_pool_without_a_host_path_cache_mounts_no_host_directory() {
    let (docs, _) = rendered("edge-site");
    let vols = find(&docs, "DaemonSet", "gateways")["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .unwrap()
        .clone();
    assert!(vols.iter().all(|v| v.get("hostPath").is_none()), "{vols:?}");
}

#[test]
fn a_cloud_pool_offers_the_placement_what_its_pods_may_use() {
    let (docs, _) = rendered("cloud-region");
    let toml_text = find(&docs, "ConfigMap", "gpu-pool-config")["data"]["node.toml"]
        .as_str()
        .unwrap()
        .to_string();
    let v: toml::Value = toml::from_str(&toml_text).unwrap();
    // a 48Gi memory limit, 8 CPUs requested and one GPU
    assert_eq!(
        v["node"]["memory_bytes"].as_integer(),
        Some((48i64 << 30) / 10 * 8)
    );
    let want = 8.0 * render::TOKENS_PER_S_PER_CPU + render::TOKENS_PER_S_PER_GPU;
    assert_eq!(v["node"]["tokens_per_s"].as_float(), Some(want));
    assert_eq!(v["node"]["accelerator"].as_bool(), Some(true));
}

#[test]
fn a_single_coordinator_has_no_disruption_budget_to_block_drains() {
    let text = std::fs::read_to_string(k8s().join("overlays/dev/site.yaml")).unwrap();
    let docs = weft_operator::documents(&text).unwrap();
    let mut c: WeftCluster = serde_json::from_value(
        docs.iter()
            .find(|d| d["kind"] == "WeftCluster")
            .unwrap()
            .clone(),
    )
    .unwrap();
    c.metadata.uid = Some("u".into());
    let out = render::cluster(&c).unwrap();
    assert!(!out.iter().any(|o| o["kind"] == "PodDisruptionBudget"));
}

#[test]
fn quantities_read_as_bytes() {
    assert_eq!(render::quantity_bytes("48Gi"), Some(48 << 30));
    assert_eq!(render::quantity_bytes("512M"), Some(512_000_000));
    assert_eq!(render::quantity_bytes("1024"), Some(1024));
    assert_eq!(render::quantity_bytes("lots"), None);
}
