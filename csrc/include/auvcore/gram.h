// Fused centering + Gram matrices, the first half of the semantic perception scale (SPEC §2, §5).
#pragma once
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "auvcore/array.h"

namespace auvcore {

// How the mean is removed before the Gram.
//  AcrossP: each sample (column of the p x ns matrix) loses its mean over the p rows. This is the decoded
//           mode with m <= n: the mean row of M is subtracted and the Gram M̄ M̄ᵀ is taken on the row side.
//  AcrossSamples: each of the p coordinates loses its mean over the samples. This is the masked mode and
//           the decoded mode with m > n: the Gram M̄ᵀ M̄ is taken on the column side.
enum class Centering : int { None = 0, AcrossP = 1, AcrossSamples = 2 };

// One Gram matrix. Element (a, t) of its p x ns matrix sits at data[base + p_off[a] + s_off[t]].
struct GramJob {
  int64_t base;
  const int64_t* s_off;
  int64_t ns;
};

// G[j] (p x p, both triangles) = Σ_t x̄_t x̄_tᵀ for each job j, accumulated in double.
// Float inputs multiply in float32 within a short panel and add the panel into double; double inputs stay
// double. Any finite input gives a finite G: a panel whose values would overflow (or underflow) the products
// in its precision is first multiplied by a power of two (exact), and the sums are brought back to the true
// scale in double; only a float64 input whose Gram exceeds the double range (|x| beyond ~1e150) has its G
// scaled down by a power of two, which leaves S (scale-invariant at that energy) unchanged. Throws ArgumentError naming `arg` if a non-finite value is read and nan_to_num is false
// (with nan_to_num, NaN/±Inf read as 0). in_double makes lower-precision inputs multiply in double too.
void gram_cpu(const void* data, DType dtype, const std::vector<int64_t>& p_off, const std::vector<GramJob>& jobs,
              Centering centering, bool nan_to_num, double* G, int num_threads, const char* arg, bool in_double);

// Decoded maps z [B, K, D, H, W] (mode 0 "D_HW", 1 "H_DW", 2 "W_DH") or [B, K, H, W] (m = H, n = W).
// G has room for B*K matrices of p x p, p = min(m, n). in_double: see gram_cpu (the official preset).
void decoded_gram(const ArrayView& z, int mode, bool center, bool nan_to_num, double* G, int num_threads,
                  bool in_double);

#if defined(__CUDACC__)
#define AUVCORE_HOST_DEVICE __host__ __device__
#else
#define AUVCORE_HOST_DEVICE
#endif

// The pre-scale against overflow and underflow (issue 24): the power of two 2^e that values bounded by `bound`
// (centred ones included) are multiplied by before their products are summed in T (4-byte: float, else
// double). Within a range where neither the products nor their sums over a panel can leave T's normal range
// (|x| in 2^±32 for float: products within 2^±64, sums of a few thousand of them far below 2^128; 2^±400 for
// double) e = 0 and nothing is multiplied; outside it e brings the bound to [1, 2). Exact in binary floating
// point, and undone in double. The clamp keeps 2^e a finite double (it only bites on float64 denormals).
template <int TBytes>
AUVCORE_HOST_DEVICE inline int prescale_exponent(double bound) {
  if (!(bound > 0.0)) return 0;
  const int lg = ilogb(bound);
  const int safe = TBytes == 4 ? 32 : 400;
  if (lg >= -safe && lg <= safe) return 0;
  return -lg < -1000 ? -1000 : -lg > 1000 ? 1000 : -lg;
}

// Float centring without a pre-scale: the sample means m (double) as float pairs hi + lo (hi = m rounded, lo
// = the rest), subtracted from each of the p rows as (x - hi) - lo. Each subtraction is correctly rounded
// relative to its result, and x - hi is within |lo| of the centred value, so the centred value is off by at most
// ~1.5 ulp of itself whatever the offset; twice as fast as subtracting in double, where the centring was 15 % of
// the Gram's time. One place for the Gram's chunked and three-pass paths, which must give the same bits.
template <typename T>
__attribute__((always_inline)) inline void subtract_means_as_float_pairs(T* rows, int64_t p, int64_t ld, int64_t nb,
                                                                         const double* mean, float* hi, float* lo) {
  for (int64_t t = 0; t < nb; ++t) {
    hi[t] = (float)mean[t];
    lo[t] = (float)(mean[t] - (double)hi[t]);
  }
  for (int64_t a = 0; a < p; ++a) {
    T* row = rows + a * ld;
    for (int64_t t = 0; t < nb; ++t) row[t] = (T)(((float)row[t] - hi[t]) - lo[t]);
  }
}

// Subtract from every sample (column t) its mean over the p rows, computed and subtracted in double so
// that a large common offset does not cost float32 digits. Used by the Gram panels and by the backward's
// centering projection. `scale` (a power of two: the Gram's pre-scale, gram_cpu.cpp) multiplies the centred
// value in double before it is rounded to T, so a centred value beyond T's range never exists in T.
template <typename T>
__attribute__((always_inline)) inline void center_across_p(T* panel, int64_t p, int64_t ld, int64_t nb,
                                                                double* colmean, double scale = 1.0) {
  for (int64_t t = 0; t < nb; ++t) colmean[t] = 0.0;
  for (int64_t a = 0; a < p; ++a) {
    const T* row = panel + a * ld;
    for (int64_t t = 0; t < nb; ++t) colmean[t] += (double)row[t];
  }
  const double inv_p = 1.0 / (double)p;
  for (int64_t t = 0; t < nb; ++t) colmean[t] *= inv_p;
  if (sizeof(T) == 4 && scale == 1.0) {
    std::vector<float> hi(nb), lo(nb);
    subtract_means_as_float_pairs(panel, p, ld, nb, colmean, hi.data(), lo.data());
    return;
  }
  for (int64_t a = 0; a < p; ++a) {
    T* row = panel + a * ld;
    for (int64_t t = 0; t < nb; ++t) row[t] = (T)(((double)row[t] - colmean[t]) * scale);
  }
}

// The argument checks of the masked layout, shared by the CPU and CUDA ops.
inline void check_masked_args(const ArrayView& f, const ArrayView& labels, int64_t K) {
  require(is_floating(f.dtype), "features: expected a floating dtype");
  require(!is_floating(labels.dtype), "labels: expected an integer dtype");
  require(f.dim() >= 3, "features: expected [B, C, *spatial]");
  require(labels.dim() == f.dim() - 1, "labels: expected [B, *spatial] matching features [B, C, *spatial]");
  for (int64_t d = 0; d < labels.dim(); ++d)
    require(labels.shape[d] == f.shape[d == 0 ? 0 : d + 1],
            "labels: shape does not match features [B, C, *spatial] at dimension " + std::to_string(d));
  require(K >= 1, "num_classes: expected >= 1");
}

// The Gram of an m x n class matrix M (rows are vectors) is taken on its smaller side, which has the same
// non-zero spectrum: M̄ M̄ᵀ (m x m, the rows are the p vectors) when m <= n, else M̄ᵀ M̄ (n x n). Centering
// subtracts the mean row either way. One rule for the decoded maps (M = m x n of a class map) and masked
// mode (M = the n_c x C embeddings of a class).
inline bool gram_on_rows(int64_t m, int64_t n) { return m <= n; }
inline Centering centering_for(bool row_side, bool center) {
  return !center ? Centering::None : row_side ? Centering::AcrossP : Centering::AcrossSamples;
}

// The voxels of each (sample, class) as one segment of feature offsets (relative to the sample), from a
// counting sort of the labels; counts [B, K] receives the voxels per class. Checks the labels' range.
struct ClassSort {
  int64_t N;                      // voxels per sample
  std::vector<int64_t> offsets;   // [B, N]: sample b's feature offsets, class by class
  std::vector<int64_t> start;     // [B, K + 1]: segment bounds
  const int64_t* segment(int64_t b, int64_t k, int64_t K) const { return offsets.data() + b * N + start[b * (K + 1) + k]; }
  int64_t count(int64_t b, int64_t k, int64_t K) const { return start[b * (K + 1) + k + 1] - start[b * (K + 1) + k]; }
};
ClassSort sort_by_class(const ArrayView& f, const ArrayView& labels, int64_t K, int64_t* counts);

// Masked embeddings f [B, C, *spatial] and labels [B, *spatial] in 0..K-1: G [B, K, C, C] (column side,
// centred over the voxels of each class) and counts [B, K] (voxels per class). The scale itself takes the
// smaller side (masked_scale in scale.h); this C x C form is for the Gram benchmark.
void masked_gram(const ArrayView& f, const ArrayView& labels, int64_t num_classes, bool center, bool nan_to_num,
                 double* G, int64_t* counts, int num_threads);

// Sizes of the decoded layout: {m, n} of one class matrix.
std::pair<int64_t, int64_t> decoded_shape(const ArrayView& z, int mode);

// Where the Gram of one decoded class matrix reads: element (a, t) of the p x ns matrix of sample b, class k
// sits at b*strides[0] + k*strides[1] + p_off[a] + s_off[t]. row_side: the p vectors are the m rows of M.
struct DecodedLayout {
  std::vector<int64_t> p_off, s_off;
  bool row_side;
  Centering centering(bool center) const { return centering_for(row_side, center); }
};
DecodedLayout decoded_layout(const ArrayView& z, int mode);

}  // namespace auvcore
