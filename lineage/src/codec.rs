//! The store's compact binary encoding of a commit. Decoding never panics and never
//! trusts a length it has not checked against the bytes that remain.

use crate::change::{Change, FieldSpec, NodeKey, NodeSpec};
use crate::schema::{EdgeKind, NodeKind, Status, TransformKind, Transformation};
use crate::time::Timestamp;

const VERSION: u8 = 1;

pub(crate) fn encode(time: Timestamp, changes: &[Change]) -> Vec<u8> {
    let mut w = Vec::with_capacity(64 * changes.len() + 16);
    w.push(VERSION);
    w.extend_from_slice(&time.as_millis().to_le_bytes());
    put_len(&mut w, changes.len());
    for c in changes {
        match c {
            Change::Upsert(s) | Change::Insert(s) => {
                // Tag 5 is an insert: the same spec, applied only if the key is absent.
                w.push(if matches!(c, Change::Insert(_)) { 5 } else { 0 });
                put_key(&mut w, &s.key);
                w.push(s.kind.code());
                put_opt(&mut w, s.owner.as_deref());
                w.push(s.status.map_or(0, |st| st.code() + 1));
                put_opt(&mut w, s.description.as_deref());
                put_opt(&mut w, s.data_type.as_deref());
                put_strs(&mut w, &s.tags);
                if s.properties.is_empty() {
                    put_opt(&mut w, None);
                } else {
                    let json = serde_json::Value::Object(s.properties.clone()).to_string();
                    put_opt(&mut w, Some(&json));
                }
                put_len(&mut w, s.fields.len());
                for f in &s.fields {
                    put_str(&mut w, &f.name);
                    put_opt(&mut w, f.data_type.as_deref());
                    put_strs(&mut w, &f.tags);
                    put_opt(&mut w, f.description.as_deref());
                }
                w.push(u8::from(s.placeholder));
            }
            Change::RemoveTag { key, tag } => {
                w.push(1);
                put_key(&mut w, key);
                put_str(&mut w, tag);
            }
            Change::Remove { key } => {
                w.push(2);
                put_key(&mut w, key);
            }
            Change::Link {
                from,
                edge,
                to,
                transformation,
            } => {
                w.push(3);
                put_key(&mut w, from);
                w.push(edge.code());
                put_key(&mut w, to);
                match transformation {
                    None => w.push(0),
                    Some(t) => {
                        w.push(1);
                        w.push(match t.kind() {
                            TransformKind::Direct => 0,
                            TransformKind::Indirect => 1,
                        });
                        put_opt(&mut w, t.subtype());
                        w.push(u8::from(t.is_masking()));
                    }
                }
            }
            Change::Unlink { from, edge, to } => {
                w.push(4);
                put_key(&mut w, from);
                w.push(edge.code());
                put_key(&mut w, to);
            }
        }
    }
    w
}

pub(crate) fn put_len(w: &mut Vec<u8>, n: usize) {
    w.extend_from_slice(&u32::try_from(n).unwrap_or(u32::MAX).to_le_bytes());
}

pub(crate) fn put_str(w: &mut Vec<u8>, s: &str) {
    put_len(w, s.len());
    w.extend_from_slice(s.as_bytes());
}

pub(crate) fn put_opt(w: &mut Vec<u8>, s: Option<&str>) {
    match s {
        None => w.push(0),
        Some(s) => {
            w.push(1);
            put_str(w, s);
        }
    }
}

fn put_strs(w: &mut Vec<u8>, v: &[String]) {
    put_len(w, v.len());
    for s in v {
        put_str(w, s);
    }
}

fn put_key(w: &mut Vec<u8>, k: &NodeKey) {
    put_str(w, k.namespace());
    put_str(w, k.name());
}

pub(crate) struct Reader<'a> {
    pub(crate) b: &'a [u8],
}

pub(crate) type R<T> = Result<T, String>;

impl<'a> Reader<'a> {
    pub(crate) fn take(&mut self, n: usize) -> R<&'a [u8]> {
        if n > self.b.len() {
            return Err(format!(
                "truncated: wanted {n} bytes, {} left",
                self.b.len()
            ));
        }
        let (a, rest) = self.b.split_at(n);
        self.b = rest;
        Ok(a)
    }

    pub(crate) fn u8(&mut self) -> R<u8> {
        Ok(self.take(1)?[0])
    }

    pub(crate) fn u32(&mut self) -> R<u32> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub(crate) fn u64(&mut self) -> R<u64> {
        let b = self.take(8)?;
        Ok(u64::from_le_bytes([
            b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7],
        ]))
    }

    pub(crate) fn len(&mut self) -> R<usize> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
    }

    pub(crate) fn str(&mut self) -> R<String> {
        let n = self.len()?;
        let b = self.take(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| "string is not UTF-8".to_owned())
    }

    pub(crate) fn opt(&mut self) -> R<Option<String>> {
        match self.u8()? {
            0 => Ok(None),
            1 => self.str().map(Some),
            t => Err(format!("bad option tag {t}")),
        }
    }

    fn strs(&mut self) -> R<Vec<String>> {
        let n = self.len()?;
        // Each string takes at least 4 bytes, so a count larger than that is corrupt.
        if n > self.b.len() / 4 {
            return Err("list longer than the entry".to_owned());
        }
        (0..n).map(|_| self.str()).collect()
    }

    fn key(&mut self) -> R<NodeKey> {
        Ok(NodeKey::new(self.str()?, self.str()?))
    }

    fn edge(&mut self) -> R<EdgeKind> {
        let c = self.u8()?;
        EdgeKind::from_code(c).ok_or_else(|| format!("bad edge kind {c}"))
    }
}

