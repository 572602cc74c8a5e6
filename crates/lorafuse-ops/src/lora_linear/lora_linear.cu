// LoRA linear for decode-sized inputs (1 to 16 rows) in one launch:
//
//   P = x A^T                                  [t, r], rounded to T as the GEMM route stores it
//   y = x W^T + bias + s * P B^T               [t, out]; W and bias optional (delta alone)
//
// The GEMM route takes three cuBLAS calls (P, base, low-rank) and a bias copy, each a few
// microseconds of launch for a few kilobytes of work at decode sizes. Design choices:
// - Every block computes all of P itself (t * r dot products over `in`, from x and A in L2), so
//   no second launch or grid-wide sync is needed; the host takes this path only while that
//   redundant work stays small (t * r * in <= 2^20 per block). Block 0 writes P for the backward.
// - Then each warp owns LS_ROWS output rows: one pass over each W row with 16-byte loads, every
//   weight pack used for all t inputs (NT accumulators a row, NT the row count rounded up to a
//   power of two), f32 accumulation, a warp reduction per (row, input).
// - Rounding follows the GEMM route (bias first, then base with beta = 1, then the scaled
//   low-rank product with beta = 1, each result stored in T): y = T(T(xW + bias) + s (P B^T)).
#include "cuda_util.cuh"

using namespace lorafuse;

#define LS_WARPS 8
#define LS_ROWS 2     // output rows per warp
#define LS_MAX_R 64   // rank limit of the shared P tile

template <typename T> __device__ __forceinline__ float ls_round(float v) {
  return to_f(from_f<T>(v));
}

// Sum over i < n of p[i] * q[i] for one warp (every lane gets it); 16-byte loads when `vec`.
template <typename T>
__device__ __forceinline__ float ls_warp_dot(const T* __restrict__ p, const T* __restrict__ q,
                                             int n, bool vec) {
  constexpr int V = Pack<T>::N;
  const int lane = threadIdx.x & 31;
  float acc = 0.f;
  if (vec) {
    for (int k = lane; k < n / V; k += 32) {
      float a[V], b[V];
      unpack<T>(load_raw(p + k * V), a);
      unpack<T>(load_raw(q + k * V), b);
#pragma unroll
      for (int e = 0; e < V; ++e) acc = fmaf(a[e], b[e], acc);
    }
  } else {
    for (int i = lane; i < n; i += 32) acc = fmaf(to_f(p[i]), to_f(q[i]), acc);
  }
  return warp_sum(acc);
}

template <typename T, int NT>
__device__ __forceinline__ void lora_small_impl(const T* __restrict__ x, const T* __restrict__ w,
                                                const T* __restrict__ bias,
                                                const T* __restrict__ a,
                                                const T* __restrict__ b, T* __restrict__ y,
                                                T* __restrict__ p_out, int t, int in, int out,
                                                int r, float s) {
  __shared__ float u[NT * LS_MAX_R];
  constexpr int V = Pack<T>::N;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const bool vec = in % V == 0 && aligned16(x) && aligned16(a) && (!w || aligned16(w));

  // P = x A^T, a warp per (input, rank) pair
  for (int idx = warp; idx < t * r; idx += LS_WARPS) {
    const int ti = idx / r, j = idx - ti * r;
    const float d = ls_warp_dot(x + (size_t)ti * in, a + (size_t)j * in, in, vec);
    if (lane == 0) {
      u[ti * LS_MAX_R + j] = ls_round<T>(d);
      if (blockIdx.x == 0) p_out[idx] = from_f<T>(d);
    }
  }
  __syncthreads();

  const int o0 = (blockIdx.x * LS_WARPS + warp) * LS_ROWS;
  float acc[LS_ROWS][NT];
#pragma unroll
  for (int ri = 0; ri < LS_ROWS; ++ri)
#pragma unroll
    for (int ti = 0; ti < NT; ++ti) acc[ri][ti] = 0.f;
  if (w) {
    if (vec) {
      for (int k = lane; k < in / V; k += 32) {
        float wv[LS_ROWS][V];
#pragma unroll
        for (int ri = 0; ri < LS_ROWS; ++ri) {
          const int o = min(o0 + ri, out - 1);  // a row past `out` recomputes the last one
          unpack<T>(load_raw(w + (size_t)o * in + k * V), wv[ri]);
        }
#pragma unroll
        for (int ti = 0; ti < NT; ++ti) {
          if (ti < t) {
            float xv[V];
            unpack<T>(load_raw(x + (size_t)ti * in + k * V), xv);
#pragma unroll
            for (int ri = 0; ri < LS_ROWS; ++ri)
#pragma unroll
              for (int e = 0; e < V; ++e) acc[ri][ti] = fmaf(wv[ri][e], xv[e], acc[ri][ti]);
          }
        }
      }
    } else {
      for (int i = lane; i < in; i += 32) {
#pragma unroll
        for (int ri = 0; ri < LS_ROWS; ++ri) {
          const float wv = to_f(w[(size_t)min(o0 + ri, out - 1) * in + i]);
#pragma unroll
          for (int ti = 0; ti < NT; ++ti)
            if (ti < t) acc[ri][ti] = fmaf(wv, to_f(x[(size_t)ti * in + i]), acc[ri][ti]);
        }
      }
    }
  }
#pragma unroll
  for (int ri = 0; ri < LS_ROWS; ++ri)
#pragma unroll
    for (int ti = 0; ti < NT; ++ti) acc[ri][ti] = warp_sum(acc[ri][ti]);

  // lane ti finishes input ti of each of the warp's rows
#pragma unroll
  for (int ri = 0; ri < LS_ROWS; ++ri) {
    const int o = o0 + ri;
    if (o >= out) break;
    float base = 0.f;
#pragma unroll
    for (int ti = 0; ti < NT; ++ti)
      if (lane == ti) base = acc[ri][ti];
    if (lane < t) {
      float low = 0.f;
      for (int j = 0; j < r; ++j) low = fmaf(u[lane * LS_MAX_R + j], to_f(b[(size_t)o * r + j]), low);
      float v = s * low;
      if (w || bias) v += ls_round<T>(base + (bias ? to_f(bias[o]) : 0.f));
      y[(size_t)lane * out + o] = from_f<T>(v);
    }
  }
}

#define LORA_SMALL_KERNEL(T, S, NT)                                                              \
  extern "C" __global__ void __launch_bounds__(32 * LS_WARPS)                                    \
      lora_small##NT##_##S(const T* x, const T* w, const T* bias, const T* a, const T* b, T* y, \
                           T* p_out, int t, int in, int out, int r, float s) {                  \
    lora_small_impl<T, NT>(x, w, bias, a, b, y, p_out, t, in, out, r, s);                       \
  }

#define LORA_SMALL_KERNELS(T, S) \
  LORA_SMALL_KERNEL(T, S, 1)     \
  LORA_SMALL_KERNEL(T, S, 2)     \
  LORA_SMALL_KERNEL(T, S, 4)     \
  LORA_SMALL_KERNEL(T, S, 8)     \
  LORA_SMALL_KERNEL(T, S, 16)

LORA_SMALL_KERNELS(float, f32)
LORA_SMALL_KERNELS(__nv_bfloat16, bf16)
LORA_SMALL_KERNELS(__half, f16)
