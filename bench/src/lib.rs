//! # weft-bench (library)
//!
//! The simulator behind `weft-bench sim`, as a library so its scenarios can
//! be checked from tests.
//!
//! - [`sim`]: the discrete-event engine and the `paper`, `edge` and `scale`
//!   scenarios.
#![forbid(unsafe_code)]

pub mod sim;
