//! # weft-fuzz
//!
//! One fuzz target per parser that reads bytes an untrusted party chose,
//! each running weft's own code on them as the node would:
//!
//! | target | bytes from | what reads them |
//! |---|---|---|
//! | `gguf` | a model file (any source) | the GGUF reader, model config, tokenizer |
//! | `worker_frames` | a sandboxed worker | the node's worker-protocol reader |
//! | `chain_frames` | a chain's peer | the chain step codec |
//! | `dataplane_head` | a data-plane peer | the request-head parser |
//! | `gossip` | any overlay peer | signature, certificate and replay checks |
//! | `coordinator_messages` | a credentialed peer | request parse and authorization, raft messages, log commands |
//! | `join_request` | anyone | the leader's token and certificate-request checks |
//! | `api_json` | a client | the OpenAI API handlers, through validation and tokenizing |
//!
//! `cargo fuzz` runs them from `fuzz/` (see `scripts/fuzz.sh`); the normal
//! tests replay the committed corpus and every crash found
//! (`tests/corpus.rs`), each input within [`Target::alloc_limit`] bytes of
//! allocation and a time limit.

use std::io::Cursor;
use std::sync::{Arc, OnceLock};

use weft_cluster::credentials::{ClusterCa, NodeIdentity, PeerIdentity, Revoked, Role};

/// A fuzz target: its name (its corpus directory), the function, and the
/// most a single input may make it allocate at once.
pub struct Target {
    /// Its name, as `cargo fuzz run` and the corpus directory call it.
    pub name: &'static str,
    /// Runs one input.
    pub run: fn(&[u8]),
    /// Peak bytes one input may allocate beyond what the target holds
    /// before it (its declared limit: the parser's own limits, plus room).
    pub alloc_limit: usize,
}

/// Every target.
pub const TARGETS: &[Target] = &[
    Target {
        name: "gguf",
        run: gguf,
        alloc_limit: 64 << 20,
    },
    Target {
        name: "worker_frames",
        run: worker_frames,
        // a message frame may be 16 MiB; reading grows 1 MiB at a time
        alloc_limit: 40 << 20,
    },
    Target {
        name: "chain_frames",
        run: chain_frames,
        alloc_limit: 16 << 20,
    },
    Target {
        name: "dataplane_head",
        run: dataplane_head,
        alloc_limit: 16 << 20,
    },
    Target {
        name: "gossip",
        run: gossip,
        alloc_limit: 8 << 20,
    },
    Target {
        name: "coordinator_messages",
        run: coordinator_messages,
        alloc_limit: 16 << 20,
    },
    Target {
        name: "join_request",
        run: join_request,
        alloc_limit: 8 << 20,
    },
    Target {
        name: "api_json",
        run: api_json,
        alloc_limit: 32 << 20,
    },
];

/// The fuzzing CA: committed (a fixture, trusted by nothing else), so
/// signed gossip and join tokens in the corpus stay valid from run to run.
pub fn fixture_ca() -> ClusterCa {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/ca");
    ClusterCa::load(&dir).expect("the fuzzing CA in node/fuzz/fixtures/ca")
}

/// The time the targets check tokens and gossip at (unix seconds): fixed,
/// so the corpus's tokens and reports neither expire nor go stale.
pub const NOW_S: u64 = 1_900_000_000;

/// Gets the shared state ready (a replay calls it before measuring).
pub fn warm_up() {
    world();
}

/// What the targets share: a cluster CA, identities, a tiny model, a
/// runtime. Made once per process (the first input pays for it).
struct World {
    _dir: tempfile::TempDir,
    ca: ClusterCa,
    node_a: NodeIdentity,
    gateway: PeerIdentity,
    app: Arc<weft_api::AppState>,
    rt: tokio::runtime::Runtime,
}

