//! The model families on a CUDA device (`--device cuda`).
//!
//! Each family's device model is built from its CPU model (same checkpoint reading, same
//! validation), uploads the weights once in their stored dtype (projections that share an
//! input fused into one matrix), and runs the same math as the CPU forward pass with the
//! kernels of `kernels/cuda`. Activations are f32; products with at most
//! [`GEMV_ROWS`](crate::kernels::cuda::GEMV_ROWS) rows stream the weights through the GEMV
//! kernel, larger ones go through cuBLAS with activations rounded to the weights' dtype.
//!
//! A sequence's state lives on the device ([`DeviceState`]): the CPU state's tensors laid
//! end to end, each at full capacity, so saving, loading and inspecting a state use the CPU
//! layout ([`State::parts`]).

pub mod griffin;
pub mod llama;
pub mod rwkv5;

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, bail, Result};

use super::layers::{self, Segment};
use super::{check_draws, check_tokens, Logits, Model, ModelInfo, SeqInput};
use crate::kernels::cuda::{BatchMeta, DevBuf, DevMatrix, DevPtr, Gpu, Graph};
use crate::sampling::Draw;
use crate::state::State;
use crate::tensor::{DType, Matrix};

/// How a family's state sits in device memory: the CPU state's parts in order, the first
/// `fixed.len()` at the given capacities (f32 values), then, 16-byte aligned, `kv_parts`
/// key/value parts of `slots · kv_dim` values of `kv_dtype` each (layer l's keys are part 2l,
/// its values 2l + 1).
#[derive(Debug)]
pub struct StateLayout {
    /// A CPU state of this shape: names, shapes and family of the parts.
    template: State,
    fixed: Vec<usize>,
    kv_parts: usize,
    kv_dim: usize,
    /// What the key/value caches hold: the model's weight dtype, as the reference's cache
    /// (the CPU state holds f32; values convert on the way between).
    kv_dtype: DType,
    /// Slots of a ring cache; `None`: the cache grows with the sequence.
    ring: Option<usize>,
}

impl StateLayout {
    pub fn new(
        template: State,
        fixed: Vec<usize>,
        kv_parts: usize,
        kv_dim: usize,
        kv_dtype: DType,
        ring: Option<usize>,
    ) -> Self {
        StateLayout {
            template,
            fixed,
            kv_parts,
            kv_dim,
            kv_dtype,
            ring,
        }
    }

    /// The key/value caches' element type.
    pub fn kv_dtype(&self) -> DType {
        self.kv_dtype
    }

    /// Byte offset of the key/value parts (layer 0's keys): after the f32 parts, aligned
    /// for the attention kernels' 16-byte loads.
    pub fn kv_offset(&self) -> usize {
        (self.fixed.iter().sum::<usize>() * 4).next_multiple_of(16)
    }

    /// Device bytes of a sequence's state after `tokens` tokens (a ring is whole from the
    /// first pass).
    pub fn bytes_at(&self, tokens: usize) -> usize {
        self.bytes(self.ring.unwrap_or(tokens))
    }

    /// Bytes of a state whose caches hold `slots` positions.
    fn bytes(&self, slots: usize) -> usize {
        self.kv_offset() + self.kv_parts * slots * self.kv_dim * self.kv_dtype.size()
    }

    /// Every part, in [`State::parts`] order: its byte offset, element type and capacity
    /// (values).
    fn regions(&self, slots: usize) -> Vec<Region> {
        let mut out = Vec::with_capacity(self.fixed.len() + self.kv_parts);
        let mut at = 0;
        for &n in &self.fixed {
            out.push(Region {
                at,
                dtype: DType::F32,
                values: n,
            });
            at += 4 * n;
        }
        at = self.kv_offset();
        for _ in 0..self.kv_parts {
            let values = slots * self.kv_dim;
            out.push(Region {
                at,
                dtype: self.kv_dtype,
                values,
            });
            at += values * self.kv_dtype.size();
        }
        out
    }
}

