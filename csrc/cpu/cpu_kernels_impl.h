// The CPU kernels of both passes, compiled once per instruction set: each isa_*.cpp sets the target options,
// defines MGPO_ISA_NS (a namespace of its own) and MGPO_ISA_NAME, and includes this file.
//
// Inner loops are plain loops over __restrict__ pointers that GCC/Clang auto-vectorize (-O3 -fno-math-errno
// so that sqrt vectorizes; `#pragma omp simd` (-fopenmp-simd, no OpenMP runtime) for the float64 reductions).
// Check with -fopt-info-vec-optimized (see csrc/NOTES.md).
#include <cstdint>
#include <cstring>

#include "cpu_kernels.h"

#ifndef MGPO_ISA_NS
#error "define MGPO_ISA_NS before including cpu_kernels_impl.h"
#endif

namespace mgpo {
namespace cpu {
namespace MGPO_ISA_NS {
namespace {

// ---------------------------------------------------------------------------------- loads and stores
struct bf16_tag {};
struct f16_tag {};

template <typename Tag> struct Storage;
template <> struct Storage<float> { using type = float; };
template <> struct Storage<bf16_tag> { using type = uint16_t; };
#if defined(MGPO_ISA_F16C)
template <> struct Storage<f16_tag> { using type = uint16_t; };  // converted with F16C instructions
#else
template <> struct Storage<f16_tag> { using type = _Float16; };  // converted by the compiler (libgcc)
#endif

static inline __attribute__((always_inline)) float ld_bf16(uint16_t x) {
  const uint32_t u = (uint32_t)x << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
// round to nearest even, NaN -> 0x7FC0 (as c10::BFloat16)
static inline __attribute__((always_inline)) uint16_t st_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return f != f ? (uint16_t)0x7FC0 : (uint16_t)r;
}

template <typename Tag> struct Conv;
template <> struct Conv<float> {
  static inline __attribute__((always_inline)) float load(float x) { return x; }
  static inline __attribute__((always_inline)) float store(float x) { return x; }
};
template <> struct Conv<bf16_tag> {
  static inline __attribute__((always_inline)) float load(uint16_t x) { return ld_bf16(x); }
  static inline __attribute__((always_inline)) uint16_t store(float x) { return st_bf16(x); }
};
#if defined(MGPO_ISA_F16C)
template <> struct Conv<f16_tag> {
  static inline __attribute__((always_inline)) float load(uint16_t x) { return _cvtsh_ss(x); }
  static inline __attribute__((always_inline)) uint16_t store(float x) {
    return (uint16_t)_cvtss_sh(x, _MM_FROUND_TO_NEAREST_INT);  // RNE
  }
};
#else
template <> struct Conv<f16_tag> {
  static inline __attribute__((always_inline)) float load(_Float16 x) { return (float)x; }
  static inline __attribute__((always_inline)) _Float16 store(float x) { return (_Float16)x; }  // RNE
};
#endif

#if defined(MGPO_ISA_F16C)
// fp16 <-> fp32 blocks with F16C vector instructions: GCC 12 does not vectorize _Float16 <-> float conversions,
// so fp16 tensors are converted block by block into fp32 buffers in L1, the fp32 loops (vectorized) run on
// them, and p is converted back with round-to-nearest-even: the same bits as element-by-element conversions.
static inline void h2f(const uint16_t* __restrict__ src, float* __restrict__ dst, int64_t n) {
  int64_t i = 0;
#if defined(MGPO_ISA_AVX512)
  for (; i + 16 <= n; i += 16)
    _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i))));
#endif
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  for (; i < n; ++i) dst[i] = _cvtsh_ss(src[i]);
}

