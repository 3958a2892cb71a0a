//! The paged KV cache: a pool of fixed-size blocks per layer, handed to sequences as they grow
//! and returned when they end, so sequences of any length share one cache without fragmentation.

use std::collections::{HashMap, VecDeque};

use candle_core::{DType, Device, Tensor};

use crate::cpu::HostKv;
use crate::error::{Result, invalid_model};

/// Hands out block ids from a fixed pool. Blocks are identified by index into every layer's
/// key and value tensors; a sequence's block table lists its blocks in position order.
#[derive(Debug)]
pub(crate) struct BlockAllocator {
    free: Vec<u32>,
    total: usize,
}

impl BlockAllocator {
    pub(crate) fn new(total: usize) -> Self {
        // Reverse so that low ids go out first, which keeps traces easy to read.
        Self {
            free: (0..total as u32).rev().collect(),
            total,
        }
    }

    pub(crate) fn total(&self) -> usize {
        self.total
    }

    pub(crate) fn free_count(&self) -> usize {
        self.free.len()
    }

    #[cfg(test)]
    pub(crate) fn used(&self) -> usize {
        self.total - self.free.len()
    }

    /// Takes `n` blocks, or none at all when fewer than `n` are free.
    pub(crate) fn allocate(&mut self, n: usize) -> Option<Vec<u32>> {
        if n > self.free.len() {
            return None;
        }
        let at = self.free.len() - n;
        Some(self.free.split_off(at))
    }

    /// Returns blocks to the pool.
    pub(crate) fn release(&mut self, blocks: impl IntoIterator<Item = u32>) {
        self.free.extend(blocks);
        debug_assert!(self.free.len() <= self.total);
    }
}

/// Keys and values for every layer, stored as `[blocks * block_size, kv_dim]` tensors so that a
/// position's slot is `block * block_size + offset`.
/// Blocks handed to sequences, with prefix caching: a full block of prompt or generated
/// tokens whose keys and values are computed is indexed by (previous block, its tokens), so a
/// later sequence that starts with the same tokens takes the same blocks instead of computing
/// them again (a shared system prompt, a retried or preempted request, the next turn of a
/// chat). Blocks are reference-counted; a cached block nobody uses stays in the index, in
/// least-recently-released order, until a new allocation needs it.
#[derive(Debug)]
pub(crate) struct BlockPool {
    free: BlockAllocator,
    refs: Vec<u32>,
    enabled: bool,
    index: HashMap<(u32, Vec<u32>), u32>,
    keys: HashMap<u32, (u32, Vec<u32>)>,
    /// Cached blocks whose count fell to zero, oldest first (entries are checked on use).
    idle: VecDeque<u32>,
    idle_count: usize,
}

/// The "no previous block" marker in a prefix key.
const ROOT: u32 = u32::MAX;

impl BlockPool {
    pub(crate) fn new(total: usize, enabled: bool) -> Self {
        Self {
            free: BlockAllocator::new(total),
            refs: vec![0; total],
            enabled,
            index: HashMap::new(),
            keys: HashMap::new(),
            idle: VecDeque::new(),
            idle_count: 0,
        }
    }

    pub(crate) fn total(&self) -> usize {
        self.free.total()
    }

    /// Blocks an allocation can have: free ones plus cached ones nobody uses.
    pub(crate) fn free_count(&self) -> usize {
        self.free.free_count() + self.idle_count
    }

    pub(crate) fn used(&self) -> usize {
        self.total() - self.free_count()
    }

    /// `n` blocks, all or nothing, evicting the least recently used idle cached blocks when
    /// the free list runs short.
    pub(crate) fn allocate(&mut self, n: usize) -> Option<Vec<u32>> {
        if n > self.free_count() {
            return None;
        }
        let from_free = n.min(self.free.free_count());
        let mut out = self.free.allocate(from_free)?;
        while out.len() < n {
            let b = self.idle.pop_front()?;
            if self.refs[b as usize] != 0 || !self.keys.contains_key(&b) {
                continue; // Taken again since it went idle, or already evicted.
            }
            if let Some(key) = self.keys.remove(&b) {
                self.index.remove(&key);
            }
            self.idle_count -= 1;
            out.push(b);
        }
        for &b in &out {
            self.refs[b as usize] = 1;
        }
        Some(out)
    }

