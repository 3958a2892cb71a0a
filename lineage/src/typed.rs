//! Typed node handles and the marker types that make wrong edges fail to compile.

use std::fmt;
use std::hash::{Hash, Hasher};
use std::marker::PhantomData;

use serde::{Deserialize, Serialize};

use crate::schema::{EdgeKind, NodeKind};

/// An untyped node handle, as returned by the dynamic API.
///
/// Handles are stable for the life of a graph (nodes are never physically removed), and are
/// only meaningful for the graph that produced them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct AnyNodeId(pub(crate) u32);

impl AnyNodeId {
    /// The handle's position in the graph's node table.
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

impl fmt::Display for AnyNodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "n{}", self.0)
    }
}

/// A node handle whose kind is known at compile time: a `NodeId<nodes::Dataset>` cannot be
/// passed where a `NodeId<nodes::Service>` is wanted.
pub struct NodeId<K> {
    id: u32,
    _kind: PhantomData<fn() -> K>,
}

impl<K> NodeId<K> {
    pub(crate) fn new(id: u32) -> Self {
        Self {
            id,
            _kind: PhantomData,
        }
    }

    /// Forgets the kind.
    pub fn erase(self) -> AnyNodeId {
        AnyNodeId(self.id)
    }
}

impl<K> Clone for NodeId<K> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<K> Copy for NodeId<K> {}
impl<K> PartialEq for NodeId<K> {
    fn eq(&self, o: &Self) -> bool {
        self.id == o.id
    }
}
impl<K> Eq for NodeId<K> {}
impl<K> Hash for NodeId<K> {
    fn hash<H: Hasher>(&self, h: &mut H) {
        self.id.hash(h);
    }
}
impl<K: Kind> fmt::Debug for NodeId<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId<{}>({})", K::KIND, self.id)
    }
}
impl<K> From<NodeId<K>> for AnyNodeId {
    fn from(n: NodeId<K>) -> AnyNodeId {
        n.erase()
    }
}

mod sealed {
    pub trait Sealed {}
}

/// A compile-time node kind. Implemented by the markers in [`nodes`]; sealed.
pub trait Kind: sealed::Sealed + 'static {
    /// The runtime kind this marker stands for.
    const KIND: NodeKind;
}

/// A compile-time edge kind. Implemented by the markers in [`edges`]; sealed.
pub trait EdgeMarker: sealed::Sealed + Copy + 'static {
    /// The runtime kind this marker stands for.
    const KIND: EdgeKind;
}

/// Implemented for an edge marker `E` when `F -[E]-> T` is a built-in schema triple, so
/// [`crate::LineageGraph::connect`] only compiles for allowed triples.
pub trait Allows<F: Kind, T: Kind>: EdgeMarker {}

/// Marker types for the built-in node kinds, used as `NodeId<nodes::Dataset>`.
pub mod nodes {
    use super::{Kind, sealed::Sealed};
    use crate::schema::NodeKind;

    macro_rules! node_markers {
        ($($(#[$doc:meta])* $name:ident),* $(,)?) => {$(
            $(#[$doc])*
            #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
            pub enum $name {}
            impl Sealed for $name {}
            impl Kind for $name {
                const KIND: NodeKind = NodeKind::$name;
            }
        )*};
    }

    node_markers! {
        /// A table, file or topic.
        Dataset,
        /// A column of a dataset or feature table.
        Field,
        /// A feature definition.
        Feature,
        /// A table of features.
        FeatureTable,
        /// A model family.
        Model,
        /// One trained version of a model.
        ModelVersion,
        /// An evaluation of a model version.
        Evaluation,
        /// A job or pipeline.
        Workflow,
        /// One run of a workflow.
        Run,
        /// A production deployment.
        Service,
    }
}

/// Marker values for the built-in edge kinds, used as `graph.connect(feature, edges::DerivedFrom, dataset)`.
pub mod edges {
    use super::nodes::*;
    use super::{Allows, EdgeMarker, sealed::Sealed};
    use crate::schema::EdgeKind;

    macro_rules! edge_markers {
        ($($(#[$doc:meta])* $name:ident),* $(,)?) => {$(
            $(#[$doc])*
            #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
            pub struct $name;
            impl Sealed for $name {}
            impl EdgeMarker for $name {
                const KIND: EdgeKind = EdgeKind::$name;
            }
        )*};
    }

    edge_markers! {
        /// `derived` derived-from `source`.
        DerivedFrom,
        /// `ModelVersion` trained-on its inputs.
        TrainedOn,
        /// `Evaluation` evaluates `ModelVersion`.
        Evaluates,
        /// `Service` serves `ModelVersion`.
        Serves,
        /// `Workflow`/`Run` reads a dataset.
        Reads,
        /// `Workflow`/`Run` writes an output.
        Writes,
        /// `Run` instance-of `Workflow`.
        InstanceOf,
        /// `ModelVersion` version-of `Model`.
        VersionOf,
        /// `Dataset`/`FeatureTable` has-field `Field`.
        HasField,
    }

    macro_rules! allow {
        ($e:ident: $($f:ident => [$($t:ident),*]);* $(;)?) => {$($(
            impl Allows<$f, $t> for $e {}
        )*)*};
    }

    allow!(DerivedFrom:
        Dataset => [Dataset, Field, Feature, FeatureTable];
        Field => [Dataset, Field, Feature, FeatureTable];
        Feature => [Dataset, Field, Feature, FeatureTable];
        FeatureTable => [Dataset, Field, Feature, FeatureTable];
        Evaluation => [Dataset]);
    allow!(TrainedOn: ModelVersion => [Dataset, Field, Feature, FeatureTable]);
    allow!(Evaluates: Evaluation => [ModelVersion]);
    allow!(Serves: Service => [ModelVersion]);
    allow!(Reads:
        Workflow => [Dataset, FeatureTable, Feature, ModelVersion];
        Run => [Dataset, FeatureTable, Feature, ModelVersion]);
    allow!(Writes:
        Workflow => [Dataset, FeatureTable, Feature, ModelVersion, Evaluation];
        Run => [Dataset, FeatureTable, Feature, ModelVersion, Evaluation]);
    allow!(InstanceOf: Run => [Workflow]);
    allow!(VersionOf: ModelVersion => [Model]);
    allow!(HasField: Dataset => [Field]; FeatureTable => [Field]);
}
