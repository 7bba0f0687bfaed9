//! # weft-coordinator
//!
//! The replicated control state of a weft fabric: a raft-rs `RawNode` driving a
//! state machine of members, models, placement epochs and join credentials, with
//! a durable log and snapshots. The core is sans-IO (storage and transport are
//! traits); thin drivers in this crate do the IO.
//!
//! Nothing lives here yet: the control-plane issue fills it.
#![forbid(unsafe_code)]