    /// Drops one reference to each block; a block nobody uses goes idle if cached, else back
    /// to the free list.
    pub(crate) fn release(&mut self, blocks: impl IntoIterator<Item = u32>) {
        for b in blocks {
            let r = &mut self.refs[b as usize];
            *r = r.saturating_sub(1);
            if *r == 0 {
                if self.keys.contains_key(&b) {
                    self.idle.push_back(b);
                    self.idle_count += 1;
                } else {
                    self.free.release([b]);
                }
            }
        }
    }

    /// The cached blocks that hold the longest run of whole blocks at the start of `tokens`,
    /// leaving at least the last token to compute (its logits are needed), each with one
    /// reference taken for the caller.
    pub(crate) fn match_prefix(&mut self, tokens: &[u32], block_size: usize) -> Vec<u32> {
        let mut out = Vec::new();
        if !self.enabled || tokens.is_empty() {
            return out;
        }
        let mut parent = ROOT;
        for chunk in tokens[..tokens.len() - 1].chunks_exact(block_size) {
            let Some(&b) = self.index.get(&(parent, chunk.to_vec())) else {
                break;
            };
            if self.refs[b as usize] == 0 {
                self.idle_count -= 1; // Its stale idle entry is skipped on eviction.
            }
            self.refs[b as usize] += 1;
            out.push(b);
            parent = b;
        }
        out
    }

    /// Indexes the whole blocks of a sequence whose keys and values are computed (the first
    /// `computed` tokens), from block `*indexed` on; `*indexed` advances past them. A block
    /// joins the index only behind an indexed block (or at the start), so lookups follow one
    /// chain per prefix.
    pub(crate) fn register(
        &mut self,
        blocks: &[u32],
        tokens: &[u32],
        computed: usize,
        block_size: usize,
        indexed: &mut usize,
    ) {
        if !self.enabled {
            return;
        }
        while (*indexed + 1) * block_size <= computed && *indexed < blocks.len() {
            let k = *indexed;
            let b = blocks[k];
            let parent = if k == 0 { ROOT } else { blocks[k - 1] };
            if k > 0 && !self.keys.contains_key(&parent) {
                return;
            }
            if !self.keys.contains_key(&b) {
                let key = (
                    parent,
                    tokens[k * block_size..(k + 1) * block_size].to_vec(),
                );
                if self.index.contains_key(&key) {
                    return; // Another block already holds this prefix.
                }
                self.index.insert(key.clone(), b);
                self.keys.insert(b, key);
            }
            *indexed += 1;
        }
    }
}

/// How a model wants its KV cache held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KvLayout {
    /// f16 bits in host memory, for our CPU kernels.
    Host,
    /// candle tensors of this dtype on the model's device: f32 for candle's own forward pass,
    /// the model's dtype (f32 or bf16) for Keel's kernels, which read and write the cache in
    /// the activations' dtype.
    Tensors(DType),
}

#[derive(Debug)]
pub(crate) struct KvCache {
    store: Store,
    block_size: usize,
    /// Slots in every layer (`blocks · block_size`).
    slots: usize,
}

/// Where the keys and values live.
#[derive(Debug)]
enum Store {
    /// Per layer, `(keys, values)` as tensors `[slots, kv_dim]` on the model's device (f32,
    /// or the model's dtype on the kernel path).
    Tensors(Vec<(Tensor, Tensor)>),
    /// Per layer, `(keys, values)` as f16 bits `[slots * kv_dim]` in host memory (CPU kernels).
    Host {
        layers: Vec<(Vec<u16>, Vec<u16>)>,
        kv_dim: usize,
    },
}

impl KvCache {
    pub(crate) fn new(
        layers: usize,
        blocks: usize,
        block_size: usize,
        kv_dim: usize,
        device: &Device,
        layout: KvLayout,
    ) -> Result<Self> {
        let slots = blocks * block_size;
        let dtype = match layout {
            KvLayout::Tensors(dtype) => dtype,
            KvLayout::Host => {
                let len = slots.checked_mul(kv_dim).ok_or_else(|| {
                    crate::error::Error::InvalidConfig {
                        name: "kv_blocks",
                        reason: format!("{slots} slots of {kv_dim} values overflow memory"),
                    }
                })?;
                let layers = (0..layers)
                    .map(|_| (vec![0u16; len], vec![0u16; len]))
                    .collect();
                return Ok(Self {
                    store: Store::Host { layers, kv_dim },
                    block_size,
                    slots,
                });
            }
        };
        let mut v = Vec::with_capacity(layers);
        for _ in 0..layers {
            let k = Tensor::zeros((slots, kv_dim), dtype, device).map_err(invalid_model)?;
            let vv = Tensor::zeros((slots, kv_dim), dtype, device).map_err(invalid_model)?;
            v.push((k, vv));
        }
        Ok(Self {
            store: Store::Tensors(v),
            block_size,
            slots,
        })
    }

