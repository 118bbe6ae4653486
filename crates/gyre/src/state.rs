//! Per-sequence state: everything a model carries from one token to the next.
//!
//! Weights are shared and read-only; each sequence owns one `State`. Transformers grow a
//! key/value cache (bounded to a ring of slots when the model has an attention window);
//! recurrent families keep fixed-size tensors. States clone cheaply for prefix caching.
//! A model on a CUDA device keeps its states in device memory ([`State::Device`]), in the
//! same layout.

use anyhow::Result;

pub use crate::models::cuda::DeviceState;

/// Keys and values of every attention layer, f32, `[slot][kv_heads · head_dim]` per layer.
///
/// Without a window the cache grows by one slot per token. With `ring_slots = Some(n)` it
/// holds at most `n` slots, position `p` living in slot `p % n`: enough for any attention
/// whose queries see no key older than `n` positions before them.
#[derive(Clone, Debug)]
pub struct KvCache {
    layers: Vec<KvLayer>,
    kv_dim: usize,
    ring_slots: Option<usize>,
    len: usize,
}

#[derive(Clone, Debug, Default)]
struct KvLayer {
    k: Vec<f32>,
    v: Vec<f32>,
}

impl KvCache {
    /// An empty cache for `n_layers` attention layers of `kv_dim` floats per token.
    pub fn new(n_layers: usize, kv_dim: usize, ring_slots: Option<usize>) -> KvCache {
        KvCache {
            layers: vec![KvLayer::default(); n_layers],
            kv_dim,
            ring_slots,
            len: 0,
        }
    }

    /// A ring of `slots` positions per layer, allocated up front so the state's size never
    /// changes (recurrent-family attention: memory fixed from the first token).
    pub fn ring(n_layers: usize, kv_dim: usize, slots: usize) -> KvCache {
        let layer = KvLayer {
            k: vec![0.0; slots * kv_dim],
            v: vec![0.0; slots * kv_dim],
        };
        KvCache {
            layers: vec![layer; n_layers],
            kv_dim,
            ring_slots: Some(slots),
            len: 0,
        }
    }

    /// True when this cache fits a model with these dimensions.
    pub fn shape_matches(&self, n_layers: usize, kv_dim: usize, ring_slots: Option<usize>) -> bool {
        self.layers.len() == n_layers && self.kv_dim == kv_dim && self.ring_slots == ring_slots
    }

    /// Tokens seen so far (= the position of the next token).
    pub fn len(&self) -> usize {
        self.len
    }

    /// True before the first token.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Key and value of absolute position `pos` in `layer` (must still be held).
    #[inline]
    pub fn get(&self, layer: usize, pos: usize) -> (&[f32], &[f32]) {
        let slot = self.ring_slots.map_or(pos, |n| pos % n);
        let l = &self.layers[layer];
        let r = slot * self.kv_dim..(slot + 1) * self.kv_dim;
        (&l.k[r.clone()], &l.v[r])
    }

    /// The oldest position still held, given that `len` tokens have been seen.
    pub fn oldest_held(&self) -> usize {
        self.ring_slots.map_or(0, |n| self.len.saturating_sub(n))
    }

    /// Appends the keys/values of `n` new tokens (`k`, `v`: [n, kv_dim]) to `layer`.
    /// Positions are `len .. len + n`; call [`KvCache::advance`] once all layers are written.
    pub fn write(&mut self, layer: usize, k: &[f32], v: &[f32]) {
        let d = self.kv_dim;
        let n = k.len() / d;
        let l = &mut self.layers[layer];
        let first = match self.ring_slots {
            Some(cap) => self.len.max((self.len + n).saturating_sub(cap)),
            None => self.len,
        };
        for pos in first..self.len + n {
            let src = (pos - self.len) * d..(pos - self.len + 1) * d;
            let slot = self.ring_slots.map_or(pos, |cap| pos % cap);
            if l.k.len() < (slot + 1) * d {
                l.k.resize((slot + 1) * d, 0.0);
                l.v.resize((slot + 1) * d, 0.0);
            }
            l.k[slot * d..(slot + 1) * d].copy_from_slice(&k[src.clone()]);
            l.v[slot * d..(slot + 1) * d].copy_from_slice(&v[src]);
        }
    }

