// Emulation shim (see cuda_runtime.h here): IEEE half from its bits.
#pragma once
#include "auvcore/array.h"
struct __half_bits { unsigned short x; };
inline __half_bits __ushort_as_half(unsigned short h) { return {h}; }
inline float __half2float(__half_bits h) { return auvcore::half_to_float(h.x); }
