// gyre's CUDA kernels, compiled at run time by NVRTC (no CUDA headers needed).
//
// Activations are f32 everywhere; weights stay in their stored dtype (bf16, f16 or f32) and
// are widened in registers. Every kernel mirrors a CPU kernel in kernels/cpu (named in its
// comment); shapes are row-major. Per-sequence values that change from step to step (rows,
// positions, state pointers) are read from device memory, so a captured decode step replays
// with new positions.

typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

#define GYRE_INF __int_as_float(0x7f800000)

// Programmatic dependent launch (Hopper and later). Every kernel lets the next one start
// early (ALLOW_DEPENDENTS, at its top); only kernels launched with the programmatic
// attribute (the GEMVs, with GYRE_CUDA_PDL=1) do, and they WAIT_FOR_PRIOR_GRIDS before
// touching anything but their weights: the first weight loads overlap the previous
// kernel's tail. Without the attribute both are no-ops.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define WAIT_FOR_PRIOR_GRIDS() asm volatile("griddepcontrol.wait;" ::: "memory")
#define ALLOW_DEPENDENTS() asm volatile("griddepcontrol.launch_dependents;" ::: "memory")
#else
#define WAIT_FOR_PRIOR_GRIDS()
#define ALLOW_DEPENDENTS()
#endif

// The CPU emulator (emulator.cpp) replaces the few PTX-specific pieces below.
#ifndef GYRE_DYNAMIC_SHARED
#define GYRE_DYNAMIC_SHARED(T, name) extern __shared__ T name[]
#endif

#define DT_F32 0
#define DT_F16 1
#define DT_BF16 2

__device__ __forceinline__ float bf16_to_f32(u16 h) { return __uint_as_float(((u32)h) << 16); }

__device__ __forceinline__ float f16_to_f32(u16 h) {
#ifdef GYRE_EMULATOR
    return gyre_emu_f16_to_f32(h);
#else
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
#endif
}

// Round to nearest even (NaN stays NaN), as half::bf16::from_f32.
__device__ __forceinline__ u16 f32_to_bf16(float f) {
    u32 u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    u += 0x7fffu + ((u >> 16) & 1u);
    return (u16)(u >> 16);
}

__device__ __forceinline__ u16 f32_to_f16(float f) {
#ifdef GYRE_EMULATOR
    return gyre_emu_f32_to_f16(f);
#else
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
#endif
}

__device__ __forceinline__ float load_elem(const void* p, size_t i, int dtype) {
    if (dtype == DT_BF16) return bf16_to_f32(((const u16*)p)[i]);
    if (dtype == DT_F16) return f16_to_f32(((const u16*)p)[i]);
    return ((const float*)p)[i];
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets it.
__device__ float block_sum(float v) {
    __shared__ float part[32];
    __shared__ float total;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) part[warp] = v;
    __syncthreads();
    if (warp == 0) {
        float s = lane < (int)(blockDim.x >> 5) ? part[lane] : 0.0f;
        s = warp_sum(s);
        if (lane == 0) total = s;
    }
    __syncthreads();
    return total;
}

__device__ __forceinline__ float sigmoidf_(float x) { return 1.0f / (1.0f + expf(-x)); }

__device__ __forceinline__ float gelu_tanh(float x) {
    const float c = 0.7978846f;  // sqrt(2/pi), as kernels/cpu/ops.rs
    return 0.5f * x * (1.0f + tanhf(c * (x + 0.044715f * x * x * x)));
}

// Streaming 16-byte load: weights are read once per step, keep them out of L1.
__device__ __forceinline__ uint4 ld_stream(const uint4* p) {
#ifdef GYRE_EMULATOR
    return *p;
#else
    uint4 r;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
                 : "l"(p));
    return r;
#endif
}

// ---------------------------------------------------------------------------------------
// Matrix-vector products for a few rows (decode): y[r, o] (+)= Σ_i W[o, i] · x[r, i] (+ b[o]).
// W is [n_out, n_in] (nn.Linear layout). One warp per output feature, every row at once, so
// each weight is read once whatever the number of rows (≤ GEMV_ROWS). Grouped: blockIdx.y
// selects a block-diagonal group g (W + g·w_group, x + g·x_group, y + g·y_group, b + g·n_out).
// CPU counterpart: kernels/cpu/gemv.rs `rows_times`.

#define GEMV_ROWS 8

