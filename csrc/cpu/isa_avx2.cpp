// CPU kernels for AVX2 + FMA + F16C (chosen at run time when the CPU has them).
// The system headers are included before the target pragma, so only this file's own functions (all in an
// anonymous namespace) are compiled for AVX2.
#include <cstdint>
#include <cstring>

#include "cpu_kernels.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

#if defined(__x86_64__) || defined(_M_X64)
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define MGPO_ISA_NS avx2
#define MGPO_ISA_NAME "avx2"
#define MGPO_ISA_F16C 1  // GCC does not define __F16C__ under a target pragma
#include "cpu_kernels_impl.h"
#pragma GCC pop_options

namespace mgpo {
namespace cpu {
const IsaKernels* isa_avx2() { return &avx2::kKernels; }
}  // namespace cpu
}  // namespace mgpo
#else
namespace mgpo {
namespace cpu {
const IsaKernels* isa_avx2() { return nullptr; }
}  // namespace cpu
}  // namespace mgpo
#endif
