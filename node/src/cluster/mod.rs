//! The control plane's IO.
//!
//! - [`credentials`]: the cluster CA, join tokens, node certificates and the
//!   mutual-TLS configurations with revocation.
//! - [`transport`]: QUIC endpoints, frames, requests and replies.
//! - [`member`]: a coordinator member over the network, and joining.

pub mod credentials;
pub mod member;
pub mod transport;
