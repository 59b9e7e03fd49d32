// Analytic backward of the semantic perception scale of decoded maps (SPEC §5):
//   dS/dM̄ = 2 U diag(∂S/∂λ) Uᵀ M̄ on the smaller side of the Gram, then the centering projection.
// Unlike the SVD backward there is no 1/(λ_i − λ_j): ∂S/∂λ_j depends on λ_j alone, so equal eigenvalues get
// equal weights and U diag(g) Uᵀ does not depend on the basis chosen inside a repeated eigenspace.
#include <algorithm>
#include <cfloat>
#include <cmath>
#include <string>
#include <vector>

#include "auvcore/entropy.h"
#include "auvcore/gram.h"
#include "auvcore/isa.h"
#include "auvcore/scale.h"

namespace auvcore {
namespace {

constexpr int64_t kChunk = 128;  // samples per staged panel: p x 128 doubles in, p x 128 out
constexpr int64_t kVec = 8;      // doubles per vector register (AVX-512; two AVX2 registers otherwise)
typedef double v8d __attribute__((vector_size(64), aligned(8)));

// Y (p x nb, leading dimension kChunk) = A (p x p) · X. A 4-row x 2-vector register block keeps eight
// independent accumulators busy per broadcast of A, so the loop runs on FMAs rather than on loads.
// Rows and samples past p and nb are computed on padding and never read.
inline __attribute__((always_inline)) void apply_panel_impl(const double* A, int64_t p, const double* X, int64_t nb,
                                                            double* Y) {
  const int64_t nv = (nb + 2 * kVec - 1) / (2 * kVec) * 2;
  for (int64_t a = 0; a < p; a += 4) {
    const double* a0 = A + (a + 0) * p;
    const double* a1 = A + std::min(a + 1, p - 1) * p;
    const double* a2 = A + std::min(a + 2, p - 1) * p;
    const double* a3 = A + std::min(a + 3, p - 1) * p;
    for (int64_t v = 0; v < nv; v += 2) {
      v8d c00 = {}, c01 = {}, c10 = {}, c11 = {}, c20 = {}, c21 = {}, c30 = {}, c31 = {};
      for (int64_t b = 0; b < p; ++b) {
        const v8d x0 = *(const v8d*)(X + b * kChunk + v * kVec);
        const v8d x1 = *(const v8d*)(X + b * kChunk + (v + 1) * kVec);
        c00 += a0[b] * x0; c01 += a0[b] * x1;
        c10 += a1[b] * x0; c11 += a1[b] * x1;
        c20 += a2[b] * x0; c21 += a2[b] * x1;
        c30 += a3[b] * x0; c31 += a3[b] * x1;
      }
      *(v8d*)(Y + (a + 0) * kChunk + v * kVec) = c00; *(v8d*)(Y + (a + 0) * kChunk + (v + 1) * kVec) = c01;
      *(v8d*)(Y + (a + 1) * kChunk + v * kVec) = c10; *(v8d*)(Y + (a + 1) * kChunk + (v + 1) * kVec) = c11;
      *(v8d*)(Y + (a + 2) * kChunk + v * kVec) = c20; *(v8d*)(Y + (a + 2) * kChunk + (v + 1) * kVec) = c21;
      *(v8d*)(Y + (a + 3) * kChunk + v * kVec) = c30; *(v8d*)(Y + (a + 3) * kChunk + (v + 1) * kVec) = c31;
    }
  }
}

// One build per instruction set (isa.h).
AUVCORE_TARGET_AVX512 void apply_panel_avx512(const double* A, int64_t p, const double* X, int64_t nb, double* Y) {
  apply_panel_impl(A, p, X, nb, Y);
}
AUVCORE_TARGET_AVX2 void apply_panel_avx2(const double* A, int64_t p, const double* X, int64_t nb, double* Y) {
  apply_panel_impl(A, p, X, nb, Y);
}
void apply_panel_generic(const double* A, int64_t p, const double* X, int64_t nb, double* Y) {
  apply_panel_impl(A, p, X, nb, Y);
}
void apply_panel(const double* A, int64_t p, const double* X, int64_t nb, double* Y) {
  switch (isa_level()) {
    case 2: return apply_panel_avx512(A, p, X, nb, Y);
    case 1: return apply_panel_avx2(A, p, X, nb, Y);
    default: return apply_panel_generic(A, p, X, nb, Y);
  }
}

inline void store(const ArrayView& out, int64_t off, double v) {
  if (out.dtype == DType::F64) static_cast<double*>(reinterpret_cast<void*>(out.ptr))[off] = v;
  else static_cast<float*>(reinterpret_cast<void*>(out.ptr))[off] = (float)v;
}

}  // namespace

void scale_backward_decoded(const ArrayView& z, int mode, bool center, bool nan_to_num, double eps, Variant variant,
                            const double* evals, const double* evecs, const double* grad_S, const ArrayView& dz,
                            int num_threads) {
  (void)nan_to_num;  // the forward already rejected non-finite values unless nan_to_num; both read them as 0
  require(is_floating(z.dtype), "z: expected a floating dtype");
  require(dz.dtype == DType::F32 || dz.dtype == DType::F64, "grad: expected float32 or float64 output");
  require(dz.shape == z.shape, "grad: shape differs from z");
  const DecodedLayout L = decoded_layout(z, mode), Lo = decoded_layout(dz, mode);
  const int64_t p = (int64_t)L.p_off.size(), ns = (int64_t)L.s_off.size();
  const int64_t Bn = z.shape[0], K = z.shape[1], BK = Bn * K;
  const Centering cen = L.centering(center);
  const int64_t nt = std::max(1, num_threads);  // teams below never exceed the units of work

  // Per (b, k): A = 2 grad_S U diag(∂S/∂λ) Uᵀ (p x p), and the sample means the centering removed.
  std::vector<double> A((size_t)BK * p * p, 0.0), mu(cen == Centering::AcrossSamples ? (size_t)BK * p : 0, 0.0);
  std::vector<char> active(BK, 0);
#pragma omp parallel num_threads(std::min<int64_t>(nt, BK))
  {
    std::vector<double> g(p);
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < BK; ++i) {
      if (grad_S[i] == 0.0) continue;  // autograd's zero upstream (e.g. an excluded class): nothing to add
      const double* lam = evals + i * p;
      // Eigenvalues within rounding of the largest are numerically zero (e.g. the centering direction).
      const double tol = std::max(lam[0], 0.0) * (double)p * 4.0 * DBL_EPSILON;
      entropy_scale_grad(lam, p, eps, (int)variant, tol, g.data());
      double* Ai = A.data() + (size_t)i * p * p;
      for (int64_t j = 0; j < p; ++j) {
        if (g[j] == 0.0) continue;
        const double c = 2.0 * grad_S[i] * g[j];
        const double* u = evecs + ((size_t)i * p + j) * p;
        for (int64_t a = 0; a < p; ++a) {
          const double ca = c * u[a];
          for (int64_t b = 0; b < p; ++b) Ai[a * p + b] += ca * u[b];
        }
      }
      active[i] = 1;
      if (!mu.empty()) {
        const int64_t base = (i / K) * z.strides[0] + (i % K) * z.strides[1];
        for (int64_t a = 0; a < p; ++a) {
          double s = 0.0;
          for (int64_t t = 0; t < ns; ++t) {
            const double v = load_as_double(z.data(), z.dtype, base + L.p_off[a] + L.s_off[t]);
            if (std::isfinite(v)) s += v;
          }
          mu[(size_t)i * p + a] = s / (double)ns;
        }
      }
    }
  }

