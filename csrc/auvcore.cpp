// The Python module, the only pybind11 file: one thin dispatch point for the CPU ops and (in the CUDA build)
// the CUDA ops. Each op takes ArrayViews of the caller's memory, its inputs and the outputs Python allocated
// alike, and checks every buffer against what the op will write before the op runs; no tensor library is
// linked.
#include <pybind11/pybind11.h>
#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include "auvcore/array.h"
#include "auvcore/duo.h"
#include "auvcore/eigh.h"
#include "auvcore/gram.h"
#include "auvcore/isa.h"
#include "auvcore/moments.h"
#include "auvcore/scale.h"
#ifdef AUVCORE_WITH_CUDA
#include <cmath>

#include "cuda/sturm.h"  // the multisection steps, for the host builds below
#include "auvcore/duo_cuda.h"
#include "auvcore/scale_cuda.h"
#endif

namespace py = pybind11;
using namespace auvcore;

namespace auvcore {
namespace {

// The DUO ops' arguments, checked (shapes, dtypes; halves only for the CUDA kernels) before any buffer's
// shape is derived from them.
DuoArgs duo_args(const ArrayView& z, const ArrayView& n, const ArrayView& y, bool labels, int64_t c0, int preset,
                 double tau, bool half_ok) {
  require(preset == 0 || preset == 1, "preset: expected 0 (paper) or 1 (official)");
  DuoArgs a;
  a.z = z;
  a.n = n;
  a.y = y;
  a.labels = labels;
  a.c0 = c0;
  a.preset = static_cast<DuoPreset>(preset);
  a.tau = tau;
  check_duo_args(a, half_ok);
  return a;
}

std::vector<int64_t> duo_sums_shape(const ArrayView& z, int64_t c0) {
  return std::vector<int64_t>{z.shape[0], z.shape[1] - c0, (int64_t)kDuoSums};
}

// The CUDA ops, or in a CPU-only build (no CUDA toolkit) only the flag that says they are absent.
void register_cuda(py::module_& m) {
#ifndef AUVCORE_WITH_CUDA
  m.attr("with_cuda") = false;
#else
  m.attr("with_cuda") = true;
  m.attr("cuda_max_gram_size") = cuda::kMaxEighSize;

  m.def("cuda_device_count", &cuda::device_count,
        "Number of usable CUDA devices; 0 when there is no driver or GPU (never raises).");
  m.def("cuda_device_supported", &cuda::device_supported, py::arg("device"),
        "Whether the kernels in this build can run on that device (False for too old a GPU; never raises).");

  // The device an op runs on is its first input's; every other view must be on it. `stream` is the caller's
  // cudaStream_t as an int (0 = legacy default stream). As on the CPU side, `buffer` checks each output's
  // dtype, layout, shape and device against what the kernel will write before anything runs.
  auto device_of = [](const ArrayView& v, const char* name) {
    require(v.device != kHost, std::string(name) + ": expected CUDA device memory, got host memory");
    return v.device;
  };
  m.def(
      "cuda_decoded_gram",
      [device_of](const ArrayView& z, int mode, bool center, bool nan_to_num, const ArrayView& G,
                  const ArrayView& flags, std::uintptr_t stream) {
        auto [m_, n_] = decoded_shape(z, mode);
        const int64_t BK = z.shape[0] * z.shape[1], p = std::min(m_, n_);
        const int dev = device_of(z, "z");
        double* g = buffer<double>(G, DType::F64, {BK, p, p}, "G", false, dev);
        int32_t* fl = buffer<int32_t>(flags, DType::I32, {BK}, "flags", false, dev);
        py::gil_scoped_release nogil;
        cuda::decoded_gram(z, mode, center, nan_to_num, g, fl, stream, dev);
      },
      py::arg("z"), py::arg("mode"), py::arg("center"), py::arg("nan_to_num"), py::arg("G"), py::arg("flags"),
      py::arg("stream"));

  m.def(
      "cuda_masked_gram",
      [device_of](const ArrayView& f, const ArrayView& labels, int64_t K, bool center, bool nan_to_num,
                  const ArrayView& G, const ArrayView& counts, const ArrayView& flags, const ArrayView& label_error,
                  std::uintptr_t stream, bool smaller_side) {
        check_masked_args(f, labels, K);
        const int64_t BK = f.shape[0] * K, C = f.shape[1];
        const int dev = device_of(f, "features");
        require_on(labels, dev, "labels");
        double* g = buffer<double>(G, DType::F64, {BK, C, C}, "G", false, dev);
        int64_t* cnt = buffer<int64_t>(counts, DType::I64, {BK}, "counts", false, dev);
        int32_t* fl = buffer<int32_t>(flags, DType::I32, {BK}, "flags", false, dev);
        int64_t* le = buffer<int64_t>(label_error, DType::I64, {2}, "label_error", false, dev);
        py::gil_scoped_release nogil;
        cuda::masked_gram(f, labels, K, center, nan_to_num, smaller_side, g, cnt, fl, le, stream, dev);
      },
      py::arg("features"), py::arg("labels"), py::arg("num_classes"), py::arg("center"), py::arg("nan_to_num"),
      py::arg("G"), py::arg("counts"), py::arg("flags"), py::arg("label_error"), py::arg("stream"),
      py::arg("smaller_side") = false);

  // G [count, p, p] (overwritten) gives count and p. The ranks: min(counts[i], p) with counts [count], else r
  // for all; flags [count] (optional) marks the matrices whose S is NaN; evals [count, p] (optional);
  // sized_by_counts: matrix i is r_i x r_i (cuda_masked_gram's smaller side).
  m.def(
      "cuda_scale_from_gram",
      [device_of](const ArrayView& G, const ArrayView& counts, int64_t r, double eps, int variant,
                  const ArrayView& flags, const ArrayView& S, const ArrayView& evals, std::uintptr_t stream,
                  bool sized_by_counts) {
        require(G.dim() == 3 && G.shape[1] == G.shape[2], "G: expected [count, p, p]");
        const int64_t count = G.shape[0], p = G.shape[1];
        const int dev = device_of(G, "G");
        double* g = buffer<double>(G, DType::F64, {count, p, p}, "G", false, dev);
        const int64_t* cnt = buffer<int64_t>(counts, DType::I64, {count}, "counts", true, dev);
        const int32_t* fl = buffer<int32_t>(flags, DType::I32, {count}, "flags", true, dev);
        double* s = buffer<double>(S, DType::F64, {count}, "S", false, dev);
        double* ev = buffer<double>(evals, DType::F64, {count, p}, "evals", true, dev);
        py::gil_scoped_release nogil;
        cuda::scale_from_gram(g, count, p, cnt, r, sized_by_counts, eps, variant, fl, s, ev, stream, dev);
      },
      py::arg("G"), py::arg("counts"), py::arg("r"), py::arg("eps"), py::arg("variant"), py::arg("flags"),
      py::arg("S"), py::arg("evals"), py::arg("stream"), py::arg("sized_by_counts") = false);

  // Eigenvalues and eigenvectors of G [count, p, p] (read, not changed), for the backward of S: evals
  // [count, p] descending and evecs [count, p, p] (eigenvector j as row j) are written in full; p up to
  // cuda_max_eigenpairs_size.
  m.attr("cuda_max_eigenpairs_size") = cuda::kMaxEigenpairsSize;
  m.def(
      "cuda_gram_eigenpairs",
      [device_of](const ArrayView& G, const ArrayView& evals, const ArrayView& evecs, std::uintptr_t stream) {
        require(G.dim() == 3 && G.shape[1] == G.shape[2], "G: expected [count, p, p]");
        const int64_t count = G.shape[0], p = G.shape[1];
        const int dev = device_of(G, "G");
        const double* g = buffer<double>(G, DType::F64, {count, p, p}, "G", false, dev);
        double* ev = buffer<double>(evals, DType::F64, {count, p}, "evals", false, dev);
        double* vt = buffer<double>(evecs, DType::F64, {count, p, p}, "evecs", false, dev);
        py::gil_scoped_release nogil;
        cuda::gram_eigenpairs(g, count, p, ev, vt, stream, dev);
      },
      py::arg("G"), py::arg("evals"), py::arg("evecs"), py::arg("stream"));

  // The analytic backward of the decoded-map S from the forward's eigenpairs; dz (float32 or float64, z's shape)
  // is written in full.
  m.def(
      "cuda_scale_backward",
      [device_of](const ArrayView& z, int mode, bool center, double eps, int variant, const ArrayView& evals,
                  const ArrayView& evecs, const ArrayView& grad_S, const ArrayView& dz, std::uintptr_t stream) {
        auto [m_, n_] = decoded_shape(z, mode);
        const int64_t BK = z.shape[0] * z.shape[1], p = std::min(m_, n_);
        const int dev = device_of(z, "z");
        require_on(dz, dev, "dz");
        const double* ev = buffer<double>(evals, DType::F64, {BK, p}, "evals", false, dev);
        const double* vt = buffer<double>(evecs, DType::F64, {BK, p, p}, "evecs", false, dev);
        const double* gS = buffer<double>(grad_S, DType::F64, {BK}, "grad_S", false, dev);
        py::gil_scoped_release nogil;
        cuda::scale_backward_decoded(z, mode, center, eps, variant, ev, vt, gS, dz, stream, dev);
      },
      py::arg("z"), py::arg("mode"), py::arg("center"), py::arg("eps"), py::arg("variant"), py::arg("evals"),
      py::arg("evecs"), py::arg("grad_S"), py::arg("dz"), py::arg("stream"));

  // The fused DUO loss (duo_cuda.h): z, n [B, K, N] of one dtype (float16, bfloat16, float32 or float64), y
  // [B, K, N] targets or [B, N] class indices, every view on z's device. sums [B, K - c0, 6] float64 and status
  // [2] int64 are written in full (status: non-finite/out-of-range bits, the first bad target's flat index).
  m.def(
      "cuda_duo_forward",
      [device_of](const ArrayView& z, const ArrayView& n, const ArrayView& y, bool labels, int64_t c0, int preset,
                  double tau, const ArrayView& sums, const ArrayView& status, std::uintptr_t stream) {
        DuoArgs a = duo_args(z, n, y, labels, c0, preset, tau, true);
        const int dev = device_of(z, "seg_logits");
        require_on(n, dev, "noise_logits");
        require_on(y, dev, "target");
        double* s = buffer<double>(sums, DType::F64, duo_sums_shape(z, c0), "sums", false, dev);
        int64_t* st = buffer<int64_t>(status, DType::I64, {cuda::kDuoStatus}, "status", false, dev);
        py::gil_scoped_release nogil;
        cuda::duo_forward(a, s, st, stream, dev);
      },
      py::arg("z"), py::arg("n"), py::arg("y"), py::arg("labels"), py::arg("c0"), py::arg("preset"), py::arg("tau"),
      py::arg("sums"), py::arg("status"), py::arg("stream"));
  // dz (required) and dn (optional: an empty view) [B, K, N] contiguous, of z's dtype, on z's device.
  m.def(
      "cuda_duo_backward",
      [device_of](const ArrayView& z, const ArrayView& n, const ArrayView& y, bool labels, int64_t c0, int preset,
                  double tau, const ArrayView& grad_sums, const ArrayView& dz, const ArrayView& dn,
                  std::uintptr_t stream) {
        DuoArgs a = duo_args(z, n, y, labels, c0, preset, tau, true);
        const int dev = device_of(z, "seg_logits");
        require_on(n, dev, "noise_logits");
        require_on(y, dev, "target");
        const double* g = buffer<double>(grad_sums, DType::F64, duo_sums_shape(z, c0), "grad_sums", false, dev);
        buffer<unsigned char>(dz, z.dtype, z.shape, "dz", false, dev);
        buffer<unsigned char>(dn, z.dtype, z.shape, "dn", true, dev);
        py::gil_scoped_release nogil;
        cuda::duo_backward(a, g, dz, dn, stream, dev);
      },
      py::arg("z"), py::arg("n"), py::arg("y"), py::arg("labels"), py::arg("c0"), py::arg("preset"), py::arg("tau"),
      py::arg("grad_sums"), py::arg("dz"), py::arg("dn"), py::arg("stream"));

  // Host builds of the solver's serial pieces, for tests on machines without a GPU.
  m.def(
      "_cuda_host_tridiag_eigvalsh",
      [](const std::vector<double>& d, const std::vector<double>& e, int lanes) {
        const int n = (int)d.size();
        if (n == 0) throw ArgumentError("d: expected at least one entry");
        if ((int)e.size() != n - 1) throw ArgumentError("e: expected len(d) - 1 entries");
        std::vector<double> e2(n, 0.0), out(n);
        double gl = 1e300, gu = -1e300, me2 = 0.0;
        for (int j = 0; j < n; ++j) {
          const double el = j > 0 ? std::fabs(e[j - 1]) : 0.0, er = j + 1 < n ? std::fabs(e[j]) : 0.0;
          gl = std::fmin(gl, d[j] - el - er);
          gu = std::fmax(gu, d[j] + el + er);
          if (j + 1 < n) e2[j] = e[j] * e[j];
          me2 = std::fmax(me2, e2[j]);
        }
        if (lanes < 1 || lanes > 32 || (lanes & (lanes - 1))) throw ArgumentError("lanes: expected 1, 2, 4, .., 32");
        const cuda::Bracket br = cuda::bracket_from(gl, gu, me2, n);
        const int steps = cuda::multisect_steps(br.hi - br.lo, br.abstol, lanes);
        for (int j = 0; j < n; ++j)
          out[j] = cuda::multisect_eigenvalue(d.data(), e2.data(), n, j, br.lo, br.hi, br.pivmin, lanes, steps);
        return out;
      },
      py::arg("d"), py::arg("e"), py::arg("lanes") = 1,
      "Ascending eigenvalues of a symmetric tridiagonal matrix by the CUDA kernel's multisection steps\n"
      "(`lanes` probes per step, as the lanes of a warp share an eigenvalue on the GPU).");
  m.def("_cuda_host_multisect_lanes", &cuda::multisect_lanes, py::arg("n"), py::arg("threads"));

  m.def(
      "_cuda_host_entropy",
      [](const std::vector<double>& lam_desc, int64_t r, double eps, int variant) {
        if (r < 2 || r > (int64_t)lam_desc.size()) return std::nan("");
        return entropy_scale(lam_desc.data(), r, eps, variant, nullptr);
      },
      py::arg("lam_desc"), py::arg("r"), py::arg("eps"), py::arg("variant"),
      "S from descending eigenvalues with the formula the CUDA kernel shares (entropy.h), summed serially.");
#endif
}

}  // namespace
}  // namespace auvcore

