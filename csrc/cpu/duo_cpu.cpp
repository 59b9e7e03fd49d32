// Fused DUO loss kernels (SPEC §4, §5) and the Python bindings of the DUO work (the S backward included).
#include "auvcore/duo.h"

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

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

void check_args(const DuoArgs& a) {
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

// The values every pass needs at one voxel: σ(z), softplus(z), ĝ and ỹ.
template <typename T>
struct Voxel {
  T sig, softplus, g, yt;
  bool inside;  // ỹ's clamp passes the gradient (torch.clamp: lo <= x <= hi)
};

template <typename T>
inline Voxel<T> voxel(T z, T n, T y, DuoPreset preset, T tau, bool need_softplus) {
  Voxel<T> v;
  const T e = std::exp(-std::abs(z));
  const T inv = T(1) / (T(1) + e);
  v.sig = z >= T(0) ? inv : e * inv;
  v.softplus = need_softplus ? std::max(z, T(0)) + std::log1p(e) : T(0);
  if (preset == DuoPreset::Paper) {
    v.g = std::tanh(n);
    const T x = y - tau * v.g;
    v.inside = x >= T(0) && x <= T(1);
    v.yt = std::min(std::max(x, T(0)), T(1));
  } else {
    const T sn = T(1) / (T(1) + std::exp(-n));
    v.g = T(0);
    v.inside = false;
    v.yt = y - sn * y;
  }
  return v;
}

template <typename T, typename Y>
inline T target_at(const DuoArgs& a, const Y* yp, int64_t off, int64_t c) {
  if (a.labels) return (int64_t)yp[off] == c ? T(1) : T(0);
  return (T)yp[off];
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
    bool finite = true, in_range = true;
    double first_bad = 0.0;
    for (int64_t t = t0; t < t1; ++t) {
      const T zv = zp[zb + t * zs], nv = np[nb + t * ns];
      const Y raw = yp[yb + t * ys];
      // Range checks are branch-free flags; the offending value is found again only on failure.
      if (a.labels) {
        in_range &= (int64_t)raw >= 0 && (int64_t)raw < K;
      } else {
        in_range &= (double)raw >= 0.0 && (double)raw <= 1.0;  // also false for NaN
      }
      if (!in_range && first_bad == 0.0) first_bad = (double)raw;
      finite &= std::isfinite(zv) && std::isfinite(nv);
      const Voxel<T> v = voxel<T>(zv, nv, target_at<T, Y>(a, yp, yb + t * ys, c), a.preset, tau, true);
      s[kBCE] += v.softplus - zv * v.yt;
      s[kSigY] += v.sig * v.yt;
      s[kSig] += v.sig;
      s[kY] += v.yt;
      s[kG] += v.g;
      s[kG2] += v.g * v.g;
    }
    if (!finite) {
      for (int64_t t = t0; t < t1; ++t) {
        if (!std::isfinite(zp[zb + t * zs])) bad_z = true;
        if (!std::isfinite(np[nb + t * ns])) bad_n = true;
      }
    }
    if (!in_range) {
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
    const T gb = (T)g[kBCE], gsy = (T)g[kSigY], gs = (T)g[kSig], gy = (T)g[kY], gg = (T)g[kG], gg2 = (T)g[kG2];
    const int64_t zb = b * a.z.strides[0] + c * a.z.strides[1], zs = a.z.strides[2];
    const int64_t nb = b * a.n.strides[0] + c * a.n.strides[1], ns = a.n.strides[2];
    const int64_t yb = a.labels ? b * a.y.strides[0] : b * a.y.strides[0] + c * a.y.strides[1];
    const int64_t ys = a.labels ? a.y.strides[1] : a.y.strides[2];
    for (int64_t t = t0; t < t1; ++t) {
      const T zv = zp[zb + t * zs], nv = np[nb + t * ns];
      const Voxel<T> v = voxel<T>(zv, nv, target_at<T, Y>(a, yp, yb + t * ys, c), a.preset, tau, false);
      const T dsig = v.sig * (T(1) - v.sig);
      // d/dz of: softplus(z) − z ỹ,  σ(z) ỹ,  σ(z)
      dzp[ob + t * os] = gb * (v.sig - v.yt) + (gsy * v.yt + gs) * dsig;
      if (dnp) {
        if (a.preset == DuoPreset::Paper) {
          // ỹ = clamp(y − τ ĝ): d/dỹ of the sums, then dỹ/dĝ = −τ inside the clamp; ĝ and ĝ² directly.
          const T dyt = -gb * zv + gsy * v.sig + gy;
          const T dg = (v.inside ? -tau * dyt : T(0)) + gg + gg2 * T(2) * v.g;
          dnp[onb + t * ons] = dg * (T(1) - v.g * v.g);
        } else {
          dnp[onb + t * ons] = T(0);  // the snippet's ỹ is detached
        }
      }
    }
  }
}

}  // namespace

