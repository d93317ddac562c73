// CUDA implementations of torch.ops.mgpo.*.
//
// Launches per step (for up to kRedMaxTensors / kUpdMaxTensors tensors, any dtypes, up to kUpdMaxGroups groups):
//   reduce_kernel   (+ one cudaMemsetAsync of its 4-byte block counter): one block per chunk of kChunk elements
//                   over every tensor; per-chunk float64 partials; the last block to finish (integer atomic
//                   counter) reduces the partials of each group in a fixed order -> sums. Bit-identical runs.
//   scalar_kernel   one block: the scalar stage of mgpo_math.h, GlobalState update, per-tensor step increments.
//   update_kernel   one block per chunk: restore, AdamW, re-perturb.
// Metadata (pointers, sizes, per-group hyper-parameters) is passed by value in the kernel parameters
// (__grid_constant__, up to 32 KB: CUDA >= 12.1, Volta+); lists longer than one launch's table are split into
// several launches of the same kernel (documented in csrc/NOTES.md). Scalars that change from step to step
// (lr tensor, step counts, gbar, coef, grad_scale, found_inf) are read from device memory: no host sync, and
// a whole step can be captured in a CUDA graph.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <cstdint>
#include <vector>

#include "../ops_common.h"

namespace mgpo {
namespace cuda {

constexpr int kChunk = 32768;  // elements per block
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxParamBytes = 32764;  // kernel parameter limit (CUDA 12.1+, sm_70+)

// ------------------------------------------------------------------------------------------ element access
__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }

// Four consecutive elements: one 16-byte access for fp32, one 8-byte access for 16-bit types.
template <typename T> struct Vec4;
template <> struct Vec4<float> { using type = float4; };
template <> struct Vec4<__nv_bfloat16> { using type = uint2; };
template <> struct Vec4<__half> { using type = uint2; };

template <typename T>
__device__ __forceinline__ void load4(const T* p, float (&o)[4]) {
  const typename Vec4<T>::type raw = *reinterpret_cast<const typename Vec4<T>::type*>(p);
  const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int j = 0; j < 4; ++j) o[j] = to_f(e[j]);
}
template <typename T>
__device__ __forceinline__ void store4(T* p, const float (&x)[4]) {
  typename Vec4<T>::type raw;
  T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
  for (int j = 0; j < 4; ++j) e[j] = from_f<T>(x[j]);
  *reinterpret_cast<typename Vec4<T>::type*>(p) = raw;
}
template <typename T>
__device__ __forceinline__ bool aligned4(const T* p) {
  return (reinterpret_cast<uintptr_t>(p) % (4 * sizeof(T))) == 0;
}

// ------------------------------------------------------------------------------------------ block reduction
// Fixed shuffle tree + fixed cross-warp order: deterministic. Result valid in thread 0.
__device__ __forceinline__ void block_sum4(double (&v)[4], double* smem /* kWarps*4 */) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1)
#pragma unroll
    for (int j = 0; j < 4; ++j) v[j] += __shfl_down_sync(0xffffffffu, v[j], off);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  __syncthreads();  // smem may still be read by a previous call
  if (lane == 0)
#pragma unroll
    for (int j = 0; j < 4; ++j) smem[warp * 4 + j] = v[j];
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int j = 0; j < 4; ++j) v[j] = lane < kWarps ? smem[lane * 4 + j] : 0.0;
#pragma unroll
    for (int off = kWarps / 2; off > 0; off >>= 1)
#pragma unroll
      for (int j = 0; j < 4; ++j) v[j] += __shfl_down_sync(0xffffffffu, v[j], off);
  }
}

// Largest i in [0, n) with starts(i) <= b (starts strictly increasing, starts(0) == 0).
template <typename F>
__device__ __forceinline__ int find_tensor(int n, int b, F starts) {
  int lo = 0, hi = n - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (starts(mid) <= b)
      lo = mid;
    else
      hi = mid - 1;
  }
  return lo;
}

