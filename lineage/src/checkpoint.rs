//! Checkpoints: the graph's tables written out as they are, so a store reopens by loading
//! them and replaying only the commits made after, instead of the whole log.
//!
//! Layout: magic, version, body length, body, checksum of the body. The body starts with the
//! number of commits it covers and a fingerprint of the last of them as logged, so a
//! checkpoint is used only with the log it was taken from.

use std::collections::HashMap;
use std::sync::Arc;

use crate::codec::{R, Reader, put_len, put_str};
use crate::cow::{ChunkMap, ChunkVec};
use crate::graph::{LineageGraph, Meta, MetaUpdate, NodeExtra, OPEN, TagSets};
use crate::intern::{KeyIndex, Sym, mix};
use crate::schema::{Schema, Transformation};
use crate::time::Timestamp;

const MAGIC: &[u8; 8] = b"KEELCKPT";
const VERSION: u8 = 1;

/// A 64-bit checksum over 8-byte words (a final partial word is zero-padded).
pub(crate) fn checksum(b: &[u8]) -> u64 {
    let mut h: u64 = 0x9e37_79b9_7f4a_7c15 ^ b.len() as u64;
    for c in b.chunks(8) {
        let mut w = [0u8; 8];
        w[..c.len()].copy_from_slice(c);
        h = mix(h ^ u64::from_le_bytes(w)).rotate_left(17);
    }
    mix(h)
}

fn put_u32(w: &mut Vec<u8>, x: u32) {
    w.extend_from_slice(&x.to_le_bytes());
}

fn put_u64(w: &mut Vec<u8>, x: u64) {
    w.extend_from_slice(&x.to_le_bytes());
}

fn put_json<T: serde::Serialize>(w: &mut Vec<u8>, v: &T) {
    // Serialising plain data into memory cannot fail; an empty list reads back as empty.
    put_str(
        w,
        &serde_json::to_string(v).unwrap_or_else(|_| "[]".to_owned()),
    );
}

fn put_meta(w: &mut Vec<u8>, m: &Meta) {
    for x in [m.owner.0, m.tags, m.extra] {
        put_u32(w, x);
    }
    w.extend_from_slice(&[m.status, m.flags]);
}

fn meta(r: &mut Reader<'_>) -> R<Meta> {
    Ok(Meta {
        owner: Sym(r.u32()?),
        tags: r.u32()?,
        extra: r.u32()?,
        status: r.u8()?,
        flags: r.u8()?,
    })
}

/// Serialises `g`, which covers `commits` commits whose last log entry has `fingerprint`.
pub(crate) fn encode(g: &LineageGraph, fingerprint: u64) -> Vec<u8> {
    let mut b = Vec::with_capacity(64 << 20);
    put_u64(&mut b, g.commit_times.len() as u64);
    put_u64(&mut b, fingerprint);
    put_json(&mut b, &*g.schema);
    put_len(&mut b, g.names.len());
    for i in 0..g.names.len() as u32 {
        put_str(&mut b, g.names.resolve(Sym(i)));
    }
    g.g.encode(&mut b);
    put_len(&mut b, g.tagsets.sets.len());
    for set in &g.tagsets.sets {
        put_len(&mut b, set.len());
        for s in set.iter() {
            put_u32(&mut b, s.0);
        }
    }
    let extras: Vec<&NodeExtra> = g.extras.iter().collect();
    put_json(&mut b, &extras);
    let transforms: Vec<(u32, &Transformation)> = g.transforms.iter().collect();
    put_json(&mut b, &transforms);
    for m in [&g.node_removed, &g.edge_removed] {
        put_len(&mut b, m.len());
        for (k, &c) in m.iter() {
            put_u32(&mut b, k);
            put_u32(&mut b, c);
        }
    }
    put_len(&mut b, g.commit_times.len());
    for t in g.commit_times.iter() {
        put_u64(&mut b, t.as_millis() as u64);
    }
    put_len(&mut b, g.updates.len());
    for u in g.updates.iter() {
        put_u32(&mut b, u.commit);
        put_u32(&mut b, u.node);
        put_meta(&mut b, &u.before);
    }
    let mut out = Vec::with_capacity(b.len() + 32);
    out.extend_from_slice(MAGIC);
    out.push(VERSION);
    put_u64(&mut out, b.len() as u64);
    out.extend_from_slice(&b);
    put_u64(&mut out, checksum(&b));
    out
}

