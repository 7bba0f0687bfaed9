//! Constrained decoding on tiny random-weight models: whatever the weights
//! say, the output matches the grammar, for SentencePiece (Gemma) and
//! byte-level BPE (Llama) vocabularies, batched, resumed and in chains; an
//! invalid grammar is refused before any token.

use std::sync::Arc;

use serde_json::{json, Value};
use weft_kernels::testing::TinyModelSpec;
use weft_kernels::{
    Engine, EngineConfig, FinishReason, Grammar, Grammars, KernelError, LocalChain, Model, Request,
    Resume, SamplingParams,
};

mod common;
use common::{tiny, Tiny};

fn families() -> Vec<TinyModelSpec> {
    vec![TinyModelSpec::gemma3_270m(), TinyModelSpec::llama()]
}

fn prompt(t: &Tiny, salt: u32) -> Vec<u32> {
    let mut p =
        t.lm.tokenizer
            .encode(&format!("answer {salt}:"), true, false);
    p.push(263 + salt % 40);
    p
}

fn engine(t: &Tiny) -> Engine {
    Engine::new(
        t.lm.model.clone(),
        t.lm.tokenizer.clone(),
        EngineConfig {
            kv_budget_bytes: 32 << 20,
            ..EngineConfig::default()
        },
    )
    .unwrap()
}

/// Random sampling (so the draws wander over the allowed tokens), seeded.
fn sampled(max_tokens: usize, seed: u64, grammar: Option<Grammar>) -> SamplingParams {
    SamplingParams {
        temperature: 1.0,
        seed: Some(seed),
        max_tokens,
        grammar,
        ..SamplingParams::default()
    }
}

fn ask(id: u64, prompt: Vec<u32>, params: SamplingParams, t: &Tiny) -> Request {
    let mut params = params;
    params.stop_tokens = t.lm.tokenizer.stop_tokens();
    Request {
        id,
        prompt,
        params,
        priority: 0,
        tenant: String::new(),
    }
}

fn schema(s: Value) -> Grammar {
    Grammar::JsonSchema {
        schema: s,
        strict: true,
    }
}

/// A schema whose every answer is short: a bounded string, an enum, a
/// bounded integer and a boolean.
fn small_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 6},
            "kind": {"enum": ["cat", "dog"]},
            "age": {"type": "integer", "minimum": 0, "maximum": 30},
            "ok": {"type": "boolean"}
        },
        "required": ["name", "kind", "age", "ok"],
        "additionalProperties": false
    })
}

fn check_small(v: &Value) {
    let o = v.as_object().expect("an object");
    assert_eq!(o.len(), 4, "{v}");
    assert!(o["name"].as_str().unwrap().chars().count() <= 6, "{v}");
    assert!(["cat", "dog"].contains(&o["kind"].as_str().unwrap()), "{v}");
    assert!((0..=30).contains(&o["age"].as_i64().unwrap()), "{v}");
    assert!(o["ok"].is_boolean(), "{v}");
}

#[test]
fn every_answer_under_a_json_schema_parses_and_matches_it() {
    for spec in families() {
        let t = tiny(spec);
        let mut e = engine(&t);
        for i in 0..6u64 {
            let p = sampled(120, i, Some(schema(small_schema())));
            e.add_request(ask(i, prompt(&t, i as u32), p, &t)).unwrap();
        }
        for (id, c) in e.run_to_completion().unwrap() {
            assert_eq!(c.finish, Some(FinishReason::Stop), "{id}: {:?}", c.text);
            let v: Value = serde_json::from_str(&c.text)
                .unwrap_or_else(|e| panic!("{id}: {:?} does not parse: {e}", c.text));
            check_small(&v);
        }
    }
}

#[test]
fn a_json_object_answer_is_an_object() {
    for spec in families() {
        let t = tiny(spec);
        let mut e = engine(&t);
        // greedy: a random model's any-JSON may run on, so a long budget
        let p = SamplingParams {
            grammar: Some(Grammar::JsonObject),
            ..SamplingParams::greedy(400)
        };
        e.add_request(ask(0, prompt(&t, 1), p, &t)).unwrap();
        let c = e.run_to_completion().unwrap().remove(&0).unwrap();
        assert!(c.text.starts_with('{'), "{:?}", c.text);
        if c.finish == Some(FinishReason::Stop) {
            let v: Value = serde_json::from_str(&c.text).unwrap();
            assert!(v.is_object());
        } else {
            // cut by the length limit: a prefix of an object, not claimed whole
            assert_eq!(c.finish, Some(FinishReason::Length));
            assert!(serde_json::from_str::<Value>(&c.text).is_err());
        }
    }
}

