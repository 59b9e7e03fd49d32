// Batched eigenvalues AND eigenvectors of symmetric p x p float64 matrices (the Grams the forward builds), for
// the CUDA backward of S (dS/dM̄ = 2 U diag(∂S/∂λ) Uᵀ M̄ needs U): one block per matrix, one launch for the
// batch, no host synchronisation, bit-identical from run to run.
//
// Method: parallel cyclic Jacobi (two-sided, round-robin ordering) on the matrix scaled by a power of two, the
// twin of the CPU's fallback `jacobi` in csrc/cpu/eigh_cpu.cpp (same rotation, same skip test, same sweep cap).
// Why Jacobi and not Householder + inverse iteration (bench/CUDA_NOTES.md, "Eigenvectors"): it is backward
// stable with orthogonal vectors by construction, whatever the clustering (the centred Gram's zero eigenvalue,
// the many zeros of rank-deficient maps, repeated eigenvalues need no special case), and each round is a
// fixed, fully parallel pattern, where inverse iteration needs cluster detection and re-orthogonalisation.
//
// A round rotates the h = n/2 disjoint pairs (j, k) of the round-robin schedule at once: A ← Jᵀ A J with J the
// product of the h rotations. Entry (a, b) of the new A depends only on the 2 x 2 block of the old A at the
// pairs of a and b, so a thread updates one 2 x 2 block (P, Q), P ≤ Q, in place: no two threads touch the same
// entry, and two barriers per round suffice. V (stored transposed: row j = eigenvector j) has its rows j, k
// rotated alongside. A is kept packed (upper triangle, n(n+1)/2 doubles) so that A and V fit in shared memory
// together up to p = 138 on an H100/H200 (227 KB opt-in; a 128 x 128 full matrix alone is 128 KB);
// beyond that V, then A too, live in a global scratch slot per block (the same code, other pointers).
#include <cuda_runtime.h>

#include <algorithm>
#include <cfloat>
#include <string>

#include "auvcore/scale_cuda.h"
#include "common_cuda.cuh"

