//! The paged KV cache: a pool of fixed-size blocks per layer, handed to sequences as they grow
//! and returned when they end, so sequences of any length share one cache without fragmentation.

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
#[derive(Debug)]
pub(crate) struct KvCache {
    store: Store,
    block_size: usize,
}

/// Where the keys and values live.
#[derive(Debug)]
enum Store {
    /// Per layer, `(keys, values)` as f32 tensors `[slots, kv_dim]` on the model's device.
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
        host: bool,
    ) -> Result<Self> {
        let slots = blocks * block_size;
        if host {
            let len =
                slots
                    .checked_mul(kv_dim)
                    .ok_or_else(|| crate::error::Error::InvalidConfig {
                        name: "kv_blocks",
                        reason: format!("{slots} slots of {kv_dim} values overflow memory"),
                    })?;
            let layers = (0..layers)
                .map(|_| (vec![0u16; len], vec![0u16; len]))
                .collect();
            return Ok(Self {
                store: Store::Host { layers, kv_dim },
                block_size,
            });
        }
        let mut v = Vec::with_capacity(layers);
        for _ in 0..layers {
            let k = Tensor::zeros((slots, kv_dim), DType::F32, device).map_err(invalid_model)?;
            let vv = Tensor::zeros((slots, kv_dim), DType::F32, device).map_err(invalid_model)?;
            v.push((k, vv));
        }
        Ok(Self {
            store: Store::Tensors(v),
            block_size,
        })
    }

    /// Bytes one token occupies across all layers (keys and values).
    pub(crate) fn bytes_per_token(layers: usize, kv_dim: usize, host: bool) -> usize {
        2 * layers * kv_dim * if host { 2 } else { 4 }
    }

    pub(crate) fn block_size(&self) -> usize {
        self.block_size
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
    fn slots_follow_block_table() {
        let c = KvCache::new(1, 4, 2, 3, &Device::Cpu, false).unwrap();
        assert_eq!(c.slots(&[3, 1], 3), vec![6, 7, 2]);
        assert_eq!(blocks_for(5, 2), 3);
    }
}
