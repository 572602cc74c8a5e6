// Shared device helpers for the lorafuse-ops kernels (included by every src/<op>/<op>.cu; build.rs
// passes -I src). Design choices:
// - Storage types are float, __nv_bfloat16 and __half; all arithmetic happens in float (to_f /
//   from_f), so half-precision kernels accumulate in f32 like the reference does.
// - Reductions are warp shuffles first, then one value per warp through shared memory: two
//   __syncthreads per block reduction, no atomics, deterministic results for a given block size.
// - Kernels are declared extern "C" so their names (`<op>_{fwd,bwd}_<dtype>`) survive into PTX.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace lorafuse {

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }

template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Sum over the block; every thread gets the result. `scratch` needs 32 floats of shared memory
// and may be reused right after the call returns (the trailing barrier protects it).
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int n_warps = (blockDim.x + 31) >> 5;
  v = warp_sum(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float r = lane < n_warps ? scratch[lane] : 0.f;
  r = warp_sum(r);
  __syncthreads();
  return r;
}

__device__ __forceinline__ float block_max(float v, float* scratch) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int n_warps = (blockDim.x + 31) >> 5;
  v = warp_max(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float r = lane < n_warps ? scratch[lane] : -INFINITY;
  r = warp_max(r);
  __syncthreads();
  return r;
}

// Two sums at once (e.g. sum(dy*w*x) and sum(dy*w) in LayerNorm's backward), one barrier pair.
__device__ __forceinline__ float2 block_sum2(float a, float b, float2* scratch) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int n_warps = (blockDim.x + 31) >> 5;
  a = warp_sum(a);
  b = warp_sum(b);
  if (lane == 0) scratch[warp] = make_float2(a, b);
  __syncthreads();
  float2 r = lane < n_warps ? scratch[lane] : make_float2(0.f, 0.f);
  r.x = warp_sum(r.x);
  r.y = warp_sum(r.y);
  __syncthreads();
  return r;
}

}  // namespace lorafuse

namespace lorafuse {

// 16-byte vector access: 4 floats or 8 halves per load. Kernels take the vector path only when
// the row length is a multiple of the pack and every pointer is 16-byte aligned (Candle buffers
// are, but a narrowed tensor's offset may not be); the check is uniform over the block.
template <typename T> struct Pack {
  static constexpr int N = 16 / sizeof(T);
};

__device__ __forceinline__ bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

// Row kernels keep a whole row in registers when it spans at most this many 16-byte packs per
// thread (the host sizes blocks for about four): one read of the row instead of two, and every
// load of a thread in flight at once. 4 packs are 32 floats for half types, 16 for f32.
constexpr int kRowPacksPerThread = 4;

// A pack kept as its raw 16 bytes: a row held across a block reduction costs half the registers
// of its floats for 2-byte types (more resident rows per SM); `unpack` converts when needed.
template <typename T> __device__ __forceinline__ uint4 load_raw(const T* p) {
  return *reinterpret_cast<const uint4*>(p);
}

// The same pack from a pointer that may not be 16-byte aligned (`vec` false): element loads.
template <typename T> __device__ __forceinline__ uint4 load_raw_any(const T* p, bool vec) {
  if (vec) return load_raw(p);
  uint4 raw;
  T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
  for (int k = 0; k < Pack<T>::N; ++k) e[k] = p[k];
  return raw;
}

template <typename T> __device__ __forceinline__ void unpack(const uint4& raw, float* out) {
  const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int k = 0; k < Pack<T>::N; ++k) out[k] = to_f(e[k]);
}

template <typename T> __device__ __forceinline__ void load_pack(const T* p, float* out) {
  unpack<T>(load_raw(p), out);
}

template <typename T> __device__ __forceinline__ void store_pack(T* p, const float* in) {
  uint4 raw;
  T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
  for (int k = 0; k < Pack<T>::N; ++k) e[k] = from_f<T>(in[k]);
  *reinterpret_cast<uint4*>(p) = raw;
}

