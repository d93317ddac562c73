// CPU stages of torch.ops.mgpo.* (device_ops.h): the chunk list over all tensors, one parallel loop per pass
// over it, the scalar stage; and the choice of the instruction set.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "../device_ops.h"
#include "cpu_kernels.h"

namespace mgpo {
namespace cpu {

// ------------------------------------------------------------------------------------------ ISA choice
// The instruction sets this CPU runs, narrowest first: base always; avx2 and avx512 where
// the CPU has every extension their translation unit is compiled for (isa_avx2.cpp, isa_avx512.cpp).
std::vector<std::string> available_isas() {
  std::vector<std::string> out{"base"};
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  const bool fma_f16c = __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  if (fma_f16c && __builtin_cpu_supports("avx2")) out.push_back("avx2");
  if (fma_f16c && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    out.push_back("avx512");
#endif
  return out;
}

static const IsaKernels* kernels_of(const std::string& name) {
  return name == "avx512" ? isa_avx512() : name == "avx2" ? isa_avx2() : isa_base();
}

// MGPO_CPU_ISA=base|avx2|avx512 if this CPU runs it, else the widest it runs.
static const IsaKernels* detect_isa() {
  const char* env = std::getenv("MGPO_CPU_ISA");
  const std::vector<std::string> isas = available_isas();
  for (const std::string& n : isas)
    if (env != nullptr && n == env) return kernels_of(n);
  return kernels_of(isas.back());
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

void set_isa(const std::string& name) {
  for (const std::string& n : available_isas()) {
    if (n == name) {
      g_isa.store(kernels_of(n));
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
// deschedules on a busy machine does not hold the other at the barrier). Both passes walk memory ascending: pass 2
// used to walk the chunks descending, so that those pass 1 read last (still in L3) came first, but on the 2-vCPU
// Zen 4 VM each chunk's backward jump cost more than the reuse gained (whole step 2% slower; pass 1 ending on the
// chunks pass 2 starts with gained nothing either: benchmarks/results/2026-12-02-cpu-pass-order.txt). The results
// do not depend on who runs which chunk: partial sums are per chunk and pass 2 is element-wise.
template <typename F>
static void parallel_chunks(int64_t n, const F& fn) {
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
      fn(b, b + size);
      b = next.load(std::memory_order_relaxed);
    }
  });
}

static size_t count_chunks(const CheckedPlan& plan) {
  size_t c = 0;
  for (const PlanTensor& t : plan.tensors) c += (size_t)((t.numel + kChunk - 1) / kChunk);
  return c;
}

static void add_chunks(std::vector<Chunk>& chunks, int64_t numel, int32_t tensor) {
  for (int64_t s = 0; s < numel; s += kChunk) chunks.push_back(Chunk{s, std::min(kChunk, numel - s), tensor});
}

// The three stages over a checked plan (device_ops.h). All pointers are CPU memory.
struct CpuStages {
  static constexpr c10::DeviceType kType = c10::DeviceType::CPU;
  // Pass 1: partial sums per chunk (any thread), then added per group in chunk order: deterministic whatever the
  // thread count.
  static at::Tensor reduce(const CheckedPlan& plan) {
    const size_t n = plan.tensors.size();
    std::vector<Chunk> chunks;
    chunks.reserve(count_chunks(plan));
    for (size_t i = 0; i < n; ++i) add_chunks(chunks, plan.tensors[i].numel, (int32_t)i);
    const PlanTensor* ts = plan.tensors.data();
    const int64_t nchunks = (int64_t)chunks.size();
    std::vector<double> partials((size_t)nchunks * kSumsPerGroup);
    const IsaKernels* isa = current_isa();
    parallel_chunks(nchunks, [&](int64_t b, int64_t e) { isa->reduce(ts, chunks.data(), b, e, partials.data()); });
    const int64_t G = (int64_t)plan.groups.size();
    at::Tensor sums = at::zeros({kSumsPerGroup * G}, at::TensorOptions().dtype(at::kDouble));
    double* s = sums.data_ptr<double>();
    for (int64_t c = 0; c < nchunks; ++c) {
      double* dst = s + kSumsPerGroup * plan.tensors[chunks[c].tensor].group;
      const double* src = partials.data() + kSumsPerGroup * c;
      for (int j = 0; j < kSumsPerGroup; ++j) dst[j] += src[j];
    }
    return sums;
  }

  // The scalar stage of mgpo_math.h; unless the step is skipped, the global state and the step counts of the
  // tensors with a gradient move on (a skipped step counts only in gstate.skipped).
  static at::Tensor scalar(const CheckedPlan& plan, const at::Tensor& sums) {
    const ScalarResult r = mgpo_scalar_stage(sums.data_ptr<double>(), plan.beta1s.data(), (int)plan.beta1s.size(),
                                             plan.cfg, *plan.gstep, *plan.gbar, *plan.coef, plan.grad_scale,
                                             plan.found_inf);
    at::Tensor scal = at::empty({kScalSize}, at::TensorOptions().dtype(at::kFloat));
    float* o = scal.data_ptr<float>();
    o[kScalC] = r.c;
    o[kScalRestore] = r.restore;
    o[kScalApply] = r.apply;
    o[kScalSkip] = r.skip ? 1.0f : 0.0f;
    if (r.skip) {
      *plan.skipped += 1;
      return scal;
    }
    *plan.gbar = r.gbar_new;
    *plan.coef = r.coef_new;
    *plan.gstep += 1.0f;
    for (float* st : plan.steps_with_grad) *st += 1.0f;
    return scal;
  }

  // Pass 2: restore, AdamW (theta_{t+1} at rest; the perturb op's pass 2 applies eps).
  static void update(const CheckedPlan& plan, const at::Tensor& scal) {
    const float* sc = scal.data_ptr<float>();
    // non-finite gradients: AdamW changes nothing, but eps applied by the forward is still removed (no gradients)
    const bool skip = sc[kScalSkip] != 0.0f;
    if (skip && sc[kScalRestore] == 0.0f) return;
    const size_t n = plan.tensors.size();
    std::vector<float> lr_of(plan.groups.size());
    for (size_t k = 0; k < plan.groups.size(); ++k)
      lr_of[k] = plan.groups[k].lr_ptr != nullptr ? *plan.groups[k].lr_ptr : plan.groups[k].lr;
    std::vector<UpdTensor> ts(n);
    std::vector<Chunk> chunks;
    chunks.reserve(count_chunks(plan));
    AdamCoefs memo{};
    int64_t memo_group = -1;
    float memo_step = -1.0f;
    for (size_t i = 0; i < n; ++i) {
      const PlanTensor& pt = plan.tensors[i];
      UpdTensor& t = ts[i];
      static_cast<PlanTensor&>(t) = pt;
      if (skip) t.g = nullptr;
      const float step = t.g != nullptr ? *pt.step : 1.0f;
      if (pt.group != memo_group || step != memo_step) {  // tensors of a group usually share their step count
        const PlanGroup& gr = plan.groups[pt.group];
        memo = mgpo_tensor_coefs(sc[kScalC], sc[kScalRestore], sc[kScalApply], lr_of[pt.group], gr.beta1, gr.beta2,
                                 gr.eps, gr.weight_decay, step);
        memo_group = pt.group;
        memo_step = step;
      }
      t.k = memo;
      add_chunks(chunks, pt.numel, (int32_t)i);
    }
    const IsaKernels* isa = current_isa();
    parallel_chunks((int64_t)chunks.size(), [&](int64_t b, int64_t e) { isa->update(ts.data(), chunks.data(), b, e); });
  }
};

TORCH_LIBRARY_IMPL(mgpo, CPU, m) { register_device_ops<CpuStages>(m); }

}  // namespace cpu
}  // namespace mgpo
