"""The main job's grouped masked S on a GPU (``_cuda.masked_scale_cases``, issue 23) without one: its Python runs as
written, on CPU tensors, with the two CUDA ops it calls answered by csrc/cuda's kernels under the host emulation
(``cuda_masked_gram`` into each case's slice of one Gram buffer, one ``cuda_scale_from_gram`` over all of them).
Every case must get its own S and spectra, a bad case its own error."""
from __future__ import annotations

import contextlib
import ctypes

import numpy as np
import pytest
import torch

import auvcore
from auvcore import _backend as B

from cuda_common import EMU_DT, _masked_case, built_with_cuda, check_rc, emu_library, i64, ptr  # noqa: E402

pytestmark = built_with_cuda


class _EmulatedOps:
    """cuda_masked_gram and cuda_scale_from_gram as _cuda calls them (B.view is the identity here: tensors in)."""

    def __init__(self, lib):
        self.lib = lib
        self.calls = []

    def cuda_masked_gram(self, f, lab, K, center, nan_to_num, G, counts, flags, label_error, stream, smaller_side):
        assert G.is_contiguous() and counts.is_contiguous() and flags.is_contiguous() and label_error.is_contiguous()
        self.calls.append(("gram", G.shape[0]))
        err = ctypes.create_string_buffer(512)
        check_rc(self.lib.emu_masked_gram(
            ptr(f), EMU_DT[f.dtype], f.dim(), i64(f.shape), i64(f.stride()), ptr(lab), EMU_DT[lab.dtype],
            i64(lab.shape), i64(lab.stride()), ctypes.c_int64(K), int(center), int(nan_to_num), int(smaller_side),
            ptr(G), ptr(counts), ptr(flags), ptr(label_error), err, 512), err)

    def cuda_scale_from_gram(self, G, counts, r, eps, variant, flags, S, ev, stream, sized_by_counts):
        self.calls.append(("eigen", G.shape[0]))
        err = ctypes.create_string_buffer(512)
        check_rc(self.lib.emu_scale_from_gram(
            ptr(G), ctypes.c_int64(G.shape[0]), ctypes.c_int64(G.shape[1]), ptr(counts), ctypes.c_int64(r),
            int(sized_by_counts), ctypes.c_double(eps), variant, ptr(flags), ptr(S), ptr(ev), err, 512), err)


@pytest.fixture
def emulated_gpu(tmp_path_factory, monkeypatch):
    from auvcore import _cuda

    ops = _EmulatedOps(emu_library(tmp_path_factory))

    class Backend:  # _cuda's view of auvcore._backend: the emulated ops, tensors passed as they are
        _C = ops

        @staticmethod
        def view(t):
            return t

        def __getattr__(self, name):
            return getattr(B, name)

    monkeypatch.setattr(_cuda, "B", Backend())
    monkeypatch.setattr(_cuda, "as_cuda_tensor", lambda t, name: (t, None))
    monkeypatch.setattr(_cuda, "_require_kernels", lambda: None)
    monkeypatch.setattr(_cuda, "_require_device_supported", lambda t: None)
    monkeypatch.setattr(_cuda, "_on_stream", lambda dev, stream: contextlib.nullcontext(0))
    monkeypatch.setattr(torch.cuda, "device", lambda dev: contextlib.nullcontext())
    monkeypatch.setattr(_cuda, "_capturing", lambda dev: False)
    return _cuda, ops


def _cases():
    out = [_masked_case(b, 12, 3, shape, torch.float32, seed)
           for seed, (b, shape) in enumerate([(1, (4, 5, 6)), (2, (7, 3, 5)), (1, (9, 9, 2)), (1, (3, 4, 5))])]
    out[1][1][1, 0, 0, 0] = 7                     # a label out of range in case 1's second sample
    out[2][0][0, 5, 0, 0, 0] = float("nan")       # a NaN in case 2
    return out


