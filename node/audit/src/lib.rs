//! # weft-audit
//!
//! The intent log: one JSON line per routing, admission, sandbox or
//! control-plane decision, each line carrying the sha256 of the line
//! before it, and signed [`Checkpoint`]s of the chain's head, so an edited,
//! removed or reordered line, a rewrite whose chain was recomputed, and
//! lines cut off the end are each found by [`check`], which names the
//! first bad sequence number.
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
//! With a [`Signer`] (the node's cluster identity) the log signs a
//! checkpoint of its head at every [`IntentLog::checkpoint`] (the node
//! calls it at an interval and at shutdown), when it closes a file, and
//! after [pruning](Retention) (the signed boundary that lets what remains
//! verify). The node also commits its checkpoints to the coordinators, so
//! a log can be checked against a record its writer cannot change.
//!
//! It owns the file format, appending, retention, verification and
//! queries; what goes into a record is the writer's (the API's admissions,
//! the fabric's routing, the sandbox service, the control plane).

#![forbid(unsafe_code)]

mod checkpoint;
pub mod query;
mod verify;

use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use checkpoint::{reason, Checkpoint, Signer, Trust};
pub use verify::{check, verify, Options, Problem, Report, Verified};

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
    /// The log does not verify.
    #[error("{file} line {line} (seq {seq}): {why}")]
    Broken {
        /// The file.
        file: PathBuf,
        /// The line (1-based).
        line: usize,
        /// The first sequence number that is not as written.
        seq: u64,
        /// What is wrong.
        why: String,
    },
    /// A checkpoint could not be signed.
    #[error("signing a checkpoint: {0}")]
    Sign(String),
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

/// The hex sha256 of a line's bytes (without its newline).
pub fn hash(line: &[u8]) -> String {
    hex::encode(Sha256::digest(line))
}

fn file_name(n: u64) -> String {
    format!("intent-{n:06}.jsonl")
}

fn file_number(p: &Path) -> Option<u64> {
    p.file_name()?
        .to_str()?
        .strip_prefix("intent-")?
        .strip_suffix(".jsonl")?
        .parse()
        .ok()
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The log's files in `dir`, in chain order.
pub fn files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out: Vec<(u64, PathBuf)> = Vec::new();
    for e in fs::read_dir(dir).map_err(io(dir))? {
        let e = e.map_err(io(dir))?;
        let p = e.path();
        if let Some(n) = file_number(&p) {
            out.push((n, p));
        }
    }
    out.sort();
    Ok(out.into_iter().map(|(_, p)| p).collect())
}

/// The files `paths` name: one directory's files in order, or the files
/// as given.
pub fn resolve(paths: &[PathBuf]) -> Result<Vec<PathBuf>> {
    match paths {
        [one] if one.is_dir() => files(one),
        _ => Ok(paths.to_vec()),
    }
}

/// How much of its log a node keeps: files past either limit are removed,
/// oldest first (never the one being written), and a signed boundary is
/// appended so that what remains still verifies.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Retention {
    /// Most bytes of all files together.
    pub max_bytes: Option<u64>,
    /// Oldest a closed file may get (by its last write).
    pub max_age: Option<Duration>,
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
    signer: Option<Arc<dyn Signer>>,
    retention: Retention,
    /// Whether the last line is a checkpoint of the line before it.
    signed_head: bool,
    latest: Option<Checkpoint>,
}

impl std::fmt::Debug for IntentLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IntentLog")
            .field("dir", &self.dir)
            .field("next_seq", &self.next_seq)
            .field("signed", &self.signer.is_some())
            .finish()
    }
}

