// Fused centering + Gram of every (sample, class) matrix of a batch on the GPU (SPEC §5), mirroring
// csrc/cpu/gram_cpu.cpp: decoded maps (row side with per-column centering when m <= n, column side with the
// shifted one-pass covariance when m > n) and masked embeddings (voxels grouped by class with a counting sort
// on the device: histogram, scan, scatter).
//
// Precision: float inputs (f16/bf16 widened on load) multiply-accumulate in FP32 over at most kChunk samples,
// then each chunk's partial Gram is added into the float64 output (atomicAdd, so the summation order of the
// chunks, and hence the last bits, vary from run to run). float64 inputs stay float64 throughout.
// No overflow (issue 24): for the float products a pre-pass finds each matrix's largest magnitude, and a matrix
// outside float's safe range (prescale_exponent in gram.h, the CPU's rule) is multiplied by a power of two
// as it is staged; finalize_kernel undoes it in double. One extra read of the input, float inputs only.
//
// Engines for the float products (AUVCORE_CUDA_GRAM, read at each call): `fp32` (the default) multiplies on the
// CUDA cores; `3xtf32` on the tensor cores (sm_80+), each staged value x split into x_hi = tf32(x) and
// x_lo = tf32(x - x_hi) and each product taken as a_hi b_hi + a_hi b_lo + a_lo b_hi (CUTLASS's 3xTF32). The
// dropped a_lo b_lo and the split's remainder are below 2^-21 |a b|; each 8 samples' products are summed by the
// tensor cores (one truncation) and added to the chunk's FP32 sums with round-to-nearest, so a chunk takes 64
// roundings where the fp32 engine takes 512: under the emulation its Gram error is half the fp32 engine's. `3xtf32`
// becomes the default once it has passed its tests and the sanitizers on a GPU (bench/gpu_session.sh).
#include <cuda_runtime.h>
#include <mma.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>

#include "auvcore/gram.h"
#include "auvcore/scale_cuda.h"
#include "common_cuda.cuh"
#include "decoded_cuda.cuh"

