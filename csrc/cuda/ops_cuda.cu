// CUDA implementations of torch.ops.mgpo.*.
//
// Launches per step (for up to kRedMaxTensors / kUpdMaxTensors tensors, any dtypes, up to kUpdMaxGroups groups):
//   reduce_kernel   (+ one cudaMemsetAsync of its 4-byte block counter): one block per chunk of kChunk elements
//                   over every tensor; per-chunk float64 partials; the last block to finish (integer atomic
//                   counter) reduces the partials of each group in a fixed order -> sums. Bit-identical runs.
//   scalar_kernel   one block: the scalar stage of mgpo_math.h, GlobalState update, per-tensor step increments.
//   update_kernel   one block per chunk: restore, AdamW (theta at rest); with no gradients, the apply pass.
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

#include <algorithm>
#include <cstdint>
#include <vector>

#include "../device_ops.h"

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
using GroupArg = PlanGroup;  // the plan's per-group values travel to the kernel as they are
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
__device__ __forceinline__ void update_chunk(const UpdTensorArg& t, int64_t start, int len, const AdamCoefs& k,
                                             bool skip) {
  T* p = static_cast<T*>(t.p) + start;
  float* m = t.m + start;
  float* master = t.master == nullptr ? nullptr : t.master + start;
  if (t.g != nullptr && !skip) {
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
    const float step = (t.g != nullptr && !skip) ? *t.step : 1.0f;
    ks = mgpo_tensor_coefs(s[kScalC], s[kScalRestore], s[kScalApply], lr, gr.beta1, gr.beta2, gr.eps,
                           gr.weight_decay, step);
  }
  __syncthreads();
  // non-finite gradients: AdamW changes nothing, but eps applied by the forward is still removed (no gradients)
  if (skip && ks.restore == 0.0f) return;
  const AdamCoefs k = ks;
  const int64_t start = (int64_t)(b - t.block_start) * kChunk;
  const int64_t rem = t.numel - start;
  const int len = rem < kChunk ? (int)rem : kChunk;
  if (t.dtype == kF32)
    update_chunk<float>(t, start, len, k, skip);
  else if (t.dtype == kBF16)
    update_chunk<__nv_bfloat16>(t, start, len, k, skip);
  else
    update_chunk<__half>(t, start, len, k, skip);
}

// ------------------------------------------------------------------------------------------ host side
static int64_t nblocks(int64_t numel) { return (numel + kChunk - 1) / kChunk; }

// The one launch helper under every kernel: a kernel's arguments (passed by value) hold a table of bounded
// size, so the items [0, n) go into consecutive launches of at most `cap` items each, a launch also ending
// before an item i that `fits(first, i)` refuses; launch(first, count) is called once per launch, in order.
template <typename Fits, typename Launch>
static void for_each_launch(size_t n, size_t cap, Fits&& fits, Launch&& launch) {
  size_t first = 0;
  while (first < n) {
    size_t end = first + 1;
    while (end < n && end - first < cap && fits(first, end)) ++end;
    launch(first, end - first);
    first = end;
  }
}
static bool always(size_t, size_t) { return true; }

// A pass's kernel table: make(pt) for every tensor of the plan that has elements (an empty one gets no block).
template <typename Arg, typename Make>
static std::vector<Arg> launch_table(const CheckedPlan& plan, Make&& make) {
  std::vector<Arg> out;
  out.reserve(plan.tensors.size());
  for (const PlanTensor& pt : plan.tensors)
    if (pt.numel != 0) out.push_back(make(pt));
  return out;
}

// One block per kChunk elements: sets block_start of t[0, count) and returns the launch's number of blocks.
template <typename TensorArg>
static int64_t assign_blocks(TensorArg* t, size_t count) {
  int64_t blocks = 0;
  for (size_t i = 0; i < count; ++i) {
    t[i].block_start = (int32_t)blocks;
    blocks += nblocks(t[i].numel);
  }
  TORCH_CHECK(blocks < (int64_t(1) << 31), "mgpo: too many chunks in one launch");
  return blocks;
}

