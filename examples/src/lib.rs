//! Shared helpers for the Keel example programs.
