//! The Hugging Face `tokenizer.json` backend: a thin wrapper over the `tokenizers` crate.
//!
//! It owns loading the file, encoding, decoding and vocabulary look-ups, and works out what the
//! file's post-processor adds around a sequence (the BOS that Llama and Gemma prepend). It knows
//! nothing of `tokenizer_config.json` or the model's configs: resolving special tokens from those
//! belongs to the parent module.

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};

/// A `tokenizer.json` loaded through the `tokenizers` crate.
pub(crate) struct HfTokenizer {
    /// The loaded tokenizer (model, normalizer, pre-tokenizer, post-processor, decoder).
    inner: tokenizers::Tokenizer,
    /// Size of the id space: the model's vocabulary plus added tokens past its end.
    vocab_size: usize,
    /// The id the post-processor prepends to a single sequence, when it prepends exactly one.
    post_processor_bos: Option<u32>,
    /// Where the tokenizer came from, for error messages.
    origin: String,
    /// A copy that reads special tokens as text (made on first use).
    plain: std::sync::OnceLock<Box<tokenizers::Tokenizer>>,
}

impl HfTokenizer {
    /// Loads a `tokenizer.json` file.
    pub(crate) fn from_file(path: &Path) -> Result<Self> {
        let origin = path.display().to_string();
        let bytes = std::fs::read(path).with_context(|| format!("reading tokenizer file {origin}"))?;
        Self::from_bytes(&bytes, origin)
    }

    /// Loads a `tokenizer.json` held in memory; `origin` names it in messages.
    pub(crate) fn from_bytes(bytes: &[u8], origin: String) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_bytes(bytes)
            .map_err(|e| anyhow!("parsing tokenizer file {origin}: {e}"))?;
        let model_size = inner.get_vocab_size(false);
        let added_end = inner
            .get_added_tokens_decoder()
            .keys()
            .map(|&id| id as usize + 1)
            .max()
            .unwrap_or(0);
        let mut tok = HfTokenizer {
            inner,
            vocab_size: model_size.max(added_end),
            post_processor_bos: None,
            origin,
            plain: Default::default(),
        };
        tok.post_processor_bos = tok.detect_post_processor_bos()?;
        Ok(tok)
    }

    /// Finds the single id that the post-processor puts in front of a sequence, if any.
    fn detect_post_processor_bos(&self) -> Result<Option<u32>> {
        let plain = self.encode("a", false)?;
        let with = self.encode("a", true)?;
        if with.len() > plain.len() && with.len() >= 2 && with[1..].starts_with(&plain) {
            Ok(Some(with[0]))
        } else {
            Ok(None)
        }
    }

    /// The id the post-processor prepends when special tokens are added, if any.
    pub(crate) fn post_processor_bos(&self) -> Option<u32> {
        self.post_processor_bos
    }

    /// Encodes `text`; `add_special_tokens` runs the post-processor (BOS/EOS insertion).
    pub(crate) fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode_fast(text, add_special_tokens)
            .map_err(|e| anyhow!("encoding with tokenizer {}: {e}", self.origin))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Decodes `ids`; every id must exist in the vocabulary.
    pub(crate) fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        for &id in ids {
            if id as usize >= self.vocab_size || self.inner.id_to_token(id).is_none() {
                bail!(
                    "token id {id} is out of range for tokenizer {} (vocabulary size {})",
                    self.origin,
                    self.vocab_size
                );
            }
        }
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| anyhow!("decoding with tokenizer {}: {e}", self.origin))
    }

    /// Encodes `text` with special tokens taken as plain text (a control token's text in it
    /// becomes ordinary pieces); non-special added tokens are still matched.
    pub(crate) fn encode_as_text(&self, text: &str) -> Result<Vec<u32>> {
        let plain = self.plain.get_or_init(|| {
            let mut t = self.inner.clone();
            t.set_encode_special_tokens(true);
            Box::new(t)
        });
        let enc = plain
            .encode_fast(text, false)
            .map_err(|e| anyhow!("encoding with tokenizer {}: {e}", self.origin))?;
        Ok(enc.get_ids().to_vec())
    }

    /// The texts and ids of the special added tokens.
    pub(crate) fn special_tokens(&self) -> Vec<(String, u32)> {
        self.inner
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, t)| t.special && !t.content.is_empty())
            .map(|(id, t)| (t.content, id))
            .collect()
    }

    /// Size of the id space (model vocabulary plus added tokens).
    pub(crate) fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// The id of a token string (vocabulary entry or added token).
    pub(crate) fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The token string of an id, as stored in the vocabulary (e.g. `▁Hello`, `<0xE4>`).
    pub(crate) fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }
}
