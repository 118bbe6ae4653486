//! `gyre`: the command line. Parses arguments and drives the library; no model logic here.

mod bench;
mod load;
mod serve;
mod upscale;

use std::io::{self, BufRead, IsTerminal, Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use gyre::chat::Message;
use gyre::engine::{GenerateParams, Session};
use gyre::models::{Logits, SeqInput};
use gyre::sampling::SamplingParams;
use gyre::tokenizer::Tokenizer;

use load::Loaded;

/// gyre: fast inference for RecurrentGemma, RWKV-5 and Llama-architecture models.
#[derive(Parser)]
#[command(name = "gyre", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Continue a prompt, streaming the text to stdout.
    Generate(GenerateArgs),
    /// Chat with a model through its chat template (interactive, or one message per stdin line).
    Chat(ChatArgs),
    /// Print the raw logits of every position as JSON.
    Logits(LogitsArgs),
    /// Tokenize all of stdin (verbatim) and print the ids as JSON.
    Tokenize(TokenizerArgs),
    /// Turn ids back into text.
    Detokenize(DetokenizeArgs),
    /// Describe a model: architecture, parameters, dtypes, weight and state bytes.
    Info(ModelArgs),
    /// Perplexity (and tokens/s) of a model on a text file.
    Eval(EvalArgs),
    /// Save or inspect sequence states.
    #[command(subcommand)]
    State(StateCommand),
    /// Serve an OpenAI-compatible HTTP API.
    Serve(serve::ServeArgs),
    /// Depth up-scaling: stack layer ranges of a checkpoint into a deeper one.
    Upscale(upscale::UpscaleArgs),
    /// Measure prefill and decode speed against the machine's memory bandwidth.
    Bench(bench::BenchArgs),
}

#[derive(Args)]
struct EvalArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// A UTF-8 text file.
    #[arg(long)]
    text: PathBuf,
    /// Tokens per evaluation window (each window starts from a fresh state).
    #[arg(long, default_value_t = 256)]
    window: usize,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum StateCommand {
    /// Run a prompt and save the state after it, to resume later with `--state FILE`.
    Save(StateSaveArgs),
}

#[derive(Args)]
struct StateSaveArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The prompt; read from stdin when absent.
    #[arg(long)]
    prompt: Option<String>,
    /// Where to write the state (safetensors).
    #[arg(long)]
    out: PathBuf,
    /// Start from this state file instead of a fresh state.
    #[arg(long)]
    state: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum Device {
    Cpu,
    Cuda,
}

#[derive(Args, Clone)]
pub(crate) struct ModelArgs {
    /// Model directory (config.json, weights, tokenizer) or a single weight file.
    /// `generate` and `chat` use the bundled RecurrentGemma demo when it is left out.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Where to run: `cuda` uses the first NVIDIA GPU (CUDA libraries loaded at run time).
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: Device,
    /// Worker threads for the kernels (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Quantize the weight matrices at load (int8 or 4-bit in groups of 32, an f16 scale each).
    #[arg(long, value_enum)]
    pub quant: Option<QuantArg>,
}

/// `--quant` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum QuantArg {
    Q8,
    Q4,
}

impl QuantArg {
    pub(crate) fn quant(self) -> gyre::tensor::Quant {
        match self {
            QuantArg::Q8 => gyre::tensor::Quant::Q8,
            QuantArg::Q4 => gyre::tensor::Quant::Q4,
        }
    }
}

#[derive(Args, Clone)]
struct SamplingArgs {
    /// Most tokens to generate.
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.8)]
    temperature: f32,
    /// Nucleus sampling: keep the most likely tokens up to this total probability.
    #[arg(long, default_value_t = 0.95)]
    top_p: f32,
    /// Keep only the K most likely tokens (0 = off).
    #[arg(long, default_value_t = 40)]
    top_k: usize,
    /// Drop tokens less likely than this fraction of the most likely one.
    #[arg(long, default_value_t = 0.05)]
    min_p: f32,
    /// Penalise tokens already in the prompt or output (1 = off).
    #[arg(long, default_value_t = 1.0)]
    repeat_penalty: f32,
    /// OpenAI-style presence penalty over the output.
    #[arg(long, default_value_t = 0.0)]
    presence_penalty: f32,
    /// OpenAI-style frequency penalty over the output.
    #[arg(long, default_value_t = 0.0)]
    frequency_penalty: f32,
    /// Seed for reproducible sampling.
    #[arg(long)]
    seed: Option<u64>,
    /// Stop before this string (repeatable).
    #[arg(long)]
    stop: Vec<String>,
}

