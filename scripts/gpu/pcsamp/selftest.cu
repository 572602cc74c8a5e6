// pcsamp-selftest: a small CUDA program to check libpcsamp.so on the GPU machine.
//
// It launches three kernels many times, each with a recognisable stall profile:
//   pcsamp_selftest_fma     dependent FMA chains (expect "wait" / math-pipe stalls), sm_90 SASS
//   pcsamp_selftest_shared  shared-memory tree reductions (expect "barrier" / short scoreboard), sm_90 SASS
//   pcsamp_selftest_chase   pointer chasing through 64 MiB (expect "long_scoreboard"); this one is
//                           embedded as PTX and loaded with cuModuleLoadData, so the driver JIT-compiles
//                           it, as it does for our Rust binaries' kernels.
// Usage: pcsamp-selftest [iterations=300]
// build.sh compiles this file twice: with -DPCSAMP_PTX_ONLY -ptx for the JIT kernel's PTX, then the
// program itself (which embeds that PTX from selftest_jit_ptx.h).
#include <cuda.h>
#include <cuda_runtime.h>

extern "C" __global__ void pcsamp_selftest_chase(const int* __restrict__ next, float* __restrict__ out, int n,
                                                 int hops) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  int p = (int)(((long long)i * 2654435761LL) & 0x7fffffff) % n;
  int acc = 0;
  for (int h = 0; h < hops; ++h) {
    p = next[p];
    acc += p & 7;
  }
  out[i] = (float)acc;
}

#ifndef PCSAMP_PTX_ONLY
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>

#include <chrono>
#include <vector>

#include "selftest_jit_ptx.h"

extern "C" __global__ void pcsamp_selftest_fma(float* __restrict__ out, int n, int iters) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  float a = i * 1e-6f, b = 1.0f - a, c = 0.5f * a;
  for (int k = 0; k < iters; ++k) {
    a = fmaf(a, 0.99991f, b);
    b = fmaf(b, 1.00003f, c);
    c = fmaf(c, 0.99997f, a);
  }
  out[i] = a + b + c;
}

extern "C" __global__ void pcsamp_selftest_shared(const float* __restrict__ in, float* __restrict__ out, int n,
                                                  int rounds) {
  __shared__ float s[256];
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  float v = i < n ? in[i] : 0.f;
  for (int r = 0; r < rounds; ++r) {
    s[threadIdx.x] = v + r;
    __syncthreads();
    for (int w = blockDim.x / 2; w > 0; w >>= 1) {
      if (threadIdx.x < w) s[threadIdx.x] += s[threadIdx.x + w];
      __syncthreads();
    }
    v += s[(threadIdx.x * 7) & 255] * 1e-3f;
    __syncthreads();
  }
  if (i < n) out[i] = v;
}

