//! Parity tests for the RWKV World tokenizer against the `rwkv` pip package.
//!
//! Reference: `rwkv` 0.8.32, `rwkv.rwkv_tokenizer.TRIE_TOKENIZER` over `rwkv_vocab_v20230424.txt`.
//! Its ids are in `tests/fixtures/rwkv5/world_tokenizer.json`, made by
//! `tools/make_rwkv5_fixtures.py --only tokenizer`. The vocabulary itself is embedded in the
//! library (`assets/rwkv_vocab_v20230424.txt`), so these tests need no fetched assets.

use std::path::{Path, PathBuf};
use std::time::Instant;

use gyre::tokenizer::Tokenizer;
use serde_json::Value;

/// The committed World tokenizer fixture, parsed.
fn fixture() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/rwkv5/world_tokenizer.json");
    let text =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading fixture {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("parsing fixture {}: {e}", path.display()))
}

/// The vendored vocabulary file.
fn vocab_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/rwkv_vocab_v20230424.txt")
}

/// A JSON list of ids.
fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("ids list")
        .iter()
        .map(|x| u32::try_from(x.as_u64().expect("id")).expect("id fits u32"))
        .collect()
}

/// The fixture's `(text, ids)` cases.
fn cases(fx: &Value) -> Vec<(String, Vec<u32>)> {
    fx["cases"]
        .as_array()
        .expect("fixture has cases")
        .iter()
        .map(|c| (c["text"].as_str().expect("text").to_string(), ids(&c["ids"])))
        .collect()
}

/// Streams `ids`, checking that every delta continues `want` (so none holds a broken character),
/// that no delta has U+FFFD unless `want` itself does, and that the deltas add up to `want`.
fn check_stream(tok: &Tokenizer, ids: &[u32], want: &str, label: &str) {
    let fffd_in_text = want.contains('\u{FFFD}');
    let mut stream = tok.decode_stream(true);
    let mut got = String::new();
    for &id in ids {
        if let Some(delta) = stream.push(id).unwrap() {
            assert!(!delta.is_empty(), "{label}: empty delta");
            assert!(
                fffd_in_text || !delta.contains('\u{FFFD}'),
                "{label}: delta {delta:?} has U+FFFD (after {got:?})"
            );
            got.push_str(&delta);
            assert!(
                want.starts_with(&got),
                "{label}: delta {delta:?} strays from the text"
            );
        }
    }
    let rest = stream.finish().unwrap();
    assert!(rest.is_empty(), "{label}: valid text left {rest:?} pending");
    got.push_str(&rest);
    assert_eq!(got, want, "{label}: deltas do not add up to the text");
}

#[test]
fn ids_match_the_reference_and_round_trip() {
    let fx = fixture();
    let tok = Tokenizer::world();
    let cases = cases(&fx);
    let chars: usize = cases.iter().map(|(t, _)| t.chars().count()).sum();
    assert!(chars >= 10_000, "the corpus has only {chars} characters");
    for (text, want) in &cases {
        let got = tok.encode(text, false).unwrap();
        assert_eq!(&got, want, "encode({text:?})");
        assert_eq!(
            tok.encode(text, true).unwrap(),
            got,
            "add_special_tokens adds nothing"
        );
        assert_eq!(
            tok.decode(&got, false).unwrap(),
            *text,
            "decode(encode({text:?}))"
        );
    }
}

#[test]
fn decode_matches_the_reference_where_it_is_defined() {
    let fx = fixture();
    let tok = Tokenizer::world();
    for case in fx["decode_cases"].as_array().expect("decode_cases") {
        let ids = ids(&case["ids"]);
        let want = case["decoded"].as_str().unwrap();
        let got = tok.decode(&ids, true).unwrap();
        match case["bytes_hex"].as_str() {
            // Only id 0 lacks bytes; the reference fails on it, gyre skips it as a special token.
            None => {
                assert!(ids.contains(&0), "{ids:?}");
                let rest: Vec<u32> = ids.iter().copied().filter(|&i| i != 0).collect();
                assert_eq!(got, tok.decode(&rest, true).unwrap(), "{ids:?}");
                assert!(tok.decode(&ids, false).unwrap().starts_with("<|endoftext|>"));
            }
            Some(hex) => {
                let bytes: Vec<u8> = (0..hex.len())
                    .step_by(2)
                    .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
                    .collect();
                match std::str::from_utf8(&bytes) {
                    Ok(text) => {
                        assert_eq!(text, want);
                        assert_eq!(got, want, "{ids:?}");
                    }
                    // The reference gives one U+FFFD for the whole input; gyre decodes lossily.
                    Err(_) => {
                        assert_eq!(want, "\u{FFFD}");
                        assert_eq!(got, String::from_utf8_lossy(&bytes), "{ids:?}");
                    }
                }
            }
        }
    }
}

