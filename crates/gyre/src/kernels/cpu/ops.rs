//! Elementwise, normalisation, rotary and attention kernels over f32 slices.

use super::dot;

/// Llama RMSNorm (transformers `LlamaRMSNorm`): `y = x · rsqrt(mean(x²) + eps) · w`.
/// Shapes: `x`, `out` [n_rows, d], `w` [d].
pub fn rmsnorm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let d = w.len();
    for (xr, yr) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        let inv = rms_inverse(xr, eps);
        for ((y, &v), &g) in yr.iter_mut().zip(xr).zip(w) {
            *y = v * inv * g;
        }
    }
}

/// Gemma RMSNorm: `y = x · rsqrt(mean(x²) + eps) · (1 + w)`. Shapes as [`rmsnorm`].
pub fn rmsnorm_gemma(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let d = w.len();
    for (xr, yr) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        let inv = rms_inverse(xr, eps);
        for ((y, &v), &g) in yr.iter_mut().zip(xr).zip(w) {
            *y = v * inv * (1.0 + g);
        }
    }
}

fn rms_inverse(x: &[f32], eps: f32) -> f32 {
    let ms = dot(x, x) / x.len() as f32;
    1.0 / (ms + eps).sqrt()
}

/// LayerNorm over rows of `w.len()`: `y = (x − mean) / sqrt(var + eps) · w + b` (biased variance).
pub fn layernorm(x: &[f32], w: &[f32], b: &[f32], eps: f32, out: &mut [f32]) {
    let d = w.len();
    for (xr, yr) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        let mean = xr.iter().sum::<f32>() / d as f32;
        let var = xr.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / d as f32;
        let inv = 1.0 / (var + eps).sqrt();
        for i in 0..d {
            yr[i] = (xr[i] - mean) * inv * w[i] + b[i];
        }
    }
}

