//! Depth up-scaling (DUS): stack layer ranges of one checkpoint into a deeper checkpoint.
//!
//! SOLAR-10.7B (Kim et al. 2023, "SOLAR 10.7B: Scaling Large Language Models with Simple yet
//! Effective Depth Up-Scaling") was made this way: two copies of a 32-layer model, the last 8
//! layers of one and the first 8 of the other removed, stacked into 48 layers. The semantics
//! follow mergekit's `passthrough` merge (`mergekit/plan.py`, summarised in MODELS.md C.5):
//! ranges are half-open, output layers are the concatenation of the slices renumbered from 0,
//! the embedding comes from the first slice's source and the final norm and head from the last
//! slice's source. Unlike mergekit this also knows RecurrentGemma (per-layer `block_types`) and
//! RWKV (`blocks.N`, with `ln0` belonging to the embedding and kept in block 0).
//!
//! This module owns the layer plan, the per-family naming table, the `config.json` rewrite and
//! a streaming safetensors writer: tensors are copied one at a time from the memory-mapped
//! source (converted chunk by chunk when a dtype is asked for), so the process holds about one
//! fixed-size chunk of anonymous memory whatever the model's size (the input pages it touches
//! are file-backed page cache: they show in RSS but not in RssAnon, and the kernel reclaims
//! them; `crates/gyre-cli/tests/upscale_cli.rs` measures RssAnon at ~1–2 MiB for a 140 MB
//! model). The loader's own exceptions still apply: a tensor stored misaligned for its dtype
//! or non-contiguous in a `.pth` is copied into memory when the checkpoint is opened. This
//! module never interprets weights and never touches the model code.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use half::{bf16, f16};
use serde_json::{json, Map, Value};

use crate::loader::config::GriffinConfig;
use crate::loader::Checkpoint;
use crate::models::{self, Arch};
use crate::tensor::{DType, Tensor, TensorData};

/// Files beside the weights that are copied to the output unchanged when they exist.
pub const SIDE_FILES: [&str; 10] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
];

/// Default largest shard: 5 GB, as transformers' `save_pretrained`.
pub const DEFAULT_SHARD_SIZE: u64 = 5_000_000_000;

/// Elements converted per chunk when the output dtype differs from the stored one.
const CONVERT_CHUNK: usize = 1 << 16;

/// Bytes written per call when copying unchanged (sets the progress granularity).
const COPY_CHUNK: usize = 4 << 20;

/// How `config.json` records the depth of a family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DepthConfig {
    /// `num_hidden_layers` (Llama, Mistral).
    NumHiddenLayers,
    /// `num_hidden_layers` plus a per-layer `block_types` list (RecurrentGemma).
    NumHiddenLayersAndBlockTypes,
    /// The depth is the number of `blocks.N` in the weights (RWKV: no config.json).
    FromTensors,
}

/// Everything up-scaling needs to know about one model family's tensor names.
#[derive(Debug)]
pub struct FamilyTable {
    /// For messages.
    pub name: &'static str,
    /// Per-layer tensors are named `{layer_prefix}{i}.{rest}`.
    pub layer_prefix: &'static str,
    /// Non-layer tensor prefixes of the input end: copied from the first slice's source.
    pub embedding: &'static [&'static str],
    /// Tensors under layer 0 (`rest` prefixes) that belong to the embedding: they stay in
    /// output layer 0, from the first slice's source, and are never copied with layer 0.
    pub embedding_in_layer0: &'static [&'static str],
    /// Non-layer tensor prefixes of the output end (final norm, head): from the last slice's source.
    pub head: &'static [&'static str],
    depth: DepthConfig,
}

/// Llama and Mistral (transformers names; MODELS.md C.2).
const LLAMA: FamilyTable = FamilyTable {
    name: "Llama/Mistral",
    layer_prefix: "model.layers.",
    embedding: &["model.embed_tokens."],
    embedding_in_layer0: &[],
    head: &["model.norm.", "lm_head."],
    depth: DepthConfig::NumHiddenLayers,
};

/// RecurrentGemma (transformers names; MODELS.md A.9). `lm_head` is usually tied and absent.
const RECURRENT_GEMMA: FamilyTable = FamilyTable {
    name: "RecurrentGemma",
    layer_prefix: "model.layers.",
    embedding: &["model.embed_tokens."],
    embedding_in_layer0: &[],
    head: &["model.final_norm.", "lm_head."],
    depth: DepthConfig::NumHiddenLayersAndBlockTypes,
};