pub(crate) fn decode(bytes: &[u8]) -> R<(Timestamp, Vec<Change>)> {
    let mut r = Reader { b: bytes };
    let v = r.u8()?;
    if v != VERSION {
        return Err(format!("unknown log format version {v}"));
    }
    let t = r.take(8)?;
    let time = Timestamp::from_millis(i64::from_le_bytes([
        t[0], t[1], t[2], t[3], t[4], t[5], t[6], t[7],
    ]));
    let n = r.len()?;
    if n > bytes.len() {
        return Err("more changes than bytes".to_owned());
    }
    let mut changes = Vec::with_capacity(n.min(1 << 12));
    for _ in 0..n {
        let c = match r.u8()? {
            tag @ (0 | 5) => {
                let key = r.key()?;
                let kc = r.u8()?;
                let kind = NodeKind::from_code(kc).ok_or_else(|| format!("bad node kind {kc}"))?;
                let mut s = NodeSpec::with_key(kind, key);
                s.owner = r.opt()?;
                s.status = match r.u8()? {
                    0 => None,
                    c @ 1..=3 => Some(Status::from_code(c - 1)),
                    c => return Err(format!("bad status {c}")),
                };
                s.description = r.opt()?;
                s.data_type = r.opt()?;
                s.tags = r.strs()?;
                if let Some(json) = r.opt()? {
                    match serde_json::from_str(&json) {
                        Ok(serde_json::Value::Object(m)) => s.properties = m,
                        _ => return Err("properties are not a JSON object".to_owned()),
                    }
                }
                let nf = r.len()?;
                if nf > r.b.len() / 4 {
                    return Err("field list longer than the entry".to_owned());
                }
                for _ in 0..nf {
                    let mut f = FieldSpec::new(r.str()?, None);
                    f.data_type = r.opt()?;
                    f.tags = r.strs()?;
                    f.description = r.opt()?;
                    s.fields.push(f);
                }
                s.placeholder = r.u8()? != 0;
                if tag == 5 {
                    Change::Insert(s)
                } else {
                    Change::Upsert(s)
                }
            }
            1 => Change::RemoveTag {
                key: r.key()?,
                tag: r.str()?,
            },
            2 => Change::Remove { key: r.key()? },
            3 => {
                let from = r.key()?;
                let edge = r.edge()?;
                let to = r.key()?;
                let transformation = match r.u8()? {
                    0 => None,
                    1 => {
                        let kind = match r.u8()? {
                            0 => TransformKind::Direct,
                            _ => TransformKind::Indirect,
                        };
                        let sub = r.opt()?;
                        let masking = r.u8()? != 0;
                        Some(Transformation::new(kind, sub.as_deref()).masking(masking))
                    }
                    t => return Err(format!("bad transformation tag {t}")),
                };
                Change::Link {
                    from,
                    edge,
                    to,
                    transformation,
                }
            }
            4 => Change::Unlink {
                from: r.key()?,
                edge: r.edge()?,
                to: r.key()?,
            },
            t => return Err(format!("bad change tag {t}")),
        };
        changes.push(c);
    }
    if !r.b.is_empty() {
        return Err(format!("{} trailing bytes", r.b.len()));
    }
    Ok((time, changes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_every_change_and_rejects_garbage() {
        let k = |s: &str| NodeKey::parse(s).unwrap();
        let changes = vec![
            Change::Upsert(
                NodeSpec::new(NodeKind::Dataset, "ns", "a")
                    .owner("o")
                    .tag("pii")
                    .status(Status::Deprecated)
                    .description("d")
                    .property("x", serde_json::json!({"y": 1}))
                    .field(FieldSpec::new("f", Some("INT")).tag("t").description("fd"))
                    .placeholder(),
            ),
            Change::Upsert(NodeSpec::new(NodeKind::Custom(3), "ns", "c")),
            Change::Insert(
                NodeSpec::new(NodeKind::Dataset, "ns", "d")
                    .owner("o")
                    .field(FieldSpec::new("g", None)),
            ),
            Change::RemoveTag {
                key: k("ns:a"),
                tag: "pii".into(),
            },
            Change::Remove { key: k("ns:a") },
            Change::Link {
                from: k("ns:a#f"),
                edge: EdgeKind::DerivedFrom,
                to: k("ns:b#g"),
                transformation: Some(
                    Transformation::new(TransformKind::Indirect, Some("JOIN")).masking(true),
                ),
            },
            Change::link(k("ns:a"), EdgeKind::Custom(2), k("ns:b")),
            Change::Unlink {
                from: k("ns:a"),
                edge: EdgeKind::Reads,
                to: k("ns:b"),
            },
        ];
        let bytes = encode(Timestamp::from_millis(42), &changes);
        let (t, back) = decode(&bytes).unwrap();
        assert_eq!(t, Timestamp::from_millis(42));
        assert_eq!(back, changes);
        for cut in 0..bytes.len() {
            assert!(decode(&bytes[..cut]).is_err());
        }
        let mut bad = bytes.clone();
        bad[0] = 9;
        assert!(decode(&bad).is_err());
        assert!(decode(&[1, 0, 0, 0, 0, 0, 0, 0, 0, 255, 255, 255, 255]).is_err());
    }
}
