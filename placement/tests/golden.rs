//! Golden cases for the router and the solver: each file in `tests/golden/`
//! holds an input, what it shows (`about`), and the expected output with its
//! full record. `WEFT_BLESS=1 cargo test -p weft-placement --test golden`
//! writes the current outputs as the expectations; review the diff before
//! committing it.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use weft_placement::{
    route, solve, Candidate, Demand, ModelSpec, Placement, RouteRequest, RouterConfig,
    SolverConfig, Topology,
};

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Input {
    Route {
        request: RouteRequest,
        candidates: Vec<Candidate>,
        #[serde(default)]
        config: RouterConfig,
    },
    Solve {
        topology: Topology,
        models: Vec<ModelSpec>,
        demand: Vec<Demand>,
        #[serde(default)]
        current: Placement,
        #[serde(default)]
        config: SolverConfig,
    },
}

#[derive(Serialize, Deserialize)]
struct Case {
    about: String,
    #[serde(flatten)]
    input: Input,
    #[serde(default)]
    expect: Value,
}

fn output(input: &Input) -> Value {
    match input {
        Input::Route {
            request,
            candidates,
            config,
        } => serde_json::to_value(route(request, candidates, config)).unwrap(),
        Input::Solve {
            topology,
            models,
            demand,
            current,
            config,
        } => {
            serde_json::to_value(solve(topology, models, demand, current, config).unwrap()).unwrap()
        }
    }
}

#[test]
fn golden_cases_match() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let bless = std::env::var_os("WEFT_BLESS").is_some();
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    assert!(
        files.len() >= 10,
        "golden cases are missing from {}",
        dir.display()
    );
    let mut failed = Vec::new();
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        let mut case: Case =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        let got = output(&case.input);
        if bless {
            case.expect = got;
            std::fs::write(f, serde_json::to_string_pretty(&case).unwrap() + "\n").unwrap();
        } else if got != case.expect {
            failed.push(format!(
                "{}\n  about: {}\n  got: {}",
                f.display(),
                case.about,
                serde_json::to_string(&got).unwrap()
            ));
        }
    }
    assert!(
        failed.is_empty(),
        "golden mismatches:\n{}",
        failed.join("\n")
    );
}