namespace auvcore {
namespace cuda {
namespace {

constexpr int NT = 256;         // threads per block of the Gram kernel (a 16 x 16 grid over the output tile)
constexpr int kChunk = 512;     // samples per work item: the FP32 partial sums run over at most this many
constexpr int kMaxSpatial = 6;  // spatial dimensions of masked inputs
constexpr int kVoxPerThread = 8;
constexpr int kMaxSharedHist = 2048;  // classes counted in shared memory; more go straight to global atomics

enum Cent : int { kNone = 0, kAcrossP = 1, kAcrossSamples = 2 };

struct GramArgs {
  const void* data = nullptr;
  int64_t p = 0;             // Gram size
  IndexMap pmap;             // Gram index -> element offset
  IndexMap smap;             // decoded: sample index -> element offset (the same for every job)
  const int64_t* sorted = nullptr;  // masked: [B, N] feature offsets grouped by class
  const int64_t* seg = nullptr;     // masked: [B, K + 1] class segment starts within a row of `sorted`
  int64_t N = 0;             // masked: voxels per sample
  int64_t ns = 0;            // decoded: samples per job
  int64_t nch = 0;           // decoded: chunks per job
  int64_t items = 0;         // work items per sample (upper bound for masked)
  int K = 0;
  int64_t stride_b = 0, stride_k = 0;  // job (b, k) starts at b * stride_b + k * stride_k
  int cent = kNone;
  int nan_to_num = 0;
  int pfast = 0;             // consecutive threads load consecutive Gram rows (else consecutive samples)
  int small_rows = 0;        // masked, smaller side: classes with fewer voxels than p are left to row_gram_kernel
  const double* mu = nullptr;  // AcrossP with p > tile: per-sample means from the pre-pass, [jobs, ns]
  double* G = nullptr;
  double* sums = nullptr;    // AcrossSamples: [jobs, p] sums of the shifted samples (pre-scaled)
  int32_t* flags = nullptr;
  const int* pexp = nullptr;  // [jobs] pre-scale exponents (float products), or null: no pre-scale
};

// Output tile TP x TP per block (TP = 16 RM), RM x RM accumulators per thread (rows ty + 16 i, columns
// tx + 16 j: the stride-16 interleave keeps shared-memory reads conflict-free without vector loads), TS samples
// per stage. The host picks the smallest TP >= p, so a Gram of p <= TPmax is one tile (and its per-column
// centring happens in the block); larger ones use the largest tile. A row pitch of TP + 2 floats (≡ 2 mod 32
// banks) spreads the transposed tile stores of the 16 sample columns over distinct banks.
constexpr int TS = 16;
// The tensor-core engine (TC) pads rows to a multiple of 4 floats, as the matrix loads require.
template <typename T, bool TC>
__host__ __device__ constexpr int pad_of() {
  return TC ? 4 : sizeof(T) == 4 ? 2 : 1;
}
namespace wmma = nvcuda::wmma;
using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::col_major>;
using FragB = wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::row_major>;
using FragC = wmma::fragment<wmma::accumulator, 16, 16, 8, float>;

// The tensor-core engine's i-th 16 x 16 sub-tile of warp `warp` in an RM x RM grid of them: (si, sj), or false where
// the warp has no i-th one or it lies above a diagonal tile's diagonal (uniform over the warp).
template <int RM>
__device__ __forceinline__ bool warp_sub_tile(int warp, int i, bool diag, int& si, int& sj) {
  const int sub = warp + i * (NT / 32);
  si = sub / RM, sj = sub % RM;
  return sub < RM * RM && !(diag && sj > si);
}

template <typename In, typename T, int RM, bool TC>
__global__ void __launch_bounds__(NT) gram_kernel(const GramArgs a) {
  constexpr int TP = 16 * RM, PAD = pad_of<T, TC>();
  constexpr int EPT = TP * TS / NT;  // tile elements each thread loads per stage
  static_assert(NT == 256 && TS == 16 && TP * TS % NT == 0, "the in-block centring assumes 16 x 16 threads");
  static_assert(!TC || sizeof(T) == 4, "the tensor-core engine takes float products");
  // TC: the 16 x 16 sub-tiles of the output tile, dealt to the 8 warps in turn; each warp keeps the accumulators
  // of its NSW sub-tiles across the chunk. As/Bs then hold the staged values' TF32 high parts, Alo/Blo their
  // low parts, and Cs one 16 x 16 accumulator tile per warp on its way to G.
  constexpr int NSW = TC ? (RM * RM + NT / 32 - 1) / (NT / 32) : 1;
  // 32-byte aligned: the matrix loads and stores need it (rows of TP + PAD floats keep every 8th row so).
  __shared__ __align__(32) T As[TS][TP + PAD];
  __shared__ __align__(32) T Bs[TS][TP + PAD];
  __shared__ __align__(32) float Alo[TC ? TS : 1][TC ? TP + PAD : 1];
  __shared__ __align__(32) float Blo[TC ? TS : 1][TC ? TP + PAD : 1];
  __shared__ __align__(32) float Cs[TC ? NT / 32 : 1][TC ? 256 : 1];
  __shared__ int64_t poffA[TP], poffB[TP];
  __shared__ double shA[TP], shB[TP];
  __shared__ int64_t soff[TS];
  __shared__ double smu[TS];

  const int tid = threadIdx.x;
  const int64_t p = a.p;
  // Lower-triangle tile pair (I, J), J <= I, from the flat block index.
  int q = blockIdx.x, I = 0;
  while (q > I) {
    q -= I + 1;
    ++I;
  }
  const int J = q;
  const bool diag = I == J;
  const int64_t rowA0 = (int64_t)I * TP, rowB0 = (int64_t)J * TP;
  for (int i = tid; i < TP; i += NT) {
    poffA[i] = rowA0 + i < p ? a.pmap(rowA0 + i) : 0;
    poffB[i] = rowB0 + i < p ? a.pmap(rowB0 + i) : 0;
  }
  const bool inblock_center = a.cent == kAcrossP && a.mu == nullptr;  // host guarantees p <= TP then
  auto Bt = diag ? As : Bs;  // T (*)[TP + PAD]
  const int b = blockIdx.z;
  const int tx = tid & 15, ty = tid >> 4;

  for (int64_t w = blockIdx.y; w < a.items; w += gridDim.y) {
    int k = -1;
    int64_t c0 = 0, ns = 0, seg0 = 0;
    if (a.seg) {
      // Masked: the sample's work items run over the classes' chunks in order.
      const int64_t* sg = a.seg + (int64_t)b * (a.K + 1);
      int64_t rem = w;
      for (int kk = 0; kk < a.K; ++kk) {
        const int64_t nk = sg[kk + 1] - sg[kk];
        const int64_t ch = a.small_rows && nk < a.p ? 0 : (nk + kChunk - 1) / kChunk;
        if (rem < ch) {
          k = kk;
          c0 = rem * kChunk;
          ns = nk;
          seg0 = sg[kk];
          break;
        }
        rem -= ch;
      }
      if (k < 0) break;  // past the last chunk of the sample (the same for every thread)
    } else {
      k = (int)(w / a.nch);
      c0 = (w % a.nch) * kChunk;
      ns = a.ns;
    }
    const int64_t c1 = c0 + kChunk < ns ? c0 + kChunk : ns;
    const int64_t job = (int64_t)b * a.K + k;
    const int64_t base = (int64_t)b * a.stride_b + (int64_t)k * a.stride_k;
    const int64_t* srt = a.sorted ? a.sorted + (int64_t)b * a.N + seg0 : nullptr;

    __syncthreads();  // the previous item is done with the shared shifts and tiles
    if (a.cent == kAcrossSamples) {
      // Shift of the one-pass covariance: the job's first sample (non-finite values read as 0).
      const int64_t f0 = base + (srt ? srt[0] : a.smap(0));
      for (int i = tid; i < TP; i += NT) {
        double x = rowA0 + i < p ? load_elem<In>(a.data, f0 + poffA[i]) : 0.0;
        shA[i] = isfinite(x) ? x : 0.0;
        double y = rowB0 + i < p ? load_elem<In>(a.data, f0 + poffB[i]) : 0.0;
        shB[i] = isfinite(y) ? y : 0.0;
      }
    }
    const double sc = a.pexp ? ldexp(1.0, a.pexp[job]) : 1.0;  // exact; applied to the centred value
    T acc[TC ? 1 : RM][TC ? 1 : RM];
    FragC tacc[NSW];
    if constexpr (TC) {
#pragma unroll
      for (int i = 0; i < NSW; ++i) wmma::fill_fragment(tacc[i], 0.0f);
    } else {
#pragma unroll
      for (int i = 0; i < RM; ++i)
#pragma unroll
        for (int j = 0; j < RM; ++j) acc[i][j] = T(0);
    }
    // Row sums of the shifted samples (AcrossSamples, diagonal tiles): thread tid < TP owns row tid and adds
    // the column of the staged tile each stage (one register pair instead of one per loaded element).
    double rsum = 0.0;
    const bool own_sum = a.cent == kAcrossSamples && diag && tid < TP;
    bool bad = false;

    for (int64_t t0 = c0; t0 < c1; t0 += TS) {
      if (tid < TS) {
        const int64_t t = t0 + tid;
        soff[tid] = t < c1 ? (srt ? srt[t] : a.smap(t)) : 0;
        smu[tid] = (a.mu && t < c1) ? a.mu[job * ns + t] : 0.0;
      }
      __syncthreads();
#pragma unroll
      for (int e = 0; e < EPT; ++e) {
        const int el = tid + e * NT;  // TP and TS are constants: these divisions are multiplies
        const int al = a.pfast ? el % TP : el / TS;
        const int tl = a.pfast ? el / TP : el % TS;
        const bool tin = t0 + tl < c1;
        double x = 0.0;
        if (tin && rowA0 + al < p) {
          x = load_elem<In>(a.data, base + poffA[al] + soff[tl]);
          if (!isfinite(x)) {
            bad = true;
            x = 0.0;
          }
          if (a.cent == kAcrossSamples) {
            x -= shA[al];
          } else if (a.mu) {
            x -= smu[tl];
          }
        }
        As[tl][al] = (T)(x * sc);
        if (!diag) {
          double y = 0.0;
          if (tin && rowB0 + al < p) {
            y = load_elem<In>(a.data, base + poffB[al] + soff[tl]);
            if (!isfinite(y)) {
              bad = true;
              y = 0.0;
            }
            if (a.cent == kAcrossSamples)
              y -= shB[al];
            else if (a.mu)
              y -= smu[tl];
          }
          Bs[tl][al] = (T)(y * sc);
        }
      }
      if (inblock_center) {
        // Per-column mean over the p rows, in double: the 16 lanes of a half-warp own one sample column.
        __syncthreads();
        const int tl = tid >> 4, part = tid & 15;
        double s = 0.0;
#pragma unroll
        for (int i = part; i < TP; i += 16) s += (double)As[tl][i];
#pragma unroll
        for (int o = 8; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o, 16);
        const double mean = s / (double)p;
        for (int i = part; i < p; i += 16) As[tl][i] = (T)((double)As[tl][i] - mean);
      }
      __syncthreads();
      if (own_sum) {
#pragma unroll
        for (int t = 0; t < TS; ++t) rsum += (double)As[t][tid];
      }
      if constexpr (TC) {
        // The split, in place: As/Bs keep the high parts. The row sums above read the whole values first.
        if (a.cent == kAcrossSamples && diag) __syncthreads();
#pragma unroll 1
        for (int el = tid; el < TS * TP; el += NT) {
          const int tl = el / TP, al = el % TP;
          const float x = As[tl][al], hi = wmma::__float_to_tf32(x);
          As[tl][al] = hi;
          Alo[tl][al] = wmma::__float_to_tf32(x - hi);
          if (!diag) {
            const float y = Bs[tl][al], yhi = wmma::__float_to_tf32(y);
            Bs[tl][al] = yhi;
            Blo[tl][al] = wmma::__float_to_tf32(y - yhi);
          }
        }
        __syncthreads();
        auto Blt = diag ? Alo : Blo;
        const int warp = tid / 32;
#pragma unroll
        for (int k0 = 0; k0 < TS; k0 += 8) {
#pragma unroll
          for (int i = 0; i < NSW; ++i) {
            int si, sj;
            if (!warp_sub_tile<RM>(warp, i, diag, si, sj)) continue;
            // A = rows si of the tile by samples k0.. (stored sample-major: column-major A); B = Aᵀ's columns sj.
            FragA ahi, alo;
            FragB bhi, blo;
            wmma::load_matrix_sync(ahi, As[k0] + 16 * si, TP + PAD);
            wmma::load_matrix_sync(alo, Alo[k0] + 16 * si, TP + PAD);
            wmma::load_matrix_sync(bhi, Bt[k0] + 16 * sj, TP + PAD);
            wmma::load_matrix_sync(blo, Blt[k0] + 16 * sj, TP + PAD);
            // The 8 samples' products into a fresh fragment, the small terms first, then added to the chunk's
            // sums on the CUDA cores: a tensor-core sum is truncated (rounded toward zero), so chaining the chunk's
            // 192 products into one accumulator would shrink a sum of squares by up to an ulp per step, all the
            // same way (3.4e-5 of a 512-sample Gram under the emulation); this way each truncation is of an
            // 8-sample part and the chunk's sums round to nearest, as on the fp32 engine.
            FragC part;
            wmma::fill_fragment(part, 0.0f);
            wmma::mma_sync(part, alo, bhi, part);
            wmma::mma_sync(part, ahi, blo, part);
            wmma::mma_sync(part, ahi, bhi, part);
#pragma unroll
            for (int e = 0; e < part.num_elements; ++e) tacc[i].x[e] += part.x[e];
          }
        }
      } else {
#pragma unroll
        for (int t = 0; t < TS; ++t) {
          T av[RM], bv[RM];
#pragma unroll
          for (int i = 0; i < RM; ++i) {
            av[i] = As[t][ty + 16 * i];
            bv[i] = Bt[t][tx + 16 * i];
          }
#pragma unroll
          for (int i = 0; i < RM; ++i)
#pragma unroll
            for (int j = 0; j < RM; ++j) acc[i][j] = fma(av[i], bv[j], acc[i][j]);
        }
      }
      // No barrier here: the next stage's stores come after its own barrier, which every reader passes
      // only once done with this stage.
    }

    double* Gj = a.G + job * p * p;
    if constexpr (TC) {
      // Each warp's sub-tiles through its own 16 x 16 tile of Cs, 8 entries per lane.
      const int warp = tid / 32, lane = tid % 32;
#pragma unroll
      for (int i = 0; i < NSW; ++i) {
        int si, sj;
        if (!warp_sub_tile<RM>(warp, i, diag, si, sj)) continue;
        wmma::store_matrix_sync(Cs[warp] + 0, tacc[i], 16, wmma::mem_row_major);
        __syncwarp();
#pragma unroll 1
        for (int e = lane; e < 256; e += 32) {
          const int64_t row = rowA0 + 16 * si + e / 16, col = rowB0 + 16 * sj + e % 16;
          if (row < p && col < p && (!diag || col <= row)) atomicAdd(Gj + row * p + col, (double)Cs[warp][e]);
        }
        __syncwarp();  // the lanes are done with Cs before the next store
      }
    } else {
#pragma unroll
      for (int i = 0; i < RM; ++i) {
        const int64_t row = rowA0 + ty + 16 * i;
#pragma unroll
        for (int j = 0; j < RM; ++j) {
          const int64_t col = rowB0 + tx + 16 * j;
          if (row < p && col < p && (!diag || col <= row)) atomicAdd(Gj + row * p + col, (double)acc[i][j]);
        }
      }
    }
    if (own_sum && rowA0 + tid < p) atomicAdd(a.sums + job * p + rowA0 + tid, rsum);
    if (bad && !a.nan_to_num) atomicOr(a.flags + job, 1);
  }
}

// AcrossP centering when the Gram spans several tiles: the mean over the p rows of every sample column, one
// thread per column (consecutive threads read consecutive samples of a row).
template <typename In>
__global__ void __launch_bounds__(NT) colmean_kernel(const GramArgs a, int64_t jobs, double* mu) {
  for (int64_t job = blockIdx.y; job < jobs; job += gridDim.y) {
    const int64_t b = job / a.K, k = job % a.K;
    const int64_t base = b * a.stride_b + k * a.stride_k;
    for (int64_t t = (int64_t)blockIdx.x * NT + threadIdx.x; t < a.ns; t += (int64_t)gridDim.x * NT) {
      const int64_t so = base + a.smap(t);
      double s = 0.0;
      for (int64_t r = 0; r < a.p; ++r) {
        const double x = load_elem<In>(a.data, so + a.pmap(r));
        s += isfinite(x) ? x : 0.0;
      }
      mu[job * a.ns + t] = s / (double)a.p;
    }
  }
}

// The pre-scale's pre-pass, stage 1: block x of job j writes the largest finite magnitude of its share of the
// job's p x ns matrix to part[j * gridDim.x + x] (no atomics: stage 2 reduces the blocks' maxima).
template <typename In>
__global__ void __launch_bounds__(NT) amax_kernel(const GramArgs a, int64_t jobs, double* part) {
  __shared__ double red[NT];
  for (int64_t job = blockIdx.y; job < jobs; job += gridDim.y) {
    const int64_t b = job / a.K, k = job % a.K;
    int64_t ns = a.ns;
    const int64_t* srt = nullptr;
    if (a.seg) {
      const int64_t* sg = a.seg + b * (a.K + 1) + k;
      ns = sg[1] - sg[0];
      srt = a.sorted + b * a.N + sg[0];
    }
    const int64_t base = b * a.stride_b + k * a.stride_k;
    double m = 0.0;
    for (int64_t e = (int64_t)blockIdx.x * NT + threadIdx.x; e < ns * a.p; e += (int64_t)gridDim.x * NT) {
      const int64_t t = a.pfast ? e / a.p : e % ns, r = a.pfast ? e % a.p : e / ns;  // the faster index first
      const double x = load_elem<In>(a.data, base + a.pmap(r) + (srt ? srt[t] : a.smap(t)));
      if (isfinite(x)) m = fmax(m, fabs(x));
    }
    red[threadIdx.x] = m;
    __syncthreads();
    for (int h = NT / 2; h > 0; h >>= 1) {
      if ((int)threadIdx.x < h) red[threadIdx.x] = fmax(red[threadIdx.x], red[threadIdx.x + h]);
      __syncthreads();
    }
    if (threadIdx.x == 0) part[job * gridDim.x + blockIdx.x] = red[0];
    __syncthreads();  // red is reused by the next job
  }
}

// Stage 2: thread per job, the exponent of its bound (twice the largest magnitude when centred: |x - mean|
// <= 2 max |x|, and the shift of the one-pass covariance is one of the samples).
__global__ void prescale_kernel(const double* part, int64_t nparts, int64_t jobs, int centred, int* pexp) {
  for (int64_t job = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; job < jobs; job += (int64_t)gridDim.x * blockDim.x) {
    double m = 0.0;
    for (int64_t i = 0; i < nparts; ++i) m = fmax(m, part[job * nparts + i]);
    pexp[job] = prescale_exponent<4>(centred ? 2.0 * m : m);
  }
}

// Centering correction of the shifted covariance (G -= d dᵀ / n), the pre-scale undone (G · 4^-e, exact) and
// the mirror of the lower triangle.
// Thread (r, c), c <= r, alone reads G[r][c] and writes G[r][c] and G[c][r], so no barrier is needed.
__global__ void __launch_bounds__(NT) finalize_kernel(double* G, int64_t p, int64_t jobs, const double* sums,
                                                      const int64_t* seg, int K, int64_t ns_const, int small_rows,
                                                      const int* pexp) {
  const int64_t pp = p * p;
  for (int64_t job = blockIdx.y; job < jobs; job += gridDim.y) {
    double* g = G + job * pp;
    int64_t ns = ns_const;
    if (seg) {
      const int64_t* sg = seg + (job / K) * (K + 1) + job % K;
      ns = sg[1] - sg[0];
    }
    if (small_rows && ns < p) continue;  // row_gram_kernel wrote this job in full
    const double* d = sums ? sums + job * p : nullptr;
    for (int64_t idx = (int64_t)blockIdx.x * NT + threadIdx.x; idx < pp; idx += (int64_t)gridDim.x * NT) {
      const int64_t r = idx / p, c = idx % p;
      if (c > r) continue;
      double v = g[r * p + c];
      if (d && ns > 0) v -= d[r] * d[c] / (double)ns;
      if (pexp) v = ldexp(v, -2 * pexp[job]);
      g[r * p + c] = v;
      g[c * p + r] = v;
    }
  }
}

// ---- masked mode: counting sort of the voxels by class -------------------------------------------------

struct SpatialMap {
  int nsd = 0;
  int64_t shape[kMaxSpatial] = {};
  int64_t ls[kMaxSpatial] = {};  // label strides
  int64_t fs[kMaxSpatial] = {};  // feature strides
};

__device__ __forceinline__ void voxel_offsets(const SpatialMap& m, int64_t v, int64_t& loff, int64_t& foff) {
  loff = 0;
  foff = 0;
  for (int d = m.nsd - 1; d >= 0; --d) {
    const int64_t i = v % m.shape[d];
    v /= m.shape[d];
    loff += i * m.ls[d];
    foff += i * m.fs[d];
  }
}

__device__ __forceinline__ int64_t load_label(const void* p, int dtype, int64_t off) {
  switch (dtype) {
    case (int)DType::I64: return __ldg(static_cast<const long long*>(p) + off);
    case (int)DType::I32: return __ldg(static_cast<const int*>(p) + off);
    case (int)DType::I16: return __ldg(static_cast<const short*>(p) + off);
    case (int)DType::I8: return (int64_t)(signed char)__ldg(static_cast<const char*>(p) + off);
    default: return (int64_t)__ldg(static_cast<const unsigned char*>(p) + off);
  }
}

struct SortArgs {
  const void* labels = nullptr;
  int ldtype = 0;
  int64_t lstride_b = 0;
  SpatialMap sm;
  int64_t N = 0;
  int K = 0;
  int shared_hist = 0;
  unsigned long long* counts = nullptr;  // [B, K]
  unsigned long long* fill = nullptr;    // [B, K] next free position of each class segment
  int64_t* seg = nullptr;                // [B, K + 1]
  int64_t* sorted = nullptr;             // [B, N]
  unsigned long long* label_error = nullptr;  // {flag, value}
};

__device__ __forceinline__ void report_label(unsigned long long* err, int64_t l) {
  if (atomicCAS(err, 0ull, 1ull) == 0ull) err[1] = (unsigned long long)l;
}

__global__ void __launch_bounds__(NT) hist_kernel(const SortArgs a) {
  extern __shared__ unsigned int hist_sh[];
  const int b = blockIdx.y;
  if (a.shared_hist) {
    for (int k = threadIdx.x; k < a.K; k += NT) hist_sh[k] = 0;
    __syncthreads();
  }
  const int64_t v0 = (int64_t)blockIdx.x * NT * kVoxPerThread;
  for (int j = 0; j < kVoxPerThread; ++j) {
    const int64_t v = v0 + (int64_t)j * NT + threadIdx.x;
    if (v >= a.N) break;
    int64_t loff, foff;
    voxel_offsets(a.sm, v, loff, foff);
    const int64_t l = load_label(a.labels, a.ldtype, b * a.lstride_b + loff);
    if (l < 0 || l >= a.K) {
      report_label(a.label_error, l);
      continue;
    }
    if (a.shared_hist)
      atomicAdd(hist_sh + l, 1u);
    else
      atomicAdd(a.counts + (int64_t)b * a.K + l, 1ull);
  }
  if (a.shared_hist) {
    __syncthreads();
    for (int k = threadIdx.x; k < a.K; k += NT)
      if (hist_sh[k]) atomicAdd(a.counts + (int64_t)b * a.K + k, (unsigned long long)hist_sh[k]);
  }
}

// Exclusive scan of the class counts of each sample (K is small: one thread per sample).
__global__ void scan_kernel(const SortArgs a, int64_t B) {
  for (int64_t b = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; b < B; b += (int64_t)gridDim.x * blockDim.x) {
    int64_t s = 0;
    for (int k = 0; k < a.K; ++k) {
      a.seg[b * (a.K + 1) + k] = s;
      a.fill[b * a.K + k] = (unsigned long long)s;
      s += (int64_t)a.counts[b * a.K + k];
    }
    a.seg[b * (a.K + 1) + a.K] = s;
  }
}

// Each block ranks its voxels per class in shared memory, reserves one range per class in the class's
// segment with a single global atomic, and writes the feature offsets there.
__global__ void __launch_bounds__(NT, 2) scatter_kernel(const SortArgs a) {
  extern __shared__ unsigned long long scat_sh[];
  auto lbase = scat_sh;                                   // K unsigned long long
  auto lcount = reinterpret_cast<unsigned int*>(scat_sh + a.K);  // K unsigned int
  const int b = blockIdx.y;
  if (a.shared_hist) {
    for (int k = threadIdx.x; k < a.K; k += NT) lcount[k] = 0;
    __syncthreads();
  }
  int lab[kVoxPerThread];
  unsigned int rank[kVoxPerThread];
  int64_t fo[kVoxPerThread];
  const int64_t v0 = (int64_t)blockIdx.x * NT * kVoxPerThread;
#pragma unroll
  for (int j = 0; j < kVoxPerThread; ++j) {
    lab[j] = -1;
    rank[j] = 0;
    fo[j] = 0;
    const int64_t v = v0 + (int64_t)j * NT + threadIdx.x;
    if (v < a.N) {
      int64_t loff, foff;
      voxel_offsets(a.sm, v, loff, foff);
      const int64_t l = load_label(a.labels, a.ldtype, b * a.lstride_b + loff);
      if (l >= 0 && l < a.K) {
        lab[j] = (int)l;
        fo[j] = foff;
        if (a.shared_hist) rank[j] = atomicAdd(lcount + l, 1u);
      }
    }
  }
  if (a.shared_hist) {
    __syncthreads();
    for (int k = threadIdx.x; k < a.K; k += NT)
      lbase[k] = lcount[k] ? atomicAdd(a.fill + (int64_t)b * a.K + k, (unsigned long long)lcount[k]) : 0ull;
    __syncthreads();
  }
  int64_t* row = a.sorted + (int64_t)b * a.N;
#pragma unroll
  for (int j = 0; j < kVoxPerThread; ++j) {
    if (lab[j] < 0) continue;
    const unsigned long long pos =
        a.shared_hist ? lbase[lab[j]] + rank[j] : atomicAdd(a.fill + (int64_t)b * a.K + lab[j], 1ull);
    row[pos] = fo[j];
  }
}

// ---- masked mode, smaller side: classes with n < C voxels ---------------------------------------------
// Their Gram is taken on the row side, n x n (the same non-zero spectrum as the C x C one, SPEC §2): M̄ M̄ᵀ with
// M̄ the class's n x C embeddings less their mean row, written densely (leading dimension n) at the start of the
// job's C x C slot. In double throughout: n < C keeps it cheap, and there is no chunked FP32 stage to bound.

struct RowArgs {
  const void* data = nullptr;
  int64_t C = 0, cs = 0;            // channels and their stride
  int64_t stride_b = 0;
  const int64_t* sorted = nullptr;  // [B, N] feature offsets grouped by class
  const int64_t* seg = nullptr;     // [B, K + 1]
  int64_t N = 0;
  int K = 0;
  int64_t jobs = 0;
  int nan_to_num = 0;
  const double* mu = nullptr;       // [jobs, C] class means (centring), or null
  double* G = nullptr;
  int32_t* flags = nullptr;
};

// The voxels [start, n) of job (b, k) and whether it is a row-side job.
__device__ __forceinline__ bool row_job(const RowArgs& a, int64_t job, int64_t& start, int64_t& n) {
  const int64_t* sg = a.seg + (job / a.K) * (a.K + 1) + job % a.K;
  start = sg[0];
  n = sg[1] - sg[0];
  return n >= 1 && n < a.C;
}

// Thread per (job, channel): the class mean over its voxels (non-finite values read as 0, as the Gram does).
template <typename In>
__global__ void __launch_bounds__(NT) row_mean_kernel(const RowArgs a, double* mu) {
  for (int64_t e = (int64_t)blockIdx.x * NT + threadIdx.x; e < a.jobs * a.C; e += (int64_t)gridDim.x * NT) {
    const int64_t job = e / a.C, c = e % a.C;
    int64_t start, n;
    if (!row_job(a, job, start, n)) continue;
    const int64_t* srt = a.sorted + (job / a.K) * a.N + start;
    const int64_t base = (job / a.K) * a.stride_b + c * a.cs;
    double s = 0.0;
    for (int64_t v = 0; v < n; ++v) {
      const double x = load_elem<In>(a.data, base + srt[v]);
      s += isfinite(x) ? x : 0.0;
    }
    mu[e] = s / (double)n;
  }
}

// Block per (lower-triangle 16 x 16 tile pair of the n x n Gram, job); thread (ty, tx) owns one entry and its
// mirror. Channels are staged 16 at a time.
constexpr int RT = 16;
template <typename In>
__global__ void __launch_bounds__(RT * RT) row_gram_kernel(const RowArgs a) {
  __shared__ double As[RT][RT + 1], Bs[RT][RT + 1];
  int q = blockIdx.x, I = 0;
  while (q > I) {
    q -= I + 1;
    ++I;
  }
  const int J = q, tx = threadIdx.x % RT, ty = threadIdx.x / RT;
  for (int64_t job = blockIdx.y; job < a.jobs; job += gridDim.y) {
    int64_t start, n;
    if (!row_job(a, job, start, n) || (int64_t)I * RT >= n) continue;  // uniform over the block
    const int64_t* srt = a.sorted + (job / a.K) * a.N + start;
    const int64_t base = (job / a.K) * a.stride_b;
    const double* mu = a.mu ? a.mu + job * a.C : nullptr;
    const int64_t ra = (int64_t)I * RT + ty, rb = (int64_t)J * RT + ty;  // the rows this thread stages
    const int64_t oa = ra < n ? srt[ra] : 0, ob = rb < n ? srt[rb] : 0;
    double acc = 0.0;
    bool bad = false;
    for (int64_t c0 = 0; c0 < a.C; c0 += RT) {
      const int64_t c = c0 + tx;
      double x = 0.0, y = 0.0;
      if (c < a.C) {
        const double m = mu ? mu[c] : 0.0;
        if (ra < n) {
          x = load_elem<In>(a.data, base + oa + c * a.cs);
          if (!isfinite(x)) {
            bad = true;
            x = 0.0;
          }
          x -= m;
        }
        if (rb < n) {
          y = load_elem<In>(a.data, base + ob + c * a.cs);
          if (!isfinite(y)) {
            bad = true;
            y = 0.0;
          }
          y -= m;
        }
      }
      As[ty][tx] = x;
      Bs[ty][tx] = y;
      __syncthreads();
#pragma unroll
      for (int t = 0; t < RT; ++t) acc += As[ty][t] * Bs[tx][t];
      __syncthreads();
    }
    const int64_t row = (int64_t)I * RT + ty, col = (int64_t)J * RT + tx;
    double* Gj = a.G + job * a.C * a.C;
    if (row < n && col < n && col <= row) {
      Gj[row * n + col] = acc;
      Gj[col * n + row] = acc;
    }
    if (bad && !a.nan_to_num) atomicOr(a.flags + job, 1);
  }
}

// ---- host side -------------------------------------------------------------------------------------------

// The engine of the float products (the file's header): AUVCORE_CUDA_GRAM=fp32 (default) or 3xtf32.
bool tensor_core_engine() {
  const char* v = std::getenv("AUVCORE_CUDA_GRAM");
  if (v == nullptr || *v == '\0' || std::strcmp(v, "fp32") == 0) return false;
  if (std::strcmp(v, "3xtf32") == 0) return true;
  throw ArgumentError(std::string("AUVCORE_CUDA_GRAM: expected 'fp32' or '3xtf32', got '") + v + "'");
}

template <typename In, typename T, int RM>
void launch_gram_tile(const GramArgs& a, int64_t B, cudaStream_t s) {
  constexpr int64_t TP = 16 * RM;
  const int64_t tiles = (a.p + TP - 1) / TP;
  const dim3 grid((unsigned)(tiles * (tiles + 1) / 2), (unsigned)std::min<int64_t>(std::max<int64_t>(a.items, 1), 65535),
                  (unsigned)B);
  if constexpr (sizeof(T) == 4) {
    if (tensor_core_engine()) {
      gram_kernel<In, T, RM, true><<<grid, NT, 0, s>>>(a);
      AUV_CUDA_CHECK_LAUNCH("gram_kernel");
      return;
    }
  }
  gram_kernel<In, T, RM, false><<<grid, NT, 0, s>>>(a);
  AUV_CUDA_CHECK_LAUNCH("gram_kernel");
}

// Largest tile: float 128 (8 x 8 accumulators, ~190 registers: one block per SM), double 96 (6 x 6, ~170).
// The tile sizes below it (32, 64, 96 floats) stay at <= 128 registers, two blocks per SM.
template <typename T>
__host__ __device__ constexpr int max_rm() {
  return sizeof(T) == 4 ? 8 : 6;
}

template <typename In, typename T>
void launch_gram(GramArgs& a, int64_t B, int64_t jobs, cudaStream_t s, Workspace& ws) {
  constexpr int64_t TPmax = 16 * max_rm<T>();
  if (sizeof(T) == 4) {
    // The pre-scale of the float products: the jobs' largest magnitudes, then their exponents.
    const int64_t per_job = a.seg ? (a.N + a.K - 1) / a.K * a.p : a.ns * a.p;
    const int64_t gx = std::max<int64_t>(1, std::min<int64_t>((per_job + NT * 16 - 1) / (NT * 16), 64));
    double* part = ws.alloc_n<double>(jobs * gx);
    int* pexp = ws.alloc_n<int>(jobs);
    const dim3 agrid((unsigned)gx, (unsigned)std::min<int64_t>(jobs, 65535));
    amax_kernel<In><<<agrid, NT, 0, s>>>(a, jobs, part);
    AUV_CUDA_CHECK_LAUNCH("amax_kernel");
    const unsigned pgrid = (unsigned)std::min<int64_t>((jobs + 127) / 128, 1024);
    prescale_kernel<<<pgrid, 128, 0, s>>>(part, gx, jobs, a.cent != kNone, pexp);
    AUV_CUDA_CHECK_LAUNCH("prescale_kernel");
    a.pexp = pexp;
  }
  if (a.cent == kAcrossP && a.p > TPmax) {
    // A tile holds TPmax of the p rows, too few to centre a column: take the means first (one extra read).
    double* mu = ws.alloc_n<double>(jobs * a.ns);
    const int64_t gx = std::min<int64_t>((a.ns + NT - 1) / NT, 4096);
    const dim3 grid((unsigned)gx, (unsigned)std::min<int64_t>(jobs, 65535));
    colmean_kernel<In><<<grid, NT, 0, s>>>(a, jobs, mu);
    AUV_CUDA_CHECK_LAUNCH("colmean_kernel");
    a.mu = mu;
  }
  if (a.p <= 32)
    launch_gram_tile<In, T, 2>(a, B, s);
  else if (a.p <= 64)
    launch_gram_tile<In, T, 4>(a, B, s);
  else if (a.p <= 96 || sizeof(T) == 8)
    launch_gram_tile<In, T, 6>(a, B, s);
  else
    launch_gram_tile<In, T, max_rm<T>()>(a, B, s);
}

// The accumulation type: double inputs stay double, the others multiply in float (the file's precision note).
// a.pexp comes back set when the products are float (the pre-scale that finalize_kernel undoes).
void launch_gram_dtype(DType dt, const char* arg, GramArgs& a, int64_t B, int64_t jobs, cudaStream_t s,
                       Workspace& ws) {
  dispatch_input(dt, arg, [&](auto tag) {
    using In = decltype(tag);
    launch_gram<In, std::conditional_t<std::is_same_v<In, double>, double, float>>(a, B, jobs, s, ws);
  });
}

template <typename In>
void launch_rows(RowArgs r, bool center, cudaStream_t s, Workspace& ws) {
  if (center) {
    double* mu = ws.alloc_n<double>(r.jobs * r.C);
    row_mean_kernel<In><<<(unsigned)std::min<int64_t>((r.jobs * r.C + NT - 1) / NT, 4096), NT, 0, s>>>(r, mu);
    AUV_CUDA_CHECK_LAUNCH("row_mean_kernel");
    r.mu = mu;
  }
  const int64_t tiles = (r.C - 1 + RT - 1) / RT;  // n <= C - 1
  const dim3 grid((unsigned)(tiles * (tiles + 1) / 2), (unsigned)std::min<int64_t>(r.jobs, 65535));
  row_gram_kernel<In><<<grid, RT * RT, 0, s>>>(r);
  AUV_CUDA_CHECK_LAUNCH("row_gram_kernel");
}

void launch_finalize(double* G, int64_t p, int64_t jobs, const double* sums, const int64_t* seg, int K, int64_t ns,
                     int small_rows, const int* pexp, cudaStream_t s) {
  const int64_t gx = std::min<int64_t>((p * p + NT - 1) / NT, 1024);
  const dim3 grid((unsigned)gx, (unsigned)std::min<int64_t>(jobs, 65535));
  finalize_kernel<<<grid, NT, 0, s>>>(G, p, jobs, sums, seg, K, ns, small_rows, pexp);
  AUV_CUDA_CHECK_LAUNCH("finalize_kernel");
}

}  // namespace

void decoded_gram(const ArrayView& z, int mode, bool center, bool nan_to_num, double* G, int32_t* flags,
                  std::uintptr_t stream, int device) {
  require(is_floating(z.dtype), "z: expected a floating dtype");
  require(z.dim() == 4 || z.dim() == 5, "z: expected decoded maps [B, K, D, H, W] or [B, K, H, W]");
  require((int64_t)z.strides.size() == z.dim(), "z: strides do not match the shape");
  for (auto d : z.shape) require(d >= 1, "z: every dimension must be >= 1");
  require(mode >= 0 && mode <= 2, "mode: expected one of 'D_HW', 'H_DW', 'W_DH'");
  require(G != nullptr && flags != nullptr, "G and flags: output pointers must not be null");
  const int64_t B = z.shape[0], K = z.shape[1];
  require(B <= 65535, "z: at most 65535 samples per call on CUDA");
  require(K <= (int64_t)1 << 30, "z: too many classes");

  const DecodedMaps dm = decoded_maps(z, mode);
  const bool row_side = dm.row_side;
  const int64_t p = dm.p;
  require(p <= kMaxEighSize, "z: min(m, n) = " + std::to_string(p) + " exceeds the CUDA limit of " +
                                 std::to_string(kMaxEighSize));

  GramArgs a;
  a.data = z.data();
  a.p = p;
  a.pmap = dm.pmap;
  a.smap = dm.smap;
  a.ns = dm.ns;
  a.nch = (a.ns + kChunk - 1) / kChunk;
  a.items = K * a.nch;
  a.K = (int)K;
  a.stride_b = z.strides[0];
  a.stride_k = z.strides[1];
  a.cent = !center ? kNone : row_side ? kAcrossP : kAcrossSamples;
  a.nan_to_num = nan_to_num;
  a.pfast = std::llabs(a.pmap.s_in) < std::llabs(a.smap.s_in);
  a.G = G;
  a.flags = flags;

  require_device(device);
  DeviceGuard guard(device);
  require_device_pointer(z.data(), "z");
  const cudaStream_t s = as_stream(stream);
  const int64_t jobs = B * K;
  Workspace ws(device, s);
  AUV_CUDA_CHECK(cudaMemsetAsync(G, 0, sizeof(double) * jobs * p * p, s));
  if (a.cent == kAcrossSamples) {
    a.sums = ws.alloc_n<double>(jobs * p);
    AUV_CUDA_CHECK(cudaMemsetAsync(a.sums, 0, sizeof(double) * jobs * p, s));
  }
  launch_gram_dtype(z.dtype, "z", a, B, jobs, s, ws);
  launch_finalize(G, p, jobs, a.sums, nullptr, (int)K, a.ns, 0, a.pexp, s);
}

void masked_gram(const ArrayView& f, const ArrayView& labels, int64_t K, bool center, bool nan_to_num,
                 bool smaller_side, double* G, int64_t* counts, int32_t* flags, int64_t* label_error,
                 std::uintptr_t stream, int device) {
  check_masked_args(f, labels, K);
  for (auto d : f.shape) require(d >= 1, "features: every dimension must be >= 1");
  require(K <= (int64_t)1 << 30, "num_classes: too large");
  require(G && counts && flags && label_error, "G, counts, flags, label_error: output pointers must not be null");
  const int64_t B = f.shape[0], C = f.shape[1], nsd = labels.dim() - 1;
  require(B <= 65535, "features: at most 65535 samples per call on CUDA");
  require(nsd <= kMaxSpatial, "features: at most " + std::to_string(kMaxSpatial) + " spatial dimensions on CUDA");
  require(C <= kMaxEighSize, "features: C = " + std::to_string(C) + " exceeds the CUDA limit of " +
                                 std::to_string(kMaxEighSize));
  int64_t N = 1;
  SortArgs sa;
  sa.sm.nsd = (int)nsd;
  for (int64_t d = 0; d < nsd; ++d) {
    sa.sm.shape[d] = labels.shape[d + 1];
    sa.sm.ls[d] = labels.strides[d + 1];
    sa.sm.fs[d] = f.strides[d + 2];
    N *= labels.shape[d + 1];
  }
  sa.labels = labels.data();
  sa.ldtype = (int)labels.dtype;
  sa.lstride_b = labels.strides[0];
  sa.N = N;
  sa.K = (int)K;
  sa.shared_hist = K <= kMaxSharedHist;
  sa.counts = reinterpret_cast<unsigned long long*>(counts);
  sa.label_error = reinterpret_cast<unsigned long long*>(label_error);

  require_device(device);
  DeviceGuard guard(device);
  require_device_pointer(f.data(), "features");
  require_device_pointer(labels.data(), "labels");
  const cudaStream_t s = as_stream(stream);
  const int64_t jobs = B * K;
  Workspace ws(device, s);
  sa.seg = ws.alloc_n<int64_t>(B * (K + 1));
  sa.fill = ws.alloc_n<unsigned long long>(B * K);
  sa.sorted = ws.alloc_n<int64_t>(B * N);
  AUV_CUDA_CHECK(cudaMemsetAsync(counts, 0, sizeof(int64_t) * jobs, s));
  AUV_CUDA_CHECK(cudaMemsetAsync(G, 0, sizeof(double) * jobs * C * C, s));

  const int64_t vox_per_block = (int64_t)NT * kVoxPerThread;
  const dim3 sgrid((unsigned)((N + vox_per_block - 1) / vox_per_block), (unsigned)B);
  require(sgrid.x >= 1 && (N + vox_per_block - 1) / vox_per_block < ((int64_t)1 << 31), "features: too many voxels");
  hist_kernel<<<sgrid, NT, sa.shared_hist ? dyn_smem_bytes(sizeof(unsigned int) * K) : 0, s>>>(sa);
  AUV_CUDA_CHECK_LAUNCH("hist_kernel");
  scan_kernel<<<(unsigned)std::min<int64_t>((B + 127) / 128, 1024), 128, 0, s>>>(sa, B);
  AUV_CUDA_CHECK_LAUNCH("scan_kernel");
  const size_t scatter_bytes = dyn_smem_bytes((sizeof(unsigned long long) + sizeof(unsigned int)) * K);
  scatter_kernel<<<sgrid, NT, sa.shared_hist ? scatter_bytes : 0, s>>>(sa);
  AUV_CUDA_CHECK_LAUNCH("scatter_kernel");

  GramArgs a;
  a.data = f.data();
  a.p = C;
  a.pmap.s_in = f.strides[1];
  a.sorted = sa.sorted;
  a.seg = sa.seg;
  a.N = N;
  a.items = (N + kChunk - 1) / kChunk + K;  // Σ_k ceil(n_k / chunk) <= N / chunk + K
  a.K = (int)K;
  a.stride_b = f.strides[0];
  a.stride_k = 0;
  a.cent = center ? kAcrossSamples : kNone;
  a.nan_to_num = nan_to_num;
  a.pfast = nsd > 0 && std::llabs(f.strides[1]) < std::llabs(f.strides[f.dim() - 1]);
  a.G = G;
  a.flags = flags;
  a.small_rows = smaller_side;
  if (center) {
    a.sums = ws.alloc_n<double>(jobs * C);
    AUV_CUDA_CHECK(cudaMemsetAsync(a.sums, 0, sizeof(double) * jobs * C, s));
  }
  launch_gram_dtype(f.dtype, "features", a, B, jobs, s, ws);
  launch_finalize(G, C, jobs, a.sums, sa.seg, (int)K, 0, a.small_rows, a.pexp, s);
  if (smaller_side && C >= 2) {  // with one channel no class has fewer voxels than C and at least one
    RowArgs r;
    r.data = f.data();
    r.C = C;
    r.cs = f.strides[1];
    r.stride_b = f.strides[0];
    r.sorted = sa.sorted;
    r.seg = sa.seg;
    r.N = N;
    r.K = (int)K;
    r.jobs = jobs;
    r.nan_to_num = nan_to_num;
    r.G = G;
    r.flags = flags;
    dispatch_input(f.dtype, "features", [&](auto tag) { launch_rows<decltype(tag)>(r, center, s, ws); });
  }
}

}  // namespace cuda
}  // namespace auvcore
