// A host emulation of the slice of CUDA the auvcore kernels use, for tests on machines without a GPU
// (csrc/cuda/emu/build_emu.py builds csrc/cuda/*.cu with g++ against this header after rewriting `<<<...>>>`
// launches into emu::launch calls). Every CUDA thread is a std::thread; a block's threads run together,
// blocks one after another, so `__shared__` variables become statics. __syncthreads is a std::barrier and
// warp shuffles go through a per-warp exchange buffer with its own barrier. It checks the kernels' logic
// (indexing, barriers, reductions, centring, the solver), not their speed or the memory model of a GPU.
#pragma once
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

#define __host__
#define __device__
#define __global__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3() = default;
  dim3(unsigned x_, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

typedef int cudaError_t;
constexpr cudaError_t cudaSuccess = 0;
struct CUstream_st;
typedef CUstream_st* cudaStream_t;
struct CUmemPool_st;
typedef CUmemPool_st* cudaMemPool_t;
enum cudaDeviceAttr {
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
  cudaDevAttrMemoryPoolsSupported = 115
};
enum cudaMemAllocationType { cudaMemAllocationTypePinned = 1 };
enum cudaMemLocationType { cudaMemLocationTypeDevice = 1 };
enum cudaMemPoolAttr { cudaMemPoolAttrReleaseThreshold = 4 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
enum cudaMemoryType { cudaMemoryTypeUnregistered = 0, cudaMemoryTypeHost = 1, cudaMemoryTypeDevice = 2,
                      cudaMemoryTypeManaged = 3 };
struct cudaMemLocation { cudaMemLocationType type; int id; };
struct cudaMemPoolProps { cudaMemAllocationType allocType; int handleTypes; cudaMemLocation location; };
struct cudaPointerAttributes { cudaMemoryType type; int device; };

namespace emu {
// Shared-memory opt-in limit the emulated device reports; tests lower it to force the global-memory solver.
inline int& optin_bytes() { static int v = 227 * 1024; return v; }
inline int& launches() { static int v = 0; return v; }

struct Block {
  std::barrier<> bar;
  std::vector<std::unique_ptr<std::barrier<>>> warp_bar;
  std::vector<double> xbuf;  // shuffle exchange, one slot per thread
  std::vector<unsigned char> dyn;
  explicit Block(int n, size_t smem) : bar(n), xbuf(n), dyn(smem + 64) {
    for (int w = 0; w < (n + 31) / 32; ++w) warp_bar.emplace_back(new std::barrier<>(std::min(32, n - 32 * w)));
  }
};
inline thread_local dim3 t_threadIdx, t_blockIdx, t_blockDim, t_gridDim;
inline thread_local Block* t_block = nullptr;

template <typename T>
T* dyn_smem() { return reinterpret_cast<T*>(t_block->dyn.data()); }

template <typename K, typename... A>
void launch(K kernel, dim3 grid, dim3 block, size_t smem, cudaStream_t, A... args) {
  ++launches();
  const int n = (int)(block.x * block.y * block.z);
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        Block blk(n, smem);
        std::vector<std::thread> th;
        th.reserve(n);
        for (int t = 0; t < n; ++t)
          th.emplace_back([&, t] {
            t_threadIdx = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
            t_blockIdx = dim3(bx, by, bz);
            t_blockDim = block;
            t_gridDim = grid;
            t_block = &blk;
            kernel(args...);
            // A finished thread no longer holds up barriers (as on the GPU, where exited threads do not count).
            blk.bar.arrive_and_drop();
            blk.warp_bar[t / 32]->arrive_and_drop();
          });
        for (auto& x : th) x.join();
      }
}
template <typename K, typename... A>
void launch(K kernel, unsigned grid, unsigned block, size_t smem, cudaStream_t s, A... args) {
  launch(kernel, dim3(grid), dim3(block), smem, s, args...);
}
template <typename K, typename... A>
void launch(K kernel, dim3 grid, int block, size_t smem, cudaStream_t s, A... args) {
  launch(kernel, grid, dim3((unsigned)block), smem, s, args...);
}
template <typename K, typename... A>
void launch(K kernel, unsigned grid, int block, size_t smem, cudaStream_t s, A... args) {
  launch(kernel, dim3(grid), dim3((unsigned)block), smem, s, args...);
}
}  // namespace emu

#define threadIdx (::emu::t_threadIdx)
#define blockIdx (::emu::t_blockIdx)
#define blockDim (::emu::t_blockDim)
#define gridDim (::emu::t_gridDim)

inline void __syncthreads() { ::emu::t_block->bar.arrive_and_wait(); }

template <typename T>
inline T __shfl_xor_sync(unsigned, T v, int lane_mask, int width = 32) {
  static_assert(std::is_same<T, double>::value, "emulated shuffles carry doubles");
  emu::Block* b = emu::t_block;
  const int tid = (int)threadIdx.x, warp = tid / 32, lane = tid % 32;
  b->xbuf[tid] = v;
  b->warp_bar[warp]->arrive_and_wait();
  const int src = warp * 32 + ((lane ^ lane_mask) & (width - 1)) + (lane & ~(width - 1));
  const T r = b->xbuf[src];
  b->warp_bar[warp]->arrive_and_wait();
  return r;
}

inline unsigned __ballot_sync(unsigned mask, bool pred) {
  emu::Block* b = emu::t_block;
  const int tid = (int)threadIdx.x, warp = tid / 32;
  b->xbuf[tid] = pred ? 1.0 : 0.0;
  b->warp_bar[warp]->arrive_and_wait();
  unsigned bits = 0;
  for (int l = 0; l < 32 && warp * 32 + l < (int)b->xbuf.size(); ++l)
    if (b->xbuf[warp * 32 + l] != 0.0) bits |= 1u << l;
  b->warp_bar[warp]->arrive_and_wait();
  return bits & mask;
}
inline int __popc(unsigned x) { return __builtin_popcount(x); }

template <typename T>
inline T __ldg(const T* p) { return *p; }

inline double atomicAdd(double* p, double v) { return std::atomic_ref<double>(*p).fetch_add(v); }
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
  return std::atomic_ref<unsigned long long>(*p).fetch_add(v);
}
inline unsigned atomicAdd(unsigned* p, unsigned v) { return std::atomic_ref<unsigned>(*p).fetch_add(v); }
inline int atomicOr(int* p, int v) { return std::atomic_ref<int>(*p).fetch_or(v); }
inline unsigned long long atomicOr(unsigned long long* p, unsigned long long v) {
  return std::atomic_ref<unsigned long long>(*p).fetch_or(v);
}
inline unsigned long long atomicMin(unsigned long long* p, unsigned long long v) {
  std::atomic_ref<unsigned long long> r(*p);
  unsigned long long old = r.load();
  while (v < old && !r.compare_exchange_weak(old, v)) {
  }
  return old;
}
inline unsigned long long atomicCAS(unsigned long long* p, unsigned long long cmp, unsigned long long v) {
  std::atomic_ref<unsigned long long>(*p).compare_exchange_strong(cmp, v);
  return cmp;
}
inline double __longlong_as_double(long long x) { double d; std::memcpy(&d, &x, 8); return d; }
inline float __uint_as_float(unsigned x) { float f; std::memcpy(&f, &x, 4); return f; }

