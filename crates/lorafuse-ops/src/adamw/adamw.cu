// AdamW over many tensors in one launch, in place.
//
//   m = m*b1 + g*(1-b1);  v = v*b2 + (g*g)*(1-b2)
//   p = p*decay - lr * (m*inv_bc1) / (sqrt(v*inv_bc2) + eps)      decay = 1 - lr*wd
//
// Design choices:
// - One launch for every tensor of a dtype: the host packs each tensor's (p, g, m, v) device
//   pointers into a table; blockIdx.y picks the tensor, a grid-stride loop over x covers it. LoRA
//   training has hundreds of small tensors, so per-tensor launches would dominate the step.
// - f32 math with explicit round-to-nearest intrinsics (__fmul_rn, __fadd_rn, __fdiv_rn,
//   __fsqrt_rn): nvcc would otherwise contract a*b + c into an FMA, and the result must match
//   the CPU and the stock-Candle reference to the last bit or two. Moments are f32; parameters
//   and gradients share a dtype (f32, bf16 or f16) and are converted once per element.
#include "cuda_util.cuh"

using namespace lorafuse;

struct AdamCoeffs {
  float b1, one_minus_b1, b2, one_minus_b2, inv_bc1, inv_bc2, eps, decay, lr;
};

template <typename T>
__device__ __forceinline__ void adamw_impl(const unsigned long long* __restrict__ table,
                                           const unsigned long long* __restrict__ lens,
                                           AdamCoeffs c) {
  const int t = blockIdx.y;
  T* p = reinterpret_cast<T*>(table[4 * t]);
  const T* g = reinterpret_cast<const T*>(table[4 * t + 1]);
  float* m = reinterpret_cast<float*>(table[4 * t + 2]);
  float* v = reinterpret_cast<float*>(table[4 * t + 3]);
  const unsigned long long n = lens[t];
  for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (unsigned long long)gridDim.x * blockDim.x) {
    const float gi = to_f(g[i]);
    const float mi = __fadd_rn(__fmul_rn(m[i], c.b1), __fmul_rn(gi, c.one_minus_b1));
    const float vi = __fadd_rn(__fmul_rn(v[i], c.b2), __fmul_rn(__fmul_rn(gi, gi), c.one_minus_b2));
    const float m_hat = __fmul_rn(mi, c.inv_bc1);
    const float v_hat = __fmul_rn(vi, c.inv_bc2);
    const float update = __fdiv_rn(m_hat, __fadd_rn(__fsqrt_rn(v_hat), c.eps));
    const float pi = __fsub_rn(__fmul_rn(to_f(p[i]), c.decay), __fmul_rn(update, c.lr));
    p[i] = from_f<T>(pi);
    m[i] = mi;
    v[i] = vi;
  }
}

#define ADAMW_KERNELS(T, SUFFIX)                                                              \
  extern "C" __global__ void adamw_fwd_##SUFFIX(const unsigned long long* table,              \
                                                const unsigned long long* lens, AdamCoeffs c) { \
    adamw_impl<T>(table, lens, c);                                                            \
  }

LORAFUSE_FOR_DTYPES(ADAMW_KERNELS)