#[test]
fn a_regex_constrained_answer_matches_the_expression() {
    for spec in families() {
        let t = tiny(spec);
        let mut e = engine(&t);
        let g = Grammar::Regex {
            pattern: "[a-c]{3}-[0-9]{2}".into(),
        };
        for i in 0..4u64 {
            e.add_request(ask(
                i,
                prompt(&t, i as u32),
                sampled(40, i, Some(g.clone())),
                &t,
            ))
            .unwrap();
        }
        for (id, c) in e.run_to_completion().unwrap() {
            let b = c.text.as_bytes();
            assert_eq!(c.finish, Some(FinishReason::Stop), "{id}");
            assert_eq!(b.len(), 6, "{:?}", c.text);
            assert!(
                b[..3].iter().all(|x| (b'a'..=b'c').contains(x)),
                "{:?}",
                c.text
            );
            assert_eq!(b[3], b'-');
            assert!(b[4..].iter().all(u8::is_ascii_digit), "{:?}", c.text);
        }
    }
}

#[test]
fn a_choice_constrained_answer_is_one_of_the_options() {
    let t = tiny(TinyModelSpec::gemma3_270m());
    let options = vec!["yes".to_string(), "no".into(), "a.b (c)?".into()];
    let mut e = engine(&t);
    for i in 0..6u64 {
        let g = Grammar::Choice {
            options: options.clone(),
        };
        e.add_request(ask(i, prompt(&t, i as u32), sampled(20, i, Some(g)), &t))
            .unwrap();
    }
    for (_, c) in e.run_to_completion().unwrap() {
        assert!(options.contains(&c.text), "{:?}", c.text);
    }
}

#[test]
fn an_invalid_schema_is_refused_when_added_with_the_reason() {
    let t = tiny(TinyModelSpec::gemma3_270m());
    let mut e = engine(&t);
    let bad = schema(json!({"type": "object", "properties": {"a": {"type": "no-such-type"}}}));
    let err = e
        .add_request(ask(0, prompt(&t, 0), sampled(10, 0, Some(bad)), &t))
        .unwrap_err();
    assert!(matches!(err, KernelError::Rejected(_)), "{err}");
    assert!(err.to_string().contains("no-such-type"), "{err}");
    assert!(!e.has_work(), "nothing was queued");
}

#[test]
fn a_strict_schema_with_an_unknown_format_is_refused_and_a_lenient_one_runs() {
    let t = tiny(TinyModelSpec::gemma3_270m());
    let g = Grammars::new(&t.lm.tokenizer).unwrap();
    let s = json!({"type": "string", "format": "no-such-format", "maxLength": 3});
    let strict = g.check(&Grammar::JsonSchema {
        schema: s.clone(),
        strict: true,
    });
    assert!(strict.unwrap_err().to_string().contains("no-such-format"));
    g.check(&Grammar::JsonSchema {
        schema: s,
        strict: false,
    })
    .unwrap();
}

#[test]
fn an_invalid_regex_is_refused_saying_where() {
    let t = tiny(TinyModelSpec::gemma3_270m());
    let g = Grammars::new(&t.lm.tokenizer).unwrap();
    let err = g
        .check(&Grammar::Regex {
            pattern: "[a-".into(),
        })
        .unwrap_err();
    assert!(matches!(err, KernelError::Grammar(_)), "{err}");
    assert!(err.to_string().contains("regex"), "{err}");
}

#[test]
fn a_schema_sent_again_is_served_from_the_compile_cache() {
    let t = tiny(TinyModelSpec::gemma3_270m());
    let g = Grammars::new(&t.lm.tokenizer).unwrap();
    let s = schema(small_schema());
    g.check(&s).unwrap();
    g.check(&s).unwrap();
    g.check(&schema(json!({"type": "integer"}))).unwrap();
    let st = g.stats();
    assert_eq!((st.compiled, st.cache_hits), (2, 1));
}

