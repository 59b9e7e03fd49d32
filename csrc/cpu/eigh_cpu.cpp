#include "auvcore/eigh.h"
#include "auvcore/isa.h"

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <numeric>
#include <stdexcept>
#include <vector>

namespace auvcore {
namespace {

// Eigenvalues descending, eigenvectors as rows following them.
inline void sort_descending(double* w, int64_t n, double* vt) {
  std::vector<int64_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return w[a] > w[b]; });
  std::vector<double> tmp(w, w + n);
  for (int64_t j = 0; j < n; ++j) w[j] = tmp[order[j]];
  if (vt) {
    tmp.assign(vt, vt + n * n);
    for (int64_t j = 0; j < n; ++j) std::copy(tmp.begin() + order[j] * n, tmp.begin() + (order[j] + 1) * n, vt + j * n);
  }
}

// Householder + QL on A (scaled so that max |a_ij| is in [0.5, 1)). Returns false, leaving w and vt
// undefined, if QL has not converged for some eigenvalue after kMaxQLIterations sweeps.
constexpr int kMaxQLIterations = 30;
__attribute__((always_inline)) inline bool tridiagonal_ql(double* A, int64_t n, double* w, double* vt) {
  std::vector<double> d(n), e(n, 0.0), v(n), pv(n);
  // Householder vectors, kept for the accumulation of Q: reflector k lives on indices k+1..n-1.
  std::vector<double> hv(vt ? n * n : 0), hbeta(vt ? n : 0, 0.0);

  // 1. Tridiagonalise: for each k, a reflector H = I - beta u uᵀ zeroes row/column k past k+1, and the
  //    trailing block becomes H A22 H = A22 - u wᵀ - w uᵀ with w = p - (beta/2)(uᵀp) u, p = beta A22 u.
  //    The trailing block is kept full (both triangles) so every loop runs over contiguous rows, and the
  //    product p of step k+1 is accumulated while step k updates the rows: one pass over A22 per step.
  std::vector<double> u_next(n), p_next(n);
  double* u = v.data();
  double* p = pv.data();
  // Reflector of row k past the diagonal (row = column by symmetry) into `out`; returns beta, 0 when the
  // row is already reduced, and sets e[k].
  auto reflector = [&](int64_t k, double* out) -> double {
    const int64_t m = n - k - 1;
    const double* x = A + k * n + (k + 1);
    double scale = 0.0;
    for (int64_t i = 0; i < m; ++i) scale = std::max(scale, std::fabs(x[i]));
    double norm2 = 0.0, head2 = 0.0;
    if (scale > 0) {
      for (int64_t i = 0; i < m; ++i) norm2 += (x[i] / scale) * (x[i] / scale);
      head2 = (x[0] / scale) * (x[0] / scale);
    }
    if (scale == 0.0 || norm2 - head2 <= 0.0) {
      e[k] = x[0];
      return 0.0;
    }
    const double norm = scale * std::sqrt(norm2);
    const double alpha = x[0] >= 0 ? -norm : norm;
    std::copy(x, x + m, out);
    out[0] -= alpha;  // u = x - alpha e1
    double unorm2 = 0.0;
    for (int64_t i = 0; i < m; ++i) unorm2 += out[i] * out[i];
    e[k] = alpha;
    return 2.0 / unorm2;
  };
  bool have_u = false, have_p = false;
  double beta = 0.0;
  for (int64_t k = 0; k + 2 < n; ++k) {
    const int64_t m = n - k - 1;  // size of the trailing block
    d[k] = A[k * n + k];
    if (!have_u) beta = reflector(k, u);
    have_u = false;
    if (beta == 0.0) {
      have_p = false;
      continue;
    }
    double* const A22 = A + (k + 1) * n + (k + 1);
    if (!have_p) {  // p = beta A22 u (A22 symmetric: accumulate rows, which are its columns)
      std::fill(p, p + m, 0.0);
      for (int64_t j = 0; j < m; ++j) {
        const double* row = A22 + j * n;
        const double uj = beta * u[j];
        for (int64_t i = 0; i < m; ++i) p[i] += row[i] * uj;
      }
    }
    double up = 0.0;
    for (int64_t i = 0; i < m; ++i) up += u[i] * p[i];
    const double kk = 0.5 * beta * up;
    for (int64_t i = 0; i < m; ++i) p[i] -= kk * u[i];  // p is now w
    if (vt) {
      std::copy(u, u + m, hv.begin() + k * n + (k + 1));
      hbeta[k] = beta;
    }
    // Row 0 of the block first: it is the row the next reflector is built from.
    for (int64_t j = 0; j < m; ++j) A22[j] -= u[0] * p[j] + p[0] * u[j];
    double beta_next = 0.0;
    if (k + 3 < n) {
      beta_next = reflector(k + 1, u_next.data());
      have_u = true;
    }
    const bool fuse = beta_next != 0.0;
    if (fuse) std::fill(p_next.begin(), p_next.begin() + (m - 1), 0.0);
    for (int64_t i = 1; i < m; ++i) {
      double* row = A22 + i * n;
      const double ui = u[i], wi = p[i];
      for (int64_t j = 0; j < m; ++j) row[j] -= ui * p[j] + wi * u[j];
      if (fuse) {  // the next block is rows/columns 1.. of this one
        const double f = beta_next * u_next[i - 1];
        double* pn = p_next.data();
        for (int64_t j = 1; j < m; ++j) pn[j - 1] += row[j] * f;
      }
    }
    if (have_u) {
      std::swap_ranges(u_next.begin(), u_next.begin() + (m - 1), u);
      if (fuse) std::swap_ranges(p_next.begin(), p_next.begin() + (m - 1), p);
    }
    have_p = fuse;
    beta = beta_next;
  }
  if (n >= 2) {
    d[n - 2] = A[(n - 2) * n + (n - 2)];
    e[n - 2] = A[(n - 1) * n + (n - 2)];
  }
  d[n - 1] = A[(n - 1) * n + (n - 1)];
  e[n - 1] = 0.0;

  // 2. Q = H_0 H_1 ... H_{n-3}, built backwards so each reflector touches only the block it acts on.
  //    The QL rotations act on columns of Q, i.e. on rows of Qᵀ, which is what vt holds.
  std::vector<double> Q;
  if (vt) {
    Q.assign(n * n, 0.0);
    for (int64_t i = 0; i < n; ++i) Q[i * n + i] = 1.0;
    std::vector<double> t(n);
    for (int64_t k = n - 3; k >= 0; --k) {
      if (hbeta[k] == 0.0) continue;
      const double* u = hv.data() + k * n;
      std::fill(t.begin(), t.end(), 0.0);
      for (int64_t i = k + 1; i < n; ++i) {
        const double ui = u[i];
        const double* row = Q.data() + i * n;
        for (int64_t j = k + 1; j < n; ++j) t[j] += ui * row[j];
      }
      for (int64_t i = k + 1; i < n; ++i) {
        const double f = hbeta[k] * u[i];
        double* row = Q.data() + i * n;
        for (int64_t j = k + 1; j < n; ++j) row[j] -= f * t[j];
      }
    }
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < n; ++j) vt[j * n + i] = Q[i * n + j];
  }

  // 3. Implicit QL with Wilkinson-type shifts on (d, e); e[i] couples i and i+1.
  //    An off-diagonal is negligible when it is small next to its two diagonal neighbours (relative test)
  //    or next to the whole matrix (absolute test, eps·‖T‖). The relative test alone never deflates a
  //    block of near-zero eigenvalues -- the rank-deficient Grams of small classes -- whose entries are all
  //    rounding noise; the absolute one costs nothing in accuracy, since the Householder reduction already
  //    perturbs every eigenvalue by about eps·‖T‖.
  double tnorm = 0.0;
  for (int64_t i = 0; i < n; ++i) tnorm = std::max(tnorm, std::fabs(d[i]) + std::fabs(e[i]) + (i ? std::fabs(e[i - 1]) : 0.0));
  const double small = DBL_EPSILON * tnorm;
  for (int64_t l = 0; l < n; ++l) {
    int iter = 0;
    int64_t m;
    do {
      for (m = l; m + 1 < n; ++m) {
        const double dd = std::fabs(d[m]) + std::fabs(d[m + 1]);
        if (std::fabs(e[m]) <= DBL_EPSILON * dd || std::fabs(e[m]) <= small) break;
      }
      if (m == l) break;
      if (++iter > kMaxQLIterations) return false;
      double g = (d[l + 1] - d[l]) / (2.0 * e[l]);
      double r = std::hypot(g, 1.0);
      g = d[m] - d[l] + e[l] / (g + std::copysign(r, g));
      double s = 1.0, c = 1.0, p = 0.0;
      int64_t i;
      bool underflow = false;
      for (i = m - 1; i >= l; --i) {
        double f = s * e[i], b = c * e[i];
        r = std::hypot(f, g);
        e[i + 1] = r;
        if (r == 0.0) {  // recover from underflow
          d[i + 1] -= p;
          e[m] = 0.0;
          underflow = true;
          break;
        }
        s = f / r;
        c = g / r;
        g = d[i + 1] - p;
        r = (d[i] - g) * s + 2.0 * c * b;
        p = s * r;
        d[i + 1] = g + p;
        g = c * r - b;
        if (vt) {
          double* zi = vt + i * n;
          double* zi1 = vt + (i + 1) * n;
          for (int64_t k = 0; k < n; ++k) {
            const double zf = zi1[k];
            zi1[k] = s * zi[k] + c * zf;
            zi[k] = c * zi[k] - s * zf;
          }
        }
      }
      if (underflow) continue;
      d[l] -= p;
      e[l] = g;
      e[m] = 0.0;
    } while (m != l);
  }

  std::copy(d.begin(), d.end(), w);
  sort_descending(w, n, vt);
  return true;
}

