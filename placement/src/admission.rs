//! Admission at one node: under saturation, sheddable requests are refused
//! first, then standard ones; critical requests are refused last. A pure
//! function of the request's intent and the node's load.

use serde::{Deserialize, Serialize};

use crate::intent::Criticality;

/// The load a node sees when a request arrives.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeLoad {
    /// Requests waiting to be scheduled.
    pub waiting: usize,
}

/// When each class is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdmissionPolicy {
    /// Waiting requests at which standard requests are refused. Sheddable
    /// ones are refused from half of it, critical ones from twice it.
    pub max_queue: usize,
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    /// The class refused.
    pub criticality: Criticality,
    /// Waiting requests when it came.
    pub waiting: usize,
    /// The mark its class is refused at.
    pub limit: usize,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the node is overloaded ({} requests waiting; {} requests are refused from {})",
            self.waiting,
            self.criticality.as_str(),
            self.limit
        )
    }
}

impl AdmissionPolicy {
    /// The waiting-queue mark at which `c` is refused.
    pub fn limit(&self, c: Criticality) -> usize {
        match c {
            Criticality::Sheddable => self.max_queue.div_ceil(2),
            Criticality::Standard => self.max_queue,
            Criticality::Critical => self.max_queue.saturating_mul(2),
        }
    }

    /// Admits or refuses a request of class `c` at `load`.
    pub fn admit(&self, c: Criticality, load: NodeLoad) -> Result<(), Refusal> {
        let limit = self.limit(c);
        if load.waiting >= limit {
            return Err(Refusal {
                criticality: c,
                waiting: load.waiting,
                limit,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A policy with a queue mark of 8.
    fn policy() -> AdmissionPolicy {
        AdmissionPolicy { max_queue: 8 }
    }

    fn at(waiting: usize) -> NodeLoad {
        NodeLoad { waiting }
    }

    #[test]
    fn below_half_the_queue_everything_is_admitted() {
        let p = policy();
        for c in [
            Criticality::Sheddable,
            Criticality::Standard,
            Criticality::Critical,
        ] {
            assert!(p.admit(c, at(3)).is_ok());
        }
    }

    #[test]
    fn from_half_the_queue_only_sheddable_work_is_refused() {
        let p = policy();
        assert!(p.admit(Criticality::Sheddable, at(4)).is_err());
        assert!(p.admit(Criticality::Standard, at(4)).is_ok());
    }

    #[test]
    fn at_the_queue_mark_standard_work_is_refused() {
        assert!(policy().admit(Criticality::Standard, at(8)).is_err());
    }

    #[test]
    fn critical_work_is_admitted_past_the_queue_mark() {
        assert!(policy().admit(Criticality::Critical, at(15)).is_ok());
    }

    #[test]
    fn critical_work_is_refused_at_twice_the_queue_mark() {
        let r = policy().admit(Criticality::Critical, at(16)).unwrap_err();
        assert_eq!(
            r,
            Refusal {
                criticality: Criticality::Critical,
                waiting: 16,
                limit: 16
            }
        );
    }

    #[test]
    fn a_refusal_names_the_criticality() {
        let r = policy().admit(Criticality::Critical, at(16)).unwrap_err();
        assert!(r.to_string().contains("critical"));
    }

    #[test]
    fn refusal_is_monotone_in_criticality_at_every_load() {
        let p = policy();
        for w in 0..40 {
            let ok = |c| p.admit(c, at(w)).is_ok();
            assert!(!ok(Criticality::Sheddable) || ok(Criticality::Standard));
            assert!(!ok(Criticality::Standard) || ok(Criticality::Critical));
        }
    }
}
