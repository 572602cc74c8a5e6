// Causal attention with grouped-query heads, flash style: q [b, hq, tq, d], k/v [b, hkv, tk, d],
// query i of a head sees keys 0..=i + tk - tq of its kv head (h / (hq / hkv)).
//
//   forward : o_i = sum_j p_ij v_j,  p_ij = exp(s_ij - lse_i),  s_ij = scale * q_i . k_j
//   backward: D_i = do_i . o_i,  ds_ij = p_ij (do_i . v_j - D_i)
//             dq_i = scale * sum_j ds_ij k_j
//             dk_j = scale * sum_{h in group, i} ds_ij q_i,  dv_j = sum_{h in group, i} p_ij do_i
//
// Three families of kernels. bf16/f16 with d = 64 or 128 take the tensor-core kernels in the
// second half of this file (FlashAttention-2 style, `attention_{fwd,bwd}_tc{64,128}_*`); f32
// with those head dims takes the tiled SIMT kernels (`attention_fwd_f32t{64,128}_f32` before
// them, the backward's `attention_bwd_{dq,dkv}_f32t{64,128}_f32` at the end). The warp-per-row
// kernels below serve other head dims, LORAFUSE_ATTENTION_KERNEL=simple, and (split-key) every
// forward with tq <= 16.
//
// Design choices of the warp-per-row kernels (correctness first; d <= 128):
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

// The first row in k and v of query head bh's kv head (bh = batch * hq + h; GQA: the query heads
// h of a batch share kv head h / (hq / hkv)).
__device__ __forceinline__ size_t att_kv_row0(const AttDims& a, int bh) {
  const int bi = bh / a.hq, h = bh - bi * a.hq;
  return ((size_t)bi * a.hkv + h / (a.hq / a.hkv)) * a.tk;
}

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
  const size_t row = (size_t)bh * a.tq + i;
  const size_t kv0 = att_kv_row0(a, bh) * a.d;
  const T* kb = k + kv0;
  const T* vb = v + kv0;
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
  const size_t row = (size_t)bh * a.tq + i;
  const size_t kv0 = att_kv_row0(a, bh) * a.d;
  const T* kb = k + kv0;
  const T* vb = v + kv0;
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
  const size_t row = (size_t)bh * a.tq + i;
  const size_t kv0 = att_kv_row0(a, bh) * a.d;
  const T* kb = k + kv0;
  const T* vb = v + kv0;
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

// ---------------------------------------------------------------------------------------------
// f32 forward, tiled (tensor cores take 16-bit operands; TF32 would not keep f32 accuracy).
// A block of 256 threads per 64 query rows of one head, over 64-key tiles staged in shared
// memory (rows padded by 4 floats), online softmax with expf as the warp-per-row kernel does.
// Thread (ty, tx) = (t / 16, t % 16) owns query rows ty + 16 i and keys tx + 16 j (i, j < 4) of
// the scores, and output columns 4 tx (+ 64 c) of those rows. With that interleaving, the
// float4 reads of Q rows are broadcasts within a 16-lane group and the float4 reads of K and V
// rows fall in distinct banks; every product step is 8 float4 reads for 64 FMAs. The 16 threads
// of a row's group are 16 consecutive lanes, so row max and sum take 4 shuffles. P goes through
// shared memory for P V. Grid (b * hq, ceil(tq / 64)), heaviest tiles first, like the
// tensor-core forward; dynamic shared memory: `att_f32_smem_bytes`.
#define ATT_F32_B 64    // query rows of a block, keys of a tile
#define ATT_F32_PAD 4

template <int D>
__host__ __device__ constexpr int att_f32_smem_bytes() {
  // Q, K, V tiles [64][D + 4] and P [64][64 + 4], f32
  return 4 * (3 * ATT_F32_B * (D + ATT_F32_PAD) + ATT_F32_B * (ATT_F32_B + ATT_F32_PAD));
}

extern __shared__ __align__(16) float att_f32_smem[];

// rows [r0, r0 + 64) of a row-major [n, D] f32 matrix into a shared tile of row stride LD;
// rows at or past n are zeros. 16-byte loads unless the matrix starts unaligned (a view).
template <int D, int LD>
__device__ __forceinline__ void att_f32_load(float* sm, const float* __restrict__ g, int r0,
                                             int n) {
  constexpr int C4 = D / 4;
  const bool vec = aligned16(g);
  for (int e = threadIdx.x; e < ATT_F32_B * C4; e += 256) {
    const int r = e / C4, c = (e - r * C4) * 4;
    float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
    if (r0 + r < n) {
      const float* src = g + (size_t)(r0 + r) * D + c;
      v = vec ? *reinterpret_cast<const float4*>(src) : make_float4(src[0], src[1], src[2], src[3]);
    }
    *reinterpret_cast<float4*>(sm + r * LD + c) = v;
  }
}

// sc[i][j] += sum over c < D of A[ty + 16 i][c] * B[tx + 16 j][c], for thread (ty, tx) =
// (t / 16, t % 16) and two shared tiles of row stride LD: the score-shaped products (Q K^T and
// dO V^T, or their transposes K Q^T and V dO^T in the backward).
template <int D, int LD>
__device__ __forceinline__ void att_f32_rows_dot(const float* __restrict__ sa,
                                                 const float* __restrict__ sb, float (&sc)[4][4]) {
  const int ty = threadIdx.x >> 4, tx = threadIdx.x & 15;
#pragma unroll 4
  for (int c = 0; c < D; c += 4) {
    float4 av[4], bv[4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
      av[i] = *reinterpret_cast<const float4*>(sa + (ty + 16 * i) * LD + c);
#pragma unroll
    for (int j = 0; j < 4; ++j)
      bv[j] = *reinterpret_cast<const float4*>(sb + (tx + 16 * j) * LD + c);
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        sc[i][j] = fmaf(av[i].x, bv[j].x, sc[i][j]);
        sc[i][j] = fmaf(av[i].y, bv[j].y, sc[i][j]);
        sc[i][j] = fmaf(av[i].z, bv[j].z, sc[i][j]);
        sc[i][j] = fmaf(av[i].w, bv[j].w, sc[i][j]);
      }
  }
}

// acc[i][c][e] += sum over u < 64 of P[ty + 16 i][u] * M[u][64 c + 4 tx + e]: a 64 x 64 tile P
// (row stride LP) times a 64 x D tile M (row stride LD), the P V-shaped products (P V, and in the
// backward dS K, P^T dO and dS^T Q).
template <int D, int LD, int LP>
__device__ __forceinline__ void att_f32_acc(const float* __restrict__ sp,
                                            const float* __restrict__ sm,
                                            float (&acc)[4][D / 64][4]) {
  const int ty = threadIdx.x >> 4, tx = threadIdx.x & 15;
#pragma unroll 2
  for (int kk = 0; kk < ATT_F32_B; kk += 4) {
    float4 pv[4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
      pv[i] = *reinterpret_cast<const float4*>(sp + (ty + 16 * i) * LP + kk);
#pragma unroll
    for (int c = 0; c < D / 64; ++c) {
      float4 mv[4];
#pragma unroll
      for (int u = 0; u < 4; ++u)
        mv[u] = *reinterpret_cast<const float4*>(sm + (kk + u) * LD + 64 * c + 4 * tx);
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float pu[4] = {pv[i].x, pv[i].y, pv[i].z, pv[i].w};
#pragma unroll
        for (int u = 0; u < 4; ++u) {
          acc[i][c][0] = fmaf(pu[u], mv[u].x, acc[i][c][0]);
          acc[i][c][1] = fmaf(pu[u], mv[u].y, acc[i][c][1]);
          acc[i][c][2] = fmaf(pu[u], mv[u].z, acc[i][c][2]);
          acc[i][c][3] = fmaf(pu[u], mv[u].w, acc[i][c][3]);
        }
      }
    }
  }
}