static inline void f2h(const float* __restrict__ src, uint16_t* __restrict__ dst, int64_t n) {
  int64_t i = 0;
#if defined(MGPO_ISA_AVX512)
  for (; i + 16 <= n; i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i),
                        _mm512_cvtps_ph(_mm512_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#endif
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  for (; i < n; ++i) dst[i] = (uint16_t)_cvtss_sh(src[i], _MM_FROUND_TO_NEAREST_INT);
}

#endif

#if defined(MGPO_ISA_F16C)
// Software prefetch, kPrefetch elements ahead on every stream of both passes. Streaming g and m from memory, the
// reduce loop has about five times the instructions per byte of an fp32 dot (conversions, three float64 sums), so
// the reorder window holds fewer loads in flight and the hardware prefetchers alone left each core short of the
// dot's bandwidth: on the 2-vCPU Xeon VM, 2 threads, 80 MB each of g and m, 20 -> 26 GB/s, as fast as an fp32 dot
// loop (benchmarks/cpu_reduce_ceiling.cpp; 384-768 elements ahead are alike, 1024 and more worse;
// results/2026-12-02-cpu-pass1-prefetch.txt). A prefetch never faults: past a tensor's end it costs one load.
constexpr int64_t kPrefetch = 512;
static inline __attribute__((always_inline)) void prefetch(const void* p) {
  _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0);
}
#endif

// ---------------------------------------------------------------------------------- pass 1
// kLanes independent float64 accumulators per sum: lane l sums the elements i = l (mod kLanes) in order, the
// tail (n mod kLanes elements) goes into a scalar, and the lanes are added to it in the order 0..kLanes-1. Every
// build computes exactly this, so the sums are bit-identical across instruction sets, thread counts and runs.
// A product of two fp32 values is exact in float64, so round(a*b + acc) (FMA) equals round(round(a*b) + acc)
// (multiply, then add): the vector builds use FMA, the base build multiplies and adds, with the same bits.
constexpr int kLanes = 16;

// The tail [i, n) in order into a scalar, then the lanes 0..kLanes-1 added to it: a chunk's partial sums, the
// same way in every build.
template <typename Tag>
static inline void finish_sums(const double* gg, const double* mg, const double* mm,
                               const typename Storage<Tag>::type* __restrict__ g, const float* __restrict__ m,
                               int64_t i, int64_t n, double* __restrict__ out) {
  double sgg = 0.0, smg = 0.0, smm = 0.0;
  for (; i < n; ++i) {
    const double gi = (double)Conv<Tag>::load(g[i]);
    const double mi = (double)m[i];
    sgg += gi * gi;
    smg += mi * gi;
    smm += mi * mi;
  }
  for (int l = 0; l < kLanes; ++l) {
    sgg += gg[l];
    smg += mg[l];
    smm += mm[l];
  }
  out[kSumGG] = sgg;
  out[kSumMG] = smg;
  out[kSumMM] = smm;
  out[kSumMMNoGrad] = 0.0;
}

// The same for a tensor without a gradient: |m|^2 into the no-grad slot.
static inline void finish_nograd(const double* lanes, const float* __restrict__ m, int64_t i, int64_t n,
                                 double* __restrict__ out) {
  double mm = 0.0;
  for (; i < n; ++i) {
    const double mi = (double)m[i];
    mm += mi * mi;
  }
  for (int l = 0; l < kLanes; ++l) mm += lanes[l];
  out[kSumGG] = 0.0;
  out[kSumMG] = 0.0;
  out[kSumMM] = 0.0;
  out[kSumMMNoGrad] = mm;
}

