//! Constrained decoding: a per-sequence grammar that masks the logits at
//! every step, so only tokens that keep the output inside the grammar can be
//! sampled. Structured outputs (`response_format`) and tool calls are built
//! on it.
//!
//! The grammar engine is `llguidance` (the one llama.cpp and vLLM use):
//! it compiles JSON Schemas, regular expressions and Lark grammars (with
//! JSON Schemas embedded in them, which tool calls need) into an Earley
//! parser over a lexer of derivatives, and computes a step's mask by
//! walking the tokenizer's byte trie, so it works for any vocabulary:
//! SentencePiece and byte-level BPE alike, since the trie holds each
//! token's decoded bytes. `outlines-core` was the alternative; it compiles
//! only regular languages (a JSON Schema becomes one regular expression,
//! so recursive schemas are cut at a depth) and builds an index over the
//! whole vocabulary per schema, which is slower to compile for every new
//! schema an agent sends.
//!
//! [`Grammars`] holds the trie of one tokenizer and a cache of compiled
//! grammars keyed by the hash of their description ([`Grammar::key`]), so
//! a schema sent again costs no compile. [`Constraint`] is one sequence's
//! parser state.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{ApproximateTokEnv, TokRxInfo, TokTrie};
use llguidance::{Matcher, ParserFactory, TokenParser};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::error::{KernelError, Result};
use crate::tokenizer::{TokenId, Tokenizer};

/// Compiled grammars kept per tokenizer.
const CACHE_ENTRIES: usize = 128;
/// Longest description accepted (a schema or grammar is request input).
pub const MAX_GRAMMAR_BYTES: usize = 256 * 1024;
/// Deepest nesting of a JSON Schema accepted: the grammar travels to the
/// worker inside a message that nests it further, within serde_json's
/// limit of 128.
pub const MAX_SCHEMA_DEPTH: usize = 64;
/// Longest token the trie takes; a longer one (a hostile vocabulary) is
/// never allowed under a grammar.
const MAX_TOKEN_BYTES: usize = 1024;

/// What a constrained sequence's output must match.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Grammar {
    /// JSON matching a JSON Schema. With `strict`, every keyword must be
    /// enforced (a keyword the compiler does not know is an error);
    /// without, unknown keywords and formats are ignored.
    JsonSchema {
        /// The schema.
        schema: Value,
        /// Enforce the whole schema or fail.
        #[serde(default)]
        strict: bool,
    },
    /// Any JSON object.
    JsonObject,
    /// Text matching a regular expression (Rust `regex` syntax, anchored
    /// at both ends).
    Regex {
        /// The expression.
        pattern: String,
    },
    /// Exactly one of these strings.
    Choice {
        /// The strings.
        options: Vec<String>,
    },
    /// A Lark grammar as llguidance reads it (`%json { ... }` embeds a
    /// JSON Schema).
    Lark {
        /// The grammar.
        grammar: String,
    },
}

/// JSON as constrained output writes it: one space after `:` and `,`, no
/// other whitespace, so a model cannot pad its answer to the length limit.
fn json_style(mut schema: Value, lenient: bool) -> Value {
    if let Value::Object(m) = &mut schema {
        m.insert(
            "x-guidance".into(),
            json!({
                "whitespace_flexible": false,
                "item_separator": ", ",
                "key_separator": ": ",
                "lenient": lenient,
            }),
        );
    }
    schema
}

impl Grammar {
    /// The grammar's name, for errors, logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::JsonSchema { .. } => "json_schema",
            Self::JsonObject => "json_object",
            Self::Regex { .. } => "regex",
            Self::Choice { .. } => "choice",
            Self::Lark { .. } => "lark",
        }
    }

    /// The hash of its description: the compile cache's key.
    pub fn key(&self) -> [u8; 32] {
        let text = serde_json::to_vec(self).unwrap_or_default();
        Sha256::digest(&text).into()
    }

    /// The schema a JSON grammar embeds in Lark (`%json {...}`), styled
    /// as constrained output writes JSON.
    pub fn embedded_json(schema: &Value, strict: bool) -> String {
        json_style(schema.clone(), !strict).to_string()
    }

    fn to_llguidance(&self) -> Result<TopLevelGrammar> {
        Ok(match self {
            Self::JsonSchema { schema, strict } => {
                if !schema.is_object() && !schema.is_boolean() {
                    return Err(KernelError::Grammar(
                        "a JSON Schema is an object (or true/false)".into(),
                    ));
                }
                let schema = if schema == &Value::Bool(true) {
                    json!({})
                } else {
                    schema.clone()
                };
                TopLevelGrammar::from_json_schema(json_style(schema, !strict))
            }
            Self::JsonObject => {
                TopLevelGrammar::from_json_schema(json_style(json!({"type": "object"}), true))
            }
            Self::Regex { pattern } => {
                // llguidance's own check gives a terse message; this one
                // says where the expression is wrong
                regex_syntax::Parser::new()
                    .parse(pattern)
                    .map_err(|e| KernelError::Grammar(format!("invalid regex: {e}")))?;
                TopLevelGrammar::from_regex(pattern)
            }
            Self::Choice { options } => {
                if options.is_empty() || options.iter().any(String::is_empty) {
                    return Err(KernelError::Grammar(
                        "a choice needs at least one non-empty string".into(),
                    ));
                }
                let alts: Vec<String> = options.iter().map(|o| regex_syntax::escape(o)).collect();
                TopLevelGrammar::from_regex(&format!("(?:{})", alts.join("|")))
            }
            Self::Lark { grammar } => TopLevelGrammar::from_lark(grammar.clone()),
        })
    }
}

