//! Tag propagation, policies and discovery.
#![allow(clippy::unwrap_used)] // Test helpers: a failed unwrap is a failed test.

use keel_lineage::*;

fn k(s: &str) -> NodeKey {
    NodeKey::parse(s).unwrap()
}

fn graph() -> LineageGraph {
    let mut g = LineageGraph::new();
    g.commit(vec![
        Change::Upsert(
            NodeSpec::new(NodeKind::Dataset, "shop", "customers")
                .owner("crm")
                .field(FieldSpec::new("email", Some("VARCHAR")).tag("pii"))
                .field(FieldSpec::new("country", Some("VARCHAR"))),
        ),
        Change::Upsert(
            NodeSpec::new(NodeKind::Dataset, "shop", "marketing")
                .field(FieldSpec::new("email_hash", None))
                .field(FieldSpec::new("email_copy", None))
                .field(FieldSpec::new("country", None)),
        ),
        Change::Link {
            from: k("shop:marketing#email_hash"),
            edge: EdgeKind::DerivedFrom,
            to: k("shop:customers#email"),
            transformation: Some(
                Transformation::new(TransformKind::Direct, Some("MASKED")).masking(true),
            ),
        },
        Change::Link {
            from: k("shop:marketing#email_copy"),
            edge: EdgeKind::DerivedFrom,
            to: k("shop:customers#email"),
            transformation: Some(Transformation::identity()),
        },
        Change::Link {
            from: k("shop:marketing#country"),
            edge: EdgeKind::DerivedFrom,
            to: k("shop:customers#country"),
            transformation: Some(Transformation::identity()),
        },
        Change::Upsert(NodeSpec::new(NodeKind::Feature, "fs", "email_len")),
        Change::link(
            k("fs:email_len"),
            EdgeKind::DerivedFrom,
            k("shop:marketing#email_copy"),
        ),
        Change::Upsert(NodeSpec::new(NodeKind::ModelVersion, "ml", "m@1").owner("ml")),
        Change::link(k("ml:m@1"), EdgeKind::TrainedOn, k("shop:customers")),
        Change::Upsert(NodeSpec::new(NodeKind::Service, "prod", "api").owner("sre")),
        Change::link(k("prod:api"), EdgeKind::Serves, k("ml:m@1")),
    ])
    .unwrap();
    g
}

#[test]
fn pii_propagates_forward_and_masking_blocks_it() {
    let g = graph();
    let tags = g.propagate_tags(&TagRules::pii());
    let id = |s: &str| g.find(&k(s)).unwrap();
    assert!(tags.has(id("shop:customers#email"), "pii"));
    assert!(tags.has(id("shop:marketing#email_copy"), "pii"));
    assert!(tags.has(id("fs:email_len"), "pii"));
    assert!(!tags.has(id("shop:marketing#email_hash"), "pii"));
    assert!(!tags.has(id("shop:marketing#country"), "pii"));
    // has-field does not carry pii from a column to its table.
    assert!(!tags.has(id("shop:customers"), "pii"));
    assert_eq!(
        tags.source(id("fs:email_len"), "pii"),
        Some(id("shop:customers#email"))
    );
    // Computed, not copied: the graph's own tags are unchanged.
    assert!(g.info(id("fs:email_len")).unwrap().tags.is_empty());
}

#[test]
fn per_edge_rules_and_subtype_blocks() {
    let g = graph();
    let id = |s: &str| g.find(&k(s)).unwrap();
    let back = TagRules::new()
        .rule(TagRule::new("pii", Propagation::None).on(EdgeKind::HasField, Propagation::Backward));
    let tags = back.clone();
    let t = g.propagate_tags(&tags);
    assert!(t.has(id("shop:customers"), "pii"));
    assert!(!t.has(id("shop:marketing#email_copy"), "pii"));
    let blocked = TagRules::new()
        .rule(TagRule::new("pii", Propagation::Forward).blocked_by_subtype("identity"));
    let t = g.propagate_tags(&blocked);
    assert!(!t.has(id("shop:marketing#email_copy"), "pii"));
    assert!(t.has(id("shop:marketing#email_hash"), "pii"));
}

#[test]
fn built_in_policies_report_violations_with_paths() {
    let mut g = graph();
    let pii = PiiHasOwner::new();
    let v = g.check(&[&pii]);
    let nodes: Vec<&str> = v.iter().map(|v| v.node.as_str()).collect();
    assert!(nodes.contains(&"shop:customers#email"));
    assert!(nodes.contains(&"fs:email_len"));
    let fl = v.iter().find(|v| v.node == "fs:email_len").unwrap();
    assert_eq!(fl.path, vec!["shop:customers#email", "fs:email_len"]);

    assert_eq!(g.check(&[&NoDeprecatedUpstream]), vec![]);
    let c = g.find(&k("shop:customers")).unwrap();
    g.set_status(c, Status::Deprecated).unwrap();
    let v = g.check(&[&NoDeprecatedUpstream]);
    assert_eq!(v.len(), 1);
    assert_eq!(v[0].node, "prod:api");
    assert_eq!(v[0].path, vec!["prod:api", "ml:m@1", "shop:customers"]);

    let v = g.check(&[&ServedModelsEvaluated]);
    assert_eq!(v.len(), 1);
    assert_eq!(v[0].node, "ml:m@1");
    let mv = g.get::<nodes::ModelVersion>(&k("ml:m@1")).unwrap();
    let ev = g
        .upsert::<nodes::Evaluation>(NodeSpec::new(NodeKind::Evaluation, "ml", "m@1-eval"))
        .unwrap();
    g.connect(ev, edges::Evaluates, mv).unwrap();
    assert!(g.check(&[&ServedModelsEvaluated]).is_empty());

    let custom = FnPolicy::new("services-have-tier", |g: &LineageGraph| {
        g.search(&Search::new().kind(NodeKind::Service))
            .into_iter()
            .filter(|s| !s.tags.iter().any(|t| t.starts_with("tier-")))
            .map(|s| Violation {
                policy: "services-have-tier".into(),
                node: s.key.to_string(),
                message: "no tier".into(),
                path: vec![],
            })
            .collect()
    });
    assert_eq!(g.check(&[&custom]).len(), 1);
}

#[test]
fn discovery() {
    let mut g = graph();
    let m = g.search(&Search::new().text("MARKET"));
    assert_eq!(m.len(), 4);
    assert_eq!(g.search(&Search::new().kind(NodeKind::Service)).len(), 1);
    assert_eq!(g.search(&Search::new().tag("pii")).len(), 1);
    assert_eq!(g.search(&Search::new().owner("ml")).len(), 1);
    assert!(g.search(&Search::new().tag("no-such-tag")).is_empty());
    let c = g.find(&k("shop:customers")).unwrap();
    g.set_status(c, Status::Retired).unwrap();
    assert_eq!(g.search(&Search::new().status(Status::Retired)).len(), 1);
    assert_eq!(g.search(&Search::new().text("shop").limit(2)).len(), 2);
    let orphans: Vec<String> = g.orphans().into_iter().map(|n| n.key.to_string()).collect();
    assert_eq!(orphans, vec!["fs:email_len"]);
    let roots: Vec<String> = g.roots().into_iter().map(|n| n.key.to_string()).collect();
    assert_eq!(roots, vec!["shop:customers"]);
}
