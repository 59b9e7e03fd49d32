// Run-time choice of instruction set: hot loops are compiled once per target and picked from the CPU's
// features (target_clones with arch= names match CPU models, not features, and so miss newer CPUs).
//
// The level in force is the best the CPU supports unless lowered with set_isa_level (Python calls it at import
// from the AUVCORE_ISA environment variable, and auvcore._backend.set_isa at run time), so every path can be
// tested and benchmarked on one machine. It is read once per dispatch (an atomic load): switching it between
// calls is safe, and a call already running keeps the path it chose.
#pragma once
#include <atomic>
#include <string>

#include "auvcore/array.h"

namespace auvcore {

#define AUVCORE_TARGET_AVX512 __attribute__((target("avx512f,avx512vl,avx512dq,fma")))
#define AUVCORE_TARGET_AVX2 __attribute__((target("avx2,fma")))

// 2: AVX-512, 1: AVX2 + FMA, 0: baseline (the compiler's default target, SSE2 on x86-64).
enum IsaLevel : int { kIsaGeneric = 0, kIsaAvx2 = 1, kIsaAvx512 = 2 };

inline const char* isa_name(int level) {
  return level == kIsaAvx512 ? "avx512" : level == kIsaAvx2 ? "avx2" : "generic";
}

// The best level this CPU runs.
inline int isa_best() {
  static const int level = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                                   __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("fma")
                               ? kIsaAvx512
                               : (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? kIsaAvx2
                                                                                                  : kIsaGeneric);
  return level;
}

inline std::atomic<int>& isa_slot() {
  static std::atomic<int> level{isa_best()};
  return level;
}

// The level the kernels dispatch on.
inline int isa_level() { return isa_slot().load(std::memory_order_relaxed); }

// Force a level at or below the CPU's best; above it would execute instructions the CPU lacks, so it is an
// ArgumentError (the environment variable is clamped with a warning on the Python side instead).
inline void set_isa_level(int level) {
  require(level >= kIsaGeneric && level <= kIsaAvx512,
          "isa: expected 0 (generic), 1 (avx2) or 2 (avx512), got " + std::to_string(level));
  require(level <= isa_best(), std::string("isa: this CPU runs at most '") + isa_name(isa_best()) + "', asked for '" +
                                   isa_name(level) + "'");
  isa_slot().store(level, std::memory_order_relaxed);
}

}  // namespace auvcore
