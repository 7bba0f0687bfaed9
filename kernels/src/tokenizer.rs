//! The tokenizers stored in GGUF files, matching llama.cpp's:
//!
//! - SentencePiece-style (`tokenizer.ggml.model = llama`, Gemma): scored
//!   merges and byte fallback;
//! - byte-level BPE (`gpt2`: SmolLM, Llama 3, Qwen2): the pre-tokenizer's
//!   regex splits for `tokenizer.ggml.pre`, bytes mapped to GPT-2's
//!   printable characters, then ranked merges.
//!
//! Both split special tokens out of the text first. Streaming
//! detokenization never emits half a UTF-8 character. Chat prompts are
//! rendered by the model's own template ([`crate::chat`]).

use std::collections::{BinaryHeap, HashMap};
use std::sync::Arc;

use candle_core::quantized::gguf_file::Value;

pub use crate::chat::ChatMessage;
use crate::chat::ChatTemplate;
use crate::error::{KernelError, Result};
use crate::gguf::GgufFile;

/// Token id.
pub type TokenId = u32;

/// The space marker SentencePiece uses inside pieces.
const SPACE: &str = "\u{2581}";
/// Longest vocabulary the tokenizer accepts (hostile files).
const MAX_VOCAB: usize = 1 << 22;

/// Kinds of vocabulary entries, as GGUF's `tokenizer.ggml.token_type` numbers them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenKind {
    /// An ordinary piece.
    Normal,
    /// `<unk>`.
    Unknown,
    /// A control token (`<bos>`, `<start_of_turn>`, ...), only parsed from text on request.
    Control,
    /// A user-defined piece, always split out of the text before merging.
    UserDefined,
    /// A reserved, unused slot.
    Unused,
    /// A byte-fallback token `<0xXX>`.
    Byte,
}

impl TokenKind {
    fn from_gguf(v: i32) -> Self {
        match v {
            2 => Self::Unknown,
            3 => Self::Control,
            4 => Self::UserDefined,
            5 => Self::Unused,
            6 => Self::Byte,
            _ => Self::Normal,
        }
    }
}

/// Token texts that end a generation wherever a vocabulary has them, as
/// llama.cpp's end-of-generation set takes them.
const END_OF_GENERATION: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "</s>",
    "<|eom_id|>",
    "<EOT>",
    "<|end_of_text|>",
    "<end_of_utterance>",
    "<eos>",
    // fill-in-the-middle repository and file separators
    "<|fim_repo|>",
    "<|repo_name|>",
    "<fim-repo>",
    "<REPO>",
    "<reponame>",
    "<|file_sep|>",
    "<|fim_pad|>",
];

/// How text fragments become pieces.
#[derive(Debug, Clone)]
enum Scheme {
    /// SentencePiece-style scored merges with byte fallback.
    Spm,
    /// Byte-level BPE.
    Bpe(Arc<Bpe>),
}

/// A byte-level BPE vocabulary's merges and pre-tokenizer.
struct Bpe {
    /// `"left right"` → merge rank (lower merges first).
    ranks: HashMap<String, u32>,
    /// The pre-tokenizer's regexes, applied one after another.
    pre: Vec<fancy_regex::Regex>,
    /// A word that is a whole token is taken as it is (Llama 3).
    ignore_merges: bool,
    /// Byte → its printable character.
    byte_char: [char; 256],
    /// Printable character → its byte.
    char_byte: HashMap<char, u8>,
}

impl std::fmt::Debug for Bpe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bpe")
            .field("merges", &self.ranks.len())
            .field("pre", &self.pre.len())
            .finish()
    }
}

