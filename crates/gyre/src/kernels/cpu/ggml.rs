//! Decode products of GGUF block-quantized rows with the int16 activation
//! (`tensor::ggml`): `out[j] = row(first + j) · x`.
//!
//! The scalar statement of each product is `tensor::ggml::dot_row`; the versions here compute
//! the same integer sums, compiled for AVX-512 (BW + VNNI) and AVX2 where the CPU has them and
//! chosen at run time.

use crate::tensor::ggml::{dot_row, Activation16, GgmlMatrix};

/// `out[j] = row(first + j) · a` for every `j < out.len()`.
pub fn rows_times(m: &GgmlMatrix, a: &Activation16, first: usize, out: &mut [f32]) {
    assert_eq!(a.q.len(), m.cols(), "ggml rows_times: activation length");
    let ty = m.ty();
    for (j, o) in out.iter_mut().enumerate() {
        let row = m.row(first + j);
        *o = dot(ty, row, a);
    }
}

/// One row's product through the best compiled version of [`dot_row`].
fn dot(ty: crate::tensor::GgmlType, row: &[u8], a: &Activation16) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        use super::simd;
        if simd::has_avx512vnni() {
            // SAFETY: AVX-512F/BW/VNNI were detected at run time.
            return unsafe { generic::dot_avx512(ty, row, a) };
        }
        if simd::level() == simd::Level::Avx2 || simd::level() == simd::Level::Avx512 {
            // SAFETY: AVX2 and FMA were detected at run time.
            return unsafe { generic::dot_avx2(ty, row, a) };
        }
    }
    dot_row(ty, row, a)
}

/// [`dot_row`] compiled with wider instruction sets (the compiler vectorises its loops).
#[cfg(target_arch = "x86_64")]
mod generic {
    use crate::tensor::ggml::{dot_row_inline, Activation16};
    use crate::tensor::GgmlType;

    /// # Safety
    /// AVX-512F, AVX-512BW, AVX-512VL and AVX-512 VNNI must be present.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")]
    pub unsafe fn dot_avx512(ty: GgmlType, row: &[u8], a: &Activation16) -> f32 {
        dot_row_inline(ty, row, a)
    }

    /// # Safety
    /// AVX2 and FMA must be present.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_avx2(ty: GgmlType, row: &[u8], a: &Activation16) -> f32 {
        dot_row_inline(ty, row, a)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::cpu::tests::pseudo;
    use crate::tensor::ggml::quantize_row;
    use crate::tensor::GgmlType;

    /// Every format and path against the scalar product, over several lengths and rows that
    /// start anywhere.
    #[test]
    fn every_format_matches_the_scalar_product() {
        for ty in GgmlType::QUANTIZED {
            for &(rows, cols) in &[(1, 256), (9, 512), (17, 768), (8, 1024)] {
                let rb = ty.row_bytes(cols);
                let mut raw = vec![0u8; rows * rb];
                let w = pseudo(rows * cols, 21);
                for (r, o) in raw.chunks_exact_mut(rb).enumerate() {
                    quantize_row(ty, &w[r * cols..(r + 1) * cols], o);
                }
                let m = GgmlMatrix::from_bytes(&raw, ty, rows, cols).unwrap();
                let x = pseudo(cols, 23);
                let a = Activation16::new(&x, ty.block_size(), &mut Vec::new());
                for first in [0, rows / 2] {
                    let mut got = vec![0f32; rows - first];
                    rows_times(&m, &a, first, &mut got);
                    for (j, g) in got.iter().enumerate() {
                        let want = dot_row(ty, m.row(first + j), &a);
                        assert!(
                            (g - want).abs() <= 1e-5 * (1.0 + want.abs()),
                            "{ty} {rows}x{cols} row {}: {g} vs {want}",
                            first + j
                        );
                    }
                }
            }
        }
    }
}