#if defined(MGPO_ISA_F16C)
// The vector builds (AVX2 and AVX-512 both have FMA and F16C). Auto-vectorized, the float64 loop was bound by
// the FP ports, not by memory: -ffp-contract=off keeps a multiply and an add per product, and GCC loads each
// 16-float block whole and splits it with vextractf32x8 before converting (6 mul + 6 add + 4 cvt + 2 extract
// per 16 elements, about 32 GB/s per core even in L2). Written out: per 16 elements 4 conversions from memory
// and 6 FMAs, lane l of the scheme above in vector lane l. bf16 and fp16 gradients are widened in registers
// (shift; vcvtph2ps, exact) on the way.
// The same five helpers twice, once per vector width, on purpose: each is one intrinsic of its ISA, and a
// generic wrapper over both would hide which instruction a loop compiles to.
#if defined(MGPO_ISA_AVX512)
using VecD = __m512d;  // 8 lanes
constexpr int kVecLanes = 8;
static inline __attribute__((always_inline)) VecD vzero() { return _mm512_setzero_pd(); }
static inline __attribute__((always_inline)) VecD vfma(VecD a, VecD b, VecD c) { return _mm512_fmadd_pd(a, b, c); }
static inline __attribute__((always_inline)) void vstore(double* p, VecD a) { _mm512_storeu_pd(p, a); }
static inline __attribute__((always_inline)) VecD vload(const float* p) {
  return _mm512_cvtps_pd(_mm256_loadu_ps(p));
}
static inline __attribute__((always_inline)) VecD vload(const uint16_t* p, bf16_tag) {
  const __m256i w = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16);
  return _mm512_cvtps_pd(_mm256_castsi256_ps(w));
}
static inline __attribute__((always_inline)) VecD vload(const uint16_t* p, f16_tag) {
  return _mm512_cvtps_pd(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
#else
using VecD = __m256d;  // 4 lanes
constexpr int kVecLanes = 4;
static inline __attribute__((always_inline)) VecD vzero() { return _mm256_setzero_pd(); }
static inline __attribute__((always_inline)) VecD vfma(VecD a, VecD b, VecD c) { return _mm256_fmadd_pd(a, b, c); }
static inline __attribute__((always_inline)) void vstore(double* p, VecD a) { _mm256_storeu_pd(p, a); }
static inline __attribute__((always_inline)) VecD vload(const float* p) { return _mm256_cvtps_pd(_mm_loadu_ps(p)); }
static inline __attribute__((always_inline)) VecD vload(const uint16_t* p, bf16_tag) {
  const __m128i w = _mm_slli_epi32(_mm_cvtepu16_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))), 16);
  return _mm256_cvtps_pd(_mm_castsi128_ps(w));
}
static inline __attribute__((always_inline)) VecD vload(const uint16_t* p, f16_tag) {
  return _mm256_cvtps_pd(_mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
#endif
constexpr int kVecs = kLanes / kVecLanes;  // vectors per sum: 2 (AVX-512) or 4 (AVX2)
static_assert(kLanes % kVecLanes == 0, "kLanes must be a multiple of the vector width");

template <typename Tag>
static inline __attribute__((always_inline)) VecD vload_g(const typename Storage<Tag>::type* p) {
  if constexpr (std::is_same<Tag, float>::value)
    return vload(p);
  else
    return vload(p, Tag{});
}

// One chunk's accumulators: lane l of the scheme above in vector lane l of gg/mg/mm[l / kVecLanes].
struct GradAcc {
  VecD gg[kVecs], mg[kVecs], mm[kVecs];
};

static inline __attribute__((always_inline)) void acc_init(GradAcc& a) {
  for (int k = 0; k < kVecs; ++k) a.gg[k] = a.mg[k] = a.mm[k] = vzero();
}

// Elements [i, i + kLanes) into the lanes.
template <typename Tag>
static inline __attribute__((always_inline)) void acc_row(GradAcc& a, const typename Storage<Tag>::type* __restrict__ g,
                                                          const float* __restrict__ m, int64_t i) {
  prefetch(g + i + kPrefetch);
  prefetch(m + i + kPrefetch);
#pragma GCC unroll 4
  for (int k = 0; k < kVecs; ++k) {
    const VecD gi = vload_g<Tag>(g + i + kVecLanes * k);
    const VecD mi = vload(m + i + kVecLanes * k);
    a.gg[k] = vfma(gi, gi, a.gg[k]);
    a.mg[k] = vfma(mi, gi, a.mg[k]);
    a.mm[k] = vfma(mi, mi, a.mm[k]);
  }
}

// The rows from i on, then the tail and the lanes into out.
template <typename Tag>
static inline __attribute__((always_inline)) void acc_finish(GradAcc& a, const typename Storage<Tag>::type* __restrict__ g,
                                                             const float* __restrict__ m, int64_t i, int64_t n,
                                                             double* __restrict__ out) {
  for (; i + kLanes <= n; i += kLanes) acc_row<Tag>(a, g, m, i);
  alignas(64) double lg[kLanes], lmg[kLanes], lm[kLanes];
  for (int k = 0; k < kVecs; ++k) {
    vstore(lg + kVecLanes * k, a.gg[k]);
    vstore(lmg + kVecLanes * k, a.mg[k]);
    vstore(lm + kVecLanes * k, a.mm[k]);
  }
  finish_sums<Tag>(lg, lmg, lm, g, m, i, n, out);
}

template <typename Tag>
static void reduce_grad(const typename Storage<Tag>::type* __restrict__ g, const float* __restrict__ m, int64_t n,
                        double* __restrict__ out) {
  GradAcc a;
  acc_init(a);
  acc_finish<Tag>(a, g, m, 0, n, out);
}

#if defined(MGPO_ISA_AVX512)
// Two chunks at once, each with its own lanes (the same sums as one after the other): four streams instead of
// two keep more of a core's loads in flight. With AVX2's 16 registers the 24 accumulators would spill.
template <typename Tag>
static void reduce_grad_pair(const typename Storage<Tag>::type* __restrict__ ga, const float* __restrict__ ma,
                             int64_t na, double* __restrict__ outa, const typename Storage<Tag>::type* __restrict__ gb,
                             const float* __restrict__ mb, int64_t nb, double* __restrict__ outb) {
  GradAcc a, b;
  acc_init(a);
  acc_init(b);
  const int64_t both = na < nb ? na : nb;
  int64_t i = 0;
  for (; i + kLanes <= both; i += kLanes) {
    acc_row<Tag>(a, ga, ma, i);
    acc_row<Tag>(b, gb, mb, i);
  }
  acc_finish<Tag>(a, ga, ma, i, na, outa);
  acc_finish<Tag>(b, gb, mb, i, nb, outb);
}
#endif

static void reduce_nograd(const float* __restrict__ m, int64_t n, double* __restrict__ out) {
  VecD acc[kVecs];
  for (int k = 0; k < kVecs; ++k) acc[k] = vzero();
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    prefetch(m + i + kPrefetch);
#pragma GCC unroll 4
    for (int k = 0; k < kVecs; ++k) {
      const VecD mi = vload(m + i + kVecLanes * k);
      acc[k] = vfma(mi, mi, acc[k]);
    }
  }
  alignas(64) double lanes[kLanes];
  for (int k = 0; k < kVecs; ++k) vstore(lanes + kVecLanes * k, acc[k]);
  finish_nograd(lanes, m, i, n, out);
}

#else  // base build: the same lanes, auto-vectorized (multiply, then add)

template <typename Tag>
static void reduce_grad(const typename Storage<Tag>::type* __restrict__ g, const float* __restrict__ m, int64_t n,
                        double* __restrict__ out) {
  double gg[kLanes] = {}, mg[kLanes] = {}, mm[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
#pragma omp simd
    for (int l = 0; l < kLanes; ++l) {
      const double gi = (double)Conv<Tag>::load(g[i + l]);
      const double mi = (double)m[i + l];
      gg[l] += gi * gi;
      mg[l] += mi * gi;
      mm[l] += mi * mi;
    }
  }
  finish_sums<Tag>(gg, mg, mm, g, m, i, n, out);
}

// fp16 gradients: GCC turns a fused half->double conversion into a libgcc call per element inside the lane loop,
// so blocks of g are converted to fp32 first; the lanes run on across blocks (kBlock is a multiple of kLanes):
// the same sums as the loop above.
template <>
void reduce_grad<f16_tag>(const typename Storage<f16_tag>::type* __restrict__ g, const float* __restrict__ m,
                          int64_t n, double* __restrict__ out) {
  constexpr int64_t kBlock = 512;
  static_assert(kBlock % kLanes == 0, "blocks must not split a row of lanes");
  float buf[kBlock];
  double gg[kLanes] = {}, mg[kLanes] = {}, mm[kLanes] = {};
  const int64_t nfull = n - n % kLanes;
  for (int64_t b = 0; b < nfull; b += kBlock) {
    const int64_t len = nfull - b < kBlock ? nfull - b : kBlock;
    for (int64_t i = 0; i < len; ++i) buf[i] = Conv<f16_tag>::load(g[b + i]);
    for (int64_t i = 0; i < len; i += kLanes) {
#pragma omp simd
      for (int l = 0; l < kLanes; ++l) {
        const double gi = (double)buf[i + l];
        const double mi = (double)m[b + i + l];
        gg[l] += gi * gi;
        mg[l] += mi * gi;
        mm[l] += mi * mi;
      }
    }
  }
  finish_sums<f16_tag>(gg, mg, mm, g, m, nfull, n, out);
}

static void reduce_nograd(const float* __restrict__ m, int64_t n, double* __restrict__ out) {
  double acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
#pragma omp simd
    for (int l = 0; l < kLanes; ++l) {
      const double mi = (double)m[i + l];
      acc[l] += mi * mi;
    }
  }
  finish_nograd(acc, m, i, n, out);
}
#endif

