//! The paged KV cache: a pool of fixed-size blocks per layer, handed to sequences as they grow
//! and returned when they end, so sequences of any length share one cache without fragmentation.

use candle_core::{DType, Device, Tensor};

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
    layers: Vec<(Tensor, Tensor)>,
    block_size: usize,
}

impl KvCache {
    pub(crate) fn new(
        layers: usize,
        blocks: usize,
        block_size: usize,
        kv_dim: usize,
        device: &Device,
    ) -> Result<Self> {
        let mut v = Vec::with_capacity(layers);
        for _ in 0..layers {
            let k = Tensor::zeros((blocks * block_size, kv_dim), DType::F32, device)
                .map_err(invalid_model)?;
            let vv = Tensor::zeros((blocks * block_size, kv_dim), DType::F32, device)
                .map_err(invalid_model)?;
            v.push((k, vv));
        }
        Ok(Self {
            layers: v,
            block_size,
        })
    }

    pub(crate) fn block_size(&self) -> usize {
        self.block_size
    }

    pub(crate) fn layer(&self, i: usize) -> (&Tensor, &Tensor) {
        let (k, v) = &self.layers[i];
        (k, v)
    }

    /// Slot of every position `0..len` of a sequence with block table `table`.
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
        let c = KvCache::new(1, 4, 2, 3, &Device::Cpu).unwrap();
        assert_eq!(c.slots(&[3, 1], 3), vec![6, 7, 2]);
        assert_eq!(blocks_for(5, 2), 3);
    }
}
