// The Python module: one thin dispatch point. Each op takes ArrayViews of the caller's memory and raw
// pointers to outputs that Python allocated; no tensor library is linked.
#include <pybind11/pybind11.h>
#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include "auvcore/array.h"
#include "auvcore/eigh.h"
#include "auvcore/gram.h"
#include "auvcore/scale.h"

namespace py = pybind11;
using namespace auvcore;

namespace auvcore {
// Ops of other files register themselves here (DUO loss, CUDA kernels).
void register_duo(py::module_& m);
void register_cuda(py::module_& m);
}  // namespace auvcore

template <typename T>
static T* out_ptr(std::uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "auvcore native kernels (CPU always, CUDA when built with it)";
  py::register_exception<ArgumentError>(m, "ArgumentError", PyExc_ValueError);

  py::enum_<DType>(m, "DType")
      .value("f16", DType::F16).value("bf16", DType::BF16).value("f32", DType::F32).value("f64", DType::F64)
      .value("i8", DType::I8).value("u8", DType::U8).value("i16", DType::I16).value("i32", DType::I32)
      .value("i64", DType::I64);

  py::class_<ArrayView>(m, "ArrayView")
      .def(py::init([](std::uintptr_t ptr, DType dtype, std::vector<int64_t> shape, std::vector<int64_t> strides) {
             if (shape.size() != strides.size()) throw ArgumentError("ArrayView: shape and strides differ in length");
             ArrayView v;
             v.ptr = ptr;
             v.dtype = dtype;
             v.shape = std::move(shape);
             v.strides = std::move(strides);
             return v;
           }),
           py::arg("ptr"), py::arg("dtype"), py::arg("shape"), py::arg("strides"));

  m.def(
      "decoded_gram",
      [](const ArrayView& z, int mode, bool center, bool nan_to_num, std::uintptr_t G, int threads, bool in_double) {
        py::gil_scoped_release nogil;
        decoded_gram(z, mode, center, nan_to_num, out_ptr<double>(G), threads, in_double);
      },
      py::arg("z"), py::arg("mode"), py::arg("center"), py::arg("nan_to_num"), py::arg("G"), py::arg("threads"),
      py::arg("in_double") = false);

  m.def(
      "masked_gram",
      [](const ArrayView& f, const ArrayView& labels, int64_t K, bool center, bool nan_to_num, std::uintptr_t G,
         std::uintptr_t counts, int threads) {
        py::gil_scoped_release nogil;
        masked_gram(f, labels, K, center, nan_to_num, out_ptr<double>(G), out_ptr<int64_t>(counts), threads);
      },
      py::arg("features"), py::arg("labels"), py::arg("num_classes"), py::arg("center"), py::arg("nan_to_num"),
      py::arg("G"), py::arg("counts"), py::arg("threads"));

  m.def(
      "masked_scale",
      [](const ArrayView& f, const ArrayView& labels, int64_t K, bool center, bool nan_to_num, double eps,
         std::uintptr_t S, std::uintptr_t counts, std::uintptr_t spectrum, int threads) {
        py::gil_scoped_release nogil;
        masked_scale(f, labels, K, center, nan_to_num, eps, out_ptr<double>(S), out_ptr<int64_t>(counts),
                     out_ptr<double>(spectrum), threads);
      },
      py::arg("features"), py::arg("labels"), py::arg("num_classes"), py::arg("center"), py::arg("nan_to_num"),
      py::arg("eps"), py::arg("S"), py::arg("counts"), py::arg("spectrum"), py::arg("threads"));

  m.def(
      "scale_from_gram",
      [](std::uintptr_t G, int64_t count, int64_t p, std::uintptr_t r, double eps, int variant, std::uintptr_t S,
         std::uintptr_t spectrum, std::uintptr_t evals, std::uintptr_t evecs, int threads) {
        py::gil_scoped_release nogil;
        scale_from_gram(out_ptr<double>(G), count, p, out_ptr<const int64_t>(r), eps, static_cast<Variant>(variant),
                        out_ptr<double>(S), out_ptr<double>(spectrum), out_ptr<double>(evals), out_ptr<double>(evecs),
                        threads);
      },
      py::arg("G"), py::arg("count"), py::arg("p"), py::arg("r"), py::arg("eps"), py::arg("variant"), py::arg("S"),
      py::arg("spectrum"), py::arg("evals"), py::arg("evecs"), py::arg("threads"));

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

  register_duo(m);
  register_cuda(m);
}
