//! End-to-end tests of the `gyre` binary.
//!
//! Fixture `tests/fixtures/tiny_chat`: a tiny Llama with its own trained tokenizer and the
//! SOLAR-instruct chat template; `expected.json` holds HF transformers' greedy continuations
//! and logits for it (made by `tools/make_chat_fixture.py`).

mod common;

use common::*;

use std::path::Path;

use serde_json::Value;

fn expected() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("expected.json")).unwrap()).unwrap()
}

/// `gyre generate` of 24 greedy tokens after `prompt` on the tiny chat model.
fn generate_greedy(prompt: &str, device: &str, env: &[(&str, &str)]) -> String {
    let m = tiny();
    let args = [
        "generate",
        "--model",
        s(&m),
        "--device",
        device,
        "--prompt",
        prompt,
        "--temperature",
        "0",
        "--max-tokens",
        "24",
    ];
    ok(&gyre_env(&args, b"", env))
}

#[test]
fn generate_greedy_equals_transformers() {
    for case in expected()["generate"].as_array().unwrap() {
        let prompt = case["prompt"].as_str().unwrap();
        assert_eq!(
            generate_greedy(prompt, "cpu", &[]),
            format!("{}\n", case["text"].as_str().unwrap()),
            "prompt {prompt:?}"
        );
    }
}

/// `--device cuda` end to end on the CPU emulator (GYRE_CUDA_EMULATOR=1): greedy text equal
/// to transformers', and the logits of a recurrent model of each family within the CUDA
/// parity bound of the references.
#[test]
fn model_commands_run_on_the_cuda_emulator() {
    let emu = [("GYRE_CUDA_EMULATOR", "1")];
    let case = &expected()["generate"][0];
    let out = generate_greedy(case["prompt"].as_str().unwrap(), "cuda", &emu);
    assert_eq!(out, format!("{}\n", case["text"].as_str().unwrap()));
    for (family, case, weights, key) in [
        ("griffin", "griffin_small", "", "logits_long"),
        ("rwkv5", "rwkv5_tiny_f32", "model.pth", "logits"),
    ] {
        let dir = gyre_fixture(family, case);
        let (tokens, exp) = read_expected(&dir.join("expected.safetensors"));
        let model = dir.join(weights);
        for step in [false, true] {
            let mut args = vec!["logits", "--model", s(&model), "--device", "cuda"];
            let t = ids_arg(&tokens);
            args.extend(["--tokens", &t]);
            if step {
                args.push("--step");
            }
            let rows = logits_rows(&ok(&gyre_env(&args, b"", &emu)));
            let d = max_diff(&rows, &exp[key]);
            assert!(d <= 1e-3, "{case} (step {step}): max |Δlogit| {d}");
        }
    }
}

/// `gyre bench` on a checkpoint: the speed report on the CPU (tokens drawn with temperature and
/// top-p), and the Figure 1a curve (shared prefill, greedy steps picked on the device) on the
/// CUDA emulator.
#[test]
fn bench_reports_speed_and_the_length_curve() {
    let last_json = |out: &str| -> Value { serde_json::from_str(out.lines().last().unwrap()).unwrap() };
    let model = tiny();
    let args = [
        "bench",
        "--model",
        s(&model),
        "--prompt",
        "8",
        "--gen",
        "4",
        "--temperature",
        "0.7",
        "--top-p",
        "0.9",
        "--json",
    ];
    let r = last_json(&ok(&gyre(&args, b"")));
    assert!(r["decode_tok_s"].as_f64().unwrap() > 0.0, "{r}");
    assert_eq!(r["batch"], 1);
    assert_eq!(r["draw"], "temperature 0.7, top-p 0.9", "{r}");
    let dir = gyre_fixture("griffin", "griffin_small");
    let out = ok(&gyre_env(
        &[
            "bench",
            "--model",
            s(&dir),
            "--device",
            "cuda",
            "--batch",
            "3",
            "--prompt",
            "8",
            "--gen",
            "6",
            "--curve",
            "3",
            "--json",
        ],
        b"",
        &[("GYRE_CUDA_EMULATOR", "1")],
    ));
    let c = last_json(&out);
    assert_eq!(c["batch"], 3, "{out}");
    let generated: Vec<u64> = c["curve"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["generated"].as_u64().unwrap())
        .collect();
    assert_eq!(generated, [2, 4, 6], "{out}");
    assert_eq!(c["draw"], "greedy", "{out}");
    let err = fails(&["bench", "--model", s(&tiny()), "--batch", "lots"], b"");
    assert!(err.contains("`max`"), "{err}");
    let err = fails(&["bench", "--model", s(&tiny()), "--top-p", "2"], b"");
    assert!(err.contains("top_p"), "{err}");
}

