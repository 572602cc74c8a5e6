// RoPE: rotates pairs of a contiguous x [b, h, t, d] by per-position angles, forward and inverse.
//
//   (x1, x2) -> (x1 * cos - x2 * sin, x2 * cos + x1 * sin)
//   pairs (i, i + d/2) for the half-rotation layout (HF Llama/Qwen2), (2i, 2i + 1) interleaved
//
// Design choices:
// - One thread per pair, grid-stride: RoPE is pure bandwidth, with no reduction to organise a
//   block around; consecutive threads touch consecutive elements in both layouts.
// - The backward is the inverse rotation, so `sign` = -1 flips sin and the same kernel serves
//   both directions; cos/sin arrive in x's dtype and are read per position (they stay in L2).
#include "cuda_util.cuh"

using namespace lorafuse;

template <typename T>
__device__ __forceinline__ void rope_impl(const T* __restrict__ x, const T* __restrict__ cos,
                                          const T* __restrict__ sin, T* __restrict__ y, int t,
                                          int d, size_t n_pairs, bool interleaved, float sign) {
  const int half = d / 2;
  for (size_t p = (size_t)blockIdx.x * blockDim.x + threadIdx.x; p < n_pairs;
       p += (size_t)gridDim.x * blockDim.x) {
    const size_t row = p / half;
    const int i = (int)(p - row * half);
    const int pos = (int)(row % t);
    const size_t base = row * d;
    const size_t i1 = interleaved ? base + 2 * i : base + i;
    const size_t i2 = interleaved ? i1 + 1 : i1 + half;
    const float c = to_f(cos[pos * half + i]);
    const float s = sign * to_f(sin[pos * half + i]);
    const float x1 = to_f(x[i1]), x2 = to_f(x[i2]);
    y[i1] = from_f<T>(x1 * c - x2 * s);
    y[i2] = from_f<T>(x2 * c + x1 * s);
  }
}

#define ROPE_KERNELS(T, S)                                                                      \
  extern "C" __global__ void rope_fwd_##S(const T* x, const T* cos, const T* sin, T* y, int t,  \
                                          int d, size_t n_pairs, int interleaved) {             \
    rope_impl<T>(x, cos, sin, y, t, d, n_pairs, interleaved != 0, 1.f);                         \
  }                                                                                             \
  extern "C" __global__ void rope_bwd_##S(const T* dy, const T* cos, const T* sin, T* dx, int t, \
                                          int d, size_t n_pairs, int interleaved) {             \
    rope_impl<T>(dy, cos, sin, dx, t, d, n_pairs, interleaved != 0, -1.f);                      \
  }

LORAFUSE_FOR_DTYPES(ROPE_KERNELS)
