// CPU implementations of torch.ops.mgpo.*: argument checks, the chunk list over all tensors, one
// at::parallel_for per pass over it, and the scalar stage.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "../ops_common.h"
#include "cpu_kernels.h"

namespace mgpo {
namespace cpu {

// ------------------------------------------------------------------------------------------ ISA choice
static const IsaKernels* detect_isa() {
  const char* env = std::getenv("MGPO_CPU_ISA");
  const std::string want = env ? env : "";
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  const bool has512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                      __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  const bool has2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  if (want == "base") return isa_base();
  if (want == "avx2" && has2) return isa_avx2();
  if ((want.empty() || want == "avx512") && has512) return isa_avx512();
  if (has2) return isa_avx2();
#endif
  return isa_base();
}

static std::atomic<const IsaKernels*> g_isa{nullptr};

const IsaKernels* current_isa() {
  const IsaKernels* k = g_isa.load();
  if (k == nullptr) {
    k = detect_isa();
    g_isa.store(k);
  }
  return k;
}

const char* current_isa_name() { return current_isa()->name; }

std::vector<std::string> available_isas() {
  std::vector<std::string> out{"base"};
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
    out.push_back("avx2");
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("fma") &&
      __builtin_cpu_supports("f16c"))
    out.push_back("avx512");
#endif
  return out;
}

void set_isa(const std::string& name) {
  for (const auto& n : available_isas()) {
    if (n == name) {
      const IsaKernels* k = name == "base" ? isa_base() : name == "avx2" ? isa_avx2() : isa_avx512();
      g_isa.store(k);
      return;
    }
  }
  TORCH_CHECK(false, "mgpo: CPU instruction set '", name, "' is not available here");
}

// ------------------------------------------------------------------------------------------ helpers
// Grain of at::parallel_for in chunks: below ~64K elements in all, one thread does everything.
static int64_t grain_chunks() { return std::max<int64_t>(1, (int64_t(1) << 16) / kChunk); }

// Runs fn(b, e) over [0, n) chunks on all of torch's intra-op threads, which claim ranges of chunks from a
// shared counter with guided scheduling: the first claims take 1/(2T) of what is left (long contiguous runs,
// so the hardware prefetchers stay on their streams), the last ones a single chunk (a thread that the OS
// deschedules on a busy machine does not hold the other at the barrier). Pass 1 claims ascending, pass 2
// descending, so the chunks pass 1 read last (still in L2/L3) are the first ones pass 2 reads. The results do
// not depend on who runs which chunk: partial sums are per chunk and pass 2 is element-wise.
template <typename F>
static void parallel_chunks(int64_t n, bool descending, const F& fn) {
  const int64_t nthreads = std::min<int64_t>(at::get_num_threads(), (n + grain_chunks() - 1) / grain_chunks());
  if (nthreads <= 1 || at::in_parallel_region()) {
    fn(0, n);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, nthreads, 1, [&](int64_t, int64_t) {
    int64_t b = next.load(std::memory_order_relaxed);
    for (;;) {
      const int64_t rem = n - b;
      if (rem <= 0) break;
      const int64_t size = std::max<int64_t>(1, rem / (2 * nthreads));
      if (!next.compare_exchange_weak(b, b + size, std::memory_order_relaxed)) continue;  // b reloaded
      const int64_t e = b + size;
      if (descending)
        fn(n - e, n - b);
      else
        fn(b, e);
      b = next.load(std::memory_order_relaxed);
    }
  });
}

static void add_chunks(std::vector<Chunk>& chunks, int64_t numel, int32_t tensor) {
  for (int64_t s = 0; s < numel; s += kChunk) chunks.push_back(Chunk{s, std::min(kChunk, numel - s), tensor});
}

static void check_cpu(const at::Tensor& t, const char* what, size_t i) {
  TORCH_CHECK(t.device().is_cpu(), "mgpo (cpu kernels): ", what, " of tensor ", i, " is on ", t.device());
}

static float read_float(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.numel() == 1, "mgpo: ", what, " must have one element, got shape ", t.sizes());
  TORCH_CHECK(t.device().is_cpu(), "mgpo (cpu kernels): ", what, " is on ", t.device());
  // a CPU tensor: no device synchronisation; read directly (item() goes through the dispatcher, ~1 us)
  switch (t.scalar_type()) {
    case at::kFloat:
      return *t.data_ptr<float>();
    case at::kDouble:
      return (float)*t.data_ptr<double>();
    default:
      return t.item<float>();
  }
}