/// Σ x[i] (sixteen partial sums, so it vectorises).
pub fn sum(x: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let chunks = x.chunks_exact(16);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for i in 0..16 {
            acc[i] += c[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// [`layernorm`] of one row, overwriting it.
pub fn layernorm_in_place(x: &mut [f32], w: &[f32], b: &[f32], eps: f32) {
    let d = x.len() as f32;
    let mean = x.iter().sum::<f32>() / d;
    let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / d;
    let inv = 1.0 / (var + eps).sqrt();
    for ((v, &g), &bias) in x.iter_mut().zip(w).zip(b) {
        *v = (*v - mean) * inv * g + bias;
    }
}

/// In-place softmax over all of `x` (max-subtracted, f32).
pub fn softmax(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        return;
    }
    let mut sum = 0.0;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

/// SiLU: `x · sigmoid(x)`.
#[inline]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// GELU with the tanh approximation (PyTorch `gelu(approximate="tanh")`).
#[inline]
pub fn gelu_tanh(x: f32) -> f32 {
    const C: f32 = 0.797_884_6; // sqrt(2/π)
    0.5 * x * (1.0 + (C * (x + 0.044_715 * x * x * x)).tanh())
}

/// `gate[i] = silu(gate[i]) · up[i]` (SwiGLU).
pub fn swiglu(gate: &mut [f32], up: &[f32]) {
    for (g, &u) in gate.iter_mut().zip(up) {
        *g = silu(*g) * u;
    }
}

/// `acc[i] += x[i]`.
pub fn add_assign(acc: &mut [f32], x: &[f32]) {
    for (a, &v) in acc.iter_mut().zip(x) {
        *a += v;
    }
}

/// RoPE inverse frequencies as transformers computes them in f32:
/// `inv_freq[i] = 1 / theta^(2i / rot_dim)` for i < rot_dim/2.
pub fn rope_inv_freq(theta: f64, rot_dim: usize) -> Vec<f32> {
    (0..rot_dim / 2)
        .map(|i| 1.0 / (theta as f32).powf((2 * i) as f32 / rot_dim as f32))
        .collect()
}

/// Rotates the first `2·inv_freq.len()` dims of every head in `x` ([n_heads, head_dim]) by
/// position `pos`, half-split pairing (transformers `rotate_half`): dim i pairs with i + rot/2.
/// Angles are computed in f32 (`pos · inv_freq`), as transformers does.
pub fn rope_half_split(x: &mut [f32], head_dim: usize, pos: usize, inv_freq: &[f32]) {
    let half = inv_freq.len();
    for (i, &f) in inv_freq.iter().enumerate() {
        let (sin, cos) = (pos as f32 * f).sin_cos();
        for head in x.chunks_exact_mut(head_dim) {
            let (x1, x2) = (head[i], head[i + half]);
            head[i] = x1 * cos - x2 * sin;
            head[i + half] = x2 * cos + x1 * sin;
        }
    }
}

/// Attention of the queries `qs` [n_q, hd] that share their keys (the query heads of one
/// KV head, grouped-query attention): `out[q] = softmax(qs[q]·kᵢ · scale) · vᵢ` over
/// `n_keys` keys, `out` [n_q, hd]. Each key and value is fetched once for all the queries
/// and the loops run without a call per key. `kv(i)` returns key i and value i (each [hd]);
/// `scores` is scratch space, grown as needed.
pub fn attend_shared<'a>(
    qs: &[f32],
    hd: usize,
    n_keys: usize,
    kv: impl Fn(usize) -> (&'a [f32], &'a [f32]),
    scale: f32,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    assert!(
        hd > 0 && qs.len().is_multiple_of(hd) && out.len() == qs.len(),
        "attend_shared: shapes"
    );
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU supports AVX2 and FMA (checked just above), all that
        // `attend_shared_avx2` was compiled to require.
        unsafe { attend_shared_avx2(qs, hd, n_keys, kv, scale, scores, out) };
        return;
    }
    attend_shared_body(qs, hd, n_keys, kv, scale, scores, out);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn attend_shared_avx2<'a>(
    qs: &[f32],
    hd: usize,
    n_keys: usize,
    kv: impl Fn(usize) -> (&'a [f32], &'a [f32]),
    scale: f32,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    attend_shared_body(qs, hd, n_keys, kv, scale, scores, out);
}

/// [`attend_shared`]'s loops, inlined into each instruction-set variant.
#[inline(always)]
fn attend_shared_body<'a>(
    qs: &[f32],
    hd: usize,
    n_keys: usize,
    kv: impl Fn(usize) -> (&'a [f32], &'a [f32]),
    scale: f32,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    // scores [n_q, n_keys]
    scores.clear();
    scores.resize(qs.len() / hd * n_keys, 0.0);
    for j in 0..n_keys {
        let key = kv(j).0;
        for (q, row) in qs.chunks_exact(hd).enumerate() {
            scores[q * n_keys + j] = super::dot::dot_lanes(row, key) * scale;
        }
    }
    for row in scores.chunks_exact_mut(n_keys.max(1)) {
        softmax(row);
    }
    out.fill(0.0);
    for j in 0..n_keys {
        let value = kv(j).1;
        for (q, o) in out.chunks_exact_mut(hd).enumerate() {
            let p = scores[q * n_keys + j];
            for (o, &v) in o.iter_mut().zip(value) {
                *o += p * v;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rmsnorm_matches_definition() {
        let x = [1.0f32, -2.0, 3.0, 0.5, 2.0, 2.0];
        let w = [0.5f32, 1.0, 2.0];
        let mut y = [0.0; 6];
        rmsnorm(&x, &w, 1e-5, &mut y);
        for r in 0..2 {
            let row = &x[r * 3..r * 3 + 3];
            let ms: f64 = row.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / 3.0;
            for i in 0..3 {
                let want = row[i] as f64 / (ms + 1e-5).sqrt() * w[i] as f64;
                assert!((y[r * 3 + i] as f64 - want).abs() < 1e-6);
            }
        }
        rmsnorm_gemma(&x, &w, 1e-6, &mut y);
        let ms: f64 = x[..3].iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / 3.0;
        assert!((y[2] as f64 - 3.0 / (ms + 1e-6).sqrt() * 3.0).abs() < 1e-5);
    }

    #[test]
    fn softmax_sums_to_one_and_handles_masked_rows() {
        let mut v = [1.0f32, 2.0, 3.0, f32::NEG_INFINITY];
        softmax(&mut v);
        assert!((v.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert_eq!(v[3], 0.0);
        let mut all_masked = [f32::NEG_INFINITY; 3];
        softmax(&mut all_masked);
        assert!(all_masked.iter().all(|v| *v == f32::NEG_INFINITY));
    }

    #[test]
    fn rope_rotates_pairs_and_keeps_norms() {
        let inv = rope_inv_freq(10000.0, 8);
        let mut x: Vec<f32> = (0..16).map(|i| i as f32 * 0.1 - 0.5).collect();
        let before = x.clone();
        rope_half_split(&mut x, 16, 5, &inv);
        // Pair (0, 4): rotated by angle 5·inv[0] = 5; dims 8..16 untouched.
        let (c, s) = (5f32.cos(), 5f32.sin());
        assert!((x[0] - (before[0] * c - before[4] * s)).abs() < 1e-6);
        assert!((x[4] - (before[4] * c + before[0] * s)).abs() < 1e-6);
        assert_eq!(&x[8..], &before[8..]);
        rope_half_split(&mut x, 16, 0, &inv);
        let n = |v: &[f32]| v.iter().map(|a| a * a).sum::<f32>();
        assert!((n(&x) - n(&before)).abs() < 1e-4);
    }

    #[test]
    fn attend_weights_values_by_softmax() {
        let keys = [[1.0f32, 0.0], [0.0, 1.0]];
        let vals = [[10.0f32, 0.0], [0.0, 10.0]];
        let mut out = [0.0; 2];
        let mut scratch = Vec::new();
        attend_shared(
            &[2.0, 0.0],
            2,
            2,
            |i| (&keys[i][..], &vals[i][..]),
            1.0,
            &mut scratch,
            &mut out,
        );
        let p0 = 1.0 / (1.0 + (-2f32).exp());
        assert!((out[0] - 10.0 * p0).abs() < 1e-5 && (out[1] - 10.0 * (1.0 - p0)).abs() < 1e-5);
    }

    #[test]
    fn shared_keys_give_each_query_its_own_attention() {
        // Three queries over five keys of dim 20 against the definition in f64.
        let (n_q, n, hd, scale) = (3, 5, 20, 0.3);
        let qs = super::super::tests::pseudo(n_q * hd, 1);
        let ks = super::super::tests::pseudo(n * hd, 2);
        let vs = super::super::tests::pseudo(n * hd, 3);
        let mut out = vec![0f32; n_q * hd];
        let kv = |j: usize| (&ks[j * hd..(j + 1) * hd], &vs[j * hd..(j + 1) * hd]);
        attend_shared(&qs, hd, n, kv, scale, &mut Vec::new(), &mut out);
        for q in 0..n_q {
            let s: Vec<f64> = (0..n)
                .map(|j| {
                    (0..hd)
                        .map(|d| qs[q * hd + d] as f64 * ks[j * hd + d] as f64)
                        .sum::<f64>()
                        * scale as f64
                })
                .collect();
            let z: f64 = s.iter().map(|v| v.exp()).sum();
            for d in 0..hd {
                let want: f64 = (0..n).map(|j| s[j].exp() / z * vs[j * hd + d] as f64).sum();
                assert!((out[q * hd + d] as f64 - want).abs() < 1e-5, "query {q} dim {d}");
            }
        }
    }

    #[test]
    fn activations() {
        assert!((silu(1.0) - 0.731_058_6).abs() < 1e-6);
        assert!((gelu_tanh(1.0) - 0.841_192).abs() < 1e-5);
        let x = [1.0f32, 2.0, 3.0, 4.0];
        let (w, b) = ([1.0f32; 4], [0.0f32; 4]);
        let mut y = [0.0; 4];
        layernorm(&x, &w, &b, 0.0, &mut y);
        assert!((y.iter().sum::<f32>()).abs() < 1e-5);
        let mut z = x;
        layernorm_in_place(&mut z, &w, &b, 0.0);
        assert_eq!(z, y);
    }
}
