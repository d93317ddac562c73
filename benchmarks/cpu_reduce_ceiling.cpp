// Pass 1's compute ceiling on one core: the cpp backend's reduce kernel of each instruction set on g and m that
// fit in L2 (no memory bound), beside a plain fp32 dot loop over the same data. Where the ceiling is not well
// above what the memory gives a core, pass 1 is bound by the FP ports instead of the memory.
//
//   g++ -std=c++20 -O3 -fno-math-errno -ffp-contract=off -fopenmp -Icsrc benchmarks/cpu_reduce_ceiling.cpp \
//       csrc/cpu/isa_base.cpp csrc/cpu/isa_avx2.cpp csrc/cpu/isa_avx512.cpp -o /tmp/cpu_reduce_ceiling
//   OMP_NUM_THREADS=1 /tmp/cpu_reduce_ceiling [elements=65536] [reps=4000]
//
// Elements in chunks of kChunk as in the extension; GB/s = 8 B/element (g and m, fp32) / median time. The ISA
// files are compiled as in setup.py (same flags), so this is the extension's own loop.
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "cpu/cpu_kernels.h"

using namespace mgpo::cpu;

static double now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

__attribute__((noinline)) static float dot_f32(const float* __restrict__ a, const float* __restrict__ b, int64_t n) {
  float acc[32] = {};
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
#pragma omp simd
    for (int l = 0; l < 32; ++l) acc[l] += a[i + l] * b[i + l];
  }
  float s = 0.0f;
  for (int l = 0; l < 32; ++l) s += acc[l];
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

int main(int argc, char** argv) {
  const int64_t n = argc > 1 ? std::atoll(argv[1]) : 65536;
  const int reps = argc > 2 ? std::atoi(argv[2]) : 4000;
  std::vector<float> g(n), m(n);
  for (int64_t i = 0; i < n; ++i) {
    g[i] = (float)((i * 7919) % 1000) * 1e-6f;
    m[i] = (float)((i * 104729) % 997) * 1e-7f;
  }
  std::vector<Chunk> chunks;
  for (int64_t s = 0; s < n; s += kChunk) chunks.push_back(Chunk{s, std::min(kChunk, n - s), 0});
  std::vector<double> partials(4 * chunks.size());
  const RedTensor t{g.data(), m.data(), mgpo::kF32};
  __builtin_cpu_init();
  std::vector<const IsaKernels*> isas{isa_base()};
  if (isa_avx2() && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) isas.push_back(isa_avx2());
  if (isa_avx512() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    isas.push_back(isa_avx512());
  std::vector<std::vector<double>> times(isas.size() + 1);
  volatile float sink = 0.0f;
  for (int r = 0; r < reps; ++r) {  // interleaved: the contenders share the machine's state
    for (size_t k = 0; k <= isas.size(); ++k) {
      const double t0 = now();
      if (k < isas.size())
        isas[k]->reduce(&t, chunks.data(), 0, (int64_t)chunks.size(), partials.data());
      else
        sink = dot_f32(g.data(), m.data(), n);
      times[k].push_back(now() - t0);
    }
  }
  (void)sink;
  std::printf("%ld fp32 elements of g and m (%.0f KiB), %d reps, one thread\n", (long)n, 8.0 * n / 1024, reps);
  for (size_t k = 0; k <= isas.size(); ++k) {
    std::sort(times[k].begin(), times[k].end());
    const double med = times[k][times[k].size() / 2];
    std::printf("  %-22s %6.1f GB/s\n", k < isas.size() ? (std::string("reduce [") + isas[k]->name + "]").c_str()
                                                          : "fp32 dot loop", 8.0 * n / med / 1e9);
  }
  return 0;
}