impl SamplingArgs {
    fn params(&self, stop_ids: Vec<u32>, extra_stop: &[String]) -> GenerateParams {
        let mut stop = self.stop.clone();
        stop.extend(extra_stop.iter().cloned());
        GenerateParams {
            max_tokens: self.max_tokens,
            sampling: SamplingParams {
                temperature: self.temperature,
                top_k: self.top_k,
                top_p: self.top_p,
                min_p: self.min_p,
                repetition_penalty: self.repeat_penalty,
                presence_penalty: self.presence_penalty,
                frequency_penalty: self.frequency_penalty,
                seed: self.seed,
            },
            stop,
            stop_ids,
        }
    }
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The prompt; read from stdin when absent.
    #[arg(long)]
    prompt: Option<String>,
    /// Start from a saved state (`gyre state save`) or an RWKV state-tuning file.
    #[arg(long)]
    state: Option<PathBuf>,
    #[command(flatten)]
    sampling: SamplingArgs,
}

#[derive(Args)]
struct ChatArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// A system message to start the conversation with.
    #[arg(long)]
    system: Option<String>,
    /// Start every conversation from this state file (`gyre state save`, or an RWKV state).
    #[arg(long)]
    state: Option<PathBuf>,
    #[command(flatten)]
    sampling: SamplingArgs,
}

#[derive(Args)]
struct LogitsArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Comma-separated token ids, fed as one prefill.
    #[arg(long, value_delimiter = ',', required = true)]
    tokens: Vec<u32>,
    /// Feed one token at a time through the state instead.
    #[arg(long)]
    step: bool,
    /// Start from this state file.
    #[arg(long)]
    state: Option<PathBuf>,
}

#[derive(Args)]
struct TokenizerArgs {
    /// Model directory whose tokenizer to use.
    #[arg(long, conflicts_with = "tokenizer", required_unless_present = "tokenizer")]
    model: Option<PathBuf>,
    /// A tokenizer.json file, an RWKV vocab file, or `world` for the built-in RWKV World tokenizer.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
}

#[derive(Args)]
struct DetokenizeArgs {
    #[command(flatten)]
    source: TokenizerArgs,
    /// Comma-separated token ids.
    #[arg(long, value_delimiter = ',', required = true)]
    ids: Vec<u32>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// True when the reader of our stdout went away (e.g. `| head`): not an error worth reporting.
fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<io::Error>()
            .is_some_and(|io| io.kind() == io::ErrorKind::BrokenPipe)
            || c.downcast_ref::<serde_json::Error>()
                .is_some_and(|j| j.io_error_kind() == Some(io::ErrorKind::BrokenPipe))
    })
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Generate(a) => generate(a),
        Command::Chat(a) => chat(a),
        Command::Logits(a) => logits(a),
        Command::Tokenize(a) => tokenize(a),
        Command::Detokenize(a) => detokenize(a),
        Command::Info(a) => info(a),
        Command::Eval(a) => eval(a),
        Command::State(StateCommand::Save(a)) => state_save(a),
        Command::Serve(a) => serve::run(a),
        Command::Upscale(a) => upscale::run(a),
        Command::Bench(a) => bench::run(a),
    }
}

impl Device {
    pub(crate) fn target(self) -> gyre::models::Device {
        match self {
            Device::Cpu => gyre::models::Device::Cpu,
            Device::Cuda => gyre::models::Device::Cuda(0),
        }
    }
}

pub(crate) fn open(args: &ModelArgs) -> Result<Loaded> {
    if let Some(n) = args.threads {
        if n == 0 {
            bail!("--threads must be at least 1");
        }
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
            .context("cannot start the thread pool")?;
    }
    let opts = gyre::models::LoadOptions {
        quant: args.quant.map(QuantArg::quant),
        device: args.device.target(),
    };
    Loaded::open(&args.path()?, opts)
}

/// Like [`open`], but without `--model` it opens the bundled RecurrentGemma demo.
fn open_or_demo(args: &ModelArgs) -> Result<Loaded> {
    if args.model.is_some() {
        return open(args);
    }
    let demo = load::demo_model()?;
    eprintln!(
        "note: no --model given: using the bundled RecurrentGemma demo ({})",
        demo.display()
    );
    let mut with_demo = args.clone();
    with_demo.model = Some(demo);
    open(&with_demo)
}

impl ModelArgs {
    /// The `--model` path, or an error saying it is needed.
    pub(crate) fn path(&self) -> Result<PathBuf> {
        self.model
            .clone()
            .context("--model PATH is required for this command")
    }
}

fn read_stdin_text() -> Result<String> {
    let mut bytes = Vec::new();
    io::stdin().read_to_end(&mut bytes).context("cannot read stdin")?;
    String::from_utf8(bytes).map_err(|e| {
        anyhow::anyhow!(
            "stdin is not valid UTF-8 (invalid byte at offset {}); gyre reads UTF-8 text",
            e.utf8_error().valid_up_to()
        )
    })
}

