//! Discovery: search by name, kind, tag, owner and status; orphans and roots.

use crate::graph::{LineageGraph, NodeInfo};
use crate::schema::{NodeKind, Status};
use crate::typed::AnyNodeId;

/// A search over live nodes; every criterion that is set must match.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Search {
    text: Option<String>,
    kind: Option<NodeKind>,
    tag: Option<String>,
    owner: Option<String>,
    status: Option<Status>,
    limit: Option<usize>,
}

impl Search {
    /// Matches everything.
    pub fn new() -> Self {
        Self::default()
    }

    /// Key contains `text` (case-insensitive).
    pub fn text(mut self, text: impl Into<String>) -> Self {
        self.text = Some(text.into().to_lowercase());
        self
    }

    /// Kind is `kind`.
    pub fn kind(mut self, kind: NodeKind) -> Self {
        self.kind = Some(kind);
        self
    }

    /// Carries tag `tag` directly.
    pub fn tag(mut self, tag: impl Into<String>) -> Self {
        self.tag = Some(tag.into());
        self
    }

    /// Owned by `owner`.
    pub fn owner(mut self, owner: impl Into<String>) -> Self {
        self.owner = Some(owner.into());
        self
    }

    /// Has status `status`.
    pub fn status(mut self, status: Status) -> Self {
        self.status = Some(status);
        self
    }

    /// Returns at most `n` results.
    pub fn limit(mut self, n: usize) -> Self {
        self.limit = Some(n);
        self
    }
}

impl LineageGraph {
    /// Live nodes matching `q`, by key.
    pub fn search(&self, q: &Search) -> Vec<NodeInfo> {
        let tag = match &q.tag {
            Some(t) => match self.names.get(t) {
                Some(s) => Some(s),
                None => return Vec::new(),
            },
            None => None,
        };
        let mut out: Vec<NodeInfo> = Vec::new();
        for i in self.all_node_indices() {
            if !self.is_live_node(i) {
                continue;
            }
            let id = AnyNodeId(i);
            if q.kind.is_some_and(|k| self.kind(id).ok() != Some(k))
                || q.status.is_some_and(|s| self.status_of(i) != s)
                || tag.is_some_and(|t| !self.has_tag(i, t))
                || q.owner
                    .as_deref()
                    .is_some_and(|o| self.owner_of(i) != Some(o))
            {
                continue;
            }
            if let Some(t) = &q.text
                && !self.key_string(i).to_lowercase().contains(t.as_str())
            {
                continue;
            }
            out.extend(self.info(id).ok());
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        if let Some(n) = q.limit {
            out.truncate(n);
        }
        out
    }

    /// Assets nothing uses: live nodes with no downstream edge (a table's own columns count
    /// only if something consumes them), excluding services (consumers by design), fields,
    /// runs and evaluations.
    pub fn orphans(&self) -> Vec<NodeInfo> {
        self.ends(
            |g, i| g.live_edges_out(i).next().is_none(),
            &[
                NodeKind::Service,
                NodeKind::Field,
                NodeKind::Run,
                NodeKind::Evaluation,
            ],
        )
    }

    /// Sources: live nodes with no upstream edge, whose columns have no upstream edge
    /// either (fields themselves excluded).
    pub fn roots(&self) -> Vec<NodeInfo> {
        // A table whose columns are derived from something is not a source.
        let fed = |g: &Self, i: u32| {
            g.live_edges_in(i).next().is_some()
                || g.live_edges_out(i).any(|(_, f, k)| {
                    k == crate::schema::EdgeKind::HasField
                        && g.live_edges_in(f)
                            .any(|(_, _, k)| k != crate::schema::EdgeKind::HasField)
                })
        };
        self.ends(|g, i| !fed(g, i), &[NodeKind::Field])
    }

    fn ends(&self, pred: impl Fn(&Self, u32) -> bool, skip: &[NodeKind]) -> Vec<NodeInfo> {
        let mut out: Vec<NodeInfo> = self
            .all_node_indices()
            .filter(|&i| self.is_live_node(i))
            .filter(|&i| self.kind(AnyNodeId(i)).is_ok_and(|k| !skip.contains(&k)))
            .filter(|&i| pred(self, i))
            .filter_map(|i| self.info(AnyNodeId(i)).ok())
            .collect();
        out.sort_by(|a, b| a.key.cmp(&b.key));
        out
    }
}