// ------------------------------------------------------------------------------------------ pass 1
struct RedTensorArg {
  const void* g;  // nullptr: no gradient (|m|^2 goes to the no-grad slot)
  const float* m;
  int64_t numel;
  int32_t block_start;  // first block of this tensor in its launch
  int16_t group;
  int8_t dtype;
  int8_t pad;
};
struct RedHeader {
  double* partials;       // [total_chunks][4]
  int* chunk_group;       // [total_chunks]
  unsigned int* counter;  // zeroed before the first launch
  double* sums;           // [4 * num_groups]
  int ntensors;
  int chunk_base;    // global chunk index of this launch's block 0
  int total_chunks;  // over all launches of this call
  int num_groups;
};
constexpr int kRedMaxTensors = (kMaxParamBytes - (int)sizeof(RedHeader)) / (int)sizeof(RedTensorArg);
struct RedArgs {
  RedHeader h;
  RedTensorArg t[kRedMaxTensors];
};
static_assert(sizeof(RedArgs) <= kMaxParamBytes, "reduce kernel arguments too large");

template <typename T>
__device__ __forceinline__ void reduce_grad(const T* __restrict__ g, const float* __restrict__ m, int len,
                                            double (&acc)[4]) {
  const int len4 = (aligned4(g) && aligned4(m)) ? (len & ~3) : 0;
#pragma unroll 2
  for (int i = threadIdx.x * 4; i < len4; i += kThreads * 4) {
    float gv[4], mv[4];
    load4(g + i, gv);
    load4(m + i, mv);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const double gd = gv[j], md = mv[j];
      acc[kSumGG] += gd * gd;
      acc[kSumMG] += md * gd;
      acc[kSumMM] += md * md;
    }
  }
  for (int i = len4 + threadIdx.x; i < len; i += kThreads) {
    const double gd = to_f(g[i]), md = m[i];
    acc[kSumGG] += gd * gd;
    acc[kSumMG] += md * gd;
    acc[kSumMM] += md * md;
  }
}

__device__ __forceinline__ void reduce_nograd(const float* __restrict__ m, int len, double (&acc)[4]) {
  const int len4 = aligned4(m) ? (len & ~3) : 0;
#pragma unroll 2
  for (int i = threadIdx.x * 4; i < len4; i += kThreads * 4) {
    float mv[4];
    load4(m + i, mv);
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[kSumMMNoGrad] += (double)mv[j] * (double)mv[j];
  }
  for (int i = len4 + threadIdx.x; i < len; i += kThreads) acc[kSumMMNoGrad] += (double)m[i] * (double)m[i];
}

// First chunk index in [0, n) whose group is >= k (chunk_group is non-decreasing).
__device__ __forceinline__ int lower_bound_group(const int* cg, int n, int k) {
  int lo = 0, hi = n;
  while (lo < hi) {
    const int mid = (lo + hi) >> 1;
    if (__ldcg(cg + mid) < k)
      lo = mid + 1;
    else
      hi = mid;
  }
  return lo;
}