/// Where one part of a state lies in its device block.
#[derive(Clone, Copy, Debug)]
struct Region {
    /// Byte offset.
    at: usize,
    dtype: DType,
    /// Capacity in values.
    values: usize,
}

impl Region {
    /// Reads the first `out.len()` values (widened to f32).
    fn read(&self, gpu: &Gpu, block: DevPtr, out: &mut [f32]) -> Result<()> {
        let src = block.byte_at(self.at);
        match self.dtype {
            DType::F32 => gpu.read(src, out),
            half => {
                let mut bits = vec![0u16; out.len()];
                gpu.read(src, &mut bits)?;
                for (o, b) in out.iter_mut().zip(bits) {
                    *o = match half {
                        DType::BF16 => half::bf16::from_bits(b).to_f32(),
                        _ => half::f16::from_bits(b).to_f32(),
                    };
                }
                Ok(())
            }
        }
    }

    /// Writes `values` at the start of the region (rounded to its type, to nearest even).
    fn write(&self, gpu: &Gpu, block: DevPtr, values: &[f32]) -> Result<()> {
        let dst = block.byte_at(self.at);
        match self.dtype {
            DType::F32 => gpu.write(dst, values),
            DType::BF16 => {
                let bits: Vec<u16> = values
                    .iter()
                    .map(|&v| half::bf16::from_f32(v).to_bits())
                    .collect();
                gpu.write(dst, &bits)
            }
            DType::F16 => {
                let bits: Vec<u16> = values.iter().map(|&v| half::f16::from_f32(v).to_bits()).collect();
                gpu.write(dst, &bits)
            }
        }
    }
}

/// One sequence's state in device memory.
///
/// Cloning is cheap and cannot fail: clones share the device buffer until one of them runs
/// a forward pass, which copies it first (copy on write). A fresh state allocates nothing
/// until its first pass, so running out of device memory is an error of that pass.
#[derive(Clone)]
pub struct DeviceState {
    gpu: Arc<Gpu>,
    /// The state block; `None` until the first pass (all zeros).
    buf: Option<Arc<DevBuf>>,
    layout: Arc<StateLayout>,
    /// Key/value slots per attention layer (the ring size, or the grown capacity).
    slots: usize,
    pos: usize,
    /// A host copy handed out by [`DeviceState::parts`]; written back before the next pass.
    host: Option<Box<State>>,
}

impl fmt::Debug for DeviceState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "DeviceState({} at {}, {} bytes)",
            self.family(),
            self.pos,
            self.bytes()
        )
    }
}

/// Initial key/value slots of a growing cache.
const FIRST_SLOTS: usize = 256;

impl DeviceState {
    /// A zeroed state (position 0); device memory comes with the first pass.
    pub fn new(gpu: &Arc<Gpu>, layout: &Arc<StateLayout>) -> DeviceState {
        DeviceState {
            gpu: gpu.clone(),
            buf: None,
            layout: layout.clone(),
            slots: layout.ring.unwrap_or(FIRST_SLOTS),
            pos: 0,
            host: None,
        }
    }

