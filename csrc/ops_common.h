// Host-side helpers shared by the CPU and CUDA glue: argument checks and dtype codes.
#pragma once
#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include <optional>
#include <vector>

#include "mgpo_math.h"

namespace mgpo {

using OptTensorList = c10::List<std::optional<at::Tensor>>;

inline int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return kF32;
    case at::kBFloat16:
      return kBF16;
    case at::kHalf:
      return kF16;
    default:
      TORCH_CHECK(false, "mgpo: parameters must be float32, bfloat16 or float16, got ", t);
  }
  return -1;
}

inline std::optional<at::Tensor> opt_at(const OptTensorList& l, size_t i) {
  const std::optional<at::Tensor> t = l.get(i);
  if (t.has_value() && t->defined()) return t;
  return std::nullopt;
}

// The kernels walk every tensor as flat memory from data_ptr() (storage offsets and misaligned views are
// fine). That needs dense non-overlapping tensors whose elements are in the same memory order as the
// parameter's: same strides on every dimension of size > 1.
inline void check_same_layout(const at::Tensor& t, const at::Tensor& ref, const char* what, size_t i) {
  TORCH_CHECK(t.sizes() == ref.sizes(), "mgpo: ", what, " of tensor ", i, " has shape ", t.sizes(),
              ", expected ", ref.sizes());
  TORCH_CHECK(t.device() == ref.device(), "mgpo: ", what, " of tensor ", i, " is on ", t.device(), ", expected ",
              ref.device());
  if (ref.numel() <= 1) return;
  TORCH_CHECK(ref.is_non_overlapping_and_dense(), "mgpo: tensor ", i, " (shape ", ref.sizes(), ", strides ",
              ref.strides(),
              ") is not dense: the cpp backend processes parameters as flat memory; make the parameter "
              "contiguous or use backend='reference'");
  for (int64_t d = 0; d < ref.dim(); ++d) {
    TORCH_CHECK(ref.size(d) == 1 || t.stride(d) == ref.stride(d), "mgpo: ", what, " of tensor ", i,
                " has strides ", t.strides(), " but its parameter has strides ", ref.strides(),
                ": they must share the memory layout (the cpp backend processes them as flat memory)");
  }
}

inline void check_state(const at::Tensor& t, const at::Tensor& ref, const char* what, size_t i) {
  TORCH_CHECK(t.scalar_type() == at::kFloat, "mgpo: ", what, " of tensor ", i, " must be float32, got ",
              t.scalar_type());
  check_same_layout(t, ref, what, i);
}

inline void check_group_index(at::IntArrayRef group_index, size_t n, int64_t num_groups) {
  TORCH_CHECK(group_index.size() == n, "mgpo: group_index has ", group_index.size(), " entries for ", n,
              " tensors");
  int64_t prev = 0;
  for (size_t i = 0; i < n; ++i) {
    const int64_t k = group_index[i];
    TORCH_CHECK(k >= 0 && k < num_groups, "mgpo: group_index[", i, "] = ", k, " is outside [0, ", num_groups, ")");
    TORCH_CHECK(k >= prev, "mgpo: group_index must be non-decreasing (tensors listed group by group)");
    prev = k;
  }
}

inline ScalarConfig make_scalar_config(double rho, double ema_beta, bool adaptive_norm, double sign,
                                       std::optional<double> max_grad_norm, bool perturbed) {
  ScalarConfig cfg;
  cfg.rho = rho;
  cfg.ema_beta = ema_beta;
  cfg.sign = sign;
  cfg.has_max_grad_norm = max_grad_norm.has_value() ? 1 : 0;
  cfg.max_grad_norm = max_grad_norm.has_value() ? *max_grad_norm : 0.0;
  cfg.adaptive_norm = adaptive_norm ? 1 : 0;
  cfg.perturbed = perturbed ? 1 : 0;
  return cfg;
}

}  // namespace mgpo
