//! The CRDs against their types, and the examples against the CRDs: the
//! committed YAML is what `crdgen` writes today, every example passes what
//! an apiserver would check on create (fields, types, CEL rules), and
//! every invalid example is refused saying why.

mod common;
use common::{k8s, kubernetes_validate, kustomize};

#[test]
fn the_committed_crds_are_what_the_types_generate() {
    for (file, crd) in weft_operator::crds() {
        let path = k8s().join("crds").join(file);
        let committed =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(
            committed == weft_operator::crd_yaml(&crd),
            "{} differs from k8s/operator/src/crd.rs: run `cargo run -p weft-operator --bin crdgen`",
            path.display()
        );
    }
}

/// Every object of example `file` (under `k8s/examples`), checked.
fn check_example(file: &str) -> Vec<Result<bool, String>> {
    let text = std::fs::read_to_string(k8s().join("examples").join(file)).unwrap();
    weft_operator::documents(&text)
        .unwrap()
        .iter()
        .map(weft_operator::check)
        .collect()
}

fn assert_example_valid(file: &str) {
    let checked = check_example(file);
    assert!(checked.len() >= 4, "{file}: {} objects", checked.len());
    for (i, c) in checked.iter().enumerate() {
        assert_eq!(c, &Ok(true), "{file}, object {i}");
    }
}

#[test]
fn the_edge_site_example_is_valid() {
    assert_example_valid("edge-site/site.yaml");
}

#[test]
fn the_cloud_region_example_is_valid() {
    assert_example_valid("cloud-region/site.yaml");
}

/// Invalid example `name` is refused with the message its `# expect:`
/// line gives.
fn assert_refused(name: &str) {
    let file = format!("invalid/{name}.yaml");
    let text = std::fs::read_to_string(k8s().join("examples").join(&file)).unwrap();
    let expect = text
        .lines()
        .find_map(|l| l.strip_prefix("# expect: "))
        .unwrap_or_else(|| panic!("{file} has no `# expect:` line"));
    let checked = check_example(&file);
    assert_eq!(checked.len(), 1, "{file}");
    match &checked[0] {
        Err(e) => assert!(
            e.contains(expect),
            "{file}: refused for {e:?}, not {expect:?}"
        ),
        Ok(_) => panic!("{file} was accepted"),
    }
}

#[test]
fn an_even_number_of_coordinators_is_refused() {
    assert_refused("even-coordinators");
}

#[test]
fn replicas_outside_the_autoscalers_bounds_are_refused() {
    assert_refused("replicas-and-autoscaling");
}

#[test]
fn an_unknown_field_is_refused() {
    assert_refused("unknown-field");
}

#[test]
fn replicas_on_a_daemonset_pool_is_refused() {
    assert_refused("daemonset-with-replicas");
}

#[test]
fn a_kv_share_over_one_is_refused() {
    assert_refused("kv-share-over-one");
}

#[test]
fn a_sandbox_network_other_than_disabled_is_refused() {
    assert_refused("sandbox-network-allow-list");
}

#[test]
fn autoscaling_with_min_above_max_is_refused() {
    assert_refused("min-above-max");
}

#[test]
fn a_model_cache_of_both_kinds_is_refused() {
    assert_refused("cache-pvc-and-hostpath");
}

#[test]
fn every_invalid_example_has_a_test() {
    let tested = [
        "even-coordinators",
        "replicas-and-autoscaling",
        "unknown-field",
        "daemonset-with-replicas",
        "kv-share-over-one",
        "sandbox-network-allow-list",
        "min-above-max",
        "cache-pvc-and-hostpath",
    ];
    for e in std::fs::read_dir(k8s().join("examples/invalid"))
        .unwrap()
        .flatten()
    {
        let name = e
            .file_name()
            .to_string_lossy()
            .trim_end_matches(".yaml")
            .to_string();
        assert!(
            tested.contains(&name.as_str()),
            "invalid/{name}.yaml has no test"
        );
    }
}

#[test]
fn an_object_of_another_group_is_not_ours() {
    let v = serde_json::json!({"apiVersion": "v1", "kind": "ConfigMap"});
    assert_eq!(weft_operator::check(&v), Ok(false));
}

#[test]
fn the_crds_pass_strict_validation_against_kubernetes_1_33() {
    let all: Vec<String> = weft_operator::crds()
        .iter()
        .map(|(_, c)| weft_operator::crd_yaml(c))
        .collect();
    kubernetes_validate(&all.join("---\n")).unwrap();
}

#[test]
fn the_crds_kustomization_renders_every_crd() {
    let text = kustomize(&k8s().join("crds"));
    for (_, crd) in weft_operator::crds() {
        let name = crd.metadata.name.unwrap();
        assert!(text.contains(&format!("name: {name}")), "{name} missing");
    }
}

#[test]
fn an_autoscaler_may_set_replicas_once_autoscaling_is_on() {
    let text = std::fs::read_to_string(k8s().join("examples/cloud-region/site.yaml")).unwrap();
    let v = weft_operator::documents(&text)
        .unwrap()
        .into_iter()
        .find(|d| d["kind"] == "WeftModel")
        .unwrap();
    let old: weft_operator::crd::WeftModel = serde_json::from_value(v).unwrap();
    let mut scaled = old.clone();
    scaled.spec.replicas = Some(3);
    assert!(kube::core::cel::validate_cel(&scaled).is_ok());
    // beyond maxReplicas (8), it is refused
    scaled.spec.replicas = Some(9);
    assert!(kube::core::cel::validate_cel(&scaled).is_err());
}

#[test]
fn the_number_of_coordinators_cannot_change_once_the_cluster_exists() {
    let text = std::fs::read_to_string(k8s().join("examples/edge-site/site.yaml")).unwrap();
    let v = weft_operator::documents(&text)
        .unwrap()
        .into_iter()
        .find(|d| d["kind"] == "WeftCluster")
        .unwrap();
    let old: weft_operator::crd::WeftCluster = serde_json::from_value(v).unwrap();
    let mut grown = old.clone();
    grown.spec.coordinators.replicas = 5;
    assert!(
        kube::core::cel::validate_cel(&grown).is_ok(),
        "a new cluster of 5 is fine"
    );
    let e = kube::core::cel::validate_cel_update(&grown, &old).unwrap_err();
    assert!(e.to_string().contains("cannot change"), "{e}");
}
