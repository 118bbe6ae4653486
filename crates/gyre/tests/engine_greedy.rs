//! The engine's drawing fast path: decode steps whose sequences need no penalty or logprobs
//! ask the model for its draws only (`Model::forward_drawn`), and give the same tokens as
//! sampling from the logits.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};

use common::*;
use gyre::engine::scheduler::{Engine, EngineConfig, Event, Prompt, Request};
use gyre::loader::Checkpoint;
use gyre::models::{self, Logits, Model, ModelInfo, SeqInput};
use gyre::sampling::{Draw, SamplingParams};
use gyre::state::State;
use gyre::tokenizer::Tokenizer;

/// A model that counts which kind of pass it was asked for.
struct Counting {
    inner: Box<dyn Model>,
    logits_passes: AtomicUsize,
    greedy_passes: AtomicUsize,
}

impl Model for Counting {
    fn info(&self) -> &ModelInfo {
        self.inner.info()
    }

    fn new_state(&self) -> State {
        self.inner.new_state()
    }

    fn state_bytes(&self, tokens: usize) -> usize {
        self.inner.state_bytes(tokens)
    }

    fn forward(&self, batch: &mut [SeqInput<'_>], which: Logits) -> anyhow::Result<Vec<Vec<f32>>> {
        self.logits_passes.fetch_add(1, Ordering::Relaxed);
        self.inner.forward(batch, which)
    }

    fn forward_drawn(&self, batch: &mut [SeqInput<'_>], draws: &[Draw]) -> anyhow::Result<Vec<u32>> {
        self.greedy_passes.fetch_add(1, Ordering::Relaxed);
        self.inner.forward_drawn(batch, draws)
    }
}

/// Generated ids of one request (and whether it reported logprobs).
fn run(
    handle: &gyre::engine::scheduler::EngineHandle,
    prompt: &[u32],
    sampling: SamplingParams,
    logprobs: Option<usize>,
) -> (Vec<u32>, bool) {
    let mut rx = handle
        .submit(Request {
            prompt: Prompt::Tokens(prompt.to_vec()),
            max_tokens: Some(12),
            sampling,
            stop: Vec::new(),
            logprobs,
        })
        .unwrap();
    let (mut ids, mut had_logprobs) = (Vec::new(), false);
    while let Some(e) = rx.recv() {
        match e {
            Event::Delta { tokens, logprobs, .. } => {
                ids.extend(tokens);
                had_logprobs |= !logprobs.is_empty();
            }
            Event::Failed(e) => panic!("{e:?}"),
            Event::Started { .. } | Event::Done { .. } => {}
        }
    }
    (ids, had_logprobs)
}

#[test]
fn plain_greedy_decode_steps_take_the_models_picks() {
    let dir = fixture("llama", "llama_gqa_f32");
    let ckpt = Checkpoint::open(&dir, |_, _| {}).unwrap();
    let model = Counting {
        inner: models::load(&ckpt).unwrap(),
        logits_passes: AtomicUsize::new(0),
        greedy_passes: AtomicUsize::new(0),
    };
    let tok_path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../gyre-cli/tests/fixtures/tiny_chat/tokenizer.json");
    let tokenizer = Tokenizer::from_file(&tok_path).unwrap();
    let config = EngineConfig {
        cache_bytes: 0,
        ..EngineConfig::default()
    };
    let (engine, handle) = Engine::new(
        &model,
        std::sync::Arc::new(tokenizer),
        None,
        model.new_state(),
        config,
    );
    let prompt: Vec<u32> = (3..12).collect();
    // The requests run while the engine does; the checks follow its shutdown, so that a
    // failing one cannot leave the engine thread running.
    let (first, with_logprobs, penalised_passes, seeded) = std::thread::scope(|scope| {
        scope.spawn(|| engine.run());
        // Plain greedy: the prompt's pass gives logits, every decode step only picks.
        let (picked, _) = run(&handle, &prompt, SamplingParams::default(), None);
        let first = (
            picked,
            model.logits_passes.load(Ordering::Relaxed),
            model.greedy_passes.load(Ordering::Relaxed),
        );
        // With logprobs the steps need the logits: same tokens, no drawing pass.
        let with_logprobs = run(&handle, &prompt, SamplingParams::default(), Some(1));
        let after_logprobs = model.greedy_passes.load(Ordering::Relaxed);
        // A penalty changes the logits before the argmax: no drawing pass either.
        let penalised = SamplingParams {
            repetition_penalty: 1.5,
            ..SamplingParams::default()
        };
        run(&handle, &prompt, penalised, None);
        let penalised_passes = (after_logprobs, model.greedy_passes.load(Ordering::Relaxed));
        // Seeded temperature sampling without penalties draws in the model too, and the same
        // seed gives the same tokens with the logits on the host (logprobs asked for).
        let seeded = SamplingParams {
            temperature: 1.0,
            top_p: 0.9,
            seed: Some(3),
            ..SamplingParams::default()
        };
        let before = model.greedy_passes.load(Ordering::Relaxed);
        let (drawn, _) = run(&handle, &prompt, seeded.clone(), None);
        let drawn_passes = model.greedy_passes.load(Ordering::Relaxed) - before;
        let (from_logits, _) = run(&handle, &prompt, seeded, Some(1));
        handle.shutdown();
        (
            first,
            with_logprobs,
            penalised_passes,
            (drawn, drawn_passes, from_logits),
        )
    });
    let (picked, logits, greedy) = first;
    assert_eq!(picked.len(), 12);
    assert_eq!((logits, greedy), (1, 11), "passes with logits, greedy passes");
    let (sampled, had_logprobs) = with_logprobs;
    assert!(had_logprobs);
    assert_eq!(sampled, picked);
    assert_eq!(penalised_passes.0, greedy);
    assert_eq!(penalised_passes.1, greedy);
    let (drawn, drawn_passes, from_logits) = seeded;
    assert_eq!(drawn_passes, 11, "drawing passes of a sampled request");
    assert_eq!(
        drawn, from_logits,
        "the same seed drawn in the model and on the host"
    );
}
