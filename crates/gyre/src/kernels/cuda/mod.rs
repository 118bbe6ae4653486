//! The CUDA backend's runtime: a device, one stream, the NVRTC-compiled kernels of
//! `kernels.cu`, cuBLAS, device buffers, and one typed launcher per kernel.
//!
//! CUDA is loaded at run time (`cudarc` with dynamic loading): the binary builds and runs
//! without it, and [`Gpu::open`] says clearly which library is missing. Kernels never know
//! models: launchers take device pointers, shapes and strides. With `GYRE_CUDA_EMULATOR=1`
//! the device is the CPU emulator ([`emulator`]): the same launchers, run on the host.

mod emulator;

use std::ffi::c_void;
use std::fmt;
use std::sync::{Arc, Mutex, OnceLock};

use anyhow::{anyhow, bail, Result};
use cudarc::cublas::sys as blas_sys;
use cudarc::cublas::CudaBlas;
use cudarc::driver::{result as drv, sys, CudaContext, CudaEvent, CudaFunction, CudaGraph, CudaStream};
use emulator::{EmuGraph, Emulator};

use crate::tensor::DType;

const SOURCE: &str = include_str!("kernels.cu");

/// Rows up to which products run as the GEMV kernel (each weight read once for all rows);
/// above it, cuBLAS. Must equal `GEMV_ROWS` in kernels.cu.
pub const GEMV_ROWS: usize = 8;
/// Keys per attention split; must equal `KEYS_PER_SPLIT` in kernels.cu.
pub const KEYS_PER_SPLIT: usize = 64;

/// Whether a CUDA driver can be loaded on this machine (no device is touched).
pub fn driver_present() -> bool {
    // SAFETY: only tries to dlopen the driver library by its known names.
    unsafe { sys::is_culib_present() }
}

/// Compiles `kernels.cu` with NVRTC for compute capability `major.minor` (no device needed).
pub fn compile(major: i32, minor: i32) -> Result<cudarc::nvrtc::Ptx> {
    // SAFETY: only tries to dlopen NVRTC by its known names.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        bail!("--device cuda: libnvrtc.so (CUDA 12 or 13) could not be loaded; add its directory to LD_LIBRARY_PATH");
    }
    let arch: &'static str = Box::leak(format!("sm_{major}{minor}").into_boxed_str());
    let opts = cudarc::nvrtc::CompileOptions {
        arch: Some(arch),
        options: vec!["--std=c++14".into()],
        ..Default::default()
    };
    cudarc::nvrtc::compile_ptx_with_opts(SOURCE, opts).map_err(|e| match e {
        cudarc::nvrtc::CompileError::CompileError { log, .. } => {
            anyhow!(
                "NVRTC could not compile gyre's kernels for {arch}:\n{}",
                log.to_string_lossy()
            )
        }
        e => anyhow!("NVRTC could not compile gyre's kernels for {arch}: {e:?}"),
    })
}

/// A pointer into device memory (plain address: kernels take raw pointers).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(transparent)]
pub struct DevPtr(pub u64);

impl DevPtr {
    pub const NULL: DevPtr = DevPtr(0);

    /// The address `elems` f32 values further on.
    pub fn f32_at(self, elems: usize) -> DevPtr {
        DevPtr(self.0 + 4 * elems as u64)
    }

    /// The address `bytes` further on.
    pub fn byte_at(self, bytes: usize) -> DevPtr {
        DevPtr(self.0 + bytes as u64)
    }
}

/// Owned device memory, freed on drop.
pub struct DevBuf {
    gpu: Arc<Gpu>,
    ptr: DevPtr,
    bytes: usize,
}

impl fmt::Debug for DevBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DevBuf({} bytes)", self.bytes)
    }
}

impl DevBuf {
    pub fn ptr(&self) -> DevPtr {
        self.ptr
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.gpu
    }
}

impl Drop for DevBuf {
    fn drop(&mut self) {
        if self.bytes == 0 {
            return;
        }
        // Errors cannot propagate from drop; a failed free only leaks.
        let _stream = self.gpu.exclusive();
        let _ = self.gpu.sync();
        // SAFETY: `ptr` came from `Gpu::raw_alloc` with these bytes and is freed once, here;
        // work queued that uses it is finished (above).
        unsafe { self.gpu.raw_free(self.ptr, self.bytes) };
    }
}

/// Weights on the device, in their stored dtype: [rows, cols] row-major, or `groups` such
/// matrices back to back (block-diagonal gates).
#[derive(Debug)]
pub struct DevMatrix {
    pub buf: DevBuf,
    pub dtype: DType,
    pub rows: usize,
    pub cols: usize,
    pub groups: usize,
}

/// Everything a product needs to know about its activations and output.
#[derive(Clone, Copy, Debug)]
pub struct Product {
    /// x [rows, cols] with row stride `x_stride` (f32 elements).
    pub x: DevPtr,
    pub x_stride: usize,
    pub rows: usize,
    /// y [rows, out] with row stride `y_stride`.
    pub y: DevPtr,
    pub y_stride: usize,
    /// Bias [out] (per group for grouped products), or none.
    pub bias: Option<DevPtr>,
    /// What becomes of `s = x·Wᵀ (+ b)`.
    pub epilogue: Epilogue,
    /// RMSNorm of each x row first (weight [cols], eps), inside the GEMV; x dense.
    pub norm: Option<(DevPtr, f32)>,
}

impl Product {
    /// `y = x·Wᵀ` over `rows` rows, no bias.
    pub fn new(x: DevPtr, x_stride: usize, rows: usize, y: DevPtr, y_stride: usize) -> Product {
        Product {
            x,
            x_stride,
            rows,
            y,
            y_stride,
            bias: None,
            epilogue: Epilogue::Store,
            norm: None,
        }
    }

    /// Of RMS-normalised rows: `x / sqrt(mean(x²) + eps) · w` (kernels/cpu/ops.rs rmsnorm;
    /// Gemma's `1 + w` is passed already added).
    pub fn rms_normed(self, w: DevPtr, eps: f32) -> Product {
        Product {
            norm: Some((w, eps)),
            ..self
        }
    }

    /// `y += …` (a residual connection).
    pub fn accumulating(self) -> Product {
        Product {
            epilogue: Epilogue::Accumulate,
            ..self
        }
    }

    /// With a bias added.
    pub fn with_bias(self, bias: DevPtr) -> Product {
        Product {
            bias: Some(bias),
            ..self
        }
    }

    /// With another epilogue.
    pub fn then(self, epilogue: Epilogue) -> Product {
        Product { epilogue, ..self }
    }
}

/// How a product's result `s` lands in `y` (`mode` in kernels.cu).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Epilogue {
    /// `y = s`
    Store,
    /// `y += s` (residual connections)
    Accumulate,
    /// `y = relu(s)²` (RWKV channel mix)
    ReluSquare,
    /// `y += s · sigmoid(gate)`, `gate` laid out like `y` (RWKV channel mix)
    AccumulateGated(DevPtr),
    /// The gated MLP over a [gate; up] matrix ([2F, C], biases [2F]): `y = act(s_gate) ·
    /// s_up`, y [rows, F]; act GELU-tanh (`gelu`) or SiLU.
    GatedMlp { gelu: bool },
}

impl Epilogue {
    fn mode(self) -> i32 {
        match self {
            Epilogue::Store => 0,
            Epilogue::Accumulate => 1,
            Epilogue::ReluSquare => 2,
            Epilogue::AccumulateGated(_) => 3,
            Epilogue::GatedMlp { gelu } => 4 + gelu as i32,
        }
    }