#define CK(x)                                                                                   \
  do {                                                                                          \
    cudaError_t e_ = (x);                                                                       \
    if (e_ != cudaSuccess) {                                                                    \
      fprintf(stderr, "selftest: %s failed: %s\n", #x, cudaGetErrorString(e_));                 \
      return 1;                                                                                 \
    }                                                                                           \
  } while (0)
#define CKD(x)                                                                                  \
  do {                                                                                          \
    CUresult e_ = (x);                                                                          \
    if (e_ != CUDA_SUCCESS) {                                                                   \
      fprintf(stderr, "selftest: %s failed: CUresult %d\n", #x, (int)e_);                       \
      return 1;                                                                                 \
    }                                                                                           \
  } while (0)

typedef CUresult (*PFN_LoadData)(CUmodule*, const void*);
typedef CUresult (*PFN_GetFunction)(CUfunction*, CUmodule, const char*);
typedef CUresult (*PFN_LaunchKernel)(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned,
                                     unsigned, CUstream, void**, void**);
typedef CUresult (*PFN_Unload)(CUmodule);

int main(int argc, char** argv) {
  int iters = argc > 1 ? atoi(argv[1]) : 300;
  if (iters < 1) iters = 1;
  const int n = 1 << 20;                // fma / shared threads
  const int chaseN = 16 << 20;          // 64 MiB of indices: larger than L2
  const int chaseThreads = 1 << 16, hops = 256;

  CK(cudaSetDevice(0));
  CK(cudaFree(0));  // creates and makes current the primary context
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  printf("selftest: %s (sm_%d%d, %d SMs), %d iterations\n", prop.name, prop.major, prop.minor,
         prop.multiProcessorCount, iters);

  // a random single cycle for the pointer chase
  std::vector<int> perm(chaseN), next(chaseN);
  for (int i = 0; i < chaseN; ++i) perm[i] = i;
  unsigned long long st = 88172645463325252ull;
  for (int i = chaseN - 1; i > 0; --i) {
    st ^= st << 13; st ^= st >> 7; st ^= st << 17;
    int j = (int)(st % (unsigned long long)(i + 1));
    int t = perm[i]; perm[i] = perm[j]; perm[j] = t;
  }
  for (int i = 0; i < chaseN; ++i) next[perm[i]] = perm[(i + 1) % chaseN];

  float *dIn, *dOut, *dOut2, *dOut3;
  int* dNext;
  CK(cudaMalloc(&dIn, n * sizeof(float)));
  CK(cudaMalloc(&dOut, n * sizeof(float)));
  CK(cudaMalloc(&dOut2, n * sizeof(float)));
  CK(cudaMalloc(&dOut3, chaseThreads * sizeof(float)));
  CK(cudaMalloc(&dNext, (size_t)chaseN * sizeof(int)));
  CK(cudaMemcpy(dNext, next.data(), (size_t)chaseN * sizeof(int), cudaMemcpyHostToDevice));
  CK(cudaMemset(dIn, 0, n * sizeof(float)));

  // the JIT path: PTX through the driver API (libcuda is already loaded by the runtime)
  void* libcuda = dlopen("libcuda.so.1", RTLD_NOW | RTLD_GLOBAL);
  if (!libcuda) {
    fprintf(stderr, "selftest: dlopen(libcuda.so.1): %s\n", dlerror());
    return 1;
  }
  PFN_LoadData loadData = (PFN_LoadData)dlsym(libcuda, "cuModuleLoadData");
  PFN_GetFunction getFunction = (PFN_GetFunction)dlsym(libcuda, "cuModuleGetFunction");
  PFN_LaunchKernel launchKernel = (PFN_LaunchKernel)dlsym(libcuda, "cuLaunchKernel");
  PFN_Unload unload = (PFN_Unload)dlsym(libcuda, "cuModuleUnload");
  if (!loadData || !getFunction || !launchKernel || !unload) {
    fprintf(stderr, "selftest: missing driver entry points\n");
    return 1;
  }
  CUmodule mod;
  CUfunction chase;
  CKD(loadData(&mod, kJitPtx));
  CKD(getFunction(&chase, mod, "pcsamp_selftest_chase"));

  auto t0 = std::chrono::steady_clock::now();
  for (int it = 0; it < iters; ++it) {
    pcsamp_selftest_fma<<<n / 256, 256>>>(dOut, n, 2048);
    pcsamp_selftest_shared<<<n / 256, 256>>>(dIn, dOut2, n, 8);
    int cn = chaseThreads, ch = hops;
    void* args[] = {&dNext, &dOut3, &cn, &ch};
    CKD(launchKernel(chase, chaseThreads / 256, 1, 1, 256, 1, 1, 0, 0, args, nullptr));
  }
  CK(cudaGetLastError());
  CK(cudaDeviceSynchronize());
  double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();

  float h[4];
  CK(cudaMemcpy(h, dOut, sizeof h, cudaMemcpyDeviceToHost));
  float h3[2];
  CK(cudaMemcpy(h3, dOut3, sizeof h3, cudaMemcpyDeviceToHost));
  printf("selftest: %d x 3 kernels in %.1f ms (%.3f ms per iteration); checksums %g %g\n", iters, ms, ms / iters,
         h[1], h3[1]);
  CKD(unload(mod));
  cudaFree(dIn); cudaFree(dOut); cudaFree(dOut2); cudaFree(dOut3); cudaFree(dNext);
  printf("selftest: OK\n");
  return 0;
}
#endif
