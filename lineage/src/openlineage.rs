//! OpenLineage RunEvent ingestion: jobs, runs, datasets with `schema`, `columnLineage`,
//! `ownership` and `tags` facets, turned into one atomic [`Batch`] per event.

use std::collections::{BTreeMap, HashSet};

use serde_json::Value;

use crate::change::{Batch, Change, FieldSpec, NodeKey, NodeSpec};
use crate::error::{Error, Result};
use crate::schema::{EdgeKind, NodeKind, TransformKind, Transformation};
use crate::time::Timestamp;

/// How strictly to read OpenLineage events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenLineageOptions {
    strict: bool,
    template_base: Option<Timestamp>,
}

impl Default for OpenLineageOptions {
    fn default() -> Self {
        Self {
            strict: true,
            template_base: None,
        }
    }
}

impl OpenLineageOptions {
    /// Strict RunEvent validation: `eventTime` (RFC 3339), `producer`, `run.runId`,
    /// `job.namespace` and `job.name` are required.
    pub fn strict() -> Self {
        Self::default()
    }

    /// Lenient reading for fragments such as integration-test expectations: only the job is
    /// required; a missing time means "now" and a missing run id means no run node.
    pub fn lenient() -> Self {
        Self {
            strict: false,
            template_base: None,
        }
    }

    /// Replaces Marquez seed placeholders before parsing: `{{RUN_START_TIME}}` becomes
    /// `base`, and `{{RUN_END_TIME_AFTER_N_MINUTES}}` becomes `base` plus N minutes.
    pub fn resolve_templates(mut self, base: Timestamp) -> Self {
        self.template_base = Some(base);
        self
    }
}

/// Replaces `{{RUN_START_TIME}}` and `{{RUN_END_TIME_AFTER_N_MINUTES}}` placeholders.
/// Unknown placeholders are left as they are (and then fail time validation).
pub fn resolve_marquez_templates(text: &str, base: Timestamp) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find("}}") else {
            out.push_str(&rest[start..]);
            return out;
        };
        let name = &after[..end];
        let replacement = if name == "RUN_START_TIME" {
            Some(base)
        } else {
            name.strip_prefix("RUN_END_TIME_AFTER_")
                .and_then(|m| m.strip_suffix("_MINUTES"))
                .and_then(|m| m.parse::<i64>().ok())
                .map(|m| base.plus_minutes(m))
        };
        match replacement {
            Some(t) => out.push_str(&t.to_rfc3339()),
            None => out.push_str(&rest[start..start + 4 + end]),
        }
        rest = &after[end + 2..];
    }
    out.push_str(rest);
    out
}

/// Splits a document into JSON events: a single event object, a JSON array of events, or
/// one event per line.
///
/// # Errors
/// [`Error::MalformedJson`] naming `origin` and the position.
pub(crate) fn split_events(text: &str, origin: &str) -> Result<Vec<Value>> {
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Array(v)) => Ok(v),
        Ok(v) => Ok(vec![v]),
        Err(whole) => {
            let lines: Vec<(usize, &str)> = text
                .lines()
                .enumerate()
                .filter(|(_, l)| !l.trim().is_empty())
                .collect();
            let first_ok = lines
                .first()
                .is_some_and(|(_, l)| serde_json::from_str::<Value>(l).is_ok());
            if lines.len() < 2 || !first_ok {
                return Err(Error::json(origin, &whole));
            }
            lines
                .into_iter()
                .map(|(n, l)| {
                    serde_json::from_str::<Value>(l).map_err(|e| Error::MalformedJson {
                        origin: origin.to_owned(),
                        line: n + 1,
                        column: e.column(),
                        message: e.to_string(),
                    })
                })
                .collect()
        }
    }
}

