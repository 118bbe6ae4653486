//! Tensors over weight bytes: the dtype tag, the shape, and typed read-only views.
//!
//! Weights stay in their stored dtype: a `Tensor` borrows its bytes from a memory-mapped
//! checkpoint (or owns an aligned copy when the file's offset is misaligned for the dtype).
//! This module knows nothing of models or kernels; it only hands out typed slices.

pub mod ggml;
pub mod quant;

pub use ggml::{GgmlMatrix, GgmlType};
pub use quant::{Matrix, QMatrix, Quant};

use std::fmt;
use std::sync::Arc;

use anyhow::{bail, Result};
use half::{bf16, f16};
use memmap2::Mmap;

/// Element type of a stored tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    BF16,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }

    /// The lower-case name used on the command line and in `gyre info`.
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Where a tensor's (or a quantized matrix's) bytes live.
#[derive(Clone)]
pub(crate) enum Bytes {
    /// A byte range of a shared memory map.
    Mapped {
        map: Arc<Mmap>,
        start: usize,
        len: usize,
    },
    /// An owned copy, 8-byte aligned (u64 backing) so any dtype view is aligned.
    Owned { words: Arc<Vec<u64>>, len: usize },
}

impl Bytes {
    /// An owned copy of `raw`: in huge-page-advised anonymous memory when it is large,
    /// otherwise on the heap (8-byte aligned either way).
    pub(crate) fn copy_of(raw: &[u8]) -> Bytes {
        if raw.len() >= HUGE_COPY_BYTES {
            if let Some(map) = huge_page_copy(raw) {
                let len = raw.len();
                return Bytes::Mapped {
                    map: Arc::new(map),
                    start: 0,
                    len,
                };
            }
        }
        let mut words = vec![0u64; raw.len().div_ceil(8)];
        bytemuck::cast_slice_mut::<u64, u8>(&mut words)[..raw.len()].copy_from_slice(raw);
        Bytes::Owned {
            words: Arc::new(words),
            len: raw.len(),
        }
    }

    pub(crate) fn as_slice(&self) -> &[u8] {
        match self {
            Bytes::Mapped { map, start, len } => &map[*start..*start + *len],
            Bytes::Owned { words, len } => &bytemuck::cast_slice::<u64, u8>(words)[..*len],
        }
    }
}

/// A read-only tensor in its stored dtype. Cloning is cheap (shared bytes).
#[derive(Clone)]
pub struct Tensor {
    dtype: DType,
    shape: Vec<usize>,
    bytes: Bytes,
}

/// Owned copies at least this large go to anonymous memory advised for transparent huge
/// pages: decode streams every weight once per token, and 2 MiB pages spare the TLB and keep
/// the hardware prefetchers running across what would be 4 KiB page boundaries.
const HUGE_COPY_BYTES: usize = 4 << 20;

/// A read-only anonymous mapping holding a copy of `raw`, advised for huge pages; `None` if
/// the kernel refuses the mapping (the caller then falls back to the heap).
fn huge_page_copy(raw: &[u8]) -> Option<Mmap> {
    let mut map = memmap2::MmapMut::map_anon(raw.len()).ok()?;
    #[cfg(target_os = "linux")]
    {
        // Only a hint: without THP support the mapping simply keeps 4 KiB pages.
        let _ = map.advise(memmap2::Advice::HugePage);
    }
    map.copy_from_slice(raw);
    map.make_read_only().ok()
}

/// A typed view of a tensor's elements.
#[derive(Clone, Copy)]
pub enum TensorData<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
    BF16(&'a [bf16]),
}

impl fmt::Debug for Tensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Tensor({}, {:?})", self.dtype, self.shape)
    }
}

fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

impl Tensor {
    /// A tensor over `len` bytes of `map` starting at `start`. Copies into an aligned buffer
    /// when the mapped address is not aligned for the dtype.
    pub fn from_mmap(
        map: Arc<Mmap>,
        start: usize,
        len: usize,
        dtype: DType,
        shape: Vec<usize>,
    ) -> Result<Tensor> {
        if numel(&shape) * dtype.size() != len {
            bail!("{} bytes do not hold a {dtype} tensor of shape {shape:?}", len);
        }
        if start.checked_add(len).is_none_or(|end| end > map.len()) {
            bail!("byte range {start}..{} is past the end of the file", start + len);
        }
        let addr = map.as_ptr() as usize + start;
        if addr.is_multiple_of(dtype.size()) {
            return Ok(Tensor {
                dtype,
                shape,
                bytes: Bytes::Mapped { map, start, len },
            });
        }
        Ok(Tensor::from_bytes(&map[start..start + len], dtype, shape))
    }

