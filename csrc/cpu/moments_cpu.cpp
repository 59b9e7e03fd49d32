#include "auvcore/moments.h"

#include <string>
#include <vector>

namespace auvcore {
namespace {

template <typename X, typename L>
void moments(const X* x, const L* l, int64_t N, int64_t K, int64_t* count, double* mean, double* m2) {
  std::vector<double> sum(K, 0.0);
  for (int64_t k = 0; k < K; ++k) count[k] = 0;
  for (int64_t i = 0; i < N; ++i) {
    const int64_t c = static_cast<int64_t>(l[i]);
    if (c < 0 || c >= K)
      throw ArgumentError("label: value " + std::to_string(c) + " is outside 0.." + std::to_string(K - 1) +
                          " (num_classes=" + std::to_string(K) + ")");
    ++count[c];
    sum[c] += static_cast<double>(x[i]);
  }
  for (int64_t k = 0; k < K; ++k) {
    mean[k] = count[k] ? sum[k] / static_cast<double>(count[k]) : 0.0;
    m2[k] = 0.0;
  }
  for (int64_t i = 0; i < N; ++i) {  // the centred second pass: exact for values with a large common offset
    const double d = static_cast<double>(x[i]) - mean[l[i]];
    m2[l[i]] += d * d;
  }
}

template <typename X>
void dispatch_labels(const X* x, const ArrayView& labels, int64_t N, int64_t K, int64_t* count, double* mean,
                     double* m2) {
  const void* p = labels.data();
  switch (labels.dtype) {
    case DType::U8: return moments(x, static_cast<const uint8_t*>(p), N, K, count, mean, m2);
    case DType::I8: return moments(x, static_cast<const int8_t*>(p), N, K, count, mean, m2);
    case DType::I16: return moments(x, static_cast<const int16_t*>(p), N, K, count, mean, m2);
    case DType::I32: return moments(x, static_cast<const int32_t*>(p), N, K, count, mean, m2);
    case DType::I64: return moments(x, static_cast<const int64_t*>(p), N, K, count, mean, m2);
    default: throw ArgumentError("label: expected an integer dtype");
  }
}

}  // namespace

void class_moments(const ArrayView& image, const ArrayView& labels, int64_t K, int64_t* count, double* mean,
                   double* m2) {
  require(image.numel() == labels.numel(), "image and label: element counts differ, " +
                                               std::to_string(image.numel()) + " vs " + std::to_string(labels.numel()));
  require(is_contiguous(image) && is_contiguous(labels), "image and label: expected contiguous arrays");
  require_on(image, kHost, "image");
  require_on(labels, kHost, "label");
  const int64_t N = image.numel();
  switch (image.dtype) {
    case DType::F32: return dispatch_labels(static_cast<const float*>(image.data()), labels, N, K, count, mean, m2);
    case DType::F64: return dispatch_labels(static_cast<const double*>(image.data()), labels, N, K, count, mean, m2);
    default: throw ArgumentError("image: expected float32 or float64");
  }
}

}  // namespace auvcore