template <int D>
__device__ __forceinline__ void att_fwd_f32_tiled(const float* __restrict__ q,
                                                  const float* __restrict__ k,
                                                  const float* __restrict__ v,
                                                  float* __restrict__ o, float* __restrict__ lse,
                                                  AttDims a) {
  constexpr int B = ATT_F32_B, LD = D + ATT_F32_PAD, LP = B + ATT_F32_PAD, DC = D / 64;
  float* sq = att_f32_smem;
  float* sk = sq + B * LD;
  float* sv = sk + B * LD;
  float* sp = sv + B * LD;
  const int t = threadIdx.x, ty = t >> 4, tx = t & 15;
  const int q0 = (gridDim.y - 1 - blockIdx.y) * B;
  const int bh = blockIdx.x;
  const int off = a.tk - a.tq;
  const size_t kv0 = att_kv_row0(a, bh) * D;
  const float* kb = k + kv0;
  const float* vb = v + kv0;
  att_f32_load<D, LD>(sq, q + (size_t)bh * a.tq * D, q0, a.tq);

  float m[4], l[4], acc[4][DC][4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    m[i] = -INFINITY;
    l[i] = 0.f;
#pragma unroll
    for (int c = 0; c < DC; ++c) acc[i][c][0] = acc[i][c][1] = acc[i][c][2] = acc[i][c][3] = 0.f;
  }
  const int key_end = min(a.tq, q0 + B) + off;  // exclusive: keys the block's last row sees
  for (int k0 = 0; k0 < key_end; k0 += B) {
    __syncthreads();  // the previous tile's K, V and P are no longer read
    att_f32_load<D, LD>(sk, kb, k0, a.tk);
    att_f32_load<D, LD>(sv, vb, k0, a.tk);
    __syncthreads();
    float sc[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i) sc[i][0] = sc[i][1] = sc[i][2] = sc[i][3] = 0.f;
    att_f32_rows_dot<D, LD>(sq, sk, sc);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int row = q0 + ty + 16 * i;
      float mx = -INFINITY;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int key = k0 + tx + 16 * j;
        sc[i][j] = key > row + off || key >= a.tk ? -INFINITY : sc[i][j] * a.scale;
        mx = fmaxf(mx, sc[i][j]);
      }
#pragma unroll
      for (int w = 1; w < 16; w <<= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, w));
      const float m_new = fmaxf(m[i], mx);
      // a row with no visible key yet keeps m = -inf: subtract 0 so no inf - inf appears
      const float base = m_new == -INFINITY ? 0.f : m_new;
      const float alpha = expf(m[i] - base);
      m[i] = m_new;
      float sum = 0.f;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float p = expf(sc[i][j] - base);
        sum += p;
        sp[(ty + 16 * i) * LP + tx + 16 * j] = p;
      }
#pragma unroll
      for (int w = 1; w < 16; w <<= 1) sum += __shfl_xor_sync(0xffffffffu, sum, w);
      l[i] = l[i] * alpha + sum;
#pragma unroll
      for (int c = 0; c < DC; ++c) {
        acc[i][c][0] *= alpha;
        acc[i][c][1] *= alpha;
        acc[i][c][2] *= alpha;
        acc[i][c][3] *= alpha;
      }
    }
    __syncthreads();  // P of every row is in shared memory
    att_f32_acc<D, LD, LP>(sp, sv, acc);
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int row = q0 + ty + 16 * i;
    if (row >= a.tq) continue;
    const float inv = 1.f / l[i];
    const size_t r = (size_t)bh * a.tq + row;
#pragma unroll
    for (int c = 0; c < DC; ++c)
      *reinterpret_cast<float4*>(o + r * D + 64 * c + 4 * tx) =
          make_float4(acc[i][c][0] * inv, acc[i][c][1] * inv, acc[i][c][2] * inv,
                      acc[i][c][3] * inv);
    if (tx == 0) lse[r] = m[i] + logf(l[i]);
  }
}

extern "C" __global__ void __launch_bounds__(256) attention_fwd_f32t64_f32(
    const float* q, const float* k, const float* v, float* o, float* lse, AttDims a) {
  att_fwd_f32_tiled<64>(q, k, v, o, lse, a);
}
extern "C" __global__ void __launch_bounds__(256) attention_fwd_f32t128_f32(
    const float* q, const float* k, const float* v, float* o, float* lse, AttDims a) {
  att_fwd_f32_tiled<128>(q, k, v, o, lse, a);
}

// ---------------------------------------------------------------------------------------------
// Tensor-core flash attention (FlashAttention-2 style) for bf16 / f16 and head dims 64 and 128.
//
// Design choices:
// - mma.sync.m16n8k16 (f32 accumulators) with ldmatrix from padded shared-memory tiles. Its
//   register layouts are fixed by the PTX ISA, so the accumulator of S = Q K^T is re-packed in
//   registers as the A operand of P V (no round trip of P through shared memory), and the online
//   softmax works on the rows a thread owns: rows gr and gr + 8 of its warp's 16, reduced over
//   the 4 threads of a quad with two shuffles.
//   A (16x16): a0 (gr, 2tc..+1), a1 (gr+8, 2tc..), a2 (gr, 2tc+8..), a3 (gr+8, 2tc+8..)
//   B (16x8):  b0 (k 2tc..+1, n gr), b1 (k 2tc+8.., n gr);  C (16x8): c0,c1 (gr, 2tc..), c2,c3 (gr+8)
//   with gr = lane / 4, tc = lane % 4.
// - Tiles of 64 keys (and 16 query rows a warp in the forward), rows padded by 8 elements (16
//   bytes) so that the 8 row addresses of an ldmatrix phase fall in distinct banks. The forward's
//   static shared memory stays under 48 KB; the backward double-buffers its query tiles in
//   about 56 KB of dynamic shared memory, which the launcher opts into.
// - Global -> shared copies are 16-byte cp.async (zero-filled past the last row, so padded rows
//   hold zeros, never NaN garbage that a zero probability would turn into NaN); a tensor whose
//   base is not 16-byte aligned (a narrowed view) takes a scalar copy instead.
// - Scores go to the log2 domain inside one FMA (s * scale * log2 e - max) and are exponentiated
//   with ex2.approx (the launcher sends scale <= 0 to the other kernels: the row max of raw scores
//   is taken before scaling); the logsumexp written for the backward stays natural-log.
// - Causal tiles past a block's last visible key are never loaded; the mask is applied only on
//   tiles that straddle the diagonal or the sequence ends.
// - Backward: D = rowsum(dO * O) first (`attention_bwd_delta_*`), then one block per (64-key
//   tile, batch, query head) walks the query tiles that see its keys: dV += P^T dO,
//   dP^T = V dO^T, dS^T = P^T (dP^T - D) scale, dK += dS^T Q, and dQ += dS K goes to an f32
//   buffer with 8-byte vector atomics (dS^T goes through shared memory once for that product).
//   dK and dV are per query head (f32 partial buffers, no atomics); `attention_bwd_finish_*`
//   sums them over each GQA group and converts everything into the packed [dq | dk | dv]
//   output.
// ---------------------------------------------------------------------------------------------

#define ATT_TC_THREADS 128  // a backward block: 4 warps of 16 keys each
#define ATT_TC_BK 64        // keys per tile
#define ATT_LOG2E 1.4426950408889634f
#define ATT_LN2 0.6931471805599453f

namespace att_tc {

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

__device__ __forceinline__ void ldsm_x4_t(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

// c += a * b for one 16x8x16 tile.
template <typename T>
__device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                    uint32_t b1);

template <>
__device__ __forceinline__ void mma<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4],
                                                   uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void mma<__half>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                            uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// 2^x in one MUFU instruction (exp2f adds range and denormal handling around it): relative error
