//! The CPU references of keel-serving's CUDA kernels (`keel_serving::cuda_kernels`): their
//! semantics on hand-checked cases, against naive implementations, their typed errors on bad
//! input, and `KernelDevice::cpu()` running the same candle ops the engine uses.

use keel_serving::Error;
use keel_serving::cuda_kernels::{
    self as k, AttentionShape, BlockTables, Dtype, KernelDevice, RopeStyle, Rounding, SampleParams,
};
use proptest::prelude::*;

/// A small deterministic generator for test data (SplitMix64).
struct Gen(u64);

impl Gen {
    fn next(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        ((z >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.next()).collect()
    }
}

fn close(a: &[f32], b: &[f32], tol: f32) {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-30);
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            (x - y).abs() <= tol * scale,
            "element {i}: {x} vs {y} (tolerance {tol} of {scale})"
        );
    }
}

fn bad_input<T: std::fmt::Debug>(r: Result<T, Error>) {
    assert!(matches!(r, Err(Error::KernelInput { .. })), "{r:?}");
}

fn out_of_range<T: std::fmt::Debug>(r: Result<T, Error>, want: usize) {
    assert!(
        matches!(r, Err(Error::CacheIndexOutOfRange { index, .. }) if index == want),
        "{r:?}"
    );
}

// --- RMSNorm with residual ---

#[test]
fn rms_norm_adds_the_residual_and_normalises_the_sum() {
    let (sum, normed) = k::rms_norm_residual(
        Dtype::F32,
        &[1.0, 2.0, 3.0, 4.0],
        &[2.0, 2.0, -6.0, -4.0],
        &[1.0, 2.0, 1.0, 0.5],
        0.0,
    )
    .unwrap();
    assert_eq!(sum, [3.0, 4.0, -3.0, 0.0]);
    // mean of squares = (9 + 16 + 9 + 0) / 4 = 8.5
    let inv = 1.0 / 8.5f32.sqrt();
    close(&normed, &[3.0 * inv, 8.0 * inv, -3.0 * inv, 0.0], 1e-6);
}

#[test]
fn rms_norm_rows_are_independent_and_bf16_rounds() {
    let mut g = Gen(1);
    let (x, d, w) = (g.vec(3 * 96), g.vec(3 * 96), g.vec(96));
    let (sum, normed) = k::rms_norm_residual(Dtype::F32, &x, &d, &w, 1e-5).unwrap();
    for r in 0..3 {
        let row = r * 96..(r + 1) * 96;
        let (s1, n1) =
            k::rms_norm_residual(Dtype::F32, &x[row.clone()], &d[row.clone()], &w, 1e-5).unwrap();
        assert_eq!(s1, sum[row.clone()]);
        assert_eq!(n1, normed[row]);
    }
    let (bs, bn) = k::rms_norm_residual(Dtype::Bf16, &x, &d, &w, 1e-5).unwrap();
    assert!(bs.iter().chain(&bn).all(|v| Dtype::Bf16.round(*v) == *v));
    close(&bn, &normed, 2e-2);
}

#[test]
fn rms_norm_rejects_bad_shapes_and_eps() {
    bad_input(k::rms_norm_residual(
        Dtype::F32,
        &[1.0; 4],
        &[1.0; 4],
        &[],
        1e-5,
    ));
    bad_input(k::rms_norm_residual(
        Dtype::F32,
        &[1.0; 5],
        &[1.0; 5],
        &[1.0; 2],
        1e-5,
    ));
    bad_input(k::rms_norm_residual(
        Dtype::F32,
        &[1.0; 4],
        &[1.0; 2],
        &[1.0; 2],
        1e-5,
    ));
    bad_input(k::rms_norm_residual(
        Dtype::F32,
        &[1.0; 4],
        &[1.0; 4],
        &[1.0; 2],
        -1.0,
    ));
    bad_input(k::rms_norm_residual(
        Dtype::F32,
        &[1.0; 4],
        &[1.0; 4],
        &[1.0; 2],
        f32::NAN,
    ));
}