#[test]
fn free_sequences_batched_with_constrained_ones_keep_their_tokens() {
    for spec in families() {
        let t = tiny(spec);
        let free: Vec<Request> = (0..3u64)
            .map(|i| ask(i, prompt(&t, i as u32), sampled(24, 100 + i, None), &t))
            .collect();
        let mut alone = engine(&t);
        for r in &free {
            alone.add_request(r.clone()).unwrap();
        }
        let want = alone.run_to_completion().unwrap();
        let mut mixed = engine(&t);
        for (k, r) in free.iter().enumerate() {
            mixed.add_request(r.clone()).unwrap();
            let p = sampled(60, k as u64, Some(schema(small_schema())));
            mixed
                .add_request(ask(10 + k as u64, prompt(&t, 7 + k as u32), p, &t))
                .unwrap();
        }
        let got = mixed.run_to_completion().unwrap();
        for r in &free {
            assert_eq!(got[&r.id].tokens, want[&r.id].tokens, "sequence {}", r.id);
        }
        for k in 0..3u64 {
            check_small(&serde_json::from_str(&got[&(10 + k)].text).unwrap());
        }
    }
}

#[test]
fn a_chain_head_constrains_what_it_samples() {
    let t = tiny(TinyModelSpec::llama());
    let n = t.lm.model.config().layers;
    let rest = vec![Arc::new(Model::load(&t.path, Some(2..n)).unwrap())];
    let chain = LocalChain::new(rest, 32 << 20).unwrap();
    let head = Arc::new(Model::load(&t.path, Some(0..2)).unwrap());
    let mut e = Engine::new_chain(
        head,
        Box::new(chain),
        t.lm.tokenizer.clone(),
        EngineConfig::default(),
    )
    .unwrap();
    for i in 0..3u64 {
        let p = sampled(120, i, Some(schema(small_schema())));
        e.add_request(ask(i, prompt(&t, i as u32), p, &t)).unwrap();
    }
    for (_, c) in e.run_to_completion().unwrap() {
        check_small(&serde_json::from_str(&c.text).unwrap());
    }
}

#[test]
fn a_resumed_constrained_sequence_finishes_inside_the_grammar() {
    let t = tiny(TinyModelSpec::gemma3_270m());
    let req = |e: &mut Engine, resume: Resume| {
        let p = sampled(120, 3, Some(schema(small_schema())));
        e.add_resumed(ask(0, prompt(&t, 3), p, &t), resume)
    };
    let mut e = engine(&t);
    req(&mut e, Resume::default()).unwrap();
    let whole = e.run_to_completion().unwrap().remove(&0).unwrap();
    // another replica takes over after five tokens: the same answer
    let mut e = engine(&t);
    let head = whole.tokens[..5].to_vec();
    let sent = t.lm.tokenizer.decode(&head).len();
    req(
        &mut e,
        Resume {
            tokens: head,
            text_bytes: sent,
        },
    )
    .unwrap();
    let rest = e.run_to_completion().unwrap().remove(&0).unwrap();
    assert_eq!(whole.tokens[5..], rest.tokens[..]);
    // tokens that leave the grammar cannot be resumed
    let mut e = engine(&t);
    let off = t.lm.tokenizer.encode("nope", false, false);
    let err = req(
        &mut e,
        Resume {
            tokens: off,
            text_bytes: 0,
        },
    )
    .unwrap_err();
    assert!(err.to_string().contains("grammar"), "{err}");
}

#[test]
fn a_schema_nested_past_the_limit_is_refused_saying_how_deep() {
    let t = tiny(TinyModelSpec::gemma3_270m());
    let g = Grammars::new(&t.lm.tokenizer).unwrap();
    let mut s = json!({"type": "integer"});
    for _ in 0..70 {
        s = json!({"type": "array", "items": s});
    }
    let err = g.check(&schema(s)).unwrap_err();
    assert!(err.to_string().contains("levels deep"), "{err}");
}

#[test]
fn alternatives_in_the_logprobs_of_a_constrained_answer_are_allowed_tokens() {
    let t = tiny(TinyModelSpec::gemma3_270m());
    let mut e = engine(&t);
    let p = SamplingParams {
        logprobs: true,
        top_logprobs: 5,
        grammar: Some(Grammar::Choice {
            options: vec!["ab".into(), "ac".into()],
        }),
        ..SamplingParams::greedy(8)
    };
    e.add_request(ask(0, prompt(&t, 2), p, &t)).unwrap();
    let c = e.run_to_completion().unwrap().remove(&0).unwrap();
    assert!(!c.logprobs.is_empty());
    for lp in &c.logprobs {
        assert!(lp.logprob.is_finite());
        assert!(lp.top.iter().all(|(_, l)| l.is_finite()), "{:?}", lp.top);
    }
}
