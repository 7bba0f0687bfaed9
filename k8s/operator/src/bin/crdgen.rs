//! Writes the CRDs of `weft.dev` from their Rust types to `k8s/crds/`
//! (or `--out DIR`); `--check` writes nothing and exits 1 when a committed
//! file differs from the types.

use std::path::PathBuf;

fn main() -> anyhow::Result<()> {
    let mut out = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../crds"));
    let mut check = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--out" => out = args.next().map(PathBuf::from).unwrap_or(out),
            "--check" => check = true,
            "-h" | "--help" => {
                println!("crdgen [--out DIR] [--check]: the weft.dev CRDs from k8s/operator/src/crd.rs to k8s/crds/");
                return Ok(());
            }
            other => anyhow::bail!("unknown argument {other:?} (see --help)"),
        }
    }
    let mut stale = Vec::new();
    for (file, crd) in weft_operator::crds() {
        let path = out.join(file);
        let want = weft_operator::crd_yaml(&crd);
        if check {
            if std::fs::read_to_string(&path).ok().as_deref() != Some(want.as_str()) {
                stale.push(path.display().to_string());
            }
        } else {
            std::fs::create_dir_all(&out)?;
            std::fs::write(&path, want)?;
            println!("wrote {}", path.display());
        }
    }
    if !stale.is_empty() {
        anyhow::bail!(
            "these CRDs differ from k8s/operator/src/crd.rs: {}; run `cargo run -p weft-operator --bin crdgen`",
            stale.join(", ")
        );
    }
    Ok(())
}
