// Fused DUO loss (docs/method.md §3): the full-size part of the loss in one pass forward and one pass backward.
//
// Everything that touches every voxel reduces to six sums per (sample b, included class c); the rest of the
// loss (Dice ratio, weights from S, the noise constraint R, the mean) is arithmetic on those B x K' numbers
// and is left to autograd in Python. The backward recomputes the per-voxel terms from the inputs, so
// nothing full-size is saved.
//
// The per-voxel formulas (namespace duo below) are __host__ __device__: csrc/cpu/duo_cpu.cpp and
// csrc/cuda/duo_cuda.cu both compute every voxel with them, so each formula has one home.
#pragma once
#include <cmath>
#include <cstdint>

#include "auvcore/array.h"

#if defined(__CUDACC__)
#define AUVCORE_HD_INLINE __host__ __device__ __forceinline__
#else
#define AUVCORE_HD_INLINE inline __attribute__((always_inline))
#endif

namespace auvcore {

// Per (b, c) sums, in this order, in a [B, K - c0, kDuoSums] double array.
enum DuoSum : int { kBCE = 0, kSigY = 1, kSig = 2, kY = 3, kG = 4, kG2 = 5, kDuoSums = 6 };

enum class DuoPreset : int {
  Paper = 0,     // ĝ = tanh(n), ỹ = clamp(y − τ ĝ, 0, 1), gradient into n through ỹ
  Official = 1,  // the authors' snippet: ỹ = y − σ(n)·y, no gradient into n; ĝ sums are 0
};

struct DuoArgs {
  // z (seg_logits) and n (noise_logits): [B, K, N], same shape and dtype (float32 or float64), any strides.
  ArrayView z, n;
  // target: [B, K, N] values in [0, 1] (floating or integer one-hot) or, with labels, [B, N] class indices.
  ArrayView y;
  bool labels = false;
  int64_t c0 = 0;  // first included class (1 without the background)
  DuoPreset preset = DuoPreset::Paper;
  double tau = 0.5;
};

// Per-voxel math shared by the CPU and CUDA kernels. Double inputs use the math library (libm on the host,
// CUDA's on the device; the float64 oracle tests hold them to 1e-10). Float inputs use branch-free versions
// that the CPU compiler vectorises and the GPU runs as plain FMAs: exp on x <= 0 (Cody-Waite reduction and
// the Cephes polynomial, about 1 ulp), log1p on [0, 1] (atanh series, exact to float rounding) and tanh
// (series near 0, from that exp elsewhere; relative error ~1e-7). Host code uses builtins rather than std::
// wrappers: a wrapper compiled for the default target is not inlined into the CPU's per-ISA builds, and a
// call in the loop keeps it scalar.
namespace duo {

#if defined(__CUDA_ARCH__)
AUVCORE_HD_INLINE float abs_(float x) { return fabsf(x); }
AUVCORE_HD_INLINE double abs_(double x) { return fabs(x); }
AUVCORE_HD_INLINE float floor_(float x) { return floorf(x); }
AUVCORE_HD_INLINE float copysign_(float x, float s) { return copysignf(x, s); }
AUVCORE_HD_INLINE float float_from_bits(int32_t i) { return __int_as_float(i); }
AUVCORE_HD_INLINE double exp_nonpos(double x) { return ::exp(x); }
AUVCORE_HD_INLINE double log1p_01(double e) { return ::log1p(e); }
AUVCORE_HD_INLINE double tanh_(double x) { return ::tanh(x); }
#else
AUVCORE_HD_INLINE float abs_(float x) { return __builtin_fabsf(x); }
AUVCORE_HD_INLINE double abs_(double x) { return __builtin_fabs(x); }
AUVCORE_HD_INLINE float floor_(float x) { return __builtin_floorf(x); }
AUVCORE_HD_INLINE float copysign_(float x, float s) { return __builtin_copysignf(x, s); }
AUVCORE_HD_INLINE float float_from_bits(int32_t i) { return __builtin_bit_cast(float, i); }
AUVCORE_HD_INLINE double exp_nonpos(double x) { return std::exp(x); }
AUVCORE_HD_INLINE double log1p_01(double e) { return std::log1p(e); }
AUVCORE_HD_INLINE double tanh_(double x) { return std::tanh(x); }
#endif
template <typename T>
AUVCORE_HD_INLINE T max_(T a, T b) { return a > b ? a : b; }
template <typename T>
AUVCORE_HD_INLINE T min_(T a, T b) { return a < b ? a : b; }

AUVCORE_HD_INLINE float exp_nonpos(float x) {
  x = max_(x, -87.0f);
  const float k = floor_(x * 1.44269504088896341f + 0.5f);
  const float r = x - k * 0.693359375f + k * 2.12194440e-4f;
  float q = 1.9875691500e-4f;
  q = q * r + 1.3981999507e-3f;
  q = q * r + 8.3334519073e-3f;
  q = q * r + 4.1665795894e-2f;
  q = q * r + 1.6666665459e-1f;
  q = q * r + 5.0000001201e-1f;
  q = q * r * r + r + 1.0f;
  return q * float_from_bits(((int32_t)k + 127) << 23);
}
AUVCORE_HD_INLINE float log1p_01(float e) {
  const float s = e / (2.0f + e), s2 = s * s;  // log(1 + e) = 2 atanh(s), s in [0, 1/3]
  float q = 1.0f / 15;
  q = q * s2 + 1.0f / 13;
  q = q * s2 + 1.0f / 11;
  q = q * s2 + 1.0f / 9;
  q = q * s2 + 1.0f / 7;
  q = q * s2 + 1.0f / 5;
  q = q * s2 + 1.0f / 3;
  q = q * s2 + 1.0f;
  return 2.0f * s * q;
}
AUVCORE_HD_INLINE float tanh_(float x) {
  // Near 0 the Taylor series keeps the relative accuracy that the sign of ỹ's clamp argument, y − τ ĝ,
  // depends on (the gradient mask flips there); elsewhere (1 − t)/(1 + t), t = e^{−2|x|}.
  const float x2 = x * x;
  const float small = x * (1.0f + x2 * (-1.0f / 3 + x2 * (2.0f / 15 + x2 * (-17.0f / 315 + x2 * (62.0f / 2835)))));
  const float t = exp_nonpos(-2.0f * abs_(x));
  const float big = copysign_((1.0f - t) / (1.0f + t), x);
  return abs_(x) < 0.25f ? small : big;
}

// The values every pass needs at one voxel: σ(z), softplus(z), ĝ and ỹ.
template <typename T>
struct Voxel {
  T sig, softplus, g, yt;
  bool inside;  // ỹ's clamp passes the gradient (torch.clamp: lo <= x <= hi)
};

template <typename T>
AUVCORE_HD_INLINE Voxel<T> voxel(T z, T n, T y, DuoPreset preset, T tau, bool need_softplus) {
  Voxel<T> v;
  const T e = exp_nonpos(-abs_(z));
  const T inv = T(1) / (T(1) + e);
  v.sig = z >= T(0) ? inv : e * inv;
  v.softplus = need_softplus ? max_(z, T(0)) + log1p_01(e) : T(0);
  if (preset == DuoPreset::Paper) {
    v.g = tanh_(n);
    const T x = y - tau * v.g;
    v.inside = x >= T(0) && x <= T(1);
    v.yt = min_(max_(x, T(0)), T(1));
  } else {
    const T en = exp_nonpos(-abs_(n));
    const T sn = n >= T(0) ? T(1) / (T(1) + en) : en / (T(1) + en);
    v.g = T(0);
    v.inside = false;
    v.yt = y - sn * y;
  }
  return v;
}

// The voxel's terms of the six sums, in DuoSum order: BCE(z, ỹ) = softplus(z) − z ỹ, σ(z) ỹ, σ(z), ỹ, ĝ, ĝ².
template <typename T>
AUVCORE_HD_INLINE void sum_terms(const Voxel<T>& v, T z, T* out) {
  out[kBCE] = v.softplus - z * v.yt;
  out[kSigY] = v.sig * v.yt;
  out[kSig] = v.sig;
  out[kY] = v.yt;
  out[kG] = v.g;
  out[kG2] = v.g * v.g;
}

// The backward at one voxel from dL/d(sums) of its (b, c): gb, gsy, gs, gy, gg, gg2 in DuoSum order.
// d/dz of softplus(z) − z ỹ, σ(z) ỹ and σ(z):
template <typename T>
AUVCORE_HD_INLINE T grad_z(const Voxel<T>& v, T gb, T gsy, T gs) {
  const T dsig = v.sig * (T(1) - v.sig);
  return gb * (v.sig - v.yt) + (gsy * v.yt + gs) * dsig;
}
// d/dn (paper preset): ỹ = clamp(y − τ ĝ): d/dỹ of the sums, then dỹ/dĝ = −τ inside the clamp; ĝ and ĝ²
// directly; dĝ/dn = 1 − ĝ². (The official preset's ỹ is detached: no gradient reaches n.)
template <typename T>
AUVCORE_HD_INLINE T grad_n(const Voxel<T>& v, T z, T tau, T gb, T gsy, T gy, T gg, T gg2) {
  const T dyt = -gb * z + gsy * v.sig + gy;
  const T dg = (v.inside ? -tau * dyt : T(0)) + gg + gg2 * T(2) * v.g;
  return dg * (T(1) - v.g * v.g);
}

}  // namespace duo

// The shapes and dtypes of a, each error naming the argument (seg_logits, noise_logits, target, ...). The CPU
// kernels read float32/float64 logits; the CUDA ones (half_ok) also float16/bfloat16, computing in float.
inline void check_duo_args(const DuoArgs& a, bool half_ok = false) {
  require(a.z.dim() == 3, "seg_logits: expected [B, K, N] view");
  if (half_ok)
    require(is_floating(a.z.dtype), "seg_logits: expected float16, bfloat16, float32 or float64");
  else
    require(a.z.dtype == DType::F32 || a.z.dtype == DType::F64, "seg_logits: expected float32 or float64");
  require(a.n.shape == a.z.shape, "noise_logits: shape differs from seg_logits");
  require(a.n.dtype == a.z.dtype, "noise_logits: dtype differs from seg_logits");
  if (a.labels)
    require(a.y.dim() == 2 && a.y.shape[0] == a.z.shape[0] && a.y.shape[1] == a.z.shape[2],
            "target: expected [B, N] class indices");
  else
    require(a.y.shape == a.z.shape, "target: shape differs from seg_logits");
  require(a.y.dtype != DType::F16 && a.y.dtype != DType::BF16,
          "target: expected float32, float64 or an integer dtype");
  require(a.c0 >= 0 && a.c0 < a.z.shape[1], "include_background: no class left to include");
}

// sums: [B, K - c0, kDuoSums]. Throws ArgumentError naming seg_logits / noise_logits / target for NaN/Inf
// or out-of-range targets.
void duo_forward_cpu(const DuoArgs& a, double* sums, int num_threads);

// grad_sums: dL/d(sums), same layout. dz, dn: [B, K, N] outputs of z's dtype (any strides); classes below c0
// get 0; with the official preset dn may be a null view (ptr 0) since no gradient reaches n.
void duo_backward_cpu(const DuoArgs& a, const double* grad_sums, const ArrayView& dz, const ArrayView& dn,
                      int num_threads);

}  // namespace auvcore