    /// Weight rows per output feature.
    fn rows_per_output(self) -> usize {
        match self {
            Epilogue::GatedMlp { .. } => 2,
            _ => 1,
        }
    }

    fn aux(self) -> DevPtr {
        match self {
            Epilogue::AccumulateGated(g) => g,
            _ => DevPtr::NULL,
        }
    }
}

/// Arguments of the attention kernels (`struct Attn` in kernels.cu; same field order).
#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub struct AttnArgs {
    pub qkv: DevPtr,
    pub row_stride: i32,
    pub q_off: i32,
    pub k_off: i32,
    pub v_off: i32,
    pub kv_offset: i64,
    pub layer: i32,
    pub heads: i32,
    pub kv_heads: i32,
    pub hd: i32,
    pub span: i32,
    pub scale: f32,
}

impl AttnArgs {
    /// Attention over rows laid out [q (heads·hd) | k (kv_heads·hd) | v (kv_heads·hd)] (one
    /// fused projection), scores scaled by hd^-0.5; the caches start `kv_offset` bytes into
    /// each state; `span` as in kernels.cu (0: all keys).
    pub fn fused_qkv(
        qkv: DevPtr,
        heads: usize,
        kv_heads: usize,
        hd: usize,
        kv_offset: usize,
        layer: usize,
        span: usize,
    ) -> AttnArgs {
        let (qd, kvd) = (heads * hd, kv_heads * hd);
        AttnArgs {
            qkv,
            row_stride: (qd + 2 * kvd) as i32,
            q_off: 0,
            k_off: qd as i32,
            v_off: (qd + kvd) as i32,
            kv_offset: kv_offset as i64,
            layer: layer as i32,
            heads: heads as i32,
            kv_heads: kv_heads as i32,
            hd: hd as i32,
            span: span as i32,
            scale: 1.0 / (hd as f32).sqrt(),
        }
    }
}

/// One row's draw as the `sample_rows` kernel reads it: the five 4-byte fields of
/// `struct DrawArgs` in kernels.cu.
pub fn draw_args(d: &crate::sampling::Draw) -> [u32; 5] {
    [
        d.temperature.to_bits(),
        d.top_k.min(u32::MAX as usize) as u32,
        d.top_p.to_bits(),
        d.min_p.to_bits(),
        // In [0, 1) after rounding too.
        (d.u as f32).min(1.0 - f32::EPSILON / 2.0).to_bits(),
    ]
}

/// Device copy of a batch's layout (`Batch` in kernels.cu): per row its sequence and
/// position, per sequence its first row, length, first position and cache slots, and the
/// address of each sequence's state.
#[derive(Clone, Copy, Debug)]
pub struct BatchMeta {
    pub meta: DevPtr,
    pub states: DevPtr,
    pub rows: i32,
    pub seqs: i32,
}

struct Kernel {
    f: KernelFn,
    name: &'static str,
    /// Waits for the previous grid before reading anything but its weights
    /// (WAIT_FOR_PRIOR_GRIDS in kernels.cu), so it may be launched as a programmatic
    /// dependent: the GEMVs.
    waits_for_prior_grids: bool,
}

enum KernelFn {
    Cuda(CudaFunction),
    /// Index in the emulator's kernel table.
    Emulated(i32),
}

struct Kernels {
    /// [plain, gated MLP][f32, f16, bf16][1, 2, 4, 8 rows]
    gemv: [[[Kernel; 4]; 3]; 2],
    epilogue: Kernel,
    round_rows: Kernel,
    rmsnorm: Kernel,
    layernorm: Kernel,
    embed: Kernel,
    round_in_place: Kernel,
    gather_rows: Kernel,
    soft_cap: Kernel,
    sample_rows: Kernel,
    rope: Kernel,
    /// [f32, f16, bf16 cache]
    attention_split: [Kernel; 3],
    attention_merge: Kernel,
    /// [f32, f16, bf16 cache]
    write_kv: [Kernel; 3],
    conv1d: Kernel,
    conv1d_keep: Kernel,
    rglru_scan: Kernel,
    ln_shift_mix: Kernel,
    wkv5: Kernel,
    group_norm_gate: Kernel,
    read_sum: Kernel,
}

impl Kernels {
    /// Every kernel, found by name.
    fn load(find: impl Fn(&'static str) -> Result<KernelFn>) -> Result<Kernels> {
        let kernel = |name: &'static str, waits_for_prior_grids| {
            find(name).map(|f| Kernel {
                f,
                name,
                waits_for_prior_grids,
            })
        };
        let f = |name| kernel(name, false);
        let gemv = |name| kernel(name, true);
        Ok(Kernels {
            gemv: [
                [
                    [
                        gemv("gemv_f32_1")?,
                        gemv("gemv_f32_2")?,
                        gemv("gemv_f32_4")?,
                        gemv("gemv_f32_8")?,
                    ],
                    [
                        gemv("gemv_f16_1")?,
                        gemv("gemv_f16_2")?,
                        gemv("gemv_f16_4")?,
                        gemv("gemv_f16_8")?,
                    ],
                    [
                        gemv("gemv_bf16_1")?,
                        gemv("gemv_bf16_2")?,
                        gemv("gemv_bf16_4")?,
                        gemv("gemv_bf16_8")?,
                    ],
                ],
                [
                    [
                        gemv("gemv_gated_f32_1")?,
                        gemv("gemv_gated_f32_2")?,
                        gemv("gemv_gated_f32_4")?,
                        gemv("gemv_gated_f32_8")?,
                    ],
                    [
                        gemv("gemv_gated_f16_1")?,
                        gemv("gemv_gated_f16_2")?,
                        gemv("gemv_gated_f16_4")?,
                        gemv("gemv_gated_f16_8")?,
                    ],
                    [
                        gemv("gemv_gated_bf16_1")?,
                        gemv("gemv_gated_bf16_2")?,
                        gemv("gemv_gated_bf16_4")?,
                        gemv("gemv_gated_bf16_8")?,
                    ],
                ],
            ],
            epilogue: f("epilogue")?,
            round_rows: f("round_rows")?,
            rmsnorm: f("rmsnorm")?,
            layernorm: f("layernorm")?,
            embed: f("embed")?,
            round_in_place: f("round_in_place")?,
            gather_rows: f("gather_rows")?,
            soft_cap: f("soft_cap")?,
            sample_rows: f("sample_rows")?,
            rope: f("rope")?,
            attention_split: [
                f("attention_split_f32")?,
                f("attention_split_f16")?,
                f("attention_split_bf16")?,
            ],
            attention_merge: f("attention_merge")?,
            write_kv: [f("write_kv_f32")?, f("write_kv_f16")?, f("write_kv_bf16")?],
            conv1d: f("conv1d")?,
            conv1d_keep: f("conv1d_keep")?,
            rglru_scan: f("rglru_scan")?,
            ln_shift_mix: f("ln_shift_mix")?,
            wkv5: f("wkv5")?,
            group_norm_gate: f("group_norm_gate")?,
            read_sum: f("read_sum")?,
        })
    }
}

