//! # weft-placement
//!
//! The domain model of a weft fabric (topology, sites, links, intents,
//! criticality), the placement solver, the request router with its decision
//! record, and the utility model. Pure and deterministic: no tokio, sockets,
//! files, clocks or global RNG; time and randomness are arguments.
//!
//! Nothing lives here yet: the placement issue fills it.
#![forbid(unsafe_code)]
