// Serial pieces of the CUDA eigen solver and entropy, compiled for host and device alike so the host tests
// can check them (tests/test_cuda_host.py, through _C._cuda_host_*) on a machine without a GPU.
#pragma once
#include <cuda_runtime.h>  // __host__ __device__

#include "auvcore/entropy.h"  // energy_of, energy_total, neg_plogp

#include <cfloat>
#include <cmath>
#include <cstdint>

namespace auvcore {
namespace cuda {

// Number of eigenvalues of the symmetric tridiagonal matrix (diagonal d[0..n), squared off-diagonal
// e2[0..n-1)) that are smaller than x: the count of negative pivots of the LDLᵀ factorisation of T - x I
// (Sturm sequence). A pivot that falls to within pivmin of 0 is replaced by -pivmin (as LAPACK's dlaebz does)
// so the recurrence never divides by 0.
template <typename VecPtr>  // const double* (the CUDA emulation passes its checked shared pointers)
__host__ __device__ inline int sturm_count(VecPtr d, VecPtr e2, int n, double x, double pivmin) {
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

// Multisection: g probes split [lo, hi] into g + 1 parts per step (g = 1 is bisection). On the GPU the g
// probes of an eigenvalue are g lanes of a warp and one ballot combines their Sturm counts; the helpers
// below are shared with the serial host version so both take bit-identical steps.
__host__ __device__ inline double multisect_point(double lo, double hi, int s, int g) {
  return lo + (hi - lo) * (double)(s + 1) / (double)(g + 1);
}
// q = how many of the g probes have at most k eigenvalues below them; the k-th eigenvalue lies between
// probe q-1 and probe q (the interval's ends standing in for probes -1 and g).
__host__ __device__ inline void multisect_update(double& lo, double& hi, int q, int g) {
  const double nlo = q == 0 ? lo : multisect_point(lo, hi, q - 1, g);
  const double nhi = q == g ? hi : multisect_point(lo, hi, q, g);
  lo = nlo;
  hi = nhi;
}
// Steps for an interval of width w to shrink below tol: the same for every eigenvalue of a matrix, so the
// lanes of a warp stay converged through the ballots.
__host__ __device__ inline int multisect_steps(double w, double tol, int g) {
  if (!(w > tol) || !(tol > 0)) return 0;
  const int steps = (int)ceil(log2(w / tol) / log2((double)g + 1.0)) + 1;
  return steps < 256 ? steps : 256;
}

// The k-th smallest eigenvalue (0-based), serially, with the GPU's multisection steps.
__host__ __device__ inline double multisect_eigenvalue(const double* d, const double* e2, int n, int k, double lo,
                                                       double hi, double pivmin, int g, int steps) {
  for (int it = 0; it < steps; ++it) {
    int q = 0;
    for (int sidx = 0; sidx < g; ++sidx) q += sturm_count(d, e2, n, multisect_point(lo, hi, sidx, g), pivmin) <= k;
    multisect_update(lo, hi, q, g);
  }
  return 0.5 * (lo + hi);
}

// Lanes per eigenvalue for an n x n matrix on a block of `threads`: a power of two, at most a warp.
__host__ __device__ inline int multisect_lanes(int n, int threads) {
  int g = 1;
  while (g < 32 && 2 * g * n <= threads) g *= 2;
  return g;
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
  // Absolute accuracy 2 eps·‖T‖ is what the Householder reduction delivers anyway; asking for more only
  // spends steps on eigenvalues that are rounding noise.
  b.abstol = 2.0 * DBL_EPSILON * tnorm;
  if (!(b.abstol > 0)) b.abstol = DBL_MIN;
  return b;
}

}  // namespace cuda
}  // namespace auvcore
