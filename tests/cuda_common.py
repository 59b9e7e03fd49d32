"""Shared by the CUDA tests (host, emulated, GPU): markers and the float64 oracle."""
from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import auvcore
from auvcore import _backend as B
from auvcore import _torch_impl as T
from auvcore.testing import svd_reference

built_with_cuda = pytest.mark.skipif(not auvcore.has_cuda_kernels(), reason="auvcore built without CUDA kernels")
HAVE_GPU = torch.cuda.is_available() and auvcore.has_cuda_kernels() and B._C.cuda_device_count() > 0
gpu = pytest.mark.skipif(not HAVE_GPU, reason="needs a CUDA GPU, CUDA torch and auvcore built with CUDA")


def _no_driver() -> bool:
    return ctypes.util.find_library("cuda") is None and not os.path.exists("/dev/nvidiactl")


no_driver = pytest.mark.skipif(not _no_driver(), reason="a CUDA driver is present on this machine")


def as_if_on_gpu(t: torch.Tensor, device: int = 0):
    """A view of a CPU tensor's memory that says it is on CUDA device ``device``: it passes the bindings' device
    checks, so a test without a GPU reaches the checks behind them. Every call given one must fail before any
    memory is touched."""
    return B._C.ArrayView(t.data_ptr(), getattr(B._C.DType, B._DTYPES[t.dtype]), list(t.shape), list(t.stride()),
                          device)


def forbid_cuda_path(monkeypatch, *names):
    """Make these functions of auvcore._cuda fail if called: the CPU tensors' path must not reach them."""
    from auvcore import _cuda

    def boom(*a, **k):
        raise AssertionError("the CUDA path must not run for CPU tensors")

    for name in names:
        monkeypatch.setattr(_cuda, name, boom)


def fake_buffer(shape, dtype=torch.float64, device: int = 0, strides=None):
    """A view of no real memory (pointer 8) with this shape, contiguous unless ``strides``, for calls that must
    fail before any memory is touched."""
    if strides is None:  # row-major
        strides, n = [], 1
        for d in reversed(shape):
            strides.insert(0, n)
            n *= d
    return B._C.ArrayView(8, getattr(B._C.DType, B._DTYPES[dtype]), list(shape), list(strides), device)


def _reference(z: torch.Tensor, mode: str, center=True, eps=1e-8, variant="paper", nan_to_num=False) -> np.ndarray:
    """S [B, K] from the float64 SVD oracle, one class matrix at a time."""
    M = T.class_matrices(z.detach().cpu().to(torch.float64), mode).numpy()
    if nan_to_num:
        M = np.nan_to_num(M, nan=0.0, posinf=0.0, neginf=0.0)
    out = np.empty(M.shape[:2])
    for b in range(M.shape[0]):
        for k in range(M.shape[1]):
            out[b, k] = svd_reference(M[b, k], center=center, eps=eps, variant=variant)
    return out


def _assert_scale_close(got, want, atol=1e-4):
    got = np.asarray(got.detach().cpu().to(torch.float64) if isinstance(got, torch.Tensor) else got, dtype=float)
    want = np.asarray(want, dtype=float)
    assert got.shape == want.shape
    assert np.array_equal(np.isnan(got), np.isnan(want)), (got, want)
    np.testing.assert_allclose(got[~np.isnan(got)], want[~np.isnan(want)], rtol=0, atol=atol)


_FLOAT_TOL = {torch.float64: 1e-9, torch.float32: 1e-4}


def _rand(shape, dtype, seed, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 3.0 + offset
    return x.to(dtype)


def _masked_case(Bn, C, K, shape, dtype, seed, channels_last=False, absent=()):
    g = torch.Generator().manual_seed(seed)
    f = (torch.randn((Bn, C) + shape, generator=g, dtype=torch.float64) * 2.0 + 3.0).to(dtype)
    lab = torch.randint(0, K, (Bn,) + shape, generator=g)
    for b, k in absent:
        lab[b][lab[b] == k] = (k + 1) % K
    if channels_last:
        f = f.movedim(1, -1).contiguous().movedim(-1, 1)
    return f, lab


# ---- the host emulation of the CUDA kernels (test_cuda_emulated.py, test_cuda_duo_emulated.py) ---------------
_spec = importlib.util.spec_from_file_location(
    "build_emu", Path(__file__).resolve().parent.parent / "csrc" / "cuda" / "emu" / "build_emu.py")
build_emu = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build_emu)


def emu_library(tmp_path_factory) -> ctypes.CDLL:
    """The emulated kernels' shared library (built once per source hash); skips without a C++20 compiler."""
    try:
        return ctypes.CDLL(str(build_emu.build(tmp_path_factory.getbasetemp())))
    except build_emu.EmulationUnavailable as e:
        pytest.skip(str(e))


def i64(xs):
    return (ctypes.c_int64 * max(len(xs), 1))(*xs)


def ptr(t):
    return ctypes.c_void_p(0 if t is None else t.data_ptr())


def check_rc(rc, err):
    if rc:
        raise (ValueError if rc == 1 else RuntimeError)(err.value.decode())


# The emulation's dtype codes (csrc/cuda/emu/emu_harness.cpp).
EMU_DT = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3, torch.int8: 4, torch.uint8: 5,
          torch.int16: 6, torch.int32: 7, torch.int64: 8}


def emu_backward(lib, z, mode, center, eps, variant, evals, evecs, grad_S, dz_dtype=torch.float64, dz_strides=None):
    """dz from the emulated CUDA backward of S (csrc/cuda/scale_backward_cuda.cu), given the eigenpairs."""
    dz = torch.full(z.shape, float("nan"), dtype=dz_dtype)  # every entry must be written
    if dz_strides is not None:  # a non-contiguous output: the transpose of a contiguous buffer
        dz = dz.transpose(-1, -2).contiguous().transpose(-1, -2)
    err = ctypes.create_string_buffer(1024)
    check_rc(lib.emu_scale_backward(ptr(z), EMU_DT[z.dtype], z.dim(), i64(z.shape), i64(z.stride()),
                                    T.LAYOUTS[mode], int(center), ctypes.c_double(eps), T.VARIANTS[variant],
                                    ptr(evals), ptr(evecs), ptr(grad_S), ptr(dz), EMU_DT[dz_dtype],
                                    i64(dz.stride()), err, 1024), err)
    return dz


def duo_inputs(Bn, K, spatial, dtype, seed, labels=True):
    """Logits, noise logits (``dtype``) and class indices ``[Bn, 1, *spatial]`` (or, ``labels=False``, the
    one-hot float target) for the DUO kernels' tests, seeded."""
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn((Bn, K) + spatial, generator=g, dtype=torch.float64) * 3).to(dtype)
    n = (torch.randn((Bn, K) + spatial, generator=g, dtype=torch.float64) * 0.5).to(dtype)
    y = torch.randint(0, K, (Bn, 1) + spatial, generator=g)
    if not labels:
        y = torch.nn.functional.one_hot(y[:, 0], K).movedim(-1, 1).float().contiguous()
    return z, n, y
