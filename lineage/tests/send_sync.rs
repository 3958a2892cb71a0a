//! Compile-time check that the public types are `Send + Sync`.
#![allow(clippy::unwrap_used)] // Test helpers: a failed unwrap is a failed test.

use keel_lineage::*;

fn assert_send_sync<T: Send + Sync>() {}

#[test]
fn public_types_are_send_and_sync() {
    assert_send_sync::<Error>();
    assert_send_sync::<LineageGraph>();
    assert_send_sync::<LineageStore>();
    assert_send_sync::<NodeId<nodes::Dataset>>();
    assert_send_sync::<AnyNodeId>();
    assert_send_sync::<NodeKey>();
    assert_send_sync::<NodeSpec>();
    assert_send_sync::<Change>();
    assert_send_sync::<Commit>();
    assert_send_sync::<Batch>();
    assert_send_sync::<Schema>();
    assert_send_sync::<Walk>();
    assert_send_sync::<WalkResult>();
    assert_send_sync::<Subgraph>();
    assert_send_sync::<ImpactReport>();
    assert_send_sync::<ImpactSet>();
    assert_send_sync::<ProposedChange>();
    assert_send_sync::<TagRules>();
    assert_send_sync::<PropagatedTags>();
    assert_send_sync::<Violation>();
    assert_send_sync::<Search>();
    assert_send_sync::<Diff>();
    assert_send_sync::<Snapshot>();
    assert_send_sync::<Metadata>();
    assert_send_sync::<MetadataChange>();
    assert_send_sync::<OpenLineageOptions>();
    assert_send_sync::<Box<dyn Policy>>();
    assert_send_sync::<GraphView<'static>>();
    assert_send_sync::<EdgeId>();
    assert_send_sync::<ViewEdge<'static>>();
    assert_send_sync::<VisitSet>();
    assert_send_sync::<Edges<'static>>();
    assert_send_sync::<Neighbors<'static>>();
    assert_send_sync::<EdgeReferences<'static>>();
    assert_send_sync::<NodeReferences<'static>>();
    assert_send_sync::<NodeIdentifiers<'static>>();
}
