//! Copy-on-write containers whose clones share storage in fixed-size chunks.
//!
//! A published snapshot and the writer's next version of the graph share every chunk that a
//! commit did not touch, so publishing a commit costs the chunks it wrote, not the graph.

use std::collections::HashMap;
use std::sync::Arc;

/// log2 of the number of items per chunk.
const SHIFT: usize = 12;
/// Items per chunk: 4096 keeps a chunk of node rows around 160 KiB, small enough that a
/// commit touching a few nodes copies little, large enough that the chunk table stays short.
pub(crate) const CHUNK: usize = 1 << SHIFT;
const MASK: usize = CHUNK - 1;

/// A vector split into `Arc`-shared chunks of [`CHUNK`] items; cloning it copies only the
/// chunk table, and writing to a shared chunk copies that chunk first.
#[derive(Debug)]
pub(crate) struct ChunkVec<T> {
    chunks: Vec<Arc<Vec<T>>>,
    len: usize,
}

impl<T> Clone for ChunkVec<T> {
    fn clone(&self) -> Self {
        Self {
            chunks: self.chunks.clone(),
            len: self.len,
        }
    }
}

impl<T> Default for ChunkVec<T> {
    fn default() -> Self {
        Self {
            chunks: Vec::new(),
            len: 0,
        }
    }
}

impl<T: Clone> ChunkVec<T> {
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }

    #[inline]
    pub(crate) fn get(&self, i: usize) -> Option<&T> {
        self.chunks.get(i >> SHIFT)?.get(i & MASK)
    }

    /// Mutable access, copying the chunk first if a snapshot shares it.
    #[inline]
    pub(crate) fn get_mut(&mut self, i: usize) -> Option<&mut T> {
        Arc::make_mut(self.chunks.get_mut(i >> SHIFT)?).get_mut(i & MASK)
    }

    pub(crate) fn push(&mut self, v: T) -> usize {
        let i = self.len;
        match self.chunks.last_mut() {
            Some(last) if last.len() < CHUNK => Arc::make_mut(last).push(v),
            _ => {
                let mut c = Vec::with_capacity(CHUNK);
                c.push(v);
                self.chunks.push(Arc::new(c));
            }
        }
        self.len += 1;
        i
    }

    pub(crate) fn last(&self) -> Option<&T> {
        self.len.checked_sub(1).and_then(|i| self.get(i))
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = &T> + '_ {
        self.chunks.iter().flat_map(|c| c.iter())
    }

    /// The first index whose item fails `pred`, for items partitioned by it.
    pub(crate) fn partition_point(&self, pred: impl Fn(&T) -> bool) -> usize {
        let c = self.chunks.partition_point(|c| c.last().is_some_and(&pred));
        match self.chunks.get(c) {
            Some(chunk) => c * CHUNK + chunk.partition_point(pred),
            None => self.len,
        }
    }

    /// Reserves room in the chunk table for `additional` more items.
    pub(crate) fn reserve(&mut self, additional: usize) {
        let want = (self.len + additional).div_ceil(CHUNK);
        self.chunks.reserve(want.saturating_sub(self.chunks.len()));
    }

    /// Heap bytes, counting shared chunks in full.
    pub(crate) fn heap_bytes(&self) -> usize {
        self.chunks.capacity() * std::mem::size_of::<Arc<Vec<T>>>()
            + self
                .chunks
                .iter()
                .map(|c| c.capacity() * std::mem::size_of::<T>() + 40)
                .sum::<usize>()
    }
}

impl<T: Clone> ChunkVec<T> {
    /// A vector of `n` copies of `item`.
    pub(crate) fn filled(n: usize, item: T) -> Self {
        let mut v = Self::default();
        let mut left = n;
        while left > 0 {
            let k = left.min(CHUNK);
            v.chunks.push(Arc::new(vec![item.clone(); k]));
            left -= k;
        }
        v.len = n;
        v
    }
}