// Host "runtime": device memory is host memory, streams are ignored (everything runs in order).
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline const char* cudaGetErrorName(cudaError_t) { return "cudaErrorEmulated"; }
inline const char* cudaGetErrorString(cudaError_t) { return "emulated error"; }
inline cudaError_t cudaGetDeviceCount(int* n) { *n = 1; return cudaSuccess; }
inline cudaError_t cudaGetDevice(int* d) { *d = 0; return cudaSuccess; }
inline cudaError_t cudaSetDevice(int) { return cudaSuccess; }
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr a, int) {
  *v = a == cudaDevAttrMultiProcessorCount ? 4 : a == cudaDevAttrMaxSharedMemoryPerBlockOptin ? emu::optin_bytes() : 1;
  return cudaSuccess;
}
inline cudaError_t cudaMemsetAsync(void* p, int v, size_t n, cudaStream_t) { std::memset(p, v, n); return cudaSuccess; }
inline cudaError_t cudaMemPoolCreate(cudaMemPool_t* p, const cudaMemPoolProps*) {
  *p = reinterpret_cast<cudaMemPool_t>(1);
  return cudaSuccess;
}
inline cudaError_t cudaMemPoolSetAttribute(cudaMemPool_t, cudaMemPoolAttr, void*) { return cudaSuccess; }
inline cudaError_t cudaMallocFromPoolAsync(void** p, size_t n, cudaMemPool_t, cudaStream_t) {
  *p = std::calloc(1, n + 64);
  return *p ? cudaSuccess : 2;
}
inline cudaError_t cudaMalloc(void** p, size_t n) { *p = std::calloc(1, n + 64); return *p ? cudaSuccess : 2; }
inline cudaError_t cudaFreeAsync(void* p, cudaStream_t) { std::free(p); return cudaSuccess; }
inline cudaError_t cudaFree(void* p) { std::free(p); return cudaSuccess; }
inline cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
inline cudaError_t cudaPointerGetAttributes(cudaPointerAttributes* a, const void*) {
  a->type = cudaMemoryTypeDevice;
  a->device = 0;
  return cudaSuccess;
}
struct cudaFuncAttributes { int maxThreadsPerBlock; };
template <typename F>
inline cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* a, F) { a->maxThreadsPerBlock = 1024; return cudaSuccess; }
template <typename F>
inline cudaError_t cudaFuncSetAttribute(F, cudaFuncAttribute, int v) {
  return v <= emu::optin_bytes() ? cudaSuccess : 1;
}

using std::isfinite;
using std::isnan;
