//! Checking a log: its chain, its signed checkpoints, its boundary after
//! pruning, and the checkpoints the coordinators hold for it.

use std::path::PathBuf;

use crate::{
    hash, read_lines, reason, resolve, AuditError, Checkpoint, Line, Result, Trust, GENESIS,
};

/// What to check a log against beyond its own chain.
#[derive(Default)]
pub struct Options<'a> {
    /// Who may sign (the cluster's CA and revocations). Without it a
    /// signature is checked only against the certificate it carries.
    pub trust: Option<&'a dyn Trust>,
    /// The checkpoints the coordinators hold for this log's node.
    pub anchors: &'a [Checkpoint],
    /// Whose log it is; by default the signer of its first checkpoint.
    pub node: Option<&'a str>,
}

/// One thing found wrong, at the first sequence number it puts in doubt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The first sequence number that is not as signed or written.
    pub seq: u64,
    /// Where it was found.
    pub file: PathBuf,
    /// The line there (1-based; 0 when it is about the whole log).
    pub line: usize,
    /// What is wrong.
    pub why: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "seq {}: {} ({}", self.seq, self.why, self.file.display())?;
        if self.line > 0 {
            write!(f, " line {}", self.line)?;
        }
        write!(f, ")")
    }
}

/// What [`check`] found.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Lines read.
    pub lines: u64,
    /// The first line's sequence number.
    pub first_seq: u64,
    /// The last line's, if there is one.
    pub last_seq: Option<u64>,
    /// The hash of the last line (the chain's head).
    pub head: String,
    /// Whose checkpoints they are.
    pub node: Option<String>,
    /// Checkpoints in the log that verified.
    pub checkpoints: u64,
    /// The last line a good checkpoint vouches for.
    pub signed_through: Option<u64>,
    /// Coordinators' checkpoints compared with the log.
    pub anchors_checked: usize,
    /// Coordinators' checkpoints of lines pruned since.
    pub anchors_pruned: usize,
    /// Whether the log starts past 0 at a signed boundary.
    pub pruned_boundary: bool,
    /// What is wrong, first bad sequence number first.
    pub problems: Vec<Problem>,
}

impl Report {
    /// The first problem, if any.
    pub fn first_problem(&self) -> Option<&Problem> {
        self.problems.first()
    }
}

/// What [`verify`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// Lines checked.
    pub lines: u64,
    /// The first line's sequence number.
    pub first_seq: u64,
    /// The hash of the last line (the chain's head).
    pub head: String,
}

/// Checks the chain through `paths` with no trust anchors: the first
/// problem as an error.
pub fn verify(paths: &[PathBuf]) -> Result<Verified> {
    let r = check(paths, &Options::default())?;
    if let Some(p) = r.problems.into_iter().next() {
        return Err(AuditError::Broken {
            file: p.file,
            line: p.line,
            seq: p.seq,
            why: p.why,
        });
    }
    Ok(Verified {
        lines: r.lines,
        first_seq: r.first_seq,
        head: r.head,
    })
}

