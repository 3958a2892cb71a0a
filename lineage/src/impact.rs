//! Impact analysis: which assets a proposed change breaks or should inform, with paths,
//! owners, production services and a ranked severity summary.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::csr::{Csr, HIDDEN};
use crate::error::{Error, Result};
use crate::graph::LineageGraph;
use crate::nodes;
use crate::schema::{EdgeKind, NodeKind, Status};
use crate::typed::{AnyNodeId, NodeId};

/// A change whose consequences should be assessed before it ships.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProposedChange {
    /// Drop a column.
    DropField(NodeId<nodes::Field>),
    /// Rename a column.
    RenameField(NodeId<nodes::Field>, String),
    /// Change a column's type.
    RetypeField(NodeId<nodes::Field>, String),
    /// Mark an asset deprecated: consumers are informed.
    Deprecate(AnyNodeId),
    /// Retire an asset: everything that depends on it breaks.
    Retire(AnyNodeId),
    /// Make a service serve another model version.
    ReplaceModelVersion {
        /// The service.
        service: NodeId<nodes::Service>,
        /// The version it would serve.
        new_version: NodeId<nodes::ModelVersion>,
    },
}

impl ProposedChange {
    fn root(&self) -> AnyNodeId {
        match self {
            ProposedChange::DropField(f)
            | ProposedChange::RenameField(f, _)
            | ProposedChange::RetypeField(f, _) => f.erase(),
            ProposedChange::Deprecate(n) | ProposedChange::Retire(n) => *n,
            ProposedChange::ReplaceModelVersion { service, .. } => service.erase(),
        }
    }

    fn describe(&self, g: &LineageGraph) -> String {
        let k = |id: AnyNodeId| g.key(id).map_or_else(|_| id.to_string(), |k| k.to_string());
        match self {
            ProposedChange::DropField(f) => format!("drop field {}", k(f.erase())),
            ProposedChange::RenameField(f, n) => format!("rename field {} to {n}", k(f.erase())),
            ProposedChange::RetypeField(f, t) => format!("retype field {} to {t}", k(f.erase())),
            ProposedChange::Deprecate(n) => format!("deprecate {}", k(*n)),
            ProposedChange::Retire(n) => format!("retire {}", k(*n)),
            ProposedChange::ReplaceModelVersion {
                service,
                new_version,
            } => format!(
                "make {} serve {}",
                k(service.erase()),
                k(new_version.erase())
            ),
        }
    }
}

/// How a change reaches an affected node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Impact {
    /// Only told: it depends on the change at a coarser grain and may not use what changed.
    Informed,
    /// Breaks: it really consumes what changed.
    Breaks,
}

/// How urgent an affected node is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Informed, not in production.
    Low,
    /// An informed production service.
    Medium,
    /// A broken asset that is not a service.
    High,
    /// A broken production service.
    Critical,
}

/// Limits for an impact analysis; a cut-short analysis is flagged `partial`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Budget {
    max_nodes: Option<usize>,
    time: Option<Duration>,
    max_depth: Option<u32>,
}

impl Budget {
    /// No limits.
    pub fn unlimited() -> Self {
        Self::default()
    }

    /// Stops after `n` affected nodes.
    pub fn max_nodes(mut self, n: usize) -> Self {
        self.max_nodes = Some(n);
        self
    }

    /// Stops after `d` of wall time.
    pub fn time(mut self, d: Duration) -> Self {
        self.time = Some(d);
        self
    }

    /// Looks at most `depth` hops away.
    pub fn max_depth(mut self, depth: u32) -> Self {
        self.max_depth = Some(depth);
        self
    }
}

/// The raw result of an impact closure: node ids, classification and the predecessor on
/// the reported path. [`LineageGraph::impact`] resolves it into an [`ImpactReport`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImpactSet {
    root: AnyNodeId,
    nodes: Vec<u32>,
    // Entry index of each node's predecessor, or ROOT for the changed node's children.
    // A parent always comes before its child.
    parents: Vec<u32>,
    breaks: Breaks,
    partial: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Breaks {
    All,
    None,
    Each(Vec<bool>),
}

const ROOT: u32 = u32::MAX;

impl ImpactSet {
    /// The changed node.
    pub fn root(&self) -> AnyNodeId {
        self.root
    }

