//! Tokenizers from a GGUF file's `tokenizer.ggml.*` metadata, tokenizing as llama.cpp does
//! (`src/llama-vocab.cpp`).
//!
//! - `tokenizer.ggml.model = "llama"`: SentencePiece-style merging by token score
//!   ([`SpmTokenizer`], llama.cpp's `llm_tokenizer_spm`): text is split into UTF-8 characters,
//!   and the adjacent pair whose concatenation is the highest-scoring token merges first (the
//!   leftmost on ties) until no pair is a token; what remains unknown falls back to `<0xXX>`
//!   byte tokens. Spaces are `▁`, and a space is put in front of the text (and after every
//!   special token) when `add_space_prefix` says so.
//! - `tokenizer.ggml.model = "gpt2"`: byte-level BPE with the file's merges and the
//!   pre-tokenizer that `tokenizer.ggml.pre` names, run by the `tokenizers` crate from a
//!   `tokenizer.json` built here ([`bpe_tokenizer_json`]). The split patterns are llama.cpp's
//!   for each name.
//!
//! Control, user-defined and unknown tokens (`tokenizer.ggml.token_type`) are matched in the
//! text before anything else, as the `tokenizer.json` backend matches added tokens.

use std::collections::{BinaryHeap, HashMap};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};

use crate::loader::gguf::{GgufFile, Value as GValue};

/// llama.cpp's token types (`LLAMA_TOKEN_TYPE_*`).
pub(crate) mod token_type {
    pub const NORMAL: i32 = 1;
    pub const UNKNOWN: i32 = 2;
    pub const CONTROL: i32 = 3;
    pub const USER_DEFINED: i32 = 4;
    pub const UNUSED: i32 = 5;
    pub const BYTE: i32 = 6;
}

/// Texts llama.cpp treats as end-of-turn (and as control tokens) when the file names none.
const EOT_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<EOT>",
    "_<EOT>",
    "<｜end▁of▁sentence｜>",
    "<end_of_utterance>",
];

/// The vocabulary and special tokens a GGUF file declares.
pub(crate) struct GgufVocab {
    pub tokens: Vec<Vec<u8>>,
    pub scores: Vec<f32>,
    pub types: Vec<i32>,
    pub model: String,
    pub pre: Option<String>,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    /// End-of-turn and end-of-message ids (explicit keys, else found by text).
    pub eot: Vec<u32>,
    pub unk: Option<u32>,
    pub add_bos: bool,
    pub add_eos: bool,
    pub add_space_prefix: bool,
    pub merges: Vec<String>,
}