/// Checks the log in `paths` (files in chain order, or one directory):
///
/// - every line parses, sequence numbers go up by one, and every `prev` is
///   the hash of the line before it (a chain that starts at 0 starts from
///   [`GENESIS`]);
/// - every checkpoint line's signature verifies (against the cluster with
///   `opts.trust`) and vouches for the line before it, so a line rewritten
///   with the chain recomputed fails at the next checkpoint;
/// - a directory that starts past 0 starts at a signed boundary (pruning
///   writes one), once the log is signed at all;
/// - each of the coordinators' checkpoints (`opts.anchors`) matches its
///   line, and none is past the log's end (lines cut off).
///
/// Problems name the first sequence number in doubt: for a checkpoint
/// that does not match, the first line after the last good checkpoint.
pub fn check(paths: &[PathBuf], opts: &Options<'_>) -> Result<Report> {
    let dir_mode = matches!(paths, [one] if one.is_dir());
    let files = resolve(paths)?;
    let mut r = Report {
        head: GENESIS.to_string(),
        node: opts.node.map(String::from),
        ..Default::default()
    };
    // hashes of every line read, by seq - first_seq
    let mut hashes: Vec<[u8; 32]> = Vec::new();
    // (the line it vouches for, its own line) of each good checkpoint
    let mut good: Vec<(u64, u64)> = Vec::new();
    let mut first_prev: Option<String> = None;
    let mut boundaries: Vec<(Checkpoint, PathBuf, usize)> = Vec::new();
    let mut expect: Option<(u64, String)> = None;
    let mut last_file = PathBuf::new();
    let mut problems = Vec::new();
    let mut chain_broken = false;
    read_lines(&files, |file, n, body, parsed| {
        last_file = file.to_path_buf();
        let due = expect.as_ref().map_or(r.first_seq, |(s, _)| *s);
        let mut broken = |why: String| {
            chain_broken = true;
            problems.push(Problem {
                seq: due,
                file: file.to_path_buf(),
                line: n,
                why,
            });
            false
        };
        let line: Line = match parsed {
            Ok(l) => l,
            Err(why) => return broken(why),
        };
        match &expect {
            None => {
                r.first_seq = line.seq;
                first_prev = Some(line.prev.clone());
                if line.seq == 0 && line.prev != GENESIS {
                    return broken("the first line does not start the chain".into());
                }
            }
            Some((seq, prev)) => {
                if line.seq != *seq {
                    return broken(format!(
                        "sequence {} where {seq} was due: a line was removed or reordered",
                        line.seq
                    ));
                }
                if &line.prev != prev {
                    // the line before it is the one edited
                    problems.push(Problem {
                        seq: due.saturating_sub(1),
                        file: file.to_path_buf(),
                        line: n,
                        why: "it does not carry the hash of the line before it: that line was edited, or lines were removed or reordered".into(),
                    });
                    chain_broken = true;
                    return false;
                }
            }
        }
        let h = hash(body);
        if let Some(cp) = Checkpoint::from_record(&line.record) {
            let since = good.last().map_or(r.first_seq, |g| g.1 + 1);
            let mut doubt = |why: String| {
                problems.push(Problem {
                    seq: since,
                    file: file.to_path_buf(),
                    line: n,
                    why,
                })
            };
            match cp {
                Err(why) => doubt(why),
                Ok(cp) => match cp.check(opts.trust) {
                    Err(why) => doubt(format!(
                        "the checkpoint of seq {} is not good: {why}; lines {since}..={} are vouched for by no trusted key",
                        cp.seq, cp.seq
                    )),
                    Ok(()) => {
                        let node = r.node.get_or_insert_with(|| cp.node.clone());
                        if *node != cp.node {
                            doubt(format!(
                                "the checkpoint of seq {} is signed by {:?}, not by {node:?} whose log this is",
                                cp.seq, cp.node
                            ));
                        } else if cp.reason == reason::PRUNED {
                            boundaries.push((cp, file.to_path_buf(), n));
                        } else if cp.seq.checked_add(1) != Some(line.seq)
                            || expect
                                .as_ref()
                                .map_or(first_prev.as_ref(), |(_, p)| Some(p))
                                != Some(&cp.head)
                        {
                            doubt(format!(
                                "the checkpoint signed at seq {} does not match the lines before it: lines {since}..={} were rewritten (and the chain recomputed)",
                                cp.seq, cp.seq
                            ));
                        } else {
                            r.checkpoints += 1;
                            good.push((cp.seq, line.seq));
                        }
                    }
                },
            }
        }
        let mut raw = [0u8; 32];
        hex::decode_to_slice(&h, &mut raw).expect("a sha256 in hex");
        hashes.push(raw);
        r.lines += 1;
        r.last_seq = Some(line.seq);
        expect = Some((line.seq.saturating_add(1), h));
        true
    })?;
    if let Some((_, h)) = &expect {
        r.head = h.clone();
    }
    let hash_at = |seq: u64| -> Option<String> {
        let i = seq.checked_sub(r.first_seq)? as usize;
        hashes.get(i).map(hex::encode)
    };
    // the boundary a pruned log starts at
    for (cp, file, line) in &boundaries {
        let ok = if cp.seq.saturating_add(1) == r.first_seq {
            first_prev.as_deref() == Some(cp.head.as_str())
        } else if cp.seq.saturating_add(1) < r.first_seq {
            true // an older boundary, its lines pruned since
        } else {
            hash_at(cp.seq).as_deref() == Some(cp.head.as_str())
        };
        if !ok {
            problems.push(Problem {
                seq: r.first_seq,
                file: file.clone(),
                line: *line,
                why: format!(
                    "the signed boundary after pruning (seq {}) does not match the log's first lines",
                    cp.seq
                ),
            });
        }
        if cp.seq.saturating_add(1) == r.first_seq && ok {
            r.pruned_boundary = true;
        }
    }
    let signed = r.checkpoints > 0 || !opts.anchors.is_empty();
    if dir_mode && r.first_seq > 0 && signed && !r.pruned_boundary {
        problems.push(Problem {
            seq: 0,
            file: files.first().cloned().unwrap_or_default(),
            line: 1,
            why: format!(
                "the log starts at seq {} with no signed boundary: lines 0..={} were removed, not pruned",
                r.first_seq,
                r.first_seq - 1
            ),
        });
    }
    // the coordinators' record, which the log's writer cannot change
    let node = r.node.clone();
    for a in opts
        .anchors
        .iter()
        .filter(|a| node.as_deref().is_none_or(|n| n == a.node))
    {
        let since = |seq: u64| {
            good.iter()
                .rev()
                .find(|g| g.0 < seq)
                .map_or(r.first_seq, |g| g.1 + 1)
        };
        if let Err(why) = a.check(opts.trust) {
            problems.push(Problem {
                seq: since(a.seq),
                file: PathBuf::from("(coordinators)"),
                line: 0,
                why: format!(
                    "the coordinators' checkpoint of seq {} is not good: {why}",
                    a.seq
                ),
            });
            continue;
        }
        if a.seq < r.first_seq {
            r.anchors_pruned += 1;
            continue;
        }
        r.anchors_checked += 1;
        match r.last_seq {
            Some(last) if a.seq <= last => {
                if chain_broken {
                    continue;
                }
                if hash_at(a.seq).as_deref() != Some(a.head.as_str()) {
                    problems.push(Problem {
                        seq: since(a.seq),
                        file: PathBuf::from("(coordinators)"),
                        line: 0,
                        why: format!(
                            "the coordinators hold a checkpoint of seq {} (signed at {} ms) that the log does not match: lines {}..={} were rewritten",
                            a.seq,
                            a.at_unix_ms,
                            since(a.seq),
                            a.seq
                        ),
                    });
                }
            }
            last => {
                let from = last.map_or(r.first_seq, |l| l + 1);
                if chain_broken {
                    continue;
                }
                problems.push(Problem {
                    seq: from,
                    file: last_file.clone(),
                    line: 0,
                    why: format!(
                        "the log ends before seq {from}, but the coordinators hold a checkpoint of seq {}: lines {from}..={} were cut off",
                        a.seq, a.seq
                    ),
                });
            }
        }
    }
    r.signed_through = good.last().map(|g| g.0);
    problems.sort_by_key(|p| p.seq);
    r.problems = problems;
    Ok(r)
}
