//! Choosing the next token: greedy, temperature, top-k, top-p, min-p,
//! repetition / frequency / presence penalties, a seeded generator (same seed,
//! same tokens), and log-probabilities of the chosen token.

use std::collections::HashMap;

use crate::tokenizer::TokenId;

/// Candidates kept before an exact top-p pass falls back to a full sort.
const TOP_P_FAST_CANDIDATES: usize = 512;
/// Most alternatives reported per token.
pub const MAX_TOP_LOGPROBS: usize = 20;

/// How one request samples and when it stops.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// Keep the k most likely tokens (0: all).
    pub top_k: usize,
    /// Keep the smallest set whose probability reaches p (1: all).
    pub top_p: f32,
    /// Drop tokens less likely than `min_p` × the best one (0: none).
    pub min_p: f32,
    /// Divide positive (multiply negative) logits of tokens already generated (1: off).
    pub repetition_penalty: f32,
    /// Subtract this × the count of each token already generated.
    pub frequency_penalty: f32,
    /// Subtract this from every token already generated.
    pub presence_penalty: f32,
    /// Seed of the generator; `None` draws one.
    pub seed: Option<u64>,
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// Tokens that end the generation (not part of the output).
    pub stop_tokens: Vec<TokenId>,
    /// Strings that end the generation (cut from the output).
    pub stop_strings: Vec<String>,
    /// Report the chosen token's log-probability.
    pub logprobs: bool,
    /// Also report this many most likely alternatives.
    pub top_logprobs: usize,
    /// What the output must match (structured outputs, tool calls); the
    /// engine masks every step's logits to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grammar: Option<crate::grammar::Grammar>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            seed: None,
            max_tokens: 256,
            stop_tokens: Vec::new(),
            stop_strings: Vec::new(),
            logprobs: false,
            top_logprobs: 0,
            grammar: None,
        }
    }
}

impl SamplingParams {
    /// Greedy decoding of exactly `max_tokens` (no stop token or string
    /// ends it sooner unless one is added).
    pub fn greedy(max_tokens: usize) -> Self {
        Self {
            max_tokens,
            ..Self::default()
        }
    }

    fn is_greedy(&self) -> bool {
        self.temperature <= 0.0 || self.top_k == 1
    }

    /// Whether the token is the most likely one and nothing else about the
    /// logits matters (no penalties, no log-probabilities): a device can
    /// then pick it without sending the logits back.
    pub fn wants_only_the_argmax(&self) -> bool {
        self.is_greedy() && !self.logprobs && !self.penalizes() && self.grammar.is_none()
    }

    /// Whether the token can be drawn from the row's best few logits (see
    /// [`Sampler::sample_top`]): a random draw cut by top-k, top-p or
    /// min-p, with no penalties and no log-probabilities.
    pub fn can_sample_from_the_top(&self) -> bool {
        !self.is_greedy()
            && !self.logprobs
            && !self.penalizes()
            && self.grammar.is_none()
            && (self.top_k > 0 || self.top_p < 1.0 || self.min_p > 0.0)
    }

    fn penalizes(&self) -> bool {
        self.repetition_penalty != 1.0
            || self.frequency_penalty != 0.0
            || self.presence_penalty != 0.0
    }
}

/// A token with its log-probability and, if asked, the best alternatives.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TokenLogprob {
    /// The chosen token.
    pub token: TokenId,
    /// Its log-probability under the (penalized) model distribution.
    pub logprob: f32,
    /// The most likely tokens and their log-probabilities, best first.
    pub top: Vec<(TokenId, f32)>,
}

/// A small, seedable generator (xoshiro256**), so runs repeat exactly.
#[derive(Debug, Clone)]
pub struct Rng {
    s: [u64; 4],
}

