// Fused DUO loss on the GPU (docs/method.md §3), mirroring csrc/cpu/duo_cpu.cpp: the forward reduces logits,
// noise logits and targets to the six sums per (b, c) in one pass; the backward is one elementwise pass from
// dL/d(sums). The per-voxel formulas are the CPU kernel's, from auvcore/duo.h.
//
// Grid: one block of 256 threads per (b, c, chunk of 8192 voxels), a flat 1-D grid; consecutive threads
// read consecutive voxels (coalesced for unit strides, any strides work).
//
// Determinism: no float atomics. Each thread accumulates its 32 voxels of the chunk in the compute type
// (float for f16/bf16/f32, double for f64, as the CPU's lanes), the block reduces the thread partials in
// double with a fixed shuffle tree and writes the chunk's six sums to a workspace; a second kernel sums
// each (b, c)'s chunk partials in double in a fixed order. The result is a function of the inputs and the
// shapes only: bit-identical run to run (and independent of the stream or the device's load).
//
// Errors: a NaN/Inf logit or a target out of range sets a bit of status[0] (integer atomicOr) and the
// smallest bad target index goes to status[1] (integer atomicMin); the Python side reads them once after
// the launch and raises the CPU kernel's errors.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstring>
#include <string>

#include "auvcore/duo.h"
#include "auvcore/duo_cuda.h"
#include "auvcore/scale_cuda.h"
#include "common_cuda.cuh"