// about 2^-22, far below the 16-bit rounding of P; results under 2^-126 flush to zero, which a
// probability can afford. ex2(-inf) is +0, which masked scores rely on.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// Two floats as one register of two 16-bit values, `lo` in the low half (the lower column).
template <typename T> __device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <> __device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}
template <> __device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

__device__ __forceinline__ void cp_async16(void* dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
// One f32 (zero-filled when src_bytes is 0): the backward's per-row lse and D.
__device__ __forceinline__ void cp_async4(void* dst, const void* src, int src_bytes) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(src_bytes));
}
template <int N> __device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// Rows [r0, r0 + R) of a row-major [n, D] matrix into a shared tile with row stride D + 8;
// rows at or past n become zeros. Asynchronous when `vec` (complete after cp_async_wait and a
// barrier), plain stores otherwise (complete after the barrier). Thread t copies the 16-byte
// chunk t % CPR of rows t / CPR, t / CPR + NT / CPR, ...: a fixed trip count, so the loop unrolls
// and the address arithmetic is a constant stride (as a loop over t + i NT it was not unrolled,
// and took ~27 instructions a chunk).
template <typename T, int R, int D, int NT>
__device__ __forceinline__ void load_tile(T* sm, const T* __restrict__ g, int r0, int n,
                                          bool vec) {
  constexpr int CPR = D / 8;  // 16-byte chunks per row
  constexpr int STRIDE = D + 8;
  static_assert(NT % CPR == 0, "a thread keeps its column");
  constexpr int RSTEP = NT / CPR;                     // rows between a thread's chunks
  constexpr int ITERS = (R * CPR + NT - 1) / NT;      // chunks per thread (some idle if R small)
  const int col = (threadIdx.x % CPR) * 8;
  const int rt = threadIdx.x / CPR;
  T* dst = sm + rt * STRIDE + col;
  const T* src = g + (size_t)(r0 + rt) * D + col;
  if (vec && r0 + R <= n) {
    // a whole tile: constant offsets from one address, no row checks
#pragma unroll
    for (int it = 0; it < ITERS; ++it) {
      if (R % RSTEP != 0 && rt + it * RSTEP >= R) break;
      cp_async16(dst + it * RSTEP * STRIDE, src + it * RSTEP * D, 16);
    }
  } else if (vec) {
#pragma unroll
    for (int it = 0; it < ITERS; ++it) {
      const int r = rt + it * RSTEP;
      if (R % RSTEP != 0 && r >= R) break;
      const bool in = r0 + r < n;
      // a row past n copies 0 bytes (zero fill), naming row 0 as its (valid) source
      cp_async16(dst + it * RSTEP * STRIDE, in ? src + (size_t)it * RSTEP * D : g + col,
                 in ? 16 : 0);
    }
  } else {
#pragma unroll
    for (int it = 0; it < ITERS; ++it) {
      const int r = rt + it * RSTEP;
      if (R % RSTEP != 0 && r >= R) break;
      const bool in = r0 + r < n;
#pragma unroll
      for (int e = 0; e < 8; ++e)
        dst[it * RSTEP * STRIDE + e] = in ? src[(size_t)it * RSTEP * D + e] : from_f<T>(0.f);
    }
  }
}

// Forward. Grid (b * hq, ceil(tq / BQ)), 32 NW threads, BQ = 16 NW MT query rows a block; warp
// w owns the MT 16-row tiles from row 16 MT w of the block's tile, and each K or V fragment it
// reads from shared memory feeds MT products.
// - Launch order: blocks start x fastest, so the heaviest (last) query tile of every head comes
//   first and the causal tail is made of light tiles. With the heads in y, one head's tiles ran
//   heavy to light, then the next head's: heavy tiles started last and an H200 sat a third idle
//   at the end of T = 2048 (a list-scheduling model: 76 tile-times against 56 ideal; 60 now).
// - STAGES = 2 double-buffers K and V (one barrier a tile, the next tile's loads in flight for a
//   whole tile); STAGES = 1 keeps one buffer each, which a 128-wide head dim needs to stay
//   within static shared memory.
// - MT = 2 halves the shared-memory reads and K/V tile loads per product, for twice the
//   registers (2 blocks an SM): on an H200 at d = 64, T = 2048 it took the forward from 123 to
//   118 us, but at T = 512 (224 blocks of 128 rows for 264 slots) it was 8% slower than MT = 1,
//   so the host picks it only for grids of two full waves or more (`attention_fwd_tc64x2`).
// - 8-warp blocks (shared K/V loads, 128-row tiles) and 128-key tiles measured no faster.
template <typename T, int D, int NW, int BK = ATT_TC_BK, int STAGES = 1, int MT = 1>
__device__ __forceinline__ void fwd(const T* __restrict__ q, const T* __restrict__ k,
                                    const T* __restrict__ v, T* __restrict__ o,
                                    float* __restrict__ lse, AttDims a) {
  constexpr int BQ = 16 * NW * MT, STRIDE = D + 8, NT = 32 * NW;
  constexpr int KV = BK * STRIDE;  // one K or V tile, elements
  static_assert(BQ <= 2 * BK, "Q is staged through the K and V tiles");
  static_assert(STAGES == 1 || STAGES == 2, "one K/V buffer, or two in turn");
  // stage s: K at 2 s KV, V after it
  __shared__ __align__(16) uint16_t smem_raw[2 * STAGES * KV];
  T* sk = reinterpret_cast<T*>(smem_raw);
  T* sv = sk + KV;

  const int q0 = (gridDim.y - 1 - blockIdx.y) * BQ;
  const int bh = blockIdx.x;
  const int off = a.tk - a.tq;
  const T* qb = q + (size_t)bh * a.tq * D;
  const size_t kv0 = att_kv_row0(a, bh) * D;
  const T* kb = k + kv0;
  const T* vb = v + kv0;
  const bool vec = aligned16(q) && aligned16(k) && aligned16(v);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int gr = lane >> 2, tc = lane & 3;
  // first query row of the warp's row tile mt: MT consecutive 16-row tiles a warp
  auto row0 = [&](int mt) { return q0 + (warp * MT + mt) * 16; };

  // Q through the K and V buffers into A fragments, kept in registers for the whole key loop.
  load_tile<T, BQ, D, NT>(sk, qb, q0, a.tq, vec);
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();
  uint32_t qf[MT][D / 16][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int kc = 0; kc < D / 16; ++kc)
      ldsm_x4(qf[mt][kc],
              sk + ((warp * MT + mt) * 16 + (lane & 15)) * STRIDE + kc * 16 + (lane >> 4) * 8);
  __syncthreads();

  // keys visible to the block's last real row, exclusive
  const int key_end = min(a.tq, q0 + BQ) + off;
  const int n_tiles = (key_end + BK - 1) / BK;
  const float sl2 = a.scale * ATT_LOG2E;
  float m[MT][2], l[MT][2];
  float acc[MT][D / 8][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    m[mt][0] = m[mt][1] = -INFINITY;
    l[mt][0] = l[mt][1] = 0.f;
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt)
      acc[mt][dt][0] = acc[mt][dt][1] = acc[mt][dt][2] = acc[mt][dt][3] = 0.f;
  }
  float s[MT][BK / 8][4];

  // S = Q K^T for the warp's rows and the tile's BK keys: each K fragment feeds MT products
  auto scores = [&](const T* kt_s) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int nt = 0; nt < BK / 8; ++nt)
        s[mt][nt][0] = s[mt][nt][1] = s[mt][nt][2] = s[mt][nt][3] = 0.f;