/// GPT-2's split of contractions, letters, numbers, other symbols and spaces.
const GPT2_SPLIT: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
/// Llama 3's split: case-insensitive contractions, numbers of up to three digits.
const LLAMA3_SPLIT: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's split: Llama 3's with single digits.
const QWEN2_SPLIT: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The pre-tokenizer llama.cpp applies for a `tokenizer.ggml.pre` value:
/// its regexes, whether whole-token words skip merging, and whether BOS is
/// added by default.
fn pre_tokenizer(pre: &str) -> Result<(Vec<&'static str>, bool, bool)> {
    Ok(match pre {
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva-7b" => {
            (vec![r"\p{N}", GPT2_SPLIT], false, false)
        }
        "gpt2" | "gpt-2" | "phi-2" | "jina-es" | "jina-de" | "mpt" | "olmo" | "jais" => {
            (vec![GPT2_SPLIT], false, false)
        }
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "pixtral" => {
            (vec![LLAMA3_SPLIT], true, true)
        }
        "qwen2" | "deepseek-r1-qwen" | "megrez" | "stablelm2" => (vec![QWEN2_SPLIT], false, false),
        "" | "default" => (
            vec![
                r"[\p{P}\$\+<=>\^~\|]+",
                GPT2_SPLIT,
                r"\p{N}+",
                r"[0-9][0-9][0-9]",
            ],
            false,
            false,
        ),
        other => {
            return Err(KernelError::Tokenizer(format!(
                "unknown pre-tokenizer {other:?} (weft knows smollm, gpt2, llama3, qwen2 and their aliases)"
            )))
        }
    })
}

/// GPT-2's map of the 256 bytes to printable characters: printable Latin-1
/// bytes stand for themselves, the rest for `U+0100 + n` in order.
pub fn gpt2_byte_chars() -> [char; 256] {
    let printable = |b: u32| {
        (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b)
    };
    let mut out = ['\0'; 256];
    let mut n = 0;
    for b in 0..256u32 {
        out[b as usize] = if printable(b) {
            char::from_u32(b).unwrap_or('?')
        } else {
            n += 1;
            char::from_u32(255 + n).unwrap_or('?')
        };
    }
    out
}

impl Bpe {
    fn new(merges: &[String], pre: &str) -> Result<(Self, bool)> {
        let (exprs, ignore_merges, add_bos) = pre_tokenizer(pre)?;
        let pre = exprs
            .iter()
            .map(|e| {
                fancy_regex::Regex::new(e)
                    .map_err(|err| KernelError::Tokenizer(format!("pre-tokenizer {e:?}: {err}")))
            })
            .collect::<Result<_>>()?;
        let mut ranks = HashMap::with_capacity(merges.len());
        for (i, m) in merges.iter().enumerate() {
            if m.split_once(' ').is_none() {
                return Err(KernelError::Tokenizer(format!(
                    "merge {i} ({m:?}) is not two pieces"
                )));
            }
            ranks.entry(m.clone()).or_insert(i as u32);
        }
        let byte_char = gpt2_byte_chars();
        let char_byte = byte_char
            .iter()
            .enumerate()
            .map(|(b, c)| (*c, b as u8))
            .collect();
        Ok((
            Self {
                ranks,
                pre,
                ignore_merges,
                byte_char,
                char_byte,
            },
            add_bos,
        ))
    }

    /// The pre-tokenizer's words of `text`: each regex splits every
    /// fragment so far into its matches and the text between them.
    fn words<'a>(&self, text: &'a str) -> Vec<&'a str> {
        let mut frags = vec![text];
        for re in &self.pre {
            let mut next = Vec::with_capacity(frags.len() * 2);
            for f in frags {
                let mut last = 0;
                for m in re.find_iter(f) {
                    let Ok(m) = m else { break };
                    if m.start() > last {
                        next.push(&f[last..m.start()]);
                    }
                    if m.end() > m.start() {
                        next.push(m.as_str());
                    }
                    last = m.end();
                }
                if last < f.len() {
                    next.push(&f[last..]);
                }
            }
            frags = next;
        }
        frags
    }

    /// The word's bytes as GPT-2's printable characters.
    fn byte_encode(&self, word: &str) -> String {
        word.bytes().map(|b| self.byte_char[b as usize]).collect()
    }
}

/// The tokenizer of one model.
#[derive(Debug, Clone)]
pub struct Tokenizer {
    pieces: Vec<String>,
    scores: Vec<f32>,
    kinds: Vec<TokenKind>,
    index: HashMap<String, TokenId>,
    byte_tokens: [TokenId; 256],
    /// Control, user-defined and unknown tokens, longest first.
    specials: Vec<TokenId>,
    bos: TokenId,
    eos: TokenId,
    add_bos: bool,
    /// Tokens that end a generation.
    stops: Vec<TokenId>,
    scheme: Scheme,
    /// The model's chat template; its compile error when it has a broken one.
    chat: Option<std::result::Result<Arc<ChatTemplate>, String>>,
}

