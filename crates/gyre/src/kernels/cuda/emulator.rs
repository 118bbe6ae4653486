//! The CUDA emulator: `kernels.cu` compiled by the host's C++ compiler together with
//! `emulator.cpp` (CUDA's built-ins on the CPU, one fiber per device thread) and loaded as a
//! shared library. With `GYRE_CUDA_EMULATOR=1`, `--device cuda` runs the whole CUDA backend
//! (launch configurations, graphs, batch metadata, device states) on it, so the backend is
//! tested on machines without a GPU. It is slow (a tiny model's step takes milliseconds)
//! and says nothing about speed.

use std::ffi::{c_char, c_int, c_uint, c_void, CStr, CString};
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{anyhow, bail, Context, Result};

const RUNTIME: &str = include_str!("emulator.cpp");

/// Whether `GYRE_CUDA_EMULATOR=1` asks for the emulator in place of a GPU.
pub fn requested() -> bool {
    std::env::var_os("GYRE_CUDA_EMULATOR").is_some_and(|v| v == "1")
}

type LaunchFn = unsafe extern "C" fn(
    c_int,
    c_uint,
    c_uint,
    c_uint,
    c_uint,
    c_uint,
    c_uint,
    c_uint,
    *mut *mut c_void,
) -> c_int;
type GemmFn = unsafe extern "C" fn(
    c_int,
    c_int,
    c_int,
    f32,
    *const c_void,
    c_int,
    c_int,
    i64,
    *const c_void,
    c_int,
    c_int,
    i64,
    f32,
    *mut f32,
    c_int,
    i64,
    c_int,
) -> c_int;

/// The loaded runtime: C entry points of `emulator.cpp`.
pub struct Emulator {
    kernel: unsafe extern "C" fn(*const c_char) -> c_int,
    launch: LaunchFn,
    memset_zero: unsafe extern "C" fn(*mut c_void, usize) -> c_int,
    copy: unsafe extern "C" fn(*mut c_void, *const c_void, usize) -> c_int,
    gemm: GemmFn,
    begin_capture: unsafe extern "C" fn(),
    end_capture: unsafe extern "C" fn() -> *mut c_void,
    replay: unsafe extern "C" fn(*mut c_void) -> c_int,
    graph_free: unsafe extern "C" fn(*mut c_void),
    last_error: unsafe extern "C" fn() -> *const c_char,
    alloc: unsafe extern "C" fn(usize) -> *mut c_void,
    free: unsafe extern "C" fn(*mut c_void, usize),
    /// Keeps the entry points above valid.
    _lib: libloading::Library,
}

/// A captured sequence of emulated operations, freed on drop.
pub struct EmuGraph {
    ops: *mut c_void,
    free: unsafe extern "C" fn(*mut c_void),
}

impl Drop for EmuGraph {
    fn drop(&mut self) {
        // SAFETY: `ops` came from gyre_emu_end_capture and is freed once, here.
        unsafe { (self.free)(self.ops) }
    }
}

impl Emulator {
    /// Builds the runtime (cached by the hash of its sources) and loads it.
    pub fn load(kernels_source: &str) -> Result<Emulator> {
        let lib_path = build(kernels_source)?;
        // SAFETY: the library is the one just built from emulator.cpp and kernels.cu; loading
        // it runs only C++ static initialisers of those files (the kernel table).
        let lib = unsafe { libloading::Library::new(&lib_path) }
            .with_context(|| format!("loading the CUDA emulator {}", lib_path.display()))?;
        macro_rules! sym {
            ($name:literal) => {
                // SAFETY: each symbol is an `extern "C"` function of emulator.cpp whose C
                // signature the field's type repeats; the library outlives the copy (_lib).
                *unsafe { lib.get(concat!($name, "\0").as_bytes()) }
                    .with_context(|| format!("CUDA emulator: {} missing", $name))?
            };
        }
        Ok(Emulator {
            kernel: sym!("gyre_emu_kernel"),
            launch: sym!("gyre_emu_launch"),
            memset_zero: sym!("gyre_emu_memset_zero"),
            copy: sym!("gyre_emu_copy"),
            gemm: sym!("gyre_emu_gemm"),
            begin_capture: sym!("gyre_emu_begin_capture"),
            end_capture: sym!("gyre_emu_end_capture"),
            replay: sym!("gyre_emu_replay"),
            graph_free: sym!("gyre_emu_graph_free"),
            last_error: sym!("gyre_emu_last_error"),
            alloc: sym!("gyre_emu_alloc"),
            free: sym!("gyre_emu_free"),
            _lib: lib,
        })
    }