/// The number of commits a checkpoint covers and the fingerprint of the last, read without
/// decoding the tables; `Err` if the framing or checksum is wrong.
pub(crate) fn header(bytes: &[u8]) -> R<(u64, u64, &[u8])> {
    let mut r = Reader { b: bytes };
    if r.take(8)? != MAGIC {
        return Err("not a keel-lineage checkpoint".to_owned());
    }
    let v = r.u8()?;
    if v != VERSION {
        return Err(format!("unknown checkpoint version {v}"));
    }
    let n = usize::try_from(r.u64()?).map_err(|_| "body too long".to_owned())?;
    let body = r.take(n)?;
    if r.u64()? != checksum(body) {
        return Err("checksum mismatch".to_owned());
    }
    let mut h = Reader { b: body };
    Ok((h.u64()?, h.u64()?, body))
}

/// Rebuilds a graph (without an in-memory log) from a checkpoint body taken with `schema`.
pub(crate) fn decode(body: &[u8], schema: &Schema) -> R<LineageGraph> {
    let mut r = Reader { b: body };
    let commits = r.u64()?;
    let _fingerprint = r.u64()?;
    let stored: Schema = serde_json::from_str(&r.str()?).map_err(|e| e.to_string())?;
    if &stored != schema {
        return Err("taken with another schema".to_owned());
    }
    let mut g = LineageGraph::with_schema(stored).without_log();
    let names = r.len()?;
    if names > r.b.len() / 4 {
        return Err("name list longer than the checkpoint".to_owned());
    }
    g.names.reserve(names, 0);
    for i in 0..names as u32 {
        let s = r.str()?;
        if g.names.intern(&s) != Some(Sym(i)) {
            return Err(format!("name {i} is a duplicate"));
        }
    }
    g.g = crate::adj::Adjacency::decode(&mut r)?;
    let sets = r.len()?;
    if sets == 0 || sets > r.b.len() / 4 {
        return Err("bad tag set count".to_owned());
    }
    let mut t = TagSets {
        sets: Vec::with_capacity(sets),
        index: HashMap::with_capacity(sets),
    };
    for i in 0..sets as u32 {
        let k = r.len()?;
        if k > r.b.len() / 4 {
            return Err("tag set longer than the checkpoint".to_owned());
        }
        let set: Box<[Sym]> = (0..k)
            .map(|_| r.u32().map(Sym))
            .collect::<R<Vec<Sym>>>()?
            .into_boxed_slice();
        if set.iter().any(|s| s.0 as usize >= names) || (i == 0 && !set.is_empty()) {
            return Err(format!("tag set {i} is invalid"));
        }
        t.sets.push(set.clone());
        t.index.insert(set, i);
    }
    g.tagsets = Arc::new(t);
    let extras: Vec<NodeExtra> = serde_json::from_str(&r.str()?).map_err(|e| e.to_string())?;
    g.extras = ChunkVec::default();
    for x in extras {
        g.extras.push(x);
    }
    let transforms: Vec<(u32, Transformation)> =
        serde_json::from_str(&r.str()?).map_err(|e| e.to_string())?;
    g.transforms = ChunkMap::default();
    for (e, x) in transforms {
        g.transforms.insert(e, x);
    }
    let mut removed = [ChunkMap::default(), ChunkMap::default()];
    for m in &mut removed {
        let n = r.len()?;
        if n > r.b.len() / 8 {
            return Err("removal list longer than the checkpoint".to_owned());
        }
        for _ in 0..n {
            m.insert(r.u32()?, r.u32()?);
        }
    }
    let [node_removed, edge_removed] = removed;
    g.node_removed = node_removed;
    g.edge_removed = edge_removed;
    let n = r.len()?;
    if n as u64 != commits || n > r.b.len() / 8 {
        return Err("commit times do not match the commit count".to_owned());
    }
    for _ in 0..n {
        g.commit_times.push(Timestamp::from_millis(r.u64()? as i64));
    }
    let n = r.len()?;
    if n > r.b.len() / 22 {
        return Err("update list longer than the checkpoint".to_owned());
    }
    for _ in 0..n {
        let (commit, node) = (r.u32()?, r.u32()?);
        let before = meta(&mut r)?;
        g.updates.push(MetaUpdate {
            commit,
            node,
            before,
        });
    }
    if !r.b.is_empty() {
        return Err(format!("{} trailing bytes", r.b.len()));
    }
    check_rows(&g, names)?;
    g.keys = KeyIndex::default();
    let nodes = g.g.node_count() as u32;
    g.keys
        .reserve(nodes as usize, |i| crate::graph::key_of(&g.g, i));
    for i in 0..nodes {
        let (ns, name) = crate::graph::key_of(&g.g, i);
        let adj = &g.g;
        // Later nodes with a key replace removed earlier ones, as when they were created.
        match g.keys.get(ns, name, |x| crate::graph::key_of(adj, x)) {
            Some(old) => g
                .keys
                .replace(ns, name, old, i, |x| crate::graph::key_of(adj, x)),
            None => g.keys.insert(ns, name, i, |x| crate::graph::key_of(adj, x)),
        }
    }
    Ok(g)
}

