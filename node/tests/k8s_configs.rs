//! The node configs the Kubernetes operator writes (k8s/operator's render
//! functions, for the k8s/examples) are ones `weft node` starts with:
//! `weft node --check` takes each, with the flags the pods pass.

use std::process::Command;

use weft_operator::crd::{FabricNodePool, WeftCluster};
use weft_operator::render;

fn example(name: &str) -> Vec<serde_json::Value> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../k8s/examples")
        .join(name)
        .join("site.yaml");
    weft_operator::documents(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// `weft node --check` on `toml` with `flags`; its output, or why it failed.
fn check(toml: &str, flags: &[&str]) -> Result<String, String> {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("node.toml");
    std::fs::write(&p, toml).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_weft"))
        .args(["node", "--check", "--config"])
        .arg(&p)
        .args(flags)
        .env_remove("WEFT_NODE_NAME")
        .env_remove("WEFT_SITE")
        .env_remove("WEFT_ADVERTISE_HOST")
        .output()
        .unwrap();
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

fn clusters(docs: &[serde_json::Value]) -> Vec<WeftCluster> {
    docs.iter()
        .filter(|d| d["kind"] == "WeftCluster")
        .map(|d| serde_json::from_value(d.clone()).unwrap())
        .collect()
}

#[test]
fn every_coordinator_config_the_operator_writes_is_accepted() {
    for e in ["edge-site", "cloud-region"] {
        for c in clusters(&example(e)) {
            let name = c.metadata.name.clone().unwrap();
            let ns = c.metadata.namespace.clone().unwrap();
            let n = c.spec.coordinators.replicas;
            for k in 0..n {
                let toml = render::coordinator_toml(&name, &ns, n, k);
                let said = check(&toml, &["--advertise-host", "10.1.2.3"])
                    .unwrap_or_else(|e| panic!("{name} coordinator {k}: {e}"));
                assert!(
                    said.contains(&format!("coordinator {} of {n}", k + 1)),
                    "{said}"
                );
                assert!(said.contains("10.1.2.3:7100"), "{said}");
            }
        }
    }
}

#[test]
fn every_pool_config_the_operator_writes_is_accepted_with_the_pods_flags() {
    for e in ["edge-site", "cloud-region"] {
        let docs = example(e);
        let cs = clusters(&docs);
        for d in docs.iter().filter(|d| d["kind"] == "FabricNodePool") {
            let p: FabricNodePool = serde_json::from_value(d.clone()).unwrap();
            let c = cs
                .iter()
                .find(|c| c.metadata.name.as_deref() == Some(&p.spec.cluster_ref))
                .unwrap();
            let toml = render::pool_toml(&p, c).unwrap();
            let said = check(
                &toml,
                &[
                    "--name",
                    "ip-10-0-0-7.eu-west-1.compute.internal",
                    "--site",
                    "",
                    "--advertise-host",
                    "10.9.8.7",
                ],
            )
            .unwrap_or_else(|err| panic!("{e} pool {:?}: {err}", p.metadata.name));
            assert!(said.contains("joins with a token"), "{said}");
            assert!(
                said.contains(&render::weft_node_name(
                    "ip-10-0-0-7.eu-west-1.compute.internal"
                )),
                "{said}"
            );
        }
    }
}
