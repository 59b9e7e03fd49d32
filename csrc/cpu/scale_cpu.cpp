#include "auvcore/scale.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "auvcore/eigh.h"

namespace auvcore {

double scale_of_eigenvalues(const double* lambda, int64_t r, double eps, Variant variant, double* p_out) {
  if (r < 2) return std::numeric_limits<double>::quiet_NaN();
  std::vector<double> q(r);
  double total = 0.0;
  if (variant == Variant::Official) {
    // The authors' snippet: energy on singular values, each shifted by 1e-6, normalised by their sum.
    for (int64_t j = 0; j < r; ++j) {
      q[j] = std::sqrt(std::max(lambda[j], 0.0)) + 1e-6;
      total += q[j];
    }
  } else {
    // p_j = σ_j² / (Σ σ_k² + ε); rounding can leave tiny negative eigenvalues, which are energy 0.
    for (int64_t j = 0; j < r; ++j) {
      q[j] = std::max(lambda[j], 0.0);
      total += q[j];
    }
    total += eps;
  }
  double h = 0.0;
  for (int64_t j = 0; j < r; ++j) {
    const double pj = q[j] / total;
    if (p_out) p_out[j] = pj;
    if (pj > 0.0) h -= pj * std::log(pj);
  }
  return h / std::log((double)r);
}

void scale_from_gram(double* G, int64_t count, int64_t p, const int64_t* r, double eps, Variant variant, double* S,
                     double* spectrum, double* evals, double* evecs, int num_threads) {
  std::atomic<bool> failed{false};
  std::string failure;
#pragma omp parallel num_threads(std::max(1, num_threads))
  {
    std::vector<double> w(p);
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < count; ++i) {
      if (failed) continue;
      const int64_t ri = std::min(r[i], p);
      double* sp = spectrum ? spectrum + i * p : nullptr;
      try {
        // A class with fewer than 2 rows has no spectrum to speak of; skip the solver.
        if (ri < 2 && !evals && !evecs) {
          S[i] = std::numeric_limits<double>::quiet_NaN();
        } else {
          eigh_sym(G + i * p * p, p, w.data(), evecs ? evecs + i * p * p : nullptr);
          if (evals) std::copy(w.begin(), w.end(), evals + i * p);
          S[i] = scale_of_eigenvalues(w.data(), ri, eps, variant, sp);
        }
        if (sp) {
          if (ri < 2) std::fill(sp, sp + p, std::numeric_limits<double>::quiet_NaN());
          else std::fill(sp + ri, sp + p, 0.0);
        }
      } catch (const std::exception& e) {
#pragma omp critical
        {
          failure = e.what();
          failed = true;
        }
      }
    }
  }
  if (failed) throw std::runtime_error(failure);
}

}  // namespace auvcore