impl GgufVocab {
    /// Reads the `tokenizer.ggml.*` keys, checking their types and lengths.
    pub(crate) fn read(file: &GgufFile) -> Result<GgufVocab> {
        let shown = file.path.display().to_string();
        let model = file
            .opt_str("tokenizer.ggml.model")?
            .with_context(|| {
                format!("{shown} has no tokenizer (metadata key 'tokenizer.ggml.model' is missing)")
            })?
            .to_string();
        let list = |key: &str| -> Result<Option<&[GValue]>> { file.opt_array(key) };
        let tokens: Vec<Vec<u8>> = list("tokenizer.ggml.tokens")?
            .with_context(|| format!("{shown}: metadata key 'tokenizer.ggml.tokens' is missing"))?
            .iter()
            .enumerate()
            .map(|(i, v)| match v {
                GValue::Str(b) => Ok(b.clone()),
                other => bail!(
                    "{shown}: tokenizer.ggml.tokens[{i}] is a {}, not a string",
                    other.type_name()
                ),
            })
            .collect::<Result<_>>()?;
        let n = tokens.len();
        if n == 0 {
            bail!("{shown}: tokenizer.ggml.tokens is empty");
        }
        let per_token = |key: &str, what: &str| -> Result<Option<Vec<f64>>> {
            let Some(items) = list(key)? else { return Ok(None) };
            if items.len() < n {
                bail!("{shown}: {key} has {} entries for {n} tokens", items.len());
            }
            items
                .iter()
                .take(n)
                .enumerate()
                .map(|(i, v)| {
                    v.as_f64()
                        .with_context(|| format!("{shown}: {key}[{i}] is not {what}"))
                })
                .collect::<Result<Vec<f64>>>()
                .map(Some)
        };
        let scores = per_token("tokenizer.ggml.scores", "a number")?
            .map(|v| v.into_iter().map(|s| s as f32).collect())
            .unwrap_or_else(|| vec![0.0; n]);
        let mut types: Vec<i32> = per_token("tokenizer.ggml.token_type", "an integer")?
            .map(|v| v.into_iter().map(|t| t as i32).collect())
            .unwrap_or_else(|| vec![token_type::NORMAL; n]);
        let id = |key: &str| -> Result<Option<u32>> {
            Ok(file.opt_u64(key)?.filter(|&v| (v as usize) < n).map(|v| v as u32))
        };
        let spm = model == "llama";
        let (default_bos, default_eos, default_unk) = match model.as_str() {
            "llama" => (Some(1), Some(2), Some(0)),
            "gpt2" => (Some(11), Some(11), None),
            "none" | "no_vocab" => bail!("{shown} has no tokenizer (tokenizer.ggml.model is '{model}')"),
            other => bail!(
                "{shown}: tokenizer model '{other}' is not supported; gyre reads 'llama' (SentencePiece) \
                 and 'gpt2' (byte-level BPE) vocabularies"
            ),
        };
        let in_vocab = |v: Option<u32>| v.filter(|&i| (i as usize) < n);
        let bos = id("tokenizer.ggml.bos_token_id")?.or(in_vocab(default_bos));
        let eos = id("tokenizer.ggml.eos_token_id")?.or(in_vocab(default_eos));
        let unk = id("tokenizer.ggml.unknown_token_id")?.or(in_vocab(default_unk));
        let pre = file.opt_str("tokenizer.ggml.pre")?.map(str::to_string);
        let llama3_like = pre
            .as_deref()
            .is_some_and(|p| LLAMA3_NAMES.contains(&p) || p == "tekken" || p == "chameleon");
        let add_bos = file
            .opt_bool("tokenizer.ggml.add_bos_token")?
            .unwrap_or(spm || llama3_like);
        let add_eos = file.opt_bool("tokenizer.ggml.add_eos_token")?.unwrap_or(false);
        let add_space_prefix = file.opt_bool("tokenizer.ggml.add_space_prefix")?.unwrap_or(spm);

        let mut eot = Vec::new();
        for key in ["tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"] {
            if let Some(i) = id(key)? {
                eot.push(i);
            }
        }
        if eot.is_empty() {
            // llama.cpp finds the end-of-turn token by its text and makes it a control token.
            for (i, t) in tokens.iter().enumerate() {
                if EOT_TEXTS.iter().any(|e| e.as_bytes() == t.as_slice()) && !eot.contains(&(i as u32)) {
                    eot.push(i as u32);
                    if types[i] != token_type::CONTROL && types[i] != token_type::USER_DEFINED {
                        types[i] = token_type::CONTROL;
                    }
                }
            }
        }
        let merges = match list("tokenizer.ggml.merges")? {
            Some(items) => items
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    v.as_str()
                        .map(str::to_string)
                        .with_context(|| format!("{shown}: tokenizer.ggml.merges[{i}] is not a UTF-8 string"))
                })
                .collect::<Result<_>>()?,
            None if model == "gpt2" => bail!("{shown}: a gpt2 tokenizer needs tokenizer.ggml.merges"),
            None => Vec::new(),
        };
        Ok(GgufVocab {
            tokens,
            scores,
            types,
            model,
            pre,
            bos,
            eos,
            eot,
            unk,
            add_bos,
            add_eos,
            add_space_prefix,
            merges,
        })
    }

    /// True for tokens matched in the text as a whole before tokenizing (control,
    /// user-defined and unknown tokens).
    fn is_matched_whole(&self, id: usize) -> bool {
        matches!(
            self.types[id],
            token_type::CONTROL | token_type::USER_DEFINED | token_type::UNKNOWN
        ) && !self.tokens[id].is_empty()
    }
}