struct WBf16 {
    typedef u16 T;
    static const int VEC = 8;
    __device__ static void widen(uint4 q, float* o) {
        u32 w[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
        for (int i = 0; i < 4; i++) {
            o[2 * i] = __uint_as_float(w[i] << 16);
            o[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
        }
    }
    __device__ static float one(const T* p, size_t i) { return bf16_to_f32(p[i]); }
};

struct WF16 {
    typedef u16 T;
    static const int VEC = 8;
    __device__ static void widen(uint4 q, float* o) {
        u32 w[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
        for (int i = 0; i < 4; i++) {
            o[2 * i] = f16_to_f32((u16)(w[i] & 0xffffu));
            o[2 * i + 1] = f16_to_f32((u16)(w[i] >> 16));
        }
    }
    __device__ static float one(const T* p, size_t i) { return f16_to_f32(p[i]); }
};

struct WF32 {
    typedef float T;
    static const int VEC = 4;
    __device__ static void widen(uint4 q, float* o) {
        o[0] = __uint_as_float(q.x);
        o[1] = __uint_as_float(q.y);
        o[2] = __uint_as_float(q.z);
        o[3] = __uint_as_float(q.w);
    }
    __device__ static float one(const T* p, size_t i) { return p[i]; }
};

// One warp per output feature o, R rows at once (R a compile-time 1, 2, 4 or 8 ≥ rows,
// so registers match the work and occupancy stays high). Each lane issues four 16-byte
// streaming loads of the row before using any of them: enough bytes in flight per SM to
// reach the memory's bandwidth. Epilogues (`mode`): 0 y = s, 1 y += s, 2 y = relu(s)²,
// 3 y += s · sigmoid(aux[r, o]) (aux row stride y_stride), where s = Σ_i W[o, i]·x[r, i]
// (+ bias[o]).
//
// GATED: W is [gate; up], [2·n_out, n_in] (one group); the warp of feature o reads both
// row o and row n_out + o against the same activations and stores the gated MLP's
// y = act(s_gate) · s_up, act SiLU (mode 4) or GELU-tanh (mode 5), biases bias[o] and
// bias[n_out + o] added first.
//
// norm_w (not null; one group): the activations are RMS-normalised on the way in, as
// kernels/cpu/ops.rs rmsnorm with weight norm_w: each warp also sums x² over the row it
// streams anyway, and s = Σ_i W[o, i]·x[r, i]·norm_w[i] / sqrt(mean(x[r]²) + norm_eps).
#define GEMV_DEPTH 4

__device__ __forceinline__ float gated_act(int mode, float gate, float up) {
    return (mode == 4 ? gate / (1.0f + expf(-gate)) : gelu_tanh(gate)) * up;
}

template <class W, int R, bool GATED>
__device__ void gemv(const void* w_, const float* __restrict__ x, float* __restrict__ y,
                     const float* __restrict__ bias, int n_in, int n_out, int rows, int x_stride,
                     int y_stride, int mode, long long w_group, int x_group, int y_group,
                     int vec_ok, const float* __restrict__ aux, const float* __restrict__ norm_w,
                     float norm_eps) {
    typedef typename W::T T;
    const int VEC = W::VEC;
    const int P = GATED ? 2 : 1;  // weight rows per warp
    ALLOW_DEPENDENTS();
    int g = blockIdx.y;
    int lane = threadIdx.x & 31;
    int o = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (o >= n_out) return;
    const T* row[P];
#pragma unroll
    for (int p = 0; p < P; p++)
        row[p] = (const T*)w_ + (size_t)g * w_group + (size_t)(o + p * n_out) * n_in;
    x += (size_t)g * x_group;
    y += (size_t)g * y_group;
    float acc[P][R], ss[R];
#pragma unroll
    for (int r = 0; r < R; r++) {
        ss[r] = 0.0f;
#pragma unroll
        for (int p = 0; p < P; p++) acc[p][r] = 0.0f;
    }
    int nvec = vec_ok ? n_in / VEC : 0;
    for (int v0 = lane; v0 < nvec; v0 += 32 * GEMV_DEPTH) {
        uint4 q[P][GEMV_DEPTH];
#pragma unroll
        for (int p = 0; p < P; p++)
#pragma unroll
            for (int u = 0; u < GEMV_DEPTH; u++)
                if (v0 + 32 * u < nvec) q[p][u] = ld_stream((const uint4*)row[p] + v0 + 32 * u);
        // The weights are in flight; the activations are the previous kernel's output.
        if (v0 == lane) WAIT_FOR_PRIOR_GRIDS();
#pragma unroll
        for (int u = 0; u < GEMV_DEPTH; u++) {
            int v = v0 + 32 * u;
            if (v < nvec) {
                float wf[P][VEC];
#pragma unroll
                for (int p = 0; p < P; p++) W::widen(q[p][u], wf[p]);
#pragma unroll
                for (int r = 0; r < R; r++) {
                    if (r < rows) {
                        const float4* xr = (const float4*)(x + (size_t)r * x_stride + v * VEC);
#pragma unroll
                        for (int c = 0; c < VEC / 4; c++) {
                            float4 a = xr[c];
                            if (norm_w) {
                                float4 nw = ((const float4*)(norm_w + v * VEC))[c];
                                ss[r] += a.x * a.x + a.y * a.y + a.z * a.z + a.w * a.w;
                                a.x *= nw.x;
                                a.y *= nw.y;
                                a.z *= nw.z;
                                a.w *= nw.w;
                            }
#pragma unroll
                            for (int p = 0; p < P; p++)
                                acc[p][r] += wf[p][4 * c] * a.x + wf[p][4 * c + 1] * a.y +
                                             wf[p][4 * c + 2] * a.z + wf[p][4 * c + 3] * a.w;
                        }
                    }
                }
            }
        }
    }
    WAIT_FOR_PRIOR_GRIDS();  // for lanes that skipped the loop above (returns at once otherwise)
    for (int i = nvec * VEC + lane; i < n_in; i += 32) {
#pragma unroll
        for (int r = 0; r < R; r++) {
            if (r < rows) {
                float xv = x[(size_t)r * x_stride + i];
                if (norm_w) {
                    ss[r] += xv * xv;
                    xv *= norm_w[i];
                }
#pragma unroll
                for (int p = 0; p < P; p++) acc[p][r] += W::one(row[p], i) * xv;
            }
        }
    }
    float b = bias ? bias[(size_t)g * n_out + o] : 0.0f;
    float b_up = GATED && bias ? bias[n_out + o] : 0.0f;
#pragma unroll
    for (int r = 0; r < R; r++) {
        if (r < rows) {
            float inv = norm_w ? 1.0f / sqrtf(warp_sum(ss[r]) / n_in + norm_eps) : 1.0f;
            float s = warp_sum(acc[0][r]) * inv + b;
            float up = GATED ? warp_sum(acc[P - 1][r]) * inv + b_up : 0.0f;
            if (lane == 0) {
                float* dst = y + (size_t)r * y_stride + o;
                if (GATED) *dst = gated_act(mode, s, up);
                else if (mode == 0) *dst = s;
                else if (mode == 1) *dst += s;
                else if (mode == 2) { float t = fmaxf(s, 0.0f); *dst = t * t; }
                else *dst += s / (1.0f + expf(-aux[(size_t)r * y_stride + o]));
            }
        }
    }
}

#define GEMV_ENTRY(name, W, R, GATED)                                                           \
    extern "C" __global__ void name(const void* w, const float* x, float* y, const float* bias, \
                                    int n_in, int n_out, int rows, int x_stride, int y_stride,  \
                                    int mode, long long w_group, int x_group, int y_group,      \
                                    int vec_ok, const float* aux, const float* norm_w,          \
                                    float norm_eps) {                                           \
        gemv<W, R, GATED>(w, x, y, bias, n_in, n_out, rows, x_stride, y_stride, mode, w_group,  \
                          x_group, y_group, vec_ok, aux, norm_w, norm_eps);                     \
    }
GEMV_ENTRY(gemv_bf16_1, WBf16, 1, false)
GEMV_ENTRY(gemv_bf16_2, WBf16, 2, false)
GEMV_ENTRY(gemv_bf16_4, WBf16, 4, false)
GEMV_ENTRY(gemv_bf16_8, WBf16, 8, false)
GEMV_ENTRY(gemv_f16_1, WF16, 1, false)
GEMV_ENTRY(gemv_f16_2, WF16, 2, false)
GEMV_ENTRY(gemv_f16_4, WF16, 4, false)
GEMV_ENTRY(gemv_f16_8, WF16, 8, false)
GEMV_ENTRY(gemv_f32_1, WF32, 1, false)
GEMV_ENTRY(gemv_f32_2, WF32, 2, false)
GEMV_ENTRY(gemv_f32_4, WF32, 4, false)
GEMV_ENTRY(gemv_f32_8, WF32, 8, false)
GEMV_ENTRY(gemv_gated_bf16_1, WBf16, 1, true)
GEMV_ENTRY(gemv_gated_bf16_2, WBf16, 2, true)
GEMV_ENTRY(gemv_gated_bf16_4, WBf16, 4, true)
GEMV_ENTRY(gemv_gated_bf16_8, WBf16, 8, true)
GEMV_ENTRY(gemv_gated_f16_1, WF16, 1, true)
GEMV_ENTRY(gemv_gated_f16_2, WF16, 2, true)
GEMV_ENTRY(gemv_gated_f16_4, WF16, 4, true)
GEMV_ENTRY(gemv_gated_f16_8, WF16, 8, true)
GEMV_ENTRY(gemv_gated_f32_1, WF32, 1, true)
GEMV_ENTRY(gemv_gated_f32_2, WF32, 2, true)
GEMV_ENTRY(gemv_gated_f32_4, WF32, 4, true)
GEMV_ENTRY(gemv_gated_f32_8, WF32, 8, true)

// Epilogues of a cuBLAS product (mode as for the GEMV): y[r, j] (+)= f(y[r, j] + b[j]) over
// [rows, n], row stride y_stride; for modes 1 and 3 the product was written to `tmp` first.
// Gated modes 4 and 5: tmp is [rows, 2n] (gate | up), y[r, j] = act(gate + b[j]) ·
// (up + b[n + j]).
extern "C" __global__ void epilogue(float* y, const float* tmp, const float* b, const float* aux,
                                    int rows, int n, int y_stride, int mode) {
    ALLOW_DEPENDENTS();
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (size_t)rows * n) return;
    size_t r = i / n, j = i % n, at = r * y_stride + j;
    if (mode >= 4) {
        const float* t = tmp + r * 2 * n;
        y[at] = gated_act(mode, t[j] + (b ? b[j] : 0.0f), t[n + j] + (b ? b[n + j] : 0.0f));
        return;
    }
    float s = (mode == 1 || mode == 3 ? tmp[i] : y[at]) + (b ? b[j] : 0.0f);
    if (mode == 0) y[at] = s;
    else if (mode == 1) y[at] += s;
    else if (mode == 2) { float t = fmaxf(s, 0.0f); y[at] = t * t; }
    else y[at] += s / (1.0f + expf(-aux[at]));
}

// Activations rounded to the weights' dtype, for the cuBLAS products of prefill:
// out[r, i] = round(x[r·x_stride + i]), out dense [rows, n].
extern "C" __global__ void round_rows(const float* x, u16* out, int rows, int n, int x_stride,
                                      int dtype) {
    ALLOW_DEPENDENTS();
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (size_t)rows * n) return;
    float v = x[(i / n) * x_stride + i % n];
    out[i] = dtype == DT_BF16 ? f32_to_bf16(v) : f32_to_f16(v);
}

// ---------------------------------------------------------------------------------------
// Row-wise kernels: one block per row.

// Row norms keep their row in registers (NORM_PER_THREAD values per thread, blockDim 512,
// so rows up to 8192): one read of x, one reduction, one write.
#define NORM_PER_THREAD 16

// kernels/cpu/ops.rs rmsnorm (w_offset 0) and rmsnorm_gemma (w_offset 1).
extern "C" __global__ void rmsnorm(const float* x, const float* w, float* out, int c, float eps,
                                   float w_offset) {
    ALLOW_DEPENDENTS();
    const float* xr = x + (size_t)blockIdx.x * c;
    float* yr = out + (size_t)blockIdx.x * c;
    float v[NORM_PER_THREAD];
    float ss = 0.0f;
#pragma unroll
    for (int k = 0; k < NORM_PER_THREAD; k++) {
        int i = threadIdx.x + k * blockDim.x;
        v[k] = i < c ? xr[i] : 0.0f;
        ss += v[k] * v[k];
    }
    float inv = 1.0f / sqrtf(block_sum(ss) / c + eps);
#pragma unroll
    for (int k = 0; k < NORM_PER_THREAD; k++) {
        int i = threadIdx.x + k * blockDim.x;
        if (i < c) yr[i] = v[k] * inv * (w_offset + w[i]);
    }
}

// kernels/cpu/ops.rs layernorm (biased variance, two passes over the registers) of row xr
// into registers: v[k] holds element threadIdx.x + k·blockDim.x (0 past c). Every thread of
// the block must call it.
__device__ void layernorm_row(const float* xr, const float* w, const float* b, int c, float eps,
                              float* v) {
    float s = 0.0f;
#pragma unroll
    for (int k = 0; k < NORM_PER_THREAD; k++) {
        int i = threadIdx.x + k * blockDim.x;
        v[k] = i < c ? xr[i] : 0.0f;
        s += v[k];
    }
    float mean = block_sum(s) / c;
    float q = 0.0f;
#pragma unroll
    for (int k = 0; k < NORM_PER_THREAD; k++) {
        int i = threadIdx.x + k * blockDim.x;
        if (i < c) q += (v[k] - mean) * (v[k] - mean);
    }
    float inv = 1.0f / sqrtf(block_sum(q) / c + eps);
#pragma unroll
    for (int k = 0; k < NORM_PER_THREAD; k++) {
        int i = threadIdx.x + k * blockDim.x;
        v[k] = i < c ? (v[k] - mean) * inv * w[i] + b[i] : 0.0f;
    }
}

extern "C" __global__ void layernorm(const float* x, const float* w, const float* b, float* out,
                                     int c, float eps) {
    ALLOW_DEPENDENTS();
    float v[NORM_PER_THREAD];
    layernorm_row(x + (size_t)blockIdx.x * c, w, b, c, eps, v);
    float* yr = out + (size_t)blockIdx.x * c;
#pragma unroll
    for (int k = 0; k < NORM_PER_THREAD; k++) {
        int i = threadIdx.x + k * blockDim.x;
        if (i < c) yr[i] = v[k];
    }
}

// out[r] = scale · table[tokens[r]] (models/layers.rs gather_embeddings).
extern "C" __global__ void embed(const void* table, int dtype, const u32* tokens, float* out, int c,
                                 float scale) {
    ALLOW_DEPENDENTS();
    size_t base = (size_t)tokens[blockIdx.x] * c;
    float* yr = out + (size_t)blockIdx.x * c;
    for (int i = threadIdx.x; i < c; i += blockDim.x) {
        float v = load_elem(table, base + i, dtype);
        yr[i] = scale == 1.0f ? v : v * scale;
    }
}

// Rounds values to bf16 / f16 in place (RWKV's ln0 folded into a table of that dtype).
extern "C" __global__ void round_in_place(float* x, size_t n, int dtype) {
    ALLOW_DEPENDENTS();
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    if (dtype == DT_BF16) x[i] = bf16_to_f32(f32_to_bf16(x[i]));
    if (dtype == DT_F16) x[i] = f16_to_f32(f32_to_f16(x[i]));
}

// out[i] = x[rows[i]] for picked rows: [n_pick, c].
extern "C" __global__ void gather_rows(const float* x, const int* rows, float* out, int c) {
    ALLOW_DEPENDENTS();
    const float* xr = x + (size_t)rows[blockIdx.x] * c;
    float* yr = out + (size_t)blockIdx.x * c;
    for (int i = threadIdx.x; i < c; i += blockDim.x) yr[i] = xr[i];
}

// ---------------------------------------------------------------------------------------
// Elementwise.

// ---------------------------------------------------------------------------------------
// Next-token draws on the device (sampling.rs Draw::pick), one block per logits row
// (blockDim a power of two, 32 ..= 1024). NaN logits count as -inf.

struct DrawArgs {
    float temperature;  // <= 0: greedy
    u32 top_k;          // 0: off
    float top_p;        // 1: off, 0: the maximum only
    float min_p;        // 0: off
    float u;            // the uniform the draw spends, in [0, 1)
};

__device__ __forceinline__ float clean_logit(float x) { return x != x ? -GYRE_INF : x; }

// Order-preserving u32 key of a float (a larger float has a larger key), and back.
__device__ __forceinline__ u32 order_key(float x) {
    u32 b = __float_as_uint(x);
    return (b & 0x80000000u) ? ~b : b | 0x80000000u;
}
__device__ __forceinline__ float key_value(u32 k) {
    return __uint_as_float((k & 0x80000000u) ? k & 0x7fffffffu : ~k);
}

// The row's largest logit and its lowest index (0x7fffffff when nothing is above -inf),
// in every thread.
__device__ void block_argmax(const float* row, int v, float* best_out, int* at_out) {
    float best = -GYRE_INF;
    int at = 0x7fffffff;
    for (int i = threadIdx.x; i < v; i += blockDim.x) {
        float x = row[i];
        if (x > best) {
            best = x;
            at = i;
        }
    }
    __shared__ float part_v[32];
    __shared__ int part_i[32];
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (int round = 0; round < 2; round++) {
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            float ov = __shfl_xor_sync(0xffffffffu, best, o);
            int oi = __shfl_xor_sync(0xffffffffu, at, o);
            if (ov > best || (ov == best && oi < at)) {
                best = ov;
                at = oi;
            }
        }
        if (round == 1) break;
        __syncthreads();
        if (lane == 0) {
            part_v[warp] = best;
            part_i[warp] = at;
        }
        __syncthreads();
        bool have = lane < (int)(blockDim.x >> 5);
        best = have ? part_v[lane] : -GYRE_INF;
        at = have ? part_i[lane] : 0x7fffffff;
    }
    *best_out = best;
    *at_out = at;
}

