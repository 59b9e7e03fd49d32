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

__attribute__((always_inline)) inline void eigh_impl(double* A, int64_t n, double* w, double* vt) {
  if (n <= 0) return;
  std::vector<double> d(n), e(n, 0.0), v(n), pv(n);
  // Householder vectors, kept for the accumulation of Q: reflector k lives on indices k+1..n-1.
  std::vector<double> hv(vt ? n * n : 0), hbeta(vt ? n : 0, 0.0);

  // 1. Tridiagonalise: for each column k, a reflector H = I - beta u uᵀ zeroes A[k+2:, k], and the trailing
  //    block becomes H A22 H = A22 - u wᵀ - w uᵀ with w = p - (beta/2)(uᵀp) u, p = beta A22 u.
  //    The trailing block is kept full (both triangles) so every loop runs over contiguous rows.
  for (int64_t k = 0; k + 2 < n; ++k) {
    const int64_t m = n - k - 1;  // size of the trailing block
    double* col = v.data();
    for (int64_t i = 0; i < m; ++i) col[i] = A[(k + 1 + i) * n + k];
    double scale = 0.0;
    for (int64_t i = 0; i < m; ++i) scale = std::max(scale, std::fabs(col[i]));
    double norm2 = 0.0;
    if (scale > 0)
      for (int64_t i = 0; i < m; ++i) norm2 += (col[i] / scale) * (col[i] / scale);
    double tail2 = norm2 - (scale > 0 ? (col[0] / scale) * (col[0] / scale) : 0.0);
    d[k] = A[k * n + k];
    if (scale == 0.0 || tail2 <= 0.0) {  // already tridiagonal in this column
      e[k] = col[0];
      continue;
    }
    const double norm = scale * std::sqrt(norm2);
    const double alpha = col[0] >= 0 ? -norm : norm;
    col[0] -= alpha;  // u = x - alpha e1
    double unorm2 = 0.0;
    for (int64_t i = 0; i < m; ++i) unorm2 += col[i] * col[i];
    const double beta = 2.0 / unorm2;
    e[k] = alpha;
    // p = beta A22 u (A22 symmetric: accumulate rows, which are its columns)
    double* p = pv.data();
    std::fill(p, p + m, 0.0);
    for (int64_t j = 0; j < m; ++j) {
      const double* row = A + (k + 1 + j) * n + (k + 1);
      const double uj = beta * col[j];
      for (int64_t i = 0; i < m; ++i) p[i] += row[i] * uj;
    }
    double up = 0.0;
    for (int64_t i = 0; i < m; ++i) up += col[i] * p[i];
    const double kk = 0.5 * beta * up;
    for (int64_t i = 0; i < m; ++i) p[i] -= kk * col[i];  // p is now w
    for (int64_t i = 0; i < m; ++i) {
      double* row = A + (k + 1 + i) * n + (k + 1);
      const double ui = col[i], wi = p[i];
      for (int64_t j = 0; j < m; ++j) row[j] -= ui * p[j] + wi * col[j];
    }
    if (vt) {
      std::copy(col, col + m, hv.begin() + k * n + (k + 1));
      hbeta[k] = beta;
    }
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
  for (int64_t l = 0; l < n; ++l) {
    int iter = 0;
    int64_t m;
    do {
      for (m = l; m + 1 < n; ++m) {
        const double dd = std::fabs(d[m]) + std::fabs(d[m + 1]);
        if (std::fabs(e[m]) <= DBL_EPSILON * dd) break;
      }
      if (m == l) break;
      if (++iter > 64) throw std::runtime_error("eigh: QL iteration did not converge");
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

  // 4. Sort descending (vectors follow).
  std::vector<int64_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return d[a] > d[b]; });
  for (int64_t j = 0; j < n; ++j) w[j] = d[order[j]];
  if (vt) {
    std::vector<double> tmp(vt, vt + n * n);
    for (int64_t j = 0; j < n; ++j) std::copy(tmp.begin() + order[j] * n, tmp.begin() + (order[j] + 1) * n, vt + j * n);
  }
}

AUVCORE_TARGET_AVX512 void eigh_avx512(double* A, int64_t n, double* w, double* vt) { eigh_impl(A, n, w, vt); }
AUVCORE_TARGET_AVX2 void eigh_avx2(double* A, int64_t n, double* w, double* vt) { eigh_impl(A, n, w, vt); }
void eigh_generic(double* A, int64_t n, double* w, double* vt) { eigh_impl(A, n, w, vt); }

}  // namespace

void eigh_sym(double* A, int64_t n, double* w, double* vt) {
  switch (isa_level()) {
    case 2: return eigh_avx512(A, n, w, vt);
    case 1: return eigh_avx2(A, n, w, vt);
    default: return eigh_generic(A, n, w, vt);
  }
}

}  // namespace auvcore