// --- Rotary embedding ---

/// Tables for `positions` rows of `head_dim / 2` frequencies, as the engine builds them.
fn rope_tables(positions: usize, head_dim: usize, theta: f32) -> (Vec<f32>, Vec<f32>) {
    let half = head_dim / 2;
    let mut cos = Vec::new();
    let mut sin = Vec::new();
    for p in 0..positions {
        for i in 0..half {
            let a = p as f32 / theta.powf((2 * i) as f32 / head_dim as f32);
            cos.push(a.cos());
            sin.push(a.sin());
        }
    }
    (cos, sin)
}

#[test]
fn rope_pairs_dimensions_by_style() {
    // One head of 4; the table rotates frequency 0 by 90 degrees and leaves frequency 1.
    let cos = [1.0, 1.0, 0.0, 1.0];
    let sin = [0.0, 0.0, 1.0, 0.0];
    let check = |style, want: [f32; 4]| {
        let mut x = [1.0, 2.0, 3.0, 4.0];
        k::rope(
            Dtype::F32,
            &mut x,
            1,
            4,
            &[1],
            &cos,
            &sin,
            style,
            Rounding::None,
        )
        .unwrap();
        assert_eq!(x, want);
    };
    // Interleaved pairs (0, 1) and (2, 3): (1, 2) -> (-2, 1).
    check(RopeStyle::Interleaved, [-2.0, 1.0, 3.0, 4.0]);
    // Halves pairs (0, 2) and (1, 3): (1, 3) -> (-3, 1).
    check(RopeStyle::Halves, [-3.0, 2.0, 1.0, 4.0]);
}

#[test]
fn rope_at_position_zero_is_identity_and_preserves_norms() {
    let (cos, sin) = rope_tables(64, 8, 10_000.0);
    let mut g = Gen(2);
    let orig = g.vec(3 * 2 * 8);
    for style in [RopeStyle::Interleaved, RopeStyle::Halves] {
        let mut x = orig.clone();
        k::rope(
            Dtype::F32,
            &mut x,
            2,
            8,
            &[0, 0, 0],
            &cos,
            &sin,
            style,
            Rounding::None,
        )
        .unwrap();
        assert_eq!(x, orig);
        let mut x = orig.clone();
        k::rope(
            Dtype::F32,
            &mut x,
            2,
            8,
            &[5, 17, 63],
            &cos,
            &sin,
            style,
            Rounding::None,
        )
        .unwrap();
        for (a, b) in x.chunks(8).zip(orig.chunks(8)) {
            let n = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>();
            assert!((n(a) - n(b)).abs() < 1e-5);
        }
    }
}

#[test]
fn rope_rounds_through_f16_when_asked() {
    let (cos, sin) = rope_tables(8, 4, 10_000.0);
    let mut g = Gen(3);
    let mut x = g.vec(4);
    let mut exact = x.clone();
    k::rope(
        Dtype::F32,
        &mut x,
        1,
        4,
        &[3],
        &cos,
        &sin,
        RopeStyle::Halves,
        Rounding::F16,
    )
    .unwrap();
    k::rope(
        Dtype::F32,
        &mut exact,
        1,
        4,
        &[3],
        &cos,
        &sin,
        RopeStyle::Halves,
        Rounding::None,
    )
    .unwrap();
    for (r, e) in x.iter().zip(&exact) {
        assert_eq!(*r, Rounding::F16.apply(*e));
    }
}