static void reduce_chunk(const PlanTensor* ts, const Chunk* chunks, int64_t c, double* partials) {
  const Chunk ch = chunks[c];
  const PlanTensor& t = ts[ch.tensor];
  const float* m = t.m + ch.start;
  double* out = partials + kSumsPerGroup * c;
  if (t.g == nullptr) {
    reduce_nograd(m, ch.len, out);
  } else if (t.dtype == kF32) {
    reduce_grad<float>(static_cast<const float*>(t.g) + ch.start, m, ch.len, out);
  } else if (t.dtype == kBF16) {
    reduce_grad<bf16_tag>(static_cast<const uint16_t*>(t.g) + ch.start, m, ch.len, out);
  } else {
    reduce_grad<f16_tag>(static_cast<const typename Storage<f16_tag>::type*>(t.g) + ch.start, m, ch.len, out);
  }
}

#if defined(MGPO_ISA_AVX512)
template <typename Tag>
static void reduce_pair_as(const PlanTensor& ta, const Chunk& a, const PlanTensor& tb, const Chunk& b, double* outa,
                           double* outb) {
  using S = typename Storage<Tag>::type;
  reduce_grad_pair<Tag>(static_cast<const S*>(ta.g) + a.start, ta.m + a.start, a.len, outa,
                        static_cast<const S*>(tb.g) + b.start, tb.m + b.start, b.len, outb);
}
#endif

