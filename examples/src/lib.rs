//! Shared helpers for the Keel example programs.

pub mod lifecycle;
