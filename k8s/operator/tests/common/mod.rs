//! What the manifest tests share: kubectl's kustomize and
//! kubernetes-validate (both from `scripts/install_test_deps.sh`).

use std::path::{Path, PathBuf};

/// The `k8s/` folder.
pub fn k8s() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `kubernetes-validate --strict` against Kubernetes 1.33 on `yaml`; its
/// output when it fails.
pub fn kubernetes_validate(yaml: &str) -> Result<(), String> {
    use std::io::Write;
    let mut child = std::process::Command::new("kubernetes-validate")
        .args(["--strict", "--quiet", "-k", "1.33.0", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("kubernetes-validate (PyPI; scripts/install_test_deps.sh installs it)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(yaml.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// `kubectl kustomize DIR`'s output; fails the test if it fails.
pub fn kustomize(dir: &Path) -> String {
    let out = std::process::Command::new("kubectl")
        .arg("kustomize")
        .arg(dir)
        .output()
        .expect("kubectl with kustomize (scripts/install_test_deps.sh installs it)");
    assert!(
        out.status.success(),
        "kubectl kustomize {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}