    /// Bytes one token occupies across all layers (keys and values).
    pub(crate) fn bytes_per_token(layers: usize, kv_dim: usize, layout: KvLayout) -> usize {
        2 * layers
            * kv_dim
            * match layout {
                KvLayout::Host => 2,
                KvLayout::Tensors(dtype) => dtype.size_in_bytes(),
            }
    }

    pub(crate) fn block_size(&self) -> usize {
        self.block_size
    }

    /// Slots per layer: every slot a step names must be below this.
    pub(crate) fn slot_count(&self) -> usize {
        self.slots
    }

    /// Layer `i`'s key and value tensors (the candle path).
    pub(crate) fn layer(&self, i: usize) -> candle_core::Result<(&Tensor, &Tensor)> {
        match &self.store {
            Store::Tensors(layers) => layers
                .get(i)
                .map(|(k, v)| (k, v))
                .ok_or_else(|| candle_core::Error::Msg(format!("no cache for layer {i}"))),
            Store::Host { .. } => Err(candle_core::Error::Msg(
                "this KV cache is held for the CPU kernels".into(),
            )),
        }
    }

    /// The f16 host cache (the CPU kernels' path), if this cache is one.
    pub(crate) fn host(&mut self) -> Option<HostKv<'_>> {
        match &mut self.store {
            Store::Host { layers, kv_dim } => Some(HostKv {
                layers,
                kv_dim: *kv_dim,
            }),
            Store::Tensors(_) => None,
        }
    }

    pub(crate) fn slots(&self, table: &[u32], len: usize) -> Vec<u32> {
        (0..len)
            .map(|p| {
                table[p / self.block_size] * self.block_size as u32 + (p % self.block_size) as u32
            })
            .collect()
    }
}

/// Blocks needed to hold `tokens` positions.
pub(crate) fn blocks_for(tokens: usize, block_size: usize) -> usize {
    tokens.div_ceil(block_size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocate_is_all_or_nothing_and_release_restores() {
        let mut a = BlockAllocator::new(4);
        let x = a.allocate(3).unwrap();
        assert_eq!(x.len(), 3);
        assert!(a.allocate(2).is_none());
        assert_eq!(a.free_count(), 1);
        a.release(x);
        assert_eq!(a.free_count(), 4);
        assert_eq!(a.used(), 0);
    }

    #[test]
    fn prefix_blocks_are_shared_kept_while_idle_and_evicted_last() {
        let mut p = BlockPool::new(4, true);
        let toks: Vec<u32> = (0..9).collect();
        // A sequence computes two whole blocks of 4 tokens and indexes them.
        let a = p.allocate(3).unwrap();
        let mut idx = 0;
        p.register(&a, &toks, 9, 4, &mut idx);
        assert_eq!(idx, 2);
        // Another sequence with the same first 9 tokens reuses both (not the third block:
        // the last token is always computed).
        let b = p.match_prefix(&toks, 4);
        assert_eq!(b, a[..2]);
        p.release(a.clone());
        assert_eq!(p.used(), 2); // Still held by the second sequence.
        p.release(b);
        assert_eq!(p.free_count(), 4); // Idle cached blocks count as free...
        let again = p.match_prefix(&toks, 4);
        assert_eq!(again, a[..2]); // ...but still hit.
        p.release(again);
        // Allocating everything evicts the idle cached blocks.
        let all = p.allocate(4).unwrap();
        assert_eq!(all.len(), 4);
        assert!(p.match_prefix(&toks, 4).is_empty());
        assert!(p.allocate(1).is_none());
        p.release(all);
        assert_eq!(p.free_count(), 4);
        // A different prefix does not match, and a disabled pool never caches.
        assert!(p.match_prefix(&[7, 7, 7, 7, 7], 4).is_empty());
        let mut off = BlockPool::new(2, false);
        let x = off.allocate(2).unwrap();
        let mut i = 0;
        off.register(&x, &toks, 8, 4, &mut i);
        off.release(x);
        assert!(off.match_prefix(&toks, 4).is_empty());
        assert_eq!(off.free_count(), 2);
    }

    #[test]
    fn slots_follow_block_table() {
        let c = KvCache::new(1, 4, 2, 3, &Device::Cpu, KvLayout::Tensors(DType::F32)).unwrap();
        assert_eq!(c.slots(&[3, 1], 3), vec![6, 7, 2]);
        assert_eq!(blocks_for(5, 2), 3);
    }
}