PYBIND11_MODULE(_C, m) {
  m.doc() = "auvcore native kernels (CPU always, CUDA when built with it)";
  py::register_exception<ArgumentError>(m, "ArgumentError", PyExc_ValueError);

  py::enum_<DType>(m, "DType")
      .value("f16", DType::F16).value("bf16", DType::BF16).value("f32", DType::F32).value("f64", DType::F64)
      .value("i8", DType::I8).value("u8", DType::U8).value("i16", DType::I16).value("i32", DType::I32)
      .value("i64", DType::I64);

  // `device`: kHost (-1) for host memory, else the CUDA device's index.
  py::class_<ArrayView>(m, "ArrayView")
      .def(py::init([](std::uintptr_t ptr, DType dtype, std::vector<int64_t> shape, std::vector<int64_t> strides,
                       int device) {
             if (shape.size() != strides.size()) throw ArgumentError("ArrayView: shape and strides differ in length");
             if (device < kHost) throw ArgumentError("ArrayView: device must be -1 (host) or a CUDA device index");
             ArrayView v;
             v.ptr = ptr;
             v.dtype = dtype;
             v.shape = std::move(shape);
             v.strides = std::move(strides);
             v.device = device;
             return v;
           }),
           py::arg("ptr"), py::arg("dtype"), py::arg("shape"), py::arg("strides"), py::arg("device") = kHost)
      .def_readonly("device", &ArrayView::device);

  // The instruction set the CPU kernels dispatch on (isa.h): 0 generic, 1 AVX2 + FMA, 2 AVX-512.
  m.def("isa", &isa_level, "The instruction-set level the CPU kernels run now.");
  m.def("isa_best", &isa_best, "The best instruction-set level this CPU supports.");
  m.def("set_isa", &set_isa_level, py::arg("level"),
        "Force a level at or below isa_best() (ValueError above it).");

  // The CPU ops. Inputs must be host memory; outputs are ArrayViews of buffers Python allocated, and
  // `buffer` checks each one's dtype, layout, shape and memory against what the op will write before the op
  // runs.
  m.def(
      "decoded_gram",
      [](const ArrayView& z, int mode, bool center, bool nan_to_num, const ArrayView& G, int threads, bool in_double) {
        require_on(z, kHost, "z");
        auto [m, n] = decoded_shape(z, mode);
        const int64_t p = std::min(m, n);
        double* g = buffer<double>(G, DType::F64, {z.shape[0] * z.shape[1], p, p}, "G");
        py::gil_scoped_release nogil;
        decoded_gram(z, mode, center, nan_to_num, g, threads, in_double);
      },
      py::arg("z"), py::arg("mode"), py::arg("center"), py::arg("nan_to_num"), py::arg("G"), py::arg("threads"),
      py::arg("in_double") = false);

  m.def(
      "masked_gram",
      [](const ArrayView& f, const ArrayView& labels, int64_t K, bool center, bool nan_to_num, const ArrayView& G,
         const ArrayView& counts, int threads) {
        check_masked_args(f, labels, K);
        require_on(f, kHost, "features");
        require_on(labels, kHost, "labels");
        const int64_t BK = f.shape[0] * K, C = f.shape[1];
        double* g = buffer<double>(G, DType::F64, {BK, C, C}, "G");
        int64_t* cnt = buffer<int64_t>(counts, DType::I64, {BK}, "counts");
        py::gil_scoped_release nogil;
        masked_gram(f, labels, K, center, nan_to_num, g, cnt, threads);
      },
      py::arg("features"), py::arg("labels"), py::arg("num_classes"), py::arg("center"), py::arg("nan_to_num"),
      py::arg("G"), py::arg("counts"), py::arg("threads"));

  m.def(
      "masked_scale",
      [](const ArrayView& f, const ArrayView& labels, int64_t K, bool center, bool nan_to_num, double eps,
         const ArrayView& S, const ArrayView& counts, const ArrayView& spectrum, int threads) {
        check_masked_args(f, labels, K);
        require_on(f, kHost, "features");
        require_on(labels, kHost, "labels");
        const int64_t BK = f.shape[0] * K, C = f.shape[1];
        double* s = buffer<double>(S, DType::F64, {BK}, "S");
        int64_t* cnt = buffer<int64_t>(counts, DType::I64, {BK}, "counts");
        double* sp = buffer<double>(spectrum, DType::F64, {BK, C}, "spectrum", true);
        py::gil_scoped_release nogil;
        masked_scale(f, labels, K, center, nan_to_num, eps, s, cnt, sp, threads);
      },
      py::arg("features"), py::arg("labels"), py::arg("num_classes"), py::arg("center"), py::arg("nan_to_num"),
      py::arg("eps"), py::arg("S"), py::arg("counts"), py::arg("spectrum"), py::arg("threads"));

  // G [count, p, p] (overwritten) gives count and p; r [count] the ranks.
  m.def(
      "scale_from_gram",
      [](const ArrayView& G, const ArrayView& r, double eps, int variant, const ArrayView& S,
         const ArrayView& spectrum, const ArrayView& evals, const ArrayView& evecs, int threads) {
        require(G.dim() == 3 && G.shape[1] == G.shape[2], "G: expected [count, p, p]");
        const int64_t count = G.shape[0], p = G.shape[1];
        require(variant == 0 || variant == 1, "variant: expected 0 (paper) or 1 (official)");
        double* g = buffer<double>(G, DType::F64, {count, p, p}, "G");
        const int64_t* rr = buffer<int64_t>(r, DType::I64, {count}, "r");
        double* s = buffer<double>(S, DType::F64, {count}, "S");
        double* sp = buffer<double>(spectrum, DType::F64, {count, p}, "spectrum", true);
        double* ev = buffer<double>(evals, DType::F64, {count, p}, "evals", true);
        double* vt = buffer<double>(evecs, DType::F64, {count, p, p}, "evecs", true);
        py::gil_scoped_release nogil;
        scale_from_gram(g, count, p, rr, eps, static_cast<Variant>(variant), s, sp, ev, vt, threads);
      },
      py::arg("G"), py::arg("r"), py::arg("eps"), py::arg("variant"), py::arg("S"), py::arg("spectrum"),
      py::arg("evals"), py::arg("evecs"), py::arg("threads"));

  // The eigensolver on its own, for its tests and bench/stress_spectra.py: A [count, n, n] float64 (read,
  // not changed) -> eigenvalues [count, n] descending and, with vectors, eigenvectors [count, n, n] as rows.
  m.def(
      "eigh",
      [](py::array_t<double, py::array::c_style | py::array::forcecast> A, bool vectors, bool force_jacobi,
         int threads) {
        if (A.ndim() != 3 || A.shape(1) != A.shape(2)) throw ArgumentError("A: expected [count, n, n]");
        const int64_t count = A.shape(0), n = A.shape(1);
        py::array_t<double> w({count, n});
        py::array_t<double> vt(vectors ? std::vector<py::ssize_t>{count, n, n} : std::vector<py::ssize_t>{0});
        const double* a = A.data();
        double* wp = w.mutable_data();
        double* vp = vectors ? vt.mutable_data() : nullptr;
        std::string failure;
        {
          py::gil_scoped_release nogil;
#pragma omp parallel for num_threads(std::max(1, threads)) schedule(dynamic, 1)
          for (int64_t i = 0; i < count; ++i) {
            std::vector<double> work(a + i * n * n, a + (i + 1) * n * n);
            try {
              eigh_sym(work.data(), n, wp + i * n, vp ? vp + i * n * n : nullptr, force_jacobi);
            } catch (const std::exception& e) {
#pragma omp critical
              failure = "A[" + std::to_string(i) + "]: " + e.what();
            }
          }
        }
        if (!failure.empty()) throw ArgumentError(failure);
        return py::make_tuple(w, vt);
      },
      py::arg("A"), py::arg("vectors") = false, py::arg("force_jacobi") = false, py::arg("threads") = 1);

  // DUO loss and the backward of S.

  auto args = [](const ArrayView& z, const ArrayView& n, const ArrayView& y, bool labels, int64_t c0, int preset,
                 double tau) {
    DuoArgs a = duo_args(z, n, y, labels, c0, preset, tau, false);  // before the buffers' shapes come from z
    require_on(z, kHost, "seg_logits");
    require_on(n, kHost, "noise_logits");
    require_on(y, kHost, "target");
    return a;
  };
  m.attr("duo_num_sums") = (int)kDuoSums;
  auto sums_shape = duo_sums_shape;
  m.def(
      "duo_forward",
      [args, sums_shape](const ArrayView& z, const ArrayView& n, const ArrayView& y, bool labels, int64_t c0,
                         int preset, double tau, const ArrayView& sums, int threads) {
        DuoArgs a = args(z, n, y, labels, c0, preset, tau);
        double* s = buffer<double>(sums, DType::F64, sums_shape(z, c0), "sums");
        py::gil_scoped_release nogil;
        duo_forward_cpu(a, s, threads);
      },
      py::arg("z"), py::arg("n"), py::arg("y"), py::arg("labels"), py::arg("c0"), py::arg("preset"), py::arg("tau"),
      py::arg("sums"), py::arg("threads"));
  m.def(
      "duo_backward",
      [args, sums_shape](const ArrayView& z, const ArrayView& n, const ArrayView& y, bool labels, int64_t c0,
                         int preset, double tau, const ArrayView& grad_sums, const ArrayView& dz,
                         const ArrayView& dn, int threads) {
        DuoArgs a = args(z, n, y, labels, c0, preset, tau);
        const double* g = buffer<double>(grad_sums, DType::F64, sums_shape(z, c0), "grad_sums");
        require_on(dz, kHost, "dz");
        require_on(dn, kHost, "dn");
        py::gil_scoped_release nogil;
        duo_backward_cpu(a, g, dz, dn, threads);
      },
      py::arg("z"), py::arg("n"), py::arg("y"), py::arg("labels"), py::arg("c0"), py::arg("preset"), py::arg("tau"),
      py::arg("grad_sums"), py::arg("dz"), py::arg("dn"), py::arg("threads"));
  m.def(
      "class_moments",
      [](const ArrayView& image, const ArrayView& labels, int64_t K, const ArrayView& count, const ArrayView& mean,
         const ArrayView& m2) {
        require(K >= 1, "num_classes: expected a positive int, got " + std::to_string(K));
        int64_t* n = buffer<int64_t>(count, DType::I64, {K}, "count");
        double* mu = buffer<double>(mean, DType::F64, {K}, "mean");
        double* ss = buffer<double>(m2, DType::F64, {K}, "m2");
        py::gil_scoped_release nogil;
        class_moments(image, labels, K, n, mu, ss);
      },
      py::arg("image"), py::arg("labels"), py::arg("num_classes"), py::arg("count"), py::arg("mean"), py::arg("m2"),
      "Per-class voxel count, mean and centred sum of squares of an image under a label map (one thread).");
  m.def(
      "scale_backward",
      [](const ArrayView& z, int mode, bool center, bool nan_to_num, double eps, int variant, const ArrayView& evals,
         const ArrayView& evecs, const ArrayView& grad_S, const ArrayView& dz, int threads) {
        require_on(z, kHost, "z");
        require_on(dz, kHost, "dz");
        auto [m_, n_] = decoded_shape(z, mode);
        const int64_t BK = z.shape[0] * z.shape[1], p = std::min(m_, n_);
        const double* ev = buffer<double>(evals, DType::F64, {BK, p}, "evals");
        const double* vt = buffer<double>(evecs, DType::F64, {BK, p, p}, "evecs");
        const double* gS = buffer<double>(grad_S, DType::F64, {BK}, "grad_S");
        py::gil_scoped_release nogil;
        scale_backward_decoded(z, mode, center, nan_to_num, eps, static_cast<Variant>(variant), ev, vt, gS, dz,
                               threads);
      },
      py::arg("z"), py::arg("mode"), py::arg("center"), py::arg("nan_to_num"), py::arg("eps"), py::arg("variant"),
      py::arg("evals"), py::arg("evecs"), py::arg("grad_S"), py::arg("dz"), py::arg("threads"));
  register_cuda(m);
}
