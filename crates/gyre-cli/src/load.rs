//! Opening a model path for the commands: weights (with a progress bar), tokenizer, template.

use std::path::{Path, PathBuf};

use anyhow::Result;
use gyre::chat::{BuiltinTemplate, ChatTemplate};
use gyre::loader::Checkpoint;
use gyre::models::{self, Model};
use gyre::tokenizer::Tokenizer;
use indicatif::{ProgressBar, ProgressStyle};

/// A loaded model and the files around it.
pub struct Loaded {
    pub model: Box<dyn Model>,
    dir: PathBuf,
    tokenizer: std::cell::OnceCell<Tokenizer>,
    config: Option<serde_json::Value>,
}

impl Loaded {
    /// Maps the weights and builds the model. The progress bar only draws on a terminal.
    pub fn open(path: &Path) -> Result<Loaded> {
        let bar = ProgressBar::hidden();
        let bar_started = std::cell::Cell::new(false);
        let ckpt = Checkpoint::open(path, |done, total| {
            if !bar_started.replace(true) {
                bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
                bar.set_length(total as u64);
                bar.set_style(
                    ProgressStyle::with_template("{msg} {bar:30.cyan/blue} {pos}/{len} shards")
                        .unwrap_or_else(|_| ProgressStyle::default_bar()),
                );
                bar.set_message("loading");
            }
            bar.set_position(done as u64);
        })?;
        bar.finish_and_clear();
        let model = models::load(&ckpt)?;
        Ok(Loaded {
            model,
            dir: ckpt.dir.clone(),
            tokenizer: Default::default(),
            config: ckpt.config.clone(),
        })
    }

    /// The model's tokenizer (loaded on first use).
    pub fn tokenizer(&self) -> Result<&Tokenizer> {
        if let Some(t) = self.tokenizer.get() {
            return Ok(t);
        }
        let t = Tokenizer::from_model_dir(&self.dir, self.config.as_ref())?;
        Ok(self.tokenizer.get_or_init(|| t))
    }

    /// The checkpoint's chat template, or the built-in one for its family.
    pub fn chat_template(&self) -> Result<ChatTemplate> {
        let tokenizer = self.tokenizer()?;
        match ChatTemplate::from_model_dir(&self.dir, tokenizer.specials())? {
            Some(t) => Ok(t),
            None => {
                eprintln!(
                    "note: {} has no chat template; using the built-in SOLAR-instruct format",
                    self.dir.display()
                );
                let s = tokenizer.specials();
                Ok(ChatTemplate::builtin(BuiltinTemplate::Solar)
                    .with_special_tokens(s.bos_text.as_deref(), s.eos_text.as_deref()))
            }
        }
    }
}

/// The tokenizer of a model directory (or of a weight file's directory), without the weights.
pub fn tokenizer_for(path: &Path) -> Result<Tokenizer> {
    let dir = if path.is_dir() {
        path.to_path_buf()
    } else {
        path.parent().unwrap_or(Path::new(".")).to_path_buf()
    };
    let config = gyre::loader::read_optional_json(&dir, "config.json")?;
    Tokenizer::from_model_dir(&dir, config.as_ref())
}

/// Ids that end an assistant turn: the tokenizer's EOS ids plus the end-of-turn markers of
/// the common chat formats when the vocabulary has them.
pub fn chat_stop_ids(tokenizer: &Tokenizer) -> Vec<u32> {
    let mut ids = tokenizer.specials().eos.clone();
    for marker in ["<end_of_turn>", "<|im_end|>", "<|eot_id|>", "<|end|>"] {
        if let Some(id) = tokenizer.token_to_id(marker) {
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
    }
    ids
}
