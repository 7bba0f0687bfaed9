//! The encoding of a layer chain's steps: [`Message`] down (the chunks a
//! shard runs, the sequences it may forget, or the requests sequences
//! serve) and [`Reply`] up (one output
//! per chunk, or why the step failed).
//!
//! A step crosses three kinds of link: the head worker's socket to its node,
//! the data plane between nodes, and each shard node's socket to its shard
//! worker. They all carry this encoding, so hidden states and logits pass
//! bit for bit: a chain's greedy output equals one node's. Decoding refuses
//! anything short, long or of an unknown kind.

use anyhow::{bail, ensure, Context, Result};
use tokio::sync::mpsc;
use weft_kernels::{BlockHash, Chunk, ChunkInput, ChunkOutput, SeqId};

/// What goes down a chain.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    /// Run these chunks (hidden states) through the rest of the model; a
    /// [`Reply`] comes back.
    Forward(Vec<Chunk>),
    /// Forget these sequences (finished, cancelled or preempted at the
    /// head); no reply.
    Release(Vec<SeqId>),
    /// The requests these sequences serve, so that every node of the chain
    /// logs its part of them under their trace; sent before a sequence's
    /// first forward; no reply.
    Trace(Vec<SeqTrace>),
    /// Map the longest cached run of these block names as new sequence
    /// `seq`'s first blocks (or, for a sequence that has mapped more, keep
    /// only as many as there are names); a [`mapped`] reply says how many
    /// blocks the rest of the chain holds.
    Map {
        /// The head's sequence id.
        seq: SeqId,
        /// The names of its first blocks.
        hashes: Vec<BlockHash>,
    },
    /// Register blocks `first..` of each sequence under these names (the
    /// head filled them); no reply.
    Register(Vec<(SeqId, u32, Vec<BlockHash>)>),
}

impl Message {
    /// Whether the message wants a reply (a forward, a map).
    pub fn wants_reply(&self) -> bool {
        matches!(self, Self::Forward(_) | Self::Map { .. })
    }
}

/// Whether the encoded message `body` wants a reply: read from its kind
/// byte, so a message the reader cannot decode (from a newer node) is
/// never answered out of turn.
pub fn wants_reply(body: &[u8]) -> bool {
    matches!(body.first(), Some(&FORWARD) | Some(&MAP))
}

/// Most block names one message carries (a context of 8192 tokens has 512).
pub const MAX_BLOCK_NAMES: usize = 8192;

/// Which request a chain's sequence serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeqTrace {
    /// The head's sequence id.
    pub seq: SeqId,
    /// The W3C `traceparent` whose parent span is the sending node's.
    pub traceparent: String,
    /// The request id in the head node's log.
    pub request_id: String,
}

/// Longest `traceparent` or request id a [`Message::Trace`] carries.
pub const MAX_TRACE_FIELD: usize = 256;

/// What comes back up: one output per chunk (the last range's logits), or
/// why the step failed.
pub type Reply = std::result::Result<Vec<ChunkOutput>, String>;

const FORWARD: u8 = b'F';
const RELEASE: u8 = b'R';
const TRACE: u8 = b'T';
const MAP: u8 = b'M';
const REGISTER: u8 = b'G';
const MAPPED: u8 = b'N';
const OUTPUTS: u8 = b'O';
const FAILED: u8 = b'E';
const TOKENS: u8 = 0;
const HIDDEN: u8 = 1;
const NO_LOGITS: u8 = 2;
const LOGITS: u8 = 3;
const LAST: u8 = 4;
const NO_LAST: u8 = 5;

fn put_u32(out: &mut Vec<u8>, v: usize) {
    out.extend_from_slice(&(v as u32).to_le_bytes());
}

fn put_f32s(out: &mut Vec<u8>, v: &[f32]) {
    put_u32(out, v.len());
    out.reserve(v.len() * 4);
    for x in v {
        out.extend_from_slice(&x.to_le_bytes());
    }
}

/// Reads an encoding back, refusing anything short or malformed.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        ensure!(self.0.len() >= n, "chain message cut short");
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<usize> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")) as usize)
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
    fn f32s(&mut self) -> Result<Vec<f32>> {
        let n = self.u32()?;
        let b = self.take(n.checked_mul(4).context("chain message too long")?)?;
        Ok(b.chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect())
    }
    fn end(&self) -> Result<()> {
        ensure!(
            self.0.is_empty(),
            "{} stray bytes after a chain message",
            self.0.len()
        );
        Ok(())
    }
}

