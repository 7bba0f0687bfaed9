//! The runtime on a tiny random-weight Gemma-3-shaped model: batching,
//! layer shards, the paged cache under pressure, sampling and stopping, and
//! hostile files.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use weft_kernels::testing::{write_tiny_model, TinyModelSpec};
use weft_kernels::{
    load, Backend, Chunk, ChunkInput, ChunkOutput, Downstream, Engine, EngineConfig, FinishReason,
    Gemma3, KernelError, KvCache, LoadedModel, LocalChain, Request, Resume, SamplingParams,
    StreamDecoder,
};

struct Tiny {
    _dir: tempfile::TempDir,
    path: PathBuf,
    lm: LoadedModel,
}

fn tiny(spec: TinyModelSpec) -> Tiny {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    write_tiny_model(&path, &spec).unwrap();
    let lm = load(&path, None, Backend::Cpu).unwrap();
    Tiny {
        _dir: dir,
        path,
        lm,
    }
}

fn prompt(n: usize, salt: u32) -> Vec<u32> {
    let mut v = vec![2];
    v.extend((0..n as u32).map(|i| 263 + (i * 7 + salt * 13) % 60));
    v
}

fn engine(lm: &LoadedModel, kv_budget: usize) -> Engine {
    Engine::new(
        lm.model.clone(),
        lm.tokenizer.clone(),
        EngineConfig {
            kv_budget_bytes: kv_budget,
            max_step_tokens: 64,
            ..EngineConfig::default()
        },
    )
    .unwrap()
}

fn greedy(max: usize) -> SamplingParams {
    SamplingParams::greedy(max)
}

#[test]
fn a_batch_of_8_at_different_positions_matches_each_alone() {
    let t = tiny(TinyModelSpec::default());
    let prompts: Vec<Vec<u32>> = (0..8).map(|i| prompt(3 + i * 5, i as u32)).collect();
    let mut alone = Vec::new();
    for (i, p) in prompts.iter().enumerate() {
        let mut e = engine(&t.lm, 64 << 20);
        e.add_request(Request {
            id: i as u64,
            prompt: p.clone(),
            params: greedy(12),
            priority: 0,
            tenant: String::new(),
        })
        .unwrap();
        alone.push(
            e.run_to_completion()
                .unwrap()
                .remove(&(i as u64))
                .unwrap()
                .tokens,
        );
    }
    // staggered arrivals: each request joins while the others are mid-generation
    let mut e = engine(&t.lm, 64 << 20);
    let mut done: HashMap<u64, Vec<u32>> = HashMap::new();
    let mut next = 0;
    while next < prompts.len() || e.has_work() {
        if next < prompts.len() {
            e.add_request(Request {
                id: next as u64,
                prompt: prompts[next].clone(),
                params: greedy(12),
                priority: 0,
                tenant: String::new(),
            })
            .unwrap();
            next += 1;
        }
        for ev in e.step().unwrap() {
            done.entry(ev.id).or_default().extend(ev.token);
        }
    }
    for (i, a) in alone.iter().enumerate() {
        assert_eq!(a.len(), 12);
        assert_eq!(&done[&(i as u64)], a, "sequence {i} differs when batched");
    }
}

fn last_logits(out: Vec<ChunkOutput>) -> Vec<f32> {
    match out.into_iter().next().unwrap() {
        ChunkOutput::Logits(Some(l)) => l,
        other => panic!("expected logits, got {other:?}"),
    }
}

