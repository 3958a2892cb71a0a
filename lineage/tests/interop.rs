//! OpenLineage and dbt ingestion, on our own small inputs and on the real files in
//! `../shared/data/lineage/` (skipped with a message when that folder is absent).
#![allow(clippy::unwrap_used)] // Test helpers: a failed unwrap is a failed test.

use std::path::PathBuf;

use keel_lineage::*;

fn k(s: &str) -> NodeKey {
    NodeKey::parse(s).unwrap()
}

fn real(name: &str) -> Option<String> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/data/lineage")
        .join(name);
    match std::fs::read_to_string(&p) {
        Ok(s) => Some(s),
        Err(_) => {
            eprintln!(
                "skipping: {} not found (see shared/data/lineage/SOURCES.md)",
                p.display()
            );
            None
        }
    }
}

const EVENT: &str = r#"{
  "eventType": "COMPLETE", "eventTime": "2024-01-02T03:04:05.000Z",
  "producer": "test", "schemaURL": "https://openlineage.io/spec/2-0-2/OpenLineage.json#/definitions/RunEvent",
  "run": {"runId": "r1"},
  "job": {"namespace": "etl", "name": "build_marketing",
          "facets": {"ownership": {"owners": [{"name": "team:growth", "type": "TEAM"}]},
                     "tags": {"tags": [{"key": "tier", "value": "1"}]}}},
  "inputs": [{"namespace": "pg", "name": "public.customers",
              "facets": {"schema": {"fields": [{"name": "email", "type": "VARCHAR"}]},
                         "tags": {"tags": [{"key": "pii", "value": "true"}]}}}],
  "outputs": [{"namespace": "pg", "name": "public.marketing",
               "facets": {"schema": {"fields": [{"name": "email_hash", "type": "VARCHAR"}]},
                          "columnLineage": {"fields": {"email_hash": {"inputFields": [
                              {"namespace": "pg", "name": "public.customers", "field": "email",
                               "transformations": [{"type": "DIRECT", "subtype": "TRANSFORMATION", "masking": true}]},
                              {"namespace": "pg", "name": "public.salt", "field": "value"}]}}}}}]
}"#;

#[test]
fn an_event_becomes_jobs_runs_datasets_fields_and_column_lineage() {
    let mut g = LineageGraph::new();
    let batches = parse_openlineage(EVENT, "event.json", &OpenLineageOptions::strict()).unwrap();
    assert_eq!(batches.len(), 1);
    assert_eq!(
        batches[0].time(),
        Timestamp::parse_rfc3339("2024-01-02T03:04:05Z")
    );
    let s = g.apply(batches).unwrap();
    assert_eq!(s.placeholders, 2); // public.salt and its field
    let job = g.info(g.find(&k("etl:build_marketing")).unwrap()).unwrap();
    assert_eq!(job.kind, NodeKind::Workflow);
    assert_eq!(job.owner.as_deref(), Some("team:growth"));
    assert_eq!(job.tags, vec!["tier:1"]);
    let cust = g.info(g.find(&k("pg:public.customers")).unwrap()).unwrap();
    assert_eq!(cust.tags, vec!["pii"]);
    assert!(!cust.placeholder);
    let salt = g.info(g.find(&k("pg:public.salt")).unwrap()).unwrap();
    assert!(salt.placeholder);
    let run = g.find(&k("etl:build_marketing/run/r1")).unwrap();
    assert_eq!(g.kind(run).unwrap(), NodeKind::Run);
    let hash = g.find(&k("pg:public.marketing#email_hash")).unwrap();
    let up = g.edges(hash, Direction::Upstream, At::Latest).unwrap();
    let email_edge = up
        .iter()
        .find(|e| e.to == k("pg:public.customers#email"))
        .unwrap();
    let tr = email_edge.transformation.as_ref().unwrap();
    assert_eq!(tr.kind(), TransformKind::Direct);
    assert!(tr.is_masking());
    // Masking stops pii.
    let email = g.find(&k("pg:public.customers#email")).unwrap();
    let tags = g.propagate_tags(&TagRules::pii());
    assert!(tags.has(g.find(&k("pg:public.customers")).unwrap(), "pii"));
    assert!(!tags.has(hash, "pii"));
    let _ = email;
    // Re-ingesting is idempotent.
    let before = (g.node_count(), g.edge_count());
    g.apply(parse_openlineage(EVENT, "event.json", &OpenLineageOptions::strict()).unwrap())
        .unwrap();
    assert_eq!((g.node_count(), g.edge_count()), before);
}

