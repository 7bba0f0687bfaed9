//! # weft-sandbox
//!
//! Agent sandboxes: where agents run the code and shell commands their
//! plans produce, isolated, next to the models at the edge. Every node
//! offers `/v1/sandboxes` ([`http`]): create (from a warm pool when one
//! waits, cold otherwise), exec (streamed), files, list, extend, delete,
//! with the model API's keys and tenants.
//!
//! A sandbox is a process tree under an init ([`init`], `weft
//! sandbox-init`) confined as a model worker is, at tier `process`
//! (namespaces, a dedicated uid, a read-only root of the template's paths,
//! no capabilities, Landlock, a seccomp filter, a cgroup) or tier `gvisor`
//! (under runsc) ([`launch`]). Its scratch space is a tmpfs of its disk
//! limit. The node's data, keys and models are never in its root.
//!
//! - [`config`]: the `[sandboxes]` section (templates, pools, uids).
//! - [`protocol`]: what the node and an init say to each other.
//! - [`service`]: the sandboxes, their pools, lifetimes, audit records and
//!   metrics.

#![forbid(unsafe_op_in_unsafe_fn)]

pub mod config;
pub mod http;
pub mod init;
pub mod launch;
pub mod protocol;
pub mod service;

pub use config::{Isolation, SandboxConfig, Template};
pub use service::SandboxService;