#pragma unroll
    for (int kc = 0; kc < D / 16; ++kc) {
#pragma unroll
      for (int np = 0; np < BK / 16; ++np) {
        uint32_t b[4];
        ldsm_x4(b, kt_s + (np * 16 + (lane & 7) + ((lane >> 4) << 3)) * STRIDE + kc * 16 +
                       ((lane >> 3) & 1) * 8);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          mma<T>(s[mt][2 * np], qf[mt][kc], b[0], b[1]);
          mma<T>(s[mt][2 * np + 1], qf[mt][kc], b[2], b[3]);
        }
      }
    }
  };
  // mask, online softmax: s becomes P (unnormalised), m, l and acc are rescaled
  auto softmax = [&](int k0) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      const int r0 = row0(mt);
      const bool edge = k0 + BK - 1 > r0 + off || k0 + BK > a.tk;
      if (edge) {
#pragma unroll
        for (int nt = 0; nt < BK / 8; ++nt) {
#pragma unroll
          for (int c = 0; c < 4; ++c) {
            const int i = r0 + gr + 8 * (c >> 1);
            const int j = k0 + nt * 8 + 2 * tc + (c & 1);
            if (j > i + off || j >= a.tk) s[mt][nt][c] = -INFINITY;
          }
        }
      }
    }
    // Row maxima of the raw scores (scale > 0: the max commutes with scaling) as pairwise trees,
    // the quad shuffles of every row together, and the row sums over four partial sums: PC
    // sampling showed the linear max chains waiting on each other and on one shuffle at a time.
    float mx[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float t[BK / 8];
#pragma unroll
        for (int nt = 0; nt < BK / 8; ++nt) t[nt] = fmaxf(s[mt][nt][2 * r], s[mt][nt][2 * r + 1]);
#pragma unroll
        for (int w = BK / 16; w >= 1; w >>= 1)
#pragma unroll
          for (int u = 0; u < w; ++u) t[u] = fmaxf(t[u], t[u + w]);
        mx[mt][r] = t[0];
      }
#pragma unroll
    for (int x = 1; x <= 2; x <<= 1)
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int r = 0; r < 2; ++r)
          mx[mt][r] = fmaxf(mx[mt][r], __shfl_xor_sync(0xffffffffu, mx[mt][r], x));
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const float m_new = fmaxf(m[mt][r], mx[mt][r] * sl2);
        // a row with no visible key yet keeps m = -inf: subtract 0 so no inf - inf appears
        const float base = m_new == -INFINITY ? 0.f : m_new;
        const float alpha = fast_exp2(m[mt][r] - base);
        m[mt][r] = m_new;
        float part[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
        for (int nt = 0; nt < BK / 8; ++nt) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const float p = fast_exp2(fmaf(s[mt][nt][2 * r + e], sl2, -base));
            s[mt][nt][2 * r + e] = p;
            part[(2 * nt + e) & 3] += p;
          }
        }
        l[mt][r] = l[mt][r] * alpha + ((part[0] + part[1]) + (part[2] + part[3]));
#pragma unroll
        for (int dt = 0; dt < D / 8; ++dt) {
          acc[mt][dt][2 * r] *= alpha;
          acc[mt][dt][2 * r + 1] *= alpha;
        }
      }
    }
  };
  // acc += P V: each V fragment feeds MT products
  auto values = [&](const T* vt_s) {
#pragma unroll
    for (int kc = 0; kc < BK / 16; ++kc) {
      uint32_t pa[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        pa[mt][0] = pack2<T>(s[mt][2 * kc][0], s[mt][2 * kc][1]);
        pa[mt][1] = pack2<T>(s[mt][2 * kc][2], s[mt][2 * kc][3]);
        pa[mt][2] = pack2<T>(s[mt][2 * kc + 1][0], s[mt][2 * kc + 1][1]);
        pa[mt][3] = pack2<T>(s[mt][2 * kc + 1][2], s[mt][2 * kc + 1][3]);
      }
#pragma unroll
      for (int dp = 0; dp < D / 16; ++dp) {
        uint32_t b[4];
        ldsm_x4_t(b, vt_s + (kc * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * STRIDE + dp * 16 +
                         (lane >> 4) * 8);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          mma<T>(acc[mt][2 * dp], pa[mt], b[0], b[1]);
          mma<T>(acc[mt][2 * dp + 1], pa[mt], b[2], b[3]);
        }
      }
    }
  };

  if constexpr (STAGES == 2) {
    // Tile kt + 1's K and V load into the other stage while tile kt computes: one barrier a
    // tile (it also tells every warp that the stage it is about to overwrite is free).
    load_tile<T, BK, D, NT>(sk, kb, 0, a.tk, vec);
    load_tile<T, BK, D, NT>(sv, vb, 0, a.tk, vec);
    cp_async_commit();
    for (int kt = 0; kt < n_tiles; ++kt) {
      const int k0 = kt * BK;
      cp_async_wait<0>();
      __syncthreads();
      if (kt + 1 < n_tiles) {
        T* nk = sk + 2 * KV * ((kt + 1) & 1);
        load_tile<T, BK, D, NT>(nk, kb, k0 + BK, a.tk, vec);
        load_tile<T, BK, D, NT>(nk + KV, vb, k0 + BK, a.tk, vec);
      }
      cp_async_commit();
      const T* ck = sk + 2 * KV * (kt & 1);
      scores(ck);
      softmax(k0);
      values(ck + KV);
    }
  } else {
    // One K and one V buffer: V loads during the scores, the next K during the softmax and
    // P V (four barriers a tile; what a 128-wide head dim leaves room for in static memory).
    load_tile<T, BK, D, NT>(sk, kb, 0, a.tk, vec);
    cp_async_commit();
    for (int kt = 0; kt < n_tiles; ++kt) {
      const int k0 = kt * BK;
      load_tile<T, BK, D, NT>(sv, vb, k0, a.tk, vec);
      cp_async_commit();
      cp_async_wait<1>();  // this tile's K
      __syncthreads();
      scores(sk);
      __syncthreads();  // every warp is done with sk: prefetch the next K over it
      if (kt + 1 < n_tiles) load_tile<T, BK, D, NT>(sk, kb, k0 + BK, a.tk, vec);
      cp_async_commit();  // possibly empty: keeps the group count uniform
      softmax(k0);
      cp_async_wait<1>();  // this tile's V (the next K may still be in flight)
      __syncthreads();
      values(sv);
      __syncthreads();  // every warp is done with sv before the next tile's V lands on it
    }
  }
  cp_async_wait<0>();

#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float lr = l[mt][r];
      lr += __shfl_xor_sync(0xffffffffu, lr, 1);
      lr += __shfl_xor_sync(0xffffffffu, lr, 2);
      const int i = row0(mt) + gr + 8 * r;
      if (i >= a.tq) continue;
      const float inv = 1.f / lr;
      const size_t row = (size_t)bh * a.tq + i;
      T* orow = o + row * D;
#pragma unroll
      for (int dt = 0; dt < D / 8; ++dt)
        *reinterpret_cast<uint32_t*>(orow + dt * 8 + 2 * tc) =
            pack2<T>(acc[mt][dt][2 * r] * inv, acc[mt][dt][2 * r + 1] * inv);
      if (tc == 0) lse[row] = m[mt][r] * ATT_LN2 + logf(lr);
    }
  }
}

// Dynamic shared memory of the backward, bytes: [K | Q x2 | dO x2 | dS^T | lse x2 | D x2]
// (16-bit tiles, f32 rows). Mirrored by `bwd_smem_bytes` in cuda.rs.
template <int D, int QT>
__host__ __device__ constexpr int bwd_smem_bytes() {
  return 2 * (ATT_TC_BK * (D + 8) + 4 * QT * (D + 8) + ATT_TC_BK * (QT + 8)) + 4 * 4 * QT;
}

extern __shared__ __align__(16) unsigned char att_dyn_smem[];

