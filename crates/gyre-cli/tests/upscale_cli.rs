//! `gyre upscale` through the binary: the SOLAR recipe on a 32-layer Mistral-shaped model that
//! then chats, the command-line errors, and the streaming copy's peak memory.
//!
//! The 32-layer model is built here from `tests/fixtures/tiny_chat` (a 2-layer Llama with a
//! trained tokenizer and the SOLAR template, whose greedy chat reply transformers recorded in
//! `expected.json`): its two layers stay layers 0 and 1, and layers 2..31 get random weights
//! of their own except `o_proj` and `down_proj`, which are zero, so each of them adds nothing
//! to the residual stream. SOLAR up-scaling keeps source layers 0 and 1 as output layers 0
//! and 1, so the 48-layer result must give the recorded reply exactly.

mod common;

use common::*;

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::{json, Value};

/// A small deterministic generator (xorshift) for synthetic weights.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.2
    }
}

/// Streams an f32 safetensors file: the header first (offsets from the shapes), then each
/// tensor's values from `fill`, a chunk at a time, so memory stays small whatever the size.
fn write_streaming(path: &Path, tensors: &[(String, Vec<usize>)], mut fill: impl FnMut(&str, &mut [f32])) {
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for (name, shape) in tensors {
        let end = offset + shape.iter().product::<usize>() * 4;
        header.insert(
            name.clone(),
            json!({"dtype": "F32", "shape": shape, "data_offsets": [offset, end]}),
        );
        offset = end;
    }
    let mut h = serde_json::to_vec(&Value::Object(header)).unwrap();
    h.resize(h.len().div_ceil(8) * 8, b' ');
    let mut w = BufWriter::new(std::fs::File::create(path).unwrap());
    w.write_all(&(h.len() as u64).to_le_bytes()).unwrap();
    w.write_all(&h).unwrap();
    let mut buf = vec![0f32; 1 << 16];
    for (name, shape) in tensors {
        let mut left: usize = shape.iter().product();
        while left > 0 {
            let n = left.min(buf.len());
            fill(name, &mut buf[..n]);
            for v in &buf[..n] {
                w.write_all(&v.to_le_bytes()).unwrap();
            }
            left -= n;
        }
    }
    w.flush().unwrap();
}

/// Names and shapes of a Llama checkpoint.
fn llama_tensors(layers: usize, c: usize, kv: usize, f: usize, v: usize) -> Vec<(String, Vec<usize>)> {
    let mut t = vec![("model.embed_tokens.weight".to_string(), vec![v, c])];
    for i in 0..layers {
        let p = format!("model.layers.{i}");
        for (n, shape) in [
            ("input_layernorm.weight", vec![c]),
            ("post_attention_layernorm.weight", vec![c]),
            ("self_attn.q_proj.weight", vec![c, c]),
            ("self_attn.k_proj.weight", vec![kv, c]),
            ("self_attn.v_proj.weight", vec![kv, c]),
            ("self_attn.o_proj.weight", vec![c, c]),
            ("mlp.gate_proj.weight", vec![f, c]),
            ("mlp.up_proj.weight", vec![f, c]),
            ("mlp.down_proj.weight", vec![c, f]),
        ] {
            t.push((format!("{p}.{n}"), shape));
        }
    }
    t.push(("model.norm.weight".into(), vec![c]));
    t.push(("lm_head.weight".into(), vec![v, c]));
    t
}

/// The 32-layer Mistral-shaped model described in the module comment.
fn mistral32_from_tiny_chat(dir: &Path) {
    let tiny = fixtures().join("tiny_chat");
    std::fs::create_dir_all(dir).unwrap();
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        std::fs::copy(tiny.join(f), dir.join(f)).unwrap();
    }
    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(tiny.join("config.json")).unwrap()).unwrap();
    cfg["architectures"] = json!(["MistralForCausalLM"]);
    cfg["model_type"] = json!("mistral");
    cfg["num_hidden_layers"] = json!(32);
    cfg["sliding_window"] = json!(4096);
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(&cfg).unwrap(),
    )
    .unwrap();

    let bytes = std::fs::read(tiny.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let tensors = llama_tensors(32, 64, 32, 144, 512);
    let mut rng = Rng(0x5eed);
    let mut pos = std::collections::HashMap::<String, usize>::new();
    write_streaming(&dir.join("model.safetensors"), &tensors, |name, out| {
        let layer: Option<usize> = name
            .strip_prefix("model.layers.")
            .and_then(|t| t.split('.').next())
            .and_then(|i| i.parse().ok());
        match layer {
            Some(i) if i >= 2 => {
                let silent = name.ends_with("o_proj.weight") || name.ends_with("down_proj.weight");
                for v in out.iter_mut() {
                    *v = if silent { 0.0 } else { rng.next() };
                }
            }
            _ => {
                let data = st.tensor(name).unwrap();
                let at = pos.entry(name.to_string()).or_default();
                for (k, v) in out.iter_mut().enumerate() {
                    let b = &data.data()[(*at + k) * 4..(*at + k) * 4 + 4];
                    *v = f32::from_le_bytes(b.try_into().unwrap());
                }
                *at += out.len();
            }
        }
    });
}

