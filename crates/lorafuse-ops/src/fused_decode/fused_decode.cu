// One decode step of a Llama-family decoder at batch 1, in five kernels per layer, for replay as a
// CUDA graph (see fused_decode/cuda.rs). Design choices:
// - Every kernel reads the token and its position from a device buffer `state = {token, pos}`, so
//   the launches (and a captured graph) never change between steps; the host writes 8 bytes.
// - Matrix-vector products: one warp per output row (a few rows in flight per warp), 16-byte
//   weight loads, the input vector in shared memory as f32, f32 accumulation.
// - RMSNorm is recomputed by every block of the kernel that consumes it (the hidden vector is a
//   few KB), which saves a launch and a round trip per norm.
// - Values are rounded to the storage type T wherever transformers' eager Llama rounds them in
//   that dtype (norm output, each projection's output, RoPE's products, SiLU, the residual adds),
//   so bf16 greedy decoding follows the same path; with T = float every rounding is the identity.
#include "cuda_util.cuh"

using namespace lorafuse;

namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kMaxHeadDimPerLane = 8;  // head_dim <= 256

template <typename T> __device__ __forceinline__ float rnd(float v) { return to_f(from_f<T>(v)); }

// Programmatic dependent launch (sm_90): every kernel lets the next one start at once, so that
// its blocks are resident and load their weights while this one finishes; `pdl_wait` then
// blocks until the previous kernel has completed and its writes are visible. Without the launch
// attribute both are no-ops. Each kernel waits before its first read of another kernel's output
// and before any thread exits, so completion stays ordered along the whole chain.
__device__ __forceinline__ void pdl_trigger() { asm volatile("griddepcontrol.launch_dependents;"); }
__device__ __forceinline__ void pdl_wait() { asm volatile("griddepcontrol.wait;" ::: "memory"); }

template <typename T> __device__ __forceinline__ float bias_at(const T* b, int i) {
  return b == nullptr ? 0.f : to_f(b[i]);
}

// xs[i] = w[i] * (x[i] / rms(x)), rounded as transformers' LlamaRMSNorm does (normalise in f32,
// round, multiply by the weight in T). Ends with a barrier: xs is ready for every thread.
template <typename T>
__device__ void rms_norm_to_shared(const T* x, const T* w, float eps, int n, float* xs,
                                   float* scratch) {
  float ss = 0.f;
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const float v = to_f(x[i]);
    ss += v * v;
  }
  ss = block_sum(ss, scratch);
  const float r = rsqrtf(ss / n + eps);
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    xs[i] = rnd<T>(to_f(w[i]) * rnd<T>(to_f(x[i]) * r));
  }
  __syncthreads();
}

template <typename T> __device__ void load_to_shared(const T* v, int n, float* xs) {
  for (int i = threadIdx.x; i < n; i += blockDim.x) xs[i] = to_f(v[i]);
  __syncthreads();
}

// A warp's share of R weight rows (each n long, 16-byte aligned, n a multiple of the pack): U
// packs per lane per row, loaded together so that one memory latency covers them all. Kernels
// load the first chunk before they wait for their input vector (the weights do not depend on
// it), so the two latencies overlap.
template <typename T, int R, int U = 4> struct RowChunk {
  static constexpr int V = Pack<T>::N;
  static constexpr int kSpan = 32 * V * U;  // elements of a row one chunk covers
  uint4 raw[R][U];

  __device__ __forceinline__ void load(const T* const (&rows)[R], int n, int base) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int i = base + (u * 32 + lane) * V;
#pragma unroll
      for (int r = 0; r < R; ++r) {
        raw[r][u] = i < n ? __ldg(reinterpret_cast<const uint4*>(rows[r] + i)) : make_uint4(0, 0, 0, 0);
      }
    }
  }

  __device__ __forceinline__ void accumulate(const float* xs, int n, int base, float (&acc)[R]) const {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int i = base + (u * 32 + lane) * V;
      if (i >= n) break;
      float xv[V];
#pragma unroll
      for (int j = 0; j < V; j += 4) {
        const float4 f = *reinterpret_cast<const float4*>(xs + i + j);
        xv[j] = f.x;
        xv[j + 1] = f.y;
        xv[j + 2] = f.z;
        xv[j + 3] = f.w;
      }
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const T* e = reinterpret_cast<const T*>(&raw[r][u]);
#pragma unroll
        for (int j = 0; j < V; ++j) acc[r] += to_f(e[j]) * xv[j];
      }
    }
  }
};

