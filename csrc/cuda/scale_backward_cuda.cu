// Analytic backward of the semantic perception scale of decoded maps on the GPU (SPEC §5), the twin of
// csrc/cpu/scale_backward_cpu.cpp: dS/dM̄ = 2 U diag(∂S/∂λ) Uᵀ M̄ on the smaller side of the Gram, then the
// centering projection. From the eigenpairs the forward kept, in three kernels:
//   1. weights_kernel: per (b, k), A = 2 grad_S U diag(∂S/∂λ) Uᵀ (p x p, float64; entropy_scale_grad is the
//      formula shared with the CPU);
//   2. mean_kernel (column-side centering only): the per-coordinate means over the samples the forward removed;
//   3. apply_kernel: dz = A M̄ over tiles of TS samples staged in shared memory, centred as in the forward.
// Every output element is one thread's serial sum in a fixed order: bit-identical from run to run.
#include <cuda_runtime.h>

#include <algorithm>
#include <cfloat>
#include <string>

#include "auvcore/entropy.h"
#include "auvcore/gram.h"
#include "auvcore/scale_cuda.h"
#include "common_cuda.cuh"
#include "decoded_cuda.cuh"

namespace auvcore {
namespace cuda {
namespace {

constexpr int NT = 256;
constexpr int kMaxTS = 32;  // samples per tile of the apply kernel

struct BackwardArgs {
  const void* z = nullptr;
  DecodedMaps zl, dl;          // where z and dz hold element (a, t) of a class matrix
  int64_t zb = 0, zk = 0;      // z's sample and class strides
  int64_t db = 0, dk = 0;      // dz's
  void* dz = nullptr;
  bool dz_double = false;
  int K = 0;
  int64_t count = 0;           // B * K
  int p = 0;
  int ts = 1;                  // samples per tile
  int cent = 0;                // Centering
  double eps = 0.0;
  int variant = 0;
  const double* evals = nullptr;  // [count, p] descending
  const double* evecs = nullptr;  // [count, p, p], row j = eigenvector j
  const double* grad_S = nullptr;
  double* A = nullptr;            // [count, p, p]
  double* mu = nullptr;           // [count, p] (AcrossSamples)
};

// Block per (b, k); shared: g[p] (allocated in whole 16-byte granules: see dyn_smem_bytes). A zero upstream gradient (e.g. an excluded class) leaves A untouched: the
// apply kernel writes zeros for it without reading A.
__global__ void __launch_bounds__(NT) weights_kernel(const BackwardArgs a) {
  extern __shared__ double g[];
  const int p = a.p;
  for (int64_t i = blockIdx.x; i < a.count; i += gridDim.x) {
    const double gs = a.grad_S[i];
    if (gs == 0.0) continue;
    const double* lam = a.evals + i * p;
    if (threadIdx.x == 0) {
      // Eigenvalues within rounding of the largest are numerically zero (e.g. the centering direction).
      const double tol = fmax(lam[0], 0.0) * (double)p * 4.0 * DBL_EPSILON;
      entropy_scale_grad(lam, p, a.eps, a.variant, tol, g);
    }
    __syncthreads();
    const double* U = a.evecs + i * (int64_t)p * p;
    double* Ai = a.A + i * (int64_t)p * p;
    for (int64_t e = threadIdx.x; e < (int64_t)p * p; e += blockDim.x) {
      const int r = (int)(e / p), c = (int)(e % p);
      double s = 0.0;
      for (int j = 0; j < p; ++j)
        if (g[j] != 0.0) s += g[j] * U[(int64_t)j * p + r] * U[(int64_t)j * p + c];
      Ai[e] = 2.0 * gs * s;
    }
    __syncthreads();  // g is rewritten for the next matrix
  }
}

// Thread per (b, k, coordinate a): the mean over the samples of the finite values (non-finite ones were read
// as 0 by the forward).
template <typename In>
__global__ void __launch_bounds__(NT) mean_kernel(const BackwardArgs a) {
  const int64_t n = a.count * a.p;
  for (int64_t e = (int64_t)blockIdx.x * NT + threadIdx.x; e < n; e += (int64_t)gridDim.x * NT) {
    const int64_t i = e / a.p, c = e % a.p;
    if (a.grad_S[i] == 0.0) continue;
    const int64_t base = (i / a.K) * a.zb + (i % a.K) * a.zk + a.zl.pmap(c);
    double s = 0.0;
    for (int64_t t = 0; t < a.zl.ns; ++t) {
      const double v = load_elem<In>(a.z, base + a.zl.smap(t));
      s += isfinite(v) ? v : 0.0;
    }
    a.mu[e] = s / (double)a.zl.ns;
  }
}

// Subtract from each of the ts columns of the p x ts tile X its mean over the rows (ts threads, a serial sum
// each: the forward's per-sample centring, and in the backward the projection back through it).
template <typename SharedPtr>  // double* on the GPU
__device__ void center_columns(SharedPtr X, int p, int ts, SharedPtr colmean) {
  if ((int)threadIdx.x < ts) {
    double s = 0.0;
    for (int r = 0; r < p; ++r) s += X[r * ts + threadIdx.x];
    colmean[threadIdx.x] = s / (double)p;
  }
  __syncthreads();
  for (int e = threadIdx.x; e < p * ts; e += blockDim.x) X[e] -= colmean[e % ts];
  __syncthreads();
}

// Block per (tile of ts samples, b, k); shared: X[p][ts], Y[p][ts], colmean[ts], bad[p][ts].
template <typename In>
__global__ void __launch_bounds__(NT) apply_kernel(const BackwardArgs a) {
  extern __shared__ double sm[];
  const int p = a.p, ts = a.ts;
  auto X = sm;  // auto: the host emulation's checked shared pointers (csrc/cuda/emu)
  auto Y = X + p * ts;
  auto colmean = Y + p * ts;
  auto bad = reinterpret_cast<unsigned char*>(colmean + ts);
  const int64_t tiles = (a.zl.ns + ts - 1) / ts;
  for (int64_t i = blockIdx.y; i < a.count; i += gridDim.y) {
    const int64_t zbase = (i / a.K) * a.zb + (i % a.K) * a.zk, dbase = (i / a.K) * a.db + (i % a.K) * a.dk;
    const bool active = a.grad_S[i] != 0.0;
    for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
      const int64_t t0 = tile * ts;
      const int nb = a.zl.ns - t0 < ts ? (int)(a.zl.ns - t0) : ts;
      if (!active) {
        for (int e = threadIdx.x; e < p * nb; e += blockDim.x) {
          const int64_t off = dbase + a.dl.pmap(e / nb) + a.dl.smap(t0 + e % nb);
          if (a.dz_double) static_cast<double*>(a.dz)[off] = 0.0;
          else static_cast<float*>(a.dz)[off] = 0.0f;
        }
        continue;
      }
      const double* mu = a.mu ? a.mu + i * p : nullptr;
      for (int e = threadIdx.x; e < p * ts; e += blockDim.x) {
        const int r = e / ts, t = e % ts;
        double v = 0.0;
        bool b = false;
        if (t < nb) {
          v = load_elem<In>(a.z, zbase + a.zl.pmap(r) + a.zl.smap(t0 + t));
          b = !isfinite(v);
          if (b) v = 0.0;
          if (mu) v -= mu[r];
        }
        X[e] = v;
        bad[e] = b;
      }
      __syncthreads();
      // Row side: X̄ loses each column's mean, and the projection back through the centering removes it again
      // from A X̄. Column side: the projection would subtract A·mean_t(X̄) = 0, so it is skipped.
      if (a.cent == (int)Centering::AcrossP) center_columns(X, p, ts, colmean);
      const double* Ai = a.A + i * (int64_t)p * p;
      for (int e = threadIdx.x; e < p * ts; e += blockDim.x) {
        const int r = e / ts, t = e % ts;  // a warp shares the row of A and reads consecutive samples of X
        const double* ar = Ai + (int64_t)r * p;
        double s = 0.0;
        for (int c = 0; c < p; ++c) s += ar[c] * X[c * ts + t];
        Y[e] = s;
      }
      __syncthreads();
      if (a.cent == (int)Centering::AcrossP) center_columns(Y, p, ts, colmean);
      for (int e = threadIdx.x; e < p * nb; e += blockDim.x) {
        const int r = e / nb, t = e % nb;
        const double v = bad[r * ts + t] ? 0.0 : Y[r * ts + t];
        const int64_t off = dbase + a.dl.pmap(r) + a.dl.smap(t0 + t);
        if (a.dz_double) static_cast<double*>(a.dz)[off] = v;
        else static_cast<float*>(a.dz)[off] = (float)v;
      }
      __syncthreads();  // the tile is restaged next
    }
  }
}

size_t apply_smem_bytes(int p, int ts) {
  return dyn_smem_bytes((sizeof(double) * 2 + 1) * (size_t)p * ts + sizeof(double) * ts);
}

template <typename In>
void launch(const BackwardArgs& a, size_t apply_bytes, cudaStream_t s) {
  const unsigned count_grid = (unsigned)std::min<int64_t>(a.count, 65535);
  if (a.mu) {
    const int64_t n = a.count * a.p;
    mean_kernel<In><<<(unsigned)std::min<int64_t>((n + NT - 1) / NT, 4096), NT, 0, s>>>(a);
    AUV_CUDA_CHECK_LAUNCH("mean_kernel");
  }
  if (apply_bytes > 48 * 1024)
    AUV_CUDA_CHECK(cudaFuncSetAttribute(apply_kernel<In>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        (int)apply_bytes));
  const int64_t tiles = (a.zl.ns + a.ts - 1) / a.ts;
  const dim3 grid((unsigned)std::min<int64_t>(tiles, 1 << 16), count_grid);
  apply_kernel<In><<<grid, NT, apply_bytes, s>>>(a);
  AUV_CUDA_CHECK_LAUNCH("apply_kernel");
}

}  // namespace

void scale_backward_decoded(const ArrayView& z, int mode, bool center, double eps, int variant, const double* evals,
                            const double* evecs, const double* grad_S, const ArrayView& dz, std::uintptr_t stream,
                            int device) {
  require(is_floating(z.dtype), "z: expected a floating dtype");
  require(z.dim() == 4 || z.dim() == 5, "z: expected decoded maps [B, K, D, H, W] or [B, K, H, W]");
  for (auto d : z.shape) require(d >= 1, "z: every dimension must be >= 1");
  require(mode >= 0 && mode <= 2, "mode: expected one of 'D_HW', 'H_DW', 'W_DH'");
  require(dz.dtype == DType::F32 || dz.dtype == DType::F64, "dz: expected float32 or float64");
  require(dz.shape == z.shape, "dz: shape differs from z");
  require(variant == 0 || variant == 1, "variant: expected 0 (paper) or 1 (official)");
  require(eps >= 0.0, "eps: expected >= 0");
  require(evals && evecs && grad_S, "evals, evecs and grad_S: pointers must not be null");
  const int64_t B = z.shape[0], K = z.shape[1];
  require(K <= (int64_t)1 << 30, "z: too many classes");

  BackwardArgs a;
  a.z = z.data();
  a.zl = decoded_maps(z, mode);
  a.dl = decoded_maps(dz, mode);
  require(a.zl.p <= kMaxEighSize, "z: min(m, n) = " + std::to_string(a.zl.p) + " exceeds the CUDA limit of " +
                                      std::to_string(kMaxEighSize));
  a.zb = z.strides[0];
  a.zk = z.strides[1];
  a.db = dz.strides[0];
  a.dk = dz.strides[1];
  a.dz = reinterpret_cast<void*>(dz.ptr);
  a.dz_double = dz.dtype == DType::F64;
  a.K = (int)K;
  a.count = B * K;
  a.p = (int)a.zl.p;
  a.cent = (int)centering_for(a.zl.row_side, center);
  a.eps = eps;
  a.variant = variant;
  a.evals = evals;
  a.evecs = evecs;
  a.grad_S = grad_S;

  require_device(device);
  DeviceGuard guard(device);
  require_device_pointer(z.data(), "z");
  require_device_pointer(a.dz, "dz");
  const cudaStream_t s = as_stream(stream);
  int optin = 0;
  AUV_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  // The widest tile (up to kMaxTS samples) whose two p x ts stages fit in shared memory.
  int ts = kMaxTS;
  while (ts > 1 && apply_smem_bytes(a.p, ts) > (size_t)optin) ts /= 2;
  const size_t apply_bytes = apply_smem_bytes(a.p, ts);
  require(apply_bytes <= (size_t)optin, "z: min(m, n) = " + std::to_string(a.p) + " too large for this device's shared memory");
  a.ts = ts;

  Workspace ws(device, s);
  a.A = ws.alloc_n<double>(a.count * a.p * a.p);
  if (a.cent == (int)Centering::AcrossSamples) a.mu = ws.alloc_n<double>(a.count * a.p);
  const size_t g_bytes = dyn_smem_bytes(sizeof(double) * (size_t)a.p);
  if (g_bytes > 48 * 1024)
    AUV_CUDA_CHECK(cudaFuncSetAttribute(weights_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)g_bytes));
  weights_kernel<<<(unsigned)std::min<int64_t>(a.count, 65535), NT, g_bytes, s>>>(a);
  AUV_CUDA_CHECK_LAUNCH("weights_kernel");
  dispatch_input(z.dtype, "z", [&](auto tag) { launch<decltype(tag)>(a, apply_bytes, s); });
}

}  // namespace cuda
}  // namespace auvcore