/// Parses OpenLineage RunEvents from `text` (one event, an array, or JSON lines) into one
/// [`Batch`] per event. Nothing is applied; validation of the whole document happens first,
/// so a bad event means no batch is returned at all.
///
/// # Errors
/// [`Error::MalformedJson`] for bad JSON, [`Error::InvalidEvent`] for an event that breaks
/// the OpenLineage schema (naming `origin` and the event index).
pub fn parse_openlineage(
    text: &str,
    origin: &str,
    opts: &OpenLineageOptions,
) -> Result<Vec<Batch>> {
    let resolved;
    let text = match opts.template_base {
        Some(base) if text.contains("{{") => {
            resolved = resolve_marquez_templates(text, base);
            resolved.as_str()
        }
        _ => text,
    };
    let events = split_events(text, origin)?;
    events
        .iter()
        .enumerate()
        .map(|(i, ev)| {
            event_to_batch(ev, opts)
                .map_err(|reason| Error::InvalidEvent {
                    origin: origin.to_owned(),
                    index: i,
                    reason,
                })
                .map(|(time, changes)| Batch::new(format!("{origin} event {i}"), time, changes))
        })
        .collect()
}

fn str_at<'a>(v: &'a Value, field: &str, ctx: &str) -> std::result::Result<&'a str, String> {
    match v.get(field) {
        Some(Value::String(s)) if !s.is_empty() => Ok(s),
        Some(Value::String(_)) => Err(format!("{ctx}.{field} is empty")),
        Some(_) => Err(format!("{ctx}.{field} is not a string")),
        None => Err(format!("{ctx}.{field} is missing")),
    }
}

fn owner_of(facets: Option<&Value>) -> Option<String> {
    let owners = facets?.get("ownership")?.get("owners")?.as_array()?;
    owners
        .iter()
        .find_map(|o| o.get("name").and_then(Value::as_str))
        .map(str::to_owned)
}

fn tags_of(facets: Option<&Value>) -> Vec<String> {
    let Some(tags) = facets
        .and_then(|f| f.get("tags"))
        .and_then(|t| t.get("tags"))
        .and_then(Value::as_array)
    else {
        return Vec::new();
    };
    tags.iter().filter_map(tag_text).collect()
}

fn tag_text(t: &Value) -> Option<String> {
    match t {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Object(o) => {
            let key = o.get("key").or_else(|| o.get("name"))?.as_str()?;
            match o.get("value").and_then(Value::as_str) {
                Some(v) if !v.is_empty() && v != "true" => Some(format!("{key}:{v}")),
                _ => Some(key.to_owned()),
            }
        }
        _ => None,
    }
}

fn description_of(facets: Option<&Value>) -> Option<String> {
    facets?
        .get("documentation")?
        .get("description")?
        .as_str()
        .map(str::to_owned)
}

fn transformation(v: &Value, strict: bool) -> std::result::Result<Option<Transformation>, String> {
    let Some(list) = v.get("transformations") else {
        return Ok(None);
    };
    let list = list.as_array().ok_or("transformations is not an array")?;
    let mut out: Option<Transformation> = None;
    for t in list {
        let kind = match t.get("type").and_then(Value::as_str) {
            Some("DIRECT") => TransformKind::Direct,
            Some("INDIRECT") => TransformKind::Indirect,
            other if strict => {
                return Err(format!(
                    "transformation type {other:?} is not DIRECT or INDIRECT"
                ));
            }
            _ => TransformKind::Direct,
        };
        let sub = t
            .get("subtype")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty());
        let masking = t.get("masking").and_then(Value::as_bool).unwrap_or(false);
        let tr = Transformation::new(kind, sub).masking(masking);
        out = Some(match out {
            Some(o) => o.merge(&tr),
            None => tr,
        });
    }
    Ok(out)
}

struct DatasetRef {
    spec: NodeSpec,
}

fn dataset(v: &Value, ctx: &str) -> std::result::Result<DatasetRef, String> {
    if !v.is_object() {
        return Err(format!("{ctx} is not an object"));
    }
    let ns = str_at(v, "namespace", ctx)?;
    let name = str_at(v, "name", ctx)?;
    let facets = v.get("facets");
    let mut spec = NodeSpec::new(NodeKind::Dataset, ns, name);
    spec.owner = owner_of(facets);
    spec.tags = tags_of(facets);
    spec.description = description_of(facets);
    if let Some(fields) = facets
        .and_then(|f| f.get("schema"))
        .and_then(|s| s.get("fields"))
    {
        let fields = fields
            .as_array()
            .ok_or_else(|| format!("{ctx}.facets.schema.fields is not an array"))?;
        for (j, f) in fields.iter().enumerate() {
            let fname = str_at(f, "name", &format!("{ctx}.facets.schema.fields[{j}]"))?;
            let mut fs = FieldSpec::new(fname, f.get("type").and_then(Value::as_str));
            if let Some(d) = f.get("description").and_then(Value::as_str) {
                fs.description = Some(d.to_owned());
            }
            if let Some(tags) = f.get("tags").and_then(Value::as_array) {
                fs.tags = tags.iter().filter_map(tag_text).collect();
            }
            spec.fields.push(fs);
        }
    }
    Ok(DatasetRef { spec })
}

