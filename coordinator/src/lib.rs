//! # weft-coordinator
//!
//! The replicated control state of a weft fabric: a raft-rs `RawNode` driving
//! a state machine of members, models, placement epochs and revoked
//! credentials, with a durable log and snapshots. The core is sans-IO: input
//! through `tick`, `step`, `propose`; output (messages to send, entries
//! applied) from `process`; the caller does the IO.
//!
//! ## Layout
//!
//! - [`state`]: the state machine ([`ControlState`], [`Command`]), and the
//!   leader's re-planning with `weft-placement`.
//! - [`storage`]: the log raft-rs reads ([`LogStore`]) over a durable backend
//!   ([`DirDisk`] on files with fsync, [`MemDisk`] for the harness).
//! - [`core`]: [`Coordinator`], one member of the group.
//! - [`error`]: the crate's error, [`CoordinatorError`].
#![forbid(unsafe_code)]

pub mod core;
pub mod error;
pub mod state;
pub mod storage;

pub use crate::core::{AppliedEntry, Coordinator, CoordinatorConfig, Output};
pub use error::{CoordinatorError, Result};
pub use state::{
    Applied, Command, ControlState, CoordinatorRecord, Holding, Member, ModelRecord,
    PlacementEpoch, SiteLink,
};
pub use storage::{DirDisk, Durable, LogStore, MemDisk, Recovered};