    /// Number of affected nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether nothing is affected.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    fn breaks(&self, i: usize) -> bool {
        match &self.breaks {
            Breaks::All => true,
            Breaks::None => false,
            Breaks::Each(v) => v.get(i).copied().unwrap_or(false),
        }
    }

    fn distances(&self) -> Vec<u32> {
        let mut d: Vec<u32> = Vec::with_capacity(self.nodes.len());
        for &p in &self.parents {
            let v = if p == ROOT {
                1
            } else {
                d.get(p as usize).map_or(1, |x| x + 1)
            };
            d.push(v);
        }
        d
    }

    /// Affected nodes with their classification and distance (the length of the reported
    /// path), in discovery order.
    pub fn iter(&self) -> impl Iterator<Item = (AnyNodeId, Impact, u32)> + '_ {
        let d = self.distances();
        self.nodes.iter().enumerate().map(move |(i, &n)| {
            let impact = if self.breaks(i) {
                Impact::Breaks
            } else {
                Impact::Informed
            };
            (AnyNodeId(n), impact, d[i])
        })
    }

    /// True when a budget cut the analysis short.
    pub fn is_partial(&self) -> bool {
        self.partial
    }

    fn path(&self, entry: usize) -> Vec<u32> {
        let mut p = Vec::new();
        let mut cur = entry as u32;
        while let (Some(&n), Some(&parent)) =
            (self.nodes.get(cur as usize), self.parents.get(cur as usize))
        {
            p.push(n);
            if p.len() > self.nodes.len() {
                break;
            }
            cur = parent;
        }
        p.push(self.root.0);
        p.reverse();
        p
    }
}

/// One affected node in an [`ImpactReport`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AffectedNode {
    /// Node key.
    pub key: String,
    /// Kind name.
    pub kind: String,
    /// Breaks or informed.
    pub impact: Impact,
    /// Urgency.
    pub severity: Severity,
    /// Hops from the changed node along `path`.
    pub distance: u32,
    /// Keys from the changed node to this one.
    pub path: Vec<String>,
    /// Owner to notify.
    pub owner: Option<String>,
    /// Lifecycle status.
    pub status: Status,
}

/// A production service hit by the change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServiceHit {
    /// Service key.
    pub key: String,
    /// Tier (`tier-1`), from a `tier-N` tag or a `tier` property.
    pub tier: Option<String>,
    /// Breaks or informed.
    pub impact: Impact,
}

/// An owner to notify and how many of their assets are hit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OwnerNotice {
    /// Owner or team.
    pub owner: String,
    /// Their assets that break.
    pub breaks: usize,
    /// Their assets that are informed.
    pub informed: usize,
}

/// Counts by classification and severity.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ImpactSummary {
    /// Affected nodes.
    pub affected: usize,
    /// Nodes that break.
    pub breaks: usize,
    /// Nodes that are informed.
    pub informed: usize,
    /// Production services hit.
    pub services: usize,
    /// Count at each severity.
    pub critical: usize,
    /// Count at each severity.
    pub high: usize,
    /// Count at each severity.
    pub medium: usize,
    /// Count at each severity.
    pub low: usize,
    /// The highest severity present.
    pub max_severity: Option<Severity>,
}

/// The consequences of a [`ProposedChange`]: a plain value that serialises to JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ImpactReport {
    /// What was proposed.
    pub change: String,
    /// Key of the changed node.
    pub root: String,
    /// Affected nodes, most severe first, then nearest, then by key.
    pub affected: Vec<AffectedNode>,
    /// Production services hit.
    pub services: Vec<ServiceHit>,
    /// Owners to notify, those with most breakage first.
    pub owners: Vec<OwnerNotice>,
    /// Counts.
    pub summary: ImpactSummary,
    /// Extra findings (for example a new model version with no evaluation).
    pub notes: Vec<String>,
    /// True when a budget cut the analysis short.
    pub partial: bool,
}

impl ImpactReport {
    /// The report as pretty JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }
}

const FIELD: u8 = 1;
const DATASET: u8 = 0;
const FEATURE_TABLE: u8 = 3;

fn has_field() -> u8 {
    EdgeKind::HasField.code()
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Field,
    AllBreak,
    AllInform,
}

