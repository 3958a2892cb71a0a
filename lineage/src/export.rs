//! Export of a subgraph as Graphviz DOT, Mermaid and JSON.

use std::collections::HashMap;
use std::fmt::Write;

use crate::traverse::Subgraph;

fn dot_escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}

fn mermaid_escape(s: &str) -> String {
    s.replace('"', "#quot;")
}

impl Subgraph {
    /// Graphviz DOT, one node per asset labelled `kind\nkey`, edges labelled by kind.
    pub fn to_dot(&self) -> String {
        let mut s = String::from("digraph lineage {\n  rankdir=LR;\n  node [shape=box];\n");
        for n in &self.nodes {
            let style = if n.placeholder { ", style=dashed" } else { "" };
            let _ = writeln!(
                s,
                "  \"{}\" [label=\"{}\\n{}\"{style}];",
                dot_escape(&n.key.to_string()),
                dot_escape(&n.kind_name),
                dot_escape(&n.key.to_string())
            );
        }
        for e in &self.edges {
            let _ = writeln!(
                s,
                "  \"{}\" -> \"{}\" [label=\"{}\"];",
                dot_escape(&e.from.to_string()),
                dot_escape(&e.to.to_string()),
                dot_escape(&e.kind_name)
            );
        }
        s.push_str("}\n");
        s
    }

    /// A Mermaid `flowchart LR` with generated node ids.
    pub fn to_mermaid(&self) -> String {
        let mut s = String::from("flowchart LR\n");
        let ids: HashMap<String, usize> = self
            .nodes
            .iter()
            .enumerate()
            .map(|(i, n)| (n.key.to_string(), i))
            .collect();
        for (i, n) in self.nodes.iter().enumerate() {
            let _ = writeln!(
                s,
                "  n{i}[\"{}: {}\"]",
                mermaid_escape(&n.kind_name),
                mermaid_escape(&n.key.to_string())
            );
        }
        for e in &self.edges {
            if let (Some(a), Some(b)) = (ids.get(&e.from.to_string()), ids.get(&e.to.to_string())) {
                let _ = writeln!(s, "  n{a} -->|{}| n{b}", mermaid_escape(&e.kind_name));
            }
        }
        s
    }

    /// Pretty JSON: `{"nodes": [...], "edges": [...], "partial": bool}`.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }
}