fn world() -> &'static World {
    static W: OnceLock<World> = OnceLock::new();
    W.get_or_init(|| {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let ca = fixture_ca();
        let node_a = ca
            .issue_identity("node-a", Role::Node)
            .expect("an identity");
        let gw = ca.issue_identity("gw-1", Role::Node).expect("an identity");
        let gateway =
            weft_cluster::credentials::cert_identity(gw.cert_der()).expect("its identity");
        let model = dir.path().join("tiny.gguf");
        weft_kernels::testing::write_tiny_model(
            &model,
            &weft_kernels::testing::TinyModelSpec::default(),
        )
        .expect("the tiny model");
        let gguf = weft_kernels::GgufFile::open(&model).expect("the tiny model opens");
        let tokenizer = Arc::new(weft_kernels::Tokenizer::from_gguf(&gguf).expect("its tokenizer"));
        let app = weft_api::AppState::new(
            weft_api::ApiConfig {
                api_keys: Default::default(),
                tenants: Default::default(),
                max_context: 256,
                max_body_bytes: 1 << 20,
                max_tokens_limit: 64,
                default_max_tokens: 8,
                max_queue: 4,
                max_connections: 4,
                read_timeout_s: 1,
                grace_s: 1,
                shared_prefixes: Vec::new(),
                node_name: "local".into(),
            },
            "tiny".into(),
            tokenizer,
            Arc::new(Echo),
        );
        World {
            _dir: dir,
            ca,
            node_a,
            gateway,
            app,
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime"),
        }
    })
}

/// A runner that answers every request at once with its first prompt
/// token, so the API's whole path runs without a model worker.
struct Echo;

impl weft_worker::Runner for Echo {
    fn is_ready(&self) -> bool {
        true
    }
    fn submit(
        &self,
        request: weft_worker::Submission,
    ) -> Result<
        (
            u64,
            tokio::sync::mpsc::UnboundedReceiver<weft_worker::Update>,
        ),
        weft_worker::SubmitError,
    > {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let _ = tx.send(weft_worker::Update::Event {
            token: request.prompt.first().copied(),
            text: "x".into(),
            logprob: None,
            finish: Some(weft_kernels::FinishReason::Length),
            cached: None,
        });
        Ok((1, rx))
    }
    fn cancel(&self, _id: u64) {}
    fn stats(&self) -> weft_worker::WorkerStats {
        weft_worker::WorkerStats::default()
    }
    fn inflight(&self) -> usize {
        0
    }
    fn restarts(&self) -> u64 {
        0
    }
    fn tenants(&self) -> Vec<weft_kernels::TenantUsage> {
        Vec::new()
    }
    fn worker_pid(&self) -> Option<u32> {
        None
    }
    fn confinement(&self) -> Option<(weft_worker::sandbox::Confinement, bool)> {
        None
    }
    fn refused(&self) -> Option<String> {
        None
    }
}

/// The first byte picks a variant; the rest is the input proper.
fn split_first(data: &[u8]) -> (u8, &[u8]) {
    match data.split_first() {
        Some((b, rest)) => (*b, rest),
        None => (0, data),
    }
}

/// A model file: the GGUF header, the model's config and tokenizer, and
/// the tensors' sizes, from a file holding `data`.
pub fn gguf(data: &[u8]) {
    use std::io::Write;
    let Ok(mut f) = tempfile::tempfile() else {
        return;
    };
    if f.write_all(data).is_err() {
        return;
    }
    let Ok(mut file) = weft_kernels::GgufFile::from_file(f, std::path::Path::new("fuzz.gguf"))
    else {
        return;
    };
    let _ = weft_kernels::ModelConfig::from_gguf(&file);
    let _ = weft_kernels::Tokenizer::from_gguf(&file);
    let _ = file.weight_bytes();
    // a small tensor's bytes, wherever the header says they are
    let _ = file.tensor_data("output_norm.weight");
}

/// Frames a worker sends the node (and the node the worker), read until
/// the bytes end or a frame is refused.
pub fn worker_frames(data: &[u8]) {
    use weft_worker::protocol::{read_any, FromWorker, ToWorker};
    let (which, rest) = split_first(data);
    let mut r = Cursor::new(rest);
    for _ in 0..64 {
        let ok = if which % 2 == 0 {
            read_any::<FromWorker>(&mut r).is_ok()
        } else {
            read_any::<ToWorker>(&mut r).is_ok()
        };
        if !ok {
            break;
        }
    }
}

