//! Impact analysis: which assets a proposed change breaks or should inform, with paths,
//! owners, production services and a ranked severity summary.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::csr::HIDDEN;
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

/// The raw result of an impact closure: node ids, classification, distance and the
/// predecessor on the reported path. [`LineageGraph::impact`] resolves it into an
/// [`ImpactReport`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImpactSet {
    root: AnyNodeId,
    // (node, parent entry or u32::MAX for the root's children, distance, breaks)
    entries: Vec<(u32, u32, u32, bool)>,
    partial: bool,
}

impl ImpactSet {
    /// The changed node.
    pub fn root(&self) -> AnyNodeId {
        self.root
    }

    /// Number of affected nodes.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing is affected.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Affected nodes with their classification and distance.
    pub fn iter(&self) -> impl Iterator<Item = (AnyNodeId, Impact, u32)> + '_ {
        self.entries.iter().map(|&(n, _, d, b)| {
            (
                AnyNodeId(n),
                if b { Impact::Breaks } else { Impact::Informed },
                d,
            )
        })
    }

    /// True when a budget cut the analysis short.
    pub fn is_partial(&self) -> bool {
        self.partial
    }

    fn path(&self, entry: usize) -> Vec<u32> {
        let mut p = Vec::new();
        let mut cur = entry as u32;
        while let Some(&(n, parent, _, _)) = self.entries.get(cur as usize) {
            p.push(n);
            if p.len() > self.entries.len() {
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
        let began = Instant::now();
        let max_nodes = budget.max_nodes.unwrap_or(usize::MAX);
        let max_depth = budget.max_depth.unwrap_or(u32::MAX);
        let hf = has_field();
        const UNSEEN: u32 = u32::MAX;
        const ROOT: u32 = u32::MAX - 1;
        let mut slot = vec![UNSEEN; csr.len()];
        slot[root.index()] = ROOT;
        let mut entries: Vec<(u32, u32, u32, bool)> = Vec::new();
        let mut partial = false;
        let root_breaks = mode != Mode::AllInform;
        // Edges that leave a broken node without breaking their target, visited after all
        // breakage is known so a node reachable both ways is classified as broken.
        let mut deferred: Vec<(u32, u32)> = Vec::new();
        let mut head = 0usize;
        let mut root_pending = true;
        if mode == Mode::Field && csr.node_kind[root.index()] == FIELD {
            // The dataset holding the changed field changes with it.
            let (ps, ks) = csr.inc(root.0);
            for (&p, &k) in ps.iter().zip(ks) {
                if k == hf && slot[p as usize] == UNSEEN {
                    slot[p as usize] = entries.len() as u32;
                    entries.push((p, u32::MAX, 1, true));
                }
            }
        }
        // Phase 1: breakage (or everything, when nothing can break).
        loop {
            let (node, entry, dist) = if root_pending {
                root_pending = false;
                (root.0, u32::MAX, 0)
            } else if head < entries.len() {
                let e = entries[head];
                head += 1;
                (e.0, (head - 1) as u32, e.2)
            } else {
                break;
            };
            if (entries.len() & 0xfff) == 0
                && let Some(t) = budget.time
                && began.elapsed() > t
            {
                partial = true;
                break;
            }
            if dist >= max_depth {
                continue;
            }
            let nk = csr.node_kind[node as usize];
            let (ts, ks) = csr.out(node);
            for (&t, &k) in ts.iter().zip(ks) {
                let breaks = match mode {
                    Mode::AllBreak => true,
                    Mode::AllInform => false,
                    Mode::Field => nk != DATASET && nk != FEATURE_TABLE,
                };
                if k == hf && mode == Mode::Field && !breaks {
                    // The other columns of a dataset whose column changed are untouched.
                    continue;
                }
                if breaks != root_breaks {
                    if slot[t as usize] == UNSEEN {
                        deferred.push((entry, t));
                    }
                    continue;
                }
                if slot[t as usize] != UNSEEN {
                    continue;
                }
                if entries.len() >= max_nodes {
                    partial = true;
                    break;
                }
                slot[t as usize] = entries.len() as u32;
                entries.push((t, entry, dist + 1, breaks));
                if mode == Mode::Field && csr.node_kind[t as usize] == FIELD {
                    let te = entries.len() as u32 - 1;
                    let (ps, pk) = csr.inc(t);
                    for (&p, &kk) in ps.iter().zip(pk) {
                        if kk == hf && slot[p as usize] == UNSEEN && entries.len() < max_nodes {
                            slot[p as usize] = entries.len() as u32;
                            entries.push((p, te, dist + 2, true));
                        }
                    }
                }
            }
            if partial {
                break;
            }
        }
        // Phase 2: informed consumers of broken datasets.
        if !partial && !deferred.is_empty() {
            let start = entries.len();
            for (parent, t) in deferred {
                if slot[t as usize] != UNSEEN {
                    continue;
                }
                let dist = entries.get(parent as usize).map_or(1, |e| e.2 + 1);
                if dist > max_depth {
                    continue;
                }
                if entries.len() >= max_nodes {
                    partial = true;
                    break;
                }
                slot[t as usize] = entries.len() as u32;
                entries.push((t, parent, dist, false));
            }
            let mut h = start;
            while h < entries.len() && !partial {
                let (node, _, dist, _) = entries[h];
                h += 1;
                if dist >= max_depth {
                    continue;
                }
                let (ts, _) = csr.out(node);
                for &t in ts {
                    if slot[t as usize] != UNSEEN {
                        continue;
                    }
                    if entries.len() >= max_nodes {
                        partial = true;
                        break;
                    }
                    slot[t as usize] = entries.len() as u32;
                    entries.push((t, (h - 1) as u32, dist + 1, false));
                }
            }
        }
        Ok(ImpactSet {
            root,
            entries,
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
        let mut affected = Vec::with_capacity(set.entries.len());
        let mut services = Vec::new();
        let mut owners: BTreeMap<String, (usize, usize)> = BTreeMap::new();
        let mut summary = ImpactSummary::default();
        for (i, &(n, _, dist, breaks)) in set.entries.iter().enumerate() {
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
