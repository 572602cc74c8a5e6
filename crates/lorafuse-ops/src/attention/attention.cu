// Causal attention with grouped-query heads, flash style: q [b, hq, tq, d], k/v [b, hkv, tk, d],
// query i of a head sees keys 0..=i + tk - tq of its kv head (h / (hq / hkv)).
//
//   forward : o_i = sum_j p_ij v_j,  p_ij = exp(s_ij - lse_i),  s_ij = scale * q_i . k_j
//   backward: D_i = do_i . o_i,  ds_ij = p_ij (do_i . v_j - D_i)
//             dq_i = scale * sum_j ds_ij k_j
//             dk_j = scale * sum_{h in group, i} ds_ij q_i,  dv_j = sum_{h in group, i} p_ij do_i
//
// Design choices (correctness first; d <= 128):
// - One warp per row: a lane holds elements lane, lane + 32, lane + 64, lane + 96 of the row in
//   registers (f32), so a dot product is 4 FMAs and one warp_sum. No shared memory, no
//   __syncthreads: warps of a block are independent, and the rows of a block share k/v through L1.
// - The score matrix never exists. The forward runs an online softmax per row and writes its
//   logsumexp (f32); the backward recomputes each p_ij from it.
// - The backward is two race-free kernels, no atomics: `attention_bwd_dq_*` (a warp per query
//   row; also writes D_i) then `attention_bwd_dkv_*` (a warp per key row of a kv head; it walks
//   every query head of its group and every row that sees the key, so GQA needs no reduction
//   buffer). Both write into one packed output [dq | dk | dv].
// - Short query blocks (decode: tq == 1) leave most of the card idle with a warp per row, so
//   `attention_fwd_split_*` gives each row a block of ATT_SPLIT warps that take every
//   ATT_SPLIT-th key, then merges their (max, sum, accumulator) triples in shared memory
//   ("flash decoding"). Same outputs, same logsumexp.
// - All arithmetic in f32 whatever the storage dtype; expf (accurate) for the exponentials.
#include "cuda_util.cuh"

using namespace lorafuse;

#define ATT_ROWS_PER_BLOCK 4
#define ATT_MAX_CHUNKS 4  // 4 x 32 lanes = d <= 128

struct AttDims {
  int b, hq, hkv, tq, tk, d;
  float scale;
};

template <typename T>
__device__ __forceinline__ void load_row(const T* __restrict__ p, int d, float (&r)[ATT_MAX_CHUNKS]) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int c = 0; c < ATT_MAX_CHUNKS; ++c) {
    const int e = lane + 32 * c;
    r[c] = e < d ? to_f(p[e]) : 0.f;
  }
}

template <typename T>
__device__ __forceinline__ void store_row(T* __restrict__ p, int d, const float (&r)[ATT_MAX_CHUNKS],
                                          float mul) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int c = 0; c < ATT_MAX_CHUNKS; ++c) {
    const int e = lane + 32 * c;
    if (e < d) p[e] = from_f<T>(r[c] * mul);
  }
}

// Dot product of a register row with a row in memory, summed over the warp.
template <typename T>
__device__ __forceinline__ float dot_row(const float (&r)[ATT_MAX_CHUNKS], const T* __restrict__ p,
                                         int d) {
  const int lane = threadIdx.x & 31;
  float s = 0.f;
#pragma unroll
  for (int c = 0; c < ATT_MAX_CHUNKS; ++c) {
    const int e = lane + 32 * c;
    if (e < d) s += r[c] * to_f(p[e]);
  }
  return warp_sum(s);
}

// Grid (ceil(tq / 4), b * hq), 128 threads: warp w of block x handles query row 4x + w.
template <typename T>
__device__ __forceinline__ void att_fwd_impl(const T* __restrict__ q, const T* __restrict__ k,
                                             const T* __restrict__ v, T* __restrict__ o,
                                             float* __restrict__ lse, AttDims a) {
  const int i = blockIdx.x * ATT_ROWS_PER_BLOCK + (threadIdx.x >> 5);
  const int bh = blockIdx.y;
  if (i >= a.tq) return;
  const int bi = bh / a.hq, h = bh % a.hq;
  const int g = h / (a.hq / a.hkv);
  const size_t row = (size_t)bh * a.tq + i;
  const T* kb = k + ((size_t)bi * a.hkv + g) * a.tk * a.d;
  const T* vb = v + ((size_t)bi * a.hkv + g) * a.tk * a.d;
  float qr[ATT_MAX_CHUNKS], acc[ATT_MAX_CHUNKS] = {0.f, 0.f, 0.f, 0.f};
  load_row(q + row * a.d, a.d, qr);
  float m = -INFINITY, l = 0.f;
  const int last = i + a.tk - a.tq;
  for (int j = 0; j <= last; ++j) {
    const float s = a.scale * dot_row(qr, kb + (size_t)j * a.d, a.d);
    const float m_new = fmaxf(m, s);
    const float alpha = expf(m - m_new);  // 0 on the first key (m = -inf)
    const float p = expf(s - m_new);
    l = l * alpha + p;
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int c = 0; c < ATT_MAX_CHUNKS; ++c) {
      const int e = lane + 32 * c;
      acc[c] = acc[c] * alpha + (e < a.d ? p * to_f(vb[(size_t)j * a.d + e]) : 0.f);
    }
    m = m_new;
  }
  store_row(o + row * a.d, a.d, acc, 1.f / l);
  if ((threadIdx.x & 31) == 0) lse[row] = m + logf(l);
}