fn generate(a: GenerateArgs) -> Result<()> {
    let prompt = match &a.prompt {
        Some(p) => p.clone(),
        None => read_stdin_text()?,
    };
    let loaded = open_or_demo(&a.model)?;
    let tokenizer = loaded.tokenizer()?;
    let mut session = Session::with_state(loaded.model.as_ref(), loaded.initial_state(a.state.as_deref())?);
    // A fresh sequence starts with the tokenizer's special tokens (BOS); a resumed one continues.
    let ids = tokenizer.encode(&prompt, session.is_fresh())?;
    let params = a.sampling.params(tokenizer.specials().eos.clone(), &[]);
    let mut out = io::stdout().lock();
    session.generate(&ids, &params, tokenizer, |t| {
        out.write_all(t.as_bytes())?;
        out.flush()?;
        Ok(())
    })?;
    writeln!(out)?;
    Ok(())
}

fn chat(a: ChatArgs) -> Result<()> {
    let loaded = open_or_demo(&a.model)?;
    let tokenizer = loaded.tokenizer()?;
    let chat = loaded.chat_setup()?;
    let params = a.sampling.params(chat.stop_ids.clone(), &chat.stop_strings);
    let interactive = io::stdin().is_terminal();
    let mut session = Session::with_state(loaded.model.as_ref(), loaded.initial_state(a.state.as_deref())?);
    let mut messages: Vec<Message> = Vec::new();
    let start = |messages: &mut Vec<Message>| {
        messages.clear();
        if let Some(s) = &a.system {
            messages.push(Message {
                role: "system".into(),
                content: s.clone(),
            });
        }
    };
    start(&mut messages);
    if interactive {
        eprintln!(
            "gyre chat: {} — /reset starts over, /exit quits",
            a.model.model.as_deref().unwrap_or(loaded.dir()).display()
        );
    }
    let stdin = io::stdin();
    let mut lines = stdin.lock().lines();
    loop {
        if interactive {
            eprint!("> ");
            io::stderr().flush().ok();
        }
        let Some(line) = lines.next() else { break };
        let line = line.context("stdin is not valid UTF-8")?;
        match line.trim() {
            "/exit" | "/quit" => break,
            "/reset" => {
                start(&mut messages);
                session.reset();
                if interactive {
                    eprintln!("(conversation reset)");
                }
                continue;
            }
            "" => continue,
            _ => {}
        }
        messages.push(Message {
            role: "user".into(),
            content: line,
        });
        // Message contents are text: only the template's markup makes control tokens.
        let mut ids = chat.template.tokenize(tokenizer, &messages, true)?;
        if !session.is_fresh() && ids.first().is_some_and(|&t| Some(t) == tokenizer.specials().bos) {
            ids.remove(0); // resuming a saved state: BOS is already behind us
        }
        let mut out = io::stdout().lock();
        let done = session.generate(&ids, &params, tokenizer, |t| {
            out.write_all(t.as_bytes())?;
            out.flush()?;
            Ok(())
        })?;
        writeln!(out)?;
        out.flush()?;
        messages.push(Message {
            role: "assistant".into(),
            content: done.text.trim().to_string(),
        });
    }
    Ok(())
}

fn logits(a: LogitsArgs) -> Result<()> {
    let loaded = open(&a.model)?;
    let model = loaded.model.as_ref();
    let mut state = loaded.initial_state(a.state.as_deref())?;
    let rows: Vec<Vec<f32>> = if a.step {
        let mut rows = Vec::with_capacity(a.tokens.len());
        for t in &a.tokens {
            let mut out = model.forward(
                &mut [SeqInput {
                    tokens: std::slice::from_ref(t),
                    state: &mut state,
                }],
                Logits::Last,
            )?;
            rows.push(out.pop().unwrap_or_default());
        }
        rows
    } else {
        let all = model
            .forward(
                &mut [SeqInput {
                    tokens: &a.tokens,
                    state: &mut state,
                }],
                Logits::All,
            )?
            .pop()
            .unwrap_or_default();
        all.chunks(model.info().vocab_size).map(<[f32]>::to_vec).collect()
    };
    for (i, row) in rows.iter().enumerate() {
        gyre::models::check_finite_logits(row, i)?;
    }
    let mut out = io::stdout().lock();
    serde_json::to_writer(&mut out, &serde_json::json!({ "logits": rows }))?;
    writeln!(out)?;
    Ok(())
}

fn open_tokenizer(a: &TokenizerArgs) -> Result<Tokenizer> {
    match (&a.model, &a.tokenizer) {
        (Some(dir), _) => load::tokenizer_for(dir),
        (None, Some(file)) if file.as_os_str() == "world" => Tokenizer::from_name("world"),
        (None, Some(file)) => Tokenizer::from_file(file),
        (None, None) => bail!("give --model PATH or --tokenizer FILE"),
    }
}

