// The CUDA emulator: runs gyre's kernels.cu on the CPU, for developing and testing the CUDA
// backend on machines without a GPU (GYRE_CUDA_EMULATOR=1; kernels/cuda/emulator.rs builds
// this file with the host's C++ compiler and loads it).
//
// Model: launches run synchronously on the calling thread, one block after another. The
// threads of a block are fibers on that thread (on x86-64 a dozen instructions switch
// stacks; elsewhere ucontext, which is slower), switched only at the CUDA sync points:
// __syncthreads() releases when every live thread of the block has reached it (as on Volta
// and later, exited threads do not hold a barrier back), __shfl_xor_sync() when every live
// lane of the warp has. A block whose threads wait on different sync points is a deadlock
// and fails the launch. One host thread at a time runs emulated work (every entry point
// takes one lock; gyre's Gpu already serialises its stream), so the built-in variables and
// `__shared__` ones are plain statics. Blocks run in a scrambled order and the threads of a
// block alternate direction between sync points, so that code relying on an order CUDA does
// not promise fails. Stream order is program order; a captured graph records launches,
// copies and products and replays them. griddepcontrol (programmatic dependent launch) is a
// no-op here: launches are ordered anyway.

// Device memory is host memory, each buffer ending right before an inaccessible page, so a
// kernel that reads or writes past a buffer's end faults at once.
//
// What it cannot tell: timing, memory coalescing, races between blocks that run at the
// same time on a GPU (here one block finishes before the next starts), accesses before a
// buffer's start or in the alignment slack after its end (under 256 bytes).

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <mutex>
#include <numeric>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include <sys/mman.h>
#include <unistd.h>
#if !defined(__x86_64__)
#include <ucontext.h>
#endif

// ---------------------------------------------------------------------------------------
// CUDA's built-ins, as kernels.cu uses them.

#define GYRE_EMULATOR 1
#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __shared__ static

struct uint3 {
    unsigned x, y, z;
};
struct uint2 {
    unsigned x, y;
};
struct uint4 {
    unsigned x, y, z, w;
};
struct float4 {
    float x, y, z, w;
};
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }

namespace emu {
uint3 thread_idx, block_idx, block_dim, grid_dim;
std::vector<unsigned char> dynamic_shared;
}  // namespace emu

#define threadIdx (emu::thread_idx)
#define blockIdx (emu::block_idx)
#define blockDim (emu::block_dim)
#define gridDim (emu::grid_dim)
#define GYRE_DYNAMIC_SHARED(T, name) T* name = reinterpret_cast<T*>(emu::dynamic_shared.data())