/// A map from `u32` ids to values, sharded by id range into `Arc`-shared hash maps, so a
/// clone copies the shard table and a write copies one shard.
#[derive(Debug)]
pub(crate) struct ChunkMap<V> {
    shards: Vec<Option<Arc<HashMap<u32, V>>>>,
    len: usize,
}

impl<V> Clone for ChunkMap<V> {
    fn clone(&self) -> Self {
        Self {
            shards: self.shards.clone(),
            len: self.len,
        }
    }
}

impl<V> Default for ChunkMap<V> {
    fn default() -> Self {
        Self {
            shards: Vec::new(),
            len: 0,
        }
    }
}

impl<V: Clone> ChunkMap<V> {
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    #[inline]
    pub(crate) fn get(&self, k: u32) -> Option<&V> {
        self.shards.get(k as usize >> SHIFT)?.as_ref()?.get(&k)
    }

    #[inline]
    pub(crate) fn contains_key(&self, k: u32) -> bool {
        self.get(k).is_some()
    }

    /// Inserts, returning the previous value.
    pub(crate) fn insert(&mut self, k: u32, v: V) -> Option<V> {
        let s = k as usize >> SHIFT;
        if self.shards.len() <= s {
            self.shards.resize(s + 1, None);
        }
        let shard = self.shards[s].get_or_insert_with(Default::default);
        let old = Arc::make_mut(shard).insert(k, v);
        if old.is_none() {
            self.len += 1;
        }
        old
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = (u32, &V)> + '_ {
        self.shards
            .iter()
            .flatten()
            .flat_map(|m| m.iter().map(|(&k, v)| (k, v)))
    }

    pub(crate) fn heap_bytes(&self) -> usize {
        self.shards.capacity() * 8
            + self
                .shards
                .iter()
                .flatten()
                .map(|m| m.capacity() * (4 + std::mem::size_of::<V>() + 1) + 48)
                .sum::<usize>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clones_share_chunks_until_written() {
        let mut a = ChunkVec::default();
        for i in 0..(3 * CHUNK + 5) as u32 {
            a.push(i);
        }
        let b = a.clone();
        *a.get_mut(CHUNK + 1).unwrap() = 7;
        a.push(99);
        assert_eq!(b.get(CHUNK + 1), Some(&(CHUNK as u32 + 1)));
        assert_eq!(a.get(CHUNK + 1), Some(&7));
        assert_eq!((a.len(), b.len()), (3 * CHUNK + 6, 3 * CHUNK + 5));
        assert_eq!(b.get(3 * CHUNK + 5), None);
        // Only the written chunk and the tail were copied.
        let shared = a
            .chunks
            .iter()
            .zip(&b.chunks)
            .filter(|(x, y)| Arc::ptr_eq(x, y))
            .count();
        assert_eq!(shared, 2);
        assert!(b.iter().copied().eq(0..(3 * CHUNK + 5) as u32));
    }

    #[test]
    fn partition_point_spans_chunks() {
        let mut v = ChunkVec::default();
        for i in 0..(2 * CHUNK + 10) {
            v.push(i / 3);
        }
        for x in [0, 1, CHUNK / 3, CHUNK / 3 + 1, (2 * CHUNK + 9) / 3, 1 << 30] {
            let want = (0..v.len()).filter(|&i| i / 3 < x).count();
            assert_eq!(v.partition_point(|&y| y < x), want, "x = {x}");
        }
        assert_eq!(ChunkVec::<u32>::default().partition_point(|_| true), 0);
    }

    #[test]
    fn chunk_map_clones_are_independent() {
        let mut a = ChunkMap::default();
        for k in (0..20_000u32).step_by(7) {
            a.insert(k, k * 2);
        }
        let b = a.clone();
        a.insert(7, 0);
        a.insert(50_000, 1);
        assert_eq!((a.get(7), b.get(7)), (Some(&0), Some(&14)));
        assert_eq!((a.get(50_000), b.get(50_000)), (Some(&1), None));
        assert_eq!((a.len(), b.len()), (b.len() + 1, 20_000usize.div_ceil(7)));
        assert!(!a.contains_key(8));
    }
}