// Finishes the dot products of R rows with the shared vector xs, given their first chunk already
// loaded; every lane gets the R sums.
template <typename T, int R>
__device__ __forceinline__ void finish_dot_rows(const RowChunk<T, R>& first,
                                                const T* const (&rows)[R], const float* xs, int n,
                                                float (&out)[R]) {
  float acc[R];
#pragma unroll
  for (int r = 0; r < R; ++r) acc[r] = 0.f;
  first.accumulate(xs, n, 0, acc);
  for (int base = RowChunk<T, R>::kSpan; base < n; base += RowChunk<T, R>::kSpan) {
    RowChunk<T, R> c;
    c.load(rows, n, base);
    c.accumulate(xs, n, base, acc);
  }
#pragma unroll
  for (int r = 0; r < R; ++r) out[r] = warp_sum(acc[r]);
}

// x = embed[token]
template <typename T>
__device__ void embed_impl(const T* embed, const int* state, T* x, int hidden) {
  pdl_trigger();
  pdl_wait();
  const T* row = embed + (size_t)state[0] * hidden;
  for (int i = threadIdx.x; i < hidden; i += blockDim.x) x[i] = row[i];
}

// Blocks come in groups of head_dim / (2 * kWarps) per head of q (first `heads` groups), k, then
// v. Each warp owns one rotation pair of rows (i, i + head_dim / 2) of its head: it computes both
// from rms_norm(x), adds the bias, applies RoPE (half rotation, q and k only) at position pos and
// writes q to q_out, k and v into the layer's cache ([capacity, kv_heads, head_dim]) at row pos.
template <typename T>
__device__ void qkv_rope_impl(const T* x, const T* ln_w, float eps, const T* wq, const T* wk,
                              const T* wv, const T* bq, const T* bk, const T* bv,
                              const float* cos_t, const float* sin_t, const int* state, T* q_out,
                              T* k_cache, T* v_cache, int hidden, int heads, int kv_heads,
                              int head_dim) {
  extern __shared__ float4 smem4[];
  float* xs = reinterpret_cast<float*>(smem4);
  __shared__ float scratch[32];

  pdl_trigger();
  const int half = head_dim / 2;
  const int blocks_per_head = half / kWarps;
  int head = blockIdx.x / blocks_per_head;
  const int i = (blockIdx.x % blocks_per_head) * kWarps + (threadIdx.x >> 5);
  int kind = 0;
  const T* w = wq;
  const T* bias = bq;
  if (head >= heads + kv_heads) {
    kind = 2;
    head -= heads + kv_heads;
    w = wv;
    bias = bv;
  } else if (head >= heads) {
    kind = 1;
    head -= heads;
    w = wk;
    bias = bk;
  }
  const size_t row = (size_t)head * head_dim + i;
  const T* const rows[2] = {w + row * hidden, w + (row + half) * hidden};
  RowChunk<T, 2> first;
  first.load(rows, hidden, 0);
  pdl_wait();
  rms_norm_to_shared<T>(x, ln_w, eps, hidden, xs, scratch);
  float d[2];
  finish_dot_rows<T, 2>(first, rows, xs, hidden, d);
  if ((threadIdx.x & 31) != 0) return;
  float lo = rnd<T>(d[0] + bias_at(bias, (int)row));
  float hi = rnd<T>(d[1] + bias_at(bias, (int)row + half));
  const int pos = state[1];
  if (kind < 2) {
    const float c = rnd<T>(cos_t[(size_t)pos * half + i]);
    const float s = rnd<T>(sin_t[(size_t)pos * half + i]);
    const float new_lo = rnd<T>(rnd<T>(lo * c) + rnd<T>(-hi * s));
    hi = rnd<T>(rnd<T>(hi * c) + rnd<T>(lo * s));
    lo = new_lo;
  }
  T* dst = kind == 0 ? q_out + (size_t)head * head_dim
                     : (kind == 1 ? k_cache : v_cache) + ((size_t)pos * kv_heads + head) * head_dim;
  dst[i] = from_f<T>(lo);
  dst[i + half] = from_f<T>(hi);
}