/// RWKV-5 (ChatRWKV names; MODELS.md B.1): `blocks.0.ln0` normalises the embedding.
const RWKV: FamilyTable = FamilyTable {
    name: "RWKV",
    layer_prefix: "blocks.",
    embedding: &["emb."],
    embedding_in_layer0: &["ln0."],
    head: &["ln_out.", "head."],
    depth: DepthConfig::FromTensors,
};

/// The naming table of an architecture.
pub fn family_table(arch: Arch) -> &'static FamilyTable {
    match arch {
        Arch::Llama | Arch::Mistral => &LLAMA,
        Arch::RecurrentGemma => &RECURRENT_GEMMA,
        Arch::Rwkv5 => &RWKV,
    }
}

/// Parses `--layers`: comma-separated half-open ranges `START..END`, checked against `n` layers.
pub fn parse_layers(spec: &str, n: usize) -> Result<Vec<Range<usize>>> {
    if spec.trim().is_empty() {
        bail!("the layer list is empty; give half-open ranges such as 0..24,8..32");
    }
    let mut out = Vec::new();
    for part in spec.split(',') {
        let part = part.trim();
        let Some((a, b)) = part.split_once("..") else {
            bail!("'{part}' is not a layer range; write START..END (half-open), e.g. 0..24");
        };
        let num = |s: &str| -> Result<usize> {
            s.trim().parse::<usize>().with_context(|| {
                format!("'{part}': '{s}' is not a layer number; write START..END (half-open), e.g. 0..24")
            })
        };
        let (start, end) = (num(a)?, num(b)?);
        if start >= end {
            bail!(
                "layer range {start}..{end} is empty: ranges are half-open, so START must be below END \
                 (e.g. {start}..{})",
                start + 1
            );
        }
        if end > n {
            bail!(
                "layer range {start}..{end} ends past the source's {n} layers; layers are numbered \
                 0..{n} (half-open)"
            );
        }
        out.push(start..end);
    }
    Ok(out)
}

/// The SOLAR recipe for `n` layers: with `m = n/4`, layers `0..n-m` then `m..n`.
pub fn solar_plan(n: usize) -> Result<Vec<Range<usize>>> {
    let m = n / 4;
    if m == 0 {
        bail!("the SOLAR recipe drops n/4 layers from each copy; a {n}-layer model needs at least 4 layers (use --layers)");
    }
    Ok(vec![0..n - m, m..n])
}

/// Parses a size such as `5GB`, `500MB`, `2GiB` or `1000000` (bytes). KB/MB/GB are decimal
/// (as transformers' `max_shard_size`), KiB/MiB/GiB binary.
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let mult: u64 = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "KB" | "K" => 1_000,
        "MB" | "M" => 1_000_000,
        "GB" | "G" => 1_000_000_000,
        "TB" | "T" => 1_000_000_000_000,
        "KIB" => 1 << 10,
        "MIB" => 1 << 20,
        "GIB" => 1 << 30,
        "TIB" => 1 << 40,
        _ => bail!("size '{s}': unknown unit '{unit}'; use B, KB, MB, GB (or KiB, MiB, GiB), e.g. 2GB"),
    };
    let value: f64 = num
        .parse()
        .ok()
        .filter(|v: &f64| v.is_finite())
        .with_context(|| format!("size '{s}' does not start with a number; write e.g. 2GB or 500MB"))?;
    let bytes = (value * mult as f64).round();
    if bytes < 1.0 {
        bail!("size '{s}' must be at least one byte");
    }
    Ok(bytes as u64)
}

/// Where an output tensor comes from. `slice` indexes [`Plan::slices`]; with one source
/// model every slice reads the same checkpoint, but the rule is kept explicit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    /// Input end (embedding, RWKV `ln0`): the first slice's source.
    Embedding { slice: usize },
    /// Output layer `layer` is source layer `source_layer` of slice `slice`.
    Layer {
        slice: usize,
        source_layer: usize,
        layer: usize,
    },
    /// Output end (final norm, head): the last slice's source.
    Head { slice: usize },
}

