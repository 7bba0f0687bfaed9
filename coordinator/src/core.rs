//! [`Coordinator`]: one member of the coordinator group, sans-IO. Input comes
//! only through [`Coordinator::tick`] (virtual time), [`Coordinator::step`]
//! (a message from a peer), [`Coordinator::propose`] and
//! [`Coordinator::read_index`]; [`Coordinator::process`] hands back the
//! messages to send and what was applied. The caller moves the bytes.
//!
//! raft-rs draws its election timeouts from the thread RNG; this wrapper
//! overrides every draw from its own seeded generator, so a seeded run of
//! the harness is exactly repeatable.

use protobuf::Message as _;
use raft::eraftpb::{ConfChange, ConfChangeType, Entry, EntryType, Message};
use raft::{RawNode, StateRole};
use slog::{o, Discard, Logger};

use crate::error::{CoordinatorError, Result};
use crate::state::{Applied, Command, ControlState, CoordinatorRecord};
use crate::storage::{Durable, LogStore};

/// Tunables of one member.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CoordinatorConfig {
    /// This member's id (not 0).
    pub id: u64,
    /// Ticks without a leader before an election (randomised up to twice this).
    pub election_tick: usize,
    /// Ticks between the leader's heartbeats.
    pub heartbeat_tick: usize,
    /// Applied entries between snapshots (the log is compacted at each).
    pub snapshot_every: u64,
}

impl CoordinatorConfig {
    /// Defaults for member `id`: with a 100 ms tick, heartbeats every 100 ms
    /// and an election after 0.6-1.2 s without one, so a dead leader is
    /// replaced within about 1.5 s.
    pub fn new(id: u64) -> Self {
        Self {
            id,
            election_tick: 6,
            heartbeat_tick: 1,
            snapshot_every: 1_000,
        }
    }
}

/// One applied log entry.
#[derive(Debug, Clone, PartialEq)]
pub struct AppliedEntry {
    /// Its index.
    pub index: u64,
    /// The context its proposer attached (to match a reply to it).
    pub context: Vec<u8>,
    /// Its term.
    pub term: u64,
    /// The command, for normal entries that carry one.
    pub command: Option<Command>,
    /// What applying it did.
    pub result: Applied,
}

/// What one [`Coordinator::process`] produced.
#[derive(Debug, Default)]
pub struct Output {
    /// Messages for peers (`msg.to`).
    pub messages: Vec<Message>,
    /// Entries applied, in order.
    pub applied: Vec<AppliedEntry>,
    /// Linearizable reads now safe to serve: (request context, index the
    /// state must have applied).
    pub reads: Vec<(Vec<u8>, u64)>,
    /// Index of a snapshot from the leader installed in place of the state.
    pub installed_snapshot: Option<u64>,
}

/// One coordinator.
pub struct Coordinator {
    raw: RawNode<LogStore>,
    state: ControlState,
    config: CoordinatorConfig,
    rng: u64,
    seen: (u64, StateRole, u64),
}

impl Coordinator {
    /// Opens member `config.id` on `disk`. A member that ran before recovers
    /// its log and state from it; a new one joins with `voters` as the first
    /// configuration (the same list on every founding member) or, with an
    /// empty list, waits to be added by the leader. `seed` drives the
    /// election timeouts.
    pub fn open(
        config: CoordinatorConfig,
        disk: Box<dyn Durable>,
        voters: &[u64],
        seed: u64,
    ) -> Result<Self> {
        let mut store = LogStore::open(disk)?;
        if !store.is_initialized() && !voters.is_empty() {
            let empty = ControlState {
                applied_index: 1,
                ..ControlState::default()
            };
            store.bootstrap(voters.to_vec(), empty.encode())?;
        }
        let snap = store.latest_snapshot();
        let state = if snap.data.is_empty() {
            ControlState::default()
        } else {
            ControlState::decode(&snap.data)?
        };
        let raft_config = raft::Config {
            id: config.id,
            election_tick: config.election_tick,
            heartbeat_tick: config.heartbeat_tick,
            applied: snap.get_metadata().index,
            check_quorum: true,
            pre_vote: true,
            max_inflight_msgs: 256,
            max_size_per_msg: 1 << 20,
            ..raft::Config::default()
        };
        let raw = RawNode::new(&raft_config, store, &Logger::root(Discard, o!()))?;
        let mut c = Self {
            seen: (raw.raft.term, raw.raft.state, raw.raft.leader_id),
            raw,
            state,
            config,
            rng: seed ^ 0x9e37_79b9_7f4a_7c15 ^ config.id.wrapping_mul(0xbf58_476d_1ce4_e5b9),
        };
        c.redraw_timeout();
        Ok(c)
    }

