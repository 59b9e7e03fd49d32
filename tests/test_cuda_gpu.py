"""CUDA kernels on a GPU (marked ``cuda``; they skip cleanly without a GPU, a CUDA build of torch and of
auvcore)."""
from __future__ import annotations

import pytest
import torch

import auvcore
from auvcore import _backend as B
from auvcore import _torch_impl as T

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from cuda_common import (  # noqa: E402
    _FLOAT_TOL, _assert_scale_close, _masked_case, _rand, _reference, duo_inputs, gpu,
)


@pytest.mark.cuda
@gpu
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(B_=st.integers(1, 2), K=st.integers(1, 3), D=st.integers(1, 20), H=st.integers(1, 12), W=st.integers(1, 12),
       mode=st.sampled_from(list(T.LAYOUTS)), dtype=st.sampled_from([torch.float32, torch.float64]),
       center=st.booleans(), offset=st.sampled_from([0.0, 50.0]), seed=st.integers(0, 2**31 - 1))
def test_decoded_matches_svd_reference(B_, K, D, H, W, mode, dtype, center, offset, seed):
    z = _rand((B_, K, D, H, W), dtype, seed, offset)
    S = auvcore.semantic_scale(z.cuda(), layout=mode, center=center, backend="cuda")
    assert S.device.type == "cuda" and S.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    _assert_scale_close(S, _reference(z, mode, center=center), atol=_FLOAT_TOL[dtype])