__global__ void __launch_bounds__(kThreads) reduce_kernel(const __grid_constant__ RedArgs a) {
  __shared__ double smem[kWarps * 4];
  __shared__ bool is_last;
  const int b = blockIdx.x;
  const int ti = find_tensor(a.h.ntensors, b, [&](int i) { return a.t[i].block_start; });
  const RedTensorArg& t = a.t[ti];
  const int64_t start = (int64_t)(b - t.block_start) * kChunk;
  const int64_t rem = t.numel - start;
  const int len = rem < kChunk ? (int)rem : kChunk;
  const float* m = t.m + start;
  double acc[4] = {0.0, 0.0, 0.0, 0.0};
  if (t.g == nullptr) {
    reduce_nograd(m, len, acc);
  } else if (t.dtype == kF32) {
    reduce_grad(static_cast<const float*>(t.g) + start, m, len, acc);
  } else if (t.dtype == kBF16) {
    reduce_grad(static_cast<const __nv_bfloat16*>(t.g) + start, m, len, acc);
  } else {
    reduce_grad(static_cast<const __half*>(t.g) + start, m, len, acc);
  }
  block_sum4(acc, smem);
  const int chunk = a.h.chunk_base + b;
  if (threadIdx.x == 0) {
#pragma unroll
    for (int j = 0; j < 4; ++j) a.h.partials[4 * (int64_t)chunk + j] = acc[j];
    a.h.chunk_group[chunk] = t.group;
    __threadfence();  // partials visible device-wide before the counter moves
    const unsigned prev = atomicAdd(a.h.counter, 1u);
    __threadfence();  // acquire side, in the thread that observed the atomic (PTX memory model)
    is_last = prev == (unsigned)(a.h.total_chunks - 1);
  }
  __syncthreads();
  if (!is_last) return;
  __threadfence();  // and in every thread of the last block before it reads the partials (__ldcg)
  // Last block: sums[k] = fixed-order reduction of the partials of group k's chunks (contiguous).
  const int n = a.h.total_chunks;
  for (int k = 0; k < a.h.num_groups; ++k) {
    const int lo = lower_bound_group(a.h.chunk_group, n, k);
    const int hi = lower_bound_group(a.h.chunk_group, n, k + 1);
    double v[4] = {0.0, 0.0, 0.0, 0.0};
    for (int c = lo + threadIdx.x; c < hi; c += kThreads)
#pragma unroll
      for (int j = 0; j < 4; ++j) v[j] += __ldcg(a.h.partials + 4 * (int64_t)c + j);
    block_sum4(v, smem);
    if (threadIdx.x == 0)
#pragma unroll
      for (int j = 0; j < 4; ++j) a.h.sums[4 * k + j] = v[j];
  }
}

// ------------------------------------------------------------------------------------------ scalar stage
constexpr int kScalarMaxGroups = 512;
struct ScalarHeader {
  const double* sums;
  const float* grad_scale;  // nullptr when absent
  const float* found_inf;
  float* gstep;
  float* gbar;
  float* coef;
  int64_t* skipped;
  float* scal;  // out: [c, restore, apply, skip]
  ScalarConfig cfg;
  int num_groups;
  int nsteps;
};
constexpr int kScalarMaxSteps =
    (kMaxParamBytes - (int)sizeof(ScalarHeader) - kScalarMaxGroups * (int)sizeof(double)) / (int)sizeof(float*);
struct ScalarArgs {
  ScalarHeader h;
  double beta1s[kScalarMaxGroups];
  float* steps[kScalarMaxSteps];
};
static_assert(sizeof(ScalarArgs) <= kMaxParamBytes, "scalar kernel arguments too large");

__global__ void __launch_bounds__(kThreads) scalar_kernel(const __grid_constant__ ScalarArgs a) {
  __shared__ int skip;
  if (threadIdx.x == 0) {
    const ScalarResult r = mgpo_scalar_stage(a.h.sums, a.beta1s, a.h.num_groups, a.h.cfg, *a.h.gstep, *a.h.gbar,
                                             *a.h.coef, a.h.grad_scale, a.h.found_inf);
    a.h.scal[kScalC] = r.c;
    a.h.scal[kScalRestore] = r.restore;
    a.h.scal[kScalApply] = r.apply;
    a.h.scal[kScalSkip] = r.skip ? 1.0f : 0.0f;
    if (r.skip) {
      *a.h.skipped += 1;
    } else {
      *a.h.gbar = r.gbar_new;
      *a.h.coef = r.coef_new;
      *a.h.gstep += 1.0f;
    }
    skip = r.skip;
  }
  __syncthreads();
  if (skip) return;
  for (int i = threadIdx.x; i < a.h.nsteps; i += kThreads) *a.steps[i] += 1.0f;
}

