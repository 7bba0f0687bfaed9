//! What a request's outcome is worth: latency against its deadline, cost
//! against its budget and, optionally, energy; and an online learner that
//! picks the router's profile per context from observed utility.

use serde::{Deserialize, Serialize};

use crate::intent::Criticality;

/// Weights and scales of the utility.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct UtilityWeights {
    /// Weight of the latency term.
    pub latency: f64,
    /// Weight of the cost term.
    pub cost: f64,
    /// Weight of the energy term (0 ignores energy).
    pub energy: f64,
    /// Subtracted when the deadline is missed.
    pub miss_penalty: f64,
    /// Latency scale (ms) for requests without a deadline.
    pub reference_latency_ms: f64,
    /// Cost scale for requests without a budget.
    pub reference_cost: f64,
    /// Energy scale (joules).
    pub reference_energy_j: f64,
}

impl Default for UtilityWeights {
    fn default() -> Self {
        Self {
            latency: 1.0,
            cost: 0.2,
            energy: 0.0,
            miss_penalty: 1.0,
            reference_latency_ms: 2000.0,
            reference_cost: 1e-3,
            reference_energy_j: 10.0,
        }
    }
}

/// One outcome, observed or expected.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Outcome {
    /// End-to-end latency (ms).
    pub latency_ms: f64,
    /// What it cost.
    pub cost: f64,
    /// Joules it used.
    pub energy_j: f64,
}

impl UtilityWeights {
    /// The utility of `o` for a request with `deadline_ms` and `budget`:
    /// each term is 1 at zero and 0 at the deadline (or budget, or scale);
    /// a missed deadline also subtracts `miss_penalty`.
    pub fn utility(&self, o: Outcome, deadline_ms: Option<f64>, budget: Option<f64>) -> f64 {
        let d = deadline_ms.unwrap_or(self.reference_latency_ms).max(1e-9);
        let b = budget.unwrap_or(self.reference_cost).max(1e-18);
        let mut u = self.latency * (1.0 - o.latency_ms / d) + self.cost * (1.0 - o.cost / b);
        if self.energy != 0.0 {
            u += self.energy * (1.0 - o.energy_j / self.reference_energy_j.max(1e-9));
        }
        if deadline_ms.is_some_and(|d| o.latency_ms > d) {
            u -= self.miss_penalty;
        }
        u
    }
}

/// What the learner conditions on: the request's class and how loaded the
/// best candidate looked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Context {
    /// The request's class.
    pub criticality: Criticality,
    /// 0: idle, 1: busy, 2: saturated (see [`Context::load_bucket`]).
    pub load: u8,
}

impl Context {
    /// Contexts the learner tells apart.
    pub const COUNT: usize = 9;

    /// The bucket of a load fraction (busy slots and queue over slots).
    pub fn load_bucket(load: f64) -> u8 {
        if load < 0.5 {
            0
        } else if load < 1.0 {
            1
        } else {
            2
        }
    }

    fn index(self) -> usize {
        self.criticality.priority() as usize * 3 + self.load.min(2) as usize
    }
}

/// A contextual bandit (UCB1 per context) over a fixed set of arms, for
/// example router profiles. Deterministic: no randomness, ties go to the
/// lowest arm.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Learner {
    arms: usize,
    exploration: f64,
    /// Per context and arm: (pulls, sum of rewards).
    stats: Vec<(u64, f64)>,
}

impl Learner {
    /// A learner over `arms` arms; `exploration` scales the confidence bonus
    /// (in reward units).
    pub fn new(arms: usize, exploration: f64) -> Self {
        Self {
            arms: arms.max(1),
            exploration,
            stats: vec![(0, 0.0); Context::COUNT * arms.max(1)],
        }
    }

    /// The arm to use in `ctx`: every arm once, then the best upper bound.
    pub fn choose(&self, ctx: Context) -> usize {
        let row = &self.stats[ctx.index() * self.arms..][..self.arms];
        if let Some(untried) = row.iter().position(|&(n, _)| n == 0) {
            return untried;
        }
        let total: u64 = row.iter().map(|&(n, _)| n).sum();
        let ln = (total as f64).ln();
        let mut best = (0, f64::NEG_INFINITY);
        for (i, &(n, sum)) in row.iter().enumerate() {
            let ucb = sum / n as f64 + self.exploration * (2.0 * ln / n as f64).sqrt();
            if ucb > best.1 {
                best = (i, ucb);
            }
        }
        best.0
    }

    /// Records the utility `reward` observed after using `arm` in `ctx`.
    pub fn observe(&mut self, ctx: Context, arm: usize, reward: f64) {
        if arm < self.arms && reward.is_finite() {
            let s = &mut self.stats[ctx.index() * self.arms + arm];
            s.0 += 1;
            s.1 += reward;
        }
    }

    /// Mean reward of `arm` in `ctx` so far, if it was tried.
    pub fn mean(&self, ctx: Context, arm: usize) -> Option<f64> {
        let (n, sum) = *self.stats.get(ctx.index() * self.arms + arm)?;
        (n > 0).then(|| sum / n as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The default weights' utility of an outcome of `ms` and `cost`, for
    /// a deadline of 1 s and a budget of 1e-3.
    fn utility_at(ms: f64, cost: f64) -> f64 {
        let at = Outcome {
            latency_ms: ms,
            cost,
            energy_j: 0.0,
        };
        UtilityWeights::default().utility(at, Some(1000.0), Some(1e-3))
    }

    #[test]
    fn utility_falls_with_latency() {
        assert!(utility_at(100.0, 1e-4) > utility_at(900.0, 1e-4));
    }

    #[test]
    fn utility_falls_with_cost() {
        assert!(utility_at(100.0, 1e-4) > utility_at(100.0, 9e-4));
    }

    #[test]
    fn utility_drops_by_the_miss_penalty_at_a_missed_deadline() {
        let w = UtilityWeights::default();
        let slow = utility_at(900.0, 1e-4);
        let late = utility_at(1001.0, 1e-4);
        assert!(
            slow - late > w.miss_penalty * 0.99,
            "a miss costs the penalty"
        );
    }

    /// Contexts where a different arm is best: arm 2 when busy, arm 0 when
    /// idle.
    fn busy() -> Context {
        Context {
            criticality: Criticality::Critical,
            load: 2,
        }
    }

    fn idle() -> Context {
        Context {
            criticality: Criticality::Standard,
            load: 0,
        }
    }

    /// A learner of 3 arms after 500 rounds in both contexts.
    fn trained() -> Learner {
        let mut l = Learner::new(3, 0.5);
        let reward = |ctx: Context, arm: usize| match (ctx.load, arm) {
            (2, 2) | (0, 0) => 1.0,
            _ => 0.2,
        };
        for _ in 0..500 {
            for ctx in [busy(), idle()] {
                let a = l.choose(ctx);
                l.observe(ctx, a, reward(ctx, a));
            }
        }
        l
    }

    #[test]
    fn bandit_settles_on_the_better_arm_per_context() {
        let l = trained();
        assert_eq!(l.choose(busy()), 2);
        assert_eq!(l.choose(idle()), 0);
    }

    #[test]
    fn bandit_estimates_the_better_arm_above_a_worse_one() {
        let l = trained();
        assert!(l.mean(busy(), 2).unwrap() > l.mean(busy(), 1).unwrap());
    }
}