#[test]
fn rope_rejects_bad_shapes_and_positions() {
    let (cos, sin) = rope_tables(4, 4, 10_000.0);
    let r = |x: &mut [f32], heads, dim, pos: &[u32], cos: &[f32]| {
        k::rope(
            Dtype::F32,
            x,
            heads,
            dim,
            pos,
            cos,
            &sin[..cos.len()],
            RopeStyle::Halves,
            Rounding::None,
        )
    };
    bad_input(r(&mut [0.0; 4], 1, 4, &[4], &cos)); // position outside the table
    bad_input(r(&mut [0.0; 3], 1, 3, &[0], &cos[..3])); // odd head size
    bad_input(r(&mut [0.0; 8], 1, 4, &[0], &cos)); // two tokens' worth, one position
    bad_input(r(&mut [0.0; 4], 0, 4, &[], &cos)); // no heads
    let mut x = [0.0; 4];
    bad_input(k::rope(
        Dtype::F32,
        &mut x,
        1,
        4,
        &[0],
        &cos,
        &sin[..6],
        RopeStyle::Halves,
        Rounding::None,
    ));
}

// --- KV-cache write ---

#[test]
fn kv_write_fills_the_named_slots_only() {
    let mut cache = vec![9.0; 6 * 2];
    k::kv_write(
        Dtype::F32,
        &mut cache,
        2,
        &[1.0, 2.0, 3.0, 4.0],
        &[5, 0],
        Rounding::None,
    )
    .unwrap();
    assert_eq!(
        cache,
        [3.0, 4.0, 9.0, 9.0, 9.0, 9.0, 9.0, 9.0, 9.0, 9.0, 1.0, 2.0]
    );
    k::kv_write(Dtype::F32, &mut cache, 2, &[0.1, 1e-9], &[2], Rounding::F16).unwrap();
    assert_eq!(
        cache[4..6],
        [Rounding::F16.apply(0.1), Rounding::F16.apply(1e-9)]
    );
}

#[test]
fn kv_write_rejects_slots_outside_the_cache_and_duplicates() {
    let mut cache = vec![0.0; 4 * 2];
    out_of_range(
        k::kv_write(Dtype::F32, &mut cache, 2, &[1.0; 2], &[4], Rounding::None),
        4,
    );
    bad_input(k::kv_write(
        Dtype::F32,
        &mut cache,
        2,
        &[1.0; 4],
        &[1, 1],
        Rounding::None,
    ));
    bad_input(k::kv_write(
        Dtype::F32,
        &mut cache,
        2,
        &[1.0; 3],
        &[1],
        Rounding::None,
    ));
    bad_input(k::kv_write(
        Dtype::F32,
        &mut cache,
        0,
        &[],
        &[],
        Rounding::None,
    ));
    bad_input(k::kv_write(
        Dtype::F32,
        &mut cache,
        3,
        &[1.0; 3],
        &[0],
        Rounding::None,
    ));
    assert!(
        cache.iter().all(|v| *v == 0.0),
        "a rejected write changed nothing"
    );
}

// --- Paged decode attention ---

/// Naive attention of one query per sequence over contiguous keys and values, in f64.
fn naive_attention(
    heads: usize,
    kv_heads: usize,
    hd: usize,
    q: &[f32],
    keys: &[Vec<f32>],
    values: &[Vec<f32>],
) -> Vec<f32> {
    let kv_dim = kv_heads * hd;
    let mut out = Vec::new();
    for (s, (ks, vs)) in keys.iter().zip(values).enumerate() {
        let n = ks.len() / kv_dim;
        for h in 0..heads {
            let g = h / (heads / kv_heads);
            let qr = &q[(s * heads + h) * hd..][..hd];
            let scores: Vec<f64> = (0..n)
                .map(|j| {
                    let kr = &ks[j * kv_dim + g * hd..][..hd];
                    qr.iter()
                        .zip(kr)
                        .map(|(a, b)| f64::from(*a) * f64::from(*b))
                        .sum::<f64>()
                        / (hd as f64).sqrt()
                })
                .collect();
            let m = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = scores.iter().map(|x| (x - m).exp()).collect();
            let z: f64 = e.iter().sum();
            for d in 0..hd {
                let o: f64 = (0..n)
                    .map(|j| e[j] / z * f64::from(vs[j * kv_dim + g * hd + d]))
                    .sum();
                out.push(o as f32);
            }
        }
    }
    out
}