/// A chain step going down, or its reply coming up.
pub fn chain_frames(data: &[u8]) {
    let (which, rest) = split_first(data);
    if which % 2 == 0 {
        if let Ok(m) = weft_worker::chain::decode_message(rest) {
            // what decodes must encode, decode again and encode to the
            // same bytes (bytes, not the message: a NaN in it is not equal
            // to itself)
            let bytes = weft_worker::chain::encode_message(&m);
            let again = weft_worker::chain::decode_message(&bytes)
                .expect("an encoded chain message decodes");
            assert_eq!(
                weft_worker::chain::encode_message(&again),
                bytes,
                "a chain message did not round-trip"
            );
        }
    } else {
        let _ = weft_worker::chain::decode_reply(rest);
    }
}

/// A data-plane request: its head (the first two bytes give its length)
/// and its body.
pub fn dataplane_head(data: &[u8]) {
    let (n, rest) = match data {
        [a, b, rest @ ..] => (u16::from_le_bytes([*a, *b]) as usize, rest),
        _ => return,
    };
    let n = n.min(rest.len());
    let _ = weft_fabric::server::parse_request(rest[..n].to_vec(), rest[n..].to_vec(), "peer");
}

/// A gossip message on either topic, at a fixed time, into a fresh table.
pub fn gossip(data: &[u8]) {
    use weft_cluster::overlay::{Inbox, OverlayMetrics, RoutingTable, Topic};
    let w = world();
    let (which, rest) = split_first(data);
    let topic = if which % 2 == 0 {
        Topic::Load
    } else {
        Topic::Members
    };
    let mut inbox = Inbox::new(w.node_a.clone(), Revoked::default());
    let table = std::sync::RwLock::new(RoutingTable::default());
    let metrics = OverlayMetrics::default();
    let source = Some(libp2p_peer());
    let _ = inbox.receive(topic, rest, source, NOW_S * 1000, &table, &metrics);
}

/// What a credentialed peer sends a coordinator: a request (parsed, then
/// authorized for a gateway's certificate), a raft message, a log entry's
/// command; and the replies a node reads back.
pub fn coordinator_messages(data: &[u8]) {
    use protobuf::Message as _;
    let w = world();
    let (which, rest) = split_first(data);
    match which % 4 {
        0 => {
            if let Ok(req) = serde_json::from_slice::<weft_cluster::transport::Request>(rest) {
                let _ = weft_cluster::authz::authorize(Some(&w.gateway), &req);
                let _ = weft_cluster::authz::authorize(None, &req);
            }
        }
        1 => {
            let _ = raft::eraftpb::Message::parse_from_bytes(rest);
        }
        2 => {
            if let Ok(cmd) = weft_coordinator::Command::decode(rest) {
                let mut state = weft_coordinator::ControlState::default();
                let _ = state.apply(1, &cmd);
            }
        }
        _ => {
            let _ = serde_json::from_slice::<weft_cluster::transport::Reply>(rest);
        }
    }
}

/// A join request as it reaches the leader: the token, then the
/// certificate request, split at the first NUL; checked against a fresh
/// state.
pub fn join_request(data: &[u8]) {
    let w = world();
    let (token, csr) = match data.iter().position(|b| *b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let (Ok(token), Ok(csr)) = (std::str::from_utf8(token), std::str::from_utf8(csr)) else {
        return;
    };
    let member = weft_coordinator::Member {
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
    let _ =
        weft_cluster::member::check_join(&w.ca, &Default::default(), token, csr, &member, NOW_S);
}

/// A client's JSON body, posted to the completions or the chat endpoint
/// of a node serving the tiny model, answered in full.
pub fn api_json(data: &[u8]) {
    use tower::ServiceExt;
    let w = world();
    let (which, rest) = split_first(data);
    let path = if which % 2 == 0 {
        "/v1/completions"
    } else {
        "/v1/chat/completions"
    };
    let req = axum::http::Request::post(path)
        .header("content-type", "application/json")
        .body(axum::body::Body::from(rest.to_vec()))
        .expect("a request");
    w.rt.block_on(async {
        let Ok(resp) = weft_api::router(w.app.clone()).oneshot(req).await;
        let _ = axum::body::to_bytes(resp.into_body(), 4 << 20).await;
    });
}

/// A relay's overlay peer id (any will do: the message is what is checked).
fn libp2p_peer() -> weft_cluster::overlay::PeerId {
    weft_cluster::overlay::PeerId::random()
}
