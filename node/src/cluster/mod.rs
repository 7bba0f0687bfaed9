//! The control plane's IO.
//!
//! - [`credentials`]: the cluster CA, join tokens, node certificates and the
//!   mutual-TLS configurations with revocation.
//! - [`transport`]: QUIC endpoints, frames, requests and replies.
//! - [`member`]: a coordinator member over the network, and joining.
//! - [`config`]: `weft node --config`: a node's place in the cluster.
//! - [`run`]: `weft node` and `weft status`.
//! - [`models`]: a model's shape for placement, read from its GGUF file.
//! - [`holdings`]: loading what the placement assigns, serving it.
//! - [`embedded`]: `weft up`'s coordinator of one.
//! - [`overlay`]: libp2p gossip of signed load reports, the routing table,
//!   failure detection, RTT samples, mDNS and bootstrap peers.

pub mod config;
pub mod credentials;
pub mod embedded;
pub mod holdings;
pub mod member;
pub mod models;
pub mod overlay;
pub mod run;
pub mod transport;