/// One output tensor and the source tensor it is copied from.
#[derive(Clone, Debug)]
pub struct PlannedTensor {
    /// Name in the output checkpoint.
    pub name: String,
    /// Name in the source checkpoint.
    pub source: String,
    pub origin: Origin,
}

/// The complete up-scaling plan: which source tensor becomes which output tensor.
#[derive(Clone, Debug)]
pub struct Plan {
    pub arch: Arch,
    /// Layers of the source.
    pub source_layers: usize,
    /// The slices, in output order.
    pub slices: Vec<Range<usize>>,
    /// Output layer i is source layer `layer_map[i]`.
    pub layer_map: Vec<usize>,
    /// Every output tensor, in the order it is written.
    pub tensors: Vec<PlannedTensor>,
    /// The rewritten `config.json` (None when the source has none).
    pub config: Option<Value>,
}

impl Plan {
    /// Layers of the output.
    pub fn layers(&self) -> usize {
        self.layer_map.len()
    }
}

/// Splits `{prefix}{i}.{rest}` into (i, rest).
fn split_layer<'a>(name: &'a str, prefix: &str) -> Option<(usize, &'a str)> {
    let tail = name.strip_prefix(prefix)?;
    let (idx, rest) = tail.split_once('.')?;
    if idx.is_empty() || !idx.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((idx.parse().ok()?, rest))
}

/// The source's layer count, from config.json or (RWKV) from the tensor names.
pub fn source_layers(ckpt: &Checkpoint) -> Result<usize> {
    let arch = models::detect(ckpt)?;
    let table = family_table(arch);
    let max_index = ckpt
        .names()
        .filter_map(|n| split_layer(n, table.layer_prefix).map(|(i, _)| i))
        .max();
    match table.depth {
        DepthConfig::FromTensors => Ok(max_index.map_or(0, |i| i + 1)),
        DepthConfig::NumHiddenLayers | DepthConfig::NumHiddenLayersAndBlockTypes => {
            let n = ckpt
                .config()?
                .get("num_hidden_layers")
                .and_then(Value::as_u64)
                .with_context(|| format!("{}/config.json has no num_hidden_layers", ckpt.dir.display()))?
                as usize;
            if let Some(i) = max_index.filter(|&i| i >= n) {
                bail!(
                    "{} has tensors for layer {i}, but config.json says num_hidden_layers = {n}",
                    ckpt.source
                );
            }
            Ok(n)
        }
    }
}

/// Plans the up-scaled checkpoint: the slices' layers in order, renumbered from 0, with the
/// embedding from the first slice's source and the head from the last's.
pub fn plan(ckpt: &Checkpoint, slices: &[Range<usize>]) -> Result<Plan> {
    let arch = models::detect(ckpt)?;
    let table = family_table(arch);
    let n = source_layers(ckpt)?;
    if slices.is_empty() {
        bail!("no layer ranges to stack");
    }
    for r in slices {
        if r.start >= r.end || r.end > n {
            bail!(
                "layer range {}..{} does not fit the source's {n} layers (half-open, 0..{n})",
                r.start,
                r.end
            );
        }
    }

    // Sort every tensor into embedding / per-layer / head, refusing names the table doesn't know.
    let mut per_layer: Vec<Vec<&str>> = vec![Vec::new(); n];
    let (mut embedding, mut head) = (Vec::new(), Vec::new());
    for name in ckpt.names() {
        if let Some((i, rest)) = split_layer(name, table.layer_prefix) {
            if i == 0 && table.embedding_in_layer0.iter().any(|p| rest.starts_with(p)) {
                embedding.push(name.to_string());
            } else {
                per_layer[i].push(rest);
            }
        } else if table.embedding.iter().any(|p| name.starts_with(p)) {
            embedding.push(name.to_string());
        } else if table.head.iter().any(|p| name.starts_with(p)) {
            head.push(name.to_string());
        } else {
            bail!(
                "{}: tensor '{name}' is neither a layer tensor ({}N.…) nor a known embedding or head \
                 tensor of a {} model; gyre upscale does not know where it belongs",
                ckpt.source,
                table.layer_prefix,
                table.name
            );
        }
    }
    if let Some(i) = per_layer.iter().position(Vec::is_empty) {
        bail!("{} has no tensors for layer {i} of {n}", ckpt.source);
    }

    let last = slices.len() - 1;
    let mut tensors: Vec<PlannedTensor> = embedding
        .into_iter()
        .map(|name| PlannedTensor {
            source: name.clone(),
            name,
            origin: Origin::Embedding { slice: 0 },
        })
        .collect();
    let mut layer_map = Vec::new();
    for (s, range) in slices.iter().enumerate() {
        for src in range.clone() {
            let out = layer_map.len();
            layer_map.push(src);
            for rest in &per_layer[src] {
                tensors.push(PlannedTensor {
                    name: format!("{}{out}.{rest}", table.layer_prefix),
                    source: format!("{}{src}.{rest}", table.layer_prefix),
                    origin: Origin::Layer {
                        slice: s,
                        source_layer: src,
                        layer: out,
                    },
                });
            }
        }
    }
    tensors.extend(head.into_iter().map(|name| PlannedTensor {
        source: name.clone(),
        name,
        origin: Origin::Head { slice: last },
    }));

    let config = match &ckpt.config {
        None => None,
        Some(cfg) => Some(rewrite_config(ckpt, cfg, table, &layer_map)?),
    };
    Ok(Plan {
        arch,
        source_layers: n,
        slices: slices.to_vec(),
        layer_map,
        tensors,
        config,
    })
}

