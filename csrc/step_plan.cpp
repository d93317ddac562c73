// make_plan: every check of a step's arguments, in one place and once per step, for both devices.
#include "step_plan.h"

#include <string>

namespace mgpo {
namespace {

int dtype_code(at::ScalarType t) {
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

std::optional<at::Tensor> opt_at(const OptTensorList& l, size_t i) {
  const std::optional<at::Tensor> t = l.get(i);
  if (t.has_value() && t->defined()) return t;
  return std::nullopt;
}

// Element i of an optional-tensor list without copying it (a copy writes the tensor's reference count, which
// with 448 gradients was an eighth of a step's host time): nullptr for None or an undefined tensor.
const at::Tensor* tensor_at(const OptTensorList& l, size_t i) {
  const c10::IValue& v = (*(l.begin() + (std::ptrdiff_t)i)).get();
  return v.isTensor() && v.toTensor().defined() ? &v.toTensor() : nullptr;
}

// The kernels walk every tensor as flat memory from data_ptr() (storage offsets and misaligned views are
// fine). That needs dense non-overlapping tensors whose elements are in the same memory order as the
// parameter's: same strides on every dimension of size > 1.
void check_dense_param(const at::Tensor& p, size_t i) {
  TORCH_CHECK(p.layout() == at::kStrided, "mgpo: param of tensor ", i, " has layout ", p.layout(),
              ": sparse and other non-strided tensors are not supported");
  TORCH_CHECK(p.numel() <= 1 || p.is_non_overlapping_and_dense(), "mgpo: tensor ", i, " (shape ", p.sizes(),
              ", strides ", p.strides(),
              ") is not dense: the cpp backend processes parameters as flat memory; make the parameter "
              "contiguous or use backend='reference'");
}

// t is strided, of ref's shape and on ref's device (ref: a dense parameter, or its first moment, checked first);
// returns whether it also has ref's memory layout (the same strides on every dimension of size > 1).
bool check_like(const at::Tensor& t, const at::Tensor& ref, const char* what, size_t i) {
  TORCH_CHECK(t.layout() == at::kStrided, "mgpo: ", what, " of tensor ", i, " has layout ", t.layout(),
              ": sparse and other non-strided tensors are not supported");
  TORCH_CHECK(t.sizes() == ref.sizes(), "mgpo: ", what, " of tensor ", i, " has shape ", t.sizes(),
              ", expected ", ref.sizes());
  TORCH_CHECK(t.device() == ref.device(), "mgpo: ", what, " of tensor ", i, " is on ", t.device(), ", expected ",
              ref.device());
  if (ref.numel() <= 1) return true;
  for (int64_t d = 0; d < ref.dim(); ++d)
    if (ref.size(d) != 1 && t.stride(d) != ref.stride(d)) return false;
  return true;
}

float* state_ptr(const at::Tensor& t, const at::Tensor& ref, const char* what, size_t i) {
  TORCH_CHECK(t.scalar_type() == at::kFloat, "mgpo: ", what, " of tensor ", i, " must be float32, got ",
              t.scalar_type());
  TORCH_CHECK(check_like(t, ref, what, i), "mgpo: ", what, " of tensor ", i, " has strides ", t.strides(),
              " but its parameter has strides ", ref.strides(),
              ": they must share the memory layout (the cpp backend processes them as flat memory)");
  return t.data_ptr<float>();
}

// The gradient of tensor i as the kernels read it: flat memory in the order of `ref` (its parameter, or for pass
// 1 alone its first moment, which has the parameter's layout). Autograd gives a gradient its parameter's layout;
// one assigned in another (a transposed or sliced view) is copied into that layout for this call, before any
// stage runs (the copy lives in plan.keep_alive), so the kernels see the same values in the expected order.
const void* grad_ptr(const at::Tensor& g, const at::Tensor& ref, at::ScalarType param_dtype, size_t i,
                     CheckedPlan& plan) {
  TORCH_CHECK(g.scalar_type() == param_dtype, "mgpo: grad of tensor ", i, " has dtype ", g.scalar_type(),
              ", its parameter ", param_dtype);
  if (check_like(g, ref, "grad", i)) return g.data_ptr();
  plan.keep_alive.push_back(at::empty_like(ref, ref.options().dtype(param_dtype)).copy_(g));
  return plan.keep_alive.back().data_ptr();
}

// A one-element tensor the kernels read (or write) as a float32 on `dev`; `convert`: another dtype or device is
// copied (into plan.keep_alive), otherwise refused. `of` names the tensor it belongs to in a message ("" if none).
float* scalar_ptr(const at::Tensor& t, const at::Device& dev, const char* what, const char* of, int64_t i,
                  bool convert, CheckedPlan& plan) {
  TORCH_CHECK(t.numel() == 1, "mgpo: ", what, of, (i >= 0 ? std::to_string(i) : std::string()),
              " must have one element, got shape ", t.sizes());
  if (t.device() == dev && t.scalar_type() == at::kFloat) return t.data_ptr<float>();
  TORCH_CHECK(convert, "mgpo: ", what, of, (i >= 0 ? std::to_string(i) : std::string()),
              " must be a one-element float32 tensor on ", dev, ", got ", t.scalar_type(), " ", t.sizes(), " on ",
              t.device());
  plan.keep_alive.push_back(t.detach().to(dev, at::kFloat).reshape({1}));
  return plan.keep_alive.back().data_ptr<float>();
}

ScalarConfig scalar_config(const double* h) {
  ScalarConfig cfg;
  cfg.rho = h[kHypRho];
  cfg.ema_beta = h[kHypEmaBeta];
  cfg.sign = h[kHypSign];
  cfg.has_max_grad_norm = h[kHypHasMaxGradNorm] != 0.0 ? 1 : 0;
  cfg.max_grad_norm = h[kHypMaxGradNorm];
  cfg.adaptive_norm = h[kHypAdaptiveNorm] != 0.0 ? 1 : 0;
  cfg.perturbed = h[kHypPerturbed] != 0.0 ? 1 : 0;
  cfg.gbar_floor = h[kHypGbarFloor];
  return cfg;
}

// params/exp_avgs/masters of tensor i, and the group index: what a step and perturb() both need.
PlanTensor base_tensor(const at::Tensor& p, const at::Tensor& m, at::TensorList masters,
                       at::IntArrayRef master_index, size_t i, const at::Device& dev) {
  TORCH_CHECK(p.device() == dev, "mgpo: tensor ", i, " is on ", p.device(), ", tensor 0 on ", dev);
  PlanTensor t{};
  t.dtype = dtype_code(p.scalar_type());
  check_dense_param(p, i);
  t.p = p.data_ptr();
  t.m = state_ptr(m, p, "exp_avg", i);
  t.numel = p.numel();
  const int64_t mi = master_index[i];
  if (mi >= 0) {
    TORCH_CHECK(mi < (int64_t)masters.size(), "mgpo: master_index[", i, "] = ", mi,
                " is outside the masters list (", masters.size(), " tensors)");
    t.master = state_ptr(masters[mi], p, "master_param", i);
  }
  return t;
}

// Pass 1's view of tensor i: m dense (float32), g (if any) in m's layout; nothing it does not read.
PlanTensor reduce_tensor(const at::Tensor& p, const at::Tensor* g, const at::Tensor& m, size_t i,
                         const at::Device& dev, CheckedPlan& plan) {
  TORCH_CHECK(m.device() == dev, "mgpo: exp_avg of tensor ", i, " is on ", m.device(), ", tensor 0 on ", dev);
  TORCH_CHECK(m.scalar_type() == at::kFloat, "mgpo: exp_avg of tensor ", i, " must be float32, got ",
              m.scalar_type());
  check_dense_param(m, i);
  PlanTensor t{};
  t.m = m.data_ptr<float>();
  t.numel = m.numel();
  t.dtype = kF32;
  if (g) {
    t.g = grad_ptr(*g, m, p.scalar_type(), i, plan);
    t.dtype = dtype_code(g->scalar_type());
  }
  return t;
}

// The checks below read a few fields of each tensor's TensorImpl and StorageImpl; after a step's streaming passes
// those are out of cache, and one tensor's checks are too long for the CPU to overlap the misses of the next ones.
// So the loop asks for them ahead: the TensorImpls kAhead tensors ahead, their StorageImpls (whose address is in
// the TensorImpl, fetched by then) kAhead/2 tensors ahead.  A prefetch never faults and changes nothing.
constexpr size_t kAhead = 8;

inline void prefetch_impl(const at::Tensor& t) {
  const char* p = reinterpret_cast<const char*>(t.unsafeGetTensorImpl());
  __builtin_prefetch(p);
  __builtin_prefetch(p + 64);
  __builtin_prefetch(p + 128);
  __builtin_prefetch(p + 192);
}

inline void prefetch_storage(const at::Tensor& t) {
  if (!t.defined() || !t.unsafeGetTensorImpl()->has_storage()) return;
  const char* s = reinterpret_cast<const char*>(t.unsafeGetTensorImpl()->unsafe_storage().unsafeGetStorageImpl());
  __builtin_prefetch(s);
  __builtin_prefetch(s + 64);
}

// f(t) for each tensor of entry j that a step's checks read: for pass 1 alone (kReduce) the gradient and the
// first moment, for the step also the parameter, second moment and step count.
template <typename F>
void for_checked(size_t j, PlanUse use, at::TensorList params, const OptTensorList& grads, at::TensorList exp_avgs,
                 at::TensorList exp_avg_sqs, at::TensorList steps, const F& f) {
  f(exp_avgs[j]);
  if (const at::Tensor* g = tensor_at(grads, j)) f(*g);
  if (use == PlanUse::kStep) {
    f(params[j]);
    f(exp_avg_sqs[j]);
    f(steps[j]);
  }
}

// Before checking entry i: the TensorImpls of entry i + kAhead and the StorageImpls of entry i + kAhead/2.
void prefetch_ahead(size_t i, size_t n, PlanUse use, at::TensorList params, const OptTensorList& grads,
                    at::TensorList exp_avgs, at::TensorList exp_avg_sqs, at::TensorList steps) {
  if (i + kAhead < n) for_checked(i + kAhead, use, params, grads, exp_avgs, exp_avg_sqs, steps, prefetch_impl);
  if (i + kAhead / 2 < n)
    for_checked(i + kAhead / 2, use, params, grads, exp_avgs, exp_avg_sqs, steps, prefetch_storage);
}

}  // namespace

CheckedPlan make_plan(MGPO_PLAN_PARAMS, PlanUse use) {
  const size_t n = params.size();
  TORCH_CHECK(n > 0, "mgpo: no tensors");
  TORCH_CHECK(grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n && master_index.size() == n &&
                  steps.size() == n,
              "mgpo: params, grads, exp_avgs, exp_avg_sqs, master_index and steps must have the same length");
  const int64_t G = (int64_t)group_sizes.size();
  TORCH_CHECK((int64_t)lr_tensors.size() == G, "mgpo: ", lr_tensors.size(), " lr_tensors for ", G, " groups");
  TORCH_CHECK(hyper.device().is_cpu() && hyper.scalar_type() == at::kDouble && hyper.is_contiguous() &&
                  hyper.numel() == kHyperOptions + kHyperPerGroup * G,
              "mgpo: hyper must be a contiguous float64 CPU tensor of ", kHyperOptions, " + ", kHyperPerGroup, " * ",
              G, " values, got ", hyper.scalar_type(), " ", hyper.sizes(), " on ", hyper.device());
  TORCH_CHECK(gstate.size() == 4, "mgpo: gstate must be [step, gbar, coef, skipped], got ", gstate.size(),
              " tensors");

  CheckedPlan plan;
  const at::Device dev = params[0].device();
  plan.device = dev;
  const double* h = hyper.data_ptr<double>();
  plan.cfg = scalar_config(h);
  plan.groups.resize(G);
  plan.beta1s.resize(G);
  int64_t listed = 0;
  for (int64_t k = 0; k < G; ++k) {
    TORCH_CHECK(group_sizes[k] >= 0, "mgpo: group_sizes[", k, "] = ", group_sizes[k], " is negative");
    listed += group_sizes[k];
    const double* row = h + kHyperOptions + kHyperPerGroup * k;
    PlanGroup& gr = plan.groups[k];
    gr = PlanGroup{};
    gr.lr = (float)row[kHypLr];
    gr.beta1 = row[kHypBeta1];
    gr.beta2 = row[kHypBeta2];
    gr.eps = row[kHypEps];
    gr.weight_decay = row[kHypWeightDecay];
    plan.beta1s[k] = gr.beta1;
    if (auto lt = opt_at(lr_tensors, k)) {
      TORCH_CHECK(lt->numel() == 1, "mgpo: the lr tensor of group ", k, " must have one element, got shape ",
                  lt->sizes());
      if (lt->device().is_cpu() && !dev.is_cpu())
        gr.lr = lt->item<float>();  // a CPU tensor: reading it does not synchronise the device
      else
        gr.lr_ptr = scalar_ptr(*lt, dev, "the lr tensor", " of group ", k, /*convert=*/true, plan);
    }
  }
  TORCH_CHECK(listed == (int64_t)n, "mgpo: group_sizes add up to ", listed, " tensors, ", n, " are given");

  plan.gstep = scalar_ptr(gstate[0], dev, "gstate.step", "", -1, false, plan);
  plan.gbar = scalar_ptr(gstate[1], dev, "gstate.gbar", "", -1, false, plan);
  plan.coef = scalar_ptr(gstate[2], dev, "gstate.coef", "", -1, false, plan);
  const at::Tensor& sk = gstate[3];
  TORCH_CHECK(sk.device() == dev && sk.scalar_type() == at::kLong && sk.numel() == 1,
              "mgpo: gstate.skipped must be a one-element int64 tensor on ", dev, ", got ", sk.scalar_type(), " ",
              sk.sizes(), " on ", sk.device());
  plan.skipped = sk.data_ptr<int64_t>();
  if (grad_scale.has_value() && grad_scale->defined())
    plan.grad_scale = scalar_ptr(*grad_scale, dev, "grad_scale", "", -1, true, plan);
  if (found_inf.has_value() && found_inf->defined())
    plan.found_inf = scalar_ptr(*found_inf, dev, "found_inf", "", -1, true, plan);

  plan.tensors.reserve(n);
  int32_t group = 0;
  int64_t group_end = G > 0 ? group_sizes[0] : 0;
  for (size_t i = 0; i < n; ++i) {
    while ((int64_t)i >= group_end) group_end += group_sizes[++group];
    prefetch_ahead(i, n, use, params, grads, exp_avgs, exp_avg_sqs, steps);
    const at::Tensor& p = params[i];
    if (use == PlanUse::kReduce) {
      plan.tensors.push_back(reduce_tensor(p, tensor_at(grads, i), exp_avgs[i], i, dev, plan));
      plan.tensors.back().group = group;
      continue;
    }
    PlanTensor t = base_tensor(p, exp_avgs[i], masters, master_index, i, dev);
    t.v = state_ptr(exp_avg_sqs[i], p, "exp_avg_sq", i);
    t.group = group;
    if (const at::Tensor* g = tensor_at(grads, i)) {
      t.g = grad_ptr(*g, p, p.scalar_type(), i, plan);
      t.step = scalar_ptr(steps[i], dev, "step", " of tensor ", (int64_t)i, false, plan);
      plan.steps_with_grad.push_back(t.step);
    }
    plan.tensors.push_back(t);
  }
  return plan;
}

CheckedPlan make_perturb_plan(at::TensorList params, at::TensorList exp_avgs, at::TensorList masters,
                           at::IntArrayRef master_index) {
  const size_t n = params.size();
  TORCH_CHECK(n > 0, "mgpo: no tensors");
  TORCH_CHECK(exp_avgs.size() == n && master_index.size() == n,
              "mgpo: params, exp_avgs and master_index must have the same length");
  CheckedPlan plan;
  const at::Device dev = params[0].device();
  plan.device = dev;
  plan.groups.resize(1);  // no gradient: the hyper-parameters are not used
  plan.groups[0] = PlanGroup{nullptr, 0.9, 0.999, 1e-8, 0.0, 0.0f, 0.0f};
  plan.beta1s.assign(1, 0.9);
  plan.tensors.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    PlanTensor t = base_tensor(params[i], exp_avgs[i], masters, master_index, i, dev);
    t.v = t.m;  // not read without a gradient
    t.group = 0;
    plan.tensors.push_back(t);
  }
  return plan;
}

void check_sums(const CheckedPlan& plan, const at::Tensor& sums) {
  const int64_t G = (int64_t)plan.groups.size();
  TORCH_CHECK(sums.device() == plan.device && sums.scalar_type() == at::kDouble && sums.is_contiguous() &&
                  sums.numel() == kSumsPerGroup * G,
              "mgpo: sums must be a contiguous float64 tensor of 4 * ", G, " elements on ", plan.device, ", got ",
              sums.scalar_type(), " ", sums.sizes(), " on ", sums.device());
}

}  // namespace mgpo
