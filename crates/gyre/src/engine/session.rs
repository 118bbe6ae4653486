//! One sequence's generation: prefill, the decode loop, sampling, streaming text, stop rules.
//!
//! A `Session` owns the sequence's [`State`] and the ids that state has consumed, so a chat
//! can resend its whole history and pay prefill only for what is new (the common prefix of
//! the old and new ids is kept whenever the state can be rewound to it).

use anyhow::{bail, Result};

use super::stop::{StopMatcher, StopOutcome};
use crate::models::{Logits, Model, SeqInput};
use crate::sampling::{Draw, Sampler, SamplingParams};
use crate::state::State;
use crate::tokenizer::Tokenizer;

/// What to generate and when to stop.
#[derive(Clone, Debug)]
pub struct GenerateParams {
    /// Most new tokens to produce.
    pub max_tokens: usize,
    /// Sampling settings (temperature 0 = greedy).
    pub sampling: SamplingParams,
    /// Stop strings: generation ends before any of them, which is not emitted.
    pub stop: Vec<String>,
    /// Token ids that end generation (not emitted); usually the tokenizer's EOS ids.
    pub stop_ids: Vec<u32>,
}

/// Why generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop id or stop string.
    Stop,
    /// `max_tokens` or the model's context length.
    Length,
}

/// The outcome of one `generate` call.
#[derive(Clone, Debug)]
pub struct Completion {
    /// The emitted text (stop strings excluded).
    pub text: String,
    /// The sampled ids (a final stop id excluded).
    pub tokens: Vec<u32>,
    /// Prompt tokens that had to be fed (the rest came from the reused state).
    pub prompt_tokens_fed: usize,
    /// Prompt length in tokens.
    pub prompt_tokens: usize,
    pub finish: FinishReason,
}

/// A sequence in progress.
pub struct Session<'m> {
    model: &'m dyn Model,
    /// What `reset` returns to: a fresh state, or one loaded from a state file.
    initial: State,
    state: State,
    /// Ids the state has consumed, in order.
    consumed: Vec<u32>,
}

/// What a feed returns.
enum Next {
    Logits(Vec<f32>),
    /// The next token, drawn where the logits are.
    Token(u32),
}

