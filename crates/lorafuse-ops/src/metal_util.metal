// Shared MSL helpers for the lorafuse-ops Metal kernels; prepended to every src/<op>/<op>.metal
// by metal_util.rs (Metal compiles one source string, so there is no #include).
// Design choices mirror cuda_util.cuh: arithmetic in float whatever the storage type (float,
// half, bfloat where the compiler has it), SIMD-group reductions then one value per SIMD group
// through threadgroup memory, one threadgroup per row for row-wise ops. Apple GPUs run 32-wide
// SIMD groups; the host sizes threadgroups in multiples of 32.
#include <metal_stdlib>
using namespace metal;

#if defined(__HAVE_BFLOAT__)
#define LORAFUSE_BF16 1
#endif

// Sum over the threadgroup, returned to every thread. `scratch` holds 32 floats.
inline float tg_sum(float v, threadgroup float* scratch, uint tid, uint tg_size) {
  const uint lane = tid % 32;
  const uint group = tid / 32;
  const uint n_groups = (tg_size + 31) / 32;
  v = simd_sum(v);
  if (lane == 0) scratch[group] = v;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  float r = lane < n_groups ? scratch[lane] : 0.0f;
  r = simd_sum(r);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  return r;
}

inline float tg_max(float v, threadgroup float* scratch, uint tid, uint tg_size) {
  const uint lane = tid % 32;
  const uint group = tid / 32;
  const uint n_groups = (tg_size + 31) / 32;
  v = simd_max(v);
  if (lane == 0) scratch[group] = v;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  float r = lane < n_groups ? scratch[lane] : -INFINITY;
  r = simd_max(r);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  return r;
}

// Instantiates `<name>_f32`, `<name>_f16` and (where bfloat exists) `<name>_bf16` of a kernel
// template.
#define LORAFUSE_INSTANTIATE_F(NAME, T, S) \
  template [[host_name(#NAME "_" #S)]] [[kernel]] decltype(NAME<T>) NAME<T>;
#if defined(LORAFUSE_BF16)
#define LORAFUSE_INSTANTIATE(NAME)             \
  LORAFUSE_INSTANTIATE_F(NAME, float, f32)     \
  LORAFUSE_INSTANTIATE_F(NAME, half, f16)      \
  LORAFUSE_INSTANTIATE_F(NAME, bfloat, bf16)
#else
#define LORAFUSE_INSTANTIATE(NAME)             \
  LORAFUSE_INSTANTIATE_F(NAME, float, f32)     \
  LORAFUSE_INSTANTIATE_F(NAME, half, f16)
#endif