/// The source config with the new depth (and, for RecurrentGemma, every copied layer's own type).
fn rewrite_config(ckpt: &Checkpoint, cfg: &Value, table: &FamilyTable, layer_map: &[usize]) -> Result<Value> {
    let mut out = cfg.clone();
    let source = format!("{}/config.json", ckpt.dir.display());
    let obj = out
        .as_object_mut()
        .with_context(|| format!("{source} is not a JSON object"))?;
    let depth = json!(layer_map.len());
    match table.depth {
        DepthConfig::NumHiddenLayers => {
            obj.insert("num_hidden_layers".into(), depth);
        }
        DepthConfig::NumHiddenLayersAndBlockTypes => {
            let griffin = GriffinConfig::from_value(cfg, &source)?;
            let types: Vec<Value> = layer_map
                .iter()
                .map(|&src| json!(griffin.block_types[src % griffin.block_types.len()]))
                .collect();
            obj.insert("num_hidden_layers".into(), depth);
            // transformers before v4.40 reads `_block_types`: keep both spellings in step.
            if obj.contains_key("_block_types") {
                obj.insert("_block_types".into(), Value::Array(types.clone()));
            }
            obj.insert("block_types".into(), Value::Array(types));
        }
        DepthConfig::FromTensors => {
            for key in ["num_hidden_layers", "n_layer"] {
                if obj.contains_key(key) {
                    obj.insert(key.into(), depth.clone());
                }
            }
        }
    }
    Ok(out)
}

/// Where and how to write the output.
#[derive(Clone, Debug)]
pub struct OutOptions {
    /// Output directory; created when missing.
    pub dir: PathBuf,
    /// Largest shard in bytes (a tensor larger than this gets a shard of its own).
    pub shard_size: u64,
    /// Convert every tensor to this dtype while copying (round-to-nearest-even).
    pub dtype: Option<DType>,
    /// Write into a non-empty directory (stale weight files there are removed).
    pub force: bool,
}

/// What [`run`] wrote.
#[derive(Clone, Debug)]
pub struct Report {
    /// Layers of the output.
    pub layers: usize,
    /// Tensors written.
    pub tensors: usize,
    /// Shard file names, in order.
    pub shards: Vec<String>,
    /// Bytes of tensor data written.
    pub bytes: u64,
    /// Tokenizer / template files copied.
    pub copied: Vec<String>,
}

/// The safetensors name of a dtype.
fn st_dtype(d: DType) -> &'static str {
    match d {
        DType::F32 => "F32",
        DType::F16 => "F16",
        DType::BF16 => "BF16",
    }
}

/// The `config.json` name of a dtype.
fn torch_dtype(d: DType) -> &'static str {
    match d {
        DType::F32 => "float32",
        DType::F16 => "float16",
        DType::BF16 => "bfloat16",
    }
}

/// True for the weight files an earlier run (or another tool) leaves: they would shadow or
/// confuse the new index.
fn is_weight_file(name: &str) -> bool {
    name == "model.safetensors"
        || name == "model.safetensors.index.json"
        || (name.starts_with("model-") && name.ends_with(".safetensors"))
}