// Cyclic Jacobi on the full symmetric matrix A (overwritten): several sweeps of O(n³), but it converges
// for every finite matrix, which is why it is the fallback where QL stalls. Eigenvalues unsorted into w.
__attribute__((always_inline)) inline void jacobi(double* A, int64_t n, double* w, double* vt) {
  if (vt) {
    std::fill(vt, vt + n * n, 0.0);
    for (int64_t i = 0; i < n; ++i) vt[i * n + i] = 1.0;
  }
  double fro = 0.0;
  for (int64_t i = 0; i < n * n; ++i) fro += A[i] * A[i];
  const double tiny = DBL_EPSILON * std::sqrt(fro) / (double)n;
  for (int sweep = 0; sweep < 100; ++sweep) {
    bool rotated = false;
    for (int64_t p = 0; p < n; ++p)
      for (int64_t q = p + 1; q < n; ++q) {
        const double apq = A[p * n + q], app = A[p * n + p], aqq = A[q * n + q];
        if (std::fabs(apq) <= tiny || std::fabs(apq) <= 0.5 * DBL_EPSILON * std::sqrt(std::fabs(app * aqq))) {
          A[p * n + q] = A[q * n + p] = 0.0;
          continue;
        }
        rotated = true;
        // The rotation J (J_pp = J_qq = c, J_pq = s, J_qp = -s) with (JᵀAJ)_pq = 0, the smaller angle.
        const double theta = (aqq - app) / (2.0 * apq);
        const double t = std::fabs(theta) > 1e150 ? 0.5 / theta
                                                 : std::copysign(1.0, theta) / (std::fabs(theta) + std::hypot(theta, 1.0));
        const double c = 1.0 / std::sqrt(t * t + 1.0), s = t * c;
        for (int64_t k = 0; k < n; ++k) {  // columns p, q
          const double akp = A[k * n + p], akq = A[k * n + q];
          A[k * n + p] = c * akp - s * akq;
          A[k * n + q] = s * akp + c * akq;
        }
        for (int64_t k = 0; k < n; ++k) {  // rows p, q
          const double apk = A[p * n + k], aqk = A[q * n + k];
          A[p * n + k] = c * apk - s * aqk;
          A[q * n + k] = s * apk + c * aqk;
        }
        A[p * n + q] = A[q * n + p] = 0.0;
        if (vt) {
          double* vp = vt + p * n;
          double* vq = vt + q * n;
          for (int64_t k = 0; k < n; ++k) {
            const double a = vp[k], b = vq[k];
            vp[k] = c * a - s * b;
            vq[k] = s * a + c * b;
          }
        }
      }
    if (!rotated) break;
  }
  for (int64_t i = 0; i < n; ++i) w[i] = A[i * n + i];
}

