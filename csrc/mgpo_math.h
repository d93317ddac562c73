// Per-element and scalar-stage math of one MGPO step, shared by the CPU and the CUDA kernels.
//
// The semantics are mgpo_kernels/backends/reference.py (pass 1 sums -> reduce_hook -> scalar_stage -> pass 2):
//   pass 1  sums[4k:4k+4] = [|g|^2, <m,g>, |m|^2 (with grad), |m|^2 (without grad)]   (raw grads, m = m_{t-1})
//   scalar  c (unscale*clip), skip, gbar_t, coef_t; restore = coef_{t-1} when the training forward applied
//           eps_t = coef_{t-1}*m_{t-1} (else 0); apply = 0: a step leaves theta_{t+1} at rest (the next training
//           forward applies eps_{t+1} with the perturb op: apply = coef_t, restore = 0, no gradients)
//   pass 2  theta = p - restore*m (or the fp32 master); AdamW; p = theta + apply*m_t
//           a skipped step (non-finite gradients) still runs pass 2 without gradients when restore != 0, so the
//           parameters are back at theta_t
//
// Everything here is header-only, dtype-agnostic (fp32 in, fp32 out; loads/stores of bf16/fp16 are the
// caller's), has internal linkage (`static`), and includes nothing: the CPU ISA translation units include it
// under different target options, so no inline function of it may be shared between them (ODR).
#pragma once

#if defined(__CUDACC__)
#define MGPO_FN static __host__ __device__ __forceinline__
#else
#define MGPO_FN static inline __attribute__((always_inline))
#endif

