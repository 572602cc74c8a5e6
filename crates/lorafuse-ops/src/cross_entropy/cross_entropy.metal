// Cross-entropy (Metal), same kernel names and design as cross_entropy.cu: one threadgroup per
// row, an online (max, rescaled sum) per thread so the forward reads each row once, per-row loss
// and lse (f32) for a fixed-order one-threadgroup reduction, and a backward that writes
// (softmax - onehot) * coef in the logits' type. Targets are i64; `ignore` is the ignore index
// (it fits 32 bits: the host checks). An out-of-range target gives its row a NaN loss.

template <typename T>
kernel void cross_entropy_fwd(device const T* logits [[buffer(0)]],
                              device const long* targets [[buffer(1)]],
                              device float* loss [[buffer(2)]], device float* lse [[buffer(3)]],
                              constant uint& V [[buffer(4)]], constant int& ignore [[buffer(5)]],
                              uint row [[threadgroup_position_in_grid]],
                              uint tid [[thread_position_in_threadgroup]],
                              uint tg [[threads_per_threadgroup]]) {
  threadgroup float scratch[32];
  const long t = targets[row];
  if (t == (long)ignore) {
    if (tid == 0) {
      loss[row] = 0.0f;
      lse[row] = 0.0f;
    }
    return;
  }
  const size_t off = (size_t)row * V;
  float m = -INFINITY, s = 0.0f;
  for (uint j = tid; j < V; j += tg) {
    const float v = float(logits[off + j]);
    if (v > m) {
      s = s * exp(m - v) + 1.0f;
      m = v;
    } else if (v > -INFINITY) {
      s += exp(v - m);
    }
  }
  const float row_max = tg_max(m, scratch, tid, tg);
  const float mine = s == 0.0f ? 0.0f : s * exp(m - row_max);
  const float l = row_max + log(tg_sum(mine, scratch, tid, tg));
  if (tid == 0) {
    const bool ok = t >= 0 && t < (long)V;
    loss[row] = ok ? l - float(logits[off + (ok ? t : 0)]) : NAN;
    lse[row] = l;
  }
}

template <typename T>
kernel void cross_entropy_bwd(device const T* logits [[buffer(0)]],
                              device const long* targets [[buffer(1)]],
                              device const float* g [[buffer(2)]],
                              device const float* lse [[buffer(3)]],
                              device const float* count [[buffer(4)]],
                              device T* dlogits [[buffer(5)]], constant uint& V [[buffer(6)]],
                              constant int& ignore [[buffer(7)]],
                              constant uint& g_per_row [[buffer(8)]],
                              constant uint& mean [[buffer(9)]],
                              uint row [[threadgroup_position_in_grid]],
                              uint tid [[thread_position_in_threadgroup]],
                              uint tg [[threads_per_threadgroup]]) {
  const long t = targets[row];
  const size_t off = (size_t)row * V;
  if (t == (long)ignore) {
    for (uint j = tid; j < V; j += tg) dlogits[off + j] = T(0.0f);
    return;
  }
  float coef = g_per_row != 0 ? g[row] : g[0];
  if (mean != 0) coef /= max(count[0], 1.0f);
  const float l = lse[row];
  for (uint j = tid; j < V; j += tg) {
    const float d = exp(float(logits[off + j]) - l) - ((long)j == t ? 1.0f : 0.0f);
    dlogits[off + j] = T(d * coef);
  }
}

// One threadgroup: out = sum of losses (over max(count, 1) when `mean`), count_out = rows counted.
kernel void cross_entropy_fwd_reduce(device const float* loss [[buffer(0)]],
                                     device const long* targets [[buffer(1)]],
                                     device float* out [[buffer(2)]],
                                     device float* count_out [[buffer(3)]],
                                     constant uint& n [[buffer(4)]],
                                     constant int& ignore [[buffer(5)]],
                                     constant uint& mean [[buffer(6)]],
                                     uint tid [[thread_position_in_threadgroup]],
                                     uint tg [[threads_per_threadgroup]]) {
  threadgroup float scratch[32];
  float s = 0.0f, c = 0.0f;
  for (uint i = tid; i < n; i += tg) {
    if (targets[i] != (long)ignore) {
      s += loss[i];
      c += 1.0f;
    }
  }
  s = tg_sum(s, scratch, tid, tg);
  c = tg_sum(c, scratch, tid, tg);
  if (tid == 0) {
    out[0] = mean != 0 ? s / max(c, 1.0f) : s;
    count_out[0] = c;
  }
}

LORAFUSE_INSTANTIATE(cross_entropy_fwd)
LORAFUSE_INSTANTIATE(cross_entropy_bwd)
