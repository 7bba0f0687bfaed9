//! The workspace's layering, checked: every weft crate depends only on
//! crates of a lower layer, and within each crate no module imports one
//! that imports it back (directly or around a longer cycle). A new
//! dependency between crates goes into [`LAYERS`] on purpose, or not at all.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Each weft crate's layer: a crate may depend only on crates of a lower
/// layer. `weft-node` (the binary) and `weft-bench` sit on top, and nothing
/// depends on them.
const LAYERS: &[(&str, u32)] = &[
    ("weft-placement", 0),
    ("weft-kernels", 0),
    ("weft-metrics", 0),
    ("weft-audit", 0),
    ("weft-store", 0),
    ("weft-coordinator", 1),
    ("weft-worker", 1),
    ("weft-api", 2),
    ("weft-cluster", 2),
    ("weft-fabric", 3),
    ("weft-tools", 3),
    ("weft-node", 4),
    ("weft-bench", 4),
    ("weft-fuzz", 4),
    ("weft-sandbox", 3),
    ("weft-operator", 3),
];

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("node/ is inside the workspace")
        .to_path_buf()
}

/// The workspace's member directories, from its Cargo.toml.
fn members() -> Vec<PathBuf> {
    let root = workspace();
    let text = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
    let v: toml::Value = toml::from_str(&text).unwrap();
    v["workspace"]["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| root.join(m.as_str().unwrap()))
        .collect()
}

/// A crate's name and the weft crates it depends on (normal dependencies).
fn manifest(dir: &Path) -> (String, Vec<String>) {
    let text = std::fs::read_to_string(dir.join("Cargo.toml")).unwrap();
    let v: toml::Value = toml::from_str(&text).unwrap();
    let name = v["package"]["name"].as_str().unwrap().to_string();
    let deps = v
        .get("dependencies")
        .and_then(|d| d.as_table())
        .map(|t| {
            t.keys()
                .filter(|k| k.starts_with("weft-"))
                .cloned()
                .collect()
        })
        .unwrap_or_default();
    (name, deps)
}

fn layer(name: &str) -> u32 {
    LAYERS
        .iter()
        .find(|(n, _)| *n == name)
        .unwrap_or_else(|| panic!("{name} has no layer in LAYERS"))
        .1
}

#[test]
fn no_crate_depends_on_a_crate_of_its_own_layer_or_above() {
    let mut wrong = Vec::new();
    for dir in members() {
        let (name, deps) = manifest(&dir);
        for d in deps {
            if layer(&d) >= layer(&name) {
                wrong.push(format!(
                    "{name} (layer {}) depends on {d} (layer {})",
                    layer(&name),
                    layer(&d)
                ));
            }
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
}

#[test]
fn every_workspace_crate_has_a_layer() {
    for dir in members() {
        layer(&manifest(&dir).0);
    }
}

/// The `.rs` files under `dir`.
fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            sources(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// A module's path in its crate (`a::b`), from its file; `None` for the
/// crate root.
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).unwrap().with_extension("");
    let mut parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if parts.last().is_some_and(|p| p == "mod") {
        parts.pop();
    }
    let path = parts.join("::");
    (!matches!(path.as_str(), "lib" | "main" | "")).then_some(path)
}

/// The code of a file without comments and without its test module.
fn code(text: &str) -> String {
    let text = text.split("#[cfg(test)]").next().unwrap_or("");
    text.lines()
        .map(|l| l.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The modules of the crate that `code` (the module `me`) refers to with
/// `crate::` or `super::` paths.
fn references(code: &str, me: &str, modules: &BTreeSet<String>) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let parent = me.rsplit_once("::").map(|(p, _)| p.to_string());
    for (prefix, base) in [("crate::", None), ("super::", parent.as_deref())] {
        if prefix == "super::" && base.is_none() {
            continue;
        }
        for (i, _) in code.match_indices(prefix) {
            let rest = &code[i + prefix.len()..];
            let path: String = rest
                .chars()
                .take_while(|c| {
                    c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_' || *c == ':'
                })
                .collect();
            let mut parts: Vec<&str> = path.split("::").filter(|s| !s.is_empty()).collect();
            while !parts.is_empty() {
                let joined = parts.join("::");
                let cand = match base {
                    Some(b) => format!("{b}::{joined}"),
                    None => joined,
                };
                if modules.contains(&cand) {
                    if cand != me {
                        out.insert(cand);
                    }
                    break;
                }
                parts.pop();
            }
        }
    }
    out
}

/// A cycle in `graph`, if there is one.
fn cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        u: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        state.insert(u.to_string(), 1);
        stack.push(u.to_string());
        for v in &graph[u] {
            match state.get(v) {
                Some(1) => {
                    let at = stack.iter().position(|s| s == v).unwrap();
                    let mut c = stack[at..].to_vec();
                    c.push(v.clone());
                    return Some(c);
                }
                Some(_) => {}
                None => {
                    if let Some(c) = visit(v, graph, state, stack) {
                        return Some(c);
                    }
                }
            }
        }
        stack.pop();
        state.insert(u.to_string(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for u in graph.keys() {
        if !state.contains_key(u) {
            if let Some(c) = visit(u, graph, &mut state, &mut Vec::new()) {
                return Some(c);
            }
        }
    }
    None
}

#[test]
fn no_module_imports_one_that_imports_it_back() {
    let mut cycles = Vec::new();
    for dir in members() {
        let src = dir.join("src");
        let mut files = Vec::new();
        sources(&src, &mut files);
        let named: Vec<(String, PathBuf)> = files
            .iter()
            .filter_map(|f| Some((module_of(&src, f)?, f.clone())))
            .collect();
        let modules: BTreeSet<String> = named.iter().map(|(m, _)| m.clone()).collect();
        let graph: BTreeMap<String, BTreeSet<String>> = named
            .iter()
            .map(|(m, f)| {
                let text = std::fs::read_to_string(f).unwrap();
                (m.clone(), references(&code(&text), m, &modules))
            })
            .collect();
        if let Some(c) = cycle(&graph) {
            cycles.push(format!("{}: {}", manifest(&dir).0, c.join(" -> ")));
        }
    }
    assert!(cycles.is_empty(), "{cycles:#?}");
}

#[test]
fn the_cycle_check_finds_a_cycle() {
    let modules: BTreeSet<String> = ["a", "b"].into_iter().map(String::from).collect();
    let graph: BTreeMap<String, BTreeSet<String>> = [
        (
            "a".to_string(),
            references("use crate::b::Thing;", "a", &modules),
        ),
        (
            "b".to_string(),
            references("fn f() -> crate::a::X {}", "b", &modules),
        ),
    ]
    .into();
    assert_eq!(
        cycle(&graph),
        Some(vec!["a".to_string(), "b".to_string(), "a".to_string()])
    );
}
