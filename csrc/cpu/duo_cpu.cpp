// Fused DUO loss kernels (docs/method.md §3).
// The per-voxel loops select between both sides of a ternary; with trapping math GCC keeps them as branches
// and does not vectorise. No FP exception state is read anywhere in the library. Set before duo.h, whose
// per-voxel formulas are inlined into those loops.
#pragma GCC optimize("no-trapping-math")

#include "auvcore/duo.h"

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


// The per-voxel formulas live in auvcore/duo.h (shared with the CUDA kernels).
#define AUVCORE_INLINE inline __attribute__((always_inline))
using duo::abs_;
using duo::Voxel;
using duo::voxel;

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
  T terms[kDuoSums];
  duo::sum_terms(v, zv, terms);
  for (int k = 0; k < kDuoSums; ++k) acc[k][j] += terms[k];
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
    dz[t * dzs] = duo::grad_z(v, gb, gsy, gs);
    if (kPreset == DuoPreset::Paper && want_dn)  // a loop invariant: the compiler unswitches it
      dn[t * dns] = duo::grad_n(v, zv, tau, gb, gsy, gy, gg, gg2);
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
