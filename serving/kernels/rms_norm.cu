// Fused residual add and RMSNorm: one pass writes the new residual stream and its normalised
// copy, where the unfused path makes three passes and two launches.
#include "common.cuh"

// One block per row; `out` is [2, rows, hidden]: the new residual, then the normalised rows.
// out_sum[r] = round_T(x[r] + delta[r]);
// out_norm[r] = round_T(s * (1 / sqrt(mean(s^2) + eps)) * w) with s = out_sum[r] as stored,
// so the result equals a separate RMSNorm over the stored residual.
template <typename T>
__device__ void rms_norm_residual(const T* __restrict__ x, const T* __restrict__ delta,
                                  const T* __restrict__ w, T* __restrict__ out, int rows,
                                  int hidden, float eps) {
    __shared__ float scratch[32];
    T* out_sum = out;
    T* out_norm = out + (size_t)rows * hidden;
    const size_t base = (size_t)blockIdx.x * hidden;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        // __fadd_rn/__fmul_rn keep nvcc from contracting into FMAs, so each step rounds
        // exactly as the CPU reference does.
        const float s = to_f32(from_f32<T>(__fadd_rn(to_f32(x[base + i]), to_f32(delta[base + i]))));
        out_sum[base + i] = from_f32<T>(s);
        ss = __fadd_rn(ss, __fmul_rn(s, s));
    }
    ss = block_sum(ss, scratch);
    const float inv = 1.0f / sqrtf(ss / (float)hidden + eps);
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        // This thread wrote out_sum[base + i] above, so it reads its own write.
        const float s = to_f32(out_sum[base + i]);
        out_norm[base + i] = from_f32<T>(__fmul_rn(__fmul_rn(s, inv), to_f32(w[i])));
    }
}

extern "C" __global__ void rms_norm_residual_f32(const float* x, const float* delta, const float* w,
                                                 float* out, int rows, int hidden, float eps) {
    rms_norm_residual<float>(x, delta, w, out, rows, hidden, eps);
}

extern "C" __global__ void rms_norm_residual_bf16(const bf16* x, const bf16* delta, const bf16* w,
                                                  bf16* out, int rows, int hidden, float eps) {
    rms_norm_residual<bf16>(x, delta, w, out, rows, hidden, eps);
}
