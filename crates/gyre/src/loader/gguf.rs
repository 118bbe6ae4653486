//! GGUF files (llama.cpp's format): the header, the metadata key–value pairs and the tensor
//! table, read and checked against the file before any tensor is touched.
//!
//! Layout (ggml `docs/gguf.md`; versions 2 and 3, little-endian):
//! ```text
//! "GGUF" u32 version, u64 tensor_count, u64 kv_count
//! kv_count × (string key, u32 value_type, value)       strings are u64 length + bytes
//! tensor_count × (string name, u32 n_dims, u64 ne[n_dims], u32 ggml_type, u64 offset)
//! padding to general.alignment (default 32), then the tensor data; offsets are relative to it
//! ```
//! `ne[0]` is the fastest-varying dimension, so a matrix of `ne = [cols, rows]` is row-major
//! `[rows, cols]`. Every count, length and offset is checked against the file's size before it
//! is used to allocate or read, so a damaged or hostile file is an error naming the file and the
//! key or tensor, never a panic or a huge allocation. This module only parses: what the tensors
//! and keys mean for a model belongs to [`crate::loader::gguf_model`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use memmap2::Mmap;

use crate::tensor::ggml::GgmlType;

/// The file's first four bytes.
pub const MAGIC: &[u8; 4] = b"GGUF";

/// Alignment of the tensor data when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;

/// Most dimensions a ggml tensor has.
const MAX_DIMS: u32 = 4;

/// One metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    /// Raw bytes: GGUF says UTF-8, but vocabularies in the wild hold other bytes too.
    Str(Vec<u8>),
    Array(Vec<Value>),
}

impl Value {
    /// The value as an unsigned integer, if it is a non-negative integer of any width.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v as u64),
            Value::U16(v) => Some(v as u64),
            Value::U32(v) => Some(v as u64),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a float, if it is a number.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v as f64),
            Value::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64).or(match *self {
                Value::I8(v) => Some(v as f64),
                Value::I16(v) => Some(v as f64),
                Value::I32(v) => Some(v as f64),
                Value::I64(v) => Some(v as f64),
                _ => None,
            }),
        }
    }

    /// The value as text, if it is a UTF-8 string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(b) => std::str::from_utf8(b).ok(),
            _ => None,
        }
    }

    /// The value's type as the GGUF spec names it (for messages).
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::U8(_) => "uint8",
            Value::I8(_) => "int8",
            Value::U16(_) => "uint16",
            Value::I16(_) => "int16",
            Value::U32(_) => "uint32",
            Value::I32(_) => "int32",
            Value::U64(_) => "uint64",
            Value::I64(_) => "int64",
            Value::F32(_) => "float32",
            Value::F64(_) => "float64",
            Value::Bool(_) => "bool",
            Value::Str(_) => "string",
            Value::Array(_) => "array",
        }
    }
}

/// One entry of the tensor table.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub name: String,
    /// ggml order: `ne[0]` varies fastest.
    pub ne: Vec<u64>,
    pub ty: GgmlType,
    /// Absolute byte offset of the data in the file.
    pub start: usize,
    /// Bytes of data.
    pub len: usize,
}

impl TensorInfo {
    /// The shape outermost first (row-major), as the rest of gyre writes shapes.
    pub fn shape(&self) -> Vec<usize> {
        self.ne.iter().rev().map(|&d| d as usize).collect()
    }
}

/// A parsed GGUF file, memory-mapped.
pub struct GgufFile {
    pub path: PathBuf,
    pub version: u32,
    pub alignment: u64,
    pub metadata: BTreeMap<String, Value>,
    /// In file order.
    pub tensors: Vec<TensorInfo>,
    pub map: Arc<Mmap>,
}

impl GgufFile {
    /// Maps and parses `path`.
    pub fn open(path: &Path) -> Result<GgufFile> {
        let map = super::safetensors::map_file(path)?;
        let parsed =
            parse(&map).with_context(|| format!("{} is not a readable GGUF file", path.display()))?;
        Ok(GgufFile {
            path: path.to_path_buf(),
            version: parsed.version,
            alignment: parsed.alignment,
            metadata: parsed.metadata,
            tensors: parsed.tensors,
            map,
        })
    }

