// CPU kernels for the baseline instruction set of the compiler's target (x86-64: SSE2).
#define MGPO_ISA_NS base
#define MGPO_ISA_NAME "base"
#include "cpu_kernels_impl.h"

namespace mgpo {
namespace cpu {
const IsaKernels* isa_base() { return &base::kKernels; }
}  // namespace cpu
}  // namespace mgpo