// Radix selection from the top: the largest logit t such that the elements >= t weigh at
// least `target` (weight(x) >= 0 per element), found 8 bits of the order key at a time;
// -inf when the whole row weighs less.
template <class Weight>
__device__ float select_from_top(const float* row, int v, float target, Weight weight) {
    __shared__ float hist[256];
    __shared__ u32 prefix_s;
    __shared__ float left_s;
    __shared__ int none_s;
    u32 prefix = 0;
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int b = threadIdx.x; b < 256; b += blockDim.x) hist[b] = 0.0f;
        __syncthreads();
        u32 high = shift == 24 ? 0u : 0xffffffffu << (shift + 8);
        for (int i = threadIdx.x; i < v; i += blockDim.x) {
            float x = clean_logit(row[i]);
            u32 k = order_key(x);
            if ((k & high) != prefix) continue;
            float w = weight(x);
            if (w > 0.0f) atomicAdd(&hist[(k >> shift) & 255u], w);
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            float left = shift == 24 ? target : left_s, cum = 0.0f;
            int b = 255;
            for (; b > 0 && cum + hist[b] < left; b--) cum += hist[b];
            none_s = shift == 24 && b == 0 && cum + hist[0] < left;
            left_s = left - cum;
            prefix_s = prefix | ((u32)b << shift);
        }
        __syncthreads();
        if (none_s) return -GYRE_INF;
        prefix = prefix_s;
        __syncthreads();
    }
    return key_value(prefix);
}