#[test]
fn generate_reads_the_prompt_from_stdin() {
    let case = &expected()["generate"][0];
    let prompt = case["prompt"].as_str().unwrap();
    let out = ok(&gyre(
        &[
            "generate",
            "--model",
            s(&tiny()),
            "--temperature",
            "0",
            "--max-tokens",
            "24",
        ],
        prompt.as_bytes(),
    ));
    assert_eq!(out.trim_end_matches('\n'), case["text"].as_str().unwrap());
}

#[test]
fn seeded_sampling_is_reproducible() {
    let m = tiny();
    let args = [
        "generate",
        "--model",
        s(&m),
        "--prompt",
        "The",
        "--temperature",
        "1.0",
        "--seed",
        "42",
    ];
    let a = ok(&gyre(&args, b""));
    let b = ok(&gyre(&args, b""));
    assert_eq!(a, b);
    let mut other = args.to_vec();
    other[8] = "43";
    assert_ne!(a, ok(&gyre(&other, b"")));
}

#[test]
fn chat_greedy_equals_transformers_with_template_and_builtin_fallback() {
    let case = &expected()["chat"][0];
    let msg = format!("{}\n", case["message"].as_str().unwrap());
    let want = format!("{}\n", case["text"].as_str().unwrap());
    let args = |m: &str| -> Vec<String> {
        ["chat", "--model", m, "--temperature", "0", "--max-tokens", "24"]
            .map(String::from)
            .to_vec()
    };
    let argv = args(s(&tiny()));
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    assert_eq!(ok(&gyre(&argv, msg.as_bytes())), want);

    // Without a chat_template the built-in SOLAR format renders the same prompt.
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&tiny(), dir.path());
    let cfg_path = dir.path().join("tokenizer_config.json");
    let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg.as_object_mut().unwrap().remove("chat_template");
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let argv = args(s(dir.path()));
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let out = gyre(&argv, msg.as_bytes());
    assert_eq!(ok(&out), want);
    assert!(String::from_utf8_lossy(&out.stderr).contains("built-in SOLAR"));
}

#[test]
fn chat_handles_several_turns_and_reset() {
    let m = tiny();
    let args = [
        "chat",
        "--model",
        s(&m),
        "--temperature",
        "0",
        "--max-tokens",
        "8",
        "--system",
        "Be brief.",
    ];
    let out = ok(&gyre(
        &args,
        b"hello\nhow are you\n/reset\nhello\n/exit\nnever read\n",
    ));
    let lines: Vec<&str> = out.lines().collect();
    assert!(!lines.is_empty());
    // After /reset the first turn repeats exactly (greedy, same history).
    let replies: Vec<&str> = out.split_terminator('\n').collect();
    let first_turn = ok(&gyre(&args, b"hello\n"));
    assert!(out.starts_with(&first_turn), "{out:?} vs {first_turn:?}");
    assert!(out.ends_with(&first_turn), "{out:?} vs {first_turn:?}");
    assert!(replies.len() >= 3);
}

