//! PyTorch `.pth` / `.pt` checkpoints exactly as `torch.save` writes them since torch 1.6.
//!
//! The file is a zip archive: `<archive>/data.pkl` (the pickled dict), one STORED entry
//! `<archive>/data/<key>` of raw little-endian elements per storage, and small records
//! (`byteorder`, `version`, `.data/serialization_id`). The file is memory-mapped; each tensor
//! points straight at its storage's bytes in the map (its offset computed from the entry's local
//! header), keeping the stored dtype. The pickle goes through the non-executing reader in
//! [`super::pickle`]. Contiguous tensors are views; a non-contiguous tensor (e.g. a saved `t.T`)
//! is copied into row-major order, in its dtype, when the copy is no larger than its storage.
//! A flat dict name → tensor is read as is; one level of a `state_dict` or `model` wrapper is
//! unwrapped; other values are ignored. This module does not interpret tensor names.

use std::collections::{BTreeMap, HashMap};
use std::io::Cursor;
use std::path::Path;
use std::sync::Arc;

use anyhow::{anyhow, bail, Result};
use memmap2::Mmap;
use zip::{CompressionMethod, ZipArchive};

use super::pickle::{self, Object, Pickle, TensorRef, Value};
use super::safetensors::{map_file, NamedTensor};
use crate::tensor::Tensor;

/// Dict keys whose dict value is unwrapped one level (`{"state_dict": {...}}`).
pub const WRAPPER_KEYS: [&str; 2] = ["state_dict", "model"];

/// The first bytes of the pre-1.6 (non-zip) torch format: PROTO 2 and the LONG1 magic number.
const LEGACY_MAGIC: &[u8] = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19";

/// Reads every tensor of one `torch.save` zip checkpoint, memory-mapped.
pub fn read_file(path: &Path) -> Result<BTreeMap<String, NamedTensor>> {
    let map = map_file(path)?;
    read_mapped(map, path)
}

