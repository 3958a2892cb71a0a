//! Shared helpers for the Keel benchmarks.