#[test]
fn streaming_deltas_add_up_and_never_split_characters() {
    let fx = fixture();
    let tok = Tokenizer::world();
    let mut partial_tokens = 0;
    for (text, ids) in cases(&fx) {
        partial_tokens += ids
            .iter()
            .filter(|&&id| tok.id_to_token(id).is_some_and(|t| t.starts_with("<0x")))
            .count();
        check_stream(&tok, &ids, &text, &format!("{text:?}"));
    }
    assert!(partial_tokens > 0, "the corpus used no partial-character tokens");

    // A character spelled byte by byte (ids 1..=256 are the bytes 0x00..=0xFF).
    let euro: Vec<u32> = "€".bytes().map(|b| u32::from(b) + 1).collect();
    let mut stream = tok.decode_stream(true);
    assert_eq!(stream.push(euro[0]).unwrap(), None);
    assert_eq!(stream.push(euro[1]).unwrap(), None);
    assert_eq!(stream.push(euro[2]).unwrap().as_deref(), Some("€"));
    assert_eq!(stream.finish().unwrap(), "");
    // An incomplete character comes out as U+FFFD only when flushed; a hopeless byte at once.
    let mut stream = tok.decode_stream(true);
    assert_eq!(stream.push(euro[0]).unwrap(), None);
    assert_eq!(stream.finish().unwrap(), "\u{FFFD}");
    assert_eq!(stream.push(0xFF + 1).unwrap().as_deref(), Some("\u{FFFD}"));
    // EOS is text only when special tokens are kept.
    let mut stream = tok.decode_stream(true);
    assert_eq!(stream.push(0).unwrap(), None);
    let mut stream = tok.decode_stream(false);
    assert_eq!(stream.push(0).unwrap().as_deref(), Some("<|endoftext|>"));
}

#[test]
fn documented_ids_and_specials() {
    let tok = Tokenizer::world();
    assert_eq!(tok.encode("\n", false).unwrap(), vec![11]);
    assert_eq!(tok.encode(" ", false).unwrap(), vec![33]);
    assert_eq!(tok.encode("\n\n", false).unwrap(), vec![261]);
    assert_eq!(tok.encode("\0", false).unwrap(), vec![1]);
    assert_eq!(tok.encode("", false).unwrap(), Vec::<u32>::new());
    assert_eq!(tok.encode_chat("").unwrap(), Vec::<u32>::new());
    assert_eq!(tok.encode_chat("\n\n").unwrap(), vec![261]);
    // The EOS text is not parsed out of the input, as in the reference.
    assert!(!tok.encode("<|endoftext|>", false).unwrap().contains(&0));

    let sp = tok.specials();
    assert_eq!(sp.bos, None);
    assert_eq!(sp.eos, vec![0]);
    assert_eq!(sp.eos_text.as_deref(), Some("<|endoftext|>"));
    assert!(!sp.add_bos);
    assert!(!tok.add_eos());
    assert_eq!(tok.vocab_size(), 65536);

    assert_eq!(tok.token_to_id("\n\n"), Some(261));
    assert_eq!(tok.token_to_id("<|endoftext|>"), Some(0));
    assert_eq!(tok.id_to_token(0).as_deref(), Some("<|endoftext|>"));
    assert_eq!(tok.id_to_token(1).as_deref(), Some("\0"));
    assert_eq!(tok.id_to_token(256).as_deref(), Some("<0xFF>"));
    assert_eq!(tok.token_to_id("<0xFF>"), Some(256));
    assert_eq!(tok.id_to_token(65529).as_deref(), Some(" ".repeat(128).as_str()));
    for unused in [65530, 65535, 65536, u32::MAX] {
        assert_eq!(tok.id_to_token(unused), None, "{unused}");
    }
    // Every token's name leads back to it.
    for id in 0..65530 {
        let name = tok
            .id_to_token(id)
            .unwrap_or_else(|| panic!("id {id} has no name"));
        assert_eq!(tok.token_to_id(&name), Some(id), "{name:?}");
    }
}