#[test]
fn layer_shards_chained_equal_the_whole_model() {
    let t = tiny(TinyModelSpec::default());
    let n = t.lm.model.config().layers;
    let toks = prompt(20, 3);
    let whole = {
        let mut kv = t.lm.model.new_kv_cache(8 << 20);
        kv.reserve(1, toks.len()).unwrap();
        let c = Chunk {
            seq: 1,
            pos: 0,
            input: ChunkInput::Tokens(toks.clone()),
            want_logits: true,
        };
        last_logits(t.lm.model.forward(&[c], &mut kv).unwrap())
    };
    for k in [1, 3, n - 1] {
        let a = Gemma3::load(&t.path, Some(0..k)).unwrap();
        let b = Gemma3::load(&t.path, Some(k..n)).unwrap();
        assert!(a.is_first() && !a.is_last() && !b.is_first() && b.is_last());
        let (mut ka, mut kb) = (a.new_kv_cache(8 << 20), b.new_kv_cache(8 << 20));
        ka.reserve(1, toks.len()).unwrap();
        kb.reserve(1, toks.len()).unwrap();
        // prefill in two chunks to also cross a chunk boundary inside the shards
        let mut logits = None;
        for (pos, part) in [(0, &toks[..9]), (9, &toks[9..])] {
            let c = Chunk {
                seq: 1,
                pos,
                input: ChunkInput::Tokens(part.to_vec()),
                want_logits: pos == 9,
            };
            let hidden = match a.forward(&[c], &mut ka).unwrap().remove(0) {
                ChunkOutput::Hidden(h) => h,
                other => panic!("expected hidden states, got {other:?}"),
            };
            assert_eq!(hidden.len(), part.len() * a.config().hidden);
            let c = Chunk {
                seq: 1,
                pos,
                input: ChunkInput::Hidden(hidden),
                want_logits: pos == 9,
            };
            let out = b.forward(&[c], &mut kb).unwrap();
            if pos == 9 {
                logits = Some(last_logits(out));
            }
        }
        let logits = logits.unwrap();
        let err = weft_kernels::testing::relative_error(&whole, &logits);
        assert!(err <= 1e-4, "split at {k}: relative error {err}");
    }
    // a middle shard refuses tokens and the first refuses hidden states
    let mid = Gemma3::load(&t.path, Some(2..4)).unwrap();
    let mut kv = mid.new_kv_cache(1 << 20);
    kv.reserve(1, 1).unwrap();
    let c = Chunk {
        seq: 1,
        pos: 0,
        input: ChunkInput::Tokens(vec![2]),
        want_logits: false,
    };
    assert!(matches!(
        mid.forward(&[c], &mut kv),
        Err(KernelError::BadInput(_))
    ));
    assert!(matches!(
        Gemma3::load(&t.path, Some(3..3)),
        Err(KernelError::BadLayerRange { .. })
    ));
    assert!(matches!(
        Gemma3::load(&t.path, Some(0..n + 1)),
        Err(KernelError::BadLayerRange { .. })
    ));
}

#[test]
fn kv_pool_exhaustion_preempts_and_still_gives_the_same_tokens() {
    let t = tiny(TinyModelSpec::default());
    let cfg = t.lm.model.config();
    let block = KvCache::block_bytes(cfg.layers, cfg.kv_dim());
    let prompts: Vec<Vec<u32>> = (0..6).map(|i| prompt(20 + i, i as u32)).collect();
    let run = |budget: usize| {
        let mut e = engine(&t.lm, budget);
        for (i, p) in prompts.iter().enumerate() {
            e.add_request(Request {
                id: i as u64,
                prompt: p.clone(),
                params: greedy(30),
                priority: 0,
                tenant: String::new(),
            })
            .unwrap();
        }
        let out = e.run_to_completion().unwrap();
        (out, e.stats().preemptions)
    };
    let (roomy, pre0) = run(1 << 26);
    assert_eq!(pre0, 0);
    // 10 blocks hold 160 positions; the six sequences need about 6 × 4 blocks
    let (tight, pre) = run(10 * block);
    assert!(pre > 0, "the small pool should have forced preemption");
    for i in 0..6u64 {
        assert_eq!(tight[&i].finish, Some(FinishReason::Length));
        assert_eq!(tight[&i].tokens, roomy[&i].tokens, "sequence {i}");
    }
    // a sequence that cannot fit even alone ends with an error, not a crash
    let mut e = engine(&t.lm, 2 * block);
    e.add_request(Request {
        id: 9,
        prompt: prompt(20, 1),
        params: greedy(40),
        priority: 0,
        tenant: String::new(),
    })
    .unwrap();
    let out = e.run_to_completion().unwrap();
    assert!(
        matches!(out[&9].finish, Some(FinishReason::Error(_))),
        "{:?}",
        out[&9].finish
    );
    // and a prompt larger than the whole pool is refused at once
    let err = e
        .add_request(Request {
            id: 10,
            prompt: prompt(100, 1),
            params: greedy(1),
            priority: 0,
            tenant: String::new(),
        })
        .unwrap_err();
    assert!(matches!(err, KernelError::Rejected(_)));
}

