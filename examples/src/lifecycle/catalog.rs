//! The lineage side of the lifecycle: what the workflow registers (idempotently, so a resumed
//! step never registers anything twice), and the reports it reads back (served version,
//! impact, tree, exports, governance).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use keel_lineage::{
    At, Change, Direction, EdgeKind, FieldSpec, FnPolicy, ImpactReport, LineageGraph, LineageStore,
    NoDeprecatedUpstream, NodeKey, NodeKind, NodeSpec, PiiHasOwner, Policy, ProposedChange,
    ServedModelsEvaluated, Status, Transformation, Violation, Walk, nodes,
};
use serde::{Deserialize, Serialize};

use super::{EvalScores, ServingConfig};

/// Namespace and name of the service the lifecycle ships to.
pub(crate) const SERVICE_NS: &str = "prod";
/// Name of the service.
pub(crate) const SERVICE_NAME: &str = "assistant";
const MODEL_NS: &str = "ml";
const MODEL_NAME: &str = "smollm2-135m-instruct";
const EVAL_SET: &str = "assistant-smoke";
/// The field whose drop the impact step assesses.
pub(crate) const DROPPED_FIELD: (&str, &str, &str) = ("shop", "customers", "country");

pub(crate) fn service_key() -> NodeKey {
    NodeKey::new(SERVICE_NS, SERVICE_NAME)
}

pub(crate) fn version_key(version: u32) -> NodeKey {
    NodeKey::new(MODEL_NS, format!("{MODEL_NAME}@v{version}"))
}

fn evaluation_key(version: u32) -> NodeKey {
    NodeKey::new("eval", format!("{MODEL_NAME}@v{version}.{EVAL_SET}"))
}

fn workflow_key() -> NodeKey {
    NodeKey::new("keel", "ship-assistant")
}

fn upsert(spec: NodeSpec) -> Change {
    Change::Upsert(spec)
}

fn link(from: NodeKey, edge: EdgeKind, to: NodeKey) -> Change {
    Change::link(from, edge, to)
}

fn column(from: NodeKey, to: NodeKey) -> Change {
    Change::Link {
        from,
        edge: EdgeKind::DerivedFrom,
        to,
        transformation: Some(Transformation::identity()),
    }
}

/// Raw datasets and their fields, the feature table derived from them, the evaluation set,
/// the workflow that ships the model, and the service.
pub(crate) fn data_changes() -> Vec<Change> {
    let text = Some("TEXT");
    let varchar = Some("VARCHAR");
    let customers = NodeSpec::new(NodeKind::Dataset, "shop", "customers")
        .owner("data-eng")
        .description("one row per customer, from the shop database")
        .field(FieldSpec::new("customer_id", Some("BIGINT")))
        .field(FieldSpec::new("email", varchar).tag("pii"))
        .field(FieldSpec::new("country", varchar))
        .field(FieldSpec::new("signup_date", Some("DATE")));
    let tickets = NodeSpec::new(NodeKind::Dataset, "support", "tickets")
        .owner("support-eng")
        .description("support tickets and their resolutions")
        .field(FieldSpec::new("ticket_id", Some("BIGINT")))
        .field(FieldSpec::new("customer_id", Some("BIGINT")))
        .field(FieldSpec::new("subject", text))
        .field(FieldSpec::new("body", text).tag("pii"))
        .field(FieldSpec::new("resolution", text));
    let features = NodeSpec::new(NodeKind::FeatureTable, "features", "assistant_training")
        .owner("ml-platform")
        .description("instruction pairs the assistant is tuned and evaluated on")
        .field(FieldSpec::new("prompt", text))
        .field(FieldSpec::new("response", text))
        .field(FieldSpec::new("customer_region", varchar));
    let eval_set = NodeSpec::new(NodeKind::Dataset, "eval", EVAL_SET)
        .owner("ml-platform")
        .description("fixed question/answer pairs with expected keywords")
        .field(FieldSpec::new("prompt", text))
        .field(FieldSpec::new("expected", text));
    let workflow = NodeSpec::new(NodeKind::Workflow, "keel", "ship-assistant")
        .owner("ml-platform")
        .description("the durable lifecycle workflow (examples/lifecycle)");
    let service = NodeSpec::new(NodeKind::Service, SERVICE_NS, SERVICE_NAME)
        .owner("ml-platform")
        .tag("tier-1")
        .description("the assistant chat endpoint");
    let f = |ns: &str, d: &str, c: &str| NodeKey::field(ns, d, c);
    // Fields get their dataset's owner, so governance knows whom to ask about PII columns.
    let owners = [
        (
            "shop",
            "customers",
            "data-eng",
            &["customer_id", "email", "country", "signup_date"][..],
        ),
        (
            "support",
            "tickets",
            "support-eng",
            &["ticket_id", "customer_id", "subject", "body", "resolution"][..],
        ),
        (
            "features",
            "assistant_training",
            "ml-platform",
            &["prompt", "response", "customer_region"][..],
        ),
        ("eval", EVAL_SET, "ml-platform", &["prompt", "expected"][..]),
    ];
    let mut out = vec![
        upsert(customers),
        upsert(tickets),
        upsert(features),
        upsert(eval_set),
        upsert(workflow),
        upsert(service),
    ];
    for (ns, ds, owner, cols) in owners {
        for col in cols {
            out.push(upsert(
                NodeSpec::with_key(NodeKind::Field, f(ns, ds, col)).owner(owner),
            ));
        }
    }
    out.extend([
        column(
            f("features", "assistant_training", "prompt"),
            f("support", "tickets", "subject"),
        ),
        column(
            f("features", "assistant_training", "prompt"),
            f("support", "tickets", "body"),
        ),
        column(
            f("features", "assistant_training", "response"),
            f("support", "tickets", "resolution"),
        ),
        column(
            f("features", "assistant_training", "customer_region"),
            f("shop", "customers", "country"),
        ),
        link(
            NodeKey::new("features", "assistant_training"),
            EdgeKind::DerivedFrom,
            NodeKey::new("support", "tickets"),
        ),
        link(
            NodeKey::new("features", "assistant_training"),
            EdgeKind::DerivedFrom,
            NodeKey::new("shop", "customers"),
        ),
        link(
            workflow_key(),
            EdgeKind::Reads,
            NodeKey::new("support", "tickets"),
        ),
        link(
            workflow_key(),
            EdgeKind::Reads,
            NodeKey::new("shop", "customers"),
        ),
        link(
            workflow_key(),
            EdgeKind::Writes,
            NodeKey::new("features", "assistant_training"),
        ),
    ]);
    out
}