impl IntentLog {
    /// Opens (or starts) the log in `dir`, continuing its chain. A torn
    /// last line is cut off.
    pub fn open(dir: &Path, max_file_bytes: u64) -> Result<Self> {
        fs::create_dir_all(dir).map_err(io(dir))?;
        let existing = files(dir)?;
        let (file_no, tail, path) = match existing.last() {
            None => (0, None, dir.join(file_name(0))),
            Some(last) => (
                file_number(last).unwrap_or(0),
                recover_tail(last, &existing)?,
                last.clone(),
            ),
        };
        // a checkpoint found at the end is not taken as this run's: it may
        // be a boundary, or signed with a key since renewed; the first
        // checkpoint of this run signs the head again
        let (next_seq, prev) = match tail {
            None => (0, GENESIS.to_string()),
            Some((line, h)) => (line.seq.saturating_add(1), h),
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
            signed_head: false,
            latest: None,
            signer: None,
            retention: Retention::default(),
        })
    }

    /// Signs checkpoints with `signer` from now on.
    pub fn set_signer(&mut self, signer: Arc<dyn Signer>) {
        self.signer = Some(signer);
    }

    /// Keeps the log within `r` from now on (applied at each rotation and
    /// [`IntentLog::maintain`]).
    pub fn set_retention(&mut self, r: Retention) {
        self.retention = r;
    }

    /// The directory it writes.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The sequence number the next line gets.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// The latest checkpoint written since it was opened.
    pub fn latest_checkpoint(&self) -> Option<&Checkpoint> {
        self.latest.as_ref()
    }

    /// Appends `record`; returns its sequence number.
    pub fn append(&mut self, record: serde_json::Value) -> Result<u64> {
        if self.file_bytes >= self.max_file_bytes {
            self.rotate()?;
        }
        self.signed_head = false;
        self.write(record)
    }

    fn write(&mut self, record: serde_json::Value) -> Result<u64> {
        let line = Line {
            seq: self.next_seq,
            prev: self.prev.clone(),
            at_unix_ms: now_ms(),
            record,
        };
        let mut bytes = serde_json::to_vec(&line).expect("a line serializes");
        let h = hash(&bytes);
        bytes.push(b'\n');
        let path = self.dir.join(file_name(self.file_no));
        if let Err(e) = self.file.write_all(&bytes) {
            // nothing of a line that failed stays: the chain goes on from
            // the last one written
            let _ = self.file.set_len(self.file_bytes);
            return Err(io(&path)(e));
        }
        self.prev = h;
        self.file_bytes += bytes.len() as u64;
        self.next_seq += 1;
        Ok(line.seq)
    }

    /// Signs a checkpoint of the chain's head and appends it, forced to
    /// disk. `None` without a signer, for an empty log, or when the last
    /// line already is a checkpoint (nothing new to vouch for).
    pub fn checkpoint(&mut self, why: &str) -> Result<Option<Checkpoint>> {
        let Some(signer) = self.signer.clone() else {
            return Ok(None);
        };
        if self.next_seq == 0 || self.signed_head {
            return Ok(None);
        }
        let cp = Checkpoint::sign(&*signer, self.next_seq - 1, &self.prev, now_ms(), why)
            .map_err(AuditError::Sign)?;
        self.write(cp.record())?;
        self.sync()?;
        self.signed_head = true;
        self.latest = Some(cp.clone());
        Ok(Some(cp))
    }

    /// Forces what was appended to disk.
    pub fn sync(&self) -> Result<()> {
        let path = self.dir.join(file_name(self.file_no));
        self.file.sync_data().map_err(io(&path))
    }

    /// Applies the retention limits (the node calls it at its checkpoint
    /// interval); returns how many files were removed.
    pub fn maintain(&mut self) -> Result<usize> {
        self.prune(now_ms())
    }

    fn rotate(&mut self) -> Result<()> {
        // each closed file ends signed
        self.checkpoint(reason::ROTATION)?;
        self.sync()?;
        self.file_no += 1;
        let path = self.dir.join(file_name(self.file_no));
        self.file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io(&path))?;
        self.file_bytes = 0;
        self.prune(now_ms())?;
        Ok(())
    }

    /// Removes closed files past the retention limits, oldest first. The
    /// signed boundary (a checkpoint of the line before the first one
    /// kept) is appended and forced to disk before any file goes, so a
    /// crash in between leaves a log that still verifies.
    fn prune(&mut self, now_unix_ms: u64) -> Result<usize> {
        let Retention { max_bytes, max_age } = self.retention;
        if max_bytes.is_none() && max_age.is_none() {
            return Ok(0);
        }
        let all = files(&self.dir)?;
        let mut sized = Vec::with_capacity(all.len());
        for f in &all {
            let m = fs::metadata(f).map_err(io(f))?;
            let written = m
                .modified()
                .ok()
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_millis() as u64);
            sized.push((f.clone(), m.len(), written));
        }
        let mut total: u64 = sized.iter().map(|s| s.1).sum();
        let current = self.dir.join(file_name(self.file_no));
        let mut doomed = Vec::new();
        for (f, len, written) in &sized {
            if *f == current {
                break;
            }
            let too_big = max_bytes.is_some_and(|m| total > m);
            let too_old = max_age
                .is_some_and(|a| now_unix_ms.saturating_sub(*written) > a.as_millis() as u64);
            if !too_big && !too_old {
                break;
            }
            doomed.push(f.clone());
            total -= len;
        }
        if doomed.is_empty() {
            return Ok(0);
        }
        // the first line kept: the next file's first, or (everything closed
        // going) the one about to be written
        let mut first = None;
        for f in all.iter().skip(doomed.len()) {
            if let Some(l) = first_line(f)? {
                first = Some((l.seq, l.prev));
                break;
            }
        }
        let (first_seq, before) = first.unwrap_or((self.next_seq, self.prev.clone()));
        if first_seq > 0 {
            let record = match self.signer.clone() {
                Some(signer) => {
                    Checkpoint::sign(&*signer, first_seq - 1, &before, now_ms(), reason::PRUNED)
                        .map_err(AuditError::Sign)?
                        .record()
                }
                None => serde_json::json!({"event": "pruned", "before_seq": first_seq}),
            };
            self.write(record)?;
            // the head itself is not vouched for by this one
            self.signed_head = false;
            self.sync()?;
        }
        for f in &doomed {
            fs::remove_file(f).map_err(io(f))?;
        }
        tracing::info!(files = doomed.len(), dir = %self.dir.display(), "pruned the intent log");
        Ok(doomed.len())
    }
}

