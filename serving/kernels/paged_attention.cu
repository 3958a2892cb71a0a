// Decode attention over the paged KV cache: one query token per sequence, each sequence with
// its own context length and block table, with grouped-query attention.
#include "common.cuh"

// Most head_dim / 32 values one lane accumulates; head_dim <= 32 * MAX_PER_LANE (checked on
// the host).
#define MAX_PER_LANE 8

// Grid (heads, seqs), blockDim.x a multiple of 32. Dynamic shared memory holds
// [scores_len] scores, 32 reduction slots and [warps * head_dim] partial outputs; the host
// sizes it from the longest context in the batch and rejects batches that do not fit.
//
// For sequence s and head h (kv head h / (heads / kv_heads)), with n = ctx_lens[s] and
// slot(j) = tables[s][j / block_size] * block_size + j % block_size:
//   score_j = dot(q[s, h], k[slot(j), kvh]) * scale
//   p_j     = round(exp(score_j - max) / sum_i exp(score_i - max))
//   out     = sum_j p_j * v[slot(j), kvh]
template <typename T>
__device__ void paged_attention(T* __restrict__ out, const T* __restrict__ q,
                                const T* __restrict__ kc, const T* __restrict__ vc,
                                const uint32_t* __restrict__ tables,
                                const uint32_t* __restrict__ ctx_lens, int heads, int kv_heads,
                                int head_dim, int block_size, int max_blocks, int scores_len,
                                float scale, int rounding) {
    extern __shared__ float smem[];
    float* scores = smem;
    float* scratch = smem + scores_len;
    float* partial = scratch + 32;

    const int h = blockIdx.x;
    const int s = blockIdx.y;
    const int kvh = h / (heads / kv_heads);
    const int n = (int)ctx_lens[s];
    const size_t kv_dim = (size_t)kv_heads * head_dim;
    const T* qrow = q + ((size_t)s * heads + h) * head_dim;
    const uint32_t* table = tables + (size_t)s * max_blocks;
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int warps = blockDim.x >> 5;

    // Scores: one warp per position, lanes across the head so loads are coalesced.
    for (int j = warp; j < n; j += warps) {
        const size_t slot = (size_t)table[j / block_size] * block_size + j % block_size;
        const T* krow = kc + slot * kv_dim + (size_t)kvh * head_dim;
        float dot = 0.0f;
        for (int d = lane; d < head_dim; d += 32) dot += to_f32(qrow[d]) * to_f32(krow[d]);
        dot = warp_sum(dot);
        if (lane == 0) scores[j] = __fmul_rn(dot, scale);
    }
    __syncthreads();

    float m = -INFINITY;
    for (int j = threadIdx.x; j < n; j += blockDim.x) m = fmaxf(m, scores[j]);
    m = block_max(m, scratch);
    float sum = 0.0f;
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
        const float e = expf(scores[j] - m);
        scores[j] = e;
        sum += e;
    }
    sum = block_sum(sum, scratch);
    // Each thread normalises the entries it exponentiated, so no barrier is needed before.
    for (int j = threadIdx.x; j < n; j += blockDim.x)
        scores[j] = apply_rounding(__fdiv_rn(scores[j], sum), rounding);
    __syncthreads();

    // Weighted sum of values: warps split the positions, lanes split the head dimension,
    // then the warps' partial sums are added in shared memory.
    float acc[MAX_PER_LANE];
#pragma unroll
    for (int r = 0; r < MAX_PER_LANE; ++r) acc[r] = 0.0f;
    for (int j = warp; j < n; j += warps) {
        const size_t slot = (size_t)table[j / block_size] * block_size + j % block_size;
        const T* vrow = vc + slot * kv_dim + (size_t)kvh * head_dim;
        const float p = scores[j];
#pragma unroll
        for (int r = 0; r < MAX_PER_LANE; ++r) {
            const int d = lane + 32 * r;
            if (d < head_dim) acc[r] += p * to_f32(vrow[d]);
        }
    }
#pragma unroll
    for (int r = 0; r < MAX_PER_LANE; ++r) {
        const int d = lane + 32 * r;
        if (d < head_dim) partial[warp * head_dim + d] = acc[r];
    }
    __syncthreads();
    T* orow = out + ((size_t)s * heads + h) * head_dim;
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float o = 0.0f;
        for (int w = 0; w < warps; ++w) o += partial[w * head_dim + d];
        orow[d] = from_f32<T>(o);
    }
}

extern "C" __global__ void paged_attention_f32(float* out, const float* q, const float* kc,
                                               const float* vc, const uint32_t* tables,
                                               const uint32_t* ctx_lens, int heads, int kv_heads,
                                               int head_dim, int block_size, int max_blocks,
                                               int scores_len, float scale, int rounding) {
    paged_attention<float>(out, q, kc, vc, tables, ctx_lens, heads, kv_heads, head_dim,
                           block_size, max_blocks, scores_len, scale, rounding);
}

extern "C" __global__ void paged_attention_bf16(bf16* out, const bf16* q, const bf16* kc,
                                                const bf16* vc, const uint32_t* tables,
                                                const uint32_t* ctx_lens, int heads,
                                                int kv_heads, int head_dim, int block_size,
                                                int max_blocks, int scores_len, float scale,
                                                int rounding) {
    paged_attention<bf16>(out, q, kc, vc, tables, ctx_lens, heads, kv_heads, head_dim,
                          block_size, max_blocks, scores_len, scale, rounding);
}