// The whole solver: scaling by a power of two (exact) so that neither denormals nor huge entries lose
// digits or overflow, then Householder + QL, and Jacobi on the untouched scaled copy if QL stalls.
__attribute__((always_inline)) inline void eigh_impl(double* A, int64_t n, double* w, double* vt, bool force_jacobi) {
  if (n <= 0) return;
  double amax = 0.0;
  for (int64_t i = 0; i < n * n; ++i) amax = std::max(amax, std::fabs(A[i]));
  bool finite = std::isfinite(amax);  // std::max drops a NaN: look for one separately
  for (int64_t i = 0; i < n * n && finite; ++i) finite = !std::isnan(A[i]);
  if (!finite) throw std::runtime_error("eigh: the matrix has a NaN or Inf entry");
  if (amax == 0.0) {
    std::fill(w, w + n, 0.0);
    if (vt) {
      std::fill(vt, vt + n * n, 0.0);
      for (int64_t i = 0; i < n; ++i) vt[i * n + i] = 1.0;
    }
    return;
  }
  int ex;
  std::frexp(amax, &ex);
  if (ex != 0)
    for (int64_t i = 0; i < n * n; ++i) A[i] = std::ldexp(A[i], -ex);
  std::vector<double> copy(A, A + n * n);
  if (force_jacobi || !tridiagonal_ql(A, n, w, vt)) {
    jacobi(copy.data(), n, w, vt);
    sort_descending(w, n, vt);
  }
  if (ex != 0)
    for (int64_t i = 0; i < n; ++i) w[i] = std::ldexp(w[i], ex);
}

AUVCORE_TARGET_AVX512 void eigh_avx512(double* A, int64_t n, double* w, double* vt, bool fj) { eigh_impl(A, n, w, vt, fj); }
AUVCORE_TARGET_AVX2 void eigh_avx2(double* A, int64_t n, double* w, double* vt, bool fj) { eigh_impl(A, n, w, vt, fj); }
void eigh_generic(double* A, int64_t n, double* w, double* vt, bool fj) { eigh_impl(A, n, w, vt, fj); }

}  // namespace

void eigh_sym(double* A, int64_t n, double* w, double* vt, bool force_jacobi) {
  switch (isa_level()) {
    case 2: return eigh_avx512(A, n, w, vt, force_jacobi);
    case 1: return eigh_avx2(A, n, w, vt, force_jacobi);
    default: return eigh_generic(A, n, w, vt, force_jacobi);
  }
}

}  // namespace auvcore