// ids[r] = row r's token under draws[r]: greedy (or one token kept), the argmax (ties to
// the lowest index, 0 when nothing is above -inf); else the candidates that survive top-k, top-p and min-p
// (every logit >= a threshold) weighed exp((x − max)/T) and, in id order, the first whose
// cumulative weight exceeds u · total.
#define SAMPLE_THREADS 1024
extern "C" __global__ void sample_rows(const float* logits, int v, const DrawArgs* draws, u32* ids) {
    ALLOW_DEPENDENTS();
    const float* row = logits + (size_t)blockIdx.x * v;
    DrawArgs d = draws[blockIdx.x];
    float m;
    int at;
    block_argmax(row, v, &m, &at);
    // Keeping one token (top-k 1, top-p 0) is greedy too, ties to the lowest index.
    if (!(d.temperature > 0.0f) || m == -GYRE_INF || d.top_k == 1 || d.top_p <= 0.0f) {
        if (threadIdx.x == 0) ids[blockIdx.x] = at == 0x7fffffff ? 0u : (u32)at;
        return;
    }
    float t = d.temperature;
    bool inf_max = m == GYRE_INF;  // +inf logits share all the mass
    auto weight = [=](float x) {
        if (inf_max) return x == GYRE_INF ? 1.0f : 0.0f;
        return x == -GYRE_INF ? 0.0f : expf((x - m) / t);
    };
    float floor = -GYRE_INF;  // survivors: logits >= floor
    if (d.top_k > 0 && d.top_k < (u32)v) {
        floor = select_from_top(row, v, (float)d.top_k, [](float x) { return x > -GYRE_INF ? 1.0f : 0.0f; });
    }
    if (d.top_p < 1.0f) {
        float f = floor;
        auto kept = [=](float x) { return x >= f ? weight(x) : 0.0f; };
        float mine = 0.0f;
        for (int i = threadIdx.x; i < v; i += blockDim.x) mine += kept(clean_logit(row[i]));
        float total = block_sum(mine);
        floor = fmaxf(floor, select_from_top(row, v, d.top_p * total, kept));
    }
    if (d.min_p > 0.0f) floor = fmaxf(floor, inf_max ? m : m + t * logf(d.min_p));
    // The draw, in id order: thread j owns a contiguous range of ids; a block scan of the
    // ranges' weights finds the range the target falls in, whose thread walks it.
    __shared__ float scan[SAMPLE_THREADS];
    __shared__ int picked;
    int per = (v + blockDim.x - 1) / blockDim.x;
    int lo = min(v, (int)threadIdx.x * per), hi = min(v, lo + per);
    float mine = 0.0f;
    int last = -1;  // the range's last id with weight
    for (int i = lo; i < hi; i++) {
        float x = clean_logit(row[i]);
        float w = x >= floor ? weight(x) : 0.0f;
        mine += w;
        if (w > 0.0f) last = i;
    }
    scan[threadIdx.x] = mine;
    if (threadIdx.x == 0) picked = -1;
    __syncthreads();
    for (int o = 1; o < (int)blockDim.x; o <<= 1) {
        float add = threadIdx.x >= (u32)o ? scan[threadIdx.x - o] : 0.0f;
        __syncthreads();
        scan[threadIdx.x] += add;
        __syncthreads();
    }
    float before = threadIdx.x > 0 ? scan[threadIdx.x - 1] : 0.0f, end = scan[threadIdx.x];
    float target = d.u * scan[blockDim.x - 1];
    if (before <= target && target < end) {
        float cum = before;
        int id = last;
        for (int i = lo; i < hi; i++) {
            float x = clean_logit(row[i]);
            cum += x >= floor ? weight(x) : 0.0f;
            if (target < cum) {
                id = i;
                break;
            }
        }
        picked = id;
    }
    __syncthreads();
    if (picked < 0) {
        // Rounding left the target at or above the total: the last id with weight.
        __shared__ int last_s[32];
        int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) last = max(last, __shfl_xor_sync(0xffffffffu, last, o));
        if (lane == 0) last_s[warp] = last;
        __syncthreads();
        if (threadIdx.x == 0) {
            for (int w = 0; w < (int)(blockDim.x >> 5); w++) last = max(last, last_s[w]);
            picked = last < 0 ? at : last;
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) ids[blockIdx.x] = (u32)picked;
}