// Attention of one query head (block) over positions 0..pos of its KV head, in tiles of
// kTile positions with a running max: every thread scores whole cached keys (16-byte loads, one
// position each), the block takes the tile's max and exponentials, then each warp accumulates
// probability-weighted values over its share of the tile, each lane owning head_dim / 32
// adjacent output dims. The max is block-wide, so the warps' sums merge by plain addition.
// Past kSplitMin positions a head's positions split over kSplits blocks (grid heads x kSplits;
// with fewer, only split 0 works and the others exit): each writes its running (max, sum,
// unnormalised output) to `part`, and the last block of the head to arrive (a counter per head,
// reset by that block for the next layer and step) merges them. One block a head left most of
// the card idle at long contexts: 865 tokens/s over 512 + 512 positions against 1,554 over 160.
constexpr int kTile = 1024;
constexpr int kSplits = 8;
constexpr int kSplitMin = 256;

template <typename T>
__device__ void attention_impl(const T* q, const T* k_cache, const T* v_cache, const int* state,
                               T* out, float* part, int* counter, int heads, int kv_heads,
                               int head_dim, float scale) {
  constexpr int V = Pack<T>::N;
  extern __shared__ float4 smem4[];
  float* qs = reinterpret_cast<float*>(smem4);  // [head_dim]
  float* s_acc = qs + head_dim;                 // [kWarps, head_dim]
  __shared__ float sc[kTile];
  __shared__ float scratch[32];
  const int h = blockIdx.x % heads;
  const int split = blockIdx.x / heads;
  const int g = h / (heads / kv_heads);
  const int len = state[1] + 1;
  const bool splits = len > kSplitMin;
  if (!splits && split > 0) {
    pdl_trigger();
    return;
  }
  const int chunk = (len + kSplits - 1) / kSplits;
  const int begin = splits ? min(len, split * chunk) : 0;
  const int end = splits ? min(len, begin + chunk) : len;
  const int per_lane = head_dim / 32;
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const size_t stride = (size_t)kv_heads * head_dim;  // between positions
  const T* kh = k_cache + (size_t)g * head_dim;
  const T* vh = v_cache + (size_t)g * head_dim + lane * per_lane;
  pdl_trigger();
  pdl_wait();
  for (int i = threadIdx.x; i < head_dim; i += blockDim.x) {
    qs[i] = to_f(q[(size_t)h * head_dim + i]) * scale;
  }
  __syncthreads();
  float acc[kMaxHeadDimPerLane];
#pragma unroll
  for (int j = 0; j < kMaxHeadDimPerLane; ++j) acc[j] = 0.f;
  float m_run = -INFINITY;
  float l_run = 0.f;
  for (int t0 = begin; t0 < end; t0 += kTile) {
    const int n = min(kTile, end - t0);
    float local_max = -INFINITY;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
      const T* kp = kh + (size_t)(t0 + i) * stride;
      float sdot = 0.f;
      for (int d = 0; d < head_dim; d += V) {
        float kv[V];
        load_pack(kp + d, kv);
#pragma unroll
        for (int j = 0; j < V; ++j) sdot += qs[d + j] * kv[j];
      }
      sc[i] = sdot;
      local_max = fmaxf(local_max, sdot);
    }
    const float m_new = fmaxf(m_run, block_max(local_max, scratch));
    const float corr = expf(m_run - m_new);
    float local_sum = 0.f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
      const float e = expf(sc[i] - m_new);
      sc[i] = e;
      local_sum += e;
    }
    l_run = l_run * corr + block_sum(local_sum, scratch);
    m_run = m_new;
