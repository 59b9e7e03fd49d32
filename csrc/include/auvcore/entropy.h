// The formula of S from the eigenvalues of a Gram matrix (docs/method.md §1), once for the CPU and CUDA
// sources: the energy of an eigenvalue, the normaliser, -p log p, and S of a spectrum read serially.
#pragma once
#include <math.h>

#include <cstdint>

#ifdef __CUDACC__
#define AUVCORE_HD __host__ __device__
#else
#define AUVCORE_HD
#endif

namespace auvcore {

// The authors' snippet adds this to every singular value (variant "official").
constexpr double kOfficialShift = 1e-6;

// Energy of one eigenvalue λ = σ² before normalisation: paper σ² = max(λ, 0) (rounding can leave a tiny
// negative eigenvalue, which is energy 0); official σ + 1e-6. variant: 0 paper, 1 official.
AUVCORE_HD inline double energy_of(double lambda, int variant) {
  const double l = lambda > 0.0 ? lambda : 0.0;
  return variant == 1 ? sqrt(l) + kOfficialShift : l;
}

// The sum the energies are divided by: the paper adds ε, the snippet does not.
AUVCORE_HD inline double energy_total(double sum, double eps, int variant) { return variant == 1 ? sum : sum + eps; }

// -p log p with 0 log 0 = 0.
AUVCORE_HD inline double neg_plogp(double p) { return p > 0.0 ? -p * log(p) : 0.0; }

// S = -Σ p_j log p_j / log r of the top r of a descending spectrum (r >= 2), summed serially; writes the
// energies p_j to p_out if not null.
AUVCORE_HD inline double entropy_scale(const double* lambda, int64_t r, double eps, int variant, double* p_out) {
  double sum = 0.0;
  for (int64_t j = 0; j < r; ++j) sum += energy_of(lambda[j], variant);
  const double total = energy_total(sum, eps, variant);
  double h = 0.0;
  for (int64_t j = 0; j < r; ++j) {
    const double p = energy_of(lambda[j], variant) / total;
    if (p_out) p_out[j] = p;
    h += neg_plogp(p);
  }
  return h / log((double)r);
}

}  // namespace auvcore
