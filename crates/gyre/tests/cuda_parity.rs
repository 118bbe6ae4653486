//! The CUDA backend against the CPU path (itself tested against the reference
//! implementations) on every model fixture.
//!
//! They run on the first GPU; with `GYRE_REQUIRE_CUDA=1` (set on the GPU machine) a broken
//! CUDA setup fails them. Where no GPU can be used they run on the CUDA emulator
//! (`GYRE_CUDA_EMULATOR=1`: kernels.cu compiled for the CPU), which checks the kernels'
//! arithmetic and bounds, the launch configurations, graphs, batch layouts and device states,
//! though not timing or races between blocks that a GPU runs at once.
//!
//! Bounds, relative to the largest |logit| of the CPU result (at least 1):
//! - f32 weights: 1e-4: products accumulate in f32 in another order (GEMV, cuBLAS without
//!   TF32);
//! - bf16/f16 weights: 2e-2: products of more than 8 rows (prefill) go through cuBLAS with
//!   activations rounded to the weights' 16-bit type; decode (GEMV) keeps f32 activations.
//!   GGUF block formats too: the device runs them dequantized to f16.

mod common;

use std::sync::Arc;

use common::*;
use gyre::kernels::cuda::{self, Gpu};
use gyre::loader::Checkpoint;
use gyre::models::{self, Device, LoadOptions, Logits, Model, SeqInput};
use gyre::sampling::{Draw, Rng, Sampler, SamplingParams};
use gyre::tensor::{DType, Tensor};

/// (family, fixture, token set). A fixture name ending in `@bf16` is the f32 fixture with
/// every matrix rounded to bf16: a model whose state caches keys and values in bf16.
const CASES: &[(&str, &str, &str)] = &[
    ("griffin", "griffin_small", "tokens_long"),
    ("griffin", "griffin_small@bf16", "tokens_long"),
    ("griffin", "griffin_attn_first", "tokens_long"),
    ("llama", "llama_gqa_f32", "tokens"),
    ("llama", "llama_mha_oldconfig_f32", "tokens"),
    ("llama", "llama_f16", "tokens"),
    ("llama", "llama_tied_bf16", "tokens"),
    ("llama", "mistral_window_f32", "tokens"),
    ("rwkv5", "rwkv5_tiny_f32", "tokens"),
    ("rwkv5", "rwkv5_tiny_bf16", "tokens"),
    // GGUF block formats, dequantized to f16 for the device.
    ("gguf", "mixed_quant", "tokens"),
];

/// The first GPU; where none can be used, the CUDA emulator (unless `GYRE_REQUIRE_CUDA=1`,
/// where that is a failure).
fn gpu() -> Arc<Gpu> {
    let required = std::env::var("GYRE_REQUIRE_CUDA").is_ok_and(|v| v == "1");
    if required {
        return Gpu::open(0).unwrap_or_else(|e| panic!("GYRE_REQUIRE_CUDA=1 but CUDA cannot be used: {e:#}"));
    }
    if cuda::driver_present() {
        match Gpu::open(0) {
            Ok(g) => return g,
            Err(e) => eprintln!("no usable CUDA device ({e:#}): the tests run on the CUDA emulator"),
        }
    }
    // Every test of this file wants the same device; the variable is read once, when the
    // device is first opened.
    std::env::set_var("GYRE_CUDA_EMULATOR", "1");
    Gpu::open(0).unwrap_or_else(|e| panic!("the CUDA emulator: {e:#}"))
}

/// Models built on the first GPU, weights as stored.
const ON_GPU: LoadOptions = LoadOptions {
    quant: None,
    device: Device::Cuda(0),
};

/// Runs `check` on every fixture's CPU/device model pair.
fn each_case(check: impl Fn(&str, Pair)) {
    eprintln!("device: {}", gpu().name());
    for &(family, case, tokens) in CASES {
        check(case, pair(family, case, tokens));
    }
}

