"""The CUDA fused DUO loss (csrc/cuda/duo_cuda.cu) under the host emulation (csrc/cuda/emu): forward sums and
backward against the CPU kernel and the float64 torch oracle, on random and adversarial inputs, and run-to-run
bit identity. The emulation checks the kernels' indexing, reductions and formulas, not their speed, nor races
that a GPU's weaker memory ordering could expose.
"""
from __future__ import annotations

import ctypes
import math
import os
import sys

import pytest
import torch

import auvcore
from auvcore import _backend as B
from auvcore import _torch_impl as T
from auvcore.testing import duo_loss_reference

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from cuda_common import EMU_DT, built_with_cuda, check_rc, duo_inputs, emu_library, i64, ptr  # noqa: E402


_HALF = (torch.float16, torch.bfloat16)
_CHUNK = 256 * 32  # voxels per block of the CUDA kernels
_G = 4             # index of Σ ĝ among the six sums

pytestmark = built_with_cuda


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    return emu_library(tmp_path_factory)


def _common(z, n, y):
    return (ptr(z), ptr(n), EMU_DT[z.dtype], i64(z.shape), i64(z.stride()), i64(n.stride()), ptr(y),
            EMU_DT[y.dtype], y.dim(), i64(y.shape), i64(y.stride()))


def emu_forward(lib, z, n, y, labels, c0, preset, tau=0.5):
    """sums [B, K - c0, 6] and status [flags, first bad target index] from the emulated forward."""
    Bn, K = z.shape[:2]
    sums = torch.full((Bn, K - c0, 6), float("nan"), dtype=torch.float64)  # must be overwritten
    status = torch.full((2,), 7, dtype=torch.int64)
    err = ctypes.create_string_buffer(512)
    check_rc(lib.emu_duo_forward(*_common(z, n, y), int(labels), ctypes.c_int64(c0), int(preset), ctypes.c_double(tau),
                               ptr(sums), ptr(status), err, 512), err)
    return sums, status.tolist()


def emu_backward(lib, z, n, y, labels, c0, preset, grad, tau=0.5, want_dn=True, out_strides=None):
    dz = torch.full(z.shape, float("nan"), dtype=z.dtype)
    dn = torch.full(z.shape, float("nan"), dtype=z.dtype) if want_dn else None
    if out_strides is not None:  # strided outputs: views of larger buffers
        dz = torch.full(z.shape[:2] + (2 * z.shape[2],), float("nan"), dtype=z.dtype)[..., ::2]
        dn = torch.full(z.shape[:2] + (2 * z.shape[2],), float("nan"), dtype=z.dtype)[..., ::2] if want_dn else None
    err = ctypes.create_string_buffer(512)
    check_rc(lib.emu_duo_backward(*_common(z, n, y), int(labels), ctypes.c_int64(c0), int(preset),
                                ctypes.c_double(tau), ptr(grad.contiguous()), ptr(dz), i64(dz.stride()), ptr(dn),
                                i64(dn.stride() if dn is not None else dz.stride()), err, 512), err)
    return dz, dn


def cpu_forward(z, n, y, labels, c0, preset, tau=0.5):
    Bn, K = z.shape[:2]
    sums = torch.empty(Bn, K - c0, 6, dtype=torch.float64)
    B._C.duo_forward(B.view(z), B.view(n), B.view(y), labels, c0, preset, tau, B.view(sums), 1)
    return sums


def cpu_backward(z, n, y, labels, c0, preset, grad, tau=0.5):
    dz, dn = torch.empty(z.shape, dtype=z.dtype), torch.empty(z.shape, dtype=z.dtype)
    B._C.duo_backward(B.view(z), B.view(n), B.view(y), labels, c0, preset, tau, B.view(grad.contiguous()),
                      B.view(dz), B.view(dn), 1)
    return dz, dn


def onehot(y, labels, K):
    return torch.nn.functional.one_hot(y.long(), K).movedim(-1, 1) if labels else y