fn tokenize(a: TokenizerArgs) -> Result<()> {
    let tokenizer = open_tokenizer(&a)?;
    let text = read_stdin_text()?;
    let ids = tokenizer.encode(&text, false)?;
    println!("{}", serde_json::json!({ "ids": ids }));
    Ok(())
}

fn detokenize(a: DetokenizeArgs) -> Result<()> {
    let tokenizer = open_tokenizer(&a.source)?;
    let text = tokenizer.decode(&a.ids, false)?;
    let mut out = io::stdout().lock();
    out.write_all(text.as_bytes())?;
    writeln!(out)?;
    Ok(())
}

fn info(a: ModelArgs) -> Result<()> {
    let loaded = open(&a)?;
    let info = loaded.model.info();
    let gib = |b: usize| b as f64 / (1u64 << 30) as f64;
    let dtypes: Vec<&str> = info.dtypes.iter().map(|d| d.name()).collect();
    println!("model:        {}", a.path()?.display());
    println!("architecture: {}", info.arch.name());
    println!("layers:       {}", info.n_layers);
    println!("hidden size:  {}", info.hidden_size);
    println!("vocab size:   {}", info.vocab_size);
    println!(
        "parameters:   {} ({:.3} B)",
        info.params,
        info.params as f64 / 1e9
    );
    println!("dtypes:       {}", dtypes.join(", "));
    let formats: Vec<String> = loaded.formats.iter().map(|(f, n)| format!("{f} ×{n}")).collect();
    println!("tensors:      {}", formats.join(", "));
    println!(
        "weights:      {} bytes ({:.3} GiB)",
        info.weight_bytes,
        gib(info.weight_bytes)
    );
    match info.context_length {
        Some(c) => println!("context:      {c} tokens"),
        None => println!("context:      unbounded (fixed-size state)"),
    }
    for n in [1024, 8192, 32768] {
        let b = loaded.model.state_bytes(n);
        println!(
            "state @ {:>5}: {b} bytes ({:.1} MiB) per sequence",
            n,
            b as f64 / (1 << 20) as f64
        );
    }
    Ok(())
}

fn state_save(a: StateSaveArgs) -> Result<()> {
    // Only an earlier state file may be overwritten: never the model's weights or anything else.
    if a.out.exists() && !gyre::loader::state_file::is_state_file(&a.out) {
        bail!(
            "{} exists and is not a gyre state file; refusing to overwrite it (choose another --out, \
             or remove the file)",
            a.out.display()
        );
    }
    let prompt = match &a.prompt {
        Some(p) => p.clone(),
        None => read_stdin_text()?,
    };
    let loaded = open(&a.model)?;
    let tokenizer = loaded.tokenizer()?;
    let mut session = Session::with_state(loaded.model.as_ref(), loaded.initial_state(a.state.as_deref())?);
    let ids = tokenizer.encode(&prompt, session.is_fresh())?;
    if ids.is_empty() {
        bail!("the prompt is empty: there is nothing to save a state after");
    }
    session.feed(&ids)?;
    let info = loaded.model.info();
    gyre::loader::state_file::save(&a.out, session.state(), info.arch.name(), &info.fingerprint)?;
    eprintln!(
        "saved the state after {} tokens ({} bytes of state) to {}",
        session.state().tokens_seen(),
        session.state().bytes(),
        a.out.display()
    );
    Ok(())
}

fn eval(a: EvalArgs) -> Result<()> {
    let text = std::fs::read(&a.text).with_context(|| format!("cannot read {}", a.text.display()))?;
    let text = String::from_utf8(text).map_err(|e| {
        anyhow::anyhow!(
            "{} is not valid UTF-8 (invalid byte at offset {})",
            a.text.display(),
            e.utf8_error().valid_up_to()
        )
    })?;
    let loaded = open(&a.model)?;
    let tokenizer = loaded.tokenizer()?;
    let ids = tokenizer.encode(&text, false)?;
    let bos = tokenizer.specials().bos.filter(|_| tokenizer.specials().add_bos);
    let r = gyre::engine::eval::perplexity(loaded.model.as_ref(), &ids, a.window, bos)?;
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!("text:        {} ({} tokens)", a.text.display(), ids.len());
        println!("scored:      {} tokens in windows of {}", r.scored, a.window);
        println!("mean NLL:    {:.5} nats/token", r.mean_nll);
        println!("perplexity:  {:.4}", r.perplexity);
        println!("speed:       {:.1} tokens/s (prefill)", r.tokens_per_s);
    }
    Ok(())
}
