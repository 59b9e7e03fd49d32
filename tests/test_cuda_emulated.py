"""CUDA kernels under host emulation (csrc/cuda/emu/build_emu.py): the kernels' indexing, barriers,
reductions, centring, sort and solver run without a GPU; not their speed, nor races that a GPU's weaker
memory ordering could expose.
"""
from __future__ import annotations

import ctypes
import math

import numpy as np
import pytest
import torch

import auvcore
from auvcore import _torch_impl as T
from auvcore import testing

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from cuda_common import (  # noqa: E402
    EMU_DT, _assert_scale_close, _masked_case, _rand, _reference, built_with_cuda, check_rc, emu_backward, emu_library,
    i64, ptr,
)


@pytest.fixture(scope="session")
def emu(tmp_path_factory):
    lib = emu_library(tmp_path_factory)
    yield lib
    lib.emu_set_optin(227 * 1024)


def _emu_scale(lib, G, p, counts=None, r=0, eps=1e-8, variant=0, flags=None, want_evals=False, sized=False):
    count = G.shape[0]
    S = torch.empty(count, dtype=torch.float64)
    ev = torch.full((count, p), float("nan"), dtype=torch.float64) if want_evals else None
    err = ctypes.create_string_buffer(512)
    check_rc(lib.emu_scale_from_gram(ptr(G), ctypes.c_int64(count), ctypes.c_int64(p), ptr(counts), ctypes.c_int64(r),
                                   int(sized), ctypes.c_double(eps), variant, ptr(flags), ptr(S), ptr(ev), err, 512),
             err)
    return S, ev


def _emu_decoded(lib, z, mode="D_HW", center=True, nan_to_num=False, variant="paper", eps=1e-8):
    if variant == "official":
        center, nan_to_num = False, True
    Bn, K = z.shape[:2]
    m, n = T.class_shape(z, mode)
    p = min(m, n)
    G = torch.full((Bn * K, p, p), float("nan"), dtype=torch.float64)  # the op must overwrite every entry
    flags = torch.zeros(Bn * K, dtype=torch.int32)
    err = ctypes.create_string_buffer(512)
    check_rc(lib.emu_decoded_gram(ptr(z), EMU_DT[z.dtype], z.dim(), i64(z.shape), i64(z.stride()), T.LAYOUTS[mode],
                                int(center), int(nan_to_num), ptr(G), ptr(flags), err, 512), err)
    G0 = G.clone()
    S, _ = _emu_scale(lib, G, p, r=p, eps=eps, variant=T.VARIANTS[variant], flags=flags)
    return G0, S.view(Bn, K), flags.view(Bn, K)


def _emu_masked(lib, f, lab, K, center=True, nan_to_num=False, smaller_side=False):
    Bn, C = f.shape[:2]
    G = torch.full((Bn * K, C, C), float("nan"), dtype=torch.float64)
    counts = torch.full((Bn * K,), -1, dtype=torch.int64)
    flags = torch.zeros(Bn * K, dtype=torch.int32)
    le = torch.zeros(2, dtype=torch.int64)
    err = ctypes.create_string_buffer(512)
    check_rc(lib.emu_masked_gram(ptr(f), EMU_DT[f.dtype], f.dim(), i64(f.shape), i64(f.stride()), ptr(lab),
                               EMU_DT[lab.dtype], i64(lab.shape), i64(lab.stride()), ctypes.c_int64(K),
                               int(center), int(nan_to_num), int(smaller_side), ptr(G), ptr(counts), ptr(flags),
                               ptr(le), err, 512), err)
    G0 = G.clone()
    S, _ = _emu_scale(lib, G, C, counts=counts, flags=flags, sized=smaller_side)
    return G0, S.view(Bn, K), counts.view(Bn, K), flags.view(Bn, K), le.tolist()


