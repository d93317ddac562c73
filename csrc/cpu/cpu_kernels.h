// Interface between the torch glue (ops_cpu.cpp) and the ISA-specific CPU kernels (isa_*.cpp).
// Plain C++ only: the ISA translation units are compiled with other target options and must not include
// torch headers (an inline function compiled for AVX-512 there could be picked by the linker for everybody).
#pragma once
#include <cstdint>
#include <type_traits>

#include "../mgpo_math.h"
#include "../plan_tensor.h"

namespace mgpo {
namespace cpu {

// Elements per chunk: the unit of parallel work and of the deterministic partial sums.
constexpr int64_t kChunk = 16384;

struct Chunk {
  int64_t start;  // first element inside the tensor
  int64_t len;
  int32_t tensor;
};

// Pass 2's view of a tensor: the plan's pointers and its coefficients.
struct UpdTensor : PlanTensor {
  AdamCoefs k;
};

struct IsaKernels {
  const char* name;
  // partials[4*c .. 4*c+3] for every chunk c in [b, e): {gg, mg, mm, mm_nograd} in float64.
  // Pass 1 reads a tensor's m, and its g when it has one (then dtype is g's).
  void (*reduce)(const PlanTensor* ts, const Chunk* chunks, int64_t b, int64_t e, double* partials);
  // pass 2 for the chunks in [b, e).
  void (*update)(const UpdTensor* ts, const Chunk* chunks, int64_t b, int64_t e);
};

// Defined in isa_base.cpp / isa_avx2.cpp / isa_avx512.cpp (x86-64); nullptr where not compiled in.
const IsaKernels* isa_base();
const IsaKernels* isa_avx2();
const IsaKernels* isa_avx512();

}  // namespace cpu
}  // namespace mgpo
