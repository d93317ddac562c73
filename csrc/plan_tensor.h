// One tensor of the step plan (step_plan.h): plain data, so the CPU instruction-set kernels, compiled without
// torch headers, take the plan's own table.
#pragma once
#include <cstdint>

namespace mgpo {

struct PlanTensor {
  void* p;
  const void* g;   // nullptr: no gradient this step
  float* m;
  float* v;
  float* master;   // fp32 master of a bf16/fp16 parameter, nullptr otherwise
  float* step;     // the step count (tensors with a gradient only), nullptr otherwise
  int64_t numel;
  int32_t group;
  int32_t dtype;   // DTypeCode of p (and g)
};

}  // namespace mgpo