/// A random paged batch: caches of `blocks` blocks, sequences of `lens` whose blocks are a
/// shuffled assignment, plus the same keys and values laid out contiguously per sequence.
struct Batch {
    shape: AttentionShape,
    q: Vec<f32>,
    kc: Vec<f32>,
    vc: Vec<f32>,
    tables: Vec<Vec<u32>>,
    lens: Vec<usize>,
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
}

fn batch(seed: u64, heads: usize, kv_heads: usize, hd: usize, bs: usize, lens: &[usize]) -> Batch {
    let shape = AttentionShape::new(heads, kv_heads, hd, bs).expect("valid test shape");
    let kv_dim = shape.kv_dim();
    let mut g = Gen(seed);
    let needed: usize = lens.iter().map(|l| l.div_ceil(bs)).sum();
    let blocks = needed + 3;
    let kc = g.vec(blocks * bs * kv_dim);
    let vc = g.vec(blocks * bs * kv_dim);
    // A fixed permutation of block ids, so tables are neither contiguous nor in order.
    let mut ids: Vec<u32> = (0..blocks as u32).collect();
    for i in (1..ids.len()).rev() {
        let j = ((g.next() + 1.0) * 0.5 * i as f32) as usize % (i + 1);
        ids.swap(i, j);
    }
    let mut next = ids.into_iter();
    let mut tables = Vec::new();
    let (mut keys, mut values) = (Vec::new(), Vec::new());
    for &len in lens {
        let t: Vec<u32> = next.by_ref().take(len.div_ceil(bs)).collect();
        let mut ks = Vec::new();
        let mut vs = Vec::new();
        for j in 0..len {
            let slot = t[j / bs] as usize * bs + j % bs;
            ks.extend_from_slice(&kc[slot * kv_dim..][..kv_dim]);
            vs.extend_from_slice(&vc[slot * kv_dim..][..kv_dim]);
        }
        tables.push(t);
        keys.push(ks);
        values.push(vs);
    }
    let q = g.vec(lens.len() * heads * hd);
    Batch {
        shape,
        q,
        kc,
        vc,
        tables,
        lens: lens.to_vec(),
        keys,
        values,
    }
}

impl Batch {
    fn tables(&self) -> BlockTables {
        let seqs: Vec<(&[u32], usize)> = self
            .tables
            .iter()
            .zip(&self.lens)
            .map(|(t, l)| (t.as_slice(), *l))
            .collect();
        BlockTables::new(&seqs, self.shape.block_size()).expect("valid test tables")
    }

    fn run(&self, dtype: Dtype) -> Vec<f32> {
        k::paged_attention(
            dtype,
            &self.shape,
            &self.q,
            &self.kc,
            &self.vc,
            &self.tables(),
        )
        .expect("valid test batch")
    }

    fn naive(&self) -> Vec<f32> {
        let s = &self.shape;
        naive_attention(
            s.heads(),
            s.kv_heads(),
            s.head_dim(),
            &self.q,
            &self.keys,
            &self.values,
        )
    }
}

#[test]
fn paged_attention_matches_naive_attention_with_gqa_and_ragged_lengths() {
    for (heads, kv_heads, hd, bs) in [(4, 4, 16, 4), (8, 2, 32, 16), (9, 3, 64, 32), (2, 1, 8, 1)] {
        let b = batch(heads as u64, heads, kv_heads, hd, bs, &[1, 5, 33, 17, 64]);
        close(&b.run(Dtype::F32), &b.naive(), 1e-5);
        close(&b.run(Dtype::Bf16), &b.naive(), 3e-2);
    }
}

#[test]
fn paged_attention_over_one_position_returns_its_value() {
    let b = batch(7, 2, 1, 8, 4, &[1]);
    let v = &b.values[0];
    let out = b.run(Dtype::F32);
    close(&out[..8], v, 1e-6);
    close(&out[8..], v, 1e-6);
}