// Backward. Grid (b * hq, ceil(tk / 64)), 128 threads (the heaviest, first key tiles of every
// head start first, as in the forward), bwd_smem_bytes<D, QT>() of dynamic shared
// memory; warp w owns keys 16w..16w+15 of the block's tile and walks query tiles of QT rows (64
// for d = 64; 32 for d = 128, which keeps the registers in bounds), double-buffered: the next
// tile's Q, dO, lse and D load while this one computes. dq_acc is f32 [b, hq, tq, D], zeroed by
// the caller; dkv_part is f32 [2][b, hq, tk, D] (dk then dv of every query head), fully written.
template <typename T, int D, int QT>
__device__ __forceinline__ void bwd(const T* __restrict__ q, const T* __restrict__ k,
                                    const T* __restrict__ v, const T* __restrict__ dout,
                                    const float* __restrict__ lse,
                                    const float* __restrict__ delta, float* __restrict__ dq_acc,
                                    float* __restrict__ dkv_part, AttDims a) {
  constexpr int BK = ATT_TC_BK, STRIDE = D + 8, QSTRIDE = QT + 8, NT = ATT_TC_THREADS;
  constexpr int QTILE = QT * STRIDE;
  static_assert(4 * QT >= BK, "V staging needs the query tiles together");
  {
    // a launch with less dynamic shared memory than the layout needs must fail, not corrupt
    uint32_t dyn;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(dyn));
    if (dyn < (uint32_t)bwd_smem_bytes<D, QT>()) __trap();
  }
  T* sk = reinterpret_cast<T*>(att_dyn_smem);
  T* sq0 = sk + BK * STRIDE;  // Q tiles 0 and 1, then dO tiles 0 and 1
  T* sds = sq0 + 4 * QTILE;
  float* s_lse0 = reinterpret_cast<float*>(sds + BK * QSTRIDE);  // [2][QT], then D [2][QT]

  const int k0 = blockIdx.y * ATT_TC_BK;
  const int bh = blockIdx.x;
  const int off = a.tk - a.tq;
  const T* qb = q + (size_t)bh * a.tq * D;
  const T* dob = dout + (size_t)bh * a.tq * D;
  const size_t kv0 = att_kv_row0(a, bh) * D;
  const T* kb = k + kv0;
  const T* vb = v + kv0;
  const float* lse_b = lse + (size_t)bh * a.tq;
  const float* delta_b = delta + (size_t)bh * a.tq;
  const bool vec = aligned16(q) && aligned16(k) && aligned16(v) && aligned16(dout);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int gr = lane >> 2, tc = lane & 3;
  const float sl2 = a.scale * ATT_LOG2E;

  load_tile<T, BK, D, NT>(sk, kb, k0, a.tk, vec);
  load_tile<T, BK, D, NT>(sq0, vb, k0, a.tk, vec);
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();
  uint32_t vf[D / 16][4];  // this warp's 16 V rows as A fragments (for dP^T = V dO^T)
#pragma unroll
  for (int kc = 0; kc < D / 16; ++kc)
    ldsm_x4(vf[kc], sq0 + (warp * 16 + (lane & 15)) * STRIDE + kc * 16 + (lane >> 4) * 8);
  __syncthreads();

  float dk[D / 8][4], dv[D / 8][4];
#pragma unroll
  for (int dt = 0; dt < D / 8; ++dt)
