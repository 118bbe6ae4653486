//! Token sampling: turns one step's logits into the next token id.
//!
//! This module owns the sampling parameters, a small seeded PRNG and the [`Sampler`] that
//! applies penalties and filters in the order Hugging Face transformers and the OpenAI API
//! use: repetition penalty (over prompt and output), presence and frequency penalties (over
//! the output only), then greedy argmax at temperature 0, or temperature, top-k, top-p,
//! min-p and a draw. It must not know about models, tokenizers or the engine: it sees only
//! a logit slice and token ids. Nothing here panics: empty, NaN and infinite logits and
//! out-of-range parameters each have a documented, deliberate behaviour.

use std::cmp::Ordering;
use std::hash::{BuildHasher, Hasher};

use anyhow::{bail, Result};

/// Parameters of one sequence's sampler; the default is plain greedy decoding.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// Softmax temperature; `0` means greedy argmax (and disables top-k/top-p/min-p).
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens; `0` turns the filter off.
    pub top_k: usize,
    /// Nucleus filter: keep the smallest set whose probability reaches `top_p`; `1` is off.
    pub top_p: f32,
    /// Drop tokens whose probability is below `min_p` times the most likely one's; `0` is off.
    pub min_p: f32,
    /// HF-style multiplicative penalty on every token already in prompt or output; `1` is off.
    pub repetition_penalty: f32,
    /// OpenAI-style penalty subtracted once from every token already generated.
    pub presence_penalty: f32,
    /// OpenAI-style penalty subtracted per occurrence of a token already generated.
    pub frequency_penalty: f32,
    /// Seed for the PRNG; `None` seeds from process entropy and the clock.
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: None,
        }
    }
}

impl SamplingParams {
    /// Whether [`Sampler::sample`] is exactly [`argmax`] of the logits with these
    /// parameters: greedy, and no penalty that changes the logits first.
    pub fn is_plain_greedy(&self) -> bool {
        let t = self.temperature;
        (t.is_nan() || t <= 0.0) && !self.has_penalties()
    }

    /// Whether a penalty changes the logits (it needs the token history, on the host);
    /// otherwise each next token is a [`Draw`] that a device can make where the logits are.
    pub fn has_penalties(&self) -> bool {
        let r = self.repetition_penalty;
        let on = |p: f32| p.is_finite() && p != 0.0;
        (r.is_finite() && r > 0.0 && r != 1.0) || on(self.presence_penalty) || on(self.frequency_penalty)
    }

    /// Checks every field's range and names the first offending field in the error.
    pub fn validate(&self) -> Result<()> {
        let t = self.temperature;
        if !t.is_finite() || t < 0.0 {
            bail!("temperature must be a finite number >= 0 (0 = greedy), got {t}");
        }
        let p = self.top_p;
        if !(p > 0.0 && p <= 1.0) {
            bail!("top_p must be in (0, 1] (1 = off), got {p}");
        }
        let m = self.min_p;
        if !(0.0..=1.0).contains(&m) {
            bail!("min_p must be in [0, 1] (0 = off), got {m}");
        }
        let r = self.repetition_penalty;
        if !(r.is_finite() && r > 0.0) {
            bail!("repetition_penalty must be a finite number > 0 (1 = off), got {r}");
        }
        if !self.presence_penalty.is_finite() {
            bail!(
                "presence_penalty must be a finite number (0 = off), got {}",
                self.presence_penalty
            );
        }
        if !self.frequency_penalty.is_finite() {
            bail!(
                "frequency_penalty must be a finite number (0 = off), got {}",
                self.frequency_penalty
            );
        }
        Ok(())
    }
}

/// One sequence's next-token draw once its penalties are applied: greedy, or temperature,
/// top-k, top-p and min-p with the uniform it spends. [`Draw::pick`] makes it on the host; a
/// device model makes the same draw where its logits are ([`crate::models::Model::forward_drawn`]),
/// so only the token crosses to the host.
///
/// The candidates that survive the filters are drawn from in id order: the token whose
/// cumulative probability first exceeds `u`. A device keeps every token tied with the
/// last one a top-k (above 1) or top-p (above 0) filter keeps, where the host keeps the
/// lowest ids; otherwise both pick the same token from the same logits, up to rounding at
/// the edges of the intervals.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Draw {
    /// Softmax temperature; 0: greedy ([`argmax`]).
    pub temperature: f32,
    /// 0: off.
    pub top_k: usize,
    /// In [0, 1]; 1: off, 0: the most likely token only.
    pub top_p: f32,
    /// In [0, 1]; 0: off.
    pub min_p: f32,
    /// The uniform in [0, 1) the draw spends.
    pub u: f64,
}

