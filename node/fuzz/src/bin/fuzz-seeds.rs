//! Writes the seed inputs of every fuzz target into `fuzz/corpus/<target>/`
//! (well-formed messages of each kind, for the fuzzer to mutate), and the
//! fuzzing CA into `node/fuzz/fixtures/ca` if it is missing.
//!
//! `cargo run -p weft-fuzz --bin fuzz-seeds` from the repository root.

use std::path::Path;

use weft_cluster::credentials::{self, ClusterCa, Role};
use weft_cluster::overlay::{LoadReport, MemberEvent, MemberEventKind};
use weft_cluster::transport::{Reply, Request};
use weft_coordinator::{Command, Member};
use weft_kernels::{Chunk, ChunkInput, ChunkOutput};
use weft_worker::chain::{encode_message, encode_reply, Message};
use weft_worker::protocol::{encode, encode_chain, FromWorker, ToWorker};

fn main() -> anyhow::Result<()> {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/ca");
    if !fixture.join("ca.pem").exists() {
        ClusterCa::init(&fixture, "fuzz")?;
    }
    let corpus = Path::new("fuzz/corpus");
    let write = |target: &str, name: &str, bytes: &[u8]| -> anyhow::Result<()> {
        let dir = corpus.join(target);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join(format!("seed-{name}")), bytes)?;
        Ok(())
    };
    let with = |b: u8, rest: &[u8]| [&[b][..], rest].concat();

    // gguf: a one-layer tiny model
    let dir = tempfile::tempdir()?;
    let model = dir.path().join("m.gguf");
    let spec = weft_kernels::testing::TinyModelSpec {
        layers: 1,
        ..Default::default()
    };
    weft_kernels::testing::write_tiny_model(&model, &spec)?;
    // the header and the first tensors' bytes: what the reader parses
    let offset = weft_kernels::GgufFile::open(&model)?.data_offset() as usize;
    let bytes = std::fs::read(&model)?;
    write("gguf", "tiny", &bytes[..bytes.len().min(offset + 4096)])?;

    // worker frames, both ways
    let submit = ToWorker::Submit {
        id: 1,
        prompt: vec![2, 3, 4],
        params: Default::default(),
        priority: 1,
        resume: Default::default(),
        tenant: "t".into(),
        shared_tokens: 0,
    };
    write("worker_frames", "submit", &with(1, &encode(&submit)?))?;
    write(
        "worker_frames",
        "cancel",
        &with(1, &encode(&ToWorker::Cancel { id: 1 })?),
    )?;
    let ready = FromWorker::Ready {
        context_length: 1024,
        kv_blocks: 64,
        confinement: Default::default(),
        reached_node: false,
    };
    write("worker_frames", "ready", &with(0, &encode(&ready)?))?;
    write(
        "worker_frames",
        "chain",
        &with(0, &encode_chain(7, b"step")?),
    )?;

    // chain steps and replies
    let forward = Message::Forward(vec![
        Chunk {
            seq: 1,
            pos: 0,
            input: ChunkInput::Tokens(vec![5, 6, 7]),
            want_logits: false,
        },
        Chunk {
            seq: 2,
            pos: 3,
            input: ChunkInput::Hidden(vec![0.5; 8]),
            want_logits: true,
        },
    ]);
    write(
        "chain_frames",
        "forward",
        &with(0, &encode_message(&forward)),
    )?;
    write(
        "chain_frames",
        "release",
        &with(0, &encode_message(&Message::Release(vec![1, 2]))),
    )?;
    let outputs = Ok(vec![
        ChunkOutput::Hidden(vec![1.0; 4]),
        ChunkOutput::Logits(Some(vec![0.1; 4])),
    ]);
    write("chain_frames", "outputs", &with(1, &encode_reply(&outputs)))?;
    write(
        "chain_frames",
        "failed",
        &with(1, &encode_reply(&Err("no".into()))),
    )?;

    // data-plane request heads
    let head = |uri: &str, headers: serde_json::Value, body: &[u8]| {
        let h = serde_json::to_vec(&serde_json::json!({
            "method": "POST", "uri": uri, "headers": headers, "hops": 1
        }))
        .expect("a head");
        [&(h.len() as u16).to_le_bytes()[..], &h, body].concat()
    };
    write(
        "dataplane_head",
        "api",
        &head(
            "/v1/completions",
            serde_json::json!([
                ["content-type", "application/json"],
                ["x-weft-token-ids", "1"]
            ]),
            br#"{"model":"m","prompt":"hi"}"#,
        ),
    )?;
    write(
        "dataplane_head",
        "chunk",
        &head(
            &format!("/weft/chunk/{}/3/1048576", "ab".repeat(32)),
            serde_json::json!([]),
            b"",
        ),
    )?;
    let route = r#"[{"node":"b","model":"m","layers":{"start":9,"end":18}}]"#;
    write(
        "dataplane_head",
        "shard",
        &head(
            "/weft/shard/m/0/9",
            serde_json::json!([["x-weft-chain-route", route]]),
            b"",
        ),
    )?;

    // gossip, signed by a node of the fuzzing CA at the targets' time
    let ca = ClusterCa::load(&fixture)?;
    let signer = ca.issue_identity("node-b", Role::Node)?;
    let at = weft_fuzz::NOW_S * 1000 - 100;
    let report = LoadReport {
        node: "node-b".into(),
        site: "edge-a".into(),
        at_unix_ms: at,
        models: vec!["m[0..18)".into()],
        tokens_per_s: 10.0,
        ..Default::default()
    };
    let signed = weft_cluster::overlay::sign(&signer, &report).expect("signed");
    write("gossip", "report", &with(0, &signed))?;
    let event = MemberEvent {
        node: "node-b".into(),
        kind: MemberEventKind::Leaving,
        at_unix_ms: at,
    };
    let signed = weft_cluster::overlay::sign(&signer, &event).expect("signed");
    write("gossip", "leaving", &with(1, &signed))?;

    // coordinator messages
    let member = Member {
        id: weft_cluster::member::member_id("gw-1"),
        name: "gw-1".into(),
        site: "edge".into(),
        kind: Default::default(),
        region: 0,
        memory_bytes: 1 << 30,
        tokens_per_s: 1.0,
        slots: 1,
        accelerator: false,
        cost_per_token: 0.0,
        address: String::new(),
    };
    let requests = [
        ("status", Request::Status),
        (
            "put-member",
            Request::Propose {
                command: Command::PutMember(member.clone()),
            },
        ),
        (
            "revoke",
            Request::Propose {
                command: Command::Revoke {
                    fingerprint: "ab".repeat(32),
                },
            },
        ),
        ("remove-coordinator", Request::RemoveCoordinator { id: 2 }),
        ("replan", Request::Replan { demand: vec![] }),
    ];
    for (name, req) in requests {
        write(
            "coordinator_messages",
            &format!("request-{name}"),
            &with(0, &serde_json::to_vec(&req)?),
        )?;
    }
    let mut m = raft::eraftpb::Message::default();
    m.set_msg_type(raft::eraftpb::MessageType::MsgAppend);
    m.from = 1;
    m.to = 2;
    m.term = 3;
    let e = raft::eraftpb::Entry {
        data: Command::PutMember(member.clone()).encode().into(),
        ..Default::default()
    };
    m.entries = vec![e].into();
    use protobuf::Message as _;
    write(
        "coordinator_messages",
        "raft-append",
        &with(1, &m.write_to_bytes()?),
    )?;
    let join = Command::Join {
        member: member.clone(),
        nonce: "n".into(),
        expires: weft_fuzz::NOW_S + 60,
        now: weft_fuzz::NOW_S,
    };
    write(
        "coordinator_messages",
        "command-join",
        &with(2, &join.encode()),
    )?;
    let reply = Reply::NotLeader {
        leader: Some("127.0.0.1:7000".parse()?),
        leader_name: Some("coord-1".into()),
    };
    write(
        "coordinator_messages",
        "reply",
        &with(3, &serde_json::to_vec(&reply)?),
    )?;

    // a join request with a good token for gw-1
    let token = ca.issue_token(weft_fuzz::NOW_S - 10, 3600, "gw-1", Role::Node)?;
    let (_key, csr) = credentials::new_request("gw-1")?;
    write(
        "join_request",
        "good",
        &[token.as_bytes(), &[0], csr.as_bytes()].concat(),
    )?;

    // API bodies
    let completion = serde_json::json!({
        "model": "tiny", "prompt": "hello", "max_tokens": 4, "temperature": 0.5,
        "stop": ["\n"], "logprobs": 2, "stream": true, "seed": 3,
        "weft": {"criticality": "critical", "deadline_ms": 500}
    });
    write(
        "api_json",
        "completion",
        &with(0, &serde_json::to_vec(&completion)?),
    )?;
    let chat = serde_json::json!({
        "model": "tiny", "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hi <start_of_turn>model"}
        ],
        "max_completion_tokens": 3, "top_p": 0.9, "logprobs": true, "top_logprobs": 2
    });
    write("api_json", "chat", &with(1, &serde_json::to_vec(&chat)?))?;
    Ok(())
}
