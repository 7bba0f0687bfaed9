//! The SentencePiece-style tokenizer stored in a GGUF (`tokenizer.ggml.model =
//! llama`): scored merges, byte fallback, and user-defined tokens split out of
//! the text first, matching llama.cpp's SPM tokenizer; streaming
//! detokenization that never emits half a UTF-8 character; and the Gemma chat
//! template.

use std::collections::{BinaryHeap, HashMap};

use candle_core::quantized::gguf_file::Value;

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

/// A chat message for the template.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant` (`model` is taken as `assistant`).
    pub role: String,
    /// The text.
    pub content: String,
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
    end_of_turn: Option<TokenId>,
}

impl Tokenizer {
    /// Reads the tokenizer from GGUF metadata.
    pub fn from_gguf(f: &GgufFile) -> Result<Self> {
        let model = f.meta_str("tokenizer.ggml.model")?;
        if model != "llama" {
            return Err(KernelError::Tokenizer(format!(
                "tokenizer model {model:?} is not supported (need \"llama\")"
            )));
        }
        let arr = |k: &str| -> Result<&Vec<Value>> {
            match f.meta_req(k)? {
                Value::Array(a) => Ok(a),
                _ => Err(KernelError::Tokenizer(format!("{k} is not an array"))),
            }
        };
        let pieces: Vec<String> = arr("tokenizer.ggml.tokens")?
            .iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.clone()),
                _ => Err(KernelError::Tokenizer("a token is not a string".into())),
            })
            .collect::<Result<_>>()?;
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
        let add_bos = f
            .meta("tokenizer.ggml.add_bos_token")
            .and_then(|v| v.to_bool().ok())
            .unwrap_or(true);
        Self::new(
            pieces,
            scores,
            kinds,
            id("tokenizer.ggml.bos_token_id", 2),
            id("tokenizer.ggml.eos_token_id", 1),
            add_bos,
        )
    }

    /// Builds a tokenizer from its vocabulary.
    pub fn new(
        pieces: Vec<String>,
        scores: Vec<f32>,
        kinds: Vec<TokenKind>,
        bos: TokenId,
        eos: TokenId,
        add_bos: bool,
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
            if let Some(&id) = index.get(&format!("<0x{b:02X}>")) {
                *slot = id;
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
        let end_of_turn = index.get("<end_of_turn>").copied();
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
            end_of_turn,
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

    /// Tokens that end a generation by default: EOS and, for chat models, `<end_of_turn>`.
    pub fn stop_tokens(&self) -> Vec<TokenId> {
        let mut v = vec![self.eos];
        v.extend(self.end_of_turn);
        v
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
                Fragment::Text(t) => self.encode_piece(&t.replace(' ', SPACE), &mut out),
            }
        }
        out
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
        #[derive(Clone, Copy)]
        struct Sym {
            start: usize,
            len: usize,
            prev: Option<usize>,
            next: Option<usize>,
        }
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
            TokenKind::Normal => piece.replace(SPACE, " ").into_bytes(),
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

    /// The Gemma chat template's text for `messages`.
    pub fn apply_chat_template(&self, messages: &[ChatMessage]) -> String {
        chat_segments(messages)
            .into_iter()
            .map(|(t, _)| t)
            .collect()
    }

    /// Encodes chat messages through the template. Only the template's own
    /// markers are special: a message that contains `<start_of_turn>` is
    /// that text, not a turn of the template.
    pub fn encode_chat(&self, messages: &[ChatMessage]) -> Vec<TokenId> {
        // fragments of every segment, the template's with special tokens
        // parsed and the messages' without; adjacent text joined, so text
        // without special tokens tokenizes as the whole rendering would
        let mut frags: Vec<(Option<TokenId>, String)> = Vec::new();
        for (text, template) in chat_segments(messages) {
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
                None => self.encode_piece(&text.replace(' ', SPACE), &mut out),
            }
        }
        out
    }
}

/// The template's segments for `messages`: `(text, true)` for the
/// template's own text, `(text, false)` for what a message says.
fn chat_segments(messages: &[ChatMessage]) -> Vec<(String, bool)> {
    let mut out = vec![("<bos>".to_string(), true)];
    let mut system = String::new();
    let mut first_user = true;
    for m in messages {
        let role = match m.role.as_str() {
            "system" | "developer" => {
                system.push_str(m.content.trim());
                continue;
            }
            "assistant" | "model" => "model",
            _ => "user",
        };
        out.push((format!("<start_of_turn>{role}\n"), true));
        if role == "user" && first_user && !system.is_empty() {
            out.push((format!("{system}\n\n"), false));
        }
        if role == "user" {
            first_user = false;
        }
        out.push((m.content.trim().to_string(), false));
        out.push(("<end_of_turn>\n".to_string(), true));
    }
    out.push(("<start_of_turn>model\n".to_string(), true));
    out
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
