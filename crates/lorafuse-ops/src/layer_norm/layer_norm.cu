// LayerNorm forward and backward over the last dimension of a contiguous [rows, n] tensor.
//
//   y  = (x - mean) * rstd * w + b,          rstd = 1 / sqrt(mean((x - mean)^2) + eps)
//   dx = rstd * (g - mean(g) - xhat * mean(g * xhat)),   g = dy * w, xhat = (x - mean) * rstd
//   dw = sum over rows of dy * xhat,  db = sum over rows of dy
//
// Design choices:
// - One block per row, 16-byte vector loads where possible, f32 statistics.
// - Two-pass statistics (mean, then the centred sum of squares) rather than E[x^2] - mean^2:
//   BERT activations have large means relative to their spread, where the one-pass formula
//   cancels catastrophically in f32; the second pass re-reads a row that is still in L1/L2.
// - The forward stores nothing; the backward recomputes mean and rstd (writing them per row for
//   the parameter-gradient kernels) and forms mean(g) and mean(g * xhat) in one fused reduction.
// - Rows that fit in registers take layer_norm_bwd_rows{2,4}_*: x and dy read once, dw and db
//   summed per column in registers by persistent blocks (see store_partial in cuda_util.cuh).
// - Otherwise dw and db are column reductions in two deterministic stages (see cuda_util.cuh),
//   launched only for parameters that track gradients. Without a bias the host passes
//   has_bias = 0 and a dummy (the weight) for the bias pointer.
// - Half-precision rows that fit in registers take layer_norm_fwd_rows_*, the persistent form of
//   the forward (see load_row_packs in cuda_util.cuh).
#include "cuda_util.cuh"

using namespace lorafuse;

// Mean then rstd of a row, two block reductions; every thread gets both.
template <typename T>
__device__ __forceinline__ float2 row_stats(const T* xr, int n, float eps, bool vec,
                                            float* scratch) {
  constexpr int V = Pack<T>::N;
  float s = 0.f;
  if (vec) {
    for (int p = threadIdx.x; p < n / V; p += blockDim.x) {
      float v[V];
      load_pack(xr + p * V, v);
#pragma unroll
      for (int k = 0; k < V; ++k) s += v[k];
    }
  } else {
    for (int i = threadIdx.x; i < n; i += blockDim.x) s += to_f(xr[i]);
  }
  const float mean = block_sum(s, scratch) / n;
  float ss = 0.f;
  if (vec) {
    for (int p = threadIdx.x; p < n / V; p += blockDim.x) {
      float v[V];
      load_pack(xr + p * V, v);
#pragma unroll
      for (int k = 0; k < V; ++k) ss += (v[k] - mean) * (v[k] - mean);
    }
  } else {
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
      const float c = to_f(xr[i]) - mean;
      ss += c * c;
    }
  }
  const float rstd = rsqrtf(block_sum(ss, scratch) / n + eps);
  return make_float2(mean, rstd);
}

