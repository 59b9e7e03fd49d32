// Run-time choice of instruction set: hot loops are compiled once per target and picked from the CPU's
// features (target_clones with arch= names match CPU models, not features, and so miss newer CPUs).
#pragma once

namespace auvcore {

#define AUVCORE_TARGET_AVX512 __attribute__((target("avx512f,avx512vl,avx512dq,fma")))
#define AUVCORE_TARGET_AVX2 __attribute__((target("avx2,fma")))

// 2: AVX-512, 1: AVX2 + FMA, 0: baseline.
inline int isa_level() {
  static const int level = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                                   __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("fma")
                               ? 2
                               : (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? 1 : 0);
  return level;
}

}  // namespace auvcore
