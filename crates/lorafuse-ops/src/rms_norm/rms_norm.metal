// RMSNorm forward and backward (Metal). Same math and kernel names as rms_norm.cu:
//   y = x * rstd * w;  dx = rstd * (dy * w - x * rstd^2 * mean(dy * w * x));  dw = sum dy * x * rstd
// One threadgroup per row; the backward writes rstd per row, then rms_norm_bwd_dw_* gives each
// column one thread that walks down the rows (simple and deterministic; Metal is the
// lowest-traffic backend here, so no two-stage reduction as on CUDA).

template <typename T>
kernel void rms_norm_fwd(device const T* x [[buffer(0)]], device const T* w [[buffer(1)]],
                         device T* y [[buffer(2)]], constant uint& n [[buffer(3)]],
                         constant float& eps [[buffer(4)]],
                         uint row [[threadgroup_position_in_grid]],
                         uint tid [[thread_position_in_threadgroup]],
                         uint tg [[threads_per_threadgroup]]) {
  threadgroup float scratch[32];
  device const T* xr = x + (size_t)row * n;
  device T* yr = y + (size_t)row * n;
  float ss = 0.0f;
  for (uint i = tid; i < n; i += tg) {
    const float v = float(xr[i]);
    ss += v * v;
  }
  const float rstd = rsqrt(tg_sum(ss, scratch, tid, tg) / float(n) + eps);
  for (uint i = tid; i < n; i += tg) yr[i] = T(float(xr[i]) * rstd * float(w[i]));
}

template <typename T>
kernel void rms_norm_bwd(device const T* x [[buffer(0)]], device const T* w [[buffer(1)]],
                         device const T* dy [[buffer(2)]], device T* dx [[buffer(3)]],
                         device float* rstd_out [[buffer(4)]], constant uint& n [[buffer(5)]],
                         constant float& eps [[buffer(6)]],
                         uint row [[threadgroup_position_in_grid]],
                         uint tid [[thread_position_in_threadgroup]],
                         uint tg [[threads_per_threadgroup]]) {
  threadgroup float scratch[32];
  const size_t off = (size_t)row * n;
  float ss = 0.0f, dot = 0.0f;
  for (uint i = tid; i < n; i += tg) {
    const float xv = float(x[off + i]);
    ss += xv * xv;
    dot += float(dy[off + i]) * float(w[i]) * xv;
  }
  ss = tg_sum(ss, scratch, tid, tg);
  dot = tg_sum(dot, scratch, tid, tg);
  const float rstd = rsqrt(ss / float(n) + eps);
  const float c = rstd * rstd * dot / float(n);
  if (tid == 0) rstd_out[row] = rstd;
  for (uint i = tid; i < n; i += tg) {
    dx[off + i] = T(rstd * (float(dy[off + i]) * float(w[i]) - float(x[off + i]) * c));
  }
}

template <typename T>
kernel void rms_norm_bwd_dw(device const T* x [[buffer(0)]], device const T* dy [[buffer(1)]],
                            device const float* rstd [[buffer(2)]], device T* dw [[buffer(3)]],
                            constant uint& rows [[buffer(4)]], constant uint& n [[buffer(5)]],
                            uint c [[thread_position_in_grid]]) {
  if (c >= n) return;
  float acc = 0.0f;
  for (uint r = 0; r < rows; ++r) {
    const size_t i = (size_t)r * n + c;
    acc += float(dy[i]) * float(x[i]) * rstd[r];
  }
  dw[c] = T(acc);
}

LORAFUSE_INSTANTIATE(rms_norm_fwd)
LORAFUSE_INSTANTIATE(rms_norm_bwd)
LORAFUSE_INSTANTIATE(rms_norm_bwd_dw)