impl<'m> Session<'m> {
    /// A fresh sequence.
    pub fn new(model: &'m dyn Model) -> Session<'m> {
        Session::with_state(model, model.new_state())
    }

    /// A sequence starting from a given state (e.g. a loaded state file); `reset` returns to it.
    pub fn with_state(model: &'m dyn Model, state: State) -> Session<'m> {
        Session {
            model,
            initial: state.clone(),
            state,
            consumed: Vec::new(),
        }
    }

    /// Returns to the initial state.
    pub fn reset(&mut self) {
        self.state = self.initial.clone();
        self.consumed.clear();
    }

    /// True when the state has consumed no tokens (a prompt should then start with BOS).
    pub fn is_fresh(&self) -> bool {
        self.state.tokens_seen() == 0
    }

    /// The state after the consumed ids.
    pub fn state(&self) -> &State {
        &self.state
    }

    /// Feeds `tokens` and returns the logits after the last one.
    pub fn feed(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        match self.feed_for(tokens, None)? {
            Next::Logits(l) => Ok(l),
            Next::Token(_) => unreachable!("feed_for(_, None) returns logits"),
        }
    }

    /// Feeds `tokens`; returns the logits after the last one, or with a `draw` only the
    /// token it draws (where the model runs: on a GPU the logits stay there).
    fn feed_for(&mut self, tokens: &[u32], draw: Option<Draw>) -> Result<Next> {
        if let Some(ctx) = self.model.info().context_length {
            let total = self.state.tokens_seen() + tokens.len();
            if total > ctx {
                bail!("the sequence would be {total} tokens, longer than the model's context of {ctx}");
            }
        }
        let mut batch = [SeqInput {
            tokens,
            state: &mut self.state,
        }];
        let next = if let Some(d) = draw {
            Next::Token(
                self.model
                    .forward_drawn(&mut batch, &[d])?
                    .pop()
                    .unwrap_or_default(),
            )
        } else {
            let logits = self
                .model
                .forward(&mut batch, Logits::Last)?
                .pop()
                .unwrap_or_default();
            crate::models::check_finite_logits(&logits, self.state.tokens_seen().saturating_sub(1))?;
            Next::Logits(logits)
        };
        self.consumed.extend_from_slice(tokens);
        Ok(next)
    }

    /// Brings the state to the end of `prompt`, reusing the consumed ids it shares with
    /// `prompt`, and returns what follows the prompt (see [`Session::feed_for`]) and how many
    /// ids were fed.
    fn prefill(&mut self, prompt: &[u32], draw: Option<Draw>) -> Result<(Next, usize)> {
        if prompt.is_empty() {
            bail!("the prompt is empty: nothing to continue from (give some text, or a model that adds BOS)");
        }
        let common = self
            .consumed
            .iter()
            .zip(prompt)
            .take_while(|(a, b)| a == b)
            .count();
        // Keep at least the last prompt token to feed, so there are logits to sample from.
        let keep = common.min(prompt.len() - 1);
        if keep < self.consumed.len() && !self.state.truncate(keep) {
            self.reset();
        } else {
            self.consumed.truncate(keep);
        }
        let start = self.consumed.len();
        let next = self.feed_for(&prompt[start..], draw)?;
        Ok((next, prompt.len() - start))
    }

    /// Continues `prompt` (the whole sequence so far, as ids), streaming text to `on_text`.
    pub fn generate(
        &mut self,
        prompt: &[u32],
        params: &GenerateParams,
        tokenizer: &Tokenizer,
        mut on_text: impl FnMut(&str) -> Result<()>,
    ) -> Result<Completion> {
        params.sampling.validate()?;
        // Without penalties the tokens are drawn where the logits are: no logits to the host.
        let mut sampler = Sampler::new(params.sampling.clone());
        let drawn = !params.sampling.has_penalties();
        let (mut next, fed) = self.prefill(prompt, drawn.then(|| sampler.next_draw()))?;
        let mut stop = StopMatcher::new(params.stop.clone());
        let mut detok = tokenizer.decode_stream(true);
        let mut history = prompt.to_vec();
        let (mut text, mut tokens) = (String::new(), Vec::new());
        let ctx = self.model.info().context_length;
        let mut emit = |s: &str, text: &mut String| -> Result<()> {
            if !s.is_empty() {
                text.push_str(s);
                on_text(s)?;
            }
            Ok(())
        };
        let finish = loop {
            if tokens.len() >= params.max_tokens {
                break FinishReason::Length;
            }
            let id = match &next {
                Next::Logits(logits) => sampler.sample(logits, &history, prompt.len()),
                Next::Token(id) => *id,
            };
            if params.stop_ids.contains(&id) {
                break FinishReason::Stop;
            }
            tokens.push(id);
            history.push(id);
            if let Some(delta) = detok.push(id)? {
                match stop.push(&delta) {
                    StopOutcome::Continue(s) => emit(&s, &mut text)?,
                    StopOutcome::Stop(s) => {
                        emit(&s, &mut text)?;
                        break FinishReason::Stop;
                    }
                }
            }
            if tokens.len() >= params.max_tokens || ctx.is_some_and(|c| self.state.tokens_seen() >= c) {
                break FinishReason::Length;
            }
            next = self.feed_for(&[id], drawn.then(|| sampler.next_draw()))?;
        };
        if !stop.is_stopped() {
            let rest = detok.finish()?;
            match stop.push(&rest) {
                StopOutcome::Continue(s) | StopOutcome::Stop(s) => emit(&s, &mut text)?,
            }
            let held = stop.finish();
            emit(&held, &mut text)?;
        }
        Ok(Completion {
            text,
            tokens,
            prompt_tokens_fed: fed,
            prompt_tokens: prompt.len(),
            finish,
        })
    }
}