#[test]
fn solar_48_from_a_32_layer_mistral_loads_and_chats() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, out) = (tmp.path().join("mistral32"), tmp.path().join("solar48"));
    mistral32_from_tiny_chat(&src);
    let run = gyre(
        &[
            "upscale",
            "--model",
            s(&src),
            "--out",
            s(&out),
            "--solar",
            "--shard-size",
            "400KB",
        ],
        b"",
    );
    ok(&run);
    let log = String::from_utf8_lossy(&run.stderr);
    assert!(
        log.contains("32 layers -> 48 layers") && log.contains("0..24, 8..32"),
        "{log}"
    );

    let info = ok(&gyre(&["info", "--model", s(&out)], b""));
    assert!(
        info.contains("MistralForCausalLM") && info.contains("layers:       48"),
        "{info}"
    );
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        assert_eq!(
            std::fs::read(src.join(f)).unwrap(),
            std::fs::read(out.join(f)).unwrap(),
            "{f}"
        );
    }

    // Output layer i is source layer i (i < 24) or i - 16 (i ≥ 24), tensor by tensor.
    let src_ckpt = gyre::loader::Checkpoint::open(&src, |_, _| {}).unwrap();
    let out_ckpt = gyre::loader::Checkpoint::open(&out, |_, _| {}).unwrap();
    assert_eq!(out_ckpt.names().count(), 3 + 48 * 9);
    for name in out_ckpt.names() {
        let from = match name.strip_prefix("model.layers.") {
            Some(rest) => {
                let (i, tail) = rest.split_once('.').unwrap();
                let i: usize = i.parse().unwrap();
                format!("model.layers.{}.{tail}", if i < 24 { i } else { i - 16 })
            }
            None => name.to_string(),
        };
        assert!(
            out_ckpt.get(name).unwrap().raw() == src_ckpt.get(&from).unwrap().raw(),
            "{name} should be {from}"
        );
    }

    let expected: Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("expected.json")).unwrap()).unwrap();
    let case = &expected["chat"][0];
    let msg = format!("{}\n", case["message"].as_str().unwrap());
    let want = format!("{}\n", case["text"].as_str().unwrap());
    let args = [
        "chat",
        "--model",
        s(&out),
        "--temperature",
        "0",
        "--max-tokens",
        "24",
    ];
    assert_eq!(ok(&gyre(&args, msg.as_bytes())), want);
}

#[test]
fn command_line_errors_are_clear() {
    let tiny = fixtures().join("tiny_chat");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let o = s(&out);
    let m = s(&tiny);
    for (layers, says) in [
        ("0..3", "past the source's 2 layers"),
        ("1..1", "is empty"),
        ("2..1", "is empty"),
        ("0:2", "not a layer range"),
        ("0..x", "not a layer number"),
        ("", "empty"),
    ] {
        let err = fails(&["upscale", "--model", m, "--out", o, "--layers", layers], b"");
        assert!(err.contains(says), "--layers {layers:?}: {err}");
    }
    let err = fails(&["upscale", "--model", m, "--out", o, "--solar"], b"");
    assert!(err.contains("at least 4 layers"), "{err}");
    let err = fails(&["upscale", "--model", m, "--out", o], b"");
    assert!(err.contains("--layers") && err.contains("--solar"), "{err}");
    let err = fails(
        &[
            "upscale",
            "--model",
            m,
            "--out",
            o,
            "--layers",
            "0..2",
            "--shard-size",
            "5XB",
        ],
        b"",
    );
    assert!(err.contains("unknown unit"), "{err}");
    let err = fails(
        &[
            "upscale", "--model", m, "--out", o, "--layers", "0..2", "--dtype", "q8",
        ],
        b"",
    );
    assert!(err.contains("bf16"), "{err}");
    assert!(!out.exists(), "nothing is written when the arguments are wrong");

    // A non-empty output directory needs --force; the source directory is never written.
    ok(&gyre(
        &["upscale", "--model", m, "--out", o, "--layers", "0..2,1..2"],
        b"",
    ));
    let err = fails(&["upscale", "--model", m, "--out", o, "--layers", "0..2"], b"");
    assert!(err.contains("not empty") && err.contains("--force"), "{err}");
    ok(&gyre(
        &[
            "upscale",
            "--model",
            m,
            "--out",
            o,
            "--layers",
            "0..2",
            "--force",
            "--dtype",
            "bf16",
            "--shard-size",
            "2GB",
        ],
        b"",
    ));
    let info = ok(&gyre(&["info", "--model", o], b""));
    assert!(
        info.contains("layers:       2") && info.contains("bf16"),
        "{info}"
    );
    let err = fails(
        &["upscale", "--model", m, "--out", m, "--layers", "0..2", "--force"],
        b"",
    );
    assert!(err.contains("source model's directory"), "{err}");
}