/// Every symbol, tag set, extra and commit a row names must exist.
fn check_rows(g: &LineageGraph, names: usize) -> R<()> {
    let commits = g.commit_times.len();
    let sym_ok = |s: Sym, opt: bool| (opt && s.is_none()) || (s.0 as usize) < names;
    let meta_ok = |m: &Meta| {
        sym_ok(m.owner, true)
            && (m.tags as usize) < g.tagsets.sets.len()
            && (m.extra == OPEN || (m.extra as usize) < g.extras.len())
    };
    for (i, r) in g.g.node_rows().enumerate() {
        let m = Meta {
            owner: r.owner,
            tags: r.tags,
            extra: r.extra,
            status: r.status,
            flags: r.flags,
        };
        if !sym_ok(r.ns, false) || !sym_ok(r.name, false) || !meta_ok(&m) {
            return Err(format!("node {i} names a missing symbol, tag set or extra"));
        }
        if r.created as usize >= commits {
            return Err(format!("node {i} was created by a missing commit"));
        }
    }
    let (nodes, edges) = (g.g.node_count(), g.g.edge_count());
    let removal_ok = |m: &ChunkMap<u32>, n: usize| {
        m.iter()
            .all(|(k, &c)| (k as usize) < n && (c as usize) < commits)
    };
    if !removal_ok(&g.node_removed, nodes)
        || !removal_ok(&g.edge_removed, edges)
        || g.transforms.iter().any(|(e, _)| e as usize >= edges)
    {
        return Err("a removal or transformation names a missing node, edge or commit".to_owned());
    }
    if g.updates.iter().any(|u| {
        !meta_ok(&u.before) || u.commit as usize >= commits || u.node as usize >= g.g.node_count()
    }) {
        return Err("a metadata update names a missing node, commit or value".to_owned());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::change::{Change, NodeKey, NodeSpec};
    use crate::graph::At;
    use crate::schema::{EdgeKind, NodeKind, TransformKind};

    fn key(n: u8) -> NodeKey {
        NodeKey::new(format!("ns{}", n % 3), format!("n{n}"))
    }

    fn change(op: (u8, u8, u8)) -> Change {
        let (what, a, b) = op;
        let field = |n: u8| NodeKey::field(key(n).namespace(), key(n).name(), "f");
        match what % 7 {
            0 => Change::Upsert(
                NodeSpec::with_key(NodeKind::Dataset, key(a))
                    .owner(format!("o{b}"))
                    .property("p", serde_json::json!(b))
                    .field(crate::change::FieldSpec::new("f", None)),
            ),
            1 => Change::link(key(a), EdgeKind::DerivedFrom, key(b)),
            6 => Change::Link {
                from: field(a),
                edge: EdgeKind::DerivedFrom,
                to: field(b),
                transformation: Some(Transformation::new(TransformKind::Direct, Some("IDENTITY"))),
            },
            2 => Change::Unlink {
                from: key(a),
                edge: EdgeKind::DerivedFrom,
                to: key(b),
            },
            3 => Change::Remove { key: key(a) },
            4 => Change::Upsert(NodeSpec::with_key(NodeKind::Dataset, key(a)).tag(format!("t{b}"))),
            _ => Change::RemoveTag {
                key: key(a),
                tag: format!("t{b}"),
            },
        }
    }

    fn state(g: &LineageGraph) -> String {
        let mut s = serde_json::to_string(&g.to_subgraph(At::Cumulative)).unwrap_or_default();
        s += &serde_json::to_string(&g.diff(Timestamp::EPOCH, Timestamp::from_millis(1 << 40)))
            .unwrap_or_default();
        for t in 0..6 {
            s += &serde_json::to_string(&g.to_subgraph(At::Time(Timestamp::from_millis(t))))
                .unwrap_or_default();
        }
        s
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// A decoded checkpoint answers every query as the graph it was taken from, and
        /// keeps accepting commits the same way.
        #[test]
        fn round_trips(
            commits in proptest::collection::vec(
                proptest::collection::vec((0u8..7, 0u8..10, 0u8..10), 1..3), 1..16),
            more in proptest::collection::vec((0u8..7, 0u8..10, 0u8..10), 1..5),
        ) {
            let mut g = LineageGraph::new().without_log();
            // Every key exists at first, so most random commits apply.
            g.commit_at(Timestamp::EPOCH, (0..10).map(|n| change((0, n, n))).collect())
                .unwrap();
            for (t, ops) in commits.iter().enumerate() {
                let _ = g.commit_at(
                    Timestamp::from_millis(t as i64),
                    ops.iter().copied().map(change).collect(),
                );
            }
            let bytes = encode(&g, 7);
            let (n, fp, body) = header(&bytes).unwrap();
            prop_assert_eq!((n, fp), (g.commit_count(), 7));
            let mut back = decode(body, g.schema()).unwrap();
            prop_assert_eq!(state(&back), state(&g));
            let more: Vec<Change> = more.into_iter().map(change).collect();
            let t = Timestamp::from_millis(5);
            prop_assert_eq!(
                back.commit_at(t, more.clone()).ok(),
                g.commit_at(t, more).ok()
            );
            prop_assert_eq!(state(&back), state(&g));
        }
    }

    #[test]
    fn every_truncation_is_an_error() {
        let mut g = LineageGraph::new();
        g.commit(vec![
            change((0, 1, 2)),
            change((0, 2, 3)),
            change((1, 1, 2)),
            change((6, 1, 2)),
            change((3, 2, 0)),
        ])
        .unwrap();
        let bytes = encode(&g, 0);
        for n in 0..bytes.len() {
            assert!(header(&bytes[..n]).is_err(), "prefix of {n} bytes");
        }
        let (_, _, body) = header(&bytes).unwrap();
        for n in 0..body.len() {
            assert!(
                decode(&body[..n], g.schema()).is_err(),
                "body prefix of {n} bytes"
            );
        }
    }
}
