//! # weft-tools
//!
//! Measurement tools the `weft` binary carries, kept out of the serving
//! crates: nothing here serves a request.
//!
//! - [`demo`]: `weft demo`, a whole fabric on this machine (3 coordinators,
//!   6 nodes as `weft node` processes), an agent workload through it on
//!   weft's placement and cloud-only, and the report.
//! - [`gpubench`]: `weft gpu-bench`, the CUDA backend against the CPU
//!   backend on this machine's GPU (what `bench/gpu/run.sh` runs).
#![deny(unsafe_code)]

pub mod demo;
pub mod gpubench;
