//! The crate's error type.

use crate::id::{ModelId, NodeId, SiteId};

/// Why an input to the solver or router was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PlacementError {
    /// A node or demand names a site that does not exist.
    #[error("unknown site {site}")]
    UnknownSite {
        /// The site named.
        site: SiteId,
    },
    /// A demand or assignment names a model that does not exist.
    #[error("unknown model {model}")]
    UnknownModel {
        /// The model named.
        model: ModelId,
    },
    /// A node's figures make no sense.
    #[error("{node}: {why}")]
    InvalidNode {
        /// The node.
        node: NodeId,
        /// What is wrong.
        why: &'static str,
    },
    /// A model's figures make no sense.
    #[error("{model}: {why}")]
    InvalidModel {
        /// The model.
        model: ModelId,
        /// What is wrong.
        why: &'static str,
    },
}

/// The crate's result.
pub type Result<T, E = PlacementError> = std::result::Result<T, E>;
