"""CUDA backend, host side: runs on every machine. A CUDA build imports and serves the CPU ops without a driver,
the CUDA ops reject bad arguments and the missing device with clear errors, and the serial parts of the GPU
eigen solver (Sturm multisection, entropy), compiled for the host, agree with LAPACK and docs/method.md.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import auvcore
from auvcore import _backend as B
from auvcore import _torch_impl as T
from auvcore.testing import svd_reference

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from cuda_common import (  # noqa: E402
    _assert_scale_close, _reference, as_if_on_gpu, built_with_cuda, fake_buffer, forbid_cuda_path, no_driver,
)


@built_with_cuda
def test_cuda_build_imports_and_reports_itself():
    assert B._C.with_cuda is True
    assert B._C.cuda_max_gram_size >= 512
    for name in ("cuda_decoded_gram", "cuda_masked_gram", "cuda_scale_from_gram", "cuda_device_count"):
        assert callable(getattr(B._C, name))


@built_with_cuda
def test_device_count_never_raises():
    n = B._C.cuda_device_count()
    assert isinstance(n, int) and n >= 0
    assert B._C.cuda_device_count() == n  # a second call (after the runtime's failed init) answers the same


@built_with_cuda
@no_driver
def test_device_count_is_zero_without_driver():
    assert B._C.cuda_device_count() == 0
    assert B._C.cuda_device_supported(0) is False
    assert B._C.cuda_device_supported(-1) is False


@built_with_cuda
@no_driver
def test_backend_cuda_without_gpu_is_a_clear_runtime_error():
    z = torch.randn(1, 2, 4, 5, 6)
    with pytest.raises(RuntimeError, match="no CUDA device"):
        auvcore.semantic_scale(z, backend="cuda")
    f, lab = torch.randn(1, 3, 4, 5, 6), torch.randint(0, 2, (1, 4, 5, 6))
    with pytest.raises(RuntimeError, match="no CUDA device"):
        auvcore.masked_semantic_scale(f, lab, 2, backend="cuda")
    from auvcore import _cuda

    with pytest.raises(RuntimeError, match="no CUDA device"):
        _cuda.semantic_scale(z)


@built_with_cuda
@no_driver
def test_cuda_ops_without_device_raise_runtime_error_naming_the_cause():
    # Valid arguments reach the device check, which must fail cleanly (no crash, no sticky state).
    z = torch.randn(1, 2, 4, 5, 6)
    with pytest.raises(RuntimeError, match="no usable CUDA device"):
        B._C.cuda_decoded_gram(as_if_on_gpu(z), 0, True, False, fake_buffer((2, 4, 4)),
                               fake_buffer((2,), torch.int32), 0)
    with pytest.raises(RuntimeError, match="no usable CUDA device"):
        B._C.cuda_scale_from_gram(fake_buffer((1, 4, 4)), B.view(None), 4, 1e-8, 0, B.view(None), fake_buffer((1,)),
                                  B.view(None), 0)
    # ...and the CPU ops keep working afterwards.
    S = auvcore.semantic_scale(z, backend="cpp")
    assert torch.isfinite(S).all()


@built_with_cuda
def test_cuda_ops_validate_arguments_before_touching_the_device():
    G, flags = fake_buffer((2, 4, 4)), fake_buffer((2,), torch.int32)  # for z [1, 2, 4, 5, 6]: B·K = 2, p = 4
    z3 = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="decoded maps"):
        B._C.cuda_decoded_gram(as_if_on_gpu(z3), 0, True, False, G, flags, 0)
    z = torch.randn(1, 2, 4, 5, 6)
    with pytest.raises(ValueError, match="mode"):
        B._C.cuda_decoded_gram(as_if_on_gpu(z), 7, True, False, G, flags, 0)
    zi = torch.zeros(1, 2, 4, 5, 6, dtype=torch.int32)
    with pytest.raises(ValueError, match="floating"):
        B._C.cuda_decoded_gram(as_if_on_gpu(zi), 0, True, False, G, flags, 0)
    with pytest.raises(ValueError, match="null"):
        B._C.cuda_decoded_gram(as_if_on_gpu(z), 0, True, False, B.view(None), B.view(None), 0)
    big = torch.empty(1, 1, 5000, 6000)  # p = 5000 > the eigen kernel's limit
    with pytest.raises(ValueError, match="exceeds the CUDA limit"):
        B._C.cuda_decoded_gram(as_if_on_gpu(big), 0, True, False, fake_buffer((1, 5000, 5000)),
                               fake_buffer((1,), torch.int32), 0)
    f, lab = torch.randn(1, 3, 4, 5, 6), torch.randint(0, 2, (1, 4, 5, 7))
    masked_out = (fake_buffer((2, 3, 3)), fake_buffer((2,), torch.int64), fake_buffer((2,), torch.int32),
                  fake_buffer((2,), torch.int64))
    with pytest.raises(ValueError, match="labels: shape"):
        B._C.cuda_masked_gram(as_if_on_gpu(f), as_if_on_gpu(lab), 2, True, False, *masked_out, 0)
    with pytest.raises(ValueError, match="integer"):
        B._C.cuda_masked_gram(as_if_on_gpu(f), as_if_on_gpu(f[:, 0]), 2, True, False, *masked_out, 0)
    lab = torch.randint(0, 2, (1, 4, 5, 6))
    with pytest.raises(ValueError, match="num_classes"):
        B._C.cuda_masked_gram(as_if_on_gpu(f), as_if_on_gpu(lab), 0, True, False, *masked_out, 0)
    with pytest.raises(ValueError, match="p: expected"):
        B._C.cuda_scale_from_gram(fake_buffer((1, 0, 0)), B.view(None), 4, 1e-8, 0, B.view(None), fake_buffer((1,)),
                                  B.view(None), 0)
    with pytest.raises(ValueError, match="variant"):
        B._C.cuda_scale_from_gram(fake_buffer((1, 4, 4)), B.view(None), 4, 1e-8, 5, B.view(None), fake_buffer((1,)),
                                  B.view(None), 0)


@built_with_cuda
def test_cuda_ops_check_every_buffer_against_what_the_kernel_writes():
    # A disagreement on a size, dtype, layout or device between Python and C++ raises, naming the buffer,
    # before the kernel could write past an end or through a pointer of the wrong memory.
    z = as_if_on_gpu(torch.randn(1, 2, 4, 5, 6))  # B·K = 2, p = 4
    G, flags = fake_buffer((2, 4, 4)), fake_buffer((2,), torch.int32)
    for bad, msg in ((fake_buffer((2, 5, 5)), r"G: expected shape \[2, 4, 4\], got \[2, 5, 5\]"),
                     (fake_buffer((2, 4, 4), torch.float32), "G: wrong dtype"),
                     (fake_buffer((2, 4, 4), strides=(32, 8, 2)), "G: expected a contiguous buffer"),
                     (B.view(torch.empty(2, 4, 4, dtype=torch.float64)),
                      "G: expected memory of CUDA device 0, got host memory"),
                     (fake_buffer((2, 4, 4), device=1),
                      "G: expected memory of CUDA device 0, got memory of CUDA device 1")):
        with pytest.raises(ValueError, match=msg):
            B._C.cuda_decoded_gram(z, 0, True, False, bad, flags, 0)
    with pytest.raises(ValueError, match=r"flags: expected shape \[2\], got \[3\]"):
        B._C.cuda_decoded_gram(z, 0, True, False, G, fake_buffer((3,), torch.int32), 0)
    with pytest.raises(ValueError, match="flags: wrong dtype"):
        B._C.cuda_decoded_gram(z, 0, True, False, G, fake_buffer((2,), torch.int64), 0)
    with pytest.raises(ValueError, match="z: expected CUDA device memory, got host memory"):
        B._C.cuda_decoded_gram(B.view(torch.randn(1, 2, 4, 5, 6)), 0, True, False, G, flags, 0)

    f, lab = as_if_on_gpu(torch.randn(2, 3, 4, 5)), torch.randint(0, 4, (2, 4, 5))  # K = 4: B·K = 8, C = 3
    out = {"G": fake_buffer((8, 3, 3)), "counts": fake_buffer((8,), torch.int64),
           "flags": fake_buffer((8,), torch.int32), "label_error": fake_buffer((2,), torch.int64)}
    for name, bad in (("G", fake_buffer((8, 4, 4))), ("counts", fake_buffer((7,), torch.int64)),
                      ("flags", fake_buffer((8,), torch.int64)), ("label_error", fake_buffer((1,), torch.int64))):
        with pytest.raises(ValueError, match=f"^{name}: "):
            B._C.cuda_masked_gram(f, as_if_on_gpu(lab), 4, True, False, *{**out, name: bad}.values(), 0)
    with pytest.raises(ValueError, match="labels: expected memory of CUDA device 0, got host memory"):
        B._C.cuda_masked_gram(f, B.view(lab), 4, True, False, *out.values(), 0)

    args = {"G": fake_buffer((3, 4, 4)), "counts": fake_buffer((3,), torch.int64), "r": 0, "eps": 1e-8,
            "variant": 0, "flags": fake_buffer((3,), torch.int32), "S": fake_buffer((3,)),
            "evals": fake_buffer((3, 4)), "stream": 0}
    for name, bad in (("G", fake_buffer((3, 4, 5))), ("counts", fake_buffer((3,), torch.int32)),
                      ("flags", fake_buffer((4,), torch.int32)), ("S", fake_buffer((4,))),
                      ("evals", fake_buffer((3, 5))), ("S", fake_buffer((3,), device=2))):
        with pytest.raises(ValueError, match=f"^{name}: "):
            B._C.cuda_scale_from_gram(**{**args, name: bad})
    with pytest.raises(ValueError, match="S: this buffer is required"):
        B._C.cuda_scale_from_gram(**{**args, "S": B.view(None)})


def test_cpu_ops_refuse_device_memory():
    if not auvcore.has_native():
        pytest.skip("native module not built")
    z = torch.randn(1, 2, 4, 5, 6)
    G = torch.empty(2, 4, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="z: expected host memory, got memory of CUDA device 0"):
        B._C.decoded_gram(as_if_on_gpu(z), 0, True, False, B.view(G), 1, False)
    with pytest.raises(ValueError, match="G: expected host memory, got memory of CUDA device 0"):
        B._C.decoded_gram(B.view(z), 0, True, False, as_if_on_gpu(G), 1, False)


def test_auto_on_cpu_tensors_uses_the_cpu_kernels(monkeypatch):
    if not auvcore.has_native():
        pytest.skip("native module not built")
    forbid_cuda_path(monkeypatch, "semantic_scale", "masked_semantic_scale")
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 3, 5, 6, 7, generator=g)
    assert B.resolve("auto", z) == "cpp"
    S = auvcore.semantic_scale(z)
    torch.testing.assert_close(S, auvcore.semantic_scale(z, backend="cpp"), rtol=0, atol=0)
    _assert_scale_close(S, _reference(z, "D_HW"), atol=1e-5)
    f, lab = torch.randn(2, 4, 5, 6, 7, generator=g), torch.randint(0, 3, (2, 5, 6, 7), generator=g)
    Sm = auvcore.masked_semantic_scale(f, lab, 3)
    torch.testing.assert_close(Sm, auvcore.masked_semantic_scale(f, lab, 3, backend="cpp"), rtol=0, atol=0)


@built_with_cuda
@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 40), seed=st.integers(0, 2**31 - 1), scale_exp=st.integers(-30, 30),
       kind=st.sampled_from(["random", "zero_offdiag", "repeated", "zero"]), lanes=st.sampled_from([1, 2, 4, 8, 32]))
def test_host_multisection_matches_lapack(n, seed, scale_exp, kind, lanes):
    rng = np.random.default_rng(seed)
    d = rng.standard_normal(n) * 10.0**scale_exp
    e = rng.standard_normal(n - 1) * 10.0**scale_exp
    if kind == "zero_offdiag":
        e[rng.random(n - 1) < 0.5] = 0.0
    elif kind == "repeated":
        d[:] = 10.0**scale_exp
        e[:] = 0.0
        e[::3] = 1e-3 * 10.0**scale_exp
    elif kind == "zero":
        d[:] = 0.0
        e[:] = 0.0
    Tm = np.diag(d) + np.diag(e, 1) + np.diag(e, -1)
    want = np.linalg.eigvalsh(Tm)
    got = np.array(B._C._cuda_host_tridiag_eigvalsh(d.tolist(), e.tolist(), lanes))
    norm = max(np.abs(want).max(), np.finfo(float).tiny)
    assert np.all(np.diff(got) >= 0)
    # pivmin (a few DBL_MIN) bounds the error of an all-zero matrix
    np.testing.assert_allclose(got, want, rtol=0, atol=8 * n * np.finfo(float).eps * norm + 1e-300)


@built_with_cuda
def test_host_multisection_lanes_per_eigenvalue():
    lanes = B._C._cuda_host_multisect_lanes
    assert [lanes(n, 256) for n in (1, 8, 9, 32, 33, 64, 96, 128, 129, 512)] == [32, 32, 16, 8, 4, 4, 2, 2, 1, 1]
    with pytest.raises(ValueError, match="lanes"):
        B._C._cuda_host_tridiag_eigvalsh([1.0, 2.0], [0.5], 3)


@built_with_cuda
def test_host_bisection_wilkinson_and_gram_spectra():
    # Wilkinson W21+: pairs of eigenvalues agreeing to ~1e-14.
    n = 21
    d = np.abs(np.arange(n) - 10.0)
    e = np.ones(n - 1)
    got = np.array(B._C._cuda_host_tridiag_eigvalsh(d.tolist(), e.tolist()))
    want = np.linalg.eigvalsh(np.diag(d) + np.diag(e, 1) + np.diag(e, -1))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-13)
    # A rank-deficient PSD Gram (what the kernels feed the bisection): zeros stay ~0, never large negatives.
    rng = np.random.default_rng(3)
    X = rng.standard_normal((30, 5))
    G = X @ X.T
    import scipy.linalg as sla  # noqa: PLC0415

    Tri = sla.hessenberg(G)
    got = np.array(B._C._cuda_host_tridiag_eigvalsh(np.diag(Tri).tolist(), np.diag(Tri, 1).tolist()))
    want = np.linalg.eigvalsh(G)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12 * want.max())


@built_with_cuda
@settings(max_examples=40, deadline=None)
@given(m=st.integers(1, 12), n=st.integers(1, 12), seed=st.integers(0, 2**31 - 1),
       variant=st.sampled_from(["paper", "official"]), center=st.booleans())
def test_host_entropy_formula_matches_the_svd_oracle(m, n, seed, variant, center):
    M = np.random.default_rng(seed).standard_normal((m, n))
    want = svd_reference(M, center=center if variant == "paper" else False, variant=variant)
    Mc = M - M.mean(0, keepdims=True) if (center and variant == "paper") else M
    lam = np.sort(np.linalg.svd(Mc, compute_uv=False) ** 2)[::-1]
    got = B._C._cuda_host_entropy(lam.tolist(), min(m, n), 1e-8, T.VARIANTS[variant])
    if math.isnan(want):
        assert math.isnan(got)
    else:
        assert abs(got - want) < 1e-12


@built_with_cuda
def test_cuda_duo_ops_check_every_view():
    # z, n [1, 3, 10] (B = 1, K = 3, N = 10), labels [1, 10], c0 = 1: sums [1, 2, 6], status [2].
    z = torch.randn(1, 3, 10)
    zg, ng, lab = as_if_on_gpu(z), as_if_on_gpu(z.clone()), as_if_on_gpu(torch.zeros(1, 10, dtype=torch.int64))
    sums, status = fake_buffer((1, 2, 6)), fake_buffer((2,), torch.int64)
    fwd = {"z": zg, "n": ng, "y": lab, "labels": True, "c0": 1, "preset": 0, "tau": 0.5, "sums": sums,
           "status": status, "stream": 0}
    for name, bad, msg in (
            ("z", B.view(z), "seg_logits: expected CUDA device memory, got host memory"),
            ("z", as_if_on_gpu(torch.zeros(1, 3, 10, dtype=torch.int32)), "seg_logits: expected float16"),
            ("n", B.view(z), "noise_logits: expected memory of CUDA device 0, got host memory"),
            ("n", as_if_on_gpu(torch.randn(1, 3, 10, dtype=torch.float64)), "noise_logits: dtype differs"),
            ("n", as_if_on_gpu(torch.randn(1, 3, 11)), "noise_logits: shape differs"),
            ("y", as_if_on_gpu(torch.zeros(1, 10, dtype=torch.int64), device=1),
             "target: expected memory of CUDA device 0, got memory of CUDA device 1"),
            ("y", as_if_on_gpu(torch.zeros(1, 11, dtype=torch.int64)), r"target: expected \[B, N\] class indices"),
            ("c0", 3, "include_background"),
            ("preset", 2, "preset"),
            ("sums", fake_buffer((1, 3, 6)), r"sums: expected shape \[1, 2, 6\], got \[1, 3, 6\]"),
            ("sums", fake_buffer((1, 2, 6), torch.float32), "sums: wrong dtype"),
            ("sums", fake_buffer((1, 2, 6), strides=(12, 1, 2)), "sums: expected a contiguous buffer"),
            ("sums", B.view(torch.empty(1, 2, 6, dtype=torch.float64)),
             "sums: expected memory of CUDA device 0, got host memory"),
            ("sums", B.view(None), "sums: this buffer is required"),
            ("status", fake_buffer((2,), torch.int32), "status: wrong dtype"),
            ("status", fake_buffer((3,), torch.int64), r"status: expected shape \[2\], got \[3\]")):
        with pytest.raises(ValueError, match=msg):
            B._C.cuda_duo_forward(**{**fwd, name: bad})
    with pytest.raises(ValueError, match="target: shape differs"):
        B._C.cuda_duo_forward(**{**fwd, "labels": False})

    bwd = {k: v for k, v in fwd.items() if k not in ("sums", "status")}
    bwd.update(grad_sums=fake_buffer((1, 2, 6)), dz=fake_buffer((1, 3, 10), torch.float32),
               dn=fake_buffer((1, 3, 10), torch.float32))
    for name, bad, msg in (
            ("grad_sums", fake_buffer((1, 2, 5)), r"grad_sums: expected shape \[1, 2, 6\]"),
            ("grad_sums", fake_buffer((1, 2, 6), device=1), "grad_sums: expected memory of CUDA device 0"),
            ("dz", B.view(None), "dz: this buffer is required"),
            ("dz", fake_buffer((1, 3, 10), torch.float64), "dz: wrong dtype"),
            ("dz", fake_buffer((1, 3, 9), torch.float32), r"dz: expected shape \[1, 3, 10\], got \[1, 3, 9\]"),
            ("dz", fake_buffer((1, 3, 10), torch.float32, strides=(60, 20, 2)), "dz: expected a contiguous buffer"),
            ("dn", fake_buffer((1, 3, 10), torch.float16), "dn: wrong dtype"),
            ("dn", B.view(torch.empty(1, 3, 10)), "dn: expected memory of CUDA device 0, got host memory"),
            ("z", B.view(z), "seg_logits: expected CUDA device memory")):
        with pytest.raises(ValueError, match=msg):
            B._C.cuda_duo_backward(**{**bwd, name: bad})


@built_with_cuda
@no_driver
def test_cuda_duo_ops_without_device_raise_runtime_error():
    # Valid arguments (float16 logits included: the CUDA kernels read them) reach the device check.
    for dt in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        z = as_if_on_gpu(torch.zeros(2, 3, 10, dtype=dt))
        y = as_if_on_gpu(torch.zeros(2, 3, 10, dtype=torch.uint8))
        with pytest.raises(RuntimeError, match="no usable CUDA device"):
            B._C.cuda_duo_forward(z, z, y, False, 0, 1, 0.5, fake_buffer((2, 3, 6)), fake_buffer((2,), torch.int64), 0)
        with pytest.raises(RuntimeError, match="no usable CUDA device"):
            B._C.cuda_duo_backward(z, z, y, False, 0, 1, 0.5, fake_buffer((2, 3, 6)), fake_buffer((2, 3, 10), dt),
                                   B.view(None), 0)
    # The CPU kernel still takes only float32/float64 logits (DUOLoss widens halves for it).
    zh = torch.zeros(1, 2, 5, dtype=torch.float16)
    with pytest.raises(ValueError, match="seg_logits: expected float32 or float64"):
        B._C.duo_forward(B.view(zh), B.view(zh), B.view(torch.zeros(1, 5, dtype=torch.int64)), True, 0, 0, 0.5,
                         B.view(torch.empty(1, 2, 6, dtype=torch.float64)), 1)


def test_duo_loss_on_cpu_tensors_does_not_touch_the_cuda_kernels(monkeypatch):
    if not auvcore.has_native():
        pytest.skip("native module not built")
    forbid_cuda_path(monkeypatch, "duo_sums", "duo_backward")
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 3, 4, 5, 6, generator=g, requires_grad=True)
    n = torch.randn(2, 3, 4, 5, 6, generator=g, requires_grad=True)
    y = torch.randint(0, 3, (2, 1, 4, 5, 6), generator=g)
    auvcore.DUOLoss(to_onehot_y=True)(z, n, y).backward()
    assert torch.isfinite(z.grad).all() and torch.isfinite(n.grad).all()
    with pytest.raises(ValueError, match="backend='cuda' needs CUDA tensors|no CUDA device|built without CUDA"):
        try:
            auvcore.DUOLoss(to_onehot_y=True, backend="cuda")(z, n, y)
        except RuntimeError as e:  # no device (or no CUDA build): the reason, as a RuntimeError
            raise ValueError(str(e)) from e