    pub fn family(&self) -> &'static str {
        self.layout.template.family()
    }

    pub fn tokens_seen(&self) -> usize {
        self.host.as_ref().map_or(self.pos, |h| h.tokens_seen())
    }

    /// Device bytes the state holds (or will hold at its first pass).
    pub fn bytes(&self) -> usize {
        self.layout.bytes(self.slots)
    }

    fn belongs_to(&self, layout: &Arc<StateLayout>) -> bool {
        Arc::ptr_eq(&self.layout, layout)
    }

    /// Sets the token count before loading saved tensors through [`DeviceState::parts`].
    /// [`crate::state::State::cache_rows_for`] of this state's host layout.
    pub fn cache_rows_for(&self, tokens: usize) -> Option<usize> {
        self.layout.template.cache_rows_for(tokens)
    }

    pub fn prepare_for(&mut self, tokens: usize) {
        let mut host = Box::new(self.layout.template.clone());
        host.prepare_for(tokens);
        self.host = Some(host);
    }

    /// Rewinds to `tokens` (growing caches only; recurrent states and rings cannot).
    pub fn truncate(&mut self, tokens: usize) -> bool {
        if self.host.is_some() {
            return false;
        }
        let rewindable = self.layout.ring.is_none() && self.layout.fixed.is_empty();
        if tokens == self.pos || (rewindable && tokens < self.pos) {
            self.pos = tokens;
            return true;
        }
        false
    }

    /// The state's tensors in the CPU layout (copied from the device); edits are written
    /// back before the next forward pass.
    pub fn parts(&mut self) -> Result<Vec<crate::state::StatePart<'_>>> {
        if self.host.is_none() {
            let mut host = Box::new(self.layout.template.clone());
            host.prepare_for(self.pos);
            if let Some(buf) = &self.buf {
                let regions = self.layout.regions(self.slots);
                for ((_, _, v), region) in host.parts()?.into_iter().zip(regions) {
                    region.read(&self.gpu, buf.ptr(), v)?;
                }
            }
            self.host = Some(host);
        }
        match self.host.as_mut() {
            Some(h) => h.parts(),
            None => Ok(Vec::new()),
        }
    }

    /// A host copy of the whole state (a CPU state of the family).
    pub fn to_host(&mut self) -> Result<State> {
        self.parts()?;
        Ok(self
            .host
            .as_deref()
            .cloned()
            .unwrap_or_else(|| self.layout.template.clone()))
    }

    /// Replaces the state with a host state of the same shape (written to the device before
    /// the next pass).
    pub fn load_host(&mut self, state: State) {
        self.host = Some(Box::new(state));
    }

    /// Gets the state ready for a pass over `new_tokens` more tokens: a pending host copy
    /// written back, a growing cache grown, a shared buffer copied. Returns its address.
    fn ready_for(&mut self, new_tokens: usize) -> Result<DevPtr> {
        if let Some(mut host) = self.host.take() {
            let tokens = host.tokens_seen();
            self.reserve(tokens)?;
            let ptr = self.own()?;
            let regions = self.layout.regions(self.slots);
            for ((name, _, v), region) in host.parts()?.into_iter().zip(regions) {
                if v.len() > region.values {
                    bail!(
                        "state tensor '{name}' has {} values, the device state holds {}",
                        v.len(),
                        region.values
                    );
                }
                region.write(&self.gpu, ptr, v)?;
            }
            self.pos = tokens;
        }
        self.reserve(self.pos + new_tokens)?;
        self.own()
    }

    /// This state's own buffer: allocated (zeroed) on first use, copied when shared.
    fn own(&mut self) -> Result<DevPtr> {
        let bytes = self.bytes();
        let buf = match self.buf.take() {
            None => self.gpu.zeros(bytes)?,
            Some(shared) => match Arc::try_unwrap(shared) {
                Ok(mine) => mine,
                Err(shared) => {
                    let copy = self.gpu.alloc(bytes);
                    let copy = copy.and_then(|c| self.gpu.copy(c.ptr(), shared.ptr(), bytes).map(|_| c));
                    match copy {
                        Ok(c) => c,
                        Err(e) => {
                            self.buf = Some(shared);
                            return Err(e);
                        }
                    }
                }
            },
        };
        let ptr = buf.ptr();
        self.buf = Some(Arc::new(buf));
        Ok(ptr)
    }

    /// Grows a growing cache to hold `tokens` positions (copying what it holds; a fresh
    /// state only takes the size for its first pass).
    pub fn reserve(&mut self, tokens: usize) -> Result<()> {
        if self.layout.ring.is_some() || tokens <= self.slots {
            return Ok(());
        }
        // Grow by half (not double): long sequences of a large batch must still fit.
        let slots = tokens
            .max(self.slots + self.slots / 2)
            .next_multiple_of(FIRST_SLOTS);
        if let Some(old_buf) = &self.buf {
            let buf = self.gpu.zeros(self.layout.bytes(slots))?;
            let (old, new) = (self.layout.regions(self.slots), self.layout.regions(slots));
            let held = self.pos.min(self.slots) * self.layout.kv_dim;
            for (i, (o, n)) in old.iter().zip(&new).enumerate() {
                // Fixed parts whole, caches up to the positions they hold.
                let values = if i < self.layout.fixed.len() {
                    o.values
                } else {
                    held
                };
                let (dst, src) = (buf.ptr().byte_at(n.at), old_buf.ptr().byte_at(o.at));
                self.gpu.copy(dst, src, values * o.dtype.size())?;
            }
            self.buf = Some(Arc::new(buf));
        }
        self.slots = slots;
        Ok(())
    }
}

