//! GGUF tokenizers against llama.cpp's ids (`tests/fixtures/gguf/tokenizers.json`, made by
//! `tools/make_gguf_tokenizer_fixtures.py` from the real tokenizer files that
//! `tools/fetch_test_assets.sh` fetches).
//!
//! Each case turns a tokenizer.json into GGUF metadata by the rules the script states (the FNV
//! hash of the result must equal the script's), writes a vocabulary-only GGUF with gyre's own
//! writer, and tokenizes the fixture texts with `Tokenizer::from_gguf`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use gyre::loader::gguf::{self, GgufFile, Value};
use gyre::tensor::GgmlType;
use gyre::tokenizer::Tokenizer;
use serde_json::Value as Json;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const UNKNOWN: i32 = 2;
const BYTE: i32 = 6;
const NORMAL: i32 = 1;

fn fnv(data: &[u8], mut h: u64) -> u64 {
    for &b in data {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001B3);
    }
    h
}

fn is_byte_token(t: &str) -> bool {
    t.len() == 6 && t.starts_with("<0x") && t.ends_with('>') && u8::from_str_radix(&t[3..5], 16).is_ok()
}

/// The script's rules, applied to `tests-assets/<asset>/`; returns the GGUF bytes and the hash.
fn convert(case: &Json) -> (Vec<u8>, String) {
    let asset = repo_root()
        .join("tests-assets")
        .join(case["asset"].as_str().unwrap());
    assert!(
        asset.join("tokenizer.json").is_file(),
        "test asset {} is missing: run tools/fetch_test_assets.sh from the repository root",
        asset.display()
    );
    let read =
        |f: &str| -> Json { serde_json::from_str(&std::fs::read_to_string(asset.join(f)).unwrap()).unwrap() };
    let (tj, cfg) = (read("tokenizer.json"), read("tokenizer_config.json"));
    let model = &tj["model"];
    let mut texts: HashMap<usize, String> = HashMap::new();
    for (t, i) in model["vocab"].as_object().unwrap() {
        texts.insert(i.as_u64().unwrap() as usize, t.clone());
    }
    let mut added: HashMap<usize, bool> = HashMap::new();
    for a in tj["added_tokens"].as_array().unwrap() {
        let id = a["id"].as_u64().unwrap() as usize;
        texts.insert(id, a["content"].as_str().unwrap().to_string());
        added.insert(id, a["special"].as_bool().unwrap());
    }
    let n = texts.keys().max().unwrap() + 1;
    let tokens: Vec<String> = (0..n)
        .map(|i| texts.get(&i).cloned().unwrap_or(format!("[PAD{i}]")))
        .collect();
    let merges: Vec<String> = model["merges"]
        .as_array()
        .map(|m| {
            m.iter()
                .map(|m| match m {
                    Json::String(s) => s.clone(),
                    Json::Array(p) => format!("{} {}", p[0].as_str().unwrap(), p[1].as_str().unwrap()),
                    other => panic!("merge {other}"),
                })
                .collect()
        })
        .unwrap_or_default();
    let unk = model["unk_token"].as_str();
    let types: Vec<i32> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| match added.get(&i) {
            Some(true) => CONTROL,
            Some(false) => USER_DEFINED,
            None if Some(t.as_str()) == unk => UNKNOWN,
            None if is_byte_token(t) => BYTE,
            None => NORMAL,
        })
        .collect();
    let spm = case["model"] == "llama";
    let (scores, merges_out): (Vec<f32>, Vec<String>) = if spm {
        let mut first: HashMap<String, usize> = HashMap::new();
        for (rank, m) in merges.iter().enumerate() {
            let (a, b) = m.split_once(' ').unwrap();
            first.entry(format!("{a}{b}")).or_insert(rank);
        }
        let scores = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| match first.get(t) {
                Some(&r) => -(r as f64) as f32,
                None if t.chars().count() <= 1 || types[i] == BYTE => 0.0,
                None => -((merges.len() + i) as f64) as f32,
            })
            .collect();
        (scores, Vec::new())
    } else {
        (vec![0.0; n], merges)
    };
    let tok_id = |field: &str| -> Option<u32> {
        let v = match &cfg[field] {
            Json::Object(o) => o.get("content").cloned().unwrap_or(Json::Null),
            v => v.clone(),
        };
        let v = v.as_str()?;
        tokens.iter().position(|t| t == v).map(|i| i as u32)
    };

    let mut h = 0xCBF29CE484222325u64;
    for t in &tokens {
        h = fnv(t.as_bytes(), h);
        h = fnv(&[0], h);
    }
    let score_bytes: Vec<u8> = scores.iter().flat_map(|s| s.to_le_bytes()).collect();
    h = fnv(&score_bytes, h);
    let type_bytes: Vec<u8> = types.iter().flat_map(|t| t.to_le_bytes()).collect();
    h = fnv(&type_bytes, h);
    for m in &merges_out {
        h = fnv(m.as_bytes(), h);
        h = fnv(b"\n", h);
    }

    let s = |v: &str| Value::Str(v.as_bytes().to_vec());
    let mut kv: Vec<(&str, Value)> = vec![
        ("general.architecture", s("llama")),
        ("tokenizer.ggml.model", s(case["model"].as_str().unwrap())),
        (
            "tokenizer.ggml.tokens",
            Value::Array(tokens.iter().map(|t| s(t)).collect()),
        ),
        (
            "tokenizer.ggml.scores",
            Value::Array(scores.iter().map(|&v| Value::F32(v)).collect()),
        ),
        (
            "tokenizer.ggml.token_type",
            Value::Array(types.iter().map(|&v| Value::I32(v)).collect()),
        ),
    ];
    if let Some(p) = case["pre"].as_str() {
        kv.push(("tokenizer.ggml.pre", s(p)));
    }
    if !merges_out.is_empty() {
        kv.push((
            "tokenizer.ggml.merges",
            Value::Array(merges_out.iter().map(|m| s(m)).collect()),
        ));
    }
    for (key, field) in [
        ("tokenizer.ggml.bos_token_id", "bos_token"),
        ("tokenizer.ggml.eos_token_id", "eos_token"),
        ("tokenizer.ggml.unknown_token_id", "unk_token"),
    ] {
        if let Some(id) = tok_id(field) {
            kv.push((key, Value::U32(id)));
        }
    }
    if let Some(b) = cfg["add_bos_token"].as_bool() {
        kv.push(("tokenizer.ggml.add_bos_token", Value::Bool(b)));
    }
    if let Some(b) = case["add_space_prefix"].as_bool() {
        kv.push(("tokenizer.ggml.add_space_prefix", Value::Bool(b)));
    }
    let no_tensors: &[(&str, Vec<u64>, GgmlType, &[u8])] = &[];
    (gguf::write(&kv, no_tensors, 32), format!("{h:016x}"))
}