impl LineageGraph {
    /// Computes which nodes a change affects, on the latest CSR snapshot.
    ///
    /// Classification: for a field change, column-lineage consumers of the field (derived
    /// fields, and datasets, features or model versions declared to use it) break, as does the
    /// dataset holding a broken field; assets downstream of a broken non-dataset asset break;
    /// consumers that reach a broken dataset only at dataset level are informed. Retiring
    /// breaks everything downstream; deprecating or re-pointing a service informs it.
    /// The other columns of a dataset whose column changed are not affected through it.
    ///
    /// # Errors
    /// [`Error::UnknownNode`] if a node of the change is not in the latest graph.
    pub fn impact_set(&self, change: &ProposedChange, budget: &Budget) -> Result<ImpactSet> {
        let root = change.root();
        let csr = self.snapshot();
        if csr.node_kind.get(root.index()).is_none_or(|&k| k == HIDDEN) {
            return Err(Error::UnknownNode {
                key: self
                    .key(root)
                    .map_or_else(|_| root.to_string(), |k| k.to_string()),
            });
        }
        if let ProposedChange::ReplaceModelVersion { new_version, .. } = change
            && !self.is_live_node(new_version.erase().0)
        {
            return Err(Error::UnknownNode {
                key: self.key(new_version.erase())?.to_string(),
            });
        }
        let mode = match change {
            ProposedChange::DropField(_)
            | ProposedChange::RenameField(..)
            | ProposedChange::RetypeField(..) => Mode::Field,
            ProposedChange::Retire(_) => Mode::AllBreak,
            ProposedChange::ReplaceModelVersion { new_version, .. } => {
                if self.status_of(new_version.erase().0) == Status::Active {
                    Mode::AllInform
                } else {
                    Mode::AllBreak
                }
            }
            ProposedChange::Deprecate(_) => Mode::AllInform,
        };
        if mode == Mode::Field {
            return Ok(field_closure(&csr, root, budget));
        }
        let (nodes, parents, partial) = uniform_closure(&csr, root, budget);
        Ok(ImpactSet {
            root,
            nodes,
            parents,
            breaks: if mode == Mode::AllBreak {
                Breaks::All
            } else {
                Breaks::None
            },
            partial,
        })
    }

    /// Assesses a proposed change and returns the full, ranked report.
    ///
    /// # Errors
    /// As [`Self::impact_set`].
    pub fn impact(&self, change: &ProposedChange) -> Result<ImpactReport> {
        let set = self.impact_set(change, &Budget::unlimited())?;
        Ok(self.report(change, &set))
    }