impl Draw {
    /// Greedy decoding: the argmax, no randomness.
    pub const GREEDY: Draw = Draw {
        temperature: 0.0,
        top_k: 0,
        top_p: 1.0,
        min_p: 0.0,
        u: 0.0,
    };

    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0
    }

    /// The token this draw picks from `logits`.
    pub fn pick(&self, logits: &[f32]) -> u32 {
        if self.is_greedy() {
            return argmax(logits);
        }
        match self.filter(logits) {
            Some(mut cands) => {
                cands.sort_unstable_by_key(|c| c.id);
                let total: f64 = cands.iter().map(|c| c.value).sum();
                let target = self.u * total;
                let mut cum = 0.0;
                for c in &cands {
                    cum += c.value;
                    if target < cum {
                        return c.id;
                    }
                }
                // Rounding can leave the target just above the final sum: the last token
                // with mass.
                cands
                    .iter()
                    .rev()
                    .find(|c| c.value > 0.0)
                    .or(cands.last())
                    .map_or(0, |c| c.id)
            }
            None => argmax(logits),
        }
    }

    /// Applies temperature, softmax, top-k, top-p and min-p; returns unnormalised
    /// probabilities of the survivors, or `None` when no logit has any probability.
    fn filter(&self, logits: &[f32]) -> Option<Vec<Candidate>> {
        let temperature = self.temperature as f64;
        let scaled = |v: f32| {
            let s = v as f64 / temperature;
            // `+ 0.0` folds -0.0 into 0.0 so `total_cmp` ties fall back to the id.
            if s.is_nan() {
                f64::NEG_INFINITY
            } else {
                s + 0.0
            }
        };
        let mut cands: Vec<Candidate> = logits
            .iter()
            .enumerate()
            .map(|(i, &v)| Candidate {
                id: i as u32,
                value: scaled(v),
            })
            .filter(|c| c.value > f64::NEG_INFINITY)
            .collect();
        if cands.is_empty() {
            return None;
        }

        // Top-k: partial selection, no full sort of the vocabulary.
        let k = self.top_k;
        if k > 0 && k < cands.len() {
            cands.select_nth_unstable_by(k - 1, by_value_desc);
            cands.truncate(k);
        }

        // Softmax over the survivors; +inf logits share all the mass.
        let max = cands.iter().map(|c| c.value).fold(f64::NEG_INFINITY, f64::max);
        for c in &mut cands {
            c.value = if max == f64::INFINITY {
                if c.value == f64::INFINITY {
                    1.0
                } else {
                    0.0
                }
            } else {
                (c.value - max).exp()
            };
        }
        cands.retain(|c| c.value > 0.0);
        // The maximum itself has weight exp(0) = 1 (or 1 for +inf), so `cands` is not empty.

        // Top-p: smallest highest-probability prefix reaching `top_p`; at least one token.
        let top_p = self.top_p as f64;
        if top_p < 1.0 {
            cands.sort_unstable_by(by_value_desc);
            let total: f64 = cands.iter().map(|c| c.value).sum();
            let target = top_p * total;
            let mut cum = 0.0;
            let mut keep = cands.len();
            for (i, c) in cands.iter().enumerate() {
                cum += c.value;
                if cum >= target {
                    keep = i + 1;
                    break;
                }
            }
            cands.truncate(keep.max(1));
        }

        // Min-p: relative to the most likely survivor; the maximum always survives.
        let min_p = self.min_p as f64;
        if min_p > 0.0 {
            let p_max = cands.iter().map(|c| c.value).fold(0.0, f64::max);
            let threshold = min_p * p_max;
            cands.retain(|c| c.value >= threshold);
        }

        if cands.is_empty() {
            None
        } else {
            Some(cands)
        }
    }
}