fn prepare_out_dir(opts: &OutOptions, source_dir: &Path) -> Result<()> {
    let dir = &opts.dir;
    if dir.exists() {
        if !dir.is_dir() {
            bail!("output path {} exists and is not a directory", dir.display());
        }
        let same = match (dir.canonicalize(), source_dir.canonicalize()) {
            (Ok(a), Ok(b)) => a == b,
            _ => false,
        };
        if same {
            bail!(
                "output directory {} is the source model's directory; choose another one",
                dir.display()
            );
        }
        let entries: Vec<String> = std::fs::read_dir(dir)
            .with_context(|| format!("cannot list {}", dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect();
        if !entries.is_empty() {
            if !opts.force {
                bail!(
                    "output directory {} is not empty ({} entries); choose a new or empty directory, \
                     or pass --force to write into it",
                    dir.display(),
                    entries.len()
                );
            }
            for name in entries.iter().filter(|n| is_weight_file(n)) {
                let p = dir.join(name);
                std::fs::remove_file(&p).with_context(|| format!("cannot remove stale {}", p.display()))?;
            }
        }
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))
}

/// One planned tensor with its source and output dtype resolved.
struct Item<'a> {
    planned: &'a PlannedTensor,
    tensor: &'a Tensor,
    dtype: DType,
}

impl Item<'_> {
    fn nbytes(&self) -> u64 {
        (self.tensor.numel() * self.dtype.size()) as u64
    }
}

