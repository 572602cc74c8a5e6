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
// - Rows that fit in registers take rms_norm_bwd_rows{2,4}_*: x and dy read once, the weight
//   gradient summed per column in registers by persistent blocks (see store_partial in
//   cuda_util.cuh). Longer rows take the two-pass kernel and the column reduction below.
// - Half-precision rows that fit in registers take rms_norm_fwd_rows_*, the persistent form of the
//   forward (see load_row_packs in cuda_util.cuh).
// - The weight gradient is a column reduction over rows; the row kernel writes rstd per row, then
//   rms_norm_bwd_dw_* sums dy * x * rstd per column chunk and rms_norm_bwd_dw_finish_* adds the
//   chunks: deterministic, no atomics, and parallel over rows even when n is small (576 for
//   SmolLM2).
#include "cuda_util.cuh"

using namespace lorafuse;

// P: packs per thread of the register path (8 for rows past 4 x 1024 packs: `<op>_fwd8_*`).
template <typename T, int P = kRowPacksPerThread>
__device__ __forceinline__ void rms_norm_fwd_impl(const T* __restrict__ x, const T* __restrict__ w,
                                                  T* __restrict__ y, int n, float eps) {
  __shared__ float scratch[32];
  constexpr int V = Pack<T>::N;
  const T* xr = x + (size_t)blockIdx.x * n;
  T* yr = y + (size_t)blockIdx.x * n;
  const bool vec = n % V == 0 && aligned16(xr) && aligned16(yr) && aligned16(w);
  const int packs = n / V;
  if (vec && packs <= P * (int)blockDim.x) {
    // Raw packs: half the registers of floats for 2-byte types, so more rows share an SM.
    // (Fetching the weight before the reduction as well measured slower: fewer resident rows.)
    uint4 xraw[P];
    float ss = 0.f;
#pragma unroll
    for (int j = 0; j < P; ++j) {
      const int p = threadIdx.x + j * blockDim.x;
      if (p < packs) {
        xraw[j] = load_raw(xr + p * V);
        float v[V];
        unpack<T>(xraw[j], v);
#pragma unroll
        for (int k = 0; k < V; ++k) ss += v[k] * v[k];
      }
    }
    const float rstd = rsqrtf(block_sum(ss, scratch) / n + eps);
#pragma unroll
    for (int j = 0; j < P; ++j) {
      const int p = threadIdx.x + j * blockDim.x;
      if (p < packs) {
        float v[V], wv[V];
        unpack<T>(xraw[j], v);
        unpack<T>(load_raw(w + p * V), wv);
#pragma unroll
        for (int k = 0; k < V; ++k) v[k] = v[k] * rstd * wv[k];
        store_pack(yr + p * V, v);
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

// Persistent form of the register-row forward (see load_row_packs in cuda_util.cuh); the host
// checks n % V == 0 and n / V <= P * blockDim.x.
template <typename T>
__device__ __forceinline__ void rms_norm_fwd_rows_impl(const T* __restrict__ x,
                                                       const T* __restrict__ w,
                                                       T* __restrict__ y, int rows, int n,
                                                       float eps) {
  __shared__ float scratch[32];
  constexpr int V = Pack<T>::N;
  const int packs = n / V;
  const bool vec = aligned16(x) && aligned16(y) && aligned16(w);
  uint4 cur[kRowPacksPerThread], next[kRowPacksPerThread];
  int r = blockIdx.x;
  if (r < rows) load_row_packs(x + (size_t)r * n, packs, vec, cur);
  for (; r < rows; r += gridDim.x) {
    const int rn = r + gridDim.x;
    if (rn < rows) load_row_packs(x + (size_t)rn * n, packs, vec, next);
    float ss = 0.f;
#pragma unroll
    for (int j = 0; j < kRowPacksPerThread; ++j) {
      if (threadIdx.x + j * blockDim.x < packs) {
        float v[V];
        unpack<T>(cur[j], v);
#pragma unroll
        for (int k = 0; k < V; ++k) ss += v[k] * v[k];
      }
    }
    const float rstd = rsqrtf(block_sum(ss, scratch) / n + eps);
    T* yr = y + (size_t)r * n;
#pragma unroll
    for (int j = 0; j < kRowPacksPerThread; ++j) {
      const int p = threadIdx.x + j * blockDim.x;
      if (p < packs) {
        float v[V], wv[V];
        unpack<T>(cur[j], v);
        unpack<T>(load_raw_any(w + p * V, vec), wv);
#pragma unroll
        for (int k = 0; k < V; ++k) v[k] = v[k] * rstd * wv[k];
        store_pack_any(yr + p * V, v, vec);
      }
      cur[j] = next[j];
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

// Backward for rows held in registers (the host checks n % V == 0 and n / V <= P * blockDim.x):
// persistent blocks walk rows r = blockIdx.x, blockIdx.x + gridDim.x, ...; x and dy are read
// once, and when want_dw each thread sums dy * x * rstd for its own columns over its block's rows,
// writing one [gridDim.x, n] row of partial sums at the end (column_finish adds them up).
template <typename T, int P>
__device__ __forceinline__ void rms_norm_bwd_rows_impl(const T* __restrict__ x,
                                                       const T* __restrict__ w,
                                                       const T* __restrict__ dy,
                                                       T* __restrict__ dx,
                                                       float* __restrict__ partial, bool want_dw,
                                                       int rows, int n, float eps) {
  __shared__ float2 scratch[32];
  constexpr int V = Pack<T>::N;
  const int packs = n / V;
  const bool vec = aligned16(x) && aligned16(w) && aligned16(dy) && aligned16(dx) &&
                   (size_t)n * sizeof(T) % 16 == 0;
  float adw[P][V];
#pragma unroll
  for (int j = 0; j < P; ++j) {
#pragma unroll
    for (int k = 0; k < V; ++k) adw[j][k] = 0.f;
  }
  for (int r = blockIdx.x; r < rows; r += gridDim.x) {
    const size_t off = (size_t)r * n;
    uint4 xraw[P], graw[P];
    float ss = 0.f, dot = 0.f;
#pragma unroll
    for (int j = 0; j < P; ++j) {
      const int p = threadIdx.x + j * blockDim.x;
      if (p < packs) {
        xraw[j] = load_raw_any(x + off + p * V, vec);
        graw[j] = load_raw_any(dy + off + p * V, vec);
        float xv[V], gv[V], wv[V];
        unpack<T>(xraw[j], xv);
        unpack<T>(graw[j], gv);
        unpack<T>(load_raw_any(w + p * V, vec), wv);
#pragma unroll
        for (int k = 0; k < V; ++k) {
          ss += xv[k] * xv[k];
          dot += gv[k] * wv[k] * xv[k];
        }
      }
    }
    const float2 sums = block_sum2(ss, dot, scratch);
    const float rstd = rsqrtf(sums.x / n + eps);
    const float c = rstd * rstd * sums.y / n;
#pragma unroll
    for (int j = 0; j < P; ++j) {
      const int p = threadIdx.x + j * blockDim.x;
      if (p < packs) {
        float xv[V], gv[V], wv[V], o[V];
        unpack<T>(xraw[j], xv);
        unpack<T>(graw[j], gv);
        unpack<T>(load_raw_any(w + p * V, vec), wv);
#pragma unroll
        for (int k = 0; k < V; ++k) {
          o[k] = rstd * (gv[k] * wv[k] - xv[k] * c);
          adw[j][k] += gv[k] * xv[k] * rstd;
        }
        store_pack_any(dx + off + p * V, o, vec);
      }
    }
  }
  if (want_dw) {
#pragma unroll
    for (int j = 0; j < P; ++j) {
      const int p = threadIdx.x + j * blockDim.x;
      if (p < packs) store_partial<V>(partial, n, p * V, adw[j]);
    }
  }
}

#define RMS_NORM_KERNELS(T, S)                                                                    \
  extern "C" __global__ void rms_norm_fwd_##S(const T* x, const T* w, T* y, int n, float eps) {   \
    rms_norm_fwd_impl<T>(x, w, y, n, eps);                                                        \
  }                                                                                               \
  extern "C" __global__ void __launch_bounds__(1024)                                               \
      rms_norm_fwd8_##S(const T* x, const T* w, T* y, int n, float eps) {                          \
    rms_norm_fwd_impl<T, 8>(x, w, y, n, eps);                                                        \
  }                                                                                               \
  extern "C" __global__ void __launch_bounds__(1024)                                             \
      rms_norm_fwd_rows_##S(const T* x, const T* w, T* y, int rows, int n, float eps) {           \
    rms_norm_fwd_rows_impl<T>(x, w, y, rows, n, eps);                                             \
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
  extern "C" __global__ void rms_norm_bwd_rows2_##S(const T* x, const T* w, const T* dy, T* dx,   \
                                                    float* partial, int want_dw, int rows, int n, \
                                                    float eps) {                                  \
    rms_norm_bwd_rows_impl<T, 2>(x, w, dy, dx, partial, want_dw != 0, rows, n, eps);            \
  }                                                                                               \
  extern "C" __global__ void rms_norm_bwd_rows4_##S(const T* x, const T* w, const T* dy, T* dx,   \
                                                    float* partial, int want_dw, int rows, int n, \
                                                    float eps) {                                  \
    rms_norm_bwd_rows_impl<T, 4>(x, w, dy, dx, partial, want_dw != 0, rows, n, eps);            \
  }                                                                                               \
  extern "C" __global__ void rms_norm_bwd_dw_finish_##S(const float* partial, T* dw, int n,       \
                                                        int n_chunks) {                           \
    column_finish<T>(partial, dw, n, n_chunks);                                                   \
  }

LORAFUSE_FOR_DTYPES(RMS_NORM_KERNELS)