    /// This member's id.
    pub fn id(&self) -> u64 {
        self.config.id
    }

    /// The replicated state as this member has applied it.
    pub fn state(&self) -> &ControlState {
        &self.state
    }

    /// The current term.
    pub fn term(&self) -> u64 {
        self.raw.raft.term
    }

    /// Whether this member leads.
    pub fn is_leader(&self) -> bool {
        self.raw.raft.state == StateRole::Leader
    }

    /// The leader this member knows of.
    pub fn leader(&self) -> Option<u64> {
        Some(self.raw.raft.leader_id).filter(|&l| l != 0)
    }

    /// The index of the last committed entry.
    pub fn commit_index(&self) -> u64 {
        self.raw.raft.raft_log.committed
    }

    /// Entries held in the log (after the latest snapshot).
    pub fn log_len(&self) -> usize {
        self.raw.store().entry_count()
    }

    /// The voting members of the group as this member knows them.
    pub fn voters(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self.raw.raft.prs().conf().voters().ids().iter().collect();
        v.sort_unstable();
        v
    }

    fn next_random(&mut self) -> u64 {
        // SplitMix64
        self.rng = self.rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn redraw_timeout(&mut self) {
        let min = self.config.election_tick as u64;
        let t = min + self.next_random() % min.max(1);
        self.raw.raft.set_randomized_election_timeout(t as usize);
    }

    /// raft-rs redraws the timeout (from its own RNG) whenever the role,
    /// term or leader changes; redraw it from ours instead.
    fn after_input(&mut self) {
        let now = (
            self.raw.raft.term,
            self.raw.raft.state,
            self.raw.raft.leader_id,
        );
        if now != self.seen {
            self.seen = now;
            self.redraw_timeout();
        }
    }

    /// One unit of virtual time.
    pub fn tick(&mut self) {
        self.raw.tick();
        self.after_input();
    }

    /// A message from a peer. Messages for another member, or from a peer
    /// this member does not know, are dropped.
    pub fn step(&mut self, msg: Message) -> Result<()> {
        if msg.to != self.config.id {
            return Ok(());
        }
        let r = self.raw.step(msg);
        self.after_input();
        match r {
            Ok(()) | Err(raft::Error::StepPeerNotFound) | Err(raft::Error::StepLocalMsg) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Proposes `cmd`; it is applied everywhere once committed.
    pub fn propose(&mut self, cmd: &Command) -> Result<()> {
        self.propose_with(Vec::new(), cmd)
    }

    /// Proposes `cmd` with a `context` that comes back with it in
    /// [`AppliedEntry::context`] (raft may still drop a proposal, for
    /// example when leadership changes; the caller times out).
    pub fn propose_with(&mut self, context: Vec<u8>, cmd: &Command) -> Result<()> {
        if !self.is_leader() {
            return Err(CoordinatorError::NotLeader {
                leader: self.leader(),
            });
        }
        let r = self.raw.propose(context, cmd.encode());
        self.after_input();
        r.map_err(Into::into)
    }

    /// Proposes adding (`add`) or removing a voting coordinator. The leader
    /// does not remove itself (transfer leadership first).
    pub fn change_voter(&mut self, id: u64, add: bool) -> Result<()> {
        self.change_voter_with(id, add, None)
    }

    /// Like [`Coordinator::change_voter`], recording where the coordinator
    /// is (`record`, for an addition) in [`ControlState::coordinators`].
    pub fn change_voter_with(
        &mut self,
        id: u64,
        add: bool,
        record: Option<CoordinatorRecord>,
    ) -> Result<()> {
        if !self.is_leader() {
            return Err(CoordinatorError::NotLeader {
                leader: self.leader(),
            });
        }
        if !add && id == self.config.id {
            return Err(CoordinatorError::Refused(
                "the leader cannot remove itself; transfer leadership first".into(),
            ));
        }
        let context = record
            .map(|r| serde_json::to_vec(&r).expect("records serialize"))
            .unwrap_or_default();
        let mut cc = ConfChange {
            node_id: id,
            context: context.into(),
            ..ConfChange::default()
        };
        cc.set_change_type(if add {
            ConfChangeType::AddNode
        } else {
            ConfChangeType::RemoveNode
        });
        let r = self.raw.propose_conf_change(Vec::new(), cc);
        self.after_input();
        r.map_err(Into::into)
    }

    /// Tells raft whether a snapshot sent to `peer` arrived (`ok`) or was
    /// lost; until told, raft pauses that peer. The transport calls this.
    pub fn report_snapshot(&mut self, peer: u64, ok: bool) {
        self.raw.report_snapshot(
            peer,
            if ok {
                raft::SnapshotStatus::Finish
            } else {
                raft::SnapshotStatus::Failure
            },
        );
        self.after_input();
    }

    /// Tells raft a message to `peer` could not be delivered.
    pub fn report_unreachable(&mut self, peer: u64) {
        self.raw.report_unreachable(peer);
        self.after_input();
    }

    /// Whether a read would be served now: this member leads and has
    /// committed an entry in its own term (raft drops reads before that).
    pub fn can_serve_reads(&self) -> bool {
        let r = &self.raw.raft;
        self.is_leader() && r.raft_log.term(r.raft_log.committed).ok() == Some(r.term)
    }

    /// Asks for a linearizable read; it shows up in [`Output::reads`] once
    /// the group has confirmed this member's view (read index).
    pub fn read_index(&mut self, ctx: Vec<u8>) {
        self.raw.read_index(ctx);
        self.after_input();
    }

    /// Persists, sends and applies whatever raft has ready.
    pub fn process(&mut self) -> Result<Output> {
        let mut out = Output::default();
        while self.raw.has_ready() {
            let mut ready = self.raw.ready();
            out.messages.extend(ready.take_messages());
            if !ready.snapshot().is_empty() {
                let snap = ready.snapshot().clone();
                self.state = if snap.data.is_empty() {
                    ControlState::default()
                } else {
                    ControlState::decode(&snap.data)?
                };
                out.installed_snapshot = Some(snap.get_metadata().index);
                self.raw.mut_store().apply_snapshot(snap)?;
            }
            self.apply(ready.take_committed_entries(), &mut out)?;
            self.raw.mut_store().append(ready.entries())?;
            if let Some(hs) = ready.hs() {
                self.raw.mut_store().set_hard_state(hs.clone())?;
            }
            for rs in ready.take_read_states() {
                out.reads.push((rs.request_ctx, rs.index));
            }
            out.messages.extend(ready.take_persisted_messages());
            let mut light = self.raw.advance(ready);
            if let Some(commit) = light.commit_index() {
                self.raw.mut_store().set_commit(commit)?;
            }
            out.messages.extend(light.take_messages());
            self.apply(light.take_committed_entries(), &mut out)?;
            self.raw.advance_apply();
            self.after_input();
        }
        self.maybe_snapshot()?;
        Ok(out)
    }

    fn apply(&mut self, entries: Vec<Entry>, out: &mut Output) -> Result<()> {
        for e in entries {
            let (command, result) = match e.get_entry_type() {
                EntryType::EntryNormal if e.data.is_empty() => (None, Applied::Done),
                EntryType::EntryNormal => {
                    let cmd = Command::decode(&e.data)?;
                    let r = self.state.apply(e.index, &cmd);
                    (Some(cmd), r)
                }
                EntryType::EntryConfChange => {
                    let cc = ConfChange::parse_from_bytes(&e.data).map_err(|err| {
                        CoordinatorError::Codec {
                            what: "configuration change",
                            why: err.to_string(),
                        }
                    })?;
                    if cc.node_id == self.config.id
                        && cc.get_change_type() == ConfChangeType::RemoveNode
                        && self.is_leader()
                    {
                        // a leader removed from the group steps down first;
                        // raft-rs would otherwise lead without a vote of its own
                        let term = self.raw.raft.term;
                        self.raw.raft.become_follower(term, raft::INVALID_ID);
                    }
                    let cs = self.raw.apply_conf_change(&cc)?;
                    self.raw.mut_store().set_conf_state(cs)?;
                    let add = cc.get_change_type() != ConfChangeType::RemoveNode;
                    let record = serde_json::from_slice::<CoordinatorRecord>(&cc.context).ok();
                    self.state.apply_voter_change(cc.node_id, add, record);
                    (None, Applied::Done)
                }
                EntryType::EntryConfChangeV2 => {
                    return Err(CoordinatorError::Codec {
                        what: "configuration change",
                        why: "joint consensus (v2) changes are not used by weft".into(),
                    })
                }
            };
            self.state.applied_index = e.index;
            out.applied.push(AppliedEntry {
                index: e.index,
                context: e.context.to_vec(),
                term: e.term,
                command,
                result,
            });
        }
        Ok(())
    }

    fn maybe_snapshot(&mut self) -> Result<()> {
        let applied = self.state.applied_index;
        let snap = self.raw.store().latest_snapshot().get_metadata().index;
        let asked = self.raw.store().take_snapshot_request() && applied > snap;
        if (asked || applied >= snap + self.config.snapshot_every) && applied <= self.commit_index()
        {
            let data = self.state.encode();
            self.raw.mut_store().compact(applied, data)?;
        }
        Ok(())
    }
}