    fn check(&self, what: &str, rc: c_int) -> Result<()> {
        if rc == 0 {
            return Ok(());
        }
        // SAFETY: gyre_emu_last_error returns a NUL-terminated string owned by the runtime,
        // valid until its next failing call (none can come while this thread holds the
        // Gpu's stream); it is copied at once.
        let msg = unsafe { CStr::from_ptr((self.last_error)()) }
            .to_string_lossy()
            .into_owned();
        bail!("CUDA emulator: {what}: {msg}")
    }

    /// The index of kernel `name`.
    pub fn kernel(&self, name: &str) -> Result<i32> {
        let c = CString::new(name)?;
        // SAFETY: `c` is a NUL-terminated string alive for the call.
        let i = unsafe { (self.kernel)(c.as_ptr()) };
        if i < 0 {
            bail!("CUDA emulator: kernel {name} missing");
        }
        Ok(i)
    }

    /// Runs (or, while capturing, records) a launch; `params` as for cuLaunchKernel.
    ///
    /// # Safety
    /// `params` must point at values of the kernel's parameter types, in order, and every
    /// address among them must be valid for what the kernel reads and writes.
    pub unsafe fn launch(
        &self,
        kernel: i32,
        name: &str,
        grid: (u32, u32, u32),
        block: u32,
        smem: u32,
        params: &mut [*mut c_void],
    ) -> Result<()> {
        let rc = (self.launch)(
            kernel,
            grid.0,
            grid.1,
            grid.2,
            block,
            1,
            1,
            smem,
            params.as_mut_ptr(),
        );
        self.check(name, rc)
    }

    /// # Safety
    /// `bytes` bytes at `ptr` must be owned host memory.
    pub unsafe fn memset_zero(&self, ptr: u64, bytes: usize) -> Result<()> {
        self.check("memset", (self.memset_zero)(ptr as *mut c_void, bytes))
    }

    /// # Safety
    /// Both ranges must be owned host memory of at least `bytes`.
    pub unsafe fn copy(&self, dst: u64, src: u64, bytes: usize) -> Result<()> {
        self.check(
            "copy",
            (self.copy)(dst as *mut c_void, src as *const c_void, bytes),
        )
    }

    /// cublasGemmStridedBatchedEx with A transposed, B not, C f32 (see emulator.cpp).
    ///
    /// # Safety
    /// The three matrices must be owned host memory of the extents the arguments give.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn gemm(
        &self,
        (m, n, k): (i32, i32, i32),
        alpha: f32,
        (a, a_type, lda, stride_a): (u64, i32, i32, i64),
        (b, b_type, ldb, stride_b): (u64, i32, i32, i64),
        beta: f32,
        (c, ldc, stride_c): (u64, i32, i64),
        batch: i32,
    ) -> Result<()> {
        let rc = (self.gemm)(
            m,
            n,
            k,
            alpha,
            a as *const c_void,
            a_type,
            lda,
            stride_a,
            b as *const c_void,
            b_type,
            ldb,
            stride_b,
            beta,
            c as *mut f32,
            ldc,
            stride_c,
            batch,
        );
        self.check("gemm", rc)
    }

    /// `bytes` (> 0) of emulated device memory, 256-byte aligned, ending right before an
    /// inaccessible page: a kernel reading or writing past a buffer's end faults at once.
    pub fn alloc(&self, bytes: usize) -> Option<u64> {
        // SAFETY: plain allocation (mmap); the address is owned by the caller.
        let p = unsafe { (self.alloc)(bytes) };
        (!p.is_null()).then_some(p as u64)
    }

    /// # Safety
    /// `ptr` came from [`Emulator::alloc`] with these `bytes` and is freed once.
    pub unsafe fn free(&self, ptr: u64, bytes: usize) {
        (self.free)(ptr as *mut c_void, bytes)
    }

    /// Records the operations queued until [`Emulator::end_capture`] instead of running
    /// them.
    pub fn begin_capture(&self) {
        // SAFETY: no arguments; starts a recording on this thread.
        unsafe { (self.begin_capture)() }
    }

    pub fn end_capture(&self) -> EmuGraph {
        EmuGraph {
            // SAFETY: returns the recording begun on this thread, owned by the EmuGraph.
            ops: unsafe { (self.end_capture)() },
            free: self.graph_free,
        }
    }

    /// Runs a recording's operations in order.
    pub fn replay(&self, g: &EmuGraph) -> Result<()> {
        // SAFETY: `g.ops` came from end_capture and lives until `g` drops.
        self.check("graph replay", unsafe { (self.replay)(g.ops) })
    }
}

