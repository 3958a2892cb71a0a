// Writes new keys or values into the paged KV cache: row t of `src` goes to cache row
// slots[t] (slot = block * block_size + offset, computed and bounds-checked on the host).
#include "common.cuh"

template <typename T>
__device__ void kv_write(T* __restrict__ cache, const T* __restrict__ src,
                         const uint32_t* __restrict__ slots, int tokens, int dim, int rounding) {
    const size_t total = (size_t)tokens * dim;
    for (size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
         idx += (size_t)gridDim.x * blockDim.x) {
        const size_t t = idx / dim;
        const size_t d = idx % dim;
        cache[(size_t)slots[t] * dim + d] = from_f32<T>(apply_rounding(to_f32(src[idx]), rounding));
    }
}

extern "C" __global__ void kv_write_f32(float* cache, const float* src, const uint32_t* slots,
                                        int tokens, int dim, int rounding) {
    kv_write<float>(cache, src, slots, tokens, dim, rounding);
}

extern "C" __global__ void kv_write_bf16(bf16* cache, const bf16* src, const uint32_t* slots,
                                         int tokens, int dim, int rounding) {
    kv_write<bf16>(cache, src, slots, tokens, dim, rounding);
}