def oracle_sums(z, n, y, labels, c0, preset, tau=0.5):
    """The six sums in float64 by torch ops (the torch path of DUOLoss), and a magnitude for each: the sum of
    the absolute values of what is added, so that sums that cancel (Σ ĝ; BCE = softplus(z) − z ỹ, small
    where ỹ follows z) are held to a relative error of what float arithmetic can resolve."""
    K = z.shape[1]
    zd, nd, yd = z.double(), n.double(), onehot(y, labels, K).double()
    variant = ("paper", "official")[preset]
    ref = T.duo_sums(zd, nd, yd, c0, variant, tau)
    zc, nc, yc = zd[:, c0:], nd[:, c0:], yd[:, c0:]
    yt = (yc - torch.sigmoid(nc) * yc) if preset else torch.clamp(yc - tau * torch.tanh(nc), 0, 1)
    mag = ref.abs()
    mag[..., 0] = (torch.nn.functional.softplus(zc) + zc.abs() * yt).sum(-1)
    mag[..., _G] = torch.tanh(nc.abs()).sum(-1)
    return ref, mag


def assert_sums_close(got, want, mag, rel, N=1):
    """|got − want| <= rel·mag, plus, in float32, N·1e-36: the float kernels' exp floors at e^-87 (σ(−1e4)
    is 1.6e-38 there, 0 in float64)."""
    assert got.shape == want.shape
    assert torch.isfinite(got).all()
    err = (got - want).abs()
    bound = rel * mag + (1e-300 if rel < 1e-8 else 1e-36 * N)
    assert bool((err <= bound).all()), f"max rel err {float((err / (mag + 1e-300)).max()):.3g}"


def make_case(Bn, K, N, dtype, labels, kind, seed, ydtype=None, strided=False):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(Bn, K, N, generator=g, dtype=torch.float64) * 4
    n = torch.randn(Bn, K, N, generator=g, dtype=torch.float64)
    lab = torch.randint(0, K, (Bn, N), generator=g)
    if kind == "extreme":  # logits at ±1e4 (and 0), noise logits far into tanh's saturation
        pick = torch.randint(0, 3, z.shape, generator=g)
        z = torch.where(pick == 0, -1e4, torch.where(pick == 1, 1e4, 0.0)).double()
        n = torch.where(torch.rand(n.shape, generator=g) < 0.5, -1e4, 1e4).double()
    elif kind == "one_class":  # every label the same class; noise exactly 0 (ĝ = 0, ỹ = y on the clamp's edge)
        lab[:] = K - 1
        n = torch.zeros_like(n)
    elif kind == "tiny":  # logits near 0: the series branches of tanh and the clamp's edges
        z = z * 1e-6
        n = n * 1e-6
    z, n = z.to(dtype), n.to(dtype)
    if strided:  # channels-last-like views: voxels not contiguous
        z = z.transpose(1, 2).contiguous().transpose(1, 2)
        n = n.transpose(1, 2).contiguous().transpose(1, 2)
    if labels:
        y = lab.to(ydtype or torch.int64)
    else:
        y = torch.nn.functional.one_hot(lab, K).movedim(-1, 1).contiguous()
        if kind == "random":  # soft targets
            y = torch.rand(Bn, K, N, generator=g, dtype=torch.float64)
        y = y.to(ydtype or (torch.float32 if dtype in _HALF else dtype))
    return z, n, y