#[test]
fn malformed_json_names_the_file_and_position() {
    let r = parse_openlineage(
        "{\"job\": {\n  \"name\": }",
        "bad.json",
        &OpenLineageOptions::strict(),
    );
    assert!(
        matches!(r, Err(Error::MalformedJson { ref origin, line: 2, .. }) if origin == "bad.json"),
        "{r:?}"
    );
    let lines = format!("{}\n{{broken\n", EVENT.replace('\n', " "));
    let r = parse_openlineage(&lines, "events.ndjson", &OpenLineageOptions::strict());
    assert!(
        matches!(r, Err(Error::MalformedJson { line: 2, .. })),
        "{r:?}"
    );
    let r = parse_dbt_manifest("[1,", "manifest.json");
    assert!(matches!(r, Err(Error::MalformedJson { .. })));
}

#[test]
fn events_that_break_the_openlineage_schema_are_refused_whole() {
    let no_job = EVENT.replace("\"job\"", "\"jab\"");
    let two = format!("[{EVENT}, {no_job}]");
    let r = parse_openlineage(&two, "two.json", &OpenLineageOptions::strict());
    assert!(
        matches!(r, Err(Error::InvalidEvent { ref origin, index: 1, ref reason }) if origin == "two.json" && reason.contains("job")),
        "{r:?}"
    );
    let no_time = EVENT.replace("\"eventTime\": \"2024-01-02T03:04:05.000Z\",", "");
    assert!(matches!(
        parse_openlineage(&no_time, "x", &OpenLineageOptions::strict()),
        Err(Error::InvalidEvent { ref reason, .. }) if reason.contains("eventTime")
    ));
    assert!(parse_openlineage(&no_time, "x", &OpenLineageOptions::lenient()).is_ok());
    let bad_inputs = EVENT
        .replace("\"inputs\": [", "\"inputs\": {\"x\": [")
        .replace("}}}],\n  \"outputs\"", "}}}]},\n  \"outputs\"");
    assert!(matches!(
        parse_openlineage(&bad_inputs, "x", &OpenLineageOptions::strict()),
        Err(Error::InvalidEvent { .. })
    ));
    let bad_type = EVENT.replace("\"DIRECT\"", "\"SIDEWAYS\"");
    assert!(matches!(
        parse_openlineage(&bad_type, "x", &OpenLineageOptions::strict()),
        Err(Error::InvalidEvent { .. })
    ));
    assert!(matches!(
        parse_openlineage("42", "x", &OpenLineageOptions::strict()),
        Err(Error::InvalidEvent { .. })
    ));
}