/// What every device model shares: its GPU, its state layout, and the scratch its passes
/// carve (with the decode steps captured over it). It owns the pass protocol; the models
/// only say which buffers they need and which kernels to run.
pub struct Runner {
    pub gpu: Arc<Gpu>,
    pub layout: Arc<StateLayout>,
    arena: Mutex<Arena>,
}

impl Runner {
    pub fn new(gpu: &Arc<Gpu>, layout: StateLayout) -> Runner {
        Runner {
            gpu: gpu.clone(),
            layout: Arc::new(layout),
            arena: Mutex::new(Arena::new(gpu)),
        }
    }

    /// A fresh sequence state of this model.
    pub fn new_state(&self) -> State {
        State::Device(DeviceState::new(&self.gpu, &self.layout))
    }

    /// One forward pass: lays the batch out and brings its states up to date (see
    /// [`prepare_batch`]), carves the batch metadata, `N` f32 buffers of the lengths `sizes`
    /// gives and the [picked, V] logits, queues `body` (a decode step is captured once and
    /// replayed, see [`StepGraphs`]) and, for [`Output::Draws`], each sequence's draw from
    /// its logits; then downloads the logits (or the tokens) and advances the states.
    pub fn forward<const N: usize>(
        &self,
        vocab: usize,
        batch: &mut [SeqInput<'_>],
        out: Output<'_>,
        span: usize,
        sizes: impl Fn(&DeviceBatch) -> [usize; N],
        body: impl Fn(&DeviceBatch, [DevPtr; N], DevPtr) -> Result<()>,
    ) -> Result<Outputs> {
        let g = &*self.gpu;
        let _stream = g.exclusive()?;
        g.bind()?;
        let mut b = prepare_batch(&self.layout, vocab, batch, out, span)?;
        let lens = sizes(&b);
        let mut arena = self
            .arena
            .lock()
            .map_err(|_| anyhow!("model arena lock poisoned"))?;
        let (meta, bufs, logits, ids) = arena.carve(|a| {
            let meta = a.bytes(b.meta_bytes());
            let bufs = lens.map(|n| a.f32(n));
            (meta, bufs, a.f32(b.n_picked * vocab), a.bytes(b.n_picked * 4))
        })?;
        b.upload(g, meta)?;
        let base = arena.base();
        arena.graphs.run(g, &b, out, base, || {
            body(&b, bufs, logits)?;
            if let Output::Draws(_) = out {
                g.sample_rows(logits, b.n_picked, vocab, b.draws, ids)?;
            }
            Ok(())
        })?;
        let result = match out {
            Output::Logits(which) => Outputs::Logits(download_logits(g, logits, vocab, &b, which)?),
            Output::Draws(_) => {
                let mut tokens = vec![0u32; b.n_picked];
                g.read(ids, &mut tokens)?;
                Outputs::Tokens(tokens)
            }
        };
        advance(batch, &self.layout)?;
        Ok(result)
    }
}

/// What a device pass hands back.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Output<'d> {
    Logits(Logits),
    /// Each sequence's next token, drawn on the device (its logits stay there).
    Draws(&'d [Draw]),
}

pub enum Outputs {
    Logits(Vec<Vec<f32>>),
    Tokens(Vec<u32>),
}

/// A family's device model: its runner and one forward pass; [`Model`] follows.
pub trait DeviceModel: Send + Sync {
    fn runner(&self) -> &Runner;
    fn model_info(&self) -> &ModelInfo;
    fn pass(&self, batch: &mut [SeqInput<'_>], out: Output<'_>) -> Result<Outputs>;
}

impl<T: DeviceModel> Model for T {
    fn info(&self) -> &ModelInfo {
        self.model_info()
    }