/// The model and one version of it, trained on the feature table's fields.
pub(crate) fn model_changes(
    version: u32,
    file: &str,
    bytes: u64,
    cfg: &ServingConfig,
) -> Vec<Change> {
    let model = NodeSpec::new(NodeKind::Model, MODEL_NS, MODEL_NAME)
        .owner("ml-platform")
        .description("SmolLM2-135M-Instruct, GGUF Q4_1");
    let weights = if version == 1 {
        "the GGUF file as fetched".to_owned()
    } else {
        "the same weights as v1, re-registered with a different serving configuration".to_owned()
    };
    let mv = NodeSpec::new(
        NodeKind::ModelVersion,
        MODEL_NS,
        format!("{MODEL_NAME}@v{version}"),
    )
    .owner("ml-platform")
    .description(weights)
    .property("file", serde_json::json!(file))
    .property("bytes", serde_json::json!(bytes))
    .property("serving", serde_json::to_value(cfg).unwrap_or_default());
    let mut out = vec![
        upsert(model),
        upsert(mv),
        link(
            version_key(version),
            EdgeKind::VersionOf,
            NodeKey::new(MODEL_NS, MODEL_NAME),
        ),
        link(workflow_key(), EdgeKind::Writes, version_key(version)),
    ];
    for field in ["prompt", "response", "customer_region"] {
        out.push(link(
            version_key(version),
            EdgeKind::TrainedOn,
            NodeKey::field("features", "assistant_training", field),
        ));
    }
    out
}

/// The Evaluation node with its scores.
pub(crate) fn evaluation_changes(version: u32, scores: &EvalScores) -> Vec<Change> {
    let spec = NodeSpec::new(NodeKind::Evaluation, "eval", evaluation_key(version).name())
        .owner("ml-platform")
        .property("accuracy", serde_json::json!(scores.accuracy))
        .property("cases", serde_json::json!(scores.cases.len()))
        .property("p50_latency_ms", serde_json::json!(scores.p50_ms))
        .property("tokens_per_s", serde_json::json!(scores.tokens_per_s));
    vec![
        upsert(spec),
        link(
            evaluation_key(version),
            EdgeKind::Evaluates,
            version_key(version),
        ),
        link(
            evaluation_key(version),
            EdgeKind::DerivedFrom,
            NodeKey::new("eval", EVAL_SET),
        ),
        link(workflow_key(), EdgeKind::Writes, evaluation_key(version)),
    ]
}