struct Pair {
    cpu: Box<dyn Model>,
    gpu: Box<dyn Model>,
    tokens: Vec<u32>,
    /// Relative bound for this fixture's weights.
    bound: f32,
}

fn pair(family: &str, case: &str, tokens: &str) -> Pair {
    let (name, as_bf16) = match case.strip_suffix("@bf16") {
        Some(name) => (name, true),
        None => (case, false),
    };
    let dir = fixture(family, name);
    // RWKV fixtures hold a .pth beside the expected logits: name the weights.
    let weights = if family == "rwkv5" {
        dir.join("model.pth")
    } else {
        dir.clone()
    };
    let mut ckpt = Checkpoint::open(&weights, |_, _| {}).unwrap();
    if as_bf16 {
        ckpt = matrices_as_bf16(&ckpt);
    }
    let cpu = models::load(&ckpt).unwrap();
    let gpu = models::load_with(&ckpt, ON_GPU).unwrap_or_else(|e| panic!("{case}: {e:#}"));
    let exp = Expected::read(&dir.join("expected.safetensors"));
    let bound = if cpu.info().dtypes.iter().all(|&d| d == DType::F32) && !ckpt.has_blocks() {
        1e-4
    } else {
        2e-2
    };
    Pair {
        cpu,
        gpu,
        tokens: exp.ids(tokens).to_vec(),
        bound,
    }
}

/// The checkpoint with every tensor of two or more dimensions rounded to bf16.
fn matrices_as_bf16(ckpt: &Checkpoint) -> Checkpoint {
    let tensors = ckpt
        .names()
        .map(|n| {
            let t = ckpt.get(n).unwrap();
            let t = if t.shape().len() >= 2 {
                Tensor::from_f32_as_bf16(&t.to_f32_vec(), t.shape().to_vec())
            } else {
                t.clone()
            };
            (n.to_string(), t)
        })
        .collect();
    Checkpoint::from_tensors(ckpt.config().unwrap().clone(), tensors)
}

fn assert_close(what: &str, got: &[f32], want: &[f32], bound: f32) {
    let scale = want.iter().fold(1f32, |m, v| m.max(v.abs()));
    let d = max_abs_diff(got, want);
    assert!(
        d.is_finite() && d <= bound * scale,
        "{what}: max |Δlogit| = {d} > {bound} × {scale}"
    );
    eprintln!("{what}: max |Δlogit| {d:.2e} (bound {:.2e})", bound * scale);
}

fn greedy(model: &dyn Model, prompt: &[u32], n: usize) -> Vec<u32> {
    let mut state = model.new_state();
    let mut logits = prefill_from(model, &mut state, prompt);
    let v = model.info().vocab_size;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let last = &logits[logits.len() - v..];
        let next = (0..v)
            .max_by(|&a, &b| last[a].total_cmp(&last[b]).then(b.cmp(&a)))
            .unwrap() as u32;
        out.push(next);
        logits = step_from(model, &mut state, &[next]);
    }
    out
}

/// Prefill and token-by-token decode on the device equal the CPU path, and each other.
#[test]
fn cuda_prefill_and_decode_match_the_cpu_on_every_fixture() {
    each_case(|case, p| {
        let want = prefill_all(p.cpu.as_ref(), &p.tokens);
        let prefill = prefill_all(p.gpu.as_ref(), &p.tokens);
        assert_close(&format!("{case} prefill"), &prefill, &want, p.bound);
        let step = step_by_step(p.gpu.as_ref(), &p.tokens);
        assert_close(&format!("{case} step-by-step"), &step, &want, p.bound);
        assert_close(&format!("{case} prefill vs step"), &prefill, &step, p.bound);
    });
}