// P: packs per thread of the register path (8 for rows past 4 x 1024 packs: `<op>_fwd8_*`).
template <typename T, int P = kRowPacksPerThread>
__device__ __forceinline__ void layer_norm_fwd_impl(const T* __restrict__ x,
                                                    const T* __restrict__ w,
                                                    const T* __restrict__ b, bool has_bias,
                                                    T* __restrict__ y, int n, float eps) {
  __shared__ float scratch[32];
  constexpr int V = Pack<T>::N;
  const T* xr = x + (size_t)blockIdx.x * n;
  T* yr = y + (size_t)blockIdx.x * n;
  const bool vec = n % V == 0 && aligned16(xr) && aligned16(yr) && aligned16(w) && aligned16(b);
  const int packs = n / V;
  if (vec && packs <= P * (int)blockDim.x) {
    // Raw packs: half the registers of floats for 2-byte types, so more rows share an SM.
    // (Fetching weight and bias before the reductions as well measured slower.)
    uint4 xraw[P];
    float sum = 0.f;
#pragma unroll
    for (int j = 0; j < P; ++j) {
      const int p = threadIdx.x + j * blockDim.x;
      if (p < packs) {
        xraw[j] = load_raw(xr + p * V);
        float v[V];
        unpack<T>(xraw[j], v);
#pragma unroll
        for (int k = 0; k < V; ++k) sum += v[k];
      }
    }
    const float mean = block_sum(sum, scratch) / n;
    float ss = 0.f;
#pragma unroll
    for (int j = 0; j < P; ++j) {
      if (threadIdx.x + j * blockDim.x < packs) {
        float v[V];
        unpack<T>(xraw[j], v);
#pragma unroll
        for (int k = 0; k < V; ++k) {
          const float d = v[k] - mean;
          ss += d * d;
        }
      }
    }
    const float rstd = rsqrtf(block_sum(ss, scratch) / n + eps);
#pragma unroll
    for (int j = 0; j < P; ++j) {
      const int p = threadIdx.x + j * blockDim.x;
      if (p < packs) {
        // All-zero bits are 0.0 in every storage type, so a missing bias needs no branch here.
        float v[V], wv[V], bv[V];
        unpack<T>(xraw[j], v);
        unpack<T>(load_raw(w + p * V), wv);
        unpack<T>(has_bias ? load_raw(b + p * V) : make_uint4(0u, 0u, 0u, 0u), bv);
#pragma unroll
        for (int k = 0; k < V; ++k) v[k] = (v[k] - mean) * rstd * wv[k] + bv[k];
        store_pack(yr + p * V, v);
      }
    }
    return;
  }
  const float2 st = row_stats(xr, n, eps, vec, scratch);
  if (vec) {
    for (int p = threadIdx.x; p < n / V; p += blockDim.x) {
      float xv[V], wv[V], bv[V];
      load_pack(xr + p * V, xv);
      load_pack(w + p * V, wv);
      if (has_bias) {
        load_pack(b + p * V, bv);
      } else {
#pragma unroll
        for (int k = 0; k < V; ++k) bv[k] = 0.f;
      }
#pragma unroll
      for (int k = 0; k < V; ++k) xv[k] = (xv[k] - st.x) * st.y * wv[k] + bv[k];
      store_pack(yr + p * V, xv);
    }
  } else {
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
      const float bias = has_bias ? to_f(b[i]) : 0.f;
      yr[i] = from_f<T>((to_f(xr[i]) - st.x) * st.y * to_f(w[i]) + bias);
    }
  }
}

// Persistent form of the register-row forward (see load_row_packs in cuda_util.cuh); the host
// checks n % V == 0 and n / V <= P * blockDim.x.
template <typename T>
__device__ __forceinline__ void layer_norm_fwd_rows_impl(const T* __restrict__ x,
                                                         const T* __restrict__ w,
                                                         const T* __restrict__ b, bool has_bias,
                                                         T* __restrict__ y, int rows, int n,
                                                         float eps) {
  __shared__ float scratch[32];
  constexpr int V = Pack<T>::N;
  const int packs = n / V;
  const bool vec = aligned16(x) && aligned16(y) && aligned16(w) && aligned16(b);
  uint4 cur[kRowPacksPerThread], next[kRowPacksPerThread];
  int r = blockIdx.x;
  if (r < rows) load_row_packs(x + (size_t)r * n, packs, vec, cur);
  for (; r < rows; r += gridDim.x) {
    const int rn = r + gridDim.x;
    if (rn < rows) load_row_packs(x + (size_t)rn * n, packs, vec, next);
    float sum = 0.f;
#pragma unroll
    for (int j = 0; j < kRowPacksPerThread; ++j) {
      if (threadIdx.x + j * blockDim.x < packs) {
        float v[V];
        unpack<T>(cur[j], v);
#pragma unroll
        for (int k = 0; k < V; ++k) sum += v[k];
      }
    }
    const float mean = block_sum(sum, scratch) / n;
    float ss = 0.f;
#pragma unroll
    for (int j = 0; j < kRowPacksPerThread; ++j) {
      if (threadIdx.x + j * blockDim.x < packs) {
        float v[V];
        unpack<T>(cur[j], v);
#pragma unroll
        for (int k = 0; k < V; ++k) ss += (v[k] - mean) * (v[k] - mean);
      }
    }
    const float rstd = rsqrtf(block_sum(ss, scratch) / n + eps);
    T* yr = y + (size_t)r * n;
#pragma unroll
    for (int j = 0; j < kRowPacksPerThread; ++j) {
      const int p = threadIdx.x + j * blockDim.x;
      if (p < packs) {
        float v[V], wv[V], bv[V];
        unpack<T>(cur[j], v);
        unpack<T>(load_raw_any(w + p * V, vec), wv);
        unpack<T>(has_bias ? load_raw_any(b + p * V, vec) : make_uint4(0u, 0u, 0u, 0u), bv);
#pragma unroll
        for (int k = 0; k < V; ++k) v[k] = (v[k] - mean) * rstd * wv[k] + bv[k];
        store_pack_any(yr + p * V, v, vec);
      }
      cur[j] = next[j];
    }
  }
}

