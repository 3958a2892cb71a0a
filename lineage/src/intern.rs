//! Compact string interning and the node-key index.
//!
//! Names live once in one arena; the lookup tables are open-addressing arrays of `u32`
//! ids that re-read the arena to compare, so an index costs 4-8 bytes a slot instead of a
//! second copy of every string.

use std::sync::Arc;

use crate::cow::ChunkVec;

/// An interned string id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct Sym(pub(crate) u32);

impl Sym {
    pub(crate) const NONE: Sym = Sym(u32::MAX);

    pub(crate) fn is_none(self) -> bool {
        self.0 == u32::MAX
    }
}

const EMPTY: u32 = u32::MAX;

pub(crate) fn hash_bytes(b: &[u8]) -> u64 {
    // FNV-1a followed by a final avalanche; good enough spread for linear probing.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &c in b {
        h ^= u64::from(c);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    mix(h)
}

pub(crate) fn mix(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h
}

/// Bytes per arena chunk; a name's position is packed as `chunk << 16 | offset`.
const ARENA: usize = (1 << 16) - 1;

/// Append-only string interner.
///
/// Names are packed into immutable `Arc`-shared arena chunks plus one open tail, and the
/// tables are [`ChunkVec`]s, so a clone shares everything but the tail (at most 64 KiB).
/// A name never spans chunks; a name longer than a chunk gets a chunk of its own.
#[derive(Debug, Clone, Default)]
pub(crate) struct Interner {
    sealed: Vec<Arc<str>>,
    tail: String,
    starts: ChunkVec<u32>,
    slots: ChunkVec<u32>,
}

impl Interner {
    pub(crate) fn len(&self) -> usize {
        self.starts.len()
    }

    fn chunk(&self, c: usize) -> &str {
        self.sealed.get(c).map_or(self.tail.as_str(), |s| s)
    }

    pub(crate) fn resolve(&self, s: Sym) -> &str {
        let i = s.0 as usize;
        let Some(&p) = self.starts.get(i) else {
            return "";
        };
        let (c, off) = ((p >> 16) as usize, (p & 0xffff) as usize);
        let chunk = self.chunk(c);
        let end = match self.starts.get(i + 1) {
            Some(&q) if (q >> 16) as usize == c => (q & 0xffff) as usize,
            _ => chunk.len(),
        };
        chunk.get(off..end).unwrap_or("")
    }

    pub(crate) fn get(&self, s: &str) -> Option<Sym> {
        if self.slots.is_empty() {
            return None;
        }
        let mask = self.slots.len() - 1;
        let mut i = hash_bytes(s.as_bytes()) as usize & mask;
        loop {
            let v = *self.slots.get(i)?;
            if v == EMPTY {
                return None;
            }
            if self.resolve(Sym(v)) == s {
                return Some(Sym(v));
            }
            i = (i + 1) & mask;
        }
    }

    /// Interns `s`; `None` when the arena would exceed 2^16 chunks or 2^32-1 names.
    pub(crate) fn intern(&mut self, s: &str) -> Option<Sym> {
        if let Some(sym) = self.get(s) {
            return Some(sym);
        }
        if self.sealed.len() + 2 >= 1 << 16 || self.starts.len() >= (u32::MAX - 1) as usize {
            return None;
        }
        if (self.starts.len() + 1) * 2 > self.slots.len() {
            self.rehash((self.slots.len() * 2).max(64));
        }
        let packed = if self.tail.len() + s.len() <= ARENA {
            (self.sealed.len() << 16 | self.tail.len()) as u32
        } else {
            if !self.tail.is_empty() {
                let full = std::mem::take(&mut self.tail);
                self.sealed.push(Arc::from(full));
            }
            if s.len() > ARENA {
                self.sealed.push(Arc::from(s));
                ((self.sealed.len() - 1) << 16) as u32
            } else {
                (self.sealed.len() << 16) as u32
            }
        };
        if s.len() <= ARENA {
            if self.tail.capacity() == 0 {
                self.tail.reserve_exact(ARENA);
            }
            self.tail.push_str(s);
        }
        let id = self.starts.push(packed) as u32;
        self.place(id, hash_bytes(s.as_bytes()));
        Some(Sym(id))
    }

    fn place(&mut self, id: u32, h: u64) {
        let mask = self.slots.len() - 1;
        let mut i = h as usize & mask;
        while self.slots.get(i).is_some_and(|&v| v != EMPTY) {
            i = (i + 1) & mask;
        }
        if let Some(slot) = self.slots.get_mut(i) {
            *slot = id;
        }
    }

    fn rehash(&mut self, n: usize) {
        self.slots = ChunkVec::filled(n, EMPTY);
        for id in 0..self.starts.len() as u32 {
            let h = hash_bytes(self.resolve(Sym(id)).as_bytes());
            self.place(id, h);
        }
    }

    pub(crate) fn reserve(&mut self, names: usize, _bytes: usize) {
        self.starts.reserve(names);
        let want = ((self.starts.len() + names) * 2).next_power_of_two();
        if want > self.slots.len() {
            self.rehash(want);
        }
    }

    pub(crate) fn heap_bytes(&self) -> usize {
        self.sealed.iter().map(|c| c.len() + 16).sum::<usize>()
            + self.tail.capacity()
            + self.starts.heap_bytes()
            + self.slots.heap_bytes()
    }
}

