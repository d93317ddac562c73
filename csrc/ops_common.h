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
  TORCH_CHECK(t.layout() == at::kStrided, "mgpo: ", what, " of tensor ", i, " has layout ", t.layout(),
              ": sparse and other non-strided tensors are not supported");
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

// Everything pass 2 will need of the tensors, checked before the scalar stage modifies any state (so an error
// leaves parameters, moments, step counts and the global state as they were).
inline void check_step_args(at::TensorList params, const OptTensorList& grads, at::TensorList exp_avgs,
                            at::TensorList exp_avg_sqs, at::TensorList masters, at::IntArrayRef master_index,
                            at::TensorList steps) {
  const size_t n = params.size();
  TORCH_CHECK(n > 0, "mgpo: no tensors");
  TORCH_CHECK(grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n && master_index.size() == n &&
                  steps.size() == n,
              "mgpo: params, grads, exp_avgs, exp_avg_sqs, master_index and steps must have the same length");
  const at::Device dev = params[0].device();
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    TORCH_CHECK(p.device() == dev, "mgpo: tensor ", i, " is on ", p.device(), ", tensor 0 on ", dev);
    dtype_code(p.scalar_type());
    check_same_layout(p, p, "param", i);
    check_state(exp_avgs[i], p, "exp_avg", i);
    check_state(exp_avg_sqs[i], p, "exp_avg_sq", i);
    if (master_index[i] >= 0) {
      TORCH_CHECK(master_index[i] < (int64_t)masters.size(), "mgpo: master_index[", i, "] = ", master_index[i],
                  " is outside the masters list (", masters.size(), " tensors)");
      check_state(masters[master_index[i]], p, "master_param", i);
    }
    if (auto g = opt_at(grads, i)) {
      TORCH_CHECK(g->scalar_type() == p.scalar_type(), "mgpo: grad of tensor ", i, " has dtype ", g->scalar_type(),
                  ", its parameter ", p.scalar_type());
      check_same_layout(*g, p, "grad", i);
      const at::Tensor& st = steps[i];
      TORCH_CHECK(st.numel() == 1 && st.device() == dev && st.scalar_type() == at::kFloat, "mgpo: step of tensor ",
                  i, " must be a one-element float32 tensor on ", dev, ", got ", st.scalar_type(), " ", st.sizes(),
                  " on ", st.device());
    }
  }
}

inline ScalarConfig make_scalar_config(double rho, double ema_beta, bool adaptive_norm, double sign,
                                       std::optional<double> max_grad_norm, bool perturbed, double gbar_floor) {
  ScalarConfig cfg;
  cfg.rho = rho;
  cfg.ema_beta = ema_beta;
  cfg.sign = sign;
  cfg.has_max_grad_norm = max_grad_norm.has_value() ? 1 : 0;
  cfg.max_grad_norm = max_grad_norm.has_value() ? *max_grad_norm : 0.0;
  cfg.adaptive_norm = adaptive_norm ? 1 : 0;
  cfg.perturbed = perturbed ? 1 : 0;
  cfg.gbar_floor = gbar_floor;
  return cfg;
}

// The fused step (no reduce_hook): one call from Python, the three stages of the backend in a row. Each device
// registers step_op<its reduce, scalar stage, update> as its "step" kernel.
template <auto reduce, auto scalar, auto update>
at::Tensor step_op(at::TensorList params, const OptTensorList& grads, at::TensorList exp_avgs,
                   at::TensorList exp_avg_sqs, at::TensorList masters, at::IntArrayRef master_index,
                   at::TensorList steps, at::IntArrayRef group_index, at::ArrayRef<double> lrs,
                   const OptTensorList& lr_tensors, at::ArrayRef<double> beta1s, at::ArrayRef<double> beta2s,
                   at::ArrayRef<double> epss, at::ArrayRef<double> wds, const at::Tensor& gstep,
                   const at::Tensor& gbar, const at::Tensor& coef, const at::Tensor& skipped,
                   const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                   double rho, double ema_beta, bool adaptive_norm, double sign,
                   std::optional<double> max_grad_norm, bool perturbed, double gbar_floor) {
  check_step_args(params, grads, exp_avgs, exp_avg_sqs, masters, master_index, steps);
  at::Tensor sums = reduce(grads, exp_avgs, group_index, (int64_t)lrs.size());
  std::vector<at::Tensor> with_grad;
  with_grad.reserve(steps.size());
  for (size_t i = 0; i < steps.size(); ++i)
    if (opt_at(grads, i)) with_grad.push_back(steps[i]);
  const at::Tensor scal = scalar(sums, beta1s, gstep, gbar, coef, skipped, with_grad, grad_scale, found_inf, rho,
                                 ema_beta, adaptive_norm, sign, max_grad_norm, perturbed, gbar_floor);
  update(params, grads, exp_avgs, exp_avg_sqs, masters, master_index, steps, scal, group_index, lrs, lr_tensors,
         beta1s, beta2s, epss, wds);
  return sums;
}

inline void check_step_op(at::TensorList params, const OptTensorList& grads, at::TensorList exp_avgs,
                          at::TensorList exp_avg_sqs, at::TensorList masters, at::IntArrayRef master_index,
                          at::TensorList steps) {
  check_step_args(params, grads, exp_avgs, exp_avg_sqs, masters, master_index, steps);
}

}  // namespace mgpo
