// Serial pieces of the CUDA eigen solver and entropy, compiled for host and device alike so the host tests
// can check them (tests/test_cuda.py, through _C._cuda_host_*) on a machine without a GPU.
#pragma once
#include <cuda_runtime.h>  // __host__ __device__

#include <cfloat>
#include <cmath>
#include <cstdint>

namespace auvcore {
namespace cuda {

// Number of eigenvalues of the symmetric tridiagonal matrix (diagonal d[0..n), squared off-diagonal
// e2[0..n-1)) that are smaller than x: the count of negative pivots of the LDLᵀ factorisation of T - x I
// (Sturm sequence). A pivot that falls to within pivmin of 0 is replaced by -pivmin (as LAPACK's dlaebz does)
// so the recurrence never divides by 0.
__host__ __device__ inline int sturm_count(const double* d, const double* e2, int n, double x, double pivmin) {
  int count = 0;
  double q = d[0] - x;
  if (fabs(q) <= pivmin) q = -pivmin;
  if (q < 0) ++count;
  for (int i = 1; i < n; ++i) {
    q = d[i] - x - e2[i - 1] / q;
    if (fabs(q) <= pivmin) q = -pivmin;
    if (q < 0) ++count;
  }
  return count;
}

// The k-th smallest eigenvalue (0-based) by bisection of [lo, hi], which must bracket the spectrum.
// Stops when the interval is below abstol or a few ulps of its ends.
__host__ __device__ inline double bisect_eigenvalue(const double* d, const double* e2, int n, int k, double lo,
                                                    double hi, double pivmin, double abstol) {
  for (int it = 0; it < 256; ++it) {
    const double tol = fmax(abstol, 2.0 * DBL_EPSILON * fmax(fabs(lo), fabs(hi)));
    if (hi - lo <= tol) break;
    const double mid = 0.5 * (lo + hi);
    if (mid <= lo || mid >= hi) break;  // no double left between the ends
    if (sturm_count(d, e2, n, mid, pivmin) > k)
      hi = mid;
    else
      lo = mid;
  }
  return 0.5 * (lo + hi);
}

// Gershgorin interval of the tridiagonal matrix, widened as LAPACK's dstebz does, plus pivmin and the
// absolute tolerance. e holds the off-diagonal (e[i] couples i and i+1).
struct Bracket {
  double lo, hi, pivmin, abstol;
};
__host__ __device__ inline Bracket bracket_from(double gl, double gu, double max_e2, int n) {
  Bracket b;
  const double tnorm = fmax(fabs(gl), fabs(gu));
  b.pivmin = DBL_MIN * fmax(1.0, max_e2);
  const double fudge = 2.1;
  b.lo = gl - fudge * tnorm * DBL_EPSILON * n - fudge * 2.0 * b.pivmin;
  b.hi = gu + fudge * tnorm * DBL_EPSILON * n + fudge * 2.0 * b.pivmin;
  // Absolute accuracy eps·‖T‖ is what the Householder reduction delivers anyway; asking for more only
  // spends iterations on eigenvalues that are rounding noise.
  b.abstol = DBL_EPSILON * tnorm;
  if (!(b.abstol > 0)) b.abstol = DBL_MIN;
  return b;
}

// Energy of one eigenvalue before normalisation (scale_of_eigenvalues in csrc/cpu/scale_cpu.cpp):
// paper: σ² = max(λ, 0); official: σ + 1e-6.
__host__ __device__ inline double energy_of(double lambda, int variant) {
  const double l = lambda > 0.0 ? lambda : 0.0;
  return variant == 1 ? sqrt(l) + 1e-6 : l;
}

// -p log p with 0 log 0 = 0.
__host__ __device__ inline double neg_plogp(double p) { return p > 0.0 ? -p * log(p) : 0.0; }

}  // namespace cuda
}  // namespace auvcore