/// Seeded xoshiro256** PRNG whose state is filled by SplitMix64 from a `u64` seed.
///
/// Both algorithms are Blackman & Vigna's published reference versions
/// (<https://prng.di.unimi.it/>), so a seed gives the same stream on every platform and
/// in every version of gyre.
#[derive(Clone, Debug)]
pub struct Rng {
    /// The four 64-bit words of xoshiro256** state; never all zero.
    s: [u64; 4],
}

/// One SplitMix64 step: advances `x` and returns the next output.
fn splitmix64(x: &mut u64) -> u64 {
    *x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *x;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Rng {
    /// Creates a generator whose state is the first four SplitMix64 outputs for `seed`.
    pub fn new(seed: u64) -> Self {
        let mut x = seed;
        let s = [
            splitmix64(&mut x),
            splitmix64(&mut x),
            splitmix64(&mut x),
            splitmix64(&mut x),
        ];
        Self::from_state(s)
    }

    /// Creates a generator seeded from std's per-process random hasher keys and the clock.
    pub fn from_entropy() -> Self {
        Self::new(entropy_seed())
    }

    /// Creates a generator from raw xoshiro256** state (all-zero state is replaced).
    fn from_state(s: [u64; 4]) -> Self {
        if s == [0; 4] {
            // The all-zero state is a fixed point of xoshiro; any other state is fine.
            return Self::new(0);
        }
        Self { s }
    }

    /// Returns the next 64 uniformly distributed bits (xoshiro256**).
    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.s;
        let result = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// Returns a uniform `f32` in `[0, 1)` built from the top 24 bits of `next_u64`.
    pub fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 * (1.0 / (1u64 << 24) as f32)
    }

    /// Returns a uniform `f64` in `[0, 1)` built from the top 53 bits of `next_u64`.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// Mixes std's randomly keyed hasher, the wall clock and a process counter into a seed.
fn entropy_seed() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
    use std::time::{SystemTime, UNIX_EPOCH};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    h.write_u128(nanos);
    h.write_u64(COUNTER.fetch_add(1, AtomicOrdering::Relaxed));
    h.write_u32(std::process::id());
    h.finish()
}

/// Index of the largest logit; NaN counts as `-inf`, ties go to the lowest index, empty gives 0.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0usize;
    let mut best_val = f32::NEG_INFINITY;
    for (i, &v) in logits.iter().enumerate() {
        // NaN compares false, so it never displaces the current best.
        if v > best_val {
            best = i;
            best_val = v;
        }
    }
    best as u32
}

/// Numerically stable log-softmax, computed in `f64`.
///
/// NaN counts as `-inf`. If some logits are `+inf`, they share all the probability
/// (`-ln(count)` each) and the rest get `-inf`. If no logit is above `-inf` (including the
/// all-NaN case) every output is `-inf`: there is no distribution to report.
pub fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let clean = |v: f32| {
        if v.is_nan() {
            f64::NEG_INFINITY
        } else {
            v as f64
        }
    };
    let max = logits.iter().map(|&v| clean(v)).fold(f64::NEG_INFINITY, f64::max);
    if max == f64::NEG_INFINITY {
        return vec![f32::NEG_INFINITY; logits.len()];
    }
    if max == f64::INFINITY {
        let n = logits.iter().filter(|&&v| v == f32::INFINITY).count();
        let lp = -(n as f64).ln() as f32;
        return logits
            .iter()
            .map(|&v| if v == f32::INFINITY { lp } else { f32::NEG_INFINITY })
            .collect();
    }
    let sum: f64 = logits.iter().map(|&v| (clean(v) - max).exp()).sum();
    let log_z = max + sum.ln();
    logits.iter().map(|&v| (clean(v) - log_z) as f32).collect()
}

/// Draws token ids from logits according to [`SamplingParams`], with its own PRNG.
#[derive(Clone, Debug)]
pub struct Sampler {
    /// The parameters applied on every call to [`Sampler::sample`].
    pub params: SamplingParams,
    /// The generator behind every random draw; reseed it to replay a sequence.
    pub rng: Rng,
}