void duo_forward_cpu(const DuoArgs& a, double* sums, int num_threads) {
  check_args(a);
  dispatch(a, [&](auto tz, auto ty) { forward_impl<decltype(tz), decltype(ty)>(a, sums, num_threads); });
}

void duo_backward_cpu(const DuoArgs& a, const double* grad_sums, const ArrayView& dz, const ArrayView& dn,
                      int num_threads) {
  check_args(a);
  require(dz.shape == a.z.shape && dz.dtype == a.z.dtype, "grad: dz must match seg_logits");
  require(dn.ptr == 0 || (dn.shape == a.z.shape && dn.dtype == a.z.dtype), "grad: dn must match noise_logits");
  dispatch(a, [&](auto tz, auto ty) {
    backward_impl<decltype(tz), decltype(ty)>(a, grad_sums, dz, dn, num_threads);
  });
}

namespace py = pybind11;

void register_duo(py::module_& m) {
  auto args = [](const ArrayView& z, const ArrayView& n, const ArrayView& y, bool labels, int64_t c0, int preset,
                 double tau) {
    require(preset == 0 || preset == 1, "preset: expected 0 (paper) or 1 (official)");
    DuoArgs a;
    a.z = z;
    a.n = n;
    a.y = y;
    a.labels = labels;
    a.c0 = c0;
    a.preset = static_cast<DuoPreset>(preset);
    a.tau = tau;
    return a;
  };
  m.attr("duo_num_sums") = (int)kDuoSums;
  m.def(
      "duo_forward",
      [args](const ArrayView& z, const ArrayView& n, const ArrayView& y, bool labels, int64_t c0, int preset,
             double tau, std::uintptr_t sums, int threads) {
        DuoArgs a = args(z, n, y, labels, c0, preset, tau);
        py::gil_scoped_release nogil;
        duo_forward_cpu(a, reinterpret_cast<double*>(sums), threads);
      },
      py::arg("z"), py::arg("n"), py::arg("y"), py::arg("labels"), py::arg("c0"), py::arg("preset"), py::arg("tau"),
      py::arg("sums"), py::arg("threads"));
  m.def(
      "duo_backward",
      [args](const ArrayView& z, const ArrayView& n, const ArrayView& y, bool labels, int64_t c0, int preset,
             double tau, std::uintptr_t grad_sums, const ArrayView& dz, const ArrayView& dn, int threads) {
        DuoArgs a = args(z, n, y, labels, c0, preset, tau);
        py::gil_scoped_release nogil;
        duo_backward_cpu(a, reinterpret_cast<const double*>(grad_sums), dz, dn, threads);
      },
      py::arg("z"), py::arg("n"), py::arg("y"), py::arg("labels"), py::arg("c0"), py::arg("preset"), py::arg("tau"),
      py::arg("grad_sums"), py::arg("dz"), py::arg("dn"), py::arg("threads"));
  m.def(
      "scale_backward",
      [](const ArrayView& z, int mode, bool center, bool nan_to_num, double eps, int variant, std::uintptr_t evals,
         std::uintptr_t evecs, std::uintptr_t grad_S, const ArrayView& dz, int threads) {
        py::gil_scoped_release nogil;
        scale_backward_decoded(z, mode, center, nan_to_num, eps, static_cast<Variant>(variant),
                               reinterpret_cast<const double*>(evals), reinterpret_cast<const double*>(evecs),
                               reinterpret_cast<const double*>(grad_S), dz, threads);
      },
      py::arg("z"), py::arg("mode"), py::arg("center"), py::arg("nan_to_num"), py::arg("eps"), py::arg("variant"),
      py::arg("evals"), py::arg("evecs"), py::arg("grad_S"), py::arg("dz"), py::arg("threads"));
}

}  // namespace auvcore