// Grid (ceil(tq / 4), b * hq): a warp per query row; writes dq (into the packed output) and D.
template <typename T>
__device__ __forceinline__ void att_bwd_dq_impl(const T* __restrict__ q, const T* __restrict__ k,
                                                const T* __restrict__ v, const T* __restrict__ o,
                                                const T* __restrict__ dout,
                                                const float* __restrict__ lse,
                                                float* __restrict__ delta, T* __restrict__ dq,
                                                AttDims a) {
  const int i = blockIdx.x * ATT_ROWS_PER_BLOCK + (threadIdx.x >> 5);
  const int bh = blockIdx.y;
  if (i >= a.tq) return;
  const int bi = bh / a.hq, h = bh % a.hq;
  const int g = h / (a.hq / a.hkv);
  const size_t row = (size_t)bh * a.tq + i;
  const T* kb = k + ((size_t)bi * a.hkv + g) * a.tk * a.d;
  const T* vb = v + ((size_t)bi * a.hkv + g) * a.tk * a.d;
  float qr[ATT_MAX_CHUNKS], gr[ATT_MAX_CHUNKS], acc[ATT_MAX_CHUNKS] = {0.f, 0.f, 0.f, 0.f};
  load_row(q + row * a.d, a.d, qr);
  load_row(dout + row * a.d, a.d, gr);
  const float d_i = dot_row(gr, o + row * a.d, a.d);
  const float l = lse[row];
  const int last = i + a.tk - a.tq;
  const int lane = threadIdx.x & 31;
  for (int j = 0; j <= last; ++j) {
    const T* kj = kb + (size_t)j * a.d;
    const float p = expf(a.scale * dot_row(qr, kj, a.d) - l);
    const float ds = p * (dot_row(gr, vb + (size_t)j * a.d, a.d) - d_i);
#pragma unroll
    for (int c = 0; c < ATT_MAX_CHUNKS; ++c) {
      const int e = lane + 32 * c;
      if (e < a.d) acc[c] += ds * to_f(kj[e]);
    }
  }
  store_row(dq + row * a.d, a.d, acc, a.scale);
  if (lane == 0) delta[row] = d_i;
}

// Grid (ceil(tk / 4), b * hkv): a warp per key row; writes dk and dv (packed output).
template <typename T>
__device__ __forceinline__ void att_bwd_dkv_impl(const T* __restrict__ q, const T* __restrict__ k,
                                                 const T* __restrict__ v,
                                                 const T* __restrict__ dout,
                                                 const float* __restrict__ lse,
                                                 const float* __restrict__ delta,
                                                 T* __restrict__ dk, T* __restrict__ dv,
                                                 AttDims a) {
  const int j = blockIdx.x * ATT_ROWS_PER_BLOCK + (threadIdx.x >> 5);
  const int bg = blockIdx.y;
  if (j >= a.tk) return;
  const int bi = bg / a.hkv, g = bg % a.hkv;
  const int rep = a.hq / a.hkv;
  const size_t krow = (size_t)bg * a.tk + j;
  float kr[ATT_MAX_CHUNKS], vr[ATT_MAX_CHUNKS];
  float ak[ATT_MAX_CHUNKS] = {0.f, 0.f, 0.f, 0.f}, av[ATT_MAX_CHUNKS] = {0.f, 0.f, 0.f, 0.f};
  load_row(k + krow * a.d, a.d, kr);
  load_row(v + krow * a.d, a.d, vr);
  // query i sees key j when j <= i + tk - tq
  const int first = max(0, j - (a.tk - a.tq));
  const int lane = threadIdx.x & 31;
  for (int h = g * rep; h < (g + 1) * rep; ++h) {
    const size_t base = ((size_t)bi * a.hq + h) * a.tq;
    for (int i = first; i < a.tq; ++i) {
      const size_t row = base + i;
      const T* qi = q + row * a.d;
      const T* gi = dout + row * a.d;
      const float p = expf(a.scale * dot_row(kr, qi, a.d) - lse[row]);
      const float ds = p * (dot_row(vr, gi, a.d) - delta[row]);
#pragma unroll
      for (int c = 0; c < ATT_MAX_CHUNKS; ++c) {
        const int e = lane + 32 * c;
        if (e < a.d) {
          ak[c] += ds * to_f(qi[e]);
          av[c] += p * to_f(gi[e]);
        }
      }
    }
  }
  store_row(dk + krow * a.d, a.d, ak, a.scale);
  store_row(dv + krow * a.d, a.d, av, 1.f);
}

