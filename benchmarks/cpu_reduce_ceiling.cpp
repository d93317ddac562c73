// Pass 1's ceilings: the cpp backend's reduce kernel of each instruction set beside a plain fp32 dot loop over
// the same g and m.
//  - in cache (the default: 65536 elements, one thread): the compute ceiling of one core; where it is not well
//    above what the memory gives a core, pass 1 is bound by the FP ports instead of the memory.
//  - streaming (elements beyond the caches, e.g. 19988480 = LLaMA-2-7B LoRA r=8, and flush_mb > 0): each of
//    OMP_NUM_THREADS threads takes a contiguous share of the chunks, and a buffer of flush_mb MB is read before
//    every timed call, so g and m come from memory: how close the kernel's loop itself gets to a dot's bandwidth.
//
//   g++ -std=c++20 -O3 -fno-math-errno -ffp-contract=off -fopenmp -Icsrc benchmarks/cpu_reduce_ceiling.cpp \
//       csrc/cpu/isa_base.cpp csrc/cpu/isa_avx2.cpp csrc/cpu/isa_avx512.cpp -o /tmp/cpu_reduce_ceiling
//   OMP_NUM_THREADS=1 /tmp/cpu_reduce_ceiling [elements=65536] [reps=4000] [flush_mb=0]
//   OMP_NUM_THREADS=2 /tmp/cpu_reduce_ceiling 19988480 41 1024
//
// Elements in chunks of kChunk as in the extension; GB/s = 8 B/element (g and m, fp32) / median time. The ISA
// files are compiled as in setup.py (same flags), so this is the extension's own loop.
#include <omp.h>

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
  const int64_t flush_floats = (argc > 3 ? std::atoll(argv[3]) : 0) * (int64_t(1) << 20) / 4;
  std::vector<float> g(n), m(n), flush(flush_floats, 1.0f);
  for (int64_t i = 0; i < n; ++i) {
    g[i] = (float)((i * 7919) % 1000) * 1e-6f;
    m[i] = (float)((i * 104729) % 997) * 1e-7f;
  }
  std::vector<Chunk> chunks;
  for (int64_t s = 0; s < n; s += kChunk) chunks.push_back(Chunk{s, std::min(kChunk, n - s), 0});
  const int64_t nc = (int64_t)chunks.size();
  std::vector<double> partials(4 * chunks.size());
  mgpo::PlanTensor t{};
  t.g = g.data();
  t.m = m.data();
  t.numel = n;
  t.dtype = mgpo::kF32;
  __builtin_cpu_init();
  std::vector<const IsaKernels*> isas{isa_base()};
  if (isa_avx2() && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) isas.push_back(isa_avx2());
  if (isa_avx512() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    isas.push_back(isa_avx512());
  const int T = omp_get_max_threads();
  std::vector<std::vector<double>> times(isas.size() + 1);
  volatile float sink = 0.0f;
  std::vector<float> dots(T);
  for (int r = 0; r < reps; ++r) {  // interleaved: the contenders share the machine's state
    for (size_t k = 0; k <= isas.size(); ++k) {
      if (flush_floats) {
        float s = 0.0f;
#pragma omp parallel for reduction(+ : s)
        for (int64_t i = 0; i < flush_floats; i += 16) s += flush[i];
        sink = s;
      }
      const double t0 = now();
#pragma omp parallel num_threads(T)
      {
        const int id = omp_get_thread_num();
        const int64_t b = nc * id / T, e = nc * (id + 1) / T;  // a contiguous share of the chunks
        if (k < isas.size())
          isas[k]->reduce(&t, chunks.data(), b, e, partials.data());
        else if (b < e)
          dots[id] = dot_f32(g.data() + chunks[b].start, m.data() + chunks[b].start,
                             chunks[e - 1].start + chunks[e - 1].len - chunks[b].start);
      }
      times[k].push_back(now() - t0);
    }
  }
  sink = dots[0];
  (void)sink;
  std::printf("%ld fp32 elements of g and m (%.0f KiB), %d reps, %d thread(s), %s\n", (long)n, 8.0 * n / 1024, reps,
              T, flush_floats ? "a flush before every call" : "no flush");
  for (size_t k = 0; k <= isas.size(); ++k) {
    std::sort(times[k].begin(), times[k].end());
    const double med = times[k][times[k].size() / 2];
    std::printf("  %-22s %6.1f GB/s  (%.3f ms)\n",
                k < isas.size() ? (std::string("reduce [") + isas[k]->name + "]").c_str() : "fp32 dot loop",
                8.0 * n / med / 1e9, med * 1e3);
  }
  return 0;
}