#[test]
fn logits_prefill_and_step_equal_transformers() {
    let exp = expected();
    let ids: Vec<u32> = exp["logits_tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    let want: Vec<f32> = exp["logits_last"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect();
    let (m, tokens) = (tiny(), ids_arg(&ids));
    let prefill = logits_rows(&ok(&gyre(
        &["logits", "--model", s(&m), "--tokens", &tokens],
        b"",
    )));
    let step = logits_rows(&ok(&gyre(
        &["logits", "--model", s(&m), "--tokens", &tokens, "--step"],
        b"",
    )));
    assert_eq!(prefill.len(), ids.len());
    assert_eq!(step.len(), prefill.len());
    let d = max_diff(&prefill[prefill.len() - 1..], &want);
    assert!(d <= 1e-4, "prefill vs transformers: {d}");
    let d = max_diff(&step, &prefill.concat());
    assert!(d <= 1e-5, "prefill vs step: {d}");
}

#[test]
fn tokenize_reads_stdin_verbatim_and_detokenize_inverts_it() {
    let m = tiny();
    let text = "Copyright (C) 2007 Free Software Foundation\n\n  indented  ";
    let out = ok(&gyre(&["tokenize", "--model", s(&m)], text.as_bytes()));
    let ids: Value = serde_json::from_str(&out).unwrap();
    let ids: Vec<String> = ids["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.to_string())
        .collect();
    assert!(!ids.contains(&"1".to_string()), "tokenize must not add BOS");
    let back = ok(&gyre(
        &["detokenize", "--model", s(&m), "--ids", &ids.join(",")],
        b"",
    ));
    assert_eq!(back, format!("{text}\n"));
    // The tokenizer file alone works too, and a trailing newline is not trimmed.
    let tok = m.join("tokenizer.json");
    let a = ok(&gyre(&["tokenize", "--tokenizer", s(&tok)], b"word"));
    let b = ok(&gyre(&["tokenize", "--tokenizer", s(&tok)], b"word\n"));
    assert_ne!(a, b);
}

#[test]
fn info_reports_architecture_sizes_and_state() {
    let out = ok(&gyre(&["info", "--model", s(&tiny())], b""));
    assert!(out.contains("LlamaForCausalLM"), "{out}");
    assert!(out.contains("parameters:   145728"), "{out}");
    assert!(out.contains("state @  1024: 524288 bytes"), "{out}");
}

#[test]
fn invalid_utf8_on_stdin_is_a_clear_error() {
    let err = fails(&["tokenize", "--model", s(&tiny())], b"ok \xff\xfe bad");
    assert!(err.contains("not valid UTF-8"), "{err}");
    let err = fails(&["generate", "--model", s(&tiny()), "--max-tokens", "2"], b"\xc3");
    assert!(err.contains("not valid UTF-8"), "{err}");
}

#[test]
fn bad_model_paths_and_devices_are_clear_errors() {
    let err = fails(&["info", "--model", "/no/such/model"], b"");
    assert!(
        err.contains("/no/such/model") && err.contains("does not exist"),
        "{err}"
    );
    let err = fails(&["info", "--model", s(&tiny()), "--device", "cuda"], b"");
    assert!(err.contains("cuda"), "{err}");
    let err = fails(&["logits", "--model", s(&tiny()), "--tokens", "1,99999"], b"");
    assert!(err.contains("token id 99999 is out of range"), "{err}");
    let err = fails(&["detokenize", "--model", s(&tiny()), "--ids", "1,99999"], b"");
    assert!(err.contains("99999"), "{err}");
}

/// Copies the fixture into a temp dir and lets `edit` break it.
fn broken(edit: impl FnOnce(&Path)) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&tiny(), dir.path());
    edit(dir.path());
    dir
}

#[test]
fn truncated_and_garbage_weight_files_are_clear_errors() {
    let d = broken(|p| {
        let w = p.join("model.safetensors");
        let bytes = std::fs::read(&w).unwrap();
        std::fs::write(&w, &bytes[..bytes.len() / 2]).unwrap();
    });
    let err = fails(&["info", "--model", s(d.path())], b"");
    assert!(
        err.contains("model.safetensors") && err.contains("truncated"),
        "{err}"
    );

    let d = broken(|p| {
        std::fs::write(
            p.join("model.safetensors"),
            b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all",
        )
        .unwrap()
    });
    let err = fails(&["info", "--model", s(d.path())], b"");
    assert!(
        err.contains("model.safetensors") && err.contains("not a valid safetensors"),
        "{err}"
    );

    let d = broken(|p| std::fs::write(p.join("model.safetensors"), b"").unwrap());
    let err = fails(&["info", "--model", s(d.path())], b"");
    assert!(err.contains("empty"), "{err}");

    let d = broken(|p| std::fs::remove_file(p.join("model.safetensors")).unwrap());
    let err = fails(&["info", "--model", s(d.path())], b"");
    assert!(err.contains("no weights"), "{err}");

    // An index may only name files of the model's directory (issue 18, item 12).
    for shard in ["/etc/passwd", "../model.safetensors", "sub/../../x.safetensors"] {
        let d = broken(|p| {
            std::fs::write(
                p.join("model.safetensors.index.json"),
                serde_json::json!({"weight_map": {"lm_head.weight": shard}}).to_string(),
            )
            .unwrap()
        });
        let err = fails(&["info", "--model", s(d.path())], b"");
        assert!(
            err.contains("not a file of the model's directory") && err.contains(shard),
            "{err}"
        );
    }
}

