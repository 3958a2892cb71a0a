//! dbt `manifest.json` ingestion: models, seeds, snapshots and sources become datasets with
//! their columns; `depends_on` becomes derived-from lineage. One atomic [`Batch`].

use std::collections::HashMap;

use serde_json::Value;

use crate::change::{Batch, Change, FieldSpec, NodeKey, NodeSpec};
use crate::error::{Error, Result};
use crate::openlineage::split_events;
use crate::schema::{EdgeKind, NodeKind};

const ASSETS: [&str; 4] = ["model", "seed", "snapshot", "source"];

/// Parses a dbt manifest into one batch. Datasets are keyed
/// `<adapter_type>:<database>.<schema>.<alias>`; tests, macros and other resources are
/// skipped; a `depends_on` entry that names no asset in the manifest becomes a placeholder.
///
/// # Errors
/// [`Error::MalformedJson`] for bad JSON; [`Error::InvalidEvent`] (index = position of the
/// entry among `nodes` then `sources`) for entries that break the manifest format.
pub fn parse_dbt_manifest(text: &str, origin: &str) -> Result<Batch> {
    let mut docs = split_events(text, origin)?;
    let doc = match (docs.len(), docs.pop()) {
        (1, Some(d)) => d,
        _ => {
            return Err(Error::InvalidEvent {
                origin: origin.to_owned(),
                index: 0,
                reason: "a manifest is one JSON object".to_owned(),
            });
        }
    };
    let bad = |index: usize, reason: String| Error::InvalidEvent {
        origin: origin.to_owned(),
        index,
        reason,
    };
    if !doc.is_object() {
        return Err(bad(0, "manifest is not a JSON object".to_owned()));
    }
    let ns = doc
        .get("metadata")
        .and_then(|m| m.get("adapter_type"))
        .and_then(Value::as_str)
        .unwrap_or("dbt")
        .to_owned();
    let mut entries: Vec<(&String, &Value)> = Vec::new();
    for section in ["nodes", "sources"] {
        match doc.get(section) {
            None | Some(Value::Null) => {}
            Some(Value::Object(m)) => entries.extend(m.iter()),
            Some(_) => return Err(bad(0, format!("{section} is not an object"))),
        }
    }
    if doc.get("nodes").is_none() {
        return Err(bad(0, "manifest has no nodes".to_owned()));
    }
    let mut keys: HashMap<&str, NodeKey> = HashMap::new();
    let mut specs = Vec::new();
    for (i, (id, node)) in entries.iter().enumerate() {
        let rt = node
            .get("resource_type")
            .and_then(Value::as_str)
            .ok_or_else(|| bad(i, format!("{id}: resource_type is missing")))?;
        if !ASSETS.contains(&rt) {
            continue;
        }
        let s = |f: &str| {
            node.get(f)
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
        };
        let name = s("name").ok_or_else(|| bad(i, format!("{id}: name is missing")))?;
        let table = s("alias").or_else(|| s("identifier")).unwrap_or(name);
        let qualified = [s("database"), s("schema"), Some(table)]
            .into_iter()
            .flatten()
            .collect::<Vec<_>>()
            .join(".");
        let mut spec = NodeSpec::new(NodeKind::Dataset, ns.clone(), qualified);
        spec.description = s("description").map(str::to_owned);
        spec.owner = node
            .get("meta")
            .and_then(|m| m.get("owner"))
            .or_else(|| {
                node.get("config")
                    .and_then(|c| c.get("meta"))
                    .and_then(|m| m.get("owner"))
            })
            .and_then(Value::as_str)
            .map(str::to_owned);
        if let Some(tags) = node.get("tags").and_then(Value::as_array) {
            spec.tags = tags
                .iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect();
        }
        spec.properties
            .insert("dbt_unique_id".to_owned(), Value::String((*id).clone()));
        spec.properties
            .insert("dbt_resource_type".to_owned(), Value::String(rt.to_owned()));
        if let Some(m) = node
            .get("config")
            .and_then(|c| c.get("materialized"))
            .and_then(Value::as_str)
        {
            spec.properties
                .insert("materialized".to_owned(), Value::String(m.to_owned()));
        }
        match node.get("columns") {
            None | Some(Value::Null) => {}
            Some(Value::Object(cols)) => {
                for (cname, c) in cols {
                    let mut f =
                        FieldSpec::new(cname.clone(), c.get("data_type").and_then(Value::as_str));
                    f.description = c
                        .get("description")
                        .and_then(Value::as_str)
                        .filter(|d| !d.is_empty())
                        .map(str::to_owned);
                    if let Some(tags) = c.get("tags").and_then(Value::as_array) {
                        f.tags = tags
                            .iter()
                            .filter_map(Value::as_str)
                            .map(str::to_owned)
                            .collect();
                    }
                    spec.fields.push(f);
                }
            }
            Some(_) => return Err(bad(i, format!("{id}: columns is not an object"))),
        }
        keys.insert(id.as_str(), spec.key.clone());
        specs.push((i, *id, *node, spec));
    }
    let mut changes: Vec<Change> = Vec::new();
    let mut links = Vec::new();
    for (i, id, node, spec) in specs {
        let deps = match node.get("depends_on").and_then(|d| d.get("nodes")) {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(a)) => a.iter().collect(),
            Some(_) => return Err(bad(i, format!("{id}: depends_on.nodes is not an array"))),
        };
        for d in deps {
            let d = d
                .as_str()
                .ok_or_else(|| bad(i, format!("{id}: depends_on entry is not a string")))?;
            let target = match keys.get(d) {
                Some(k) => k.clone(),
                None => {
                    let k = NodeKey::new(ns.clone(), d);
                    changes.push(Change::Upsert(
                        NodeSpec::with_key(NodeKind::Dataset, k.clone()).placeholder(),
                    ));
                    k
                }
            };
            links.push(Change::link(
                spec.key.clone(),
                EdgeKind::DerivedFrom,
                target,
            ));
        }
        changes.push(Change::Upsert(spec));
    }
    changes.extend(links);
    let time = doc
        .get("metadata")
        .and_then(|m| m.get("generated_at"))
        .and_then(Value::as_str)
        .and_then(crate::time::Timestamp::parse_rfc3339);
    Ok(Batch::new(origin, time, changes))
}
