// Causal GQA attention (Metal), same kernel names and design as attention.cu: one 32-wide SIMD
// group per row (a lane holds elements lane, lane+32, lane+64, lane+96 of it, so d <= 128), an
// online softmax in the forward that leaves a logsumexp per row, and a backward in two race-free
// kernels (dq per query row, which also writes D_i = do_i . o_i; dk/dv per key row, walking
// every query head of its group). Threadgroups of 4 SIMD groups; the grid is flattened to
// (row blocks) x (batch * heads) along x.

#define ATT_ROWS 4
#define ATT_CHUNKS 4

struct AttDims {
  uint b, hq, hkv, tq, tk, d;
  float scale;
};

// The sizes arrive as seven scalars from buffer index I on (the host binds plain u32/f32 values).
#define ATT_DIM_ARGS(I)                                                                      \
  constant uint &b_ [[buffer(I)]], constant uint &hq_ [[buffer(I + 1)]],                     \
      constant uint &hkv_ [[buffer(I + 2)]], constant uint &tq_ [[buffer(I + 3)]],           \
      constant uint &tk_ [[buffer(I + 4)]], constant uint &d_ [[buffer(I + 5)]],             \
      constant float &scale_ [[buffer(I + 6)]]
#define ATT_DIMS const AttDims a = {b_, hq_, hkv_, tq_, tk_, d_, scale_};

template <typename T>
inline void att_load(device const T* p, uint d, uint lane, thread float* r) {
  for (uint c = 0; c < ATT_CHUNKS; ++c) {
    const uint e = lane + 32 * c;
    r[c] = e < d ? float(p[e]) : 0.0f;
  }
}

template <typename T>
inline float att_dot(thread const float* r, device const T* p, uint d, uint lane) {
  float s = 0.0f;
  for (uint c = 0; c < ATT_CHUNKS; ++c) {
    const uint e = lane + 32 * c;
    if (e < d) s += r[c] * float(p[e]);
  }
  return simd_sum(s);
}

template <typename T>
inline void att_store(device T* p, uint d, uint lane, thread const float* r, float mul) {
  for (uint c = 0; c < ATT_CHUNKS; ++c) {
    const uint e = lane + 32 * c;
    if (e < d) p[e] = T(r[c] * mul);
  }
}

template <typename T>
kernel void attention_fwd(device const T* q [[buffer(0)]], device const T* k [[buffer(1)]],
                          device const T* v [[buffer(2)]], device T* o [[buffer(3)]],
                          device float* lse [[buffer(4)]], ATT_DIM_ARGS(5),
                          uint group [[threadgroup_position_in_grid]],
                          uint tid [[thread_position_in_threadgroup]]) {
  ATT_DIMS
  const uint blocks = (a.tq + ATT_ROWS - 1) / ATT_ROWS;
  const uint bh = group / blocks;
  const uint i = (group % blocks) * ATT_ROWS + tid / 32;
  const uint lane = tid % 32;
  if (i >= a.tq) return;
  const uint bi = bh / a.hq, g = (bh % a.hq) / (a.hq / a.hkv);
  const size_t row = (size_t)bh * a.tq + i;
  device const T* kb = k + ((size_t)bi * a.hkv + g) * a.tk * a.d;
  device const T* vb = v + ((size_t)bi * a.hkv + g) * a.tk * a.d;
  float qr[ATT_CHUNKS], acc[ATT_CHUNKS] = {0.0f, 0.0f, 0.0f, 0.0f};
  att_load(q + row * a.d, a.d, lane, qr);
  float m = -INFINITY, l = 0.0f;
  const uint last = i + a.tk - a.tq;
  for (uint j = 0; j <= last; ++j) {
    const float s = a.scale * att_dot(qr, kb + (size_t)j * a.d, a.d, lane);
    const float m_new = max(m, s);
    const float alpha = exp(m - m_new);
    const float p = exp(s - m_new);
    l = l * alpha + p;
    for (uint c = 0; c < ATT_CHUNKS; ++c) {
      const uint e = lane + 32 * c;
      acc[c] = acc[c] * alpha + (e < a.d ? p * float(vb[(size_t)j * a.d + e]) : 0.0f);
    }
    m = m_new;
  }
  att_store(o + row * a.d, a.d, lane, acc, 1.0f / l);
  if (lane == 0) lse[row] = m + log(l);
}

