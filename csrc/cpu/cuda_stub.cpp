// Without the CUDA build the module still answers: the CUDA ops say they are absent.
#include <pybind11/pybind11.h>
#ifndef AUVCORE_WITH_CUDA
namespace auvcore {
void register_cuda(pybind11::module_& m) { m.attr("with_cuda") = false; }
}  // namespace auvcore
#endif
