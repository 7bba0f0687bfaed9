//! # weft-placement
//!
//! The domain model of a weft fabric (topology, sites, links, intents,
//! criticality), the placement solver, the request router with its decision
//! record, and the utility model. Pure and deterministic: no tokio, sockets,
//! files, clocks or global RNG; time and randomness are arguments.
//!
//! ## Layout
//!
//! - [`intent`]: criticality, deadline and cost budget of a request.
//! - [`admission`]: which requests a saturated node refuses, sheddable first.
//!
//! The solver, the router and the utility model come with the placement issue.
#![forbid(unsafe_code)]

pub mod admission;
pub mod intent;

pub use admission::{AdmissionPolicy, NodeLoad, Refusal};
pub use intent::{Criticality, Intent};