/// One surviving token during filtering: its id and its scaled logit, then its probability.
#[derive(Clone, Copy, Debug)]
struct Candidate {
    /// Token id (index into the logits).
    id: u32,
    /// Scaled logit before softmax, unnormalised probability after.
    value: f64,
}

/// Descending by value, then ascending by id, so ties resolve like [`argmax`].
fn by_value_desc(a: &Candidate, b: &Candidate) -> Ordering {
    b.value.total_cmp(&a.value).then(a.id.cmp(&b.id))
}

impl Sampler {
    /// Creates a sampler; a `None` seed is replaced by one drawn from process entropy.
    ///
    /// The parameters are not validated here (call [`SamplingParams::validate`] at the API
    /// edge); [`Sampler::sample`] tolerates out-of-range values as documented there.
    pub fn new(params: SamplingParams) -> Self {
        let rng = match params.seed {
            Some(seed) => Rng::new(seed),
            None => Rng::from_entropy(),
        };
        Self { params, rng }
    }

    /// Picks the next token id from `logits`.
    ///
    /// `history` is the prompt followed by the ids generated so far and `prompt_len` is the
    /// length of the prompt part: the repetition penalty applies to every id in `history`
    /// (as in HF transformers), presence and frequency penalties only to
    /// `history[prompt_len..]` (as in the OpenAI API). Ids outside the vocabulary are
    /// ignored and `prompt_len` beyond `history.len()` means nothing was generated yet.
    ///
    /// Out-of-range parameters never panic: a temperature that is not `> 0` (including
    /// NaN) is greedy; `top_k` of 0 or at least the vocabulary size is off; `top_p` that is
    /// not `< 1` (including NaN) is off and `top_p <= 0` keeps only the most likely token;
    /// `min_p` that is not `> 0` is off and above 1 acts as 1 (the most likely token and
    /// any exactly tied with it); a
    /// repetition penalty that is not finite and `> 0` is off, as are non-finite
    /// presence/frequency penalties. NaN logits count as `-inf`. Empty logits return 0; if
    /// every logit is `-inf` or NaN the result is [`argmax`] of them (index 0).
    pub fn sample(&mut self, logits: &[f32], history: &[u32], prompt_len: usize) -> u32 {
        if logits.is_empty() {
            return 0;
        }
        let mut logits = logits.to_vec();
        apply_repetition_penalty(&mut logits, history, self.params.repetition_penalty);
        let generated = history.get(prompt_len..).unwrap_or(&[]);
        apply_presence_frequency(
            &mut logits,
            generated,
            self.params.presence_penalty,
            self.params.frequency_penalty,
        );
        self.next_draw().pick(&logits)
    }

    /// The next draw (penalties aside): the parameters in their canonical ranges (see
    /// [`Sampler::sample`]) and, unless greedy, the PRNG's next uniform.
    pub fn next_draw(&mut self) -> Draw {
        let p = &self.params;
        if p.temperature.is_nan() || p.temperature <= 0.0 {
            return Draw::GREEDY;
        }
        let top_p = if p.top_p < 1.0 { p.top_p.max(0.0) } else { 1.0 };
        let min_p = if p.min_p > 0.0 { p.min_p.min(1.0) } else { 0.0 };
        Draw {
            temperature: p.temperature,
            top_k: p.top_k,
            top_p,
            min_p,
            u: self.rng.next_f64(),
        }
    }
}

/// HF repetition penalty: each distinct id in `history` is penalised once
/// (`logit < 0 ? logit * penalty : logit / penalty`).
fn apply_repetition_penalty(logits: &mut [f32], history: &[u32], penalty: f32) {
    if !(penalty.is_finite() && penalty > 0.0) || penalty == 1.0 || history.is_empty() {
        return;
    }
    let mut seen = vec![false; logits.len()];
    for &id in history {
        let i = id as usize;
        if i < logits.len() && !seen[i] {
            seen[i] = true;
            let l = logits[i];
            logits[i] = if l < 0.0 { l * penalty } else { l / penalty };
        }
    }
}