#[test]
fn an_event_that_breaks_our_schema_is_applied_entirely_or_not_at_all() {
    let mut g = LineageGraph::new();
    // Someone registered the job's key as a dataset.
    g.upsert_dyn(NodeSpec::new(NodeKind::Dataset, "etl", "build_marketing"))
        .unwrap();
    let first = EVENT
        .replace("build_marketing", "other_job")
        .replace("public.marketing", "public.first");
    let batches = parse_openlineage(
        &format!("[{first}, {EVENT}]"),
        "two.json",
        &OpenLineageOptions::strict(),
    )
    .unwrap();
    let r = g.apply(batches);
    match r {
        Err(Error::Batch {
            ref origin,
            ref source,
        }) => {
            assert_eq!(origin, "two.json event 1");
            assert!(matches!(**source, Error::KindMismatch { .. }));
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(g.find(&k("pg:public.first")).is_ok());
    assert!(g.find(&k("pg:public.marketing")).is_err());
    assert!(g.find(&k("etl:build_marketing/run/r1")).is_err());
}

#[test]
fn json_lines_and_arrays() {
    let one = EVENT.replace('\n', " ");
    let lines = format!("{one}\n\n{}\n", one.replace("r1", "r2"));
    let b = parse_openlineage(&lines, "x.ndjson", &OpenLineageOptions::strict()).unwrap();
    assert_eq!(b.len(), 2);
    let arr = format!("[{one},{one}]");
    assert_eq!(
        parse_openlineage(&arr, "x.json", &OpenLineageOptions::strict())
            .unwrap()
            .len(),
        2
    );
}

#[test]
fn marquez_templates() {
    let base = Timestamp::parse_rfc3339("2024-05-01T00:00:00Z").unwrap();
    let s = resolve_marquez_templates(
        "a {{RUN_START_TIME}} b {{RUN_END_TIME_AFTER_5_MINUTES}} {{OTHER}}",
        base,
    );
    assert_eq!(
        s,
        "a 2024-05-01T00:00:00.000Z b 2024-05-01T00:05:00.000Z {{OTHER}}"
    );
}

#[test]
fn real_marquez_seed() {
    let Some(text) = real("marquez_food_delivery_metadata.template.json") else {
        return;
    };
    // Without resolving the placeholders a strict reader must refuse the file.
    let r = parse_openlineage(&text, "marquez.json", &OpenLineageOptions::strict());
    assert!(
        matches!(r, Err(Error::InvalidEvent { index: 0, ref reason, .. }) if reason.contains("RUN_START_TIME")),
        "{r:?}"
    );
    let base = Timestamp::parse_rfc3339("2024-05-01T00:00:00Z").unwrap();
    let batches = parse_openlineage(
        &text,
        "marquez.json",
        &OpenLineageOptions::strict().resolve_templates(base),
    )
    .unwrap();
    assert_eq!(batches.len(), 26);
    let mut g = LineageGraph::new();
    g.apply(batches).unwrap();
    let jobs = g.search(&Search::new().kind(NodeKind::Workflow));
    assert_eq!(jobs.len(), 13);
    let datasets = g.search(&Search::new().kind(NodeKind::Dataset));
    let declared: Vec<_> = datasets.iter().filter(|d| !d.placeholder).collect();
    assert_eq!(declared.len(), 13);
    let placeholders: Vec<String> = datasets
        .iter()
        .filter(|d| d.placeholder)
        .map(|d| d.key.to_string())
        .collect();
    assert_eq!(placeholders, vec!["food_delivery:public.menu_item_id"]);
    let io_edges: usize = jobs
        .iter()
        .map(|j| {
            g.edges(j.id, Direction::Upstream, At::Latest)
                .unwrap()
                .iter()
                .filter(|e| e.kind == EdgeKind::Reads)
                .count()
                + g.edges(j.id, Direction::Downstream, At::Latest)
                    .unwrap()
                    .iter()
                    .filter(|e| e.kind == EdgeKind::Writes)
                    .count()
        })
        .sum();
    assert_eq!(io_edges, 27);
    let column_edges = g
        .to_subgraph(At::Latest)
        .edges
        .iter()
        .filter(|e| {
            e.kind == EdgeKind::DerivedFrom
                && e.from.name().contains('#')
                && e.to.name().contains('#')
        })
        .count();
    assert_eq!(column_edges, 39);
    // Which consumers does orders.customer_email... customers.email reach?
    let email = g
        .get::<nodes::Field>(&k("food_delivery:public.customers#email"))
        .unwrap();
    let r = g.impact(&ProposedChange::DropField(email)).unwrap();
    let breaks: Vec<&str> = r
        .affected
        .iter()
        .filter(|a| a.impact == Impact::Breaks)
        .map(|a| a.key.as_str())
        .collect();
    assert!(breaks.contains(&"food_delivery:public.delivery_7_days#customer_email"));
    assert!(breaks.contains(&"food_delivery:public.top_delivery_times#customer_email"));
    let times = g
        .info(g.find(&k("food_delivery:etl_orders")).unwrap())
        .unwrap();
    assert!(times.created_at >= base);
}

#[test]
fn real_hive_column_lineage_fixture() {
    let Some(text) = real("openlineage_hive_cll_cte_joins_complete.json") else {
        return;
    };
    assert!(matches!(
        parse_openlineage(&text, "hive.json", &OpenLineageOptions::strict()),
        Err(Error::InvalidEvent { index: 0, .. })
    ));
    let mut g = LineageGraph::new();
    g.apply(parse_openlineage(&text, "hive.json", &OpenLineageOptions::lenient()).unwrap())
        .unwrap();
    let ns = "hive://localhost:9083";
    let a = g.find_str(&format!("{ns}:test.xxx#a")).unwrap();
    let up = g.edges(a, Direction::Upstream, At::Latest).unwrap();
    let direct: Vec<_> = up.iter().filter(|e| e.transformation.is_some()).collect();
    assert_eq!(direct.len(), 1);
    assert_eq!(direct[0].to.to_string(), format!("{ns}:test.t1#a"));
    assert_eq!(
        direct[0].transformation.as_ref().unwrap().subtype(),
        Some("IDENTITY")
    );
    // Dataset-level (INDIRECT) entries: the output depends on the join and filter columns.
    let xxx = g.find_str(&format!("{ns}:test.xxx")).unwrap();
    let ind: Vec<_> = g
        .edges(xxx, Direction::Upstream, At::Latest)
        .unwrap()
        .into_iter()
        .filter(|e| {
            e.transformation
                .as_ref()
                .is_some_and(|t| t.kind() == TransformKind::Indirect)
        })
        .collect();
    assert_eq!(ind.len(), 6);
    let t2a = ind.iter().find(|e| e.to.name() == "test.t2#a").unwrap();
    assert_eq!(
        t2a.transformation.as_ref().unwrap().subtype(),
        Some("JOIN,FILTER")
    );
    // Dropping t1.b (a filter column) breaks the output table.
    let b = g
        .typed::<nodes::Field>(g.find_str(&format!("{ns}:test.t1#b")).unwrap())
        .unwrap();
    let r = g.impact(&ProposedChange::DropField(b)).unwrap();
    assert!(
        r.affected
            .iter()
            .any(|x| x.key == format!("{ns}:test.xxx") && x.impact == Impact::Breaks)
    );
}

#[test]
fn real_dbt_manifest() {
    let Some(text) = real("dbt_jaffle_shop_manifest_v7.json") else {
        return;
    };
    let batch = parse_dbt_manifest(&text, "manifest.json").unwrap();
    let mut g = LineageGraph::new();
    g.apply(vec![batch]).unwrap();
    let ds = g.search(&Search::new().kind(NodeKind::Dataset));
    assert_eq!(ds.len(), 8);
    assert!(ds.iter().all(|d| !d.placeholder));
    let deps = g
        .to_subgraph(At::Latest)
        .edges
        .iter()
        .filter(|e| e.kind == EdgeKind::DerivedFrom)
        .count();
    assert_eq!(deps, 8);
    assert_eq!(g.search(&Search::new().kind(NodeKind::Field)).len(), 23);
    let customers = g.find(&k("postgres:postgres.public.customers")).unwrap();
    let up = g
        .walk(customers, &Walk::upstream().node_kinds([NodeKind::Dataset]))
        .unwrap();
    assert_eq!(up.nodes.len(), 6);
    let roots: Vec<String> = g.roots().into_iter().map(|r| r.key.to_string()).collect();
    assert_eq!(roots.len(), 3);
    assert!(roots.iter().all(|r| r.contains("raw_")));
}

#[test]
fn dbt_manifest_format_errors() {
    assert!(matches!(
        parse_dbt_manifest("{}", "m.json"),
        Err(Error::InvalidEvent { .. })
    ));
    let r = parse_dbt_manifest(r#"{"nodes": {"model.x.a": {"name": "a"}}}"#, "m.json");
    assert!(
        matches!(r, Err(Error::InvalidEvent { ref reason, .. }) if reason.contains("resource_type"))
    );
    let r = parse_dbt_manifest(
        r#"{"nodes": {"model.x.a": {"resource_type": "model", "name": "a", "depends_on": {"nodes": ["model.x.gone"]}}}}"#,
        "m.json",
    )
    .unwrap();
    let mut g = LineageGraph::new();
    let s = g.apply(vec![r]).unwrap();
    assert_eq!(s.placeholders, 1);
}