#pragma unroll
    for (int c = 0; c < 4; ++c) dk[dt][c] = dv[dt][c] = 0.f;

  // query i sees key j when j <= i + off: the first query that sees key k0
  const int first_q = max(0, k0 - off);
  const int n_qt = (a.tq + QT - 1) / QT;
  const int qt_first = first_q / QT;
  // query tile `qt` into buffer `buf` (rows past tq as zeros); one cp.async group
  auto issue = [&](int qt, int buf) {
    const int q0 = qt * QT;
    load_tile<T, QT, D, NT>(sq0 + buf * QTILE, qb, q0, a.tq, vec);
    load_tile<T, QT, D, NT>(sq0 + (2 + buf) * QTILE, dob, q0, a.tq, vec);
    if (threadIdx.x < QT) {
      const int i = q0 + threadIdx.x;
      const int src = min(i, a.tq - 1), bytes = i < a.tq ? 4 : 0;
      cp_async4(s_lse0 + buf * QT + threadIdx.x, lse_b + src, bytes);
      cp_async4(s_lse0 + (2 + buf) * QT + threadIdx.x, delta_b + src, bytes);
    }
    cp_async_commit();
  };
  // dQ of the query tile at row q0 += dS K over the block's keys, from dS^T in sds (a one-barrier
  // form, with two dS^T buffers and each tile's dQ done after the next tile's barrier, measured
  // no faster on an H200: the backward is not bound by its barriers)
  auto dq_phase = [&](int q0) {

    // dQ += dS K over the block's 64 keys: warp w takes query rows qr..qr+15, columns
    // dc0..dc0+DC-1 of the QT x D tile
    constexpr int RG = QT / 16, DC = D / (4 / RG);
    const int qr = (warp % RG) * 16, dc0 = (warp / RG) * DC;
    float dq[DC / 8][4];
#pragma unroll
    for (int nt = 0; nt < DC / 8; ++nt) dq[nt][0] = dq[nt][1] = dq[nt][2] = dq[nt][3] = 0.f;
#pragma unroll
    for (int kc = 0; kc < BK / 16; ++kc) {
      uint32_t da[4];  // dS rows (queries) x keys, read transposed from dS^T
      ldsm_x4_t(da, sds + (kc * 16 + (lane & 7) + (lane >> 4) * 8) * QSTRIDE + qr +
                        ((lane >> 3) & 1) * 8);
#pragma unroll
      for (int dp = 0; dp < DC / 16; ++dp) {
        uint32_t b[4];
        ldsm_x4_t(b, sk + (kc * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * STRIDE + dc0 +
                         dp * 16 + (lane >> 4) * 8);
        mma<T>(dq[2 * dp], da, b[0], b[1]);
        mma<T>(dq[2 * dp + 1], da, b[2], b[3]);
      }
    }
    // 8-byte vector reductions straight from the accumulator pairs (sm_90): rows gr and gr + 8,
    // columns 2 tc, 2 tc + 1 of each n-tile. The 16-byte form needs lane pairs to swap halves
    // first and measured the same (575-579 us forward+backward, H100); with all swaps first and
    // the reductions back to back it was slower (the queued reductions held up the other warps'
    // shared-memory loads). What the reductions cost is the L2's, ~470 MB of them at T = 2048.
    {
      const int i = q0 + qr + gr;
      float* dst = dq_acc + ((size_t)bh * a.tq + i) * D + dc0 + 2 * tc;
#pragma unroll
      for (int nt = 0; nt < DC / 8; ++nt) {
        if (i < a.tq)
          atomicAdd(reinterpret_cast<float2*>(dst + nt * 8), make_float2(dq[nt][0], dq[nt][1]));
        if (i + 8 < a.tq)
          atomicAdd(reinterpret_cast<float2*>(dst + 8 * D + nt * 8),
                    make_float2(dq[nt][2], dq[nt][3]));
      }
    }
  };
  issue(qt_first, 0);
  for (int qt = qt_first; qt < n_qt; ++qt) {
    const int q0 = qt * QT;
    const int buf = (qt - qt_first) & 1;
    // the other buffer was last read before the previous iteration's closing barrier
    if (qt + 1 < n_qt) {
      issue(qt + 1, buf ^ 1);
    } else {
      cp_async_commit();  // empty group: keeps "all but the newest group" meaning this tile
    }
    cp_async_wait<1>();
    __syncthreads();
    const T* sq = sq0 + buf * QTILE;
    const T* sdo = sq0 + (2 + buf) * QTILE;
    const float* s_lse = s_lse0 + buf * QT;
    const float* s_delta = s_lse0 + (2 + buf) * QT;

    // S^T = K Q^T: this warp's 16 keys x QT queries
    float st[QT / 8][4];
#pragma unroll
    for (int nt = 0; nt < QT / 8; ++nt) st[nt][0] = st[nt][1] = st[nt][2] = st[nt][3] = 0.f;
#pragma unroll
    for (int kc = 0; kc < D / 16; ++kc) {
      uint32_t ka[4];
      ldsm_x4(ka, sk + (warp * 16 + (lane & 15)) * STRIDE + kc * 16 + (lane >> 4) * 8);
#pragma unroll
      for (int np = 0; np < QT / 16; ++np) {
        uint32_t b[4];
        ldsm_x4(b, sq + (np * 16 + (lane & 7) + ((lane >> 4) << 3)) * STRIDE + kc * 16 +
                       ((lane >> 3) & 1) * 8);
        mma<T>(st[2 * np], ka, b[0], b[1]);
        mma<T>(st[2 * np + 1], ka, b[2], b[3]);
      }
    }
    // P^T = exp(S^T scale - lse), zero where masked
    const bool edge = k0 + BK - 1 > q0 + off || q0 + QT > a.tq || k0 + BK > a.tk;
#pragma unroll
    for (int nt = 0; nt < QT / 8; ++nt) {
      // this thread's two query columns of the n-tile, adjacent: one 8-byte read
      const float2 ls = *reinterpret_cast<const float2*>(s_lse + nt * 8 + 2 * tc);
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const int il = nt * 8 + 2 * tc + (c & 1);
        const int i = q0 + il;
        const int j = k0 + warp * 16 + gr + 8 * (c >> 1);
        const float p = fast_exp2(fmaf(st[nt][c], sl2, -(c & 1 ? ls.y : ls.x) * ATT_LOG2E));
        st[nt][c] = edge && (j > i + off || i >= a.tq || j >= a.tk) ? 0.f : p;
      }
    }

    // dV += P^T dO
#pragma unroll
    for (int kc = 0; kc < QT / 16; ++kc) {
      const uint32_t pa[4] = {pack2<T>(st[2 * kc][0], st[2 * kc][1]),
                              pack2<T>(st[2 * kc][2], st[2 * kc][3]),
                              pack2<T>(st[2 * kc + 1][0], st[2 * kc + 1][1]),
                              pack2<T>(st[2 * kc + 1][2], st[2 * kc + 1][3])};
#pragma unroll
      for (int dp = 0; dp < D / 16; ++dp) {
        uint32_t b[4];
        ldsm_x4_t(b, sdo + (kc * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * STRIDE + dp * 16 +
                         (lane >> 4) * 8);
        mma<T>(dv[2 * dp], pa, b[0], b[1]);
        mma<T>(dv[2 * dp + 1], pa, b[2], b[3]);
      }
    }

    // dP^T = V dO^T
    float dpt[QT / 8][4];
#pragma unroll
    for (int nt = 0; nt < QT / 8; ++nt) dpt[nt][0] = dpt[nt][1] = dpt[nt][2] = dpt[nt][3] = 0.f;
#pragma unroll
    for (int kc = 0; kc < D / 16; ++kc) {
#pragma unroll
      for (int np = 0; np < QT / 16; ++np) {
        uint32_t b[4];
        ldsm_x4(b, sdo + (np * 16 + (lane & 7) + ((lane >> 4) << 3)) * STRIDE + kc * 16 +
                       ((lane >> 3) & 1) * 8);
        mma<T>(dpt[2 * np], vf[kc], b[0], b[1]);
        mma<T>(dpt[2 * np + 1], vf[kc], b[2], b[3]);
      }
    }
    // dS^T = P^T (dP^T - D) scale (the softmax scale folded in once, for dK and dQ alike)
#pragma unroll
    for (int nt = 0; nt < QT / 8; ++nt) {
      const float2 dl = *reinterpret_cast<const float2*>(s_delta + nt * 8 + 2 * tc);
#pragma unroll
      for (int c = 0; c < 4; ++c)
        dpt[nt][c] = st[nt][c] * (dpt[nt][c] - (c & 1 ? dl.y : dl.x)) * a.scale;
    }

    // dK += dS^T Q, and dS^T to shared memory for dQ
#pragma unroll
    for (int kc = 0; kc < QT / 16; ++kc) {
      const uint32_t da[4] = {pack2<T>(dpt[2 * kc][0], dpt[2 * kc][1]),
                              pack2<T>(dpt[2 * kc][2], dpt[2 * kc][3]),
                              pack2<T>(dpt[2 * kc + 1][0], dpt[2 * kc + 1][1]),
                              pack2<T>(dpt[2 * kc + 1][2], dpt[2 * kc + 1][3])};
      T* ds_row = sds + (warp * 16 + gr) * QSTRIDE + kc * 16 + 2 * tc;
      *reinterpret_cast<uint32_t*>(ds_row) = da[0];
      *reinterpret_cast<uint32_t*>(ds_row + 8 * QSTRIDE) = da[1];
      *reinterpret_cast<uint32_t*>(ds_row + 8) = da[2];
      *reinterpret_cast<uint32_t*>(ds_row + 8 * QSTRIDE + 8) = da[3];
#pragma unroll
      for (int dp = 0; dp < D / 16; ++dp) {
        uint32_t b[4];
        ldsm_x4_t(b, sq + (kc * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * STRIDE + dp * 16 +
                         (lane >> 4) * 8);
        mma<T>(dk[2 * dp], da, b[0], b[1]);
        mma<T>(dk[2 * dp + 1], da, b[2], b[3]);
      }
    }
    __syncthreads();  // dS^T of every warp is in shared memory
    dq_phase(q0);
    __syncthreads();  // the next prefetch overwrites this tile's buffers, the next tile sds
  }

  const size_t part = (size_t)a.b * a.hq * a.tk * D;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int j = k0 + warp * 16 + gr + 8 * r;
    if (j >= a.tk) continue;
    float* dkr = dkv_part + ((size_t)bh * a.tk + j) * D + 2 * tc;
    float* dvr = dkr + part;
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {
      *reinterpret_cast<float2*>(dkr + dt * 8) = make_float2(dk[dt][2 * r], dk[dt][2 * r + 1]);
      *reinterpret_cast<float2*>(dvr + dt * 8) = make_float2(dv[dt][2 * r], dv[dt][2 * r + 1]);
    }
  }
}

}  // namespace att_tc

// D_i = dO_i . O_i, a warp per row. Grid (ceil(tq / 4), b * hq), 128 threads.
template <typename T>
__device__ __forceinline__ void att_bwd_delta_impl(const T* __restrict__ o,
                                                   const T* __restrict__ dout,
                                                   float* __restrict__ delta, AttDims a) {
  const int i = blockIdx.x * ATT_ROWS_PER_BLOCK + (threadIdx.x >> 5);
  if (i >= a.tq) return;
  const size_t row = (size_t)blockIdx.y * a.tq + i;
  float gr[ATT_MAX_CHUNKS];
  load_row(dout + row * a.d, a.d, gr);
  const float d_i = dot_row(gr, o + row * a.d, a.d);
  if ((threadIdx.x & 31) == 0) delta[row] = d_i;
}

