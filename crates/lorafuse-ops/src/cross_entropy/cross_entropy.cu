// Cross-entropy over a [n, V] logits matrix with i64 targets and an ignore index.
//
//   loss_i   = lse_i - x[i, t_i]            lse_i = log sum_j exp(x[i, j])
//   dx[i, j] = (exp(x[i, j] - lse_i) - [j == t_i]) * coef_i
//   coef_i   = g (Sum), g / max(count, 1) (Mean), g_i (None); 0 for ignored rows
//
// Design choices:
// - One block per row, 16-byte vector loads where the row length and alignment allow. The forward
//   reads each row once: every thread keeps an online (max, rescaled sum of exp) pair, the block
//   combines the pairs. Nothing of vocabulary size is ever written by the forward: it leaves
//   per-row loss and lse (f32) for the reduction and the backward.
// - The reduction (sum of losses, count of counted rows) is a separate one-block kernel so that
//   its order is fixed: the loss is deterministic run to run (no atomics).
// - The backward reads the row once more and writes the gradient in the logits' dtype directly.
// - An out-of-range target cannot raise an error from a kernel: its row gets a NaN loss, which
//   the training loop sees at once (the CPU path returns an error naming the row).
// - expf, not __expf: arguments are <= 0 and can be large, where the intrinsic loses accuracy.
#include "cuda_util.cuh"

using namespace lorafuse;

template <typename T>
__device__ __forceinline__ void ce_fwd_impl(const T* __restrict__ logits,
                                            const long long* __restrict__ targets,
                                            float* __restrict__ loss, float* __restrict__ lse,
                                            int V, long long ignore) {
  __shared__ float scratch[32];
  const int row = blockIdx.x;
  const long long t = targets[row];
  if (t == ignore) {
    if (threadIdx.x == 0) {
      loss[row] = 0.f;
      lse[row] = 0.f;
    }
    return;
  }
  constexpr int P = Pack<T>::N;
  const T* xr = logits + (size_t)row * V;
  const bool vec = V % P == 0 && aligned16(xr);
  float m = -INFINITY, s = 0.f;
  auto push = [&](float v) {
    if (v > m) {
      s = s * expf(m - v) + 1.f;
      m = v;
    } else if (v > -INFINITY) {
      s += expf(v - m);
    }
  };
  if (vec) {
    for (int p = threadIdx.x; p < V / P; p += blockDim.x) {
      float v[P];
      load_pack(xr + (size_t)p * P, v);
#pragma unroll
      for (int k = 0; k < P; ++k) push(v[k]);
    }
  } else {
    for (int j = threadIdx.x; j < V; j += blockDim.x) push(to_f(xr[j]));
  }
  const float row_max = block_max(m, scratch);
  const float mine = s == 0.f ? 0.f : s * expf(m - row_max);
  const float l = row_max + logf(block_sum(mine, scratch));
  if (threadIdx.x == 0) {
    const bool ok = t >= 0 && t < V;
    loss[row] = ok ? l - to_f(xr[t]) : NAN;
    lse[row] = l;
  }
}

template <typename T>
__device__ __forceinline__ void ce_bwd_impl(const T* __restrict__ logits,
                                            const long long* __restrict__ targets,
                                            const float* __restrict__ g, int g_per_row,
                                            const float* __restrict__ lse,
                                            const float* __restrict__ count, int mean,
                                            T* __restrict__ dlogits, int V, long long ignore) {
  const int row = blockIdx.x;
  const long long t = targets[row];
  T* dr = dlogits + (size_t)row * V;
  const T* xr = logits + (size_t)row * V;
  if (t == ignore) {
    for (int j = threadIdx.x; j < V; j += blockDim.x) dr[j] = from_f<T>(0.f);
    return;
  }
  float coef = g_per_row ? g[row] : g[0];
  if (mean) coef /= fmaxf(count[0], 1.f);
  const float l = lse[row];
  constexpr int P = Pack<T>::N;
  const bool vec = V % P == 0 && aligned16(xr) && aligned16(dr);
  if (vec) {
    for (int p = threadIdx.x; p < V / P; p += blockDim.x) {
      float v[P];
      load_pack(xr + (size_t)p * P, v);
#pragma unroll
      for (int k = 0; k < P; ++k) {
        const long long j = (long long)p * P + k;
        v[k] = (expf(v[k] - l) - (j == t ? 1.f : 0.f)) * coef;
      }
      store_pack(dr + (size_t)p * P, v);
    }
  } else {
    for (int j = threadIdx.x; j < V; j += blockDim.x) {
      const float d = expf(to_f(xr[j]) - l) - (j == t ? 1.f : 0.f);
      dr[j] = from_f<T>(d * coef);
    }
  }
}

#define CE_KERNELS(T, SUFFIX)                                                                  \
  extern "C" __global__ void cross_entropy_fwd_##SUFFIX(                                      \
      const T* logits, const long long* targets, float* loss, float* lse, int V,               \
      long long ignore) {                                                                      \
    ce_fwd_impl<T>(logits, targets, loss, lse, V, ignore);                                     \
  }                                                                                            \
  extern "C" __global__ void cross_entropy_bwd_##SUFFIX(                                      \
      const T* logits, const long long* targets, const float* g, int g_per_row,                \
      const float* lse, const float* count, int mean, T* dlogits, int V, long long ignore) {   \
    ce_bwd_impl<T>(logits, targets, g, g_per_row, lse, count, mean, dlogits, V, ignore);       \
  }

LORAFUSE_FOR_DTYPES(CE_KERNELS)

// One block: out[0] = sum of losses (divided by max(count, 1) when `mean`), count_out[0] = the
// number of rows whose target is not `ignore`. Fixed summation order: deterministic.
extern "C" __global__ void cross_entropy_fwd_reduce(const float* loss, const long long* targets,
                                                    float* out, float* count_out, int n,
                                                    long long ignore, int mean) {
  __shared__ float2 scratch[32];
  float s = 0.f, c = 0.f;
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    if (targets[i] != ignore) {
      s += loss[i];
      c += 1.f;
    }
  }
  const float2 r = block_sum2(s, c, scratch);
  if (threadIdx.x == 0) {
    out[0] = mean ? r.x / fmaxf(r.y, 1.f) : r.x;
    count_out[0] = r.y;
  }
}
