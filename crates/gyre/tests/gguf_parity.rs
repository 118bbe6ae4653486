//! GGUF files made by llama.cpp's converter and quantizer against transformers in float64
//! (`tools/make_gguf_fixtures.py`; cases in `tests/fixtures/gguf/<case>/meta.json`).
//!
//! - `llama3_tied_f16`: the F16 file must reproduce the original checkpoint (q/k rows put back,
//!   RoPE factors from `rope_freqs.weight`, tied embeddings).
//! - `mixed_quant`: every GGUF block format in one model; gyre must be at least ten times
//!   closer than llama.cpp to the float64 forward on the same dequantized weights.
//!
//! Both: the file's own tokenizer gives llama.cpp's ids for the fixture text, and its chat
//! template renders.

mod common;

use common::{fixture, max_abs_diff, prefill_all, rounding_bound, step_by_step, Expected};
use gyre::loader::Checkpoint;
use gyre::models;
use gyre::tokenizer::Tokenizer;

fn mean_abs_diff(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - *y as f64).abs())
        .sum::<f64>()
        / a.len() as f64
}

fn meta_text(case: &str) -> String {
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("gguf", case).join("meta.json")).unwrap())
            .unwrap();
    meta["text"].as_str().unwrap().to_string()
}

/// The file's tokenizer gives llama.cpp's ids (no BOS: the fixture asked llama.cpp for none),
/// decodes them back to the text, and adds BOS when asked.
fn check_tokenizer(case: &str, ckpt: &Checkpoint, want: &[u32]) -> Tokenizer {
    let tok = Tokenizer::from_gguf(ckpt.gguf.as_ref().unwrap()).unwrap();
    let text = meta_text(case);
    assert_eq!(
        tok.encode(&text, false).unwrap(),
        want,
        "{case}: token ids differ from llama.cpp's"
    );
    assert_eq!(tok.decode(want, true).unwrap(), text, "{case}: decode");
    let with_bos = tok.encode(&text, true).unwrap();
    assert_eq!(with_bos[0], 1);
    assert_eq!(&with_bos[1..], want);
    tok
}

#[test]
fn f16_gguf_reproduces_the_original_checkpoint() {
    let dir = fixture("gguf", "llama3_tied_f16");
    let exp = Expected::read(&dir.join("expected.safetensors"));
    let ckpt = Checkpoint::open(&dir.join("model.gguf"), |_, _| {}).unwrap();
    let tokens = exp.ids("tokens");
    let tok = check_tokenizer("llama3_tied_f16", &ckpt, tokens);
    let model = models::load(&ckpt).unwrap();
    let want = exp.f("logits");
    let prefill = prefill_all(model.as_ref(), tokens);
    let step = step_by_step(model.as_ref(), tokens);
    let d = max_abs_diff(&prefill, want);
    // f32 compute on exact f16 weights against float64: rounding only.
    assert!(d <= 2e-4, "prefill max |Δlogit| = {d}");
    assert!(max_abs_diff(&step, want) <= 2e-4);
    assert!(max_abs_diff(&step, &prefill) <= rounding_bound(&prefill));
    // llama.cpp itself (f16 activations in its products) is further away.
    let ours = mean_abs_diff(&prefill, want);
    let theirs = mean_abs_diff(exp.f("llamacpp_logits"), want);
    assert!(ours * 10.0 <= theirs, "gyre {ours:.2e} vs llama.cpp {theirs:.2e}");

    // The template from the file, with its EOS text.
    let specials = tok.specials();
    let template = gyre::chat::ChatTemplate::from_gguf(ckpt.gguf.as_ref().unwrap(), specials)
        .unwrap()
        .expect("the file has a chat template");
    let rendered = template
        .render(&[gyre::chat::Message::new("user", "Hi")], true)
        .unwrap();
    assert_eq!(rendered, "<|user|>\nHi</s><|assistant|>\n");
    assert_eq!(specials.eos, vec![2]);
}

#[test]
fn every_block_format_is_ten_times_closer_than_llama_cpp() {
    let dir = fixture("gguf", "mixed_quant");
    let exp = Expected::read(&dir.join("expected.safetensors"));
    let ckpt = Checkpoint::open(&dir, |_, _| {}).unwrap();
    let formats: Vec<String> = ckpt.tensor_formats().into_iter().map(|(f, _)| f).collect();
    for ty in [
        "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
    ] {
        assert!(formats.iter().any(|f| f == ty), "{ty} missing from {formats:?}");
    }
    let tokens = exp.ids("tokens");
    check_tokenizer("mixed_quant", &ckpt, tokens);
    let model = models::load(&ckpt).unwrap();
    let want = exp.f("logits");
    let prefill = prefill_all(model.as_ref(), tokens);
    let step = step_by_step(model.as_ref(), tokens);
    let ours = mean_abs_diff(&prefill, want);
    let ours_step = mean_abs_diff(&step, want);
    let theirs = mean_abs_diff(exp.f("llamacpp_logits"), want);
    eprintln!("mean |Δlogit|: gyre prefill {ours:.3e}, gyre decode {ours_step:.3e}, llama.cpp {theirs:.3e}");
    assert!(
        ours * 10.0 <= theirs,
        "prefill: gyre {ours:.2e} vs llama.cpp {theirs:.2e}"
    );
    assert!(
        ours_step * 10.0 <= theirs,
        "decode: gyre {ours_step:.2e} vs llama.cpp {theirs:.2e}"
    );
}

/// Greedy decoding of the quantized file follows the float64 model's greedy path (the
/// fixture's smallest gap between the two best logits is 0.05, far above gyre's error).
#[test]
fn greedy_decoding_of_the_quantized_file_follows_the_float64_model() {
    let dir = fixture("gguf", "mixed_quant");
    let exp = Expected::read(&dir.join("expected.safetensors"));
    let model = common::load(&dir.join("model.gguf"));
    let mut state = model.new_state();
    let mut input: Vec<u32> = std::iter::once(1)
        .chain(exp.ids("tokens").iter().copied())
        .collect();
    let mut got = Vec::new();
    for _ in 0..exp.ids("greedy").len() {
        let next = model
            .forward_greedy(&mut [gyre::models::SeqInput {
                tokens: &input,
                state: &mut state,
            }])
            .unwrap()[0];
        got.push(next);
        input = vec![next];
    }
    assert_eq!(got, exp.ids("greedy"));
}