// ------------------------------------------------------------------------------------------ pass 1
at::Tensor reduce_sums_cpu(const OptTensorList& grads, at::TensorList exp_avgs, at::IntArrayRef group_index,
                           int64_t num_groups) {
  const size_t n = exp_avgs.size();
  TORCH_CHECK(grads.size() == n, "mgpo: ", grads.size(), " grads for ", n, " exp_avgs");
  TORCH_CHECK(num_groups >= 0, "mgpo: num_groups must be >= 0");
  check_group_index(group_index, n, num_groups);
  std::vector<RedTensor> ts(n);
  std::vector<Chunk> chunks;
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& m = exp_avgs[i];
    check_cpu(m, "exp_avg", i);
    TORCH_CHECK(m.scalar_type() == at::kFloat, "mgpo: exp_avg of tensor ", i, " must be float32");
    if (m.numel() > 1)
      TORCH_CHECK(m.is_non_overlapping_and_dense(), "mgpo: exp_avg of tensor ", i, " is not dense");
    ts[i].m = m.data_ptr<float>();
    ts[i].g = nullptr;
    ts[i].dtype = kF32;
    if (auto g = opt_at(grads, i)) {
      check_cpu(*g, "grad", i);
      check_same_layout(*g, m, "grad", i);
      ts[i].g = g->data_ptr();
      ts[i].dtype = dtype_code(g->scalar_type());
    }
    add_chunks(chunks, m.numel(), (int32_t)i);
  }
  const int64_t nchunks = (int64_t)chunks.size();
  std::vector<double> partials((size_t)nchunks * kSumsPerGroup);
  const IsaKernels* isa = current_isa();
  parallel_chunks(nchunks, /*descending=*/false,
                  [&](int64_t b, int64_t e) { isa->reduce(ts.data(), chunks.data(), b, e, partials.data()); });
  at::Tensor sums = at::zeros({kSumsPerGroup * num_groups}, at::TensorOptions().dtype(at::kDouble));
  double* s = sums.data_ptr<double>();
  for (int64_t c = 0; c < nchunks; ++c) {  // fixed order: deterministic whatever the thread count
    double* dst = s + kSumsPerGroup * group_index[chunks[c].tensor];
    const double* src = partials.data() + kSumsPerGroup * c;
    for (int j = 0; j < kSumsPerGroup; ++j) dst[j] += src[j];
  }
  return sums;
}

// ------------------------------------------------------------------------------------------ scalar stage
static float* f32_ptr(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.numel() == 1 && t.device().is_cpu(), "mgpo: ", what,
              " must be a one-element float32 CPU tensor, got ", t.scalar_type(), " ", t.sizes(), " on ",
              t.device());
  return t.data_ptr<float>();
}

at::Tensor scalar_stage_cpu(const at::Tensor& sums, at::ArrayRef<double> beta1s, const at::Tensor& gstep,
                            const at::Tensor& gbar, const at::Tensor& coef, const at::Tensor& skipped,
                            at::TensorList steps, const std::optional<at::Tensor>& grad_scale,
                            const std::optional<at::Tensor>& found_inf, double rho, double ema_beta,
                            bool adaptive_norm, double sign, std::optional<double> max_grad_norm, bool perturbed,
                            double gbar_floor) {
  const int64_t G = (int64_t)beta1s.size();
  TORCH_CHECK(sums.device().is_cpu() && sums.scalar_type() == at::kDouble && sums.numel() == kSumsPerGroup * G,
              "mgpo: sums must be a float64 CPU tensor of 4 * ", G, " elements, got ", sums.scalar_type(), " ",
              sums.sizes());
  const at::Tensor sums_c = sums.contiguous();
  float gs = 0.0f, fi = 0.0f;
  if (grad_scale.has_value() && grad_scale->defined()) gs = read_float(*grad_scale, "grad_scale");
  if (found_inf.has_value() && found_inf->defined()) fi = read_float(*found_inf, "found_inf");
  const bool has_gs = grad_scale.has_value() && grad_scale->defined();
  const bool has_fi = found_inf.has_value() && found_inf->defined();
  float* step_p = f32_ptr(gstep, "gstate.step");
  float* gbar_p = f32_ptr(gbar, "gstate.gbar");
  float* coef_p = f32_ptr(coef, "gstate.coef");
  TORCH_CHECK(skipped.numel() == 1 && skipped.device().is_cpu(), "mgpo: gstate.skipped must be a CPU scalar");

  const ScalarConfig cfg =
      make_scalar_config(rho, ema_beta, adaptive_norm, sign, max_grad_norm, perturbed, gbar_floor);
  const ScalarResult r = mgpo_scalar_stage(sums_c.data_ptr<double>(), beta1s.data(), (int)G, cfg, *step_p,
                                           *gbar_p, *coef_p, has_gs ? &gs : nullptr, has_fi ? &fi : nullptr);
  at::Tensor scal = at::empty({kScalSize}, at::TensorOptions().dtype(at::kFloat));
  float* o = scal.data_ptr<float>();
  o[kScalC] = r.c;
  o[kScalRestore] = r.restore;
  o[kScalApply] = r.apply;
  o[kScalSkip] = r.skip ? 1.0f : 0.0f;
  if (r.skip) {
    if (skipped.scalar_type() == at::kLong)
      *skipped.data_ptr<int64_t>() += 1;
    else
      skipped.add_(1);
    return scal;
  }
  *gbar_p = r.gbar_new;
  *coef_p = r.coef_new;
  *step_p += 1.0f;
  for (size_t i = 0; i < steps.size(); ++i) {
    const at::Tensor& st = steps[i];
    check_cpu(st, "step", i);
    TORCH_CHECK(st.numel() == 1, "mgpo: step of tensor ", i, " must have one element");
    if (st.scalar_type() == at::kFloat)
      *st.data_ptr<float>() += 1.0f;
    else
      st.add_(1);
  }
  return scal;
}

