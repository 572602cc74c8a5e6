// SwiGLU forward and backward, elementwise over contiguous buffers of n elements.
//
//   y     = silu(g) * u = g * s * u,          s = sigmoid(g)
//   dgate = dy * u * s * (1 + g * (1 - s))
//   dup   = dy * g * s
//
// Design choices:
// - Grid-stride loops over 16-byte packs (4 floats or 8 halves) when every pointer is aligned,
//   with a scalar tail; a scalar loop otherwise. Arithmetic in f32.
// - The backward recomputes s from g instead of saving it: one expf is cheaper than a tensor's
//   worth of memory traffic, and writes dgate and dup in the same pass (packed output: dgate in
//   the first n elements, dup in the next n).
#include "cuda_util.cuh"

using namespace lorafuse;

__device__ __forceinline__ float sigmoidf(float g) { return 1.f / (1.f + expf(-g)); }

template <typename T>
__device__ __forceinline__ void swiglu_fwd_impl(const T* __restrict__ g, const T* __restrict__ u,
                                                T* __restrict__ y, size_t n) {
  constexpr int V = Pack<T>::N;
  const size_t stride = (size_t)gridDim.x * blockDim.x;
  size_t start = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  size_t done = 0;
  if (aligned16(g) && aligned16(u) && aligned16(y)) {
    for (size_t p = start; p < n / V; p += stride) {
      float gv[V], uv[V];
      load_pack(g + p * V, gv);
      load_pack(u + p * V, uv);
#pragma unroll
      for (int k = 0; k < V; ++k) gv[k] = gv[k] * sigmoidf(gv[k]) * uv[k];
      store_pack(y + p * V, gv);
    }
    done = n / V * V;
  }
  for (size_t i = done + start; i < n; i += stride) {
    const float gv = to_f(g[i]);
    y[i] = from_f<T>(gv * sigmoidf(gv) * to_f(u[i]));
  }
}

template <typename T>
__device__ __forceinline__ void swiglu_bwd_impl(const T* __restrict__ g, const T* __restrict__ u,
                                                const T* __restrict__ dy, T* __restrict__ out,
                                                size_t n) {
  constexpr int V = Pack<T>::N;
  T* dg = out;
  T* du = out + n;
  const size_t stride = (size_t)gridDim.x * blockDim.x;
  size_t start = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  size_t done = 0;
  if (aligned16(g) && aligned16(u) && aligned16(dy) && aligned16(dg) && aligned16(du)) {
    for (size_t p = start; p < n / V; p += stride) {
      float gv[V], uv[V], dv[V], a[V], b[V];
      load_pack(g + p * V, gv);
      load_pack(u + p * V, uv);
      load_pack(dy + p * V, dv);
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const float s = sigmoidf(gv[k]);
        a[k] = dv[k] * uv[k] * s * (1.f + gv[k] * (1.f - s));
        b[k] = dv[k] * gv[k] * s;
      }
      store_pack(dg + p * V, a);
      store_pack(du + p * V, b);
    }
    done = n / V * V;
  }
  for (size_t i = done + start; i < n; i += stride) {
    const float gv = to_f(g[i]), uv = to_f(u[i]), dv = to_f(dy[i]);
    const float s = sigmoidf(gv);
    dg[i] = from_f<T>(dv * uv * s * (1.f + gv * (1.f - s)));
    du[i] = from_f<T>(dv * gv * s);
  }
}

#define SWIGLU_KERNELS(T, S)                                                                     \
  extern "C" __global__ void swiglu_fwd_##S(const T* g, const T* u, T* y, size_t n) {            \
    swiglu_fwd_impl<T>(g, u, y, n);                                                              \
  }                                                                                              \
  extern "C" __global__ void swiglu_bwd_##S(const T* g, const T* u, const T* dy, T* out,         \
                                            size_t n) {                                          \
    swiglu_bwd_impl<T>(g, u, dy, out, n);                                                        \
  }

LORAFUSE_FOR_DTYPES(SWIGLU_KERNELS)