// Chunks [b, e): on AVX-512, chunk b + j together with chunk b + h + j (h = half the range, two places far apart
// in memory) where both have a gradient of one dtype; every chunk's partial sums are what it gives alone.
static void reduce(const PlanTensor* ts, const Chunk* chunks, int64_t b, int64_t e, double* partials) {
#if defined(MGPO_ISA_AVX512)
  const int64_t h = (e - b) / 2;
  for (int64_t j = 0; j < h; ++j) {
    const int64_t ca = b + j, cb = b + h + j;
    const PlanTensor& ta = ts[chunks[ca].tensor];
    const PlanTensor& tb = ts[chunks[cb].tensor];
    if (ta.g == nullptr || tb.g == nullptr || ta.dtype != tb.dtype) {
      reduce_chunk(ts, chunks, ca, partials);
      reduce_chunk(ts, chunks, cb, partials);
      continue;
    }
    double* outa = partials + kSumsPerGroup * ca;
    double* outb = partials + kSumsPerGroup * cb;
    if (ta.dtype == kF32)
      reduce_pair_as<float>(ta, chunks[ca], tb, chunks[cb], outa, outb);
    else if (ta.dtype == kBF16)
      reduce_pair_as<bf16_tag>(ta, chunks[ca], tb, chunks[cb], outa, outb);
    else
      reduce_pair_as<f16_tag>(ta, chunks[ca], tb, chunks[cb], outa, outb);
  }
  for (int64_t c = b + 2 * h; c < e; ++c) reduce_chunk(ts, chunks, c, partials);
#else
  for (int64_t c = b; c < e; ++c) reduce_chunk(ts, chunks, c, partials);
#endif
}