/// Peak anonymous memory of a child process, sampled from `/proc/<pid>/status` until it exits.
/// RssAnon is what the copy allocates; pages of the memory-mapped input and the page cache of
/// the output count as file-backed (RssFile) and are reclaimable, so they are left out.
fn run_measuring_anon(cmd: &mut Command) -> (Output, u64, u64) {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = PathBuf::from(format!("/proc/{}/status", child.id()));
    let field = |text: &str, key: &str| -> Option<u64> {
        let line = text.lines().find(|l| l.starts_with(key))?;
        line.split_whitespace()
            .nth(1)?
            .parse::<u64>()
            .ok()
            .map(|kb| kb * 1024)
    };
    let sampler = std::thread::spawn(move || {
        let (mut anon, mut hwm) = (0u64, 0u64);
        // The file disappears (or turns into a zombie's, without the fields) when the child exits.
        while let Ok(text) = std::fs::read_to_string(&status) {
            match field(&text, "RssAnon:") {
                Some(a) => anon = anon.max(a),
                None => break,
            }
            hwm = hwm.max(field(&text, "VmHWM:").unwrap_or(0));
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        (anon, hwm)
    });
    let out = child.wait_with_output().unwrap();
    let (anon, hwm) = sampler.join().unwrap();
    (out, anon, hwm)
}

#[test]
fn streaming_copy_keeps_anonymous_memory_near_one_chunk() {
    if !Path::new("/proc/self/status").exists() {
        eprintln!("skipped: no /proc to measure memory with");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("big");
    std::fs::create_dir_all(&src).unwrap();
    // 10 layers at hidden 512 / intermediate 1536, f32: 140 MB; the largest tensor is 3 MiB.
    let (layers, c, f, v) = (10, 512, 1536, 1024);
    let cfg = json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": c,
        "intermediate_size": f, "num_hidden_layers": layers, "num_attention_heads": 8,
        "num_key_value_heads": 8, "vocab_size": v, "rms_norm_eps": 1e-5, "dtype": "float32"
    });
    std::fs::write(src.join("config.json"), cfg.to_string()).unwrap();
    let mut rng = Rng(7);
    write_streaming(
        &src.join("model.safetensors"),
        &llama_tensors(layers, c, c, f, v),
        |_, out| out.iter_mut().for_each(|x| *x = rng.next()),
    );
    // The meter itself: a shell holding 60 MB in a variable must read as ≥ 50 MiB.
    let (run, anon, _) = run_measuring_anon(Command::new("sh").args([
        "-c",
        "v=$(head -c 60000000 /dev/zero | tr '\\0' a); sleep 0.2; echo ${#v}",
    ]));
    assert_eq!(ok(&run).trim(), "60000000");
    assert!(
        anon > 50 << 20,
        "the memory meter missed a 60 MB allocation: {anon}"
    );
    eprintln!(
        "meter check: a shell holding 60 MB reads {:.1} MiB RssAnon",
        anon as f64 / (1 << 20) as f64
    );

    let model_bytes = std::fs::metadata(src.join("model.safetensors")).unwrap().len();
    assert!(model_bytes > 130_000_000, "{model_bytes}");

    for extra in [&[][..], &["--dtype", "bf16"][..]] {
        let out = tmp.path().join(format!("out{}", extra.len()));
        let mut args = vec![
            "upscale",
            "--model",
            s(&src),
            "--out",
            s(&out),
            "--solar",
            "--shard-size",
            "50MB",
        ];
        args.extend_from_slice(extra);
        let (run, anon, hwm) = run_measuring_anon(Command::new(env!("CARGO_BIN_EXE_gyre")).args(&args));
        ok(&run);
        eprintln!(
            "upscale {extra:?} of a {} MB checkpoint: peak RssAnon {:.1} MiB, VmHWM {:.1} MiB",
            model_bytes / 1_000_000,
            anon as f64 / (1 << 20) as f64,
            hwm as f64 / (1 << 20) as f64
        );
        assert!(anon > 0, "no memory sample was taken");
        assert!(
            anon < 40 << 20,
            "peak anonymous memory {anon} bytes: the copy is not streaming ({model_bytes}-byte model)"
        );
        let info = ok(&gyre(&["info", "--model", s(&out)], b""));
        assert!(info.contains("layers:       16"), "{info}");
    }
}
