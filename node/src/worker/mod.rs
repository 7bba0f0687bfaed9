//! Worker processes: the protocol between node and worker, the worker's own
//! loop, and the node-side supervisor that starts, watches and restarts it.

pub mod process;
pub mod protocol;
pub mod supervisor;