// ------------------------------------------------------------------------------------------ pass 2
void update_cpu(at::TensorList params, const OptTensorList& grads, at::TensorList exp_avgs,
                at::TensorList exp_avg_sqs, at::TensorList masters, at::IntArrayRef master_index, at::TensorList steps,
                const at::Tensor& scal, at::IntArrayRef group_index, at::ArrayRef<double> lrs,
                const OptTensorList& lr_tensors, at::ArrayRef<double> beta1s, at::ArrayRef<double> beta2s,
                at::ArrayRef<double> epss, at::ArrayRef<double> wds) {
  const size_t n = params.size();
  const int64_t G = (int64_t)lrs.size();
  TORCH_CHECK(grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n && master_index.size() == n &&
                  steps.size() == n,
              "mgpo: params, grads, exp_avgs, exp_avg_sqs, master_index and steps must have the same length");
  TORCH_CHECK((int64_t)lr_tensors.size() == G && (int64_t)beta1s.size() == G && (int64_t)beta2s.size() == G &&
                  (int64_t)epss.size() == G && (int64_t)wds.size() == G,
              "mgpo: per-group hyper-parameter lists must have the same length");
  check_group_index(group_index, n, G);
  TORCH_CHECK(scal.device().is_cpu() && scal.scalar_type() == at::kFloat && scal.numel() == kScalSize,
              "mgpo: scal must be the float32 CPU tensor of scalar_stage");
  const at::Tensor scal_c = scal.contiguous();
  const float* sc = scal_c.data_ptr<float>();

  // Validate everything before anything is written.
  std::vector<float> lr_of(G);
  for (int64_t k = 0; k < G; ++k) {
    auto lt = opt_at(lr_tensors, k);
    lr_of[k] = lt ? read_float(*lt, "lr") : (float)lrs[k];
  }
  std::vector<UpdTensor> ts(n);
  std::vector<Chunk> chunks;
  AdamCoefs memo{};
  int64_t memo_group = -1;
  float memo_step = -1.0f;
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    check_cpu(p, "param", i);
    const int dt = dtype_code(p.scalar_type());
    check_state(exp_avgs[i], p, "exp_avg", i);
    check_state(exp_avg_sqs[i], p, "exp_avg_sq", i);
    check_same_layout(p, p, "param", i);
    UpdTensor& t = ts[i];
    t.p = p.data_ptr();
    t.dtype = dt;
    t.m = exp_avgs[i].data_ptr<float>();
    t.v = exp_avg_sqs[i].data_ptr<float>();
    t.g = nullptr;
    t.master = nullptr;
    if (master_index[i] >= 0) {
      TORCH_CHECK(master_index[i] < (int64_t)masters.size(), "mgpo: master_index[", i, "] = ", master_index[i],
                  " is outside the masters list (", masters.size(), " tensors)");
      const at::Tensor* ms = &masters[master_index[i]];
      check_state(*ms, p, "master_param", i);
      t.master = ms->data_ptr<float>();
    }
    const int64_t k = group_index[i];
    float step = 1.0f;
    if (auto g = opt_at(grads, i)) {
      TORCH_CHECK(g->scalar_type() == p.scalar_type(), "mgpo: grad of tensor ", i, " has dtype ",
                  g->scalar_type(), ", its parameter ", p.scalar_type());
      check_same_layout(*g, p, "grad", i);
      t.g = g->data_ptr();
      step = read_float(steps[i], "step");
    }
    if (k != memo_group || step != memo_step) {  // tensors of a group usually share their step count
      memo = mgpo_tensor_coefs(sc[kScalC], sc[kScalRestore], sc[kScalApply], lr_of[k], beta1s[k], beta2s[k], epss[k],
                               wds[k], step);
      memo_group = k;
      memo_step = step;
    }
    t.k = memo;
    add_chunks(chunks, p.numel(), (int32_t)i);
  }
  if (sc[kScalSkip] != 0.0f) return;  // non-finite gradients: nothing changes
  const IsaKernels* isa = current_isa();
  parallel_chunks((int64_t)chunks.size(), /*descending=*/true,
                  [&](int64_t b, int64_t e) { isa->update(ts.data(), chunks.data(), b, e); });
}

TORCH_LIBRARY_IMPL(mgpo, CPU, m) {
  m.impl("step", &step_op<&reduce_sums_cpu, &scalar_stage_cpu, &update_cpu>);
  m.impl("check_step", &check_step_op);
  m.impl("reduce_sums", &reduce_sums_cpu);
  m.impl("scalar_stage", &scalar_stage_cpu);
  m.impl("update", &update_cpu);
}

}  // namespace cpu
}  // namespace mgpo
