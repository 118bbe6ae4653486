//! Depth up-scaling (`gyre::upscale`) end to end, on the parity fixtures of every family.
//!
//! Each up-scaled checkpoint is reopened with gyre's loader and checked tensor by tensor,
//! byte for byte, against the source tensor its plan names (the expected mapping is spelled
//! out here independently of the library), then loaded and run. The mergekit comparison
//! reads `tests/fixtures/upscale/`, made by `tools/make_upscale_fixture.py` with mergekit
//! 0.1.5's passthrough merge.

// A layer plan of one range (`&[0..n]`) is a list that happens to hold one slice.
#![allow(clippy::single_range_in_vec_init)]

mod common;

use std::collections::BTreeSet;
use std::ops::Range;
use std::path::{Path, PathBuf};

use gyre::loader::Checkpoint;
use gyre::models::{self, Model};
use gyre::tensor::DType;
use gyre::upscale::{self, OutOptions, Plan};
use serde_json::Value;

fn open(path: &Path) -> Checkpoint {
    Checkpoint::open(path, |_, _| {}).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()))
}

fn opts(dir: &Path) -> OutOptions {
    OutOptions {
        dir: dir.to_path_buf(),
        shard_size: upscale::DEFAULT_SHARD_SIZE,
        dtype: None,
        force: false,
    }
}

/// Up-scales `src` with `slices` into a fresh temp dir; returns (dir guard, plan).
fn upscale_to(src: &Path, slices: &[Range<usize>], shard_size: u64) -> (tempfile::TempDir, Plan) {
    let ckpt = open(src);
    let plan = upscale::plan(&ckpt, slices).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let o = OutOptions {
        shard_size,
        ..opts(&out)
    };
    upscale::run(&ckpt, &plan, &o, |_, _| {}).unwrap();
    (dir, plan)
}

fn out(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("out")
}

/// Splits `{prefix}{i}.{rest}`.
fn layer_of<'a>(name: &'a str, prefix: &str) -> Option<(usize, &'a str)> {
    let (i, rest) = name.strip_prefix(prefix)?.split_once('.')?;
    Some((i.parse().ok()?, rest))
}

/// Checks that the output holds exactly the tensors the layer map implies, each equal byte
/// for byte to its source: layer `i` of the output is source layer `map[i]`; everything
/// outside the layers (and `embedding_in_layer0` under layer 0) is copied under its own name.
fn assert_mapped(src: &Checkpoint, dst: &Checkpoint, prefix: &str, map: &[usize], embedding_in_layer0: &str) {
    let mut want: BTreeSet<(String, String)> = BTreeSet::new();
    for name in src.names() {
        match layer_of(name, prefix) {
            Some((0, rest)) if !embedding_in_layer0.is_empty() && rest.starts_with(embedding_in_layer0) => {
                want.insert((name.to_string(), name.to_string()));
            }
            Some((i, rest)) => {
                for (o, _) in map.iter().enumerate().filter(|(_, &s)| s == i) {
                    want.insert((format!("{prefix}{o}.{rest}"), name.to_string()));
                }
            }
            None => {
                want.insert((name.to_string(), name.to_string()));
            }
        }
    }
    let got: BTreeSet<&str> = dst.names().collect();
    let want_names: BTreeSet<&str> = want.iter().map(|(o, _)| o.as_str()).collect();
    assert_eq!(got, want_names, "output tensor names");
    for (o, s) in &want {
        let (a, b) = (dst.get(o).unwrap(), src.get(s).unwrap());
        assert_eq!(a.dtype(), b.dtype(), "{o} dtype");
        assert_eq!(a.shape(), b.shape(), "{o} shape");
        assert!(a.raw() == b.raw(), "{o} differs from source {s}");
    }
}

fn logits(model: &dyn Model, tokens: &[u32]) -> Vec<f32> {
    common::prefill_all(model, tokens)
}

