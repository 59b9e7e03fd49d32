// Host-side plumbing shared by the CUDA ops: device discovery, device guard, workspace pool.
#include <cuda_runtime.h>

#include <mutex>
#include <vector>

#include "auvcore/scale_cuda.h"
#include "common_cuda.cuh"

namespace auvcore {
namespace cuda {

int device_count() {
  // Without a driver (or without a GPU) the runtime answers with an error code: that is "no device", not a
  // failure, so the CPU ops of the same module keep working.
  int n = 0;
  cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return n;
}

void require_device(int device) {
  int n = 0;
  cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();
    throw std::runtime_error(std::string("auvcore: no usable CUDA device (") + cudaGetErrorName(err) + ": " +
                             cudaGetErrorString(err) + ")");
  }
  if (device < 0 || device >= n)
    throw ArgumentError("device: CUDA device " + std::to_string(device) + " does not exist (" + std::to_string(n) +
                        " visible)");
}

DeviceGuard::DeviceGuard(int device) {
  // Set even when cudaGetDevice already answers `device`: our (static) runtime's notion and the driver's
  // current context, which torch's runtime may have moved, need not agree until we set it.
  AUV_CUDA_CHECK(cudaGetDevice(&prev_));
  AUV_CUDA_CHECK(cudaSetDevice(device));
  switched_ = prev_ != device;
}

DeviceGuard::~DeviceGuard() {
  if (switched_) (void)cudaSetDevice(prev_);
}

namespace {
std::mutex g_pool_mutex;
std::vector<cudaMemPool_t> g_pools;   // one per device, created on first use
std::vector<int> g_pool_state;        // 0 unknown, 1 pool ready, 2 no pool support

// Returns null when the device has no stream-ordered allocator (then plain cudaMalloc is used).
cudaMemPool_t pool_for(int device) {
  std::lock_guard<std::mutex> lock(g_pool_mutex);
  if ((int)g_pools.size() <= device) {
    g_pools.resize(device + 1, nullptr);
    g_pool_state.resize(device + 1, 0);
  }
  if (g_pool_state[device] == 0) {
    int supported = 0;
    AUV_CUDA_CHECK(cudaDeviceGetAttribute(&supported, cudaDevAttrMemoryPoolsSupported, device));
    if (!supported) {
      g_pool_state[device] = 2;
    } else {
      cudaMemPoolProps props = {};
      props.allocType = cudaMemAllocationTypePinned;
      props.location.type = cudaMemLocationTypeDevice;
      props.location.id = device;
      cudaMemPool_t pool;
      AUV_CUDA_CHECK(cudaMemPoolCreate(&pool, &props));
      // Keep freed workspace mapped between calls (up to 1 GiB); without it every call would map afresh.
      uint64_t keep = uint64_t(1) << 30;
      AUV_CUDA_CHECK(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &keep));
      g_pools[device] = pool;
      g_pool_state[device] = 1;
    }
  }
  return g_pool_state[device] == 1 ? g_pools[device] : nullptr;
}
}  // namespace

void* Workspace::alloc(size_t bytes) {
  if (n_ == (int)(sizeof(ptrs_) / sizeof(ptrs_[0]))) throw std::logic_error("auvcore: too many workspace blocks");
  void* p = nullptr;
  cudaMemPool_t pool = pool_for(device_);
  pooled_ = pool != nullptr;
  if (pool)
    AUV_CUDA_CHECK(cudaMallocFromPoolAsync(&p, bytes, pool, stream_));
  else
    AUV_CUDA_CHECK(cudaMalloc(&p, bytes));
  ptrs_[n_++] = p;
  return p;
}

Workspace::~Workspace() {
  const bool pooled = pooled_;
  if (!pooled && n_ > 0) (void)cudaStreamSynchronize(stream_);  // plain cudaFree must not race the kernels
  for (int i = 0; i < n_; ++i) {
    if (pooled)
      (void)cudaFreeAsync(ptrs_[i], stream_);
    else
      (void)cudaFree(ptrs_[i]);
  }
}

}  // namespace cuda
}  // namespace auvcore