// Griffin's final logits: cap · tanh(l / cap).
extern "C" __global__ void soft_cap(float* x, size_t n, float cap) {
    ALLOW_DEPENDENTS();
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    x[i] = cap * tanhf(x[i] / cap);
}

// ---------------------------------------------------------------------------------------
// Batch layout. A forward pass lays its sequences out as consecutive rows; `meta` holds,
// for every row, its sequence and absolute position, and for every sequence its first row,
// length, first position and its cache's slot count. `states[s]` points at sequence s's state
// block in device memory (layout chosen by the model).

struct Batch {
    const int* row_seq;
    const int* row_pos;
    const int* seg_row;
    const int* seg_len;
    const int* seg_pos;
    const int* slots;
    const u64* states;
};

__device__ __forceinline__ Batch batch_of(const int* meta, const u64* states, int rows, int seqs) {
    Batch b;
    b.row_seq = meta;
    b.row_pos = meta + rows;
    b.seg_row = meta + 2 * rows;
    b.seg_len = meta + 2 * rows + seqs;
    b.seg_pos = meta + 2 * rows + 2 * seqs;
    b.slots = meta + 2 * rows + 3 * seqs;
    b.states = states;
    return b;
}

// Half-split RoPE (kernels/cpu/ops.rs rope_half_split) on the first n_heads heads of each row
// of x (row stride x_stride): dim i pairs with i + half, angle pos · inv_freq[i] in f32.
extern "C" __global__ void rope(float* x, int x_stride, int n_heads, int hd, int half,
                                const float* inv_freq, const int* meta, int rows, int seqs) {
    ALLOW_DEPENDENTS();
    int r = blockIdx.x, h = blockIdx.y;
    Batch b = batch_of(meta, 0, rows, seqs);
    float pos = (float)b.row_pos[r];
    float* v = x + (size_t)r * x_stride + h * hd;
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
        float s, c;
        sincosf(pos * inv_freq[i], &s, &c);
        float x1 = v[i], x2 = v[i + half];
        v[i] = x1 * c - x2 * s;
        v[i + half] = x2 * c + x1 * s;
    }
}

// ---------------------------------------------------------------------------------------
// Attention (models/layers.rs attend_chunk). A query at position p sees keys
// max(0, p + 1 − span) ..= p (span 0: all). Keys at or after the sequence's first new
// position come from this pass's rows (qkv), older ones from the cache: sequence s's layer l
// keys are at byte states[s] + kv_offset + l·2·slots·kvd·sizeof(cache element) ([slots, kvd],
// position p in slot p % slots), values follow the keys. Split over keys (KEYS_PER_SPLIT
// each) for parallelism; a second kernel merges the splits' softmax partials.
//
// The cache holds the model's weight dtype (KvF32, KvBf16, KvF16), as the reference keeps
// its cache in the model's dtype. The chunk's own keys and values are rounded to that type as
// they are read, so a position weighs the same whether it comes from the chunk or the cache:
// a prefill equals token-by-token decoding.

#define KEYS_PER_SPLIT 64

struct Attn {
    const float* qkv;
    int row_stride, q_off, k_off, v_off;
    long long kv_offset;
    int layer, heads, kv_heads, hd, span;
    float scale;
};

struct KvF32 {
    typedef float T;
    __device__ static float4 load4(const T* p) { return *(const float4*)p; }
    __device__ static float load(const T* p) { return *p; }
    __device__ static float round(float x) { return x; }
    __device__ static T store(float x) { return x; }
};

struct KvBf16 {
    typedef u16 T;
    __device__ static float4 load4(const T* p) {
        uint2 q = *(const uint2*)p;
        return make_float4(__uint_as_float(q.x << 16), __uint_as_float(q.x & 0xffff0000u),
                           __uint_as_float(q.y << 16), __uint_as_float(q.y & 0xffff0000u));
    }
    __device__ static float load(const T* p) { return bf16_to_f32(*p); }
    __device__ static float round(float x) { return bf16_to_f32(f32_to_bf16(x)); }
    __device__ static T store(float x) { return f32_to_bf16(x); }
};

struct KvF16 {
    typedef u16 T;
    __device__ static float4 load4(const T* p) {
        uint2 q = *(const uint2*)p;
        return make_float4(f16_to_f32((u16)(q.x & 0xffffu)), f16_to_f32((u16)(q.x >> 16)),
                           f16_to_f32((u16)(q.y & 0xffffu)), f16_to_f32((u16)(q.y >> 16)));
    }
    __device__ static float load(const T* p) { return f16_to_f32(*p); }
    __device__ static float round(float x) { return f16_to_f32(f32_to_f16(x)); }
    __device__ static T store(float x) { return f32_to_f16(x); }
};

// Where sequence s's keys and values of kv head g are: chunk rows from `first_new` on, the
// cache before.
template <class KV>
struct KvView {
    typedef typename KV::T T;
    const float *new_k, *new_v;
    const T *old_k, *old_v;
    int first_new, slots;
    size_t row_stride, kvd;

