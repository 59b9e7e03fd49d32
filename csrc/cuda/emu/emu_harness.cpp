// C entry points of the emulated CUDA ops (see cuda_runtime.h here), loaded by tests/test_cuda_emulated.py with ctypes.
// "Device" pointers are host pointers in the emulation.
#include <cstdint>
#include <cstring>
#include <exception>
#include <string>

#include "auvcore/array.h"
#include "auvcore/duo_cuda.h"
#include "auvcore/scale_cuda.h"
#include "cuda_runtime.h"

using namespace auvcore;

namespace {
ArrayView make_view(void* p, int dtype, int ndim, const int64_t* shape, const int64_t* strides) {
  ArrayView v;
  v.ptr = reinterpret_cast<std::uintptr_t>(p);
  v.dtype = static_cast<DType>(dtype);
  v.shape.assign(shape, shape + ndim);
  v.strides.assign(strides, strides + ndim);
  return v;
}
template <typename F>
int guarded(char* err, int errlen, F f) {
  try {
    f();
    return 0;
  } catch (const ArgumentError& e) {
    std::strncpy(err, e.what(), errlen - 1);
    return 1;
  } catch (const std::exception& e) {
    std::strncpy(err, e.what(), errlen - 1);
    return 2;
  }
}
DuoArgs duo_args(void* z, void* n, int zdtype, const int64_t* shape, const int64_t* zstrides,
                 const int64_t* nstrides, void* y, int ydtype, int ydim, const int64_t* yshape,
                 const int64_t* ystrides, int labels, int64_t c0, int preset, double tau) {
  DuoArgs a;
  a.z = make_view(z, zdtype, 3, shape, zstrides);
  a.n = make_view(n, zdtype, 3, shape, nstrides);
  a.y = make_view(y, ydtype, ydim, yshape, ystrides);
  a.labels = labels != 0;
  a.c0 = c0;
  a.preset = static_cast<DuoPreset>(preset);
  a.tau = tau;
  return a;
}

// Deliberate shared-memory faults, one per mode, so that tests/test_cuda_emu_bounds.py can show the checker
// reports each one (a checker that never fires would pass every kernel). Thread 0 of each block acts.
void probe_kernel(int mode, int n) {
  auto buf = ::emu::dyn_smem<double>("buf");
  static double st__emu[4];
  auto st = ::emu::static_smem(st__emu, "st");
  if (threadIdx.x != 0) return;
  switch (mode) {
    case 0:  // buf[0..n): in bounds, but n doubles need an allocation of whole 16-byte granules
      for (int i = 0; i < n; ++i) buf[i] = i;
      break;
    case 1:  // one element past the end of the dynamic allocation
      buf[n] = 1.0;
      break;
    case 2:  // one before its start, through pointer arithmetic
      (buf - 1)[0] = 1.0;
      break;
    case 3:  // past the end of a static array
      st[4] = 1.0;
      break;
    case 4:  // a double at byte offset 4: misaligned
      *::emu::ptr_cast<double*>(::emu::ptr_cast<char*>(buf) + 4) = 1.0;
      break;
    case 5:  // bytes after the doubles, as apply_kernel lays out its flags: in bounds
      ::emu::ptr_cast<unsigned char*>(buf + n)[0] = 1;
      break;
  }
}
}  // namespace

extern "C" {
void emu_set_optin(int bytes) { emu::optin_bytes() = bytes; }

int emu_smem_probe(int mode, int n, int64_t bytes, char* err, int errlen) {
  return guarded(err, errlen, [&] { emu::launch("probe_kernel", probe_kernel, 2u, 40, (size_t)bytes, nullptr, mode, n); });
}
int emu_launch_count() { return emu::launches(); }

int emu_decoded_gram(void* z, int dtype, int ndim, const int64_t* shape, const int64_t* strides, int mode, int center,
                     int nan_to_num, double* G, int32_t* flags, char* err, int errlen) {
  return guarded(err, errlen, [&] {
    cuda::decoded_gram(make_view(z, dtype, ndim, shape, strides), mode, center, nan_to_num, G, flags, 0, 0);
  });
}

int emu_masked_gram(void* f, int fdtype, int fndim, const int64_t* fshape, const int64_t* fstrides, void* lab,
                    int ldtype, const int64_t* lshape, const int64_t* lstrides, int64_t K, int center,
                    int nan_to_num, int smaller_side, double* G, int64_t* counts, int32_t* flags,
                    int64_t* label_error, char* err, int errlen) {
  return guarded(err, errlen, [&] {
    cuda::masked_gram(make_view(f, fdtype, fndim, fshape, fstrides), make_view(lab, ldtype, fndim - 1, lshape, lstrides),
                      K, center, nan_to_num, smaller_side, G, counts, flags, label_error, 0, 0);
  });
}

int emu_scale_from_gram(double* G, int64_t count, int64_t p, const int64_t* counts, int64_t r, int sized, double eps,
                        int variant, const int32_t* flags, double* S, double* evals, char* err, int errlen) {
  return guarded(err, errlen, [&] {
    cuda::scale_from_gram(G, count, p, counts, r, sized, eps, variant, flags, S, evals, 0, 0);
  });
}

int emu_gram_eigenpairs(const double* G, int64_t count, int64_t p, double* evals, double* evecs, char* err, int errlen) {
  return guarded(err, errlen, [&] { cuda::gram_eigenpairs(G, count, p, evals, evecs, 0, 0); });
}

int emu_scale_backward(void* z, int dtype, int ndim, const int64_t* shape, const int64_t* strides, int mode,
                       int center, double eps, int variant, const double* evals, const double* evecs,
                       const double* grad_S, void* dz, int dz_dtype, const int64_t* dz_strides, char* err, int errlen) {
  return guarded(err, errlen, [&] {
    cuda::scale_backward_decoded(make_view(z, dtype, ndim, shape, strides), mode, center, eps, variant, evals, evecs,
                                 grad_S, make_view(dz, dz_dtype, ndim, shape, dz_strides), 0, 0);
  });
}

int emu_duo_forward(void* z, void* n, int zdtype, const int64_t* shape, const int64_t* zstrides,
                    const int64_t* nstrides, void* y, int ydtype, int ydim, const int64_t* yshape,
                    const int64_t* ystrides, int labels, int64_t c0, int preset, double tau, double* sums,
                    int64_t* status, char* err, int errlen) {
  return guarded(err, errlen, [&] {
    cuda::duo_forward(duo_args(z, n, zdtype, shape, zstrides, nstrides, y, ydtype, ydim, yshape, ystrides, labels,
                               c0, preset, tau),
                      sums, status, 0, 0);
  });
}

int emu_duo_backward(void* z, void* n, int zdtype, const int64_t* shape, const int64_t* zstrides,
                     const int64_t* nstrides, void* y, int ydtype, int ydim, const int64_t* yshape,
                     const int64_t* ystrides, int labels, int64_t c0, int preset, double tau, const double* grad_sums,
                     void* dz, const int64_t* dzstrides, void* dn, const int64_t* dnstrides, char* err, int errlen) {
  return guarded(err, errlen, [&] {
    cuda::duo_backward(duo_args(z, n, zdtype, shape, zstrides, nstrides, y, ydtype, ydim, yshape, ystrides, labels,
                                c0, preset, tau),
                       grad_sums, make_view(dz, zdtype, 3, shape, dzstrides),
                       make_view(dn, zdtype, 3, shape, dn ? dnstrides : zstrides), 0, 0);
  });
}
}
