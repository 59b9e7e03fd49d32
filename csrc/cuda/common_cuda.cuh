// Shared host and device helpers of the CUDA kernels: error checks, the device guard, stream-ordered
// workspace, block reductions.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "auvcore/array.h"

namespace auvcore {
namespace cuda {

[[noreturn]] inline void throw_cuda(cudaError_t err, const char* what, const char* file, int line) {
  // Clear the sticky-free error state so the next call does not report this one again.
  (void)cudaGetLastError();
  throw std::runtime_error(std::string("auvcore CUDA error in ") + what + " (" + file + ":" + std::to_string(line) +
                           "): " + cudaGetErrorName(err) + ": " + cudaGetErrorString(err));
}

#define AUV_CUDA_CHECK(expr)                                                      \
  do {                                                                            \
    cudaError_t auv_err_ = (expr);                                                \
    if (auv_err_ != cudaSuccess) ::auvcore::cuda::throw_cuda(auv_err_, #expr, __FILE__, __LINE__); \
  } while (0)

// A kernel launch reports configuration errors through cudaGetLastError.
#define AUV_CUDA_CHECK_LAUNCH(name)                                                \
  do {                                                                            \
    cudaError_t auv_err_ = cudaGetLastError();                                    \
    if (auv_err_ != cudaSuccess) ::auvcore::cuda::throw_cuda(auv_err_, name, __FILE__, __LINE__); \
  } while (0)

// Makes `device` current for the op and restores the caller's device afterwards: torch's runtime and ours
// share the driver's per-thread context, so leaving it switched would move the caller's work.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device);
  ~DeviceGuard();
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int prev_ = -1;
  bool switched_ = false;
};

// Checks that a device exists and the op can run there; throws a clear RuntimeError otherwise.
void require_device(int device);

// Stream-ordered scratch memory from a pool of our own (cudaMallocFromPoolAsync), so the default pool's
// settings stay the caller's and freed blocks are reused across calls instead of returned at every sync.
class Workspace {
 public:
  Workspace(int device, cudaStream_t stream) : device_(device), stream_(stream) {}
  ~Workspace();
  Workspace(const Workspace&) = delete;
  Workspace& operator=(const Workspace&) = delete;
  void* alloc(size_t bytes);
  template <typename T>
  T* alloc_n(int64_t n) {
    return static_cast<T*>(alloc(sizeof(T) * static_cast<size_t>(n > 0 ? n : 1)));
  }

 private:
  int device_;
  cudaStream_t stream_;
  void* ptrs_[8] = {};
  int n_ = 0;
  bool pooled_ = true;
};

inline cudaStream_t as_stream(std::uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

// Every dynamic shared-memory size a launch asks for, rounded up to whole 16-byte granules. nvcc declares each
// `extern __shared__` array `.align 16`, and ptxas takes an object's size to be a multiple of its alignment, so
// it may merge the loads of neighbouring elements into one 16-byte LDS.128 that runs past an allocation that
// ends mid-granule: weights_kernel read g[p-1] and g[p] together when p % 4 == 1, past the 8p bytes asked for
// (compute-sanitizer: "Invalid __shared__ read of size 16", issue 22). The host emulation enforces this rule.
constexpr size_t kSmemGranule = 16;
__host__ __device__ constexpr size_t dyn_smem_bytes(size_t bytes) {
  return (bytes + kSmemGranule - 1) / kSmemGranule * kSmemGranule;
}

#ifdef __CUDACC__
constexpr int kWarp = 32;

__device__ __forceinline__ double warp_sum(double v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ double warp_min(double v) {
  for (int o = 16; o > 0; o >>= 1) v = fmin(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ __forceinline__ double warp_max(double v) {
  for (int o = 16; o > 0; o >>= 1) v = fmax(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Block-wide reductions; every thread of the block calls them and gets the result. `red` is 33 doubles of
// shared memory (a double* on the GPU; its type is a parameter so the host emulation can pass a bounds-checked
// pointer). Safe to call back to back: the slot read at the end (red[32]) is written only after the next
// call's first barrier.
enum class Red { Sum, Min, Max };
template <Red R>
__device__ __forceinline__ double warp_red(double v) {
  return R == Red::Sum ? warp_sum(v) : R == Red::Min ? warp_min(v) : warp_max(v);
}
template <Red R, typename SharedPtr>
__device__ double block_reduce(double v, SharedPtr red) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
  v = warp_red<R>(v);
  if (lane == 0) red[warp] = v;
  __syncthreads();
  if (warp == 0) {
    const double ident = R == Red::Sum ? 0.0 : R == Red::Min ? __longlong_as_double(0x7ff0000000000000LL)
                                                             : -__longlong_as_double(0x7ff0000000000000LL);
    double x = lane < nw ? red[lane] : ident;
    x = warp_red<R>(x);
    if (lane == 0) red[32] = x;
  }
  __syncthreads();
  return red[32];
}
#endif

// A host-side check before a launch: `p` must be memory the kernel can read (device or managed), else an
// ArgumentError naming the argument instead of an illegal-address error later.
inline void require_device_pointer(const void* p, const char* name) {
  cudaPointerAttributes attr;
  cudaError_t err = cudaPointerGetAttributes(&attr, p);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();
    throw ArgumentError(std::string(name) + ": not a pointer the CUDA runtime knows (" + cudaGetErrorString(err) + ")");
  }
  if (attr.type != cudaMemoryTypeDevice && attr.type != cudaMemoryTypeManaged)
    throw ArgumentError(std::string(name) + ": expected CUDA device memory");
}

}  // namespace cuda
}  // namespace auvcore