inline float __uint_as_float(unsigned u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline float __int_as_float(int i) {
    float f;
    std::memcpy(&f, &i, 4);
    return f;
}
inline unsigned __float_as_uint(float f) {
    unsigned u;
    std::memcpy(&u, &f, 4);
    return u;
}
inline int max(int a, int b) { return a > b ? a : b; }
inline int min(int a, int b) { return a < b ? a : b; }

// IEEE half precision, round to nearest even (cvt.rn.f16.f32 / cvt.f32.f16).
inline float gyre_emu_f16_to_f32(unsigned short h) {
    unsigned sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ffu;
    unsigned bits;
    if (exp == 0x1f) {
        bits = sign | 0x7f800000u | (man << 13);
    } else if (exp != 0) {
        bits = sign | ((exp + 112) << 23) | (man << 13);
    } else if (man == 0) {
        bits = sign;
    } else {
        float f = std::ldexp((float)man, -24);
        return sign ? -f : f;
    }
    return __uint_as_float(bits);
}

inline unsigned short gyre_emu_f32_to_f16(float f) {
    unsigned u = __float_as_uint(f);
    unsigned short sign = (unsigned short)((u >> 16) & 0x8000u);
    unsigned abs = u & 0x7fffffffu;
    if (abs > 0x7f800000u) return sign | 0x7e00u;  // NaN
    if (abs >= 0x477ff000u) return sign | 0x7c00u;  // rounds to or beyond 65520: infinity
    if (abs < 0x38800000u) {                        // below 2^-14: subnormal or zero
        float a = __uint_as_float(abs);
        float scaled = a * 16777216.0f;  // units of 2^-24, exact
        return sign | (unsigned short)std::nearbyint(scaled);
    }
    unsigned r = abs - 0x38000000u;  // rebias 127 → 15 (in the exponent field, << 23)
    r += 0xfffu + ((r >> 13) & 1u);
    return sign | (unsigned short)(r >> 13);
}

namespace emu {

enum : int { RUNNING = 0, AT_BARRIER = 1, AT_SHUFFLE = 2, DONE = 3 };

#if defined(__x86_64__)
// A suspended fiber is its stack pointer; gyre_emu_switch pushes the callee-saved registers
// and the SSE/x87 control words, stores the stack pointer to *save, loads `load` and pops
// the other side's (System V ABI: everything else is caller-saved).
struct Context {
    void* sp = nullptr;
};
extern "C" void gyre_emu_switch(void** save, void* load);
asm(R"(
    .text
    .globl gyre_emu_switch
    .hidden gyre_emu_switch
    .type gyre_emu_switch, @function
gyre_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size gyre_emu_switch, .-gyre_emu_switch
)");

inline void switch_to(Context& from, Context& to) { gyre_emu_switch(&from.sp, to.sp); }

// A context whose first switch "returns" into entry(), with the stack aligned as after a
// call: below the entry address, zeroed registers and the default control words.
void start(Context& c, char* stack, size_t size, void (*entry)()) {
    uintptr_t top = ((uintptr_t)(stack + size) & ~(uintptr_t)15) - 16;
    uint64_t* p = (uint64_t*)top;
    *p = (uint64_t)(uintptr_t)entry;
    for (int r = 1; r <= 6; r++) p[-r] = 0;  // rbp, rbx, r12–r15
    uint32_t* cw = (uint32_t*)(p - 7);
    cw[0] = 0x1f80;  // MXCSR: all exceptions masked, round to nearest
    cw[1] = 0x037f;  // x87 control word, the same
    c.sp = p - 7;
}
#else
struct Context {
    ucontext_t uc;
};

inline void switch_to(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }

void start(Context& c, char* stack, size_t size, void (*entry)()) {
    getcontext(&c.uc);
    c.uc.uc_stack.ss_sp = stack;
    c.uc.uc_stack.ss_size = size;
    c.uc.uc_link = nullptr;
    makecontext(&c.uc, entry, 0);
}
#endif

struct Fiber {
    Context ctx;
    int state;
    uint3 idx;
    uint64_t shfl_in, shfl_out;
    int shfl_src;
};

// The fibers (each runs one device thread of a block at a time, and is kept for later
// blocks and launches) and the scheduler's context.
struct Block {
    static const size_t STACK = 64 * 1024;
    std::vector<Fiber*> fibers;
    std::vector<char*> stacks;
    Context scheduler;
    Fiber* current = nullptr;
    const std::function<void()>* body = nullptr;

    ~Block() {
        for (Fiber* f : fibers) delete f;
        for (char* s : stacks) std::free(s);
    }
};

Block block;

inline Block& blk() { return block; }

inline void wait(int state) {
    Block& b = block;
    Fiber* me = b.current;
    me->state = state;
    switch_to(me->ctx, b.scheduler);
}

inline unsigned linear_thread() {
    return threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
}

// A fiber's whole life: run a device thread each time the scheduler starts it.
void fiber_main() {
    Block& b = block;
    Fiber* me = b.current;
    for (;;) {
        (*b.body)();
        me->state = DONE;
        switch_to(me->ctx, b.scheduler);
    }
}

// Grows this host thread's fibers to `n`; false if memory ran out.
bool ensure_fibers(unsigned n) {
    Block& b = blk();
    while (b.fibers.size() < n) {
        char* stack = static_cast<char*>(std::malloc(Block::STACK));
        if (!stack) return false;
        Fiber* f = new Fiber();
        b.stacks.push_back(stack);
        b.fibers.push_back(f);
        start(f->ctx, stack, Block::STACK, fiber_main);
    }
    return true;
}

// Runs one block of `body` to the end; false (with `err` set) on a deadlock.
bool run_block(const std::function<void()>& body, uint3 bdim, std::string& err) {
    unsigned n = bdim.x * bdim.y * bdim.z;
    if (!ensure_fibers(n)) {
        err = "out of host memory for the emulated threads' stacks";
        return false;
    }
    Block& b = blk();
    b.body = &body;
    for (unsigned i = 0; i < n; i++) {
        Fiber& f = *b.fibers[i];
        f.state = RUNNING;
        f.idx = uint3{i % bdim.x, (i / bdim.x) % bdim.y, i / (bdim.x * bdim.y)};
    }
    unsigned live = n;
    // Threads run in index order, then in reverse, round after round: code that relies on
    // an order between sync points (a missing __syncthreads) sees both.
    bool backwards = false;
    while (live > 0) {
        for (unsigned k = 0; k < n; k++) {
            Fiber& f = *b.fibers[backwards ? n - 1 - k : k];
            if (f.state != RUNNING) continue;
            b.current = &f;
            thread_idx = f.idx;
            switch_to(b.scheduler, f.ctx);
            if (f.state == DONE) live--;
        }
        backwards = !backwards;
        if (live == 0) break;
        // Every live thread now waits. Release warps whose live lanes all wait on a shuffle;
        // failing that, the block if all its live threads wait on the barrier.
        bool released = false;
        for (unsigned w0 = 0; w0 < n; w0 += 32) {
            unsigned w1 = w0 + 32 < n ? w0 + 32 : n, waiting = 0, alive = 0;
            for (unsigned i = w0; i < w1; i++) {
                alive += b.fibers[i]->state != DONE;
                waiting += b.fibers[i]->state == AT_SHUFFLE;
            }
            if (waiting == 0 || waiting != alive) continue;
            for (unsigned i = w0; i < w1; i++) {
                Fiber& f = *b.fibers[i];
                if (f.state != AT_SHUFFLE) continue;
                unsigned src = w0 + (unsigned)f.shfl_src;
                bool valid = f.shfl_src >= 0 && f.shfl_src < 32 && src < w1 &&
                             b.fibers[src]->state == AT_SHUFFLE;
                f.shfl_out = valid ? b.fibers[src]->shfl_in : f.shfl_in;
            }
            for (unsigned i = w0; i < w1; i++)
                if (b.fibers[i]->state == AT_SHUFFLE) b.fibers[i]->state = RUNNING;
            released = true;
        }
        if (released) continue;
        unsigned at_barrier = 0;
        for (unsigned i = 0; i < n; i++) at_barrier += b.fibers[i]->state == AT_BARRIER;
        if (at_barrier != live) {
            err = "threads of one block wait on different sync points (__syncthreads in "
                  "divergent code, or a shuffle in a warp whose lanes diverged)";
            // The waiting fibers are abandoned mid-kernel: start them afresh.
            for (unsigned i = 0; i < n; i++)
                if (b.fibers[i]->state != DONE) {
                    start(b.fibers[i]->ctx, b.stacks[i], Block::STACK, fiber_main);
                    b.fibers[i]->state = DONE;
                }
            return false;
        }
        for (unsigned i = 0; i < n; i++)
            if (b.fibers[i]->state == AT_BARRIER) b.fibers[i]->state = RUNNING;
    }
    return true;
}

}  // namespace emu

inline void __syncthreads() { emu::wait(emu::AT_BARRIER); }

template <class T>
inline T __shfl_xor_sync(unsigned /*mask*/, T v, int lane_mask) {
    static_assert(sizeof(T) <= 8, "shuffles move at most 8 bytes");
    emu::Fiber* me = emu::block.current;
    me->shfl_in = 0;
    std::memcpy(&me->shfl_in, &v, sizeof(T));
    me->shfl_src = (int)((emu::linear_thread() & 31) ^ (unsigned)lane_mask);
    emu::wait(emu::AT_SHUFFLE);
    T out;
    std::memcpy(&out, &me->shfl_out, sizeof(T));
    return out;
}

// Threads switch only at barriers and shuffles, so a read-modify-write is atomic as it is.
template <class T>
inline T atomicAdd(T* p, T v) {
    T old = *p;
    *p = old + v;
    return old;
}

// ---------------------------------------------------------------------------------------
// The kernels themselves.

#include "kernels.cu"

// ---------------------------------------------------------------------------------------
// Launches, stream-ordered operations and graphs.

namespace emu {

typedef std::function<bool(std::string&)> Op;

template <class... A, size_t... I>
std::function<void()> bind_args(void (*k)(A...), void** params, std::index_sequence<I...>) {
    std::tuple<std::decay_t<A>...> args(*static_cast<std::decay_t<A>*>(params[I])...);
    return [k, args]() { std::apply(k, args); };
}

// A kernel with its arguments copied out of a cuLaunchKernel-style parameter list.
template <class... A>
std::function<void()> bind(void (*k)(A...), void** params) {
    return bind_args(k, params, std::index_sequence_for<A...>{});
}

struct Entry {
    const char* name;
    std::function<void()> (*bind)(void** params);
};

#define GYRE_EMU_KERNEL(name) {#name, [](void** p) { return bind(&name, p); }},
const Entry KERNELS[] = {
#include "kernel_list.inc"
};
#undef GYRE_EMU_KERNEL

struct Graph {
    std::vector<Op> ops;
};

Graph* capturing = nullptr;
std::string last_error;
// Held by every entry point below.
std::mutex lock;

int submit(Op op) {
    if (capturing) {
        capturing->ops.push_back(std::move(op));
        return 0;
    }
    std::string err;
    if (!op(err)) {
        last_error = err;
        return 1;
    }
    return 0;
}

float load(const void* p, size_t i, int type) {
    // cudaDataType: CUDA_R_32F 0, CUDA_R_16F 2, CUDA_R_16BF 14.
    if (type == 14) return __uint_as_float(((unsigned)((const unsigned short*)p)[i]) << 16);
    if (type == 2) return gyre_emu_f16_to_f32(((const unsigned short*)p)[i]);
    return ((const float*)p)[i];
}

}  // namespace emu

extern "C" {

int gyre_emu_kernel(const char* name) {
    for (size_t i = 0; i < sizeof(emu::KERNELS) / sizeof(emu::KERNELS[0]); i++)
        if (std::strcmp(emu::KERNELS[i].name, name) == 0) return (int)i;
    return -1;
}

// cuLaunchKernel: `params` points at each argument's value, in the kernel's order.
int gyre_emu_launch(int kernel, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                    unsigned bz, unsigned smem, void** params) {
    std::lock_guard<std::mutex> held(emu::lock);
    if (bx * by * bz == 0 || bx * by * bz > 1024) {
        emu::last_error = "block of " + std::to_string(bx * by * bz) + " threads (1 to 1024)";
        return 1;
    }
    const emu::Entry& e = emu::KERNELS[kernel];
    std::function<void()> body = e.bind(params);
    const char* name = e.name;
    return emu::submit([=](std::string& err) {
        emu::grid_dim = uint3{gx, gy, gz};
        emu::block_dim = uint3{bx, by, bz};
        emu::dynamic_shared.assign(smem, 0xa5);
        // CUDA promises no order between blocks: visit them in a scrambled one (a stride
        // coprime to their count), so that a kernel relying on one fails its tests here.
        size_t total = (size_t)gx * gy * gz, stride = 1;
        for (size_t p : {7919u, 104729u, 1299709u})
            if (std::gcd(p, total) == 1 && p % total != 1) {
                stride = p;
                break;
            }
        for (size_t k = 0; k < total; k++) {
            size_t i = (k * stride + total / 2) % total;
            emu::block_idx = uint3{(unsigned)(i % gx), (unsigned)(i / gx % gy), (unsigned)(i / gx / gy)};
            if (!emu::run_block(body, emu::block_dim, err)) {
                err = std::string("kernel ") + name + ": " + err;
                return false;
            }
        }
        return true;
    });
}

int gyre_emu_memset_zero(void* p, size_t n) {
    std::lock_guard<std::mutex> held(emu::lock);
    return emu::submit([=](std::string&) {
        std::memset(p, 0, n);
        return true;
    });
}

int gyre_emu_copy(void* dst, const void* src, size_t n) {
    std::lock_guard<std::mutex> held(emu::lock);
    return emu::submit([=](std::string&) {
        std::memmove(dst, src, n);
        return true;
    });
}

// cublasGemmStridedBatchedEx for the one form gyre uses: C = α·op(A)·B + β·C with A
// transposed, B not, C f32, f32 accumulation (column-major, as cuBLAS).
int gyre_emu_gemm(int m, int n, int k, float alpha, const void* a, int a_type, int lda,
                  long long stride_a, const void* b, int b_type, int ldb, long long stride_b,
                  float beta, float* c, int ldc, long long stride_c, int batch) {
    std::lock_guard<std::mutex> held(emu::lock);
    return emu::submit([=](std::string&) {
        for (int g = 0; g < batch; g++)
            for (int j = 0; j < n; j++)
                for (int i = 0; i < m; i++) {
                    float s = 0.0f;
                    for (int l = 0; l < k; l++)
                        s += emu::load(a, (size_t)g * stride_a + (size_t)i * lda + l, a_type) *
                             emu::load(b, (size_t)g * stride_b + (size_t)j * ldb + l, b_type);
                    float* out = c + (size_t)g * stride_c + (size_t)j * ldc + i;
                    *out = alpha * s + (beta == 0.0f ? 0.0f : beta * *out);
                }
        return true;
    });
}

void gyre_emu_begin_capture() {
    std::lock_guard<std::mutex> held(emu::lock);
    emu::capturing = new emu::Graph();
}

void* gyre_emu_end_capture() {
    std::lock_guard<std::mutex> held(emu::lock);
    emu::Graph* g = emu::capturing;
    emu::capturing = nullptr;
    return g;
}

int gyre_emu_replay(void* graph) {
    std::lock_guard<std::mutex> held(emu::lock);
    std::string err;
    for (const emu::Op& op : static_cast<emu::Graph*>(graph)->ops) {
        if (!op(err)) {
            emu::last_error = err;
            return 1;
        }
    }
    return 0;
}

void gyre_emu_graph_free(void* graph) { delete static_cast<emu::Graph*>(graph); }

const char* gyre_emu_last_error() { return emu::last_error.c_str(); }

// Device memory: the buffer's 256-byte-aligned end abuts a PROT_NONE page.
static size_t page_size() { return (size_t)sysconf(_SC_PAGESIZE); }
static size_t body_of(size_t bytes) { return (bytes + page_size() - 1) / page_size() * page_size(); }
static size_t lead_of(size_t bytes) { return body_of(bytes) - (bytes + 255) / 256 * 256; }

void* gyre_emu_alloc(size_t bytes) {
    size_t body = body_of(bytes);
    void* base = mmap(nullptr, body + page_size(), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                      -1, 0);
    if (base == MAP_FAILED) return nullptr;
    mprotect((char*)base + body, page_size(), PROT_NONE);
    return (char*)base + lead_of(bytes);
}

void gyre_emu_free(void* p, size_t bytes) {
    munmap((char*)p - lead_of(bytes), body_of(bytes) + page_size());
}

}  // extern "C"