#[test]
fn out_of_range_ids_are_errors() {
    let tok = Tokenizer::world();
    for bad in [65536, 70000, u32::MAX] {
        let msg = tok.decode(&[11, bad], false).unwrap_err().to_string();
        assert!(msg.contains(&bad.to_string()) && msg.contains("65536"), "{msg}");
        let mut stream = tok.decode_stream(true);
        assert_eq!(stream.push(11).unwrap().as_deref(), Some("\n"));
        assert!(stream.push(bad).is_err());
        // The stream is still usable after the error.
        assert_eq!(stream.push(33).unwrap().as_deref(), Some(" "));
    }
    // Unused ids inside the id space decode to nothing.
    assert_eq!(tok.decode(&[65530, 11, 65535], true).unwrap(), "\n");
}

#[test]
fn named_and_file_loading() {
    let named = Tokenizer::from_name("world").unwrap();
    assert_eq!(named.vocab_size(), 65536);
    assert_eq!(Tokenizer::builtin_names(), ["world"]);
    let msg = Tokenizer::from_name("gpt2").unwrap_err().to_string();
    assert!(msg.contains("gpt2") && msg.contains("world"), "{msg}");

    // The vocabulary file itself loads through from_file and behaves like the embedded one.
    let from_file = Tokenizer::from_file(&vocab_path()).unwrap();
    assert_eq!(from_file.vocab_size(), 65536);
    assert_eq!(from_file.specials(), Tokenizer::world().specials());
    let text = "Hello world\n\n你好, RWKV! 😀";
    let want = Tokenizer::world().encode(text, false).unwrap();
    assert_eq!(from_file.encode(text, false).unwrap(), want);
    assert_eq!(from_file.decode(&want, false).unwrap(), text);
}

#[test]
fn malformed_vocab_files_name_the_file_and_line() {
    let dir = std::env::temp_dir().join(format!("gyre-world-vocab-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("bad_vocab.txt");
    std::fs::write(&path, "1 '\\x00' 1\n2 '\\x01' 1\n3 'ab' 3\n").unwrap();
    let msg = format!("{:#}", Tokenizer::from_file(&path).unwrap_err());
    assert!(msg.contains("bad_vocab.txt") && msg.contains("line 3"), "{msg}");
    std::fs::remove_dir_all(&dir).ok();

    // A model directory without tokenizer.json stays an error; the caller picks World.
    let msg = Tokenizer::from_model_dir(&std::env::temp_dir().join("gyre-no-such-model"), None)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("tokenizer.json"), "{msg}");
}

/// Measures encode speed on ~1 MB of mixed text (run with `--release -- --ignored --nocapture`).
#[test]
#[ignore = "timing, not correctness"]
fn encode_speed() {
    let fx = fixture();
    let corpus: String = cases(&fx)
        .into_iter()
        .map(|(t, _)| t)
        .collect::<Vec<_>>()
        .join("\n");
    let mut text = String::new();
    while text.len() < 1 << 20 {
        text.push_str(&corpus);
    }
    let start = Instant::now();
    let tok = Tokenizer::world();
    println!(
        "parsed the vocabulary and built the trie in {:.1} ms",
        start.elapsed().as_secs_f64() * 1e3
    );
    let start = Instant::now();
    let ids = tok.encode(&text, false).unwrap();
    let secs = start.elapsed().as_secs_f64();
    println!(
        "encoded {} bytes into {} ids in {:.1} ms ({:.1} MB/s)",
        text.len(),
        ids.len(),
        secs * 1e3,
        text.len() as f64 / secs / 1e6
    );
    let start = Instant::now();
    let back = tok.decode(&ids, false).unwrap();
    println!("decoded in {:.1} ms", start.elapsed().as_secs_f64() * 1e3);
    assert_eq!(back, text);
}