/// `tokenizer.ggml.pre` names that use llama.cpp's Llama-3 split pattern.
const LLAMA3_NAMES: &[&str] = &[
    "llama3",
    "llama-v3",
    "llama-bpe",
    "falcon3",
    "falcon-h1",
    "pixtral",
    "midm-2.0",
    "lfm2",
    "dbrx",
    "smaug-bpe",
];

const LLAMA3_SPLIT: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const GPT2_SPLIT: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";

/// llama.cpp's split patterns for a pre-tokenizer name (applied one after the other, each
/// splitting the pieces of the one before), and whether whole words in the vocabulary skip
/// the merges (`ignore_merges`).
pub(crate) fn pre_tokenizer(name: &str) -> Result<(Vec<&'static str>, bool)> {
    Ok(match name {
        n if LLAMA3_NAMES.contains(&n) => (vec![LLAMA3_SPLIT], !matches!(n, "dbrx" | "smaug-bpe")),
        "default" | "gpt-2" | "phi-2" | "mpt" | "olmo" | "jais" | "trillion" | "exaone4" | "roberta-bpe" => {
            (vec![GPT2_SPLIT], false)
        }
        "starcoder" | "refact" | "command-r" | "smollm" | "codeshell" | "exaone" | "minerva-7b" => {
            (vec![r"\p{N}", GPT2_SPLIT], false)
        }
        "qwen2" | "stablelm2" | "deepseek-r1-qwen" | "megrez" | "hunyuan" => (
            vec![
                r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
            ],
            false,
        ),
        "tekken" => (
            vec![
                r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",
            ],
            true,
        ),
        "gpt-4o" | "llama4" => (
            vec![
                r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",
            ],
            false,
        ),
        "deepseek-llm" => (
            vec![
                r"[\r\n]",
                r"\s?[A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ-ᶚḀ-ἕἘ-Ἕἠ-ὅὈ-Ὅὐ-ὗὙὛὝὟ-ώᾀ-ᾴᾶ-ᾼιῂ-ῄῆ-ῌῐ-ΐῖ-Ίῠ-Ῥῲ-ῴῶ-ῼℂℇℊ-ℓℕℙ-ℝℤΩℨK-ℭℯ-ℴℹℼ-ℿⅅ-ⅉⅎↃↄⰀ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎꭰ-ꮿﬀ-ﬆﬓ-ﬗＡ-Ｚａ-ｚ𐐀-𐑏𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃]+",
                r"\s?[!-/:-~！-／：-～‘-‟　-。]+",
                r"\s+$",
                r"[一-龥ࠀ-一가-퟿]+",
                r"\p{N}+",
            ],
            false,
        ),
        "deepseek-coder" => (
            vec![
                r"[\r\n]",
                r"\s?\p{L}+",
                r"\s?\p{P}+",
                r"[一-龥ࠀ-一가-퟿]+",
                r"\p{N}",
            ],
            false,
        ),
        "falcon" => (
            vec![
                r"[\p{P}\$\+<=>\^~\|`]+",
                r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)",
                r"[0-9][0-9][0-9]",
            ],
            false,
        ),
        "poro-chat" | "bloom" | "gpt3-finnish" => (vec![r" ?[^(\s|.,!?…。，、।۔،)]+"], false),
        "viking" => (vec![r" ?[^(\s|.,!?…。，、।۔،)]+", r"\p{N}"], false),
        other => bail!(
            "pre-tokenizer '{other}' (tokenizer.ggml.pre) is not one gyre knows; it knows default, gpt-2, \
             llama3/llama-bpe, smollm, starcoder, qwen2, tekken, gpt-4o, deepseek-llm, deepseek-coder, \
             falcon, bloom and their aliases"
        ),
    })
}