namespace mgpo {

constexpr int kSumsPerGroup = 4;  // backends/base.py SUMS_PER_GROUP
enum SumSlot { kSumGG = 0, kSumMG = 1, kSumMM = 2, kSumMMNoGrad = 3 };

// Layout of the small fp32 tensor the scalar stage produces and pass 2 reads ("scal").
enum ScalSlot { kScalC = 0, kScalRestore = 1, kScalApply = 2, kScalSkip = 3 };
constexpr int kScalSize = 4;

enum DTypeCode { kF32 = 0, kBF16 = 1, kF16 = 2 };

// The device's functions under nvcc's device pass, the compiler's builtins on the host (no <cmath>: see above).
#if defined(__CUDA_ARCH__)
MGPO_FN bool mgpo_isfinite(double x) { return isfinite(x); }
MGPO_FN double mgpo_sqrt(double x) { return sqrt(x); }
MGPO_FN double mgpo_pow(double x, double y) { return pow(x, y); }
MGPO_FN float mgpo_sqrtf(float x) { return sqrtf(x); }  // IEEE-rounded with nvcc's default -prec-sqrt=true
#else
MGPO_FN bool mgpo_isfinite(double x) { return __builtin_isfinite(x); }
MGPO_FN double mgpo_sqrt(double x) { return __builtin_sqrt(x); }
MGPO_FN double mgpo_pow(double x, double y) { return __builtin_pow(x, y); }
MGPO_FN float mgpo_sqrtf(float x) { return __builtin_sqrtf(x); }  // vectorizes (vsqrtps) with -fno-math-errno
#endif

// ------------------------------------------------------------------------------------------ scalar stage
struct ScalarConfig {
  double rho;
  double ema_beta;
  double sign;           // +1 "momentum", -1 "-momentum"
  double max_grad_norm;  // used when has_max_grad_norm
  int has_max_grad_norm;
  int adaptive_norm;
  int perturbed;         // the parameters hold theta + coef_old*m (a training forward applied eps): restore it
  double gbar_floor;     // the bound: 1/gbar in the coefficient is at most 1/gbar_floor (0: the paper's formula)
};

struct ScalarResult {
  float c;        // unscale * clip factor applied to raw gradients
  float restore;  // coefficient removed from p (coef_{t-1} when eps was applied, else 0)
  float apply;    // coefficient applied after the update: 0 for a step (theta at rest); coef for the apply pass
  int skip;       // non-finite gradients or GradScaler found_inf
  float gbar_new;
  float coef_new;
};

// reference.scalar_stage, operation by operation (float64 where it is float64, float32 where it is float32).
// sums: 4*G doubles; beta1s: G doubles; grad_scale/found_inf: nullptr when absent.
MGPO_FN ScalarResult mgpo_scalar_stage(const double* sums, const double* beta1s, int num_groups,
                                       const ScalarConfig& cfg, float step, float gbar_old, float coef_old,
                                       const float* grad_scale, const float* found_inf) {
  double s_gg = 0.0;
  for (int k = 0; k < num_groups; ++k) s_gg += sums[kSumsPerGroup * k + kSumGG];
  double inv_scale = 1.0;
  if (grad_scale != nullptr) inv_scale = 1.0 / (double)(*grad_scale);
  const double raw_norm = mgpo_sqrt(s_gg) * inv_scale;
  double clip = 1.0;
  if (cfg.has_max_grad_norm) {
    // torch.nn.utils.clip_grad_norm_: min(1, max / (norm + 1e-6)) in fp32 (python: reciprocal() * max).
    const float d = (float)raw_norm + 1e-6f;
    float cf = (1.0f / d) * (float)cfg.max_grad_norm;
    cf = cf > 1.0f ? 1.0f : cf;  // clamp(max=1) keeps NaN
    clip = (double)cf;
  }
  const double c = inv_scale * clip;
  const double n_t = raw_norm * clip;
  int skip = !mgpo_isfinite(s_gg);
  if (found_inf != nullptr && *found_inf > 0.0f) skip = 1;

  const double gbar_new =
      step == 0.0f ? n_t : cfg.ema_beta * (double)gbar_old + (1.0 - cfg.ema_beta) * n_t;

  double mm = 0.0;
  for (int k = 0; k < num_groups; ++k) {
    const double* s = sums + kSumsPerGroup * k;
    const double b1 = beta1s[k];
    const double omb = 1.0 - b1;
    mm = mm + ((((b1 * b1) * s[kSumMM] + ((2.0 * b1 * omb) * c) * s[kSumMG]) + (((omb * omb) * c) * c) * s[kSumGG]) +
               s[kSumMMNoGrad]);
  }
  const double m_norm = mgpo_sqrt(mm < 0.0 ? 0.0 : mm);
  // The bound on the perturbation: ||eps|| = rho / gbar grows without limit as the gradients vanish, so gbar is
  // floored here (and only here); inactive while gbar >= gbar_floor.
  const double gbar_eff = gbar_new < cfg.gbar_floor ? cfg.gbar_floor : gbar_new;
  const double denom = cfg.adaptive_norm ? m_norm * gbar_eff : m_norm;
  double coef_new = (cfg.sign * cfg.rho) / denom;
  if (!(mgpo_isfinite(coef_new) && denom > 0.0)) coef_new = 0.0;

  ScalarResult r;
  r.c = (float)c;
  r.skip = skip;
  r.gbar_new = (float)gbar_new;
  r.coef_new = (float)coef_new;
  r.restore = cfg.perturbed ? coef_old : 0.0f;
  r.apply = 0.0f;  // theta at rest: the step never leaves eps in the parameters
  return r;
}

// ------------------------------------------------------------------------------------------ per tensor
// Coefficients of pass 2 for one tensor (fp32, as the element math uses them).
struct AdamCoefs {
  float c, restore, apply;
  float decay;      // 1 - lr*wd
  float b1, omb1;   // beta1, 1 - beta1
  float b2, omb2;
  float step_size;  // lr / (1 - beta1^t)
  float sqrt_bc2;   // sqrt(1 - beta2^t)
  float eps;
};

// `step` is the tensor's step count after this step's increment (t >= 1).
// As torch.optim.AdamW computes them: bias corrections, lr / (1 - beta1^t), sqrt(1 - beta2^t) and 1 - lr*wd in
// float64 from the exact (double) betas, each rounded to fp32 once where the element math uses it (in fp32,
// 1 - 0.999f^1 would be off by 1.3e-5 relative).  lr is the fp32 value of the group's lr.
MGPO_FN AdamCoefs mgpo_tensor_coefs(float c, float restore, float apply, float lr, double beta1, double beta2,
                                    double eps, double weight_decay, float step) {
  AdamCoefs k;
  k.c = c;
  k.restore = restore;
  k.apply = apply;
  k.decay = (float)(1.0 - (double)lr * weight_decay);
  k.b1 = (float)beta1;
  k.omb1 = (float)(1.0 - beta1);
  k.b2 = (float)beta2;
  k.omb2 = (float)(1.0 - beta2);
  const double bc1 = 1.0 - mgpo_pow(beta1, (double)step);
  const double bc2 = 1.0 - mgpo_pow(beta2, (double)step);
  k.step_size = (float)((double)lr / bc1);
  k.sqrt_bc2 = (float)mgpo_sqrt(bc2);
  k.eps = (float)eps;
  return k;
}

// ------------------------------------------------------------------------------------------ per element
// theta_t = p - coef_{t-1} * m_{t-1}    (fp32 params restored in place; bf16/fp16 read their master instead)
MGPO_FN float mgpo_restore(float p, float m, float restore) { return p - restore * m; }

// One AdamW element update exactly as torch.optim.AdamW (decoupled decay, eps outside the sqrt).
// g is the raw gradient; c turns it into g_t (unscale and clip).
MGPO_FN void mgpo_adamw(float& theta, float& m, float& v, float g, const AdamCoefs& k) {
  const float gt = g * k.c;
  theta = theta * k.decay;
  m = m * k.b1 + gt * k.omb1;
  v = v * k.b2 + (gt * gt) * k.omb2;
  const float denom = mgpo_sqrtf(v) / k.sqrt_bc2 + k.eps;
  theta = theta - (k.step_size * m) / denom;
}

// p_{t+1} = theta_{t+1} + coef_t * m_t
MGPO_FN float mgpo_perturb(float theta, float m, float apply) { return theta + apply * m; }

}  // namespace mgpo