    /// A tensor owning a copy of `raw` (little-endian elements).
    pub fn from_bytes(raw: &[u8], dtype: DType, shape: Vec<usize>) -> Tensor {
        assert_eq!(raw.len(), numel(&shape) * dtype.size(), "tensor byte length");
        Tensor {
            dtype,
            shape,
            bytes: Bytes::copy_of(raw),
        }
    }

    /// An owned f32 tensor.
    pub fn from_f32(values: &[f32], shape: Vec<usize>) -> Tensor {
        Tensor::from_bytes(bytemuck::cast_slice(values), DType::F32, shape)
    }

    /// An owned bf16 tensor, rounding `values` to nearest-even.
    pub fn from_f32_as_bf16(values: &[f32], shape: Vec<usize>) -> Tensor {
        let v: Vec<bf16> = values.iter().map(|&x| bf16::from_f32(x)).collect();
        Tensor::from_bytes(bytemuck::cast_slice(&v), DType::BF16, shape)
    }

    /// An owned f16 tensor, rounding `values` to nearest-even.
    pub fn from_f32_as_f16(values: &[f32], shape: Vec<usize>) -> Tensor {
        let v: Vec<f16> = values.iter().map(|&x| f16::from_f32(x)).collect();
        Tensor::from_bytes(bytemuck::cast_slice(&v), DType::F16, shape)
    }

    /// Stored element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Shape, outermost first.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        numel(&self.shape)
    }

    /// Bytes of storage.
    pub fn nbytes(&self) -> usize {
        self.numel() * self.dtype.size()
    }

    /// Raw little-endian bytes.
    pub fn raw(&self) -> &[u8] {
        self.bytes.as_slice()
    }

    /// Typed view of the elements.
    pub fn data(&self) -> TensorData<'_> {
        let raw = self.raw();
        // The constructors guarantee alignment for the dtype, so these casts cannot fail.
        match self.dtype {
            DType::F32 => TensorData::F32(bytemuck::cast_slice(raw)),
            DType::F16 => TensorData::F16(bytemuck::cast_slice(raw)),
            DType::BF16 => TensorData::BF16(bytemuck::cast_slice(raw)),
        }
    }

    /// The same bytes viewed with another shape of equal element count.
    pub fn reshape(&self, shape: Vec<usize>) -> Result<Tensor> {
        if numel(&shape) != self.numel() {
            bail!("cannot reshape {:?} to {shape:?}", self.shape);
        }
        Ok(Tensor {
            dtype: self.dtype,
            shape,
            bytes: self.bytes.clone(),
        })
    }

    /// All elements widened to f32 (for small tensors: norms, biases, fixtures).
    pub fn to_f32_vec(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.numel()];
        self.data().row_to_f32(0, &mut out);
        out
    }
}

impl TensorData<'_> {
    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            TensorData::F32(s) => s.len(),
            TensorData::F16(s) => s.len(),
            TensorData::BF16(s) => s.len(),
        }
    }

    /// True when there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Widens `out.len()` elements starting at element `start` into `out`.
    pub fn row_to_f32(&self, start: usize, out: &mut [f32]) {
        let n = out.len();
        match self {
            TensorData::F32(s) => out.copy_from_slice(&s[start..start + n]),
            // `half` picks the F16C conversion at run time when the CPU has it.
            TensorData::F16(s) => {
                half::slice::HalfFloatSliceExt::convert_to_f32_slice(&s[start..start + n], out)
            }
            TensorData::BF16(s) => {
                for (o, v) in out.iter_mut().zip(&s[start..start + n]) {
                    *o = f32::from_bits((v.to_bits() as u32) << 16);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owned_tensors_round_trip_each_dtype() {
        let v = [1.0f32, -2.5, 3.25, 0.0, 1e-3, 65504.0];
        let t = Tensor::from_f32(&v, vec![2, 3]);
        assert_eq!(t.to_f32_vec(), v);
        let b = Tensor::from_f32_as_bf16(&v, vec![6]);
        assert_eq!(b.nbytes(), 12);
        for (x, y) in b.to_f32_vec().iter().zip(v) {
            assert!((x - y).abs() <= y.abs() / 128.0 + 1e-6);
        }
        let h = Tensor::from_f32_as_f16(&v, vec![6]);
        for (x, y) in h.to_f32_vec().iter().zip(v) {
            assert!((x - y).abs() <= y.abs() / 1024.0 + 1e-6);
        }
        assert!(t.reshape(vec![3, 2]).is_ok());
        assert!(t.reshape(vec![4, 2]).is_err());
    }

    #[test]
    fn misaligned_bytes_are_copied_aligned() {
        let mut raw = vec![0u8; 1];
        raw.extend(bytemuck::cast_slice::<f32, u8>(&[1.5f32, 2.5]));
        let t = Tensor::from_bytes(&raw[1..], DType::F32, vec![2]);
        assert_eq!(t.to_f32_vec(), vec![1.5, 2.5]);
    }
}