/// A `tokenizer.json` (Hugging Face `tokenizers` format) equal to a GGUF `gpt2` vocabulary:
/// byte-level BPE with the file's merges, llama.cpp's split patterns for `pre`, and the
/// control and user-defined tokens as added tokens.
pub(crate) fn bpe_tokenizer_json(v: &GgufVocab) -> Result<Value> {
    let name = v.pre.as_deref().unwrap_or("default");
    let (patterns, ignore_merges) = pre_tokenizer(name)?;
    let mut vocab = serde_json::Map::new();
    let mut added = Vec::new();
    for (i, t) in v.tokens.iter().enumerate() {
        let text = String::from_utf8(t.clone())
            .map_err(|_| anyhow!("token {i} of a gpt2 vocabulary is not UTF-8"))?;
        if v.is_matched_whole(i) {
            added.push(json!({
                "id": i, "content": text, "single_word": false, "lstrip": false, "rstrip": false,
                "normalized": false, "special": v.types[i] != token_type::USER_DEFINED,
            }));
        }
        vocab.insert(text, json!(i));
    }
    let mut pre: Vec<Value> = patterns
        .iter()
        .map(|p| json!({"type": "Split", "pattern": {"Regex": p}, "behavior": "Isolated", "invert": false}))
        .collect();
    pre.push(
        json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false}),
    );
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": pre},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
            "ignore_merges": ignore_merges, "vocab": vocab, "merges": v.merges,
        },
    }))
}

/// The `▁` that stands for a space in SentencePiece vocabularies.
const SPACE: &str = "\u{2581}";

/// llama.cpp's SentencePiece tokenizer over a GGUF `llama` vocabulary (module docs).
pub(crate) struct SpmTokenizer {
    tokens: Vec<Vec<u8>>,
    scores: Vec<f32>,
    types: Vec<i32>,
    /// Token text → id (the last id wins where texts repeat, as in llama.cpp).
    ids: HashMap<Vec<u8>, u32>,
    /// The `<0xXX>` tokens.
    byte_ids: [Option<u32>; 256],
    /// Matcher for the tokens taken whole from the text (longest first at each position).
    whole: Option<aho_corasick::AhoCorasick>,
    /// The token of each pattern of `whole`.
    whole_ids: Vec<u32>,
    /// As `whole`, user-defined tokens only: what is matched when special tokens are text.
    user: Option<aho_corasick::AhoCorasick>,
    user_ids: Vec<u32>,
    add_space_prefix: bool,
    unk: Option<u32>,
    /// The file the vocabulary came from (for messages).
    origin: String,
}

impl SpmTokenizer {
    pub(crate) fn new(v: &GgufVocab, origin: &str) -> Result<SpmTokenizer> {
        let mut ids = HashMap::with_capacity(v.tokens.len());
        let mut byte_ids = [None; 256];
        for (i, t) in v.tokens.iter().enumerate() {
            ids.insert(t.clone(), i as u32);
            if v.types[i] == token_type::BYTE {
                if let Some(b) = parse_byte_token(t) {
                    byte_ids[b as usize] = Some(i as u32);
                }
            }
        }
        let mut whole_ids: Vec<u32> = (0..v.tokens.len())
            .filter(|&i| v.is_matched_whole(i))
            .map(|i| i as u32)
            .collect();
        // llama.cpp tries longer tokens first.
        whole_ids.sort_by_key(|&i| std::cmp::Reverse(v.tokens[i as usize].len()));
        let whole = if whole_ids.is_empty() {
            None
        } else {
            Some(
                aho_corasick::AhoCorasick::builder()
                    .match_kind(aho_corasick::MatchKind::LeftmostLongest)
                    .build(whole_ids.iter().map(|&i| &v.tokens[i as usize]))
                    .map_err(|e| anyhow!("building the special-token matcher: {e}"))?,
            )
        };
        let user_ids: Vec<u32> = whole_ids
            .iter()
            .copied()
            .filter(|&i| v.types[i as usize] == token_type::USER_DEFINED)
            .collect();
        let user = if user_ids.is_empty() {
            None
        } else {
            Some(
                aho_corasick::AhoCorasick::builder()
                    .match_kind(aho_corasick::MatchKind::LeftmostLongest)
                    .build(user_ids.iter().map(|&i| &v.tokens[i as usize]))
                    .map_err(|e| anyhow!("building the user-token matcher: {e}"))?,
            )
        };
        Ok(SpmTokenizer {
            user,
            user_ids,
            tokens: v.tokens.clone(),
            scores: v.scores.clone(),
            types: v.types.clone(),
            ids,
            byte_ids,
            whole,
            whole_ids,
            add_space_prefix: v.add_space_prefix,
            unk: v.unk,
            origin: origin.to_string(),
        })
    }