// More tensors with a gradient than one scalar_kernel's table: the rest of the step increments.
constexpr int kStepsPerLaunch = (kMaxParamBytes - 16) / (int)sizeof(float*);
struct StepsArgs {
  const float* scal;
  int nsteps;
  float* steps[kStepsPerLaunch];
};
static_assert(sizeof(StepsArgs) <= kMaxParamBytes, "steps kernel arguments too large");

__global__ void __launch_bounds__(kThreads) steps_kernel(const __grid_constant__ StepsArgs a) {
  if (a.scal[kScalSkip] != 0.0f) return;
  for (int i = threadIdx.x; i < a.nsteps; i += kThreads) *a.steps[i] += 1.0f;
}

// ------------------------------------------------------------------------------------------ pass 2
struct UpdTensorArg {
  void* p;
  const void* g;     // nullptr: no gradient
  float* m;
  float* v;
  float* master;     // nullptr for fp32 params
  const float* step; // step count after this step's increment (read only with a gradient)
  int64_t numel;
  int32_t block_start;
  int16_t group;     // index into this launch's group table
  int8_t dtype;
  int8_t pad;
};
struct GroupArg {
  const float* lr_ptr;  // a tensor lr (read on the device), or nullptr: use lr
  double beta1, beta2, eps, weight_decay;
  float lr;
  float pad;
};
constexpr int kUpdMaxGroups = 16;
struct UpdHeader {
  const float* scal;
  int ntensors;
  int pad;
  GroupArg grp[kUpdMaxGroups];
};
constexpr int kUpdMaxTensors = (kMaxParamBytes - (int)sizeof(UpdHeader)) / (int)sizeof(UpdTensorArg);
struct UpdArgs {
  UpdHeader h;
  UpdTensorArg t[kUpdMaxTensors];
};
static_assert(sizeof(UpdArgs) <= kMaxParamBytes, "update kernel arguments too large");
static_assert(kUpdMaxTensors >= 448, "one launch must hold the 448 tensors of LLaMA-2-7B LoRA");

template <typename T, bool kGrad, bool kMaster>
__device__ __forceinline__ void update_range(T* __restrict__ p, const T* __restrict__ g, float* __restrict__ m,
                                             float* __restrict__ v, float* __restrict__ master, int len,
                                             const AdamCoefs& k) {
  bool aligned = aligned4(p) && aligned4(m);
  if (kGrad) aligned = aligned && aligned4(g) && aligned4(v);
  if (kMaster) aligned = aligned && aligned4(master);
  const int len4 = aligned ? (len & ~3) : 0;
#pragma unroll 2
  for (int i = threadIdx.x * 4; i < len4; i += kThreads * 4) {
    float mv[4], th[4], out[4];
    load4(m + i, mv);
    if (kMaster) {
      load4(master + i, th);
    } else {
      float pv[4];
      load4(p + i, pv);
#pragma unroll
      for (int j = 0; j < 4; ++j) th[j] = mgpo_restore(pv[j], mv[j], k.restore);
    }
    if (kGrad) {
      float gv[4], vv[4];
      load4(g + i, gv);
      load4(v + i, vv);
#pragma unroll
      for (int j = 0; j < 4; ++j) mgpo_adamw(th[j], mv[j], vv[j], gv[j], k);
      store4(m + i, mv);
      store4(v + i, vv);
      if (kMaster) store4(master + i, th);
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) out[j] = mgpo_perturb(th[j], mv[j], k.apply);
    store4(p + i, out);
  }
  for (int i = len4 + threadIdx.x; i < len; i += kThreads) {
    float mi = m[i];
    float th = kMaster ? master[i] : mgpo_restore(to_f(p[i]), mi, k.restore);
    if (kGrad) {
      float vi = v[i];
      mgpo_adamw(th, mi, vi, to_f(g[i]), k);
      m[i] = mi;
      v[i] = vi;
      if (kMaster) master[i] = th;
    }
    p[i] = from_f<T>(mgpo_perturb(th, mi, k.apply));
  }
}