    __device__ KvView(const Attn& a, const Batch& b, int s, int g) {
        kvd = (size_t)a.kv_heads * a.hd;
        first_new = b.seg_pos[s];
        slots = b.slots[s];
        row_stride = a.row_stride;
        const float* rows0 = a.qkv + (size_t)b.seg_row[s] * a.row_stride + g * a.hd;
        new_k = rows0 + a.k_off;
        new_v = rows0 + a.v_off;
        const T* base = (const T*)((const char*)b.states[s] + a.kv_offset) + (size_t)a.layer * 2 * slots * kvd;
        old_k = base + g * a.hd;
        old_v = base + (size_t)slots * kvd + g * a.hd;
    }

    // Elements 4c .. 4c + 4 of position p's key.
    __device__ __forceinline__ float4 key4(int p, int c) const {
        if (p >= first_new) {
            float4 k = ((const float4*)(new_k + (size_t)(p - first_new) * row_stride))[c];
            return make_float4(KV::round(k.x), KV::round(k.y), KV::round(k.z), KV::round(k.w));
        }
        return KV::load4(old_k + (size_t)(p % slots) * kvd + 4 * c);
    }

    // Element d of position p's value.
    __device__ __forceinline__ float value(int p, int d) const {
        if (p >= first_new) return KV::round(new_v[(size_t)(p - first_new) * row_stride + d]);
        return KV::load(old_v + (size_t)(p % slots) * kvd + d);
    }
};

// One block (ATTN_THREADS) per (row, head, split of KEYS_PER_SPLIT keys). Scores: each warp
// takes KEYS_PER_WARP keys at once (one 4-element piece of each per lane in flight). Values:
// threads split over (dimension, key group), the groups summed through shared memory.
#define ATTN_THREADS 256
#define KEYS_PER_WARP (KEYS_PER_SPLIT / (ATTN_THREADS / 32))

