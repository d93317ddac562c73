// CPU kernels for AVX-512 (F, BW, VL, DQ) + FMA + F16C, with 512-bit vectors (chosen at run time).
#include <cstdint>
#include <cstring>

#include "cpu_kernels.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

#if defined(__x86_64__) || defined(_M_X64)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,prefer-vector-width=512")
#define MGPO_ISA_NS avx512
#define MGPO_ISA_NAME "avx512"
#define MGPO_ISA_AVX512 1  // GCC does not define __AVX512F__ or __F16C__ under a target pragma
#define MGPO_ISA_F16C 1
#include "cpu_kernels_impl.h"
#pragma GCC pop_options

namespace mgpo {
namespace cpu {
const IsaKernels* isa_avx512() { return &avx512::kKernels; }
}  // namespace cpu
}  // namespace mgpo
#else
namespace mgpo {
namespace cpu {
const IsaKernels* isa_avx512() { return nullptr; }
}  // namespace cpu
}  // namespace mgpo
#endif