#[test]
fn paged_attention_rounds_probabilities_when_asked() {
    let b = batch(11, 4, 2, 16, 8, &[40, 3]);
    let rounded = Batch {
        shape: b.shape.rounding(Rounding::F16),
        ..b
    };
    let exact_out = rounded.naive();
    let out = rounded.run(Dtype::F32);
    close(&out, &exact_out, 2e-3);
    // Rounding the probabilities changes the result at f16 precision, not f32.
    let plain = Batch {
        shape: rounded.shape.rounding(Rounding::None),
        ..rounded
    };
    assert_ne!(out, plain.run(Dtype::F32));
}

#[test]
fn paged_attention_rejects_blocks_outside_the_cache_and_bad_shapes() {
    let b = batch(5, 4, 2, 8, 4, &[6, 3]);
    let blocks = b.kc.len() / (4 * b.shape.kv_dim());
    let mut bad = b.tables.clone();
    bad[1][0] = blocks as u32;
    let seqs: Vec<(&[u32], usize)> = bad
        .iter()
        .zip(&b.lens)
        .map(|(t, l)| (t.as_slice(), *l))
        .collect();
    let tables = BlockTables::new(&seqs, 4).unwrap();
    out_of_range(
        k::paged_attention(Dtype::F32, &b.shape, &b.q, &b.kc, &b.vc, &tables),
        blocks,
    );
    // An unused padding entry past the context may hold anything.
    let mut padded = b.tables.clone();
    padded[1].push(u32::MAX);
    let seqs: Vec<(&[u32], usize)> = padded
        .iter()
        .zip(&b.lens)
        .map(|(t, l)| (t.as_slice(), *l))
        .collect();
    let tables = BlockTables::new(&seqs, 4).unwrap();
    close(
        &k::paged_attention(Dtype::F32, &b.shape, &b.q, &b.kc, &b.vc, &tables).unwrap(),
        &b.naive(),
        1e-5,
    );

    let good = b.tables();
    bad_input(k::paged_attention(
        Dtype::F32,
        &b.shape,
        &b.q[1..],
        &b.kc,
        &b.vc,
        &good,
    ));
    bad_input(k::paged_attention(
        Dtype::F32,
        &b.shape,
        &b.q,
        &b.kc[1..],
        &b.vc[1..],
        &good,
    ));
    bad_input(k::paged_attention(
        Dtype::F32,
        &b.shape,
        &b.q,
        &b.kc,
        &b.vc[..8],
        &good,
    ));
    bad_input(BlockTables::new(&[(&[0], 5)], 4)); // 5 positions need 2 blocks
    bad_input(BlockTables::new(&[(&[0], 0)], 4));
    bad_input(BlockTables::new(&[], 4));
    bad_input(AttentionShape::new(6, 4, 8, 4));
    bad_input(AttentionShape::new(4, 4, 512, 4));
    bad_input(AttentionShape::new(4, 4, 8, 0));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// Attention depends on what the tables point at, not where the blocks live.
    #[test]
    fn paged_attention_is_independent_of_block_placement(
        seed in 0u64..1000,
        lens in proptest::collection::vec(1usize..40, 1..5),
        bs in 1usize..9,
    ) {
        let b = batch(seed, 4, 2, 8, bs, &lens);
        close(&b.run(Dtype::F32), &b.naive(), 1e-5);
    }
}

// --- Sampling ---

fn sample1(logits: &[f32], p: SampleParams) -> u32 {
    k::sample(Dtype::F32, logits, logits.len(), &[p]).expect("valid sampling input")[0]
}

fn params(t: f32, top_k: u32, top_p: f32, min_p: f32, u: f32) -> SampleParams {
    SampleParams::new(t, top_k, top_p, min_p, u).expect("valid test parameters")
}

#[test]
fn greedy_picks_the_first_largest_finite_or_infinite_logit() {
    assert_eq!(sample1(&[0.1, 2.0, 2.0, -1.0], SampleParams::greedy()), 1);
    assert_eq!(sample1(&[f32::NAN, 1.0, 3.0], SampleParams::greedy()), 2);
    assert_eq!(sample1(&[f32::NAN, f32::NAN], SampleParams::greedy()), 0);
    assert_eq!(
        sample1(&[1.0, f32::INFINITY, 2.0], SampleParams::greedy()),
        1
    );
}