// Packed [dq | dk | dv] from the f32 accumulators: dq as is, dk and dv summed over the query
// heads of each kv head's group. Grid-stride over every output element; index arithmetic in I
// (32-bit when the sizes allow: 64-bit division by a run-time value costs tens of instructions).
template <typename T, typename I>
__device__ __forceinline__ void att_bwd_finish_body(const float* __restrict__ dq_acc,
                                                    const float* __restrict__ dkv_part,
                                                    T* __restrict__ out, AttDims a) {
  const I nq = (I)a.b * a.hq * a.tq * a.d;
  const I per_head = (I)a.tk * a.d;
  const I nk = (I)a.b * a.hkv * per_head;
  const I part = (I)a.b * a.hq * per_head;
  const int rep = a.hq / a.hkv;
  const I total = nq + 2 * nk;
  for (I e = (I)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += (I)gridDim.x * blockDim.x) {
    if (e < nq) {
      out[e] = from_f<T>(dq_acc[e]);
      continue;
    }
    const I e2 = e - nq;
    const I which = e2 / nk, r = e2 - which * nk;  // 0: dk, 1: dv
    const I bg = r / per_head, rem = r - bg * per_head;
    const I bi = bg / a.hkv, g = bg - bi * a.hkv;
    const float* src = dkv_part + which * part + (bi * a.hq + g * rep) * per_head + rem;
    float s = 0.f;
    for (int u = 0; u < rep; ++u) s += src[(I)u * per_head];
    out[e] = from_f<T>(s);
  }
}

template <typename T>
__device__ __forceinline__ void att_bwd_finish_impl(const float* __restrict__ dq_acc,
                                                    const float* __restrict__ dkv_part,
                                                    T* __restrict__ out, AttDims a) {
  // the largest index formed is below part + per_head + total plus one grid stride: 2^31 leaves
  // room for all of them when the f32 partials (the largest buffer) hold under 2^30 elements
  const size_t part = (size_t)a.b * a.hq * a.tk * a.d;
  const size_t total = (size_t)a.b * a.hq * a.tq * a.d + 2 * (size_t)a.b * a.hkv * a.tk * a.d;
  if (2 * part < (1u << 30) && total < (1u << 30))
    att_bwd_finish_body<T, uint32_t>(dq_acc, dkv_part, out, a);
  else
    att_bwd_finish_body<T, size_t>(dq_acc, dkv_part, out, a);
}

// The second __launch_bounds__ figures cap registers so that 4 (forward d = 64), 3 or 2 (the
// two-row-tile forward) blocks share a multiprocessor; `nvcc -Xptxas -v` shows every variant
// spill-free under them.
#define ATT_TC_KERNELS(T, SUFFIX)                                                               \
  extern "C" __global__ void __launch_bounds__(128, 4)                                          \
      attention_fwd_tc64_##SUFFIX(const T* q, const T* k, const T* v, T* o, float* lse,         \
                                  AttDims a) {                                                  \
    att_tc::fwd<T, 64, 4>(q, k, v, o, lse, a);                                                  \
  }                                                                                             \
  extern "C" __global__ void __launch_bounds__(128, 2)                                          \
      attention_fwd_tc64x2_##SUFFIX(const T* q, const T* k, const T* v, T* o, float* lse,       \
                                    AttDims a) {                                                \
    att_tc::fwd<T, 64, 4, ATT_TC_BK, 2, 2>(q, k, v, o, lse, a);                                 \
  }                                                                                             \
  extern "C" __global__ void __launch_bounds__(128, 3)                                          \
      attention_fwd_tc128_##SUFFIX(const T* q, const T* k, const T* v, T* o, float* lse,        \
                                   AttDims a) {                                                 \
    att_tc::fwd<T, 128, 4>(q, k, v, o, lse, a);                                                 \
  }                                                                                             \
  extern "C" __global__ void __launch_bounds__(ATT_TC_THREADS, 3) attention_bwd_tc64_##SUFFIX(  \
      const T* q, const T* k, const T* v, const T* dout, const float* lse, const float* delta,  \
      float* dq_acc, float* dkv_part, AttDims a) {                                              \
    att_tc::bwd<T, 64, 64>(q, k, v, dout, lse, delta, dq_acc, dkv_part, a);                     \
  }                                                                                             \
  extern "C" __global__ void __launch_bounds__(ATT_TC_THREADS) attention_bwd_tc128_##SUFFIX(    \
      const T* q, const T* k, const T* v, const T* dout, const float* lse, const float* delta,  \
      float* dq_acc, float* dkv_part, AttDims a) {                                              \
    att_tc::bwd<T, 128, 32>(q, k, v, dout, lse, delta, dq_acc, dkv_part, a);                    \
  }                                                                                             \
  extern "C" __global__ void attention_bwd_delta_##SUFFIX(const T* o, const T* dout,            \
                                                          float* delta, AttDims a) {            \
    att_bwd_delta_impl<T>(o, dout, delta, a);                                                   \
  }                                                                                             \
  extern "C" __global__ void attention_bwd_finish_##SUFFIX(const float* dq_acc,                 \
                                                           const float* dkv_part, T* out,       \
                                                           AttDims a) {                         \
    att_bwd_finish_impl<T>(dq_acc, dkv_part, out, a);                                           \
  }

// Tensor cores take 16-bit operands only: f32 keeps the kernels above.
ATT_TC_KERNELS(__nv_bfloat16, bf16)
ATT_TC_KERNELS(__half, f16)

// ---------------------------------------------------------------------------------------------
// f32 backward, tiled: the forward's SIMT pattern (64 x 64 tiles in shared memory, thread
// (t / 16, t % 16) owning 4 x 4 interleaved entries of each score-shaped tile) in two kernels,
// no atomics, so the f32 gradients are deterministic:
// - `attention_bwd_dq_f32t*`: a block per 64 query rows of a head walks the key tiles those rows
//   see: S = Q K^T and dP = dO V^T, dS = P (dP - D), dQ += dS K (dS through shared memory).
//   Writes dq_acc rows (scaled) in full.
// - `attention_bwd_dkv_f32t*`: a block per 64 keys of a query head walks the query tiles that
//   see them: S^T = K Q^T and dP^T = V dO^T, dV += P^T dO and dK += dS^T Q. Writes its head's
//   rows of dkv_part; `attention_bwd_finish_f32` sums them over each GQA group, as for the
//   tensor-core backward.
// D_i comes from `attention_bwd_delta_f32` first. Dynamic shared memory: `att_f32_bwd_smem_bytes`.
template <int D>
__host__ __device__ constexpr int att_f32_bwd_smem_bytes() {
  // four [64][D + 4] tiles, two [64][64 + 4] tiles, lse and D of 64 rows; f32
  return 4 * (4 * ATT_F32_B * (D + ATT_F32_PAD) + 2 * ATT_F32_B * (ATT_F32_B + ATT_F32_PAD) +
              2 * ATT_F32_B);
}