#[test]
fn stop_strings_cancel_max_tokens_and_priorities() {
    let t = tiny(TinyModelSpec::default());
    let tok = t.lm.tokenizer.clone();
    // find what the model says greedily, then stop on a piece of it
    let mut e = engine(&t.lm, 16 << 20);
    e.add_request(Request {
        id: 1,
        prompt: prompt(5, 0),
        params: greedy(16),
        priority: 0,
        tenant: String::new(),
    })
    .unwrap();
    let full = e.run_to_completion().unwrap().remove(&1).unwrap();
    assert_eq!(full.tokens.len(), 16);
    assert_eq!(full.finish, Some(FinishReason::Length));
    assert_eq!(full.text, tok.decode(&full.tokens));
    let text = full.text.clone();
    let chars: Vec<char> = text.chars().collect();
    assert!(chars.len() > 6, "{text:?}");
    let stop: String = chars[chars.len() / 2..chars.len() / 2 + 2].iter().collect();
    let expected = &text[..text.find(&stop).unwrap()];
    let mut e = engine(&t.lm, 16 << 20);
    let params = SamplingParams {
        stop_strings: vec![stop.clone()],
        ..greedy(16)
    };
    e.add_request(Request {
        id: 1,
        prompt: prompt(5, 0),
        params,
        priority: 0,
        tenant: String::new(),
    })
    .unwrap();
    let got = e.run_to_completion().unwrap().remove(&1).unwrap();
    assert_eq!(got.finish, Some(FinishReason::Stop));
    assert_eq!(got.text, expected, "stop {stop:?}");
    // a stop token ends the sequence without adding it
    let mut e = engine(&t.lm, 16 << 20);
    let params = SamplingParams {
        stop_tokens: vec![full.tokens[3]],
        ..greedy(16)
    };
    e.add_request(Request {
        id: 1,
        prompt: prompt(5, 0),
        params,
        priority: 0,
        tenant: String::new(),
    })
    .unwrap();
    let got = e.run_to_completion().unwrap().remove(&1).unwrap();
    let first = full
        .tokens
        .iter()
        .position(|&x| x == full.tokens[3])
        .unwrap();
    assert_eq!(got.tokens, full.tokens[..first]);
    assert_eq!(got.finish, Some(FinishReason::Stop));
    // cancel frees the blocks and reports the cancellation
    let mut e = engine(&t.lm, 16 << 20);
    e.add_request(Request {
        id: 5,
        prompt: prompt(30, 2),
        params: greedy(100),
        priority: 0,
        tenant: String::new(),
    })
    .unwrap();
    e.step().unwrap();
    assert!(e.kv_usage().0 > 0);
    assert!(e.cancel(5));
    let evs = e.step().unwrap();
    assert_eq!(evs.len(), 1);
    assert_eq!(evs[0].finish, Some(FinishReason::Cancelled));
    assert_eq!(e.kv_usage().0, 0);
    assert!(!e.has_work());
    assert!(!e.cancel(5));
    // higher priority is admitted first when only one fits
    let mut e = Engine::new(
        t.lm.model.clone(),
        t.lm.tokenizer.clone(),
        EngineConfig {
            max_running: 1,
            ..EngineConfig::default()
        },
    )
    .unwrap();
    e.add_request(Request {
        id: 1,
        prompt: prompt(4, 1),
        params: greedy(2),
        priority: 0,
        tenant: String::new(),
    })
    .unwrap();
    e.add_request(Request {
        id: 2,
        prompt: prompt(4, 2),
        params: greedy(2),
        priority: 9,
        tenant: String::new(),
    })
    .unwrap();
    let first_ids: Vec<u64> = e.step().unwrap().iter().map(|ev| ev.id).collect();
    assert_eq!(first_ids, vec![2]);
    // logprobs are reported per token and are log-probabilities
    let mut e = engine(&t.lm, 16 << 20);
    let params = SamplingParams {
        logprobs: true,
        top_logprobs: 3,
        ..greedy(4)
    };
    e.add_request(Request {
        id: 1,
        prompt: prompt(5, 0),
        params,
        priority: 0,
        tenant: String::new(),
    })
    .unwrap();
    let got = e.run_to_completion().unwrap().remove(&1).unwrap();
    assert_eq!(got.logprobs.len(), 4);
    for lp in &got.logprobs {
        assert!(lp.logprob <= 0.0);
        assert_eq!(lp.top[0].0, lp.token, "greedy picks the most likely token");
        assert_eq!(lp.top.len(), 3);
    }
}

