//! Typed schema, typed handles, the dynamic API and metadata.
#![allow(clippy::unwrap_used)] // Test helpers: a failed unwrap is a failed test.

use keel_lineage::*;

fn ds(ns: &str, name: &str) -> NodeSpec {
    NodeSpec::new(NodeKind::Dataset, ns, name)
}

fn key(s: &str) -> NodeKey {
    NodeKey::parse(s).unwrap()
}

#[test]
fn typed_edges_and_metadata() {
    let mut g = LineageGraph::new();
    let d = g
        .upsert::<nodes::Dataset>(
            ds("shop", "orders")
                .owner("data-eng")
                .tag("pii")
                .tag("tier-1")
                .description("all orders")
                .property("rows", serde_json::json!(42))
                .field(FieldSpec::new("id", Some("INTEGER"))),
        )
        .unwrap();
    let f = g
        .upsert::<nodes::Feature>(NodeSpec::new(NodeKind::Feature, "fs", "order_count"))
        .unwrap();
    g.connect(f, edges::DerivedFrom, d).unwrap();
    let info = g.info(d).unwrap();
    assert_eq!(info.owner.as_deref(), Some("data-eng"));
    assert_eq!(info.tags, vec!["pii".to_owned(), "tier-1".to_owned()]);
    assert_eq!(info.status, Status::Active);
    assert_eq!(info.description.as_deref(), Some("all orders"));
    assert_eq!(info.properties["rows"], serde_json::json!(42));
    let fields = g.fields_of(d).unwrap();
    assert_eq!(fields.len(), 1);
    let field = g.info(fields[0]).unwrap();
    assert_eq!(field.key.to_string(), "shop:orders#id");
    assert_eq!(field.data_type.as_deref(), Some("INTEGER"));
    assert_eq!(g.node_count(), 3);
    assert_eq!(g.edge_count(), 2);
    // Upsert merges: tags are added, owner replaced, status set.
    g.upsert::<nodes::Dataset>(
        ds("shop", "orders")
            .owner("platform")
            .tag("gold")
            .status(Status::Deprecated),
    )
    .unwrap();
    let info = g.info(d).unwrap();
    assert_eq!(info.owner.as_deref(), Some("platform"));
    assert_eq!(info.tags.len(), 3);
    assert_eq!(info.status, Status::Deprecated);
    assert_eq!(g.node_count(), 3);
}

#[test]
fn schema_violations_are_refused_and_nothing_is_applied() {
    let mut g = LineageGraph::new();
    let d = g.upsert_dyn(ds("ns", "d")).unwrap();
    let s = g
        .upsert_dyn(NodeSpec::new(NodeKind::Service, "ns", "svc"))
        .unwrap();
    let r = g.connect_dyn(s, EdgeKind::Serves, d, None);
    assert!(
        matches!(r, Err(Error::SchemaViolation { ref from, edge: EdgeKind::Serves, .. }) if from == "ns:svc")
    );
    assert_eq!(g.edge_count(), 0);
    // A batch whose last change is bad leaves no trace.
    let before = g.commit_count();
    let r = g.commit(vec![
        Change::Upsert(ds("ns", "e")),
        Change::link(key("ns:svc"), EdgeKind::Serves, key("ns:e")),
    ]);
    assert!(matches!(r, Err(Error::SchemaViolation { .. })));
    assert_eq!(g.commit_count(), before);
    assert!(matches!(
        g.find(&key("ns:e")),
        Err(Error::UnknownNode { .. })
    ));
}

#[test]
fn unknown_keys_kind_mismatches_and_bad_keys_are_typed_errors() {
    let mut g = LineageGraph::new();
    g.upsert_dyn(ds("ns", "d")).unwrap();
    assert!(matches!(g.find_str("ns:nope"), Err(Error::UnknownNode { key }) if key == "ns:nope"));
    assert!(matches!(
        g.find_str("no-colon"),
        Err(Error::InvalidKey { .. })
    ));
    assert!(matches!(
        g.get::<nodes::Service>(&key("ns:d")),
        Err(Error::KindMismatch {
            existing: NodeKind::Dataset,
            requested: NodeKind::Service,
            ..
        })
    ));
    let r = g.commit(vec![Change::Upsert(NodeSpec::new(
        NodeKind::Model,
        "ns",
        "d",
    ))]);
    assert!(matches!(r, Err(Error::KindMismatch { .. })));
    let r = g.commit(vec![Change::link(
        key("ns:d"),
        EdgeKind::DerivedFrom,
        key("ns:ghost"),
    )]);
    assert!(matches!(r, Err(Error::UnknownNode { key }) if key == "ns:ghost"));
    let r = g.commit(vec![Change::Upsert(NodeSpec::new(
        NodeKind::Dataset,
        "",
        "x",
    ))]);
    assert!(matches!(r, Err(Error::InvalidKey { .. })));
    let r = g.commit(vec![Change::Upsert(
        NodeSpec::new(NodeKind::Service, "ns", "s").field(FieldSpec::new("f", None)),
    )]);
    assert!(matches!(r, Err(Error::InvalidChange { .. })));
    let r = g.commit(vec![Change::Upsert(NodeSpec::new(
        NodeKind::Custom(3),
        "ns",
        "c",
    ))]);
    assert!(matches!(r, Err(Error::UnknownKind { .. })));
}

#[test]
fn namespaces_with_colons_resolve() {
    let mut g = LineageGraph::new();
    let id = g
        .upsert_dyn(ds("hive://localhost:9083", "test.t1"))
        .unwrap();
    assert_eq!(g.find_str("hive://localhost:9083:test.t1").unwrap(), id);
    assert_eq!(g.key(id).unwrap().namespace(), "hive://localhost:9083");
}

#[test]
fn user_defined_kinds() {
    let mut schema = Schema::default();
    let notebook = schema.define_node_kind("Notebook").unwrap();
    let explores = schema.define_edge_kind("explores", Flow::Reverse).unwrap();
    schema.allow(notebook, explores, NodeKind::Dataset);
    let mut g = LineageGraph::with_schema(schema);
    let d = g.upsert_dyn(ds("ns", "d")).unwrap();
    let n = g.upsert_dyn(NodeSpec::new(notebook, "ns", "nb")).unwrap();
    g.connect_dyn(n, explores, d, None).unwrap();
    assert!(matches!(
        g.connect_dyn(d, explores, n, None),
        Err(Error::SchemaViolation { .. })
    ));
    let down = g.walk(d, &Walk::downstream()).unwrap();
    assert_eq!(down.ids().collect::<Vec<_>>(), vec![n]);
    assert_eq!(g.info(n).unwrap().kind_name, "Notebook");
}

#[test]
fn transformations_only_on_field_edges() {
    let mut g = LineageGraph::new();
    g.upsert_dyn(ds("ns", "a")).unwrap();
    g.upsert_dyn(ds("ns", "b")).unwrap();
    let r = g.commit(vec![Change::Link {
        from: key("ns:b"),
        edge: EdgeKind::DerivedFrom,
        to: key("ns:a"),
        transformation: Some(Transformation::identity()),
    }]);
    assert!(matches!(r, Err(Error::InvalidChange { .. })));
}
