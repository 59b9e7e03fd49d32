// Per-class intensity moments of an image under a label map: the variance baseline's one pass over the
// voxels, in C++ because numpy's version (float64 copies, a gather and three bincounts) cost more host time
// per case than everything else the main job does outside the encoder (issue 23).
#pragma once
#include <cstdint>

#include "auvcore/array.h"

namespace auvcore {

// K >= 1 (the binding checks it before it sizes the outputs). image and labels: contiguous, the same number of
// elements; image F32 or F64, labels any integer dtype with values in 0..K-1 (else ArgumentError naming the
// value). Writes, per class, the voxel count, the mean and the centred sum of squares Σ (x − mean)², each sum
// accumulated in double in voxel order (numpy's bincount's order, so the result equals the two-pass numpy
// formula to the last bit).
void class_moments(const ArrayView& image, const ArrayView& labels, int64_t K, int64_t* count, double* mean,
                   double* m2);

}  // namespace auvcore
