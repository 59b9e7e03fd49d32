// CUDA kernels of the fused DUO loss (docs/method.md §3; the CPU twin is csrc/cpu/duo_cpu.cpp): host entry
// points. All pointers are device pointers owned by the caller (torch memory), read and written in place on
// the caller's stream. Nothing here synchronises the device; errors throw (ArgumentError for bad arguments,
// std::runtime_error carrying the CUDA error string for failed CUDA calls).
#pragma once
#include <cstdint>

#include "auvcore/duo.h"

namespace auvcore {
namespace cuda {

// Number of entries of the forward's status buffer.
constexpr int64_t kDuoStatus = 2;

// The six sums per (b, c) (see duo.h), deterministic: bit-identical from run to run on a given device.
// z, n: [B, K, N] float16, bfloat16, float32 or float64 (the same dtype), any strides; halves are read as
// such and computed in float. y: [B, K, N] targets in [0, 1] or, with a.labels, [B, N] class indices.
// sums: [B, K - c0, kDuoSums] float64. status: [kDuoStatus] int64, written in full: status[0] has bit 0 set
// when z holds a NaN/Inf, bit 1 for n, bit 2 for a target out of range; status[1] is the smallest flat
// index of a bad target (b·N + t with labels, (b·K + c)·N + t else), or -1.
void duo_forward(const DuoArgs& a, double* sums, int64_t* status, std::uintptr_t stream, int device);

// dz, dn: [B, K, N] of z's dtype (any strides; dn may be a null view, and gets zeros with the official
// preset); classes below c0 get 0. grad_sums: dL/d(sums), [B, K - c0, kDuoSums] float64.
void duo_backward(const DuoArgs& a, const double* grad_sums, const ArrayView& dz, const ArrayView& dn,
                  std::uintptr_t stream, int device);

}  // namespace cuda
}  // namespace auvcore