    /// The metadata value `key`, if present.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    /// A required unsigned integer key.
    pub fn u64_key(&self, key: &str) -> Result<u64> {
        let v = self
            .get(key)
            .with_context(|| format!("{}: metadata key '{key}' is missing", self.path.display()))?;
        v.as_u64().with_context(|| {
            format!(
                "{}: metadata key '{key}' must be a non-negative integer, found {}",
                self.path.display(),
                v.type_name()
            )
        })
    }

    /// An optional unsigned integer key; present but of another type is an error.
    pub fn opt_u64(&self, key: &str) -> Result<Option<u64>> {
        match self.get(key) {
            None => Ok(None),
            Some(_) => self.u64_key(key).map(Some),
        }
    }

    /// An optional float key; present but not a number is an error.
    pub fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_f64().map(Some).with_context(|| {
                format!(
                    "{}: metadata key '{key}' must be a number, found {}",
                    self.path.display(),
                    v.type_name()
                )
            }),
        }
    }

    /// An optional UTF-8 string key; present but of another type is an error.
    pub fn opt_str(&self, key: &str) -> Result<Option<&str>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_str().map(Some).with_context(|| {
                format!(
                    "{}: metadata key '{key}' must be a UTF-8 string, found {}",
                    self.path.display(),
                    v.type_name()
                )
            }),
        }
    }

    /// An optional boolean key; present but of another type is an error.
    pub fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => bail!(
                "{}: metadata key '{key}' must be a bool, found {}",
                self.path.display(),
                v.type_name()
            ),
        }
    }

    /// An optional array key; present but not an array is an error.
    pub fn opt_array(&self, key: &str) -> Result<Option<&[Value]>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Array(a)) => Ok(Some(a)),
            Some(v) => bail!(
                "{}: metadata key '{key}' must be an array, found {}",
                self.path.display(),
                v.type_name()
            ),
        }
    }
}

/// What [`parse`] reads from the bytes.
pub struct Parsed {
    pub version: u32,
    pub alignment: u64,
    pub metadata: BTreeMap<String, Value>,
    pub tensors: Vec<TensorInfo>,
}

/// A cursor over the file's bytes that refuses to read past the end.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: u64, what: &dyn Fn() -> String) -> Result<&'a [u8]> {
        let left = (self.bytes.len() - self.at) as u64;
        if n > left {
            bail!(
                "{} needs {n} bytes at offset {}, but the file has only {left} left (truncated?)",
                what(),
                self.at
            );
        }
        let out = &self.bytes[self.at..self.at + n as usize];
        self.at += n as usize;
        Ok(out)
    }

    fn array<const N: usize>(&mut self, what: &dyn Fn() -> String) -> Result<[u8; N]> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N as u64, what)?);
        Ok(out)
    }

    fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &dyn Fn() -> String) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn string(&mut self, what: &dyn Fn() -> String) -> Result<Vec<u8>> {
        let len = self.u64(what)?;
        Ok(self
            .take(len, &|| format!("{} (a string of {len} bytes)", what()))?
            .to_vec())
    }

    /// A count of items that each take at least `min_item` bytes: refused when the rest of
    /// the file could not hold that many, before anything is allocated for them.
    fn count(&mut self, min_item: u64, what: &dyn Fn() -> String) -> Result<usize> {
        let n = self.u64(what)?;
        let left = (self.bytes.len() - self.at) as u64;
        if n.saturating_mul(min_item) > left {
            bail!(
                "{} says {n} items, more than the {left} bytes left in the file can hold (truncated or damaged)",
                what()
            );
        }
        Ok(n as usize)
    }

    fn value(&mut self, ty: u32, depth: u32, what: &dyn Fn() -> String) -> Result<Value> {
        Ok(match ty {
            0 => Value::U8(self.array::<1>(what)?[0]),
            1 => Value::I8(self.array::<1>(what)?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.array(what)?)),
            3 => Value::I16(i16::from_le_bytes(self.array(what)?)),
            4 => Value::U32(self.u32(what)?),
            5 => Value::I32(i32::from_le_bytes(self.array(what)?)),
            6 => Value::F32(f32::from_le_bytes(self.array(what)?)),
            7 => match self.array::<1>(what)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => bail!("{} is a bool stored as {b} (must be 0 or 1)", what()),
            },
            8 => Value::Str(self.string(what)?),
            9 => {
                if depth > 0 {
                    bail!("{} nests arrays inside arrays, which gyre does not read", what());
                }
                let item = self.u32(what)?;
                let min = match item {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    8 | 10..=12 => 8,
                    9 => 12,
                    _ => bail!("{} is an array of unknown value type {item}", what()),
                };
                let n = self.count(min, what)?;
                let mut items = Vec::with_capacity(n);
                for i in 0..n {
                    items.push(self.value(item, depth + 1, &|| format!("{}[{i}]", what()))?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64(what)?),
            11 => Value::I64(i64::from_le_bytes(self.array(what)?)),
            12 => Value::F64(f64::from_le_bytes(self.array(what)?)),
            _ => bail!("{} has unknown value type {ty}", what()),
        })
    }
}