@pytest.mark.cuda
@gpu
@pytest.mark.parametrize("shape,mode", [
    ((1, 2, 140, 3, 50), "D_HW"),   # row side, p = 140 > the largest tile: column-mean pre-pass, 2 x 2 tiles
    ((1, 2, 300, 4, 5), "D_HW"),    # column side (m > n): shifted one-pass covariance
    ((2, 3, 40, 9, 70), "W_DH"),    # row side with the rows contiguous (p-fast loads)
    ((1, 1, 520, 600), "D_HW"),     # 2-D, p = 520: eigen solver in global memory
    ((1, 2, 96, 24, 24), "H_DW"),   # p = 24 < n, D folded into columns with stride
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_decoded_shapes_that_cross_tile_and_memory_limits(shape, mode, dtype):
    z = _rand(shape, dtype, 7, offset=5.0)
    S = auvcore.semantic_scale(z.cuda(), layout=mode, backend="cuda")
    _assert_scale_close(S, auvcore.semantic_scale(z.to(torch.float64), layout=mode, backend="cpp").numpy(),
                        atol=_FLOAT_TOL[dtype])


@pytest.mark.cuda
@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_decoded_half_inputs_accumulate_in_float32(dtype):
    z = _rand((2, 3, 12, 10, 11), dtype, 1)
    S = auvcore.semantic_scale(z.cuda(), backend="cuda")
    assert S.dtype == torch.float32
    _assert_scale_close(S, _reference(z.to(torch.float64), "D_HW"), atol=1e-4)


@pytest.mark.cuda
@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_decoded_non_contiguous_input(dtype):
    base = _rand((3, 4, 14, 22, 18), dtype, 11).cuda()
    z = base.permute(0, 1, 4, 2, 3)[::2, 1:, :, ::2, 1:]  # odd strides, a negative-free view
    assert not z.is_contiguous()
    S = auvcore.semantic_scale(z, layout="H_DW", backend="cuda")
    _assert_scale_close(S, _reference(z.cpu(), "H_DW"), atol=_FLOAT_TOL[dtype])


@pytest.mark.cuda
@gpu
def test_decoded_official_variant_and_nan_handling():
    z = _rand((2, 3, 8, 9, 10), torch.float64, 5)
    z[0, 1, 2, 3, 4] = float("nan")
    z[1, 2, 0, 0, 0] = float("inf")
    zc = z.cuda()
    with pytest.raises(ValueError, match="NaN or Inf"):
        auvcore.semantic_scale(zc, backend="cuda")
    S = auvcore.semantic_scale(zc, nan_to_num=True, backend="cuda")
    _assert_scale_close(S, _reference(z, "D_HW", nan_to_num=True), atol=1e-9)
    So = auvcore.semantic_scale(zc, variant="official", backend="cuda")
    _assert_scale_close(So, _reference(z, "D_HW", variant="official", nan_to_num=True), atol=1e-9)


@pytest.mark.cuda
@gpu
def test_decoded_degenerate_cases():
    z = torch.zeros(1, 2, 6, 7, 8, dtype=torch.float64, device="cuda")
    z[0, 1] = 3.0  # constant map: centred it is all zero
    S = auvcore.semantic_scale(z, backend="cuda")
    assert S.tolist() == [[0.0, 0.0]]
    z1 = torch.randn(1, 2, 1, 7, 8, device="cuda")  # m = 1 -> r = 1 -> NaN
    assert torch.isnan(auvcore.semantic_scale(z1, backend="cuda")).all()


@pytest.mark.cuda
@gpu
def test_gram_and_eigenvalues_match_torch():
    from auvcore import _cuda

    z = _rand((2, 2, 30, 7, 9), torch.float64, 3, offset=20.0).cuda()
    G, ev = _cuda.gram_and_eigenvalues(z, "D_HW")
    M = T.class_matrices(z, "D_HW")
    M = M - M.mean(-2, keepdim=True)
    Gref = M @ M.transpose(-1, -2)
    torch.testing.assert_close(G, Gref, rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(ev, torch.linalg.eigvalsh(Gref).flip(-1), rtol=0, atol=1e-10 * float(ev.max()))


@pytest.mark.cuda
@gpu
@pytest.mark.parametrize("p", [1, 2, 3, 17, 64, 65, 128, 140, 257, 512, 700])
def test_eigen_kernel_on_random_psd_matrices(p):
    g = torch.Generator().manual_seed(p)
    X = torch.randn(3, p, max(p // 2, 1), generator=g, dtype=torch.float64)
    G = (X @ X.transpose(-1, -2)).cuda()
    want = torch.linalg.eigvalsh(G).flip(-1)
    Gw = G.clone()
    S = torch.empty(3, dtype=torch.float64, device="cuda")
    ev = torch.empty(3, p, dtype=torch.float64, device="cuda")
    stream = torch.cuda.current_stream().cuda_stream
    B._C.cuda_scale_from_gram(B.view(Gw), B.view(None), p, 1e-8, 0, B.view(None), B.view(S), B.view(ev), stream)
    torch.testing.assert_close(ev, want, rtol=0, atol=1e-11 * float(want.abs().max()))
    if p >= 2:
        Sref, _ = T.entropy_scale(want, p, 1e-8, "paper")
        torch.testing.assert_close(S, Sref, rtol=0, atol=1e-10)


@pytest.mark.cuda
@gpu
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(Bn=st.integers(1, 2), C=st.integers(1, 70), K=st.integers(1, 5), D=st.integers(1, 9), H=st.integers(1, 9),
       W=st.integers(1, 9), dtype=st.sampled_from([torch.float32, torch.float64]), center=st.booleans(),
       channels_last=st.booleans(), label_dtype=st.sampled_from([torch.int64, torch.int32, torch.uint8]),
       seed=st.integers(0, 2**31 - 1))
def test_masked_matches_cpu(Bn, C, K, D, H, W, dtype, center, channels_last, label_dtype, seed):
    f, lab = _masked_case(Bn, C, K, (D, H, W), dtype, seed, channels_last, absent=[(0, K - 1)] if K > 1 else [])
    lab = lab.to(label_dtype)
    S = auvcore.masked_semantic_scale(f.cuda(), lab.cuda(), K, center=center, backend="cuda")
    want = auvcore.masked_semantic_scale(f.to(torch.float64), lab, K, center=center, backend="cpp")
    _assert_scale_close(S, want.numpy(), atol=_FLOAT_TOL[dtype])


@pytest.mark.cuda
@gpu
@pytest.mark.parametrize("C", [130, 256])
def test_masked_wide_features_and_large_classes(C):
    f, lab = _masked_case(1, C, 4, (16, 16, 12), torch.float32, 2)
    lab[0, :2] = 3  # one class of many voxels, spanning several chunks
    S = auvcore.masked_semantic_scale(f.cuda(), lab.cuda(), 4, backend="cuda")
    want = auvcore.masked_semantic_scale(f.to(torch.float64), lab, 4, backend="cpp")
    _assert_scale_close(S, want.numpy(), atol=1e-4)


@pytest.mark.cuda
@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_masked_smaller_side_for_small_classes(dtype):
    # The main job's shape (C = 512): classes of 1..511 voxels take the n x n row-side Gram, the rest C x C.
    sizes = [1, 3, 100, 511, 512, 3000]
    lab = torch.cat([torch.full((n,), k) for k, n in enumerate(sizes)])
    lab = lab[torch.randperm(len(lab), generator=torch.Generator().manual_seed(0))].view(1, -1)
    f = _rand((1, 512, lab.shape[1]), torch.float32, 3, offset=2.0).to(dtype)
    S = auvcore.masked_semantic_scale(f.cuda(), lab.cuda(), len(sizes), backend="cuda")
    want = auvcore.masked_semantic_scale(f.to(torch.float64), lab, len(sizes), backend="cpp")
    _assert_scale_close(S, want.numpy(), atol=1e-4)


@pytest.mark.cuda
@gpu
def test_masked_errors():
    f, lab = _masked_case(1, 4, 3, (4, 5, 6), torch.float32, 0)
    bad = lab.clone()
    bad[0, 1, 1, 1] = 7
    with pytest.raises(ValueError, match="outside 0..2"):
        auvcore.masked_semantic_scale(f.cuda(), bad.cuda(), 3, backend="cuda")
    fn = f.clone()
    fn[0, 2, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        auvcore.masked_semantic_scale(fn.cuda(), lab.cuda(), 3, backend="cuda")
    S = auvcore.masked_semantic_scale(fn.cuda(), lab.cuda(), 3, nan_to_num=True, backend="cuda")
    want = auvcore.masked_semantic_scale(fn.double(), lab, 3, nan_to_num=True, backend="cpp")
    _assert_scale_close(S, want.numpy(), atol=1e-4)


@pytest.mark.cuda
@gpu
def test_masked_cases_in_one_eigen_launch():
    """The main job's grouping (issue 23): several cases of their own grids and batch sizes, their Grams in one
    buffer and one eigen launch, give each case its own S and spectra; a case with a label out of range or a NaN
    gets its own error and leaves the others alone."""
    from auvcore import _cuda

    cases = [_masked_case(b, 40, 3, shape, torch.float32, seed)
             for seed, (b, shape) in enumerate([(1, (4, 5, 6)), (2, (7, 3, 5)), (1, (9, 9, 2)), (1, (3, 4, 5))])]
    cases[1][1][1, 0, 0, 0] = 7
    cases[2][0][0, 5, 0, 0, 0] = float("nan")
    out = _cuda.masked_scale_cases([(f.cuda(), lab.cuda()) for f, lab in cases], 3)
    assert isinstance(out[1], ValueError) and "value 7 is outside 0..2" in str(out[1])
    assert isinstance(out[2], ValueError) and "NaN or Inf" in str(out[2])
    for i in (0, 3):
        f, lab = cases[i]
        S, p = auvcore.masked_semantic_scale(f.double(), lab, 3, backend="cpp", spectrum=True)
        _assert_scale_close(out[i][0], S.numpy(), atol=1e-4)
        torch.testing.assert_close(out[i][1].cpu(), p, rtol=0, atol=1e-4)


@pytest.mark.cuda
@gpu
def test_non_default_stream():
    z = _rand((2, 3, 24, 20, 20), torch.float32, 9).cuda()
    want = auvcore.semantic_scale(z, backend="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):  # queue more work than one call, then compare after the stream's own sync
            got = auvcore.semantic_scale(z, backend="cuda")
    s.synchronize()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


@pytest.mark.cuda
@gpu
def test_cupy_input():
    cupy = pytest.importorskip("cupy")
    z = _rand((2, 3, 10, 11, 12), torch.float32, 4)
    zc = cupy.asarray(z.numpy())
    S = auvcore.semantic_scale(zc, backend="cuda")
    _assert_scale_close(S, _reference(z, "D_HW"), atol=1e-4)
    from auvcore import _cuda

    s = cupy.cuda.Stream(non_blocking=True)
    with s:
        S2 = _cuda.semantic_scale(zc)
    s.synchronize()
    _assert_scale_close(S2, _reference(z, "D_HW"), atol=1e-4)


@pytest.mark.cuda
@gpu
def test_auto_uses_cuda_for_cuda_tensors():
    z = torch.randn(1, 2, 5, 6, 7, device="cuda")
    supported = B._C.cuda_device_supported(z.device.index)
    assert supported == (torch.cuda.get_device_capability(z.device) >= (8, 0))
    assert B.resolve("auto", z) == ("cuda" if supported else "torch")


# ---- the fused DUO loss (csrc/cuda/duo_cuda.cu) ---------------------------------------------------------------

def _duo_step(loss, z, n, y, device):
    """The loss and the gradients of both logit tensors on the host; None where a tensor gets no gradient (the
    official variant's noise logits, on every path)."""
    zz = z.to(device).requires_grad_()
    nn_ = n.to(device).requires_grad_()
    out = loss(zz, nn_, y.to(device))
    out.backward()
    return tuple(None if t is None else t.detach().cpu() for t in (out, zz.grad, nn_.grad))


def _count_fused_calls(monkeypatch):
    from auvcore import _cuda

    calls = []
    real = _cuda.duo_sums
    monkeypatch.setattr(_cuda, "duo_sums", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def _scale_grad(z, mode, variant, center, backend, w):
    z = z.detach().clone().requires_grad_(True)
    S = auvcore.semantic_scale(z, layout=mode, variant=variant, center=center, backend=backend)
    (torch.where(torch.isnan(S), torch.zeros_like(S), S) * w.to(S)).sum().backward()
    return S.detach(), z.grad


@pytest.mark.cuda
@gpu
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(B_=st.integers(1, 2), K=st.integers(1, 3), D=st.integers(1, 16), H=st.integers(1, 9), W=st.integers(1, 9),
       mode=st.sampled_from(list(T.LAYOUTS)), dtype=st.sampled_from([torch.float32, torch.float64]),
       center=st.booleans(), variant=st.sampled_from(["paper", "official"]), seed=st.integers(0, 2**31 - 1))
def test_scale_backward_on_cuda_matches_the_cpu_backward(B_, K, D, H, W, mode, dtype, center, variant, seed):
    z = _rand((B_, K, D, H, W), dtype, seed, offset=3.0)
    w = torch.randn(B_, K, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    w[0, 0] = 0.0  # a class the loss leaves out: its gradient is exactly 0
    center = center if variant == "paper" else False
    S_cpu, g_cpu = _scale_grad(z, mode, variant, center, "cpp", w)
    S_gpu, g_gpu = _scale_grad(z.cuda(), mode, variant, center, "cuda", w.cuda())
    assert g_gpu.dtype == z.dtype and g_gpu.device.type == "cuda"
    rel = 1e-10 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(g_gpu.cpu(), g_cpu, rtol=rel, atol=rel * (float(g_cpu.abs().max()) or 1.0))
    assert not g_gpu[0, 0].any()


@pytest.mark.cuda
@gpu
@pytest.mark.parametrize("shape,mode", [((1, 2, 5, 4, 6), "D_HW"), ((2, 1, 9, 2, 3), "D_HW"), ((1, 2, 6, 7), "H_DW")])
def test_scale_backward_on_cuda_gradcheck_float64(shape, mode):
    z = _rand(shape, torch.float64, 4, offset=1.0).cuda().requires_grad_(True)
    # The Gram's chunk sums are float64 atomics: the forward varies in its last bits (nondet_tol).
    assert torch.autograd.gradcheck(lambda x: auvcore.semantic_scale(x, layout=mode, backend="cuda"), (z,),
                                    eps=1e-6, atol=1e-6, rtol=1e-5, nondet_tol=1e-12)


@pytest.mark.cuda
@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_scale_backward_on_cuda_is_bit_identical_and_reads_half_inputs(dtype):
    from auvcore import _cuda

    z = _rand((2, 4, 24, 20, 30), torch.float32, 7, offset=2.0).to(dtype).cuda()  # 600 samples: many tiles
    S, ev, vt = _cuda.semantic_scale(z, "D_HW", True, 1e-8, "paper", False, eigenpairs=True)
    gS = torch.randn(8, dtype=torch.float64, device="cuda")
    d1 = _cuda.scale_backward(z, "D_HW", True, 1e-8, "paper", ev, vt, gS)
    d2 = _cuda.scale_backward(z, "D_HW", True, 1e-8, "paper", ev, vt, gS)
    assert d1.dtype == torch.float32 and torch.equal(d1, d2)
    from auvcore import _cpu

    zc = z.cpu()
    _, evc, vtc = _cpu.semantic_scale(zc, "D_HW", True, 1e-8, "paper", False, 1, eigenpairs=True)
    want = _cpu.scale_backward(zc, "D_HW", True, 1e-8, "paper", False, 1, evc, vtc, gS.cpu())
    torch.testing.assert_close(d1.cpu(), want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


@pytest.mark.cuda
@gpu
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(Bn=st.integers(1, 2), K=st.integers(2, 5), D=st.integers(2, 9), H=st.integers(2, 9), W=st.integers(2, 9),
       dtype=st.sampled_from([torch.float32, torch.float64]), labels=st.booleans(),
       variant=st.sampled_from(["paper", "official"]), background=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_duo_loss_auto_on_cuda_matches_cpu(monkeypatch, Bn, K, D, H, W, dtype, labels, variant, background, seed):
    z, n, y = duo_inputs(Bn, K, (D, H, W), dtype, seed, labels)
    loss = auvcore.DUOLoss(to_onehot_y=labels, variant=variant, include_background=background)
    calls = _count_fused_calls(monkeypatch)
    got = _duo_step(loss, z, n, y, "cuda")
    assert calls, "backend='auto' on CUDA tensors must use the CUDA fused kernels"
    want = _duo_step(loss, z, n, y, "cpu")
    # float64: 1e-10 on the fused part; the loss and gradients include S and its analytic backward (CUDA and
    # C++; the eigenvectors from different solvers), held to 1e-8 as in tests/test_duo.py.
    rel = 1e-5 if dtype == torch.float32 else 1e-8
    assert (got[2] is None) == (want[2] is None) == (variant == "official")  # the same None contract
    for a, b in zip(got, want):
        if b is not None:
            torch.testing.assert_close(a, b, rtol=rel, atol=rel * float(b.abs().max()))


@pytest.mark.cuda
@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("labels", [True, False])
def test_duo_fused_sums_and_backward_match_the_cpu_kernel_and_are_bit_identical(dtype, labels):
    from auvcore import _cuda

    Bn, K, c0 = 2, 5, 1
    z, n, y = duo_inputs(Bn, K, (37, 41, 43), dtype, 3, labels)  # N = 65231: 8 chunks per (b, c), odd tail
    z3, n3 = z.reshape(Bn, K, -1), n.reshape(Bn, K, -1)
    y3 = y.reshape(Bn, -1) if labels else y.reshape(Bn, K, -1)
    zc, nc = (z3, n3) if dtype in (torch.float32, torch.float64) else (z3.float(), n3.float())
    want = torch.empty(Bn, K - c0, 6, dtype=torch.float64)
    B._C.duo_forward(B.view(zc), B.view(nc), B.view(y3), labels, c0, 0, 0.5, B.view(want), 1)
    zg, ng, yg = z3.cuda(), n3.cuda(), y3.cuda()
    runs = [_cuda.duo_sums(zg, ng, yg, labels, c0, 0, 0.5) for _ in range(3)]
    assert all(torch.equal(r, runs[0]) for r in runs)
    rel = 1e-10 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(runs[0].cpu(), want, rtol=rel, atol=rel * float(want.abs().max()))

    grad = torch.randn(Bn, K - c0, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    dz, dn = torch.empty(zc.shape, dtype=zc.dtype), torch.empty(zc.shape, dtype=zc.dtype)
    B._C.duo_backward(B.view(zc), B.view(nc), B.view(y3), labels, c0, 0, 0.5, B.view(grad), B.view(dz), B.view(dn), 1)
    g1 = _cuda.duo_backward(zg, ng, yg, labels, c0, 0, 0.5, grad.cuda())
    g2 = _cuda.duo_backward(zg, ng, yg, labels, c0, 0, 0.5, grad.cuda())
    assert torch.equal(g1[0], g2[0]) and torch.equal(g1[1], g2[1])
    assert g1[0].dtype == dtype
    tol = dict(rtol=rel, atol=rel * float(grad.abs().max())) if dtype in (torch.float32, torch.float64) else \
        dict(rtol=2e-3 if dtype == torch.float16 else 1.6e-2, atol=1e-6)
    torch.testing.assert_close(g1[0].cpu().to(zc.dtype), dz.to(dtype).to(zc.dtype), **tol)
    torch.testing.assert_close(g1[1].cpu().to(zc.dtype), dn.to(dtype).to(zc.dtype), **tol)


@pytest.mark.cuda
@gpu
def test_duo_loss_on_cuda_is_bit_identical_run_to_run():
    # H·W <= 512: S's Gram is one chunk per class (its float64 atomics then add onto zero in one order), so
    # the whole loss, not only the fused part, must repeat bit for bit.
    z, n, y = duo_inputs(2, 4, (24, 16, 20), torch.float32, 1)
    loss = auvcore.DUOLoss(to_onehot_y=True)
    first = _duo_step(loss, z, n, y, "cuda")
    for _ in range(3):
        again = _duo_step(loss, z, n, y, "cuda")
        assert all(torch.equal(a, b) for a, b in zip(first, again))


@pytest.mark.cuda
@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_duo_loss_half_logits_on_cuda(dtype):
    z, n, y = duo_inputs(2, 3, (8, 9, 10), dtype, 2)
    loss = auvcore.DUOLoss(to_onehot_y=True)
    got = _duo_step(loss, z, n, y, "cuda")
    want = _duo_step(loss, z, n, y, "cpu")  # the CPU path widens the halves to float32
    assert got[0].dtype == torch.float32 and got[1].dtype == dtype
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    # The CUDA path rounds its two parts of dL/dz (the fused kernel's and S's) to the half type before autograd
    # adds them; the CPU path rounds the float32 total once. Where the parts cancel they differ by about one
    # unit in the last place of the larger part, so the bound is one ulp of the largest gradient (not a fraction
    # of one: 3 of 4,320 elements near zero failed 1e-4·max). test_cuda_duo_emulated.py checks both against the
    # float64 gradient to that bound.
    ulp = 2.0 ** -10 if dtype == torch.float16 else 2.0 ** -7
    for a, b in zip(got[1:], want[1:]):
        torch.testing.assert_close(a.float(), b.float(), rtol=ulp, atol=ulp * float(b.abs().max().float()))
    # under autocast (bf16 logits from a convolution) the loss is float32 and the gradient reaches the weights
    conv = torch.nn.Conv3d(2, 6, 1).cuda()
    x = torch.randn(2, 2, 8, 9, 10, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = conv(x)
        val = loss(out[:, :3], out[:, 3:], y.cuda())
    assert val.dtype == torch.float32 and torch.isfinite(val)
    val.backward()
    assert torch.isfinite(conv.weight.grad).all()


@pytest.mark.cuda
@gpu
def test_duo_loss_cuda_errors_and_stream():
    z, n, y = duo_inputs(1, 3, (5, 6, 7), torch.float32, 0)
    loss = auvcore.DUOLoss(to_onehot_y=True)
    bad = z.clone()
    bad[0, 1, 2, 3, 4] = float("nan")
    with pytest.raises(ValueError, match="seg_logits: contains NaN or Inf"):
        loss(bad.cuda(), n.cuda(), y.cuda())
    yb = y.clone()
    yb[0, 0, 1, 1, 1] = 7
    with pytest.raises(ValueError, match=r"target: label value 7 is outside 0..2 \(num_classes=3\)"):
        loss(z.cuda(), n.cuda(), yb.cuda())
    want = loss(z.cuda(), n.cuda(), y.cuda())
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        got = loss(z.cuda(), n.cuda(), y.cuda())
    s.synchronize()
    assert torch.equal(got.cpu(), want.cpu())