#[test]
fn seeded_sampling_repeats() {
    let t = tiny(TinyModelSpec::default());
    let run = |seed: u64| {
        let mut e = engine(&t.lm, 16 << 20);
        let params = SamplingParams {
            temperature: 50.0,
            top_p: 0.99,
            seed: Some(seed),
            ..greedy(20)
        };
        e.add_request(Request {
            id: 1,
            prompt: prompt(5, 0),
            params,
            priority: 0,
            tenant: String::new(),
        })
        .unwrap();
        e.run_to_completion().unwrap().remove(&1).unwrap().tokens
    };
    assert_eq!(run(7), run(7));
    assert_ne!(run(7), run(8));
}

#[test]
fn requests_that_can_never_run_are_rejected() {
    let t = tiny(TinyModelSpec {
        context_length: 64,
        ..TinyModelSpec::default()
    });
    let mut e = engine(&t.lm, 16 << 20);
    let bad = |p: Vec<u32>| Request {
        id: 1,
        prompt: p,
        params: greedy(4),
        priority: 0,
        tenant: String::new(),
    };
    assert!(matches!(
        e.add_request(bad(vec![])),
        Err(KernelError::Rejected(_))
    ));
    assert!(matches!(
        e.add_request(bad(prompt(80, 0))),
        Err(KernelError::Rejected(_))
    ));
    assert!(matches!(
        e.add_request(bad(vec![2, 99_999])),
        Err(KernelError::Rejected(_))
    ));
    // generation stops at the context limit with `Length`
    e.add_request(bad(prompt(60, 0))).unwrap();
    let r = Request {
        id: 2,
        prompt: prompt(60, 0),
        params: greedy(100),
        priority: 0,
        tenant: String::new(),
    };
    e.add_request(r).unwrap();
    let out = e.run_to_completion().unwrap();
    assert_eq!(out[&2].finish, Some(FinishReason::Length));
    assert_eq!(61 + out[&2].tokens.len(), 64);
}

#[test]
fn tokenizer_round_trips_and_streams_whole_characters() {
    let t = tiny(TinyModelSpec::default());
    let tok = &t.lm.tokenizer;
    let text = " hello world\nthe café 🚀 ok";
    let ids = tok.encode(text, true, false);
    assert_eq!(ids[0], tok.bos());
    assert!(ids.contains(&tok.token_id("\u{2581}hello").unwrap()));
    assert!(
        ids.contains(&tok.token_id("\n").unwrap()),
        "user-defined pieces are split out"
    );
    // the rocket is not a piece: it falls back to its 4 bytes
    let rocket: Vec<u32> = "🚀"
        .bytes()
        .map(|b| tok.token_id(&format!("<0x{b:02X}>")).unwrap())
        .collect();
    assert!(ids.windows(4).any(|w| w == rocket.as_slice()));
    assert_eq!(tok.decode(&ids), text);
    // streaming never emits half a character
    let mut d = StreamDecoder::new();
    let mut pieces = Vec::new();
    for &id in &ids {
        let s = d.push(tok, id);
        pieces.push(s);
    }
    pieces.push(d.finish());
    assert_eq!(pieces.concat(), text);
    let rocket_at = pieces.iter().position(|p| p.contains('🚀')).unwrap();
    assert_eq!(
        pieces[rocket_at - 3..rocket_at],
        ["", "", ""],
        "bytes held until the character is whole"
    );
    // control tokens are only parsed when asked
    let plain = tok.encode("<start_of_turn>user", false, false);
    assert!(!plain.contains(&tok.token_id("<start_of_turn>").unwrap()));
    let special = tok.encode("<start_of_turn>user", false, true);
    assert_eq!(special[0], tok.token_id("<start_of_turn>").unwrap());
    // chat template
    let msgs = [
        weft_kernels::ChatMessage {
            role: "system".into(),
            content: "Be brief.".into(),
        },
        weft_kernels::ChatMessage {
            role: "user".into(),
            content: "Hi".into(),
        },
        weft_kernels::ChatMessage {
            role: "assistant".into(),
            content: "Hello!".into(),
        },
        weft_kernels::ChatMessage {
            role: "user".into(),
            content: "Bye".into(),
        },
    ];
    assert_eq!(
        tok.apply_chat_template(&msgs),
        "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n"
    );
    let ids = tok.encode_chat(&msgs);
    assert_eq!(ids[0], tok.bos());
    assert_eq!(
        ids.iter()
            .filter(|&&i| Some(i) == tok.token_id("<end_of_turn>"))
            .count(),
        3
    );
}

