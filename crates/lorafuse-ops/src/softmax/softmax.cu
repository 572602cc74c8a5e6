// Softmax over the last dimension of a contiguous [rows, n] tensor, forward and backward.
//
//   y  = exp(x - max) / sum(exp(x - max))
//   dx = y * (dy - sum(dy * y))
//
// Design choices:
// - One block per row, 16-byte vector loads where the row length and alignment allow.
// - Forward is "online": each thread keeps a running (max, sum of exp) over its elements in one
//   read of x, the block combines the pairs (max first, then the rescaled sums), and a second
//   read writes y. Two reads of x instead of the naive three.
// - expf, not __expf: the argument x - max is <= 0 and can be large in magnitude, where the fast
//   intrinsic's error grows with |x|; the kernel is bandwidth-bound so the accurate one is free.
// - Long half-precision rows that fit in registers (blocks of 512+ threads) take
//   softmax_fwd_rows_*, the persistent form (see load_row_packs in cuda_util.cuh).
// - Backward needs only y (the forward's output, which autograd keeps anyway) and dy.
#include "cuda_util.cuh"

using namespace lorafuse;

// P: packs per thread of the register path (8 for rows past 4 x 1024 packs: `<op>_fwd8_*`).
template <typename T, int P = kRowPacksPerThread>
__device__ __forceinline__ void softmax_fwd_impl(const T* __restrict__ x, T* __restrict__ y,
                                                 int n) {
  __shared__ float scratch[32];
  constexpr int V = Pack<T>::N;
  const T* xr = x + (size_t)blockIdx.x * n;
  T* yr = y + (size_t)blockIdx.x * n;
  const bool vec = n % V == 0 && aligned16(xr) && aligned16(yr);
  const int packs = n / V;
  if (vec && packs <= P * (int)blockDim.x) {
    float v[P][V];
    float mx = -INFINITY;
#pragma unroll
    for (int j = 0; j < P; ++j) {
      const int p = threadIdx.x + j * blockDim.x;
      if (p < packs) {
        load_pack(xr + p * V, v[j]);
#pragma unroll
        for (int k = 0; k < V; ++k) mx = fmaxf(mx, v[j][k]);
      }
    }
    const float row_max = block_max(mx, scratch);
    float sum = 0.f;
#pragma unroll
    for (int j = 0; j < P; ++j) {
      if (threadIdx.x + j * blockDim.x < packs) {
#pragma unroll
        for (int k = 0; k < V; ++k) {
          v[j][k] = expf(v[j][k] - row_max);
          sum += v[j][k];
        }
      }
    }
    const float inv = 1.f / block_sum(sum, scratch);
#pragma unroll
    for (int j = 0; j < P; ++j) {
      const int p = threadIdx.x + j * blockDim.x;
      if (p < packs) {
#pragma unroll
        for (int k = 0; k < V; ++k) v[j][k] *= inv;
        store_pack(yr + p * V, v[j]);
      }
    }
    return;
  }
  float m = -INFINITY, s = 0.f;
  auto push = [&](float v) {
    if (v > m) {
      s = s * expf(m - v) + 1.f;
      m = v;
    } else if (m != -INFINITY) {
      // Both -inf (a masked entry before any finite one): contributes nothing, and expf(NaN)
      // must not poison the sum.
      s += expf(v - m);
    }
  };
  if (vec) {
    for (int p = threadIdx.x; p < n / V; p += blockDim.x) {
      float v[V];
      load_pack(xr + p * V, v);
#pragma unroll
      for (int k = 0; k < V; ++k) push(v[k]);
    }
  } else {
    for (int i = threadIdx.x; i < n; i += blockDim.x) push(to_f(xr[i]));
  }
  const float row_max = block_max(m, scratch);
  // A thread that saw no element has m = -inf and s = 0: contributes nothing.
  const float mine = s == 0.f ? 0.f : s * expf(m - row_max);
  const float inv = 1.f / block_sum(mine, scratch);
  if (vec) {
    for (int p = threadIdx.x; p < n / V; p += blockDim.x) {
      float v[V];
      load_pack(xr + p * V, v);
#pragma unroll
      for (int k = 0; k < V; ++k) v[k] = expf(v[k] - row_max) * inv;
      store_pack(yr + p * V, v);
    }
  } else {
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
      yr[i] = from_f<T>(expf(to_f(xr[i]) - row_max) * inv);
    }
  }
}

