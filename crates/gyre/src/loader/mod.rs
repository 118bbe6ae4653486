//! Loaders turn files into named tensors and a parsed `config.json`.
//!
//! A model path is a directory as users download it (config.json, weights, tokenizer files)
//! or a single weight file, whose directory is then searched for config.json. Loaders never
//! interpret tensors; models ask for them by name and shape through [`Checkpoint`].

pub mod config;
pub mod gguf;
pub mod gguf_model;
pub mod pickle;
pub mod pth;
pub mod safetensors;
pub mod state_file;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use serde_json::Value;

use self::gguf_model::NamedBlocks;
use self::safetensors::NamedTensor;
use crate::tensor::{DType, Matrix, Quant, Tensor};

/// An opened checkpoint: its config and every tensor, memory-mapped.
pub struct Checkpoint {
    /// The model directory (or the weight file's directory).
    pub dir: PathBuf,
    /// The parsed `config.json`, when there is one.
    pub config: Option<Value>,
    tensors: BTreeMap<String, NamedTensor>,
    /// Block-quantized tensors of a GGUF file, memory-mapped as stored.
    blocks: BTreeMap<String, NamedBlocks>,
    /// The GGUF file, when the checkpoint is one: its metadata holds the tokenizer and the
    /// chat template.
    pub gguf: Option<Arc<gguf::GgufFile>>,
    /// Tensor name → the name it has in the file, where the two differ (GGUF).
    stored_names: BTreeMap<String, String>,
    /// What the tensors were read from (for messages).
    pub source: String,
    /// Where the config came from (for messages): `…/config.json`, or the GGUF metadata.
    pub config_source: String,
    /// Names of the tensors a model has asked for (shared with the checkpoints derived from
    /// this one), so that [`Checkpoint::unused`] can name the rest.
    used: Arc<std::sync::Mutex<std::collections::BTreeSet<String>>>,
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))
}

/// Reads `dir/name` as JSON when the file exists.
pub fn read_optional_json(dir: &Path, name: &str) -> Result<Option<Value>> {
    let path = dir.join(name);
    if path.exists() {
        read_json(&path).map(Some)
    } else {
        Ok(None)
    }
}

impl Checkpoint {
    /// Opens a model directory or a single `.safetensors` file. `progress` is told
    /// (done, total) as shards are mapped.
    pub fn open(path: &Path, progress: impl FnMut(usize, usize)) -> Result<Checkpoint> {
        if !path.exists() {
            bail!("model path {} does not exist", path.display());
        }
        if let Some(file) = gguf_in(path)? {
            return Checkpoint::open_gguf(&file);
        }
        let (dir, weights) = if path.is_dir() {
            (path.to_path_buf(), None)
        } else {
            let dir = path
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            (dir.to_path_buf(), Some(path.to_path_buf()))
        };
        let config = read_optional_json(&dir, "config.json")?;
        let (tensors, source) = match weights {
            Some(file) => (load_weight_file(&file, progress)?, file.display().to_string()),
            None => {
                let index = dir.join("model.safetensors.index.json");
                let single = dir.join("model.safetensors");
                if index.exists() {
                    (
                        self::safetensors::read_index(&index, progress)?,
                        index.display().to_string(),
                    )
                } else if single.exists() {
                    (
                        self::safetensors::read_file(&single)?,
                        single.display().to_string(),
                    )
                } else {
                    let mut found: Vec<PathBuf> = std::fs::read_dir(&dir)
                        .with_context(|| format!("cannot list {}", dir.display()))?
                        .filter_map(|e| e.ok().map(|e| e.path()))
                        .filter(|p| p.extension().is_some_and(|e| e == "safetensors" || e == "pth"))
                        .collect();
                    found.sort();
                    match found.as_slice() {
                        [one] => (load_weight_file(one, progress)?, one.display().to_string()),
                        [] => bail!(
                            "{} has no weights: expected model.safetensors, model.safetensors.index.json or one .pth file",
                            dir.display()
                        ),
                        _ => bail!(
                            "{} has several weight files but no model.safetensors.index.json to say how they fit; name one file",
                            dir.display()
                        ),
                    }
                }
            }
        };
        Ok(Checkpoint {
            config_source: format!("{}", dir.join("config.json").display()),
            dir,
            config,
            tensors,
            blocks: BTreeMap::new(),
            gguf: None,
            stored_names: BTreeMap::new(),
            source,
            used: Default::default(),
        })
    }

