//! One node of a chain after the head, and a chain's route as logs show it.

use std::ops::Range;

use serde::{Deserialize, Serialize};

/// One node of a chain after the head: who runs which layers of what.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hop {
    /// The node's name.
    pub node: String,
    /// The model.
    pub model: String,
    /// The layers it runs.
    pub layers: Range<u32>,
}

impl std::fmt::Display for Hop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}[{}..{})@{}",
            self.model, self.layers.start, self.layers.end, self.node
        )
    }
}

/// `route` for logs: `m[2..4)@b -> m[4..6)@c`.
pub fn route_text(route: &[Hop]) -> String {
    route
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(" -> ")
}