// SAFETY: every entry point of the runtime takes its lock, and the last error is read right
// after the failing call by the thread that holds the Gpu's stream (`Gpu::exclusive`).
unsafe impl Send for Emulator {}
unsafe impl Sync for Emulator {}
// SAFETY: a recording is an immutable list of operations once captured; replays only read it.
unsafe impl Send for EmuGraph {}
unsafe impl Sync for EmuGraph {}

/// Kernel entry points of `kernels.cu`: `extern "C" __global__ void NAME(` and the template
/// instances `SOMETHING_ENTRY(NAME, …)` at the start of a line.
fn kernel_names(source: &str) -> Vec<&str> {
    let mut names = Vec::new();
    for line in source.lines() {
        let instance = line
            .split_once("_ENTRY(")
            .filter(|(m, _)| !m.is_empty() && m.bytes().all(|b| b.is_ascii_uppercase() || b == b'_'));
        let rest = if let Some((_, r)) = instance {
            r
        } else if let Some(at) = line.find("extern \"C\" __global__ void ") {
            &line[at + "extern \"C\" __global__ void ".len()..]
        } else {
            continue;
        };
        let name = rest.split(['(', ',']).next().unwrap_or("").trim();
        // An entry macro's own definition names its parameter `name`.
        if !name.is_empty() && name != "name" && !line.trim_end().ends_with('\\') {
            names.push(name);
        }
    }
    names
}

/// Compiles the runtime into the temp directory unless a build of the same sources is
/// there; returns the library's path.
fn build(kernels_source: &str) -> Result<PathBuf> {
    let compiler = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    let list: String = kernel_names(kernels_source)
        .iter()
        .map(|n| format!("GYRE_EMU_KERNEL({n})\n"))
        .collect();
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (RUNTIME, kernels_source, &list, &compiler).hash(&mut h);
    let dir = std::env::temp_dir().join(format!("gyre-cuda-emulator-{:016x}", h.finish()));
    let lib = dir.join("libgyre_cuda_emulator.so");
    if lib.exists() {
        return Ok(lib);
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let write = |name: &str, text: &str| -> Result<()> {
        std::fs::write(dir.join(name), text).with_context(|| format!("writing {}", dir.join(name).display()))
    };
    write("kernels.cu", kernels_source)?;
    write("emulator.cpp", RUNTIME)?;
    write("kernel_list.inc", &list)?;
    // Build under a unique name, then rename: concurrent builds never see half a library.
    let tmp = dir.join(format!(
        "build-{}-{:?}.so",
        std::process::id(),
        std::thread::current().id()
    ));
    let out = Command::new(&compiler)
        .args([
            "-std=c++17",
            "-O2",
            "-fPIC",
            "-shared",
            "-fno-strict-aliasing",
            "-U_FORTIFY_SOURCE",
            "-w",
        ])
        .arg("-o")
        .arg(&tmp)
        .arg(dir.join("emulator.cpp"))
        .output()
        .map_err(|e| anyhow!("CUDA emulator: running the C++ compiler `{compiler}`: {e} (set CXX)"))?;
    if !out.status.success() {
        bail!(
            "CUDA emulator: `{compiler}` could not compile {}:\n{}",
            Path::new(&dir).join("emulator.cpp").display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    std::fs::rename(&tmp, &lib).with_context(|| format!("moving {} into place", tmp.display()))?;
    Ok(lib)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kernel_entry_point_is_listed() {
        let names = kernel_names(include_str!("kernels.cu"));
        for want in [
            "gemv_bf16_1",
            "gemv_f32_8",
            "rmsnorm",
            "attention_split_bf16",
            "write_kv_f16",
            "attention_merge",
            "wkv5",
            "read_sum",
        ] {
            assert!(names.contains(&want), "{want} not in {names:?}");
        }
        assert!(!names.contains(&"name"), "{names:?}");
    }
}