template <typename T>
__device__ __forceinline__ void update_chunk(const UpdTensorArg& t, int64_t start, int len, const AdamCoefs& k) {
  T* p = static_cast<T*>(t.p) + start;
  float* m = t.m + start;
  float* master = t.master == nullptr ? nullptr : t.master + start;
  if (t.g != nullptr) {
    const T* g = static_cast<const T*>(t.g) + start;
    float* v = t.v + start;
    if (master != nullptr)
      update_range<T, true, true>(p, g, m, v, master, len, k);
    else
      update_range<T, true, false>(p, g, m, v, nullptr, len, k);
  } else {
    if (master != nullptr)
      update_range<T, false, true>(p, nullptr, m, nullptr, master, len, k);
    else
      update_range<T, false, false>(p, nullptr, m, nullptr, nullptr, len, k);
  }
}

__global__ void __launch_bounds__(kThreads) update_kernel(const __grid_constant__ UpdArgs a) {
  __shared__ AdamCoefs ks;
  __shared__ int skip;
  const int b = blockIdx.x;
  const int ti = find_tensor(a.h.ntensors, b, [&](int i) { return a.t[i].block_start; });
  const UpdTensorArg& t = a.t[ti];
  if (threadIdx.x == 0) {
    const float* s = a.h.scal;
    skip = s[kScalSkip] != 0.0f;
    const GroupArg& gr = a.h.grp[t.group];
    const float lr = gr.lr_ptr != nullptr ? *gr.lr_ptr : gr.lr;
    const float step = t.g != nullptr ? *t.step : 1.0f;
    ks = mgpo_tensor_coefs(s[kScalC], s[kScalRestore], s[kScalApply], lr, gr.beta1, gr.beta2, gr.eps,
                           gr.weight_decay, step);
  }
  __syncthreads();
  if (skip) return;
  const AdamCoefs k = ks;
  const int64_t start = (int64_t)(b - t.block_start) * kChunk;
  const int64_t rem = t.numel - start;
  const int len = rem < kChunk ? (int)rem : kChunk;
  if (t.dtype == kF32)
    update_chunk<float>(t, start, len, k);
  else if (t.dtype == kBF16)
    update_chunk<__nv_bfloat16>(t, start, len, k);
  else
    update_chunk<__half>(t, start, len, k);
}

// ------------------------------------------------------------------------------------------ host side
static int64_t nblocks(int64_t numel) { return (numel + kChunk - 1) / kChunk; }

static void check_cuda_tensor(const at::Tensor& t, const at::Device& dev, const char* what, size_t i) {
  TORCH_CHECK(t.device() == dev, "mgpo (cuda kernels): ", what, " of tensor ", i, " is on ", t.device(),
              ", expected ", dev);
}

static float* scalar_f32(const at::Tensor& t, const at::Device& dev, const char* what) {
  TORCH_CHECK(t.device() == dev && t.scalar_type() == at::kFloat && t.numel() == 1, "mgpo (cuda kernels): ", what,
              " must be a one-element float32 tensor on ", dev, ", got ", t.scalar_type(), " ", t.sizes(), " on ",
              t.device());
  return t.data_ptr<float>();
}

