//! Opening a model path for the commands: weights (with a progress bar), tokenizer, template.

use std::path::{Path, PathBuf};

use anyhow::Result;
use gyre::chat::{BuiltinTemplate, ChatTemplate};
use gyre::loader::Checkpoint;
use gyre::models::{self, Arch, Model};
use gyre::state::State;
use gyre::tokenizer::Tokenizer;
use indicatif::{ProgressBar, ProgressStyle};

/// A loaded model and the files around it.
pub struct Loaded {
    pub model: Box<dyn Model>,
    dir: PathBuf,
    tokenizer: std::cell::OnceCell<std::sync::Arc<Tokenizer>>,
    config: Option<serde_json::Value>,
    /// The GGUF file the model came from: its metadata holds the tokenizer and template.
    gguf: Option<std::sync::Arc<gyre::loader::gguf::GgufFile>>,
    /// Storage formats of the checkpoint's tensors and their counts (`gyre info`).
    pub formats: Vec<(String, usize)>,
}

impl Loaded {
    /// Maps the weights and builds the model. The progress bar only draws on a terminal.
    pub fn open(path: &Path, opts: models::LoadOptions) -> Result<Loaded> {
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
        // Building the model can take a while too (quantizing, or copying the weights to a
        // GPU): a spinner on terminals, nothing when stderr is piped.
        let spinner = ProgressBar::new_spinner();
        spinner.set_message(match opts.device {
            models::Device::Cuda(_) => format!(
                "copying {:.2} GB of weights to the GPU",
                ckpt.summary().1 as f64 / 1e9
            ),
            models::Device::Cpu if opts.quant.is_some() => "quantizing the weights".to_string(),
            models::Device::Cpu => "building the model".to_string(),
        });
        spinner.enable_steady_tick(std::time::Duration::from_millis(120));
        let model = models::load_with(&ckpt, opts);
        spinner.finish_and_clear();
        let model = model?;
        let unused = ckpt.unused();
        if !unused.is_empty() {
            let shown: Vec<&str> = unused.iter().take(4).map(String::as_str).collect();
            eprintln!(
                "warning: {} of the {} tensors in {} are not used by the model ({}{}): does {} declare \
                 fewer layers than the file holds?",
                unused.len(),
                ckpt.names().count(),
                ckpt.source,
                shown.join(", "),
                if unused.len() > shown.len() { ", …" } else { "" },
                ckpt.config_source
            );
        }
        Ok(Loaded {
            model,
            dir: ckpt.dir.clone(),
            tokenizer: Default::default(),
            config: ckpt.config.clone(),
            gguf: ckpt.gguf.clone(),
            formats: ckpt.tensor_formats(),
        })
    }

    /// The model's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The model's tokenizer (loaded on first use): the directory's tokenizer.json, or the
    /// built-in World tokenizer for RWKV checkpoints of vocabulary 65536 that come without one.
    pub fn tokenizer(&self) -> Result<&Tokenizer> {
        Ok(self.shared_tokenizer()?)
    }

    /// [`Loaded::tokenizer`], shareable with other threads (the server's engine).
    pub fn shared_tokenizer(&self) -> Result<&std::sync::Arc<Tokenizer>> {
        if let Some(t) = self.tokenizer.get() {
            return Ok(t);
        }
        let info = self.model.info();
        let world = info.arch == Arch::Rwkv5 && !self.dir.join("tokenizer.json").exists();
        let t = if let Some(g) = &self.gguf {
            Tokenizer::from_gguf(g)?
        } else if world {
            if info.vocab_size != 65536 {
                anyhow::bail!(
                    "{}: this RWKV model has a vocabulary of {} tokens and no tokenizer.json; the \
                     built-in World tokenizer fits vocabulary 65536 only",
                    self.dir.display(),
                    info.vocab_size
                );
            }
            Tokenizer::world()
        } else {
            Tokenizer::from_model_dir(&self.dir, self.config.as_ref())?
        };
        // Special tokens must be ids the model has.
        let vocab = info.vocab_size;
        let specials = t.specials();
        for (what, id) in specials
            .eos
            .iter()
            .map(|&e| ("eos_token_id", e))
            .chain(specials.bos.map(|b| ("bos_token_id", b)))
        {
            if id as usize >= vocab {
                anyhow::bail!(
                    "{}: {what} {id} is outside the model's vocabulary of {vocab} tokens (check config.json, \
                     generation_config.json and tokenizer_config.json)",
                    self.dir.display()
                );
            }
        }
        Ok(self.tokenizer.get_or_init(|| std::sync::Arc::new(t)))
    }

