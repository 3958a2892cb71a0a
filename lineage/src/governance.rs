//! Governance: tag propagation along lineage with per-edge-kind rules and masking blocks,
//! and policy checks (Rust predicates over the graph) with built-in policies.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde::Serialize;

use crate::graph::LineageGraph;
use crate::schema::{EdgeKind, NodeKind, Status};
use crate::traverse::Walk;
use crate::typed::AnyNodeId;

/// How a tag travels along one edge kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum Propagation {
    /// Along the data flow, to consumers.
    Forward,
    /// Against the data flow, to sources.
    Backward,
    /// Not at all.
    None,
}

/// The propagation rule for one tag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TagRule {
    tag: String,
    default: Propagation,
    per_edge: Vec<(EdgeKind, Propagation)>,
    blocked_by_masking: bool,
    blocking_subtypes: Vec<String>,
}

impl TagRule {
    /// A rule for `tag` that propagates `default` along every edge kind.
    pub fn new(tag: impl Into<String>, default: Propagation) -> Self {
        Self {
            tag: tag.into(),
            default,
            per_edge: Vec::new(),
            blocked_by_masking: false,
            blocking_subtypes: Vec::new(),
        }
    }

    /// Overrides the propagation for one edge kind.
    pub fn on(mut self, edge: EdgeKind, p: Propagation) -> Self {
        self.per_edge.retain(|(e, _)| *e != edge);
        self.per_edge.push((edge, p));
        self
    }

    /// Stops propagation across masking transformations.
    pub fn blocked_by_masking(mut self) -> Self {
        self.blocked_by_masking = true;
        self
    }

    /// Stops propagation across transformations of this subtype (such as `AGGREGATION`).
    pub fn blocked_by_subtype(mut self, subtype: &str) -> Self {
        self.blocking_subtypes.push(subtype.to_ascii_uppercase());
        self
    }

    /// The tag.
    pub fn tag(&self) -> &str {
        &self.tag
    }

    fn along(&self, e: EdgeKind) -> Propagation {
        self.per_edge
            .iter()
            .find(|(k, _)| *k == e)
            .map_or(self.default, |(_, p)| *p)
    }
}

/// A set of tag rules.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TagRules {
    rules: Vec<TagRule>,
}

impl TagRules {
    /// No rules: nothing propagates.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a rule.
    pub fn rule(mut self, r: TagRule) -> Self {
        self.rules.push(r);
        self
    }

    /// The default `pii` rule: forward along every edge kind except `has-field` (a
    /// table is not all-PII because one column is), blocked by masking transformations.
    pub fn pii() -> Self {
        Self::new().rule(
            TagRule::new("pii", Propagation::Forward)
                .on(EdgeKind::HasField, Propagation::None)
                .blocked_by_masking(),
        )
    }
}

/// Tags computed by propagation: for each node, each tag it carries and where it came from.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PropagatedTags {
    by_node: BTreeMap<AnyNodeId, BTreeMap<String, AnyNodeId>>,
}

impl PropagatedTags {
    /// Tags on `id`, direct or propagated, sorted.
    pub fn tags(&self, id: impl Into<AnyNodeId>) -> Vec<&str> {
        self.by_node
            .get(&id.into())
            .map(|m| m.keys().map(String::as_str).collect())
            .unwrap_or_default()
    }

    /// Whether `id` carries `tag`.
    pub fn has(&self, id: impl Into<AnyNodeId>, tag: &str) -> bool {
        self.by_node
            .get(&id.into())
            .is_some_and(|m| m.contains_key(tag))
    }

    /// The node that `id`'s `tag` was propagated from (itself for a direct tag).
    pub fn source(&self, id: impl Into<AnyNodeId>, tag: &str) -> Option<AnyNodeId> {
        self.by_node.get(&id.into())?.get(tag).copied()
    }