template <int D>
__device__ __forceinline__ void att_bwd_dq_f32_tiled(const float* __restrict__ q,
                                                     const float* __restrict__ k,
                                                     const float* __restrict__ v,
                                                     const float* __restrict__ dout,
                                                     const float* __restrict__ lse,
                                                     const float* __restrict__ delta,
                                                     float* __restrict__ dq_acc, AttDims a) {
  constexpr int B = ATT_F32_B, LD = D + ATT_F32_PAD, LP = B + ATT_F32_PAD, DC = D / 64;
  float* sq = att_f32_smem;
  float* sdo = sq + B * LD;
  float* sk = sdo + B * LD;
  float* sv = sk + B * LD;
  float* sds = sv + B * LD;
  const int t = threadIdx.x, ty = t >> 4, tx = t & 15;
  const int q0 = (gridDim.y - 1 - blockIdx.y) * B;  // the last rows see the most keys: first
  const int bh = blockIdx.x;
  const int off = a.tk - a.tq;
  const size_t kv0 = att_kv_row0(a, bh) * D;
  const float* kb = k + kv0;
  const float* vb = v + kv0;
  att_f32_load<D, LD>(sq, q + (size_t)bh * a.tq * D, q0, a.tq);
  att_f32_load<D, LD>(sdo, dout + (size_t)bh * a.tq * D, q0, a.tq);
  float lr[4], dr[4], acc[4][DC][4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int row = q0 + ty + 16 * i;
    const size_t r = (size_t)bh * a.tq + min(row, a.tq - 1);
    lr[i] = lse[r];
    dr[i] = delta[r];
#pragma unroll
    for (int c = 0; c < DC; ++c) acc[i][c][0] = acc[i][c][1] = acc[i][c][2] = acc[i][c][3] = 0.f;
  }
  const int key_end = min(a.tq, q0 + B) + off;  // exclusive: keys the block's last row sees
  for (int k0 = 0; k0 < key_end; k0 += B) {
    __syncthreads();  // the previous tile's K, V and dS are no longer read
    att_f32_load<D, LD>(sk, kb, k0, a.tk);
    att_f32_load<D, LD>(sv, vb, k0, a.tk);
    __syncthreads();
    float s[4][4], dp[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) s[i][j] = dp[i][j] = 0.f;
    att_f32_rows_dot<D, LD>(sq, sk, s);
    att_f32_rows_dot<D, LD>(sdo, sv, dp);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int row = q0 + ty + 16 * i;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int key = k0 + tx + 16 * j;
        const bool seen = key <= row + off && key < a.tk && row < a.tq;
        const float p = seen ? expf(fmaf(s[i][j], a.scale, -lr[i])) : 0.f;
        sds[(ty + 16 * i) * LP + tx + 16 * j] = p * (dp[i][j] - dr[i]);
      }
    }
    __syncthreads();  // dS of every row is in shared memory
    att_f32_acc<D, LD, LP>(sds, sk, acc);
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int row = q0 + ty + 16 * i;
    if (row >= a.tq) continue;
    float* dst = dq_acc + ((size_t)bh * a.tq + row) * D + 4 * tx;
#pragma unroll
    for (int c = 0; c < DC; ++c)
      *reinterpret_cast<float4*>(dst + 64 * c) =
          make_float4(acc[i][c][0] * a.scale, acc[i][c][1] * a.scale, acc[i][c][2] * a.scale,
                      acc[i][c][3] * a.scale);
  }
}

template <int D>
__device__ __forceinline__ void att_bwd_dkv_f32_tiled(const float* __restrict__ q,
                                                      const float* __restrict__ k,
                                                      const float* __restrict__ v,
                                                      const float* __restrict__ dout,
                                                      const float* __restrict__ lse,
                                                      const float* __restrict__ delta,
                                                      float* __restrict__ dkv_part, AttDims a) {
  constexpr int B = ATT_F32_B, LD = D + ATT_F32_PAD, LP = B + ATT_F32_PAD, DC = D / 64;
  float* sk = att_f32_smem;
  float* sv = sk + B * LD;
  float* sq = sv + B * LD;
  float* sdo = sq + B * LD;
  float* spt = sdo + B * LD;
  float* sdst = spt + B * LP;
  float* s_lse = sdst + B * LP;
  float* s_delta = s_lse + B;
  const int t = threadIdx.x, ty = t >> 4, tx = t & 15;
  const int k0 = blockIdx.y * B;  // the first keys are seen by the most queries: first
  const int bh = blockIdx.x;
  const int off = a.tk - a.tq;
  const float* qb = q + (size_t)bh * a.tq * D;
  const float* dob = dout + (size_t)bh * a.tq * D;
  const size_t kv0 = att_kv_row0(a, bh) * D;
  att_f32_load<D, LD>(sk, k + kv0, k0, a.tk);
  att_f32_load<D, LD>(sv, v + kv0, k0, a.tk);
  float ak[4][DC][4], av[4][DC][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int c = 0; c < DC; ++c)
#pragma unroll
      for (int e = 0; e < 4; ++e) ak[i][c][e] = av[i][c][e] = 0.f;
  // query i sees key j when j <= i + off: start at the tile of the first query that sees k0
  for (int q0 = max(0, k0 - off) / B * B; q0 < a.tq; q0 += B) {
    __syncthreads();  // the previous tile's Q, dO, P^T and dS^T are no longer read
    att_f32_load<D, LD>(sq, qb, q0, a.tq);
    att_f32_load<D, LD>(sdo, dob, q0, a.tq);
    if (t < B) {
      const size_t r = (size_t)bh * a.tq + min(q0 + t, a.tq - 1);
      s_lse[t] = lse[r];
      s_delta[t] = delta[r];
    }
    __syncthreads();
    float st[4][4], dpt[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) st[i][j] = dpt[i][j] = 0.f;
    att_f32_rows_dot<D, LD>(sk, sq, st);
    att_f32_rows_dot<D, LD>(sv, sdo, dpt);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int key = k0 + ty + 16 * i;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int ql = tx + 16 * j, qi = q0 + ql;
        const bool seen = key <= qi + off && key < a.tk && qi < a.tq;
        const float p = seen ? expf(fmaf(st[i][j], a.scale, -s_lse[ql])) : 0.f;
        spt[(ty + 16 * i) * LP + ql] = p;
        sdst[(ty + 16 * i) * LP + ql] = p * (dpt[i][j] - s_delta[ql]);
      }
    }
    __syncthreads();  // P^T and dS^T of every key are in shared memory
    att_f32_acc<D, LD, LP>(spt, sdo, av);
    att_f32_acc<D, LD, LP>(sdst, sq, ak);
  }
  const size_t part = (size_t)a.b * a.hq * a.tk * D;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int key = k0 + ty + 16 * i;
    if (key >= a.tk) continue;
    float* dkr = dkv_part + ((size_t)bh * a.tk + key) * D + 4 * tx;
#pragma unroll
    for (int c = 0; c < DC; ++c) {
      *reinterpret_cast<float4*>(dkr + 64 * c) =
          make_float4(ak[i][c][0] * a.scale, ak[i][c][1] * a.scale, ak[i][c][2] * a.scale,
                      ak[i][c][3] * a.scale);
      *reinterpret_cast<float4*>(dkr + part + 64 * c) =
          make_float4(av[i][c][0], av[i][c][1], av[i][c][2], av[i][c][3]);
    }
  }
}

// The second __launch_bounds__ figure keeps d = 64 at two blocks an SM (128 registers), which
// its shared memory (about 105 KB a block) also allows; d = 128 runs one block an SM. Both take
// the tensor-core backward's arguments (each writes one of the two buffers), so one launcher
// serves all three.
#define ATT_F32_BWD_KERNELS(D, MINB)                                                             \
  extern "C" __global__ void __launch_bounds__(256, MINB) attention_bwd_dq_f32t##D##_f32(        \
      const float* q, const float* k, const float* v, const float* dout, const float* lse,       \
      const float* delta, float* dq_acc, float*, AttDims a) {                                   \
    att_bwd_dq_f32_tiled<D>(q, k, v, dout, lse, delta, dq_acc, a);                               \
  }                                                                                              \
  extern "C" __global__ void __launch_bounds__(256, MINB) attention_bwd_dkv_f32t##D##_f32(       \
      const float* q, const float* k, const float* v, const float* dout, const float* lse,       \
      const float* delta, float*, float* dkv_part, AttDims a) {                                 \
    att_bwd_dkv_f32_tiled<D>(q, k, v, dout, lse, delta, dkv_part, a);                            \
  }
ATT_F32_BWD_KERNELS(64, 2)
ATT_F32_BWD_KERNELS(128, 1)

extern "C" __global__ void attention_bwd_delta_f32(const float* o, const float* dout,
                                                   float* delta, AttDims a) {
  att_bwd_delta_impl<float>(o, dout, delta, a);
}
extern "C" __global__ void attention_bwd_finish_f32(const float* dq_acc, const float* dkv_part,
                                                    float* out, AttDims a) {
  att_bwd_finish_impl<float>(dq_acc, dkv_part, out, a);
}
