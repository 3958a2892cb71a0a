//! Impact analysis at node and field granularity.
#![allow(clippy::unwrap_used)] // Test helpers: a failed unwrap is a failed test.

use keel_lineage::*;

fn k(s: &str) -> NodeKey {
    NodeKey::parse(s).unwrap()
}

/// orders(customer_email, id) -> delivery(customer_email) via column lineage;
/// a feature derived from delivery.customer_email; a model version trained on the feature,
/// served by a tier-1 service; a report workflow reading orders at dataset level only.
fn shop() -> LineageGraph {
    let mut g = LineageGraph::new();
    g.commit(vec![
        Change::Upsert(
            NodeSpec::new(NodeKind::Dataset, "shop", "orders")
                .owner("orders-team")
                .field(FieldSpec::new("customer_email", Some("VARCHAR")))
                .field(FieldSpec::new("id", Some("INTEGER"))),
        ),
        Change::Upsert(
            NodeSpec::new(NodeKind::Dataset, "shop", "delivery")
                .owner("logistics")
                .field(FieldSpec::new("customer_email", Some("VARCHAR")))
                .field(FieldSpec::new("order_id", Some("INTEGER"))),
        ),
        Change::Link {
            from: k("shop:delivery#customer_email"),
            edge: EdgeKind::DerivedFrom,
            to: k("shop:orders#customer_email"),
            transformation: Some(Transformation::identity()),
        },
        Change::Link {
            from: k("shop:delivery#order_id"),
            edge: EdgeKind::DerivedFrom,
            to: k("shop:orders#id"),
            transformation: Some(Transformation::identity()),
        },
        Change::link(k("shop:delivery"), EdgeKind::DerivedFrom, k("shop:orders")),
        Change::Upsert(NodeSpec::new(NodeKind::Feature, "fs", "email_domain").owner("ml")),
        Change::link(
            k("fs:email_domain"),
            EdgeKind::DerivedFrom,
            k("shop:delivery#customer_email"),
        ),
        Change::Upsert(NodeSpec::new(NodeKind::ModelVersion, "ml", "churn@3").owner("ml")),
        Change::link(k("ml:churn@3"), EdgeKind::TrainedOn, k("fs:email_domain")),
        Change::Upsert(
            NodeSpec::new(NodeKind::Service, "prod", "churn-api")
                .tag("tier-1")
                .owner("sre"),
        ),
        Change::link(k("prod:churn-api"), EdgeKind::Serves, k("ml:churn@3")),
        Change::Upsert(NodeSpec::new(NodeKind::Workflow, "bi", "daily-report").owner("bi")),
        Change::link(k("bi:daily-report"), EdgeKind::Reads, k("shop:orders")),
        Change::Upsert(NodeSpec::new(NodeKind::ModelVersion, "ml", "eta@1")),
        Change::link(
            k("ml:eta@1"),
            EdgeKind::TrainedOn,
            k("shop:delivery#order_id"),
        ),
    ])
    .unwrap();
    g
}

fn impacts(r: &ImpactReport) -> Vec<(String, Impact)> {
    let mut v: Vec<(String, Impact)> = r
        .affected
        .iter()
        .map(|a| (a.key.clone(), a.impact))
        .collect();
    v.sort();
    v
}

fn check(r: &ImpactReport, expected: &[(&str, Impact)]) {
    let mut e: Vec<(String, Impact)> = expected.iter().map(|(k, i)| (k.to_string(), *i)).collect();
    e.sort();
    assert_eq!(impacts(r), e);
}