    /// Nodes that carry `tag`.
    pub fn nodes_with(&self, tag: &str) -> Vec<AnyNodeId> {
        self.by_node
            .iter()
            .filter(|(_, m)| m.contains_key(tag))
            .map(|(n, _)| *n)
            .collect()
    }
}

impl LineageGraph {
    /// Computes tags along lineage per `rules`, over the latest graph. Tags set directly on
    /// nodes are included; nothing is written back.
    pub fn propagate_tags(&self, rules: &TagRules) -> PropagatedTags {
        let mut out = PropagatedTags::default();
        for rule in &rules.rules {
            let Some(sym) = self.names.get(&rule.tag) else {
                continue;
            };
            let mut queue = VecDeque::new();
            for i in self.all_node_indices() {
                if self.is_live_node(i) && self.has_tag(i, sym) {
                    out.by_node
                        .entry(AnyNodeId(i))
                        .or_default()
                        .insert(rule.tag.clone(), AnyNodeId(i));
                    queue.push_back((i, i));
                }
            }
            while let Some((n, src)) = queue.pop_front() {
                let fwd = self.live_edges_out(n).map(|e| (e, Propagation::Forward));
                let back = self.live_edges_in(n).map(|e| (e, Propagation::Backward));
                let next: Vec<u32> = fwd
                    .chain(back)
                    .filter(|((e, _, k), dir)| {
                        rule.along(*k) == *dir
                            && !self.transformation(*e).is_some_and(|t| {
                                (rule.blocked_by_masking && t.is_masking())
                                    || t.subtype().is_some_and(|s| {
                                        s.split(',')
                                            .any(|s| rule.blocking_subtypes.iter().any(|b| b == s))
                                    })
                            })
                    })
                    .map(|((_, m, _), _)| m)
                    .collect();
                for m in next {
                    let e = out.by_node.entry(AnyNodeId(m)).or_default();
                    if !e.contains_key(&rule.tag) {
                        e.insert(rule.tag.clone(), AnyNodeId(src));
                        queue.push_back((m, src));
                    }
                }
            }
        }
        out
    }

    /// Runs policies and returns every violation, in policy order.
    pub fn check(&self, policies: &[&dyn Policy]) -> Vec<Violation> {
        policies.iter().flat_map(|p| p.check(self)).collect()
    }
}

/// A policy violation: the offending node and the path that shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Violation {
    /// The policy's name.
    pub policy: String,
    /// Key of the offending node.
    pub node: String,
    /// What is wrong.
    pub message: String,
    /// Keys along the offending path (empty if the violation is about one node).
    pub path: Vec<String>,
}

/// A check over the graph. Implementations must be deterministic: the same graph gives the
/// same violations in the same order.
pub trait Policy: Send + Sync {
    /// A short name used in violations.
    fn name(&self) -> &str;
    /// Returns every violation in `graph`.
    fn check(&self, graph: &LineageGraph) -> Vec<Violation>;
}

/// A policy made from a closure.
pub struct FnPolicy<F> {
    name: String,
    f: F,
}

impl<F: Fn(&LineageGraph) -> Vec<Violation> + Send + Sync> FnPolicy<F> {
    /// Wraps `f` as a policy called `name`.
    pub fn new(name: impl Into<String>, f: F) -> Self {
        Self {
            name: name.into(),
            f,
        }
    }
}

impl<F: Fn(&LineageGraph) -> Vec<Violation> + Send + Sync> Policy for FnPolicy<F> {
    fn name(&self) -> &str {
        &self.name
    }
    fn check(&self, graph: &LineageGraph) -> Vec<Violation> {
        (self.f)(graph)
    }
}

/// Built-in: no active service depends (transitively) on a deprecated or retired asset.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoDeprecatedUpstream;

