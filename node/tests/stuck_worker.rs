//! A shard worker that is alive but stuck (stopped with SIGSTOP after it
//! said it was ready): a chain step sent to it ends in a clear error
//! within the supervisor's bound instead of waiting forever.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use weft_kernels::testing::{write_tiny_model, TinyModelSpec};
use weft_kernels::{Chunk, ChunkInput};
use weft_worker::chain::{encode_message, Message};
use weft_worker::sandbox::cgroup::Limits;
use weft_worker::sandbox::launch::Rlimits;
use weft_worker::sandbox::{Policy, SeccompMode, Tier};
use weft_worker::{Runner, SandboxSpec, SubmitError, Supervisor, WorkerSpec};

const BOUND: Duration = Duration::from_millis(500);

fn shard_spec(model: PathBuf) -> WorkerSpec {
    WorkerSpec {
        exe: PathBuf::from(env!("CARGO_BIN_EXE_weft")),
        model,
        threads: 1,
        device: "cpu".into(),
        device_memory_budget: 0,
        kv_budget: 16 << 20,
        max_context: 256,
        max_running: 4,
        sandbox: SandboxSpec {
            policy: Policy {
                tier: Tier::Off,
                strict: false,
            },
            uids: 200_000..265_536,
            limits: Limits::default(),
            rlimits: Rlimits::default(),
            seccomp: SeccompMode::Enforce,
            runsc: PathBuf::from("runsc"),
            state_dir: std::env::temp_dir(),
        },
        probe: None,
        layers: Some(0..3),
        chain: None,
        kv_shares: Vec::new(),
        prefix_cache: true,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_step_on_a_stuck_shard_worker_fails_within_its_bound() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny.gguf");
    write_tiny_model(&model, &TinyModelSpec::default()).unwrap();
    let sup = Supervisor::start(shard_spec(model));
    let mut ready = sup.ready();
    tokio::time::timeout(Duration::from_secs(60), ready.wait_for(|r| *r))
        .await
        .expect("the shard worker was not ready within 60 s")
        .unwrap();
    sup.set_chain_timeout(BOUND);
    let pid = sup.worker_pid().expect("a worker runs") as i32;
    // SAFETY: a signal to the child this test started
    assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
    let step = encode_message(&Message::Forward(vec![Chunk {
        seq: 1,
        pos: 0,
        input: ChunkInput::Tokens(vec![2, 3]),
        want_logits: false,
    }]));
    let t = Instant::now();
    let r = sup.chain_call(step).await;
    let took = t.elapsed();
    // SAFETY: as above
    unsafe { libc::kill(pid, libc::SIGCONT) };
    sup.shutdown();
    assert_eq!(r, Err(SubmitError::TimedOut(BOUND)));
    assert!(took < BOUND + Duration::from_secs(2), "after {took:?}");
}