at::Tensor reduce_sums_cuda(const OptTensorList& grads, at::TensorList exp_avgs, at::IntArrayRef group_index,
                            int64_t num_groups) {
  const size_t n = exp_avgs.size();
  TORCH_CHECK(n > 0, "mgpo: reduce_sums needs at least one tensor");
  TORCH_CHECK(grads.size() == n, "mgpo: ", grads.size(), " grads for ", n, " exp_avgs");
  check_group_index(group_index, n, num_groups);
  const at::Device dev = exp_avgs[0].device();
  c10::cuda::CUDAGuard guard(dev);
  std::vector<RedTensorArg> ts;
  ts.reserve(n);
  int64_t total = 0;
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& m = exp_avgs[i];
    check_cuda_tensor(m, dev, "exp_avg", i);
    TORCH_CHECK(m.scalar_type() == at::kFloat, "mgpo: exp_avg of tensor ", i, " must be float32");
    if (m.numel() > 1)
      TORCH_CHECK(m.is_non_overlapping_and_dense(), "mgpo: exp_avg of tensor ", i, " is not dense");
    RedTensorArg t{};
    t.m = m.data_ptr<float>();
    t.numel = m.numel();
    t.group = (int16_t)group_index[i];
    t.dtype = kF32;
    if (auto g = opt_at(grads, i)) {
      check_same_layout(*g, m, "grad", i);
      t.g = g->data_ptr();
      t.dtype = (int8_t)dtype_code(g->scalar_type());
    }
    if (t.numel == 0) continue;
    ts.push_back(t);
    total += nblocks(t.numel);
  }
  TORCH_CHECK(num_groups < 32768, "mgpo: at most 32767 param groups");
  TORCH_CHECK(total < (int64_t(1) << 31), "mgpo: too many chunks");
  const auto f64 = at::TensorOptions().dtype(at::kDouble).device(dev);
  if (total == 0) return at::zeros({kSumsPerGroup * num_groups}, f64);
  at::Tensor sums = at::empty({kSumsPerGroup * num_groups}, f64);
  // workspace: partials (4 doubles per chunk), chunk groups (int32), counter (uint32)
  const int64_t ws_doubles = 4 * total + (total + 1) / 2 + 1;
  at::Tensor ws = at::empty({ws_doubles}, f64);
  double* partials = ws.data_ptr<double>();
  int* chunk_group = reinterpret_cast<int*>(partials + 4 * total);
  unsigned int* counter = reinterpret_cast<unsigned int*>(partials + ws_doubles - 1);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  C10_CUDA_CHECK(cudaMemsetAsync(counter, 0, sizeof(unsigned int), stream));

  RedArgs args;
  args.h.partials = partials;
  args.h.chunk_group = chunk_group;
  args.h.counter = counter;
  args.h.sums = sums.data_ptr<double>();
  args.h.total_chunks = (int)total;
  args.h.num_groups = (int)num_groups;
  int chunk_base = 0;
  size_t i = 0;
  while (i < ts.size()) {
    int cnt = 0, blocks = 0;
    while (i < ts.size() && cnt < kRedMaxTensors) {
      args.t[cnt] = ts[i];
      args.t[cnt].block_start = blocks;
      blocks += (int)nblocks(ts[i].numel);
      ++cnt;
      ++i;
    }
    args.h.ntensors = cnt;
    args.h.chunk_base = chunk_base;
    reduce_kernel<<<blocks, kThreads, 0, stream>>>(args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    chunk_base += blocks;
  }
  return sums;
}