#[test]
fn dropping_a_field_breaks_its_real_consumers_and_informs_the_rest() {
    let g = shop();
    let email = g
        .get::<nodes::Field>(&k("shop:orders#customer_email"))
        .unwrap();
    let r = g.impact(&ProposedChange::DropField(email)).unwrap();
    use Impact::*;
    check(
        &r,
        &[
            ("shop:orders", Breaks),
            ("shop:delivery#customer_email", Breaks),
            ("shop:delivery", Breaks),
            ("fs:email_domain", Breaks),
            ("ml:churn@3", Breaks),
            ("prod:churn-api", Breaks),
            ("bi:daily-report", Informed),
        ],
    );
    // The eta model uses another column of delivery only: untouched.
    assert!(!r.affected.iter().any(|a| a.key == "ml:eta@1"));
    let top = &r.affected[0];
    assert_eq!(top.key, "prod:churn-api");
    assert_eq!(top.severity, Severity::Critical);
    assert_eq!(
        top.path,
        vec![
            "shop:orders#customer_email",
            "shop:delivery#customer_email",
            "fs:email_domain",
            "ml:churn@3",
            "prod:churn-api"
        ]
    );
    assert_eq!(top.distance, 4);
    assert_eq!(r.services.len(), 1);
    assert_eq!(r.services[0].tier.as_deref(), Some("tier-1"));
    assert_eq!(r.summary.breaks, 6);
    assert_eq!(r.summary.informed, 1);
    assert_eq!(r.summary.max_severity, Some(Severity::Critical));
    let owners: Vec<&str> = r.owners.iter().map(|o| o.owner.as_str()).collect();
    assert!(owners.contains(&"sre") && owners.contains(&"bi") && owners.contains(&"ml"));
    assert_eq!(
        r.owners.iter().find(|o| o.owner == "bi").unwrap().informed,
        1
    );
    // Severity ranking is monotone.
    assert!(
        r.affected
            .windows(2)
            .all(|w| w[0].severity >= w[1].severity)
    );
    // JSON round trip.
    let json: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
    assert_eq!(json["affected"][0]["impact"], "breaks");
    assert_eq!(json["summary"]["max_severity"], "critical");
    for change in [
        ProposedChange::RenameField(email, "email".into()),
        ProposedChange::RetypeField(email, "TEXT".into()),
    ] {
        assert_eq!(impacts(&g.impact(&change).unwrap()), impacts(&r));
    }
}

#[test]
fn retire_breaks_and_deprecate_informs_everything_downstream() {
    let g = shop();
    let orders = g.find(&k("shop:orders")).unwrap();
    let retire = g.impact(&ProposedChange::Retire(orders)).unwrap();
    assert!(retire.affected.iter().all(|a| a.impact == Impact::Breaks));
    assert!(retire.affected.iter().any(|a| a.key == "ml:eta@1"));
    assert!(retire.affected.iter().any(|a| a.key == "prod:churn-api"));
    let dep = g.impact(&ProposedChange::Deprecate(orders)).unwrap();
    assert!(dep.affected.iter().all(|a| a.impact == Impact::Informed));
    assert!(dep.affected.iter().any(|a| a.key == "prod:churn-api"));
    assert_eq!(dep.summary.max_severity, Some(Severity::Medium));
}

#[test]
fn replacing_a_served_model_version() {
    let mut g = shop();
    let svc = g.get::<nodes::Service>(&k("prod:churn-api")).unwrap();
    let v4 = g
        .upsert::<nodes::ModelVersion>(NodeSpec::new(NodeKind::ModelVersion, "ml", "churn@4"))
        .unwrap();
    let r = g
        .impact(&ProposedChange::ReplaceModelVersion {
            service: svc,
            new_version: v4,
        })
        .unwrap();
    assert!(
        r.notes
            .iter()
            .any(|n| n.contains("ml:churn@4 has no evaluation"))
    );
    assert!(r.notes.iter().any(|n| n.contains("ml:churn@3")));
    let ev = g
        .upsert::<nodes::Evaluation>(NodeSpec::new(NodeKind::Evaluation, "ml", "churn@4-eval"))
        .unwrap();
    g.connect(ev, edges::Evaluates, v4).unwrap();
    let r = g
        .impact(&ProposedChange::ReplaceModelVersion {
            service: svc,
            new_version: v4,
        })
        .unwrap();
    assert!(!r.notes.iter().any(|n| n.contains("no evaluation")));
}

#[test]
fn budgets_flag_partial_reports() {
    let g = shop();
    let orders = g.find(&k("shop:orders")).unwrap();
    let set = g
        .impact_set(
            &ProposedChange::Retire(orders),
            &Budget::unlimited().max_nodes(2),
        )
        .unwrap();
    assert!(set.is_partial());
    assert!(set.len() <= 2);
    let set = g
        .impact_set(
            &ProposedChange::Retire(orders),
            &Budget::unlimited().max_depth(1),
        )
        .unwrap();
    assert!(set.iter().all(|(_, _, d)| d <= 1));
    assert!(!set.is_partial());
}

#[test]
fn unknown_nodes_are_errors() {
    let g = shop();
    let mut other = LineageGraph::new();
    for i in 0..40 {
        other
            .upsert_dyn(NodeSpec::new(NodeKind::Dataset, "x", format!("d{i}")))
            .unwrap();
    }
    let foreign = other.find(&k("x:d39")).unwrap();
    assert!(matches!(
        g.impact(&ProposedChange::Retire(foreign)),
        Err(Error::UnknownNode { .. })
    ));
}