    /// Rewinds to the first `tokens` positions; false when a ring has already overwritten
    /// keys that the next query would need.
    pub fn truncate(&mut self, tokens: usize) -> bool {
        if tokens > self.len {
            return false;
        }
        if self.ring_slots.is_some() && tokens < self.len {
            return false;
        }
        self.len = tokens;
        true
    }

    /// Marks `n` tokens as seen by every layer.
    pub fn advance(&mut self, n: usize) {
        self.len += n;
    }

    /// Bytes held after `tokens` tokens.
    pub fn bytes_at(n_layers: usize, kv_dim: usize, ring_slots: Option<usize>, tokens: usize) -> usize {
        let slots = ring_slots.map_or(tokens, |n| tokens.min(n));
        n_layers * 2 * slots * kv_dim * std::mem::size_of::<f32>()
    }

    /// Bytes held now.
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|l| (l.k.capacity() + l.v.capacity()) * 4)
            .sum()
    }
}

/// RecurrentGemma: fixed-size, whatever the sequence length.
#[derive(Clone, Debug)]
pub struct GriffinState {
    /// Per recurrent layer: the last `conv1d_width − 1` conv inputs, oldest first, [width−1, lru].
    pub conv: Vec<Vec<f32>>,
    /// Per recurrent layer: the RG-LRU hidden state h, f32 [lru].
    pub lru: Vec<Vec<f32>>,
    /// Per attention layer: a ring of `attention_window_size` key/value slots.
    pub kv: KvCache,
    /// Tokens consumed (position of the next token; 0 triggers the RG-LRU reset).
    pub pos: usize,
}

impl GriffinState {
    /// A zero state.
    pub fn new(n_recurrent: usize, lru: usize, conv_width: usize, kv: KvCache) -> GriffinState {
        GriffinState {
            conv: vec![vec![0.0; (conv_width - 1) * lru]; n_recurrent],
            lru: vec![vec![0.0; lru]; n_recurrent],
            kv,
            pos: 0,
        }
    }

    /// Bytes of the recurrent part.
    pub fn bytes_for(n_recurrent: usize, lru: usize, conv_width: usize) -> usize {
        // (width − 1) conv rows plus the LRU state row
        n_recurrent * conv_width * lru * std::mem::size_of::<f32>()
    }
}

/// RWKV-5: per layer two token-shift vectors and the per-head WKV matrices; fixed-size.
#[derive(Clone, Debug)]
pub struct RwkvState {
    /// Per layer: the previous token's ln1 output [C].
    pub att_shift: Vec<Vec<f32>>,
    /// Per layer: WKV state [H, N (key i), N (value j)], f32.
    pub wkv: Vec<Vec<f32>>,
    /// Per layer: the previous token's ln2 output [C].
    pub ffn_shift: Vec<Vec<f32>>,
    /// Tokens consumed.
    pub pos: usize,
    /// Heads H and head size N of the WKV matrices.
    pub heads: usize,
    pub head_size: usize,
}

impl RwkvState {
    /// A zero state.
    pub fn new(n_layers: usize, c: usize, heads: usize, head_size: usize) -> RwkvState {
        RwkvState {
            att_shift: vec![vec![0.0; c]; n_layers],
            wkv: vec![vec![0.0; heads * head_size * head_size]; n_layers],
            ffn_shift: vec![vec![0.0; c]; n_layers],
            pos: 0,
            heads,
            head_size,
        }
    }

    /// True when the state has these dimensions.
    pub fn fits(&self, n_layers: usize, c: usize, heads: usize, head_size: usize) -> bool {
        self.wkv.len() == n_layers
            && self.att_shift.first().is_none_or(|v| v.len() == c)
            && self
                .wkv
                .first()
                .is_none_or(|v| v.len() == heads * head_size * head_size)
    }

    /// Bytes of a state of these dimensions.
    pub fn bytes_for(n_layers: usize, c: usize, heads: usize, head_size: usize) -> usize {
        n_layers * (2 * c + heads * head_size * head_size) * std::mem::size_of::<f32>()
    }
}