/// How deep `v` nests (a scalar is 1), without recursion.
fn depth(v: &Value) -> usize {
    let mut deepest = 0;
    let mut stack = vec![(v, 1usize)];
    while let Some((v, d)) = stack.pop() {
        deepest = deepest.max(d);
        match v {
            Value::Array(a) => stack.extend(a.iter().map(|x| (x, d + 1))),
            Value::Object(o) => stack.extend(o.values().map(|x| (x, d + 1))),
            _ => {}
        }
    }
    deepest
}

/// Counters of a [`Grammars`].
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct GrammarStats {
    /// Grammars compiled (cache misses).
    pub compiled: u64,
    /// Compiles saved by the cache.
    pub cache_hits: u64,
    /// Grammars refused (invalid, or beyond what the compiler supports).
    pub refused: u64,
    /// Seconds spent compiling.
    pub compile_seconds: f64,
}

struct Cache {
    parsers: HashMap<[u8; 32], TokenParser>,
    order: VecDeque<[u8; 32]>,
    stats: GrammarStats,
}

/// The grammar compiler of one tokenizer, with its compile cache.
pub struct Grammars {
    factory: ParserFactory,
    cache: Mutex<Cache>,
}

impl std::fmt::Debug for Grammars {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grammars").finish_non_exhaustive()
    }
}

impl Grammars {
    /// A compiler over `tokenizer`'s vocabulary: each token as the bytes it
    /// decodes to; control tokens as their special text (never matched by a
    /// grammar's text); its stop tokens end a grammar that is complete.
    pub fn new(tokenizer: &Tokenizer) -> Result<Self> {
        let n = tokenizer.vocab_size();
        let words: Vec<Vec<u8>> = (0..n as TokenId)
            .map(|id| {
                let text = tokenizer.token_bytes(id, false);
                let mut w = if text.is_empty() {
                    // llguidance marks special tokens with a leading 0xFF
                    let mut s = vec![TokTrie::SPECIAL_TOKEN_MARKER];
                    s.extend(tokenizer.token_bytes(id, true));
                    s
                } else {
                    text
                };
                if w.len() > MAX_TOKEN_BYTES {
                    w.clear();
                }
                w
            })
            .collect();
        let stops = tokenizer.stop_tokens();
        let eos = stops.first().copied().unwrap_or(tokenizer.eos());
        let info = TokRxInfo::new(n as u32, eos);
        let trie = TokTrie::from(&info, &words).with_eos_tokens(&stops);
        let env: llguidance::toktrie::TokEnv = Arc::new(ApproximateTokEnv::new(trie));
        let mut factory = ParserFactory::new_simple(&env)
            .map_err(|e| KernelError::Grammar(format!("cannot index the vocabulary: {e}")))?;
        factory.quiet();
        Ok(Self {
            factory,
            cache: Mutex::new(Cache {
                parsers: HashMap::new(),
                order: VecDeque::new(),
                stats: GrammarStats::default(),
            }),
        })
    }

