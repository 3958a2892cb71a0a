//! The immutable compressed-sparse-row adjacency used by every closure query.
//!
//! Built once per commit (lazily) from the node and edge tables; walking two flat arrays is
//! an order of magnitude faster than chasing linked edge lists for large closures.

use crate::graph::{At, LineageGraph};

/// Node kind code used for nodes not visible in the view.
pub(crate) const HIDDEN: u8 = u8::MAX;

#[derive(Debug)]
pub(crate) struct Csr {
    pub(crate) node_kind: Vec<u8>,
    pub(crate) fwd_off: Vec<u32>,
    pub(crate) fwd: Vec<u32>,
    pub(crate) fwd_kind: Vec<u8>,
    pub(crate) rev_off: Vec<u32>,
    pub(crate) rev: Vec<u32>,
    pub(crate) rev_kind: Vec<u8>,
}

impl Csr {
    pub(crate) fn build(g: &LineageGraph, at: At) -> Csr {
        let n = g.g.node_count();
        let h = g.horizon(at);
        let node_kind: Vec<u8> =
            g.g.node_rows()
                .enumerate()
                .map(|(i, r)| {
                    if g.node_visible(i as u32, at, h) {
                        r.kind.code()
                    } else {
                        HIDDEN
                    }
                })
                .collect();
        let mut out_deg = vec![0u32; n + 1];
        let mut in_deg = vec![0u32; n + 1];
        let visible = |e: usize| g.edge_visible(e as u32, at, h);
        for (e, (s, t, _)) in g.g.edge_rows().enumerate() {
            if visible(e) {
                out_deg[s as usize + 1] += 1;
                in_deg[t as usize + 1] += 1;
            }
        }
        for i in 0..n {
            out_deg[i + 1] += out_deg[i];
            in_deg[i + 1] += in_deg[i];
        }
        let m = out_deg[n] as usize;
        let mut fwd = vec![0u32; m];
        let mut fwd_kind = vec![0u8; m];
        let mut rev = vec![0u32; m];
        let mut rev_kind = vec![0u8; m];
        let mut fpos = out_deg.clone();
        let mut rpos = in_deg.clone();
        for (e, (s, t, row)) in g.g.edge_rows().enumerate() {
            if !visible(e) {
                continue;
            }
            let (s, t) = (s as usize, t as usize);
            let k = row.kind.code();
            let fp = fpos[s] as usize;
            fwd[fp] = t as u32;
            fwd_kind[fp] = k;
            fpos[s] += 1;
            let rp = rpos[t] as usize;
            rev[rp] = s as u32;
            rev_kind[rp] = k;
            rpos[t] += 1;
        }
        Csr {
            node_kind,
            fwd_off: out_deg,
            fwd,
            fwd_kind,
            rev_off: in_deg,
            rev,
            rev_kind,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.node_kind.len()
    }

    #[inline]
    pub(crate) fn out(&self, i: u32) -> (&[u32], &[u8]) {
        let (a, b) = (
            self.fwd_off[i as usize] as usize,
            self.fwd_off[i as usize + 1] as usize,
        );
        (&self.fwd[a..b], &self.fwd_kind[a..b])
    }

    #[inline]
    pub(crate) fn inc(&self, i: u32) -> (&[u32], &[u8]) {
        let (a, b) = (
            self.rev_off[i as usize] as usize,
            self.rev_off[i as usize + 1] as usize,
        );
        (&self.rev[a..b], &self.rev_kind[a..b])
    }

    pub(crate) fn heap_bytes(&self) -> usize {
        self.node_kind.capacity()
            + (self.fwd_off.capacity() + self.rev_off.capacity()) * 4
            + (self.fwd.capacity() + self.rev.capacity()) * 4
            + self.fwd_kind.capacity()
            + self.rev_kind.capacity()
    }
}