template <class KV>
__device__ void attention_split(const Attn& a, const int* meta, const u64* states, int rows,
                                int seqs, float* part_out, float* part_ml, int splits) {
    __shared__ float4 qs[128];
    __shared__ float sc[KEYS_PER_SPLIT];
    __shared__ float red[ATTN_THREADS];
    int r = blockIdx.x, h = blockIdx.y, sp = blockIdx.z;
    Batch b = batch_of(meta, states, rows, seqs);
    int s = b.row_seq[r], pos = b.row_pos[r];
    int lo = a.span > 0 ? max(0, pos + 1 - a.span) : 0;
    int k0 = lo + sp * KEYS_PER_SPLIT, k1 = min(pos + 1, k0 + KEYS_PER_SPLIT);
    size_t part = ((size_t)r * a.heads + h) * splits + sp;
    if (k0 > pos) {
        if (threadIdx.x == 0) {
            part_ml[2 * part] = -GYRE_INF;
            part_ml[2 * part + 1] = 0.0f;
        }
        return;
    }
    int g = h / (a.heads / a.kv_heads);
    KvView<KV> kv(a, b, s, g);
    int hd4 = a.hd / 4;
    const float4* q = (const float4*)(a.qkv + (size_t)r * a.row_stride + a.q_off + h * a.hd);
    for (int c = threadIdx.x; c < hd4; c += blockDim.x) qs[c] = q[c];
    __syncthreads();
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int n = k1 - k0;
    float acc[KEYS_PER_WARP];
#pragma unroll
    for (int u = 0; u < KEYS_PER_WARP; u++) acc[u] = 0.0f;
    int first = warp * KEYS_PER_WARP;
    for (int c = lane; c < hd4; c += 32) {
        float4 qv = qs[c];
#pragma unroll
        for (int u = 0; u < KEYS_PER_WARP; u++) {
            if (first + u < n) {
                float4 kk = kv.key4(k0 + first + u, c);
                acc[u] += qv.x * kk.x + qv.y * kk.y + qv.z * kk.z + qv.w * kk.w;
            }
        }
    }
#pragma unroll
    for (int u = 0; u < KEYS_PER_WARP; u++) {
        float d = warp_sum(acc[u]);
        if (lane == 0 && first + u < n) sc[first + u] = d * a.scale;
    }
    __syncthreads();
    float m = -GYRE_INF;
    for (int j = 0; j < n; j++) m = fmaxf(m, sc[j]);
    __syncthreads();
    if (threadIdx.x < n) sc[threadIdx.x] = expf(sc[threadIdx.x] - m);
    __syncthreads();
    float l = 0.0f;
    for (int j = 0; j < n; j++) l += sc[j];
    // Values: thread t sums dimension t % hd over the keys of group t / hd.
    int groups = max(1, ATTN_THREADS / a.hd);
    for (int d0 = 0; d0 < a.hd; d0 += ATTN_THREADS) {
        int d = d0 + threadIdx.x % a.hd, grp = threadIdx.x / a.hd;
        float v = 0.0f;
        if (grp < groups && d < a.hd) {
#pragma unroll 8
            for (int j = grp; j < n; j += groups) v += sc[j] * kv.value(k0 + j, d);
        }
        red[threadIdx.x] = v;
        __syncthreads();
        if (threadIdx.x < a.hd - d0 && threadIdx.x < ATTN_THREADS) {
            float t = 0.0f;
            for (int k = 0; k < groups; k++) t += red[k * a.hd + threadIdx.x % a.hd];
            part_out[part * a.hd + d0 + threadIdx.x] = t;
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        part_ml[2 * part] = m;
        part_ml[2 * part + 1] = l;
    }
}

#define ATTENTION_SPLIT_ENTRY(name, KV)                                                          \
    extern "C" __global__ void name(Attn a, const int* meta, const u64* states, int rows,       \
                                    int seqs, float* part_out, float* part_ml, int splits) {    \
        ALLOW_DEPENDENTS();                                                                      \
        attention_split<KV>(a, meta, states, rows, seqs, part_out, part_ml, splits);            \
    }
ATTENTION_SPLIT_ENTRY(attention_split_f32, KvF32)
ATTENTION_SPLIT_ENTRY(attention_split_f16, KvF16)
ATTENTION_SPLIT_ENTRY(attention_split_bf16, KvBf16)

// out [rows, heads·hd]: the splits' partial sums merged with their max-shifted weights.
extern "C" __global__ void attention_merge(const float* part_out, const float* part_ml, float* out,
                                           int heads, int hd, int splits) {
    ALLOW_DEPENDENTS();
    int r = blockIdx.x, h = blockIdx.y;
    size_t base = ((size_t)r * heads + h) * splits;
    float m = -GYRE_INF;
    for (int sp = 0; sp < splits; sp++) m = fmaxf(m, part_ml[2 * (base + sp)]);
    float l = 0.0f;
    for (int sp = 0; sp < splits; sp++) {
        float ms = part_ml[2 * (base + sp)];
        if (ms != -GYRE_INF) l += part_ml[2 * (base + sp) + 1] * expf(ms - m);
    }
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {
        float acc = 0.0f;
        for (int sp = 0; sp < splits; sp++) {
            float ms = part_ml[2 * (base + sp)];
            if (ms != -GYRE_INF) acc += part_out[(base + sp) * hd + d] * expf(ms - m);
        }
        out[(size_t)r * heads * hd + h * hd + d] = acc / l;
    }
}

// After attention: the chunk's keys/values into the cache (state/KvCache write), in the
// cache's type. Only the chunk's last `slots` positions are written, so no two rows share a
// slot.
template <class KV>
__device__ void write_kv(const Attn& a, const int* meta, const u64* states, int rows, int seqs) {
    typedef typename KV::T T;
    int r = blockIdx.x;
    Batch b = batch_of(meta, states, rows, seqs);
    int s = b.row_seq[r], p = b.row_pos[r];
    int slots = b.slots[s], end = b.seg_pos[s] + b.seg_len[s];
    if (p + slots < end) return;
    size_t kvd = (size_t)a.kv_heads * a.hd;
    T* base = (T*)((char*)b.states[s] + a.kv_offset) + (size_t)a.layer * 2 * slots * kvd;
    T* kd = base + (size_t)(p % slots) * kvd;
    T* vd = kd + (size_t)slots * kvd;
    const float* src = a.qkv + (size_t)r * a.row_stride;
    for (int i = threadIdx.x; i < (int)kvd; i += blockDim.x) {
        kd[i] = KV::store(src[a.k_off + i]);
        vd[i] = KV::store(src[a.v_off + i]);
    }
}

#define WRITE_KV_ENTRY(name, KV)                                                                 \
    extern "C" __global__ void name(Attn a, const int* meta, const u64* states, int rows,       \
                                    int seqs) {                                                  \
        ALLOW_DEPENDENTS();                                                                      \
        write_kv<KV>(a, meta, states, rows, seqs);                                               \
    }
WRITE_KV_ENTRY(write_kv_f32, KvF32)
WRITE_KV_ENTRY(write_kv_f16, KvF16)
WRITE_KV_ENTRY(write_kv_bf16, KvBf16)

// ---------------------------------------------------------------------------------------
// RecurrentGemma recurrent block (models/griffin.rs `recurrent`).

// Causal depthwise conv1d over the rows of x (row stride x_stride), width taps w [width, lru]
// (tap width−1 multiplies the current token); inputs before the chunk come from the state's
// history [width − 1, lru] at states[s] + hist_off (oldest first). With keep_inline (every
// sequence one row) it also shifts the history; else conv1d_keep does, after.
extern "C" __global__ void conv1d(const float* x, int x_stride, float* out, const float* w,
                                  const float* bias, int lru, int width, long long hist_off,
                                  const int* meta, const u64* states, int rows, int seqs,
                                  int keep_inline) {
    ALLOW_DEPENDENTS();
    int r = blockIdx.y, ch = blockIdx.x * blockDim.x + threadIdx.x;
    if (ch >= lru) return;
    Batch b = batch_of(meta, states, rows, seqs);
    int s = b.row_seq[r], t = b.row_pos[r] - b.seg_pos[s];
    const float* hist = (const float*)b.states[s] + hist_off;
    float acc = bias[ch];
    for (int sh = 0; sh < width; sh++) {
        float in = t >= sh ? x[(size_t)(r - sh) * x_stride + ch]
                           : hist[(size_t)(width - 1 + t - sh) * lru + ch];
        acc += in * w[(size_t)(width - 1 - sh) * lru + ch];
    }
    out[(size_t)r * lru + ch] = acc;
    if (keep_inline) {
        // One row per sequence (a decode step): this thread alone reads and keeps (s, ch).
        float* h = (float*)hist;
        for (int i = 0; i + 1 < width - 1; i++) h[(size_t)i * lru + ch] = h[(size_t)(i + 1) * lru + ch];
        if (width > 1) h[(size_t)(width - 2) * lru + ch] = x[(size_t)r * x_stride + ch];
    }
}

// Keeps each sequence's last width − 1 conv inputs (reads older history before it is
// overwritten: entry i takes i + len or a chunk row).
extern "C" __global__ void conv1d_keep(const float* x, int x_stride, int lru, int width,
                                       long long hist_off, const int* meta, const u64* states,
                                       int rows, int seqs) {
    ALLOW_DEPENDENTS();
    int s = blockIdx.y, ch = blockIdx.x * blockDim.x + threadIdx.x;
    if (ch >= lru) return;
    Batch b = batch_of(meta, states, rows, seqs);
    int len = b.seg_len[s], row0 = b.seg_row[s], keep = width - 1;
    float* hist = (float*)b.states[s] + hist_off;
    for (int i = 0; i < keep; i++) {
        int back = keep - i;
        hist[(size_t)i * lru + ch] = back <= len ? x[(size_t)(row0 + len - back) * x_stride + ch]
                                                 : hist[(size_t)(i + len) * lru + ch];
    }
}

// The RG-LRU scan, one thread per channel and sequence: gates [rows, H, 2, bw] hold each
// head's input and recurrence gate pre-activations (biases added); y [rows, lru] (row stride
// y_stride) the linear_y branch before its GELU. out[r] = h_t · gelu(y), h_t in the state at
// h_off.
extern "C" __global__ void rglru_scan(const float* conv, const float* gates, const float* y,
                                      int y_stride, const float* log_a_scale, float* out, int lru,
                                      int bw, long long h_off, const int* meta, const u64* states,
                                      int rows, int seqs) {
    ALLOW_DEPENDENTS();
    int s = blockIdx.y, i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= lru) return;
    Batch b = batch_of(meta, states, rows, seqs);
    float* hp = (float*)b.states[s] + h_off + i;
    float h = *hp;
    int gi = (i / bw) * 2 * bw + i % bw;  // input gate of channel i; its recurrence gate: + bw
    for (int t = 0; t < b.seg_len[s]; t++) {
        size_t r = b.seg_row[s] + t;
        bool first = b.seg_pos[s] + t == 0;
        float gx = sigmoidf_(gates[r * 2 * lru + gi]);
        float ga = sigmoidf_(gates[r * 2 * lru + gi + bw]);
        float log_a = log_a_scale[i] * ga;
        float a = expf(log_a);
        float mult = first ? 1.0f : sqrtf(1.0f - expf(2.0f * log_a));
        float xn = conv[r * lru + i] * gx * mult;
        h = (first ? 0.0f : a * h) + xn;
        out[r * lru + i] = h * gelu_tanh(y[r * y_stride + i]);
    }
    *hp = h;
}

// ---------------------------------------------------------------------------------------
// RWKV-5.2 (models/rwkv5.rs).