namespace auvcore {
namespace cuda {
namespace {

constexpr int kMaxThreads = 1024;
constexpr int kMaxSweeps = 100;  // the CPU's cap; a sweep without a rotation ends the loop long before

struct EigArgs {
  const double* G = nullptr;  // [count, p, p], read only
  int64_t count = 0;
  int p = 0;
  int n = 0;                  // p rounded up to even: an odd p gets a zero row/column that never rotates
  double* evals = nullptr;    // [count, p] descending
  double* evecs = nullptr;    // [count, p, p], row j = eigenvector of evals[j]
  double* scratch = nullptr;  // per block: [A packed (unless in shared)][V n x n (unless in shared)]
};

__host__ __device__ inline int64_t packed_size(int n) { return (int64_t)n * (n + 1) / 2; }

// Doubles per block in the global scratch slot.
__host__ __device__ inline int64_t scratch_doubles(int n, bool a_shared, bool v_shared) {
  return (a_shared ? 0 : packed_size(n)) + (v_shared ? 0 : (int64_t)n * n);
}

// Shared layout: [A packed (a_shared)] [V n*n (v_shared)] c[h] s[h] t[h] red[33] | int: pj[h] pk[h] rot[h] rank[n].
__host__ __device__ inline size_t eig_smem_bytes(int n, bool a_shared, bool v_shared) {
  const size_t h = (size_t)n / 2;
  // whole 16-byte granules: ptxas may widen the last access to 16 bytes (dyn_smem_bytes, common_cuda.cuh)
  return dyn_smem_bytes(
      sizeof(double) * ((a_shared ? (size_t)packed_size(n) : 0) + (v_shared ? (size_t)n * n : 0) + 3 * h + 33) +
      sizeof(int) * (3 * h + (size_t)n));
}

// Index of (a, b), a <= b, in the packed upper triangle of an n x n matrix (row a starts after rows 0..a-1).
// int: n <= 256 (kMaxEigenpairsSize), and 64-bit products cost several instructions on the GPU.
__device__ __forceinline__ int tri(int a, int b, int n) { return a * (2 * n - a - 1) / 2 + b; }
__device__ __forceinline__ int sym(int a, int b, int n) { return a <= b ? tri(a, b, n) : tri(b, a, n); }

// Steps a (quotient, remainder) position by blockDim: a thread's flat index e = q·m + r advances by
// dq·m + dr (dr < m) without the integer division per element that e / m, e % m would cost (~20 instructions
// for a run-time m) in the loops of a round.
__device__ __forceinline__ void advance(int& q, int& r, int dq, int dr, int m) {
  q += dq;
  r += dr;
  if (r >= m) {
    r -= m;
    ++q;
  }
}

// Pair i of round r of the round-robin ("circle") schedule on n (even) indices: n - 1 rounds pair every index
// with every other exactly once. Index n - 1 stays put, the others turn one place per round.
__device__ __forceinline__ void round_pair(int r, int i, int n, int& j, int& k) {
  const int m = n - 1;
  int x, y;
  if (i == 0) {
    x = r;
    y = m;
  } else {
    x = (r + i) % m;
    y = (r - i + m) % m;
  }
  j = x < y ? x : y;
  k = x < y ? y : x;
}

// The rotation of csrc/cpu/eigh_cpu.cpp's jacobi: J (J_jj = J_kk = c, J_jk = s, J_kj = -s) with (JᵀAJ)_jk = 0,
// the smaller angle; t = tan θ gives the new diagonal a_jj - t a_jk, a_kk + t a_jk.
__device__ __forceinline__ void jacobi_rotation(double ajj, double akk, double ajk, double& c, double& s, double& t) {
  const double theta = (akk - ajj) / (2.0 * ajk);
  t = fabs(theta) > 1e150 ? 0.5 / theta : copysign(1.0, theta) / (fabs(theta) + hypot(theta, 1.0));
  c = 1.0 / sqrt(t * t + 1.0);
  s = t * c;
}

// Threads per block: about 8 of the round's h·n rotated V entries each (and fewer 2 x 2 blocks of A), a
// multiple of the warp, 64..1024. A round is a fixed amount of work between two barriers and a matrix has the
// SM to itself (its shared memory allows one block), so a large p takes the most warps to hide latency with.
inline int eig_threads(int n) {
  const int want = ((n / 2) * n / 8 + 31) / 32 * 32;
  return std::min(kMaxThreads, std::max(64, want));
}

template <bool AS, bool VS>
__global__ void __launch_bounds__(kMaxThreads) eigenpairs_kernel(const EigArgs a) {
  extern __shared__ double sm[];
  const int tid = threadIdx.x, p = a.p, n = a.n, h = n / 2;
  double* slot = a.scratch ? a.scratch + (int64_t)blockIdx.x * scratch_doubles(n, AS, VS) : nullptr;
  auto next = sm;
  auto A = AS ? next : slot;
  if (AS) next += packed_size(n);
  auto V = VS ? next : slot + (AS ? 0 : packed_size(n));
  if (VS) next += (int64_t)n * n;
  auto rc = next;
  auto rs = rc + h;
  auto rt = rs + h;
  auto red = rt + h;
  auto pj = reinterpret_cast<int*>(red + 33);
  auto pk = pj + h;
  auto rot = pk + h;
  auto rank = rot + h;
  const int T = blockDim.x, hb = h + 1;
  const int a_q0 = tid / hb, a_r0 = tid % hb, a_dq = T / hb, a_dr = T % hb;  // the folded triangle of blocks
  const int v_q0 = tid / n, v_r0 = tid % n, v_dq = T / n, v_dr = T % n;      // rows x columns of V

  for (int64_t i = blockIdx.x; i < a.count; i += gridDim.x) {
    const double* Gi = a.G + i * (int64_t)p * p;
    double* Ei = a.evals + i * p;
    double* Vi = a.evecs + i * (int64_t)p * p;

    // max |g_ab|, with NaN and Inf mapped to +Inf (fmax alone would drop a NaN).
    double amax = 0.0;
    for (int64_t e = tid; e < (int64_t)p * p; e += blockDim.x) {
      const double v = fabs(Gi[e]);
      amax = fmax(amax, v <= DBL_MAX ? v : __longlong_as_double(0x7ff0000000000000LL));
    }
    amax = block_reduce<Red::Max>(amax, red);
    if (!(amax <= DBL_MAX)) {  // a non-finite matrix (its S is NaN or an error already): NaN eigenpairs
      for (int e = tid; e < p; e += blockDim.x) Ei[e] = nan("");
      for (int64_t e = tid; e < (int64_t)p * p; e += blockDim.x) Vi[e] = nan("");
      continue;  // block-uniform; the shared scratch was not touched since block_reduce's last barrier
    }
    // Scaled by a power of two near 1/max|g| (exact, undone on the eigenvalues) so that no product in the
    // rotations over- or underflows whatever the data's units; ldexp per entry as in eigh_cuda.cu. Symmetrised
    // (the mean of both triangles; exact for the symmetric Grams the forward writes).
    int ex = 0;
    if (amax > 0.0) frexp(amax, &ex);
    double fro = 0.0;
    for (int e = tid; e < n * n; e += blockDim.x) {
      const int r = e / n, c = e % n;
      V[e] = r == c ? 1.0 : 0.0;
      if (c < r) continue;
      double v = 0.0;
      if (c < p) {
        v = 0.5 * (ldexp(Gi[(int64_t)r * p + c], -ex) + ldexp(Gi[(int64_t)c * p + r], -ex));
        fro += (r == c ? 1.0 : 2.0) * v * v;
      }
      A[tri(r, c, n)] = v;
    }
    fro = block_reduce<Red::Sum>(fro, red);  // its barriers also publish A and V
    // Off-diagonal entries below `tiny` are rounding noise of the scale ‖A‖ (the CPU's test): eigenvalues to
    // within ~eps ‖A‖ as Householder gives; the relative test keeps small eigenvalues' digits where it can.
    const double tiny = DBL_EPSILON * sqrt(fro) / (double)p;

    for (int sweep = 0; sweep < kMaxSweeps; ++sweep) {
      int rotations = 0;
      for (int r = 0; r + 1 < n; ++r) {
        // The round's rotations, one thread per pair, from the pivots as the previous round left them.
        for (int P = tid; P < h; P += blockDim.x) {
          int j, k;
          round_pair(r, P, n, j, k);
          double c = 1.0, s = 0.0, t = 0.0;
          int doit = 0;
          if (k < p) {  // never the padding index
            const double ajk = A[tri(j, k, n)], ajj = A[tri(j, j, n)], akk = A[tri(k, k, n)];
            if (!(fabs(ajk) <= tiny || fabs(ajk) <= 0.5 * DBL_EPSILON * sqrt(fabs(ajj * akk)))) {
              jacobi_rotation(ajj, akk, ajk, c, s, t);
              doit = 1;
              ++rotations;
            }
          }
          pj[P] = j;
          pk[P] = k;
          rot[P] = doit;
          rc[P] = c;
          rs[P] = s;
          rt[P] = t;
        }
        __syncthreads();
        // A ← JᵀAJ by 2 x 2 blocks (P, Q), P ≤ Q: the h(h+1)/2 blocks of the triangle folded into rows of h + 1
        // (row r of the triangle beside row h-1-r), so that consecutive threads take consecutive blocks.
        const int nblocks = h * (h + 1) / 2;
        for (int e = tid, fr = a_q0, fc = a_r0; e < nblocks; e += T, advance(fr, fc, a_dq, a_dr, hb)) {
          int P, Q;
          if (fc < h - fr) {
            P = fr;
            Q = fr + fc;
          } else {
            P = h - 1 - fr;
            Q = fc - 1;
          }
          const int rp = rot[P], rq = rot[Q];
          if (!rp && !rq) continue;
          const int j = pj[P], k = pk[P];
          if (P == Q) {  // the pivot block: the new diagonal from t, the pivot exactly 0
            const int jj = tri(j, j, n), kk = tri(k, k, n), jk = tri(j, k, n);
            const double ajk = A[jk], t = rt[P];
            A[jj] -= t * ajk;
            A[kk] += t * ajk;
            A[jk] = 0.0;
            continue;
          }
          const int l = pj[Q], m = pk[Q];
          const double c1 = rc[P], s1 = rs[P], c2 = rc[Q], s2 = rs[Q];
          const int jl = sym(j, l, n), jm = sym(j, m, n), kl = sym(k, l, n), km = sym(k, m, n);
          const double x00 = A[jl], x01 = A[jm], x10 = A[kl], x11 = A[km];
          // Rows by J_Pᵀ, then columns by J_Q (a pair that does not rotate has c = 1, s = 0: exact identity).
          const double y00 = c1 * x00 - s1 * x10, y01 = c1 * x01 - s1 * x11;
          const double y10 = s1 * x00 + c1 * x10, y11 = s1 * x01 + c1 * x11;
          A[jl] = c2 * y00 - s2 * y01;
          A[jm] = s2 * y00 + c2 * y01;
          A[kl] = c2 * y10 - s2 * y11;
          A[km] = s2 * y10 + c2 * y11;
        }
        // V ← V J: rows j, k of the stored Vᵀ; consecutive threads take consecutive columns.
        for (int e = tid, P = v_q0, col = v_r0; e < h * n; e += T, advance(P, col, v_dq, v_dr, n)) {
          if (!rot[P]) continue;
          auto vj = V + pj[P] * n;
          auto vk = V + pk[P] * n;
          const double c = rc[P], s = rs[P], x = vj[col], y = vk[col];
          vj[col] = c * x - s * y;
          vk[col] = s * x + c * y;
        }
        __syncthreads();
      }
      if (block_reduce<Red::Sum>((double)rotations, red) == 0.0) break;  // a sweep without a rotation
    }

    // Descending order (ties by index: deterministic), eigenvalues unscaled; row x of V goes to its rank.
    for (int x = tid; x < p; x += blockDim.x) {
      const double dx = A[tri(x, x, n)];
      int rk = 0;
      for (int y = 0; y < p; ++y) {
        const double dy = A[tri(y, y, n)];
        rk += (dy > dx) || (dy == dx && y < x);
      }
      rank[x] = rk;
      Ei[rk] = ldexp(dx, ex);
    }
    __syncthreads();
    for (int64_t e = tid; e < (int64_t)p * p; e += blockDim.x) {
      const int x = (int)(e / p), col = (int)(e % p);
      Vi[(int64_t)rank[x] * p + col] = V[(int64_t)x * n + col];
    }
    __syncthreads();  // A, V and rank are rewritten for the next matrix
  }
}

template <bool AS, bool VS>
void launch(const EigArgs& a, unsigned grid, cudaStream_t s) {
  const size_t bytes = eig_smem_bytes(a.n, AS, VS);
  if (bytes > 48 * 1024)
    AUV_CUDA_CHECK(cudaFuncSetAttribute(eigenpairs_kernel<AS, VS>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        (int)bytes));
  eigenpairs_kernel<AS, VS><<<grid, eig_threads(a.n), bytes, s>>>(a);
  AUV_CUDA_CHECK_LAUNCH("eigenpairs_kernel");
}

}  // namespace

void gram_eigenpairs(const double* G, int64_t count, int64_t p, double* evals, double* evecs, std::uintptr_t stream,
                int device) {
  require(count >= 0, "count: expected >= 0");
  require(p >= 1 && p <= kMaxEigenpairsSize, "p: expected 1.." + std::to_string(kMaxEigenpairsSize) +
                                                 " for the CUDA eigenpairs kernel, got " + std::to_string(p));
  if (count == 0) return;  // before the pointer check: an empty torch tensor may have a null data pointer
  require(G && evals && evecs, "G, evals and evecs: pointers must not be null");
  require_device(device);
  DeviceGuard guard(device);
  const cudaStream_t s = as_stream(stream);
  int optin = 0;
  AUV_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));

