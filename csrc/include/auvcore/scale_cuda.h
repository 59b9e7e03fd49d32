// CUDA kernels of the semantic perception scale (SPEC §2, §5): host entry points.
// All pointers are device pointers owned by the caller (torch/CuPy memory), read and written in place on the
// caller's stream. Nothing here synchronises the device; errors throw (ArgumentError for bad arguments,
// std::runtime_error carrying the CUDA error string for failed CUDA calls).
#pragma once
#include <cstdint>

#include "auvcore/array.h"

namespace auvcore {
namespace cuda {

// Number of usable CUDA devices; 0 (never an exception) when there is no driver or no GPU.
int device_count();

// Whether this module's kernels can run on `device` (machine code or PTX for its architecture is in the
// binary). False, never an exception, for a missing device or driver.
bool device_supported(int device);

// Decoded maps z [B, K, D, H, W] or [B, K, H, W] (mode 0 "D_HW", 1 "H_DW", 2 "W_DH").
// G: [B*K, p, p] float64, p = min(m, n), written in full (symmetric). flags: [B*K] int32, zero on entry; bit 0
// is set for each (sample, class) whose matrix held a NaN/Inf (read as 0) when nan_to_num is false.
void decoded_gram(const ArrayView& z, int mode, bool center, bool nan_to_num, double* G, int32_t* flags,
                  std::uintptr_t stream, int device);

// Masked embeddings f [B, C, *spatial], labels [B, *spatial] in 0..K-1.
// G: [B*K, C, C] float64 (column side, centred over each class's voxels); counts: [B*K] int64 voxels per class;
// flags as above; label_error: [2] int64, zero on entry; set to {1, value} if a label is outside 0..K-1
// (such voxels join no class). smaller_side: a class with n < C voxels gets its n x n row-side Gram instead
// (same non-zero spectrum, n/C of the eigen work), stored densely at the start of its slot; pass
// sized_by_counts to scale_from_gram then.
void masked_gram(const ArrayView& f, const ArrayView& labels, int64_t K, bool center, bool nan_to_num,
                 bool smaller_side, double* G, int64_t* counts, int32_t* flags, int64_t* label_error,
                 std::uintptr_t stream, int device);

// For each of `count` symmetric G (p x p, float64, overwritten): eigenvalues in double, then S over the top r
// (r = min(counts[i], p) when counts is given, else r_const). S[i] = NaN where r < 2 or flags[i] != 0 (flags may
// be null). sized_by_counts: matrix i is r x r, stored densely at the start of its p x p slot (masked_gram's
// smaller side). evals (optional, [count, p]): eigenvalues in descending order, unclamped (zero-padded past r
// for sized matrices).
void scale_from_gram(double* G, int64_t count, int64_t p, const int64_t* counts, int64_t r_const, bool sized_by_counts,
                     double eps, int variant, const int32_t* flags, double* S, double* evals, std::uintptr_t stream,
                     int device);

// Eigenvalues and eigenvectors of `count` symmetric p x p float64 matrices G (read, not changed; both
// triangles read, their mean used), one block per matrix in one launch (parallel cyclic Jacobi,
// csrc/cuda/eigvec_cuda.cu): evals [count, p] descending, evecs [count, p, p] with the eigenvector of evals[j]
// as row j — the layout scale_backward_decoded takes. Bit-identical from run to run; no host synchronisation.
// A matrix with a NaN/Inf entry gets NaN eigenpairs. p must be at most kMaxEigenpairsSize.
void gram_eigenpairs(const double* G, int64_t count, int64_t p, double* evals, double* evecs, std::uintptr_t stream,
                int device);

// Analytic backward of the decoded-map S (the twin of scale_backward_decoded in scale.h): dz[b, k] =
// grad_S[b, k] * dS/dz[b, k] from the eigenpairs the forward kept (evals [B*K, p] descending, evecs [B*K, p, p]
// with eigenvector j as row j, grad_S [B*K], all float64 device memory). dz: float32 or float64 with z's shape
// and any strides; entries that are NaN/Inf in z (read as 0 by the forward) get gradient 0.
void scale_backward_decoded(const ArrayView& z, int mode, bool center, double eps, int variant, const double* evals,
                            const double* evecs, const double* grad_S, const ArrayView& dz, std::uintptr_t stream,
                            int device);

// Largest Gram size the eigen kernel takes.
constexpr int64_t kMaxEighSize = 4096;
// Largest matrix the eigenpairs kernel takes: Jacobi's O(p³) work per sweep runs in one block, which beyond a
// few hundred loses to a library solver (auvcore/_cuda.py falls back to torch.linalg.eigh there).
constexpr int64_t kMaxEigenpairsSize = 256;

}  // namespace cuda
}  // namespace auvcore