impl Tokenizer {
    /// Reads the tokenizer (and the chat template, if any) from GGUF metadata.
    pub fn from_gguf(f: &GgufFile) -> Result<Self> {
        let model = f.meta_str("tokenizer.ggml.model")?;
        let arr = |k: &str| -> Result<&Vec<Value>> {
            match f.meta_req(k)? {
                Value::Array(a) => Ok(a),
                _ => Err(KernelError::Tokenizer(format!("{k} is not an array"))),
            }
        };
        let strings = |k: &str| -> Result<Vec<String>> {
            arr(k)?
                .iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s.clone()),
                    _ => Err(KernelError::Tokenizer(format!(
                        "an entry of {k} is not a string"
                    ))),
                })
                .collect()
        };
        let pieces = strings("tokenizer.ggml.tokens")?;
        let n = pieces.len();
        let scores: Vec<f32> = match f.meta("tokenizer.ggml.scores") {
            Some(Value::Array(a)) => a.iter().map(|v| v.to_f32().unwrap_or(0.0)).collect(),
            _ => vec![0.0; n],
        };
        let kinds: Vec<TokenKind> = match f.meta("tokenizer.ggml.token_type") {
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| TokenKind::from_gguf(v.to_i32().unwrap_or(1)))
                .collect(),
            _ => vec![TokenKind::Normal; n],
        };
        let id = |k: &str, default: u32| -> u32 {
            f.meta(k).and_then(|v| v.to_u32().ok()).unwrap_or(default)
        };
        let add_bos_key = f
            .meta("tokenizer.ggml.add_bos_token")
            .and_then(|v| v.to_bool().ok());
        let mut tok = match model {
            "llama" => Self::new(
                pieces,
                scores,
                kinds,
                id("tokenizer.ggml.bos_token_id", 2),
                id("tokenizer.ggml.eos_token_id", 1),
                add_bos_key.unwrap_or(true),
            )?,
            "gpt2" => {
                let merges = strings("tokenizer.ggml.merges")?;
                let pre = match f.meta("tokenizer.ggml.pre") {
                    Some(Value::String(p)) => p.as_str(),
                    _ => "default",
                };
                Self::new_bpe(
                    pieces,
                    kinds,
                    &merges,
                    pre,
                    id("tokenizer.ggml.bos_token_id", 11),
                    id("tokenizer.ggml.eos_token_id", 11),
                    add_bos_key,
                )?
            }
            other => {
                return Err(KernelError::Tokenizer(format!(
                    "tokenizer model {other:?} is not supported (weft runs \"llama\" and \"gpt2\")"
                )))
            }
        };
        if let Some(Value::String(src)) = f.meta("tokenizer.chat_template") {
            tok = tok.with_chat_template(src);
        }
        Ok(tok)
    }

    /// Builds a SentencePiece-style tokenizer from its vocabulary.
    pub fn new(
        pieces: Vec<String>,
        scores: Vec<f32>,
        kinds: Vec<TokenKind>,
        bos: TokenId,
        eos: TokenId,
        add_bos: bool,
    ) -> Result<Self> {
        Self::build(pieces, scores, kinds, bos, eos, add_bos, Scheme::Spm)
    }

    /// Builds a byte-level BPE tokenizer from its vocabulary, its merges
    /// (`"left right"`, best first) and its pre-tokenizer's name;
    /// `add_bos` as the file says (else the pre-tokenizer's default).
    pub fn new_bpe(
        pieces: Vec<String>,
        kinds: Vec<TokenKind>,
        merges: &[String],
        pre: &str,
        bos: TokenId,
        eos: TokenId,
        add_bos: Option<bool>,
    ) -> Result<Self> {
        let (bpe, default_bos) = Bpe::new(merges, pre)?;
        let scores = vec![0.0; pieces.len()];
        Self::build(
            pieces,
            scores,
            kinds,
            bos,
            eos,
            add_bos.unwrap_or(default_bos),
            Scheme::Bpe(Arc::new(bpe)),
        )
    }

    /// The tokenizer with a chat template; a template that does not compile
    /// is kept as its error, so completions still work and chats say why not.
    pub fn with_chat_template(mut self, source: &str) -> Self {
        let text = |id: TokenId| self.pieces[id as usize].clone();
        self.chat = Some(
            ChatTemplate::new(source, &text(self.bos), &text(self.eos))
                .map(Arc::new)
                .map_err(|e| e.to_string()),
        );
        self
    }

    fn build(
        pieces: Vec<String>,
        scores: Vec<f32>,
        mut kinds: Vec<TokenKind>,
        bos: TokenId,
        eos: TokenId,
        add_bos: bool,
        scheme: Scheme,
    ) -> Result<Self> {
        let n = pieces.len();
        if n == 0 || n > MAX_VOCAB || scores.len() != n || kinds.len() != n {
            return Err(KernelError::Tokenizer(format!(
                "vocabulary of {n} pieces with {} scores and {} types",
                scores.len(),
                kinds.len()
            )));
        }
        if bos as usize >= n || eos as usize >= n {
            return Err(KernelError::Tokenizer(format!(
                "bos {bos} or eos {eos} outside the vocabulary of {n}"
            )));
        }
        let mut index = HashMap::with_capacity(n);
        for (i, p) in pieces.iter().enumerate() {
            // the first id wins, as in llama.cpp
            index.entry(p.clone()).or_insert(i as TokenId);
        }
        let mut byte_tokens = [u32::MAX; 256];
        for (b, slot) in byte_tokens.iter_mut().enumerate() {
            let piece = match &scheme {
                Scheme::Spm => format!("<0x{b:02X}>"),
                Scheme::Bpe(bpe) => bpe.byte_char[b].to_string(),
            };
            if let Some(&id) = index.get(&piece) {
                *slot = id;
            }
        }
        // end-of-generation tokens are control tokens, as llama.cpp makes them
        let mut stops = vec![eos];
        for text in END_OF_GENERATION {
            if let Some(&id) = index.get(*text) {
                kinds[id as usize] = TokenKind::Control;
                if !stops.contains(&id) {
                    stops.push(id);
                }
            }
        }
        let mut specials: Vec<TokenId> = (0..n as TokenId)
            .filter(|&i| {
                matches!(
                    kinds[i as usize],
                    TokenKind::Control | TokenKind::UserDefined | TokenKind::Unknown
                ) && !pieces[i as usize].is_empty()
            })
            .collect();
        specials.sort_by(|a, b| {
            pieces[*b as usize]
                .len()
                .cmp(&pieces[*a as usize].len())
                .then(a.cmp(b))
        });
        Ok(Self {
            pieces,
            scores,
            kinds,
            index,
            byte_tokens,
            specials,
            bos,
            eos,
            add_bos,
            stops,
            scheme,
            chat: None,
        })
    }

    /// Vocabulary size.
    pub fn vocab_size(&self) -> usize {
        self.pieces.len()
    }

    /// Beginning-of-sequence token.
    pub fn bos(&self) -> TokenId {
        self.bos
    }

    /// End-of-sequence token.
    pub fn eos(&self) -> TokenId {
        self.eos
    }

    /// Tokens that end a generation by default: EOS and the vocabulary's
    /// end-of-turn tokens (`<end_of_turn>`, `<|im_end|>`, `<|eot_id|>`, ...).
    pub fn stop_tokens(&self) -> Vec<TokenId> {
        self.stops.clone()
    }

    /// Whether the vocabulary is byte-level BPE.
    pub fn is_byte_level(&self) -> bool {
        matches!(self.scheme, Scheme::Bpe(_))
    }

    /// The model's chat template.
    pub fn chat_template(&self) -> Result<&ChatTemplate> {
        match &self.chat {
            None => Err(KernelError::NoChatTemplate),
            Some(Ok(t)) => Ok(t),
            Some(Err(e)) => Err(KernelError::ChatTemplate(e.clone())),
        }
    }

    /// The piece of a token as stored.
    pub fn piece(&self, id: TokenId) -> Option<&str> {
        self.pieces.get(id as usize).map(|s| s.as_str())
    }

    /// The id of a piece.
    pub fn token_id(&self, piece: &str) -> Option<TokenId> {
        self.index.get(piece).copied()
    }

    /// Encodes `text`; `add_bos` prepends BOS when the model asks for it;
    /// `parse_special` also recognizes control tokens written in the text.
    pub fn encode(&self, text: &str, add_bos: bool, parse_special: bool) -> Vec<TokenId> {
        let mut out = Vec::new();
        if add_bos && self.add_bos {
            out.push(self.bos);
        }
        for frag in self.partition(text, parse_special) {
            match frag {
                Fragment::Token(id) => out.push(id),
                Fragment::Text(t) => self.encode_text(t, &mut out),
            }
        }
        out
    }

    /// Encodes text that holds no special token.
    fn encode_text(&self, text: &str, out: &mut Vec<TokenId>) {
        match &self.scheme {
            Scheme::Spm => self.encode_piece(&text.replace(' ', SPACE), out),
            Scheme::Bpe(bpe) => {
                for word in bpe.words(text) {
                    self.encode_bpe_word(bpe, &bpe.byte_encode(word), out);
                }
            }
        }
    }

    /// Ranked merges over one byte-encoded word: the adjacent pair with the
    /// lowest rank merges first (the leftmost on ties), until no pair has a
    /// rank; a symbol outside the vocabulary goes out as its characters.
    fn encode_bpe_word(&self, bpe: &Bpe, word: &str, out: &mut Vec<TokenId>) {
        if word.is_empty() {
            return;
        }
        if bpe.ignore_merges {
            if let Some(&id) = self.index.get(word) {
                out.push(id);
                return;
            }
        }
        let mut syms = Sym::chars_of(word);
        // (rank, left, right, bytes): a min-heap through Reverse
        let mut heap: BinaryHeap<std::cmp::Reverse<(u32, usize, usize, usize)>> = BinaryHeap::new();
        let mut key = String::new();
        let mut try_add = |heap: &mut BinaryHeap<_>, syms: &[Sym], left: usize, right: usize| {
            let (l, r) = (syms[left], syms[right]);
            key.clear();
            key.push_str(&word[l.start..l.start + l.len]);
            key.push(' ');
            key.push_str(&word[r.start..r.start + r.len]);
            if let Some(&rank) = bpe.ranks.get(&key) {
                heap.push(std::cmp::Reverse((rank, left, right, l.len + r.len)));
            }
        };
        for i in 1..syms.len() {
            try_add(&mut heap, &syms, i - 1, i);
        }
        while let Some(std::cmp::Reverse((_, left, right, len))) = heap.pop() {
            let (l, r) = (syms[left], syms[right]);
            if l.len == 0 || r.len == 0 || l.len + r.len != len {
                continue; // stale
            }
            syms[left].len += r.len;
            syms[left].next = r.next;
            syms[right].len = 0;
            if let Some(n) = r.next {
                syms[n].prev = Some(left);
            }
            if let Some(p) = syms[left].prev {
                try_add(&mut heap, &syms, p, left);
            }
            if let Some(n) = syms[left].next {
                try_add(&mut heap, &syms, left, n);
            }
        }
        let mut i = Some(0);
        while let Some(ix) = i {
            let s = &word[syms[ix].start..syms[ix].start + syms[ix].len];
            match self.index.get(s) {
                Some(&id) => out.push(id),
                None => {
                    for ch in s.chars() {
                        let mut buf = [0u8; 4];
                        if let Some(&id) = self.index.get(&*ch.encode_utf8(&mut buf)) {
                            out.push(id);
                        }
                    }
                }
            }
            i = syms[ix].next;
        }
    }

    /// Splits out special tokens, longest first, as llama.cpp does.
    fn partition<'a>(&self, text: &'a str, parse_special: bool) -> Vec<Fragment<'a>> {
        let mut frags = vec![Fragment::Text(text)];
        if text.is_empty() {
            return Vec::new();
        }
        for &id in &self.specials {
            let kind = self.kinds[id as usize];
            if !parse_special && matches!(kind, TokenKind::Control | TokenKind::Unknown) {
                continue;
            }
            let piece = self.pieces[id as usize].as_str();
            let mut next = Vec::with_capacity(frags.len());
            for f in frags {
                let Fragment::Text(mut rest) = f else {
                    next.push(f);
                    continue;
                };
                while let Some(at) = rest.find(piece) {
                    if at > 0 {
                        next.push(Fragment::Text(&rest[..at]));
                    }
                    next.push(Fragment::Token(id));
                    rest = &rest[at + piece.len()..];
                }
                if !rest.is_empty() {
                    next.push(Fragment::Text(rest));
                }
            }
            frags = next;
        }
        frags
    }

    /// SentencePiece BPE over one text fragment: merge the best-scored adjacent
    /// pair until none is in the vocabulary, then emit pieces (bytes for the rest).
    fn encode_piece(&self, text: &str, out: &mut Vec<TokenId>) {
        if text.is_empty() {
            return;
        }
        let mut syms = Sym::chars_of(text);
        #[derive(PartialEq)]
        struct Bigram {
            score: f32,
            left: usize,
            right: usize,
            len: usize,
        }
        impl Eq for Bigram {}
        impl PartialOrd for Bigram {
            fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
                Some(self.cmp(o))
            }
        }
        impl Ord for Bigram {
            fn cmp(&self, o: &Self) -> std::cmp::Ordering {
                // highest score first; on ties the leftmost pair
                self.score
                    .total_cmp(&o.score)
                    .then_with(|| o.left.cmp(&self.left))
            }
        }
        let mut heap = BinaryHeap::new();
        let try_add = |heap: &mut BinaryHeap<Bigram>, syms: &[Sym], left: usize, right: usize| {
            let (l, r) = (syms[left], syms[right]);
            let s = &text[l.start..r.start + r.len];
            if let Some(&id) = self.index.get(s) {
                heap.push(Bigram {
                    score: self.scores[id as usize],
                    left,
                    right,
                    len: s.len(),
                });
            }
        };
        for i in 1..syms.len() {
            try_add(&mut heap, &syms, i - 1, i);
        }
        while let Some(b) = heap.pop() {
            let (l, r) = (syms[b.left], syms[b.right]);
            if l.len == 0 || r.len == 0 || l.len + r.len != b.len {
                continue; // stale
            }
            syms[b.left].len += r.len;
            syms[b.left].next = r.next;
            syms[b.right].len = 0;
            if let Some(n) = r.next {
                syms[n].prev = Some(b.left);
            }
            if let Some(p) = syms[b.left].prev {
                try_add(&mut heap, &syms, p, b.left);
            }
            if let Some(n) = syms[b.left].next {
                try_add(&mut heap, &syms, b.left, n);
            }
        }
        // Every merge produced a vocabulary piece, so a final symbol is either a
        // piece or a single character the vocabulary lacks: emit that as bytes.
        let mut i = Some(0);
        while let Some(ix) = i {
            let s = &text[syms[ix].start..syms[ix].start + syms[ix].len];
            match self.index.get(s) {
                Some(&id) => out.push(id),
                None => out.extend(
                    s.bytes()
                        .map(|b| self.byte_tokens[b as usize])
                        .filter(|&id| id != u32::MAX),
                ),
            }
            i = syms[ix].next;
        }
    }

    /// The bytes of one token as it appears in decoded text. Control tokens
    /// decode to nothing unless `special` is set.
    pub fn token_bytes(&self, id: TokenId, special: bool) -> Vec<u8> {
        let Some(piece) = self.pieces.get(id as usize) else {
            return Vec::new();
        };
        match self.kinds[id as usize] {
            TokenKind::Byte => parse_byte_piece(piece).map_or_else(Vec::new, |b| vec![b]),
            TokenKind::Control | TokenKind::Unknown | TokenKind::Unused => {
                if special {
                    piece.as_bytes().to_vec()
                } else {
                    Vec::new()
                }
            }
            TokenKind::UserDefined => piece.as_bytes().to_vec(),
            TokenKind::Normal => match &self.scheme {
                Scheme::Spm => piece.replace(SPACE, " ").into_bytes(),
                Scheme::Bpe(bpe) => {
                    let mut out = Vec::with_capacity(piece.len());
                    for ch in piece.chars() {
                        match bpe.char_byte.get(&ch) {
                            Some(&b) => out.push(b),
                            None => {
                                let mut buf = [0u8; 4];
                                out.extend_from_slice(ch.encode_utf8(&mut buf).as_bytes());
                            }
                        }
                    }
                    out
                }
            },
        }
    }

    /// Decodes tokens to text (control tokens left out); invalid UTF-8 is replaced.
    pub fn decode(&self, ids: &[TokenId]) -> String {
        let bytes: Vec<u8> = ids
            .iter()
            .flat_map(|&i| self.token_bytes(i, false))
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// The chat template's text for `messages` (and the request's `tools`).
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        tools: Option<&serde_json::Value>,
    ) -> Result<String> {
        self.chat_template()?.render(messages, tools)
    }

    /// Whether `text` holds the text of a special token.
    pub fn holds_special_text(&self, text: &str) -> bool {
        self.partition(text, true)
            .iter()
            .any(|f| matches!(f, Fragment::Token(_)))
    }

    /// Encodes chat messages through the model's template. Only the
    /// template's own text is parsed for special tokens: a message that
    /// contains `<|im_start|>` is that text, not a turn of the template.
    pub fn encode_chat(
        &self,
        messages: &[ChatMessage],
        tools: Option<&serde_json::Value>,
    ) -> Result<Vec<TokenId>> {
        let segments = self
            .chat_template()?
            .segments(messages, tools, |t| self.holds_special_text(t))?;
        // fragments of every segment, the template's with special tokens
        // parsed and the messages' without; adjacent text joined, so text
        // without special tokens tokenizes as the whole rendering would
        let mut frags: Vec<(Option<TokenId>, String)> = Vec::new();
        for (text, template) in segments {
            for f in self.partition(&text, template) {
                match (f, frags.last_mut()) {
                    (Fragment::Text(t), Some((None, prev))) => prev.push_str(t),
                    (Fragment::Text(t), _) => frags.push((None, t.to_string())),
                    (Fragment::Token(id), _) => frags.push((Some(id), String::new())),
                }
            }
        }
        let mut out = Vec::new();
        for (id, text) in frags {
            match id {
                Some(id) => out.push(id),
                None => self.encode_text(&text, &mut out),
            }
        }
        Ok(out)
    }
}