  EigArgs a;
  a.G = G;
  a.count = count;
  a.p = (int)p;
  a.n = (int)(p + (p & 1));
  a.evals = evals;
  a.evecs = evecs;
  if (eig_smem_bytes(a.n, true, true) <= (size_t)optin) {  // p <= 138 on an H100/H200, <= 116 on an A100
    launch<true, true>(a, (unsigned)std::min<int64_t>(count, (int64_t)1 << 30), s);
    return;
  }
  // V (and A when even its packed triangle does not fit) in a global scratch slot per block; as many blocks
  // as can run at once, each walking its share of the matrices.
  int sms = 1;
  AUV_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const unsigned grid = (unsigned)std::max<int64_t>(1, std::min<int64_t>(count, 2 * (int64_t)sms));
  const bool a_shared = eig_smem_bytes(a.n, true, false) <= (size_t)optin;
  require(eig_smem_bytes(a.n, false, false) <= (size_t)optin, "p: too large for this device's shared memory");
  Workspace ws(device, s);
  a.scratch = ws.alloc_n<double>((int64_t)grid * scratch_doubles(a.n, a_shared, false));
  if (a_shared)
    launch<true, false>(a, grid, s);
  else
    launch<false, false>(a, grid, s);
}

}  // namespace cuda
}  // namespace auvcore
