//! Perplexity of a model on a text, with one fixed protocol so figures are comparable with
//! the training code's (`tools/train_demos.py` uses the same one).
//!
//! The text is tokenized without special tokens and cut into consecutive windows of `window`
//! tokens (the last one may be shorter). Each window runs from a fresh state. With a BOS id
//! the window is `[BOS] + chunk` and every chunk token is scored; without one (RWKV) the
//! window is the chunk and every token but its first is scored. Perplexity = exp(mean NLL).

use std::time::Instant;

use anyhow::{bail, Result};

use crate::models::{Logits, Model, SeqInput};
use crate::sampling::log_softmax;

/// What an evaluation measured.
#[derive(Clone, Debug, serde::Serialize)]
pub struct EvalReport {
    /// Tokens whose probability was scored.
    pub scored: usize,
    /// Mean negative log-likelihood (nats per token).
    pub mean_nll: f64,
    /// exp(mean_nll).
    pub perplexity: f64,
    /// Tokens fed per second (prefill speed over the whole text).
    pub tokens_per_s: f64,
}

/// Perplexity of `model` on `ids` (see the module docs for the protocol).
pub fn perplexity(model: &dyn Model, ids: &[u32], window: usize, bos: Option<u32>) -> Result<EvalReport> {
    if window < 2 {
        bail!("the evaluation window must be at least 2 tokens");
    }
    let (mut nll, mut scored, mut fed) = (0f64, 0usize, 0usize);
    let t0 = Instant::now();
    for chunk in ids.chunks(window) {
        let input: Vec<u32> = bos.into_iter().chain(chunk.iter().copied()).collect();
        if input.len() < 2 {
            continue;
        }
        let mut state = model.new_state();
        let logits = model
            .forward(
                &mut [SeqInput {
                    tokens: &input,
                    state: &mut state,
                }],
                Logits::All,
            )?
            .pop()
            .unwrap_or_default();
        let v = model.info().vocab_size;
        for (t, row) in logits.chunks_exact(v).enumerate().take(input.len() - 1) {
            let target = input[t + 1] as usize;
            nll -= log_softmax(row)[target] as f64;
            scored += 1;
        }
        fed += input.len();
    }
    if scored == 0 {
        bail!("the text is too short to evaluate: it has {} tokens", ids.len());
    }
    let mean_nll = nll / scored as f64;
    Ok(EvalReport {
        scored,
        mean_nll,
        perplexity: mean_nll.exp(),
        tokens_per_s: fed as f64 / t0.elapsed().as_secs_f64(),
    })
}