template <typename T>
__device__ __forceinline__ void layer_norm_bwd_impl(const T* __restrict__ x,
                                                    const T* __restrict__ w,
                                                    const T* __restrict__ dy, T* __restrict__ dx,
                                                    float2* __restrict__ stats_out, int n,
                                                    float eps) {
  __shared__ float scratch[32];
  __shared__ float2 scratch2[32];
  constexpr int V = Pack<T>::N;
  const size_t off = (size_t)blockIdx.x * n;
  const T* xr = x + off;
  const T* gr = dy + off;
  T* dxr = dx + off;
  const bool vec = n % V == 0 && aligned16(xr) && aligned16(gr) && aligned16(dxr) && aligned16(w);
  const float2 st = row_stats(xr, n, eps, vec, scratch);
  const float mean = st.x, rstd = st.y;
  float sg = 0.f, sgx = 0.f;
  if (vec) {
    for (int p = threadIdx.x; p < n / V; p += blockDim.x) {
      float xv[V], wv[V], gv[V];
      load_pack(xr + p * V, xv);
      load_pack(w + p * V, wv);
      load_pack(gr + p * V, gv);
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const float g = gv[k] * wv[k];
        sg += g;
        sgx += g * (xv[k] - mean) * rstd;
      }
    }
  } else {
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
      const float g = to_f(gr[i]) * to_f(w[i]);
      sg += g;
      sgx += g * (to_f(xr[i]) - mean) * rstd;
    }
  }
  const float2 sums = block_sum2(sg, sgx, scratch2);
  const float mg = sums.x / n, mgx = sums.y / n;
  if (threadIdx.x == 0) stats_out[blockIdx.x] = st;
  if (vec) {
    for (int p = threadIdx.x; p < n / V; p += blockDim.x) {
      float xv[V], wv[V], gv[V];
      load_pack(xr + p * V, xv);
      load_pack(w + p * V, wv);
      load_pack(gr + p * V, gv);
#pragma unroll
      for (int k = 0; k < V; ++k) {
        xv[k] = rstd * (gv[k] * wv[k] - mg - (xv[k] - mean) * rstd * mgx);
      }
      store_pack(dxr + p * V, xv);
    }
  } else {
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
      const float g = to_f(gr[i]) * to_f(w[i]);
      dxr[i] = from_f<T>(rstd * (g - mg - (to_f(xr[i]) - mean) * rstd * mgx));
    }
  }
}

// Backward for rows held in registers (the host checks n % V == 0 and n / V <= P * blockDim.x):
// persistent blocks walk rows r = blockIdx.x, blockIdx.x + gridDim.x, ...; x and dy are read
// once. Two block reductions per row: (sum x, sum g) give mean and mean(g), then the centred
// (sum d^2, sum g * d) give rstd and mean(g * xhat), with g = dy * w and d = x - mean. Each thread
// sums dy * xhat (dw) and dy (db) for its own columns over its block's rows and writes one row of
// partial sums each at the end (column_finish adds them up).
template <typename T, int P>
__device__ __forceinline__ void layer_norm_bwd_rows_impl(
    const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ dy,
    T* __restrict__ dx, float* __restrict__ partial_dw, float* __restrict__ partial_db,
    bool want_dw, bool want_db, int rows, int n, float eps) {
  __shared__ float2 scratch[32];
  constexpr int V = Pack<T>::N;
  const int packs = n / V;
  const bool vec = aligned16(x) && aligned16(w) && aligned16(dy) && aligned16(dx) &&
                   (size_t)n * sizeof(T) % 16 == 0;
  float adw[P][V], adb[P][V];
#pragma unroll
  for (int j = 0; j < P; ++j) {
#pragma unroll
    for (int k = 0; k < V; ++k) adw[j][k] = adb[j][k] = 0.f;
  }
  for (int r = blockIdx.x; r < rows; r += gridDim.x) {
    const size_t off = (size_t)r * n;
    uint4 xraw[P], graw[P];
    float sx = 0.f, sg = 0.f;
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
          sx += xv[k];
          sg += gv[k] * wv[k];
        }
      }
    }
    const float2 s1 = block_sum2(sx, sg, scratch);
    const float mean = s1.x / n, mg = s1.y / n;
    float ss = 0.f, sgd = 0.f;