#[test]
fn sampling_walks_the_sorted_distribution_with_u() {
    // Probabilities 0.5, 0.25, 0.125, 0.125 (in sorted order: ids 2, 0, 1, 3).
    let l = [2f32.ln() * 2.0, 2f32.ln(), 2f32.ln() * 3.0, 2f32.ln()];
    let pick = |u| sample1(&l, params(1.0, 0, 1.0, 0.0, u));
    assert_eq!(pick(0.0), 2);
    assert_eq!(pick(0.49), 2);
    assert_eq!(pick(0.51), 0);
    assert_eq!(pick(0.74), 0);
    assert_eq!(pick(0.76), 1); // ties go to the lower id first
    assert_eq!(pick(0.99), 3);
    // Over a fine grid of u (midpoints, away from the boundaries) the picks follow the
    // probabilities exactly.
    let mut counts = [0usize; 4];
    for i in 0..1000 {
        counts[pick((i as f32 + 0.5) / 1000.0) as usize] += 1;
    }
    assert_eq!(counts, [250, 125, 500, 125]);
}

#[test]
fn filters_cut_the_distribution() {
    let l = [2f32.ln() * 2.0, 2f32.ln(), 2f32.ln() * 3.0, 2f32.ln()];
    // top-k 2 keeps ids 2 and 0 (2/3 and 1/3 of what is kept).
    assert_eq!(sample1(&l, params(1.0, 2, 1.0, 0.0, 0.7)), 0);
    assert_eq!(sample1(&l, params(1.0, 2, 1.0, 0.0, 0.99)), 0);
    // top-p 0.5 keeps only id 2; 0.6 keeps ids 2 and 0.
    assert_eq!(sample1(&l, params(1.0, 0, 0.5, 0.0, 0.99)), 2);
    assert_eq!(sample1(&l, params(1.0, 0, 0.6, 0.0, 0.99)), 0);
    // min-p 0.5 keeps ids with at least half the top probability: 2 and 0.
    assert_eq!(sample1(&l, params(1.0, 0, 1.0, 0.5, 0.99)), 0);
    assert_eq!(sample1(&l, params(1.0, 0, 1.0, 1.0, 0.99)), 2);
    // top-k 1 is greedy at any temperature.
    let mut g = Gen(9);
    let row = g.vec(500);
    let greedy = sample1(&row, SampleParams::greedy());
    for i in 0..20 {
        assert_eq!(
            sample1(&row, params(1.5, 1, 1.0, 0.0, i as f32 / 20.0)),
            greedy
        );
    }
}

#[test]
fn temperature_sharpens_and_non_finite_logits_are_never_sampled() {
    let l = [1.0, 0.0, f32::NEG_INFINITY, f32::NAN, f32::INFINITY];
    // Only ids 0 and 1 are candidates; at a low temperature id 0 takes nearly all the mass.
    for i in 0..100 {
        let t = sample1(&l, params(1.0, 0, 1.0, 0.0, i as f32 / 100.0));
        assert!(t == 0 || t == 1);
    }
    assert_eq!(sample1(&l, params(0.01, 0, 1.0, 0.0, 0.999)), 0);
    // With no finite logit, sampling falls back to greedy.
    assert_eq!(
        sample1(&[f32::NAN, f32::INFINITY], params(1.0, 0, 1.0, 0.0, 0.5)),
        1
    );
}

#[test]
fn sampling_rejects_bad_parameters_and_shapes() {
    bad_input(SampleParams::new(-1.0, 0, 1.0, 0.0, 0.0));
    bad_input(SampleParams::new(f32::INFINITY, 0, 1.0, 0.0, 0.0));
    bad_input(SampleParams::new(1.0, 0, 0.0, 0.0, 0.0));
    bad_input(SampleParams::new(1.0, 0, 1.5, 0.0, 0.0));
    bad_input(SampleParams::new(1.0, 0, 1.0, -0.1, 0.0));
    bad_input(SampleParams::new(1.0, 0, 1.0, 0.0, 1.0));
    bad_input(k::sample(
        Dtype::F32,
        &[1.0; 5],
        2,
        &[SampleParams::greedy(); 2],
    ));
    bad_input(k::sample(Dtype::F32, &[], 0, &[SampleParams::greedy()]));
}