#pragma unroll
    for (int j = 0; j < kMaxHeadDimPerLane; ++j) acc[j] *= corr;
    int i = warp;
    for (; i + 3 * kWarps < n; i += 4 * kWarps) {
      float vv[4][kMaxHeadDimPerLane];
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const T* vp = vh + (size_t)(t0 + i + u * kWarps) * stride;
#pragma unroll
        for (int j = 0; j < kMaxHeadDimPerLane; ++j) vv[u][j] = j < per_lane ? to_f(vp[j]) : 0.f;
      }
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const float e = sc[i + u * kWarps];
#pragma unroll
        for (int j = 0; j < kMaxHeadDimPerLane; ++j) acc[j] += e * vv[u][j];
      }
    }
    for (; i < n; i += kWarps) {
      const T* vp = vh + (size_t)(t0 + i) * stride;
      const float e = sc[i];
#pragma unroll
      for (int j = 0; j < kMaxHeadDimPerLane; ++j) {
        if (j < per_lane) acc[j] += e * to_f(vp[j]);
      }
    }
    __syncthreads();  // sc is rewritten by the next tile
  }
#pragma unroll
  for (int j = 0; j < kMaxHeadDimPerLane; ++j) {
    if (j < per_lane) s_acc[warp * head_dim + lane * per_lane + j] = acc[j];
  }
  __syncthreads();
  // part: [heads][kSplits][2 + head_dim] f32, (max, sum, unnormalised output)
  const int rec = 2 + head_dim;
  float* mine = part + ((size_t)h * kSplits + split) * rec;
  for (int i = threadIdx.x; i < head_dim; i += blockDim.x) {
    float num = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) num += s_acc[w * head_dim + i];
    if (splits) {
      mine[2 + i] = num;
    } else {
      out[(size_t)h * head_dim + i] = from_f<T>(num / l_run);
    }
  }
  if (!splits) return;
  if (threadIdx.x == 0) {
    mine[0] = m_run;
    mine[1] = l_run;
  }
  __shared__ int last;
  __threadfence();  // this block's record is visible before its arrival is counted
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(counter + h, 1) == kSplits - 1;
  __syncthreads();
  if (!last) return;
  __threadfence();
  const float* recs = part + (size_t)h * kSplits * rec;
  float big = -INFINITY;
#pragma unroll
  for (int u = 0; u < kSplits; ++u) big = fmaxf(big, __ldcg(recs + u * rec));
  for (int i = threadIdx.x; i < head_dim; i += blockDim.x) {
    float num = 0.f, total = 0.f;
    for (int u = 0; u < kSplits; ++u) {
      const float l = __ldcg(recs + u * rec + 1);
      // a split that saw no position has sum 0 (and max -inf): weight 0
      const float wgt = l > 0.f ? expf(__ldcg(recs + u * rec) - big) : 0.f;
      total += l * wgt;
      num += wgt * __ldcg(recs + u * rec + 2 + i);
    }
    out[(size_t)h * head_dim + i] = from_f<T>(num / total);
  }
  if (threadIdx.x == 0) counter[h] = 0;  // for the next layer's (and step's) launch
}

// x[r] += W[r] . in (+ bias[r]) for the block's rows: o_proj and down_proj with the residual add.
template <typename T>
__device__ void matvec_residual_impl(const T* w, const T* bias, const T* in, T* x, int rows,
                                     int cols) {
  extern __shared__ float4 smem4[];
  float* xs = reinterpret_cast<float*>(smem4);
  pdl_trigger();
  const int r0 = min((blockIdx.x * kWarps + (threadIdx.x >> 5)) * 2, rows - 1);
  const int r1 = min(r0 + 1, rows - 1);
  const T* const rs[2] = {w + (size_t)r0 * cols, w + (size_t)r1 * cols};
  RowChunk<T, 2> first;
  first.load(rs, cols, 0);
  pdl_wait();
  load_to_shared<T>(in, cols, xs);
  if ((blockIdx.x * kWarps + (threadIdx.x >> 5)) * 2 >= rows) return;
  float d[2];
  finish_dot_rows<T, 2>(first, rs, xs, cols, d);
  if ((threadIdx.x & 31) == 0) {
    x[r0] = from_f<T>(to_f(x[r0]) + rnd<T>(d[0] + bias_at(bias, r0)));
    if (r1 != r0) x[r1] = from_f<T>(to_f(x[r1]) + rnd<T>(d[1] + bias_at(bias, r1)));
  }
}