/// Greedy decoding with the pick on the device ([`Model::forward_greedy`]).
fn greedy_on_device(model: &dyn Model, prompt: &[u32], n: usize) -> Vec<u32> {
    let mut state = model.new_state();
    let mut next = model
        .forward_greedy(&mut [SeqInput {
            tokens: prompt,
            state: &mut state,
        }])
        .unwrap()[0];
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(next);
        next = model
            .forward_greedy(&mut [SeqInput {
                tokens: &[next],
                state: &mut state,
            }])
            .unwrap()[0];
    }
    out
}

/// Greedy generations of 64 tokens agree with the CPU's, with the logits downloaded and
/// with the pick made on the device.
#[test]
fn cuda_greedy_generation_matches_the_cpu_for_64_tokens() {
    each_case(|case, p| {
        let prompt = &p.tokens[..p.tokens.len().min(12)];
        let want = greedy(p.cpu.as_ref(), prompt, 64);
        let got = greedy(p.gpu.as_ref(), prompt, 64);
        assert_eq!(got, want, "{case}: greedy tokens differ");
        let picked = greedy_on_device(p.gpu.as_ref(), prompt, 64);
        assert_eq!(picked, want, "{case}: greedy tokens picked on the device differ");
    });
}

/// A batch of sequences at different positions, some prefilling and some decoding, gives
/// each the logits it gets alone.
#[test]
fn cuda_batched_forward_equals_one_sequence_at_a_time() {
    each_case(|case, p| {
        let m = p.gpu.as_ref();
        let t = &p.tokens;
        let (mut a, mut b, mut c) = (m.new_state(), m.new_state(), m.new_state());
        prefill_from(m, &mut a, &t[..5]);
        prefill_from(m, &mut b, &t[..11]);
        let (mut a2, mut b2, mut c2) = (a.clone(), b.clone(), c.clone());
        let (mut a3, mut b3, mut c3) = (a.clone(), b.clone(), c.clone());
        let chunks: [&[u32]; 3] = [&t[5..6], &t[11..14], &t[..9]];
        let together = m
            .forward(
                &mut [
                    SeqInput {
                        tokens: chunks[0],
                        state: &mut a,
                    },
                    SeqInput {
                        tokens: chunks[1],
                        state: &mut b,
                    },
                    SeqInput {
                        tokens: chunks[2],
                        state: &mut c,
                    },
                ],
                Logits::All,
            )
            .unwrap();
        // The same batch, each sequence's next token picked on the device.
        let picked = m
            .forward_greedy(&mut [
                SeqInput {
                    tokens: chunks[0],
                    state: &mut a3,
                },
                SeqInput {
                    tokens: chunks[1],
                    state: &mut b3,
                },
                SeqInput {
                    tokens: chunks[2],
                    state: &mut c3,
                },
            ])
            .unwrap();
        let v = m.info().vocab_size;
        let want: Vec<u32> = together
            .iter()
            .map(|l| gyre::sampling::argmax(&l[l.len() - v..]))
            .collect();
        assert_eq!(picked, want, "{case}: batched greedy picks");
        for (i, (st, chunk)) in [&mut a2, &mut b2, &mut c2].into_iter().zip(chunks).enumerate() {
            let alone = prefill_from(m, st, chunk);
            assert_close(&format!("{case} batch row {i}"), &together[i], &alone, p.bound);
        }
    });
}

/// A 16-bit model's device cache holds its keys and values in that dtype, as the reference
/// does: half the bytes of the CPU's f32 cache. An f32 model's is the CPU's size.
#[test]
fn cuda_caches_keep_the_models_dtype() {
    each_case(|case, p| {
        if !matches!(
            p.cpu.info().arch,
            gyre::models::Arch::Llama | gyre::models::Arch::Mistral
        ) {
            return;
        }
        // Past every fixture's window: a ring is whole on both sides.
        let tokens = 4096;
        let (host, device) = (p.cpu.state_bytes(tokens), p.gpu.state_bytes(tokens));
        // (The device's dtypes: a GGUF file runs there as f16.)
        let f32_model = p.gpu.info().dtypes.iter().all(|&d| d == DType::F32);
        let want = if f32_model { host } else { host / 2 };
        assert_eq!(device, want, "{case}: device state bytes");
    });
}