template <typename T>
kernel void attention_bwd_dq(device const T* q [[buffer(0)]], device const T* k [[buffer(1)]],
                             device const T* v [[buffer(2)]], device const T* o [[buffer(3)]],
                             device const T* dout [[buffer(4)]],
                             device const float* lse [[buffer(5)]],
                             device float* delta [[buffer(6)]], device T* dq [[buffer(7)]],
                             ATT_DIM_ARGS(8), uint group [[threadgroup_position_in_grid]],
                             uint tid [[thread_position_in_threadgroup]]) {
  ATT_DIMS
  const uint blocks = (a.tq + ATT_ROWS - 1) / ATT_ROWS;
  const uint bh = group / blocks;
  const uint i = (group % blocks) * ATT_ROWS + tid / 32;
  const uint lane = tid % 32;
  if (i >= a.tq) return;
  const uint bi = bh / a.hq, g = (bh % a.hq) / (a.hq / a.hkv);
  const size_t row = (size_t)bh * a.tq + i;
  device const T* kb = k + ((size_t)bi * a.hkv + g) * a.tk * a.d;
  device const T* vb = v + ((size_t)bi * a.hkv + g) * a.tk * a.d;
  float qr[ATT_CHUNKS], gr[ATT_CHUNKS], acc[ATT_CHUNKS] = {0.0f, 0.0f, 0.0f, 0.0f};
  att_load(q + row * a.d, a.d, lane, qr);
  att_load(dout + row * a.d, a.d, lane, gr);
  const float d_i = att_dot(gr, o + row * a.d, a.d, lane);
  const float l = lse[row];
  const uint last = i + a.tk - a.tq;
  for (uint j = 0; j <= last; ++j) {
    device const T* kj = kb + (size_t)j * a.d;
    const float p = exp(a.scale * att_dot(qr, kj, a.d, lane) - l);
    const float ds = p * (att_dot(gr, vb + (size_t)j * a.d, a.d, lane) - d_i);
    for (uint c = 0; c < ATT_CHUNKS; ++c) {
      const uint e = lane + 32 * c;
      if (e < a.d) acc[c] += ds * float(kj[e]);
    }
  }
  att_store(dq + row * a.d, a.d, lane, acc, a.scale);
  if (lane == 0) delta[row] = d_i;
}

template <typename T>
kernel void attention_bwd_dkv(device const T* q [[buffer(0)]], device const T* k [[buffer(1)]],
                              device const T* v [[buffer(2)]], device const T* dout [[buffer(3)]],
                              device const float* lse [[buffer(4)]],
                              device const float* delta [[buffer(5)]],
                              device T* dk [[buffer(6)]], device T* dv [[buffer(7)]],
                              ATT_DIM_ARGS(8), uint group [[threadgroup_position_in_grid]],
                              uint tid [[thread_position_in_threadgroup]]) {
  ATT_DIMS
  const uint blocks = (a.tk + ATT_ROWS - 1) / ATT_ROWS;
  const uint bg = group / blocks;
  const uint j = (group % blocks) * ATT_ROWS + tid / 32;
  const uint lane = tid % 32;
  if (j >= a.tk) return;
  const uint bi = bg / a.hkv, g = bg % a.hkv;
  const uint rep = a.hq / a.hkv;
  const size_t krow = (size_t)bg * a.tk + j;
  float kr[ATT_CHUNKS], vr[ATT_CHUNKS];
  float ak[ATT_CHUNKS] = {0.0f, 0.0f, 0.0f, 0.0f}, av[ATT_CHUNKS] = {0.0f, 0.0f, 0.0f, 0.0f};
  att_load(k + krow * a.d, a.d, lane, kr);
  att_load(v + krow * a.d, a.d, lane, vr);
  const uint shift = a.tk - a.tq;
  const uint first = j > shift ? j - shift : 0;
  for (uint h = g * rep; h < (g + 1) * rep; ++h) {
    const size_t base = ((size_t)bi * a.hq + h) * a.tq;
    for (uint i = first; i < a.tq; ++i) {
      const size_t row = base + i;
      device const T* qi = q + row * a.d;
      device const T* gi = dout + row * a.d;
      const float p = exp(a.scale * att_dot(kr, qi, a.d, lane) - lse[row]);
      const float ds = p * (att_dot(vr, gi, a.d, lane) - delta[row]);
      for (uint c = 0; c < ATT_CHUNKS; ++c) {
        const uint e = lane + 32 * c;
        if (e < a.d) {
          ak[c] += ds * float(qi[e]);
          av[c] += p * float(gi[e]);
        }
      }
    }
  }
  att_store(dk + krow * a.d, a.d, lane, ak, a.scale);
  att_store(dv + krow * a.d, a.d, lane, av, 1.0f);
}

LORAFUSE_INSTANTIATE(attention_fwd)
LORAFUSE_INSTANTIATE(attention_bwd_dq)
LORAFUSE_INSTANTIATE(attention_bwd_dkv)