    /// A sequence's constraint for `g`: compiled, or cloned from the cache.
    /// An invalid grammar, or one the compiler cannot enforce, is a
    /// [`KernelError::Grammar`] saying why.
    pub fn compile(&self, g: &Grammar) -> Result<Constraint> {
        let key = g.key();
        {
            let mut c = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(p) = c.parsers.get(&key).cloned() {
                c.stats.cache_hits += 1;
                return Ok(Constraint::new(p));
            }
        }
        let refused = |why: String| {
            let mut c = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            c.stats.refused += 1;
            KernelError::Grammar(why)
        };
        if let Grammar::JsonSchema { schema, .. } = g {
            let d = depth(schema);
            if d > MAX_SCHEMA_DEPTH {
                return Err(refused(format!(
                    "the JSON Schema nests {d} levels deep; at most {MAX_SCHEMA_DEPTH} are accepted"
                )));
            }
        }
        let size = serde_json::to_vec(g).map_or(0, |v| v.len());
        if size > MAX_GRAMMAR_BYTES {
            return Err(refused(format!(
                "the {} is {size} bytes; at most {MAX_GRAMMAR_BYTES} are accepted",
                g.kind()
            )));
        }
        let start = Instant::now();
        let top = g.to_llguidance().map_err(|e| refused(e.to_string()))?;
        let parser = llguidance::panic_utils::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.factory.create_parser(top)
        }))
        .map_err(|e| refused(format!("the {} cannot be compiled: {e}", g.kind())))?;
        // a parser whose first mask fails is refused here, not mid-answer
        let mut probe = Matcher::new(Ok(parser.clone()));
        if let Err(e) = probe.compute_mask() {
            return Err(refused(format!("the {} cannot be compiled: {e}", g.kind())));
        }
        let mut c = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        c.stats.compiled += 1;
        c.stats.compile_seconds += start.elapsed().as_secs_f64();
        if c.parsers.insert(key, parser.clone()).is_none() {
            c.order.push_back(key);
        }
        while c.order.len() > CACHE_ENTRIES {
            if let Some(old) = c.order.pop_front() {
                c.parsers.remove(&old);
            }
        }
        Ok(Constraint::new(parser))
    }

    /// Checks that `g` compiles (and caches it), without a sequence.
    pub fn check(&self, g: &Grammar) -> Result<()> {
        self.compile(g).map(drop)
    }

    /// Counters since start.
    pub fn stats(&self) -> GrammarStats {
        self.cache.lock().unwrap_or_else(|p| p.into_inner()).stats
    }
}

/// One sequence's place in its grammar.
pub struct Constraint {
    matcher: Matcher,
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Constraint")
            .field("stopped", &self.matcher.is_stopped())
            .finish()
    }
}

impl Constraint {
    fn new(parser: TokenParser) -> Self {
        Self {
            matcher: Matcher::new(Ok(parser)),
        }
    }

    /// The tokens the grammar allows next (the costly part of a step's
    /// mask: the engine computes it while the model runs).
    pub fn allowed(&mut self) -> Result<Allowed> {
        let set = self
            .matcher
            .compute_mask()
            .map_err(|e| KernelError::Grammar(format!("the grammar failed: {e}")))?;
        let may_end = self.matcher.is_accepting().unwrap_or(false);
        Ok(Allowed { set, may_end })
    }

    /// Sets every logit the grammar forbids next to −∞ (see
    /// [`Allowed::apply`]).
    pub fn mask(&mut self, logits: &mut [f32], stops: &[TokenId]) -> Result<()> {
        self.allowed()?.apply(logits, stops)
    }

    /// Advances past a generated token (one [`Constraint::allowed`] allowed).
    pub fn commit(&mut self, tok: TokenId) -> Result<()> {
        self.matcher
            .consume_token(tok)
            .map_err(|e| KernelError::Grammar(format!("token {tok} breaks the grammar: {e}")))
    }

    /// Whether the output is complete and nothing may follow.
    pub fn is_finished(&self) -> bool {
        self.matcher.is_stopped()
    }

    /// Whether the output so far may end here.
    pub fn may_end(&mut self) -> bool {
        self.matcher.is_accepting().unwrap_or(false)
    }
}

/// The tokens one sequence's grammar allows at one step.
#[derive(Debug, Clone)]
pub struct Allowed {
    set: llguidance::toktrie::SimpleVob,
    may_end: bool,
}

impl Allowed {
    /// Sets every logit not allowed to −∞. `stops` (the sequence's stop
    /// tokens) stay allowed only where the output may end. Fails when
    /// nothing is allowed.
    pub fn apply(&self, logits: &mut [f32], stops: &[TokenId]) -> Result<()> {
        let kept: Vec<(usize, f32)> = stops
            .iter()
            .map(|&t| t as usize)
            .filter(|&t| t < logits.len())
            .map(|t| (t, logits[t]))
            .collect();
        // 32 tokens to a word of the set: most words are all-allowed or
        // all-forbidden, and a vocabulary of 262k tokens is 8k words
        let words = self.set.as_slice();
        for (w, chunk) in logits.chunks_mut(32).enumerate() {
            match words.get(w).copied().unwrap_or(0) {
                u32::MAX => {}
                0 => chunk.fill(f32::NEG_INFINITY),
                bits => {
                    for (b, l) in chunk.iter_mut().enumerate() {
                        if (bits >> b) & 1 == 0 {
                            *l = f32::NEG_INFINITY;
                        }
                    }
                }
            }
        }
        for (t, l) in kept {
            logits[t] = if self.may_end { l } else { f32::NEG_INFINITY };
        }
        if !logits.iter().any(|&l| l > f32::NEG_INFINITY) {
            return Err(KernelError::Grammar(
                "the grammar allows no token of this vocabulary here".into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_differs_with_the_schema_and_not_with_a_copy() {
        let a = Grammar::JsonSchema {
            schema: json!({"type": "object"}),
            strict: true,
        };
        let b = Grammar::JsonSchema {
            schema: json!({"type": "array"}),
            strict: true,
        };
        assert_eq!(a.key(), a.clone().key());
        assert_ne!(a.key(), b.key());
    }
}
