//! The Raft log, hard state and snapshot: [`LogStore`] is what raft-rs reads
//! (it implements `raft::Storage`); every write goes first to a [`Durable`]
//! backend, which returns only once the bytes are safe (fsync), so nothing a
//! member acknowledged is lost in a crash.
//!
//! Backends: [`DirDisk`] (files in a directory) and [`MemDisk`] (memory that
//! outlives a simulated crash, for the deterministic harness).

use std::cell::Cell;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use protobuf::Message as _;
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot};
use raft::{GetEntriesContext, RaftState, Storage, StorageError};

/// Everything a member keeps across a restart.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Recovered {
    /// Term, vote and commit index.
    pub hard_state: HardState,
    /// Voters and learners.
    pub conf_state: ConfState,
    /// The latest snapshot (empty if none).
    pub snapshot: Snapshot,
    /// Log entries after the snapshot.
    pub entries: Vec<Entry>,
}

/// Where the log goes to survive a crash. Every call returns only when what
/// it wrote is durable.
pub trait Durable: Send {
    /// Writes `entries`, replacing any entries from `entries[0].index` on.
    fn append(&mut self, entries: &[Entry]) -> io::Result<()>;
    /// Writes the hard state.
    fn set_hard_state(&mut self, hs: &HardState) -> io::Result<()>;
    /// Writes the configuration.
    fn set_conf_state(&mut self, cs: &ConfState) -> io::Result<()>;
    /// Writes a snapshot and drops the entries it covers; with `replace_log`
    /// (a snapshot from the leader), drops every entry.
    fn save_snapshot(&mut self, snap: &Snapshot, replace_log: bool) -> io::Result<()>;
    /// Reads everything back.
    fn load(&mut self) -> io::Result<Recovered>;
}

/// A durable store kept in memory: a clone is a handle to the same "disk",
/// so a test can drop a member (a crash) and start it again from it.
#[derive(Debug, Clone, Default)]
pub struct MemDisk(Arc<Mutex<Recovered>>);

impl MemDisk {
    /// An empty disk.
    pub fn new() -> Self {
        Self::default()
    }
}

fn replace_from(log: &mut Vec<Entry>, entries: &[Entry]) {
    if let Some(first) = entries.first() {
        log.retain(|e| e.index < first.index);
        log.extend_from_slice(entries);
    }
}

impl Durable for MemDisk {
    fn append(&mut self, entries: &[Entry]) -> io::Result<()> {
        replace_from(
            &mut self.0.lock().expect("memory disk lock").entries,
            entries,
        );
        Ok(())
    }

    fn set_hard_state(&mut self, hs: &HardState) -> io::Result<()> {
        self.0.lock().expect("memory disk lock").hard_state = hs.clone();
        Ok(())
    }

    fn set_conf_state(&mut self, cs: &ConfState) -> io::Result<()> {
        self.0.lock().expect("memory disk lock").conf_state = cs.clone();
        Ok(())
    }

    fn save_snapshot(&mut self, snap: &Snapshot, replace_log: bool) -> io::Result<()> {
        let mut r = self.0.lock().expect("memory disk lock");
        let index = snap.get_metadata().index;
        r.entries.retain(|e| !replace_log && e.index > index);
        r.snapshot = snap.clone();
        Ok(())
    }

    fn load(&mut self) -> io::Result<Recovered> {
        Ok(self.0.lock().expect("memory disk lock").clone())
    }
}

/// Largest log record accepted on load; anything bigger is corruption.
pub const MAX_RECORD_BYTES: usize = 64 << 20;

/// Files in one directory: `log` (records of length, crc32 and an encoded
/// entry), and `hardstate`, `confstate`, `snapshot` (each replaced
/// atomically: temporary file, fsync, rename, fsync of the directory).
#[derive(Debug)]
pub struct DirDisk {
    dir: PathBuf,
    log: File,
    /// (index, byte offset) of every entry in the log file.
    offsets: Vec<(u64, u64)>,
}