/// The service serves `new` instead of `old`; `old` is deprecated.
pub(crate) fn deploy_changes(g: &LineageGraph, old: Option<u32>, new: u32) -> Vec<Change> {
    let mut out = vec![link(service_key(), EdgeKind::Serves, version_key(new))];
    if let Some(old) = old.filter(|&o| o != new) {
        out.push(Change::Unlink {
            from: service_key(),
            edge: EdgeKind::Serves,
            to: version_key(old),
        });
        let active = g
            .find(&version_key(old))
            .and_then(|id| g.info(id))
            .is_ok_and(|i| i.status == Status::Active);
        if active {
            // A status change merges into the existing node; it is not a second registration.
            out.push(upsert(
                NodeSpec::new(NodeKind::ModelVersion, MODEL_NS, version_key(old).name())
                    .status(Status::Deprecated),
            ));
        }
    }
    out
}

fn live_edge(g: &LineageGraph, from: &NodeKey, edge: EdgeKind, to: &NodeKey) -> bool {
    let Ok(id) = g.find(from) else {
        return false;
    };
    [Direction::Upstream, Direction::Downstream]
        .iter()
        .any(|d| {
            g.edges(id, *d, At::Latest).is_ok_and(|es| {
                es.iter()
                    .any(|e| e.kind == edge && &e.from == from && &e.to == to)
            })
        })
}

/// Whether a change is already reflected in the graph, so committing it again would be a
/// duplicate registration.
fn already_holds(g: &LineageGraph, c: &Change) -> bool {
    match c {
        Change::Upsert(spec) => match g.find(spec.key()).and_then(|id| g.info(id)) {
            // A status-only upsert (deprecation) holds once the status is set.
            Ok(info) if info.kind == spec.kind() => {
                let wanted = serde_json::to_value(spec)
                    .ok()
                    .and_then(|v| v.get("status").cloned())
                    .and_then(|s| serde_json::from_value::<Status>(s).ok());
                wanted.is_none_or(|s| s == info.status)
            }
            _ => false,
        },
        Change::Link { from, edge, to, .. } => live_edge(g, from, *edge, to),
        Change::Unlink { from, edge, to } => !live_edge(g, from, *edge, to),
        _ => false,
    }
}

/// Commits the changes not already in the graph, as one atomic, flushed commit. Returns how
/// many were committed (0 when a resumed step finds its work already done).
pub(crate) fn commit_missing(
    store: &LineageStore,
    changes: Vec<Change>,
) -> keel_lineage::Result<usize> {
    let needed: Vec<Change> = {
        let g = store.read();
        changes
            .into_iter()
            .filter(|c| !already_holds(&g, c))
            .collect()
    };
    if needed.is_empty() {
        return Ok(0);
    }
    let n = needed.len();
    store.commit(needed)?;
    Ok(n)
}

/// The version the service serves now, with its serving configuration, read from lineage.
pub(crate) fn served_version(g: &LineageGraph) -> Option<(u32, ServingConfig)> {
    let svc = g.find(&service_key()).ok()?;
    let edges = g.edges(svc, Direction::Upstream, At::Latest).ok()?;
    edges
        .iter()
        .filter(|e| e.kind == EdgeKind::Serves)
        .filter_map(|e| {
            let v: u32 = e.to.name().rsplit_once("@v")?.1.parse().ok()?;
            let info = g.find(&e.to).and_then(|id| g.info(id)).ok()?;
            let cfg = info
                .properties
                .get("serving")
                .and_then(|s| serde_json::from_value(s.clone()).ok())
                .unwrap_or_else(|| ServingConfig::for_version(v));
            Some((v, cfg))
        })
        .max_by_key(|(v, _)| *v)
}

/// The parts of an impact report the lifecycle prints and keeps in its journal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ImpactBrief {
    /// What was proposed.
    pub change: String,
    /// Assets that break.
    pub breaks: usize,
    /// Assets that are only informed.
    pub informed: usize,
    /// The highest severity, if anything is affected.
    pub max_severity: Option<String>,
    /// Production services hit: key, tier and whether they break.
    pub services: Vec<String>,
    /// Owners to notify, with counts.
    pub owners: Vec<String>,
    /// The most severe affected assets (at most six), with their impact.
    pub top: Vec<String>,
    /// Extra findings from the analysis.
    pub notes: Vec<String>,
}

impl ImpactBrief {
    fn from_report(r: &ImpactReport) -> Self {
        let lower = |s: String| s.to_lowercase();
        Self {
            change: r.change.clone(),
            breaks: r.summary.breaks,
            informed: r.summary.informed,
            max_severity: r.summary.max_severity.map(|s| lower(format!("{s:?}"))),
            services: r
                .services
                .iter()
                .map(|s| {
                    format!(
                        "{} ({}, {})",
                        s.key,
                        s.tier.as_deref().unwrap_or("no tier"),
                        lower(format!("{:?}", s.impact))
                    )
                })
                .collect(),
            owners: r
                .owners
                .iter()
                .map(|o| format!("{}: {} break, {} informed", o.owner, o.breaks, o.informed))
                .collect(),
            top: r
                .affected
                .iter()
                .take(6)
                .map(|a| {
                    format!(
                        "{} {} [{}]",
                        a.key,
                        lower(format!("{:?}", a.impact)),
                        lower(format!("{:?}", a.severity))
                    )
                })
                .collect(),
            notes: r.notes.clone(),
        }
    }
}

