//! # weft-fabric
//!
//! The data plane between nodes and what a node holds: every request a
//! cluster node receives is routed over the live gossip state by
//! `weft-placement`'s router and recorded in the intent log; it is served
//! here or forwarded over QUIC (mutual TLS under the cluster CA) to the peer
//! chosen, and a stream whose replica dies midway resumes on another. A
//! model no single node has room for runs as a chain of layer ranges over
//! several nodes. Nodes fetch assigned models from each other in
//! sha256-checked chunks.
//!
//! ## Layout
//!
//! - [`remote`]: the API's [`weft_api::Remote`]: route, record, serve here or
//!   forward.
//! - [`routing`]: the router's inputs from the gossip table, and its record.
//! - [`forwarder`]: sending requests to peers, opening chains, fetching
//!   model chunks ([`forwarder::Forwarder`]).
//! - [`failover`]: retrying a failed request, resuming a stream on another
//!   replica.
//! - [`server`]: the serving side: forwarded requests, chain steps, chunks.
//! - [`wire`]: what a data-plane stream carries.
//! - [`chain`]: a head's steps down its chain, and a shard node's session.
//! - [`hop`]: one node of a chain.
//! - [`shards`]: the layer ranges this node runs, for the data plane.
//! - [`holdings`]: what the placement assigns this node, loaded and served.
//!
//! Credentials, the coordinators' transport and the gossip overlay are
//! `weft-cluster`'s; the HTTP surface is `weft-api`'s.
#![forbid(unsafe_code)]

pub mod alone;
pub mod chain;
pub mod failover;
pub mod forwarder;
pub mod holdings;
pub mod hop;
pub mod remote;
pub mod routing;
pub mod server;
pub mod shards;
pub mod wire;

pub use forwarder::Forwarder;
pub use holdings::{Holder, StartWorker};
pub use server::{serve, ServedHere};
pub use shards::Shards;
