//! # weft-cluster
//!
//! The control plane's IO: who is in the cluster and how its members talk.
//! The replicated state and its rules are `weft-coordinator`'s (sans-IO);
//! this crate drives them over the network.
//!
//! ## Layout
//!
//! - [`credentials`]: the cluster CA, join tokens, node certificates and the
//!   mutual-TLS configurations with revocation.
//! - [`transport`]: QUIC endpoints between members, frames, requests and
//!   replies, and the coordinators to dial ([`transport::Peer`]).
//! - [`member`]: a coordinator member over the network, and joining.
//! - [`overlay`]: libp2p gossip of signed load reports, the routing table,
//!   failure detection, RTT samples, mDNS and bootstrap peers.
//! - [`models`]: a model's record for placement, read from its GGUF file.
//! - [`embedded`]: `weft up`'s coordinator of one.
//! - [`checkpoints`]: a node's intent-log checkpoints, signed and
//!   committed to the coordinators.
//!
//! It serves no requests and runs no models: what a node holds and how
//! requests cross between nodes is `weft-fabric`'s.
#![forbid(unsafe_code)]

pub mod authz;
pub mod checkpoints;
pub mod credentials;
pub mod embedded;
pub mod member;
pub mod models;
pub mod overlay;
pub mod transport;