/// The state of one sequence, per model family.
#[derive(Clone, Debug)]
pub enum State {
    /// Llama / Mistral: the key/value cache.
    Kv(KvCache),
    /// RecurrentGemma: conv and RG-LRU states plus attention rings.
    Griffin(GriffinState),
    /// RWKV-5: token shifts and WKV matrices.
    Rwkv(RwkvState),
    /// Any family's state in CUDA device memory (a model running with `--device cuda`).
    Device(DeviceState),
}

/// One tensor of a state, for saving and loading: name, shape and a mutable handle on its values.
pub type StatePart<'a> = (String, Vec<usize>, &'a mut Vec<f32>);

impl KvCache {
    /// Sets the token count and sizes the per-layer buffers for it (before loading a saved state).
    fn prepare_for(&mut self, tokens: usize) {
        self.len = tokens;
        let slots = self.ring_slots.map_or(tokens, |cap| tokens.min(cap));
        for l in &mut self.layers {
            let want = (slots * self.kv_dim).max(l.k.len());
            l.k.resize(want, 0.0);
            l.v.resize(want, 0.0);
        }
    }

    fn parts(&mut self, prefix: &str) -> Vec<StatePart<'_>> {
        let d = self.kv_dim;
        let mut out = Vec::new();
        for (i, l) in self.layers.iter_mut().enumerate() {
            let rows = l.k.len() / d;
            out.push((format!("{prefix}{i}.k"), vec![rows, d], &mut l.k));
            out.push((format!("{prefix}{i}.v"), vec![rows, d], &mut l.v));
        }
        out
    }
}