/// One CUDA device with its stream, kernels and cuBLAS handle (or the CPU emulator).
pub struct Gpu {
    dev: Backend,
    k: Kernels,
    name: String,
    /// Scratch of cuBLAS products: [0] activations rounded to bf16/f16, [1] bare products,
    /// [2] normalised activations.
    scratch: Mutex<[Option<(DevPtr, usize)>; 3]>,
    /// Bumped whenever scratch moves: captured graphs of older generations are stale.
    generation: std::sync::atomic::AtomicU64,
    /// Launch timings (GYRE_CUDA_PROFILE=1).
    profile: Option<Mutex<Vec<Timing>>>,
    /// GEMVs launched as programmatic dependents (GYRE_CUDA_PDL=1, compute capability 9+).
    pdl: bool,
    /// The thread using the stream (see [`Gpu::exclusive`]), and a wake-up for waiters.
    owner: Mutex<Option<std::thread::ThreadId>>,
    released: std::sync::Condvar,
}

enum Backend {
    Cuda {
        ctx: Arc<CudaContext>,
        stream: Arc<CudaStream>,
        blas: CudaBlas,
    },
    Emulated(Emulator),
}

/// One timed launch: kernel name, events before and after.
type Timing = (&'static str, CudaEvent, CudaEvent);

/// A captured sequence of launches (a decode step), replayed with one call.
pub enum Graph {
    Cuda(CudaGraph),
    Emulated(EmuGraph),
}

// SAFETY: a graph's executable handle may be launched from any thread once the context is
// bound (Gpu::replay binds it); the models keep graphs behind a mutex.
unsafe impl Send for Graph {}
unsafe impl Sync for Graph {}

// SAFETY: the CUDA driver API is thread-safe; every call binds the context to the calling
// thread first, and the one stream orders all work. The stream, and the cuBLAS handle on
// it, are used by one thread at a time (`Gpu::exclusive`). The emulator is Send + Sync.
unsafe impl Send for Gpu {}
unsafe impl Sync for Gpu {}

/// The stream held by one thread (see [`Gpu::exclusive`]).
pub struct Exclusive<'a>(Option<&'a Gpu>);

impl Drop for Exclusive<'_> {
    fn drop(&mut self) {
        if let Some(gpu) = self.0 {
            if let Ok(mut owner) = gpu.owner.lock() {
                *owner = None;
            }
            gpu.released.notify_one();
        }
    }
}

impl fmt::Debug for Gpu {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Gpu({})", self.name)
    }
}

impl Gpu {
    /// Opens device `ordinal` (process-wide, once): loads the driver, NVRTC and cuBLAS,
    /// compiles the kernels for the device's architecture.
    pub fn open(ordinal: usize) -> Result<Arc<Gpu>> {
        type Opened = Mutex<Vec<(usize, Arc<Gpu>)>>;
        static OPENED: OnceLock<Opened> = OnceLock::new();
        let opened = OPENED.get_or_init(|| Mutex::new(Vec::new()));
        let mut opened = opened
            .lock()
            .map_err(|_| anyhow!("CUDA device registry poisoned"))?;
        if let Some((_, g)) = opened.iter().find(|(o, _)| *o == ordinal) {
            return Ok(g.clone());
        }
        let gpu = Arc::new(Self::open_new(ordinal)?);
        opened.push((ordinal, gpu.clone()));
        Ok(gpu)
    }

    fn open_new(ordinal: usize) -> Result<Gpu> {
        if emulator::requested() {
            if ordinal != 0 {
                bail!("--device cuda:{ordinal}: the CUDA emulator (GYRE_CUDA_EMULATOR=1) is device 0 only");
            }
            let emu = Emulator::load(SOURCE)?;
            let k = Kernels::load(|name| Ok(KernelFn::Emulated(emu.kernel(name)?)))?;
            return Ok(Gpu::with(
                Backend::Emulated(emu),
                k,
                "CPU emulator (GYRE_CUDA_EMULATOR=1)".into(),
            ));
        }
        // SAFETY: each probe only tries to dlopen a library by its known names.
        let (driver, nvrtc, cublas) = unsafe {
            (
                sys::is_culib_present(),
                cudarc::nvrtc::sys::is_culib_present(),
                blas_sys::is_culib_present(),
            )
        };
        if !driver {
            bail!(
                "--device cuda: no CUDA driver found (libcuda.so could not be loaded); install the \
                 NVIDIA driver or run with --device cpu"
            );
        }
        for (present, lib) in [(nvrtc, "libnvrtc.so"), (cublas, "libcublas.so")] {
            if !present {
                bail!(
                    "--device cuda: {lib} (CUDA 12 or 13) could not be loaded; install the CUDA \
                     toolkit or its pip wheels and add their lib directory to LD_LIBRARY_PATH"
                );
            }
        }
        let count = CudaContext::device_count().map_err(|e| anyhow!("CUDA: {e:?}"))?;
        if ordinal as i32 >= count {
            bail!("--device cuda:{ordinal}: this machine has {count} CUDA device(s)");
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| anyhow!("CUDA: creating a context: {e:?}"))?;
        let stream = ctx
            .new_stream()
            .map_err(|e| anyhow!("CUDA: creating a stream: {e:?}"))?;
        let (major, minor) = ctx.compute_capability().map_err(|e| anyhow!("CUDA: {e:?}"))?;
        let name = ctx.name().unwrap_or_else(|_| "CUDA device".into());
        let ptx = compile(major, minor)?;
        let module = ctx
            .load_module(ptx)
            .map_err(|e| anyhow!("CUDA: loading gyre's kernels: {e:?}"))?;
        let k = Kernels::load(|name| {
            module
                .load_function(name)
                .map(KernelFn::Cuda)
                .map_err(|e| anyhow!("CUDA: kernel {name} missing: {e:?}"))
        })?;
        let blas = CudaBlas::new(stream.clone()).map_err(|e| anyhow!("cuBLAS: {e:?}"))?;
        let mut gpu = Gpu::with(
            Backend::Cuda { ctx, stream, blas },
            k,
            format!("{name} (sm_{major}{minor})"),
        );
        // Experimental until measured: the GEMVs start while the previous kernel finishes.
        gpu.pdl = major >= 9 && std::env::var_os("GYRE_CUDA_PDL").is_some_and(|v| v == "1");
        Ok(gpu)
    }

    fn with(dev: Backend, k: Kernels, name: String) -> Gpu {
        let cuda = matches!(dev, Backend::Cuda { .. });
        Gpu {
            dev,
            k,
            name,
            scratch: Mutex::new([None, None, None]),
            generation: std::sync::atomic::AtomicU64::new(0),
            profile: (cuda && std::env::var_os("GYRE_CUDA_PROFILE").is_some_and(|v| v == "1"))
                .then(|| Mutex::new(Vec::new())),
            owner: Mutex::new(None),
            released: std::sync::Condvar::new(),
            pdl: false,
        }
    }

    /// The device's name and architecture.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Makes this device current on the calling thread (every entry point calls it).
    pub fn bind(&self) -> Result<()> {
        match &self.dev {
            Backend::Cuda { ctx, .. } => ctx.bind_to_thread().map_err(|e| anyhow!("CUDA: {e:?}")),
            Backend::Emulated(_) => Ok(()),
        }
    }

