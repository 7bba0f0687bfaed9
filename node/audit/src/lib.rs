//! # weft-audit
//!
//! The intent log: one JSON line per routing or admission decision, each
//! line carrying the sha256 of the line before it, so an edited, removed or
//! reordered line breaks the chain and [`verify`] says where.
//!
//! Lines live in `intent-NNNNNN.jsonl` files in one directory; when a file
//! reaches its size limit the next one continues the chain (its first line
//! carries the hash of the previous file's last line). A line is
//!
//! ```json
//! {"seq":0,"prev":"000…0","at_unix_ms":1764190000000,"record":{…}}
//! ```
//!
//! where `seq` counts lines across files from 0 and `prev` is the hex
//! sha256 of the previous line's bytes (64 zeros for the first line ever).
//! A line cut short by a crash is dropped on reopen (it was never
//! acknowledged); everything before it stays.
//!
//! It owns the file format, appending and verification; what goes into a
//! record is the writer's (the API's admissions, the fabric's routing).

#![forbid(unsafe_code)]

use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// `prev` of the first line ever.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";
/// Default size at which a file is closed and the next one begun.
pub const DEFAULT_MAX_FILE_BYTES: u64 = 64 << 20;

/// An intent-log failure.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// Reading or writing the log failed.
    #[error("intent log {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The chain is broken.
    #[error("{file} line {line}: {why}")]
    Broken {
        /// The file.
        file: PathBuf,
        /// The line (1-based).
        line: usize,
        /// What is wrong.
        why: String,
    },
}

type Result<T> = std::result::Result<T, AuditError>;

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> AuditError + '_ {
    move |source| AuditError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// One line as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Line {
    /// Its place in the chain, from 0.
    pub seq: u64,
    /// The sha256 (hex) of the previous line's bytes.
    pub prev: String,
    /// When it was written (ms since the Unix epoch).
    pub at_unix_ms: u64,
    /// The decision.
    pub record: serde_json::Value,
}

fn hash(line: &[u8]) -> String {
    hex::encode(Sha256::digest(line))
}

fn file_name(n: u64) -> String {
    format!("intent-{n:06}.jsonl")
}

/// The log's files in `dir`, in chain order.
pub fn files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out: Vec<(u64, PathBuf)> = Vec::new();
    for e in fs::read_dir(dir).map_err(io(dir))? {
        let e = e.map_err(io(dir))?;
        let name = e.file_name();
        let Some(n) = name
            .to_str()
            .and_then(|s| s.strip_prefix("intent-"))
            .and_then(|s| s.strip_suffix(".jsonl"))
            .and_then(|s| s.parse::<u64>().ok())
        else {
            continue;
        };
        out.push((n, e.path()));
    }
    out.sort();
    Ok(out.into_iter().map(|(_, p)| p).collect())
}

/// An open intent log, appending.
pub struct IntentLog {
    dir: PathBuf,
    max_file_bytes: u64,
    file: File,
    file_no: u64,
    file_bytes: u64,
    next_seq: u64,
    prev: String,
}

impl std::fmt::Debug for IntentLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IntentLog")
            .field("dir", &self.dir)
            .field("next_seq", &self.next_seq)
            .finish()
    }
}

impl IntentLog {
    /// Opens (or starts) the log in `dir`, continuing its chain. A torn
    /// last line is cut off.
    pub fn open(dir: &Path, max_file_bytes: u64) -> Result<Self> {
        fs::create_dir_all(dir).map_err(io(dir))?;
        let existing = files(dir)?;
        let (file_no, next_seq, prev, path) = match existing.last() {
            None => (0, 0, GENESIS.to_string(), dir.join(file_name(0))),
            Some(last) => {
                let n = existing.len() as u64 - 1;
                let (next_seq, prev) = recover_tail(last, &existing)?;
                (n, next_seq, prev, last.clone())
            }
        };
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io(&path))?;
        let file_bytes = file.metadata().map_err(io(&path))?.len();
        Ok(Self {
            dir: dir.to_path_buf(),
            max_file_bytes: max_file_bytes.max(1),
            file,
            file_no,
            file_bytes,
            next_seq,
            prev,
        })
    }

    /// Appends `record`; returns its sequence number.
    pub fn append(&mut self, record: serde_json::Value) -> Result<u64> {
        if self.file_bytes >= self.max_file_bytes {
            self.rotate()?;
        }
        let line = Line {
            seq: self.next_seq,
            prev: std::mem::take(&mut self.prev),
            at_unix_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            record,
        };
        let mut bytes = serde_json::to_vec(&line).expect("a line serializes");
        self.prev = hash(&bytes);
        bytes.push(b'\n');
        let path = self.dir.join(file_name(self.file_no));
        self.file.write_all(&bytes).map_err(io(&path))?;
        self.file_bytes += bytes.len() as u64;
        self.next_seq += 1;
        Ok(line.seq)
    }

    /// Forces what was appended to disk.
    pub fn sync(&self) -> Result<()> {
        let path = self.dir.join(file_name(self.file_no));
        self.file.sync_data().map_err(io(&path))
    }

    fn rotate(&mut self) -> Result<()> {
        self.sync()?;
        self.file_no += 1;
        let path = self.dir.join(file_name(self.file_no));
        self.file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io(&path))?;
        self.file_bytes = 0;
        Ok(())
    }
}

