// A host emulation of the slice of CUDA the auvcore kernels use, for tests on machines without a GPU
// (csrc/cuda/emu/build_emu.py builds csrc/cuda/*.cu with g++ against this header after rewriting `<<<...>>>`
// launches into emu::launch calls). Every CUDA thread is a std::thread; a block's threads run together,
// blocks one after another, so `__shared__` variables become statics. __syncthreads is a std::barrier and
// warp shuffles go through a per-warp exchange buffer with its own barrier. It checks the kernels' logic
// (indexing, barriers, reductions, centring, the solver), not their speed or the memory model of a GPU.
//
// Shared memory is checked as compute-sanitizer memcheck checks it on a GPU: build_emu.py turns every
// `extern __shared__ T x[]` and every `__shared__ T x[...]` into an emu::Smem<T>, a pointer that carries its
// allocation's bounds through indexing, arithmetic and casts and throws emu::SmemError (naming the kernel, the
// array, the offset, the thread and the block) on an access outside the allocation or misaligned for its type.
// A dynamic allocation is held to more: nvcc declares `extern __shared__` arrays `.align 16` and ptxas takes
// the object's size to be a multiple of that, so it may widen an 8-byte access into a 16-byte LDS.128/STS.128
// (issue 22: weights_kernel read g[p-1] and g[p] in one LDS.128 when p % 4 == 1). Every access to a dynamic
// allocation must therefore lie in 16-byte granules that the allocation covers whole. An Smem does not
// convert to a raw pointer, so a kernel cannot slip an unchecked access past the emulation: code that passes a
// shared array to a helper takes the pointer type as a template parameter (or `auto`), which is the raw
// pointer on the GPU.
#pragma once
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#define __host__
#define __device__
#define __global__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))

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
  size_t dyn_bytes;          // the dynamic shared memory the launch asked for
  std::mutex err_mu;
  std::string error;         // the first thread's SmemError (or other exception), rethrown by launch
  explicit Block(int n, size_t smem) : bar(n), xbuf(n), dyn(smem + 64), dyn_bytes(smem) {
    for (int w = 0; w < (n + 31) / 32; ++w) warp_bar.emplace_back(new std::barrier<>(std::min(32, n - 32 * w)));
  }
};
inline thread_local dim3 t_threadIdx, t_blockIdx, t_blockDim, t_gridDim;
inline thread_local Block* t_block = nullptr;
inline thread_local const char* t_kernel = "?";

// What compute-sanitizer memcheck would report as an invalid or misaligned __shared__ access.
struct SmemError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// The granule that ptxas may widen an access to a dynamic shared array to (its `.align 16`).
constexpr size_t kDynSmemGranule = 16;

[[noreturn]] inline void smem_fail(const char* what, const char* name, bool dynamic, size_t bytes, ptrdiff_t off,
                                   size_t size, const char* why) {
  throw SmemError(std::string("emulated memcheck: ") + what + " __shared__ access of " + std::to_string(size) +
                  " bytes at offset " + std::to_string(off) + " of " + (dynamic ? "dynamic" : "static") +
                  " shared array '" + name + "' (" + std::to_string(bytes) + " bytes) in kernel " + t_kernel +
                  ", thread (" + std::to_string(t_threadIdx.x) + "," + std::to_string(t_threadIdx.y) + "," +
                  std::to_string(t_threadIdx.z) + ") of block (" + std::to_string(t_blockIdx.x) + "," +
                  std::to_string(t_blockIdx.y) + "," + std::to_string(t_blockIdx.z) + ")" + why);
}