/// Rewrites the fixture's weights through `change` (name → Option<(shape, f32 data)>).
fn rewrite_weights(p: &Path, change: impl Fn(&str, Vec<usize>, Vec<u8>) -> Option<(Vec<usize>, Vec<u8>)>) {
    let w = p.join("model.safetensors");
    let bytes = std::fs::read(&w).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut kept = Vec::new();
    for (name, view) in st.tensors() {
        if let Some((shape, data)) = change(&name, view.shape().to_vec(), view.data().to_vec()) {
            kept.push((name, shape, data));
        }
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> = kept
        .iter()
        .map(|(n, shape, data)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), data).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &w).unwrap();
}

#[test]
fn missing_and_misshapen_tensors_are_named() {
    let d = broken(|p| {
        rewrite_weights(p, |n, s, b| {
            (n != "model.layers.1.mlp.up_proj.weight").then_some((s, b))
        })
    });
    let err = fails(&["info", "--model", s(d.path())], b"");
    assert!(
        err.contains("model.layers.1.mlp.up_proj.weight") && err.contains("missing"),
        "{err}"
    );

    let d = broken(|p| {
        rewrite_weights(p, |n, s, b| {
            if n == "model.norm.weight" {
                Some((vec![s[0] - 1], b[..b.len() - 4].to_vec()))
            } else {
                Some((s, b))
            }
        })
    });
    let err = fails(&["info", "--model", s(d.path())], b"");
    assert!(
        err.contains("model.norm.weight") && err.contains("[63]") && err.contains("[64]"),
        "{err}"
    );
}

#[test]
fn unknown_architectures_and_bad_configs_are_named() {
    let edit_config = |f: &dyn Fn(&mut Value)| {
        broken(|p| {
            let path = p.join("config.json");
            let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
            f(&mut cfg);
            std::fs::write(&path, cfg.to_string()).unwrap();
        })
    };
    let d = edit_config(&|c| {
        c["architectures"] = serde_json::json!(["FancyNewForCausalLM"]);
        c["model_type"] = serde_json::json!("fancy");
    });
    let err = fails(&["info", "--model", s(d.path())], b"");
    assert!(
        err.contains("FancyNewForCausalLM") && err.contains("unknown architecture"),
        "{err}"
    );

    let d = edit_config(&|c| c["num_key_value_heads"] = serde_json::json!(3));
    let err = fails(&["info", "--model", s(d.path())], b"");
    assert!(err.contains("num_key_value_heads"), "{err}");

    let d = broken(|p| std::fs::write(p.join("config.json"), "{ truncated").unwrap());
    let err = fails(&["info", "--model", s(d.path())], b"");
    assert!(
        err.contains("config.json") && err.contains("not valid JSON"),
        "{err}"
    );
}

fn read_expected(path: &Path) -> (Vec<u32>, std::collections::HashMap<String, Vec<f32>>) {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut floats = std::collections::HashMap::new();
    let mut tokens = Vec::new();
    for (name, t) in st.tensors() {
        if t.dtype() == safetensors::Dtype::I64 && name.starts_with("tokens") {
            if name == "tokens" || name == "tokens_long" {
                tokens = t
                    .data()
                    .chunks_exact(8)
                    .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as u32)
                    .collect();
            }
        } else if t.dtype() == safetensors::Dtype::F32 {
            floats.insert(
                name,
                t.data()
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                    .collect(),
            );
        }
    }
    (tokens, floats)
}

fn max_diff(rows: &[Vec<f32>], flat: &[f32]) -> f32 {
    let got: Vec<f32> = rows.iter().flatten().copied().collect();
    assert_eq!(got.len(), flat.len());
    got.iter()
        .zip(flat)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max)
}

#[test]
fn recurrent_gemma_runs_through_every_model_command() {
    let dir = gyre_fixture("griffin", "griffin_small");
    let (tokens, exp) = read_expected(&dir.join("expected.safetensors"));
    let t = ids_arg(&tokens);
    let prefill = logits_rows(&ok(&gyre(&["logits", "--model", s(&dir), "--tokens", &t], b"")));
    let step = logits_rows(&ok(&gyre(
        &["logits", "--model", s(&dir), "--tokens", &t, "--step"],
        b"",
    )));
    assert!(max_diff(&prefill, &exp["logits_long"]) <= 1e-4);
    assert!(max_diff(&step, &exp["logits_long"]) <= 1e-4);
    let info = ok(&gyre(&["info", "--model", s(&dir)], b""));
    assert!(
        info.contains("RecurrentGemmaForCausalLM") && info.contains("unbounded"),
        "{info}"
    );
    let bytes: Vec<&str> = info
        .lines()
        .filter(|l| l.starts_with("state @"))
        .map(|l| l.split(':').nth(1).unwrap())
        .collect();
    assert_eq!(bytes.len(), 3);
    assert!(
        bytes.iter().all(|b| *b == bytes[0]),
        "state bytes must not grow: {info}"
    );
}

