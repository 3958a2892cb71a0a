//! Node and edge tables with linked adjacency lists, on chunked copy-on-write storage.
//!
//! The layout is petgraph's `Graph` (each node heads an outgoing and an incoming list, each
//! edge links to the next edge of both lists), but the tables are [`ChunkVec`]s, so a
//! snapshot and the writer's next version share every chunk a commit did not write.

use crate::codec::{R, Reader, put_len};
use crate::cow::ChunkVec;
use crate::graph::{EdgeRow, NodeRow};
use crate::intern::Sym;
use crate::schema::{EdgeKind, NodeKind};

/// End of an adjacency list.
const END: u32 = u32::MAX;

/// Which list of a node: edges leaving it or edges entering it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dir {
    Out = 0,
    In = 1,
}

#[derive(Debug, Clone)]
struct NodeSlot {
    row: NodeRow,
    first: [u32; 2],
}

#[derive(Debug, Clone)]
struct EdgeSlot {
    row: EdgeRow,
    ends: [u32; 2],
    next: [u32; 2],
}

/// The node and edge tables of a graph; indices are dense and never reused.
#[derive(Debug, Clone, Default)]
pub(crate) struct Adjacency {
    nodes: ChunkVec<NodeSlot>,
    edges: ChunkVec<EdgeSlot>,
}

impl Adjacency {
    pub(crate) fn node_count(&self) -> usize {
        self.nodes.len()
    }

    pub(crate) fn edge_count(&self) -> usize {
        self.edges.len()
    }

    #[inline]
    pub(crate) fn node(&self, i: u32) -> Option<&NodeRow> {
        self.nodes.get(i as usize).map(|n| &n.row)
    }

    pub(crate) fn node_mut(&mut self, i: u32) -> Option<&mut NodeRow> {
        self.nodes.get_mut(i as usize).map(|n| &mut n.row)
    }

    #[inline]
    pub(crate) fn edge(&self, e: u32) -> Option<&EdgeRow> {
        self.edges.get(e as usize).map(|x| &x.row)
    }

    /// `(source, target)` in data-flow storage order.
    pub(crate) fn endpoints(&self, e: u32) -> Option<(u32, u32)> {
        self.edges.get(e as usize).map(|x| (x.ends[0], x.ends[1]))
    }

    pub(crate) fn add_node(&mut self, row: NodeRow) -> u32 {
        self.nodes.push(NodeSlot {
            row,
            first: [END; 2],
        }) as u32
    }

    /// Adds an edge; both endpoints must exist (the caller resolved them from keys).
    pub(crate) fn add_edge(&mut self, src: u32, dst: u32, row: EdgeRow) -> u32 {
        let e = self.edges.len() as u32;
        let next_out = self.nodes.get(src as usize).map_or(END, |n| n.first[0]);
        let next_in = self.nodes.get(dst as usize).map_or(END, |n| n.first[1]);
        self.edges.push(EdgeSlot {
            row,
            ends: [src, dst],
            next: [next_out, next_in],
        });
        if let Some(n) = self.nodes.get_mut(src as usize) {
            n.first[0] = e;
        }
        if let Some(n) = self.nodes.get_mut(dst as usize) {
            n.first[1] = e;
        }
        e
    }

