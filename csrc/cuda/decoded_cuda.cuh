// Where the CUDA kernels read decoded maps, shared by the Gram (gram_cuda.cu) and the backward of S
// (scale_backward_cuda.cu), so both walk a class matrix the same way: element loads of every floating dtype
// widened to double, and the p x ns matrix of one (sample, class) as two index maps.
#pragma once
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "auvcore/array.h"
#include "auvcore/gram.h"  // gram_on_rows

namespace auvcore {
namespace cuda {

// Offset of index i in a dimension that may be two dimensions of the input folded together:
// (i % inner) * s_in + (i / inner) * s_out; inner <= 0 means a single dimension.
struct IndexMap {
  int64_t inner = 0, s_in = 0, s_out = 0;
  __host__ __device__ __forceinline__ int64_t operator()(int64_t i) const {
    if (inner <= 0) return i * s_in;
    return (i % inner) * s_in + (i / inner) * s_out;
  }
};

// Tags of the 16-bit input types (read as raw bits, widened on load).
struct F16 {};
struct BF16 {};

// f(In{}) with the input tag of a floating dtype (double, float, F16, BF16): the one dispatch from a view's dtype
// to the kernels templated on load_elem<In>. `arg` names the input in the error for any other dtype.
template <typename F>
void dispatch_input(DType dt, const char* arg, F&& f) {
  switch (dt) {
    case DType::F64: return f(double{});
    case DType::F32: return f(float{});
    case DType::F16: return f(F16{});
    case DType::BF16: return f(BF16{});
    default: throw ArgumentError(std::string(arg) + ": expected a floating dtype");
  }
}

#ifdef __CUDACC__
template <typename In>
__device__ __forceinline__ double load_elem(const void* base, int64_t off);
template <>
__device__ __forceinline__ double load_elem<float>(const void* base, int64_t off) {
  return (double)__ldg(static_cast<const float*>(base) + off);
}
template <>
__device__ __forceinline__ double load_elem<double>(const void* base, int64_t off) {
  return __ldg(static_cast<const double*>(base) + off);
}
template <>
__device__ __forceinline__ double load_elem<F16>(const void* base, int64_t off) {
  const unsigned short h = __ldg(static_cast<const unsigned short*>(base) + off);
  return (double)__half2float(__ushort_as_half(h));
}
template <>
__device__ __forceinline__ double load_elem<BF16>(const void* base, int64_t off) {
  const unsigned short h = __ldg(static_cast<const unsigned short*>(base) + off);
  return (double)__uint_as_float((unsigned)h << 16);
}
#endif

// The class matrix M (m x n) of decoded maps z [B, K, D, H, W] (mode 0 "D_HW", 1 "H_DW", 2 "W_DH") or
// [B, K, H, W] (m = H, n = W), as csrc/cpu/gram_cpu.cpp reads it: its Gram is taken on the smaller side
// (gram_on_rows), so element (a, t) of the p x ns matrix of (b, k) sits at
// b*strides[0] + k*strides[1] + pmap(a) + smap(t).
struct DecodedMaps {
  int64_t p = 0, ns = 0;
  bool row_side = true;
  IndexMap pmap, smap;
};

// Shape and mode are checked by the caller (decoded_shape in gram.h).
inline DecodedMaps decoded_maps(const ArrayView& z, int mode) {
  int64_t m, n, rs, no, os, ni, is;  // rows (m, stride rs) x columns (outer no x inner ni, strides os and is)
  if (z.dim() == 4) {
    m = z.shape[2]; n = z.shape[3]; rs = z.strides[2]; no = 1; os = 0; ni = z.shape[3]; is = z.strides[3];
  } else {
    const int64_t D = z.shape[2], H = z.shape[3], W = z.shape[4];
    const int64_t sd = z.strides[2], sh = z.strides[3], sw = z.strides[4];
    if (mode == 0) { m = D; rs = sd; no = H; os = sh; ni = W; is = sw; }
    else if (mode == 1) { m = H; rs = sh; no = D; os = sd; ni = W; is = sw; }
    else { m = W; rs = sw; no = D; os = sd; ni = H; is = sh; }
    n = no * ni;
  }
  IndexMap rows, cols;
  rows.s_in = rs;
  cols.inner = no > 1 ? ni : 0;
  cols.s_in = is;
  cols.s_out = os;
  DecodedMaps d;
  d.row_side = gram_on_rows(m, n);
  d.p = d.row_side ? m : n;
  d.ns = d.row_side ? n : m;
  d.pmap = d.row_side ? rows : cols;
  d.smap = d.row_side ? cols : rows;
  return d;
}

}  // namespace cuda
}  // namespace auvcore