// ---------------------------------------------------------------------------------- pass 2
template <typename Tag, bool kMaster>
static inline __attribute__((always_inline)) void update_grad_span(
    typename Storage<Tag>::type* __restrict__ p, const typename Storage<Tag>::type* __restrict__ g,
    float* __restrict__ m, float* __restrict__ v, float* __restrict__ master, int64_t n, const AdamCoefs k) {
  for (int64_t i = 0; i < n; ++i) {
    float mi = m[i];
    float vi = v[i];
    float theta = kMaster ? master[i] : mgpo_restore(Conv<Tag>::load(p[i]), mi, k.restore);
    mgpo_adamw(theta, mi, vi, Conv<Tag>::load(g[i]), k);
    if (kMaster) master[i] = theta;
    p[i] = Conv<Tag>::store(mgpo_perturb(theta, mi, k.apply));
    m[i] = mi;
    v[i] = vi;
  }
}

template <typename Tag, bool kMaster>
static void update_grad(typename Storage<Tag>::type* __restrict__ p, const typename Storage<Tag>::type* __restrict__ g,
                        float* __restrict__ m, float* __restrict__ v, float* __restrict__ master, int64_t n,
                        const AdamCoefs k) {
#if defined(MGPO_ISA_F16C)
  // Blocks of 64 elements, each stream prefetched kPrefetch ahead (one line of fp32 per 16 elements): on the
  // Xeon VM pass 2 took 13.3-14.3 -> 12.2-13.0 ms (results/2026-12-02-cpu-pass1-prefetch.txt). The elements
  // and their arithmetic are those of the plain loop, so the bits do not change.
  constexpr int64_t kB = 64;
  int64_t b = 0;
  for (; b + kB <= n; b += kB) {
#pragma GCC unroll 4
    for (int64_t j = 0; j < kB; j += 16) {
      prefetch(p + b + j + kPrefetch);
      prefetch(g + b + j + kPrefetch);
      prefetch(m + b + j + kPrefetch);
      prefetch(v + b + j + kPrefetch);
      if (kMaster) prefetch(master + b + j + kPrefetch);
    }
    update_grad_span<Tag, kMaster>(p + b, g + b, m + b, v + b, kMaster ? master + b : nullptr, kB, k);
  }
  update_grad_span<Tag, kMaster>(p + b, g + b, m + b, v + b, kMaster ? master + b : nullptr, n - b, k);
#else
  update_grad_span<Tag, kMaster>(p, g, m, v, master, n, k);
#endif
}

// No gradient this step: AdamW leaves theta, m, v alone; the perturbation moves from restore*m to apply*m.
template <typename Tag, bool kMaster>
static void update_nograd(typename Storage<Tag>::type* __restrict__ p, const float* __restrict__ m,
                          const float* __restrict__ master, int64_t n, const AdamCoefs k) {
  for (int64_t i = 0; i < n; ++i) {
    const float mi = m[i];
    const float theta = kMaster ? master[i] : mgpo_restore(Conv<Tag>::load(p[i]), mi, k.restore);
    p[i] = Conv<Tag>::store(mgpo_perturb(theta, mi, k.apply));
  }
}

