// SwiGLU (Metal), same kernel names as swiglu.cu:
//   y = g * sigmoid(g) * u;  dgate = dy * u * s * (1 + g * (1 - s));  dup = dy * g * s
// One thread per element; the backward writes dgate to out[0..n) and dup to out[n..2n).

inline float lf_sigmoid(float g) { return 1.0f / (1.0f + exp(-g)); }

template <typename T>
kernel void swiglu_fwd(device const T* g [[buffer(0)]], device const T* u [[buffer(1)]],
                       device T* y [[buffer(2)]], constant uint& n [[buffer(3)]],
                       uint i [[thread_position_in_grid]]) {
  if (i >= n) return;
  const float gv = float(g[i]);
  y[i] = T(gv * lf_sigmoid(gv) * float(u[i]));
}

template <typename T>
kernel void swiglu_bwd(device const T* g [[buffer(0)]], device const T* u [[buffer(1)]],
                       device const T* dy [[buffer(2)]], device T* out [[buffer(3)]],
                       constant uint& n [[buffer(4)]], uint i [[thread_position_in_grid]]) {
  if (i >= n) return;
  const float gv = float(g[i]), uv = float(u[i]), dv = float(dy[i]);
  const float s = lf_sigmoid(gv);
  out[i] = T(dv * uv * s * (1.0f + gv * (1.0f - s)));
  out[n + i] = T(dv * gv * s);
}

LORAFUSE_INSTANTIATE(swiglu_fwd)
LORAFUSE_INSTANTIATE(swiglu_bwd)
