//! # weft-placement
//!
//! The domain model of a weft fabric, the placement solver, the request
//! router with its decision record, and the utility model. Pure and
//! deterministic: no tokio, sockets, files, clocks or global RNG; time and
//! randomness are arguments.
//!
//! ## Layout
//!
//! - [`topology`]: sites (edge or cloud), nodes, links and their classes and prices.
//! - [`model`]: models (bytes per layer, compute and KV per token) and demand.
//! - [`intent`]: criticality, deadline and cost budget of a request.
//! - [`admission`]: which requests a saturated node refuses, sheddable first.
//! - [`solver`]: [`solve`] turns topology, models, demand and the current
//!   placement into a new [`Plan`], every replica with its reasons.
//! - [`router`]: [`route`] ranks the nodes that could take a request and
//!   returns a [`Decision`] with every candidate's terms (the intent log).
//! - [`utility`]: the utility of an outcome and the online [`Learner`].
//! - [`id`]: the indexes of sites, nodes and models.
//! - [`error`]: the crate error, [`PlacementError`].
#![forbid(unsafe_code)]

pub mod admission;
pub mod error;
pub mod id;
pub mod intent;
pub mod model;
pub mod router;
pub mod solver;
pub mod topology;
pub mod utility;

pub use admission::{AdmissionPolicy, NodeLoad, Refusal};
pub use error::{PlacementError, Result};
pub use intent::{Criticality, Intent};
pub use model::{Demand, ModelId, ModelSpec, WIRE_BYTES_PER_TOKEN};
pub use router::{
    route, Candidate, CandidateScore, Decision, Exclusion, NodeState, Rejection, RouteRequest,
    RouterConfig,
};
pub use solver::{
    solve, Allocation, DropReason, Placement, Plan, PlanCost, Reason, Replica, Shard, SolverConfig,
};
pub use topology::{
    Link, LinkClass, LinkDefaults, LinkEstimate, Node, NodeId, Site, SiteId, SiteKind, Topology,
};
pub use utility::{Context, Learner, Outcome, UtilityWeights};
