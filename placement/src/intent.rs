//! What a request wants: how critical it is, by when, and for how much.

use serde::{Deserialize, Serialize};

/// How important a request is to its agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Criticality {
    /// Refused first under overload.
    Sheddable,
    /// The default.
    Standard,
    /// Admitted first, refused last.
    Critical,
}

impl Criticality {
    /// Parses `critical`, `standard` or `sheddable` (any case, surrounding spaces ignored).
    pub fn parse(s: &str) -> Option<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "critical" => Some(Self::Critical),
            "standard" => Some(Self::Standard),
            "sheddable" => Some(Self::Sheddable),
            _ => None,
        }
    }

    /// The lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Critical => "critical",
            Self::Standard => "standard",
            Self::Sheddable => "sheddable",
        }
    }

    /// Scheduling priority: higher runs first.
    pub fn priority(self) -> u8 {
        match self {
            Self::Critical => 2,
            Self::Standard => 1,
            Self::Sheddable => 0,
        }
    }
}

/// A request's intent.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Intent {
    /// How critical it is.
    pub criticality: Criticality,
    /// Milliseconds from arrival by which it must finish, if any.
    pub deadline_ms: Option<u64>,
    /// The most it may cost, if bounded.
    pub max_cost: Option<f64>,
}

impl Default for Intent {
    fn default() -> Self {
        Self {
            criticality: Criticality::Standard,
            deadline_ms: None,
            max_cost: None,
        }
    }
}