def _gram_ref(z, mode, center):
    M = T.class_matrices(z.to(torch.float64), mode)
    if center:
        M = M - M.mean(-2, keepdim=True)
    m, n = M.shape[-2:]
    return (M @ M.transpose(-1, -2) if m <= n else M.transpose(-1, -2) @ M).flatten(0, 1)


def _masked_gram_ref(f, lab, K, b=0):
    """The K centred C x C Grams of sample b's masked features in float64, [K, C, C]."""
    x = f[b].double().reshape(f.shape[1], -1)
    out = []
    for k in range(K):
        X = x[:, lab[b].reshape(-1) == k].T
        X = X - X.mean(0, keepdim=True)
        out.append(X.T @ X)
    return torch.stack(out)


_EMU_ATOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-5, torch.bfloat16: 1e-5}


@built_with_cuda
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(B_=st.integers(1, 2), K=st.integers(1, 2), D=st.integers(1, 24), H=st.integers(1, 9), W=st.integers(1, 9),
       mode=st.sampled_from(list(T.LAYOUTS)), dtype=st.sampled_from(list(_EMU_ATOL)), center=st.booleans(),
       offset=st.sampled_from([0.0, 40.0]), seed=st.integers(0, 2**31 - 1))
def test_emulated_decoded_kernels_match_the_oracle(emu, B_, K, D, H, W, mode, dtype, center, offset, seed):
    z = _rand((B_, K, D, H, W), dtype, seed, offset)
    G, S, flags = _emu_decoded(emu, z, mode, center=center)
    assert not flags.any()
    Gref = _gram_ref(z, mode, center)
    scale = float(Gref.abs().max()) or 1.0
    assert float((G - Gref).abs().max()) <= (1e-13 if dtype == torch.float64 else 1e-6) * scale * 10
    _assert_scale_close(S, _reference(z, mode, center=center), atol=_EMU_ATOL[dtype])


@pytest.mark.slow
@built_with_cuda
@pytest.mark.parametrize("shape,mode,dtype", [
    ((1, 1, 140, 3, 50), "D_HW", torch.float32),   # p = 140 > 128: column-mean pre-pass, 2 x 2 float tiles
    ((1, 1, 100, 3, 40), "D_HW", torch.float64),   # p = 100 > 96: the same for double tiles
    ((1, 1, 300, 100), "D_HW", torch.float64),     # column side (m > n), shifted covariance over 2 x 2 tiles
    ((1, 2, 90, 3, 40), "D_HW", torch.float32),    # p = 90: one 96-tile, centred in the block
    ((1, 2, 20, 9, 30), "W_DH", torch.float32),    # rows contiguous: p-fast loads
    ((2, 2, 1100, 3), "D_HW", torch.float32),      # column side, 1100 samples: 3 chunks per job
])
def test_emulated_decoded_tile_paths(emu, shape, mode, dtype):
    z = _rand(shape, dtype, 5, offset=5.0)
    _, S, _ = _emu_decoded(emu, z, mode)
    _assert_scale_close(S, auvcore.semantic_scale(z.to(torch.float64), layout=mode, backend="cpp").numpy(),
                        atol=_EMU_ATOL[dtype])


@built_with_cuda
def test_emulated_decoded_non_contiguous_nan_and_official(emu):
    base = _rand((3, 4, 14, 22, 18), torch.float32, 11)
    z = base.permute(0, 1, 4, 2, 3)[::2, 1:, :, ::2, 1:]
    _, S, _ = _emu_decoded(emu, z, "H_DW")
    _assert_scale_close(S, _reference(z, "H_DW"), atol=1e-5)

    z = _rand((1, 3, 5, 6, 7), torch.float64, 2)
    z[0, 1, 2, 3, 4] = float("nan")
    z[0, 2, 0, 0, 0] = float("-inf")
    _, S, flags = _emu_decoded(emu, z)
    assert flags.tolist() == [[0, 1, 1]]
    assert not math.isnan(S[0, 0]) and torch.isnan(S[0, 1:]).all()
    _, S, flags = _emu_decoded(emu, z, nan_to_num=True)
    assert not flags.any()
    _assert_scale_close(S, _reference(z, "D_HW", nan_to_num=True), atol=1e-12)
    _, S, _ = _emu_decoded(emu, z, variant="official")
    _assert_scale_close(S, _reference(z, "D_HW", variant="official", nan_to_num=True), atol=1e-12)

    zero = torch.zeros(1, 2, 4, 5, 6, dtype=torch.float64)
    zero[0, 1] = 2.5
    _, S, _ = _emu_decoded(emu, zero)
    assert S.tolist() == [[0.0, 0.0]]


