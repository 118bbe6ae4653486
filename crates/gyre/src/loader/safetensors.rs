//! Safetensors checkpoints: one `model.safetensors`, or shards listed by
//! `model.safetensors.index.json`. Files are memory-mapped; tensors keep their stored dtype.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use memmap2::Mmap;
use safetensors::tensor::Dtype as StDtype;

use crate::tensor::{DType, Tensor};

/// A tensor together with the file it came from (for error messages).
#[derive(Clone, Debug)]
pub struct NamedTensor {
    pub tensor: Tensor,
    pub file: PathBuf,
}

/// Memory-maps `path`, refusing empty files with a clear message.
pub fn map_file(path: &Path) -> Result<Arc<Mmap>> {
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let len = file
        .metadata()
        .with_context(|| format!("cannot stat {}", path.display()))?
        .len();
    if len == 0 {
        bail!(
            "{} is empty (0 bytes): the download is incomplete or the file is damaged",
            path.display()
        );
    }
    // SAFETY: the map is read-only. Another process truncating the file while it is mapped
    // would fault; model files are treated as immutable inputs, as every mmap-based loader does.
    let map = unsafe { Mmap::map(&file) }.with_context(|| format!("cannot map {}", path.display()))?;
    Ok(Arc::new(map))
}

fn convert_dtype(dtype: StDtype, name: &str, path: &Path) -> Result<DType> {
    Ok(match dtype {
        StDtype::F32 => DType::F32,
        StDtype::F16 => DType::F16,
        StDtype::BF16 => DType::BF16,
        other => bail!(
            "{}: tensor '{name}' has dtype {other:?}; gyre reads F32, F16 and BF16 weights",
            path.display()
        ),
    })
}

/// Reads every tensor of one safetensors file.
pub fn read_file(path: &Path) -> Result<BTreeMap<String, NamedTensor>> {
    let map = map_file(path)?;
    let (header_len, meta) = safetensors::SafeTensors::read_metadata(&map[..]).map_err(|e| {
        anyhow::anyhow!(
            "{} is not a valid safetensors file ({e}); it may be truncated or not a safetensors file at all",
            path.display()
        )
    })?;
    let data_start = 8 + header_len;
    let mut out = BTreeMap::new();
    for (name, info) in meta.tensors() {
        let dtype = convert_dtype(info.dtype, &name, path)?;
        let (begin, end) = info.data_offsets;
        let tensor = Tensor::from_mmap(
            map.clone(),
            data_start + begin,
            end - begin,
            dtype,
            info.shape.clone(),
        )
        .with_context(|| format!("{}: tensor '{name}'", path.display()))?;
        out.insert(
            name,
            NamedTensor {
                tensor,
                file: path.to_path_buf(),
            },
        );
    }
    Ok(out)
}

/// Reads a sharded checkpoint through its `model.safetensors.index.json`.
pub fn read_index(
    index_path: &Path,
    mut on_shard: impl FnMut(usize, usize),
) -> Result<BTreeMap<String, NamedTensor>> {
    let text = std::fs::read_to_string(index_path)
        .with_context(|| format!("cannot read {}", index_path.display()))?;
    let index: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", index_path.display()))?;
    let weight_map = index
        .get("weight_map")
        .and_then(|m| m.as_object())
        .with_context(|| format!("{}: missing the 'weight_map' object", index_path.display()))?;
    let dir = index_path.parent().unwrap_or(Path::new("."));
    let mut shards: Vec<&str> = Vec::new();
    for (name, shard) in weight_map {
        let shard = shard.as_str().with_context(|| {
            format!(
                "{}: weight_map['{name}'] is not a file name",
                index_path.display()
            )
        })?;
        // A shard is a file of the model's directory: never a path that leaves it.
        let plain = Path::new(shard)
            .components()
            .all(|c| matches!(c, std::path::Component::Normal(_)));
        if !plain || shard.is_empty() {
            bail!(
                "{}: weight_map['{name}'] names '{shard}', which is not a file of the model's directory",
                index_path.display()
            );
        }
        if !shards.contains(&shard) {
            shards.push(shard);
        }
    }
    let mut all = BTreeMap::new();
    for (i, shard) in shards.iter().enumerate() {
        on_shard(i, shards.len());
        let path = dir.join(shard);
        if !path.exists() {
            bail!(
                "{} lists shard '{shard}', which is missing from {}",
                index_path.display(),
                dir.display()
            );
        }
        all.extend(read_file(&path)?);
    }
    for (name, shard) in weight_map {
        match all.get(name) {
            Some(t) if t.file.file_name().and_then(|f| f.to_str()) == shard.as_str() => {}
            Some(_) | None => bail!(
                "{}: tensor '{name}' should be in shard {shard}, but it is not there",
                index_path.display()
            ),
        }
    }
    Ok(all)
}