/// Parses and checks a whole GGUF file held in `bytes`.
pub fn parse(bytes: &[u8]) -> Result<Parsed> {
    let mut r = Reader { bytes, at: 0 };
    let magic = r.array::<4>(&|| "the magic number".into())?;
    if &magic != MAGIC {
        bail!(
            "it does not start with \"GGUF\" (found {:?}): not a GGUF file",
            String::from_utf8_lossy(&magic)
        );
    }
    let version = r.u32(&|| "the version".into())?;
    match version {
        2 | 3 => {}
        1 => {
            bail!("GGUF version 1 (2023) is not supported: convert the model again with a current llama.cpp")
        }
        v if v.swap_bytes() <= 3 => bail!("this GGUF file is big-endian; gyre reads little-endian GGUF only"),
        v => bail!("GGUF version {v} is not supported (gyre reads versions 2 and 3)"),
    }
    // A tensor entry takes at least 8 (name) + 4 + 4 + 8 bytes, a key-value pair 8 + 4 + 1.
    let n_tensors = r.count(24, &|| "the tensor count".into())?;
    let n_kv = r.count(13, &|| "the metadata count".into())?;

    let mut metadata = BTreeMap::new();
    for i in 0..n_kv {
        let key = r.string(&|| format!("metadata key #{i}"))?;
        let key = String::from_utf8(key).map_err(|_| anyhow::anyhow!("metadata key #{i} is not UTF-8"))?;
        let ty = r.u32(&|| format!("the type of metadata key '{key}'"))?;
        let value = r.value(ty, 0, &|| format!("metadata key '{key}'"))?;
        if metadata.insert(key.clone(), value).is_some() {
            bail!("metadata key '{key}' appears twice");
        }
    }
    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(v) => match v.as_u64() {
            Some(a) if a > 0 && a.is_power_of_two() && a <= 1 << 20 => a,
            _ => bail!("metadata key 'general.alignment' must be a power of two up to 1 MiB, found {v:?}"),
        },
    };

    struct Entry {
        name: String,
        ne: Vec<u64>,
        ty: GgmlType,
        offset: u64,
    }
    let mut entries = Vec::with_capacity(n_tensors);
    for i in 0..n_tensors {
        let name = r.string(&|| format!("the name of tensor #{i}"))?;
        let name =
            String::from_utf8(name).map_err(|_| anyhow::anyhow!("the name of tensor #{i} is not UTF-8"))?;
        let what = || format!("tensor '{name}'");
        let n_dims = r.u32(&what)?;
        if n_dims == 0 || n_dims > MAX_DIMS {
            bail!("tensor '{name}' has {n_dims} dimensions (ggml tensors have 1 to {MAX_DIMS})");
        }
        let mut ne = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            ne.push(r.u64(&what)?);
        }
        let type_id = r.u32(&what)?;
        let ty = GgmlType::from_id(type_id).with_context(|| format!("tensor '{name}'"))?;
        let offset = r.u64(&what)?;
        entries.push(Entry { name, ne, ty, offset });
    }
    let data_start = (r.at as u64).next_multiple_of(alignment);
    if data_start > bytes.len() as u64 && n_tensors > 0 {
        bail!(
            "the tensor data would start at byte {data_start}, past the end of the file ({} bytes)",
            bytes.len()
        );
    }

    let mut tensors = Vec::with_capacity(entries.len());
    let mut seen = std::collections::HashSet::new();
    for e in entries {
        if !seen.insert(e.name.clone()) {
            bail!("tensor '{}' appears twice in the tensor table", e.name);
        }
        let numel =
            e.ne.iter()
                .try_fold(1u64, |acc, &d| acc.checked_mul(d))
                .filter(|&n| n < 1 << 48)
                .with_context(|| format!("tensor '{}' has an impossible shape {:?}", e.name, e.ne))?;
        let block = e.ty.block_size() as u64;
        if e.ne[0] % block != 0 {
            bail!(
                "tensor '{}' ({}) has rows of {} elements, not a multiple of its block size {block}",
                e.name,
                e.ty.name(),
                e.ne[0]
            );
        }
        let len = numel / block * e.ty.block_bytes() as u64;
        if e.offset % alignment != 0 {
            bail!(
                "tensor '{}' starts at data offset {}, which is not a multiple of the alignment {alignment}",
                e.name,
                e.offset
            );
        }
        let start = data_start.checked_add(e.offset);
        match start.and_then(|s| s.checked_add(len)) {
            Some(end) if end <= bytes.len() as u64 => {}
            _ => bail!(
                "tensor '{}' ({} bytes at data offset {}) ends past the end of the file ({} bytes): the file is truncated",
                e.name,
                len,
                e.offset,
                bytes.len()
            ),
        }
        tensors.push(TensorInfo {
            name: e.name,
            ne: e.ne,
            ty: e.ty,
            start: (data_start + e.offset) as usize,
            len: len as usize,
        });
    }
    Ok(Parsed {
        version,
        alignment,
        metadata,
        tensors,
    })
}