// RWKV's LayerNorm and token shift, one block per row r (blockDim NORM_THREADS):
// xx = layernorm(x[r]), prev = the sequence's shift state at its segment's first row, else
// layernorm(x[r − 1]); out[r, m·c + ch] = xx·mix_m + prev·(1 − mix_m) for the n_mix mixes
// (models/rwkv5.rs). The block of a segment's first row, the only one reading the shift
// state, also stores layernorm(x[last row]) there as the next token's shift.
extern "C" __global__ void ln_shift_mix(const float* x, const float* w, const float* bias,
                                        float eps, float* out, const float* mixes, int n_mix,
                                        int c, long long shift_off, const int* meta,
                                        const u64* states, int rows, int seqs) {
    ALLOW_DEPENDENTS();
    int r = blockIdx.x;
    Batch b = batch_of(meta, states, rows, seqs);
    int s = b.row_seq[r];
    bool first = r == b.seg_row[s];
    float* shift = (float*)b.states[s] + shift_off;
    float cur[NORM_PER_THREAD], prev[NORM_PER_THREAD];
    layernorm_row(x + (size_t)r * c, w, bias, c, eps, cur);
    if (first) {
#pragma unroll
        for (int k = 0; k < NORM_PER_THREAD; k++) {
            int i = threadIdx.x + k * blockDim.x;
            prev[k] = i < c ? shift[i] : 0.0f;
        }
    } else {
        layernorm_row(x + (size_t)(r - 1) * c, w, bias, c, eps, prev);
    }
    float* o = out + (size_t)r * n_mix * c;
#pragma unroll
    for (int k = 0; k < NORM_PER_THREAD; k++) {
        int i = threadIdx.x + k * blockDim.x;
        if (i >= c) continue;
        for (int m = 0; m < n_mix; m++) {
            float mix = mixes[(size_t)m * c + i];
            o[(size_t)m * c + i] = cur[k] * mix + prev[k] * (1.0f - mix);
        }
    }
    if (!first) return;
    int last = b.seg_row[s] + b.seg_len[s] - 1;
    // Each thread stores only the elements it read above.
    if (last != r) layernorm_row(x + (size_t)last * c, w, bias, c, eps, cur);
#pragma unroll
    for (int k = 0; k < NORM_PER_THREAD; k++) {
        int i = threadIdx.x + k * blockDim.x;
        if (i < c) shift[i] = cur[k];
    }
}

// WKV recurrence, one block per (head, sequence), thread j owning value column j of the
// head's state S [N (key i), N (value j)] (kept in shared memory). rkvg: r, k, v, g side by
// side, [rows, 4·c_att]; decay w and bonus u [H·N]; y [rows, c_att]. With norm_inline (a
// decode step: one row per sequence) it also applies RWKV's ln_x GroupNorm of the head's
// output and the gate, y = (gn(wkv) · ln_w + ln_b) · silu(g) (models/rwkv5.rs; N a multiple
// of 32, the reductions are whole warps). Longer segments leave that to group_norm_gate:
// two block reductions per token would lengthen the sequential scan by about half.
extern "C" __global__ void wkv5(const float* rkvg, const float* decay, const float* bonus,
                                const float* ln_w, const float* ln_b, float eps, float* y, int n,
                                int c_att, long long wkv_off, const int* meta, const u64* states,
                                int rows, int seqs, int norm_inline) {
    ALLOW_DEPENDENTS();
    GYRE_DYNAMIC_SHARED(float, sh);
    float* S = sh;              // [n, n]
    float* rs = sh + n * n;     // [n]
    float* ks = rs + n;         // [n]
    float* ru = ks + n;         // r·u·k partial products [n]
    int h = blockIdx.x, s = blockIdx.y, j = threadIdx.x;
    Batch b = batch_of(meta, states, rows, seqs);
    float* st = (float*)b.states[s] + wkv_off + (size_t)h * n * n;
    for (int i = 0; i < n; i++) S[i * n + j] = st[i * n + j];
    const float* w = decay + h * n;
    const float* u = bonus + h * n;
    int col = h * n + j;
    for (int t = 0; t < b.seg_len[s]; t++) {
        int row = b.seg_row[s] + t;
        const float* in = rkvg + (size_t)row * 4 * c_att;
        __syncthreads();
        rs[j] = in[col];
        ks[j] = in[c_att + col];
        ru[j] = rs[j] * u[j] * ks[j];
        __syncthreads();
        float vj = in[2 * c_att + col];
        float bon = 0.0f;
        for (int i = 0; i < n; i++) bon += ru[i];
        float acc = bon * vj;
        for (int i = 0; i < n; i++) {
            float sij = S[i * n + j];
            acc += rs[i] * sij;
            S[i * n + j] = ks[i] * vj + w[i] * sij;
        }
        if (!norm_inline) {
            y[(size_t)row * c_att + col] = acc;
            continue;
        }
        float mean = block_sum(acc) / n;
        float d = acc - mean;
        float inv = 1.0f / sqrtf(block_sum(d * d) / n + eps);
        float g = in[3 * c_att + col];
        y[(size_t)row * c_att + col] = (d * inv * ln_w[col] + ln_b[col]) * (g / (1.0f + expf(-g)));
    }
    for (int i = 0; i < n; i++) st[i * n + j] = S[i * n + j];
}

// RWKV's ln_x GroupNorm per head (eps given) with weight/bias [c_att], then × silu(g), in
// place on y [rows, c_att]; g with row stride g_stride. One warp per (row, head).
extern "C" __global__ void group_norm_gate(float* y, const float* g, int g_stride, const float* w,
                                           const float* bias, int n, int c_att, int rows,
                                           float eps) {
    ALLOW_DEPENDENTS();
    int heads = c_att / n;
    int item = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (item >= rows * heads) return;
    int r = item / heads, h = item % heads;
    float* v = y + (size_t)r * c_att + h * n;
    const float* gv = g + (size_t)r * g_stride + h * n;
    float s = 0.0f;
    for (int i = lane; i < n; i += 32) s += v[i];
    float mean = warp_sum(s) / n;
    float q = 0.0f;
    for (int i = lane; i < n; i += 32) q += (v[i] - mean) * (v[i] - mean);
    float inv = 1.0f / sqrtf(warp_sum(q) / n + eps);
    for (int i = lane; i < n; i += 32) {
        float gi = gv[i];
        v[i] = ((v[i] - mean) * inv * w[h * n + i] + bias[h * n + i]) * (gi / (1.0f + expf(-gi)));
    }
}

// ---------------------------------------------------------------------------------------
// The device's read bandwidth (gyre bench): every block sums its share of n 16-byte words.
extern "C" __global__ void read_sum(const uint4* p, size_t n, float* out) {
    ALLOW_DEPENDENTS();
    float s = 0.0f;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        uint4 q = ld_stream(p + i);
        s += __uint_as_float(q.x) + __uint_as_float(q.y) + __uint_as_float(q.z) + __uint_as_float(q.w);
    }
    s = block_sum(s);
    if (threadIdx.x == 0) out[blockIdx.x] = s;
}
