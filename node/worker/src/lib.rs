//! # weft-worker
//!
//! Model workers: separate processes (`weft worker`) that load a model and
//! run the engine's continuous batching for every tenant of the node, each
//! in its sandbox, and the node-side supervisor that starts, watches and
//! restarts them. It knows nothing of HTTP or peers: the API talks to a
//! worker through the [`Runner`] trait, and a chain's head worker sends its
//! steps to whatever [`ChainLink`] the node gives it.
//!
//! ## Layout
//!
//! - [`protocol`]: the node/worker frames (length-prefixed JSON messages,
//!   and binary chain frames) over the inherited Unix socket.
//! - [`chain`]: the encoding of a layer chain's steps and replies.
//! - [`runner`]: the [`Runner`] trait the API submits requests through, and
//!   what a request hears back ([`Update`]).
//! - [`supervisor`]: the node side: starts a worker in its sandbox, routes
//!   its events, restarts it with backoff ([`Supervisor`]).
//! - [`process`]: the worker process itself (`weft worker`).
//! - [`sandbox`]: the tiers `process` and `gvisor`: namespaces, a dedicated
//!   uid, a new root, Landlock, seccomp, cgroups, and the escape probe's
//!   attempts (with the spawner's `pre_exec` and the worker adopting its
//!   descriptors, the only `unsafe` here, each block with its `SAFETY:`
//!   line).
//! - [`spawn`]: starting one worker at its tier and checking what the host
//!   sees of it against the policy.
#![deny(unsafe_code)]

pub mod chain;
pub mod process;
pub mod protocol;
pub mod runner;
pub mod sandbox;
pub mod spawn;
pub mod supervisor;

pub use chain::{ChainLink, StepReply};
pub use runner::{CacheStats, Runner, Submission, SubmitError, Update, WorkerStats};
pub use spawn::{SandboxSpec, WorkerSpec};
pub use supervisor::Supervisor;