/// Open-addressing index from a `(namespace, name)` pair to a node index; the pair is read
/// back through a caller-supplied accessor, so the table holds only node indices.
#[derive(Debug, Clone, Default)]
pub(crate) struct KeyIndex {
    slots: ChunkVec<u32>,
    len: usize,
}

pub(crate) fn key_hash(ns: Sym, name: Sym) -> u64 {
    mix((u64::from(ns.0) << 32) | u64::from(name.0))
}

impl KeyIndex {
    pub(crate) fn get(
        &self,
        ns: Sym,
        name: Sym,
        key_of: impl Fn(u32) -> (Sym, Sym),
    ) -> Option<u32> {
        if self.slots.is_empty() {
            return None;
        }
        let mask = self.slots.len() - 1;
        let mut i = key_hash(ns, name) as usize & mask;
        loop {
            let v = *self.slots.get(i)?;
            if v == EMPTY {
                return None;
            }
            if key_of(v) == (ns, name) {
                return Some(v);
            }
            i = (i + 1) & mask;
        }
    }

    /// Inserts a node index that is known not to be present yet.
    pub(crate) fn insert(
        &mut self,
        ns: Sym,
        name: Sym,
        node: u32,
        key_of: impl Fn(u32) -> (Sym, Sym),
    ) {
        if (self.len + 1) * 2 > self.slots.len() {
            self.resize((self.slots.len() * 2).max(64), &key_of);
        }
        self.place(key_hash(ns, name), node);
        self.len += 1;
    }

    fn place(&mut self, h: u64, node: u32) {
        let mask = self.slots.len() - 1;
        let mut i = h as usize & mask;
        while self.slots.get(i).is_some_and(|&v| v != EMPTY) {
            i = (i + 1) & mask;
        }
        if let Some(slot) = self.slots.get_mut(i) {
            *slot = node;
        }
    }

    fn resize(&mut self, n: usize, key_of: &impl Fn(u32) -> (Sym, Sym)) {
        let old = std::mem::replace(&mut self.slots, ChunkVec::filled(n, EMPTY));
        for v in old.iter().copied().filter(|&v| v != EMPTY) {
            let (a, b) = key_of(v);
            self.place(key_hash(a, b), v);
        }
    }

    pub(crate) fn reserve(&mut self, additional: usize, key_of: impl Fn(u32) -> (Sym, Sym)) {
        let want = ((self.len + additional) * 2).next_power_of_two();
        if want > self.slots.len() {
            self.resize(want, &key_of);
        }
    }

    pub(crate) fn heap_bytes(&self) -> usize {
        self.slots.heap_bytes()
    }

    /// Points the slot holding `old` (whose key is `(ns, name)`) at `new`, which has the
    /// same key.
    pub(crate) fn overwrite(
        &mut self,
        old: u32,
        new: u32,
        ns: Sym,
        name: Sym,
        _key_of: impl Fn(u32) -> (Sym, Sym),
    ) {
        if self.slots.is_empty() {
            return;
        }
        let mask = self.slots.len() - 1;
        let mut i = key_hash(ns, name) as usize & mask;
        for _ in 0..self.slots.len() {
            match self.slots.get_mut(i) {
                Some(v) if *v == old => {
                    *v = new;
                    return;
                }
                Some(v) if *v == EMPTY => return,
                None => return,
                Some(_) => {}
            }
            i = (i + 1) & mask;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interns_and_resolves() {
        let mut i = Interner::default();
        let words: Vec<String> = (0..1000).map(|n| format!("w{n}")).collect();
        let syms: Vec<Sym> = words.iter().map(|w| i.intern(w).unwrap()).collect();
        for (w, s) in words.iter().zip(&syms) {
            assert_eq!(i.resolve(*s), w);
            assert_eq!(i.get(w), Some(*s));
            assert_eq!(i.intern(w), Some(*s));
        }
        assert_eq!(i.get("nope"), None);
        assert_eq!(i.len(), 1000);
    }

    #[test]
    fn names_span_arena_chunks_and_clones_stay_independent() {
        let mut i = Interner::default();
        // Long names fill several chunks; one name is larger than a chunk.
        let mut words: Vec<String> = (0..400).map(|n| format!("{n:0>500}")).collect();
        words.push("x".repeat(3 * ARENA));
        words.push(String::new());
        words.extend((0..50).map(|n| format!("tail{n}")));
        let syms: Vec<Sym> = words.iter().map(|w| i.intern(w).unwrap()).collect();
        let snapshot = i.clone();
        let extra: Vec<Sym> = (0..300)
            .map(|n| i.intern(&format!("{n:x>400}")).unwrap())
            .collect();
        for (w, s) in words.iter().zip(&syms) {
            assert_eq!(i.resolve(*s), w);
            assert_eq!(snapshot.resolve(*s), w);
            assert_eq!(snapshot.get(w), Some(*s));
        }
        for (n, s) in extra.iter().enumerate() {
            assert_eq!(i.resolve(*s), format!("{n:x>400}"));
            assert_eq!(snapshot.get(&format!("{n:x>400}")), None);
        }
    }
}