    /// The state a sequence starts from: fresh, or loaded from `state_file`.
    pub fn initial_state(&self, state_file: Option<&Path>) -> Result<State> {
        let fresh = self.model.new_state();
        match state_file {
            None => Ok(fresh),
            Some(path) => {
                let info = self.model.info();
                gyre::loader::state_file::load(path, fresh, info.arch.name(), &info.fingerprint)
            }
        }
    }

    /// The chat template (the checkpoint's, else the family's built-in one) and stop rules.
    pub fn chat_setup(&self) -> Result<ChatSetup> {
        let tokenizer = self.tokenizer()?;
        let arch = self.model.info().arch;
        let builtin = match arch {
            Arch::Llama | Arch::Mistral => (BuiltinTemplate::Solar, "SOLAR-instruct"),
            Arch::RecurrentGemma => (BuiltinTemplate::Gemma, "Gemma"),
            Arch::Rwkv5 => (BuiltinTemplate::Rwkv, "RWKV World (User:/Assistant:)"),
        };
        let found = match &self.gguf {
            Some(g) => ChatTemplate::from_gguf(g, tokenizer.specials())?,
            None => ChatTemplate::from_model_dir(&self.dir, tokenizer.specials())?,
        };
        let shown = match &self.gguf {
            Some(g) => g.path.display().to_string(),
            None => self.dir.display().to_string(),
        };
        let template = match found {
            Some(t) => t,
            None => {
                if arch != Arch::Rwkv5 {
                    eprintln!(
                        "note: {shown} has no chat template; using the built-in {} format",
                        builtin.1
                    );
                }
                let s = tokenizer.specials();
                ChatTemplate::builtin(builtin.0)
                    .with_special_tokens(s.bos_text.as_deref(), s.eos_text.as_deref())
            }
        };
        // RWKV World chat ends a turn with a blank line (ChatRWKV stops on "\n\n").
        let stop_strings = if arch == Arch::Rwkv5 {
            vec!["\n\n".to_string()]
        } else {
            Vec::new()
        };
        Ok(ChatSetup {
            template,
            stop_ids: chat_stop_ids(tokenizer),
            stop_strings,
        })
    }
}

/// How to chat with a model.
pub struct ChatSetup {
    pub template: ChatTemplate,
    /// Ids that end the assistant's turn.
    pub stop_ids: Vec<u32>,
    /// Strings that end the assistant's turn.
    pub stop_strings: Vec<String>,
}

/// The tokenizer of a model directory (or of a weight file's directory), without the weights.
pub fn tokenizer_for(path: &Path) -> Result<Tokenizer> {
    if let Some(file) = gyre::loader::gguf_in(path)? {
        return Tokenizer::from_gguf(&gyre::loader::gguf::GgufFile::open(&file)?);
    }
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

/// Where the bundled RecurrentGemma demo lives: `$GYRE_DEMO_MODEL`, else `models/` next to the
/// binary's install prefix, else the source tree the binary was built from.
pub fn demo_model() -> Result<PathBuf> {
    const NAME: &str = "models/demo-recurrentgemma";
    let mut tried = Vec::new();
    if let Some(p) = std::env::var_os("GYRE_DEMO_MODEL") {
        tried.push(PathBuf::from(p));
    }
    if let Ok(exe) = std::env::current_exe() {
        for up in exe.ancestors().skip(1).take(3) {
            tried.push(up.join(NAME));
        }
    }
    tried.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").join(NAME));
    match tried.iter().find(|p| p.join("config.json").exists()) {
        Some(p) => Ok(p.clone()),
        None => anyhow::bail!(
            "no --model given and the bundled demo model was not found (looked in {}); pass --model PATH",
            tried
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}