/// Impact of making the service serve `new`, and of dropping [`DROPPED_FIELD`].
pub(crate) fn impact_briefs(g: &LineageGraph, new: u32) -> keel_lineage::Result<Vec<ImpactBrief>> {
    let service = g.get::<nodes::Service>(&service_key())?;
    let new_version = g.get::<nodes::ModelVersion>(&version_key(new))?;
    let replace = g.impact(&ProposedChange::ReplaceModelVersion {
        service,
        new_version,
    })?;
    let (ns, ds, col) = DROPPED_FIELD;
    let field = g.get::<nodes::Field>(&NodeKey::field(ns, ds, col))?;
    let drop = g.impact(&ProposedChange::DropField(field))?;
    Ok(vec![
        ImpactBrief::from_report(&replace),
        ImpactBrief::from_report(&drop),
    ])
}

/// The service's upstream lineage as an indented tree, one asset per line.
pub(crate) fn tree(g: &LineageGraph) -> keel_lineage::Result<String> {
    let svc = g.find(&service_key())?;
    let walk = g.walk(svc, &Walk::upstream().report_cycles(false))?;
    let mut children: BTreeMap<u32, Vec<(keel_lineage::AnyNodeId, String)>> = BTreeMap::new();
    for r in &walk.nodes {
        let Some(parent) = r.via else { continue };
        let key = g.key(r.id)?;
        let pkey = g.key(parent)?;
        let label = g
            .edges(parent, Direction::Upstream, At::Latest)?
            .into_iter()
            .find(|e| (e.from == key && e.to == pkey) || (e.from == pkey && e.to == key))
            .map_or_else(String::new, |e| e.kind_name);
        children
            .entry(parent.index() as u32)
            .or_default()
            .push((r.id, label));
    }
    let mut out = String::new();
    let root = g.info(svc)?;
    let _ = writeln!(out, "{} ({})", root.key, root.kind_name);
    let mut stack: Vec<(keel_lineage::AnyNodeId, String, usize)> = children
        .get(&(svc.index() as u32))
        .map(|c| c.iter().rev().map(|(id, l)| (*id, l.clone(), 1)).collect())
        .unwrap_or_default();
    while let Some((id, label, depth)) = stack.pop() {
        let info = g.info(id)?;
        let status = if info.status == Status::Active {
            String::new()
        } else {
            format!(", {:?}", info.status).to_lowercase()
        };
        let _ = writeln!(
            out,
            "{}└─ {label} → {} ({}{status})",
            "   ".repeat(depth - 1),
            info.key,
            info.kind_name
        );
        if let Some(c) = children.get(&(id.index() as u32)) {
            for (cid, l) in c.iter().rev() {
                stack.push((*cid, l.clone(), depth + 1));
            }
        }
    }
    Ok(out)
}

/// The service's lineage (upstream, plus the evaluations of what it serves) as Mermaid and DOT.
pub(crate) fn exports(g: &LineageGraph) -> keel_lineage::Result<(String, String)> {
    let svc = g.find(&service_key())?;
    let sub = g.subgraph(svc, &Walk::upstream())?;
    Ok((sub.to_mermaid(), sub.to_dot()))
}

/// The governance checks: the built-in ones and one of our own (tier-1 services have owners).
pub(crate) fn governance(g: &LineageGraph) -> (Vec<String>, Vec<Violation>) {
    let owned = FnPolicy::new("tier-1-services-have-owner", |g: &LineageGraph| {
        g.nodes(At::Latest)
            .into_iter()
            .filter_map(|id| g.info(id).ok())
            .filter(|i| i.kind == NodeKind::Service && i.tags.iter().any(|t| t == "tier-1"))
            .filter(|i| i.owner.is_none())
            .map(|i| Violation {
                policy: "tier-1-services-have-owner".to_owned(),
                node: i.key.to_string(),
                message: "tier-1 service has no owner".to_owned(),
                path: Vec::new(),
            })
            .collect()
    });
    let pii = PiiHasOwner::new();
    let policies: [&dyn Policy; 4] = [&ServedModelsEvaluated, &NoDeprecatedUpstream, &pii, &owned];
    let names = policies.iter().map(|p| p.name().to_owned()).collect();
    (names, g.check(&policies))
}