// A pointer into one shared allocation that checks every access against it (see the header comment). T may be
// an array type (a row of a static 2-D array): indexing then gives an Smem of the row, bounded by the whole
// allocation as memcheck bounds it. Built from a raw pointer it is an unchecked view of global memory, so that
// `SHARED ? sm : global_ptr` keeps one type.
template <typename T>
class Smem {
 public:
  Smem() = default;
  Smem(std::nullptr_t) {}
  Smem(T* global) : raw_(reinterpret_cast<unsigned char*>(global)) {}  // NOLINT: implicit, see above
  Smem(unsigned char* base, size_t bytes, ptrdiff_t off, const char* name, bool dynamic, size_t align = 16)
      : base_(base), bytes_(bytes), off_(off), name_(name), dynamic_(dynamic), align_(align) {}
  template <typename U, typename = std::enable_if_t<std::is_same_v<std::remove_const_t<T>, U>>>
  Smem(const Smem<U>& o)  // T* -> const T*
      : raw_(o.raw_), base_(o.base_), bytes_(o.bytes_), off_(o.off_), name_(o.name_), dynamic_(o.dynamic_),
        align_(o.align_) {}

  decltype(auto) operator[](int64_t i) const {
    if constexpr (std::is_array_v<T>) {
      using Row = std::remove_extent_t<T>;
      if (!base_) return Smem<Row>(*reinterpret_cast<T*>(raw_ + i * (ptrdiff_t)sizeof(T)));
      return Smem<Row>(base_, bytes_, off_ + i * (ptrdiff_t)sizeof(T), name_, dynamic_, align_);
    } else {
      return *at(i * (ptrdiff_t)sizeof(T));
    }
  }
  T& operator*() const { return *at(0); }
  Smem operator+(int64_t n) const { return moved(n); }
  Smem operator-(int64_t n) const { return moved(-n); }
  friend Smem operator+(int64_t n, const Smem& p) { return p.moved(n); }
  Smem& operator+=(int64_t n) { return *this = moved(n); }
  Smem& operator-=(int64_t n) { return *this = moved(-n); }
  Smem& operator++() { return *this = moved(1); }
  Smem& operator--() { return *this = moved(-1); }
  Smem operator++(int) { Smem o = *this; *this = moved(1); return o; }
  Smem operator--(int) { Smem o = *this; *this = moved(-1); return o; }
  ptrdiff_t operator-(const Smem& o) const { return (addr() - o.addr()) / (ptrdiff_t)sizeof(T); }
  bool operator==(const Smem& o) const { return addr() == o.addr(); }
  bool operator!=(const Smem& o) const { return addr() != o.addr(); }
  bool operator<(const Smem& o) const { return addr() < o.addr(); }
  explicit operator bool() const { return base_ || raw_; }

  template <typename U>
  Smem<U> cast() const {  // reinterpret_cast<U*>(p)
    Smem<U> r;
    r.raw_ = raw_;
    r.base_ = base_, r.bytes_ = bytes_, r.off_ = off_, r.name_ = name_, r.dynamic_ = dynamic_, r.align_ = align_;
    return r;
  }
  // The checked address of the element at byte offset `rel` from here (also for atomics on shared memory).
  T* at(ptrdiff_t rel) const {
    if (!base_) return reinterpret_cast<T*>(raw_ + rel);
    const ptrdiff_t o = off_ + rel;
    constexpr size_t size = sizeof(T);
    if (o < 0 || o + (ptrdiff_t)size > (ptrdiff_t)bytes_) smem_fail("invalid", name_, dynamic_, bytes_, o, size, "");
    if (o % (ptrdiff_t)alignof(T) != 0) smem_fail("misaligned", name_, dynamic_, bytes_, o, size, "");
    if (dynamic_) {
      const size_t end = ((size_t)o + size + kDynSmemGranule - 1) / kDynSmemGranule * kDynSmemGranule;
      if (end > bytes_)
        smem_fail("invalid", name_, dynamic_, bytes_, o, size,
                  (": its 16-byte granule ends at " + std::to_string(end) +
                   ", past the allocation; ptxas may widen this access to a 16-byte LDS/STS (nvcc aligns "
                   "extern __shared__ to 16), which reads past the end on the GPU: round the dynamic shared "
                   "size up to a multiple of 16").c_str());
    }
    return reinterpret_cast<T*>(base_ + o);
  }

 private:
  template <typename U>
  friend class Smem;
  Smem moved(int64_t n) const {
    Smem r = *this;
    if (base_) r.off_ += n * (ptrdiff_t)sizeof(T);
    else r.raw_ += n * (ptrdiff_t)sizeof(T);
    return r;
  }
  ptrdiff_t addr() const { return base_ ? (ptrdiff_t)(base_ + off_) : (ptrdiff_t)raw_; }