fn load(path: &Path) -> Box<dyn Model> {
    models::load(&open(path)).unwrap()
}

fn tokens(vocab: usize) -> Vec<u32> {
    (0..12u32).map(|i| (i * 37 + 5) % vocab as u32).collect()
}

fn assert_bitwise(a: &[f32], b: &[f32], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert_eq!(x.to_bits(), y.to_bits(), "{what}: logit {i} is {x}, expected {y}");
    }
}

#[test]
fn identity_plan_reproduces_logits_exactly_for_every_family() {
    let cases = [
        (common::fixture("llama", "llama_gqa_f32"), "model.layers.", ""),
        (common::fixture("llama", "llama_tied_bf16"), "model.layers.", ""),
        (
            common::fixture("llama", "mistral_window_f32"),
            "model.layers.",
            "",
        ),
        (common::fixture("griffin", "griffin_small"), "model.layers.", ""),
        (
            common::fixture("griffin", "griffin_attn_first"),
            "model.layers.",
            "",
        ),
        (
            common::fixture("rwkv5", "rwkv5_tiny_f32").join("model.pth"),
            "blocks.",
            "ln0.",
        ),
    ];
    for (path, prefix, ln0) in cases {
        let src = open(&path);
        let n = upscale::source_layers(&src).unwrap();
        let (dir, plan) = upscale_to(&path, &[0..n], 100_000);
        assert_eq!(plan.layer_map, (0..n).collect::<Vec<_>>());
        let dst = open(&out(&dir));
        assert_mapped(&src, &dst, prefix, &plan.layer_map, ln0);
        let (a, b) = (load(&path), load(&out(&dir)));
        let t = tokens(a.info().vocab_size);
        assert_bitwise(
            &logits(b.as_ref(), &t),
            &logits(a.as_ref(), &t),
            &path.display().to_string(),
        );
        if let Some(cfg) = &src.config {
            let written: Value =
                serde_json::from_str(&std::fs::read_to_string(out(&dir).join("config.json")).unwrap())
                    .unwrap();
            // Same depth, same layer types: the identity leaves config.json's meaning unchanged.
            assert_eq!(written["num_hidden_layers"], cfg["num_hidden_layers"]);
        }
    }
}