/// Groups items into shards of at most `limit` bytes, in order.
fn assign_shards(items: &[Item<'_>], limit: u64) -> Vec<Range<usize>> {
    let mut shards = Vec::new();
    let (mut start, mut size) = (0, 0u64);
    for (i, it) in items.iter().enumerate() {
        if i > start && size + it.nbytes() > limit {
            shards.push(start..i);
            start = i;
            size = 0;
        }
        size += it.nbytes();
    }
    if start < items.len() || items.is_empty() {
        shards.push(start..items.len());
    }
    shards
}

/// The safetensors header of one shard, padded with spaces to a multiple of 8 bytes so that
/// every tensor starts aligned when the shard is memory-mapped.
fn shard_header(items: &[Item<'_>]) -> Vec<u8> {
    let mut map = Map::new();
    map.insert("__metadata__".into(), json!({ "format": "pt" }));
    let mut offset = 0u64;
    for it in items {
        let end = offset + it.nbytes();
        map.insert(
            it.planned.name.clone(),
            json!({
                "dtype": st_dtype(it.dtype),
                "shape": it.tensor.shape(),
                "data_offsets": [offset, end],
            }),
        );
        offset = end;
    }
    let mut header = serde_json::to_vec(&Value::Object(map)).expect("a JSON map serialises");
    let padded = header.len().div_ceil(8) * 8;
    header.resize(padded, b' ');
    header
}

/// Converts elements `start..start+n` of `src` to `to`, appending little-endian bytes to `out`.
/// Narrowing rounds to nearest-even (the `half` crate's conversions); widening is exact.
fn convert_chunk(src: TensorData<'_>, start: usize, wide: &mut [f32], to: DType, out: &mut Vec<u8>) {
    src.row_to_f32(start, wide);
    out.clear();
    match to {
        DType::F32 => out.extend(wide.iter().flat_map(|v| v.to_le_bytes())),
        DType::F16 => out.extend(
            wide.iter()
                .flat_map(|&v| f16::from_f32(v).to_bits().to_le_bytes()),
        ),
        DType::BF16 => out.extend(
            wide.iter()
                .flat_map(|&v| bf16::from_f32(v).to_bits().to_le_bytes()),
        ),
    }
}

/// Writes one tensor's bytes, in its output dtype, a chunk at a time.
fn write_tensor(
    w: &mut impl Write,
    it: &Item<'_>,
    done: &mut u64,
    progress: &mut impl FnMut(u64),
) -> Result<()> {
    if it.dtype == it.tensor.dtype() {
        for chunk in it.tensor.raw().chunks(COPY_CHUNK) {
            w.write_all(chunk)?;
            *done += chunk.len() as u64;
            progress(*done);
        }
        return Ok(());
    }
    let data = it.tensor.data();
    let total = it.tensor.numel();
    let mut wide = vec![0f32; CONVERT_CHUNK.min(total)];
    let mut bytes = Vec::with_capacity(wide.len() * 4);
    let mut start = 0;
    while start < total {
        let n = CONVERT_CHUNK.min(total - start);
        convert_chunk(data, start, &mut wide[..n], it.dtype, &mut bytes);
        w.write_all(&bytes)?;
        *done += bytes.len() as u64;
        progress(*done);
        start += n;
    }
    Ok(())
}

/// Writes the planned checkpoint to `opts.dir`: sharded safetensors with
/// `model.safetensors.index.json`, the rewritten `config.json`, and the tokenizer and template
/// files. Tensors stream from the source one chunk at a time. `progress(done, total)` is told
/// bytes of tensor data written.
pub fn run(
    ckpt: &Checkpoint,
    plan: &Plan,
    opts: &OutOptions,
    mut progress: impl FnMut(u64, u64),
) -> Result<Report> {
    if opts.shard_size == 0 {
        bail!("the shard size must be positive");
    }
    let items: Vec<Item<'_>> = plan
        .tensors
        .iter()
        .map(|p| {
            let tensor = ckpt.get(&p.source)?;
            Ok(Item {
                planned: p,
                tensor,
                dtype: opts.dtype.unwrap_or(tensor.dtype()),
            })
        })
        .collect::<Result<_>>()?;
    prepare_out_dir(opts, &ckpt.dir)?;

    let total: u64 = items.iter().map(Item::nbytes).sum();
    let groups = assign_shards(&items, opts.shard_size);
    let count = groups.len();
    let mut done = 0u64;
    let mut shards = Vec::new();
    let mut weight_map = Map::new();
    progress(0, total);
    for (k, group) in groups.into_iter().enumerate() {
        let file_name = format!("model-{:05}-of-{count:05}.safetensors", k + 1);
        let path = opts.dir.join(&file_name);
        let shard = &items[group];
        let header = shard_header(shard);
        let file = File::create(&path).with_context(|| format!("cannot create {}", path.display()))?;
        let mut w = BufWriter::with_capacity(1 << 20, file);
        let written = (|| -> Result<()> {
            w.write_all(&(header.len() as u64).to_le_bytes())?;
            w.write_all(&header)?;
            for it in shard {
                write_tensor(&mut w, it, &mut done, &mut |d| progress(d, total))?;
                weight_map.insert(it.planned.name.clone(), json!(file_name));
            }
            w.into_inner().map_err(|e| e.into_error())?.sync_all()?;
            Ok(())
        })();
        written.with_context(|| format!("cannot write {} (the output is incomplete)", path.display()))?;
        shards.push(file_name);
    }

    let index = json!({ "metadata": { "total_size": total }, "weight_map": weight_map });
    write_json(&opts.dir.join("model.safetensors.index.json"), &index)?;
    if let Some(cfg) = &plan.config {
        let mut cfg = cfg.clone();
        if let (Some(d), Some(obj)) = (opts.dtype, cfg.as_object_mut()) {
            for key in ["dtype", "torch_dtype"] {
                if obj.contains_key(key) {
                    obj.insert(key.into(), json!(torch_dtype(d)));
                }
            }
        }
        write_json(&opts.dir.join("config.json"), &cfg)?;
    }
    let mut copied = Vec::new();
    for name in SIDE_FILES {
        let from = ckpt.dir.join(name);
        if from.is_file() {
            std::fs::copy(&from, opts.dir.join(name))
                .with_context(|| format!("cannot copy {} to {}", from.display(), opts.dir.display()))?;
            copied.push(name.to_string());
        }
    }
    Ok(Report {
        layers: plan.layers(),
        tensors: items.len(),
        shards,
        bytes: total,
        copied,
    })
}

fn write_json(path: &Path, value: &Value) -> Result<()> {
    let mut text = serde_json::to_string_pretty(value)?;
    text.push('\n');
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_lists_parse_and_errors_say_what_is_wrong() {
        assert_eq!(parse_layers("0..24,8..32", 32).unwrap(), vec![0..24, 8..32]);
        assert_eq!(parse_layers(" 3..4 , 0..1", 4).unwrap(), vec![3..4, 0..1]);
        let err = |s: &str| format!("{:#}", parse_layers(s, 32).unwrap_err());
        assert!(err("").contains("empty"));
        assert!(err("5..5").contains("is empty"));
        assert!(err("8..4").contains("is empty"));
        assert!(err("0..33").contains("past the source's 32 layers"));
        assert!(err("0-24").contains("not a layer range"));
        assert!(err("a..4").contains("not a layer number"));
        assert!(err("0..24,").contains("not a layer range"));
        assert!(err("-1..4").contains("not a layer number"));
    }

    #[test]
    fn solar_recipe_is_the_papers() {
        assert_eq!(solar_plan(32).unwrap(), vec![0..24, 8..32]);
        assert_eq!(solar_plan(4).unwrap(), vec![0..3, 1..4]);
        assert!(solar_plan(3).is_err());
    }

    #[test]
    fn sizes_take_decimal_and_binary_units() {
        assert_eq!(parse_size("5GB").unwrap(), 5_000_000_000);
        assert_eq!(parse_size("2gb").unwrap(), 2_000_000_000);
        assert_eq!(parse_size("500MB").unwrap(), 500_000_000);
        assert_eq!(parse_size("1.5KB").unwrap(), 1500);
        assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_size("1234").unwrap(), 1234);
        assert!(parse_size("GB").is_err());
        assert!(parse_size("5XB").is_err());
        assert!(parse_size("0MB").is_err());
    }

    #[test]
    fn conversion_rounds_to_nearest_even() {
        // 1 + 2^-8 is halfway between two bf16 values: ties go to the even mantissa (1.0);
        // 1 + 3·2^-8 is halfway too and goes up to 1 + 2^-6.
        let v = [1.0 + 1.0 / 256.0, 1.0 + 3.0 / 256.0, -2.5, f32::INFINITY];
        let t = Tensor::from_f32(&v, vec![4]);
        let mut wide = vec![0f32; 4];
        let mut out = Vec::new();
        convert_chunk(t.data(), 0, &mut wide, DType::BF16, &mut out);
        let got: Vec<u16> = out.chunks(2).map(|b| u16::from_le_bytes([b[0], b[1]])).collect();
        assert_eq!(got, vec![0x3f80, 0x3f82, 0xc020, 0x7f80]);
        convert_chunk(t.data(), 0, &mut wide, DType::F16, &mut out);
        let got: Vec<u16> = out.chunks(2).map(|b| u16::from_le_bytes([b[0], b[1]])).collect();
        // f16 has 10 mantissa bits: both values are exact there.
        assert_eq!(got[0], f16::from_f32(1.0 + 1.0 / 256.0).to_bits());
        assert_eq!(got[2], 0xc100);
        // Half-way for f16: 1 + 2^-11 ties to 1.0.
        let t = Tensor::from_f32(&[1.0 + 1.0 / 2048.0], vec![1]);
        convert_chunk(t.data(), 0, &mut wide[..1], DType::F16, &mut out);
        assert_eq!(u16::from_le_bytes([out[0], out[1]]), 0x3c00);
    }

    #[test]
    fn shards_respect_the_limit_and_keep_big_tensors_whole() {
        let t = Tensor::from_f32(&[0.0; 10], vec![10]);
        let p = PlannedTensor {
            name: "x".into(),
            source: "x".into(),
            origin: Origin::Head { slice: 0 },
        };
        let items: Vec<Item<'_>> = (0..5)
            .map(|_| Item {
                planned: &p,
                tensor: &t,
                dtype: DType::F32,
            })
            .collect();
        assert_eq!(assign_shards(&items, 80), vec![0..2, 2..4, 4..5]);
        assert_eq!(assign_shards(&items, 10), vec![0..1, 1..2, 2..3, 3..4, 4..5]);
        assert_eq!(assign_shards(&items, 1000), vec![0..5]);
    }

    #[test]
    fn layer_names_split_only_on_numbers() {
        assert_eq!(
            split_layer("model.layers.12.mlp.up.weight", "model.layers."),
            Some((12, "mlp.up.weight"))
        );
        assert_eq!(split_layer("model.layers.x.mlp", "model.layers."), None);
        assert_eq!(
            split_layer("blocks.0.ln0.weight", "blocks."),
            Some((0, "ln0.weight"))
        );
        assert_eq!(split_layer("emb.weight", "blocks."), None);
    }
}
