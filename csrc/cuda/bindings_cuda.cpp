// Python bindings of the CUDA ops (compiled by the host compiler; only in the CUDA build). Pointers are device
// addresses of tensors Python allocated; `stream` is the caller's cudaStream_t as an int (0 = legacy default
// stream) and `device` the index of the tensors' device.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <vector>

#include "../cuda/sturm.h"
#include "auvcore/array.h"
#include "auvcore/scale_cuda.h"

namespace py = pybind11;

namespace auvcore {

template <typename T>
static T* dptr(std::uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

void register_cuda(py::module_& m) {
  m.attr("with_cuda") = true;
  m.attr("cuda_max_gram_size") = cuda::kMaxEighSize;

  m.def("cuda_device_count", &cuda::device_count,
        "Number of usable CUDA devices; 0 when there is no driver or GPU (never raises).");
  m.def("cuda_device_supported", &cuda::device_supported, py::arg("device"),
        "Whether the kernels in this build can run on that device (False for too old a GPU; never raises).");

  m.def(
      "cuda_decoded_gram",
      [](const ArrayView& z, int mode, bool center, bool nan_to_num, std::uintptr_t G, std::uintptr_t flags,
         std::uintptr_t stream, int device) {
        py::gil_scoped_release nogil;
        cuda::decoded_gram(z, mode, center, nan_to_num, dptr<double>(G), dptr<int32_t>(flags), stream, device);
      },
      py::arg("z"), py::arg("mode"), py::arg("center"), py::arg("nan_to_num"), py::arg("G"), py::arg("flags"),
      py::arg("stream"), py::arg("device"));

  m.def(
      "cuda_masked_gram",
      [](const ArrayView& f, const ArrayView& labels, int64_t K, bool center, bool nan_to_num, std::uintptr_t G,
         std::uintptr_t counts, std::uintptr_t flags, std::uintptr_t label_error, std::uintptr_t stream,
         int device) {
        py::gil_scoped_release nogil;
        cuda::masked_gram(f, labels, K, center, nan_to_num, dptr<double>(G), dptr<int64_t>(counts),
                          dptr<int32_t>(flags), dptr<int64_t>(label_error), stream, device);
      },
      py::arg("features"), py::arg("labels"), py::arg("num_classes"), py::arg("center"), py::arg("nan_to_num"),
      py::arg("G"), py::arg("counts"), py::arg("flags"), py::arg("label_error"), py::arg("stream"),
      py::arg("device"));

  m.def(
      "cuda_scale_from_gram",
      [](std::uintptr_t G, int64_t count, int64_t p, std::uintptr_t counts, int64_t r, double eps, int variant,
         std::uintptr_t flags, std::uintptr_t S, std::uintptr_t evals, std::uintptr_t stream, int device) {
        py::gil_scoped_release nogil;
        cuda::scale_from_gram(dptr<double>(G), count, p, dptr<const int64_t>(counts), r, eps, variant,
                              dptr<const int32_t>(flags), dptr<double>(S), dptr<double>(evals), stream, device);
      },
      py::arg("G"), py::arg("count"), py::arg("p"), py::arg("counts"), py::arg("r"), py::arg("eps"),
      py::arg("variant"), py::arg("flags"), py::arg("S"), py::arg("evals"), py::arg("stream"), py::arg("device"));

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
}

}  // namespace auvcore