namespace auvcore {
namespace cuda {
namespace {

constexpr int kThreads = 256;                       // threads per block of the forward and backward
constexpr int kPerThread = 32;                      // voxels per thread and chunk
constexpr int64_t kChunk = (int64_t)kThreads * kPerThread;
constexpr int kReduceThreads = 128;

struct F16 {};
struct BF16 {};

// The compute type: float for every input but float64.
template <typename In>
struct Math {
  using T = float;
};
template <>
struct Math<double> {
  using T = double;
};

template <typename In>
__device__ __forceinline__ typename Math<In>::T load_x(const void* p, int64_t off);
template <>
__device__ __forceinline__ float load_x<float>(const void* p, int64_t off) {
  return __ldg(static_cast<const float*>(p) + off);
}
template <>
__device__ __forceinline__ double load_x<double>(const void* p, int64_t off) {
  return __ldg(static_cast<const double*>(p) + off);
}
template <>
__device__ __forceinline__ float load_x<F16>(const void* p, int64_t off) {
  return __half2float(__ushort_as_half(__ldg(static_cast<const unsigned short*>(p) + off)));
}
template <>
__device__ __forceinline__ float load_x<BF16>(const void* p, int64_t off) {
  return __uint_as_float((unsigned)__ldg(static_cast<const unsigned short*>(p) + off) << 16);
}

__host__ __device__ __forceinline__ uint32_t bits_of(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
#endif
}

// float -> IEEE half / bfloat16 bits, round to nearest even (NaN stays NaN, overflow gives Inf), in integer
// arithmetic so that the GPU and the host emulation write the same bits.
__host__ __device__ __forceinline__ unsigned short half_bits(float f) {
  uint32_t x = bits_of(f);
  const unsigned short sign = (unsigned short)((x >> 16) & 0x8000u);
  x &= 0x7fffffffu;
  if (x >= 0x7f800000u) return sign | 0x7c00u | (x > 0x7f800000u ? 0x200u : 0u);
  if (x >= 0x477ff000u) return sign | 0x7c00u;  // >= 65520 rounds to Inf
  if (x < 0x38800000u) {                        // below 2^-14: a subnormal half (or 0)
    if (x < 0x33000000u) return sign;           // below 2^-25
    const uint32_t e = x >> 23, m = (x & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126u - e;  // 14..24
    uint32_t r = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1u), halfway = 1u << (shift - 1u);
    if (rem > halfway || (rem == halfway && (r & 1u))) ++r;
    return (unsigned short)(sign | r);
  }
  x -= 112u << 23;  // rebias the exponent
  return (unsigned short)(sign | ((x + 0x0fffu + ((x >> 13) & 1u)) >> 13));
}
__host__ __device__ __forceinline__ unsigned short bf16_bits(float f) {
  const uint32_t x = bits_of(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((x >> 16) | 0x40u);
  return (unsigned short)((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

template <typename In>
__device__ __forceinline__ void store_x(void* p, int64_t off, typename Math<In>::T v);
template <>
__device__ __forceinline__ void store_x<float>(void* p, int64_t off, float v) {
  static_cast<float*>(p)[off] = v;
}
template <>
__device__ __forceinline__ void store_x<double>(void* p, int64_t off, double v) {
  static_cast<double*>(p)[off] = v;
}
template <>
__device__ __forceinline__ void store_x<F16>(void* p, int64_t off, float v) {
  static_cast<unsigned short*>(p)[off] = half_bits(v);
}
template <>
__device__ __forceinline__ void store_x<BF16>(void* p, int64_t off, float v) {
  static_cast<unsigned short*>(p)[off] = bf16_bits(v);
}

// Targets: the dtype is a uniform runtime switch (the passes are memory bound; a template per target dtype
// would multiply the kernels by seven). Class indices as int64, soft targets as the compute type, as the CPU
// kernel converts them.
__device__ __forceinline__ int64_t load_label(const void* p, int dt, int64_t off) {
  switch (static_cast<DType>(dt)) {
    case DType::I64: return (int64_t)__ldg(static_cast<const long long*>(p) + off);
    case DType::I32: return __ldg(static_cast<const int*>(p) + off);
    case DType::I16: return __ldg(static_cast<const short*>(p) + off);
    case DType::I8: return __ldg(static_cast<const signed char*>(p) + off);
    case DType::U8: return __ldg(static_cast<const unsigned char*>(p) + off);
    case DType::F32: return (int64_t)__ldg(static_cast<const float*>(p) + off);
    default: return (int64_t)__ldg(static_cast<const double*>(p) + off);
  }
}
template <typename T>
__device__ __forceinline__ T load_soft(const void* p, int dt, int64_t off) {
  switch (static_cast<DType>(dt)) {
    case DType::F32: return (T)__ldg(static_cast<const float*>(p) + off);
    case DType::F64: return (T)__ldg(static_cast<const double*>(p) + off);
    case DType::I64: return (T)__ldg(static_cast<const long long*>(p) + off);
    case DType::I32: return (T)__ldg(static_cast<const int*>(p) + off);
    case DType::I16: return (T)__ldg(static_cast<const short*>(p) + off);
    case DType::I8: return (T)__ldg(static_cast<const signed char*>(p) + off);
    default: return (T)__ldg(static_cast<const unsigned char*>(p) + off);
  }
}

struct KernelArgs {
  const void *z = nullptr, *n = nullptr, *y = nullptr;
  int64_t zs[3] = {}, ns[3] = {}, ys[3] = {};  // element strides over (b, c, t); labels: ys[1] = 0
  void *dz = nullptr, *dn = nullptr;
  int64_t dzs[3] = {}, dns[3] = {};
  const double* grad = nullptr;                // backward: [B, C, kDuoSums]
  double* partial = nullptr;                   // forward: [B·C·nchunk, kDuoSums]
  unsigned long long* status = nullptr;        // forward: [kDuoStatus]
  int64_t K = 0, N = 0, C = 0, c0 = 0, nchunk = 0;
  int ydtype = 0, labels = 0, preset = 0;
  double tau = 0.5;
};

template <typename In>
__global__ void __launch_bounds__(kThreads) duo_forward_kernel(const KernelArgs a) {
  using T = typename Math<In>::T;
  __shared__ double red[33];
  const int64_t u = blockIdx.x, chunk = u % a.nchunk, bc = u / a.nchunk;
  const int64_t b = bc / a.C, c = a.c0 + bc % a.C;
  const int64_t t0 = chunk * kChunk, t1 = t0 + kChunk < a.N ? t0 + kChunk : a.N;
  const int64_t zb = b * a.zs[0] + c * a.zs[1], nb = b * a.ns[0] + c * a.ns[1], yb = b * a.ys[0] + c * a.ys[1];
  const T tau = (T)a.tau;
  const DuoPreset preset = static_cast<DuoPreset>(a.preset);
  T acc[kDuoSums];
#pragma unroll
  for (int k = 0; k < kDuoSums; ++k) acc[k] = T(0);
  unsigned bad = 0;
  unsigned long long first_bad = ~0ull;
  for (int64_t t = t0 + threadIdx.x; t < t1; t += kThreads) {
    const T zv = load_x<In>(a.z, zb + t * a.zs[2]), nv = load_x<In>(a.n, nb + t * a.ns[2]);
    T yv;
    bool ok;
    if (a.labels) {
      const int64_t l = load_label(a.y, a.ydtype, yb + t * a.ys[2]);
      ok = l >= 0 && l < a.K;
      yv = l == c ? T(1) : T(0);
    } else {
      yv = load_soft<T>(a.y, a.ydtype, yb + t * a.ys[2]);
      ok = yv >= T(0) && yv <= T(1);  // false for NaN
    }
    if (!isfinite(zv)) bad |= 1u;
    if (!isfinite(nv)) bad |= 2u;
    if (!ok) {
      bad |= 4u;
      const unsigned long long idx =
          (unsigned long long)(a.labels ? b * a.N + t : (b * a.K + c) * a.N + t);
      first_bad = idx < first_bad ? idx : first_bad;
    }
    const duo::Voxel<T> v = duo::voxel<T>(zv, nv, yv, preset, tau, true);
    T terms[kDuoSums];
    duo::sum_terms(v, zv, terms);
#pragma unroll
    for (int k = 0; k < kDuoSums; ++k) acc[k] += terms[k];
  }
  if (bad) {  // rare: integer atomics, whose result does not depend on their order
    atomicOr(a.status, (unsigned long long)bad);
    if (bad & 4u) atomicMin(a.status + 1, first_bad);
  }
#pragma unroll
  for (int k = 0; k < kDuoSums; ++k) {
    const double s = block_reduce<Red::Sum>((double)acc[k], red);
    if (threadIdx.x == 0) a.partial[u * kDuoSums + k] = s;
  }
}

// sums[bc] = Σ over the (b, c)'s chunks of the partials: thread j sums chunks j, j + 128, ... in order, then
// the fixed block tree.
__global__ void __launch_bounds__(kReduceThreads) duo_reduce_kernel(const double* partial, int64_t nchunk,
                                                                     double* sums) {
  __shared__ double red[33];
  const int64_t bc = blockIdx.x;
  const double* p = partial + bc * nchunk * kDuoSums;
  double s[kDuoSums] = {0, 0, 0, 0, 0, 0};
  for (int64_t j = threadIdx.x; j < nchunk; j += kReduceThreads)
#pragma unroll
    for (int k = 0; k < kDuoSums; ++k) s[k] += p[j * kDuoSums + k];
#pragma unroll
  for (int k = 0; k < kDuoSums; ++k) {
    const double r = block_reduce<Red::Sum>(s[k], red);
    if (threadIdx.x == 0) sums[bc * kDuoSums + k] = r;
  }
}

template <typename In>
__global__ void __launch_bounds__(kThreads) duo_backward_kernel(const KernelArgs a) {
  using T = typename Math<In>::T;
  const int64_t u = blockIdx.x, chunk = u % a.nchunk, bk = u / a.nchunk;  // every class: excluded ones get 0
  const int64_t b = bk / a.K, c = bk % a.K;
  const int64_t t0 = chunk * kChunk, t1 = t0 + kChunk < a.N ? t0 + kChunk : a.N;
  const int64_t ob = b * a.dzs[0] + c * a.dzs[1], onb = b * a.dns[0] + c * a.dns[1];
  if (c < a.c0) {
    for (int64_t t = t0 + threadIdx.x; t < t1; t += kThreads) {
      store_x<In>(a.dz, ob + t * a.dzs[2], T(0));
      if (a.dn) store_x<In>(a.dn, onb + t * a.dns[2], T(0));
    }
    return;
  }
  const double* g = a.grad + (b * a.C + (c - a.c0)) * kDuoSums;
  const T gb = (T)g[kBCE], gsy = (T)g[kSigY], gs = (T)g[kSig], gy = (T)g[kY], gg = (T)g[kG], gg2 = (T)g[kG2];
  const int64_t zb = b * a.zs[0] + c * a.zs[1], nb = b * a.ns[0] + c * a.ns[1], yb = b * a.ys[0] + c * a.ys[1];
  const T tau = (T)a.tau;
  const DuoPreset preset = static_cast<DuoPreset>(a.preset);
  const bool paper = preset == DuoPreset::Paper;
  for (int64_t t = t0 + threadIdx.x; t < t1; t += kThreads) {
    const T zv = load_x<In>(a.z, zb + t * a.zs[2]), nv = load_x<In>(a.n, nb + t * a.ns[2]);
    const T yv = a.labels ? (load_label(a.y, a.ydtype, yb + t * a.ys[2]) == c ? T(1) : T(0))
                          : load_soft<T>(a.y, a.ydtype, yb + t * a.ys[2]);
    const duo::Voxel<T> v = duo::voxel<T>(zv, nv, yv, preset, tau, false);
    store_x<In>(a.dz, ob + t * a.dzs[2], duo::grad_z(v, gb, gsy, gs));
    if (a.dn)  // the official preset's ỹ is detached: zeros
      store_x<In>(a.dn, onb + t * a.dns[2], paper ? duo::grad_n(v, zv, tau, gb, gsy, gy, gg, gg2) : T(0));
  }
}

// ---- host side -------------------------------------------------------------------------------------------

// The arguments both passes share, checked; the grid's extent in units of (b, class, chunk).
KernelArgs kernel_args(const DuoArgs& a, int64_t classes) {
  check_duo_args(a, /*half_ok=*/true);
  for (auto d : a.z.shape) require(d >= 1, "seg_logits: every dimension must be >= 1");
  KernelArgs k;
  k.z = a.z.data();
  k.n = a.n.data();
  k.y = a.y.data();
  for (int i = 0; i < 3; ++i) {
    k.zs[i] = a.z.strides[i];
    k.ns[i] = a.n.strides[i];
  }
  if (a.labels) {
    k.ys[0] = a.y.strides[0];
    k.ys[1] = 0;
    k.ys[2] = a.y.strides[1];
  } else {
    for (int i = 0; i < 3; ++i) k.ys[i] = a.y.strides[i];
  }
  k.K = a.z.shape[1];
  k.N = a.z.shape[2];
  k.C = k.K - a.c0;
  k.c0 = a.c0;
  k.nchunk = (k.N + kChunk - 1) / kChunk;
  k.ydtype = (int)a.y.dtype;
  k.labels = a.labels;
  k.preset = (int)a.preset;
  k.tau = a.tau;
  require(a.z.shape[0] * classes * k.nchunk < ((int64_t)1 << 31) && a.z.shape[0] * classes < ((int64_t)1 << 31),
          "seg_logits: too many voxels for one call on CUDA");
  return k;
}

template <typename F>
void with_dtype(DType dt, F&& f) {
  switch (dt) {
    case DType::F64: f(double{}); break;
    case DType::F32: f(float{}); break;
    case DType::F16: f(F16{}); break;
    case DType::BF16: f(BF16{}); break;
    default: throw ArgumentError("seg_logits: expected float16, bfloat16, float32 or float64");
  }
}

}  // namespace

void duo_forward(const DuoArgs& a, double* sums, int64_t* status, std::uintptr_t stream, int device) {
  KernelArgs k = kernel_args(a, a.z.shape[1] - a.c0);
  require(sums != nullptr && status != nullptr, "sums and status: output pointers must not be null");
  const int64_t BC = a.z.shape[0] * k.C, units = BC * k.nchunk;

  require_device(device);
  DeviceGuard guard(device);
  require_device_pointer(k.z, "seg_logits");
  require_device_pointer(k.n, "noise_logits");
  require_device_pointer(k.y, "target");
  const cudaStream_t s = as_stream(stream);
  Workspace ws(device, s);
  k.partial = ws.alloc_n<double>(units * kDuoSums);
  k.status = reinterpret_cast<unsigned long long*>(status);
  AUV_CUDA_CHECK(cudaMemsetAsync(status, 0, sizeof(int64_t), s));
  AUV_CUDA_CHECK(cudaMemsetAsync(status + 1, 0xff, sizeof(int64_t), s));  // -1: no bad target
  with_dtype(a.z.dtype, [&](auto tag) {
    using In = decltype(tag);
    duo_forward_kernel<In><<<(unsigned)units, kThreads, 0, s>>>(k);
    AUV_CUDA_CHECK_LAUNCH("duo_forward_kernel");
  });
  duo_reduce_kernel<<<(unsigned)BC, kReduceThreads, 0, s>>>(k.partial, k.nchunk, sums);
  AUV_CUDA_CHECK_LAUNCH("duo_reduce_kernel");
}

void duo_backward(const DuoArgs& a, const double* grad_sums, const ArrayView& dz, const ArrayView& dn,
                  std::uintptr_t stream, int device) {
  KernelArgs k = kernel_args(a, a.z.shape[1]);
  require(grad_sums != nullptr, "grad_sums: this buffer is required (got a null pointer)");
  require(dz.ptr != 0, "dz: this buffer is required (got a null pointer)");
  require(dz.shape == a.z.shape && dz.dtype == a.z.dtype && dz.dim() == 3, "dz: must match seg_logits");
  require(dn.ptr == 0 || (dn.shape == a.z.shape && dn.dtype == a.z.dtype && dn.dim() == 3),
          "dn: must match noise_logits");
  k.grad = grad_sums;
  k.dz = reinterpret_cast<void*>(dz.ptr);
  k.dn = reinterpret_cast<void*>(dn.ptr);
  for (int i = 0; i < 3; ++i) {
    k.dzs[i] = dz.strides[i];
    k.dns[i] = dn.ptr ? dn.strides[i] : 0;
  }
  const int64_t units = a.z.shape[0] * k.K * k.nchunk;

  require_device(device);
  DeviceGuard guard(device);
  require_device_pointer(k.z, "seg_logits");
  require_device_pointer(k.n, "noise_logits");
  require_device_pointer(k.y, "target");
  require_device_pointer(k.dz, "dz");
  if (k.dn) require_device_pointer(k.dn, "dn");
  const cudaStream_t s = as_stream(stream);
  with_dtype(a.z.dtype, [&](auto tag) {
    using In = decltype(tag);
    duo_backward_kernel<In><<<(unsigned)units, kThreads, 0, s>>>(k);
    AUV_CUDA_CHECK_LAUNCH("duo_backward_kernel");
  });
}

}  // namespace cuda
}  // namespace auvcore
