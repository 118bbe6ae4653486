//! Loaders turn files into named tensors and a parsed `config.json`.
//!
//! A model path is a directory as users download it (config.json, weights, tokenizer files)
//! or a single weight file, whose directory is then searched for config.json. Loaders never
//! interpret tensors; models ask for them by name and shape through [`Checkpoint`].

pub mod config;
pub mod pickle;
pub mod pth;
pub mod safetensors;
pub mod state_file;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use self::safetensors::NamedTensor;
use crate::tensor::{DType, Tensor};

/// An opened checkpoint: its config and every tensor, memory-mapped.
pub struct Checkpoint {
    /// The model directory (or the weight file's directory).
    pub dir: PathBuf,
    /// The parsed `config.json`, when there is one.
    pub config: Option<Value>,
    tensors: BTreeMap<String, NamedTensor>,
    /// What the tensors were read from (for messages).
    pub source: String,
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
            dir,
            config,
            tensors,
            source,
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
            source: "<memory>".into(),
        }
    }

    /// The config, or an error saying it is needed.
    pub fn config(&self) -> Result<&Value> {
        self.config
            .as_ref()
            .with_context(|| format!("{} has no config.json", self.dir.display()))
    }

    /// True when the checkpoint holds `name`.
    pub fn has(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// Names of all tensors, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// The tensor `name`, or an error naming it and the checkpoint.
    pub fn get(&self, name: &str) -> Result<&Tensor> {
        self.tensors
            .get(name)
            .map(|t| &t.tensor)
            .with_context(|| format!("tensor '{name}' is missing from {}", self.source))
    }

    /// The tensor `name`, checked to have exactly `shape`.
    pub fn get_shaped(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let named = self
            .tensors
            .get(name)
            .with_context(|| format!("tensor '{name}' is missing from {}", self.source))?;
        if named.tensor.shape() != shape {
            bail!(
                "tensor '{name}' in {} has shape {:?}, expected {shape:?} from config.json",
                named.file.display(),
                named.tensor.shape()
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
        (params, bytes, dtypes)
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
            "{}: unknown weight file type; gyre reads .safetensors and PyTorch .pth files, and model directories",
            file.display()
        ),
    }
}