// store_pack through a pointer that may not be 16-byte aligned (`vec` false).
template <typename T>
__device__ __forceinline__ void store_pack_any(T* p, const float* in, bool vec) {
  if (vec) return store_pack(p, in);
#pragma unroll
  for (int k = 0; k < Pack<T>::N; ++k) p[k] = from_f<T>(in[k]);
}

// Backward row kernels that keep a row (x and dy) in registers and walk rows with a stride of
// gridDim.x, so each thread owns fixed columns and sums their weight-gradient terms in registers
// over all its block's rows: one read of x and dy in all, instead of a second pass and a separate
// column reduction. The kernels are instantiated for 2 and 4 packs per thread (`P`): registers
// hold P packs of x and dy plus P * 8 f32 sums, so P sets the occupancy; the host picks it.

// Forward row kernels in their persistent form (`<op>_fwd_rows_*`): blocks walk rows
// r = blockIdx.x, blockIdx.x + gridDim.x, ... and load the next row's packs before reducing the
// current one, so a block always has loads in flight, even a 1024-thread block alone on its SM.
// Each thread holds at most kRowPacksPerThread packs of each row (the host checks the fit).
template <typename T>
__device__ __forceinline__ void load_row_packs(const T* row, int packs, bool vec,
                                               uint4 (&raw)[kRowPacksPerThread]) {
  constexpr int V = Pack<T>::N;
#pragma unroll
  for (int j = 0; j < kRowPacksPerThread; ++j) {
    const int p = threadIdx.x + j * blockDim.x;
    if (p < packs) raw[j] = load_raw_any(row + p * V, vec);
  }
}

// Writes a thread's per-column partial sums (one pack's worth, V floats) to row `blockIdx.x` of a
// [gridDim.x, n] f32 buffer that column_finish then reduces.
template <int V> __device__ __forceinline__ void store_partial(float* partial, int n, int col,
                                                              const float* acc) {
  float* dst = partial + (size_t)blockIdx.x * n + col;
#pragma unroll
  for (int k = 0; k < V; k += 4) {
    *reinterpret_cast<float4*>(dst + k) = make_float4(acc[k], acc[k + 1], acc[k + 2], acc[k + 3]);
  }
}

// Column sums of a [rows, n] matrix in two deterministic stages, for weight/bias gradients.
// Stage one: a block of 32 x 8 threads owns 32 columns and one chunk of rows; each thread walks
// its column down every 8th row of the chunk, then the 8 partial sums of a column are added in
// shared memory and written to partial[chunk * n + col]. `term(r, c)` gives the summand.
template <typename F>
__device__ __forceinline__ void column_partial_sums(F term, float* partial, int rows, int n,
                                                    int rows_per_chunk) {
  __shared__ float tile[8][33];
  const int c = blockIdx.x * 32 + threadIdx.x;
  const int r0 = blockIdx.y * rows_per_chunk;
  const int r1 = min(rows, r0 + rows_per_chunk);
  float acc = 0.f;
  if (c < n) {
    for (int r = r0 + threadIdx.y; r < r1; r += 8) acc += term(r, c);
  }
  tile[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && c < n) {
    float s = 0.f;
#pragma unroll
    for (int k = 0; k < 8; ++k) s += tile[k][threadIdx.x];
    partial[(size_t)blockIdx.y * n + c] = s;
  }
}

// Stage two: out[c] = sum over chunks of partial[chunk * n + c], grid-stride over columns.
template <typename T>
__device__ __forceinline__ void column_finish(const float* partial, T* out, int n, int n_chunks) {
  for (int c = blockIdx.x * blockDim.x + threadIdx.x; c < n; c += gridDim.x * blockDim.x) {
    float s = 0.f;
    for (int k = 0; k < n_chunks; ++k) s += partial[(size_t)k * n + c];
    out[c] = from_f<T>(s);
  }
}

}  // namespace lorafuse

// Instantiates `extern "C"` entry points `<name>_f32`, `<name>_bf16`, `<name>_f16` from a macro
// `BODY(T, suffix)` that defines one of them.
#define LORAFUSE_FOR_DTYPES(BODY) \
  BODY(float, f32)                \
  BODY(__nv_bfloat16, bf16)       \
  BODY(__half, f16)
