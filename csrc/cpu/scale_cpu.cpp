#include "auvcore/scale.h"

#include <algorithm>
#include <atomic>
#include <exception>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "auvcore/eigh.h"
#include "auvcore/entropy.h"
#include "auvcore/gram.h"

namespace auvcore {

double scale_of_eigenvalues(const double* lambda, int64_t r, double eps, Variant variant, double* p_out) {
  if (r < 2) return std::numeric_limits<double>::quiet_NaN();
  return entropy_scale(lambda, r, eps, static_cast<int>(variant), p_out);
}

void scale_from_gram(double* G, int64_t count, int64_t p, const int64_t* r, double eps, Variant variant, double* S,
                     double* spectrum, double* evals, double* evecs, int num_threads) {
  std::atomic<bool> failed{false};
  std::exception_ptr error;
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
      } catch (...) {
#pragma omp critical
        {
          if (!error) error = std::current_exception();
          failed = true;
        }
      }
    }
  }
  if (error) std::rethrow_exception(error);
}

void masked_scale(const ArrayView& f, const ArrayView& labels, int64_t K, bool center, bool nan_to_num, double eps,
                  double* S, int64_t* counts, double* spectrum, int num_threads) {
  const ClassSort cs = sort_by_class(f, labels, K, counts);
  const int64_t B = f.shape[0], C = f.shape[1];
  const double nan = std::numeric_limits<double>::quiet_NaN();
  std::vector<int64_t> chan_off(C);
  for (int64_t c = 0; c < C; ++c) chan_off[c] = c * f.strides[1];

  // Classes with more voxels than channels: C x C Grams over the voxels, in one batch.
  std::vector<int64_t> wide, narrow;  // job index b*K + k
  for (int64_t j = 0; j < B * K; ++j) {
    if (counts[j] < 2) {
      S[j] = nan;
      if (spectrum) std::fill(spectrum + j * C, spectrum + (j + 1) * C, nan);
    } else {
      (gram_on_rows(counts[j], C) ? narrow : wide).push_back(j);
    }
  }
  if (!wide.empty()) {
    const int64_t nw = (int64_t)wide.size();
    std::vector<GramJob> jobs;
    for (int64_t j : wide) jobs.push_back({(j / K) * f.strides[0], cs.segment(j / K, j % K, K), counts[j]});
    std::vector<double> G(nw * C * C), Sw(nw), sp(spectrum ? nw * C : 0);
    std::vector<int64_t> r(nw, C);
    gram_cpu(f.data(), f.dtype, chan_off, jobs, centering_for(false, center), nan_to_num, G.data(), num_threads,
             "features", false);
    scale_from_gram(G.data(), nw, C, r.data(), eps, Variant::Paper, Sw.data(), spectrum ? sp.data() : nullptr,
                    nullptr, nullptr, num_threads);
    for (int64_t i = 0; i < nw; ++i) {
      S[wide[i]] = Sw[i];
      if (spectrum) std::copy(sp.begin() + i * C, sp.begin() + (i + 1) * C, spectrum + wide[i] * C);
    }
  }
  // Classes of at most C voxels: the n_c x n_c Gram of the voxels' embeddings (voxels are the rows, the
  // channels the samples), one class per thread.
  std::exception_ptr error;
#pragma omp parallel num_threads(std::max(1, num_threads))
  {
    std::vector<double> G, sp;
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < (int64_t)narrow.size(); ++i) {
      const int64_t j = narrow[i], n = counts[j];
      const int64_t* seg = cs.segment(j / K, j % K, K);
      try {
        G.resize(n * n);
        sp.resize(n);
        gram_cpu(f.data(), f.dtype, std::vector<int64_t>(seg, seg + n),
                 {GramJob{(j / K) * f.strides[0], chan_off.data(), C}}, centering_for(true, center), nan_to_num,
                 G.data(), 1, "features", false);
        scale_from_gram(G.data(), 1, n, &n, eps, Variant::Paper, S + j, spectrum ? sp.data() : nullptr, nullptr,
                        nullptr, 1);
        if (spectrum) {
          std::copy(sp.begin(), sp.end(), spectrum + j * C);
          std::fill(spectrum + j * C + n, spectrum + (j + 1) * C, 0.0);
        }
      } catch (...) {
#pragma omp critical
        if (!error) error = std::current_exception();
      }
    }
  }
  if (error) std::rethrow_exception(error);
}

}  // namespace auvcore