#[test]
fn solar_recipe_on_llama_maps_every_layer_byte_for_byte() {
    let path = common::fixture("upscale", "llama8_f32");
    let src = open(&path);
    let slices = upscale::solar_plan(8).unwrap();
    assert_eq!(slices, vec![0..6, 2..8]);
    // Small shards: the index has to tie many files together.
    let (dir, plan) = upscale_to(&path, &slices, 20_000);
    let map: Vec<usize> = (0..12).map(|i| if i < 6 { i } else { i - 6 + 2 }).collect();
    assert_eq!(plan.layer_map, map);
    let dst = open(&out(&dir));
    assert_mapped(&src, &dst, "model.layers.", &map, "");

    let index: Value = serde_json::from_str(
        &std::fs::read_to_string(out(&dir).join("model.safetensors.index.json")).unwrap(),
    )
    .unwrap();
    let shards: BTreeSet<&str> = index["weight_map"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(shards.len() > 5, "expected several shards, got {shards:?}");
    for s in &shards {
        let len = std::fs::metadata(out(&dir).join(s)).unwrap().len();
        // One shard may exceed the limit only by holding a single large tensor.
        let bytes = std::fs::read(out(&dir).join(s)).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        assert!(len <= 20_000 + 4096 || st.len() == 1, "{s}: {len} bytes");
    }
    let total: u64 = dst.names().map(|n| dst.get(n).unwrap().nbytes() as u64).sum();
    assert_eq!(index["metadata"]["total_size"].as_u64(), Some(total));

    let cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(out(&dir).join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["num_hidden_layers"], 12);
    assert!(out(&dir).join("generation_config.json").exists());
    let model = load(&out(&dir));
    assert_eq!(model.info().n_layers, 12);
    let l = logits(model.as_ref(), &tokens(64));
    assert!(l.iter().all(|v| v.is_finite()));
}

/// mergekit 0.1.5 `passthrough` with the SOLAR slices and `dtype: bfloat16` (fixture made by
/// tools/make_upscale_fixture.py) against gyre with the same slices and `--dtype bf16`.
#[test]
fn mergekit_passthrough_matches_byte_for_byte() {
    let src_path = common::fixture("upscale", "llama8_f32");
    let ckpt = open(&src_path);
    let plan = upscale::plan(&ckpt, &[0..6, 2..8]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let o = OutOptions {
        dtype: Some(DType::BF16),
        ..opts(dir.path())
    };
    upscale::run(&ckpt, &plan, &o, |_, _| {}).unwrap();
    let mk_path = common::fixture("upscale", "mergekit_solar_bf16");
    let (ours, theirs) = (open(dir.path()), open(&mk_path));
    let a: Vec<&str> = ours.names().collect();
    let b: Vec<&str> = theirs.names().collect();
    assert_eq!(a, b, "tensor names");
    for name in a {
        let (x, y) = (ours.get(name).unwrap(), theirs.get(name).unwrap());
        assert_eq!((x.dtype(), x.shape()), (y.dtype(), y.shape()), "{name}");
        assert!(x.raw() == y.raw(), "{name}: gyre and mergekit bytes differ");
    }
    let read = |p: &Path| -> Value { serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap() };
    assert_eq!(
        read(&dir.path().join("config.json")),
        read(&mk_path.join("config.json")),
        "config.json"
    );
}

#[test]
fn recurrent_gemma_keeps_each_copied_layers_block_type() {
    // griffin_small: block_types (r, r, a) cycled over 4 layers: r r a r.
    let path = common::fixture("griffin", "griffin_small");
    let src = open(&path);
    let (dir, plan) = upscale_to(
        &path,
        &upscale::solar_plan(4).unwrap(),
        upscale::DEFAULT_SHARD_SIZE,
    );
    assert_eq!(plan.layer_map, vec![0, 1, 2, 1, 2, 3]);
    assert_mapped(&src, &open(&out(&dir)), "model.layers.", &plan.layer_map, "");
    let cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(out(&dir).join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["num_hidden_layers"], 6);
    let types: Vec<&str> = cfg["block_types"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(
        types,
        [
            "recurrent",
            "recurrent",
            "attention",
            "recurrent",
            "attention",
            "recurrent"
        ]
    );
    let model = load(&out(&dir));
    assert_eq!(model.info().n_layers, 6);
    assert!(logits(model.as_ref(), &tokens(256)).iter().all(|v| v.is_finite()));

    // griffin_attn_first spells the old `_block_types` (a, r): both spellings are rewritten.
    let path = common::fixture("griffin", "griffin_attn_first");
    let src = open(&path);
    let (dir, plan) = upscale_to(&path, &[1..2, 0..2, 1..2], upscale::DEFAULT_SHARD_SIZE);
    assert_eq!(plan.layer_map, vec![1, 0, 1, 1]);
    assert_mapped(&src, &open(&out(&dir)), "model.layers.", &plan.layer_map, "");
    let cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(out(&dir).join("config.json")).unwrap()).unwrap();
    let want = serde_json::json!(["recurrent", "attention", "recurrent", "recurrent"]);
    assert_eq!(cfg["block_types"], want);
    assert_eq!(cfg["_block_types"], want);
    let model = load(&out(&dir));
    assert_eq!(model.info().n_layers, 4);
    assert!(logits(model.as_ref(), &tokens(256)).iter().all(|v| v.is_finite()));
}

#[test]
fn rwkv_from_pth_keeps_ln0_in_block_0_from_the_first_slice() {
    let path = common::fixture("rwkv5", "rwkv5_tiny_f32").join("model.pth");
    let src = open(&path);
    // The first slice starts at layer 1, which has no ln0: output block 0 still gets it.
    let (dir, plan) = upscale_to(&path, &[1..2, 0..2], upscale::DEFAULT_SHARD_SIZE);
    assert_eq!(plan.layer_map, vec![1, 0, 1]);
    let dst = open(&out(&dir));
    assert_mapped(&src, &dst, "blocks.", &plan.layer_map, "ln0.");
    assert!(dst.has("blocks.0.ln0.weight") && dst.has("blocks.0.ln0.bias"));
    assert!(!dst
        .names()
        .any(|n| n.contains("ln0") && !n.starts_with("blocks.0.")));
    assert!(
        !out(&dir).join("config.json").exists(),
        "RWKV has no config.json to write"
    );
    let model = load(&out(&dir));
    assert_eq!(model.info().n_layers, 3);
    assert!(logits(model.as_ref(), &tokens(model.info().vocab_size))
        .iter()
        .all(|v| v.is_finite()));

    // bf16 storage in, widened to f32 out: every value is exact.
    let bf = common::fixture("rwkv5", "rwkv5_tiny_bf16").join("model.pth");
    let ckpt = open(&bf);
    let plan = upscale::plan(&ckpt, &[0..2]).unwrap();
    let d = tempfile::tempdir().unwrap();
    let o = OutOptions {
        dtype: Some(DType::F32),
        ..opts(d.path())
    };
    upscale::run(&ckpt, &plan, &o, |_, _| {}).unwrap();
    let wide = open(d.path());
    for name in ckpt.names() {
        let (a, b) = (ckpt.get(name).unwrap(), wide.get(name).unwrap());
        assert_eq!(b.dtype(), DType::F32);
        assert_eq!(a.to_f32_vec(), b.to_f32_vec(), "{name}");
    }
}

#[test]
fn output_directory_rules() {
    let path = common::fixture("llama", "llama_gqa_f32");
    let ckpt = open(&path);
    let plan = upscale::plan(&ckpt, &[0..2, 1..2]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("notes.txt"), "keep me").unwrap();
    std::fs::write(dir.path().join("model-00001-of-00009.safetensors"), "stale").unwrap();
    let err = format!(
        "{:#}",
        upscale::run(&ckpt, &plan, &opts(dir.path()), |_, _| {}).unwrap_err()
    );
    assert!(err.contains("not empty") && err.contains("--force"), "{err}");
    let forced = OutOptions {
        force: true,
        ..opts(dir.path())
    };
    let report = upscale::run(&ckpt, &plan, &forced, |_, _| {}).unwrap();
    assert_eq!(report.layers, 3);
    assert!(dir.path().join("notes.txt").exists(), "unrelated files stay");
    assert!(
        !dir.path().join("model-00001-of-00009.safetensors").exists(),
        "stale shards go"
    );
    assert_eq!(load(dir.path()).info().n_layers, 3);

    // Never into the source directory, even with --force.
    let err = format!(
        "{:#}",
        upscale::run(
            &ckpt,
            &plan,
            &OutOptions {
                force: true,
                ..opts(&path)
            },
            |_, _| {}
        )
        .unwrap_err()
    );
    assert!(err.contains("source model's directory"), "{err}");
}

#[test]
fn plans_refuse_ranges_outside_the_source() {
    let ckpt = open(&common::fixture("llama", "llama_gqa_f32"));
    assert!(upscale::plan(&ckpt, &[0..3]).is_err());
    assert!(upscale::plan(&ckpt, &[1..1]).is_err());
    assert!(upscale::plan(&ckpt, &[]).is_err());
    let err = format!("{:#}", upscale::parse_layers("0..2,1..5", 2).unwrap_err());
    assert!(err.contains("1..5") && err.contains("2 layers"), "{err}");
}