    /// Opens a GGUF file: its metadata stands in for config.json, its tensors keep their
    /// stored formats ([`gguf_model`]).
    fn open_gguf(file: &Path) -> Result<Checkpoint> {
        let g = gguf_model::open(file)?;
        let dir = file
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_path_buf();
        Ok(Checkpoint {
            dir,
            config: Some(g.config),
            tensors: g.dense,
            blocks: g.blocks,
            gguf: Some(g.file),
            stored_names: g.stored_names,
            source: file.display().to_string(),
            config_source: format!("the metadata of {}", file.display()),
            used: Default::default(),
        })
    }

    /// Builds a checkpoint from in-memory tensors (synthetic models, tests).
    pub fn from_tensors(config: Value, tensors: BTreeMap<String, Tensor>) -> Checkpoint {
        let tensors = tensors
            .into_iter()
            .map(|(k, tensor)| {
                (
                    k,
                    NamedTensor {
                        tensor,
                        file: PathBuf::from("<memory>"),
                    },
                )
            })
            .collect();
        Checkpoint {
            dir: PathBuf::from("."),
            config: Some(config),
            tensors,
            blocks: BTreeMap::new(),
            gguf: None,
            stored_names: BTreeMap::new(),
            source: "<memory>".into(),
            config_source: "the synthetic config".into(),
            used: Default::default(),
        }
    }

    /// The same checkpoint with every block-quantized tensor dequantized to f16 (for backends
    /// without the block kernels: `--device cuda`).
    pub fn with_blocks_as_f16(&self) -> Checkpoint {
        let mut tensors = self.tensors.clone();
        for (name, b) in &self.blocks {
            tensors.insert(
                name.clone(),
                NamedTensor {
                    tensor: b.matrix.to_f16_tensor(),
                    file: PathBuf::from(&self.source),
                },
            );
        }
        Checkpoint {
            dir: self.dir.clone(),
            config: self.config.clone(),
            tensors,
            blocks: BTreeMap::new(),
            gguf: self.gguf.clone(),
            stored_names: self.stored_names.clone(),
            source: self.source.clone(),
            config_source: self.config_source.clone(),
            used: self.used.clone(),
        }
    }

    /// The same checkpoint with its weight matrices quantized to the GGUF block format `ty`
    /// by round-to-nearest (`GgmlMatrix::quantize`): for timing the formats at real shapes
    /// (`gyre bench --quant q4_k`). Embedding tables, vectors and matrices whose rows are not
    /// whole blocks stay as they are.
    pub fn with_matrices_as(&self, ty: crate::tensor::GgmlType) -> Result<Checkpoint> {
        if ty.dense().is_some() {
            bail!("{} is not a block format", ty.name());
        }
        let mut out = Checkpoint {
            dir: self.dir.clone(),
            config: self.config.clone(),
            tensors: BTreeMap::new(),
            blocks: self.blocks.clone(),
            gguf: self.gguf.clone(),
            stored_names: self.stored_names.clone(),
            source: self.source.clone(),
            config_source: self.config_source.clone(),
            used: self.used.clone(),
        };
        for (name, t) in &self.tensors {
            let shape = t.tensor.shape();
            let embedding = name.ends_with("embed_tokens.weight") || name == "emb.weight";
            if shape.len() == 2
                && name.ends_with("weight")
                && !embedding
                && shape[1].is_multiple_of(ty.block_size())
            {
                let m = crate::tensor::GgmlMatrix::quantize(&t.tensor, ty);
                out.blocks.insert(
                    name.clone(),
                    NamedBlocks {
                        matrix: Arc::new(m),
                        stored_name: name.clone(),
                    },
                );
            } else {
                out.tensors.insert(name.clone(), t.clone());
            }
        }
        if out.blocks.is_empty() {
            bail!(
                "no weight matrix of {} has rows of whole {} blocks",
                self.source,
                ty.name()
            );
        }
        Ok(out)
    }

    /// True when some tensors are in a GGUF block format.
    pub fn has_blocks(&self) -> bool {
        !self.blocks.is_empty()
    }