impl State {
    /// The family name written into state files.
    pub fn family(&self) -> &'static str {
        match self {
            State::Kv(_) => "kv-cache",
            State::Griffin(_) => "recurrent_gemma",
            State::Rwkv(_) => "rwkv5",
            State::Device(d) => d.family(),
        }
    }

    /// The rows each key/value cache tensor holds after `tokens` tokens (`None` for states
    /// without a cache): what a state file of that many tokens must store.
    pub fn cache_rows_for(&self, tokens: usize) -> Option<usize> {
        let rows = |c: &KvCache| c.ring_slots.map_or(tokens, |cap| tokens.min(cap));
        match self {
            State::Kv(c) => Some(rows(c)),
            State::Griffin(g) if !g.kv.layers.is_empty() => Some(rows(&g.kv)),
            State::Griffin(_) | State::Rwkv(_) => None,
            State::Device(d) => d.cache_rows_for(tokens),
        }
    }

    /// Sets the token count of a fresh state before its tensors are loaded.
    pub fn prepare_for(&mut self, tokens: usize) {
        match self {
            State::Kv(c) => c.prepare_for(tokens),
            State::Griffin(g) => {
                g.pos = tokens;
                g.kv.prepare_for(tokens);
            }
            State::Rwkv(r) => r.pos = tokens,
            State::Device(d) => d.prepare_for(tokens),
        }
    }

    /// Capacity hint: a device state's growing cache is sized for `tokens` positions now,
    /// so it will not grow (and copy) before then. Host states grow as they go.
    pub fn reserve(&mut self, tokens: usize) -> Result<()> {
        match self {
            State::Device(d) => d.reserve(tokens),
            _ => Ok(()),
        }
    }

    /// Every tensor of the state with its name and shape (the state-file layout).
    ///
    /// Llama: `kv.{l}.k`, `kv.{l}.v` [slots, kv_heads·head_dim] (ring slot `p % slots` holds
    /// position p). RecurrentGemma: `conv.{r}` [conv1d_width − 1, lru] (oldest first),
    /// `lru.{r}` [lru] per recurrent layer r, and `kv.{a}.k/v` [window, kv_dim] per attention
    /// layer a. RWKV-5: `state.{n}.att_shift` [C], `state.{n}.wkv` [H, N (key), N (value)],
    /// `state.{n}.ffn_shift` [C].
    ///
    /// A device state is copied to host memory first (edits are written back before the
    /// model's next pass), hence the `Result`.
    pub fn parts(&mut self) -> Result<Vec<StatePart<'_>>> {
        Ok(match self {
            State::Device(d) => return d.parts(),
            State::Kv(c) => c.parts("kv."),
            State::Griffin(g) => {
                let lru = g.lru.first().map_or(0, Vec::len);
                let mut out: Vec<StatePart<'_>> = Vec::new();
                for (i, v) in g.conv.iter_mut().enumerate() {
                    let rows = v.len() / lru.max(1);
                    out.push((format!("conv.{i}"), vec![rows, lru], v));
                }
                for (i, v) in g.lru.iter_mut().enumerate() {
                    out.push((format!("lru.{i}"), vec![lru], v));
                }
                out.extend(g.kv.parts("kv."));
                out
            }
            State::Rwkv(r) => {
                let mut out: Vec<StatePart<'_>> = Vec::new();
                let c = r.att_shift.first().map_or(0, Vec::len);
                let (h, n_) = (r.heads, r.head_size);
                for (n, ((a, w), f)) in r
                    .att_shift
                    .iter_mut()
                    .zip(r.wkv.iter_mut())
                    .zip(r.ffn_shift.iter_mut())
                    .enumerate()
                {
                    out.push((format!("state.{n}.att_shift"), vec![c], a));
                    out.push((format!("state.{n}.wkv"), vec![h, n_, n_], w));
                    out.push((format!("state.{n}.ffn_shift"), vec![c], f));
                }
                out
            }
        })
    }

    /// Tokens consumed so far.
    pub fn tokens_seen(&self) -> usize {
        match self {
            State::Kv(c) => c.len(),
            State::Griffin(g) => g.pos,
            State::Rwkv(r) => r.pos,
            State::Device(d) => d.tokens_seen(),
        }
    }

    /// Rewinds to the first `tokens` tokens; false when this state cannot rewind that far
    /// (recurrent states, or ring slots already overwritten).
    pub fn truncate(&mut self, tokens: usize) -> bool {
        match self {
            State::Kv(c) => c.truncate(tokens),
            State::Griffin(g) => tokens == g.pos,
            State::Rwkv(r) => tokens == r.pos,
            State::Device(d) => d.truncate(tokens),
        }
    }

    /// Bytes of memory the state holds.
    pub fn bytes(&self) -> usize {
        match self {
            State::Kv(c) => c.bytes(),
            State::Griffin(g) => {
                let rec: usize = g.conv.iter().chain(&g.lru).map(|v| v.len() * 4).sum();
                rec + g.kv.bytes()
            }
            State::Rwkv(r) => r
                .att_shift
                .iter()
                .chain(&r.wkv)
                .chain(&r.ffn_shift)
                .map(|v| v.len() * 4)
                .sum(),
            State::Device(d) => d.bytes(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_keeps_the_last_slots_in_place() {
        let mut c = KvCache::new(1, 2, Some(3));
        let k: Vec<f32> = (0..10).map(|i| i as f32).collect();
        c.write(0, &k, &k); // positions 0..5
        c.advance(5);
        assert_eq!(c.oldest_held(), 2);
        for p in 2..5 {
            assert_eq!(c.get(0, p).0, &[2.0 * p as f32, 2.0 * p as f32 + 1.0]);
        }
        c.write(0, &[7.0, 8.0], &[7.0, 8.0]);
        c.advance(1);
        assert_eq!(c.get(0, 5).0, &[7.0, 8.0]);
        assert_eq!(c.get(0, 4).0, &[8.0, 9.0]);
        assert_eq!(
            KvCache::bytes_at(1, 2, Some(3), 1000),
            KvCache::bytes_at(1, 2, Some(3), 3)
        );
    }

    #[test]
    fn growing_cache_keeps_everything() {
        let mut c = KvCache::new(2, 1, None);
        for p in 0..4 {
            c.write(0, &[p as f32], &[0.0]);
            c.write(1, &[p as f32], &[0.0]);
            c.advance(1);
        }
        assert_eq!(c.oldest_held(), 0);
        assert_eq!(c.get(1, 2).0, &[2.0]);
    }
}
