// Emulation shim (see cuda_runtime.h here): the slice of the warp matrix API (nvcuda::wmma) the Gram's tensor-core
// engine uses, TF32 m16n16k8 with float accumulators, as the GPU computes it:
//   - an MMA reads only the TF32 bits of its A and B elements (1 sign, 8 exponent, 10 mantissa bits; the low 13
//     bits of a float are ignored, as by the hardware), so a kernel that forgets __float_to_tf32 loses those bits
//     here too;
//   - the products of TF32 values are exact, and each MMA adds its K products to C and rounds the sum once toward
//     zero (the tensor cores align the addends and truncate, Fasi et al., "Numerical behavior of NVIDIA tensor
//     cores", PeerJ CS 2021): a sum of positive terms (a Gram's diagonal) loses up to an ulp per MMA, all the same
//     way, where FP32 FMAs round to nearest;
//   - __float_to_tf32 rounds to nearest, ties away from zero (cvt.rna.tf32.f32).
// Layout: on the GPU a fragment's elements are spread over the warp's 32 lanes in an unspecified order. Here
// every lane holds the whole tile and computes the whole product, so loads and products need no exchange;
// store_matrix_sync writes element e from lane e % 32 only, after waiting for the warp's 32 lanes (a kernel that
// stores from part of a warp hangs here as it is undefined there; the lanes' other writes to the stored tile
// need a __syncwarp, as on the GPU). A kernel that indexes fragment elements other than element-wise
// (x[i] = f(x[i])) depends on the GPU's layout and is not checked here.
// Pointers: 32-byte aligned and ldm a multiple of 4 floats (16 bytes), as the API requires; shared pointers stay
// bounds-checked (emu::Smem).
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>

#include "cuda_runtime.h"

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
namespace precision {
struct tf32 {};
}  // namespace precision
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 8, "emulated wmma: only the TF32 shape m16n16k8");
  static_assert(std::is_same_v<Use, accumulator> ? std::is_same_v<T, float> : std::is_same_v<T, precision::tf32>,
                "emulated wmma: TF32 inputs and float accumulators only");
  static constexpr int rows = std::is_same_v<Use, matrix_b> ? K : M;
  static constexpr int cols = std::is_same_v<Use, matrix_a> ? K : N;
  static constexpr int num_elements = rows * cols;
  float x[num_elements];
};

namespace detail {
inline void warp_sync() {
  emu::Block* b = emu::t_block;
  b->warp_bar[(int)threadIdx.x / 32]->arrive_and_wait();
}
// A shared pointer must lie 32 bytes into an allocation declared __align__(32) or more (what the GPU guarantees,
// not where the host put the emulated static); a global one at a 32-byte address.
template <typename P>
void check_pointer(const P& ptr, unsigned ldm, const char* op) {
  (void)ptr[0];  // a checked access for a shared pointer
  ptrdiff_t off;
  size_t align;
  if constexpr (emu::is_smem<P>::value) {
    std::tie(off, align) = ptr.placement();
  } else {
    off = (ptrdiff_t)reinterpret_cast<std::uintptr_t>(ptr), align = 256;
  }
  if (off % 32 != 0 || align < 32 || ldm % 4 != 0)
    throw std::runtime_error(std::string("emulated wmma: ") + op + " needs a 32-byte aligned pointer (a shared " +
                             "array declared __align__(32)) and ldm a multiple of 4 floats, got offset % 32 = " +
                             std::to_string(off % 32) + " in an allocation aligned to " + std::to_string(align) +
                             ", ldm = " + std::to_string(ldm));
}
inline float tf32_bits(float v) {  // what the tensor core reads of a float: its top 19 bits
  uint32_t b;
  std::memcpy(&b, &v, 4);
  b &= 0xffffe000u;
  std::memcpy(&v, &b, 4);
  return v;
}
}  // namespace detail

inline float __float_to_tf32(float v) {
  uint32_t b;
  std::memcpy(&b, &v, 4);
  if ((b & 0x7f800000u) != 0x7f800000u) b += 0x1000u;  // half of the dropped unit: ties away from zero
  b &= 0xffffe000u;
  std::memcpy(&v, &b, 4);
  return v;
}

template <typename Use, int M, int N, int K, typename T, typename L>
void fill_fragment(fragment<Use, M, N, K, T, L>& f, float v) {
  for (int i = 0; i < f.num_elements; ++i) f.x[i] = v;
}

// A (M x K) or B (K x N) from memory in the fragment's layout.
template <typename Use, int M, int N, int K, typename L, typename P>
void load_matrix_sync(fragment<Use, M, N, K, precision::tf32, L>& f, const P& ptr, unsigned ldm) {
  static_assert(std::is_same_v<L, row_major> || std::is_same_v<L, col_major>, "a layout for A and B");
  detail::check_pointer(ptr, ldm, "load_matrix_sync");
  using F = fragment<Use, M, N, K, precision::tf32, L>;
  for (int r = 0; r < F::rows; ++r)
    for (int c = 0; c < F::cols; ++c)
      f.x[r * F::cols + c] = std::is_same_v<L, row_major> ? ptr[(int64_t)r * ldm + c] : ptr[(int64_t)c * ldm + r];
}

template <int M, int N, int K, typename P>
void store_matrix_sync(const P& ptr, const fragment<accumulator, M, N, K, float>& f, unsigned ldm, layout_t layout) {
  detail::warp_sync();
  detail::check_pointer(ptr, ldm, "store_matrix_sync");
  const int lane = (int)threadIdx.x % 32;
  for (int e = lane; e < M * N; e += 32) {
    const int r = e / N, c = e % N;
    ptr[layout == mem_row_major ? (int64_t)r * ldm + c : (int64_t)c * ldm + r] = f.x[e];
  }
}

template <int M, int N, int K, typename LA, typename LB>
void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, precision::tf32, LA>& a,
              const fragment<matrix_b, M, N, K, precision::tf32, LB>& b,
              const fragment<accumulator, M, N, K, float>& c) {
  float out[M * N];
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) {
      // In double the K products of 11-bit significands and C add up exactly but for far-apart exponents.
      double s = c.x[i * N + j];
      for (int k = 0; k < K; ++k)
        s += (double)detail::tf32_bits(a.x[i * K + k]) * (double)detail::tf32_bits(b.x[k * N + j]);
      float f = (float)s;
      if (std::fabs((double)f) > std::fabs(s)) f = std::nextafter(f, 0.0f);  // toward zero
      out[i * N + j] = f;
    }
  std::memcpy(d.x, out, sizeof(out));
}

}  // namespace wmma
}  // namespace nvcuda

inline void __syncwarp(unsigned = 0xffffffffu) { nvcuda::wmma::detail::warp_sync(); }