#pragma unroll
    for (int j = 0; j < P; ++j) {
      const int p = threadIdx.x + j * blockDim.x;
      if (p < packs) {
        float xv[V], gv[V], wv[V];
        unpack<T>(xraw[j], xv);
        unpack<T>(graw[j], gv);
        unpack<T>(load_raw_any(w + p * V, vec), wv);
#pragma unroll
        for (int k = 0; k < V; ++k) {
          const float d = xv[k] - mean;
          ss += d * d;
          sgd += gv[k] * wv[k] * d;
        }
      }
    }
    const float2 s2 = block_sum2(ss, sgd, scratch);
    const float rstd = rsqrtf(s2.x / n + eps);
    const float mgx = rstd * s2.y / n;
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
          const float xhat = (xv[k] - mean) * rstd;
          o[k] = rstd * (gv[k] * wv[k] - mg - xhat * mgx);
          adw[j][k] += gv[k] * xhat;
          adb[j][k] += gv[k];
        }
        store_pack_any(dx + off + p * V, o, vec);
      }
    }
  }
#pragma unroll
  for (int j = 0; j < P; ++j) {
    const int p = threadIdx.x + j * blockDim.x;
    if (p < packs) {
      if (want_dw) store_partial<V>(partial_dw, n, p * V, adw[j]);
      if (want_db) store_partial<V>(partial_db, n, p * V, adb[j]);
    }
  }
}

#define LAYER_NORM_KERNELS(T, S)                                                                 \
  extern "C" __global__ void layer_norm_fwd_##S(const T* x, const T* w, const T* b,              \
                                                int has_bias, T* y, int n, float eps) {          \
    layer_norm_fwd_impl<T>(x, w, b, has_bias != 0, y, n, eps);                                   \
  }                                                                                              \
  extern "C" __global__ void __launch_bounds__(1024)                                              \
      layer_norm_fwd8_##S(const T* x, const T* w, const T* b,                                     \
                                                int has_bias, T* y, int n, float eps) {          \
    layer_norm_fwd_impl<T, 8>(x, w, b, has_bias != 0, y, n, eps);                                   \
  }                                                                                              \
  extern "C" __global__ void __launch_bounds__(1024)                                            \
      layer_norm_fwd_rows_##S(const T* x, const T* w, const T* b, int has_bias, T* y, int rows,  \
                              int n, float eps) {                                                \
    layer_norm_fwd_rows_impl<T>(x, w, b, has_bias != 0, y, rows, n, eps);                        \
  }                                                                                              \
  extern "C" __global__ void layer_norm_bwd_##S(const T* x, const T* w, const T* dy, T* dx,      \
                                                float2* stats, int n, float eps) {               \
    layer_norm_bwd_impl<T>(x, w, dy, dx, stats, n, eps);                                         \
  }                                                                                              \
  extern "C" __global__ void layer_norm_bwd_dw_##S(const T* x, const T* dy, const float2* stats, \
                                                   float* partial, int rows, int n,              \
                                                   int rows_per_chunk) {                         \
    column_partial_sums(                                                                         \
        [=](int r, int c) {                                                                      \
          const size_t i = (size_t)r * n + c;                                                    \
          return to_f(dy[i]) * (to_f(x[i]) - stats[r].x) * stats[r].y;                           \
        },                                                                                       \
        partial, rows, n, rows_per_chunk);                                                       \
  }                                                                                              \
  extern "C" __global__ void layer_norm_bwd_db_##S(const T* dy, float* partial, int rows, int n, \
                                                   int rows_per_chunk) {                         \
    column_partial_sums([=](int r, int c) { return to_f(dy[(size_t)r * n + c]); }, partial,     \
                        rows, n, rows_per_chunk);                                                \
  }                                                                                              \
  extern "C" __global__ void layer_norm_bwd_rows2_##S(                                          \
      const T* x, const T* w, const T* dy, T* dx, float* partial_dw, float* partial_db,          \
      int want_dw, int want_db, int rows, int n, float eps) {                                    \
    layer_norm_bwd_rows_impl<T, 2>(x, w, dy, dx, partial_dw, partial_db, want_dw != 0,           \
                                   want_db != 0, rows, n, eps);                                  \
  }                                                                                              \
  extern "C" __global__ void layer_norm_bwd_rows4_##S(                                          \
      const T* x, const T* w, const T* dy, T* dx, float* partial_dw, float* partial_db,          \
      int want_dw, int want_db, int rows, int n, float eps) {                                    \
    layer_norm_bwd_rows_impl<T, 4>(x, w, dy, dx, partial_dw, partial_db, want_dw != 0,           \
                                   want_db != 0, rows, n, eps);                                  \
  }                                                                                              \
  extern "C" __global__ void layer_norm_bwd_finish_##S(const float* partial, T* out, int n,      \
                                                       int n_chunks) {                           \
    column_finish<T>(partial, out, n, n_chunks);                                                 \
  }

LORAFUSE_FOR_DTYPES(LAYER_NORM_KERNELS)
