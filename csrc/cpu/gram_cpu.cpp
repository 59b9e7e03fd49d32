#include "auvcore/gram.h"
#include "auvcore/isa.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <immintrin.h>
#include <memory>
#include <string>
#include <type_traits>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace auvcore {
namespace {

constexpr int64_t kPad = 12;  // rows are padded to a multiple of every register tile's rows (4 and 6)
// One panel row: 512 floats or 256 doubles. A register tile streams its R + C rows through L1 (48 KiB on Zen 5):
// at 4 KiB per row the AVX-512 tile's 40 KiB did not stay there; 2 KiB rows measured 2-5 % faster on AVX2 and
// AVX-512 despite twice the tile reductions.
constexpr int64_t kPanelBytes = 2048;

// One vector type per (instruction set, precision), each the width of that set's registers: a 64-byte type
// on AVX2 is two ymm registers, on SSE2 four xmm, and a tile of them spills.
typedef float v16f __attribute__((vector_size(64)));
typedef float v8f __attribute__((vector_size(32)));
typedef float v4f __attribute__((vector_size(16)));
typedef double v8d __attribute__((vector_size(64)));
typedef double v4d __attribute__((vector_size(32)));
typedef double v2d __attribute__((vector_size(16)));

// Horizontal sums by halving: a few shuffles instead of one scalar add per lane. Float lanes add in float
// down to two, then in double.
__attribute__((always_inline)) inline double hsum(v4f x) {
  x += __builtin_shufflevector(x, x, 2, 3, 0, 1);
  return (double)x[0] + (double)x[1];
}
__attribute__((always_inline)) inline double hsum(v8f x) {
  return hsum(__builtin_shufflevector(x, x, 0, 1, 2, 3) + __builtin_shufflevector(x, x, 4, 5, 6, 7));
}
__attribute__((always_inline)) inline double hsum(v16f x) {
  return hsum(__builtin_shufflevector(x, x, 0, 1, 2, 3, 4, 5, 6, 7) +
              __builtin_shufflevector(x, x, 8, 9, 10, 11, 12, 13, 14, 15));
}
__attribute__((always_inline)) inline double hsum(v2d x) { return x[0] + x[1]; }
__attribute__((always_inline)) inline double hsum(v4d x) {
  return hsum(__builtin_shufflevector(x, x, 0, 1) + __builtin_shufflevector(x, x, 2, 3));
}
__attribute__((always_inline)) inline double hsum(v8d x) {
  return hsum(__builtin_shufflevector(x, x, 0, 1, 2, 3) + __builtin_shufflevector(x, x, 4, 5, 6, 7));
}

// g[0..4) += f · (the horizontal sums of a, b, c, d), for the AVX-512 tile's rows of four accumulators: the halving
// steps of hsum applied to the four vectors together (each shuffle serves two or four of them), float down to two
// lanes each, then double. A third of hsum's instructions: its 24 reductions per tile were ~15 % of the tile. The
// last steps with intrinsics (gcc 12 split the convertvector to double into xmm pieces through the stack), so this
// carries its target and is not always_inline (see Vec); arguments by reference for the same reason.
AUVCORE_TARGET_AVX512 inline void hsum4_add(const v16f& a, const v16f& b, const v16f& c, const v16f& d, double f,
                                            double* g) {
  const v16f ab = __builtin_shufflevector(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
                  __builtin_shufflevector(a, b, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  const v16f cd = __builtin_shufflevector(c, d, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
                  __builtin_shufflevector(c, d, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  // [a b c d], four lanes each
  const v16f q = __builtin_shufflevector(ab, cd, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
                 __builtin_shufflevector(ab, cd, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
  const v16f t = q + __builtin_shufflevector(q, q, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
  const __m256d sum = _mm256_add_pd(_mm256_cvtps_pd((__m128)__builtin_shufflevector(t, t, 0, 4, 8, 12)),
                                    _mm256_cvtps_pd((__m128)__builtin_shufflevector(t, t, 1, 5, 9, 13)));
  _mm256_storeu_pd(g, _mm256_fmadd_pd(_mm256_set1_pd(f), sum, _mm256_loadu_pd(g)));
}

// g[0..2) += f · (the horizontal sums of a and b): hsum4_add's steps for two vectors (the AVX-512 narrow tiles and
// the diagonal tile's short rows).
AUVCORE_TARGET_AVX512 inline void hsum2_add(const v16f& a, const v16f& b, double f, double* g) {
  const v16f ab = __builtin_shufflevector(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
                  __builtin_shufflevector(a, b, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  const v8f q = __builtin_shufflevector(ab, ab, 0, 1, 2, 3, 8, 9, 10, 11) +
                __builtin_shufflevector(ab, ab, 4, 5, 6, 7, 12, 13, 14, 15);  // [a b], four lanes each
  const v8f t = q + __builtin_shufflevector(q, q, 2, 3, 0, 1, 6, 7, 4, 5);
  const __m128d sum = _mm_add_pd(_mm_cvtps_pd((__m128)__builtin_shufflevector(t, t, 0, 4, 0, 4)),
                                 _mm_cvtps_pd((__m128)__builtin_shufflevector(t, t, 1, 5, 1, 5)));
  _mm_storeu_pd(g, _mm_fmadd_pd(_mm_set1_pd(f), sum, _mm_loadu_pd(g)));
}

// The next panel's reads, issued as software prefetches while the current panel's product runs. The product
// works from L1/L2 and leaves the memory bus idle; reading the next panel from DRAM afterwards cost a quarter of
// the Gram's time (decoded 2 x 14 x 96³ float32, one thread: 0.83 ms per matrix against 0.60 with the input
// already cached). Walks row by row through the next panel's runs of consecutive samples, one cache line per
// prefetch (prefetcht0; t1 measured the same).
struct Prefetcher {
  const char* x = nullptr;  // the job's first element
  int64_t esize = 0;        // bytes per element
  const int64_t* p_off = nullptr;
  int64_t p = 0;
  const int64_t* so = nullptr;
  const std::vector<int64_t>* runs = nullptr;  // (start, length) pairs, find_runs
  int64_t a = 0;                               // the row being prefetched
  size_t r = 0;                                // its run
  const char *cur = nullptr, *end = nullptr;   // what is left of that run
  int64_t per_call = 0;  // prefetches per issue(): the panel's lines spread over the product's tiles

  void start(const char* x_, int64_t esize_, const int64_t* p_off_, int64_t p_, const int64_t* so_,
             const std::vector<int64_t>* runs_) {
    x = x_, esize = esize_, p_off = p_off_, p = p_, so = so_, runs = runs_;
    a = 0;
    r = 0;
    // Scattered samples (a class of per-voxel random labels: runs of one or two) would take a prefetch per
    // element, more than the reads they hide (+35 % on that case): only runs a cache line long on average.
    int64_t elems = 0;
    for (size_t i = 1; i < runs->size(); i += 2) elems += (*runs)[i];
    if (runs->empty() || (int64_t)(runs->size() / 2) * 64 > elems * esize) p = 0;
    if (p) segment();
  }
  void stop() { a = p = 0; }
  int64_t lines() const {
    int64_t n = 0;
    for (size_t i = 0; i < runs->size(); i += 2) n += ((*runs)[i + 1] * esize + 63) / 64;
    return n * p;
  }
  void segment() {
    cur = x + (p_off[a] + so[(*runs)[r]]) * esize;
    end = cur + (*runs)[r + 1] * esize;
  }
  // per_call lines, each run's in one tight loop (1 % of the AVX-512 Gram against a test per line).
  __attribute__((always_inline)) inline void issue() {
    for (int64_t n = per_call; n > 0 && a < p;) {
      const int64_t k = std::min<int64_t>(n, (end - cur + 63) / 64);
      for (int64_t i = 0; i < k; ++i) __builtin_prefetch(cur + 64 * i, 0, 3);
      cur += 64 * k;
      n -= k;
      if (cur >= end) {
        r += 2;
        if (r >= runs->size()) r = 0, ++a;
        if (a < p) segment();
      }
    }
  }
};

// One register tile of G += f · P Pᵀ: rows a[0..R) against rows b[0..C) of the panel, each entry one vector
// accumulator over the samples, reduced once at the end. Per step the C column vectors sit in registers and each
// of the R row vectors is loaded once (folded into its FMAs' memory operand), so R + C loads feed R·C FMAs, and
// R·C + C (+1) registers are live: R x C is sized so that this fits the register file of the instruction set
// (16 ymm/xmm: 4 x 3; 32 zmm: 6 x 4) and the loop does not spill. kDiag: the R x R tile on G's diagonal (b = a),
// of which only the lower triangle is computed: R(R+1)/2 accumulators on the R vectors of one load each.
template <typename V, int R, int C, bool kDiag, int kSlot, typename T>
__attribute__((always_inline)) inline void syrk_tile(const T* a, const T* b, int64_t ld, int64_t nvec, double* g,
                                                     int64_t ldg, double f, Prefetcher* pf) {
  constexpr int64_t W = sizeof(V) / sizeof(T);
  static_assert(!kDiag || R == C, "a diagonal tile is square");
  V c[R][C] = {};
  // Blocks of kSlot steps with the prefetches issued between them, not a test in every step (2 % of the AVX2
  // Gram); kSlot = 0: one block, the prefetches issued before it.
  constexpr int64_t kBlock = kSlot ? kSlot * W : INT64_MAX;
  for (int64_t o0 = 0; o0 < nvec * W; o0 += kBlock) {
    if (pf) pf->issue();
    const int64_t o1 = std::min(nvec * W, o0 + kBlock);
    for (int64_t o = o0; o < o1; o += W) {
      V y[C];
#pragma GCC unroll 8
      for (int q = 0; q < C; ++q) y[q] = *(const V*)(b + q * ld + o);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const V x = kDiag ? y[r] : *(const V*)(a + r * ld + o);
#pragma GCC unroll 8
        for (int q = 0; q < C; ++q)
          if (!kDiag || q <= r) c[r][q] += x * y[q];
      }
    }
  }
  // Unrolled, so that every index into c is a constant and c lives in registers (a loop over r kept it in memory:
  // zeroed with a rep stos and spilled for the sums, 18 % of the AVX-512 product's time outside its inner loops).
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    double* gr = g + r * ldg;
    // AVX-512: a row's entries four (hsum4_add) or two (hsum2_add) at a time, the rest one by one.
    const int n = kDiag ? r + 1 : C;
    int q = 0;
    if constexpr (std::is_same_v<V, v16f> && C >= 4)
      if (n >= 4) hsum4_add(c[r][0], c[r][1], c[r][2], c[r][3], f, gr), q = 4;
    if constexpr (std::is_same_v<V, v16f> && C >= 2)
      if (n - q >= 2) hsum2_add(c[r][q], c[r][q + 1], f, gr + q), q += 2;
#pragma GCC unroll 8
    for (; q < n; ++q) gr[q] += f * hsum(c[r][q]);
  }
}

// G (lower triangle, ldg) += f · P Pᵀ for a panel P of pp rows (pp % R == 0), nvec vectors per row; f is the
// panel's power-of-two unscaling (gram_typed). Each block of R rows takes full R x C tiles left of its diagonal
// block, one narrower tile for the columns left over, and the triangle of its diagonal block: nothing above the
// diagonal is computed (tiles across it had computed 7 % more than the triangle at p = 96).
template <typename V, int R, int C, int kSlot, typename T>
__attribute__((always_inline)) inline void syrk_panel_impl(const T* P, int64_t pp, int64_t ld, int64_t nvec, double* G,
                                                           int64_t ldg, double f, Prefetcher* pf) {
  static_assert(kPad % R == 0 && C <= 4, "the padded rows must split into whole row blocks");
  // The prefetches go out a few every kSlot steps of a tile (AVX2 and SSE2: in one burst per tile they filled the
  // miss buffers and stalled the tile's loads, 6-9 % of the AVX2 Gram) or in one burst per tile (AVX-512,
  // kSlot = 0: spread every 8 or 16 steps it measured the same or slower).
  if (pf && pf->p) {
    int64_t tiles = 0;
    for (int64_t I = 0; I < pp; I += R) tiles += (I + C - 1) / C + 1;
    const int64_t slots = tiles * (kSlot ? (nvec + kSlot - 1) / kSlot : 1);
    pf->per_call = (pf->lines() + slots - 1) / slots;
  }
  for (int64_t I = 0; I < pp; I += R) {
    const T* a = P + I * ld;
    double* g = G + I * ldg;
    int64_t J = 0;
    for (; J + C <= I; J += C) syrk_tile<V, R, C, false, kSlot>(a, P + J * ld, ld, nvec, g + J, ldg, f, pf);
    switch (I - J) {  // the columns between the last full tile and the diagonal block
      case 1: syrk_tile<V, R, 1, false, kSlot>(a, P + J * ld, ld, nvec, g + J, ldg, f, pf); break;
      case 2: syrk_tile<V, R, 2, false, kSlot>(a, P + J * ld, ld, nvec, g + J, ldg, f, pf); break;
      case 3: syrk_tile<V, R, 3, false, kSlot>(a, P + J * ld, ld, nvec, g + J, ldg, f, pf); break;
      default: break;
    }
    syrk_tile<V, R, R, true, kSlot>(a, a, ld, nvec, g + I, ldg, f, pf);
  }
}

// One build per instruction set (isa.h), each with its own vector width and register tile.
#define AUVCORE_SYRK(NAME, TARGET, VF, VD, R, C, SLOT)                                                    \
  TARGET void NAME(const float* P, int64_t pp, int64_t ld, int64_t nvec, double* G, int64_t ldg, double f, \
                   Prefetcher* pf) {                                                                      \
    syrk_panel_impl<VF, R, C, SLOT>(P, pp, ld, nvec * (64 / sizeof(VF)), G, ldg, f, pf);                 \
  }                                                                                                       \
  TARGET void NAME(const double* P, int64_t pp, int64_t ld, int64_t nvec, double* G, int64_t ldg, double f, \
                   Prefetcher* pf) {                                                                      \
    syrk_panel_impl<VD, R, C, SLOT>(P, pp, ld, nvec * (64 / sizeof(VD)), G, ldg, f, pf);                 \
  }
AUVCORE_SYRK(syrk_avx512, AUVCORE_TARGET_AVX512, v16f, v8d, 6, 4, 0)
AUVCORE_SYRK(syrk_avx2, AUVCORE_TARGET_AVX2, v8f, v4d, 4, 3, 8)
AUVCORE_SYRK(syrk_generic, , v4f, v2d, 4, 3, 8)
#undef AUVCORE_SYRK

// nvec counts 64-byte vectors (the panel's rows are padded to a multiple of 64 bytes); each build converts it
// to its own width.
template <typename T>
void syrk_panel(const T* P, int64_t pp, int64_t ld, int64_t nvec, double* G, int64_t ldg, double f, Prefetcher* pf) {
  switch (isa_level()) {
    case kIsaAvx512: return syrk_avx512(P, pp, ld, nvec, G, ldg, f, pf);
    case kIsaAvx2: return syrk_avx2(P, pp, ld, nvec, G, ldg, f, pf);
    default: return syrk_generic(P, pp, ld, nvec, G, ldg, f, pf);
  }
}

struct AlignedFree {
  void operator()(void* p) const { std::free(p); }
};
template <typename T>
std::unique_ptr<T[], AlignedFree> aligned_zeros(int64_t n) {
  size_t bytes = ((size_t)std::max<int64_t>(n, 1) * sizeof(T) + 63) / 64 * 64;
  T* p = static_cast<T*>(std::aligned_alloc(64, bytes));
  if (!p) throw std::bad_alloc();
  std::memset(p, 0, bytes);
  return std::unique_ptr<T[], AlignedFree>(p);
}

// Typed reads of the caller's memory into the panel. Sorted sample offsets that are consecutive (the usual
// decoded layout) take the contiguous path, which the compiler vectorises; the non-finite test is an integer
// or-reduction over the exponent bits, so it vectorises too.
template <typename Src>
struct Reader;
template <>
struct Reader<float> {
  __attribute__((always_inline)) static float get(const float* p) { return *p; }
};
template <>
struct Reader<double> {
  __attribute__((always_inline)) static double get(const double* p) { return *p; }
};
struct Half { uint16_t bits; };
struct BHalf { uint16_t bits; };
template <>
struct Reader<Half> {
  __attribute__((always_inline)) static float get(const Half* p) { return half_to_float(p->bits); }
};
template <>
struct Reader<BHalf> {
  __attribute__((always_inline)) static float get(const BHalf* p) { return bf16_to_float(p->bits); }
};

// The bits of |v|: as unsigned integers they order the magnitudes, and NaN and Inf (exponent bits all ones)
// lie above every finite value. One integer max-reduction over them gives both the panel's largest magnitude
// (its pre-scale) and whether a non-finite value was read; it vectorises where a float max or a bool or
// would not.
__attribute__((always_inline)) inline uint32_t abs_bits(float v) {
  uint32_t b;
  std::memcpy(&b, &v, 4);
  return b & 0x7fffffffu;
}
__attribute__((always_inline)) inline uint64_t abs_bits(double v) {
  uint64_t b;
  std::memcpy(&b, &v, 8);
  return b & 0x7fffffffffffffffull;
}
template <typename T>
using Bits = decltype(abs_bits(T()));
template <typename T>
constexpr Bits<T> kInfBits = sizeof(T) == 4 ? (Bits<T>)0x7f800000u : (Bits<T>)0x7ff0000000000000ull;
template <typename T>
inline T from_bits(Bits<T> b) {
  T v;
  std::memcpy(&v, &b, sizeof(T));
  return v;
}
template <typename T>
inline bool non_finite(T v) {
  return abs_bits(v) >= kInfBits<T>;
}

// Maximal runs of consecutive offsets in a panel's sample offsets, found once per panel and shared by all
// its rows: decoded maps are one run per panel, and label maps, being blobs, give long runs per class.
inline void find_runs(const int64_t* so, int64_t nb, std::vector<int64_t>& runs) {
  runs.clear();
  int64_t t = 0;
  while (t < nb) {
    int64_t e = t + 1;
    while (e < nb && so[e] == so[e - 1] + 1) ++e;
    runs.push_back(t);
    runs.push_back(e - t);
    t = e;
  }
}

// row[t] = x[base + so[t]] for t < nb, run by run; returns the largest abs_bits read (>= kInfBits<T>: a NaN
// or an Inf was read).
template <typename Src, typename T>
__attribute__((always_inline)) inline Bits<T> read_row(const Src* x, int64_t base, const int64_t* so,
                                                       const std::vector<int64_t>& runs, T* row) {
  Bits<T> m = 0;
  for (size_t r = 0; r < runs.size(); r += 2) {
    const int64_t t0 = runs[r], len = runs[r + 1];
    const Src* src = x + base + so[t0];
    T* dst = row + t0;
    for (int64_t t = 0; t < len; ++t) {
      T v = (T)Reader<Src>::get(src + t);
      m = std::max(m, abs_bits(v));
      dst[t] = v;
    }
  }
  return m;
}

// The vector types of one instruction set's width VB (bytes): floats F, their bits U and doubles D; add_halves adds
// a float vector's low and high halves, in double, to two double vectors. With intrinsics: gcc 12 lowers a
// __builtin_convertvector of a half to two narrower conversions. The AVX ones carry their target and are not
// always_inline: an always_inline one fails to inline into the untargeted templates that call it, a plain inline
// one is inlined once those are inlined into their instruction set's build. Arguments by reference, as a vector
// passed by value to a function of another target changes the ABI.
template <int VB>
struct Vec;
template <>
struct Vec<16> {
  typedef v4f F;
  typedef v2d D;
  typedef uint32_t U __attribute__((vector_size(16)));
  static void add_halves(const F& f, D* lo, D* hi) {
    *lo += (D)_mm_cvtps_pd((__m128)f);
    *hi += (D)_mm_cvtps_pd(_mm_movehl_ps((__m128)f, (__m128)f));
  }
};
template <>
struct Vec<32> {
  typedef v8f F;
  typedef v4d D;
  typedef uint32_t U __attribute__((vector_size(32)));
  AUVCORE_TARGET_AVX2 static void add_halves(const F& f, D* lo, D* hi) {
    *lo += (D)_mm256_cvtps_pd(_mm256_castps256_ps128((__m256)f));
    *hi += (D)_mm256_cvtps_pd(_mm256_extractf128_ps((__m256)f, 1));
  }
};
template <>
struct Vec<64> {
  typedef v16f F;
  typedef v8d D;
  typedef uint32_t U __attribute__((vector_size(64)));
  AUVCORE_TARGET_AVX512 static void add_halves(const F& f, D* lo, D* hi) {
    *lo += (D)_mm512_cvtps_pd(_mm512_castps512_ps256((__m512)f));
    *hi += (D)_mm512_cvtps_pd(_mm512_extractf32x8_ps((__m512)f, 1));
  }
};

// VB/4 consecutive samples read as float: float input by an unaligned vector load, the half types lane by lane.
template <int VB, typename Src>
__attribute__((always_inline)) inline void load_floats(const Src* src, typename Vec<VB>::F* v) {
  if constexpr (std::is_same_v<Src, float>) {
    std::memcpy(v, src, VB);
  } else {
    for (int l = 0; l < VB / 4; ++l) (*v)[l] = Reader<Src>::get(src + l);
  }
}

// The common case of prepare_panel_impl, float panels centred across the p rows (decoded maps on their row side)
// whose samples are one contiguous run, in chunks of NV vectors of samples (VB bytes each: the instruction set's
// width) across all p rows. The chunk of every row is read once, copied into the panel, and summed into the
// column sums in double (the same order and bits as center_across_p's) and into the largest magnitude, all held
// in registers; then, while it is in L1, it is centred in place as in subtract_means_as_float_pairs (the same
// bits). It is the panel, not the source, that is read again: the source's rows are usually a multiple of 4 KiB
// apart and fall into the same few L1 sets, the panel's are not. The general path makes three passes over the
// whole panel in L2. Returns false, having written nothing that counts, where the general path must run: a NaN
// or Inf, or values that need a pre-scale (known only once the whole panel is read).
template <int VB, int NV, typename Src, typename T>
__attribute__((always_inline)) inline bool prepare_centred_in_l1(const Src* x, const int64_t* p_off, int64_t p,
                                                                 int64_t nb, int64_t padded, T* panel, int64_t ld,
                                                                 double* colsum, int* e_out, bool* empty) {
  static_assert(std::is_same_v<T, float>, "the chunked centring is for float panels");
  using Vt = Vec<VB>;
  typedef typename Vt::F V;
  typedef typename Vt::U U;
  typedef typename Vt::D VD;
  constexpr int64_t W = VB / 4, CH = NV * W;
  const double inv_p = 1.0 / (double)p;
  U umax = {};
  int64_t c0 = 0;
  for (; c0 + CH <= nb; c0 += CH) {
    VD sum[2 * NV] = {};
    for (int64_t a = 0; a < p; ++a) {
      const Src* src = x + p_off[a] + c0;
      T* row = panel + a * ld + c0;
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) {
        V f;
        load_floats<VB>(src + v * W, &f);
        const U b = (U)f & 0x7fffffffu;
        umax = umax > b ? umax : b;
        Vt::add_halves(f, &sum[2 * v], &sum[2 * v + 1]);
        std::memcpy(row + v * W, &f, VB);
      }
    }
    alignas(64) double m[CH];
    alignas(64) float hs[CH], ls[CH];
    for (int v = 0; v < 2 * NV; ++v) std::memcpy(m + v * (W / 2), &sum[v], VB);
    for (int64_t t = 0; t < CH; ++t) {
      m[t] *= inv_p;
      hs[t] = (float)m[t];
      ls[t] = (float)(m[t] - (double)hs[t]);
    }
    V hi[NV], lo[NV];
    std::memcpy(hi, hs, sizeof(hi));
    std::memcpy(lo, ls, sizeof(lo));
    for (int64_t a = 0; a < p; ++a) {
      T* row = panel + a * ld + c0;
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) {
        V f;
        std::memcpy(&f, row + v * W, VB);
        f = (f - hi[v]) - lo[v];
        std::memcpy(row + v * W, &f, VB);
      }
    }
  }
  Bits<T> amax = 0;
  for (int l = 0; l < W; ++l) amax = std::max<Bits<T>>(amax, umax[l]);
  if (amax >= kInfBits<T>) return false;
  if (c0 < nb) {  // the last, partial chunk, sample by sample
    const int64_t cn = nb - c0;
    double* cs = colsum;
    float hi[CH], lo[CH];
    for (int64_t t = 0; t < cn; ++t) cs[t] = 0.0;
    for (int64_t a = 0; a < p; ++a) {
      const Src* src = x + p_off[a] + c0;
      T* row = panel + a * ld + c0;
      for (int64_t t = 0; t < cn; ++t) {
        const T v = (T)Reader<Src>::get(src + t);
        amax = std::max(amax, abs_bits(v));
        row[t] = v;
        cs[t] += (double)v;
      }
    }
    if (amax >= kInfBits<T>) return false;
    for (int64_t t = 0; t < cn; ++t) cs[t] *= inv_p;
    subtract_means_as_float_pairs(panel + c0, p, ld, cn, cs, hi, lo);
  }
  if (prescale_exponent<sizeof(T)>(2.0 * (double)from_bits<T>(amax)) != 0) return false;
  *e_out = 0;
  *empty = amax == 0;
  for (int64_t a = 0; a < p; ++a)
    for (int64_t t = nb; t < padded; ++t) panel[a * ld + t] = (T)0;
  return true;
}

// One panel: the samples [t0, t0 + nb) of a job, read, checked, centred (or shifted) in double, multiplied by
// the panel's pre-scale 2^e (*e_out; prescale_exponent) and rounded once to T, the tail up to `padded` zeroed.
// Returns false if a non-finite value was read and nan_to_num is off. *empty: every value is 0 (nothing to
// add). Compiled once per instruction set like the product itself: reading and centering are a third of the
// work for large p.
template <int VB, int NV, typename Src, typename T>
__attribute__((always_inline)) inline bool prepare_panel_impl(const Src* x, int64_t base, const int64_t* p_off,
                                                              int64_t p, const int64_t* so,
                                                              const std::vector<int64_t>& runs, int64_t nb,
                                                              int64_t padded, Centering centering, const double* shift,
                                                              double* sum, double* colmean, bool nan_to_num, T* panel,
                                                              int64_t ld, int* e_out, bool* empty) {
  if constexpr (std::is_same_v<T, float>)
    if (centering == Centering::AcrossP && runs.size() == 2 &&
        prepare_centred_in_l1<VB, NV>(x + base + so[0], p_off, p, nb, padded, panel, ld, colmean, e_out, empty))
      return true;
  Bits<T> amax = 0;
  for (int64_t a = 0; a < p; ++a) {
    T* row = panel + a * ld;
    Bits<T> m = read_row(x, base + p_off[a], so, runs, row);
    if (m >= kInfBits<T>) {
      if (!nan_to_num) return false;
      m = 0;
      for (int64_t t = 0; t < nb; ++t) {
        if (non_finite(row[t])) row[t] = (T)0;
        m = std::max(m, abs_bits(row[t]));
      }
    }
    amax = std::max(amax, m);
  }
  // A bound of the centred values: |x - mean| <= 2 max|x|, and the shift is one of the job's samples.
  double bound = (double)from_bits<T>(amax);
  if (centering == Centering::AcrossSamples)
    for (int64_t a = 0; a < p; ++a) bound = std::max(bound, std::fabs(shift[a]));
  if (centering != Centering::None) bound *= 2.0;
  const int e = prescale_exponent<sizeof(T)>(bound);
  const double scale = std::ldexp(1.0, e);
  *e_out = e;
  *empty = amax == 0 && centering != Centering::AcrossSamples;
  if (centering == Centering::AcrossP) {
    center_across_p(panel, p, ld, nb, colmean, scale);
  } else if (centering == Centering::AcrossSamples) {
    constexpr int L = 8;  // independent partial sums, so the reduction vectorises without reassociation
    bool any = false;
    for (int64_t a = 0; a < p; ++a) {
      T* row = panel + a * ld;
      const double c = shift[a];
      double part[L] = {};
      int64_t t = 0;
      for (; t + L <= nb; t += L)
        for (int l = 0; l < L; ++l) {
          const double d = (double)row[t + l] - c;
          part[l] += d;
          row[t + l] = (T)(d * scale);
        }
      for (; t < nb; ++t) {
        const double d = (double)row[t] - c;
        part[0] += d;
        row[t] = (T)(d * scale);
      }
      double s = 0.0;
      for (int l = 0; l < L; ++l) s += part[l];
      sum[a] += s;
      any = any || c != 0.0 || amax != 0;
    }
    *empty = !any;
  } else if (e != 0) {
    for (int64_t a = 0; a < p; ++a) {
      T* row = panel + a * ld;
      for (int64_t t = 0; t < nb; ++t) row[t] = (T)((double)row[t] * scale);
    }
  }
  for (int64_t a = 0; a < p; ++a) {
    T* row = panel + a * ld;
    for (int64_t t = nb; t < padded; ++t) row[t] = (T)0;
  }
  return true;
}

#define AUVCORE_PREPARE_ARGS                                                                                 \
  const Src *x, int64_t base, const int64_t *p_off, int64_t p, const int64_t *so,                         \
      const std::vector<int64_t>&runs, int64_t nb, int64_t padded, Centering centering, const double *shift, \
      double *sum, double *colmean, bool nan_to_num, T *panel, int64_t ld, int *e_out, bool *empty
#define AUVCORE_PREPARE_CALL \
  x, base, p_off, p, so, runs, nb, padded, centering, shift, sum, colmean, nan_to_num, panel, ld, e_out, empty
template <typename Src, typename T>
AUVCORE_TARGET_AVX512 bool prepare_avx512(AUVCORE_PREPARE_ARGS) {
  return prepare_panel_impl<64, 4, Src, T>(AUVCORE_PREPARE_CALL);
}
template <typename Src, typename T>
AUVCORE_TARGET_AVX2 bool prepare_avx2(AUVCORE_PREPARE_ARGS) {
  return prepare_panel_impl<32, 4, Src, T>(AUVCORE_PREPARE_CALL);
}
template <typename Src, typename T>
bool prepare_generic(AUVCORE_PREPARE_ARGS) {
  return prepare_panel_impl<16, 2, Src, T>(AUVCORE_PREPARE_CALL);
}
template <typename Src, typename T>
bool prepare_panel(AUVCORE_PREPARE_ARGS) {
  switch (isa_level()) {
    case kIsaAvx512: return prepare_avx512<Src, T>(AUVCORE_PREPARE_CALL);
    case kIsaAvx2: return prepare_avx2<Src, T>(AUVCORE_PREPARE_CALL);
    default: return prepare_generic<Src, T>(AUVCORE_PREPARE_CALL);
  }
}
#undef AUVCORE_PREPARE_ARGS
#undef AUVCORE_PREPARE_CALL

// A contiguous range of one job's samples; split jobs accumulate into their own partial buffers.
// Its G holds the sums scaled by 4^e (the pre-scale of its largest panel); any: some panel was not all zero.
struct Unit {
  int64_t job, s_begin, s_end;
  double* G;    // p x p accumulator (lower triangle filled here)
  double* sum;  // p sums of the shifted samples (AcrossSamples only), true scale
  int e = 0;
  bool any = false;
};

template <typename Src, typename T>
void gram_typed(const void* data, DType dtype, const std::vector<int64_t>& p_off, const std::vector<GramJob>& jobs,
                Centering centering, bool nan_to_num, double* G, int num_threads, const char* arg) {
  const int64_t p = (int64_t)p_off.size();
  const int64_t pp = (p + kPad - 1) / kPad * kPad;
  const int64_t W = 64 / sizeof(T);
  const int64_t NB = kPanelBytes / sizeof(T);
  const int64_t njobs = (int64_t)jobs.size();
  const int64_t pp2 = p * p;
  int nt = std::max(1, num_threads);

  // Shift of the one-pass covariance (AcrossSamples): the job's first sample, so the shifted values are of
  // the order of the spread and the final correction -n d dᵀ cancels little.
  std::vector<double> shift;
  if (centering == Centering::AcrossSamples) {
    shift.assign(njobs * p, 0.0);
    for (int64_t j = 0; j < njobs; ++j) {
      if (jobs[j].ns == 0) continue;
      for (int64_t a = 0; a < p; ++a) {
        double v = load_as_double(data, dtype, jobs[j].base + p_off[a] + jobs[j].s_off[0]);
        shift[j * p + a] = std::isfinite(v) ? v : 0.0;
      }
    }
  }

  // Split the work into units of about total/(4 nt) samples so that one large class cannot idle the other
  // threads; a job in one piece writes straight into its output.
  int64_t total = 0;
  for (auto& jb : jobs) total += jb.ns;
  const int64_t target = std::max<int64_t>(NB * 4, total / (4 * nt) + 1);
  std::vector<Unit> units;
  std::vector<int64_t> pieces(njobs);
  int64_t n_partial = 0;
  for (int64_t j = 0; j < njobs; ++j) {
    pieces[j] = nt == 1 ? 1 : std::max<int64_t>(1, (jobs[j].ns + target - 1) / target);
    if (pieces[j] > 1) n_partial += pieces[j];
  }
  std::vector<double> partial((size_t)n_partial * pp2);
  std::vector<double> sums(centering == Centering::AcrossSamples ? (size_t)(njobs + n_partial) * p : 0);
  std::memset(G, 0, sizeof(double) * njobs * pp2);
  int64_t next_partial = 0;
  for (int64_t j = 0; j < njobs; ++j) {
    int64_t ns = jobs[j].ns, k = pieces[j];
    for (int64_t q = 0; q < k; ++q) {
      Unit u;
      u.job = j;
      u.s_begin = ns * q / k;
      u.s_end = ns * (q + 1) / k;
      int64_t slot = k == 1 ? -1 : next_partial++;
      u.G = k == 1 ? G + j * pp2 : partial.data() + slot * pp2;
      u.sum = sums.empty() ? nullptr : sums.data() + (k == 1 ? j : njobs + slot) * p;
      units.push_back(u);
    }
  }

  std::atomic<bool> bad_value{false};
  std::atomic<bool> failed{false};
  std::string failure;

#pragma omp parallel num_threads(nt)
  {
    // Per-thread panel in T (the original values, then centred in double and rounded once) and a pp x pp
    // accumulator whose lower triangle is folded into the unit's G.
    const Src* x = static_cast<const Src*>(data);
    // Rows one cache line longer than the panel: with a stride of a multiple of 4 KiB every row's k-th line falls in
    // the same L1 set, and a register tile's rows (or a chunk of all rows) then evict each other.
    const int64_t LD = NB + 64 / (int64_t)sizeof(T);
    auto panel = aligned_zeros<T>(pp * LD);
    auto acc = aligned_zeros<double>(pp * pp);
    std::vector<double> colmean(NB);
    std::vector<int64_t> runs, next_runs;
    const int64_t* next_so = nullptr;  // the panel whose runs next_runs holds, found for its prefetch
    int64_t next_nb = 0;
    Prefetcher pf;
    try {
#pragma omp for schedule(dynamic, 1)
      for (int64_t ui = 0; ui < (int64_t)units.size(); ++ui) {
        const Unit& u = units[ui];
        const GramJob& jb = jobs[u.job];
        const double* sh = shift.empty() ? nullptr : shift.data() + u.job * p;
        std::memset(acc.get(), 0, sizeof(double) * pp * pp);
        // acc holds the sums scaled by 4^ue, ue the smallest panel exponent so far (the largest values): a
        // panel of exponent e adds its products times 4^(ue - e) <= 1, and a panel of larger values first
        // scales acc down. In double, so these factors cost nothing but the products' own rounding.
        int ue = 0;
        bool have = false;
        for (int64_t t0 = u.s_begin; t0 < u.s_end; t0 += NB) {
          const int64_t nb = std::min(NB, u.s_end - t0);
          const int64_t nvec = (nb + W - 1) / W;
          const int64_t* so = jb.s_off + t0;
          if (so == next_so && nb == next_nb) {  // found for the prefetch (the same offsets give the same runs)
            runs.swap(next_runs);
            next_so = nullptr;
          } else {
            find_runs(so, nb, runs);
          }
          int e = 0;
          bool empty = false;
          if (!prepare_panel<Src, T>(x, jb.base, p_off.data(), p, so, runs, nb, nvec * W, centering, sh, u.sum,
                                     colmean.data(), nan_to_num, panel.get(), LD, &e, &empty)) {
            bad_value = true;
            break;
          }
          if (empty) continue;
          if (!have || e < ue) {
            if (have) {
              const double f = std::ldexp(1.0, 2 * (e - ue));
              for (int64_t i = 0; i < pp * pp; ++i) acc[i] *= f;
            }
            ue = e;
            have = true;
          }
          // The next panel streams in while this one's product runs: the unit's next one, or after its last the
          // first of unit ui + nt, the one this thread most likely takes next (exactly so with one thread).
          const Unit* nu = t0 + NB < u.s_end ? &u : ui + nt < (int64_t)units.size() ? &units[ui + nt] : nullptr;
          if (nu) {
            const GramJob& nj = jobs[nu->job];
            const int64_t n0 = nu == &u ? t0 + NB : nu->s_begin;
            next_so = nj.s_off + n0;
            next_nb = std::min(NB, nu->s_end - n0);
            find_runs(next_so, next_nb, next_runs);
            pf.start(reinterpret_cast<const char*>(x + nj.base), sizeof(Src), p_off.data(), p, next_so, &next_runs);
          } else {
            pf.stop();
          }
          syrk_panel(panel.get(), pp, LD, nvec, acc.get(), pp, std::ldexp(1.0, 2 * (ue - e)), &pf);
        }
        units[ui].e = ue;
        units[ui].any = have;
        for (int64_t a = 0; a < p; ++a)
          for (int64_t b = 0; b <= a; ++b) u.G[a * p + b] = acc[a * pp + b];
      }
    } catch (const std::exception& e) {
#pragma omp critical
      {
        failure = e.what();
        failed = true;
      }
    }
  }
  if (failed) throw std::runtime_error(failure);
  if (bad_value)
    throw ArgumentError(std::string(arg) + " contains NaN or Inf; pass nan_to_num=True to read them as 0");

  // Fold the partials of split jobs at the job's scale 4^je (the smallest unit exponent), then the centering
  // correction at that scale, then back to the true scale in double and mirror the triangle.
  std::vector<int> je(njobs, 0);
  std::vector<char> jany(njobs, 0);
  for (const Unit& u : units)
    if (u.any) {
      je[u.job] = jany[u.job] ? std::min(je[u.job], u.e) : u.e;
      jany[u.job] = 1;
    }
  for (const Unit& u : units) {
    double* dst = G + u.job * pp2;
    if (u.G != dst && u.any) {
      const double f = std::ldexp(1.0, 2 * (je[u.job] - u.e));
      for (int64_t i = 0; i < pp2; ++i) dst[i] += f * u.G[i];
    }
    if (u.sum && u.sum != sums.data() + u.job * p)
      for (int64_t a = 0; a < p; ++a) sums[u.job * p + a] += u.sum[a];
  }
  std::vector<double> ds(p);
  for (int64_t j = 0; j < njobs; ++j) {
    double* g = G + j * pp2;
    if (centering == Centering::AcrossSamples && jobs[j].ns > 0) {
      const double* d = sums.data() + j * p;
      for (int64_t a = 0; a < p; ++a) ds[a] = std::ldexp(d[a], je[j]);
      const double inv_n = 1.0 / (double)jobs[j].ns;
      for (int64_t a = 0; a < p; ++a)
        for (int64_t b = 0; b <= a; ++b) g[a * p + b] -= ds[a] * ds[b] * inv_n;
    }
    // Back to the true scale, 4^-je; a float64 Gram beyond the double range instead tops out near 2^1000
    // (|G_ab| <= max diag, as G is positive semi-definite up to rounding).
    int ex = -2 * je[j];
    double dmax = 0.0;
    for (int64_t a = 0; a < p; ++a) dmax = std::max(dmax, std::fabs(g[a * p + a]));
    if (dmax > 0.0 && std::ilogb(dmax) + ex > 1000) ex = 1000 - std::ilogb(dmax);
    if (ex != 0)
      for (int64_t a = 0; a < p; ++a)
        for (int64_t b = 0; b <= a; ++b) g[a * p + b] = std::ldexp(g[a * p + b], ex);
    for (int64_t a = 0; a < p; ++a)
      for (int64_t b = 0; b < a; ++b) g[b * p + a] = g[a * p + b];
  }
}

}  // namespace

void gram_cpu(const void* data, DType dtype, const std::vector<int64_t>& p_off, const std::vector<GramJob>& jobs,
              Centering centering, bool nan_to_num, double* G, int num_threads, const char* arg, bool in_double) {
#define AUVCORE_GRAM(SRC) \
  (in_double ? gram_typed<SRC, double>(data, dtype, p_off, jobs, centering, nan_to_num, G, num_threads, arg) \
             : gram_typed<SRC, float>(data, dtype, p_off, jobs, centering, nan_to_num, G, num_threads, arg))
  switch (dtype) {
    case DType::F64: return gram_typed<double, double>(data, dtype, p_off, jobs, centering, nan_to_num, G, num_threads, arg);
    case DType::F32: return AUVCORE_GRAM(float);
    case DType::F16: return AUVCORE_GRAM(Half);
    case DType::BF16: return AUVCORE_GRAM(BHalf);
#undef AUVCORE_GRAM
    default: throw ArgumentError(std::string(arg) + ": expected a floating dtype");
  }
}

std::pair<int64_t, int64_t> decoded_shape(const ArrayView& z, int mode) {
  require(z.dim() == 4 || z.dim() == 5, "z: expected decoded maps [B, K, D, H, W] or [B, K, H, W]");
  if (z.dim() == 4) return {z.shape[2], z.shape[3]};
  const int64_t D = z.shape[2], H = z.shape[3], W = z.shape[4];
  switch (mode) {
    case 0: return {D, H * W};
    case 1: return {H, D * W};
    case 2: return {W, D * H};
    default: throw ArgumentError("mode: expected one of 'D_HW', 'H_DW', 'W_DH'");
  }
}

DecodedLayout decoded_layout(const ArrayView& z, int mode) {
  auto [m, n] = decoded_shape(z, mode);
  // rows (stride rs) x columns (outer no x inner ni, strides os and is)
  int64_t rs, no, os, ni, is;
  if (z.dim() == 4) {
    rs = z.strides[2]; no = 1; os = 0; ni = z.shape[3]; is = z.strides[3];
  } else {
    const int64_t sd = z.strides[2], sh = z.strides[3], sw = z.strides[4];
    const int64_t D = z.shape[2], H = z.shape[3], W = z.shape[4];
    if (mode == 0) { rs = sd; no = H; os = sh; ni = W; is = sw; }
    else if (mode == 1) { rs = sh; no = D; os = sd; ni = W; is = sw; }
    else { rs = sw; no = D; os = sd; ni = H; is = sh; }
  }
  std::vector<int64_t> row_off(m), col_off(n);
  for (int64_t i = 0; i < m; ++i) row_off[i] = i * rs;
  for (int64_t o = 0; o < no; ++o)
    for (int64_t i = 0; i < ni; ++i) col_off[o * ni + i] = o * os + i * is;
  DecodedLayout L;
  L.row_side = gram_on_rows(m, n);
  L.p_off = L.row_side ? std::move(row_off) : std::move(col_off);
  L.s_off = L.row_side ? std::move(col_off) : std::move(row_off);
  return L;
}

void decoded_gram(const ArrayView& z, int mode, bool center, bool nan_to_num, double* G, int num_threads,
                  bool in_double) {
  require(is_floating(z.dtype), "z: expected a floating dtype");
  const DecodedLayout L = decoded_layout(z, mode);
  const int64_t B = z.shape[0], K = z.shape[1];
  std::vector<GramJob> jobs;
  jobs.reserve(B * K);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t k = 0; k < K; ++k)
      jobs.push_back({b * z.strides[0] + k * z.strides[1], L.s_off.data(), (int64_t)L.s_off.size()});
  gram_cpu(z.data(), z.dtype, L.p_off, jobs, L.centering(center), nan_to_num, G, num_threads, "z", in_double);
}

ClassSort sort_by_class(const ArrayView& f, const ArrayView& labels, int64_t K, int64_t* counts) {
  check_masked_args(f, labels, K);
  const int64_t B = f.shape[0], nsd = labels.dim() - 1;
  int64_t N = 1;
  for (int64_t d = 0; d < nsd; ++d) N *= labels.shape[d + 1];

  // Counting sort of the voxels by class, per sample: the feature offsets of each class become one
  // contiguous segment, and each class's Gram reads its own segment.
  ClassSort cs;
  cs.N = N;
  cs.offsets.resize(B * N);
  cs.start.assign(B * (K + 1), 0);
  std::vector<int64_t> lab(N), foffs(N);
  for (int64_t b = 0; b < B; ++b) {
    int64_t* cnt = counts + b * K;
    std::fill(cnt, cnt + K, 0);
    std::vector<int64_t> idx(nsd, 0);
    int64_t loff = b * labels.strides[0], foff = 0;
    for (int64_t v = 0; v < N; ++v) {
      int64_t l = load_as_int(labels.data(), labels.dtype, loff);
      if (l < 0 || l >= K)
        throw ArgumentError("labels: value " + std::to_string(l) + " in sample " + std::to_string(b) +
                            " is outside 0.." + std::to_string(K - 1) + " (num_classes=" + std::to_string(K) + ")");
      lab[v] = l;
      foffs[v] = foff;
      ++cnt[l];
      // advance the multi-index (last spatial dimension fastest)
      for (int64_t d = nsd - 1; d >= 0; --d) {
        if (++idx[d] < labels.shape[d + 1]) {
          loff += labels.strides[d + 1];
          foff += f.strides[d + 2];
          break;
        }
        loff -= (labels.shape[d + 1] - 1) * labels.strides[d + 1];
        foff -= (labels.shape[d + 1] - 1) * f.strides[d + 2];
        idx[d] = 0;
      }
    }
    int64_t* st = cs.start.data() + b * (K + 1);
    for (int64_t k = 0; k < K; ++k) st[k + 1] = st[k] + cnt[k];
    std::vector<int64_t> pos(st, st + K);
    int64_t* seg = cs.offsets.data() + b * N;
    for (int64_t v = 0; v < N; ++v) seg[pos[lab[v]]++] = foffs[v];
  }
  return cs;
}

void masked_gram(const ArrayView& f, const ArrayView& labels, int64_t K, bool center, bool nan_to_num, double* G,
                 int64_t* counts, int num_threads) {
  const ClassSort cs = sort_by_class(f, labels, K, counts);
  const int64_t B = f.shape[0], C = f.shape[1];
  std::vector<int64_t> p_off(C);
  for (int64_t c = 0; c < C; ++c) p_off[c] = c * f.strides[1];
  std::vector<GramJob> jobs;
  jobs.reserve(B * K);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t k = 0; k < K; ++k) jobs.push_back({b * f.strides[0], cs.segment(b, k, K), cs.count(b, k, K)});
  gram_cpu(f.data(), f.dtype, p_off, jobs, center ? Centering::AcrossSamples : Centering::None, nan_to_num, G,
           num_threads, "features", false);
}

}  // namespace auvcore