// act[r] = silu(gate[r] . n) * (up[r] . n) with n = rms_norm(x): the MLP's first half.
template <typename T>
__device__ void gate_up_impl(const T* x, const T* ln_w, float eps, const T* wg, const T* wu,
                             const T* bg, const T* bu, T* act, int hidden, int inter) {
  extern __shared__ float4 smem4[];
  float* xs = reinterpret_cast<float*>(smem4);
  __shared__ float scratch[32];
  pdl_trigger();
  const int warp_row = (blockIdx.x * kWarps + (threadIdx.x >> 5)) * 2;
  const int r0 = min(warp_row, inter - 1);
  const int r1 = min(r0 + 1, inter - 1);
  const T* const rs[4] = {wg + (size_t)r0 * hidden, wg + (size_t)r1 * hidden,
                          wu + (size_t)r0 * hidden, wu + (size_t)r1 * hidden};
  RowChunk<T, 4> first;
  first.load(rs, hidden, 0);
  pdl_wait();
  rms_norm_to_shared<T>(x, ln_w, eps, hidden, xs, scratch);
  if (warp_row >= inter) return;
  float d[4];
  finish_dot_rows<T, 4>(first, rs, xs, hidden, d);
  if ((threadIdx.x & 31) == 0) {
    const int r[2] = {r0, r1};
#pragma unroll
    for (int k = 0; k < 2; ++k) {
      const float gv = rnd<T>(d[k] + bias_at(bg, r[k]));
      const float uv = rnd<T>(d[k + 2] + bias_at(bu, r[k]));
      const float silu = rnd<T>(gv / (1.f + expf(-gv)));
      act[r[k]] = from_f<T>(silu * uv);
    }
  }
}

// logits[r] = W[r] . rms_norm(x), rounded to T as the LM head's output is, stored as f32.
template <typename T>
__device__ void lm_head_impl(const T* x, const T* norm_w, float eps, const T* w, float* logits,
                             int hidden, int vocab) {
  extern __shared__ float4 smem4[];
  float* xs = reinterpret_cast<float*>(smem4);
  __shared__ float scratch[32];
  pdl_trigger();
  const int r0 = (blockIdx.x * kWarps + (threadIdx.x >> 5)) * 4;
  int r[4];
#pragma unroll
  for (int k = 0; k < 4; ++k) r[k] = min(r0 + k, vocab - 1);
  const T* const rs[4] = {w + (size_t)r[0] * hidden, w + (size_t)r[1] * hidden,
                          w + (size_t)r[2] * hidden, w + (size_t)r[3] * hidden};
  RowChunk<T, 4> first;
  first.load(rs, hidden, 0);
  pdl_wait();
  rms_norm_to_shared<T>(x, norm_w, eps, hidden, xs, scratch);
  if (r0 >= vocab) return;
  float d[4];
  finish_dot_rows<T, 4>(first, rs, xs, hidden, d);
  if ((threadIdx.x & 31) == 0) {
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      if (r0 + k < vocab) logits[r0 + k] = rnd<T>(d[k]);
    }
  }
}

}  // namespace