type EventResult = std::result::Result<(Option<Timestamp>, Vec<Change>), String>;

fn event_to_batch(ev: &Value, opts: &OpenLineageOptions) -> EventResult {
    if !ev.is_object() {
        return Err("event is not a JSON object".to_owned());
    }
    let strict = opts.strict;
    let time = match ev.get("eventTime") {
        Some(Value::String(s)) => match Timestamp::parse_rfc3339(s) {
            Some(t) => Some(t),
            None => return Err(format!("eventTime {s:?} is not an RFC 3339 date-time")),
        },
        Some(_) => return Err("eventTime is not a string".to_owned()),
        None if strict => return Err("eventTime is missing".to_owned()),
        None => None,
    };
    if strict {
        str_at(ev, "producer", "event")?;
    }
    if let Some(t) = ev.get("eventType") {
        match t.as_str() {
            Some("START" | "RUNNING" | "COMPLETE" | "ABORT" | "FAIL" | "OTHER") => {}
            _ => return Err(format!("eventType {t} is not a known run state")),
        }
    }
    let job = ev.get("job").ok_or("job is missing")?;
    if !job.is_object() {
        return Err("job is not an object".to_owned());
    }
    let job_ns = str_at(job, "namespace", "job")?;
    let job_name = str_at(job, "name", "job")?;
    let run_id = match ev.get("run").map(|r| r.get("runId")) {
        Some(Some(Value::String(s))) if !s.is_empty() => Some(s.as_str()),
        Some(Some(_)) => return Err("run.runId is not a non-empty string".to_owned()),
        _ if strict => return Err("run.runId is missing".to_owned()),
        _ => None,
    };
    let job_facets = job.get("facets");
    let mut job_spec = NodeSpec::new(NodeKind::Workflow, job_ns, job_name);
    job_spec.owner = owner_of(job_facets);
    job_spec.tags = tags_of(job_facets);
    job_spec.description = description_of(job_facets);
    let job_key = job_spec.key.clone();
    let mut changes = vec![Change::Upsert(job_spec)];
    if let Some(id) = run_id {
        let run = NodeSpec::new(NodeKind::Run, job_ns, format!("{job_name}/run/{id}"));
        let run_key = run.key.clone();
        changes.push(Change::Upsert(run));
        changes.push(Change::link(run_key, EdgeKind::InstanceOf, job_key.clone()));
    }
    let list = |name: &str| -> std::result::Result<Vec<DatasetRef>, String> {
        match ev.get(name) {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(Value::Array(a)) => a
                .iter()
                .enumerate()
                .map(|(i, d)| dataset(d, &format!("{name}[{i}]")))
                .collect(),
            Some(_) => Err(format!("{name} is not an array")),
        }
    };
    let inputs = list("inputs")?;
    let outputs = list("outputs")?;
    let declared: HashSet<NodeKey> = inputs
        .iter()
        .chain(&outputs)
        .map(|d| d.spec.key.clone())
        .collect();
    let mut links = Vec::new();
    // Undeclared datasets named by column lineage, with the fields named on them.
    let mut placeholders: BTreeMap<NodeKey, Vec<String>> = BTreeMap::new();
    let mut extra_out_fields: BTreeMap<NodeKey, Vec<String>> = BTreeMap::new();
    for (oi, out) in ev
        .get("outputs")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .enumerate()
    {
        let Some(cl) = out.get("facets").and_then(|f| f.get("columnLineage")) else {
            continue;
        };
        let out_key = outputs[oi].spec.key.clone();
        let out_fields: HashSet<&str> = outputs[oi]
            .spec
            .fields
            .iter()
            .map(|f| f.name.as_str())
            .collect();
        let ctx = format!("outputs[{oi}].facets.columnLineage");
        let mut input_ref =
            |r: &Value, rctx: &str| -> std::result::Result<(NodeKey, String), String> {
                let ns = str_at(r, "namespace", rctx)?;
                let name = str_at(r, "name", rctx)?;
                let field = str_at(r, "field", rctx)?;
                let key = NodeKey::new(ns, name);
                if !declared.contains(&key) {
                    placeholders
                        .entry(key.clone())
                        .or_default()
                        .push(field.to_owned());
                }
                Ok((key, field.to_owned()))
            };
        if let Some(fields) = cl.get("fields") {
            let fields = fields
                .as_object()
                .ok_or_else(|| format!("{ctx}.fields is not an object"))?;
            for (fname, spec) in fields {
                if !out_fields.contains(fname.as_str()) {
                    extra_out_fields
                        .entry(out_key.clone())
                        .or_default()
                        .push(fname.clone());
                }
                let inputs = spec
                    .get("inputFields")
                    .and_then(Value::as_array)
                    .ok_or_else(|| {
                        format!("{ctx}.fields.{fname}.inputFields is missing or not an array")
                    })?;
                for (k, r) in inputs.iter().enumerate() {
                    let rctx = format!("{ctx}.fields.{fname}.inputFields[{k}]");
                    let (in_key, in_field) = input_ref(r, &rctx)?;
                    links.push(Change::Link {
                        from: NodeKey::field(out_key.namespace(), out_key.name(), fname),
                        edge: EdgeKind::DerivedFrom,
                        to: NodeKey::field(in_key.namespace(), in_key.name(), &in_field),
                        transformation: Some(transformation(r, strict)?.unwrap_or_default()),
                    });
                }
            }
        }
        if let Some(ds) = cl.get("dataset") {
            let ds = ds
                .as_array()
                .ok_or_else(|| format!("{ctx}.dataset is not an array"))?;
            for (k, r) in ds.iter().enumerate() {
                let rctx = format!("{ctx}.dataset[{k}]");
                let (in_key, in_field) = input_ref(r, &rctx)?;
                links.push(Change::Link {
                    from: out_key.clone(),
                    edge: EdgeKind::DerivedFrom,
                    to: NodeKey::field(in_key.namespace(), in_key.name(), &in_field),
                    transformation: Some(
                        transformation(r, strict)?
                            .unwrap_or_else(|| Transformation::new(TransformKind::Indirect, None)),
                    ),
                });
            }
        }
    }
    for d in &inputs {
        changes.push(Change::Upsert(d.spec.clone()));
        changes.push(Change::link(
            job_key.clone(),
            EdgeKind::Reads,
            d.spec.key.clone(),
        ));
    }
    for d in &outputs {
        let mut spec = d.spec.clone();
        for f in extra_out_fields.remove(&spec.key).unwrap_or_default() {
            spec.fields.push(FieldSpec::new(f, None));
        }
        changes.push(Change::Upsert(spec.clone()));
        changes.push(Change::link(job_key.clone(), EdgeKind::Writes, spec.key));
    }
    for (key, mut fields) in placeholders {
        fields.sort();
        fields.dedup();
        let mut spec = NodeSpec::with_key(NodeKind::Dataset, key).placeholder();
        spec.fields = fields
            .into_iter()
            .map(|f| FieldSpec::new(f, None))
            .collect();
        changes.push(Change::Upsert(spec));
    }
    // Fields named by column lineage on declared inputs but missing from their schema.
    let mut missing_in: BTreeMap<NodeKey, Vec<String>> = BTreeMap::new();
    for l in &links {
        if let Change::Link { to, .. } = l
            && let Some((ds, f)) = to.split_field()
            && let Some(d) = inputs.iter().chain(&outputs).find(|d| d.spec.key == ds)
            && !d.spec.fields.iter().any(|x| x.name == f)
        {
            missing_in.entry(ds).or_default().push(f.to_owned());
        }
    }
    for (key, mut fields) in missing_in {
        fields.sort();
        fields.dedup();
        let mut spec = NodeSpec::with_key(NodeKind::Dataset, key);
        spec.fields = fields
            .into_iter()
            .map(|f| FieldSpec::new(f, None))
            .collect();
        changes.push(Change::Upsert(spec));
    }
    changes.extend(links);
    Ok((time, changes))
}