@built_with_cuda
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(Bn=st.integers(1, 2), C=st.integers(1, 40), K=st.integers(1, 4), D=st.integers(1, 7), H=st.integers(1, 7),
       W=st.integers(1, 7), dtype=st.sampled_from([torch.float32, torch.float64]), center=st.booleans(),
       channels_last=st.booleans(), label_dtype=st.sampled_from([torch.int64, torch.int32, torch.int16, torch.uint8]),
       smaller_side=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_emulated_masked_kernels_match_cpu(emu, Bn, C, K, D, H, W, dtype, center, channels_last, label_dtype,
                                           smaller_side, seed):
    f, lab = _masked_case(Bn, C, K, (D, H, W), dtype, seed, channels_last, absent=[(0, K - 1)] if K > 1 else [])
    lab = lab.to(label_dtype)
    _, S, counts, flags, le = _emu_masked(emu, f, lab, K, center=center, smaller_side=smaller_side)
    assert le == [0, 0] and not flags.any()
    want_counts = torch.stack([torch.bincount(lab[b].reshape(-1).long(), minlength=K) for b in range(Bn)])
    assert torch.equal(counts, want_counts)
    want = auvcore.masked_semantic_scale(f.to(torch.float64), lab, K, center=center, backend="cpp")
    _assert_scale_close(S, want.numpy(), atol=_EMU_ATOL[dtype])


@pytest.mark.slow
@built_with_cuda
def test_emulated_masked_tiles_chunks_and_errors(emu):
    # C = 130 > 128: 2 x 2 tiles; one class of 1500 voxels: several chunks; a class of 1 voxel: NaN.
    f, lab = _masked_case(1, 130, 3, (10, 12, 14), torch.float32, 4)
    lab[0] = 0
    lab[0, :9] = 1
    lab[0, 9, 0, 0] = 2
    _, S, counts, _, _ = _emu_masked(emu, f, lab, 3)
    assert counts.tolist() == [[10 * 12 * 14 - 9 * 12 * 14 - 1, 9 * 12 * 14, 1]]
    _assert_scale_close(S, auvcore.masked_semantic_scale(f.double(), lab, 3, backend="cpp").numpy(), atol=1e-5)
    assert math.isnan(S[0, 2])
    bad = lab.clone()
    bad[0, 3, 4, 5] = 7
    _, _, counts, _, le = _emu_masked(emu, f[:, :4].contiguous(), bad, 3)
    assert le == [1, 7] and int(counts.sum()) == 10 * 12 * 14 - 1  # the bad voxel joins no class
    fn = f[:, :4].clone()
    fn[0, 2, 9, 0, 0] = float("nan")  # in the voxel of class 2
    _, S, _, flags, _ = _emu_masked(emu, fn, lab, 3)
    assert flags.tolist() == [[0, 0, 1]]
    fn = f.clone()
    fn[0, 2, 9, 0, 0] = float("nan")  # 1 voxel < C = 130: the row-side kernel must flag it too
    _, _, _, flags, _ = _emu_masked(emu, fn, lab, 3, smaller_side=True)
    assert flags.tolist() == [[0, 0, 1]]


@built_with_cuda
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("center", [True, False])
def test_emulated_masked_smaller_side(emu, dtype, center):
    # C = 40 channels; classes of 1, 2, 17, 39 (row side: n x n, dense at the slot's start), 40 and 300 voxels
    # (column side, C x C).
    sizes = [1, 2, 17, 39, 40, 300]
    K, C = len(sizes), 40
    lab = torch.cat([torch.full((n,), k) for k, n in enumerate(sizes)])
    lab = lab[torch.randperm(len(lab), generator=torch.Generator().manual_seed(0))].view(1, -1)
    f = _rand((1, C, lab.shape[1]), dtype, 2, offset=4.0)
    G, S, counts, flags, le = _emu_masked(emu, f, lab, K, center=center, smaller_side=True)
    assert counts.tolist() == [sizes] and le == [0, 0] and not flags.any()
    want = auvcore.masked_semantic_scale(f.to(torch.float64), lab, K, center=center, backend="cpp")
    _assert_scale_close(S, want.numpy(), atol=_EMU_ATOL[dtype])
    x = f.to(torch.float64)[0]
    for k, n in enumerate(sizes):
        M = x[:, lab[0] == k].T  # n x C
        if center:
            M = M - M.mean(0, keepdim=True)
        got = G[k].reshape(-1)[: n * n].view(n, n) if n < C else G[k]
        ref = M @ M.T if n < C else M.T @ M
        # Row side: the voxels in the counting sort's order, so the matrix up to a permutation.
        assert torch.equal(got, got.T)
        err = (torch.linalg.eigvalsh(got) - torch.linalg.eigvalsh(ref)).abs().max()
        assert float(err) <= 1e-5 * (float(ref.abs().max()) or 1.0)
    # The sized eigenvalues: the small side's spectrum, zero-padded to C.
    _, ev = _emu_scale(emu, G.clone(), C, counts=counts.view(-1), want_evals=True, sized=True)
    M = x[:, lab[0] == 2].T
    if center:
        M = M - M.mean(0, keepdim=True)
    ref = torch.linalg.eigvalsh(M @ M.T).flip(0)
    torch.testing.assert_close(ev[2, :17], ref, rtol=0, atol=1e-6 * float(ref[0]))
    assert not ev[2, 17:].any() and not ev[0, 1:].any()


@pytest.mark.slow
@built_with_cuda
def test_emulated_masked_many_classes_uses_global_histogram(emu):
    # K > 2048 classes: the histogram and the scatter skip shared memory and count with global atomics.
    K = 2100
    g = torch.Generator().manual_seed(0)
    f = torch.randn(1, 3, 3000, generator=g, dtype=torch.float64)
    lab = torch.randint(0, 6, (1, 3000), generator=g) * 400
    _, S, counts, _, le = _emu_masked(emu, f, lab, K)
    assert le == [0, 0]
    assert torch.equal(counts[0], torch.bincount(lab[0], minlength=K))
    _assert_scale_close(S, auvcore.masked_semantic_scale(f, lab, K, backend="cpp").numpy(), atol=1e-12)


@built_with_cuda
@pytest.mark.parametrize("p", [1, 2, 3, 31, 33, 80])
@pytest.mark.parametrize("optin", [227 * 1024, 8 * 1024])  # shared-memory matrix / in place in global memory
def test_emulated_eigen_kernel(emu, p, optin):
    emu.emu_set_optin(optin)
    try:
        g = torch.Generator().manual_seed(p)
        X = torch.randn(2, p, max(p - 3, 1), generator=g, dtype=torch.float64) * 1e3
        G = X @ X.transpose(-1, -2)
        want = torch.linalg.eigvalsh(G).flip(-1)
        counts = torch.tensor([p, max(p - 1, 0)])
        S, ev = _emu_scale(emu, G.clone(), p, counts=counts, want_evals=True)
        torch.testing.assert_close(ev, want, rtol=0, atol=1e-12 * float(want.abs().max()))
        for i in range(2):
            r = min(int(counts[i]), p)
            Sref, _ = T.entropy_scale(want[i], r, 1e-8, "paper")
            if r < 2:
                assert math.isnan(S[i])
            else:
                assert abs(float(S[i]) - float(Sref)) < 1e-12
    finally:
        emu.emu_set_optin(227 * 1024)


@built_with_cuda
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(n=st.integers(1, 40), kind=st.sampled_from(testing.KINDS), seed=st.integers(0, 2**32 - 1))
def test_emulated_eigen_kernel_on_adversarial_spectra(emu, n, kind, seed):
    """The CUDA eigen kernel (Householder + multisection, run under the host emulation) on the adversarial
    matrices of the CPU solver's tests: rank-deficient, clustered, 1e-30..1e30, denormal, Wilkinson."""
    a = testing.matrix(np.random.default_rng(seed), n, kind)
    want = np.linalg.eigvalsh(a)[::-1]
    S, ev = _emu_scale(emu, torch.from_numpy(a[None].copy()), n, r=n, want_evals=True)
    scale = max(np.abs(a).max(), np.finfo(float).tiny)
    assert np.isfinite(ev.numpy()).all()
    np.testing.assert_allclose(ev[0].numpy(), want, rtol=0, atol=50 * n * np.finfo(float).eps * scale + 1e-300)
    if n >= 2 and scale > 1e-250:
        # S from the kernel's own eigenvalues (checked above): an eigenvalue that is exactly 0 comes back as the
        # midpoint of its last bisection interval, and with ε = 1e-8 in absolute units even 1e-17 of energy
        # moves S by ~1e-9 (e.g. diag(0, -0.67, -2.3, 0)), so the oracle's spectrum is not the reference here.
        Sref, _ = T.entropy_scale(ev[0].clone(), n, 1e-8, "paper")
        assert abs(float(S[0]) - float(Sref)) < 1e-12


# ---- the analytic backward of S (csrc/cuda/scale_backward_cuda.cu) -------------------------------------------

def _cpu_backward_case(z, mode, center, eps, variant, grad_S):
    """The CPU kernel's eigenpairs and gradient, the oracle of the emulated CUDA backward."""
    from auvcore import _cpu

    nan_to_num = variant == "official"
    if variant == "official":
        center = False
    _, ev, vt = _cpu.semantic_scale(z, mode, center, eps, variant, nan_to_num, 1, eigenpairs=True)
    dz = _cpu.scale_backward(z, mode, center, eps, variant, nan_to_num, 1, ev, vt, grad_S)
    return center, ev, vt, dz


@built_with_cuda
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(B_=st.integers(1, 2), K=st.integers(1, 3), D=st.integers(1, 12), H=st.integers(1, 7), W=st.integers(1, 7),
       mode=st.sampled_from(list(T.LAYOUTS)), dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
       center=st.booleans(), variant=st.sampled_from(["paper", "official"]), eps=st.sampled_from([0.0, 1e-8, 1e-2]),
       offset=st.sampled_from([0.0, 30.0]), zero_grad=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_emulated_scale_backward_matches_the_cpu_kernel(emu, B_, K, D, H, W, mode, dtype, center, variant, eps,
                                                         offset, zero_grad, seed):
    z = _rand((B_, K, D, H, W), dtype, seed, offset)
    g = torch.Generator().manual_seed(seed + 1)
    grad_S = torch.randn(B_ * K, generator=g, dtype=torch.float64)
    if zero_grad:
        grad_S[0] = 0.0  # an excluded class: its gradient is exactly 0
    center, ev, vt, want = _cpu_backward_case(z, mode, center, eps, variant, grad_S)
    dz_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    got = emu_backward(emu, z, mode, center, eps, variant, ev, vt, grad_S, dz_dtype)
    assert torch.isfinite(got).all()
    scale = float(want.abs().max()) or 1.0
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    assert float((got.double() - want.double()).abs().max()) <= tol * scale
    if zero_grad:
        assert not got.view(B_ * K, -1)[0].any()


@built_with_cuda
@pytest.mark.parametrize("shape,mode", [
    ((1, 2, 40, 3, 3), "D_HW"),    # column side (m = 40 > n = 9): per-coordinate means
    ((2, 1, 5, 6, 9), "H_DW"),     # row side, several tiles of samples
    ((1, 1, 70, 50), "D_HW"),      # 4-D maps, column side, p = 50 > the 32-sample tile
])
def test_emulated_scale_backward_layouts_strides_and_nan(emu, shape, mode):
    z = _rand(shape, torch.float64, 3, offset=2.0)
    z = z.transpose(-1, -2).contiguous().transpose(-1, -2)  # non-contiguous input
    z[(0,) * (len(shape) - 1) + (1,)] = float("nan")  # read as 0; its gradient is 0
    grad_S = torch.linspace(-1.0, 2.0, shape[0] * shape[1], dtype=torch.float64)
    from auvcore import _cpu

    _, ev, vt = _cpu.semantic_scale(z, mode, True, 1e-8, "paper", True, 1, eigenpairs=True)
    want = _cpu.scale_backward(z, mode, True, 1e-8, "paper", True, 1, ev, vt, grad_S)
    for dz_strides in (None, "t"):
        got = emu_backward(emu, z, mode, True, 1e-8, "paper", ev, vt, grad_S, torch.float64, dz_strides)
        assert got[(0,) * (len(shape) - 1) + (1,)] == 0.0
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12 * float(want.abs().max()))


@built_with_cuda
def test_emulated_scale_backward_matches_torch_autograd_and_handles_repeated_eigenvalues(emu):
    # An independent oracle: autograd through the pure-torch S (float64), where it is well defined.
    z = _rand((1, 2, 6, 4, 5), torch.float64, 9)
    zt = z.clone().requires_grad_(True)
    T.semantic_scale(zt, "D_HW", True, 1e-8, "paper", False).sum().backward()
    from auvcore import _cpu

    _, ev, vt = _cpu.semantic_scale(z, "D_HW", True, 1e-8, "paper", False, 1, eigenpairs=True)
    got = emu_backward(emu, z, "D_HW", True, 1e-8, "paper", ev, vt, torch.ones(2, dtype=torch.float64),
                        torch.float64)
    torch.testing.assert_close(got, zt.grad, rtol=1e-8, atol=1e-10)
    # Orthonormal rows (all singular values equal) and a zero map: finite, and 0 where S is flat.
    q = torch.linalg.qr(torch.randn(20, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))[0].T
    z = torch.stack([q.reshape(4, 4, 5), torch.zeros(4, 4, 5, dtype=torch.float64)]).unsqueeze(0)
    _, ev, vt = _cpu.semantic_scale(z, "D_HW", False, 1e-8, "paper", False, 1, eigenpairs=True)
    got = emu_backward(emu, z, "D_HW", False, 1e-8, "paper", ev, vt, torch.ones(2, dtype=torch.float64),
                        torch.float64)
    assert torch.isfinite(got).all() and not got[0, 1].any()


@built_with_cuda
def test_emulated_scale_backward_errors(emu):
    z = _rand((1, 1, 4, 5, 6), torch.float32, 0)
    ev, vt = torch.zeros(1, 4, dtype=torch.float64), torch.zeros(1, 4, 4, dtype=torch.float64)
    gS = torch.ones(1, dtype=torch.float64)
    with pytest.raises(ValueError, match="dz: expected float32 or float64"):
        emu_backward(emu, z, "D_HW", True, 1e-8, "paper", ev, vt, gS, torch.float16)
    with pytest.raises(ValueError, match="eps: expected >= 0"):
        emu_backward(emu, z, "D_HW", True, -1.0, "paper", ev, vt, gS, torch.float32)