impl Rng {
    /// A generator from a seed (expanded with SplitMix64).
    pub fn new(seed: u64) -> Self {
        let mut z = seed;
        let mut next = || {
            z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut x = z;
            x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            x ^ (x >> 31)
        };
        Self {
            s: [next(), next(), next(), next()],
        }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let r = self.s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = self.s[1] << 17;
        self.s[2] ^= self.s[0];
        self.s[3] ^= self.s[1];
        self.s[1] ^= self.s[2];
        self.s[0] ^= self.s[3];
        self.s[2] ^= t;
        self.s[3] = self.s[3].rotate_left(45);
        r
    }

    /// Uniform in `[0, 1)`.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// The sampling state of one sequence.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: Rng,
    counts: HashMap<TokenId, u32>,
}

impl Sampler {
    /// A sampler; `fallback_seed` is used when the params carry none.
    pub fn new(params: SamplingParams, fallback_seed: u64) -> Self {
        let rng = Rng::new(params.seed.unwrap_or(fallback_seed));
        Self {
            params,
            rng,
            counts: HashMap::new(),
        }
    }

    /// The parameters.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Takes `tok` as generated by an earlier run of this sequence: it
    /// counts for penalties, and a random sampler skips the draw that chose
    /// it, so a seeded sequence continues as it would have.
    pub fn replay(&mut self, tok: TokenId) {
        if !self.params.is_greedy() {
            self.rng.uniform();
        }
        self.observe(tok);
    }

    /// Records a token as generated (for the penalties).
    pub fn observe(&mut self, tok: TokenId) {
        *self.counts.entry(tok).or_default() += 1;
    }

    fn penalize(&self, logits: &mut [f32]) {
        let p = &self.params;
        if p.repetition_penalty == 1.0 && p.frequency_penalty == 0.0 && p.presence_penalty == 0.0 {
            return;
        }
        for (&tok, &n) in &self.counts {
            let Some(l) = logits.get_mut(tok as usize) else {
                continue;
            };
            if p.repetition_penalty != 1.0 && p.repetition_penalty > 0.0 {
                *l = if *l > 0.0 {
                    *l / p.repetition_penalty
                } else {
                    *l * p.repetition_penalty
                };
            }
            *l -= p.frequency_penalty * n as f32 + p.presence_penalty;
        }
    }

    /// Picks the next token from `logits` (the slice is used as scratch).
    pub fn sample(&mut self, logits: &mut [f32]) -> (TokenId, Option<TokenLogprob>) {
        self.penalize(logits);
        let tok = if self.params.is_greedy() {
            argmax(logits)
        } else {
            self.sample_random(logits)
        };
        let lp = self
            .params
            .logprobs
            .then(|| logprob_of(logits, tok, self.params.top_logprobs));
        self.observe(tok);
        (tok, lp)
    }

