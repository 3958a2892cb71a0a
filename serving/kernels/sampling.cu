// Fused sampling: temperature, top-k, top-p, min-p and the final pick on the device, so only
// one token id per sequence crosses to the host.
//
// Instead of sorting the vocabulary, every filter is a threshold on a total order of the
// candidates: key(i) = (order-preserving bits of z_i) << 32 | (0xffffffff - i), so a larger
// key means a larger scaled logit, and ties go to the lower token id, exactly the order the
// CPU sampler sorts by. Each threshold is found by bisection over the 64-bit key space, where
// every step is one block-wide count or sum. That costs more arithmetic than a sort but needs
// no scratch memory and no second launch.
#include "common.cuh"

// Per-sequence parameters, 5 words each: temperature (f32 bits), top_k (0 = off),
// top_p (f32 bits, 1 = off), min_p (f32 bits, 0 = off), u (f32 bits, uniform in [0, 1)).
#define PARAM_WORDS 5

typedef unsigned long long u64;

__device__ __forceinline__ u64 key_of(float z, uint32_t i) {
    const uint32_t b = __float_as_uint(z);
    const uint32_t ordered = (b & 0x80000000u) ? ~b : (b | 0x80000000u);
    return ((u64)ordered << 32) | (u64)(0xffffffffu - i);
}

template <typename T> struct Row {
    const T* logits;
    int vocab;
    float inv_t;
    float m;
    // The scaled logit of token i, or NaN when the raw logit is not finite (not a candidate).
    __device__ __forceinline__ float z(int i) const {
        const float l = to_f32(logits[i]);
        return isfinite(l) ? l * inv_t : NAN;
    }
};

// Number of candidates with key >= t.
template <typename T>
__device__ u64 count_at_least(const Row<T>& row, u64 t, u64* scratch) {
    u64 c = 0;
    for (int i = threadIdx.x; i < row.vocab; i += blockDim.x) {
        const float z = row.z(i);
        if (!isnan(z) && key_of(z, i) >= t) c += 1;
    }
    return block_reduce<u64>(c, 0ull, scratch, SumOp());
}

// Unnormalised probability mass exp(z - m) of the candidates with key >= t.
template <typename T>
__device__ float mass_at_least(const Row<T>& row, u64 t, float* scratch) {
    float acc = 0.0f;
    for (int i = threadIdx.x; i < row.vocab; i += blockDim.x) {
        const float z = row.z(i);
        if (!isnan(z) && key_of(z, i) >= t) acc += expf(z - row.m);
    }
    return block_sum(acc, scratch);
}

// The largest t in [lo, hi] with mass_at_least(t) >= target and > 0; requires that lo
// satisfies it. The answer is always a candidate's key, because the mass only changes there.
template <typename T>
__device__ u64 largest_key_with_mass(const Row<T>& row, u64 lo, u64 hi, float target,
                                     float* scratch) {
    while (lo < hi) {
        const u64 mid = lo + (hi - lo) / 2 + 1;
        const float m = mass_at_least(row, mid, scratch);
        if (m >= target && m > 0.0f) lo = mid;
        else hi = mid - 1;
    }
    return lo;
}

// First index of the largest non-NaN value (0 when every value is NaN), as the CPU argmax.
template <typename T>
__device__ uint32_t argmax(const T* logits, int vocab, u64* scratch) {
    // Pack (value, index) into one key so the reduction is a plain max. NaN never wins.
    u64 best = 0;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        const float l = to_f32(logits[i]);
        if (!isnan(l)) {
            const u64 k = key_of(l, i) | 0ull;
            if (k > best) best = k;
        }
    }
    struct MaxU64 {
        __device__ __forceinline__ u64 operator()(u64 a, u64 b) const { return a > b ? a : b; }
    };
    best = block_reduce<u64>(best, 0ull, scratch, MaxU64());
    return best == 0 ? 0u : 0xffffffffu - (uint32_t)(best & 0xffffffffull);
}

// One block per sequence; blockDim.x a multiple of 32.
template <typename T>
__device__ void sample(const T* __restrict__ logits, const uint32_t* __restrict__ params,
                       uint32_t* __restrict__ out, int vocab) {
    __shared__ u64 scratch_u[32];
    __shared__ float scratch_f[32];
    const int s = blockIdx.x;
    const T* row_logits = logits + (size_t)s * vocab;
    const uint32_t* p = params + (size_t)s * PARAM_WORDS;
    const float temperature = __uint_as_float(p[0]);
    const uint32_t top_k = p[1];
    const float top_p = __uint_as_float(p[2]);
    const float min_p = __uint_as_float(p[3]);
    const float u = __uint_as_float(p[4]);

    if (temperature == 0.0f) {
        const uint32_t t = argmax(row_logits, vocab, scratch_u);
        if (threadIdx.x == 0) out[s] = t;
        return;
    }
    Row<T> row{row_logits, vocab, 1.0f / temperature, 0.0f};

    // The largest scaled logit, and how many candidates there are.
    float m = -INFINITY;
    u64 n = 0;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        const float z = row.z(i);
        if (!isnan(z)) {
            m = fmaxf(m, z);
            n += 1;
        }
    }
    m = block_max(m, scratch_f);
    n = block_reduce<u64>(n, 0ull, scratch_u, SumOp());
    if (n == 0) {
        // No finite logit: the CPU sampler falls back to argmax too.
        const uint32_t t = argmax(row_logits, vocab, scratch_u);
        if (threadIdx.x == 0) out[s] = t;
        return;
    }
    row.m = m;

    // top-k: the k-th largest key, i.e. the largest t with at least k keys >= t.
    u64 lo = 0;
    if (top_k > 0 && (u64)top_k < n) {
        u64 hi = ~0ull;
        while (lo < hi) {
            const u64 mid = lo + (hi - lo) / 2 + 1;
            if (count_at_least(row, mid, scratch_u) >= top_k) lo = mid;
            else hi = mid - 1;
        }
    }
    const float kept = mass_at_least(row, lo, scratch_f);
    // top-p: the shortest prefix of the order whose mass reaches top_p of what top-k kept.
    if (top_p < 1.0f) lo = largest_key_with_mass(row, lo, ~0ull, top_p * kept, scratch_f);
    // min-p: drop candidates less likely than min_p times the most likely one, whose
    // unnormalised mass is exp(0) = 1. The most likely candidate always stays.
    if (min_p > 0.0f) {
        u64 smallest = ~0ull;
        for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
            const float z = row.z(i);
            if (!isnan(z)) {
                const u64 k = key_of(z, i);
                if (k >= lo && expf(z - m) >= min_p && k < smallest) smallest = k;
            }
        }
        smallest = block_reduce<u64>(smallest, ~0ull, scratch_u, MinU64Op());
        if (smallest != ~0ull && smallest > lo) lo = smallest;
    }
    // The pick: walking the kept candidates in order, the first whose cumulative mass
    // reaches u times their total.
    const float total = mass_at_least(row, lo, scratch_f);
    const u64 pick = largest_key_with_mass(row, lo, ~0ull, u * total, scratch_f);
    if (threadIdx.x == 0) out[s] = 0xffffffffu - (uint32_t)(pick & 0xffffffffull);
}

extern "C" __global__ void sample_f32(const float* logits, const uint32_t* params, uint32_t* out,
                                      int vocab) {
    sample<float>(logits, params, out, vocab);
}

extern "C" __global__ void sample_bf16(const bf16* logits, const uint32_t* params, uint32_t* out,
                                       int vocab) {
    sample<bf16>(logits, params, out, vocab);
}
