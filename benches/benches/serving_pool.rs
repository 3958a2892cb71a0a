//! Criterion benchmarks for serving_pool (placeholder until the crate's bench lands).
#![allow(missing_docs)] // criterion_main! generates an undocumented main.

use criterion::{Criterion, criterion_group, criterion_main};

fn placeholder(c: &mut Criterion) {
    c.bench_function("serving_pool/noop", |b| {
        b.iter(|| std::hint::black_box(1_u64) + 1)
    });
}

criterion_group!(benches, placeholder);
criterion_main!(benches);