    /// Size of the id space.
    pub(crate) fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    /// The id of a token's text.
    pub(crate) fn token_to_id(&self, s: &str) -> Option<u32> {
        self.ids.get(s.as_bytes()).copied()
    }

    /// The text of an id as the vocabulary stores it (`▁Hello`, `<0x0A>`).
    pub(crate) fn id_to_token(&self, id: u32) -> Option<String> {
        self.tokens
            .get(id as usize)
            .map(|t| String::from_utf8_lossy(t).into_owned())
    }

    /// The texts and ids of the control and unknown tokens.
    pub(crate) fn special_tokens(&self) -> Vec<(String, u32)> {
        self.whole_ids
            .iter()
            .filter(|&&i| self.types[i as usize] != token_type::USER_DEFINED)
            .map(|&i| (String::from_utf8_lossy(&self.tokens[i as usize]).into_owned(), i))
            .collect()
    }

    /// Tokenizes `text` (no BOS/EOS: the caller adds them).
    pub(crate) fn encode(&self, text: &str) -> Vec<u32> {
        self.encode_matching(text, self.whole.as_ref(), &self.whole_ids)
    }

    /// [`SpmTokenizer::encode`] with control and unknown tokens read as text (llama.cpp's
    /// `parse_special = false`: user-defined tokens are still matched).
    pub(crate) fn encode_as_text(&self, text: &str) -> Vec<u32> {
        self.encode_matching(text, self.user.as_ref(), &self.user_ids)
    }

    fn encode_matching(
        &self,
        text: &str,
        matcher: Option<&aho_corasick::AhoCorasick>,
        ids: &[u32],
    ) -> Vec<u32> {
        let mut out = Vec::new();
        // Fragments between the tokens matched whole; a space goes in front of a fragment at
        // the start and after each matched token (llama.cpp's `is_prev_special`).
        let mut prev_special = true;
        let mut at = 0;
        let piece = |frag: &str, prev_special: bool, out: &mut Vec<u32>| {
            let mut t = String::with_capacity(frag.len() + 3);
            if self.add_space_prefix && prev_special {
                t.push(' ');
            }
            t.push_str(frag);
            self.encode_piece(&t.replace(' ', SPACE), out);
        };
        if let Some(ac) = matcher {
            for m in ac.find_iter(text) {
                if m.start() > at {
                    piece(&text[at..m.start()], prev_special, &mut out);
                }
                out.push(ids[m.pattern().as_usize()]);
                prev_special = true;
                at = m.end();
            }
        }
        if at < text.len() {
            piece(&text[at..], prev_special, &mut out);
        }
        out
    }