  unsigned char* raw_ = nullptr;   // unchecked (global memory) view
  unsigned char* base_ = nullptr;  // the shared allocation
  size_t bytes_ = 0;
  ptrdiff_t off_ = 0;              // bytes from base_; may leave the allocation until it is accessed
  const char* name_ = "";
  bool dynamic_ = false;
  size_t align_ = 16;  // what the GPU guarantees of the allocation's start: its `__align__`, else 16 (see static_smem)
 public:
  // For checks that need more than an element's alignment (the wmma loads' 32 bytes): the byte offset within the
  // allocation and the allocation's guaranteed alignment; a raw (global) pointer gives its address and 256.
  std::pair<ptrdiff_t, size_t> placement() const {
    return base_ ? std::make_pair(off_, align_) : std::make_pair((ptrdiff_t)raw_, (size_t)256);
  }
};

// `extern __shared__ T name[]`: the block's dynamic allocation, as large as the launch asked.
template <typename T>
Smem<T> dyn_smem(const char* name) {
  return Smem<T>(t_block->dyn.data(), t_block->dyn_bytes, 0, name, true);
}
// `__shared__ [__align__(A)] T name[N]...`: a static array of the kernel. Its start is taken to be aligned to A,
// else only to 16 bytes (ptxas places shared variables at their type's alignment; 16 is what the matrix and
// vector accesses of an undeclared array can count on), whatever the host happened to give the static.
template <typename T, size_t N>
Smem<T> static_smem(T (&a)[N], const char* name, size_t align = 16) {
  return Smem<T>(reinterpret_cast<unsigned char*>(&a), sizeof(a), 0, name, false, align);
}

// reinterpret_cast as build_emu.py rewrites it: a shared pointer stays checked.
template <typename T>
struct is_smem : std::false_type {};
template <typename T>
struct is_smem<Smem<T>> : std::true_type {};
template <typename To, typename From>
auto ptr_cast(From&& x) {
  if constexpr (is_smem<std::decay_t<From>>::value) {
    static_assert(std::is_pointer_v<To>, "a shared pointer casts to a pointer type");
    return x.template cast<std::remove_pointer_t<To>>();
  } else {
    return reinterpret_cast<To>(x);
  }
}

template <typename K, typename... A>
void launch(const char* name, K kernel, dim3 grid, dim3 block, size_t smem, cudaStream_t, A... args) {
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
            t_kernel = name;
            try {
              kernel(args...);
            } catch (const std::exception& e) {
              // The thread stops here (as a faulting thread stops the kernel on the GPU); the first report wins.
              std::lock_guard<std::mutex> lock(blk.err_mu);
              if (blk.error.empty()) blk.error = e.what();
            }
            // A finished thread no longer holds up barriers (as on the GPU, where exited threads do not count).
            blk.bar.arrive_and_drop();
            blk.warp_bar[t / 32]->arrive_and_drop();
          });
        for (auto& x : th) x.join();
        if (!blk.error.empty()) throw SmemError(blk.error);
      }
}
template <typename K, typename... A>
void launch(const char* name, K kernel, unsigned grid, unsigned block, size_t smem, cudaStream_t s, A... args) {
  launch(name, kernel, dim3(grid), dim3(block), smem, s, args...);
}
template <typename K, typename... A>
void launch(const char* name, K kernel, dim3 grid, int block, size_t smem, cudaStream_t s, A... args) {
  launch(name, kernel, grid, dim3((unsigned)block), smem, s, args...);
}
template <typename K, typename... A>
void launch(const char* name, K kernel, unsigned grid, int block, size_t smem, cudaStream_t s, A... args) {
  launch(name, kernel, dim3(grid), dim3((unsigned)block), smem, s, args...);
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
template <typename T, typename V>
inline T atomicAdd(const emu::Smem<T>& p, V v) { return atomicAdd(p.at(0), (T)v); }
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
