// From Gram matrices to the semantic perception scale S (SPEC §2 steps 2–5).
#pragma once
#include <cstdint>

#include "auvcore/array.h"

namespace auvcore {

enum class Variant : int { Paper = 0, Official = 1 };

// For each of `count` Gram matrices G (p x p, double; overwritten): eigenvalues, the top r[i] of them
// (negatives clamped to 0), the energy p_j and S = -Σ p log p / log r. r[i] < 2 gives NaN.
// Optional outputs (null to skip): spectrum [count, p] (sorted energies, 0 past r, NaN when r < 2),
// evals [count, p] (descending, unclamped), evecs [count, p, p] (rows are eigenvectors).
void scale_from_gram(double* G, int64_t count, int64_t p, const int64_t* r, double eps, Variant variant, double* S,
                     double* spectrum, double* evals, double* evecs, int num_threads);

// Masked mode end to end: for sample b and class k, M is the n_c x C matrix of the class's embeddings; its
// Gram on the smaller side (gram_on_rows: n_c x n_c for a class of fewer voxels than channels) gives S with
// r = min(n_c, C). S and counts [B, K]; spectrum [B, K, C] if not null (energies, 0 past r, NaN when r < 2).
void masked_scale(const ArrayView& f, const ArrayView& labels, int64_t K, bool center, bool nan_to_num, double eps,
                  double* S, int64_t* counts, double* spectrum, int num_threads);

// The entropy of one sorted spectrum (descending eigenvalues of length >= r): the single place where the
// formula of S lives in C++. Writes the energies to p_out if not null.
double scale_of_eigenvalues(const double* lambda, int64_t r, double eps, Variant variant, double* p_out);

// Backward of the decoded-map scale: dz[b, k] = grad_S[b, k] * dS/dz[b, k] for every (b, k), from the
// eigenpairs the forward kept (evals [B*K, p] descending, evecs [B*K, p, p] as rows). dz is float32 or
// float64 with z's shape and any strides; entries that nan_to_num read as 0 get gradient 0.
void scale_backward_decoded(const ArrayView& z, int mode, bool center, bool nan_to_num, double eps, Variant variant,
                            const double* evals, const double* evecs, const double* grad_S, const ArrayView& dz,
                            int num_threads);

}  // namespace auvcore