    /// llama.cpp's `llm_tokenizer_spm_session::tokenize` of one escaped fragment.
    fn encode_piece(&self, text: &str, out: &mut Vec<u32>) {
        let bytes = text.as_bytes();
        // Symbols: one per UTF-8 character, as a doubly linked list over byte ranges.
        struct Sym {
            start: usize,
            len: usize,
            prev: isize,
            next: isize,
        }
        let mut syms: Vec<Sym> = Vec::new();
        let mut offs = 0;
        while offs < bytes.len() {
            let len = utf8_len(bytes[offs]).min(bytes.len() - offs);
            let i = syms.len() as isize;
            syms.push(Sym {
                start: offs,
                len,
                prev: i - 1,
                next: if offs + len == bytes.len() { -1 } else { i + 1 },
            });
            offs += len;
        }
        #[derive(PartialEq)]
        struct Bigram {
            score: f32,
            left: usize,
            right: usize,
            size: usize,
        }
        impl Eq for Bigram {}
        impl Ord for Bigram {
            // Highest score first; the leftmost on ties.
            fn cmp(&self, o: &Self) -> std::cmp::Ordering {
                self.score.total_cmp(&o.score).then(o.left.cmp(&self.left))
            }
        }
        impl PartialOrd for Bigram {
            fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
                Some(self.cmp(o))
            }
        }
        let mut queue = BinaryHeap::new();
        let try_add = |syms: &[Sym], left: isize, right: isize, queue: &mut BinaryHeap<Bigram>| {
            if left < 0 || right < 0 {
                return;
            }
            let (l, r) = (&syms[left as usize], &syms[right as usize]);
            let span = &bytes[l.start..r.start + r.len];
            if let Some(&id) = self.ids.get(span) {
                queue.push(Bigram {
                    score: self.scores[id as usize],
                    left: left as usize,
                    right: right as usize,
                    size: span.len(),
                });
            }
        };
        for i in 1..syms.len() {
            try_add(&syms, i as isize - 1, i as isize, &mut queue);
        }
        while let Some(b) = queue.pop() {
            let (ln, rn) = (syms[b.left].len, syms[b.right].len);
            // Skip pairs one of whose symbols has merged since.
            if ln == 0 || rn == 0 || ln + rn != b.size {
                continue;
            }
            syms[b.left].len += rn;
            syms[b.right].len = 0;
            let next = syms[b.right].next;
            syms[b.left].next = next;
            if next >= 0 {
                syms[next as usize].prev = b.left as isize;
            }
            let prev = syms[b.left].prev;
            try_add(&syms, prev, b.left as isize, &mut queue);
            try_add(&syms, b.left as isize, next, &mut queue);
        }
        let mut i: isize = if syms.is_empty() { -1 } else { 0 };
        while i >= 0 {
            let s = &syms[i as usize];
            let span = &bytes[s.start..s.start + s.len];
            match self.ids.get(span) {
                Some(&id) => out.push(id),
                None => {
                    for &b in span {
                        let single = [b];
                        let id = self.byte_ids[b as usize]
                            .or_else(|| self.ids.get(&single[..]).copied())
                            .or(self.unk);
                        out.extend(id);
                    }
                }
            }
            i = s.next;
        }
    }

    /// The bytes of `id` as llama.cpp's `token_to_piece` gives them: `▁` as space, byte
    /// tokens as their byte, control and unknown tokens only when `skip` is false.
    pub(crate) fn piece(&self, id: u32, skip: bool, out: &mut Vec<u8>) -> Result<()> {
        let t = self.tokens.get(id as usize).with_context(|| {
            format!(
                "token id {id} is out of range for the tokenizer of {} (vocabulary size {})",
                self.origin,
                self.tokens.len()
            )
        })?;
        match self.types[id as usize] {
            token_type::CONTROL | token_type::UNKNOWN if skip => {}
            token_type::CONTROL | token_type::UNKNOWN | token_type::USER_DEFINED => out.extend_from_slice(t),
            token_type::BYTE => match parse_byte_token(t) {
                Some(b) => out.push(b),
                None => out.extend_from_slice(t),
            },
            token_type::UNUSED => {}
            _ => out.extend_from_slice(String::from_utf8_lossy(t).replace(SPACE, " ").as_bytes()),
        }
        Ok(())
    }

    /// Decodes `ids`: their pieces joined, without the space the encoder put in front.
    pub(crate) fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        let mut bytes = Vec::new();
        for &id in ids {
            self.piece(id, skip_special_tokens, &mut bytes)?;
        }
        let mut text = String::from_utf8_lossy(&bytes).into_owned();
        if self.add_space_prefix && text.starts_with(' ') {
            text.remove(0);
        }
        Ok(text)
    }
}

