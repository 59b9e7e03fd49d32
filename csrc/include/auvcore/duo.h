// Fused DUO loss (docs/method.md §3): the full-size part of the loss in one pass forward and one pass backward.
//
// Everything that touches every voxel reduces to six sums per (sample b, included class c); the rest of the
// loss (Dice ratio, weights from S, the noise constraint R, the mean) is arithmetic on those B x K' numbers
// and is left to autograd in Python. The backward recomputes the per-voxel terms from the inputs, so
// nothing full-size is saved.
#pragma once
#include <cstdint>

#include "auvcore/array.h"

namespace auvcore {

// Per (b, c) sums, in this order, in a [B, K - c0, kDuoSums] double array.
enum DuoSum : int { kBCE = 0, kSigY = 1, kSig = 2, kY = 3, kG = 4, kG2 = 5, kDuoSums = 6 };

enum class DuoPreset : int {
  Paper = 0,     // ĝ = tanh(n), ỹ = clamp(y − τ ĝ, 0, 1), gradient into n through ỹ
  Official = 1,  // the authors' snippet: ỹ = y − σ(n)·y, no gradient into n; ĝ sums are 0
};

struct DuoArgs {
  // z (seg_logits) and n (noise_logits): [B, K, N], same shape and dtype (float32 or float64), any strides.
  ArrayView z, n;
  // target: [B, K, N] values in [0, 1] (floating or integer one-hot) or, with labels, [B, N] class indices.
  ArrayView y;
  bool labels = false;
  int64_t c0 = 0;  // first included class (1 without the background)
  DuoPreset preset = DuoPreset::Paper;
  double tau = 0.5;
};

// The shapes and dtypes of a, each error naming the argument (seg_logits, noise_logits, target, ...).
void check_duo_args(const DuoArgs& a);

// sums: [B, K - c0, kDuoSums]. Throws ArgumentError naming seg_logits / noise_logits / target for NaN/Inf
// or out-of-range targets.
void duo_forward_cpu(const DuoArgs& a, double* sums, int num_threads);

// grad_sums: dL/d(sums), same layout. dz, dn: [B, K, N] outputs of z's dtype (any strides); classes below c0
// get 0; with the official preset dn may be a null view (ptr 0) since no gradient reaches n.
void duo_backward_cpu(const DuoArgs& a, const double* grad_sums, const ArrayView& dz, const ArrayView& dn,
                      int num_threads);

}  // namespace auvcore