    fn sample_random(&mut self, logits: &[f32]) -> TokenId {
        let p = &self.params;
        let inv_t = 1.0 / p.temperature;
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        // candidates as (token, unnormalized probability)
        let mut cands: Vec<(TokenId, f32)> = Vec::new();
        let min_w = if p.min_p > 0.0 { p.min_p } else { 0.0 };
        let mut total = 0f64;
        for (i, &l) in logits.iter().enumerate() {
            let w = ((l - max) * inv_t).exp();
            total += w as f64;
            if w >= min_w && w > 0.0 {
                cands.push((i as TokenId, w));
            }
        }
        let by_weight =
            |a: &(TokenId, f32), b: &(TokenId, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        if p.top_k > 0 && cands.len() > p.top_k {
            cands.select_nth_unstable_by(p.top_k - 1, by_weight);
            cands.truncate(p.top_k);
        }
        if p.top_p < 1.0 && p.top_p > 0.0 {
            let mass: f64 = if p.top_k > 0 || min_w > 0.0 {
                cands.iter().map(|c| c.1 as f64).sum()
            } else {
                total
            };
            let target = p.top_p as f64 * mass;
            let mut keep = None;
            if cands.len() > TOP_P_FAST_CANDIDATES {
                let mut head = cands.clone();
                head.select_nth_unstable_by(TOP_P_FAST_CANDIDATES - 1, by_weight);
                head.truncate(TOP_P_FAST_CANDIDATES);
                head.sort_unstable_by(by_weight);
                if let Some(n) = prefix_reaching(&head, target) {
                    head.truncate(n);
                    keep = Some(head);
                }
            }
            cands = match keep {
                Some(k) => k,
                None => {
                    cands.sort_unstable_by(by_weight);
                    let n = prefix_reaching(&cands, target).unwrap_or(cands.len());
                    cands.truncate(n);
                    cands
                }
            };
        }
        if cands.is_empty() {
            return argmax(logits);
        }
        cands.sort_unstable_by(by_weight);
        let sum: f64 = cands.iter().map(|c| c.1 as f64).sum();
        let mut u = self.rng.uniform() * sum;
        for &(t, w) in &cands {
            u -= w as f64;
            if u < 0.0 {
                return t;
            }
        }
        cands[cands.len() - 1].0
    }
}

/// What a device gives of one row for [`Sampler::sample_top`]: every
/// logit at or above the row's `k`-th largest, as (token, logit), the row's
/// largest logit, and the sum over the whole row of `exp((l - max) / t)`.
#[derive(Debug, Clone, PartialEq)]
pub struct TopOfRow {
    /// At least the `k` best (token, logit) pairs, in any order.
    pub cands: Vec<(TokenId, f32)>,
    /// How many best the device was asked for.
    pub k: usize,
    /// The row's largest logit.
    pub max: f32,
    /// `Σ exp((l - max) / temperature)` over the row.
    pub total: f64,
}

impl TopOfRow {
    /// What a device computes, on the host (for tests and stand-ins).
    pub fn of(logits: &[f32], k: usize, temperature: f32) -> Self {
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let inv_t = 1.0 / temperature;
        let total = logits
            .iter()
            .map(|&l| ((l - max) * inv_t).exp() as f64)
            .sum();
        let mut cands: Vec<(TokenId, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as TokenId, l))
            .collect();
        if cands.len() > k && k > 0 {
            cands.select_nth_unstable_by(k - 1, |a, b| b.1.total_cmp(&a.1));
            let kth = cands[k - 1].1;
            cands.retain(|c| c.1 >= kth);
        }
        Self {
            cands,
            k,
            max,
            total,
        }
    }
}

