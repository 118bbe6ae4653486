//! The engine's greedy fast path: decode steps whose sequences all sample plain greedy ask the
//! model for its picks only (`Model::forward_greedy`), and give the same tokens as sampling
//! from the logits.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};

use common::*;
use gyre::engine::scheduler::{Engine, EngineConfig, Event, Prompt, Request};
use gyre::loader::Checkpoint;
use gyre::models::{self, Logits, Model, ModelInfo, SeqInput};
use gyre::sampling::SamplingParams;
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

    fn forward_greedy(&self, batch: &mut [SeqInput<'_>]) -> anyhow::Result<Vec<u32>> {
        self.greedy_passes.fetch_add(1, Ordering::Relaxed);
        self.inner.forward_greedy(batch)
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
    let (engine, handle) = Engine::new(&model, &tokenizer, None, model.new_state(), config);
    let prompt: Vec<u32> = (3..12).collect();
    std::thread::scope(|scope| {
        scope.spawn(|| engine.run());
        // Plain greedy: the prompt's pass gives logits, every decode step only picks.
        let (picked, _) = run(&handle, &prompt, SamplingParams::default(), None);
        let (logits, greedy) = (
            model.logits_passes.load(Ordering::Relaxed),
            model.greedy_passes.load(Ordering::Relaxed),
        );
        assert_eq!(picked.len(), 12);
        assert_eq!((logits, greedy), (1, 11), "passes with logits, greedy passes");
        // With logprobs the steps need the logits: same tokens, no greedy pass.
        let (sampled, had_logprobs) = run(&handle, &prompt, SamplingParams::default(), Some(1));
        assert!(had_logprobs);
        assert_eq!(sampled, picked);
        assert_eq!(model.greedy_passes.load(Ordering::Relaxed), greedy);
        // A penalty changes the logits before the argmax: no greedy pass either.
        let penalised = SamplingParams {
            repetition_penalty: 1.5,
            ..SamplingParams::default()
        };
        run(&handle, &prompt, penalised, None);
        assert_eq!(model.greedy_passes.load(Ordering::Relaxed), greedy);
        handle.shutdown();
    });
}