// --- KernelDevice: the candle ops on the CPU, and the GPU without the feature ---

#[test]
fn cpu_device_runs_the_same_ops_as_the_reference() {
    let cpu = KernelDevice::cpu();
    assert!(!cpu.is_cuda());
    let mut g = Gen(21);
    for dtype in [Dtype::F32, Dtype::Bf16] {
        let (x, d, w) = (g.vec(2 * 48), g.vec(2 * 48), g.vec(48));
        assert_eq!(
            cpu.rms_norm_residual(dtype, &x, &d, &w, 1e-6).unwrap(),
            k::rms_norm_residual(dtype, &x, &d, &w, 1e-6).unwrap()
        );

        let (cos, sin) = rope_tables(32, 16, 10_000.0);
        let mut a = g.vec(3 * 2 * 16);
        let mut b = a.clone();
        cpu.rope(
            dtype,
            &mut a,
            2,
            16,
            &[0, 7, 31],
            &cos,
            &sin,
            RopeStyle::Interleaved,
            Rounding::F16,
        )
        .unwrap();
        k::rope(
            dtype,
            &mut b,
            2,
            16,
            &[0, 7, 31],
            &cos,
            &sin,
            RopeStyle::Interleaved,
            Rounding::F16,
        )
        .unwrap();
        assert_eq!(a, b);

        let mut ca = g.vec(8 * 6);
        let mut cb = ca.clone();
        let src = g.vec(2 * 6);
        cpu.kv_write(dtype, &mut ca, 6, &src, &[7, 2], Rounding::None)
            .unwrap();
        k::kv_write(dtype, &mut cb, 6, &src, &[7, 2], Rounding::None).unwrap();
        // Untouched rows of a bf16 cache come back bf16-rounded, as they are stored.
        let cb: Vec<f32> = cb.iter().map(|v| dtype.round(*v)).collect();
        assert_eq!(ca, cb);

        let bt = batch(3, 4, 2, 16, 4, &[9, 1, 4]);
        assert_eq!(
            cpu.paged_attention(dtype, &bt.shape, &bt.q, &bt.kc, &bt.vc, &bt.tables())
                .unwrap(),
            bt.run(dtype)
        );

        let logits = g.vec(3 * 100);
        let ps = [
            SampleParams::greedy(),
            params(0.8, 10, 0.9, 0.0, 0.3),
            params(1.2, 0, 1.0, 0.05, 0.9),
        ];
        assert_eq!(
            cpu.sample(dtype, &logits, 100, &ps).unwrap(),
            k::sample(dtype, &logits, 100, &ps).unwrap()
        );
    }
    // Bad input is caught before anything reaches a device.
    out_of_range(
        cpu.kv_write(
            Dtype::F32,
            &mut [0.0; 4],
            2,
            &[1.0; 2],
            &[2],
            Rounding::None,
        ),
        2,
    );
    cpu.synchronize().unwrap();
    assert!(cpu.copy_bandwidth(1 << 16, 2).unwrap() > 0.0);
}

#[cfg(not(feature = "cuda"))]
#[test]
fn asking_for_a_gpu_without_the_feature_is_a_typed_error() {
    assert!(matches!(
        KernelDevice::cuda(0),
        Err(Error::CudaUnavailable { ordinal: 0 })
    ));
    assert!(matches!(
        KernelDevice::cuda(3),
        Err(Error::CudaUnavailable { ordinal: 3 })
    ));
}

#[test]
fn kernel_types_are_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<KernelDevice>();
    check::<AttentionShape>();
    check::<BlockTables>();
    check::<SampleParams>();
}