/// Reads the tensors of a checkpoint already mapped; `path` is used for messages only.
pub fn read_mapped(map: Arc<Mmap>, path: &Path) -> Result<BTreeMap<String, NamedTensor>> {
    let file = path.display();
    let bytes: &[u8] = &map;
    sniff(bytes, path)?;
    let mut archive = ZipArchive::new(Cursor::new(bytes)).map_err(|e| {
        anyhow!(
            "{file} is not a complete zip archive (truncated or damaged: {e}); \
             download or save it again"
        )
    })?;
    let pkl_name = archive
        .file_names()
        .find(|n| {
            n.strip_suffix("data.pkl")
                .is_some_and(|p| p.is_empty() || is_top_dir(p))
        })
        .map(str::to_owned)
        .ok_or_else(|| {
            anyhow!("{file} is a zip archive without a data.pkl entry: it was not written by torch.save")
        })?;
    let prefix = &pkl_name[..pkl_name.len() - "data.pkl".len()];
    if let Some((start, len)) = entry_range(&mut archive, bytes.len(), &format!("{prefix}byteorder"), path)? {
        let order = &bytes[start..start + len];
        if order != b"little" {
            bail!(
                "{file} stores its tensors as {:?}-endian; gyre reads little-endian checkpoints only",
                String::from_utf8_lossy(order)
            );
        }
    }
    let Some((start, len)) = entry_range(&mut archive, bytes.len(), &pkl_name, path)? else {
        bail!("{file}: cannot open {pkl_name} in the archive");
    };
    let pickle =
        pickle::parse(&bytes[start..start + len]).map_err(|e| anyhow!("{file}: {pkl_name}: {e:#}"))?;
    let found = collect_tensors(&pickle, path)?;

    let mut storages: HashMap<&str, (usize, usize)> = HashMap::new();
    let mut out = BTreeMap::new();
    for (name, t) in found {
        let key = &*t.storage.key;
        let (start, len) = match storages.get(key) {
            Some(&range) => range,
            None => {
                let entry = format!("{prefix}data/{key}");
                let Some(range) = entry_range(&mut archive, bytes.len(), &entry, path)? else {
                    bail!(
                        "{file}: tensor '{name}' uses storage '{key}', but the archive has no \
                         entry {entry}: the checkpoint is damaged"
                    );
                };
                storages.insert(key, range);
                range
            }
        };
        let tensor =
            make_tensor(&map, start, len, t).map_err(|e| anyhow!("{file}: tensor '{name}': {e:#}"))?;
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

/// True for `name/` with no other slash: torch's top-level archive directory.
fn is_top_dir(prefix: &str) -> bool {
    prefix
        .strip_suffix('/')
        .is_some_and(|d| !d.is_empty() && !d.contains('/'))
}

/// Refuses, with a useful message, files that are clearly not zip checkpoints.
fn sniff(bytes: &[u8], path: &Path) -> Result<()> {
    let file = path.display();
    if bytes.starts_with(b"PK\x03\x04") || bytes.starts_with(b"PK\x05\x06") {
        return Ok(());
    }
    if bytes.starts_with(LEGACY_MAGIC) || bytes.get(257..262) == Some(b"ustar") {
        bail!(
            "{file} uses the legacy (pre-1.6, non-zip) torch.save format, which gyre does not \
             read; re-save it with a recent torch: torch.save(torch.load(old), new)"
        );
    }
    if bytes.first() == Some(&0x80) {
        bail!(
            "{file} is a bare pickle, not a torch.save zip archive; re-save it with a recent \
             torch (torch.save writes zip archives since 1.6)"
        );
    }
    if bytes.len() > 8 && bytes[8] == b'{' {
        bail!("{file} looks like a safetensors file, not a .pth checkpoint; name it .safetensors");
    }
    bail!("{file} is not a PyTorch checkpoint: it is not a zip archive");
}

/// The byte range of an uncompressed entry in the file, or `None` when the entry is absent.
fn entry_range(
    archive: &mut ZipArchive<Cursor<&[u8]>>,
    total: usize,
    name: &str,
    path: &Path,
) -> Result<Option<(usize, usize)>> {
    let file = path.display();
    let Some(index) = archive.index_for_name(name) else {
        return Ok(None);
    };
    let entry = archive
        .by_index_raw(index)
        .map_err(|e| anyhow!("{file}: entry {name} is damaged ({e}); the archive may be truncated"))?;
    if entry.encrypted() {
        bail!("{file}: entry {name} is encrypted; torch.save never encrypts");
    }
    if entry.compression() != CompressionMethod::Stored {
        bail!(
            "{file}: entry {name} is compressed ({}); torch.save stores entries uncompressed so \
             they can be memory-mapped: re-save with torch.save, or re-zip with `zip -0`",
            method_name(entry.compression())
        );
    }
    if entry.size() != entry.compressed_size() {
        bail!("{file}: entry {name} is stored but its sizes disagree; the archive is damaged");
    }
    let start = entry.data_start().and_then(|s| usize::try_from(s).ok());
    let len = usize::try_from(entry.size()).ok();
    match (start, len) {
        (Some(start), Some(len)) if start.checked_add(len).is_some_and(|end| end <= total) => {
            Ok(Some((start, len)))
        }
        _ => bail!(
            "{file}: entry {name} runs past the end of the file; the archive is truncated — \
             download or save it again"
        ),
    }
}

/// A zip compression method's common name.
fn method_name(method: CompressionMethod) -> String {
    let known = [
        (CompressionMethod::DEFLATE, "deflate"),
        (CompressionMethod::DEFLATE64, "deflate64"),
        (CompressionMethod::BZIP2, "bzip2"),
        (CompressionMethod::LZMA, "lzma"),
        (CompressionMethod::ZSTD, "zstd"),
    ];
    match known.iter().find(|(m, _)| *m == method) {
        Some((_, name)) => (*name).to_owned(),
        None => format!("zip method {method:?}"),
    }
}

/// The tensors the checkpoint holds at top level and under one `state_dict`/`model` wrapper.
fn collect_tensors<'p>(pickle: &'p Pickle, path: &Path) -> Result<Vec<(String, &'p TensorRef)>> {
    let file = path.display();
    let Some(Object::Dict(items)) = pickle.object_of(&pickle.root) else {
        bail!(
            "{file} holds a {}, not a dict of tensors; save a state_dict (a dict name -> tensor)",
            pickle.kind(&pickle.root)
        );
    };
    // Later keys win within one dict, as in Python; a name found in two places must agree.
    let mut found: BTreeMap<String, (&'p TensorRef, &str)> = BTreeMap::new();
    let mut add = |name: &str, t: &'p TensorRef, place: &'static str| -> Result<()> {
        match found.get(name) {
            Some((prev, prev_place)) if *prev_place != place && *prev != t => bail!(
                "{file}: tensor '{name}' appears both {prev_place} and {place} with different \
                 contents; gyre cannot tell which to use"
            ),
            _ => {
                found.insert(name.to_owned(), (t, place));
                Ok(())
            }
        }
    };
    let mut top_keys = Vec::new();
    for (key, value) in items {
        let Value::Str(key) = key else { continue };
        top_keys.push(key.to_string());
        match pickle.object_of(value) {
            Some(Object::Tensor(t)) => add(key, t, "at top level")?,
            Some(Object::Dict(inner)) if WRAPPER_KEYS.contains(&&**key) => {
                let place = if &**key == "model" {
                    "under 'model'"
                } else {
                    "under 'state_dict'"
                };
                for (k, v) in inner {
                    if let (Value::Str(k), Some(Object::Tensor(t))) = (k, pickle.object_of(v)) {
                        add(k, t, place)?;
                    }
                }
            }
            _ => {}
        }
    }
    if found.is_empty() {
        top_keys.truncate(20);
        bail!(
            "{file} holds no tensors at top level or under 'state_dict'/'model' (top-level keys: \
             {top_keys:?}); save a flat dict name -> tensor"
        );
    }
    Ok(found.into_iter().map(|(name, (t, _))| (name, t)).collect())
}

/// A tensor over the storage entry at `start..start + len` of the map.
fn make_tensor(map: &Arc<Mmap>, start: usize, len: usize, t: &TensorRef) -> Result<Tensor> {
    let storage = &t.storage;
    let Some(dtype) = storage.ty.dtype else {
        bail!(
            "stored as torch.{} ({}); gyre reads float32, float16 and bfloat16 weights — convert \
             it before saving",
            storage.ty.name,
            storage.ty.torch_dtype
        );
    };
    let esize = dtype.size() as u64;
    let key = &*storage.key;
    let storage_bytes = storage.numel.checked_mul(esize);
    if storage_bytes.is_none_or(|b| b > len as u64) {
        bail!(
            "storage '{key}' should hold {} {dtype} elements but its archive entry has only {len} \
             bytes; the checkpoint is damaged",
            storage.numel
        );
    }
    let too_big = || anyhow!("shape {:?} is too large", t.shape);
    let shape: Vec<usize> = t
        .shape
        .iter()
        .map(|&d| usize::try_from(d).map_err(|_| too_big()))
        .collect::<Result<_>>()?;
    let numel = t
        .shape
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d))
        .ok_or_else(too_big)?;
    if numel == 0 {
        return Ok(Tensor::from_bytes(&[], dtype, shape));
    }
    // The last element the view touches must lie inside the storage.
    let last = t.shape.iter().zip(&t.stride).try_fold(t.offset, |acc, (&d, &s)| {
        (d - 1).checked_mul(s).and_then(|x| acc.checked_add(x))
    });
    if last.is_none_or(|last| last >= storage.numel) {
        bail!(
            "shape {:?} with stride {:?} at offset {} needs more than the {} elements of its \
             storage '{key}'; the checkpoint is damaged",
            t.shape,
            t.stride,
            t.offset,
            storage.numel
        );
    }
    // Every value below is at most storage.numel * esize <= len, so the casts cannot truncate.
    let base = start + (t.offset * esize) as usize;
    let nbytes = (numel * esize) as usize;
    if is_contiguous(&t.shape, &t.stride) {
        return Tensor::from_mmap(map.clone(), base, nbytes, dtype, shape);
    }
    if numel > storage.numel {
        bail!(
            "shape {:?} with stride {:?} reuses elements (an expanded or overlapping view); call \
             .contiguous() on it before saving",
            t.shape,
            t.stride
        );
    }
    Ok(Tensor::from_bytes(
        &gather(&map[..], base, &shape, &t.stride, dtype.size(), nbytes),
        dtype,
        shape,
    ))
}