    /// Edges of one list of node `i`, newest first, as (edge, other end, row).
    pub(crate) fn edges_of(&self, i: u32, dir: Dir) -> Edges<'_> {
        Edges {
            adj: self,
            next: self
                .nodes
                .get(i as usize)
                .map_or(END, |n| n.first[dir as usize]),
            dir,
        }
    }

    /// Edges stored from `src` to `dst`, newest first. Walks `src`'s outgoing list and
    /// `dst`'s incoming list in step and stops when either ends: every such edge is on both
    /// lists, so the shorter one alone holds them all, and a hub's long list costs no more
    /// than its partner's short one.
    pub(crate) fn edges_connecting(&self, src: u32, dst: u32) -> Vec<u32> {
        let mut out = self.edges_of(src, Dir::Out);
        let mut inc = self.edges_of(dst, Dir::In);
        let (mut from_out, mut from_in) = (Vec::new(), Vec::new());
        loop {
            match out.next() {
                None => return from_out,
                Some((e, t, _)) if t == dst => from_out.push(e),
                Some(_) => {}
            }
            match inc.next() {
                None => return from_in,
                Some((e, s, _)) if s == src => from_in.push(e),
                Some(_) => {}
            }
        }
    }

    pub(crate) fn node_rows(&self) -> impl Iterator<Item = &NodeRow> + '_ {
        self.nodes.iter().map(|n| &n.row)
    }

    /// Every edge in index order, as (source, target, row).
    pub(crate) fn edge_rows(&self) -> impl Iterator<Item = (u32, u32, &EdgeRow)> + '_ {
        self.edges.iter().map(|x| (x.ends[0], x.ends[1], &x.row))
    }

    pub(crate) fn reserve(&mut self, nodes: usize, edges: usize) {
        self.nodes.reserve(nodes);
        self.edges.reserve(edges);
    }

    pub(crate) fn heap_bytes(&self) -> usize {
        self.nodes.heap_bytes() + self.edges.heap_bytes()
    }

    /// Appends both tables, links included, to a checkpoint.
    pub(crate) fn encode(&self, w: &mut Vec<u8>) {
        put_len(w, self.nodes.len());
        for n in self.nodes.iter() {
            let r = &n.row;
            for x in [r.ns.0, r.name.0, r.owner.0, r.tags, r.created, r.extra] {
                w.extend_from_slice(&x.to_le_bytes());
            }
            w.extend_from_slice(&[r.kind.code(), r.status, r.flags]);
            for x in n.first {
                w.extend_from_slice(&x.to_le_bytes());
            }
        }
        put_len(w, self.edges.len());
        for x in self.edges.iter() {
            w.extend_from_slice(&x.row.created.to_le_bytes());
            w.push(x.row.kind.code());
            for v in x.ends.iter().chain(&x.next) {
                w.extend_from_slice(&v.to_le_bytes());
            }
        }
    }

    /// Reads tables written by [`Self::encode`]. Every link must point inside the tables,
    /// and an edge's next links at an older edge, so no list can loop.
    pub(crate) fn decode(r: &mut Reader<'_>) -> R<Adjacency> {
        let mut a = Adjacency::default();
        let n = r.len()?;
        if n > r.b.len() / 35 {
            return Err("node table longer than the checkpoint".to_owned());
        }
        for _ in 0..n {
            let mut v = [0u32; 6];
            for x in &mut v {
                *x = r.u32()?;
            }
            let (kc, status, flags) = (r.u8()?, r.u8()?, r.u8()?);
            let kind = NodeKind::from_code(kc).ok_or_else(|| format!("bad node kind {kc}"))?;
            let first = [r.u32()?, r.u32()?];
            a.nodes.push(NodeSlot {
                row: NodeRow {
                    ns: Sym(v[0]),
                    name: Sym(v[1]),
                    owner: Sym(v[2]),
                    tags: v[3],
                    created: v[4],
                    extra: v[5],
                    kind,
                    status,
                    flags,
                },
                first,
            });
        }
        let m = r.len()?;
        if m > r.b.len() / 21 {
            return Err("edge table longer than the checkpoint".to_owned());
        }
        for e in 0..m as u32 {
            let created = r.u32()?;
            let kc = r.u8()?;
            let kind = EdgeKind::from_code(kc).ok_or_else(|| format!("bad edge kind {kc}"))?;
            let ends = [r.u32()?, r.u32()?];
            let next = [r.u32()?, r.u32()?];
            if ends.iter().any(|&x| x as usize >= n) || next.iter().any(|&x| x != END && x >= e) {
                return Err(format!("edge {e} links outside the tables"));
            }
            a.edges.push(EdgeSlot {
                row: EdgeRow { created, kind },
                ends,
                next,
            });
        }
        if a.nodes
            .iter()
            .any(|s| s.first.iter().any(|&x| x != END && x as usize >= m))
        {
            return Err("a node links outside the edge table".to_owned());
        }
        Ok(a)
    }
}

/// An adjacency list walk, from [`Adjacency::edges_of`].
#[derive(Clone)]
pub(crate) struct Edges<'a> {
    adj: &'a Adjacency,
    next: u32,
    dir: Dir,
}

impl<'a> Iterator for Edges<'a> {
    type Item = (u32, u32, &'a EdgeRow);

    fn next(&mut self) -> Option<Self::Item> {
        let e = self.next;
        let x = self.adj.edges.get(e as usize)?;
        self.next = x.next[self.dir as usize];
        let other = match self.dir {
            Dir::Out => x.ends[1],
            Dir::In => x.ends[0],
        };
        Some((e, other, &x.row))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node() -> NodeRow {
        NodeRow {
            ns: Sym(0),
            name: Sym(0),
            owner: Sym::NONE,
            tags: 0,
            created: 0,
            extra: u32::MAX,
            kind: NodeKind::Dataset,
            status: 0,
            flags: 0,
        }
    }

    fn edge() -> EdgeRow {
        EdgeRow {
            created: 0,
            kind: EdgeKind::DerivedFrom,
        }
    }

    #[test]
    fn edges_connecting_finds_every_parallel_edge_from_either_side() {
        let mut a = Adjacency::default();
        let (hub, leaf, other) = (a.add_node(node()), a.add_node(node()), a.add_node(node()));
        let first = a.add_edge(hub, leaf, edge());
        for _ in 0..50 {
            a.add_edge(hub, other, edge());
            a.add_edge(other, leaf, edge());
        }
        let second = a.add_edge(hub, leaf, edge());
        a.add_edge(leaf, hub, edge());
        assert_eq!(a.edges_connecting(hub, leaf), vec![second, first]);
        assert_eq!(a.edges_connecting(leaf, hub).len(), 1);
        assert_eq!(a.edges_connecting(other, hub), Vec::<u32>::new());
        assert_eq!(a.edges_connecting(hub, other).len(), 50);
        assert_eq!(a.edges_of(hub, Dir::Out).count(), 52);
        assert_eq!(a.edges_of(leaf, Dir::In).count(), 52);
    }
}