    /// `'name'` as the file spells it (GGUF names differ from the transformers names that
    /// the models ask for).
    fn shown(&self, name: &str) -> String {
        match self
            .stored_names
            .get(name)
            .cloned()
            .or_else(|| self.gguf.as_ref().and_then(|_| gguf_model::gguf_name(name)))
        {
            Some(stored) => format!("'{stored}'"),
            None => format!("'{name}'"),
        }
    }

    /// The weight matrix `name`, checked to be `[rows, cols]`: a dense tensor (quantized at
    /// load when `quant` says so) or a GGUF block tensor as stored (`quant` never requantizes
    /// those).
    pub fn matrix(&self, name: &str, rows: usize, cols: usize, quant: Option<Quant>) -> Result<Matrix> {
        if let Some(b) = self.blocks.get(name) {
            self.mark_used(name);
            let shape = [b.matrix.rows(), b.matrix.cols()];
            if shape != [rows, cols] {
                bail!(
                    "tensor '{}' in {} has shape {shape:?}, expected {:?} from {}",
                    b.stored_name,
                    self.source,
                    [rows, cols],
                    self.config_source
                );
            }
            return Ok(Matrix::Ggml(b.matrix.clone()));
        }
        Ok(Matrix::new(self.get_shaped(name, &[rows, cols])?, quant))
    }

    /// The shape and stored bytes of tensor `name`, dense or block-quantized, and whether it
    /// is in a GGUF block format.
    pub fn stored_size(&self, name: &str) -> Option<(Vec<usize>, usize, bool)> {
        if let Some(t) = self.tensors.get(name) {
            return Some((t.tensor.shape().to_vec(), t.tensor.nbytes(), false));
        }
        self.blocks
            .get(name)
            .map(|b| (vec![b.matrix.rows(), b.matrix.cols()], b.matrix.nbytes(), true))
    }

    /// A fingerprint of the weights: FNV-1a over every tensor's name, shape and the first and
    /// last 4 KiB of its bytes (cheap: two pages per tensor), as 16 hex digits. State files
    /// record it, so that a state saved from one model is refused by another of the same
    /// shapes.
    pub fn fingerprint(&self) -> String {
        fn fnv(h: &mut u64, bytes: &[u8]) {
            for &b in bytes {
                *h ^= b as u64;
                *h = h.wrapping_mul(0x100000001B3);
            }
        }
        const EDGE: usize = 4096;
        let mut h = 0xCBF29CE484222325u64;
        for name in self.names() {
            let (shape, raw): (Vec<usize>, &[u8]) = match (self.tensors.get(name), self.blocks.get(name)) {
                (Some(t), _) => (t.tensor.shape().to_vec(), t.tensor.raw()),
                (None, Some(b)) => (vec![b.matrix.rows(), b.matrix.cols()], b.matrix.raw()),
                (None, None) => continue,
            };
            fnv(&mut h, name.as_bytes());
            for d in shape {
                fnv(&mut h, &(d as u64).to_le_bytes());
            }
            fnv(&mut h, &raw[..raw.len().min(EDGE)]);
            fnv(&mut h, &raw[raw.len().saturating_sub(EDGE)..]);
        }
        format!("{h:016x}")
    }

    /// The storage formats of the tensors and how many tensors each holds, most first
    /// (`[("Q4_K", 128), ("F32", 65), …]`).
    pub fn tensor_formats(&self) -> Vec<(String, usize)> {
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        for t in self.tensors.values() {
            *counts.entry(t.tensor.dtype().name().to_uppercase()).or_default() += 1;
        }
        for b in self.blocks.values() {
            *counts.entry(b.matrix.ty().name().to_string()).or_default() += 1;
        }
        let mut out: Vec<(String, usize)> = counts.into_iter().collect();
        out.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        out
    }

    /// The config, or an error saying it is needed.
    pub fn config(&self) -> Result<&Value> {
        self.config
            .as_ref()
            .with_context(|| format!("{} has no config.json", self.dir.display()))
    }

    /// True when the checkpoint holds `name`.
    pub fn has(&self, name: &str) -> bool {
        self.tensors.contains_key(name) || self.blocks.contains_key(name)
    }