/// OpenAI penalties: `logit -= presence * (count > 0) + frequency * count` over `generated`.
fn apply_presence_frequency(logits: &mut [f32], generated: &[u32], presence: f32, frequency: f32) {
    let presence = if presence.is_finite() { presence } else { 0.0 };
    let frequency = if frequency.is_finite() { frequency } else { 0.0 };
    if (presence == 0.0 && frequency == 0.0) || generated.is_empty() {
        return;
    }
    let mut ids: Vec<u32> = generated
        .iter()
        .copied()
        .filter(|&id| (id as usize) < logits.len())
        .collect();
    ids.sort_unstable();
    for run in ids.chunk_by(|a, b| a == b) {
        let count = run.len() as f32;
        logits[run[0] as usize] -= presence + frequency * count;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_greedy_params_sample_exactly_the_argmax() {
        let logits = [0.5, 2.0, -1.0, 2.0, 1.9];
        let history = [1u32, 1, 4];
        let greedy = SamplingParams::default();
        for p in [
            greedy.clone(),
            SamplingParams {
                temperature: f32::NAN,
                ..greedy.clone()
            },
            SamplingParams {
                repetition_penalty: 0.0,
                ..greedy.clone()
            },
            SamplingParams {
                repetition_penalty: f32::NAN,
                ..greedy.clone()
            },
            SamplingParams {
                presence_penalty: f32::INFINITY,
                frequency_penalty: f32::NAN,
                ..greedy.clone()
            },
            SamplingParams {
                top_k: 1,
                top_p: 0.5,
                min_p: 0.3,
                ..greedy.clone()
            },
        ] {
            assert!(p.is_plain_greedy(), "{p:?}");
            assert_eq!(Sampler::new(p).sample(&logits, &history, 1), argmax(&logits));
        }
        // Each of these changes the pick (token 1 is in the history), so none is plain.
        for p in [
            SamplingParams {
                repetition_penalty: 1.3,
                ..greedy.clone()
            },
            SamplingParams {
                presence_penalty: 0.5,
                ..greedy.clone()
            },
            SamplingParams {
                frequency_penalty: 0.5,
                ..greedy.clone()
            },
        ] {
            assert!(!p.is_plain_greedy(), "{p:?}");
            assert_ne!(Sampler::new(p).sample(&logits, &history, 1), argmax(&logits));
        }
        assert!(!SamplingParams {
            temperature: 0.7,
            ..greedy
        }
        .is_plain_greedy());
    }

    fn params(temperature: f32) -> SamplingParams {
        SamplingParams {
            temperature,
            seed: Some(7),
            ..SamplingParams::default()
        }
    }

    #[test]
    fn splitmix64_matches_reference() {
        // First outputs of the reference splitmix64.c for seed 0.
        let mut x = 0u64;
        let got: Vec<u64> = (0..4).map(|_| splitmix64(&mut x)).collect();
        assert_eq!(
            got,
            [
                0xE220_A839_7B1D_CDAF,
                0x6E78_9E6A_A1B9_65F4,
                0x06C4_5D18_8009_454F,
                0xF88B_B8A8_724C_81EC
            ]
        );
    }

    #[test]
    fn xoshiro_matches_reference() {
        // Reference xoshiro256starstar.c from state {1, 2, 3, 4}.
        let mut rng = Rng::from_state([1, 2, 3, 4]);
        let got: Vec<u64> = (0..6).map(|_| rng.next_u64()).collect();
        assert_eq!(
            got,
            [
                11520,
                0,
                1509978240,
                1215971899390074240,
                1216172134540287360,
                607988272756665600
            ]
        );
        // Rng::new(0): SplitMix64(0) state, then xoshiro256**.
        let mut rng = Rng::new(0);
        assert_eq!(
            rng.s,
            [
                0xE220_A839_7B1D_CDAF,
                0x6E78_9E6A_A1B9_65F4,
                0x06C4_5D18_8009_454F,
                0xF88B_B8A8_724C_81EC
            ]
        );
        let got: Vec<u64> = (0..4).map(|_| rng.next_u64()).collect();
        assert_eq!(
            got,
            [
                0x99EC_5F36_CB75_F2B4,
                0xBF6E_1F78_4956_452A,
                0x1A5F_849D_4933_E6E0,
                0x6AA5_94F1_262D_2D2C
            ]
        );
        let mut rng = Rng::new(42);
        assert_eq!(rng.next_u64(), 0x1578_0B2E_0C2E_C716);
    }

    #[test]
    fn floats_are_in_unit_interval() {
        let mut rng = Rng::new(3);
        for _ in 0..10_000 {
            let f = rng.next_f32();
            assert!((0.0..1.0).contains(&f));
            let d = rng.next_f64();
            assert!((0.0..1.0).contains(&d));
        }
        assert_eq!(Rng::from_state([0; 4]).s, Rng::new(0).s);
    }

    #[test]
    fn argmax_ties_nan_and_empty() {
        assert_eq!(argmax(&[]), 0);
        assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0]), 1);
        assert_eq!(argmax(&[f32::NAN, 0.5, f32::NAN]), 1);
        assert_eq!(argmax(&[f32::NAN, f32::NAN]), 0);
        assert_eq!(argmax(&[f32::NEG_INFINITY, f32::NEG_INFINITY]), 0);
        assert_eq!(argmax(&[-5.0, f32::INFINITY, 2.0]), 1);
    }

    #[test]
    fn log_softmax_is_normalised_and_handles_extremes() {
        let lp = log_softmax(&[1.0, 2.0, 3.0, 1000.0]);
        let sum: f64 = lp.iter().map(|&v| (v as f64).exp()).sum();
        assert!((sum - 1.0).abs() < 1e-6);
        assert!(lp[3] <= 0.0 && lp[3] > -1e-6);
        let lp = log_softmax(&[0.0, f32::NAN, 0.0]);
        assert!((lp[0] - (-(2f32).ln())).abs() < 1e-6);
        assert_eq!(lp[1], f32::NEG_INFINITY);
        let lp = log_softmax(&[1.0, f32::INFINITY, f32::INFINITY]);
        assert_eq!(lp[0], f32::NEG_INFINITY);
        assert!((lp[1] - (-(2f32).ln())).abs() < 1e-6);
        assert!(log_softmax(&[f32::NAN, f32::NEG_INFINITY])
            .iter()
            .all(|&v| v == f32::NEG_INFINITY));
        assert!(log_softmax(&[]).is_empty());
    }

    #[test]
    fn greedy_is_argmax() {
        let logits = [0.1, -2.0, 4.5, 4.5, 3.0];
        let mut s = Sampler::new(SamplingParams::default());
        assert_eq!(s.sample(&logits, &[], 0), 2);
        assert_eq!(s.sample(&logits, &[], 0), argmax(&logits));
    }

    fn spread_logits() -> Vec<f32> {
        (0..50).map(|i| ((i * 37) % 11) as f32 * 0.3).collect()
    }

    #[test]
    fn same_seed_same_sequence_different_seed_differs() {
        let logits = spread_logits();
        let run = |seed: u64| {
            let mut s = Sampler::new(SamplingParams {
                seed: Some(seed),
                ..params(1.0)
            });
            (0..64).map(|_| s.sample(&logits, &[], 0)).collect::<Vec<_>>()
        };
        assert_eq!(run(1), run(1));
        assert_ne!(run(1), run(2));
    }

    #[test]
    fn top_k_one_is_greedy_at_any_temperature() {
        let logits = spread_logits();
        let greedy = argmax(&logits);
        for t in [0.1, 1.0, 5.0, 100.0] {
            let mut s = Sampler::new(SamplingParams {
                top_k: 1,
                ..params(t)
            });
            for _ in 0..50 {
                assert_eq!(s.sample(&logits, &[], 0), greedy);
            }
        }
    }

    #[test]
    fn tiny_top_p_is_greedy() {
        let logits = spread_logits();
        let greedy = argmax(&logits);
        for top_p in [1e-6, 0.0, -1.0] {
            let mut s = Sampler::new(SamplingParams { top_p, ..params(2.0) });
            for _ in 0..50 {
                assert_eq!(s.sample(&logits, &[], 0), greedy);
            }
        }
    }

    #[test]
    fn min_p_one_is_greedy() {
        let logits = [0.0, 1.0, 2.5, 2.4, -1.0];
        for min_p in [1.0, 3.0] {
            let mut s = Sampler::new(SamplingParams { min_p, ..params(3.0) });
            for _ in 0..50 {
                assert_eq!(s.sample(&logits, &[], 0), 2);
            }
        }
    }

    #[test]
    fn top_p_keeps_the_smallest_nucleus() {
        // Probabilities 0.5, 0.25, 0.125, 0.125: top_p 0.7 keeps tokens 0 and 1 only.
        let logits: Vec<f32> = [0.5f32, 0.25, 0.125, 0.125].iter().map(|p| p.ln()).collect();
        let mut s = Sampler::new(SamplingParams {
            top_p: 0.7,
            ..params(1.0)
        });
        let mut seen = [0usize; 4];
        for _ in 0..2000 {
            seen[s.sample(&logits, &[], 0) as usize] += 1;
        }
        assert!(seen[0] > 0 && seen[1] > 0);
        assert_eq!(seen[2] + seen[3], 0);
    }

    #[test]
    fn top_k_larger_than_vocab_is_off() {
        let logits = [0.0, 0.0];
        let mut s = Sampler::new(SamplingParams {
            top_k: 1000,
            ..params(1.0)
        });
        let mut seen = [0usize; 2];
        for _ in 0..1000 {
            seen[s.sample(&logits, &[], 0) as usize] += 1;
        }
        assert!(seen[0] > 300 && seen[1] > 300);
    }

    #[test]
    fn frequencies_match_softmax() {
        let logits = [1.0f32, 0.0, -0.5, 2.0];
        let temperature = 1.3f32;
        let scaled: Vec<f32> = logits.iter().map(|l| l / temperature).collect();
        let expected: Vec<f64> = log_softmax(&scaled).iter().map(|&v| (v as f64).exp()).collect();
        let mut s = Sampler::new(params(temperature));
        let n = 20_000;
        let mut counts = [0usize; 4];
        for _ in 0..n {
            counts[s.sample(&logits, &[], 0) as usize] += 1;
        }
        let chi2: f64 = counts
            .iter()
            .zip(&expected)
            .map(|(&c, &p)| {
                let e = p * n as f64;
                (c as f64 - e).powi(2) / e
            })
            .sum();
        // 3 degrees of freedom: P(chi2 > 16.27) = 0.001.
        assert!(chi2 < 16.27, "chi2 = {chi2}, counts = {counts:?}");
    }

    #[test]
    fn repetition_penalty_flips_argmax_like_hf() {
        let mut s = Sampler::new(SamplingParams {
            repetition_penalty: 2.0,
            ..SamplingParams::default()
        });
        // Positive logit divided: 3.0 -> 1.5 < 2.0.
        assert_eq!(s.sample(&[3.0, 2.0], &[], 0), 0);
        assert_eq!(s.sample(&[3.0, 2.0], &[0], 1), 1);
        // Negative logit multiplied: -1.0 -> -2.0 < -1.5.
        assert_eq!(s.sample(&[-1.0, -1.5], &[0], 1), 1);
        // Repeats in history penalise once, as HF's gather/scatter does.
        let mut l = vec![4.0, -4.0, 1.0];
        apply_repetition_penalty(&mut l, &[0, 0, 0, 1, 1, 99], 2.0);
        assert_eq!(l, [2.0, -8.0, 1.0]);
        // The prompt counts for the repetition penalty.
        assert_eq!(s.sample(&[3.0, 2.0], &[0, 5], 2), 1);
    }

    #[test]
    fn presence_and_frequency_are_exact_and_skip_the_prompt() {
        let mut l = vec![1.0f32, 1.0, 1.0, 1.0];
        // Prompt [1, 1, 3], generated [0, 0, 0, 1].
        let history = [1, 1, 3, 0, 0, 0, 1];
        apply_presence_frequency(&mut l, &history[3..], 0.5, 0.25);
        assert_eq!(l, [1.0 - (0.5 + 0.25 * 3.0), 1.0 - (0.5 + 0.25), 1.0, 1.0]);
        // Through the sampler: token 0 falls below token 2 only because of the output count.
        let mut s = Sampler::new(SamplingParams {
            presence_penalty: 0.5,
            frequency_penalty: 0.25,
            ..SamplingParams::default()
        });
        let logits = [2.0, 0.0, 1.0, 0.0];
        assert_eq!(s.sample(&logits, &history, 3), 2);
        assert_eq!(s.sample(&logits, &history, 7), 0);
        assert_eq!(s.sample(&logits, &history, 100), 0);
    }

    #[test]
    fn validate_rejects_bad_values() {
        assert!(SamplingParams::default().validate().is_ok());
        let bad = [
            (
                "temperature",
                SamplingParams {
                    temperature: f32::NAN,
                    ..Default::default()
                },
            ),
            (
                "temperature",
                SamplingParams {
                    temperature: -0.5,
                    ..Default::default()
                },
            ),
            (
                "top_p",
                SamplingParams {
                    top_p: 0.0,
                    ..Default::default()
                },
            ),
            (
                "top_p",
                SamplingParams {
                    top_p: 1.5,
                    ..Default::default()
                },
            ),
            (
                "top_p",
                SamplingParams {
                    top_p: f32::NAN,
                    ..Default::default()
                },
            ),
            (
                "min_p",
                SamplingParams {
                    min_p: -0.1,
                    ..Default::default()
                },
            ),
            (
                "min_p",
                SamplingParams {
                    min_p: 1.1,
                    ..Default::default()
                },
            ),
            (
                "repetition_penalty",
                SamplingParams {
                    repetition_penalty: 0.0,
                    ..Default::default()
                },
            ),
            (
                "repetition_penalty",
                SamplingParams {
                    repetition_penalty: -1.0,
                    ..Default::default()
                },
            ),
            (
                "presence_penalty",
                SamplingParams {
                    presence_penalty: f32::INFINITY,
                    ..Default::default()
                },
            ),
        ];
        for (field, p) in bad {
            let err = p.validate().expect_err(field).to_string();
            assert!(err.contains(field), "{err}");
        }
        let ok = SamplingParams {
            temperature: 0.7,
            top_k: 40,
            top_p: 1.0,
            min_p: 1.0,
            repetition_penalty: 1.1,
            presence_penalty: -2.0,
            frequency_penalty: 2.0,
            seed: Some(1),
        };
        assert!(ok.validate().is_ok());
    }

    #[test]
    fn degenerate_logits_do_not_panic() {
        let cases: Vec<Vec<f32>> = vec![
            vec![],
            vec![f32::NAN; 5],
            vec![f32::NEG_INFINITY; 5],
            vec![f32::NAN, f32::NEG_INFINITY, 1.0],
            vec![f32::INFINITY, 0.0, f32::INFINITY],
            vec![f32::MAX, f32::MIN, 0.0],
        ];
        let variants = [
            SamplingParams::default(),
            params(1.0),
            params(1e-30),
            params(f32::INFINITY),
            params(f32::NAN),
            params(-1.0),
            SamplingParams {
                top_k: 2,
                top_p: 0.5,
                min_p: 0.5,
                ..params(0.8)
            },
            SamplingParams {
                top_p: f32::NAN,
                min_p: f32::NAN,
                ..params(1.0)
            },
            SamplingParams {
                repetition_penalty: f32::NAN,
                presence_penalty: f32::NAN,
                frequency_penalty: f32::INFINITY,
                ..params(1.0)
            },
        ];
        for p in variants {
            let mut s = Sampler::new(p);
            for logits in &cases {
                let id = s.sample(logits, &[0, 1, 7, 1 << 30], 1);
                assert!(logits.is_empty() || (id as usize) < logits.len());
            }
        }
        let mut s = Sampler::new(params(1.0));
        assert_eq!(s.sample(&[f32::NAN, f32::NEG_INFINITY, 1.0], &[], 0), 2);
        assert_eq!(s.sample(&[f32::NAN; 3], &[], 0), 0);
        for _ in 0..20 {
            let id = s.sample(&[f32::INFINITY, 0.0, f32::INFINITY], &[], 0);
            assert!(id == 0 || id == 2);
        }
    }

    #[test]
    fn unseeded_samplers_get_distinct_seeds() {
        let a = Sampler::new(SamplingParams::default());
        let b = Sampler::new(SamplingParams::default());
        assert_ne!(a.rng.s, b.rng.s);
    }
}
