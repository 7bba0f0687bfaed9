//! A single-member group (what `weft up` embeds) on real files: what it
//! committed is there after a restart, across snapshots and compaction.

use weft_coordinator::{Command, ControlState, Coordinator, CoordinatorConfig, DirDisk, Member};
use weft_placement::SiteKind;

fn member(id: u64) -> Member {
    Member {
        id,
        name: format!("n{id}"),
        site: "edge-a".into(),
        kind: SiteKind::Edge,
        region: 0,
        memory_bytes: 8 << 30,
        tokens_per_s: 1000.0,
        slots: 8,
        accelerator: false,
        cost_per_token: 0.0,
        address: format!("127.0.0.1:{}", 7000 + id),
    }
}

fn open(dir: &std::path::Path, snapshot_every: u64) -> Coordinator {
    let disk = DirDisk::open(dir).unwrap();
    Coordinator::open(
        CoordinatorConfig {
            snapshot_every,
            ..CoordinatorConfig::new(1)
        },
        Box::new(disk),
        &[1],
        7,
    )
    .unwrap()
}

/// Ticks until the member leads (a single member elects itself).
fn lead(c: &mut Coordinator) {
    for _ in 0..100 {
        c.tick();
        c.process().unwrap();
        if c.is_leader() {
            return;
        }
    }
    panic!("a single member did not elect itself");
}

/// How often the restart tests snapshot: every 3 entries, or (in
/// effect) never.
const SNAPSHOT_EVERY: [u64; 2] = [3, 1_000];

/// A member that committed 20 members, removed one and revoked a
/// certificate, then was gone (a crash between calls) and was started
/// again on its files: the state it had committed, and the member again
/// once it leads (and so knows what was committed).
fn restarted(dir: &std::path::Path, snapshot_every: u64) -> (ControlState, Coordinator) {
    let before = {
        let mut c = open(dir, snapshot_every);
        lead(&mut c);
        for id in 10..30 {
            c.propose(&Command::PutMember(member(id))).unwrap();
            c.process().unwrap();
        }
        c.propose(&Command::RemoveMember { id: 12 }).unwrap();
        c.propose(&Command::Revoke {
            fingerprint: "ab:cd".into(),
        })
        .unwrap();
        c.process().unwrap();
        assert_eq!(c.state().members.len(), 19);
        c.state().clone()
    };
    let mut c = open(dir, snapshot_every);
    lead(&mut c);
    c.process().unwrap();
    (before, c)
}

#[test]
fn committed_state_survives_a_restart_with_and_without_snapshots() {
    for snapshot_every in SNAPSHOT_EVERY {
        let dir = tempfile::tempdir().unwrap();
        let (before, c) = restarted(dir.path(), snapshot_every);
        let mut after = c.state().clone();
        // the new term's entry is applied on top (see below)
        after.applied_index = before.applied_index;
        assert_eq!(after, before, "snapshot_every {snapshot_every}");
    }
}

#[test]
fn a_restarted_member_applies_its_new_terms_entry() {
    for snapshot_every in SNAPSHOT_EVERY {
        let dir = tempfile::tempdir().unwrap();
        let (before, c) = restarted(dir.path(), snapshot_every);
        assert!(
            c.state().applied_index > before.applied_index,
            "the new term's entry is applied (snapshot_every {snapshot_every})"
        );
    }
}

#[test]
fn a_member_that_snapshots_restarts_with_a_compacted_log() {
    let dir = tempfile::tempdir().unwrap();
    let (_, c) = restarted(dir.path(), 3);
    assert!(
        c.log_len() < 5,
        "the log was not compacted: {}",
        c.log_len()
    );
}

#[test]
fn a_restarted_member_goes_on_committing() {
    for snapshot_every in SNAPSHOT_EVERY {
        let dir = tempfile::tempdir().unwrap();
        let (_, mut c) = restarted(dir.path(), snapshot_every);
        lead(&mut c);
        c.propose(&Command::PutMember(member(99))).unwrap();
        c.process().unwrap();
        assert!(
            c.state().members.contains_key(&99),
            "snapshot_every {snapshot_every}"
        );
    }
}

#[test]
fn only_the_leader_takes_proposals() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Coordinator::open(
        CoordinatorConfig::new(1),
        Box::new(DirDisk::open(dir.path()).unwrap()),
        &[1, 2, 3],
        1,
    )
    .unwrap();
    let e = c.propose(&Command::RemoveMember { id: 1 }).unwrap_err();
    assert!(e.to_string().contains("not the leader"), "{e}");
}

#[test]
fn a_read_index_comes_back_once_applied() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = open(dir.path(), 1000);
    lead(&mut c);
    c.propose(&Command::PutMember(member(5))).unwrap();
    c.process().unwrap();
    c.read_index(b"r1".to_vec());
    let out = c.process().unwrap();
    assert_eq!(out.reads.len(), 1, "{:?}", out.reads);
    assert_eq!(out.reads[0].0, b"r1");
    assert!(out.reads[0].1 <= c.state().applied_index);
}