def test_grouped_cases_get_their_own_scale_and_errors(emulated_gpu):
    _cuda, ops = emulated_gpu
    cases = _cases()
    out = _cuda.masked_scale_cases(cases, 3)
    assert ops.calls == [("gram", 3), ("gram", 6), ("gram", 3), ("gram", 3), ("eigen", 15)]  # one eigen launch
    assert isinstance(out[1], ValueError) and "value 7 is outside 0..2 (num_classes=3)" in str(out[1])
    assert isinstance(out[2], ValueError) and "NaN or Inf" in str(out[2])
    for i in (0, 3):
        f, lab = cases[i]
        S, p = auvcore.masked_semantic_scale(f.double(), lab, 3, backend="cpp", spectrum=True)
        assert out[i][0].shape == (1, 3) and out[i][1].shape == (1, 3, 12)
        np.testing.assert_allclose(out[i][0].numpy(), S.numpy(), rtol=0, atol=1e-5)
        np.testing.assert_allclose(out[i][1].numpy(), p.numpy(), rtol=0, atol=1e-5)


def test_one_case_form_is_masked_semantic_scale(emulated_gpu):
    """``_cuda.masked_semantic_scale`` (what ``backend='cuda'`` calls) is the one-case group: its results and
    errors, with and without spectra, and nan_to_num."""
    _cuda, _ = emulated_gpu
    f, lab = _cases()[1]
    lab = lab.clamp(max=2)
    S = _cuda.masked_semantic_scale(f, lab, 3)
    S2, p = _cuda.masked_semantic_scale(f, lab, 3, spectrum=True)
    want, want_p = auvcore.masked_semantic_scale(f.double(), lab, 3, backend="cpp", spectrum=True)
    assert S.shape == (2, 3) and p.shape == (2, 3, 12)
    # the sort's atomics order the voxels differently from run to run: float32 Grams, S to ~1e-8
    np.testing.assert_allclose(S.numpy(), S2.numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(S.numpy(), want.numpy(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(p.numpy(), want_p.numpy(), rtol=0, atol=1e-5)
    bad = lab.clone()
    bad[0, 1, 1, 1] = -1
    with pytest.raises(ValueError, match="value -1 is outside 0..2"):
        _cuda.masked_semantic_scale(f, bad, 3)
    g = f.clone()
    g[1, 0, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        _cuda.masked_semantic_scale(g, lab, 3)
    S = _cuda.masked_semantic_scale(g, lab, 3, nan_to_num=True)
    want = auvcore.masked_semantic_scale(g.double(), lab, 3, nan_to_num=True, backend="cpp")
    np.testing.assert_allclose(S.numpy(), want.numpy(), rtol=0, atol=1e-5)


def test_main_job_groups_through_it_and_falls_back_case_by_case(emulated_gpu, monkeypatch):
    """scoring._scales as the main job calls it on a GPU: masked cases go through one grouped call, each gets its
    own S and spectra (the bad one its error); if the grouped call itself fails, each case is scored on its own."""
    import auvcore.app.scoring as P

    _cuda, ops = emulated_gpu
    monkeypatch.setattr(P, "_on_gpu", lambda t: True)
    cases = _cases()
    states = [{"feats": f[:1], "lab": lab[:1], "mode": "masked", "prompted": False} for f, lab in cases]
    timing = {}
    got = P._scales(states, 3, timing)
    assert ops.calls[-1] == ("eigen", 12) and sum(c[0] == "eigen" for c in ops.calls) == 1
    assert isinstance(got[2], ValueError) and "NaN or Inf" in str(got[2]) and timing["S_s"] > 0
    for i in (0, 1, 3):
        f, lab = cases[i]
        S, p = auvcore.masked_semantic_scale(f[:1].double(), lab[:1].clamp(max=2), 3, backend="cpp", spectrum=True)
        if i == 1:  # its first sample has no label out of range
            assert not isinstance(got[i], Exception)
        np.testing.assert_allclose(got[i][0], S[0].numpy(), rtol=0, atol=1e-5)
        np.testing.assert_allclose(got[i][1], p[0].numpy(), rtol=0, atol=1e-5)

    def broken(*a, **k):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(_cuda, "masked_scale_cases", broken)
    again = P._scales(states, 3, timing)  # case by case, here on the CPU op (the tensors are CPU tensors)
    assert isinstance(again[2], ValueError) and "NaN or Inf" in str(again[2])
    for i in (0, 1, 3):
        np.testing.assert_allclose(again[i][0], got[i][0], rtol=0, atol=1e-5)