impl DirDisk {
    /// Opens (or creates) the store in `dir`. A torn record at the end of
    /// the log (a crash mid-write, never acknowledged) is cut off.
    pub fn open(dir: &Path) -> io::Result<Self> {
        fs::create_dir_all(dir)?;
        let path = dir.join("log");
        let mut log = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)?;
        let mut bytes = Vec::new();
        log.read_to_end(&mut bytes)?;
        let (entries, good) = parse_log(&bytes);
        if good < bytes.len() as u64 {
            log.set_len(good)?;
            log.sync_all()?;
        }
        let mut d = Self {
            dir: dir.to_path_buf(),
            log,
            offsets: Vec::new(),
        };
        let mut off = 0;
        for (e, len) in entries {
            d.offsets.push((e.index, off));
            off += len;
        }
        Ok(d)
    }

    fn write_atomic(&self, name: &str, bytes: &[u8]) -> io::Result<()> {
        let tmp = self.dir.join(format!("{name}.tmp"));
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, self.dir.join(name))?;
        File::open(&self.dir)?.sync_all()
    }

    fn read_opt(&self, name: &str) -> io::Result<Option<Vec<u8>>> {
        match fs::read(self.dir.join(name)) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }
}

fn record(e: &Entry) -> io::Result<Vec<u8>> {
    let body = e.write_to_bytes().map_err(io::Error::other)?;
    let mut out = Vec::with_capacity(body.len() + 8);
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

/// The entries of a log file with their record lengths, and the length of
/// its good prefix.
fn parse_log(bytes: &[u8]) -> (Vec<(Entry, u64)>, u64) {
    let mut out = Vec::new();
    let mut at = 0usize;
    while bytes.len() - at >= 8 {
        let len = u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes")) as usize;
        let crc = u32::from_le_bytes(bytes[at + 4..at + 8].try_into().expect("4 bytes"));
        if len > MAX_RECORD_BYTES || bytes.len() - at - 8 < len {
            break;
        }
        let body = &bytes[at + 8..at + 8 + len];
        if crc32fast::hash(body) != crc {
            break;
        }
        let Ok(e) = Entry::parse_from_bytes(body) else {
            break;
        };
        out.push((e, (len + 8) as u64));
        at += len + 8;
    }
    (out, at as u64)
}

fn decode<M: protobuf::Message>(what: &str, b: &[u8]) -> io::Result<M> {
    M::parse_from_bytes(b)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{what}: {e}")))
}

impl Durable for DirDisk {
    fn append(&mut self, entries: &[Entry]) -> io::Result<()> {
        let Some(first) = entries.first() else {
            return Ok(());
        };
        // cut the file where the replaced entries began
        let keep = self.offsets.partition_point(|&(i, _)| i < first.index);
        let end = match self.offsets.get(keep) {
            Some(&(_, off)) => {
                self.log.set_len(off)?;
                off
            }
            None => self.log.seek(SeekFrom::End(0))?,
        };
        self.offsets.truncate(keep);
        self.log.seek(SeekFrom::Start(end))?;
        let mut buf = Vec::new();
        let mut off = end;
        for e in entries {
            let r = record(e)?;
            self.offsets.push((e.index, off));
            off += r.len() as u64;
            buf.extend_from_slice(&r);
        }
        self.log.write_all(&buf)?;
        self.log.sync_data()
    }

    fn set_hard_state(&mut self, hs: &HardState) -> io::Result<()> {
        self.write_atomic("hardstate", &hs.write_to_bytes().map_err(io::Error::other)?)
    }

    fn set_conf_state(&mut self, cs: &ConfState) -> io::Result<()> {
        self.write_atomic("confstate", &cs.write_to_bytes().map_err(io::Error::other)?)
    }

    fn save_snapshot(&mut self, snap: &Snapshot, replace_log: bool) -> io::Result<()> {
        self.write_atomic(
            "snapshot",
            &snap.write_to_bytes().map_err(io::Error::other)?,
        )?;
        // rewrite the log without the entries the snapshot covers
        let index = snap.get_metadata().index;
        let mut bytes = Vec::new();
        self.log.seek(SeekFrom::Start(0))?;
        self.log.read_to_end(&mut bytes)?;
        let (entries, _) = parse_log(&bytes);
        let mut out = Vec::new();
        let mut offsets = Vec::new();
        for (e, _) in entries
            .iter()
            .filter(|(e, _)| !replace_log && e.index > index)
        {
            offsets.push((e.index, out.len() as u64));
            out.extend_from_slice(&record(e)?);
        }
        self.write_atomic("log", &out)?;
        self.log = OpenOptions::new()
            .read(true)
            .write(true)
            .open(self.dir.join("log"))?;
        self.offsets = offsets;
        Ok(())
    }

    fn load(&mut self) -> io::Result<Recovered> {
        let mut r = Recovered::default();
        if let Some(b) = self.read_opt("hardstate")? {
            r.hard_state = decode("hardstate", &b)?;
        }
        if let Some(b) = self.read_opt("confstate")? {
            r.conf_state = decode("confstate", &b)?;
        }
        if let Some(b) = self.read_opt("snapshot")? {
            r.snapshot = decode("snapshot", &b)?;
        }
        let mut bytes = Vec::new();
        self.log.seek(SeekFrom::Start(0))?;
        self.log.read_to_end(&mut bytes)?;
        let snap_index = r.snapshot.get_metadata().index;
        r.entries = parse_log(&bytes)
            .0
            .into_iter()
            .map(|(e, _)| e)
            .filter(|e| e.index > snap_index)
            .collect();
        Ok(r)
    }
}

/// The log as raft-rs sees it: memory in front of a [`Durable`] backend.
pub struct LogStore {
    disk: Box<dyn Durable>,
    /// The hard state as last written to disk. Term and vote are written
    /// before raft acts on them; the commit index only when a snapshot
    /// needs it (raft re-learns it from the leader after a restart), which
    /// saves a file write and an fsync per commit.
    durable_hs: HardState,
    /// Set when a peer needed a snapshot the latest one cannot serve (it
    /// predates the peer joining); the coordinator then takes a fresh one.
    wants_snapshot: Cell<bool>,
    hard_state: HardState,
    conf_state: ConfState,
    snapshot: Snapshot,
    entries: Vec<Entry>,
}

impl LogStore {
    /// Opens the store, loading what `disk` holds.
    pub fn open(mut disk: Box<dyn Durable>) -> io::Result<Self> {
        let r = disk.load()?;
        Ok(Self {
            disk,
            wants_snapshot: Cell::new(false),
            durable_hs: r.hard_state.clone(),
            hard_state: r.hard_state,
            conf_state: r.conf_state,
            snapshot: r.snapshot,
            entries: r.entries,
        })
    }

    /// Starts a brand-new cluster: an initial snapshot at index 1, term 1,
    /// holding the first configuration and the empty state `data`. Every
    /// founding member writes the same one. Members added later are caught
    /// up from a snapshot, so they learn the configuration from it rather
    /// than from a log that never recorded the founders.
    pub fn bootstrap(&mut self, voters: Vec<u64>, data: Vec<u8>) -> io::Result<()> {
        let cs = ConfState {
            voters,
            ..ConfState::default()
        };
        let mut snap = Snapshot {
            data: data.into(),
            ..Snapshot::default()
        };
        let meta = snap.mut_metadata();
        meta.index = 1;
        meta.term = 1;
        meta.set_conf_state(cs);
        self.apply_snapshot(snap)
    }

    /// Whether the store holds anything (a member that ran before).
    pub fn is_initialized(&self) -> bool {
        !self.conf_state.voters.is_empty() || self.hard_state.term > 0
    }

    /// Appends entries from raft (durably first).
    pub fn append(&mut self, entries: &[Entry]) -> io::Result<()> {
        if entries.is_empty() {
            return Ok(());
        }
        self.disk.append(entries)?;
        replace_from(&mut self.entries, entries);
        Ok(())
    }

    /// Stores the hard state: durably first when the term or vote changed.
    pub fn set_hard_state(&mut self, hs: HardState) -> io::Result<()> {
        if hs.term != self.durable_hs.term || hs.vote != self.durable_hs.vote {
            self.write_hard_state(&hs)?;
        }
        self.hard_state = hs;
        Ok(())
    }

    fn write_hard_state(&mut self, hs: &HardState) -> io::Result<()> {
        self.disk.set_hard_state(hs)?;
        self.durable_hs = hs.clone();
        Ok(())
    }

    /// Moves the commit index (in memory; see `durable_hs`).
    pub fn set_commit(&mut self, commit: u64) -> io::Result<()> {
        let mut hs = self.hard_state.clone();
        hs.commit = commit;
        self.set_hard_state(hs)
    }

    /// Stores the configuration (durably first).
    pub fn set_conf_state(&mut self, cs: ConfState) -> io::Result<()> {
        self.disk.set_conf_state(&cs)?;
        self.conf_state = cs;
        Ok(())
    }

    /// Installs a snapshot received from the leader.
    pub fn apply_snapshot(&mut self, snap: Snapshot) -> io::Result<()> {
        let meta = snap.get_metadata();
        // the leader's snapshot replaces the whole log: entries past it may
        // be from a stale term
        self.disk.save_snapshot(&snap, true)?;
        let mut hs = self.hard_state.clone();
        hs.term = hs.term.max(meta.term);
        hs.commit = hs.commit.max(meta.index);
        self.set_conf_state(meta.get_conf_state().clone())?;
        self.write_hard_state(&hs)?;
        self.hard_state = hs;
        self.entries.clear();
        self.snapshot = snap;
        Ok(())
    }

    /// Takes a snapshot of applied state `data` at `index` and drops the log
    /// up to it.
    pub fn compact(&mut self, index: u64, data: Vec<u8>) -> raft::Result<()> {
        let term = self.term(index)?;
        let mut snap = Snapshot {
            data: data.into(),
            ..Snapshot::default()
        };
        let meta = snap.mut_metadata();
        meta.index = index;
        meta.term = term;
        meta.set_conf_state(self.conf_state.clone());
        let store_err = |e: io::Error| raft::Error::Store(StorageError::Other(Box::new(e)));
        self.disk.save_snapshot(&snap, false).map_err(store_err)?;
        // a restart applies from the snapshot, so the commit index on disk
        // must reach it
        if self.durable_hs.commit < index {
            let hs = self.hard_state.clone();
            self.write_hard_state(&hs).map_err(store_err)?;
        }
        self.entries.retain(|e| e.index > index);
        self.snapshot = snap;
        Ok(())
    }

    /// Whether a peer asked for a snapshot newer than the latest (and
    /// clears the request).
    pub fn take_snapshot_request(&self) -> bool {
        self.wants_snapshot.replace(false)
    }

    /// The latest snapshot.
    pub fn latest_snapshot(&self) -> &Snapshot {
        &self.snapshot
    }

    /// Entries held in memory (after the snapshot).
    pub fn entry_count(&self) -> usize {
        self.entries.len()
    }

    fn snap_index(&self) -> u64 {
        self.snapshot.get_metadata().index
    }
}

impl Storage for LogStore {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState::new(
            self.hard_state.clone(),
            self.conf_state.clone(),
        ))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        if low <= self.snap_index() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        let last = self.last_index()?;
        if high > last + 1 {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        let offset = self.snap_index() + 1;
        let mut out = Vec::new();
        let mut size = 0u64;
        let max = max_size.into().unwrap_or(u64::MAX);
        for e in &self.entries[(low - offset) as usize..(high - offset) as usize] {
            size += u64::from(e.compute_size());
            if !out.is_empty() && size > max {
                break;
            }
            out.push(e.clone());
        }
        Ok(out)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        let snap = self.snapshot.get_metadata();
        if idx == snap.index {
            return Ok(snap.term);
        }
        if idx < snap.index {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        let offset = snap.index + 1;
        self.entries
            .get((idx - offset) as usize)
            .map(|e| e.term)
            .ok_or(raft::Error::Store(StorageError::Unavailable))
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.snap_index() + 1)
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.entries.last().map_or(self.snap_index(), |e| e.index))
    }

    fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<Snapshot> {
        let cs = self.snapshot.get_metadata().get_conf_state();
        let knows_peer = cs.voters.contains(&to) || cs.learners.contains(&to);
        if self.snap_index() < request_index || !knows_peer || self.snap_index() == 0 {
            self.wants_snapshot.set(true);
            return Err(raft::Error::Store(
                StorageError::SnapshotTemporarilyUnavailable,
            ));
        }
        Ok(self.snapshot.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(index: u64, term: u64, data: &[u8]) -> Entry {
        Entry {
            index,
            term,
            data: data.to_vec().into(),
            ..Entry::default()
        }
    }

    fn indices(r: &Recovered) -> Vec<(u64, u64)> {
        r.entries.iter().map(|e| (e.index, e.term)).collect()
    }

    /// Writes a log of entries 1 to 3 (term 1) that a new leader then
    /// overwrote from index 2 (term 2, up to 4), and a hard state, then
    /// closes the disk.
    fn write_an_overwritten_log(dir: &Path) {
        let mut d = DirDisk::open(dir).unwrap();
        d.append(&[entry(1, 1, b"a"), entry(2, 1, b"b"), entry(3, 1, b"c")])
            .unwrap();
        d.append(&[entry(2, 2, b"B"), entry(3, 2, b"C"), entry(4, 2, b"D")])
            .unwrap();
        let hs = HardState {
            term: 2,
            vote: 3,
            commit: 3,
            ..HardState::default()
        };
        d.set_hard_state(&hs).unwrap();
    }

    /// The overwritten log, reopened, with a snapshot at 2 saved and entry 5
    /// appended after it; what a second reopen recovers.
    fn compacted(dir: &Path) -> Recovered {
        write_an_overwritten_log(dir);
        let mut d = DirDisk::open(dir).unwrap();
        d.load().unwrap();
        let mut snap = Snapshot {
            data: b"state".to_vec().into(),
            ..Snapshot::default()
        };
        snap.mut_metadata().index = 2;
        snap.mut_metadata().term = 2;
        d.save_snapshot(&snap, false).unwrap();
        d.append(&[entry(5, 2, b"E")]).unwrap();
        drop(d);
        DirDisk::open(dir).unwrap().load().unwrap()
    }

    #[test]
    fn an_overwritten_log_reads_back_after_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        write_an_overwritten_log(dir.path());
        let r = DirDisk::open(dir.path()).unwrap().load().unwrap();
        assert_eq!(indices(&r), vec![(1, 1), (2, 2), (3, 2), (4, 2)]);
        assert_eq!(&r.entries[1].data[..], b"B");
    }

    #[test]
    fn the_hard_state_survives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        write_an_overwritten_log(dir.path());
        let r = DirDisk::open(dir.path()).unwrap().load().unwrap();
        assert_eq!(
            (r.hard_state.term, r.hard_state.vote, r.hard_state.commit),
            (2, 3, 3)
        );
    }

    #[test]
    fn a_snapshot_drops_the_entries_it_covers_on_disk_too() {
        let dir = tempfile::tempdir().unwrap();
        let r = compacted(dir.path());
        assert_eq!(indices(&r), vec![(3, 2), (4, 2), (5, 2)]);
    }

    #[test]
    fn a_saved_snapshot_survives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let r = compacted(dir.path());
        assert_eq!(&r.snapshot.data[..], b"state");
        assert_eq!(r.snapshot.get_metadata().index, 2);
    }

    /// Writes entries 1 and 2, then half of entry 3's record: a crash in
    /// the middle of writing it.
    fn write_a_torn_log(dir: &Path) {
        {
            let mut d = DirDisk::open(dir).unwrap();
            d.append(&[entry(1, 1, b"one"), entry(2, 1, b"two")])
                .unwrap();
        }
        let log = dir.join("log");
        let mut bytes = fs::read(&log).unwrap();
        let full = record(&entry(3, 1, b"three")).unwrap();
        bytes.extend_from_slice(&full[..full.len() / 2]);
        fs::write(&log, &bytes).unwrap();
    }

    #[test]
    fn a_torn_record_at_the_end_is_cut_off_and_the_rest_kept() {
        let dir = tempfile::tempdir().unwrap();
        write_a_torn_log(dir.path());
        let mut d = DirDisk::open(dir.path()).unwrap();
        assert_eq!(indices(&d.load().unwrap()), vec![(1, 1), (2, 1)]);
    }

    #[test]
    fn appending_after_a_torn_record_goes_on_after_the_good_prefix() {
        let dir = tempfile::tempdir().unwrap();
        write_a_torn_log(dir.path());
        let mut d = DirDisk::open(dir.path()).unwrap();
        d.load().unwrap();
        d.append(&[entry(3, 1, b"three")]).unwrap();
        drop(d);
        let r = DirDisk::open(dir.path()).unwrap().load().unwrap();
        assert_eq!(indices(&r), vec![(1, 1), (2, 1), (3, 1)]);
    }

    #[test]
    fn a_corrupted_record_ends_the_log_there() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut d = DirDisk::open(dir.path()).unwrap();
            d.append(&[
                entry(1, 1, b"one"),
                entry(2, 1, b"two"),
                entry(3, 1, b"three"),
            ])
            .unwrap();
        }
        let log = dir.path().join("log");
        let mut bytes = fs::read(&log).unwrap();
        let second = record(&entry(1, 1, b"one")).unwrap().len();
        bytes[second + 10] ^= 0xff; // flip a byte inside entry 2
        fs::write(&log, &bytes).unwrap();
        let r = DirDisk::open(dir.path()).unwrap().load().unwrap();
        assert_eq!(indices(&r), vec![(1, 1)]);
    }
}