    fn new_state(&self) -> State {
        self.runner().new_state()
    }

    fn state_bytes(&self, tokens: usize) -> usize {
        self.runner().layout.bytes_at(tokens)
    }

    fn forward(&self, batch: &mut [SeqInput<'_>], which: Logits) -> Result<Vec<Vec<f32>>> {
        match self.pass(batch, Output::Logits(which))? {
            Outputs::Logits(l) => Ok(l),
            Outputs::Tokens(_) => bail!("internal: a logits pass returned tokens"),
        }
    }

    fn forward_drawn(&self, batch: &mut [SeqInput<'_>], draws: &[Draw]) -> Result<Vec<u32>> {
        match self.pass(batch, Output::Draws(draws))? {
            Outputs::Tokens(t) => Ok(t),
            Outputs::Logits(_) => bail!("internal: a drawing pass returned logits"),
        }
    }
}

/// Grow-only device scratch for a model's forward passes; the same shapes get the same
/// addresses.
pub struct Arena {
    gpu: Arc<Gpu>,
    buf: Option<DevBuf>,
    /// Decode steps captured over this arena's buffers.
    pub graphs: StepGraphs,
}

/// Carves 256-byte-aligned pieces out of an arena.
pub struct Carver {
    base: DevPtr,
    end: usize,
}

impl Carver {
    /// `n` f32 values.
    pub fn f32(&mut self, n: usize) -> DevPtr {
        self.bytes(n * 4)
    }

    pub fn bytes(&mut self, n: usize) -> DevPtr {
        let p = self.base.byte_at(self.end);
        self.end += n.next_multiple_of(256);
        p
    }
}

impl Arena {
    /// Where the arena starts (part of a captured graph's key).
    pub fn base(&self) -> DevPtr {
        self.buf.as_ref().map_or(DevPtr::NULL, |b| b.ptr())
    }

    pub fn new(gpu: &Arc<Gpu>) -> Arena {
        Arena {
            gpu: gpu.clone(),
            buf: None,
            graphs: StepGraphs::default(),
        }
    }

    /// Runs `carve` against the arena, growing it until everything fits.
    pub fn carve<T>(&mut self, carve: impl Fn(&mut Carver) -> T) -> Result<T> {
        loop {
            let (base, cap) = self
                .buf
                .as_ref()
                .map_or((DevPtr::NULL, 0), |b| (b.ptr(), b.bytes()));
            let mut c = Carver { base, end: 0 };
            let out = carve(&mut c);
            if c.end <= cap && self.buf.is_some() {
                return Ok(out);
            }
            self.gpu.sync()?;
            self.buf = None;
            self.buf = Some(self.gpu.alloc(c.end.max(1 << 20))?);
        }
    }
}

/// A batch laid out on the device: rows, segments, metadata and the sequences' states.
pub struct DeviceBatch {
    pub segs: Vec<Segment>,
    pub rows: usize,
    pub meta: BatchMeta,
    /// Token ids [rows] (u32).
    pub tokens: DevPtr,
    /// Rows whose logits are wanted [picked] (i32) and how many.
    pub picked: DevPtr,
    pub n_picked: usize,
    /// Each picked row's draw ([`crate::kernels::cuda::draw_args`]; none for logits).
    pub draws: DevPtr,
    /// The longest any row's attention can reach (keys), for the split count.
    pub max_keys: usize,
    /// The metadata as uploaded; offsets above are relative to it until [`DeviceBatch::upload`].
    host: Vec<u8>,
}

/// Checks the batch and brings every state up to date on the device (pending host copies
/// written, growing caches reserved for the new tokens); lays the batch out. Its metadata
/// goes to the device with [`DeviceBatch::upload`]. `span` bounds how far back a query sees
/// (0: all).
fn prepare_batch(
    layout: &Arc<StateLayout>,
    vocab: usize,
    batch: &mut [SeqInput<'_>],
    out: Output<'_>,
    span: usize,
) -> Result<DeviceBatch> {
    check_tokens(batch, vocab)?;
    let (which, draws) = match out {
        Output::Logits(which) => (which, &[][..]),
        Output::Draws(d) => {
            check_draws(batch, d)?;
            (Logits::Last, d)
        }
    };
    let mut positions = Vec::with_capacity(batch.len());
    let mut slots = Vec::with_capacity(batch.len());
    let mut states = Vec::with_capacity(batch.len());
    for seq in batch.iter_mut() {
        let n = seq.tokens.len();
        let st = device_state(seq.state, layout)?;
        let ptr = st.ready_for(n)?;
        positions.push(st.pos);
        slots.push(st.slots as i32);
        states.push(ptr.0);
    }
    let (segs, rows) = layers::segments(batch, |i| positions[i]);
    let seqs = segs.len();
    let mut ints: Vec<i32> = Vec::with_capacity(2 * rows + 4 * seqs);
    for (i, s) in segs.iter().enumerate() {
        ints.extend(std::iter::repeat_n(i as i32, s.len));
    }
    for s in &segs {
        ints.extend((s.pos..s.pos + s.len).map(|p| p as i32));
    }
    ints.extend(segs.iter().map(|s| s.row as i32));
    ints.extend(segs.iter().map(|s| s.len as i32));
    ints.extend(segs.iter().map(|s| s.pos as i32));
    ints.extend(&slots);
    // Rounded up to a power of two (at least one split), so that decode steps reuse a
    // captured graph while the sequences grow.
    let max_keys = segs
        .iter()
        .map(|s| {
            if span == 0 {
                s.pos + s.len
            } else {
                (s.pos + s.len).min(span)
            }
        })
        .max()
        .unwrap_or(0)
        .next_power_of_two()
        .max(crate::kernels::cuda::KEYS_PER_SPLIT);
    let picked: Vec<i32> = match which {
        Logits::All => (0..rows as i32).collect(),
        Logits::Last => segs.iter().map(|s| (s.row + s.len - 1) as i32).collect(),
    };
    let tokens: Vec<u32> = batch.iter().flat_map(|s| s.tokens.iter().copied()).collect();
    let draws: Vec<u32> = draws.iter().flat_map(crate::kernels::cuda::draw_args).collect();
    // One upload: ints, then the state addresses (8-aligned), tokens, picked rows and draws.
    let n_ints = ints.len();
    let states_at = (n_ints * 4).next_multiple_of(8);
    let tokens_at = states_at + seqs * 8;
    let picked_at = tokens_at + rows * 4;
    let draws_at = picked_at + picked.len() * 4;
    let mut bytes = vec![0u8; draws_at + draws.len() * 4];
    bytes[..n_ints * 4].copy_from_slice(bytemuck::cast_slice(&ints));
    bytes[states_at..tokens_at].copy_from_slice(bytemuck::cast_slice(&states));
    bytes[tokens_at..picked_at].copy_from_slice(bytemuck::cast_slice(&tokens));
    bytes[picked_at..draws_at].copy_from_slice(bytemuck::cast_slice(&picked));
    bytes[draws_at..].copy_from_slice(bytemuck::cast_slice(&draws));
    Ok(DeviceBatch {
        rows,
        meta: BatchMeta {
            meta: DevPtr::NULL,
            states: DevPtr(states_at as u64),
            rows: rows as i32,
            seqs: seqs as i32,
        },
        tokens: DevPtr(tokens_at as u64),
        picked: DevPtr(picked_at as u64),
        draws: DevPtr(draws_at as u64),
        n_picked: picked.len(),
        max_keys,
        segs,
        host: bytes,
    })
}

impl DeviceBatch {
    /// Bytes of device memory the metadata needs.
    pub fn meta_bytes(&self) -> usize {
        self.host.len()
    }

    /// Copies the metadata to `at` and points the batch at it.
    pub fn upload(&mut self, gpu: &Gpu, at: DevPtr) -> Result<()> {
        gpu.write(at, &self.host)?;
        self.meta.meta = at;
        self.meta.states = at.byte_at(self.meta.states.0 as usize);
        self.tokens = at.byte_at(self.tokens.0 as usize);
        self.picked = at.byte_at(self.picked.0 as usize);
        self.draws = at.byte_at(self.draws.0 as usize);
        Ok(())
    }
}

/// Captured decode steps of one model, by batch shape.
#[derive(Default)]
pub struct StepGraphs {
    graphs: HashMap<GraphKey, Graph>,
    seen: HashSet<GraphKey>,
}

/// What fixes a decode step's launches: sequences, attention splits, where the scratch is,
/// the scratch generation, and whether the step ends with the draws.
type GraphKey = (usize, usize, u64, u64, bool);

impl StepGraphs {
    /// Runs the device part of a forward pass (`body`, launches only). A decode step (one
    /// token per sequence, last logits) of a shape seen before is captured once and then
    /// replayed; the first step of a shape runs directly, allocating what it needs.
    pub fn run(
        &mut self,
        gpu: &Gpu,
        b: &DeviceBatch,
        out: Output<'_>,
        arena: DevPtr,
        body: impl Fn() -> Result<()>,
    ) -> Result<()> {
        // Only steps whose products all run as the GEMV kernel: cuBLAS may allocate.
        let decode = out != Output::Logits(Logits::All)
            && b.rows <= crate::kernels::cuda::GEMV_ROWS
            && b.segs.iter().all(|s| s.len == 1);
        if !decode || gpu.profiling() || std::env::var_os("GYRE_CUDA_GRAPHS").is_some_and(|v| v == "0") {
            return body();
        }
        let key = (
            b.segs.len(),
            b.max_keys,
            arena.0,
            gpu.generation(),
            matches!(out, Output::Draws(_)),
        );
        if let Some(g) = self.graphs.get(&key) {
            return gpu.replay(g);
        }
        if self.seen.insert(key) {
            return body();
        }
        match gpu.capture(&body) {
            Ok(g) => {
                gpu.replay(&g)?;
                self.graphs.insert(key, g);
                Ok(())
            }
            Err(e) => {
                tracing::warn!("decode step not captured as a CUDA graph ({e:#}); launching directly");
                body()
            }
        }
    }
}

/// Advances every state of the batch past its new tokens.
fn advance(batch: &mut [SeqInput<'_>], layout: &Arc<StateLayout>) -> Result<()> {
    for seq in batch.iter_mut() {
        let n = seq.tokens.len();
        device_state(seq.state, layout)?.pos += n;
    }
    Ok(())
}

/// Downloads the picked rows' logits [picked, V] straight into one vector per sequence
/// (no intermediate copy: with a large vocabulary and batch these are the biggest transfers
/// of a step).
fn download_logits(
    gpu: &Gpu,
    logits: DevPtr,
    v: usize,
    b: &DeviceBatch,
    which: Logits,
) -> Result<Vec<Vec<f32>>> {
    let mut first = 0;
    b.segs
        .iter()
        .map(|s| {
            let rows = match which {
                Logits::Last => 1,
                Logits::All => s.len,
            };
            let mut out = vec![0f32; rows * v];
            gpu.read(logits.f32_at(first * v), &mut out)?;
            first += rows;
            Ok(out)
        })
        .collect()
}

fn device_state<'s>(state: &'s mut State, layout: &Arc<StateLayout>) -> Result<&'s mut DeviceState> {
    match state {
        State::Device(d) => {
            if !d.belongs_to(layout) {
                bail!("this state belongs to another model on the CUDA device");
            }
            Ok(d)
        }
        other => bail!(
            "this {} state is in host memory; the model runs on the CUDA device (load it with --device cuda)",
            other.family()
        ),
    }
}

/// Uploads a matrix as stored. Quantized weights are CPU-only.
pub fn upload(gpu: &Arc<Gpu>, m: &Matrix, what: &str) -> Result<DevMatrix> {
    upload_fused(gpu, &[m], what)
}

/// Uploads matrices sharing an input as one [Σ rows, cols] matrix (one product for all).
pub fn upload_fused(gpu: &Arc<Gpu>, ms: &[&Matrix], what: &str) -> Result<DevMatrix> {
    let mut parts = Vec::with_capacity(ms.len());
    let mut dtype = None;
    for m in ms {
        let Matrix::Dense(t) = m else {
            bail!(
                "{what}: quantized weights (--quant) run on the CPU only; use --device cpu or stored weights"
            );
        };
        if dtype.is_some_and(|d| d != t.dtype()) || m.cols() != ms[0].cols() {
            bail!("{what}: fused projections must share dtype and input width");
        }
        dtype = Some(t.dtype());
        parts.push((t.raw(), t.shape()[0]));
    }
    let cols = ms[0].cols();
    gpu.upload_matrix(&parts, dtype.unwrap_or(DType::F32), cols)
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::loader::Checkpoint;
    use crate::models::LoadOptions;

    fn fixture(path: &str) -> Checkpoint {
        let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(path);
        Checkpoint::open(&p, |_, _| {}).unwrap()
    }

    /// Every part of the CPU state, at the device state's capacity, fills exactly its region
    /// of the device layout (what the kernels' offsets and `DeviceState::parts` rely on).
    fn assert_layout_matches(what: &str, layout: StateLayout) {
        let slots = layout.ring.unwrap_or(FIRST_SLOTS);
        let mut st = layout.template.clone();
        st.prepare_for(slots);
        let regions = layout.regions(slots);
        let end = layout.bytes(slots);
        let parts = st.parts().unwrap();
        assert_eq!(parts.len(), regions.len(), "{what}: part count");
        for (i, (name, _, v)) in parts.iter().enumerate() {
            let r = regions[i];
            assert_eq!(v.len(), r.values, "{what}: part {name}");
            // Parts lie in order without overlap; the caches start where the kernels look.
            let next = regions.get(i + 1).map_or(end, |n| n.at);
            assert!(
                r.at + r.values * r.dtype.size() <= next,
                "{what}: part {name} overlaps the next"
            );
            if i >= layout.fixed.len() {
                // The attention kernels load four values at once.
                assert_eq!(r.dtype, layout.kv_dtype(), "{what}: part {name} type");
                assert_eq!(r.at % (4 * r.dtype.size()), 0, "{what}: part {name} alignment");
            }
        }
        if layout.kv_parts > 0 {
            assert_eq!(
                regions[layout.fixed.len()].at,
                layout.kv_offset(),
                "{what}: kv offset"
            );
        }
    }

    #[test]
    fn device_state_layouts_match_the_cpu_states() {
        let opts = LoadOptions::default();
        for case in [
            "llama/llama_gqa_f32",
            "llama/mistral_window_f32",
            "llama/llama_tied_bf16",
            "llama/llama_f16",
        ] {
            let ckpt = fixture(case);
            let arch = crate::models::detect(&ckpt).unwrap();
            let m = crate::models::llama::Llama::load(&ckpt, arch, opts).unwrap();
            assert_layout_matches(case, llama::state_layout(&m).unwrap());
        }
        for case in ["griffin/griffin_small", "griffin/griffin_attn_first"] {
            let m = crate::models::griffin::Griffin::load(&fixture(case), opts).unwrap();
            assert_layout_matches(case, griffin::state_layout(&m));
        }
        let m = crate::models::rwkv5::Rwkv5::load(&fixture("rwkv5/rwkv5_tiny_f32/model.pth"), opts).unwrap();
        assert_layout_matches("rwkv5", rwkv5::state_layout(&m));
    }
}
