// Batched symmetric eigenvalues of the Gram matrices and the semantic scale S, one block per matrix, in double
// (SPEC §2 steps 2–5): Householder tridiagonalisation (as csrc/cpu/eigh_cpu.cpp), then every eigenvalue by
// bisection on Sturm counts, one thread per eigenvalue (the QL sweep of the CPU is serial; bisection is not),
// then the entropy. Matrices whose p x p doubles fit in shared memory are reduced there, larger ones in place
// in global memory (the G buffer is scratch, as on the CPU).
#include <cuda_runtime.h>

#include <algorithm>
#include <string>

#include "auvcore/scale_cuda.h"
#include "common_cuda.cuh"
#include "sturm.h"

namespace auvcore {
namespace cuda {
namespace {

constexpr int NT = 256;

struct ScaleArgs {
  double* G = nullptr;
  int64_t count = 0;
  int p = 0;
  const int64_t* counts = nullptr;
  int64_t r_const = 0;
  bool sized = false;  // matrix i is r_i x r_i (r_i = min(counts[i], p)), stored densely at the start of its slot
  double eps = 0.0;
  int variant = 0;
  const int32_t* flags = nullptr;
  double* S = nullptr;
  double* evals = nullptr;
};

// Shared layout: [A (p*p, shared path only)] d[p] e[p] u[p] w[p] red[33].
__host__ __device__ inline size_t scale_smem_bytes(int p, bool shared_matrix) {
  return dyn_smem_bytes(sizeof(double) * ((shared_matrix ? (size_t)p * p : 0) + 4 * (size_t)p + 33));
}

// Householder reduction of the full symmetric n x n matrix A (row-major, overwritten) to tridiagonal (d, e),
// e[i] coupling i and i+1. Each step: u = x - alpha e1 from the row right of the diagonal, p = beta A22 u,
// w = p - (beta/2)(uᵀp) u, A22 -= u wᵀ + w uᵀ. A warp owns a row in the matrix-vector product and the update,
// so global and shared reads alike are contiguous.
// A and the vectors are double* on the GPU (template parameters for the emulation's checked shared pointers).
template <typename MatPtr, typename VecPtr>
__device__ void tridiagonalise(MatPtr A, int n, VecPtr d, VecPtr e, VecPtr u, VecPtr w, VecPtr red) {
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nw = blockDim.x >> 5;
  for (int k = 0; k + 2 < n; ++k) {
    const int m = n - k - 1;
    const auto rowk = A + (size_t)k * n + k + 1;
    double part = 0.0;
    for (int j = tid; j < m; j += blockDim.x) {
      const double x = rowk[j];
      u[j] = x;
      if (j > 0) part += x * x;
    }
    const double tail2 = block_reduce<Red::Sum>(part, red);  // its barriers publish u
    const double x0 = u[0];
    if (tid == 0) d[k] = A[(size_t)k * n + k];
    if (tail2 == 0.0) {  // already tridiagonal in this row
      if (tid == 0) e[k] = x0;
      __syncthreads();  // u is rewritten by the next step
      continue;
    }
    const double norm = sqrt(tail2 + x0 * x0);
    const double alpha = x0 >= 0.0 ? -norm : norm;
    const double u0 = x0 - alpha;
    const double beta = 2.0 / (tail2 + u0 * u0);
    __syncthreads();  // everyone has read u[0]
    if (tid == 0) {
      e[k] = alpha;
      u[0] = u0;
    }
    __syncthreads();
    double upart = 0.0;
    for (int i = warp; i < m; i += nw) {
      const auto row = A + (size_t)(k + 1 + i) * n + (k + 1);
      double s = 0.0;
      for (int j = lane; j < m; j += 32) s += row[j] * u[j];
      s = warp_sum(s) * beta;
      if (lane == 0) {
        w[i] = s;
        upart += u[i] * s;
      }
    }
    const double up = block_reduce<Red::Sum>(upart, red);  // also publishes w
    const double kk = 0.5 * beta * up;
    for (int i = tid; i < m; i += blockDim.x) w[i] -= kk * u[i];
    __syncthreads();
    for (int i = warp; i < m; i += nw) {
      auto row = A + (size_t)(k + 1 + i) * n + (k + 1);
      const double ui = u[i], wi = w[i];
      for (int j = lane; j < m; j += 32) row[j] -= ui * w[j] + wi * u[j];
    }
    __syncthreads();
  }
  if (tid == 0) {
    if (n >= 2) {
      d[n - 2] = A[(size_t)(n - 2) * n + (n - 2)];
      e[n - 2] = A[(size_t)(n - 1) * n + (n - 2)];
    }
    d[n - 1] = A[(size_t)(n - 1) * n + (n - 1)];
    e[n - 1] = 0.0;
  }
  __syncthreads();
}

// All eigenvalues of the tridiagonal (d, e2) into out[0..n) (ascending, times 2^ex): groups of g lanes
// share an eigenvalue (g = 1 for n >= blockDim / 2). Every thread runs the same rounds and steps, inactive
// lanes included, so the full-warp ballots never diverge.
template <typename VecPtr>  // double* on the GPU
__device__ void multisect_all(VecPtr d, VecPtr e2, int n, const Bracket& br, int ex, VecPtr out) {
  const int g = multisect_lanes(n, blockDim.x);
  const int lane = threadIdx.x & 31, sub = lane & (g - 1);
  const unsigned group = (g == 32 ? 0xffffffffu : ((1u << g) - 1u)) << (lane & ~(g - 1));
  const int groups = blockDim.x / g, gi = threadIdx.x / g;
  const int rounds = (n + groups - 1) / groups;
  const int steps = multisect_steps(br.hi - br.lo, br.abstol, g);
  for (int rr = 0; rr < rounds; ++rr) {
    const int k = gi + rr * groups;
    const bool active = k < n;
    double lo = br.lo, hi = br.hi;
    for (int it = 0; it < steps; ++it) {
      const bool below = active && sturm_count(d, e2, n, multisect_point(lo, hi, sub, g), br.pivmin) <= k;
      const int q = __popc(__ballot_sync(0xffffffffu, below) & group);
      multisect_update(lo, hi, q, g);
    }
    if (active && sub == 0) out[k] = ldexp(0.5 * (lo + hi), ex);
  }
}

// Launch bounds (256, 2): without a minimum ptxas squeezed this kernel into 64 registers with spills in the
// multisection loop; two blocks per SM leaves it ~100 registers and no spills.
template <bool SHARED>
__global__ void __launch_bounds__(NT, 2) scale_kernel(const ScaleArgs a) {
  extern __shared__ double sm[];
  const int tid = threadIdx.x;
  for (int64_t i = blockIdx.x; i < a.count; i += gridDim.x) {
    const int64_t rc = a.counts ? a.counts[i] : a.r_const;
    const int r = (int)(rc < a.p ? rc : a.p);
    const int p = a.sized ? r : a.p;  // this matrix's size
    const bool bad = a.flags && a.flags[i] != 0;
    if (((r < 2 || bad) && !a.evals) || p < 1) {  // no spectrum wanted (or none there): skip the solver
      if (a.evals)
        for (int j = tid; j < a.p; j += blockDim.x) a.evals[i * a.p + j] = 0.0;
      if (tid == 0) a.S[i] = nan("");
      continue;
    }
    double* Gi = a.G + i * (int64_t)a.p * a.p;
    auto A = SHARED ? sm : Gi;  // auto: the host emulation's checked shared pointers (csrc/cuda/emu)
    auto d = SHARED ? sm + (size_t)p * p : sm;
    auto e = d + p;
    auto u = e + p;
    auto w = u + p;
    auto red = w + p;

    // Scale by a power of two near 1/max|a_ij| (exact, undone on the eigenvalues), so that no square in the
    // reduction over- or underflows whatever the data's units, indefinite matrices included. ldexp per entry,
    // not a multiplication by 2^-ex: for a matrix of denormals 2^-ex itself overflows.
    double amax = 0.0;
    for (size_t j = tid; j < (size_t)p * p; j += blockDim.x) amax = fmax(amax, fabs(Gi[j]));
    amax = block_reduce<Red::Max>(amax, red);
    int ex = 0;
    if (amax > 0.0 && isfinite(amax)) frexp(amax, &ex);
    for (size_t j = tid; j < (size_t)p * p; j += blockDim.x) A[j] = ldexp(Gi[j], -ex);
    __syncthreads();

    tridiagonalise(A, p, d, e, u, w, red);

    // Gershgorin bounds of the tridiagonal matrix; w becomes e².
    double gl = 1e300, gu = -1e300, me2 = 0.0;
    for (int j = tid; j < p; j += blockDim.x) {
      const double el = j > 0 ? fabs(e[j - 1]) : 0.0, er = j + 1 < p ? fabs(e[j]) : 0.0;
      gl = fmin(gl, d[j] - el - er);
      gu = fmax(gu, d[j] + el + er);
      w[j] = e[j] * e[j];
      me2 = fmax(me2, w[j]);
    }
    gl = block_reduce<Red::Min>(gl, red);
    gu = block_reduce<Red::Max>(gu, red);
    me2 = block_reduce<Red::Max>(me2, red);
    const Bracket br = bracket_from(gl, gu, me2, p);
    multisect_all(d, w, p, br, ex, u);  // ascending eigenvalues into u
    __syncthreads();

    if (a.evals)  // descending; a sized matrix's spectrum is padded with the zeros of the larger side
      for (int j = tid; j < a.p; j += blockDim.x) a.evals[i * a.p + j] = j < p ? u[p - 1 - j] : 0.0;
    if (r < 2 || bad) {
      if (tid == 0) a.S[i] = nan("");
      __syncthreads();
      continue;
    }
    // Entropy of the top r energies (descending order: u[p-1-j]).
    double tot = 0.0;
    for (int j = tid; j < r; j += blockDim.x) tot += energy_of(u[p - 1 - j], a.variant);
    tot = energy_total(block_reduce<Red::Sum>(tot, red), a.eps, a.variant);
    double h = 0.0;
    for (int j = tid; j < r; j += blockDim.x) h += neg_plogp(energy_of(u[p - 1 - j], a.variant) / tot);
    h = block_reduce<Red::Sum>(h, red);
    if (tid == 0) a.S[i] = h / log((double)r);
    __syncthreads();  // shared scratch is reused by the next matrix
  }
}

}  // namespace

bool device_supported(int device) {
  if (device < 0 || device >= device_count()) return false;
  int prev = 0;
  if (cudaGetDevice(&prev) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  bool ok = cudaSetDevice(device) == cudaSuccess;
  if (ok) {
    // Fails with cudaErrorNoKernelImageForDevice / InvalidDeviceFunction when no image fits the device.
    cudaFuncAttributes attr;
    ok = cudaFuncGetAttributes(&attr, scale_kernel<true>) == cudaSuccess;
  }
  (void)cudaGetLastError();
  (void)cudaSetDevice(prev);
  return ok;
}

void scale_from_gram(double* G, int64_t count, int64_t p, const int64_t* counts, int64_t r_const, bool sized_by_counts,
                     double eps, int variant, const int32_t* flags, double* S, double* evals, std::uintptr_t stream,
                     int device) {
  require(count >= 0, "count: expected >= 0");
  require(p >= 1 && p <= kMaxEighSize, "p: expected 1.." + std::to_string(kMaxEighSize) + ", got " + std::to_string(p));
  require(variant == 0 || variant == 1, "variant: expected 0 (paper) or 1 (official)");
  require(eps >= 0.0, "eps: expected >= 0");
  require(G && S, "G and S: pointers must not be null");
  require(counts || r_const >= 0, "r: expected counts or r >= 0");
  require(counts || !sized_by_counts, "counts: required for matrices sized by counts");
  if (count == 0) return;
  require_device(device);
  DeviceGuard guard(device);
  const cudaStream_t s = as_stream(stream);

  int optin = 0;
  AUV_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  ScaleArgs a;
  a.G = G;
  a.count = count;
  a.p = (int)p;
  a.counts = counts;
  a.r_const = r_const;
  a.sized = sized_by_counts;
  a.eps = eps;
  a.variant = variant;
  a.flags = flags;
  a.S = S;
  a.evals = evals;
  const unsigned grid = (unsigned)std::min<int64_t>(count, (int64_t)1 << 30);
  const size_t shared_bytes = scale_smem_bytes((int)p, true);
  if (shared_bytes <= (size_t)optin) {
    if (shared_bytes > 48 * 1024)
      AUV_CUDA_CHECK(cudaFuncSetAttribute(scale_kernel<true>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          (int)shared_bytes));
    scale_kernel<true><<<grid, NT, shared_bytes, s>>>(a);
    AUV_CUDA_CHECK_LAUNCH("scale_kernel<shared>");
  } else {
    const size_t bytes = scale_smem_bytes((int)p, false);
    require(bytes <= (size_t)optin, "p: too large for this device's shared memory");
    if (bytes > 48 * 1024)
      AUV_CUDA_CHECK(
          cudaFuncSetAttribute(scale_kernel<false>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes));
    scale_kernel<false><<<grid, NT, bytes, s>>>(a);
    AUV_CUDA_CHECK_LAUNCH("scale_kernel<global>");
  }
}

}  // namespace cuda
}  // namespace auvcore