// out[0] = the index of the largest logit, the first one on ties (as torch.argmax and the host
// sampler): the greedy next token without copying the logits back. One block.
extern "C" __global__ void __launch_bounds__(1024)
    fused_decode_argmax(const float* logits, int vocab, int* out) {
  __shared__ float s_val[32];
  __shared__ int s_idx[32];
  pdl_trigger();
  pdl_wait();
  float best = -INFINITY;
  int idx = 0x7fffffff;
  for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
    const float v = logits[i];
    if (v > best) {
      best = v;
      idx = i;
    }
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, best, o);
    const int oi = __shfl_xor_sync(0xffffffffu, idx, o);
    if (ov > best || (ov == best && oi < idx)) {
      best = ov;
      idx = oi;
    }
  }
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  if (lane == 0) {
    s_val[warp] = best;
    s_idx[warp] = idx;
  }
  __syncthreads();
  if (warp == 0) {
    const int n_warps = blockDim.x >> 5;
    best = lane < n_warps ? s_val[lane] : -INFINITY;
    idx = lane < n_warps ? s_idx[lane] : 0x7fffffff;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float ov = __shfl_xor_sync(0xffffffffu, best, o);
      const int oi = __shfl_xor_sync(0xffffffffu, idx, o);
      if (ov > best || (ov == best && oi < idx)) {
        best = ov;
        idx = oi;
      }
    }
    if (lane == 0) out[0] = idx == 0x7fffffff ? 0 : idx;
  }
}

#define FUSED_DECODE_KERNELS(T, SUF)                                                              \
  extern "C" __global__ void __launch_bounds__(kThreads)                                          \
      fused_decode_embed_##SUF(const T* embed, const int* state, T* x, int hidden) {              \
    embed_impl<T>(embed, state, x, hidden);                                                       \
  }                                                                                               \
  extern "C" __global__ void __launch_bounds__(kThreads) fused_decode_qkv_rope_##SUF(             \
      const T* x, const T* ln_w, float eps, const T* wq, const T* wk, const T* wv, const T* bq,   \
      const T* bk, const T* bv, const float* cos_t, const float* sin_t, const int* state,         \
      T* q_out, T* k_cache, T* v_cache, int hidden, int heads, int kv_heads, int head_dim) {      \
    qkv_rope_impl<T>(x, ln_w, eps, wq, wk, wv, bq, bk, bv, cos_t, sin_t, state, q_out, k_cache,   \
                     v_cache, hidden, heads, kv_heads, head_dim);                                 \
  }                                                                                               \
  extern "C" __global__ void __launch_bounds__(kThreads) fused_decode_attention_##SUF(            \
      const T* q, const T* k_cache, const T* v_cache, const int* state, T* out, float* part,      \
      int* counter, int heads, int kv_heads, int head_dim, float scale) {                         \
    attention_impl<T>(q, k_cache, v_cache, state, out, part, counter, heads, kv_heads, head_dim,  \
                      scale);                                                                     \
  }                                                                                               \
  extern "C" __global__ void __launch_bounds__(kThreads) fused_decode_matvec_residual_##SUF(      \
      const T* w, const T* bias, const T* in, T* x, int rows, int cols) {                         \
    matvec_residual_impl<T>(w, bias, in, x, rows, cols);                                          \
  }                                                                                               \
  extern "C" __global__ void __launch_bounds__(kThreads) fused_decode_gate_up_##SUF(              \
      const T* x, const T* ln_w, float eps, const T* wg, const T* wu, const T* bg, const T* bu,   \
      T* act, int hidden, int inter) {                                                            \
    gate_up_impl<T>(x, ln_w, eps, wg, wu, bg, bu, act, hidden, inter);                            \
  }                                                                                               \
  extern "C" __global__ void __launch_bounds__(kThreads) fused_decode_lm_head_##SUF(              \
      const T* x, const T* norm_w, float eps, const T* w, float* logits, int hidden, int vocab) { \
    lm_head_impl<T>(x, norm_w, eps, w, logits, hidden, vocab);                                    \
  }

FUSED_DECODE_KERNELS(float, f32)
FUSED_DECODE_KERNELS(__nv_bfloat16, bf16)
FUSED_DECODE_KERNELS(__half, f16)
