// Fused DUO loss (SPEC §4): filled in by the DUO work.
#include <pybind11/pybind11.h>
namespace auvcore {
void register_duo(pybind11::module_& m) { (void)m; }
}  // namespace auvcore
