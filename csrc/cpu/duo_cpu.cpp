// Fused DUO loss kernels (docs/method.md §3).
#include "auvcore/duo.h"

// The per-voxel loops select between both sides of a ternary; with trapping math GCC keeps them as branches
// and does not vectorise. No FP exception state is read anywhere in the library.
#pragma GCC optimize("no-trapping-math")


#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "auvcore/isa.h"
#include "auvcore/scale.h"

namespace auvcore {
namespace {

constexpr int64_t kVoxChunk = 16384;  // voxels per work unit: enough to amortise, small enough to balance

// (b, c, chunk) work units in a fixed order, so the partial sums, and hence the result, do not depend on
// the number of threads.
struct Units {
  int64_t B, C, N, nchunk;
  int64_t count() const { return B * C * nchunk; }
};

// Small inputs run on fewer threads than units: an idle OpenMP team costs more than the work when the
// machine is busy.
inline int team(int nt, int64_t units) { return (int)std::max<int64_t>(1, std::min<int64_t>(nt, units)); }

template <typename Fn>
void dispatch(const DuoArgs& a, Fn&& fn) {
  auto with_y = [&](auto tz) {
    using T = decltype(tz);
    switch (a.y.dtype) {
      case DType::F32: fn(T{}, float{}); break;
      case DType::F64: fn(T{}, double{}); break;
      case DType::U8: fn(T{}, uint8_t{}); break;
      case DType::I8: fn(T{}, int8_t{}); break;
      case DType::I16: fn(T{}, int16_t{}); break;
      case DType::I32: fn(T{}, int32_t{}); break;
      case DType::I64: fn(T{}, int64_t{}); break;
      default: throw ArgumentError("target: expected float32, float64 or an integer dtype");
    }
  };
  if (a.z.dtype == DType::F64) with_y(double{});
  else with_y(float{});
}


// Per-voxel math. Double inputs use libm (the float64 oracle tests hold them to 1e-10). Float inputs use
// branch-free versions that the compiler vectorises: exp on x <= 0 (Cody-Waite reduction and the Cephes
// polynomial, about 1 ulp), log1p on [0, 1] (atanh series, exact to float rounding) and tanh (series near
// 0, from that exp elsewhere; relative error ~1e-7).
#define AUVCORE_INLINE inline __attribute__((always_inline))

// Builtins rather than std:: wrappers: a wrapper compiled for the default target is not inlined into the
// per-ISA builds, and a call in the loop keeps it scalar.
AUVCORE_INLINE float abs_(float x) { return __builtin_fabsf(x); }
AUVCORE_INLINE double abs_(double x) { return __builtin_fabs(x); }
template <typename T>
AUVCORE_INLINE T max_(T a, T b) { return a > b ? a : b; }
template <typename T>
AUVCORE_INLINE T min_(T a, T b) { return a < b ? a : b; }

AUVCORE_INLINE double exp_nonpos(double x) { return std::exp(x); }
AUVCORE_INLINE double log1p_01(double e) { return std::log1p(e); }
AUVCORE_INLINE double tanh_(double x) { return std::tanh(x); }

AUVCORE_INLINE float exp_nonpos(float x) {
  x = max_(x, -87.0f);
  const float k = __builtin_floorf(x * 1.44269504088896341f + 0.5f);
  const float r = x - k * 0.693359375f + k * 2.12194440e-4f;
  float q = 1.9875691500e-4f;
  q = q * r + 1.3981999507e-3f;
  q = q * r + 8.3334519073e-3f;
  q = q * r + 4.1665795894e-2f;
  q = q * r + 1.6666665459e-1f;
  q = q * r + 5.0000001201e-1f;
  q = q * r * r + r + 1.0f;
  return q * __builtin_bit_cast(float, ((int32_t)k + 127) << 23);
}
AUVCORE_INLINE float log1p_01(float e) {
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
AUVCORE_INLINE float tanh_(float x) {
  // Near 0 the Taylor series keeps the relative accuracy that the sign of ỹ's clamp argument, y − τ ĝ,
  // depends on (the gradient mask flips there); elsewhere (1 − t)/(1 + t), t = e^{−2|x|}.
  const float x2 = x * x;
  const float small = x * (1.0f + x2 * (-1.0f / 3 + x2 * (2.0f / 15 + x2 * (-17.0f / 315 + x2 * (62.0f / 2835)))));
  const float t = exp_nonpos(-2.0f * abs_(x));
  const float big = __builtin_copysignf((1.0f - t) / (1.0f + t), x);
  return abs_(x) < 0.25f ? small : big;
}

// The values every pass needs at one voxel: σ(z), softplus(z), ĝ and ỹ.
template <typename T>
struct Voxel {
  T sig, softplus, g, yt;
  bool inside;  // ỹ's clamp passes the gradient (torch.clamp: lo <= x <= hi)
};

template <typename T>
AUVCORE_INLINE Voxel<T> voxel(T z, T n, T y, DuoPreset preset, T tau, bool need_softplus) {
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

constexpr int kLanes = 16, kFlush = 64;

template <typename T, typename Y, bool kLabels, DuoPreset kPreset>
AUVCORE_INLINE void forward_voxel(T zv, T nv, Y raw, int64_t c, int64_t K, T tau, T (*acc)[kLanes], int j,
                                  int& bad_finite, int& bad_range) {
  T yv;
  if (kLabels) {
    bad_range |= (int)((int64_t)raw < 0) | (int)((int64_t)raw >= K);
    yv = (int64_t)raw == c ? T(1) : T(0);
  } else {
    yv = (T)raw;
    bad_range |= (int)!(yv >= T(0) && yv <= T(1));  // also true for NaN
  }
  bad_finite |= (int)!(abs_(zv) <= std::numeric_limits<T>::max()) |
                (int)!(abs_(nv) <= std::numeric_limits<T>::max());
  const Voxel<T> v = voxel<T>(zv, nv, yv, kPreset, tau, true);
  acc[kBCE][j] += v.softplus - zv * v.yt;
  acc[kSigY][j] += v.sig * v.yt;
  acc[kSig][j] += v.sig;
  acc[kY][j] += v.yt;
  acc[kG][j] += v.g;
  acc[kG2][j] += v.g * v.g;
}

// The sums of one (b, c) over voxels [t0, t1). flags: 1 = a non-finite logit, 2 = a target out of range.
// kLanes independent partial sums, each over every kLanes-th voxel, so the inner loop vectorises without
// reassociating anything (the result does not depend on the vector width); flushed into double every
// kFlush rounds so that float partials stay short. The label/preset choices are template arguments: a
// branch in the loop body would keep it scalar.
template <typename T, typename Y, bool kLabels, DuoPreset kPreset>
AUVCORE_INLINE void forward_chunk_body(const T* z, int64_t zs, const T* n, int64_t ns, const Y* y, int64_t ys,
                                       int64_t t0, int64_t t1, int64_t c, int64_t K, T tau, double* s, int& flags) {
  T acc[kDuoSums][kLanes] = {};
  int bf[kLanes] = {}, br[kLanes] = {};
  auto flush = [&]() {
    for (int k = 0; k < kDuoSums; ++k)
      for (int j = 0; j < kLanes; ++j) {
        s[k] += acc[k][j];
        acc[k][j] = T(0);
      }
  };
  int rounds = 0;
  int64_t t = t0;
  for (; t + kLanes <= t1; t += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      const int64_t i = t + j;
      forward_voxel<T, Y, kLabels, kPreset>(z[i * zs], n[i * ns], y[i * ys], c, K, tau, acc, j, bf[j], br[j]);
    }
    if (++rounds == kFlush) {
      flush();
      rounds = 0;
    }
  }
  int bad_finite = 0, bad_range = 0;
  for (int j = 0; j < kLanes; ++j) {
    bad_finite |= bf[j];
    bad_range |= br[j];
  }
  for (int j = 0; t < t1; ++t, ++j)  // the tail, fewer than kLanes voxels, one per lane
    forward_voxel<T, Y, kLabels, kPreset>(z[t * zs], n[t * ns], y[t * ys], c, K, tau, acc, j, bad_finite,
                                          bad_range);
  flush();
  flags |= (bad_finite ? 1 : 0) | (bad_range ? 2 : 0);
}

template <typename T, typename Y, bool kLabels, DuoPreset kPreset>
AUVCORE_INLINE void backward_chunk_body(const T* z, int64_t zs, const T* n, int64_t ns, const Y* y, int64_t ys,
                                        int64_t t0, int64_t t1, int64_t c, T tau, const double* g, T* dz,
                                        int64_t dzs, T* dn, int64_t dns) {
  const T gb = (T)g[kBCE], gsy = (T)g[kSigY], gs = (T)g[kSig], gy = (T)g[kY], gg = (T)g[kG], gg2 = (T)g[kG2];
  const bool want_dn = dn != nullptr;
  for (int64_t t = t0; t < t1; ++t) {
    const T zv = z[t * zs], nv = n[t * ns];
    const Y raw = y[t * ys];
    const T yv = kLabels ? ((int64_t)raw == c ? T(1) : T(0)) : (T)raw;
    const Voxel<T> v = voxel<T>(zv, nv, yv, kPreset, tau, false);
    const T dsig = v.sig * (T(1) - v.sig);
    // d/dz of: softplus(z) − z ỹ,  σ(z) ỹ,  σ(z)
    dz[t * dzs] = gb * (v.sig - v.yt) + (gsy * v.yt + gs) * dsig;
    if (kPreset == DuoPreset::Paper && want_dn) {  // a loop invariant: the compiler unswitches it
      // ỹ = clamp(y − τ ĝ): d/dỹ of the sums, then dỹ/dĝ = −τ inside the clamp; ĝ and ĝ² directly.
      const T dyt = -gb * zv + gsy * v.sig + gy;
      const T dg = (v.inside ? -tau * dyt : T(0)) + gg + gg2 * T(2) * v.g;
      dn[t * dns] = dg * (T(1) - v.g * v.g);
    }
  }
}

// Compile-time choices for the loop bodies: unit strides (the vectorised case), labels or soft targets,
// and the preset (the official one writes no dn).
template <typename T, typename Y, typename Body>
AUVCORE_INLINE void with_choices(bool unit, bool labels, DuoPreset preset, Body&& body) {
  auto p = [&](auto lab, auto unit_stride) {
    if (preset == DuoPreset::Paper)
      body(lab, std::integral_constant<DuoPreset, DuoPreset::Paper>{}, unit_stride);
    else
      body(lab, std::integral_constant<DuoPreset, DuoPreset::Official>{}, unit_stride);
  };
  auto l = [&](auto unit_stride) {
    if (labels) p(std::true_type{}, unit_stride);
    else p(std::false_type{}, unit_stride);
  };
  if (unit) l(std::true_type{});
  else l(std::false_type{});
}

#define AUVCORE_DUO_BUILD(SUFFIX, TARGET)                                                                        \
  template <typename T, typename Y>                                                                              \
  TARGET void forward_chunk_##SUFFIX(bool labels, DuoPreset preset, const T* z, int64_t zs, const T* n,          \
                                     int64_t ns, const Y* y, int64_t ys, int64_t t0, int64_t t1, int64_t c,      \
                                     int64_t K, T tau, double* s, int& flags) {                                  \
    with_choices<T, Y>(zs == 1 && ns == 1 && ys == 1, labels, preset, [&](auto lab, auto pre, auto unit) {      \
      constexpr bool u = decltype(unit)::value;                                                                  \
      forward_chunk_body<T, Y, decltype(lab)::value, decltype(pre)::value>(                                      \
          z, u ? 1 : zs, n, u ? 1 : ns, y, u ? 1 : ys, t0, t1, c, K, tau, s, flags);                            \
    });                                                                                                          \
  }                                                                                                              \
  template <typename T, typename Y>                                                                              \
  TARGET void backward_chunk_##SUFFIX(bool labels, DuoPreset preset, const T* z, int64_t zs, const T* n,         \
                                      int64_t ns, const Y* y, int64_t ys, int64_t t0, int64_t t1, int64_t c,     \
                                      T tau, const double* g, T* dz, int64_t dzs, T* dn, int64_t dns) {          \
    const bool unit = zs == 1 && ns == 1 && ys == 1 && dzs == 1 && (dn == nullptr || dns == 1);                 \
    with_choices<T, Y>(unit, labels, preset, [&](auto lab, auto pre, auto unit_) {                              \
      constexpr bool u = decltype(unit_)::value;                                                                 \
      backward_chunk_body<T, Y, decltype(lab)::value, decltype(pre)::value>(                                     \
          z, u ? 1 : zs, n, u ? 1 : ns, y, u ? 1 : ys, t0, t1, c, tau, g, dz, u ? 1 : dzs, dn, u ? 1 : dns);     \
    });                                                                                                          \
  }
AUVCORE_DUO_BUILD(avx512, AUVCORE_TARGET_AVX512)
AUVCORE_DUO_BUILD(avx2, AUVCORE_TARGET_AVX2)
AUVCORE_DUO_BUILD(generic, )
#undef AUVCORE_DUO_BUILD

template <typename T, typename Y>
void forward_chunk(const DuoArgs& a, const T* z, int64_t zs, const T* n, int64_t ns, const Y* y, int64_t ys,
                   int64_t t0, int64_t t1, int64_t c, int64_t K, T tau, double* s, int& flags) {
  auto fn = isa_level() == 2 ? forward_chunk_avx512<T, Y>
            : isa_level() == 1 ? forward_chunk_avx2<T, Y>
                               : forward_chunk_generic<T, Y>;
  fn(a.labels, a.preset, z, zs, n, ns, y, ys, t0, t1, c, K, tau, s, flags);
}

template <typename T, typename Y>
void backward_chunk(const DuoArgs& a, const T* z, int64_t zs, const T* n, int64_t ns, const Y* y, int64_t ys,
                    int64_t t0, int64_t t1, int64_t c, T tau, const double* g, T* dz, int64_t dzs, T* dn,
                    int64_t dns) {
  auto fn = isa_level() == 2 ? backward_chunk_avx512<T, Y>
            : isa_level() == 1 ? backward_chunk_avx2<T, Y>
                               : backward_chunk_generic<T, Y>;
  fn(a.labels, a.preset, z, zs, n, ns, y, ys, t0, t1, c, tau, g, dz, dzs, dn, dns);
}

template <typename T, typename Y>
void forward_impl(const DuoArgs& a, double* sums, int nt) {
  const int64_t B = a.z.shape[0], K = a.z.shape[1], N = a.z.shape[2], C = K - a.c0;
  const Units U{B, C, N, (N + kVoxChunk - 1) / kVoxChunk};
  std::vector<double> partial((size_t)U.count() * kDuoSums, 0.0);
  const T* zp = reinterpret_cast<const T*>(a.z.ptr);
  const T* np = reinterpret_cast<const T*>(a.n.ptr);
  const Y* yp = reinterpret_cast<const Y*>(a.y.ptr);
  const T tau = (T)a.tau;
  std::atomic<bool> bad_z{false}, bad_n{false}, bad_y{false};
  double bad_value = 0.0;

#pragma omp parallel for schedule(dynamic, 1) num_threads(team(nt, U.count()))
  for (int64_t u = 0; u < U.count(); ++u) {
    const int64_t b = u / (C * U.nchunk), c = a.c0 + (u / U.nchunk) % C, t0 = (u % U.nchunk) * kVoxChunk;
    const int64_t t1 = std::min(N, t0 + kVoxChunk);
    const int64_t zb = b * a.z.strides[0] + c * a.z.strides[1], zs = a.z.strides[2];
    const int64_t nb = b * a.n.strides[0] + c * a.n.strides[1], ns = a.n.strides[2];
    const int64_t yb = a.labels ? b * a.y.strides[0] : b * a.y.strides[0] + c * a.y.strides[1];
    const int64_t ys = a.labels ? a.y.strides[1] : a.y.strides[2];
    double s[kDuoSums] = {0, 0, 0, 0, 0, 0};
    int flags = 0;
    forward_chunk<T, Y>(a, zp + zb, zs, np + nb, ns, yp + yb, ys, t0, t1, c, K, tau, s, flags);
    const bool finite = !(flags & 1), in_range = !(flags & 2);
    if (!finite) {
      for (int64_t t = t0; t < t1; ++t) {
        if (!std::isfinite(zp[zb + t * zs])) bad_z = true;
        if (!std::isfinite(np[nb + t * ns])) bad_n = true;
      }
    }
    if (!in_range) {
      double first_bad = 0.0;
      for (int64_t t = t0; t < t1; ++t) {
        const Y raw = yp[yb + t * ys];
        const bool ok = a.labels ? (int64_t)raw >= 0 && (int64_t)raw < K : (double)raw >= 0.0 && (double)raw <= 1.0;
        if (!ok) {
          first_bad = (double)raw;
          break;
        }
      }
#pragma omp critical(duo_bad_target)
      {
        if (!bad_y) bad_value = first_bad;
        bad_y = true;
      }
    }
    std::copy(s, s + kDuoSums, partial.begin() + u * kDuoSums);
  }
  if (bad_z) throw ArgumentError("seg_logits: contains NaN or Inf");
  if (bad_n) throw ArgumentError("noise_logits: contains NaN or Inf");
  if (bad_y) {
    if (a.labels)
      throw ArgumentError("target: label value " + std::to_string((long long)bad_value) + " is outside 0.." +
                          std::to_string(K - 1) + " (num_classes=" + std::to_string(K) + ")");
    throw ArgumentError("target: values must lie in [0, 1], found " + std::to_string(bad_value));
  }
  std::fill(sums, sums + B * C * kDuoSums, 0.0);
  for (int64_t u = 0; u < U.count(); ++u) {
    double* dst = sums + (u / U.nchunk) * kDuoSums;
    for (int k = 0; k < kDuoSums; ++k) dst[k] += partial[u * kDuoSums + k];
  }
}

template <typename T, typename Y>
void backward_impl(const DuoArgs& a, const double* gsums, const ArrayView& dz, const ArrayView& dn, int nt) {
  const int64_t B = a.z.shape[0], K = a.z.shape[1], N = a.z.shape[2], C = K - a.c0;
  const Units U{B, K, N, (N + kVoxChunk - 1) / kVoxChunk};  // all classes: excluded ones get zeros
  const T* zp = reinterpret_cast<const T*>(a.z.ptr);
  const T* np = reinterpret_cast<const T*>(a.n.ptr);
  const Y* yp = reinterpret_cast<const Y*>(a.y.ptr);
  T* dzp = reinterpret_cast<T*>(dz.ptr);
  T* dnp = reinterpret_cast<T*>(dn.ptr);
  const T tau = (T)a.tau;

#pragma omp parallel for schedule(dynamic, 1) num_threads(team(nt, U.count()))
  for (int64_t u = 0; u < U.count(); ++u) {
    const int64_t b = u / (K * U.nchunk), c = (u / U.nchunk) % K, t0 = (u % U.nchunk) * kVoxChunk;
    const int64_t t1 = std::min(N, t0 + kVoxChunk);
    const int64_t ob = b * dz.strides[0] + c * dz.strides[1], os = dz.strides[2];
    const int64_t onb = dnp ? b * dn.strides[0] + c * dn.strides[1] : 0, ons = dnp ? dn.strides[2] : 0;
    if (c < a.c0) {
      for (int64_t t = t0; t < t1; ++t) dzp[ob + t * os] = T(0);
      if (dnp)
        for (int64_t t = t0; t < t1; ++t) dnp[onb + t * ons] = T(0);
      continue;
    }
    const double* g = gsums + (b * C + (c - a.c0)) * kDuoSums;
    const int64_t zb = b * a.z.strides[0] + c * a.z.strides[1], zs = a.z.strides[2];
    const int64_t nb = b * a.n.strides[0] + c * a.n.strides[1], ns = a.n.strides[2];
    const int64_t yb = a.labels ? b * a.y.strides[0] : b * a.y.strides[0] + c * a.y.strides[1];
    const int64_t ys = a.labels ? a.y.strides[1] : a.y.strides[2];
    const bool paper = a.preset == DuoPreset::Paper;
    backward_chunk<T, Y>(a, zp + zb, zs, np + nb, ns, yp + yb, ys, t0, t1, c, tau, g, dzp + ob, os,
                         dnp && paper ? dnp + onb : nullptr, ons);
    if (dnp && !paper)  // the snippet's ỹ is detached
      for (int64_t t = t0; t < t1; ++t) dnp[onb + t * ons] = T(0);
  }
}

}  // namespace