  // dS/dX̄ = A X̄ panel by panel. Row side (AcrossP): X̄ loses each column's mean, and the projection back
  // through the centering removes it again from A X̄. Column side (AcrossSamples): X̄ loses each coordinate's
  // mean over the samples; the projection would subtract A·mean_t(X̄) = 0, so it is skipped.
  const int64_t nchunk = (ns + kChunk - 1) / kChunk;
#pragma omp parallel num_threads(std::min<int64_t>(nt, BK * nchunk))
  {
    // Rows padded to a multiple of 4 for the register block; X's padding stays 0.
    const int64_t prow = (p + 3) / 4 * 4;
    std::vector<double> X((size_t)prow * kChunk, 0.0), Y((size_t)prow * kChunk), colmean(kChunk);
    std::vector<char> bad((size_t)p * kChunk);
#pragma omp for schedule(dynamic, 4)
    for (int64_t u = 0; u < BK * nchunk; ++u) {
      const int64_t i = u / nchunk, t0 = (u % nchunk) * kChunk, nb = std::min(kChunk, ns - t0);
      const int64_t base = (i / K) * z.strides[0] + (i % K) * z.strides[1];
      const int64_t obase = (i / K) * dz.strides[0] + (i % K) * dz.strides[1];
      if (!active[i]) {
        for (int64_t a = 0; a < p; ++a)
          for (int64_t t = 0; t < nb; ++t) store(dz, obase + Lo.p_off[a] + Lo.s_off[t0 + t], 0.0);
        continue;
      }
      for (int64_t a = 0; a < p; ++a) {
        double* x = X.data() + a * kChunk;
        for (int64_t t = 0; t < nb; ++t) {
          double v = load_as_double(z.data(), z.dtype, base + L.p_off[a] + L.s_off[t0 + t]);
          const bool b = !std::isfinite(v);
          bad[a * kChunk + t] = b;
          x[t] = b ? 0.0 : v;
        }
      }
      if (cen == Centering::AcrossP) {
        center_across_p(X.data(), p, kChunk, nb, colmean.data());
      } else if (cen == Centering::AcrossSamples) {
        for (int64_t a = 0; a < p; ++a) {
          const double m = mu[(size_t)i * p + a];
          for (int64_t t = 0; t < nb; ++t) X[a * kChunk + t] -= m;
        }
      }
      apply_panel(A.data() + (size_t)i * p * p, p, X.data(), nb, Y.data());
      if (cen == Centering::AcrossP) center_across_p(Y.data(), p, kChunk, nb, colmean.data());
      for (int64_t a = 0; a < p; ++a)
        for (int64_t t = 0; t < nb; ++t)
          store(dz, obase + Lo.p_off[a] + Lo.s_off[t0 + t], bad[a * kChunk + t] ? 0.0 : Y[a * kChunk + t]);
    }
  }
}

}  // namespace auvcore