def compute_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(Bn=st.integers(1, 3), K=st.integers(1, 6), N=st.sampled_from([1, 3, 7, 255, 257, 1001, 2049]),
       dtype=st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16]), labels=st.booleans(),
       preset=st.sampled_from([0, 1]), kind=st.sampled_from(["random", "extreme", "one_class", "tiny"]),
       background=st.booleans(), strided=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_emulated_forward_and_backward_match_the_cpu_kernel_and_the_oracle(emu, Bn, K, N, dtype, labels, preset,
                                                                           kind, background, strided, seed):
    c0 = 0 if background or K == 1 else 1
    z, n, y = make_case(Bn, K, N, dtype, labels, kind, seed, strided=strided)
    sums, status = emu_forward(emu, z, n, y, labels, c0, preset)
    assert status == [0, -1]
    # The CPU kernel reads float32/float64: halves are given to it widened (exactly), as DUOLoss does.
    cd = compute_dtype(dtype)
    zc, nc = z.to(cd), n.to(cd)
    ref, mag = oracle_sums(zc, nc, y, labels, c0, preset)
    rel = 1e-10 if dtype == torch.float64 else 1e-5
    assert_sums_close(sums, cpu_forward(zc, nc, y, labels, c0, preset), mag, rel, N)
    assert_sums_close(sums, ref, mag, rel, N)
    again, _ = emu_forward(emu, z, n, y, labels, c0, preset)
    assert torch.equal(sums, again)  # bit-identical

    grad = torch.randn(Bn, K - c0, 6, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    dz, dn = emu_backward(emu, z, n, y, labels, c0, preset, grad, out_strides=strided or None)
    wz, wn = cpu_backward(zc, nc, y, labels, c0, preset, grad)
    if dtype in _HALF:  # the kernel computes in float32 and rounds once to the half type
        tol = dict(rtol=2 ** -8 if dtype == torch.float16 else 2 ** -5, atol=1e-6 * float(grad.abs().max()))
        torch.testing.assert_close(dz.float(), wz.to(dtype).float(), **tol)
        torch.testing.assert_close(dn.float(), wn.to(dtype).float(), **tol)
    else:
        scale = float(grad.abs().max())
        torch.testing.assert_close(dz, wz, rtol=rel, atol=rel * scale)
        torch.testing.assert_close(dn, wn, rtol=rel, atol=rel * scale)
    if c0:
        assert not dz[:, :c0].any() and not dn[:, :c0].any()
    if preset == 1:
        assert not dn.any()  # the official preset's ỹ is detached
    dz2, dn2 = emu_backward(emu, z, n, y, labels, c0, preset, grad, out_strides=strided or None)
    assert torch.equal(dz, dz2) and torch.equal(dn, dn2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_emulated_gradient_matches_autograd_of_the_oracle(emu, dtype):
    """The emulated backward against torch autograd through the oracle's six sums (float64)."""
    Bn, K, N, c0 = 2, 3, 517, 1
    z, n, y = make_case(Bn, K, N, dtype, True, "random", 3)
    grad = torch.randn(Bn, K - c0, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    zd, nd = z.double().requires_grad_(), n.double().requires_grad_()
    (T.duo_sums(zd, nd, onehot(y, True, K), c0, "paper", 0.5) * grad).sum().backward()
    dz, dn = emu_backward(emu, z, n, y, True, c0, 0, grad)
    rel = 1e-10 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(dz.double(), zd.grad, rtol=rel, atol=rel * float(grad.abs().max()))
    torch.testing.assert_close(dn.double(), nd.grad, rtol=rel, atol=rel * float(grad.abs().max()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_emulated_several_chunks_per_class_are_reduced_in_a_fixed_order(emu, dtype):
    # 2 full chunks and a partial one per (b, c): the second pass sums the chunks' partials.
    Bn, K, N, c0 = 2, 3, 2 * _CHUNK + 37, 1
    z, n, y = make_case(Bn, K, N, dtype, True, "random", 5, ydtype=torch.uint8)
    sums, status = emu_forward(emu, z, n, y, True, c0, 0)
    assert status == [0, -1]
    zc, nc = z.to(compute_dtype(dtype)), n.to(compute_dtype(dtype))
    ref, mag = oracle_sums(zc, nc, y, True, c0, 0)
    assert_sums_close(sums, ref, mag, 1e-10 if dtype == torch.float64 else 1e-5)
    for _ in range(2):
        assert torch.equal(emu_forward(emu, z, n, y, True, c0, 0)[0], sums)
    grad = torch.randn(Bn, K - c0, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    dz, dn = emu_backward(emu, z, n, y, True, c0, 0, grad)
    assert not dz.isnan().any() and not dn.isnan().any()  # every voxel of every chunk written
    wz, wn = cpu_backward(zc, nc, y, True, c0, 0, grad)
    if dtype in _HALF:
        wz, wn, dz, dn = wz.to(dtype).float(), wn.to(dtype).float(), dz.float(), dn.float()
        tol = dict(rtol=2 ** -5, atol=1e-6)
    else:
        tol = dict(rtol=1e-5, atol=1e-5 * float(grad.abs().max()))
    torch.testing.assert_close(dz, wz, **tol)
    torch.testing.assert_close(dn, wn, **tol)


def test_emulated_many_classes_one_voxel_and_target_dtypes(emu):
    for Bn, K, N in ((1, 40, 5), (2, 3, 1), (1, 1, 1)):
        c0 = 1 if K > 1 else 0
        for ydtype in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
            z, n, y = make_case(Bn, K, N, torch.float64, True, "random", K + N, ydtype=ydtype)
            sums, _ = emu_forward(emu, z, n, y, True, c0, 0)
            ref, mag = oracle_sums(z, n, y, True, c0, 0)
            assert_sums_close(sums, ref, mag, 1e-10)
        for ydtype in (torch.float32, torch.float64, torch.uint8, torch.int64):  # one-hot of any numeric dtype
            z, n, y = make_case(Bn, K, N, torch.float32, False, "one_class", K, ydtype=ydtype)
            sums, _ = emu_forward(emu, z, n, y, False, c0, 1)
            assert_sums_close(sums, cpu_forward(z, n, y, False, c0, 1), oracle_sums(z, n, y, False, c0, 1)[1], 1e-5)


def test_emulated_loss_matches_duo_loss_reference(emu):
    """The loss finished from the emulated sums (DUOLoss._from_sums, the formula's one home) against the
    independent float64 oracle auvcore.testing.duo_loss_reference."""
    Bn, K = 2, 3
    z, n, y = make_case(Bn, K, 6 * 7 * 8, torch.float64, True, "random", 9)
    z5, n5 = z.view(Bn, K, 6, 7, 8), n.view(Bn, K, 6, 7, 8)
    sums, _ = emu_forward(emu, z, n, y, True, 1, 0)
    loss = auvcore.DUOLoss(to_onehot_y=True, reduction="none", tau=0.5)  # emu_forward's τ
    per, _, _ = loss._from_sums(z5, sums, z5.shape, z5.dtype)
    want = duo_loss_reference(z5, n5, onehot(y, True, K).view(Bn, K, 6, 7, 8), tau=0.5)
    torch.testing.assert_close(per, want, rtol=1e-10, atol=1e-12)


def test_emulated_forward_reports_bad_inputs(emu):
    Bn, K, N = 2, 3, 300
    z, n, y = make_case(Bn, K, N, torch.float32, True, "random", 1)
    bad = z.clone()
    bad[1, 2, 17] = float("nan")
    assert emu_forward(emu, bad, n, y, True, 1, 0)[1] == [1, -1]
    bad = n.clone()
    bad[0, 1, 5] = float("-inf")
    assert emu_forward(emu, z, bad, y, True, 1, 0)[1] == [2, -1]
    bad = y.clone()
    bad[1, 200], bad[1, 299], bad[0, 250] = 3, -1, 7
    flags, first = emu_forward(emu, z, n, bad, True, 1, 0)[1]
    assert flags == 4 and first == 250  # the smallest flat index b·N + t of a bad label
    # an excluded class's NaN logit is not read (as on the CPU)
    bad = z.clone()
    bad[0, 0, 3] = float("nan")
    assert emu_forward(emu, bad, n, y, True, 1, 0)[1] == [0, -1]
    soft = torch.rand(Bn, K, N, generator=torch.Generator().manual_seed(0))
    soft[1, 2, 10] = 1.5
    soft[1, 1, 11] = float("nan")
    flags, first = emu_forward(emu, z, n, soft, False, 1, 0)[1]
    assert flags == 4 and first == (1 * K + 1) * N + 11


def test_emulated_entry_points_check_their_arguments(emu):
    z, n, y = make_case(1, 3, 10, torch.float32, True, "random", 0)
    zi = torch.zeros(1, 3, 10, dtype=torch.int32)
    with pytest.raises(ValueError, match="seg_logits: expected float16, bfloat16, float32 or float64"):
        emu_forward(emu, zi, zi, y, True, 1, 0)
    with pytest.raises(ValueError, match=r"target: expected \[B, N\] class indices"):
        emu_forward(emu, z, n, y[:, :5], True, 1, 0)
    with pytest.raises(ValueError, match="include_background"):
        emu_forward(emu, z, n, y, True, 3, 0)
    with pytest.raises(ValueError, match="target: expected float32, float64 or an integer dtype"):
        emu_forward(emu, z, n, torch.zeros(1, 3, 10, dtype=torch.float16), False, 1, 0)


def test_float_to_half_rounding_matches_torch(emu):
    """The backward's float -> half/bfloat16 rounding (integer arithmetic, the same bits on the GPU and here)
    against torch's, through the kernel: with grad_sums = (0, 0, 1, 0, 0, 0), dz = σ'(z) exactly as computed
    in float32, so the emulated half output must be torch's rounding of the emulated float32 output."""
    g = torch.Generator().manual_seed(0)
    z = (torch.randn(1, 1, 4096, generator=g) * 6).float()
    n = torch.zeros_like(z)
    y = torch.zeros(1, 4096, dtype=torch.int64)
    grad = torch.zeros(1, 1, 6, dtype=torch.float64)
    grad[..., 2] = 1.0
    for scale in (1.0, 1e-5, 6e4, 7e4):  # normals, subnormal halves, near and past half's largest value
        grad[..., 2] = scale
        ref, _ = emu_backward(emu, z, n, y, True, 0, 0, grad, want_dn=False)
        for dt in _HALF:
            got, _ = emu_backward(emu, z.to(dt), n.to(dt), y, True, 0, 0, grad, want_dn=False)
            # the half kernel computes from the rounded inputs: compare with float32 from the same inputs
            ref_h, _ = emu_backward(emu, z.to(dt).float(), n.to(dt).float(), y, True, 0, 0, grad, want_dn=False)
            assert torch.equal(got.view(torch.int16), ref_h.to(dt).view(torch.int16)), (dt, scale)
        assert not math.isnan(float(ref.sum()))


# ---- DUOLoss's CUDA branch on CPU tensors ---------------------------------------------------------------------

def _emulated_cuda_path(monkeypatch, lib):
    """DUOLoss as it runs on a GPU, without one: ``_path`` answers "cuda", so the Python code of the CUDA branch
    runs (half logits read as they are, S from a float32 copy, the fused backward's own gradients), and
    ``auvcore._cuda``'s fused-loss entry points run duo_cuda.cu's kernels under the host emulation. S itself
    comes from the CPU kernels (its CUDA twin is checked against them in test_cuda_emulated.py)."""
    from auvcore import _cuda

    calls = []

    def duo_sums(z, n, y, labels, c0, variant, tau, check=True):
        calls.append(("sums", check))
        sums, status = emu_forward(lib, z, n, y, labels, c0, variant, tau)
        if check:
            _cuda._raise_duo_status(status, y, bool(labels), int(z.shape[1]), int(z.shape[2]))
        return sums

    def duo_backward(z, n, y, labels, c0, variant, tau, grad_sums, want_dn=True):
        calls.append(("backward", want_dn))
        return emu_backward(lib, z, n, y, labels, c0, variant, grad_sums.double(), tau, want_dn=want_dn)

    monkeypatch.setattr(_cuda, "duo_sums", duo_sums)
    monkeypatch.setattr(_cuda, "duo_backward", duo_backward)
    monkeypatch.setattr(auvcore.DUOLoss, "_path", lambda self, z: "cuda")
    return calls


def _step(loss, z, n, y):
    zz, nn_ = z.clone().requires_grad_(), n.clone().requires_grad_()
    out = loss(zz, nn_, y)
    out.backward()
    return out.detach(), zz.grad, nn_.grad


@pytest.mark.parametrize("variant,dtype,labels", [
    ("paper", torch.float32, True), ("paper", torch.float64, False), ("paper", torch.bfloat16, True),
    ("official", torch.float32, False), ("official", torch.float64, True), ("official", torch.bfloat16, False),
])
def test_cuda_branch_of_duo_loss_keeps_the_cpu_gradient_contract(emu, monkeypatch, variant, dtype, labels):
    """Same loss and gradients as the CPU path, and the same None where a tensor gets no gradient (the official
    variant's noise logits: its ỹ is detached), through the Python code the CUDA path runs (issue 22)."""
    z, n, y = duo_inputs(2, 3, (5, 6, 7), dtype, 4, labels)
    loss = auvcore.DUOLoss(to_onehot_y=labels, variant=variant)
    want = _step(loss, z, n, y)
    calls = _emulated_cuda_path(monkeypatch, emu)
    got = _step(loss, z, n, y)
    assert [c[0] for c in calls] == ["sums", "backward"], "the CUDA branch must call the CUDA kernels"
    assert (got[2] is None) == (want[2] is None) == (variant == "official")
    rel = {torch.float64: 1e-10, torch.float32: 1e-5}.get(dtype)
    torch.testing.assert_close(got[0], want[0], rtol=rel or 1e-5, atol=1e-6)
    for a, b in zip(got[1:], want[1:]):
        if b is None:
            continue
        assert a.dtype == b.dtype == dtype
        if rel is None:  # half logits: see test_cuda_branch_half_gradients_round_each_part_once
            tol = dict(rtol=2 ** -6, atol=2 ** -7 * float(b.abs().max().float()))
        else:
            tol = dict(rtol=rel, atol=rel * float(b.abs().max()))
        torch.testing.assert_close(a.float(), b.float(), **tol)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_branch_half_gradients_round_each_part_once(emu, monkeypatch, dtype):
    """Half logits on the CUDA path: the fused kernel returns its part of dL/dz in the logits' dtype, and S's
    backward its part (in float32, from the float32 copy S read); autograd rounds and adds the two in the half
    type. The CPU path widens the logits first and rounds the float32 total once. Where the parts cancel the
    two differ by up to about one unit in the last place of the larger part, which can be most of a near-zero
    gradient (the 7 % at 2e-7 of issue 22): both are right to that unit, so the bound is one ulp of the
    largest gradient, checked here against the float64 gradient of the same half inputs."""
    z, n, y = duo_inputs(2, 3, (8, 9, 10), dtype, 2)  # the GPU test's case
    loss = auvcore.DUOLoss(to_onehot_y=True)
    want = _step(loss, z, n, y)  # CPU: float32 throughout, one rounding
    exact = _step(loss, z.double(), n.double(), y)  # float64 gradient of the same (exactly widened) inputs
    _emulated_cuda_path(monkeypatch, emu)
    got = _step(loss, z, n, y)
    ulp = 2.0 ** -10 if dtype == torch.float16 else 2.0 ** -7
    for a, b, x in zip(got[1:], want[1:], exact[1:]):
        scale = float(x.abs().max())
        for t in (a, b):  # each within one ulp of the largest gradient of the float64 answer
            assert float((t.double() - x).abs().max()) <= ulp * scale
        torch.testing.assert_close(a.float(), b.float(), rtol=ulp, atol=ulp * scale)


def test_cuda_branch_input_checks_are_optional(emu, monkeypatch):
    """check_inputs=False skips the CUDA path's device-to-host reads (the status of the fused forward, S's
    non-finite flags): a NaN logit then gives a NaN loss instead of the error."""
    z, n, y = duo_inputs(1, 3, (4, 5, 6), torch.float32, 0)
    calls = _emulated_cuda_path(monkeypatch, emu)
    bad = z.clone()
    bad[0, 1, 2, 3, 4] = float("nan")
    with pytest.raises(ValueError, match="seg_logits: contains NaN or Inf"):
        auvcore.DUOLoss(to_onehot_y=True)(bad, n, y)
    assert calls[-1] == ("sums", True)
    val = auvcore.DUOLoss(to_onehot_y=True, check_inputs=False)(bad, n, y)
    assert calls[-1] == ("sums", False) and torch.isnan(val)


class _DeviceReads(torch.overrides.TorchFunctionMode):
    """Records every read of a tensor's values into Python made by auvcore's own code (on a GPU: a device-to-host
    copy, which stalls the step and breaks CUDA graph capture); the emulated kernels' helpers in this file, which
    stand in for the device, are not counted."""
    READS = {"__bool__", "item", "tolist", "cpu", "numpy", "__float__", "__int__", "__index__", "nonzero"}
    PACKAGE = os.path.dirname(auvcore.__file__)

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in self.READS:
            f = sys._getframe(1)
            while f is not None and "torch" in f.f_code.co_filename.split(os.sep)[-3:-1]:
                f = f.f_back  # torch's own wrappers (Tensor.__bool__ → __torch_function__)
            if f is not None and f.f_code.co_filename.startswith(self.PACKAGE):
                self.reads.append(f"{name} at {os.path.basename(f.f_code.co_filename)}:{f.f_lineno}")
        return func(*args, **(kwargs or {}))


def _reads(loss, z, n, y):
    zz, nn_ = z.clone().requires_grad_(), n.clone().requires_grad_()
    spy = _DeviceReads()
    with spy:
        loss(zz, nn_, y).backward()
    return spy.reads


@pytest.mark.parametrize("variant,labels,detach_scale,alpha", [
    ("paper", True, False, 0.5), ("official", False, False, 0.5), ("paper", True, True, 0.5), ("paper", False, False, 0.0)])
def test_cuda_branch_without_input_checks_reads_nothing_back(emu, monkeypatch, variant, labels, detach_scale, alpha):
    """check_inputs=False: the CUDA branch's forward and backward read no tensor back into Python (issue 22: no
    host synchronisation per step, so the step can be captured in a CUDA graph)."""
    z, n, y = duo_inputs(1, 3, (4, 5, 6), torch.float32, 0, labels)
    _emulated_cuda_path(monkeypatch, emu)
    loss = auvcore.DUOLoss(to_onehot_y=labels, variant=variant, detach_scale=detach_scale, alpha=alpha,
                           check_inputs=False)
    assert _reads(loss, z, n, y) == []


def test_the_read_spy_sees_the_input_checks(emu, monkeypatch):
    """The control of the test above: with its checks on, the same branch reads back whether float class indices
    are whole numbers (the kernel's own checks come back through the emulation's helpers, not counted here)."""
    z, n, y = duo_inputs(1, 3, (4, 5, 6), torch.float32, 0, True)
    _emulated_cuda_path(monkeypatch, emu)
    y = y.float()
    assert _reads(auvcore.DUOLoss(to_onehot_y=True, check_inputs=False), z, n, y) == []
    reads = _reads(auvcore.DUOLoss(to_onehot_y=True), z, n, y)
    assert reads and all("duo.py" in r for r in reads), reads
