// RoPE (Metal), same kernel names as rope.cu: one thread per rotated pair; rope_bwd_* rotates by
// the opposite angle (the gradient of a rotation is its inverse).
//   (x1, x2) -> (x1 * cos - x2 * sin, x2 * cos + x1 * sin)

template <typename T>
inline void lf_rope(device const T* x, device const T* cos_t, device const T* sin_t, device T* y,
                    uint t, uint d, uint n_pairs, uint interleaved, float sign, uint p) {
  if (p >= n_pairs) return;
  const uint half_d = d / 2;
  const uint row = p / half_d;
  const uint i = p - row * half_d;
  const uint pos = row % t;
  const size_t base = (size_t)row * d;
  const size_t i1 = interleaved != 0 ? base + 2 * i : base + i;
  const size_t i2 = interleaved != 0 ? i1 + 1 : i1 + half_d;
  const float c = float(cos_t[pos * half_d + i]);
  const float s = sign * float(sin_t[pos * half_d + i]);
  const float x1 = float(x[i1]), x2 = float(x[i2]);
  y[i1] = T(x1 * c - x2 * s);
  y[i2] = T(x2 * c + x1 * s);
}

template <typename T>
kernel void rope_fwd(device const T* x [[buffer(0)]], device const T* cos_t [[buffer(1)]],
                     device const T* sin_t [[buffer(2)]], device T* y [[buffer(3)]],
                     constant uint& t [[buffer(4)]], constant uint& d [[buffer(5)]],
                     constant uint& n_pairs [[buffer(6)]], constant uint& interleaved [[buffer(7)]],
                     uint p [[thread_position_in_grid]]) {
  lf_rope(x, cos_t, sin_t, y, t, d, n_pairs, interleaved, 1.0f, p);
}

template <typename T>
kernel void rope_bwd(device const T* dy [[buffer(0)]], device const T* cos_t [[buffer(1)]],
                     device const T* sin_t [[buffer(2)]], device T* dx [[buffer(3)]],
                     constant uint& t [[buffer(4)]], constant uint& d [[buffer(5)]],
                     constant uint& n_pairs [[buffer(6)]], constant uint& interleaved [[buffer(7)]],
                     uint p [[thread_position_in_grid]]) {
  lf_rope(dy, cos_t, sin_t, dx, t, d, n_pairs, interleaved, -1.0f, p);
}

LORAFUSE_INSTANTIATE(rope_fwd)
LORAFUSE_INSTANTIATE(rope_bwd)
