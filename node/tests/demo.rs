//! `weft demo --quick` on the tiny model: the whole fabric (3 coordinators,
//! 6 nodes at two edge sites and a cloud site) starts, serves the agent
//! workload on weft's placement and cloud-only, writes its report and
//! stops every process it started.

use std::process::Command;

#[test]
fn weft_demo_runs_to_its_report() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny.gguf");
    weft_kernels::testing::write_tiny_model(
        &model,
        &weft_kernels::testing::TinyModelSpec::default(),
    )
    .unwrap();
    let out_dir = dir.path().join("report");
    let out = Command::new(env!("CARGO_BIN_EXE_weft"))
        .args(["demo", "--quick", "--model"])
        .arg(&model)
        .arg("--out")
        .arg(&out_dir)
        .arg("--keep")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    // every process it started is gone
    let fabric = stderr
        .lines()
        .find_map(|l| l.strip_prefix("[demo] configs and logs in "))
        .expect("the demo says where its fabric lives")
        .to_string();
    let left: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|p| std::fs::read(p.ok()?.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains(&fabric))
        .collect();
    assert!(left.is_empty(), "processes left running: {left:?}");
    let _ = std::fs::remove_dir_all(&fabric);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    // the table names both runs
    assert!(
        stdout.contains("weft") && stdout.contains("cloud-only"),
        "{stdout}"
    );
    let r: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out_dir.join("demo.json")).unwrap()).unwrap();
    assert_eq!(r["mode"], "quick");
    let per_run = 2 * r["workload"]["requests_per_site"].as_u64().unwrap();
    assert_eq!(r["requests"].as_u64().unwrap(), 2 * per_run, "{r}");
    assert_eq!(r["errors"], 0, "{r}");
    for run in ["weft", "cloud_only"] {
        assert_eq!(r[run]["requests"].as_u64().unwrap(), per_run, "{r}");
        for class in ["critical", "sheddable"] {
            let c = &r[run]["classes"][class];
            assert!(c["served"].as_u64().unwrap() > 0, "{run} {class}: {r}");
            let (p50, p95) = (c["p50_ms"].as_f64().unwrap(), c["p95_ms"].as_f64().unwrap());
            assert!(p50 > 0.0 && p95 >= p50, "{run} {class}: {c}");
        }
        assert!(r[run]["tokens_per_s"].as_f64().unwrap() > 0.0);
    }
    // weft keeps the agents' traffic at the edge; cloud-only sends all of
    // it over edge-core links
    let placed = |run: &str, site: &str| {
        r[run]["placement"]
            .as_object()
            .unwrap()
            .iter()
            .any(|(node, held)| node.starts_with(site) && !held.as_array().unwrap().is_empty())
    };
    assert!(placed("weft", "edge-a") && placed("weft", "edge-b"), "{r}");
    assert!(
        placed("cloud_only", "cloud") && !placed("cloud_only", "edge-"),
        "{r}"
    );
    let weft = r["weft"]["edge_core_bytes"].as_u64().unwrap();
    let cloud = r["cloud_only"]["edge_core_bytes"].as_u64().unwrap();
    assert!(cloud > 0, "{r}");
    assert!(weft * 10 <= cloud, "weft {weft} B vs cloud-only {cloud} B");
    assert!(r["edge_core_reduction"].as_f64().unwrap() >= 0.9);
}