#[test]
fn rwkv_state_tuning_file_sets_the_initial_state() {
    let dir = gyre_fixture("rwkv5", "rwkv5_tiny_f32");
    let (tokens, exp) = read_expected(&dir.join("expected.safetensors"));
    let (m, st) = (dir.join("model.pth"), dir.join("state_tiny.pth"));
    let t = ids_arg(&tokens);
    let plain = logits_rows(&ok(&gyre(&["logits", "--model", s(&m), "--tokens", &t], b"")));
    assert!(max_diff(&plain, &exp["logits"]) <= 1e-4);
    let tuned = logits_rows(&ok(&gyre(
        &["logits", "--model", s(&m), "--tokens", &t, "--state", s(&st)],
        b"",
    )));
    assert!(max_diff(&tuned, &exp["logits_state"]) <= 1e-4);
    let tuned_step = logits_rows(&ok(&gyre(
        &[
            "logits",
            "--model",
            s(&m),
            "--tokens",
            &t,
            "--step",
            "--state",
            s(&st),
        ],
        b"",
    )));
    assert!(max_diff(&tuned_step, &exp["logits_state"]) <= 1e-4);
    // A state file of another model is refused with a clear message.
    let err = fails(
        &[
            "logits",
            "--model",
            s(&tiny()),
            "--tokens",
            "1,2",
            "--state",
            s(&st),
        ],
        b"",
    );
    assert!(err.contains("not RWKV"), "{err}");
}

#[test]
fn saved_state_resumes_exactly_where_the_prompt_ended() {
    let m = tiny();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("prompt.state");
    let prompt = "Copyright holders may";
    ok(&gyre(
        &[
            "state",
            "save",
            "--model",
            s(&m),
            "--prompt",
            prompt,
            "--out",
            s(&file),
        ],
        b"",
    ));
    let ids: Value =
        serde_json::from_str(&ok(&gyre(&["tokenize", "--model", s(&m)], prompt.as_bytes()))).unwrap();
    let mut all: Vec<u32> = vec![1]; // BOS, as `state save` adds it to a fresh sequence
    all.extend(
        ids["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32),
    );
    let rest = [300u32, 301, 5, 42];
    let n = all.len();
    all.extend(rest);
    let full = logits_rows(&ok(&gyre(
        &["logits", "--model", s(&m), "--tokens", &ids_arg(&all)],
        b"",
    )));
    let resumed = logits_rows(&ok(&gyre(
        &[
            "logits",
            "--model",
            s(&m),
            "--tokens",
            &ids_arg(&rest),
            "--state",
            s(&file),
        ],
        b"",
    )));
    let want: Vec<f32> = full[n..].iter().flatten().copied().collect();
    assert!(max_diff(&resumed, &want) <= 1e-4);

    // Loading it into a model of another family is refused, naming both.
    let griffin = gyre_fixture("griffin", "griffin_small");
    let err = fails(
        &[
            "logits",
            "--model",
            s(&griffin),
            "--tokens",
            "1",
            "--state",
            s(&file),
        ],
        b"",
    );
    assert!(
        err.contains("LlamaForCausalLM") && err.contains("RecurrentGemmaForCausalLM"),
        "{err}"
    );
}

#[test]
fn world_tokenizer_is_available_without_a_model() {
    let corpus: Value = serde_json::from_str(
        &std::fs::read_to_string(gyre_fixture("rwkv5", "world_tokenizer.json")).unwrap(),
    )
    .unwrap();
    for case in corpus["cases"].as_array().unwrap().iter().take(12) {
        let text = case["text"].as_str().unwrap();
        let out: Value =
            serde_json::from_str(&ok(&gyre(&["tokenize", "--tokenizer", "world"], text.as_bytes()))).unwrap();
        assert_eq!(out["ids"], case["ids"], "text {text:?}");
    }
    let back = ok(&gyre(
        &["detokenize", "--tokenizer", "world", "--ids", "33,11,261"],
        b"",
    ));
    assert_eq!(back, " \n\n\n\n");
}

#[test]
fn recurrent_gemma_generates_and_chats_with_the_builtin_gemma_template() {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&gyre_fixture("griffin", "griffin_small"), dir.path());
    std::fs::write(dir.path().join("tokenizer.json"), word_tokenizer(256).to_string()).unwrap();
    let cfg = serde_json::json!({"bos_token": "<bos>", "eos_token": "<eos>", "add_bos_token": true});
    std::fs::write(dir.path().join("tokenizer_config.json"), cfg.to_string()).unwrap();
    let m = s(dir.path());
    let out = ok(&gyre(
        &[
            "generate",
            "--model",
            m,
            "--prompt",
            "w10 w11 w12",
            "--temperature",
            "0",
            "--max-tokens",
            "8",
        ],
        b"",
    ));
    assert!(
        out.trim()
            .split(' ')
            .all(|w| w.starts_with('w') || w.starts_with('<')),
        "{out:?}"
    );
    let out = gyre(
        &["chat", "--model", m, "--temperature", "0", "--max-tokens", "6"],
        b"w20 w21\nw30\n",
    );
    let text = ok(&out);
    assert_eq!(text.lines().count(), 2, "{text:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("built-in Gemma"));
    // The Gemma format has no system role: a clear error, not a panic.
    let err = fails(
        &["chat", "--model", m, "--system", "be brief", "--max-tokens", "2"],
        b"w20\n",
    );
    assert!(err.to_lowercase().contains("system"), "{err}");
}

/// `gyre state save` overwrites an earlier state file, never the model's files or anything
/// else (issue 18, item 10).
#[test]
fn state_save_never_overwrites_the_model() {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&tiny(), dir.path());
    let weights = dir.path().join("model.safetensors");
    let before = std::fs::read(&weights).unwrap();
    let err = fails(
        &[
            "state",
            "save",
            "--model",
            s(dir.path()),
            "--prompt",
            "hello",
            "--out",
            s(&weights),
        ],
        b"",
    );
    assert!(
        err.contains("not a gyre state file") && err.contains("model.safetensors"),
        "{err}"
    );
    assert_eq!(std::fs::read(&weights).unwrap(), before);
    let out = dir.path().join("prompt.state");
    for _ in 0..2 {
        ok(&gyre(
            &[
                "state",
                "save",
                "--model",
                s(dir.path()),
                "--prompt",
                "hello",
                "--out",
                s(&out),
            ],
            b"",
        ));
    }
}