    /// Resolves an [`ImpactSet`] into a report (keys, paths, owners, services, ranking).
    pub fn report(&self, change: &ProposedChange, set: &ImpactSet) -> ImpactReport {
        let mut affected = Vec::with_capacity(set.nodes.len());
        let dists = set.distances();
        let mut services = Vec::new();
        let mut owners: BTreeMap<String, (usize, usize)> = BTreeMap::new();
        let mut summary = ImpactSummary::default();
        for (i, &n) in set.nodes.iter().enumerate() {
            let dist = dists[i];
            let breaks = set.breaks(i);
            let kind = self.kind(AnyNodeId(n)).unwrap_or(NodeKind::Dataset);
            let impact = if breaks {
                Impact::Breaks
            } else {
                Impact::Informed
            };
            let is_service = kind == NodeKind::Service;
            let severity = match (impact, is_service) {
                (Impact::Breaks, true) => Severity::Critical,
                (Impact::Breaks, false) => Severity::High,
                (Impact::Informed, true) => Severity::Medium,
                (Impact::Informed, false) => Severity::Low,
            };
            let key = self.key_string(n);
            if is_service {
                services.push(ServiceHit {
                    key: key.clone(),
                    tier: self.tier_of(n),
                    impact,
                });
            }
            let owner = self.owner_of(n).map(str::to_owned);
            if let Some(o) = &owner {
                let e = owners.entry(o.clone()).or_default();
                if breaks {
                    e.0 += 1;
                } else {
                    e.1 += 1;
                }
            }
            summary.affected += 1;
            if breaks {
                summary.breaks += 1;
            } else {
                summary.informed += 1;
            }
            match severity {
                Severity::Critical => summary.critical += 1,
                Severity::High => summary.high += 1,
                Severity::Medium => summary.medium += 1,
                Severity::Low => summary.low += 1,
            }
            summary.max_severity = summary.max_severity.max(Some(severity));
            affected.push(AffectedNode {
                key,
                kind: self.schema.node_kind_name(kind).to_owned(),
                impact,
                severity,
                distance: dist,
                path: set
                    .path(i)
                    .into_iter()
                    .map(|p| self.key_string(p))
                    .collect(),
                owner,
                status: self.status_of(n),
            });
        }
        summary.services = services.len();
        affected.sort_by(|a, b| {
            b.severity
                .cmp(&a.severity)
                .then(a.distance.cmp(&b.distance))
                .then_with(|| a.key.cmp(&b.key))
        });
        services.sort_by(|a, b| {
            b.impact
                .cmp(&a.impact)
                .then_with(|| a.tier.cmp(&b.tier))
                .then_with(|| a.key.cmp(&b.key))
        });
        let mut owners: Vec<OwnerNotice> = owners
            .into_iter()
            .map(|(owner, (breaks, informed))| OwnerNotice {
                owner,
                breaks,
                informed,
            })
            .collect();
        owners.sort_by(|a, b| {
            b.breaks
                .cmp(&a.breaks)
                .then(b.informed.cmp(&a.informed))
                .then_with(|| a.owner.cmp(&b.owner))
        });
        let mut notes = Vec::new();
        if let ProposedChange::ReplaceModelVersion {
            new_version,
            service,
        } = change
        {
            let nv = new_version.erase().0;
            let evaluated = self
                .live_edges_in(nv)
                .any(|(_, src, k)| k == EdgeKind::Evaluates && self.is_live_node(src))
                || self
                    .live_edges_out(nv)
                    .any(|(_, dst, k)| k == EdgeKind::Evaluates && self.is_live_node(dst));
            if !evaluated {
                notes.push(format!("{} has no evaluation", self.key_string(nv)));
            }
            let st = self.status_of(nv);
            if st != Status::Active {
                notes.push(format!("{} is {st:?}", self.key_string(nv)).to_lowercase());
            }
            // Serves flows model version -> service, so served versions are in-edges.
            let current: Vec<String> = self
                .live_edges_in(service.erase().0)
                .filter(|(_, _, k)| *k == EdgeKind::Serves)
                .map(|(_, src, _)| self.key_string(src))
                .collect();
            if !current.is_empty() {
                notes.push(format!("currently served: {}", current.join(", ")));
            }
        }
        ImpactReport {
            change: change.describe(self),
            root: self.key_string(set.root.0),
            affected,
            services,
            owners,
            summary,
            notes,
            partial: set.partial,
        }
    }

    fn tier_of(&self, n: u32) -> Option<String> {
        if let Some(t) = self.tags_of(n).into_iter().find(|t| t.starts_with("tier")) {
            return Some(t);
        }
        match self.property_of(n, "tier") {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(serde_json::Value::Number(x)) => Some(format!("tier-{x}")),
            _ => None,
        }
    }
}

/// Breadth-first closure where every node gets the same classification: the bare loop the
/// floor runs, plus one parent index per reached node.
fn uniform_closure(csr: &Csr, root: AnyNodeId, budget: &Budget) -> (Vec<u32>, Vec<u32>, bool) {
    let began = Instant::now();
    let max_nodes = budget.max_nodes.unwrap_or(usize::MAX);
    let max_depth = budget.max_depth.unwrap_or(u32::MAX);
    let mut seen = vec![false; csr.len()];
    seen[root.index()] = true;
    let mut nodes: Vec<u32> = Vec::with_capacity(1024);
    let mut parents: Vec<u32> = Vec::with_capacity(1024);
    let mut partial = false;
    let (mut node, mut entry) = (root.0, ROOT);
    let mut child_depth = 1u32;
    let mut level_end = usize::MAX;
    let mut head = 0usize;
    'outer: loop {
        if child_depth > max_depth {
            break;
        }
        let (ts, _) = csr.out(node);
        for &t in ts {
            if !seen[t as usize] {
                if nodes.len() >= max_nodes {
                    partial = true;
                    break 'outer;
                }
                seen[t as usize] = true;
                nodes.push(t);
                parents.push(entry);
            }
        }
        if level_end == usize::MAX {
            level_end = nodes.len();
            child_depth = 2;
        }
        if head >= nodes.len() {
            break;
        }
        if head == level_end {
            child_depth += 1;
            level_end = nodes.len();
        }
        if head & 0xfff == 0
            && let Some(t) = budget.time
            && began.elapsed() > t
        {
            partial = true;
            break;
        }
        node = nodes[head];
        entry = head as u32;
        head += 1;
    }
    (nodes, parents, partial)
}