/// The first line of `file`, if it has one.
fn first_line(file: &Path) -> Result<Option<Line>> {
    let f = File::open(file).map_err(io(file))?;
    let mut buf = Vec::new();
    BufReader::new(f)
        .read_until(b'\n', &mut buf)
        .map_err(io(file))?;
    if !buf.ends_with(b"\n") {
        return Ok(None);
    }
    Ok(serde_json::from_slice(&buf[..buf.len() - 1]).ok())
}

/// The last line and its hash, from the last file (or the one before it,
/// if the last is empty); `None` for an empty log. Cuts a torn last line.
fn recover_tail(last: &Path, all: &[PathBuf]) -> Result<Option<(Line, String)>> {
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
            0 | 1 => Ok(None),
            n => recover_tail(&all[n - 2], &all[..n - 1]),
        };
    };
    let lines = data
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .count();
    let parsed: Line = serde_json::from_slice(line).map_err(|e| AuditError::Broken {
        file: last.to_path_buf(),
        line: lines,
        seq: 0,
        why: format!("the last line is not an intent-log line: {e}"),
    })?;
    let h = hash(line);
    Ok(Some((parsed, h)))
}

/// Reads every line of `files` in order, calling `each` with the file,
/// the line number (1-based), the line's bytes and the line (or why it
/// does not parse); stops when `each` returns false.
pub fn read_lines(
    files: &[PathBuf],
    mut each: impl FnMut(&Path, usize, &[u8], std::result::Result<Line, String>) -> bool,
) -> Result<()> {
    for file in files {
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
            let parsed = if buf.ends_with(b"\n") {
                serde_json::from_slice::<Line>(&buf[..buf.len() - 1])
                    .map_err(|e| format!("not an intent-log line: {e}"))
            } else {
                Err("the line is cut short".into())
            };
            let body = buf.strip_suffix(b"\n").unwrap_or(&buf);
            if !each(file, n, body, parsed) {
                return Ok(());
            }
        }
    }
    Ok(())
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
    fn an_edited_line_is_named_by_its_own_seq() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), 6, 1 << 20);
        let file = files(dir.path()).unwrap()[0].clone();
        let mut ls = lines(&file);
        ls[2] = ls[2].replace("\"r2\"", "\"r9\"");
        put(&file, &ls);
        match verify(&[file]).unwrap_err() {
            AuditError::Broken { seq, .. } => assert_eq!(seq, 2),
            other => panic!("{other}"),
        }
    }

    #[test]
    fn pruning_every_closed_file_still_leaves_a_signed_boundary() {
        let dir = tempfile::tempdir().unwrap();
        let key = Key::new("gw-1");
        let mut log = IntentLog::open(dir.path(), 600).unwrap();
        log.set_signer(key.clone());
        // smaller than one file: every closed file goes at each rotation
        log.set_retention(Retention {
            max_bytes: Some(100),
            max_age: None,
        });
        for i in 0..30 {
            log.append(json!({"request_id": format!("r{i}")})).unwrap();
        }
        log.checkpoint(reason::INTERVAL).unwrap();
        let r = report(dir.path(), &trusting(&key), &[]);
        assert!(r.first_seq > 0 && r.pruned_boundary, "{r:?}");
        assert!(r.problems.is_empty(), "{:?}", r.problems);
    }

    #[test]
    fn a_failed_write_leaves_the_chain_unbroken() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = IntentLog::open(dir.path(), 1 << 20).unwrap();
        log.append(json!({"request_id": "a"})).unwrap();
        // the file is read-only for a moment: the write fails
        let path = files(dir.path()).unwrap()[0].clone();
        let ro = OpenOptions::new().read(true).open(&path).unwrap();
        let good = std::mem::replace(&mut log.file, ro);
        assert!(log.append(json!({"request_id": "lost"})).is_err());
        log.file = good;
        log.append(json!({"request_id": "b"})).unwrap();
        log.sync().unwrap();
        assert_eq!(verify(&[dir.path().to_path_buf()]).unwrap().lines, 2);
    }

    #[test]
    fn a_log_whose_first_kept_line_is_a_checkpoint_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let key = Key::new("gw-1");
        signed(dir.path(), &key, 8, 4, 1 << 20);
        let file = files(dir.path()).unwrap()[0].clone();
        let ls = lines(&file);
        // from the second checkpoint's line on, as a later file would start
        let at = ls
            .iter()
            .rposition(|l| l.contains("\"event\":\"checkpoint\""))
            .unwrap();
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join(file_name(3));
        put(&f, &ls[at..]);
        let r = check(std::slice::from_ref(&f), &Options::default()).unwrap();
        assert!(r.problems.is_empty(), "{:?}", r.problems);
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

    /// A node's key and certificate, as the cluster CA would issue them
    /// (self-signed here: the test's [`Trust`] knows each by its bytes).
    struct Key {
        name: String,
        cert: Vec<u8>,
        pkcs8: Vec<u8>,
    }

    impl Key {
        fn new(name: &str) -> Arc<Self> {
            let kp = rcgen::KeyPair::generate().unwrap();
            let cert = rcgen::CertificateParams::new(vec![name.to_string()])
                .unwrap()
                .self_signed(&kp)
                .unwrap();
            Arc::new(Self {
                name: name.into(),
                cert: cert.der().to_vec(),
                pkcs8: kp.serialize_der(),
            })
        }
    }

    impl Signer for Key {
        fn node(&self) -> &str {
            &self.name
        }
        fn cert_der(&self) -> &[u8] {
            &self.cert
        }
        fn sign(&self, msg: &[u8]) -> std::result::Result<Vec<u8>, String> {
            let rng = ring::rand::SystemRandom::new();
            let kp = ring::signature::EcdsaKeyPair::from_pkcs8(
                &ring::signature::ECDSA_P256_SHA256_ASN1_SIGNING,
                &self.pkcs8,
                &rng,
            )
            .map_err(|e| e.to_string())?;
            Ok(kp
                .sign(&rng, msg)
                .map_err(|e| e.to_string())?
                .as_ref()
                .to_vec())
        }
    }

    /// The cluster: the keys it issued, and those it revoked.
    struct Cluster {
        issued: Vec<Arc<Key>>,
        revoked: Vec<Vec<u8>>,
    }

    impl Trust for Cluster {
        fn check(&self, cert: &[u8], _at: u64) -> std::result::Result<String, String> {
            if self.revoked.iter().any(|r| r == cert) {
                return Err("the certificate was revoked".into());
            }
            self.issued
                .iter()
                .find(|k| k.cert == cert)
                .map(|k| k.name.clone())
                .ok_or_else(|| "not issued by this cluster's CA".into())
        }
    }

    /// A signed log of `n` lines in files of `max` bytes, checkpointed
    /// every `every` lines; its latest checkpoint.
    fn signed(dir: &Path, key: &Arc<Key>, n: u64, every: u64, max: u64) -> Option<Checkpoint> {
        let mut log = IntentLog::open(dir, max).unwrap();
        log.set_signer(key.clone());
        for i in 0..n {
            log.append(json!({"request_id": format!("r{i}"), "choice": "local"}))
                .unwrap();
            if (i + 1) % every == 0 {
                log.checkpoint(reason::INTERVAL).unwrap();
            }
        }
        log.sync().unwrap();
        log.latest_checkpoint().cloned()
    }

    fn trusting(key: &Arc<Key>) -> Cluster {
        Cluster {
            issued: vec![key.clone()],
            revoked: vec![],
        }
    }

    fn report(dir: &Path, trust: &Cluster, anchors: &[Checkpoint]) -> Report {
        check(
            &[dir.to_path_buf()],
            &Options {
                trust: Some(trust),
                anchors,
                node: None,
            },
        )
        .unwrap()
    }

    /// Rewrites line `at` of `file` with `edit` and recomputes the chain
    /// from there on, as an attacker without the key can.
    fn rewrite_and_rechain(file: &Path, at: usize, edit: impl FnOnce(&mut Line)) {
        let mut ls: Vec<Line> = lines(file)
            .iter()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        edit(&mut ls[at]);
        let mut prev = ls[at].prev.clone();
        let mut out = Vec::new();
        for l in ls.iter_mut() {
            if l.seq as usize >= at {
                l.prev = prev.clone();
            }
            let s = serde_json::to_string(l).unwrap();
            prev = hash(s.as_bytes());
            out.push(s);
        }
        put(file, &out);
    }

    #[test]
    fn signed_checkpoints_verify_against_the_cluster() {
        let dir = tempfile::tempdir().unwrap();
        let key = Key::new("gw-1");
        let cp = signed(dir.path(), &key, 12, 4, 1 << 20).unwrap();
        let r = report(dir.path(), &trusting(&key), &[cp]);
        assert!(r.problems.is_empty(), "{:?}", r.problems);
        assert_eq!((r.checkpoints, r.anchors_checked), (3, 1));
        assert_eq!(r.node.as_deref(), Some("gw-1"));
    }

    #[test]
    fn a_rewritten_line_whose_chain_was_recomputed_fails_at_the_next_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let key = Key::new("gw-1");
        // lines 0..=3, checkpoint 4, lines 5..=8, checkpoint 9, ...
        signed(dir.path(), &key, 12, 4, 1 << 20);
        let file = files(dir.path()).unwrap()[0].clone();
        rewrite_and_rechain(&file, 6, |l| l.record["choice"] = json!("elsewhere"));
        let r = report(dir.path(), &trusting(&key), &[]);
        let p = r.first_problem().expect("the rewrite is found");
        assert_eq!(p.seq, 5, "{p}");
        assert!(p.why.contains("rewritten"), "{p}");
    }

    #[test]
    fn lines_cut_off_after_the_last_checkpoint_are_found_against_the_coordinators() {
        let dir = tempfile::tempdir().unwrap();
        let key = Key::new("gw-1");
        let held = signed(dir.path(), &key, 8, 4, 1 << 20).unwrap();
        // the node went on writing; its next checkpoint reached the coordinators
        let anchor = signed(dir.path(), &key, 4, 4, 1 << 20).unwrap();
        assert!(anchor.seq > held.seq);
        let file = files(dir.path()).unwrap()[0].clone();
        let ls = lines(&file);
        put(&file, &ls[..=held.seq as usize + 1]);
        let r = report(dir.path(), &trusting(&key), std::slice::from_ref(&anchor));
        let p = r.first_problem().expect("the cut is found");
        assert_eq!(p.seq, held.seq + 2, "{p}");
        assert!(p.why.contains("cut off"), "{p}");
    }

    #[test]
    fn a_log_rewritten_with_its_checkpoints_removed_fails_against_the_coordinators() {
        let dir = tempfile::tempdir().unwrap();
        let key = Key::new("gw-1");
        let anchor = signed(dir.path(), &key, 8, 4, 1 << 20).unwrap();
        let file = files(dir.path()).unwrap()[0].clone();
        // drop the checkpoint lines, renumber, rechain
        let mut kept: Vec<Line> = lines(&file)
            .iter()
            .map(|l| serde_json::from_str::<Line>(l).unwrap())
            .filter(|l| Checkpoint::from_record(&l.record).is_none())
            .collect();
        kept.extend((0..2).map(|i| Line {
            seq: 0,
            prev: String::new(),
            at_unix_ms: 0,
            record: json!({"request_id": format!("pad{i}")}),
        }));
        let mut prev = GENESIS.to_string();
        let mut out = Vec::new();
        for (i, l) in kept.iter_mut().enumerate() {
            (l.seq, l.prev) = (i as u64, prev.clone());
            let s = serde_json::to_string(l).unwrap();
            prev = hash(s.as_bytes());
            out.push(s);
        }
        put(&file, &out);
        let r = check(
            &[dir.path().to_path_buf()],
            &Options {
                trust: Some(&trusting(&key)),
                anchors: std::slice::from_ref(&anchor),
                node: Some("gw-1"),
            },
        )
        .unwrap();
        let p = r.first_problem().expect("the rewrite is found");
        assert_eq!(p.seq, 0, "{p}");
    }

    #[test]
    fn a_checkpoint_signed_by_a_foreign_key_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let (key, stranger) = (Key::new("gw-1"), Key::new("gw-1"));
        signed(dir.path(), &key, 4, 4, 1 << 20);
        signed(dir.path(), &stranger, 4, 4, 1 << 20);
        let p = report(dir.path(), &trusting(&key), &[])
            .first_problem()
            .cloned()
            .expect("the stranger's checkpoint is refused");
        assert_eq!(p.seq, 5, "{p}");
        assert!(p.why.contains("not issued by this cluster"), "{p}");
    }

    #[test]
    fn a_checkpoint_signed_by_a_revoked_key_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let key = Key::new("gw-1");
        signed(dir.path(), &key, 4, 4, 1 << 20);
        let cluster = Cluster {
            issued: vec![key.clone()],
            revoked: vec![key.cert.clone()],
        };
        let p = report(dir.path(), &cluster, &[])
            .first_problem()
            .cloned()
            .expect("the revoked key's checkpoint is refused");
        assert_eq!(p.seq, 0, "{p}");
        assert!(p.why.contains("revoked"), "{p}");
    }

    #[test]
    fn a_file_deleted_from_the_middle_is_reported_with_its_first_missing_seq() {
        let dir = tempfile::tempdir().unwrap();
        let key = Key::new("gw-1");
        signed(dir.path(), &key, 40, 5, 600);
        let fs_ = files(dir.path()).unwrap();
        assert!(fs_.len() > 3);
        let gone = first_line(&fs_[2]).unwrap().unwrap().seq;
        fs::remove_file(&fs_[2]).unwrap();
        let p = report(dir.path(), &trusting(&key), &[])
            .first_problem()
            .cloned()
            .unwrap();
        assert_eq!(p.seq, gone, "{p}");
    }

    #[test]
    fn each_closed_file_ends_with_a_rotation_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let key = Key::new("gw-1");
        signed(dir.path(), &key, 30, 1000, 500);
        let fs_ = files(dir.path()).unwrap();
        for f in &fs_[..fs_.len() - 1] {
            let last: Line = serde_json::from_str(lines(f).last().unwrap()).unwrap();
            let cp = Checkpoint::from_record(&last.record).unwrap().unwrap();
            assert_eq!(cp.reason, reason::ROTATION);
        }
    }

    #[test]
    fn pruning_keeps_a_log_that_verifies_from_its_signed_boundary() {
        let dir = tempfile::tempdir().unwrap();
        let key = Key::new("gw-1");
        let mut log = IntentLog::open(dir.path(), 600).unwrap();
        log.set_signer(key.clone());
        log.set_retention(Retention {
            max_bytes: Some(3000),
            max_age: None,
        });
        for i in 0..80 {
            log.append(json!({"request_id": format!("r{i}")})).unwrap();
        }
        log.checkpoint(reason::INTERVAL).unwrap();
        let r = report(dir.path(), &trusting(&key), &[]);
        assert!(r.first_seq > 0, "nothing was pruned");
        assert!(r.pruned_boundary);
        assert!(r.problems.is_empty(), "{:?}", r.problems);
        let sizes: Vec<u64> = files(dir.path())
            .unwrap()
            .iter()
            .map(|f| fs::metadata(f).unwrap().len())
            .collect();
        let closed: u64 = sizes[..sizes.len() - 1].iter().sum();
        assert!(closed <= 3000, "{closed} bytes kept in closed files");
    }

    #[test]
    fn oldest_files_deleted_without_pruning_are_caught() {
        let dir = tempfile::tempdir().unwrap();
        let key = Key::new("gw-1");
        signed(dir.path(), &key, 40, 5, 600);
        let fs_ = files(dir.path()).unwrap();
        fs::remove_file(&fs_[0]).unwrap();
        let p = report(dir.path(), &trusting(&key), &[])
            .first_problem()
            .cloned()
            .unwrap();
        assert_eq!(p.seq, 0, "{p}");
        assert!(p.why.contains("no signed boundary"), "{p}");
    }

    #[test]
    fn files_older_than_the_age_limit_are_pruned() {
        let dir = tempfile::tempdir().unwrap();
        let key = Key::new("gw-1");
        signed(dir.path(), &key, 40, 5, 600);
        let mut log = IntentLog::open(dir.path(), 600).unwrap();
        log.set_signer(key.clone());
        log.set_retention(Retention {
            max_bytes: None,
            max_age: Some(Duration::from_secs(60)),
        });
        // as if an hour went by
        let removed = log.prune(now_ms() + 3_600_000).unwrap();
        assert!(removed > 0);
        let r = report(dir.path(), &trusting(&key), &[]);
        assert!(r.problems.is_empty(), "{:?}", r.problems);
        assert_eq!(files(dir.path()).unwrap().len(), 1);
    }

    #[test]
    fn a_checkpoint_is_written_only_when_there_is_something_new() {
        let dir = tempfile::tempdir().unwrap();
        let key = Key::new("gw-1");
        let mut log = IntentLog::open(dir.path(), 1 << 20).unwrap();
        log.set_signer(key.clone());
        assert!(log.checkpoint(reason::INTERVAL).unwrap().is_none());
        log.append(json!({"request_id": "r"})).unwrap();
        assert!(log.checkpoint(reason::INTERVAL).unwrap().is_some());
        assert!(log.checkpoint(reason::SHUTDOWN).unwrap().is_none());
    }
}