// The three stages over a checked plan (device_ops.h). All pointers are memory of plan.device.
struct CudaStages {
  static constexpr c10::DeviceType kType = c10::DeviceType::CUDA;
  // Pass 1 in launches of kRedMaxTensors tensors; the last block of the last launch adds up the partials.
  static at::Tensor reduce(const CheckedPlan& plan) {
    const int64_t G = (int64_t)plan.groups.size();
    TORCH_CHECK(G < 32768, "mgpo: at most 32767 param groups");
    c10::cuda::CUDAGuard guard(plan.device);
    const std::vector<RedTensorArg> ts = launch_table<RedTensorArg>(plan, [](const PlanTensor& pt) {
      return RedTensorArg{pt.g, pt.m, pt.numel, 0, (int16_t)pt.group, (int8_t)(pt.g != nullptr ? pt.dtype : kF32), 0};
    });
    int64_t total = 0;
    for (const RedTensorArg& t : ts) total += nblocks(t.numel);
    TORCH_CHECK(total < (int64_t(1) << 31), "mgpo: too many chunks");
    const auto f64 = at::TensorOptions().dtype(at::kDouble).device(plan.device);
    if (total == 0) return at::zeros({kSumsPerGroup * G}, f64);
    at::Tensor sums = at::empty({kSumsPerGroup * G}, f64);
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
    args.h.num_groups = (int)G;
    int chunk_base = 0;
    for_each_launch(ts.size(), kRedMaxTensors, always, [&](size_t first, size_t count) {
      std::copy(ts.begin() + first, ts.begin() + first + count, args.t);
      const int64_t blocks = assign_blocks(args.t, count);
      args.h.ntensors = (int)count;
      args.h.chunk_base = chunk_base;
      reduce_kernel<<<(unsigned)blocks, kThreads, 0, stream>>>(args);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      chunk_base += (int)blocks;
    });
    return sums;
  }

  // One block: the scalar stage and the first kScalarMaxSteps step increments; steps_kernel launches the rest.
  static at::Tensor scalar(const CheckedPlan& plan, const at::Tensor& sums) {
    const int64_t G = (int64_t)plan.groups.size();
    TORCH_CHECK(G <= kScalarMaxGroups, "mgpo (cuda kernels): at most ", kScalarMaxGroups, " param groups, got ", G);
    c10::cuda::CUDAGuard guard(plan.device);
    ScalarArgs args;
    args.h.sums = sums.data_ptr<double>();
    args.h.grad_scale = plan.grad_scale;
    args.h.found_inf = plan.found_inf;
    args.h.gstep = plan.gstep;
    args.h.gbar = plan.gbar;
    args.h.coef = plan.coef;
    args.h.skipped = plan.skipped;
    at::Tensor scal = at::empty({kScalSize}, at::TensorOptions().dtype(at::kFloat).device(plan.device));
    args.h.scal = scal.data_ptr<float>();
    args.h.cfg = plan.cfg;
    args.h.num_groups = (int)G;
    std::copy(plan.beta1s.begin(), plan.beta1s.end(), args.beta1s);
    const std::vector<float*>& sp = plan.steps_with_grad;
    const size_t first = std::min<size_t>(sp.size(), kScalarMaxSteps);
    args.h.nsteps = (int)first;
    std::copy(sp.begin(), sp.begin() + first, args.steps);
    cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    scalar_kernel<<<1, kThreads, 0, stream>>>(args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    for_each_launch(sp.size() - first, kStepsPerLaunch, always, [&](size_t b, size_t count) {
      StepsArgs sa;
      sa.scal = args.h.scal;
      sa.nsteps = (int)count;
      std::copy(sp.begin() + first + b, sp.begin() + first + b + count, sa.steps);
      steps_kernel<<<1, kThreads, 0, stream>>>(sa);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    return scal;
  }

  // Pass 2 in launches of kUpdMaxTensors tensors spanning at most kUpdMaxGroups groups (their hyper-parameters
  // travel with the launch).
  static void update(const CheckedPlan& plan, const at::Tensor& scal) {
    c10::cuda::CUDAGuard guard(plan.device);
    const int64_t G = (int64_t)plan.groups.size();
    // the plan's group of each entry (an entry's own `group` is set per launch, relative to its group table)
    std::vector<int> tgroup;
    const std::vector<UpdTensorArg> ts = launch_table<UpdTensorArg>(plan, [&](const PlanTensor& pt) {
      tgroup.push_back(pt.group);
      return UpdTensorArg{pt.p, pt.g, pt.m, pt.v, pt.master, pt.step, pt.numel, 0, 0, (int8_t)pt.dtype, 0};
    });
    cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    UpdArgs args;
    args.h.scal = scal.data_ptr<float>();
    args.h.pad = 0;
    const auto within_group_table = [&](size_t first, size_t i) {
      return tgroup[i] - tgroup[first] < kUpdMaxGroups;
    };
    for_each_launch(ts.size(), kUpdMaxTensors, within_group_table, [&](size_t first, size_t count) {
      const int g0 = tgroup[first];
      for (size_t j = 0; j < count; ++j) {
        args.t[j] = ts[first + j];
        args.t[j].group = (int16_t)(tgroup[first + j] - g0);
      }
      const int64_t blocks = assign_blocks(args.t, count);
      const int ng = (int)std::min<int64_t>(kUpdMaxGroups, G - g0);
      std::copy(plan.groups.begin() + g0, plan.groups.begin() + g0 + ng, args.h.grp);
      args.h.ntensors = (int)count;
      update_kernel<<<(unsigned)blocks, kThreads, 0, stream>>>(args);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
};

TORCH_LIBRARY_IMPL(mgpo, CUDA, m) { register_device_ops<CudaStages>(m); }

}  // namespace cuda
}  // namespace mgpo