/// Field-granularity closure: breakage first, then informed consumers of broken datasets.
fn field_closure(csr: &Csr, root: AnyNodeId, budget: &Budget) -> ImpactSet {
    let began = Instant::now();
    let max_nodes = budget.max_nodes.unwrap_or(usize::MAX);
    let max_depth = budget.max_depth.unwrap_or(u32::MAX);
    let hf = has_field();
    let mut seen = vec![false; csr.len()];
    seen[root.index()] = true;
    let mut acc = Acc::default();
    let mut partial = false;
    // The dataset holding the changed field changes with it.
    if csr.node_kind[root.index()] == FIELD {
        let (ps, ks) = csr.inc(root.0);
        for (&p, &k) in ps.iter().zip(ks) {
            if k == hf && !seen[p as usize] {
                seen[p as usize] = true;
                acc.push(p, ROOT, 1, true);
            }
        }
    }
    // Edges that leave a broken dataset without breaking their target, visited after all
    // breakage is known so a node reachable both ways is classified as broken.
    let mut deferred: Vec<(u32, u32, u32)> = Vec::new();
    let mut head = 0usize;
    let mut current: Option<(u32, u32, u32)> = Some((root.0, ROOT, 0));
    while let Some((node, entry, d)) = current {
        if head & 0xfff == 0
            && let Some(t) = budget.time
            && began.elapsed() > t
        {
            partial = true;
            break;
        }
        if d < max_depth {
            let nk = csr.node_kind[node as usize];
            let container = nk == DATASET || nk == FEATURE_TABLE;
            let (ts, ks) = csr.out(node);
            for (&t, &k) in ts.iter().zip(ks) {
                if seen[t as usize] {
                    continue;
                }
                if container {
                    // The other columns of the table are untouched; its other consumers
                    // are informed later unless something breaks them first.
                    if k != hf {
                        deferred.push((entry, t, d + 1));
                    }
                    continue;
                }
                if acc.nodes.len() >= max_nodes {
                    partial = true;
                    break;
                }
                seen[t as usize] = true;
                acc.push(t, entry, d + 1, true);
                if csr.node_kind[t as usize] == FIELD {
                    let te = (acc.nodes.len() - 1) as u32;
                    let (ps, pk) = csr.inc(t);
                    for (&p, &kk) in ps.iter().zip(pk) {
                        if kk == hf && !seen[p as usize] && acc.nodes.len() < max_nodes {
                            seen[p as usize] = true;
                            acc.push(p, te, d + 2, true);
                        }
                    }
                }
            }
        }
        if partial {
            break;
        }
        current = acc
            .nodes
            .get(head)
            .map(|&n| (n, head as u32, acc.dist[head]));
        head += 1;
    }
    if !partial {
        let start = acc.nodes.len();
        for (parent, t, d) in deferred {
            if seen[t as usize] || d > max_depth {
                continue;
            }
            if acc.nodes.len() >= max_nodes {
                partial = true;
                break;
            }
            seen[t as usize] = true;
            acc.push(t, parent, d, false);
        }
        let mut h = start;
        while h < acc.nodes.len() && !partial {
            let (node, d) = (acc.nodes[h], acc.dist[h]);
            h += 1;
            if d >= max_depth {
                continue;
            }
            let (ts, _) = csr.out(node);
            for &t in ts {
                if seen[t as usize] {
                    continue;
                }
                if acc.nodes.len() >= max_nodes {
                    partial = true;
                    break;
                }
                seen[t as usize] = true;
                acc.push(t, (h - 1) as u32, d + 1, false);
            }
        }
    }
    ImpactSet {
        root,
        nodes: acc.nodes,
        parents: acc.parents,
        breaks: Breaks::Each(acc.breaks),
        partial,
    }
}

#[derive(Default)]
struct Acc {
    nodes: Vec<u32>,
    parents: Vec<u32>,
    dist: Vec<u32>,
    breaks: Vec<bool>,
}

impl Acc {
    fn push(&mut self, t: u32, p: u32, d: u32, b: bool) {
        self.nodes.push(t);
        self.parents.push(p);
        self.dist.push(d);
        self.breaks.push(b);
    }
}
