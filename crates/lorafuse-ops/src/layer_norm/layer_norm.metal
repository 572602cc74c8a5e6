// LayerNorm forward and backward (Metal), same math and kernel names as layer_norm.cu:
//   y = (x - mean) * rstd * w + b
//   dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), g = dy * w;  dw = sum dy * xhat;  db = sum dy
// One threadgroup per row with two-pass statistics; the backward writes (mean, rstd) per row and
// the parameter gradients give each column one thread walking down the rows.

template <typename T>
inline float2 lf_row_stats(device const T* xr, uint n, float eps, threadgroup float* scratch,
                           uint tid, uint tg) {
  float s = 0.0f;
  for (uint i = tid; i < n; i += tg) s += float(xr[i]);
  const float mean = tg_sum(s, scratch, tid, tg) / float(n);
  float ss = 0.0f;
  for (uint i = tid; i < n; i += tg) {
    const float c = float(xr[i]) - mean;
    ss += c * c;
  }
  return float2(mean, rsqrt(tg_sum(ss, scratch, tid, tg) / float(n) + eps));
}

template <typename T>
kernel void layer_norm_fwd(device const T* x [[buffer(0)]], device const T* w [[buffer(1)]],
                           device const T* b [[buffer(2)]], constant uint& has_bias [[buffer(3)]],
                           device T* y [[buffer(4)]], constant uint& n [[buffer(5)]],
                           constant float& eps [[buffer(6)]],
                           uint row [[threadgroup_position_in_grid]],
                           uint tid [[thread_position_in_threadgroup]],
                           uint tg [[threads_per_threadgroup]]) {
  threadgroup float scratch[32];
  const size_t off = (size_t)row * n;
  const float2 st = lf_row_stats(x + off, n, eps, scratch, tid, tg);
  for (uint i = tid; i < n; i += tg) {
    const float bias = has_bias != 0 ? float(b[i]) : 0.0f;
    y[off + i] = T((float(x[off + i]) - st.x) * st.y * float(w[i]) + bias);
  }
}

template <typename T>
kernel void layer_norm_bwd(device const T* x [[buffer(0)]], device const T* w [[buffer(1)]],
                           device const T* dy [[buffer(2)]], device T* dx [[buffer(3)]],
                           device float2* stats [[buffer(4)]], constant uint& n [[buffer(5)]],
                           constant float& eps [[buffer(6)]],
                           uint row [[threadgroup_position_in_grid]],
                           uint tid [[thread_position_in_threadgroup]],
                           uint tg [[threads_per_threadgroup]]) {
  threadgroup float scratch[32];
  const size_t off = (size_t)row * n;
  const float2 st = lf_row_stats(x + off, n, eps, scratch, tid, tg);
  float sg = 0.0f, sgx = 0.0f;
  for (uint i = tid; i < n; i += tg) {
    const float g = float(dy[off + i]) * float(w[i]);
    sg += g;
    sgx += g * (float(x[off + i]) - st.x) * st.y;
  }
  const float mg = tg_sum(sg, scratch, tid, tg) / float(n);
  const float mgx = tg_sum(sgx, scratch, tid, tg) / float(n);
  if (tid == 0) stats[row] = st;
  for (uint i = tid; i < n; i += tg) {
    const float g = float(dy[off + i]) * float(w[i]);
    const float xhat = (float(x[off + i]) - st.x) * st.y;
    dx[off + i] = T(st.y * (g - mg - xhat * mgx));
  }
}

template <typename T>
kernel void layer_norm_bwd_dw(device const T* x [[buffer(0)]], device const T* dy [[buffer(1)]],
                              device const float2* stats [[buffer(2)]], device T* dw [[buffer(3)]],
                              constant uint& rows [[buffer(4)]], constant uint& n [[buffer(5)]],
                              uint c [[thread_position_in_grid]]) {
  if (c >= n) return;
  float acc = 0.0f;
  for (uint r = 0; r < rows; ++r) {
    const size_t i = (size_t)r * n + c;
    acc += float(dy[i]) * (float(x[i]) - stats[r].x) * stats[r].y;
  }
  dw[c] = T(acc);
}

template <typename T>
kernel void layer_norm_bwd_db(device const T* dy [[buffer(0)]], device T* db [[buffer(1)]],
                              constant uint& rows [[buffer(2)]], constant uint& n [[buffer(3)]],
                              uint c [[thread_position_in_grid]]) {
  if (c >= n) return;
  float acc = 0.0f;
  for (uint r = 0; r < rows; ++r) acc += float(dy[(size_t)r * n + c]);
  db[c] = T(acc);
}

LORAFUSE_INSTANTIATE(layer_norm_fwd)
LORAFUSE_INSTANTIATE(layer_norm_bwd)
LORAFUSE_INSTANTIATE(layer_norm_bwd_dw)
LORAFUSE_INSTANTIATE(layer_norm_bwd_db)