/// A symbol of a merge: a byte range of the text, linked to its neighbours.
#[derive(Clone, Copy)]
struct Sym {
    start: usize,
    len: usize,
    prev: Option<usize>,
    next: Option<usize>,
}

impl Sym {
    /// One symbol per character of `text`, linked in order.
    fn chars_of(text: &str) -> Vec<Sym> {
        let mut syms: Vec<Sym> = Vec::new();
        for (i, (start, ch)) in text.char_indices().enumerate() {
            syms.push(Sym {
                start,
                len: ch.len_utf8(),
                prev: i.checked_sub(1),
                next: None,
            });
            if i > 0 {
                syms[i - 1].next = Some(i);
            }
        }
        syms
    }
}

enum Fragment<'a> {
    Text(&'a str),
    Token(TokenId),
}

fn parse_byte_piece(p: &str) -> Option<u8> {
    let hex = p.strip_prefix("<0x")?.strip_suffix('>')?;
    u8::from_str_radix(hex, 16).ok()
}

/// Turns a token stream into text pieces, holding back bytes until they form
/// whole UTF-8 characters.
#[derive(Debug, Default, Clone)]
pub struct StreamDecoder {
    pending: Vec<u8>,
}

impl StreamDecoder {
    /// A decoder with nothing pending.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one token; returns the text that is now complete (maybe empty).
    pub fn push(&mut self, tok: &Tokenizer, id: TokenId) -> String {
        self.pending.extend(tok.token_bytes(id, false));
        self.take_complete()
    }

    fn take_complete(&mut self) -> String {
        match std::str::from_utf8(&self.pending) {
            Ok(s) => {
                let s = s.to_string();
                self.pending.clear();
                s
            }
            Err(e) => {
                let valid = e.valid_up_to();
                match e.error_len() {
                    // an incomplete character at the end: keep it for later
                    None => {
                        let s = String::from_utf8_lossy(&self.pending[..valid]).into_owned();
                        self.pending.drain(..valid);
                        s
                    }
                    // a byte that can never start a character: replace it and go on
                    Some(bad) => {
                        let mut s =
                            String::from_utf8_lossy(&self.pending[..valid + bad]).into_owned();
                        self.pending.drain(..valid + bad);
                        s.push_str(&self.take_complete());
                        s
                    }
                }
            }
        }
    }

    /// Ends the stream: whatever is pending, with invalid bytes replaced.
    pub fn finish(&mut self) -> String {
        let s = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        s
    }
}