/// A state moves between host and device: a CPU state loaded into a device state continues
/// as the CPU does, and a device state read back (as `gyre state save` does) equals the CPU's.
#[test]
fn cuda_states_round_trip_through_the_host_layout() {
    each_case(|case, p| {
        let (prompt, rest) = p.tokens.split_at(10);
        let mut cpu_state = p.cpu.new_state();
        prefill_from(p.cpu.as_ref(), &mut cpu_state, prompt);
        let mut dev_state = p.gpu.new_state();
        prefill_from(p.gpu.as_ref(), &mut dev_state, prompt);
        // Device → host: the same tensors as the CPU state.
        let mut cpu_copy = cpu_state.clone();
        let (cpu_parts, dev_parts) = (cpu_copy.parts().unwrap(), dev_state.parts().unwrap());
        assert_eq!(cpu_parts.len(), dev_parts.len(), "{case}: state part count");
        for ((name, shape, a), (dname, dshape, b)) in cpu_parts.iter().zip(&dev_parts) {
            assert_eq!((name, shape), (dname, dshape), "{case}: state layout");
            assert_close(&format!("{case} state {name}"), b, a, p.bound);
        }
        // Host → device: load the CPU's tensors into a fresh device state and continue.
        let mut loaded = p.gpu.new_state();
        loaded.prepare_for(cpu_state.tokens_seen());
        let mut src = cpu_state.clone();
        for ((_, _, dst), (_, _, v)) in loaded.parts().unwrap().into_iter().zip(src.parts().unwrap()) {
            dst.copy_from_slice(v);
        }
        let want = step_from(p.cpu.as_ref(), &mut cpu_state, &rest[..4]);
        let got = step_from(p.gpu.as_ref(), &mut loaded, &rest[..4]);
        assert_close(
            &format!("{case} continued from a CPU state"),
            &got,
            &want,
            p.bound,
        );
    });
}

/// Logits rows for the draw tests: distinct values (no ties at a filter's edge), a few
/// rows with NaN, ±inf and nothing above -inf, and one wide row (many ids per thread).
fn draw_rows(rng: &mut Rng) -> Vec<Vec<f32>> {
    let mut rows = Vec::new();
    for v in [7usize, 50, 1000] {
        for _ in 0..3 {
            let spread = 1.0 + 6.0 * rng.next_f32();
            rows.push(
                (0..v)
                    .map(|_| (rng.next_f32() - 0.5) * spread)
                    .collect::<Vec<f32>>(),
            );
        }
    }
    let mut special = vec![0.25f32, f32::NAN, 1.5, f32::NEG_INFINITY, 1.25, -3.0, 0.5, 1.0];
    rows.push(special.clone());
    special[5] = f32::INFINITY;
    special[7] = f32::INFINITY;
    rows.push(special);
    rows.push(vec![f32::NEG_INFINITY; 9]);
    rows.push(vec![f32::NAN; 5]);
    rows.push((0..70_000).map(|i| ((i * 7919) % 70_001) as f32 * 1e-4).collect());
    rows
}

