"""The host emulation's shared-memory checks (csrc/cuda/emu/cuda_runtime.h, emu::Smem), and the CUDA backward of
S run through them on the shapes that read past the end on a GPU (issue 22).

On an H200, compute-sanitizer memcheck reported "Invalid __shared__ read of size 16 bytes" in weights_kernel
(csrc/cuda/scale_backward_cuda.cu) at 0x420 for p = 5: ptxas had loaded g[p-1] and g[p] with one LDS.128, legal
for it only if the dynamic allocation (8p bytes) were a whole number of the 16-byte granules that nvcc aligns
`extern __shared__` to. The emulation holds every access to a dynamic allocation to that rule, and every access
to any shared array to its bounds and alignment, so the bug shows on a CPU. Only a C++20 compiler is needed
(no CUDA build): these tests run wherever the emulation builds.
"""
from __future__ import annotations

import ctypes

import pytest
import torch

from cuda_common import _rand, check_rc, emu_backward, emu_library  # noqa: E402



@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    return emu_library(tmp_path_factory)


def _probe(lib, mode, n, nbytes):
    err = ctypes.create_string_buffer(1024)
    check_rc(lib.emu_smem_probe(mode, n, ctypes.c_int64(nbytes), err, 1024), err)


@pytest.mark.parametrize("mode,n,nbytes,message", [
    (1, 6, 48, r"invalid __shared__ access of 8 bytes at offset 48 of dynamic shared array 'buf' \(48 bytes\) "
               r"in kernel probe_kernel, thread \(0,0,0\) of block \(0,0,0\)"),
    (2, 6, 48, r"invalid __shared__ access of 8 bytes at offset -8 of dynamic shared array 'buf'"),
    (3, 6, 48, r"invalid __shared__ access of 8 bytes at offset 32 of static shared array 'st' \(32 bytes\)"),
    (4, 6, 48, r"misaligned __shared__ access of 8 bytes at offset 4 of dynamic shared array 'buf'"),
    # 5 doubles in 40 bytes: buf[4]'s 16-byte granule [32, 48) is not all allocated (weights_kernel, p = 5)
    (0, 5, 40, r"invalid __shared__ access of 8 bytes at offset 32 of dynamic shared array 'buf' \(40 bytes\) "
               r"in kernel probe_kernel.*16-byte granule ends at 48"),
])
def test_emulation_reports_every_kind_of_bad_shared_access(emu, mode, n, nbytes, message):
    with pytest.raises(RuntimeError, match="emulated memcheck: " + message):
        _probe(emu, mode, n, nbytes)


def test_emulation_passes_in_bounds_shared_accesses(emu):
    _probe(emu, 0, 5, 48)  # the same 5 doubles in an allocation rounded up to 16 bytes
    _probe(emu, 0, 6, 48)
    _probe(emu, 5, 6, 64)  # a byte after 6 doubles (as apply_kernel's flags), its granule allocated


# p = min(m, n) of each class matrix. p % 4 == 1 is what the H200 build read past the end on (its remainder
# loop loads g[p-1], g[p] in one LDS.128); the others leave a partial 16-byte granule too (p odd) or none.
@pytest.mark.parametrize("shape,mode", [
    ((1, 2, 5, 4, 6), "D_HW"),    # p = 5: the shape of the failing GPU test (gradcheck, block (1,0,0))
    ((2, 1, 9, 2, 3), "D_HW"),    # p = 6, column side
    ((1, 2, 6, 7), "H_DW"),       # 4-D maps, p = 6
    ((1, 1, 3, 4, 5), "D_HW"),    # p = 3
    ((1, 2, 9, 3, 5), "D_HW"),    # p = 9
    ((1, 1, 13, 2, 8), "D_HW"),   # p = 13
    ((1, 1, 40, 3, 3), "D_HW"),   # p = 9, column side (per-coordinate means)
    ((1, 1, 4, 17, 2), "H_DW"),   # p = n = 8 < m = 17
])
@pytest.mark.parametrize("variant", ["paper", "official"])
def test_backward_kernels_stay_inside_their_shared_memory(emu, shape, mode, variant):
    from auvcore import _cpu

    z = _rand(shape, torch.float64, 5, offset=1.0)
    center = variant == "paper"
    _, ev, vt = _cpu.semantic_scale(z, mode, center, 1e-8, variant, variant == "official", 1, eigenpairs=True)
    grad_S = torch.linspace(0.5, 1.5, shape[0] * shape[1], dtype=torch.float64)
    got = emu_backward(emu, z, mode, center, 1e-8, variant, ev, vt, grad_S)  # raises on a bad shared access
    want = _cpu.scale_backward(z, mode, center, 1e-8, variant, variant == "official", 1, ev, vt, grad_S)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-11 * float(want.abs().max()))