at::Tensor scalar_stage_cuda(const at::Tensor& sums, at::ArrayRef<double> beta1s, const at::Tensor& gstep,
                             const at::Tensor& gbar, const at::Tensor& coef, const at::Tensor& skipped,
                             at::TensorList steps, const std::optional<at::Tensor>& grad_scale,
                             const std::optional<at::Tensor>& found_inf, double rho, double ema_beta,
                             bool adaptive_norm, double sign, std::optional<double> max_grad_norm,
                             bool perturbed, double gbar_floor) {
  const int64_t G = (int64_t)beta1s.size();
  const at::Device dev = sums.device();
  c10::cuda::CUDAGuard guard(dev);
  TORCH_CHECK(sums.scalar_type() == at::kDouble && sums.numel() == kSumsPerGroup * G && sums.is_contiguous(),
              "mgpo: sums must be a contiguous float64 tensor of 4 * ", G, " elements");
  TORCH_CHECK(G <= kScalarMaxGroups, "mgpo (cuda kernels): at most ", kScalarMaxGroups, " param groups, got ", G);
  TORCH_CHECK(skipped.device() == dev && skipped.scalar_type() == at::kLong && skipped.numel() == 1,
              "mgpo: gstate.skipped must be a one-element int64 tensor on ", dev);
  ScalarArgs args;
  args.h.sums = sums.data_ptr<double>();
  args.h.grad_scale = (grad_scale.has_value() && grad_scale->defined()) ? scalar_f32(*grad_scale, dev, "grad_scale")
                                                                          : nullptr;
  args.h.found_inf = (found_inf.has_value() && found_inf->defined()) ? scalar_f32(*found_inf, dev, "found_inf")
                                                                       : nullptr;
  args.h.gstep = scalar_f32(gstep, dev, "gstate.step");
  args.h.gbar = scalar_f32(gbar, dev, "gstate.gbar");
  args.h.coef = scalar_f32(coef, dev, "gstate.coef");
  args.h.skipped = skipped.data_ptr<int64_t>();
  at::Tensor scal = at::empty({kScalSize}, at::TensorOptions().dtype(at::kFloat).device(dev));
  args.h.scal = scal.data_ptr<float>();
  args.h.cfg = make_scalar_config(rho, ema_beta, adaptive_norm, sign, max_grad_norm, perturbed, gbar_floor);
  args.h.num_groups = (int)G;
  for (int64_t k = 0; k < G; ++k) args.beta1s[k] = beta1s[k];
  std::vector<float*> sp(steps.size());
  for (size_t i = 0; i < steps.size(); ++i) sp[i] = scalar_f32(steps[i], dev, "step");
  const int first = (int)std::min<size_t>(sp.size(), kScalarMaxSteps);
  args.h.nsteps = first;
  for (int i = 0; i < first; ++i) args.steps[i] = sp[i];
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  scalar_kernel<<<1, kThreads, 0, stream>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  for (size_t i = first; i < sp.size();) {
    StepsArgs sa;
    sa.scal = args.h.scal;
    int cnt = 0;
    while (i < sp.size() && cnt < kStepsPerLaunch) sa.steps[cnt++] = sp[i++];
    sa.nsteps = cnt;
    steps_kernel<<<1, kThreads, 0, stream>>>(sa);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return scal;
}

void update_cuda(at::TensorList params, const OptTensorList& grads, at::TensorList exp_avgs,
                 at::TensorList exp_avg_sqs, at::TensorList masters, at::IntArrayRef master_index, at::TensorList steps,
                 const at::Tensor& scal, at::IntArrayRef group_index, at::ArrayRef<double> lrs,
                 const OptTensorList& lr_tensors, at::ArrayRef<double> beta1s, at::ArrayRef<double> beta2s,
                 at::ArrayRef<double> epss, at::ArrayRef<double> wds) {
  const size_t n = params.size();
  const int64_t G = (int64_t)lrs.size();
  TORCH_CHECK(n > 0, "mgpo: update needs at least one tensor");
  TORCH_CHECK(grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n && master_index.size() == n &&
                  steps.size() == n,
              "mgpo: params, grads, exp_avgs, exp_avg_sqs, master_index and steps must have the same length");
  TORCH_CHECK((int64_t)lr_tensors.size() == G && (int64_t)beta1s.size() == G && (int64_t)beta2s.size() == G &&
                  (int64_t)epss.size() == G && (int64_t)wds.size() == G,
              "mgpo: per-group hyper-parameter lists must have the same length");
  check_group_index(group_index, n, G);
  const at::Device dev = params[0].device();
  c10::cuda::CUDAGuard guard(dev);
  TORCH_CHECK(scal.device() == dev && scal.scalar_type() == at::kFloat && scal.numel() == kScalSize &&
                  scal.is_contiguous(),
              "mgpo: scal must be the float32 tensor of scalar_stage on ", dev);

  std::vector<GroupArg> groups(G);
  for (int64_t k = 0; k < G; ++k) {
    GroupArg& gr = groups[k];
    gr = GroupArg{};
    auto lt = opt_at(lr_tensors, k);
    gr.lr_ptr = lt ? scalar_f32(*lt, dev, "lr") : nullptr;
    gr.lr = (float)lrs[k];
    gr.beta1 = beta1s[k];
    gr.beta2 = beta2s[k];
    gr.eps = epss[k];
    gr.weight_decay = wds[k];
  }
  std::vector<UpdTensorArg> ts;
  std::vector<int> tgroup;
  ts.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    check_cuda_tensor(p, dev, "param", i);
    const int dt = dtype_code(p.scalar_type());
    check_same_layout(p, p, "param", i);
    check_state(exp_avgs[i], p, "exp_avg", i);
    check_state(exp_avg_sqs[i], p, "exp_avg_sq", i);
    UpdTensorArg t{};
    t.p = p.data_ptr();
    t.m = exp_avgs[i].data_ptr<float>();
    t.v = exp_avg_sqs[i].data_ptr<float>();
    t.numel = p.numel();
    t.dtype = (int8_t)dt;
    if (master_index[i] >= 0) {
      TORCH_CHECK(master_index[i] < (int64_t)masters.size(), "mgpo: master_index[", i, "] = ", master_index[i],
                  " is outside the masters list (", masters.size(), " tensors)");
      const at::Tensor* ms = &masters[master_index[i]];
      check_state(*ms, p, "master_param", i);
      t.master = ms->data_ptr<float>();
    }
    if (auto g = opt_at(grads, i)) {
      TORCH_CHECK(g->scalar_type() == p.scalar_type(), "mgpo: grad of tensor ", i, " has dtype ",
                  g->scalar_type(), ", its parameter ", p.scalar_type());
      check_same_layout(*g, p, "grad", i);
      t.g = g->data_ptr();
      t.step = scalar_f32(steps[i], dev, "step");
    }
    if (t.numel == 0) continue;
    ts.push_back(t);
    tgroup.push_back((int)group_index[i]);
  }
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  UpdArgs args;
  args.h.scal = scal.data_ptr<float>();
  args.h.pad = 0;
  size_t i = 0;
  while (i < ts.size()) {
    const int g0 = tgroup[i];
    int cnt = 0;
    int64_t blocks = 0;
    while (i < ts.size() && cnt < kUpdMaxTensors && tgroup[i] - g0 < kUpdMaxGroups) {
      args.t[cnt] = ts[i];
      args.t[cnt].block_start = (int32_t)blocks;
      args.t[cnt].group = (int16_t)(tgroup[i] - g0);
      blocks += nblocks(ts[i].numel);
      ++cnt;
      ++i;
    }
    TORCH_CHECK(blocks < (int64_t(1) << 31), "mgpo: too many chunks in one launch");
    const int ng = std::min<int64_t>(kUpdMaxGroups, G - g0);
    for (int k = 0; k < ng; ++k) args.h.grp[k] = groups[g0 + k];
    args.h.ntensors = cnt;
    update_kernel<<<(unsigned)blocks, kThreads, 0, stream>>>(args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

TORCH_LIBRARY_IMPL(mgpo, CUDA, m) {
  m.impl("step", &step_op<&reduce_sums_cuda, &scalar_stage_cuda, &update_cuda>);
  m.impl("check_step", &check_step_op);
  m.impl("reduce_sums", &reduce_sums_cuda);
  m.impl("scalar_stage", &scalar_stage_cuda);
  m.impl("update", &update_cuda);
}

}  // namespace cuda
}  // namespace mgpo