#if defined(MGPO_ISA_F16C)
constexpr int64_t kF16Block = 512;

template <bool kMaster>
static void update_grad_f16(uint16_t* __restrict__ p, const uint16_t* __restrict__ g, float* __restrict__ m,
                            float* __restrict__ v, float* __restrict__ master, int64_t n, const AdamCoefs k) {
  float pb[kF16Block], gb[kF16Block];
  for (int64_t b = 0; b < n; b += kF16Block) {
    const int64_t len = n - b < kF16Block ? n - b : kF16Block;
    if (!kMaster) h2f(p + b, pb, len);  // with a master copy, p is only written
    h2f(g + b, gb, len);
    update_grad<float, kMaster>(pb, gb, m + b, v + b, kMaster ? master + b : nullptr, len, k);
    f2h(pb, p + b, len);
  }
}

template <bool kMaster>
static void update_nograd_f16(uint16_t* __restrict__ p, const float* __restrict__ m, const float* __restrict__ master,
                              int64_t n, const AdamCoefs k) {
  float pb[kF16Block];
  for (int64_t b = 0; b < n; b += kF16Block) {
    const int64_t len = n - b < kF16Block ? n - b : kF16Block;
    if (!kMaster) h2f(p + b, pb, len);
    update_nograd<float, kMaster>(pb, m + b, kMaster ? master + b : nullptr, len, k);
    f2h(pb, p + b, len);
  }
}
#endif

template <typename Tag>
static void update_chunk(const UpdTensor& t, int64_t s, int64_t n) {
  using S = typename Storage<Tag>::type;
  S* p = static_cast<S*>(t.p) + s;
  float* m = t.m + s;
#if defined(MGPO_ISA_F16C)
  if constexpr (std::is_same<Tag, f16_tag>::value) {
    if (t.g != nullptr) {
      const S* g = static_cast<const S*>(t.g) + s;
      if (t.master != nullptr)
        update_grad_f16<true>(p, g, m, t.v + s, t.master + s, n, t.k);
      else
        update_grad_f16<false>(p, g, m, t.v + s, nullptr, n, t.k);
    } else {
      if (t.master != nullptr)
        update_nograd_f16<true>(p, m, t.master + s, n, t.k);
      else
        update_nograd_f16<false>(p, m, nullptr, n, t.k);
    }
    return;
  }
#endif
  if (t.g != nullptr) {
    const S* g = static_cast<const S*>(t.g) + s;
    float* v = t.v + s;
    if (t.master != nullptr)
      update_grad<Tag, true>(p, g, m, v, t.master + s, n, t.k);
    else
      update_grad<Tag, false>(p, g, m, v, nullptr, n, t.k);
  } else {
    if (t.master != nullptr)
      update_nograd<Tag, true>(p, m, t.master + s, n, t.k);
    else
      update_nograd<Tag, false>(p, m, nullptr, n, t.k);
  }
}

static void update(const UpdTensor* ts, const Chunk* chunks, int64_t b, int64_t e) {
  for (int64_t c = b; c < e; ++c) {
    const Chunk ch = chunks[c];
    const UpdTensor& t = ts[ch.tensor];
    if (t.dtype == kF32)
      update_chunk<float>(t, ch.start, ch.len);
    else if (t.dtype == kBF16)
      update_chunk<bf16_tag>(t, ch.start, ch.len);
    else
      update_chunk<f16_tag>(t, ch.start, ch.len);
  }
}

const IsaKernels kKernels = {MGPO_ISA_NAME, &reduce, &update};

}  // namespace
}  // namespace MGPO_ISA_NS
}  // namespace cpu
}  // namespace mgpo
