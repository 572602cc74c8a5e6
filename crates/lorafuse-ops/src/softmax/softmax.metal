// Softmax over the last dimension (Metal), same kernel names as softmax.cu:
//   y = exp(x - max) / sum(exp(x - max));  dx = y * (dy - sum(dy * y))
// One threadgroup per row: a max pass, a sum pass, a write pass (the row stays in cache).

template <typename T>
kernel void softmax_fwd(device const T* x [[buffer(0)]], device T* y [[buffer(1)]],
                        constant uint& n [[buffer(2)]], uint row [[threadgroup_position_in_grid]],
                        uint tid [[thread_position_in_threadgroup]],
                        uint tg [[threads_per_threadgroup]]) {
  threadgroup float scratch[32];
  const size_t off = (size_t)row * n;
  float m = -INFINITY;
  for (uint i = tid; i < n; i += tg) m = max(m, float(x[off + i]));
  m = tg_max(m, scratch, tid, tg);
  float s = 0.0f;
  for (uint i = tid; i < n; i += tg) s += exp(float(x[off + i]) - m);
  const float inv = 1.0f / tg_sum(s, scratch, tid, tg);
  for (uint i = tid; i < n; i += tg) y[off + i] = T(exp(float(x[off + i]) - m) * inv);
}

template <typename T>
kernel void softmax_bwd(device const T* y [[buffer(0)]], device const T* dy [[buffer(1)]],
                        device T* dx [[buffer(2)]], constant uint& n [[buffer(3)]],
                        uint row [[threadgroup_position_in_grid]],
                        uint tid [[thread_position_in_threadgroup]],
                        uint tg [[threads_per_threadgroup]]) {
  threadgroup float scratch[32];
  const size_t off = (size_t)row * n;
  float dot = 0.0f;
  for (uint i = tid; i < n; i += tg) dot += float(y[off + i]) * float(dy[off + i]);
  dot = tg_sum(dot, scratch, tid, tg);
  for (uint i = tid; i < n; i += tg) {
    dx[off + i] = T(float(y[off + i]) * (float(dy[off + i]) - dot));
  }
}

LORAFUSE_INSTANTIATE(softmax_fwd)
LORAFUSE_INSTANTIATE(softmax_bwd)
