// RMSNorm forward and backward over the last dimension of a contiguous [rows, n] tensor.
//
//   y  = x * rstd * w,                    rstd = 1 / sqrt(mean(x^2) + eps)
//   dx = rstd * (dy * w - x * rstd^2 * mean(dy * w * x))
//   dw = sum over rows of dy * x * rstd
//
// Design choices:
// - One block per row (threads sized by the host to the row length, 32..1024), 16-byte vector
//   loads when the row and pointers allow, statistics in f32 whatever the storage type.
// - The forward keeps nothing: the backward recomputes rstd from x in the same pass that forms
//   sum(dy * w * x) (one fused block reduction of two sums), which costs one read of x instead of
//   storing an f32 per row through the autograd graph.
// - The weight gradient is a column reduction over rows; the row kernel writes rstd per row, then
//   rms_norm_bwd_dw_* sums dy * x * rstd per column chunk and rms_norm_bwd_dw_finish_* adds the
//   chunks: deterministic, no atomics, and parallel over rows even when n is small (576 for
//   SmolLM2).
#include "cuda_util.cuh"

using namespace lorafuse;

template <typename T>
__device__ __forceinline__ void rms_norm_fwd_impl(const T* __restrict__ x, const T* __restrict__ w,
                                                  T* __restrict__ y, int n, float eps) {
  __shared__ float scratch[32];
  constexpr int V = Pack<T>::N;
  const T* xr = x + (size_t)blockIdx.x * n;
  T* yr = y + (size_t)blockIdx.x * n;
  const bool vec = n % V == 0 && aligned16(xr) && aligned16(yr) && aligned16(w);
  const int packs = n / V;
  if (vec && packs <= kRowPacksPerThread * (int)blockDim.x) {
    float v[kRowPacksPerThread][V];
    float ss = 0.f;
#pragma unroll
    for (int j = 0; j < kRowPacksPerThread; ++j) {
      const int p = threadIdx.x + j * blockDim.x;
      if (p < packs) {
        load_pack(xr + p * V, v[j]);
#pragma unroll
        for (int k = 0; k < V; ++k) ss += v[j][k] * v[j][k];
      }
    }
    const float rstd = rsqrtf(block_sum(ss, scratch) / n + eps);
#pragma unroll
    for (int j = 0; j < kRowPacksPerThread; ++j) {
      const int p = threadIdx.x + j * blockDim.x;
      if (p < packs) {
        float wv[V], o[V];
        load_pack(w + p * V, wv);
#pragma unroll
        for (int k = 0; k < V; ++k) o[k] = v[j][k] * rstd * wv[k];
        store_pack(yr + p * V, o);
      }
    }
    return;
  }
  float ss = 0.f;
  if (vec) {
    for (int p = threadIdx.x; p < n / V; p += blockDim.x) {
      float v[V];
      load_pack(xr + p * V, v);
#pragma unroll
      for (int k = 0; k < V; ++k) ss += v[k] * v[k];
    }
  } else {
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
      const float v = to_f(xr[i]);
      ss += v * v;
    }
  }
  const float rstd = rsqrtf(block_sum(ss, scratch) / n + eps);
  if (vec) {
    for (int p = threadIdx.x; p < n / V; p += blockDim.x) {
      float xv[V], wv[V], o[V];
      load_pack(xr + p * V, xv);
      load_pack(w + p * V, wv);
#pragma unroll
      for (int k = 0; k < V; ++k) o[k] = xv[k] * rstd * wv[k];
      store_pack(yr + p * V, o);
    }
  } else {
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
      yr[i] = from_f<T>(to_f(xr[i]) * rstd * to_f(w[i]));
    }
  }
}

template <typename T>
__device__ __forceinline__ void rms_norm_bwd_impl(const T* __restrict__ x, const T* __restrict__ w,
                                                  const T* __restrict__ dy, T* __restrict__ dx,
                                                  float* __restrict__ rstd_out, int n, float eps) {
  __shared__ float2 scratch[32];
  constexpr int V = Pack<T>::N;
  const size_t off = (size_t)blockIdx.x * n;
  const T* xr = x + off;
  const T* dyr = dy + off;
  T* dxr = dx + off;
  const bool vec = n % V == 0 && aligned16(xr) && aligned16(dyr) && aligned16(dxr) && aligned16(w);
  float ss = 0.f, dot = 0.f;
  if (vec) {
    for (int p = threadIdx.x; p < n / V; p += blockDim.x) {
      float xv[V], wv[V], gv[V];
      load_pack(xr + p * V, xv);
      load_pack(w + p * V, wv);
      load_pack(dyr + p * V, gv);
#pragma unroll
      for (int k = 0; k < V; ++k) {
        ss += xv[k] * xv[k];
        dot += gv[k] * wv[k] * xv[k];
      }
    }
  } else {
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
      const float xv = to_f(xr[i]);
      ss += xv * xv;
      dot += to_f(dyr[i]) * to_f(w[i]) * xv;
    }
  }
  const float2 sums = block_sum2(ss, dot, scratch);
  const float rstd = rsqrtf(sums.x / n + eps);
  const float c = rstd * rstd * sums.y / n;
  if (threadIdx.x == 0) rstd_out[blockIdx.x] = rstd;
  if (vec) {
    for (int p = threadIdx.x; p < n / V; p += blockDim.x) {
      float xv[V], wv[V], gv[V], o[V];
      load_pack(xr + p * V, xv);
      load_pack(w + p * V, wv);
      load_pack(dyr + p * V, gv);
#pragma unroll
      for (int k = 0; k < V; ++k) o[k] = rstd * (gv[k] * wv[k] - xv[k] * c);
      store_pack(dxr + p * V, o);
    }
  } else {
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
      dxr[i] = from_f<T>(rstd * (to_f(dyr[i]) * to_f(w[i]) - to_f(xr[i]) * c));
    }
  }
}

#define RMS_NORM_KERNELS(T, S)                                                                    \
  extern "C" __global__ void rms_norm_fwd_##S(const T* x, const T* w, T* y, int n, float eps) {   \
    rms_norm_fwd_impl<T>(x, w, y, n, eps);                                                        \
  }                                                                                               \
  extern "C" __global__ void rms_norm_bwd_##S(const T* x, const T* w, const T* dy, T* dx,         \
                                              float* rstd, int n, float eps) {                    \
    rms_norm_bwd_impl<T>(x, w, dy, dx, rstd, n, eps);                                             \
  }                                                                                               \
  extern "C" __global__ void rms_norm_bwd_dw_##S(const T* x, const T* dy, const float* rstd,      \
                                                 float* partial, int rows, int n,                 \
                                                 int rows_per_chunk) {                            \
    column_partial_sums(                                                                          \
        [=](int r, int c) {                                                                       \
          const size_t i = (size_t)r * n + c;                                                     \
          return to_f(dy[i]) * to_f(x[i]) * rstd[r];                                              \
        },                                                                                        \
        partial, rows, n, rows_per_chunk);                                                        \
  }                                                                                               \
  extern "C" __global__ void rms_norm_bwd_dw_finish_##S(const float* partial, T* dw, int n,       \
                                                        int n_chunks) {                           \
    column_finish<T>(partial, dw, n, n_chunks);                                                   \
  }

LORAFUSE_FOR_DTYPES(RMS_NORM_KERNELS)