/// NaN weights stop generation with an error naming the position; a config that declares
/// fewer layers than the file holds is warned about, naming the unused tensors; impossible
/// config values are refused, naming the field (issue 18, item 9).
#[test]
fn corrupt_checkpoints_and_impossible_configs_are_reported() {
    let nan = broken(|p| {
        rewrite_weights(p, |n, s, mut b| {
            if n == "model.layers.0.mlp.down_proj.weight" {
                b[..4].copy_from_slice(&f32::NAN.to_le_bytes());
            }
            Some((s, b))
        })
    });
    for args in [
        vec![
            "generate",
            "--prompt",
            "hello",
            "--max-tokens",
            "3",
            "--temperature",
            "0",
        ],
        vec!["logits", "--tokens", "1,5,7"],
    ] {
        let mut argv = args.clone();
        argv.extend(["--model", s(nan.path())]);
        let err = fails(&argv, b"");
        assert!(err.contains("NaN") && err.contains("position"), "{args:?}: {err}");
    }
    let edit_config = |edit: &dyn Fn(&mut Value)| {
        broken(|p| {
            let path = p.join("config.json");
            let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
            edit(&mut cfg);
            std::fs::write(&path, cfg.to_string()).unwrap();
        })
    };
    let fewer = edit_config(&|c| c["num_hidden_layers"] = 1.into());
    let out = gyre(&["info", "--model", s(fewer.path())], b"");
    ok(&out);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("not used") && err.contains("model.layers.1."),
        "{err}"
    );
    let theta = edit_config(&|c| c["rope_parameters"]["rope_theta"] = (-1.0).into());
    let err = fails(&["info", "--model", s(theta.path())], b"");
    assert!(err.contains("rope_theta"), "{err}");
    let eos = edit_config(&|c| c["eos_token_id"] = 99999.into());
    let err = fails(
        &[
            "generate",
            "--model",
            s(eos.path()),
            "--prompt",
            "hi",
            "--max-tokens",
            "2",
        ],
        b"",
    );
    assert!(err.contains("99999") && err.contains("eos_token_id"), "{err}");
}