impl Policy for NoDeprecatedUpstream {
    fn name(&self) -> &str {
        "no-deprecated-upstream"
    }
    fn check(&self, g: &LineageGraph) -> Vec<Violation> {
        let mut v = Vec::new();
        for i in g.all_node_indices() {
            if !g.is_live_node(i)
                || g.kind(AnyNodeId(i)).ok() != Some(NodeKind::Service)
                || g.status_of(i) != Status::Active
            {
                continue;
            }
            let Ok(w) = g.walk(AnyNodeId(i), &Walk::upstream().report_cycles(false)) else {
                continue;
            };
            for r in &w.nodes {
                let st = g.status_of(r.id.0);
                if st != Status::Active {
                    let path: Vec<String> = w
                        .path_to(r.id)
                        .unwrap_or_default()
                        .into_iter()
                        .map(|p| g.key_string(p.0))
                        .collect();
                    v.push(Violation {
                        policy: self.name().to_owned(),
                        node: g.key_string(i),
                        message: format!(
                            "active service depends on {} asset {}",
                            format!("{st:?}").to_lowercase(),
                            g.key_string(r.id.0)
                        ),
                        path,
                    });
                }
            }
        }
        v
    }
}

/// Built-in: every model version a live service serves has an evaluation.
#[derive(Debug, Clone, Copy, Default)]
pub struct ServedModelsEvaluated;

impl Policy for ServedModelsEvaluated {
    fn name(&self) -> &str {
        "served-models-evaluated"
    }
    fn check(&self, g: &LineageGraph) -> Vec<Violation> {
        let mut v = Vec::new();
        for i in g.all_node_indices() {
            if !g.is_live_node(i) || g.kind(AnyNodeId(i)).ok() != Some(NodeKind::Service) {
                continue;
            }
            for (_, mv, k) in g.live_edges_in(i) {
                if k != EdgeKind::Serves {
                    continue;
                }
                let evaluated = g
                    .live_edges_out(mv)
                    .any(|(_, e, k)| k == EdgeKind::Evaluates && g.is_live_node(e));
                if !evaluated {
                    v.push(Violation {
                        policy: self.name().to_owned(),
                        node: g.key_string(mv),
                        message: format!("served by {} but has no evaluation", g.key_string(i)),
                        path: vec![g.key_string(i), g.key_string(mv)],
                    });
                }
            }
        }
        v
    }
}

/// Built-in: every node carrying `pii` (directly or by propagation under the given rules)
/// has an owner.
#[derive(Debug, Clone, Default)]
pub struct PiiHasOwner {
    rules: TagRules,
}

impl PiiHasOwner {
    /// Uses [`TagRules::pii`] to find PII.
    pub fn new() -> Self {
        Self {
            rules: TagRules::pii(),
        }
    }

    /// Uses custom rules to find PII.
    pub fn with_rules(rules: TagRules) -> Self {
        Self { rules }
    }
}

impl Policy for PiiHasOwner {
    fn name(&self) -> &str {
        "pii-has-owner"
    }
    fn check(&self, g: &LineageGraph) -> Vec<Violation> {
        let tags = self.rules.propagate_or_direct(g);
        let mut seen = BTreeSet::new();
        let mut v = Vec::new();
        for n in tags.nodes_with("pii") {
            if g.owner_of(n.0).is_none() && seen.insert(n) {
                let src = tags.source(n, "pii").unwrap_or(n);
                v.push(Violation {
                    policy: self.name().to_owned(),
                    node: g.key_string(n.0),
                    message: "carries pii but has no owner".to_owned(),
                    path: if src == n {
                        Vec::new()
                    } else {
                        vec![g.key_string(src.0), g.key_string(n.0)]
                    },
                });
            }
        }
        v
    }
}

impl TagRules {
    fn propagate_or_direct(&self, g: &LineageGraph) -> PropagatedTags {
        let rules = if self.rules.iter().any(|r| r.tag == "pii") {
            self.clone()
        } else {
            self.clone().rule(TagRule::new("pii", Propagation::None))
        };
        g.propagate_tags(&rules)
    }
}
