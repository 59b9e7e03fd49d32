// Symmetric eigenvalues (and optionally vectors) of small dense matrices, in double:
// Scaled by a power of two, Householder tridiagonalisation, then implicit QL with Wilkinson shifts; cyclic
// Jacobi where QL stalls. Never fails on a finite matrix.
#pragma once
#include <cstdint>

namespace auvcore {

// A is n x n row-major, symmetric (both triangles read); it is overwritten (scratch).
// w receives the eigenvalues in descending order. If vt is not null it receives the eigenvectors as rows
// (vt[j*n + i] = i-th component of the eigenvector of w[j]). Throws std::runtime_error only for a NaN or Inf
// entry. force_jacobi skips QL (tests of the fallback).
void eigh_sym(double* A, int64_t n, double* w, double* vt, bool force_jacobi = false);

}  // namespace auvcore