    /// Names of all tensors, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        let mut all: Vec<&str> = self
            .tensors
            .keys()
            .chain(self.blocks.keys())
            .map(String::as_str)
            .collect();
        all.sort_unstable();
        all.into_iter()
    }

    /// The dense tensor `name`, or an error naming it and the checkpoint.
    pub fn get(&self, name: &str) -> Result<&Tensor> {
        match self.tensors.get(name) {
            Some(t) => {
                self.mark_used(name);
                Ok(&t.tensor)
            }
            None => Err(self.missing(name)),
        }
    }

    fn mark_used(&self, name: &str) {
        self.used
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_string());
    }

    /// The tensors no model has asked for, as the file names them: a config that declares
    /// fewer layers than the file holds, or a file of another architecture's tensors.
    pub fn unused(&self) -> Vec<String> {
        let used = self.used.lock().unwrap_or_else(|e| e.into_inner());
        self.names()
            .filter(|n| !used.contains(*n))
            .map(|n| self.stored_names.get(n).cloned().unwrap_or_else(|| n.to_string()))
            .collect()
    }

    fn missing(&self, name: &str) -> anyhow::Error {
        match self.blocks.get(name) {
            Some(b) => anyhow::anyhow!(
                "tensor '{}' in {} is stored as {}, where gyre needs F32, F16 or BF16",
                b.stored_name,
                self.source,
                b.matrix.ty()
            ),
            None => anyhow::anyhow!("tensor {} is missing from {}", self.shown(name), self.source),
        }
    }

    /// The dense tensor `name`, checked to have exactly `shape`.
    pub fn get_shaped(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let named = self.tensors.get(name).ok_or_else(|| self.missing(name))?;
        self.mark_used(name);
        if named.tensor.shape() != shape {
            bail!(
                "tensor {} in {} has shape {:?}, expected {shape:?} from {}",
                self.shown(name),
                named.file.display(),
                named.tensor.shape(),
                self.config_source
            );
        }
        Ok(named.tensor.clone())
    }

    /// Total bytes and the set of dtypes of all tensors.
    pub fn summary(&self) -> (usize, usize, Vec<DType>) {
        let mut dtypes: Vec<DType> = Vec::new();
        let (mut bytes, mut params) = (0, 0);
        for t in self.tensors.values() {
            bytes += t.tensor.nbytes();
            params += t.tensor.numel();
            if !dtypes.contains(&t.tensor.dtype()) {
                dtypes.push(t.tensor.dtype());
            }
        }
        for b in self.blocks.values() {
            bytes += b.matrix.nbytes();
            params += b.matrix.rows() * b.matrix.cols();
        }
        (params, bytes, dtypes)
    }
}

/// The GGUF file `path` names: the file itself, or the one `.gguf` of a directory that is not
/// a transformers checkpoint (no config.json, no model.safetensors). `None` when the path is
/// not a GGUF model.
pub fn gguf_in(path: &Path) -> Result<Option<PathBuf>> {
    let is_gguf = |p: &Path| p.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
    if !path.is_dir() {
        return Ok(is_gguf(path).then(|| path.to_path_buf()));
    }
    if ["config.json", "model.safetensors", "model.safetensors.index.json"]
        .iter()
        .any(|f| path.join(f).exists())
    {
        return Ok(None);
    }
    let mut ggufs: Vec<PathBuf> = std::fs::read_dir(path)
        .with_context(|| format!("cannot list {}", path.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| is_gguf(p))
        .collect();
    ggufs.sort();
    match ggufs.len() {
        0 => Ok(None),
        1 => Ok(ggufs.pop()),
        n => bail!(
            "{} holds {n} GGUF files ({}); name the one to run",
            path.display(),
            ggufs
                .iter()
                .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

fn load_weight_file(
    file: &Path,
    progress: impl FnMut(usize, usize),
) -> Result<BTreeMap<String, NamedTensor>> {
    let name = file.file_name().and_then(|n| n.to_str()).unwrap_or("");
    if name.ends_with(".index.json") {
        return self::safetensors::read_index(file, progress);
    }
    match file.extension().and_then(|e| e.to_str()) {
        Some("safetensors") => self::safetensors::read_file(file),
        Some("pth" | "pt" | "bin") => self::pth::read_file(file),
        _ => bail!(
            "{}: unknown weight file type; gyre reads .safetensors, PyTorch .pth and GGUF files, and model directories",
            file.display()
        ),
    }
}
