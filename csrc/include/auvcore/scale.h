// From Gram matrices to the semantic perception scale S (SPEC §2 steps 2–5).
#pragma once
#include <cstdint>

namespace auvcore {

enum class Variant : int { Paper = 0, Official = 1 };

// For each of `count` Gram matrices G (p x p, double; overwritten): eigenvalues, the top r[i] of them
// (negatives clamped to 0), the energy p_j and S = -Σ p log p / log r. r[i] < 2 gives NaN.
// Optional outputs (null to skip): spectrum [count, p] (sorted energies, 0 past r, NaN when r < 2),
// evals [count, p] (descending, unclamped), evecs [count, p, p] (rows are eigenvectors).
void scale_from_gram(double* G, int64_t count, int64_t p, const int64_t* r, double eps, Variant variant, double* S,
                     double* spectrum, double* evals, double* evecs, int num_threads);

// The entropy of one sorted spectrum (descending eigenvalues of length >= r): the single place where the
// formula of S lives in C++. Writes the energies to p_out if not null.
double scale_of_eigenvalues(const double* lambda, int64_t r, double eps, Variant variant, double* p_out);

}  // namespace auvcore
