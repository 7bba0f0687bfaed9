//! The control plane's IO.
//!
//! - [`credentials`]: the cluster CA, join tokens, node certificates and the
//!   mutual-TLS configurations with revocation.

pub mod credentials;
