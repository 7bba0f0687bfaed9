//! The official `openai` Python package against `weft up` serving each real
//! model (fetched like `weft` does): SmolLM2, the default, with chats, and
//! Gemma 3 270M, a base model without a chat template. The test installs
//! the package with pip if it is missing.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use weft_store::{KnownModel, ModelSource, ModelStore, PipFetcher, GEMMA3_270M, SMOLLM2_135M};

#[test]
fn the_openai_client_works_against_weft_serving_smollm2() {
    // llama.cpp's greedy continuation begins " Paris."
    against(SMOLLM2_135M, "openai_e2e.py", &["chat", " Paris."]);
}

#[test]
fn the_openai_client_gets_structured_outputs_and_tool_calls_from_smollm2() {
    // 20 JSON Schemas x 3 prompts, json_object, tool calls whole and
    // streamed, an invalid schema, a mixed batch, every request field
    against(SMOLLM2_135M, "structured_e2e.py", &[]);
}

#[test]
fn the_openai_client_works_against_weft_serving_gemma() {
    against(
        GEMMA3_270M,
        "openai_e2e.py",
        &["no-chat", " the capital of the country of France"],
    );
}

/// Runs `script` (in tests/) with `args` against `weft up` serving `known`.
fn against(known: KnownModel, script: &str, args: &[&str]) {
    let has_openai = Command::new("python3")
        .args(["-c", "import openai, jsonschema"])
        .status()
        .is_ok_and(|s| s.success());
    if !has_openai {
        let st = Command::new("python3")
            .args([
                "-m",
                "pip",
                "install",
                "-q",
                "--disable-pip-version-check",
                "openai",
                "jsonschema",
            ])
            .status()
            .expect("python3 runs");
        assert!(st.success(), "pip install openai failed");
    }
    let model = ModelStore::default_location()
        .resolve(&ModelSource::PyPi(known.clone()), &PipFetcher::default())
        .expect("the model");
    let mut child = Command::new(env!("CARGO_BIN_EXE_weft"))
        .args(["up", "--addr", "127.0.0.1:0", "--threads", "2", "--model"])
        .arg(&model.path)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    std::thread::spawn(move || for _ in lines {});
    let base = first
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap()
        .to_string();
    let c = reqwest::blocking::Client::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while !c
        .get(format!("{base}/readyz"))
        .send()
        .is_ok_and(|r| r.status().is_success())
    {
        assert!(Instant::now() < deadline, "never ready");
        std::thread::yield_now();
    }
    let out = Command::new("python3")
        .arg(format!("{}/tests/{script}", env!("CARGO_MANIFEST_DIR")))
        .arg(&base)
        .arg(known.name)
        .args(args)
        .output()
        .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        out.status.success(),
        "stdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