/// Encodes `m`.
pub fn encode_message(m: &Message) -> Vec<u8> {
    let mut out = Vec::new();
    match m {
        Message::Forward(chunks) => {
            out.push(FORWARD);
            put_u32(&mut out, chunks.len());
            for c in chunks {
                out.extend_from_slice(&c.seq.to_le_bytes());
                out.extend_from_slice(&(c.pos as u64).to_le_bytes());
                out.push(u8::from(c.want_logits));
                match &c.input {
                    ChunkInput::Tokens(t) => {
                        out.push(TOKENS);
                        put_u32(&mut out, t.len());
                        for x in t {
                            out.extend_from_slice(&x.to_le_bytes());
                        }
                    }
                    ChunkInput::Hidden(h) => {
                        out.push(HIDDEN);
                        put_f32s(&mut out, h);
                    }
                }
            }
        }
        Message::Release(seqs) => {
            out.push(RELEASE);
            put_u32(&mut out, seqs.len());
            for s in seqs {
                out.extend_from_slice(&s.to_le_bytes());
            }
        }
        Message::Trace(notes) => {
            out.push(TRACE);
            put_u32(&mut out, notes.len());
            for n in notes {
                out.extend_from_slice(&n.seq.to_le_bytes());
                for f in [&n.traceparent, &n.request_id] {
                    // cut at a character boundary: the reader checks UTF-8
                    let mut end = f.len().min(MAX_TRACE_FIELD);
                    while !f.is_char_boundary(end) {
                        end -= 1;
                    }
                    put_u32(&mut out, end);
                    out.extend_from_slice(&f.as_bytes()[..end]);
                }
            }
        }
        Message::Map { seq, hashes } => {
            out.push(MAP);
            out.extend_from_slice(&seq.to_le_bytes());
            put_hashes(&mut out, hashes);
        }
        Message::Register(entries) => {
            out.push(REGISTER);
            put_u32(&mut out, entries.len());
            for (seq, first, hashes) in entries {
                out.extend_from_slice(&seq.to_le_bytes());
                put_u32(&mut out, *first as usize);
                put_hashes(&mut out, hashes);
            }
        }
    }
    out
}

fn put_hashes(out: &mut Vec<u8>, hashes: &[BlockHash]) {
    let n = hashes.len().min(MAX_BLOCK_NAMES);
    put_u32(out, n);
    for h in &hashes[..n] {
        out.extend_from_slice(&h.to_le_bytes());
    }
}

fn read_hashes(r: &mut Reader<'_>) -> Result<Vec<BlockHash>> {
    let n = r.u32()?;
    ensure!(n <= MAX_BLOCK_NAMES, "{n} block names in one message");
    (0..n).map(|_| r.u64()).collect()
}

/// The reply to a [`Message::Map`]: the blocks mapped.
pub fn mapped(blocks: usize) -> Vec<u8> {
    let mut out = vec![MAPPED];
    put_u32(&mut out, blocks);
    out
}

/// Reads a [`mapped`] reply (a failed step's reply is its error).
pub fn decode_mapped(b: &[u8]) -> std::result::Result<usize, String> {
    match b.first() {
        Some(&MAPPED) => {
            let mut r = Reader(&b[1..]);
            let n = r.u32().map_err(|e| e.to_string())?;
            r.end().map_err(|e| e.to_string())?;
            Ok(n)
        }
        _ => match decode_reply(b) {
            Err(why) => Err(why),
            Ok(_) => Err("a chain answered a map with outputs".into()),
        },
    }
}