/// Row-major strides, ignoring dimensions of size 1 (as `torch.Tensor.is_contiguous` does).
fn is_contiguous(shape: &[u64], stride: &[u64]) -> bool {
    let mut expected = 1u64;
    for (&d, &s) in shape.iter().zip(stride).rev() {
        if d != 1 && s != expected {
            return false;
        }
        expected = expected.saturating_mul(d);
    }
    true
}

/// Copies a strided view starting at byte `base` into row-major order. The caller has checked
/// that every element lies inside `bytes`.
fn gather(
    bytes: &[u8],
    base: usize,
    shape: &[usize],
    stride: &[u64],
    esize: usize,
    nbytes: usize,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(nbytes);
    let mut index = vec![0usize; shape.len()];
    let byte_stride: Vec<usize> = stride.iter().map(|&s| s as usize * esize).collect();
    let mut at = base;
    while out.len() < nbytes {
        out.extend_from_slice(&bytes[at..at + esize]);
        // Odometer step: bump the innermost index, carrying outwards.
        for dim in (0..shape.len()).rev() {
            index[dim] += 1;
            at += byte_stride[dim];
            if index[dim] < shape[dim] {
                break;
            }
            at -= byte_stride[dim] * shape[dim];
            index[dim] = 0;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn fixture(name: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/pth")
            .join(name)
    }

    /// The `data.pkl` bytes of a fixture.
    fn pickle_of(name: &str) -> Vec<u8> {
        let bytes = std::fs::read(fixture(name)).unwrap();
        let mut archive = ZipArchive::new(Cursor::new(&bytes[..])).unwrap();
        let pkl = archive
            .file_names()
            .find(|n| n.ends_with("/data.pkl"))
            .unwrap()
            .to_owned();
        let (start, len) = entry_range(&mut archive, bytes.len(), &pkl, Path::new("x"))
            .unwrap()
            .unwrap();
        bytes[start..start + len].to_vec()
    }

    #[test]
    fn contiguity_ignores_unit_dimensions() {
        assert!(is_contiguous(&[2, 3, 4], &[12, 4, 1]));
        assert!(is_contiguous(&[1, 1, 5], &[5, 5, 1]));
        assert!(is_contiguous(&[5, 1], &[1, 5]));
        assert!(is_contiguous(&[], &[]));
        assert!(!is_contiguous(&[4, 3], &[1, 4]));
        assert!(!is_contiguous(&[3, 4], &[0, 1]));
    }

    #[test]
    fn gather_transposes() {
        // A 2x3 row-major matrix of u16 read as its 3x2 transpose.
        let src: Vec<u8> = (0u16..6).flat_map(|v| v.to_le_bytes()).collect();
        let out = gather(&src, 0, &[3, 2], &[1, 3], 2, 12);
        let vals: Vec<u16> = out.chunks(2).map(|b| u16::from_le_bytes([b[0], b[1]])).collect();
        assert_eq!(vals, [0, 3, 1, 4, 2, 5]);
    }

    #[test]
    fn torch_pickles_of_every_fixture_parse() {
        for name in [
            "f32.pth",
            "f16.pth",
            "bf16.pth",
            "shared.pth",
            "ordered.pth",
            "protocol4.pth",
        ] {
            let p = pickle::parse(&pickle_of(name)).unwrap();
            assert!(matches!(p.object_of(&p.root), Some(Object::Dict(_))), "{name}");
        }
    }

    #[test]
    fn mutated_torch_pickles_never_panic() {
        for name in ["ordered.pth", "protocol4.pth"] {
            let good = pickle_of(name);
            for cut in 0..good.len() {
                assert!(pickle::parse(&good[..cut]).is_err());
            }
            let mut seed = 0x9e37_79b9_7f4a_7c15u64;
            for _ in 0..20_000 {
                let mut bytes = good.clone();
                for _ in 0..1 + seed % 3 {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    let at = (seed >> 8) as usize % bytes.len();
                    bytes[at] = (seed >> 40) as u8;
                }
                let _ = pickle::parse(&bytes);
            }
        }
    }
}