// Persistent form of the register-row forward (see load_row_packs in cuda_util.cuh); the host
// checks n % V == 0 and n / V <= P * blockDim.x. The row stays raw in
// registers, so the exponentials are taken twice (for the sum, then for the output): free in a
// bandwidth-bound kernel, and half the registers of keeping them.
template <typename T>
__device__ __forceinline__ void softmax_fwd_rows_impl(const T* __restrict__ x, T* __restrict__ y,
                                                      int rows, int n) {
  __shared__ float scratch[32];
  constexpr int V = Pack<T>::N;
  const int packs = n / V;
  const bool vec = aligned16(x) && aligned16(y);
  uint4 cur[kRowPacksPerThread], next[kRowPacksPerThread];
  int r = blockIdx.x;
  if (r < rows) load_row_packs(x + (size_t)r * n, packs, vec, cur);
  for (; r < rows; r += gridDim.x) {
    const int rn = r + gridDim.x;
    if (rn < rows) load_row_packs(x + (size_t)rn * n, packs, vec, next);
    float mx = -INFINITY;
#pragma unroll
    for (int j = 0; j < kRowPacksPerThread; ++j) {
      if (threadIdx.x + j * blockDim.x < packs) {
        float v[V];
        unpack<T>(cur[j], v);
#pragma unroll
        for (int k = 0; k < V; ++k) mx = fmaxf(mx, v[k]);
      }
    }
    const float row_max = block_max(mx, scratch);
    float sum = 0.f;
#pragma unroll
    for (int j = 0; j < kRowPacksPerThread; ++j) {
      if (threadIdx.x + j * blockDim.x < packs) {
        float v[V];
        unpack<T>(cur[j], v);
#pragma unroll
        for (int k = 0; k < V; ++k) sum += expf(v[k] - row_max);
      }
    }
    const float inv = 1.f / block_sum(sum, scratch);
    T* yr = y + (size_t)r * n;
#pragma unroll
    for (int j = 0; j < kRowPacksPerThread; ++j) {
      const int p = threadIdx.x + j * blockDim.x;
      if (p < packs) {
        float v[V];
        unpack<T>(cur[j], v);
#pragma unroll
        for (int k = 0; k < V; ++k) v[k] = expf(v[k] - row_max) * inv;
        store_pack_any(yr + p * V, v, vec);
      }
      cur[j] = next[j];
    }
  }
}

template <typename T>
__device__ __forceinline__ void softmax_bwd_impl(const T* __restrict__ y, const T* __restrict__ dy,
                                                 T* __restrict__ dx, int n) {
  __shared__ float scratch[32];
  constexpr int V = Pack<T>::N;
  const size_t off = (size_t)blockIdx.x * n;
  const T* yr = y + off;
  const T* gr = dy + off;
  T* dxr = dx + off;
  const bool vec = n % V == 0 && aligned16(yr) && aligned16(gr) && aligned16(dxr);
  float dot = 0.f;
  if (vec) {
    for (int p = threadIdx.x; p < n / V; p += blockDim.x) {
      float yv[V], gv[V];
      load_pack(yr + p * V, yv);
      load_pack(gr + p * V, gv);
#pragma unroll
      for (int k = 0; k < V; ++k) dot += yv[k] * gv[k];
    }
  } else {
    for (int i = threadIdx.x; i < n; i += blockDim.x) dot += to_f(yr[i]) * to_f(gr[i]);
  }
  dot = block_sum(dot, scratch);
  if (vec) {
    for (int p = threadIdx.x; p < n / V; p += blockDim.x) {
      float yv[V], gv[V];
      load_pack(yr + p * V, yv);
      load_pack(gr + p * V, gv);
#pragma unroll
      for (int k = 0; k < V; ++k) yv[k] = yv[k] * (gv[k] - dot);
      store_pack(dxr + p * V, yv);
    }
  } else {
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
      dxr[i] = from_f<T>(to_f(yr[i]) * (to_f(gr[i]) - dot));
    }
  }
}

#define SOFTMAX_KERNELS(T, S)                                                             \
  extern "C" __global__ void softmax_fwd_##S(const T* x, T* y, int n) {                   \
    softmax_fwd_impl<T>(x, y, n);                                                         \
  }                                                                                       \
  extern "C" __global__ void __launch_bounds__(1024)                                       \
      softmax_fwd8_##S(const T* x, T* y, int n) {                                          \
    softmax_fwd_impl<T, 8>(x, y, n);                                                         \
  }                                                                                       \
  extern "C" __global__ void __launch_bounds__(1024)                                        \
      softmax_fwd_rows_##S(const T* x, T* y, int rows, int n) {                              \
    softmax_fwd_rows_impl<T>(x, y, rows, n);                                                 \
  }                                                                                              \
  extern "C" __global__ void softmax_bwd_##S(const T* y, const T* dy, T* dx, int n) {     \
    softmax_bwd_impl<T>(y, dy, dx, n);                                                    \
  }

LORAFUSE_FOR_DTYPES(SOFTMAX_KERNELS)