/// The device draws ([`Gpu::sample_rows`]) pick what [`Draw::pick`] picks on the host from
/// the same logits and uniform, for greedy, temperature, top-k, top-p, min-p and their
/// combinations; where they differ, the uniform lies within rounding of an interval's edge.
#[test]
fn cuda_draws_pick_what_the_host_picks() {
    let g = gpu();
    let mut rng = Rng::new(11);
    let params: [(f32, usize, f32, f32); 9] = [
        (0.0, 0, 1.0, 0.0),
        (1.0, 0, 1.0, 0.0),
        (0.7, 0, 1.0, 0.0),
        (1.3, 5, 1.0, 0.0),
        (0.8, 0, 0.6, 0.0),
        (0.8, 0, 0.0, 0.0),
        (1.0, 0, 1.0, 0.2),
        (0.9, 20, 0.9, 0.05),
        (2.0, 1, 1.0, 0.0),
    ];
    let (mut checked, mut at_edges) = (0, 0);
    for logits in draw_rows(&mut rng) {
        let v = logits.len();
        // Every parameter set four times, each with its own uniform.
        let draws: Vec<Draw> = (0..4 * params.len())
            .map(|i| {
                let (temperature, top_k, top_p, min_p) = params[i % params.len()];
                Draw {
                    temperature,
                    top_k,
                    top_p,
                    min_p,
                    u: rng.next_f64(),
                }
            })
            .collect();
        let rows = draws.len();
        let dev_logits = g.alloc(rows * v * 4).unwrap();
        let args: Vec<u32> = draws.iter().flat_map(cuda::draw_args).collect();
        let dev_args = g.alloc(args.len() * 4).unwrap();
        let dev_ids = g.alloc(rows * 4).unwrap();
        let all: Vec<f32> = logits.iter().copied().cycle().take(rows * v).collect();
        g.write(dev_logits.ptr(), &all).unwrap();
        g.write(dev_args.ptr(), &args).unwrap();
        g.sample_rows(dev_logits.ptr(), rows, v, dev_args.ptr(), dev_ids.ptr())
            .unwrap();
        let mut ids = vec![0u32; rows];
        g.read(dev_ids.ptr(), &mut ids).unwrap();
        for (d, &got) in draws.iter().zip(&ids) {
            let want = d.pick(&logits);
            checked += 1;
            if got == want {
                continue;
            }
            let near = |u: f64| Draw { u, ..*d }.pick(&logits) == got;
            assert!(
                near(d.u - 1e-5) || near(d.u + 1e-5),
                "V {v}, {d:?}: the device drew {got}, the host {want}"
            );
            at_edges += 1;
        }
    }
    eprintln!("{checked} draws, {at_edges} at an interval's edge");
    assert!(at_edges * 50 < checked, "{at_edges} of {checked} draws differ");
}

/// Seeded sampling (temperature, top-k, top-p) draws on the device the tokens the host
/// draws from the CPU's logits, step after step (captured decode steps included), on the
/// f32 fixtures, whose logits agree to 1e-4.
#[test]
fn cuda_seeded_sampling_matches_the_cpu() {
    let varied = std::cell::Cell::new(0);
    each_case(|case, p| {
        if p.gpu.info().dtypes.iter().any(|&d| d != DType::F32) {
            return;
        }
        let prompt = &p.tokens[..p.tokens.len().min(12)];
        let params = SamplingParams {
            temperature: 1.5,
            top_k: 40,
            top_p: 0.95,
            seed: Some(5),
            ..SamplingParams::default()
        };
        let run = |m: &dyn Model| {
            let mut sampler = Sampler::new(params.clone());
            let mut state = m.new_state();
            let mut feed = |tokens: &[u32], draw: Draw| {
                let mut batch = [SeqInput {
                    tokens,
                    state: &mut state,
                }];
                m.forward_drawn(&mut batch, &[draw]).unwrap()[0]
            };
            let mut next = feed(prompt, sampler.next_draw());
            let mut out = Vec::new();
            for _ in 0..48 {
                out.push(next);
                next = feed(&[next], sampler.next_draw());
            }
            out
        };
        let (want, got) = (run(p.cpu.as_ref()), run(p.gpu.as_ref()));
        assert_eq!(got, want, "{case}: sampled tokens differ");
        let distinct: std::collections::HashSet<u32> = want.iter().copied().collect();
        eprintln!("{case}: {} distinct tokens of 48", distinct.len());
        varied.set(varied.get().max(distinct.len()));
    });
    // (Some fixtures' logits are too peaked to vary at all.)
    assert!(
        varied.get() >= 8,
        "the draws hardly varied: not a test of sampling"
    );
}