impl Sampler {
    /// Draws the next token, as [`Sampler::sample`] would from the whole
    /// row, from the best `top.k` logits of it; `None` (and nothing drawn)
    /// when the cut reaches past them (a nucleus wider than `k`, a pure
    /// temperature draw), and the whole row is needed. Only for params
    /// where [`SamplingParams::can_sample_from_the_top`] holds.
    pub fn sample_top(&mut self, top: &TopOfRow) -> Option<TokenId> {
        let p = &self.params;
        if !p.can_sample_from_the_top() || top.k == 0 {
            return None;
        }
        let inv_t = 1.0 / p.temperature;
        let by_weight =
            |a: &(TokenId, f32), b: &(TokenId, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        let mut best: Vec<(TokenId, f32)> = top.cands.clone();
        best.sort_unstable_by(by_weight);
        // the row's k best, and whether they are the whole row
        let whole_row = best.len() < top.k;
        best.truncate(top.k);
        let kth_weight = best.last().map_or(0.0, |c| ((c.1 - top.max) * inv_t).exp());
        let min_w = if p.min_p > 0.0 { p.min_p } else { 0.0 };
        let mut cands: Vec<(TokenId, f32)> = best
            .iter()
            .map(|&(t, l)| (t, ((l - top.max) * inv_t).exp()))
            .filter(|&(_, w)| w >= min_w && w > 0.0)
            .collect();
        cands.sort_by(by_weight);
        // every token that passes min-p is among the k best
        let mut complete = whole_row || (min_w > 0.0 && kth_weight < min_w);
        if p.top_k > 0 {
            if p.top_k <= top.k {
                cands.truncate(p.top_k);
                complete = true;
            } else if !complete {
                return None;
            }
        }
        if p.top_p < 1.0 && p.top_p > 0.0 {
            let mass: f64 = if p.top_k > 0 || min_w > 0.0 {
                if !complete {
                    return None;
                }
                cands.iter().map(|c| c.1 as f64).sum()
            } else {
                top.total
            };
            match prefix_reaching(&cands, p.top_p as f64 * mass) {
                Some(n) => cands.truncate(n),
                None if complete => {}
                None => return None,
            }
        } else if !complete {
            return None;
        }
        let tok = if cands.is_empty() {
            best.first()?.0
        } else {
            let sum: f64 = cands.iter().map(|c| c.1 as f64).sum();
            let mut u = self.rng.uniform() * sum;
            let mut pick = cands[cands.len() - 1].0;
            for &(t, w) in &cands {
                u -= w as f64;
                if u < 0.0 {
                    pick = t;
                    break;
                }
            }
            pick
        };
        self.observe(tok);
        Some(tok)
    }
}

fn prefix_reaching(sorted: &[(TokenId, f32)], target: f64) -> Option<usize> {
    let mut acc = 0f64;
    for (i, c) in sorted.iter().enumerate() {
        acc += c.1 as f64;
        if acc >= target {
            return Some(i + 1);
        }
    }
    None
}

/// Index of the largest logit (the lowest index on ties).
pub fn argmax(logits: &[f32]) -> TokenId {
    let mut best = 0;
    let mut bv = f32::NEG_INFINITY;
    for (i, &v) in logits.iter().enumerate() {
        if v > bv {
            bv = v;
            best = i;
        }
    }
    best as TokenId
}

/// Log-softmax of `tok` and the `top` best alternatives.
pub fn logprob_of(logits: &[f32], tok: TokenId, top: usize) -> TokenLogprob {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = max as f64
        + logits
            .iter()
            .map(|&l| ((l - max) as f64).exp())
            .sum::<f64>()
            .ln();
    let lp = |i: usize| (logits[i] as f64 - lse) as f32;
    let top = top.min(MAX_TOP_LOGPROBS);
    let mut best: Vec<(TokenId, f32)> = Vec::new();
    if top > 0 {
        let mut idx: Vec<(TokenId, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as TokenId, l))
            .collect();
        let k = top.min(idx.len());
        idx.select_nth_unstable_by(k - 1, |a, b| b.1.total_cmp(&a.1));
        idx.truncate(k);
        idx.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        // tokens a grammar forbade (−∞) are no alternatives
        best = idx
            .into_iter()
            .filter(|(_, l)| l.is_finite())
            .map(|(i, _)| (i, lp(i as usize)))
            .collect();
    }
    TokenLogprob {
        token: tok,
        logprob: lp(tok as usize),
        top: best,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logits() -> Vec<f32> {
        (0..1000)
            .map(|i| ((i * 7919) % 1000) as f32 / 100.0)
            .collect()
    }

    #[test]
    fn greedy_takes_the_best() {
        let mut s = Sampler::new(SamplingParams::greedy(4), 0);
        let mut l = logits();
        let best = argmax(&l);
        assert_eq!(s.sample(&mut l).0, best);
    }

    /// 50 tokens drawn at temperature 1.5, top-p 0.95, with `seed`.
    fn fifty_draws(seed: u64) -> Vec<TokenId> {
        let params = SamplingParams {
            temperature: 1.5,
            top_p: 0.95,
            seed: Some(seed),
            ..SamplingParams::default()
        };
        let mut s = Sampler::new(params, 0);
        (0..50)
            .map(|_| s.sample(&mut logits()).0)
            .collect::<Vec<_>>()
    }

    #[test]
    fn the_same_seed_gives_the_same_tokens() {
        assert_eq!(fifty_draws(42), fifty_draws(42));
    }

    #[test]
    fn another_seed_gives_other_tokens() {
        assert_ne!(fifty_draws(42), fifty_draws(43));
    }

    /// The indices of `l`, best logit first.
    fn best_first(l: &[f32]) -> Vec<usize> {
        let mut sorted: Vec<usize> = (0..l.len()).collect();
        sorted.sort_by(|a, b| l[*b].total_cmp(&l[*a]));
        sorted
    }

    #[test]
    fn top_k_restricts_the_choice_to_the_k_best() {
        let l = logits();
        let top3: Vec<TokenId> = best_first(&l)[..3].iter().map(|&i| i as TokenId).collect();
        let mut s = Sampler::new(
            SamplingParams {
                temperature: 5.0,
                top_k: 3,
                seed: Some(1),
                ..SamplingParams::default()
            },
            0,
        );
        for _ in 0..100 {
            assert!(top3.contains(&s.sample(&mut l.clone()).0));
        }
    }

    #[test]
    fn min_p_restricts_the_choice_to_tokens_near_the_best() {
        let l = logits();
        // min_p 0.9 at temperature 1: only tokens within ln(1/0.9) of the best
        let mut s = Sampler::new(
            SamplingParams {
                temperature: 1.0,
                min_p: 0.9,
                seed: Some(1),
                ..SamplingParams::default()
            },
            0,
        );
        let best = l[best_first(&l)[0]];
        for _ in 0..100 {
            let t = s.sample(&mut l.clone()).0;
            assert!(l[t as usize] >= best - 0.106, "{}", l[t as usize]);
        }
    }

    /// Two greedy picks from logits where token 3 leads token 4 by 0.1.
    fn two_greedy_picks(params: SamplingParams) -> [TokenId; 2] {
        let mut l = vec![0.0f32; 10];
        l[3] = 5.0;
        l[4] = 4.9;
        let mut s = Sampler::new(params, 0);
        [s.sample(&mut l.clone()).0, s.sample(&mut l.clone()).0]
    }

    #[test]
    fn a_presence_penalty_pushes_a_repeated_token_down() {
        let picks = two_greedy_picks(SamplingParams {
            presence_penalty: 1.0,
            ..SamplingParams::greedy(10)
        });
        assert_eq!(picks[0], 3);
        assert_eq!(picks[1], 4);
    }

    #[test]
    fn a_repetition_penalty_pushes_a_repeated_token_down() {
        let picks = two_greedy_picks(SamplingParams {
            repetition_penalty: 1.1,
            ..SamplingParams::greedy(10)
        });
        assert_eq!(picks[0], 3);
        assert_eq!(picks[1], 4);
    }

    #[test]
    fn top_logprobs_are_as_many_as_asked_best_first() {
        let lp = logprob_of(&logits(), 5, 5);
        assert_eq!(lp.top.len(), 5);
        assert!(lp.top.windows(2).all(|w| w[0].1 >= w[1].1));
    }

    #[test]
    fn logprobs_are_normalized() {
        let l = logits();
        let total: f64 = l
            .iter()
            .enumerate()
            .map(|(i, _)| (logprob_of(&l, i as u32, 0).logprob as f64).exp())
            .sum();
        assert!((total - 1.0).abs() < 1e-3, "{total}");
    }

    /// Rows from flat to peaked, and rows like a trained model's: a few
    /// tokens far ahead.
    fn rows() -> Vec<Vec<f32>> {
        let mut rng = Rng::new(5);
        let mut rows: Vec<Vec<f32>> = (0..12)
            .map(|r| {
                let spread = 0.5 + r as f32 * 1.5;
                (0..4000)
                    .map(|_| (rng.uniform() as f32 - 0.5) * spread * 2.0)
                    .collect()
            })
            .collect();
        for r in 0..6 {
            let mut row: Vec<f32> = (0..4000).map(|_| rng.uniform() as f32 * -5.0).collect();
            for j in 0..(2 + r * 3) {
                row[(j * 397 + r) % 4000] = 12.0 + rng.uniform() as f32 * 4.0;
            }
            rows.push(row);
        }
        rows
    }

    /// Sampling settings (temperature, top-k, top-p, min-p) whose cuts fit
    /// in the top 64 of a row or not.
    const CUTS: [(f32, usize, f32, f32); 7] = [
        (0.8, 40, 1.0, 0.0),
        (1.0, 0, 0.9, 0.0),
        (0.7, 0, 0.5, 0.0),
        (1.2, 0, 1.0, 0.2),
        (1.0, 200, 1.0, 0.0),
        (0.9, 30, 0.8, 0.05),
        (1.0, 0, 1.0, 0.0),
    ];

    /// One cut's draws over 20 rounds of the rows, by a sampler that sees
    /// the whole row and by one that draws from the row's top 64 where it
    /// can.
    struct Draws {
        params: SamplingParams,
        /// (round, from the whole row, from the top or the row after all)
        tokens: Vec<(usize, TokenId, TokenId)>,
        /// Draws the top of the row was enough for.
        from_the_top: usize,
    }

    fn draws(
        rows: &[Vec<f32>],
        (temperature, top_k, top_p, min_p): (f32, usize, f32, f32),
    ) -> Draws {
        let params = SamplingParams {
            temperature,
            top_k,
            top_p,
            min_p,
            max_tokens: 100,
            ..SamplingParams::default()
        };
        let (mut full, mut from_top) = (
            Sampler::new(params.clone(), 9),
            Sampler::new(params.clone(), 9),
        );
        let mut d = Draws {
            params,
            tokens: Vec::new(),
            from_the_top: 0,
        };
        for round in 0..20 {
            for row in rows {
                let want = full.sample(&mut row.clone()).0;
                let top = TopOfRow::of(row, 64, temperature);
                let got = match from_top.sample_top(&top) {
                    Some(t) => {
                        d.from_the_top += 1;
                        t
                    }
                    // what the engine does: the whole row after all
                    None => from_top.sample(&mut row.clone()).0,
                };
                d.tokens.push((round, want, got));
            }
        }
        d
    }

    #[test]
    fn drawing_from_the_top_of_a_row_gives_the_whole_rows_tokens() {
        let rows = rows();
        for cut in CUTS {
            let d = draws(&rows, cut);
            for (round, want, got) in d.tokens {
                assert_eq!(got, want, "{:?}, round {round}", d.params);
            }
        }
    }

    #[test]
    fn the_top_of_a_row_is_used_exactly_where_the_cut_fits_in_it() {
        let rows = rows();
        for cut in CUTS {
            let (_, top_k, top_p, min_p) = cut;
            let d = draws(&rows, cut);
            let pure_temperature = top_k == 0 && top_p >= 1.0 && min_p == 0.0;
            if pure_temperature || top_k > 64 {
                assert_eq!(
                    d.from_the_top, 0,
                    "{:?} cannot be cut from the top 64",
                    d.params
                );
            } else {
                assert!(
                    d.from_the_top > 0,
                    "{:?} never used the top of the row",
                    d.params
                );
            }
        }
    }

    #[test]
    fn greedy_penalties_and_log_probabilities_need_the_whole_row() {
        let rows = rows();
        for p in [
            SamplingParams::greedy(4),
            SamplingParams {
                temperature: 1.0,
                top_k: 5,
                repetition_penalty: 1.2,
                ..SamplingParams::default()
            },
            SamplingParams {
                temperature: 1.0,
                top_k: 5,
                logprobs: true,
                ..SamplingParams::default()
            },
        ] {
            assert!(!p.can_sample_from_the_top());
            assert_eq!(
                Sampler::new(p, 1).sample_top(&TopOfRow::of(&rows[0], 64, 1.0)),
                None
            );
        }
    }
}