    /// The stream for this thread alone until the guard drops (re-entrant: a thread that
    /// holds it gets an empty guard). Every stream operation takes it, and a forward pass
    /// holds it throughout: passes of different models share the stream, the product
    /// scratch and, while a step is captured, the recording.
    pub fn exclusive(&self) -> Result<Exclusive<'_>> {
        let me = std::thread::current().id();
        let poisoned = |_| anyhow!("CUDA device lock poisoned");
        let mut owner = self.owner.lock().map_err(poisoned)?;
        if *owner == Some(me) {
            return Ok(Exclusive(None));
        }
        while owner.is_some() {
            owner = self.released.wait(owner).map_err(poisoned)?;
        }
        *owner = Some(me);
        Ok(Exclusive(Some(self)))
    }

    /// Free and total device memory in bytes (the emulator: the host's available memory).
    pub fn memory(&self) -> Result<(usize, usize)> {
        self.bind()?;
        match &self.dev {
            Backend::Cuda { ctx, .. } => ctx.mem_get_info().map_err(|e| anyhow!("CUDA: {e:?}")),
            Backend::Emulated(_) => Ok(crate::kernels::cpu::host_memory()),
        }
    }

    /// Uninitialised device memory (`bytes` may be 0).
    pub fn alloc(self: &Arc<Self>, bytes: usize) -> Result<DevBuf> {
        let ptr = if bytes == 0 {
            DevPtr::NULL
        } else {
            self.raw_alloc(bytes)?
        };
        Ok(DevBuf {
            gpu: self.clone(),
            ptr,
            bytes,
        })
    }

    /// `bytes` (> 0) of device memory, 256-byte aligned, freed by [`Gpu::raw_free`].
    fn raw_alloc(&self, bytes: usize) -> Result<DevPtr> {
        self.bind()?;
        match &self.dev {
            // SAFETY: plain allocation; the returned address is owned by the caller.
            Backend::Cuda { .. } => unsafe { drv::malloc_sync(bytes) }.map(DevPtr).map_err(|e| {
                let free = self.memory().map(|m| m.0 >> 20).unwrap_or(0);
                anyhow!(
                    "CUDA: allocating {} MiB failed ({e:?}; {free} MiB free)",
                    bytes >> 20
                )
            }),
            Backend::Emulated(emu) => emu
                .alloc(bytes)
                .map(DevPtr)
                .ok_or_else(|| anyhow!("CUDA emulator: allocating {} MiB failed", bytes >> 20)),
        }
    }

    /// Frees memory from [`Gpu::raw_alloc`]; errors only leak.
    ///
    /// # Safety
    /// `ptr` came from `raw_alloc(bytes)` and no queued work uses it any more.
    unsafe fn raw_free(&self, ptr: DevPtr, bytes: usize) {
        match &self.dev {
            Backend::Cuda { ctx, .. } => {
                let _ = ctx.bind_to_thread();
                let _ = drv::free_sync(ptr.0);
            }
            Backend::Emulated(emu) => emu.free(ptr.0, bytes),
        }
    }

    /// Zeroed device memory.
    pub fn zeros(self: &Arc<Self>, bytes: usize) -> Result<DevBuf> {
        let buf = self.alloc(bytes)?;
        self.memset_zero(buf.ptr, bytes)?;
        Ok(buf)
    }

    pub fn memset_zero(&self, ptr: DevPtr, bytes: usize) -> Result<()> {
        if bytes == 0 {
            return Ok(());
        }
        let _stream = self.exclusive()?;
        match &self.dev {
            // SAFETY: the caller owns `bytes` bytes at `ptr`.
            Backend::Cuda { stream, .. } => {
                unsafe { drv::memset_d8_async(ptr.0, 0, bytes, stream.cu_stream()) }
                    .map_err(|e| anyhow!("CUDA memset: {e:?}"))
            }
            // SAFETY: as above (emulated device memory is host memory).
            Backend::Emulated(emu) => unsafe { emu.memset_zero(ptr.0, bytes) },
        }
    }

    /// A device copy of `data`.
    pub fn upload<T: Copy>(self: &Arc<Self>, data: &[T]) -> Result<DevBuf> {
        let buf = self.alloc(std::mem::size_of_val(data))?;
        self.write(buf.ptr, data)?;
        Ok(buf)
    }

    /// Copies `data` to `dst` (the caller owns that much device memory there). Returns when
    /// the host memory may be reused.
    pub fn write<T: Copy>(&self, dst: DevPtr, data: &[T]) -> Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        let _stream = self.exclusive()?;
        self.bind()?;
        match &self.dev {
            Backend::Cuda { stream, .. } => {
                // SAFETY: `dst` holds at least size_of_val(data) bytes (caller's contract);
                // the synchronisation below keeps `data` alive until the copy is done.
                unsafe { drv::memcpy_htod_async(dst.0, data, stream.cu_stream()) }
                    .map_err(|e| anyhow!("CUDA host-to-device copy: {e:?}"))?;
                self.sync()
            }
            // SAFETY: as above; the emulator's launches have all run (it is synchronous),
            // and `dst` is host memory owned by the caller.
            Backend::Emulated(_) => unsafe {
                std::ptr::copy_nonoverlapping(
                    data.as_ptr() as *const u8,
                    dst.0 as *mut u8,
                    std::mem::size_of_val(data),
                );
                Ok(())
            },
        }
    }

    /// Reads `out.len()` values from `src` after all queued work.
    pub fn read<T: Copy>(&self, src: DevPtr, out: &mut [T]) -> Result<()> {
        if out.is_empty() {
            return Ok(());
        }
        let _stream = self.exclusive()?;
        self.bind()?;
        match &self.dev {
            Backend::Cuda { stream, .. } => {
                // SAFETY: `src` holds at least size_of_val(out) bytes (caller's contract);
                // the copy completes before `out` is released by the synchronisation below.
                unsafe { drv::memcpy_dtoh_async(out, src.0, stream.cu_stream()) }
                    .map_err(|e| anyhow!("CUDA device-to-host copy: {e:?}"))?;
                self.sync()
            }
            // SAFETY: as above, in host memory; T is Copy, so any bytes the device wrote
            // there are a value of it (the kernels write f32, i32 and u32 only).
            Backend::Emulated(_) => unsafe {
                std::ptr::copy_nonoverlapping(
                    src.0 as *const u8,
                    out.as_mut_ptr() as *mut u8,
                    std::mem::size_of_val(out),
                );
                Ok(())
            },
        }
    }

    /// Device-to-device copy, queued on the stream.
    pub fn copy(&self, dst: DevPtr, src: DevPtr, bytes: usize) -> Result<()> {
        if bytes == 0 {
            return Ok(());
        }
        let _stream = self.exclusive()?;
        match &self.dev {
            // SAFETY: both ranges are owned device memory of at least `bytes` (caller's
            // contract).
            Backend::Cuda { stream, .. } => {
                unsafe { drv::memcpy_dtod_async(dst.0, src.0, bytes, stream.cu_stream()) }
                    .map_err(|e| anyhow!("CUDA device-to-device copy: {e:?}"))
            }
            // SAFETY: as above.
            Backend::Emulated(emu) => unsafe { emu.copy(dst.0, src.0, bytes) },
        }
    }

    /// Waits for all queued work; reports errors of earlier launches.
    pub fn sync(&self) -> Result<()> {
        let _stream = self.exclusive()?;
        match &self.dev {
            Backend::Cuda { stream, .. } => stream
                .synchronize()
                .map_err(|e| anyhow!("CUDA: a kernel failed: {e:?}")),
            // Emulated work runs when queued; its errors were returned then.
            Backend::Emulated(_) => Ok(()),
        }
    }

    /// Changes whenever device scratch moves (graphs captured before then are stale).
    pub fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Records the launches `body` queues (which must not synchronise, copy from the host or
    /// allocate) into a graph without running them.
    pub fn capture(&self, body: impl FnOnce() -> Result<()>) -> Result<Graph> {
        let _stream = self.exclusive()?;
        self.bind()?;
        match &self.dev {
            Backend::Cuda { stream, .. } => {
                stream
                    .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
                    .map_err(|e| anyhow!("CUDA graph capture: {e:?}"))?;
                let run = body();
                let graph = stream.end_capture(sys::CUgraphInstantiate_flags_enum(0));
                run?;
                match graph {
                    Ok(Some(g)) => Ok(Graph::Cuda(g)),
                    Ok(None) => bail!("CUDA graph capture recorded nothing"),
                    Err(e) => bail!("CUDA graph capture: {e:?}"),
                }
            }
            Backend::Emulated(emu) => {
                emu.begin_capture();
                let run = body();
                let graph = emu.end_capture();
                run.map(|()| Graph::Emulated(graph))
            }
        }
    }

    /// Queues a captured graph.
    pub fn replay(&self, g: &Graph) -> Result<()> {
        let _stream = self.exclusive()?;
        self.bind()?;
        match (&self.dev, g) {
            (Backend::Cuda { .. }, Graph::Cuda(g)) => {
                g.launch().map_err(|e| anyhow!("CUDA graph launch: {e:?}"))
            }
            (Backend::Emulated(emu), Graph::Emulated(g)) => emu.replay(g),
            _ => bail!("internal: a graph replayed on another device than it was captured on"),
        }
    }

    fn launch(
        &self,
        k: &Kernel,
        grid: (u32, u32, u32),
        block: u32,
        smem: u32,
        params: &mut [*mut c_void],
    ) -> Result<()> {
        let _stream = self.exclusive()?;
        let timing = self.profile_start()?;
        // SAFETY (both devices): every launcher below passes exactly its kernel's parameter
        // list, in kernels.cu order, as pointers to values of the matching C types (i32 =
        // int, i64 = long long, f32 = float, DevPtr = a pointer, AttnArgs = struct Attn,
        // both #[repr(C)]/transparent); the launch copies them before returning. Device
        // addresses come from live DevBufs sized by the models for the shapes passed.
        match (&self.dev, &k.f) {
            (Backend::Cuda { stream, .. }, KernelFn::Cuda(f)) => unsafe {
                if self.pdl && k.waits_for_prior_grids {
                    let mut attr: sys::CUlaunchAttribute = std::mem::zeroed();
                    attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
                    attr.value.programmaticStreamSerializationAllowed = 1;
                    let config = sys::CUlaunchConfig {
                        gridDimX: grid.0,
                        gridDimY: grid.1,
                        gridDimZ: grid.2,
                        blockDimX: block,
                        blockDimY: 1,
                        blockDimZ: 1,
                        sharedMemBytes: smem,
                        hStream: stream.cu_stream(),
                        attrs: &mut attr,
                        numAttrs: 1,
                    };
                    sys::cuLaunchKernelEx(
                        &config,
                        f.cu_function(),
                        params.as_mut_ptr(),
                        std::ptr::null_mut(),
                    )
                    .result()
                } else {
                    drv::launch_kernel(
                        f.cu_function(),
                        grid,
                        (block, 1, 1),
                        smem,
                        stream.cu_stream(),
                        params,
                    )
                }
                .map_err(|e| anyhow!("CUDA kernel {} failed to launch: {e:?}", k.name))?
            },
            (Backend::Emulated(emu), KernelFn::Emulated(i)) => unsafe {
                emu.launch(*i, k.name, grid, block, smem, params)?
            },
            _ => bail!("internal: kernel {} belongs to another device", k.name),
        }
        self.profile_end(k.name, timing)
    }
    /// With `GYRE_CUDA_PROFILE=1`: an event before a launch.
    fn profile_start(&self) -> Result<Option<CudaEvent>> {
        if self.profile.is_none() {
            return Ok(None);
        }
        let Backend::Cuda { ctx, stream, .. } = &self.dev else {
            return Ok(None);
        };
        let e = ctx
            .new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(|e| anyhow!("CUDA event: {e:?}"))?;
        e.record(stream).map_err(|e| anyhow!("CUDA event: {e:?}"))?;
        Ok(Some(e))
    }

    fn profile_end(&self, name: &'static str, start: Option<CudaEvent>) -> Result<()> {
        let (Some(start), Some(p)) = (start, &self.profile) else {
            return Ok(());
        };
        let end = self.profile_start()?.expect("profiling is on");
        p.lock()
            .map_err(|_| anyhow!("profile lock poisoned"))?
            .push((name, start, end));
        Ok(())
    }

    /// With `GYRE_CUDA_PROFILE=1`: device time per kernel since the last report, longest
    /// first (launches are timed one by one, so graphs are not used while profiling).
    pub fn profile_report(&self) -> Result<Vec<(&'static str, f64, usize)>> {
        let Some(p) = &self.profile else {
            return Ok(Vec::new());
        };
        self.sync()?;
        let mut totals: Vec<(&'static str, f64, usize)> = Vec::new();
        for (name, a, b) in p.lock().map_err(|_| anyhow!("profile lock poisoned"))?.drain(..) {
            let ms = a.elapsed_ms(&b).map_err(|e| anyhow!("CUDA event: {e:?}"))? as f64;
            match totals.iter_mut().find(|t| t.0 == name) {
                Some(t) => {
                    t.1 += ms;
                    t.2 += 1;
                }
                None => totals.push((name, ms, 1)),
            }
        }
        totals.sort_by(|a, b| b.1.total_cmp(&a.1));
        Ok(totals)
    }

    /// Whether launches are being timed one by one.
    pub fn profiling(&self) -> bool {
        self.profile.is_some()
    }
}

/// `&value as *mut c_void` for a launch's parameter list.
macro_rules! params {
    ($($v:expr),* $(,)?) => { &mut [$(&$v as *const _ as *mut c_void),*] };
}

fn blocks(n: usize, per: usize) -> u32 {
    n.div_ceil(per).max(1) as u32
}

const THREADS: u32 = 256;

/// Threads of the row-norm kernels; each holds up to 16 values (`NORM_PER_THREAD`).
const NORM_THREADS: u32 = 512;

fn check_norm_width(c: usize) -> Result<()> {
    if c > 16 * NORM_THREADS as usize {
        bail!(
            "hidden size {c} is above the CUDA norm kernels' {}",
            16 * NORM_THREADS
        );
    }
    Ok(())
}

fn dtype_code(d: DType) -> i32 {
    match d {
        DType::F32 => 0,
        DType::F16 => 1,
        DType::BF16 => 2,
    }
}

fn blas_type(d: DType) -> blas_sys::cudaDataType {
    match d {
        DType::F32 => blas_sys::cudaDataType::CUDA_R_32F,
        DType::F16 => blas_sys::cudaDataType::CUDA_R_16F,
        DType::BF16 => blas_sys::cudaDataType::CUDA_R_16BF,
    }
}

impl Gpu {
    /// Uploads weights as stored: `parts` are row blocks of one matrix (fused projections)
    /// in the same dtype, each [rows_i, cols].
    pub fn upload_matrix(
        self: &Arc<Self>,
        parts: &[(&[u8], usize)],
        dtype: DType,
        cols: usize,
    ) -> Result<DevMatrix> {
        let rows: usize = parts.iter().map(|p| p.1).sum();
        let buf = self.alloc(rows * cols * dtype.size())?;
        let mut off = 0;
        for (raw, r) in parts {
            if raw.len() != r * cols * dtype.size() {
                bail!(
                    "internal: weight block of {} bytes is not [{r}, {cols}] {dtype}",
                    raw.len()
                );
            }
            self.write(buf.ptr.byte_at(off), raw)?;
            off += raw.len();
        }
        Ok(DevMatrix {
            buf,
            dtype,
            rows,
            cols,
            groups: 1,
        })
    }

    /// `y ⊕= x·Wᵀ (+ b)` for every row (⊕ per [`Epilogue`]): the GEMV kernel up to
    /// [`GEMV_ROWS`] rows, cuBLAS above.
    pub fn linear(&self, w: &DevMatrix, p: Product) -> Result<()> {
        let paired = p.epilogue.rows_per_output();
        if paired > 1 && (w.groups != 1 || !w.rows.is_multiple_of(paired)) {
            bail!(
                "internal: a gated MLP product needs one [gate; up] matrix, not {} rows in {} groups",
                w.rows,
                w.groups
            );
        }
        if p.norm.is_some() && (w.groups != 1 || p.x_stride != w.cols) {
            bail!("internal: a normalised product needs dense rows and one group");
        }
        if p.rows > GEMV_ROWS {
            return self.gemm(w, p);
        }
        let groups = w.groups;
        let (n_out, n_in) = (w.rows / groups / paired, w.cols);
        let variant = match p.rows {
            0 => return Ok(()),
            1 => 0,
            2 => 1,
            3 | 4 => 2,
            _ => 3,
        };
        let k = &self.k.gemv[(paired > 1) as usize][dtype_code(w.dtype) as usize][variant];
        let vec = 16 / w.dtype.size();
        let vec_ok =
            (n_in.is_multiple_of(vec) && p.x_stride.is_multiple_of(4) && n_in.is_multiple_of(4)) as i32;
        let bias = p.bias.unwrap_or(DevPtr::NULL);
        let (n_in_i, n_out_i, rows_i) = (n_in as i32, n_out as i32, p.rows as i32);
        let (xs, ys, mode, aux) = (
            p.x_stride as i32,
            p.y_stride as i32,
            p.epilogue.mode(),
            p.epilogue.aux(),
        );
        let (wg, xg, yg) = ((n_out * n_in) as i64, n_in as i32, n_out as i32);
        let (norm_w, norm_eps) = p.norm.unwrap_or((DevPtr::NULL, 0.0));
        const WARPS: usize = 4;
        self.launch(
            k,
            (blocks(n_out, WARPS), groups as u32, 1),
            32 * WARPS as u32,
            0,
            params!(
                w.buf.ptr, p.x, p.y, bias, n_in_i, n_out_i, rows_i, xs, ys, mode, wg, xg, yg, vec_ok, aux,
                norm_w, norm_eps
            ),
        )
    }

    /// cuBLAS product for many rows (prefill, large batches): activations rounded to the
    /// weights' 16-bit dtype, f32 accumulation and output; bias and activation after.
    fn gemm(&self, w: &DevMatrix, mut p: Product) -> Result<()> {
        // Held across the scratch, the rounding launch and the product.
        let _stream = self.exclusive()?;
        if let Some((norm_w, eps)) = p.norm.take() {
            let normed = self.scratch(2, p.rows * w.cols * 4)?;
            self.rmsnorm(p.x, norm_w, normed, p.rows, w.cols, eps, 0.0)?;
            p.x = normed;
        }
        let groups = w.groups;
        let (n_out, n_in) = (w.rows / groups, w.cols);
        let full_in = n_in * groups;
        let full_out = n_out * groups;
        let (b_ptr, ldb) = if w.dtype == DType::F32 {
            (p.x, p.x_stride)
        } else {
            let scratch = self.scratch(0, p.rows * full_in * 2)?;
            let (rows_i, n_i, xs, dt) = (
                p.rows as i32,
                full_in as i32,
                p.x_stride as i32,
                dtype_code(w.dtype),
            );
            self.launch(
                &self.k.round_rows,
                (blocks(p.rows * full_in, THREADS as usize), 1, 1),
                THREADS,
                0,
                params!(p.x, scratch, rows_i, n_i, xs, dt),
            )?;
            (scratch, full_in)
        };
        // Gated accumulation needs the bare product apart; the others land in y directly.
        let (c_ptr, ldc, beta) = match p.epilogue {
            Epilogue::AccumulateGated(_) | Epilogue::GatedMlp { .. } => {
                (self.scratch(1, p.rows * full_out * 4)?, full_out, 0.0f32)
            }
            Epilogue::Accumulate => (p.y, p.y_stride, 1.0),
            Epilogue::Store | Epilogue::ReluSquare => (p.y, p.y_stride, 0.0),
        };
        let alpha = 1.0f32;
        let timing = self.profile_start()?;
        let t = blas_type(w.dtype);
        let failed = |e: &dyn fmt::Debug| {
            anyhow!(
                "cuBLAS product [{}×{n_in}]·[{n_out}×{n_in}]ᵀ failed: {e:?}",
                p.rows
            )
        };
        match &self.dev {
            // SAFETY: A is W [groups][n_out, n_in] (column-major n_in × n_out, lda n_in, op
            // T), B the activations (column-major full_in × rows, ldb), C the output (n_out ×
            // rows, ldc y_stride) in f32; all live device buffers of those extents, on our
            // stream.
            Backend::Cuda { blas, .. } => unsafe {
                cudarc::cublas::result::gemm_strided_batched_ex(
                    *blas.handle(),
                    blas_sys::cublasOperation_t::CUBLAS_OP_T,
                    blas_sys::cublasOperation_t::CUBLAS_OP_N,
                    n_out as i32,
                    p.rows as i32,
                    n_in as i32,
                    &alpha as *const f32 as *const c_void,
                    w.buf.ptr.0 as *const c_void,
                    t,
                    n_in as i32,
                    (n_out * n_in) as i64,
                    b_ptr.0 as *const c_void,
                    t,
                    ldb as i32,
                    n_in as i64,
                    &beta as *const f32 as *const c_void,
                    c_ptr.0 as *mut c_void,
                    blas_sys::cudaDataType::CUDA_R_32F,
                    ldc as i32,
                    n_out as i64,
                    groups as i32,
                    blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                    blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                )
            }
            .map_err(|e| failed(&e))?,
            // SAFETY: the same product and extents, in host memory.
            Backend::Emulated(emu) => unsafe {
                let t = t as i32;
                emu.gemm(
                    (n_out as i32, p.rows as i32, n_in as i32),
                    alpha,
                    (w.buf.ptr.0, t, n_in as i32, (n_out * n_in) as i64),
                    (b_ptr.0, t, ldb as i32, n_in as i64),
                    beta,
                    (c_ptr.0, ldc as i32, n_out as i64),
                    groups as i32,
                )
                .map_err(|e| failed(&e))?
            },
        }
        self.profile_end("cublas_gemm", timing)?;
        let needs_pass = p.bias.is_some() || !matches!(p.epilogue, Epilogue::Store | Epilogue::Accumulate);
        if needs_pass {
            // After an accumulating product y already holds the sum: only the bias is left.
            let mode = match p.epilogue {
                Epilogue::Accumulate => 0,
                e => e.mode(),
            };
            let bias = p.bias.unwrap_or(DevPtr::NULL);
            let n = full_out / p.epilogue.rows_per_output();
            let (rows_i, n_i, ys) = (p.rows as i32, n as i32, p.y_stride as i32);
            self.launch(
                &self.k.epilogue,
                (blocks(p.rows * n, THREADS as usize), 1, 1),
                THREADS,
                0,
                params!(p.y, c_ptr, bias, p.epilogue.aux(), rows_i, n_i, ys, mode),
            )?;
        }
        Ok(())
    }

    fn scratch(&self, slot: usize, bytes: usize) -> Result<DevPtr> {
        let mut all = self
            .scratch
            .lock()
            .map_err(|_| anyhow!("scratch lock poisoned"))?;
        let s = &mut all[slot];
        if let Some((p, cap)) = *s {
            if cap >= bytes {
                return Ok(p);
            }
            self.sync()?;
            // SAFETY: allocated below by raw_alloc(cap) and only referenced through this
            // slot; the stream is idle, so no queued product still reads it.
            unsafe { self.raw_free(p, cap) };
            *s = None;
        }
        let cap = bytes.next_power_of_two().max(1 << 20);
        self.generation.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = self.raw_alloc(cap)?;
        *s = Some((p, cap));
        Ok(p)
    }

    /// RMSNorm of `rows` rows of `c` (Gemma's `1 + w` when `w_offset` is 1).
    #[allow(clippy::too_many_arguments)]
    pub fn rmsnorm(
        &self,
        x: DevPtr,
        w: DevPtr,
        out: DevPtr,
        rows: usize,
        c: usize,
        eps: f32,
        w_offset: f32,
    ) -> Result<()> {
        check_norm_width(c)?;
        let c_i = c as i32;
        self.launch(
            &self.k.rmsnorm,
            (rows as u32, 1, 1),
            NORM_THREADS,
            0,
            params!(x, w, out, c_i, eps, w_offset),
        )
    }

    /// LayerNorm of `rows` rows of `c`.
    #[allow(clippy::too_many_arguments)]
    pub fn layernorm(
        &self,
        x: DevPtr,
        w: DevPtr,
        b: DevPtr,
        out: DevPtr,
        rows: usize,
        c: usize,
        eps: f32,
    ) -> Result<()> {
        check_norm_width(c)?;
        let c_i = c as i32;
        self.launch(
            &self.k.layernorm,
            (rows as u32, 1, 1),
            NORM_THREADS,
            0,
            params!(x, w, b, out, c_i, eps),
        )
    }

    /// `out[r] = scale · table[tokens[r]]` (table [V, c] in `dtype`).
    #[allow(clippy::too_many_arguments)]
    pub fn embed(
        &self,
        table: DevPtr,
        dtype: DType,
        tokens: DevPtr,
        out: DevPtr,
        rows: usize,
        c: usize,
        scale: f32,
    ) -> Result<()> {
        let (dt, c_i) = (dtype_code(dtype), c as i32);
        self.launch(
            &self.k.embed,
            (rows as u32, 1, 1),
            THREADS,
            0,
            params!(table, dt, tokens, out, c_i, scale),
        )
    }

    /// Rounds `n` values to `dtype` in place (no-op for f32).
    pub fn round_in_place(&self, x: DevPtr, n: usize, dtype: DType) -> Result<()> {
        let (n64, dt) = (n as u64, dtype_code(dtype));
        self.launch(
            &self.k.round_in_place,
            (blocks(n, 256), 1, 1),
            THREADS,
            0,
            params!(x, n64, dt),
        )
    }

    /// `out[i] = x[rows[i]]`, `n` rows of `c`.
    pub fn gather_rows(&self, x: DevPtr, rows: DevPtr, out: DevPtr, n: usize, c: usize) -> Result<()> {
        let c_i = c as i32;
        self.launch(
            &self.k.gather_rows,
            (n as u32, 1, 1),
            THREADS,
            0,
            params!(x, rows, out, c_i),
        )
    }

    /// `ids[r]` (u32) = the token that draw `draws[r]` ([`draw_args`]) picks from logits row r, for
    /// `rows` rows of `v` ([`crate::sampling::Draw::pick`]'s rule).
    pub fn sample_rows(
        &self,
        logits: DevPtr,
        rows: usize,
        v: usize,
        draws: DevPtr,
        ids: DevPtr,
    ) -> Result<()> {
        let v_i = v as i32;
        let threads = v.next_power_of_two().clamp(32, 1024) as u32;
        self.launch(
            &self.k.sample_rows,
            (rows as u32, 1, 1),
            threads,
            0,
            params!(logits, v_i, draws, ids),
        )
    }

    pub fn soft_cap(&self, x: DevPtr, n: usize, cap: f32) -> Result<()> {
        let n64 = n as u64;
        self.launch(
            &self.k.soft_cap,
            (blocks(n, 256), 1, 1),
            THREADS,
            0,
            params!(x, n64, cap),
        )
    }

    /// Half-split RoPE on the first `n_heads` heads of every row.
    #[allow(clippy::too_many_arguments)]
    pub fn rope(
        &self,
        x: DevPtr,
        x_stride: usize,
        n_heads: usize,
        hd: usize,
        half: usize,
        inv_freq: DevPtr,
        b: BatchMeta,
    ) -> Result<()> {
        let (xs, nh, hd_i, half_i) = (x_stride as i32, n_heads as i32, hd as i32, half as i32);
        self.launch(
            &self.k.rope,
            (b.rows as u32, n_heads as u32, 1),
            half.clamp(32, 256) as u32,
            0,
            params!(x, xs, nh, hd_i, half_i, inv_freq, b.meta, b.rows, b.seqs),
        )
    }

    /// Attention of every row over its visible keys (`max_keys` bounds any row's count),
    /// then the chunk's keys into the caches, which hold `cache` values. `out` [rows,
    /// heads·hd]; `part` scratch of at least [`Gpu::attention_scratch`] f32 values.
    pub fn attention(
        &self,
        a: AttnArgs,
        cache: DType,
        b: BatchMeta,
        max_keys: usize,
        out: DevPtr,
        part: DevPtr,
    ) -> Result<()> {
        if a.hd > 512 || a.hd % 4 != 0 {
            bail!(
                "attention head dimension {} is not one the CUDA kernel takes (a multiple of 4, at most 512)",
                a.hd
            );
        }
        let splits = max_keys.div_ceil(KEYS_PER_SPLIT).max(1);
        let rows = b.rows as usize;
        let heads = a.heads as usize;
        let part_ml = part.f32_at(rows * heads * splits * a.hd as usize);
        let splits_i = splits as i32;
        self.launch(
            &self.k.attention_split[dtype_code(cache) as usize],
            (rows as u32, heads as u32, splits as u32),
            256,
            0,
            params!(a, b.meta, b.states, b.rows, b.seqs, part, part_ml, splits_i),
        )?;
        let (heads_i, hd_i) = (a.heads, a.hd);
        self.launch(
            &self.k.attention_merge,
            (rows as u32, heads as u32, 1),
            128,
            0,
            params!(part, part_ml, out, heads_i, hd_i, splits_i),
        )?;
        self.launch(
            &self.k.write_kv[dtype_code(cache) as usize],
            (rows as u32, 1, 1),
            128,
            0,
            params!(a, b.meta, b.states, b.rows, b.seqs),
        )
    }

    /// f32 values of attention scratch for these sizes.
    pub fn attention_scratch(rows: usize, heads: usize, hd: usize, max_keys: usize) -> usize {
        let splits = max_keys.div_ceil(KEYS_PER_SPLIT).max(1);
        rows * heads * splits * (hd + 2)
    }

    /// Griffin's causal conv1d (then the history update) over `x` with row stride `x_stride`.
    #[allow(clippy::too_many_arguments)]
    pub fn conv1d(
        &self,
        x: DevPtr,
        x_stride: usize,
        out: DevPtr,
        w: DevPtr,
        bias: DevPtr,
        lru: usize,
        width: usize,
        hist_off: usize,
        b: BatchMeta,
    ) -> Result<()> {
        let (xs, lru_i, width_i, ho) = (x_stride as i32, lru as i32, width as i32, hist_off as i64);
        // With one row per sequence (decode) the conv's threads keep the history themselves.
        let inline = b.rows == b.seqs;
        let inline_i = inline as i32;
        self.launch(
            &self.k.conv1d,
            (blocks(lru, 256), b.rows as u32, 1),
            THREADS,
            0,
            params!(x, xs, out, w, bias, lru_i, width_i, ho, b.meta, b.states, b.rows, b.seqs, inline_i),
        )?;
        if inline {
            return Ok(());
        }
        self.launch(
            &self.k.conv1d_keep,
            (blocks(lru, 256), b.seqs as u32, 1),
            THREADS,
            0,
            params!(x, xs, lru_i, width_i, ho, b.meta, b.states, b.rows, b.seqs),
        )
    }

    /// The RG-LRU scan (gates [rows, H, 2, bw] pre-activation: input then recurrence gate
    /// per head; y with row stride `y_stride`).
    #[allow(clippy::too_many_arguments)]
    pub fn rglru_scan(
        &self,
        conv: DevPtr,
        gates: DevPtr,
        y: DevPtr,
        y_stride: usize,
        log_a_scale: DevPtr,
        out: DevPtr,
        lru: usize,
        bw: usize,
        h_off: usize,
        b: BatchMeta,
    ) -> Result<()> {
        let (ys, lru_i, bw_i, ho) = (y_stride as i32, lru as i32, bw as i32, h_off as i64);
        self.launch(
            &self.k.rglru_scan,
            (blocks(lru, 128), b.seqs as u32, 1),
            128,
            0,
            params!(
                conv,
                gates,
                y,
                ys,
                log_a_scale,
                out,
                lru_i,
                bw_i,
                ho,
                b.meta,
                b.states,
                b.rows,
                b.seqs
            ),
        )
    }

    /// RWKV's LayerNorm (`w`, `bias`) then token shift: `n_mix` mixes of every row into
    /// `out` [rows, n_mix·c]; each sequence's shift state (at `shift_off`) is read for its
    /// first row and replaced by its last row's norm.
    #[allow(clippy::too_many_arguments)]
    pub fn ln_shift_mix(
        &self,
        x: DevPtr,
        (w, bias, eps): (DevPtr, DevPtr, f32),
        out: DevPtr,
        mixes: DevPtr,
        n_mix: usize,
        c: usize,
        shift_off: usize,
        b: BatchMeta,
    ) -> Result<()> {
        check_norm_width(c)?;
        let (nm, c_i, so) = (n_mix as i32, c as i32, shift_off as i64);
        self.launch(
            &self.k.ln_shift_mix,
            (b.rows as u32, 1, 1),
            NORM_THREADS,
            0,
            params!(x, w, bias, eps, out, mixes, nm, c_i, so, b.meta, b.states, b.rows, b.seqs),
        )
    }

    /// The WKV recurrence over each sequence's rows, then the ln_x GroupNorm (`ln`: weight,
    /// bias, eps) and the gate; `rkvg` is [rows, 4·c_att] (r | k | v | g), `y` [rows, c_att].
    #[allow(clippy::too_many_arguments)]
    pub fn wkv5(
        &self,
        rkvg: DevPtr,
        decay: DevPtr,
        bonus: DevPtr,
        (ln_w, ln_b, eps): (DevPtr, DevPtr, f32),
        y: DevPtr,
        heads: usize,
        n: usize,
        wkv_off: usize,
        b: BatchMeta,
    ) -> Result<()> {
        if n > 1024 || !n.is_multiple_of(32) {
            bail!("RWKV head size {n} is not one the CUDA kernel takes (a multiple of 32, at most 1024)");
        }
        let (n_i, c_att, wo) = (n as i32, (heads * n) as i32, wkv_off as i64);
        let smem = ((n * n + 3 * n) * 4) as u32;
        if smem > 48 * 1024 {
            bail!("RWKV head size {n} needs {smem} bytes of shared memory, above 48 KiB");
        }
        // A decode step normalises inside the scan; longer segments afterwards, in parallel.
        let inline = b.rows == b.seqs;
        let inline_i = inline as i32;
        self.launch(
            &self.k.wkv5,
            (heads as u32, b.seqs as u32, 1),
            n as u32,
            smem,
            params!(
                rkvg, decay, bonus, ln_w, ln_b, eps, y, n_i, c_att, wo, b.meta, b.states, b.rows, b.seqs,
                inline_i
            ),
        )?;
        if inline {
            return Ok(());
        }
        let (gate, g_stride, rows) = (rkvg.f32_at(3 * heads * n), 4 * c_att, b.rows);
        let items = rows as usize * heads;
        self.launch(
            &self.k.group_norm_gate,
            (blocks(items, 8), 1, 1),
            THREADS,
            0,
            params!(y, gate, g_stride, ln_w, ln_b, n_i, c_att, rows, eps),
        )
    }
}

/// The device's read bandwidth: one pass sums a 1 GiB buffer with 16-byte streaming loads
/// (the GEMV kernel's access pattern).
pub struct DeviceReadProbe {
    buf: DevBuf,
    out: DevBuf,
}

impl DeviceReadProbe {
    const BYTES: usize = 1 << 30;
    const BLOCKS: usize = 4096;

    pub fn new(gpu: &Arc<Gpu>) -> Result<DeviceReadProbe> {
        let ones = vec![1f32; Self::BYTES / 4];
        Ok(DeviceReadProbe {
            buf: gpu.upload(&ones)?,
            out: gpu.zeros(Self::BLOCKS * 4)?,
        })
    }

    /// Four passes timed together after a warm-up: GB/s (0 if the device failed).
    pub fn pass(&self) -> f64 {
        let gpu = self.buf.gpu();
        let run = || -> Result<f64> {
            gpu.bind()?;
            let n = (Self::BYTES / 16) as u64;
            let launch = || {
                gpu.launch(
                    &gpu.k.read_sum,
                    (Self::BLOCKS as u32, 1, 1),
                    THREADS,
                    0,
                    params!(self.buf.ptr, n, self.out.ptr),
                )
            };
            launch()?;
            gpu.sync()?;
            let t0 = std::time::Instant::now();
            for _ in 0..4 {
                launch()?;
            }
            gpu.sync()?;
            Ok(4.0 * Self::BYTES as f64 / t0.elapsed().as_secs_f64() / 1e9)
        };
        run().unwrap_or(0.0)
    }
}

#[cfg(test)]
mod tests {
    /// The kernels compile for Hopper wherever NVRTC can be loaded (no device needed).
    #[test]
    fn kernels_compile_with_nvrtc() {
        // SAFETY: only tries to dlopen NVRTC.
        if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            eprintln!("skipped: NVRTC is not installed here");
            return;
        }
        // Hopper with programmatic dependent launch, Ampere without it.
        for (major, minor, pdl) in [(9, 0, true), (8, 0, false)] {
            let ptx = super::compile(major, minor).unwrap_or_else(|e| panic!("{e:#}"));
            let src = ptx.to_src();
            assert_eq!(src.contains("griddepcontrol.wait"), pdl, "sm_{major}{minor}");
        }
    }
}