#define ATT_SPLIT 8

// Grid (tq, b * hq), 32 * ATT_SPLIT threads: one query row per block, warp w takes keys
// w, w + ATT_SPLIT, ...; the partial softmax states are merged by warp 0.
template <typename T>
__device__ __forceinline__ void att_fwd_split_impl(const T* __restrict__ q,
                                                   const T* __restrict__ k,
                                                   const T* __restrict__ v, T* __restrict__ o,
                                                   float* __restrict__ lse, AttDims a) {
  __shared__ float sm_m[ATT_SPLIT], sm_l[ATT_SPLIT];
  __shared__ float sm_acc[ATT_SPLIT][32 * ATT_MAX_CHUNKS];
  const int i = blockIdx.x;
  const int bh = blockIdx.y;
  const int w = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int bi = bh / a.hq, h = bh % a.hq;
  const int g = h / (a.hq / a.hkv);
  const size_t row = (size_t)bh * a.tq + i;
  const T* kb = k + ((size_t)bi * a.hkv + g) * a.tk * a.d;
  const T* vb = v + ((size_t)bi * a.hkv + g) * a.tk * a.d;
  float qr[ATT_MAX_CHUNKS], acc[ATT_MAX_CHUNKS] = {0.f, 0.f, 0.f, 0.f};
  load_row(q + row * a.d, a.d, qr);
  float m = -INFINITY, l = 0.f;
  const int last = i + a.tk - a.tq;
  for (int j = w; j <= last; j += ATT_SPLIT) {
    const float s = a.scale * dot_row(qr, kb + (size_t)j * a.d, a.d);
    const float m_new = fmaxf(m, s);
    const float alpha = expf(m - m_new);
    const float p = expf(s - m_new);
    l = l * alpha + p;
#pragma unroll
    for (int c = 0; c < ATT_MAX_CHUNKS; ++c) {
      const int e = lane + 32 * c;
      acc[c] = acc[c] * alpha + (e < a.d ? p * to_f(vb[(size_t)j * a.d + e]) : 0.f);
    }
    m = m_new;
  }
  if (lane == 0) {
    sm_m[w] = m;
    sm_l[w] = l;
  }
#pragma unroll
  for (int c = 0; c < ATT_MAX_CHUNKS; ++c) sm_acc[w][lane + 32 * c] = acc[c];
  __syncthreads();
  if (w != 0) return;
  float big = -INFINITY;
#pragma unroll
  for (int u = 0; u < ATT_SPLIT; ++u) big = fmaxf(big, sm_m[u]);
  float total = 0.f, out[ATT_MAX_CHUNKS] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
  for (int u = 0; u < ATT_SPLIT; ++u) {
    // a warp that saw no key has m = -inf and l = 0: weight 0
    const float f = sm_l[u] == 0.f ? 0.f : expf(sm_m[u] - big);
    total += sm_l[u] * f;
#pragma unroll
    for (int c = 0; c < ATT_MAX_CHUNKS; ++c) out[c] += sm_acc[u][lane + 32 * c] * f;
  }
  store_row(o + row * a.d, a.d, out, 1.f / total);
  if (lane == 0) lse[row] = big + logf(total);
}

#define ATT_KERNELS(T, SUFFIX)                                                                   \
  extern "C" __global__ void attention_fwd_##SUFFIX(const T* q, const T* k, const T* v, T* o,   \
                                                    float* lse, AttDims a) {                     \
    att_fwd_impl<T>(q, k, v, o, lse, a);                                                         \
  }                                                                                              \
  extern "C" __global__ void attention_fwd_split_##SUFFIX(const T* q, const T* k, const T* v,   \
                                                          T* o, float* lse, AttDims a) {         \
    att_fwd_split_impl<T>(q, k, v, o, lse, a);                                                   \
  }                                                                                              \
  extern "C" __global__ void attention_bwd_dq_##SUFFIX(const T* q, const T* k, const T* v,      \
                                                       const T* o, const T* dout,               \
                                                       const float* lse, float* delta, T* dq,   \
                                                       AttDims a) {                              \
    att_bwd_dq_impl<T>(q, k, v, o, dout, lse, delta, dq, a);                                     \
  }                                                                                              \
  extern "C" __global__ void attention_bwd_dkv_##SUFFIX(                                        \
      const T* q, const T* k, const T* v, const T* dout, const float* lse, const float* delta,  \
      T* dk, T* dv, AttDims a) {                                                                 \
    att_bwd_dkv_impl<T>(q, k, v, dout, lse, delta, dk, dv, a);                                   \
  }

LORAFUSE_FOR_DTYPES(ATT_KERNELS)