/// The next sequence number and the last line's hash, from the last file
/// (or the one before it, if the last is empty). Cuts a torn last line.
fn recover_tail(last: &Path, all: &[PathBuf]) -> Result<(u64, String)> {
    let mut data = fs::read(last).map_err(io(last))?;
    if !data.is_empty() && !data.ends_with(b"\n") {
        let keep = data.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        let f = OpenOptions::new()
            .write(true)
            .open(last)
            .map_err(io(last))?;
        f.set_len(keep as u64).map_err(io(last))?;
        f.sync_data().map_err(io(last))?;
        tracing::warn!(file = %last.display(), "cut a torn line off the intent log");
        data.truncate(keep);
    }
    let Some(line) = data.split(|&b| b == b'\n').rfind(|l| !l.is_empty()) else {
        // an empty last file: the chain ends in the file before it
        return match all.len() {
            0 | 1 => Ok((0, GENESIS.to_string())),
            n => recover_tail(&all[n - 2], &all[..n - 1]),
        };
    };
    let parsed: Line = serde_json::from_slice(line).map_err(|e| AuditError::Broken {
        file: last.to_path_buf(),
        line: data
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .count(),
        why: format!("the last line is not an intent-log line: {e}"),
    })?;
    Ok((parsed.seq + 1, hash(line)))
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

/// Checks the chain through `paths` (files in chain order, or one
/// directory): every line parses, sequence numbers go up by one, and every
/// `prev` is the hash of the line before it. A chain that starts at
/// sequence 0 must start from [`GENESIS`]; a later start (a rotated-away
/// beginning) is taken as given.
pub fn verify(paths: &[PathBuf]) -> Result<Verified> {
    let files: Vec<PathBuf> = match paths {
        [one] if one.is_dir() => files(one)?,
        _ => paths.to_vec(),
    };
    let mut expect: Option<(u64, String)> = None;
    let mut lines = 0u64;
    let mut first_seq = 0u64;
    for file in &files {
        let f = File::open(file).map_err(io(file))?;
        let mut r = BufReader::new(f);
        let mut n = 0usize;
        let mut buf = Vec::new();
        loop {
            buf.clear();
            let read = r.read_until(b'\n', &mut buf).map_err(io(file))?;
            if read == 0 {
                break;
            }
            n += 1;
            let broken = |why: String| AuditError::Broken {
                file: file.clone(),
                line: n,
                why,
            };
            if !buf.ends_with(b"\n") {
                return Err(broken("the line is cut short".into()));
            }
            let body = &buf[..buf.len() - 1];
            let line: Line = serde_json::from_slice(body)
                .map_err(|e| broken(format!("not an intent-log line: {e}")))?;
            match &expect {
                None => {
                    first_seq = line.seq;
                    if line.seq == 0 && line.prev != GENESIS {
                        return Err(broken("the first line does not start the chain".into()));
                    }
                }
                Some((seq, prev)) => {
                    if line.seq != *seq {
                        return Err(broken(format!(
                            "sequence {} where {seq} was due: a line was removed or reordered",
                            line.seq
                        )));
                    }
                    if &line.prev != prev {
                        return Err(broken(
                            "it does not carry the hash of the line before it: that line was edited, or lines were removed or reordered".into(),
                        ));
                    }
                }
            }
            expect = Some((line.seq + 1, hash(body)));
            lines += 1;
        }
    }
    Ok(Verified {
        lines,
        first_seq,
        head: expect.map_or_else(|| GENESIS.to_string(), |(_, h)| h),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn write(dir: &Path, n: u64, max: u64) -> Verified {
        let mut log = IntentLog::open(dir, max).unwrap();
        for i in 0..n {
            log.append(json!({"request_id": format!("r{i}"), "choice": "local"}))
                .unwrap();
        }
        log.sync().unwrap();
        verify(&[dir.to_path_buf()]).unwrap()
    }

    fn lines(p: &Path) -> Vec<String> {
        fs::read_to_string(p)
            .unwrap()
            .lines()
            .map(String::from)
            .collect()
    }

    fn put(p: &Path, lines: &[String]) {
        fs::write(
            p,
            lines.iter().map(|l| format!("{l}\n")).collect::<String>(),
        )
        .unwrap();
    }

    #[test]
    fn a_written_chain_verifies_from_genesis() {
        let dir = tempfile::tempdir().unwrap();
        let v = write(dir.path(), 10, 1 << 20);
        assert_eq!((v.lines, v.first_seq), (10, 0));
    }

    #[test]
    fn a_reopened_log_continues_its_chain() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), 10, 1 << 20);
        assert_eq!(write(dir.path(), 5, 1 << 20).lines, 15);
    }

    #[test]
    fn a_small_size_limit_gives_many_files_and_one_chain() {
        let small = tempfile::tempdir().unwrap();
        assert_eq!(write(small.path(), 50, 500).lines, 50);
        let fs_ = files(small.path()).unwrap();
        assert!(fs_.len() > 5, "{} files", fs_.len());
    }

    #[test]
    fn later_files_alone_verify_from_where_they_start() {
        let small = tempfile::tempdir().unwrap();
        write(small.path(), 50, 500);
        let fs_ = files(small.path()).unwrap();
        let tail = verify(&[fs_[2].clone(), fs_[3].clone()]).unwrap();
        assert!(tail.first_seq > 0);
    }

    #[test]
    fn reopening_after_rotation_continues_the_chain() {
        let small = tempfile::tempdir().unwrap();
        write(small.path(), 50, 500);
        assert_eq!(write(small.path(), 7, 500).lines, 57);
    }

    /// Six good lines of one file, and where verification breaks once
    /// `tamper` changed them: the line number and why.
    fn tampered(tamper: impl FnOnce(&mut Vec<String>)) -> (usize, String) {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), 6, 1 << 20);
        let file = files(dir.path()).unwrap()[0].clone();
        let good = lines(&file);
        let mut ls = good.clone();
        tamper(&mut ls);
        assert_ne!(ls, good, "nothing was tampered with");
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join(file_name(0));
        put(&f, &ls);
        match verify(&[f]).unwrap_err() {
            AuditError::Broken { line, why, .. } => (line, why),
            other => panic!("{other}"),
        }
    }

    #[test]
    fn an_edited_line_breaks_the_chain_at_the_next_line() {
        let (line, _) = tampered(|ls| ls[2] = ls[2].replace("\"r2\"", "\"r9\""));
        assert_eq!(line, 4);
    }

    #[test]
    fn a_removed_line_is_reported_as_removed() {
        let (line, why) = tampered(|ls| {
            ls.remove(3);
        });
        assert_eq!(line, 4);
        assert!(why.contains("removed"), "{why}");
    }

    #[test]
    fn reordered_lines_break_the_chain() {
        let (line, _) = tampered(|ls| ls.swap(1, 2));
        assert_eq!(line, 2);
    }

    #[test]
    fn a_first_line_that_does_not_start_at_genesis_is_caught() {
        // a later start is allowed, so change seq 0's prev instead of
        // removing it
        let (line, _) = tampered(|ls| ls[0] = ls[0].replace(GENESIS, &"1".repeat(64)));
        assert_eq!(line, 1);
    }

    #[test]
    fn a_file_removed_from_the_middle_of_a_rotated_chain_is_caught() {
        let small = tempfile::tempdir().unwrap();
        write(small.path(), 40, 400);
        let mut fs_ = files(small.path()).unwrap();
        fs_.remove(2);
        assert!(verify(&fs_).is_err());
    }

    #[test]
    fn a_torn_last_line_is_cut_on_reopen() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), 3, 1 << 20);
        let file = files(dir.path()).unwrap()[0].clone();
        let mut f = OpenOptions::new().append(true).open(&file).unwrap();
        f.write_all(b"{\"seq\":3,\"prev\":\"ab").unwrap();
        drop(f);
        assert!(verify(std::slice::from_ref(&file)).is_err());
        let v = write(dir.path(), 2, 1 << 20);
        assert_eq!(v.lines, 5);
    }
}