fn write_bytes(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::File::create(&p).unwrap().write_all(bytes).unwrap();
    p
}

#[test]
fn hostile_and_broken_files_are_typed_errors() {
    let t = tiny(TinyModelSpec::default());
    let good = std::fs::read(&t.path).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let open = |p: &Path| load(p, None, Backend::Cpu).map(|_| ()).unwrap_err();

    // truncated: in the header, and in the tensor data
    for cut in [10, 300, good.len() / 2, good.len() - 10] {
        let p = write_bytes(dir.path(), &format!("cut{cut}.gguf"), &good[..cut]);
        let e = open(&p);
        assert!(
            matches!(
                e,
                KernelError::InvalidGguf { .. }
                    | KernelError::TensorOutOfBounds { .. }
                    | KernelError::BadMetadata { .. }
            ),
            "cut at {cut}: {e}"
        );
    }
    // wrong magic
    let mut bad = good.clone();
    bad[..4].copy_from_slice(b"GGML");
    assert!(matches!(
        open(&write_bytes(dir.path(), "magic.gguf", &bad)),
        KernelError::InvalidGguf { .. }
    ));
    // huge tensor count and huge metadata count (header bytes 8..16 and 16..24)
    for at in [8usize, 16] {
        let mut bad = good.clone();
        bad[at..at + 8].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
        assert!(matches!(
            open(&write_bytes(dir.path(), "huge.gguf", &bad)),
            KernelError::InvalidGguf { .. }
        ));
    }
    // a huge string length in the first metadata key
    let mut bad = good.clone();
    bad[24..32].copy_from_slice(&(1u64 << 40).to_le_bytes());
    assert!(matches!(
        open(&write_bytes(dir.path(), "str.gguf", &bad)),
        KernelError::InvalidGguf { .. }
    ));
    // an empty file and a missing file
    assert!(matches!(
        open(&write_bytes(dir.path(), "empty.gguf", b"")),
        KernelError::InvalidGguf { .. }
    ));
    assert!(matches!(
        open(&dir.path().join("none.gguf")),
        KernelError::Io { .. }
    ));
    // unsupported architecture
    let mut bad = good.clone();
    let at = find(&bad, b"gemma3").unwrap();
    bad[at..at + 6].copy_from_slice(b"llama9");
    assert!(matches!(
        open(&write_bytes(dir.path(), "arch.gguf", &bad)),
        KernelError::UnsupportedArchitecture { .. }
    ));
    // a missing tensor (rename one in the header)
    let mut bad = good.clone();
    let at = find(&bad, b"blk.2.ffn_up.weight").unwrap();
    bad[at..at + 3].copy_from_slice(b"blx");
    assert!(matches!(
        open(&write_bytes(dir.path(), "missing.gguf", &bad)),
        KernelError::MissingTensor { .. }
    ));
    // a tensor of the wrong shape: swap which tensor carries the up name
    let mut bad = good.clone();
    let a = find(&bad, b"blk.1.attn_k.weight").unwrap();
    let b = find(&bad, b"blk.1.attn_q.weight").unwrap();
    bad[a + 11] = b'q';
    bad[b + 11] = b'k';
    assert!(matches!(
        open(&write_bytes(dir.path(), "shape.gguf", &bad)),
        KernelError::WrongShape { .. }
    ));
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[test]
fn the_engine_refuses_a_shard() {
    let t = tiny(TinyModelSpec::default());
    let shard = Arc::new(Gemma3::load(&t.path, Some(0..2)).unwrap());
    assert!(Engine::new(shard, t.lm.tokenizer.clone(), EngineConfig::default()).is_err());
}

#[test]
fn a_resumed_sequence_continues_exactly_where_the_first_run_stopped() {
    let t = tiny(TinyModelSpec::default());
    let sampled = |seed: Option<u64>| SamplingParams {
        temperature: if seed.is_some() { 5.0 } else { 0.0 },
        seed,
        ..greedy(24)
    };
    for seed in [None, Some(11)] {
        let mut e = engine(&t.lm, 16 << 20);
        let req = |id| Request {
            id,
            prompt: prompt(9, 4),
            params: sampled(seed),
            priority: 0,
            tenant: String::new(),
        };
        e.add_request(req(1)).unwrap();
        let whole = e.run_to_completion().unwrap().remove(&1).unwrap();
        assert_eq!(whole.tokens.len(), 24);
        for cut in [1, 10, 23] {
            // what a client had seen when the first replica died: the tokens
            // so far and their text
            let text_bytes = t.lm.tokenizer.decode(&whole.tokens[..cut]).len();
            let mut e = engine(&t.lm, 16 << 20);
            e.add_resumed(
                req(2),
                Resume {
                    tokens: whole.tokens[..cut].to_vec(),
                    text_bytes,
                },
            )
            .unwrap();
            let rest = e.run_to_completion().unwrap().remove(&2).unwrap();
            assert_eq!(
                rest.tokens,
                whole.tokens[cut..],
                "seed {seed:?}, resumed after {cut}"
            );
            assert_eq!(
                t.lm.tokenizer.decode(&whole.tokens[..cut]) + &rest.text,
                whole.text,
                "seed {seed:?}, resumed after {cut}: the text joins without a gap or a repeat"
            );
        }
        // nothing left to generate is refused, not run past max_tokens
        let mut e = engine(&t.lm, 16 << 20);
        let all = Resume {
            tokens: whole.tokens.clone(),
            text_bytes: 0,
        };
        assert!(e.add_resumed(req(3), all).is_err());
    }
}

#[test]
fn an_engine_over_a_chain_of_2_or_3_shards_gives_the_whole_models_tokens() {
    let t = tiny(TinyModelSpec::default());
    let n = t.lm.model.config().layers;
    let kv_dim = t.lm.model.config().kv_dim();
    let prompts: Vec<Vec<u32>> = (0..6).map(|i| prompt(9 + i * 3, i as u32)).collect();
    let submit = |e: &mut Engine| {
        for (i, p) in prompts.iter().enumerate() {
            e.add_request(Request {
                id: i as u64,
                prompt: p.clone(),
                params: greedy(24),
                priority: 0,
                tenant: String::new(),
            })
            .unwrap();
        }
    };
    let mut whole = engine(&t.lm, 1 << 26);
    submit(&mut whole);
    let whole = whole.run_to_completion().unwrap();
    let shard = |r: std::ops::Range<usize>| Arc::new(Gemma3::load(&t.path, Some(r)).unwrap());
    // like Gemma 3, the tiny model projects with its embedding, so a head
    // can project the last shard's hidden states
    assert!(shard(0..2).is_tied());
    for cuts in [vec![2], vec![1, 4], vec![3, 5]] {
        // a roomy head, then a head so small it preempts (and the chain
        // recomputes downstream too)
        let mut bounds = vec![0];
        bounds.extend(&cuts);
        bounds.push(n);
        // 12 blocks of the head's layers: 192 positions for about 270
        let small = 12 * KvCache::block_bytes(bounds[1], kv_dim);
        // the last shard returns logits, or its final hidden states for the
        // head to project
        for (head_budget, projected_at_head) in
            [(1usize << 26, false), (1 << 26, true), (small, true)]
        {
            let rest: Vec<Arc<Gemma3>> =
                bounds[1..].windows(2).map(|w| shard(w[0]..w[1])).collect();
            let mut chain = LocalChain::new(rest, 1 << 26).unwrap();
            if projected_at_head {
                chain = chain.leaving_projection_to_the_head();
            }
            let mut e = Engine::new_chain(
                shard(0..bounds[1]),
                Box::new(chain),
                t.lm.tokenizer.clone(),
                EngineConfig {
                    kv_budget_bytes: head_budget,
                    max_step_tokens: 64,
                    ..EngineConfig::default()
                },
            )
            .unwrap();
            submit(&mut e);
            let out = e.run_to_completion().unwrap();
            for i in 0..prompts.len() as u64 {
                assert_eq!(out[&i].tokens.len(), 24);
                assert_eq!(
                    out[&i].tokens, whole[&i].tokens,
                    "sequence {i}, layers cut at {cuts:?}, head budget {head_budget}, projected at the head: {projected_at_head}"
                );
            }
            if head_budget < 1 << 26 {
                assert!(e.stats().preemptions > 0, "the small head did not preempt");
            }
        }
    }
    // a chain must start after the head and end the model
    assert!(LocalChain::new(vec![shard(0..2)], 1 << 20).is_err());
    assert!(LocalChain::new(vec![shard(2..4)], 1 << 20).is_err());
    assert!(LocalChain::new(vec![shard(2..3), shard(4..n)], 1 << 20).is_err());
    // and the head is the first shard, not the whole model
    let rest = LocalChain::new(vec![shard(2..n)], 1 << 20).unwrap();
    assert!(Engine::new_chain(
        t.lm.model.clone(),
        Box::new(rest),
        t.lm.tokenizer.clone(),
        EngineConfig::default()
    )
    .is_err());
}

/// A chain whose later layers fail once (a node of it died): every running
/// sequence ends with an error that says so, none hangs, and the engine
/// then serves new requests exactly as before.
#[test]
fn a_failing_chain_ends_its_running_sequences_with_an_error_and_the_engine_goes_on() {
    struct FailsOnce {
        inner: LocalChain,
        calls: usize,
        fail_at: usize,
    }
    impl Downstream for FailsOnce {
        fn forward(&mut self, chunks: &[Chunk]) -> weft_kernels::Result<Vec<ChunkOutput>> {
            self.calls += 1;
            if self.calls == self.fail_at {
                return Err(weft_kernels::KernelError::BadInput("node gone".into()));
            }
            self.inner.forward(chunks)
        }
        fn release(&mut self, seq: u64) {
            self.inner.release(seq)
        }
    }
    let t = tiny(TinyModelSpec::default());
    let n = t.lm.model.config().layers;
    let shard = |r: std::ops::Range<usize>| Arc::new(Gemma3::load(&t.path, Some(r)).unwrap());
    let mut whole = engine(&t.lm, 1 << 26);
    let ask = |id: u64, p: &[u32]| Request {
        id,
        prompt: p.to_vec(),
        params: greedy(12),
        priority: 0,
        tenant: String::new(),
    };
    whole.add_request(ask(9, &prompt(11, 5))).unwrap();
    let want = whole
        .run_to_completion()
        .unwrap()
        .remove(&9)
        .unwrap()
        .tokens;
    let mut e = Engine::new_chain(
        shard(0..2),
        Box::new(FailsOnce {
            inner: LocalChain::new(vec![shard(2..n)], 1 << 26).unwrap(),
            calls: 0,
            fail_at: 3,
        }),
        t.lm.tokenizer.clone(),
        EngineConfig::default(),
    )
    .unwrap();
    e.add_request(ask(1, &prompt(10, 1))).unwrap();
    e.add_request(ask(2, &prompt(12, 2))).unwrap();
    let out = e.run_to_completion().unwrap();
    for id in [1, 2] {
        match &out[&id].finish {
            Some(FinishReason::Lost(why)) => assert!(why.contains("node gone"), "{why}"),
            other => panic!("sequence {id} ended with {other:?}"),
        }
        assert!(out[&id].tokens.len() < 12);
    }
    assert_eq!(e.running(), 0);
    assert_eq!(e.kv_usage().0, 0, "the failed sequences' blocks were kept");
    e.add_request(ask(9, &prompt(11, 5))).unwrap();
    let again = e.run_to_completion().unwrap();
    assert_eq!(again[&9].tokens, want);
}