/// Writes a GGUF file in memory (tests and tools): `kv` pairs, then tensors given as
/// `(name, ne, type, data)`, aligned to `alignment`.
pub fn write(kv: &[(&str, Value)], tensors: &[(&str, Vec<u64>, GgmlType, &[u8])], alignment: u64) -> Vec<u8> {
    fn put_str(out: &mut Vec<u8>, s: &[u8]) {
        out.extend((s.len() as u64).to_le_bytes());
        out.extend(s);
    }
    fn type_id(v: &Value) -> u32 {
        match v {
            Value::U8(_) => 0,
            Value::I8(_) => 1,
            Value::U16(_) => 2,
            Value::I16(_) => 3,
            Value::U32(_) => 4,
            Value::I32(_) => 5,
            Value::F32(_) => 6,
            Value::Bool(_) => 7,
            Value::Str(_) => 8,
            Value::Array(_) => 9,
            Value::U64(_) => 10,
            Value::I64(_) => 11,
            Value::F64(_) => 12,
        }
    }
    fn put_value(out: &mut Vec<u8>, v: &Value) {
        match v {
            Value::U8(x) => out.push(*x),
            Value::I8(x) => out.push(*x as u8),
            Value::U16(x) => out.extend(x.to_le_bytes()),
            Value::I16(x) => out.extend(x.to_le_bytes()),
            Value::U32(x) => out.extend(x.to_le_bytes()),
            Value::I32(x) => out.extend(x.to_le_bytes()),
            Value::U64(x) => out.extend(x.to_le_bytes()),
            Value::I64(x) => out.extend(x.to_le_bytes()),
            Value::F32(x) => out.extend(x.to_le_bytes()),
            Value::F64(x) => out.extend(x.to_le_bytes()),
            Value::Bool(x) => out.push(*x as u8),
            Value::Str(s) => put_str(out, s),
            Value::Array(items) => {
                out.extend(items.first().map_or(0, type_id).to_le_bytes());
                out.extend((items.len() as u64).to_le_bytes());
                for i in items {
                    put_value(out, i);
                }
            }
        }
    }
    let mut out = Vec::new();
    out.extend(MAGIC);
    out.extend(3u32.to_le_bytes());
    out.extend((tensors.len() as u64).to_le_bytes());
    out.extend((kv.len() as u64).to_le_bytes());
    for (k, v) in kv {
        put_str(&mut out, k.as_bytes());
        out.extend(type_id(v).to_le_bytes());
        put_value(&mut out, v);
    }
    let mut offset = 0u64;
    let mut offsets = Vec::new();
    for (name, ne, ty, data) in tensors {
        put_str(&mut out, name.as_bytes());
        out.extend((ne.len() as u32).to_le_bytes());
        for d in ne {
            out.extend(d.to_le_bytes());
        }
        out.extend(ty.id().to_le_bytes());
        out.extend(offset.to_le_bytes());
        offsets.push(offset);
        offset = (offset + data.len() as u64).next_multiple_of(alignment);
    }
    let data_start = (out.len() as u64).next_multiple_of(alignment);
    out.resize(data_start as usize, 0);
    for ((_, _, _, data), off) in tensors.iter().zip(offsets) {
        out.resize((data_start + off) as usize, 0);
        out.extend(*data);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        let f32s: Vec<u8> = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let q8: Vec<u8> = (0..2 * 34).map(|i| i as u8).collect();
        write(
            &[
                ("general.architecture", Value::Str(b"llama".to_vec())),
                ("llama.block_count", Value::U32(1)),
                ("general.alignment", Value::U32(64)),
                (
                    "tokenizer.ggml.tokens",
                    Value::Array(vec![Value::Str(b"a".to_vec()), Value::Str(b"b".to_vec())]),
                ),
                (
                    "tokenizer.ggml.scores",
                    Value::Array(vec![Value::F32(0.5), Value::F32(-1.0)]),
                ),
                ("flag", Value::Bool(true)),
            ],
            &[
                ("norm", vec![6], GgmlType::F32, &f32s),
                ("mat", vec![32, 2], GgmlType::Q8_0, &q8),
            ],
            64,
        )
    }

    #[test]
    fn a_written_file_parses_back() {
        let bytes = sample();
        let p = parse(&bytes).unwrap();
        assert_eq!(p.version, 3);
        assert_eq!(p.alignment, 64);
        assert_eq!(p.metadata["llama.block_count"].as_u64(), Some(1));
        assert_eq!(p.metadata["general.architecture"].as_str(), Some("llama"));
        assert_eq!(p.metadata["flag"], Value::Bool(true));
        let Value::Array(tokens) = &p.metadata["tokenizer.ggml.tokens"] else {
            panic!()
        };
        assert_eq!(tokens.len(), 2);
        assert_eq!(p.tensors.len(), 2);
        let (norm, mat) = (&p.tensors[0], &p.tensors[1]);
        assert_eq!((norm.shape(), norm.len), (vec![6], 24));
        assert_eq!((mat.shape(), mat.len, mat.ty), (vec![2, 32], 68, GgmlType::Q8_0));
        assert_eq!(norm.start % 64, 0);
        assert_eq!(mat.start % 64, 0);
        assert_eq!(&bytes[mat.start..mat.start + 4], &[0, 1, 2, 3]);
        let f: Vec<f32> = bytes[norm.start..norm.start + 24]
            .chunks(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(f, [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    }

    fn error_of(bytes: &[u8]) -> String {
        format!("{:#}", parse(bytes).err().expect("parse should fail"))
    }

    #[test]
    fn damaged_files_are_errors_that_say_what_is_wrong() {
        let good = sample();
        // Truncated anywhere: an error, never a panic; cut inside the data names the tensor.
        for cut in 0..good.len() {
            assert!(parse(&good[..cut]).is_err(), "cut at {cut}");
        }
        let msg = error_of(&good[..good.len() - 1]);
        assert!(msg.contains("'mat'") && msg.contains("truncated"), "{msg}");
        assert!(error_of(b"GGML\x03\0\0\0").contains("not a GGUF file"));
        let mut v1 = good.clone();
        v1[4] = 1;
        assert!(error_of(&v1).contains("version 1"));
        let mut big = good.clone();
        big[4..8].copy_from_slice(&3u32.to_be_bytes());
        assert!(error_of(&big).contains("big-endian"));

        // A tensor count far past what the file could hold is refused before allocating.
        let mut count = good.clone();
        count[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(error_of(&count).contains("tensor count"));
        // A string whose length runs past the end names the key.
        let key_len_at = 24;
        let mut long = good.clone();
        long[key_len_at..key_len_at + 8].copy_from_slice(&(1u64 << 40).to_le_bytes());
        assert!(error_of(&long).contains("metadata key #0"), "{}", error_of(&long));
    }

    #[test]
    fn tensor_table_errors_name_the_tensor() {
        let data = [0u8; 68];
        let with = |ne: Vec<u64>, ty: GgmlType, align: u64| {
            write(
                &[("general.alignment", Value::U32(align as u32))],
                &[("t", ne, ty, &data)],
                align,
            )
        };
        let ok = with(vec![32, 2], GgmlType::Q8_0, 32);
        assert!(parse(&ok).is_ok());
        // Rows that are not whole blocks.
        let msg = error_of(&with(vec![33, 2], GgmlType::Q8_0, 32));
        assert!(msg.contains("'t'") && msg.contains("block size 32"), "{msg}");
        // A shape that overflows.
        let msg = error_of(&with(vec![1 << 40, 1 << 40], GgmlType::F32, 32));
        assert!(msg.contains("'t'") && msg.contains("impossible shape"), "{msg}");
        // A misaligned offset: the table entry of 't' is its name, 2 dims, [32, 2], the type
        // and the offset.
        let mut entry = Vec::new();
        entry.extend(1u64.to_le_bytes());
        entry.extend(b"t");
        entry.extend(2u32.to_le_bytes());
        entry.extend(32u64.to_le_bytes());
        entry.extend(2u64.to_le_bytes());
        entry.extend(GgmlType::Q8_0.id().to_le_bytes());
        let mut bytes = ok.clone();
        let off_at = (0..bytes.len() - entry.len())
            .find(|&i| bytes[i..i + entry.len()] == entry[..])
            .unwrap()
            + entry.len();
        bytes[off_at..off_at + 8].copy_from_slice(&4u64.to_le_bytes());
        let msg = error_of(&bytes);
        assert!(msg.contains("'t'") && msg.contains("alignment"), "{msg}");
        // An unknown or unsupported type.
        bytes[off_at..off_at + 8].copy_from_slice(&0u64.to_le_bytes());
        bytes[off_at - 4..off_at].copy_from_slice(&16u32.to_le_bytes());
        let msg = error_of(&bytes);
        assert!(msg.contains("'t'") && msg.contains("IQ2_XXS"), "{msg}");
        bytes[off_at - 4..off_at].copy_from_slice(&999u32.to_le_bytes());
        assert!(error_of(&bytes).contains("999"));
        // Bad alignment values.
        let bad = write(&[("general.alignment", Value::U32(3))], &[], 32);
        assert!(error_of(&bad).contains("general.alignment"));
    }

    /// Deterministic mutations of a valid file: every one parses or fails with an error, and
    /// whatever parses only points inside the file.
    #[test]
    fn mutated_files_never_panic() {
        let good = sample();
        let mut s = 0x9E37_79B9u32;
        let mut next = || {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            s
        };
        for _ in 0..20_000 {
            let mut bytes = good.clone();
            for _ in 0..1 + next() % 4 {
                let at = next() as usize % bytes.len();
                bytes[at] = match next() % 4 {
                    0 => 0xFF,
                    1 => 0,
                    _ => next() as u8,
                };
            }
            if let Ok(p) = parse(&bytes) {
                for t in &p.tensors {
                    assert!(t.start + t.len <= bytes.len());
                }
            }
        }
        for n in 0..2_000 {
            let len = next() as usize % 256;
            let mut bytes: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            if n % 2 == 0 && bytes.len() >= 8 {
                bytes[..4].copy_from_slice(MAGIC);
                bytes[4..8].copy_from_slice(&3u32.to_le_bytes());
            }
            let _ = parse(&bytes);
        }
    }
}
