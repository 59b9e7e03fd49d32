// The formula of S from the eigenvalues of a Gram matrix (docs/method.md §1), once for the CPU and CUDA
// sources: the energy of an eigenvalue, the normaliser, -p log p, S of a spectrum read serially, and its
// derivative for the backward.
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

// dS/dλ_j of entropy_scale over a descending spectrum, written to g[0..r). Eigenvalues at or below `tol`
// (zero, clamped, or rounding noise) get 0: there the derivative with respect to the matrix is 0 in the limit
// (paper: p ∝ σ² and σ² log σ² has slope 0) or undefined (official: σ is not smooth at 0). r < 2 or zero
// total energy: all 0. `g` is a double* (a template parameter so that the CUDA emulation can pass its
// bounds-checked shared-memory pointer).
//   paper    p_j = λ_j / D, D = Σλ + ε:  ∂S/∂λ_k = (−log p_k − H − ε/D) / (D log r), the −ε/D from Σp = 1 − ε/D;
//   official p_j = q_j / Σq, q_j = σ_j + 1e-6:  ∂S/∂q_k = (−log p_k − H) / (Σq log r), ∂q_k/∂λ_k = 1 / (2σ_k).
template <typename Out>
AUVCORE_HD inline void entropy_scale_grad(const double* lambda, int64_t r, double eps, int variant, double tol,
                                          Out g) {
  for (int64_t j = 0; j < r; ++j) g[j] = 0.0;
  if (r < 2) return;
  double sum = 0.0;
  for (int64_t j = 0; j < r; ++j) sum += energy_of(lambda[j], variant);
  const double total = energy_total(sum, eps, variant);
  if (!(total > 0.0)) return;  // all-zero M̄ with ε = 0: S is the constant 0 around it
  double h = 0.0;
  for (int64_t j = 0; j < r; ++j) h += neg_plogp(energy_of(lambda[j], variant) / total);
  const double bias = variant == 1 ? 0.0 : eps / total, scale = 1.0 / (total * log((double)r));
  for (int64_t j = 0; j < r; ++j) {
    const double p = energy_of(lambda[j], variant) / total;
    if (lambda[j] <= tol || !(p > 0.0)) continue;
    const double dq = (-log(p) - h - bias) * scale;
    g[j] = variant == 1 ? dq / (2.0 * sqrt(lambda[j])) : dq;
  }
}

}  // namespace auvcore
