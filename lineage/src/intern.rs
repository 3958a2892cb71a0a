//! Compact string interning and the node-key index.
//!
//! Names live once in one arena; the lookup tables are open-addressing arrays of `u32`
//! ids that re-read the arena to compare, so an index costs 4-8 bytes a slot instead of a
//! second copy of every string.

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

/// Append-only string interner.
#[derive(Debug, Clone, Default)]
pub(crate) struct Interner {
    arena: String,
    ends: Vec<u32>,
    slots: Vec<u32>,
}

impl Interner {
    pub(crate) fn len(&self) -> usize {
        self.ends.len()
    }

    pub(crate) fn resolve(&self, s: Sym) -> &str {
        let i = s.0 as usize;
        let Some(&end) = self.ends.get(i) else {
            return "";
        };
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        self.arena.get(start as usize..end as usize).unwrap_or("")
    }

    pub(crate) fn get(&self, s: &str) -> Option<Sym> {
        if self.slots.is_empty() {
            return None;
        }
        let mask = self.slots.len() - 1;
        let mut i = hash_bytes(s.as_bytes()) as usize & mask;
        loop {
            let v = self.slots[i];
            if v == EMPTY {
                return None;
            }
            if self.resolve(Sym(v)) == s {
                return Some(Sym(v));
            }
            i = (i + 1) & mask;
        }
    }

    /// Interns `s`; `None` when the arena would exceed 4 GiB or 2^32-1 names.
    pub(crate) fn intern(&mut self, s: &str) -> Option<Sym> {
        if let Some(sym) = self.get(s) {
            return Some(sym);
        }
        if self.arena.len() + s.len() >= u32::MAX as usize
            || self.ends.len() >= (u32::MAX - 1) as usize
        {
            return None;
        }
        if (self.ends.len() + 1) * 2 > self.slots.len() {
            self.grow();
        }
        self.arena.push_str(s);
        self.ends.push(self.arena.len() as u32);
        let id = (self.ends.len() - 1) as u32;
        self.place(id, hash_bytes(s.as_bytes()));
        Some(Sym(id))
    }

    fn place(&mut self, id: u32, h: u64) {
        let mask = self.slots.len() - 1;
        let mut i = h as usize & mask;
        while self.slots[i] != EMPTY {
            i = (i + 1) & mask;
        }
        self.slots[i] = id;
    }

    fn grow(&mut self) {
        let n = (self.slots.len() * 2).max(64);
        self.slots = vec![EMPTY; n];
        for id in 0..self.ends.len() as u32 {
            let h = hash_bytes(self.resolve(Sym(id)).as_bytes());
            self.place(id, h);
        }
    }

    pub(crate) fn reserve(&mut self, names: usize, bytes: usize) {
        self.arena.reserve(bytes);
        self.ends.reserve(names);
        let want = ((self.ends.len() + names) * 2).next_power_of_two();
        if want > self.slots.len() {
            self.slots = vec![EMPTY; want];
            for id in 0..self.ends.len() as u32 {
                let h = hash_bytes(self.resolve(Sym(id)).as_bytes());
                self.place(id, h);
            }
        }
    }

    pub(crate) fn heap_bytes(&self) -> usize {
        self.arena.capacity() + self.ends.capacity() * 4 + self.slots.capacity() * 4
    }
}

/// Open-addressing index from a `(namespace, name)` pair to a node index; the pair is read
/// back through a caller-supplied accessor, so the table holds only node indices.
#[derive(Debug, Clone, Default)]
pub(crate) struct KeyIndex {
    slots: Vec<u32>,
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
            let v = self.slots[i];
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
        while self.slots[i] != EMPTY {
            i = (i + 1) & mask;
        }
        self.slots[i] = node;
    }

    fn resize(&mut self, n: usize, key_of: &impl Fn(u32) -> (Sym, Sym)) {
        let old = std::mem::replace(&mut self.slots, vec![EMPTY; n]);
        for v in old.into_iter().filter(|&v| v != EMPTY) {
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
        self.slots.capacity() * 4
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
            if self.slots[i] == old {
                self.slots[i] = new;
                return;
            }
            if self.slots[i] == EMPTY {
                return;
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
}