/// Bytes of the UTF-8 sequence a lead byte starts (1 for continuation bytes), as llama.cpp's
/// `unicode_len_utf8`.
fn utf8_len(b: u8) -> usize {
    const LOOKUP: [usize; 16] = [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 3, 4];
    LOOKUP[(b >> 4) as usize]
}

/// The byte of a `<0xXX>` token.
fn parse_byte_token(t: &[u8]) -> Option<u8> {
    let s = std::str::from_utf8(t).ok()?;
    let hex = s.strip_prefix("<0x")?.strip_suffix('>')?;
    (hex.len() == 2)
        .then(|| u8::from_str_radix(hex, 16).ok())
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vocab(tokens: &[(&str, f32, i32)]) -> GgufVocab {
        GgufVocab {
            tokens: tokens.iter().map(|t| t.0.as_bytes().to_vec()).collect(),
            scores: tokens.iter().map(|t| t.1).collect(),
            types: tokens.iter().map(|t| t.2).collect(),
            model: "llama".into(),
            pre: None,
            bos: Some(1),
            eos: Some(2),
            eot: Vec::new(),
            unk: Some(0),
            add_bos: true,
            add_eos: false,
            add_space_prefix: true,
            merges: Vec::new(),
        }
    }

    #[test]
    fn spm_merges_by_score_and_falls_back_to_bytes() {
        use token_type::*;
        let mut t = vec![
            ("<unk>", 0.0, UNKNOWN),
            ("<s>", 0.0, CONTROL),
            ("</s>", 0.0, CONTROL),
        ];
        let bytes: Vec<String> = (0..256).map(|b| format!("<0x{b:02X}>")).collect();
        for b in &bytes {
            t.push((b.as_str(), 0.0, BYTE));
        }
        // ids 259.. : pieces; "▁ab" outscores "▁a" + "b" paths.
        for (p, s) in [
            ("▁", -1.0),
            ("a", -2.0),
            ("b", -3.0),
            ("▁a", -4.0),
            ("ab", -1.5),
            ("▁ab", -0.5),
        ] {
            t.push((p, s, NORMAL));
        }
        let v = vocab(&t);
        let spm = SpmTokenizer::new(&v, "test").unwrap();
        let id = |s: &str| spm.token_to_id(s).unwrap();
        assert_eq!(spm.encode("ab"), vec![id("▁ab")]);
        // 'é' is not in the vocabulary: its two UTF-8 bytes come out as byte tokens.
        assert_eq!(spm.encode("aé"), vec![id("▁a"), 3 + 0xC3, 3 + 0xA9]);
        // A control token in the text is taken whole, and a space goes in front after it.
        assert_eq!(spm.encode("a</s>b"), vec![id("▁a"), 2, id("▁"), id("b")]);
        // Read as text, the control token's text is ordinary pieces.
        assert!(!spm.encode_as_text("a</s>b").contains(&2));
        assert_eq!(spm.special_tokens().len(), 3);
        assert_eq!(spm.decode(&spm.encode("ab aé"), true).unwrap(), "ab aé");
        assert_eq!(spm.decode(&[1, id("▁ab")], false).unwrap(), "<s> ab");
        assert_eq!(spm.decode(&[1, id("▁ab")], true).unwrap(), "ab");
    }
}