/// Decodes a [`Message`].
pub fn decode_message(b: &[u8]) -> Result<Message> {
    let mut r = Reader(b);
    let m = match r.u8()? {
        FORWARD => {
            let n = r.u32()?;
            let mut chunks = Vec::with_capacity(n.min(4096));
            for _ in 0..n {
                let seq = r.u64()?;
                let pos = r.u64()? as usize;
                let want_logits = r.u8()? != 0;
                let input = match r.u8()? {
                    TOKENS => {
                        let k = r.u32()?;
                        let b = r.take(k.checked_mul(4).context("chain message too long")?)?;
                        ChunkInput::Tokens(
                            b.chunks_exact(4)
                                .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")))
                                .collect(),
                        )
                    }
                    HIDDEN => ChunkInput::Hidden(r.f32s()?),
                    k => bail!("unknown chunk input kind {k}"),
                };
                chunks.push(Chunk {
                    seq,
                    pos,
                    input,
                    want_logits,
                });
            }
            Message::Forward(chunks)
        }
        RELEASE => {
            let n = r.u32()?;
            Message::Release((0..n).map(|_| r.u64()).collect::<Result<_>>()?)
        }
        TRACE => {
            let n = r.u32()?;
            let mut notes = Vec::with_capacity(n.min(4096));
            for _ in 0..n {
                let seq = r.u64()?;
                let mut text = || -> Result<String> {
                    let k = r.u32()?;
                    ensure!(k <= MAX_TRACE_FIELD, "a trace field of {k} bytes");
                    Ok(std::str::from_utf8(r.take(k)?)
                        .context("a trace field is not UTF-8")?
                        .to_string())
                };
                let traceparent = text()?;
                let request_id = text()?;
                notes.push(SeqTrace {
                    seq,
                    traceparent,
                    request_id,
                });
            }
            Message::Trace(notes)
        }
        MAP => {
            let seq = r.u64()?;
            Message::Map {
                seq,
                hashes: read_hashes(&mut r)?,
            }
        }
        REGISTER => {
            let n = r.u32()?;
            let mut entries = Vec::with_capacity(n.min(4096));
            for _ in 0..n {
                let seq = r.u64()?;
                let first = r.u32()? as u32;
                entries.push((seq, first, read_hashes(&mut r)?));
            }
            Message::Register(entries)
        }
        k => bail!("unknown chain message kind {k}"),
    };
    r.end()?;
    Ok(m)
}

/// Encodes `r`.
pub fn encode_reply(r: &Reply) -> Vec<u8> {
    let mut out = Vec::new();
    match r {
        Ok(outs) => {
            out.push(OUTPUTS);
            put_u32(&mut out, outs.len());
            for o in outs {
                match o {
                    ChunkOutput::Hidden(h) => {
                        out.push(HIDDEN);
                        put_f32s(&mut out, h);
                    }
                    ChunkOutput::Logits(None) => out.push(NO_LOGITS),
                    ChunkOutput::Logits(Some(l)) => {
                        out.push(LOGITS);
                        put_f32s(&mut out, l);
                    }
                    ChunkOutput::Last(None) => out.push(NO_LAST),
                    ChunkOutput::Last(Some(l)) => {
                        out.push(LAST);
                        put_f32s(&mut out, l);
                    }
                }
            }
        }
        Err(why) => {
            out.push(FAILED);
            out.extend_from_slice(why.as_bytes());
        }
    }
    out
}

/// Decodes a [`Reply`]; a malformed one is a failed step.
pub fn decode_reply(b: &[u8]) -> Reply {
    let mut r = Reader(b);
    let parse = |r: &mut Reader<'_>| -> Result<Reply> {
        match r.u8()? {
            OUTPUTS => {
                let n = r.u32()?;
                let mut outs = Vec::with_capacity(n.min(4096));
                for _ in 0..n {
                    outs.push(match r.u8()? {
                        HIDDEN => ChunkOutput::Hidden(r.f32s()?),
                        NO_LOGITS => ChunkOutput::Logits(None),
                        LOGITS => ChunkOutput::Logits(Some(r.f32s()?)),
                        LAST => ChunkOutput::Last(Some(r.f32s()?)),
                        NO_LAST => ChunkOutput::Last(None),
                        k => bail!("unknown chunk output kind {k}"),
                    });
                }
                r.end()?;
                Ok(Ok(outs))
            }
            FAILED => Ok(Err(String::from_utf8_lossy(r.0).into_owned())),
            k => bail!("unknown chain reply kind {k}"),
        }
    };
    parse(&mut r).unwrap_or_else(|e| Err(format!("bad reply from the chain: {e}")))
}

/// A failed step's reply, encoded.
pub fn failed(why: impl std::fmt::Display) -> Vec<u8> {
    encode_reply(&Err(why.to_string()))
}

/// Replies to a head worker's chain steps: `(step, encoded reply)`.
pub type StepReply = Box<dyn Fn(u64, Vec<u8>) + Send + Sync>;

