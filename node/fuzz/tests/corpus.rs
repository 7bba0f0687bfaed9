//! Replays every fuzz input (the committed corpus, `fuzz/corpus/<target>`,
//! where each crash found is kept as `regression-*` once fixed, and any
//! fresh crash in the uncommitted `fuzz/artifacts/<target>`) through its
//! target: none may panic, take longer than [`TIME_LIMIT`], or allocate
//! more at once than the target's declared limit. One test per target.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The system allocator, counting what the current thread has live and
/// its peak, so one input's cost is measured apart from other tests'.
struct Counting;

thread_local! {
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

// SAFETY: every call goes to the system allocator unchanged; the counters
// are const-initialized thread locals, which allocate nothing.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            let _ = LIVE.try_with(|live| {
                let now = live.get() + l.size() as isize;
                live.set(now);
                let _ = PEAK.try_with(|peak| peak.set(peak.get().max(now)));
            });
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) };
        let _ = LIVE.try_with(|live| live.set(live.get() - l.size() as isize));
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Longest one input may take (a debug build of weft's crates).
const TIME_LIMIT: Duration = Duration::from_secs(10);

fn inputs(target: &str) -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz");
    let mut out = Vec::new();
    for dir in ["corpus", "artifacts"] {
        if let Ok(entries) = std::fs::read_dir(root.join(dir).join(target)) {
            out.extend(entries.flatten().map(|e| e.path()).filter(|p| p.is_file()));
        }
    }
    out.sort();
    out
}

/// Runs every input of `name` on one thread, each measured alone.
fn replay(name: &str) {
    let target = weft_fuzz::TARGETS
        .iter()
        .find(|t| t.name == name)
        .expect("a target of that name");
    let files = inputs(name);
    assert!(
        !files.is_empty(),
        "no corpus for {name} (fuzz/corpus/{name})"
    );
    let (run, limit) = (target.run, target.alloc_limit);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        weft_fuzz::warm_up();
        for f in files {
            let data = std::fs::read(&f).unwrap();
            let before = LIVE.with(Cell::get);
            PEAK.with(|p| p.set(before));
            let t = Instant::now();
            let outcome = std::panic::catch_unwind(|| run(&data));
            let took = t.elapsed();
            let grew = PEAK.with(Cell::get) - before;
            if tx.send((f, outcome.is_ok(), took, grew)).is_err() {
                return;
            }
        }
    });
    loop {
        match rx.recv_timeout(TIME_LIMIT) {
            Ok((f, ok, took, grew)) => {
                assert!(ok, "{} panicked", f.display());
                assert!(took <= TIME_LIMIT, "{} took {took:?}", f.display());
                assert!(
                    grew <= limit as isize,
                    "{} allocated {} KiB at once (limit {} KiB)",
                    f.display(),
                    grew >> 10,
                    limit >> 10
                );
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                panic!("an input of {name} ran past {TIME_LIMIT:?}")
            }
        }
    }
}

#[test]
fn the_gguf_corpus_replays_clean() {
    replay("gguf");
}

#[test]
fn the_worker_frames_corpus_replays_clean() {
    replay("worker_frames");
}

#[test]
fn the_chain_frames_corpus_replays_clean() {
    replay("chain_frames");
}

#[test]
fn the_dataplane_head_corpus_replays_clean() {
    replay("dataplane_head");
}

#[test]
fn the_gossip_corpus_replays_clean() {
    replay("gossip");
}

#[test]
fn the_coordinator_messages_corpus_replays_clean() {
    replay("coordinator_messages");
}

#[test]
fn the_join_request_corpus_replays_clean() {
    replay("join_request");
}

#[test]
fn the_api_json_corpus_replays_clean() {
    replay("api_json");
}

#[test]
fn every_target_has_a_replay_test() {
    let here = include_str!("corpus.rs");
    for t in weft_fuzz::TARGETS {
        assert!(
            here.contains(&format!("replay(\"{}\")", t.name)),
            "{} is not replayed",
            t.name
        );
    }
}