void check_duo_args(const DuoArgs& a) {
  require(a.z.dim() == 3, "seg_logits: expected [B, K, N] view");
  require(a.z.dtype == DType::F32 || a.z.dtype == DType::F64, "seg_logits: expected float32 or float64");
  require(a.n.shape == a.z.shape, "noise_logits: shape differs from seg_logits");
  require(a.n.dtype == a.z.dtype, "noise_logits: dtype differs from seg_logits");
  if (a.labels)
    require(a.y.dim() == 2 && a.y.shape[0] == a.z.shape[0] && a.y.shape[1] == a.z.shape[2],
            "target: expected [B, N] class indices");
  else
    require(a.y.shape == a.z.shape, "target: shape differs from seg_logits");
  require(a.c0 >= 0 && a.c0 < a.z.shape[1], "include_background: no class left to include");
}

void duo_forward_cpu(const DuoArgs& a, double* sums, int num_threads) {
  check_duo_args(a);
  dispatch(a, [&](auto tz, auto ty) { forward_impl<decltype(tz), decltype(ty)>(a, sums, num_threads); });
}

void duo_backward_cpu(const DuoArgs& a, const double* grad_sums, const ArrayView& dz, const ArrayView& dn,
                      int num_threads) {
  check_duo_args(a);
  require(dz.shape == a.z.shape && dz.dtype == a.z.dtype, "grad: dz must match seg_logits");
  require(dn.ptr == 0 || (dn.shape == a.z.shape && dn.dtype == a.z.dtype), "grad: dn must match noise_logits");
  dispatch(a, [&](auto tz, auto ty) {
    backward_impl<decltype(tz), decltype(ty)>(a, grad_sums, dz, dn, num_threads);
  });
}

}  // namespace auvcore
