// AdamW (Metal), same kernel name and arithmetic order as adamw.cu, in place:
//   m = m*b1 + g*(1-b1);  v = v*b2 + (g*g)*(1-b2)
//   p = p*decay - lr * (m*inv_bc1) / (sqrt(v*inv_bc2) + eps)
// Design choices:
// - One dispatch per tensor, all in Candle's one command encoder: Metal has no cheap pointer
//   table without argument buffers, and dispatches inside an encoder cost little.
// - The library is compiled with Metal's default (fast) math, which may contract a*b + c into an
//   FMA; the division and square root use precise:: so the result stays within an ulp or two of
//   the reference (CUDA matches it exactly, see adamw.cu).

template <typename T>
kernel void adamw_fwd(device T* p [[buffer(0)]], device const T* g [[buffer(1)]],
                      device float* m [[buffer(2)]], device float* v [[buffer(3)]],
                      constant uint& n [[buffer(4)]], constant float& b1 [[buffer(5)]],
                      constant float& omb1 [[buffer(6)]], constant float& b2 [[buffer(7)]],
                      constant float& omb2 [[buffer(8)]], constant float& inv_bc1 [[buffer(9)]],
                      constant float& inv_bc2 [[buffer(10)]], constant float& eps [[buffer(11)]],
                      constant float& decay [[buffer(12)]], constant float& lr [[buffer(13)]],
                      uint i [[thread_position_in_grid]]) {
  if (i >= n) return;
  const float gi = float(g[i]);
  const float mi = m[i] * b1 + gi * omb1;
  const float vi = v[i] * b2 + (gi * gi) * omb2;
  const float update = precise::divide(mi * inv_bc1, precise::sqrt(vi * inv_bc2) + eps);
  p[i] = T(float(p[i]) * decay - update * lr);
  m[i] = mi;
  v[i] = vi;
}

LORAFUSE_INSTANTIATE(adamw_fwd)