#[test]
fn gguf_vocabularies_tokenize_as_llama_cpp_does() {
    let fixture: Json = serde_json::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gguf/tokenizers.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let texts: Vec<&str> = fixture["texts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let mut mismatches = Vec::new();
    for case in fixture["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let (bytes, hash) = convert(case);
        assert_eq!(
            hash,
            case["fnv"].as_str().unwrap(),
            "{name}: the conversion differs from the script's"
        );
        let path = dir.path().join(format!("{name}.gguf"));
        std::fs::write(&path, bytes).unwrap();
        let tok = Tokenizer::from_gguf(&GgufFile::open(&path).unwrap()).unwrap();
        for (text, want) in texts.iter().zip(case["ids"].as_array().unwrap()) {
            let want: Vec<u32> = want
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect();
            let got = tok.encode(text, false).unwrap();
            if got != want {
                mismatches.push(format!(
                    "{name} {text:?}:\n  gyre      {got:?}\n  llama.cpp {want:?}"
                ));
            }
            // Byte-level vocabularies decode back to the text exactly.
            if case["model"] == "gpt2" && got == want {
                assert_eq!(tok.decode(&got, false).unwrap(), *text, "{name}: decode {text:?}");
            }
        }
        let want_bos: Vec<u32> = case["with_bos"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(tok.encode(texts[0], true).unwrap(), want_bos, "{name}: BOS");
    }
    assert!(
        mismatches.is_empty(),
        "{} mismatches:\n{}",
        mismatches.len(),
        mismatches.join("\n")
    );
}