/// Where a head worker's chain steps go (the data plane, down the chain's
/// route: `weft-fabric` implements it).
pub trait ChainLink: Send + Sync + std::fmt::Debug {
    /// Carries `(step, encoded message)`s in order until `steps` closes,
    /// handing each forward's reply to `reply`.
    fn relay(
        &self,
        steps: mpsc::UnboundedReceiver<(u64, Vec<u8>)>,
        reply: StepReply,
    ) -> futures::future::BoxFuture<'static, ()>;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn forward() -> Message {
        Message::Forward(vec![
            Chunk {
                seq: 7,
                pos: 3,
                input: ChunkInput::Hidden(vec![1.5, -0.0, f32::MIN_POSITIVE, 1e-30]),
                want_logits: true,
            },
            Chunk {
                seq: u64::MAX,
                pos: 0,
                input: ChunkInput::Tokens(vec![2, 99]),
                want_logits: false,
            },
        ])
    }

    fn outputs() -> Reply {
        Ok(vec![
            ChunkOutput::Logits(None),
            ChunkOutput::Logits(Some(vec![0.1, 0.2])),
            ChunkOutput::Hidden(vec![3.0]),
            ChunkOutput::Last(None),
            ChunkOutput::Last(Some(vec![4.0])),
        ])
    }

    #[test]
    fn messages_round_trip_bit_for_bit() {
        let m = forward();
        assert_eq!(decode_message(&encode_message(&m)).unwrap(), m);
        let rel = Message::Release(vec![1, 2]);
        assert_eq!(decode_message(&encode_message(&rel)).unwrap(), rel);
    }

    #[test]
    fn map_and_register_messages_round_trip() {
        for m in [
            Message::Map {
                seq: 3,
                hashes: vec![1, 2, u64::MAX],
            },
            Message::Register(vec![(3, 2, vec![7, 8]), (4, 0, vec![])]),
        ] {
            assert_eq!(decode_message(&encode_message(&m)).unwrap(), m);
        }
        assert_eq!(decode_mapped(&mapped(5)), Ok(5));
        assert!(decode_mapped(&failed("gone")).unwrap_err().contains("gone"));
    }

    #[test]
    fn only_forwards_and_maps_want_a_reply_even_undecoded() {
        assert!(wants_reply(&encode_message(&forward())));
        assert!(wants_reply(&encode_message(&Message::Map {
            seq: 1,
            hashes: vec![]
        })));
        assert!(!wants_reply(&encode_message(&Message::Release(vec![1]))));
        assert!(!wants_reply(b"Z from a newer node"));
    }

    #[test]
    fn a_long_trace_field_is_cut_at_a_character_boundary() {
        let m = Message::Trace(vec![SeqTrace {
            seq: 1,
            traceparent: "\u{e9}".repeat(MAX_TRACE_FIELD),
            request_id: String::new(),
        }]);
        match decode_message(&encode_message(&m)).unwrap() {
            Message::Trace(n) => assert_eq!(n[0].traceparent.len(), MAX_TRACE_FIELD),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn trace_notes_round_trip() {
        let m = Message::Trace(vec![SeqTrace {
            seq: 7,
            traceparent: "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into(),
            request_id: "req-1".into(),
        }]);
        assert_eq!(decode_message(&encode_message(&m)).unwrap(), m);
    }

    #[test]
    fn a_trace_field_longer_than_its_bound_is_refused() {
        let mut b = vec![b'T'];
        b.extend_from_slice(&1u32.to_le_bytes());
        b.extend_from_slice(&7u64.to_le_bytes());
        b.extend_from_slice(&((MAX_TRACE_FIELD + 1) as u32).to_le_bytes());
        b.extend(std::iter::repeat_n(b'a', MAX_TRACE_FIELD + 1));
        b.extend_from_slice(&0u32.to_le_bytes());
        let e = decode_message(&b).unwrap_err().to_string();
        assert!(e.contains("trace field"), "{e}");
    }

    #[test]
    fn replies_round_trip_bit_for_bit() {
        let r = outputs();
        assert_eq!(decode_reply(&encode_reply(&r)), r);
        assert_eq!(decode_reply(&failed("gone")), Err("gone".to_string()));
    }

    #[test]
    fn a_message_cut_short_or_with_trailing_bytes_is_refused() {
        let b = encode_message(&forward());
        assert!(decode_message(&b[..b.len() - 1]).is_err());
        let mut long = b.clone();
        long.push(0);
        assert!(decode_message(&long).is_err());
        assert!(decode_reply(&encode_reply(&outputs())[..5]).is_err());
    }

    #[test]
    fn unknown_message_and_reply_kinds_are_refused() {
        assert!(decode_message(b"X").is_err());
        assert!(decode_reply(b"Z").is_err());
    }
}
