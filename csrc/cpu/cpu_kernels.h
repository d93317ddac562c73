// Interface between the torch glue (ops_cpu.cpp) and the ISA-specific CPU kernels (isa_*.cpp).
// Plain C++ only: the ISA translation units are compiled with other target options and must not include
// torch headers (an inline function compiled for AVX-512 there could be picked by the linker for everybody).
#pragma once
#include <cstdint>
#include <type_traits>

#include "../mgpo_math.h"

namespace mgpo {
namespace cpu {

// Elements per chunk: the unit of parallel work and of the deterministic partial sums.
constexpr int64_t kChunk = 16384;

struct Chunk {
  int64_t start;  // first element inside the tensor
  int64_t len;
  int32_t tensor;
};

struct RedTensor {
  const void* g;  // nullptr: no gradient this step (only |m|^2 into the no-grad slot)
  const float* m;
  int32_t dtype;  // DTypeCode of g
};

struct UpdTensor {
  void* p;
  const void* g;   // nullptr: no gradient (restore with the old coefficient, re-perturb with the new one)
  float* m;
  float* v;
  float* master;   // fp32 master for bf16/fp16 params, nullptr otherwise
  int32_t dtype;   // DTypeCode of p (and g)
  AdamCoefs k;
};

struct IsaKernels {
  const char* name;
  // partials[4*c .. 4*c+3] for every chunk c in [b, e): {gg, mg, mm, mm_nograd} in float64.
  void (*reduce)(const RedTensor* ts, const Chunk* chunks, int64_t b, int64_t e, double* partials);
  // pass 2 for the chunks in [b, e), visited from e-1 down to b (ops_cpu.cpp: cache reuse after pass 1).
  void (*update)(const UpdTensor* ts, const Chunk* chunks, int64_t b, int64_t e);
};

// Defined in isa_base.cpp / isa_avx2.cpp / isa_avx512.cpp (x86-64); nullptr where not compiled in.
const IsaKernels* isa_base();
const IsaKernels* isa_avx2();
const IsaKernels* isa_avx512();

}  // namespace cpu
}  // namespace mgpo
